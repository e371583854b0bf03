"""lmms-eval bridge (optional): run lmms-eval's own tasks on a vlmkit-wrapped model.

``VlmkitLMM`` is an lmms-eval *simple* model; it exists only when ``lmms_eval`` is installed. lmms-eval 0.7
resolves ``--model NAME`` through ``MODEL_REGISTRY_V2``, which reads the ``lmms_eval.models`` entry-point
group of every installed package; vlmkit's ``pyproject.toml`` declares ``vlmkit =
"vlmkit.evaluation.lmms_bridge:lmms_manifest"`` there, so after ``pip install "vlmkit[lmms]"`` (or ``-e``)
lmms-eval's own CLI runs it with nothing imported by hand::

    python -m lmms_eval --model vlmkit --model_args pretrained=PATH,compress=fopru:0.25 \
        --tasks vqav2_val,pope --batch_size 8 --output_path runs/lmms --log_samples

``model_args``: ``pretrained`` (a local checkpoint or vlmkit save folder, or ``tiny:<family>``),
``compress`` (stage specs joined with ``+``: ``fopru:0.25+random:0.5``; commas separate model_args),
``position`` (``v2pe:64``), ``batch_size``, ``device``, ``dtype``, ``prompt_style``, ``max_new_tokens``.
Programmatic use (an in-memory model, e.g. inside a training loop)::

    from lmms_eval.evaluator import simple_evaluate
    from vlmkit.evaluation.lmms_bridge import VlmkitLMM
    lm = VlmkitLMM(pretrained="/ckpt/llava-1.5-7b-hf", compress="fopru:0.25", batch_size=8)
    results = simple_evaluate(model=lm, tasks=["vqav2_val", "pope"])

The batching logic lives in ``VlmkitGenerator``, which needs nothing from lmms-eval, so it is usable (and
tested) without it. Requests are answered in the simple-model protocol: ``Instance.args = (context,
gen_kwargs, doc_to_visual, doc_id, task, split)``; images come from
``doc_to_visual(self.task_dict[task][split][doc_id])``. Requests with equal ``gen_kwargs`` are generated
together in left-padded batches; ``until`` cuts the text. The prompt is built exactly as ``vlmkit eval``
builds it (``build_input_text``), so the same question gives the same answer through either harness
(``tests/test_interop_lmms.py`` runs lmms-eval's CLI and checks that).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

__all__ = ["VlmkitGenerator", "VlmkitLMM", "lmms_eval_available", "lmms_manifest", "LMMS_MODEL_NAME"]

#: the name lmms-eval's ``--model`` takes
LMMS_MODEL_NAME = "vlmkit"


def lmms_eval_available() -> bool:
    """True when the ``lmms_eval`` package can be imported."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return False
    return True


