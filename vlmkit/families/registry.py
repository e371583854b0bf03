"""Map ``config.model_type`` to the family adapter that handles it (adapters import lazily)."""

from __future__ import annotations

import importlib

from torch import nn

# model_type -> "module:Class"; modules are imported when a model of that type is wrapped.
_FAMILIES: dict[str, str] = {
    "llava": "vlmkit.families.llava:LlavaFamily",
    "internvl": "vlmkit.families.internvl:InternVLFamily",
    "llava_next": "vlmkit.families.llava_next:LlavaNextFamily",
    "llava_onevision": "vlmkit.families.llava_onevision:LlavaOnevisionFamily",
    "llava_onevision1_5": "vlmkit.families.llava_onevision1_5:LlavaOnevision15Family",
    "smolvlm": "vlmkit.families.smolvlm:SmolVLMFamily",
    "idefics3": "vlmkit.families.smolvlm:Idefics3Family",
    "qwen2_5_vl": "vlmkit.families.qwen2_5_vl:Qwen2_5_VLFamily",
    "qwen2_vl": "vlmkit.families.qwen2_vl:Qwen2VLFamily",
    "qwen3_vl": "vlmkit.families.qwen3_vl:Qwen3VLFamily",
    "glm4v": "vlmkit.families.glm4v:Glm4vFamily",
    "gemma3": "vlmkit.families.gemma3:Gemma3Family",
    "mistral3": "vlmkit.families.mistral3:Mistral3Family",
}


def supported_families() -> list[str]:
    """The ``config.model_type`` values ``vlmkit.wrap`` accepts."""
    return sorted(_FAMILIES)


def register_family(model_type: str, path: str) -> None:
    """Register an adapter class (``"module:Class"``) for ``model_type``."""
    _FAMILIES[model_type] = path


def family_class(model_type: str):
    """The adapter class (a ``Family`` subclass) registered for ``model_type``; ValueError otherwise.

    For what a family knows before there is a model (``part_paths`` when quantizing while loading).
    """
    if model_type not in _FAMILIES:
        raise ValueError(f"no vlmkit family for model_type={model_type!r}; supported families: {supported_families()}")
    module, name = _FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def family_for(model: nn.Module):
    """The adapter instance for ``model``; ValueError naming the type and the supported families otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"vlmkit cannot wrap {type(model).__name__} (model_type={model_type!r}); "
            f"supported families: {supported_families()}"
        )
    return family_class(model_type)(model)
