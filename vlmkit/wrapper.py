"""``wrap`` / ``load`` / ``unwrap`` and ``VLMWrapper``: one call adds vlmkit stages to a HF VLM.

The wrapper never changes the wrapped model's weights or code: it runs the model's own vision tower
and projector (through the family adapter), lets the stages compress and re-position the visual
tokens, and hands ``inputs_embeds`` + an explicit attention mask to the model's own decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from .config import StageConfig, config_from_dict
from .families import family_for
from .sequence import AssembledBatch, assemble, check_pad_to_multiple_of, resize_placeholder_runs
from .stage import ROLES, Stage
from .tokens import VisualTokens

FORMAT_VERSION = 2  # 1: stage weights keyed by list position ("0.x"); 2: by stage type ("pvc.x")
CONFIG_NAME = "vlmkit.json"
WEIGHTS_NAME = "vlmkit_stages.safetensors"
ADDED_PREFIX = "added_tokens."  # safetensors keys of the embedding rows of tokens the stages added


def _order_stages(configs: tuple[StageConfig, ...]) -> list[StageConfig]:
    """Validate the combination and sort by pipeline role (stable within a role)."""
    for c in configs:
        if not isinstance(c, StageConfig):
            raise TypeError(f"wrap() takes StageConfig objects after the model, got {type(c).__name__}: {c!r}")
        if c.role not in ROLES:
            raise ValueError(f"stage {c.type!r} has role {c.role!r}; known roles: {list(ROLES)}")
    encoders = [c.type for c in configs if c.role == "encoder"]
    if len(encoders) > 1:
        raise ValueError(f"at most one stage may replace the image encoder, got {encoders}")
    types = [c.type for c in configs]
    if len(set(types)) != len(types):
        raise ValueError(f"each stage type may appear once per model (stages are held by type), got {types}")
    positions = [c.type for c in configs if c.sets_positions]
    if len(positions) > 1:
        raise ValueError(f"at most one position scheme per model, got {positions}")
    for c in configs:
        same_role = [o.type for o in configs if o.role == c.role]
        if c.exclusive and len(same_role) > 1:
            raise ValueError(f"stage {c.type!r} cannot be combined with other {c.role} stages, got {same_role}")
    return sorted(configs, key=lambda c: ROLES.index(c.role))


class StageDict(nn.ModuleDict):
    """The wrapper's stages keyed by ``type`` (so saved keys and PEFT ``modules_to_save`` names such as
    ``stages.fopru`` do not depend on order), in pipeline order. Iterating yields the stages (like
    ``nn.ModuleList``); ``stages[i]`` is the i-th in pipeline order, ``stages["fopru"]`` the one of that type."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__({s.config.type: s for s in stages})

    def __getitem__(self, key: int | str) -> Stage:
        if isinstance(key, int):
            return list(self._modules.values())[key]
        return super().__getitem__(key)

    def __iter__(self):
        return iter(self._modules.values())