class VlmkitGenerator:
    """lmms-eval-free core: load/wrap a model once, answer ``(context, images, gen_kwargs)`` requests.

    ``pretrained``: a ``vlmkit.evaluation.loading.load_model`` spec (path, ``tiny:<family>``) or an
    object with ``processor=``; ``compress`` / ``position``: stage specs (``"fopru:0.25"``, ``"v2pe:64"``).
    """

    def __init__(self, pretrained: Any, processor: Any = None, compress: str | Sequence[str] | None = None,
                 position: str | None = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str | None = None, prompt_style: str = "auto", max_new_tokens: int = 128) -> None:
        from .loading import load_model

        if isinstance(compress, str):
            compress = [c for c in compress.split("+") if c]  # model_args are comma-separated: join with +
        self.loaded = load_model(pretrained, processor, compress or (), position, device, dtype)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.prompt_style = prompt_style
        self.max_new_tokens = int(max_new_tokens)

    def _text(self, context: str, n_images: int) -> str:
        """The model text for one request: lmms-eval ``<image>`` markers are dropped and the images go
        before the text (as lmms-eval's ``llava_hf`` does), in the processor's prompt style."""
        from .prediction import build_input_text

        return build_input_text(self.loaded.processor, context.replace("<image>", "").strip(), self.prompt_style,
                                n_images)

    def generate(self, items: Sequence[tuple[str, Sequence[Any], dict[str, Any]]]) -> list[str]:
        """Answer ``(context, images, gen_kwargs)`` items, batching equal ``gen_kwargs``; outputs in input order."""
        from .prediction import generate_batch

        groups: dict[str, list[int]] = {}
        for i, (_, _, gen) in enumerate(items):
            groups.setdefault(json.dumps(gen or {}, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(items)
        for key, idx in groups.items():
            gen = dict(json.loads(key))
            gen.setdefault("max_new_tokens", self.max_new_tokens)
            gen = {k: v for k, v in gen.items() if k in ("max_new_tokens", "until", "do_sample", "temperature",
                                                         "top_p", "num_beams", "min_new_tokens", "repetition_penalty")}
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                images = [[im.convert("RGB") if hasattr(im, "convert") else im for im in items[i][1]] for i in chunk]
                texts = [self._text(items[i][0], len(images[k])) for k, i in enumerate(chunk)]
                for i, res in zip(chunk, generate_batch(self.loaded, images, texts, gen)):
                    out[i] = res["output"]
        return [o or "" for o in out]

    def generate_until(self, requests: Sequence[Any], task_dict: dict[str, Any]) -> list[str]:
        """lmms-eval simple-model ``generate_until``: ``req.args = (ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        items = []
        for req in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(task_dict[task][split][doc_id])
            visuals = [v for v in (visuals or []) if v is not None]
            items.append((ctx, visuals, dict(gen_kwargs or {})))
        return self.generate(items)


def lmms_manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` naming ``VlmkitLMM`` by class path.

    Called by lmms-eval while it builds ``MODEL_REGISTRY_V2``; it imports nothing heavy (the class is built
    only when lmms-eval resolves ``--model vlmkit`` and imports ``VlmkitLMM`` from this module).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_NAME, simple_class_path=f"{__name__}.VlmkitLMM")


def _make_lmms_class():
    from lmms_eval.api.model import lmms

    class VlmkitLMM(lmms):
        """lmms-eval model ``vlmkit``: ``--model vlmkit --model_args pretrained=PATH,compress=fopru:0.25``.

        ``max_batch_size`` is accepted because lmms-eval always passes it, and ignored (no ``auto`` batch
        size); any other unknown model_arg is an error naming it, so a misspelt ``compres=`` never runs
        the uncompressed model silently.
        """

        is_simple = True

        def __init__(self, pretrained: str, batch_size: int | str = 1, compress: str | None = None,
                     position: str | None = None, device: str | None = None, dtype: str | None = None,
                     prompt_style: str = "auto", max_new_tokens: int = 128, max_batch_size: Any = None,
                     **unknown) -> None:
            if unknown:
                raise TypeError(f"--model vlmkit: unknown model_args {sorted(unknown)}; accepted: pretrained, "
                                "compress (specs joined with +), position, batch_size, device, dtype, prompt_style, "
                                "max_new_tokens")
            super().__init__()
            self.core = VlmkitGenerator(pretrained, compress=compress, position=position, batch_size=batch_size,
                                        device=device, dtype=dtype, prompt_style=prompt_style,
                                        max_new_tokens=max_new_tokens)
            self.batch_size_per_gpu = self.core.batch_size

        def generate_until(self, requests) -> list[str]:
            return self.core.generate_until(requests, self.task_dict)

        def loglikelihood(self, requests):
            raise NotImplementedError("vlmkit's lmms-eval model answers generate_until tasks only")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("vlmkit's lmms-eval model answers generate_until tasks only")

    return VlmkitLMM


def __getattr__(name: str):
    if name == "VlmkitLMM":
        if not lmms_eval_available():
            raise ImportError("VlmkitLMM needs lmms-eval (pip install lmms-eval); VlmkitGenerator works without it")
        cls = _make_lmms_class()
        globals()["VlmkitLMM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
