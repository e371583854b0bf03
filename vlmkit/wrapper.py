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
from .hf_surface import FUSED_KEYWORD, PreTrainedSurface, save_processor
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


class VLMWrapper(PreTrainedSurface):
    """A HF vision-language model plus vlmkit stages. Build it with ``vlmkit.wrap``.

    ``forward`` and ``generate`` take what the model's processor returns (``input_ids`` with image
    placeholders, ``pixel_values``, ``attention_mask``, optional ``labels``) and return what the
    wrapped model returns. It is a ``transformers.PreTrainedModel`` by delegation (``hf_surface.py``), so
    ``Trainer``, TRL, pipelines, PEFT's ``merge_and_unload`` and the Hub take it as a model.
    """

    def __init__(self, model: nn.Module, *configs: StageConfig, tokenizer=None, pad_to_multiple_of: int | None = None,
                 _expected_tokens: dict[str, int] | None = None, _stages: list[Stage] | None = None) -> None:
        nn.Module.__init__(self)  # not PreTrainedModel.__init__ (see hf_surface.py)
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
        for c in ordered:  # e.g. MouSi experts + FoPru: FoPru scores a tower grid the experts' tokens are not
            users = sorted({o.type for o in ordered for cap in c.hides_capabilities if cap in o.requires} - {c.type})
            if users:
                raise ValueError(f"stage(s) {users} cannot be combined with {c.type!r}: they need the model's own "
                                 f"vision-tower grid ({', '.join(c.hides_capabilities)}), whose tokens {c.type!r} "
                                 "replaces; pruners that read only the visual tokens (random, divprune) can")
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

    # --- stages -------------------------------------------------------------------------------
    @property
    def stage_configs(self) -> list[StageConfig]:
        return [s.config for s in self.stages]

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
            run_mask=self.family.image_run_mask(input_ids),
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
            stack.enter_context(self.family.language_context(batch))  # first: its hooks run before the stages'
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
        ``fused_lm_head=True`` (TRL's trainers): see ``_fused_forward``.
        """
        if kwargs.pop(FUSED_KEYWORD, False):
            return self._fused_forward(input_ids, pixel_values, attention_mask, labels, **kwargs)
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

    def _fused_forward(self, input_ids, pixel_values, attention_mask, labels, **kwargs):
        """``forward(..., fused_lm_head=True)``: the fused LM head TRL added to this wrapper (kept aside by
        ``PreTrainedSurface.__setattr__``), run as a method of the wrapped HF model on the assembled batch.

        TRL's head calls ``self.base_model(**kwargs)`` for the decoder's hidden states and scores them against
        ``labels`` with ``self.get_output_embeddings()``; bound to the HF model and given ``inputs_embeds``, the
        attention mask, positions and the compressed ``labels`` of the assembled batch (inside the stages'
        language contexts), the decoder sees the compressed sequence and the scored tokens are ``forward``'s
        (visual slots never count), so the loss equals ``forward``'s. Returns TRL's ``FusedCausalLMOutput``;
        its per-token fields [B, L - 1] follow the assembled sequence (length L).
        """
        head = self.__dict__.get("_fused_lm_head")
        if head is None:
            raise ValueError("fused_lm_head=True, but this wrapper has no fused LM head (TRL's trainers add one "
                             "with trl.trainer.utils.add_fused_lm_head(wrapped))")
        heads = [h.config.type for h in self._heads()]
        if heads:
            raise ValueError(f"fused_lm_head=True cannot run the head stage(s) {heads}: they need the model's "
                             "full outputs (train them with the wrapper's own forward)")
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels [B, S]")
        if kwargs.get("shift_labels") is not None:
            raise ValueError("fused_lm_head=True: pre-shifted shift_labels (context / sequence parallelism) do not "
                             "follow vlmkit's compression of the sequence; pass labels")
        if self._passthrough(pixel_values):
            return head(self._hf_model, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        **{FUSED_KEYWORD: True}, **kwargs)
        if kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("position_ids / inputs_embeds cannot be combined with vlmkit's image pipeline")
        image_kwargs = self._split_image_kwargs(kwargs)
        batch = self.assemble(input_ids, pixel_values, attention_mask, labels, **image_kwargs)
        with self._language_context(batch):
            return head(self._hf_model, **self._language_inputs(batch), labels=batch.labels,
                        **{FUSED_KEYWORD: True}, **kwargs)

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

    # --- save / load / merge -----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, save_base_model: bool = False, processor=None, *,
                        state_dict: dict[str, torch.Tensor] | None = None, is_main_process: bool = True,
                        **kwargs) -> None:
        """Write what the wrapper adds to its base checkpoint into ``path``:

        - ``vlmkit.json`` (stage configs) and the stages' weights and added-token rows (safetensors);
        - with PEFT inside (``vlmkit.wrap(peft_model)``), the PEFT adapter (``adapter_config.json``,
          ``adapter_model.safetensors``): a plain adapter of the HF model, which
          ``PeftModel.from_pretrained(hf_model, path)`` loads; written keys that PEFT would not find in the
          model raise ``ValueError``;
        - ``processor`` (or tokenizer) when given, so that ``AutoProcessor.from_pretrained(path)`` works;
        - the base model's full weights only with ``save_base_model=True`` (then ``vlmkit.load(path)`` needs
          nothing else); otherwise ``vlmkit.load(model, path)`` re-applies the stages to a model.

        ``state_dict``: the wrapper's gathered state (keys of ``self.state_dict()``, e.g. accelerate's
        ``get_state_dict`` under FSDP / DeepSpeed), written instead of the local parameters. Without it, a
        sharded adapter (FSDP2 DTensors, ZeRO-3 partitions) is not written: one process holds only its shard.
        ``is_main_process=False`` writes nothing (``transformers.Trainer`` calls every rank). Other keyword
        arguments (``safe_serialization``, ``max_shard_size`` …) go to the base model's / adapter's save.
        """
        from safetensors.torch import save_file

        if not is_main_process:
            return
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
        inner_state = None
        if state_dict is not None:
            stages = {k[len("stages."):]: v for k, v in state_dict.items() if k.startswith("stages.")}
            inner_state = {k[len("base_model."):]: v for k, v in state_dict.items() if k.startswith("base_model.")}
            own = set(self.stages.state_dict())
            if set(stages) != own:
                raise ValueError(f"state_dict does not hold the stages' weights as wrapped.state_dict() names them: "
                                 f"missing {sorted(own - set(stages))[:5]}, unexpected {sorted(set(stages) - own)[:5]}")
        else:
            stages = self.stages.state_dict()
        state = {k: v.detach().contiguous() for k, v in stages.items()}
        state.update(self._added_rows())
        if state:
            save_file(state, os.path.join(path, WEIGHTS_NAME))
        if _is_peft(self.base_model):
            if inner_state is not None or not _sharded(self.base_model):
                self._save_adapter(path, inner_state, **kwargs)
        elif save_base_model:
            self.base_model.save_pretrained(path, state_dict=inner_state, **kwargs)
        if processor is not None:
            save_processor(processor, path)

    def _save_adapter(self, path: str | os.PathLike, inner_state: dict | None, **kwargs) -> None:
        """``PeftModel.save_pretrained`` of the PEFT model inside, then check that every adapter written holds
        exactly the keys PEFT derives from this model (what ``PeftModel.from_pretrained`` looks for).

        Without ``inner_state`` the adapter is read from the parameters as they are (``named_parameters``), not
        through ``state_dict()``, whose hooks (FSDP2) would substitute shards for gathered tensors put in place."""
        from peft import get_peft_model_state_dict

        peft_model = self.base_model
        local = {n: p for n, p in (*peft_model.named_parameters(remove_duplicate=False),
                                   *peft_model.named_buffers(remove_duplicate=False))}
        peft_model.save_pretrained(path, state_dict=inner_state if inner_state is not None else local, **kwargs)
        for name in peft_model.peft_config:
            folder = os.path.join(path, name) if name != "default" else os.fspath(path)
            expected = set(get_peft_model_state_dict(peft_model, state_dict=local, adapter_name=name))
            written = _adapter_keys(folder)
            if written != expected:
                raise ValueError(
                    f"the adapter {name!r} written to {folder} would not load on the model: keys PEFT looks for "
                    f"but not written {sorted(expected - written)[:5]}, written but unknown to the model "
                    f"{sorted(written - expected)[:5]} (a state_dict must be keyed like wrapped.state_dict())")

    def merge_and_unload(self, **kwargs) -> "VLMWrapper":
        """Merge the PEFT adapter inside into the HF model's weights (``PeftModel.merge_and_unload``) and return a
        new wrapper around the merged HF model with this wrapper's stages (the same stage modules and weights,
        added tokens, assemble hooks and mode). This wrapper gives its stages up, as after ``unwrap``.
        ``kwargs`` go to PEFT (``safe_merge``, ``adapter_names``, ``progressbar``)."""
        peft_model = self.base_model
        if not _is_peft(peft_model):
            raise ValueError(f"merge_and_unload: the wrapped model ({type(peft_model).__name__}) holds no PEFT "
                             "adapter; wrap the PEFT model: vlmkit.wrap(get_peft_model(model, config), *stages)")
        configs, stages, hooks = self.stage_configs, list(self.stages), list(self._assemble_hooks.values())
        unwrap(self)
        merged = peft_model.merge_and_unload(**kwargs)
        wrapped = VLMWrapper(merged, *configs, tokenizer=self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of,
                             _expected_tokens=self.added_tokens or None, _stages=stages)
        for hook in hooks:
            wrapped.register_assemble_hook(hook)
        return wrapped.train(self.training)


def _is_peft(model: nn.Module) -> bool:
    """A ``peft.PeftModel`` (it has ``peft_config`` and the PEFT model API)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _sharded(model: nn.Module) -> bool:
    """Whether ``model``'s trainable parameters are shards (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters() if p.requires_grad)


def _adapter_keys(folder: str) -> set[str]:
    """Tensor names of the adapter file PEFT wrote in ``folder`` (safetensors, or ``.bin`` without safe
    serialization)."""
    safe = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(safe):
        from safetensors import safe_open

        with safe_open(safe, "pt") as f:
            return set(f.keys())
    binary = os.path.join(folder, "adapter_model.bin")
    if os.path.isfile(binary):
        return set(torch.load(binary, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"PEFT wrote no adapter_model.safetensors / .bin in {folder}")


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
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(meta, dict) or meta.get("format") != "vlmkit" or not isinstance(meta.get("stages"), list):
        raise ValueError(f"{file} is not a vlmkit config (expected 'format': 'vlmkit' and a 'stages' list)")
    if meta.get("version", 1) not in (1, FORMAT_VERSION):
        raise ValueError(f"{file} has format version {meta.get('version')!r}; this vlmkit reads versions 1 and "
                         f"{FORMAT_VERSION} (upgrade vlmkit)")
    return meta


def load(path_or_model: str | os.PathLike | nn.Module, path: str | os.PathLike | None = None, tokenizer=None,
         extra: tuple[StageConfig, ...] | list[StageConfig] = (), **model_kwargs):
    """Re-apply saved stages. ``load(model, path)`` wraps a loaded model; ``load(path)`` also loads the
    base model saved there (``save_pretrained(..., save_base_model=True)``) with ``from_pretrained``, or, for a
    folder holding a PEFT adapter (or a ``freeze`` recipe's weights) and no base weights (``vlmkit finetune
    --wrap ...`` output), the base model it was trained from (``vlmkit.train.loop.finetuned_base``) with the
    adapter applied: model + stages + adapter in one call.

    ``tokenizer``: needed when the stages added tokens; they get the saved ids (or the tokenizer must
    already hold them at those ids) and their saved embedding rows.
    ``extra``: more stage configs to wrap with, next to the saved ones (e.g. a compressor to evaluate).
    ``model_kwargs`` go to ``from_pretrained`` (``trust_remote_code`` stays False unless given).
    """
    if isinstance(path_or_model, nn.Module) and path is None:
        raise ValueError("load(model, path): the save directory is missing")
    # the saved files are read and checked before any model loads; errors name the file
    meta = read_saved(path if isinstance(path_or_model, nn.Module) else path_or_model)
    save_dir = path if isinstance(path_or_model, nn.Module) else path_or_model
    configs = _saved_configs(meta, os.path.join(save_dir, CONFIG_NAME))
    weights = os.path.join(save_dir, WEIGHTS_NAME)
    state = _read_stage_weights(weights) if os.path.isfile(weights) else None
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
    else:
        path = path_or_model
        from transformers import AutoModelForImageTextToText

        if not os.path.isfile(os.path.join(path, "config.json")) and any(
                os.path.isfile(os.path.join(path, f)) for f in ("adapter_config.json", "trained_weights.safetensors")):
            from .train.loop import apply_finetuned, finetuned_base, load_base_model

            base = finetuned_base(path)
            base = (load_base_model(base)[0] if base.startswith("tiny:")
                    else AutoModelForImageTextToText.from_pretrained(base, **model_kwargs))
            model, saved_tokenizer = apply_finetuned(path, base)
            tokenizer = tokenizer if tokenizer is not None else saved_tokenizer
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
    if isinstance(model, VLMWrapper):
        raise ValueError("the model is already wrapped; load onto the original (vlmkit.unwrap(model)) instead")
    wrapped = VLMWrapper(model, *configs, *extra, tokenizer=tokenizer,
                         _expected_tokens=meta.get("added_tokens") or None)
    if state is not None:
        added = {k: state.pop(k) for k in list(state) if k.startswith(ADDED_PREFIX)}
        if meta.get("version", 1) == 1:  # keys "i.rest" (i = position in the saved list) -> "type.rest"
            state = {f"{configs[int(k.split('.', 1)[0])].type}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        own = {f"{c.type}.{k}" for c in configs for k in wrapped.stages[c.type].state_dict()}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the stages: missing {missing}, unexpected {unexpected}")
        try:
            _check_stage_tensors(state, wrapped.stages.state_dict(), weights)
        except ValueError:
            unwrap(wrapped)  # leave the model as it was given
            raise
        wrapped.stages.load_state_dict(state, strict=False)
        wrapped._load_added_rows(added)
    return wrapped


def _saved_configs(meta: dict[str, Any], file: str) -> list[StageConfig]:
    """The stage configs of a ``vlmkit.json``; an invalid entry is a ValueError naming the file and the stage."""
    configs = []
    for i, d in enumerate(meta["stages"]):
        try:
            if not isinstance(d, dict):
                raise ValueError(f"expected an object, got {type(d).__name__}")
            configs.append(config_from_dict(d))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{file}: stages[{i}] ({d.get('type') if isinstance(d, dict) else d!r}): {err}") from err
    return configs


def _read_stage_weights(file: str) -> dict[str, torch.Tensor]:
    """``vlmkit_stages.safetensors`` → its tensors; a truncated or foreign file is a ValueError naming it."""
    from safetensors.torch import load_file

    try:
        state = load_file(file)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for broken files
        raise ValueError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{file}: tensor {key!r} holds {bad} NaN / infinite value(s); refusing to load it")
    return state


def _check_stage_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: str) -> None:
    """Each saved tensor has the shape of the stage's own and the same kind of dtype (floating point,
    integer, bool); ValueError naming the tensor, the file and both otherwise (instead of torch's
    ``size mismatch for ...``)."""

    def kind(t: torch.Tensor) -> str:
        return "floating point" if t.is_floating_point() else "bool" if t.dtype == torch.bool else \
            "complex" if t.is_complex() else "integer"

    for key, value in state.items():
        want = expected.get(key)
        if want is None:
            continue
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(value.shape)}, but the stage (as configured "
                             f"in vlmkit.json) expects {tuple(want.shape)}")
        if kind(value) != kind(want):
            raise ValueError(f"{file}: tensor {key!r} is {value.dtype} ({kind(value)}), but the stage expects "
                             f"{want.dtype} ({kind(want)})")