class VLMWrapper(nn.Module):
    """A HF vision-language model plus vlmkit stages. Build it with ``vlmkit.wrap``.

    ``forward`` and ``generate`` take what the model's processor returns (``input_ids`` with image
    placeholders, ``pixel_values``, ``attention_mask``, optional ``labels``) and return what the
    wrapped model returns.
    """

    base_model_prefix = "base_model"  # PEFT / transformers utilities look the inner model up by this name

    def __init__(self, model: nn.Module, *configs: StageConfig, tokenizer=None, pad_to_multiple_of: int | None = None,
                 _expected_tokens: dict[str, int] | None = None, _stages: list[Stage] | None = None) -> None:
        super().__init__()
        family = family_for(model)  # ValueError for unsupported models, before anything is changed
        ordered = _order_stages(configs)
        self.base_model = model
        self.family = family
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of  # generate's prompt length (checked by wrap / assemble)
        self.added_tokens: dict[str, int] = {}
        self._assemble_hooks: OrderedDict[int, Callable] = OrderedDict()
        for c in ordered:
            for capability in c.requires:
                family.require(capability, c.type)
        # _stages: modules built for these configs by an earlier wrapper (already detached), reused as they are
        self.stages = StageDict(_stages if _stages is not None else [c.build() for c in ordered])
        attached: list[Stage] = []
        try:
            for stage in self.stages:
                stage.attach(family)
                attached.append(stage)
            self._add_tokens(tokenizer, _expected_tokens)
        except Exception:
            for stage in reversed(attached):
                stage.detach(family)
            raise
        self.train(model.training)  # follow the wrapped model's mode (an nn.Module starts in training mode)

    def _add_tokens(self, tokenizer, expected: dict[str, int] | None) -> None:
        """Add the stages' ``new_tokens`` to ``tokenizer``, grow the embeddings, hand the ids to the stages.

        A token already in the tokenizer is a collision (ValueError) unless ``expected`` (from a save) gives
        it that same id. Embeddings grow only when an id lies past the last row (vocabularies padded to a
        multiple, e.g. LLaVA-1.5's 32064 rows, already hold spare rows); ``resize_token_embeddings``
        initialises new rows from the mean and covariance of the old ones. A tokenizer cannot take tokens
        back: if a stage's ``bind_tokens`` refuses the ids, they stay in the tokenizer (and the rows in the
        model) although ``wrap`` fails.
        """
        wanted = {s: s.new_tokens() for s in self.stages if s.adds_tokens}
        tokens = [t for ts in wanted.values() for t in ts]
        if not tokens:
            return
        if len(set(tokens)) != len(tokens):
            dup = sorted({t for t in tokens if tokens.count(t) > 1})
            raise ValueError(f"stages add the same token(s) twice: {dup}")
        if tokenizer is None:
            needing = [s.config.type for s, ts in wanted.items() if ts]
            raise ValueError(f"stage(s) {needing} add tokens to the vocabulary: pass the model's tokenizer, "
                             "vlmkit.wrap(model, ..., tokenizer=tokenizer)")
        from tokenizers import AddedToken

        vocab = tokenizer.get_vocab()
        for t in tokens:
            if t in vocab and (expected is None or expected.get(t) != vocab[t]):
                raise ValueError(f"token {t!r} is already in the tokenizer (id {vocab[t]}); a stage must add new "
                                 "tokens only (choose other token strings in its config)")
        fresh = [t for t in tokens if t not in vocab]
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in fresh])
        ids = dict(zip(tokens, tokenizer.convert_tokens_to_ids(tokens)))
        if expected is not None and any(expected.get(t) != i for t, i in ids.items()):
            bad = {t: (expected.get(t), i) for t, i in ids.items() if expected.get(t) != i}
            raise ValueError(f"the tokenizer gives the saved tokens other ids (saved, now): {bad}; "
                             "load with the tokenizer the stages were saved with")
        rows = self.family.model.get_input_embeddings().weight.shape[0]
        if max(ids.values()) >= rows:
            self.family.model.resize_token_embeddings(max(ids.values()) + 1)
        self.added_tokens = ids
        for stage, ts in wanted.items():
            if ts:
                stage.bind_tokens({t: ids[t] for t in ts})

    def _added_rows(self) -> dict[str, torch.Tensor]:
        """The embedding rows (input, and output unless tied) of the added tokens, for saving."""
        if not self.added_tokens:
            return {}
        ids = torch.tensor(list(self.added_tokens.values()))
        inner = self.family.model
        out = {ADDED_PREFIX + "input": inner.get_input_embeddings().weight[ids]}
        head = inner.get_output_embeddings()
        if head is not None and head.weight is not inner.get_input_embeddings().weight:
            out[ADDED_PREFIX + "output"] = head.weight[ids]
        return {k: v.detach().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def _load_added_rows(self, state: dict[str, torch.Tensor]) -> None:
        ids = torch.tensor(list(self.added_tokens.values()))
        inner = self.family.model
        for key, module in (("input", inner.get_input_embeddings()), ("output", inner.get_output_embeddings())):
            if ADDED_PREFIX + key in state:
                module.weight[ids] = state[ADDED_PREFIX + key].to(module.weight)

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
        return [f"stages.{name}" for name, s in self.stages.items() if any(True for _ in s.parameters())]

    def stages_of(self, role: str) -> list[Stage]:
        """The stages of one role (``vlmkit.stage.ROLES``), in pipeline order."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; known roles: {list(ROLES)}")
        return [s for s in self.stages if s.role == role]

    def register_assemble_hook(self, hook: Callable[["VLMWrapper", AssembledBatch], None]):
        """Call ``hook(wrapper, batch)`` with every ``AssembledBatch`` the language model is about to see
        (``forward``, ``generate``, ``assemble``): token statistics (visual tokens per image, prefill length)
        without patching the wrapper. Returns a handle whose ``remove()`` unregisters the hook."""
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._assemble_hooks)
        self._assemble_hooks[handle.id] = hook
        return handle

    # --- pipeline -------------------------------------------------------------------------------
    def encode_visual(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """The ``VisualTokens`` (one per image) this wrapper would feed the language model.

        ``input_ids`` are needed only to group the tiles of tiled families into images; ``image_kwargs``
        also carry the compressors' ``compress_input_names`` (e.g. PVC's ``video_frames``).
        """
        names = {n for s in self.stages_of("compressor") for n in s.compress_input_names}
        stage_inputs = {n: image_kwargs.pop(n) for n in names if image_kwargs.get(n) is not None}
        encoder = self._encoder()
        with contextlib.ExitStack() as stack:
            for stage in (*self.stages_of("encoder"), *self.stages_of("compressor")):
                stack.enter_context(stage.vision_context(self.family))
            tokens = None if encoder is None else encoder.encode_images(self.family, pixel_values, input_ids,
                                                                        **image_kwargs)
            if tokens is None:
                tokens = self.family.encode_images(pixel_values, input_ids, **image_kwargs)
            for stage in self.stages_of("compressor"):
                given = {n: stage_inputs[n] for n in stage.compress_input_names if n in stage_inputs}
                tokens = stage.compress(tokens, **given)
        return tokens

    def _encoder(self) -> Stage | None:
        found = self.stages_of("encoder")
        return found[0] if found else None

    def assemble(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        **image_kwargs,
    ) -> AssembledBatch:
        """Encode, compress and splice: the exact batch the language model will see."""
        if input_ids is None:
            raise ValueError("vlmkit needs input_ids (with image placeholders) when pixel_values are given")
        tokens = [] if pixel_values is None else self.encode_visual(pixel_values, input_ids, **image_kwargs)
        input_ids, attention_mask, labels = self._resize_placeholders(
            input_ids, attention_mask, labels, tokens, 0 if pixel_values is None else pixel_values.shape[0])
        batch = assemble(
            input_ids, attention_mask, labels, tokens, self.family.embed,
            self.family.placeholder_id, self.family.pad_token_id, padding_side, pad_to_multiple_of,
        )
        for hook in list(self._assemble_hooks.values()):
            hook(self, batch)
        return batch

    def _resize_placeholders(self, input_ids, attention_mask, labels, tokens: list[VisualTokens], num_tiles: int):
        """Resize the processor's placeholder runs to the encoder stage's token count (MouSi experts)."""
        encoder = self._encoder()
        per_image = None if encoder is None or not tokens else encoder.placeholders_per_image(self.family)
        if per_image is None:
            return input_ids, attention_mask, labels
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        present = int(((input_ids == self.family.placeholder_id) & (attention_mask != 0)).sum())
        if present == per_image * len(tokens):
            return input_ids, attention_mask, labels  # the prompt already has the encoder's count
        tiles = self.family.tiles_per_image(input_ids, num_tiles)
        old = [self.family.tokens_per_tile * n for n in tiles]
        return resize_placeholder_runs(input_ids, attention_mask, labels, old, [per_image] * len(tokens),
                                       self.family.placeholder_id, self.family.pad_token_id)

    def image_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The entries of processor ``inputs`` that ``assemble`` takes as ``image_kwargs`` (the family's image
        inputs, e.g. ``image_sizes``, and the compressors' inputs), without changing ``inputs``."""
        return self._split_image_kwargs(dict(inputs))

    def _split_image_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pop what the image pipeline takes: the family's image kwargs and the compressors' inputs."""
        names = [*self.family.image_kwarg_names,
                 *(n for s in self.stages_of("compressor") for n in s.compress_input_names)]
        found = {k: kwargs.pop(k) for k in names if kwargs.get(k) is not None}
        for k in names:
            kwargs.pop(k, None)  # given as None: nothing to pass on
        return found

    def _language_inputs(self, batch: AssembledBatch) -> dict[str, Any]:
        inputs = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask,
                  **self.family.language_inputs(batch)}  # e.g. Qwen2.5-VL's M-RoPE position_ids
        for stage in self.stages_of("position"):
            inputs["position_ids"] = stage.position_ids(batch)
        return inputs

    @contextlib.contextmanager
    def _language_context(self, batch: AssembledBatch):
        with contextlib.ExitStack() as stack:
            for stage in (*self.stages_of("encoder"), *self.stages_of("position")):
                stack.enter_context(stage.language_context(self.family, batch))
            for stage in self.stages_of("decoder"):
                stack.enter_context(stage.decoder_context(self.family, batch))
            yield

    def run_language_model(self, batch: AssembledBatch, **kwargs):
        """Run the wrapped model's decoder on an assembled batch (stage positions and contexts applied)."""
        with self._language_context(batch):
            return self.base_model(**self._language_inputs(batch), **kwargs)

    def _heads(self) -> list[Stage]:
        return self.stages_of("head")

    def _passthrough(self, pixel_values) -> bool:
        """Text-only input and no stage that acts on the language model: call the wrapped model as it is."""
        return pixel_values is None and not any(s.role in ("position", "decoder", "head") for s in self.stages)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF-style forward; ``.loss`` when ``labels`` [B, S] are given (visual slots never count).

        Head stages (READ, PMP, …) take their extra inputs (``head_input_names``, e.g. ``masks``) from
        ``kwargs`` and may add outputs and replace ``loss`` with their combined loss.
        """
        heads = self._heads()
        head_inputs = {n: kwargs.pop(n) for h in heads for n in h.head_input_names if n in kwargs}
        if self._passthrough(pixel_values):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("position_ids / inputs_embeds cannot be combined with vlmkit's image pipeline")
        image_kwargs = self._split_image_kwargs(kwargs)
        batch = self.assemble(input_ids, pixel_values, attention_mask, labels, **image_kwargs)
        if any(h.needs_hidden_states for h in heads):
            kwargs["output_hidden_states"] = True
        outputs = self.run_language_model(batch, labels=batch.labels, **kwargs)
        for head in heads:
            given = {n: head_inputs[n] for n in head.head_input_names if head_inputs.get(n) is not None}
            outputs = head.head_forward(batch, outputs, **given)
        return outputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Same contract as ``transformers``' ``generate``: returns the prompt ids followed by new tokens.

        The prompt is re-padded on the left after compression (to a multiple of ``pad_to_multiple_of`` when
        the wrapper has one; generate derives positions from the attention mask, so outputs are unchanged);
        the returned prompt part is the caller's ``input_ids`` as given.
        """
        if self._passthrough(pixel_values):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        image_kwargs = self._split_image_kwargs(kwargs)
        batch = self.assemble(input_ids, pixel_values, attention_mask, padding_side="left",
                              pad_to_multiple_of=self.pad_to_multiple_of, **image_kwargs)
        with self._language_context(batch):
            out = self.base_model.generate(**self._language_inputs(batch), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)  # beams / samples
        if isinstance(out, torch.Tensor):
            return torch.cat([prompt, out], dim=1)
        out.sequences = torch.cat([prompt, out.sequences], dim=1)
        return out

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
            "version": FORMAT_VERSION,
            "model_type": self.family.model_type,
            "base_model": getattr(self.config, "_name_or_path", "") or "",
            "stages": [c.to_dict() for c in self.stage_configs],
            "added_tokens": self.added_tokens,
        }
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        state = {k: v.detach().contiguous() for k, v in self.stages.state_dict().items()}
        state.update(self._added_rows())
        if state:
            save_file(state, os.path.join(path, WEIGHTS_NAME))
        if save_base_model:
            self.base_model.save_pretrained(path)


