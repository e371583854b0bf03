"""``wrap`` / ``load`` / ``unwrap`` and ``VLMWrapper``: one call adds vlmkit stages to a HF VLM.

The wrapper never changes the wrapped model's weights or code: it runs the model's own vision tower
and projector (through the family adapter), lets the stages compress and re-position the visual
tokens, and hands ``inputs_embeds`` + an explicit attention mask to the model's own decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from torch import nn

from .config import StageConfig, config_from_dict
from .families import family_for
from .sequence import AssembledBatch, assemble
from .stage import ROLES, Stage
from .tokens import VisualTokens

CONFIG_NAME = "vlmkit.json"
WEIGHTS_NAME = "vlmkit_stages.safetensors"


def _order_stages(configs: tuple[StageConfig, ...]) -> list[StageConfig]:
    """Validate the combination and sort by pipeline role (stable within a role)."""
    for c in configs:
        if not isinstance(c, StageConfig):
            raise TypeError(f"wrap() takes StageConfig objects after the model, got {type(c).__name__}: {c!r}")
        if c.role not in ROLES:
            raise ValueError(f"stage {c.type!r} has role {c.role!r}; known roles: {list(ROLES)}")
    positions = [c.type for c in configs if c.role == "position"]
    if len(positions) > 1:
        raise ValueError(f"at most one position scheme per model, got {positions}")
    for c in configs:
        same_role = [o.type for o in configs if o.role == c.role]
        if c.exclusive and len(same_role) > 1:
            raise ValueError(f"stage {c.type!r} cannot be combined with other {c.role} stages, got {same_role}")
    return sorted(configs, key=lambda c: ROLES.index(c.role))


class VLMWrapper(nn.Module):
    """A HF vision-language model plus vlmkit stages. Build it with ``vlmkit.wrap``.

    ``forward`` and ``generate`` take what the model's processor returns (``input_ids`` with image
    placeholders, ``pixel_values``, ``attention_mask``, optional ``labels``) and return what the
    wrapped model returns.
    """

    base_model_prefix = "base_model"  # PEFT / transformers utilities look the inner model up by this name

    def __init__(self, model: nn.Module, *configs: StageConfig) -> None:
        super().__init__()
        family = family_for(model)  # ValueError for unsupported models, before anything is changed
        ordered = _order_stages(configs)
        self.base_model = model
        self.family = family
        self.stages = nn.ModuleList([c.build() for c in ordered])
        attached: list[Stage] = []
        try:
            for stage in self.stages:
                stage.attach(family)
                attached.append(stage)
        except Exception:
            for stage in reversed(attached):
                stage.detach(family)
            raise
        self.train(model.training)  # follow the wrapped model's mode (an nn.Module starts in training mode)

    # --- HF-like surface ------------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def stage_configs(self) -> list[StageConfig]:
        return [s.config for s in self.stages]

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def trainable_stage_names(self) -> list[str]:
        """Module names of the stages that have parameters, for PEFT's ``modules_to_save``.

        PEFT then trains a copy of each such stage and routes the stage hooks (``compress``, …) to it.
        """
        return [f"stages.{i}" for i, s in enumerate(self.stages) if any(True for _ in s.parameters())]

    def stages_of(self, role: str) -> list[Stage]:
        return [s for s in self.stages if s.role == role]

    # --- pipeline -------------------------------------------------------------------------------
    def encode_visual(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """The ``VisualTokens`` (one per image) this wrapper would feed the language model.

        ``input_ids`` are needed only to group the tiles of tiled families into images.
        """
        with contextlib.ExitStack() as stack:
            for stage in self.stages:
                stack.enter_context(stage.vision_context(self.family))
            tokens = self.family.encode_images(pixel_values, input_ids, **image_kwargs)
            for stage in self.stages_of("compressor"):
                tokens = stage.compress(tokens)
        return tokens

    def assemble(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        **image_kwargs,
    ) -> AssembledBatch:
        """Encode, compress and splice: the exact batch the language model will see."""
        if input_ids is None:
            raise ValueError("vlmkit needs input_ids (with image placeholders) when pixel_values are given")
        tokens = [] if pixel_values is None else self.encode_visual(pixel_values, input_ids, **image_kwargs)
        return assemble(
            input_ids, attention_mask, labels, tokens, self.family.embed,
            self.family.placeholder_id, self.family.pad_token_id, padding_side,
        )

    def _split_image_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: kwargs.pop(k) for k in self.family.image_kwarg_names if kwargs.get(k) is not None}

    def _language_inputs(self, batch: AssembledBatch) -> dict[str, Any]:
        inputs = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask}
        for stage in self.stages_of("position"):
            inputs["position_ids"] = stage.position_ids(batch)
        return inputs

    @contextlib.contextmanager
    def _language_context(self, batch: AssembledBatch):
        with contextlib.ExitStack() as stack:
            for stage in self.stages:
                stack.enter_context(stage.language_context(self.family, batch))
            yield

    def _passthrough(self, pixel_values) -> bool:
        return pixel_values is None and not self.stages_of("position")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF-style forward; ``.loss`` when ``labels`` [B, S] are given (visual slots never count)."""
        if self._passthrough(pixel_values):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("position_ids / inputs_embeds cannot be combined with vlmkit's image pipeline")
        image_kwargs = self._split_image_kwargs(kwargs)
        batch = self.assemble(input_ids, pixel_values, attention_mask, labels, **image_kwargs)
        with self._language_context(batch):
            return self.base_model(**self._language_inputs(batch), labels=batch.labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Same contract as ``transformers``' ``generate``: returns the prompt ids followed by new tokens.

        The prompt is re-padded on the left after compression; the returned prompt part is the
        caller's ``input_ids`` as given.
        """
        if self._passthrough(pixel_values):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        image_kwargs = self._split_image_kwargs(kwargs)
        batch = self.assemble(input_ids, pixel_values, attention_mask, padding_side="left", **image_kwargs)
        with self._language_context(batch):
            out = self.base_model.generate(**self._language_inputs(batch), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)  # beams / samples
        if isinstance(out, torch.Tensor):
            return torch.cat([prompt, out], dim=1)
        out.sequences = torch.cat([prompt, out.sequences], dim=1)
        return out

    def masks_from_text(self, texts: list[str], image_sizes=None, images=None) -> list:
        """Turn generated answers into masks with the wrapper's text-parsing head (e.g. Text4Seg).

        ``image_sizes`` are (H, W) per answer (or taken from ``images``); returns the head's results.
        """
        heads = [s for s in self.stages_of("head") if hasattr(s, "masks_from_text")]
        if len(heads) != 1:
            raise ValueError(f"masks_from_text needs exactly one text-parsing head stage, found {len(heads)}; "
                             "wrap the model with e.g. vlmkit.Text4SegConfig()")
        return heads[0].masks_from_text(texts, image_sizes=image_sizes, images=images)

    # --- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, save_base_model: bool = False) -> None:
        """Write ``vlmkit.json`` (stage configs) and the stages' weights (safetensors) to ``path``.

        The base model's weights are written only with ``save_base_model=True`` (then ``vlmkit.load(path)``
        needs nothing else); otherwise ``vlmkit.load(model, path)`` re-applies the stages to a model.
        """
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        meta = {
            "format": "vlmkit",
            "version": 1,
            "model_type": self.family.model_type,
            "base_model": getattr(self.config, "_name_or_path", "") or "",
            "stages": [c.to_dict() for c in self.stage_configs],
        }
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        state = {k: v.detach().contiguous() for k, v in self.stages.state_dict().items()}
        if state:
            save_file(state, os.path.join(path, WEIGHTS_NAME))
        if save_base_model:
            self.base_model.save_pretrained(path)


def wrap(model: nn.Module, *configs: StageConfig) -> VLMWrapper:
    """Wrap a loaded ``transformers`` VLM with vlmkit stages; no configs = identity."""
    if isinstance(model, VLMWrapper):
        raise ValueError("the model is already wrapped; wrap the original (vlmkit.unwrap(model)) instead")
    return VLMWrapper(model, *configs)


def unwrap(wrapped: VLMWrapper) -> nn.Module:
    """Remove every stage (hooks, patches) and return the original model object."""
    if not isinstance(wrapped, VLMWrapper):
        raise TypeError(f"unwrap() takes a VLMWrapper, got {type(wrapped).__name__}")
    for stage in reversed(list(wrapped.stages)):
        stage.detach(wrapped.family)
    return wrapped.base_model


def read_saved(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``vlmkit.json`` in ``path``."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r}: not a vlmkit save directory")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != "vlmkit" or not isinstance(meta.get("stages"), list):
        raise ValueError(f"{file} is not a vlmkit config (expected 'format': 'vlmkit' and a 'stages' list)")
    return meta


def load(path_or_model: str | os.PathLike | nn.Module, path: str | os.PathLike | None = None, **model_kwargs):
    """Re-apply saved stages. ``load(model, path)`` wraps a loaded model; ``load(path)`` also loads the
    base model saved there (``save_pretrained(..., save_base_model=True)``) with ``from_pretrained``.

    ``model_kwargs`` go to ``from_pretrained`` (``trust_remote_code`` stays False unless given).
    """
    from safetensors.torch import load_file

    if isinstance(path_or_model, nn.Module):
        if path is None:
            raise ValueError("load(model, path): the save directory is missing")
        model = path_or_model
    else:
        path = path_or_model
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
    meta = read_saved(path)
    configs = [config_from_dict(d) for d in meta["stages"]]
    wrapped = wrap(model, *configs)
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        missing, unexpected = wrapped.stages.load_state_dict(load_file(weights), strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the stages: missing {missing}, unexpected {unexpected}")
    return wrapped
