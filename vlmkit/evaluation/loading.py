"""Loading the evaluated model: a spec or object → a wrapped model with its processor (``LoadedModel``).

``load_model`` accepts ``"tiny:<family>"``, a local checkpoint folder (a vlmkit save folder brings its stages
back), a ``(model, processor)`` pair, a model or a ``VLMWrapper``, and wraps it with the requested stages. The
model's file-safe name (``<spec>__<stage>-<non-default fields>...``) names its output folder.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Sequence

from ..config import parse_stage_spec

__all__ = ["LoadedModel", "load_model"]


@dataclasses.dataclass
class LoadedModel:
    """A wrapped model ready to generate: ``wrapped`` (VLMWrapper), its ``processor``, the ``device``,
    a file-safe ``name`` and the ``spec`` it was loaded from."""

    wrapped: Any
    processor: Any
    device: Any
    name: str
    spec: str
    owns_wrapper: bool = False  # wrapped here around the caller's model: unwrap when done

    def release(self) -> None:
        """Remove the stages this loader added to a caller's model (``vlmkit.unwrap``)."""
        if self.owns_wrapper:
            from ..wrapper import unwrap

            unwrap(self.wrapped)
            self.owns_wrapper = False

    @property
    def stage_configs(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.wrapped.stage_configs]

    def _head(self, mask_output: str):
        return next((h for h in self.wrapped.stages_of("head") if getattr(h, "mask_output", None) == mask_output), None)

    @property
    def text4seg_head(self):
        """The head whose masks the model writes as text (``mask_output == "text"``, e.g. Text4Seg), or None;
        the parsers of text-mask answers use it (its grid, its SAM refinement)."""
        return self._head("text")

    @property
    def mask_head(self):
        """The head that makes masks from the states of generated mask tokens (``mask_output == "token"``,
        e.g. READ), or None."""
        return self._head("token")

    @functools.cached_property
    def predictor(self):
        """A ``vlmkit.Predictor`` over this model whose prompts are passed as given (``prompt_style="raw"``):
        the harness formats them itself (``build_input_text``). Built once per loaded model."""
        from ..predictor import Predictor

        return Predictor(self.wrapped, self.processor, prompt_style="raw")


def _sanitize(name: str) -> str:
    """lmms-eval style: path separators and odd characters → ``__``."""
    name = re.sub(r"[\"<>:/|\\?*\[\]\s]+", "__", name).strip("_.")
    return name or "model"


def _stage_label(config) -> str:
    d = config.to_dict()
    d.pop("type", None)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    parts = [f"{k}={v}" for k, v in d.items() if v is not None and defaults.get(k, object()) != v
             and not (isinstance(v, list) and defaults.get(k) == tuple(v))]
    return config.type + (("-" + "-".join(parts)) if parts else "")


def compress_configs(compress) -> list:
    """``compress`` (specs like ``"fopru:0.25"`` or configs; None) as configs: compressors and decoder stages
    (FastV, PDrop, DART, VTW); any other role is refused with its name (position schemes go to ``position=``)."""
    configs = [parse_stage_spec(c) if isinstance(c, str) else c for c in (compress or ())]
    for c in configs:
        if c.role not in ("compressor", "decoder"):
            raise ValueError(f"compress={c.type!r}: a {c.role!r} stage, not a compressor or pruner; "
                             "give position schemes as position=…")
    return configs


def load_model(
    model: Any, processor: Any = None, compress: Sequence[Any] = (), position: Any = None,
    device: str | None = None, dtype: str | None = None,
) -> LoadedModel:
    """Model spec or object → ``LoadedModel``.

    ``model``: ``"tiny:<family>"`` (``vlmkit.testing.tiny_vlm``), a local checkpoint path
    (``AutoModelForImageTextToText`` + ``AutoProcessor``, ``trust_remote_code=False``; a vlmkit save
    directory re-applies its stages with ``vlmkit.load``, plus ``compress`` / ``position``), a ``(model, processor)`` pair, a HF model or
    a ``VLMWrapper`` (then ``processor`` is required). ``compress`` / ``position``: stage specs
    (``"fopru:0.25"``) or configs.
    """
    import torch

    from .. import wrapper as core
    CONFIG_NAME, VLMWrapper, wrap, load_saved = core.CONFIG_NAME, core.VLMWrapper, core.wrap, core.load

    configs = compress_configs(compress)
    if position is not None:
        configs.append(parse_stage_spec(position, "position") if isinstance(position, str) else position)
    if isinstance(model, tuple):
        model, processor = model
    loaded_here = isinstance(model, str)
    if isinstance(model, str):
        spec = model
        if model.startswith("tiny:"):
            from vlmkit.testing import tiny_vlm

            model, processor = tiny_vlm(model.split(":", 1)[1])
        else:
            if not os.path.isdir(model):
                raise FileNotFoundError(f"--model {model!r}: not a local checkpoint folder (nothing is downloaded); "
                                        "use a path or tiny:<family>")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kwargs: dict[str, Any] = {"trust_remote_code": False}
            if dtype not in (None, "auto"):
                kwargs["dtype"] = getattr(torch, dtype)
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
            if os.path.isfile(os.path.join(model, CONFIG_NAME)):  # a vlmkit save: its stages plus the asked ones
                model = load_saved(model, tokenizer=processor.tokenizer, extra=configs, **kwargs)
                configs = []
            else:
                model = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    else:
        spec = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if processor is None:
            raise ValueError("evaluate(model=<object>) needs processor=<its processor>")
    owns = False
    if isinstance(model, VLMWrapper):
        if configs:
            raise ValueError("the model is already wrapped; pass compress/position only with an unwrapped model")
        wrapped = model
    else:
        wrapped = wrap(model, *configs)
        owns = not loaded_here
    wrapped.eval()
    if loaded_here:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        wrapped.to(dev)
    else:
        dev = next(wrapped.parameters()).device
        if device is not None and torch.device(device) != dev:
            wrapped.to(device)
            dev = torch.device(device)
    processor.tokenizer.padding_side = "left"  # decoder-only batch generation
    stages = [_stage_label(c) for c in wrapped.stage_configs]
    name = _sanitize(spec) + "".join(f"__{_sanitize(s)}" for s in stages)
    return LoadedModel(wrapped=wrapped, processor=processor, device=dev, name=name, spec=spec, owns_wrapper=owns)