def wrap(model: nn.Module, *configs: StageConfig, tokenizer=None, pad_to_multiple_of: int | None = None) -> VLMWrapper:
    """Wrap a loaded ``transformers`` VLM with vlmkit stages; no configs = identity.

    ``tokenizer`` is needed when a stage adds tokens (READ's ``[SEG]``, SEED's image codes): they are
    added to it and the model's embeddings grow to match (kept by ``unwrap``).
    ``pad_to_multiple_of``: ``generate`` pads the compressed prompt (on the left) up to a multiple of it,
    as a tokenizer's option of that name does before compression changes the length: some kernels are
    much slower at some lengths. A runtime setting, not saved; generated tokens are unchanged. ``forward``
    does not pad (its positions would shift, as in ``transformers``' own forward on left padding).
    """
    if isinstance(model, VLMWrapper):
        raise ValueError("the model is already wrapped; wrap the original (vlmkit.unwrap(model)) instead")
    check_pad_to_multiple_of(pad_to_multiple_of)
    return VLMWrapper(model, *configs, tokenizer=tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def unwrap(wrapped: VLMWrapper) -> nn.Module:
    """Remove every stage (hooks, patches) and return the original model object.

    Tokens a stage added stay in the tokenizer and their embedding rows in the model.
    """
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
    if meta.get("version", 1) not in (1, FORMAT_VERSION):
        raise ValueError(f"{file} has format version {meta.get('version')!r}; this vlmkit reads versions 1 and "
                         f"{FORMAT_VERSION} (upgrade vlmkit)")
    return meta


def load(path_or_model: str | os.PathLike | nn.Module, path: str | os.PathLike | None = None, tokenizer=None,
         extra: tuple[StageConfig, ...] | list[StageConfig] = (), **model_kwargs):
    """Re-apply saved stages. ``load(model, path)`` wraps a loaded model; ``load(path)`` also loads the
    base model saved there (``save_pretrained(..., save_base_model=True)``) with ``from_pretrained``.

    ``tokenizer``: needed when the stages added tokens; they get the saved ids (or the tokenizer must
    already hold them at those ids) and their saved embedding rows.
    ``extra``: more stage configs to wrap with, next to the saved ones (e.g. a compressor to evaluate).
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
    if isinstance(model, VLMWrapper):
        raise ValueError("the model is already wrapped; load onto the original (vlmkit.unwrap(model)) instead")
    wrapped = VLMWrapper(model, *configs, *extra, tokenizer=tokenizer,
                         _expected_tokens=meta.get("added_tokens") or None)
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        state = load_file(weights)
        added = {k: state.pop(k) for k in list(state) if k.startswith(ADDED_PREFIX)}
        if meta.get("version", 1) == 1:  # keys "i.rest" (i = position in the saved list) -> "type.rest"
            state = {f"{configs[int(k.split('.', 1)[0])].type}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        own = {f"{c.type}.{k}" for c in configs for k in wrapped.stages[c.type].state_dict()}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the stages: missing {missing}, unexpected {unexpected}")
        wrapped.stages.load_state_dict(state, strict=False)
        wrapped._load_added_rows(added)
    return wrapped
