"""Running the model on one batch of docs: prompt text, generation settings, answers and masks.

The model calls go through ``vlmkit.Predictor`` (left-padded batches, token statistics from the batch the
language model really saw, masks from the head that declares ``mask_output``). This module adds what the
harness needs around it: lmms-eval style generation settings (``--gen-kwargs`` text, ``temperature: 0`` =
greedy, ``until`` stop strings) and the per-sample result dicts the runner scores and writes::

    {"raw": decoded answer, "output": raw cut at ``until``, "visual_tokens", "prefill_tokens",
     "generated_tokens"[, "masks": bool [n, H, W] from ``segment_batch``]}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .loading import LoadedModel

__all__ = ["build_input_text", "parse_gen_kwargs", "check_gen_kwargs", "apply_until", "generate_batch", "segment_batch"]


# ---------------------------------------------------------------------------------------------
# Prompt text and generation settings
# ---------------------------------------------------------------------------------------------


def build_input_text(processor: Any, text: str, style: str = "auto", n_images: int = 1) -> str:
    """The text the processor gets for one sample with ``n_images`` images: ``vlmkit.predictor.build_prompt``
    (``"chat"``: the chat template; ``"plain"``: ``"user : <image> {text} assistant :"``; ``"auto"``: chat when
    the processor has a template). Imported lazily so that importing the harness does not import torch."""
    from ..predictor import build_prompt

    return build_prompt(processor, text, style, n_images)


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


#: generation setting → (what it must be, its check); ``until`` is a str or a list of str
_GEN_RULES: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "min_new_tokens": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "num_beams": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "top_k": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "temperature": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "repetition_penalty": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "until": ("a string or a list of strings",
              lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_gen_kwargs(gen: dict[str, Any], where: str = "--gen-kwargs") -> dict[str, Any]:
    """``gen`` checked key by key: known keys only (``tasks.GENERATION_KEYS``) and values of the right type and
    range (``max_new_tokens`` an integer >= 1, ``temperature`` a number >= 0, …); ValueError naming the key, the
    value and what was expected otherwise."""
    from .tasks import GENERATION_KEYS

    for key, value in gen.items():
        if key not in GENERATION_KEYS:
            raise ValueError(f"{where}: unknown generation setting {key!r}; accepted: {', '.join(GENERATION_KEYS)}")
        expected, ok = _GEN_RULES.get(key, (None, None))
        if ok is not None and not ok(value):
            raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")
    return gen


def parse_gen_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``"max_new_tokens=8,temperature=0"`` → dict (values parsed as YAML; ``until`` stays text); dicts pass
    through. Keys and value types are checked (``check_gen_kwargs``)."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        out = dict(text)
    else:
        out = {}
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--gen-kwargs expects key=value pairs separated by commas, got {part!r} in {text!r}")
            if key.strip() in out:
                raise ValueError(f"--gen-kwargs: {key.strip()} is given twice in {text!r}")
            parsed = _yaml_value(value.strip())
            if key.strip() == "until" and not isinstance(parsed, (str, list)):
                parsed = value.strip()  # a stop string is text, even when it looks like a number
            out[key.strip()] = parsed
    return check_gen_kwargs(out)


def _generate_kwargs(gen: dict[str, Any]) -> dict[str, Any]:
    """A task's ``generation_kwargs`` (lmms-eval style) → ``Predictor`` generate kwargs: ``until`` dropped,
    ``temperature: 0`` = greedy, sampling settings dropped when greedy, one beam. ``Predictor`` adds its
    defaults (32 new tokens, greedy, the tokenizer's pad id)."""
    out = {k: v for k, v in gen.items() if k != "until"}
    if out.get("temperature", None) == 0:
        out.pop("temperature")
        out["do_sample"] = False
    out.setdefault("num_beams", 1)
    if not out.get("do_sample", False):
        for k in ("temperature", "top_p", "top_k"):
            out.pop(k, None)
    return out


def apply_until(text: str, until: Sequence[str] | str | None) -> str:
    """Cut ``text`` at the first occurrence of each stop string (lmms-eval's ``until``)."""
    if not until:
        return text
    for term in [until] if isinstance(until, str) else until:
        if term:
            text = text.split(term)[0]
    return text


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def _result(pred, until) -> dict[str, Any]:
    return {"raw": pred.text, "output": apply_until(pred.text, until), "visual_tokens": int(pred.visual_tokens),
            "prefill_tokens": int(pred.prefill_tokens), "generated_tokens": int(pred.generated_tokens)}


def generate_batch(
    loaded: "LoadedModel", images: Sequence[Any], texts: Sequence[str], gen: dict[str, Any]
) -> list[dict[str, Any]]:
    """Generate for one batch (one image list per sample, left-padded; ``texts`` already formatted, e.g. by
    ``build_input_text``) → per sample ``{"raw", "output" (after ``until``), "visual_tokens",
    "prefill_tokens", "generated_tokens"}``.

    Token counts come from the ``AssembledBatch`` the wrapper really feeds the language model
    (``Predictor.answer``); ``generated_tokens`` counts up to and with the first end-of-sequence.
    """
    preds = loaded.predictor.answer(list(images), list(texts), **_generate_kwargs(gen))
    return [_result(p, gen.get("until")) for p in preds]


def segment_batch(
    loaded: "LoadedModel", images: Sequence[Any], texts: Sequence[str], gen: dict[str, Any]
) -> list[dict[str, Any]]:
    """Like ``generate_batch`` for a model with a head that makes masks from mask tokens (``mask_output ==
    "token"``, e.g. READ): answers and masks come from ``Predictor.segment`` and each result also holds
    ``"masks"`` (bool [n, H, W] at the image's size, one per mask token). ``raw`` is the answer up to the
    first end-of-sequence and ``generated_tokens`` its length."""
    if loaded.mask_head is None:
        raise ValueError("this task's parser needs masks from a mask-producing head (e.g. vlmkit.READConfig); "
                         "the evaluated model has none")
    # Predictor.segment takes an image or a one-image list per sample (ValueError otherwise)
    preds = loaded.predictor.segment(list(images), list(texts), **_generate_kwargs(gen))
    return [{**_result(p, gen.get("until")), "masks": p.masks} for p in preds]
