"""``VLMWrapper``'s transformers surface: the wrapper is a ``PreTrainedModel`` where other libraries look.

``transformers.Trainer`` saves through ``save_pretrained`` only for ``PreTrainedModel`` / ``PeftModel``
instances (anything else gets its whole ``state_dict`` written as ``model.safetensors``); pipelines, TRL,
PEFT and the Hub read ``device``, ``dtype``, ``config``, ``generation_config``, ``can_generate()``, the
embeddings, activation checkpointing and model tags. ``PreTrainedSurface`` makes ``VLMWrapper`` such a model
by delegation to the wrapped HF model (``family.model``: the ``*ForConditionalGeneration``, inside a PEFT
model if there is one). It never runs ``PreTrainedModel.__init__``, which would re-check the attention
implementation and rewrite generation defaults on the wrapped model's config: the wrapper owns no config and
no weights but the stages'.

Wrap order (see ``docs/design.md``): PEFT first, vlmkit outside, ``vlmkit.wrap(get_peft_model(model, cfg))``.
The other order, ``get_peft_model(vlmkit.wrap(model), cfg)``, trains (PEFT's ``modules_to_save`` copies of
stages), but its adapter is keyed under the wrapper and does not load on the plain HF model:
saving it through PEFT raises (``model_tags``).
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

from torch import nn
from transformers import PreTrainedModel

#: keyword of the forward that TRL's fused LM head adds (``trl.trainer.utils.add_fused_lm_head``)
FUSED_KEYWORD = "fused_lm_head"


def _takes_fused_lm_head(fn) -> bool:
    """Whether ``fn`` (a replacement forward) takes ``fused_lm_head``: TRL's fused LM head, which wraps the
    model's forward with ``functools.wraps`` (so its own signature is read without following ``__wrapped__``)."""
    func = getattr(fn, "__func__", fn)
    try:
        return FUSED_KEYWORD in inspect.signature(func, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return False


class PreTrainedSurface(PreTrainedModel):
    """The ``PreTrainedModel`` members libraries use, delegated to the wrapped HF model (``_hf_model``)."""

    base_model_prefix = "base_model"  # PEFT / transformers utilities look the inner model up by this name
    main_input_name = "input_ids"
    #: Trainer and TRL pass ``num_items_in_batch`` (the caller's label count over a gradient-accumulation step)
    #: to a model that accepts loss kwargs. vlmkit never scores visual slots and compression removes some, so
    #: that count is not the number of tokens the loss sums over: the wrapper takes none, and the trainers average
    #: each micro-batch's loss over its own scored tokens (vlmkit's ``forward`` loss).
    accepts_loss_kwargs = False

    # --- what the wrapped model is ---------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The model given to ``wrap`` (HF model or PEFT model). ``PreTrainedModel.base_model`` would look itself
        up through ``base_model_prefix``; the module is registered under that name."""
        return self._modules["base_model"]

    @property
    def _hf_model(self) -> PreTrainedModel:
        """The HF ``*ForConditionalGeneration`` (inside the PEFT model, if any)."""
        return self.family.model

    @property
    def config(self):
        return self.base_model.config

    @property
    def name_or_path(self) -> str:
        return getattr(self._hf_model, "name_or_path", "") or ""

    @property
    def generation_config(self):
        """The wrapped model's ``GenerationConfig`` (one object: TRL and pipelines set pad / eos ids on it)."""
        return self._hf_model.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self._hf_model.generation_config = value

    def can_generate(self) -> bool:
        return bool(self._hf_model.can_generate())

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self._hf_model, "supports_gradient_checkpointing", False))

    def get_input_embeddings(self) -> nn.Module:
        return self._hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self._hf_model.get_output_embeddings()

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)  # PreTrainedModel.train would re-kernelize: the wrapper has no kernels

    # --- activation (gradient) checkpointing ---------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Checkpoint the decoder's layers (``family.language_model``; ``transformers.Trainer`` calls this for
        ``TrainingArguments(gradient_checkpointing=True)``, TRL turns it on by default).

        A checkpointed layer is recomputed during ``backward``, after the wrapper's contexts have closed. So
        only the decoder is checkpointed (compressors and encoder stages hook the vision tower's layers), and
        not at all when something acts between decoder layers: decoder stages, or a family's own
        ``language_context`` (e.g. DeepStack features added after some layers)."""
        from .families.base import Family

        decoder = [s.config.type for s in self.stages_of("decoder")]
        if decoder or type(self.family).language_context is not Family.language_context:
            what = f"the decoder stage(s) {decoder}" if decoder else f"the {self.family.model_type!r} family's hooks"
            raise ValueError(f"activation checkpointing recomputes decoder layers during backward, without {what} "
                             "that act between them; train without checkpointing")
        self.family.set_decoder_checkpointing(True, activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                              offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """The older name of ``activation_checkpointing_enable`` (PEFT, TRL and older Trainers call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.family.set_decoder_checkpointing(False)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing  # (without PreTrainedModel's deprecation warning)

    # --- tags (model cards) ----------------------------------------------------------------------------
    @property
    def model_tags(self) -> list[str] | None:
        """The wrapped model's Hub tags (``add_model_tags``: TRL adds ``trl``, ``sft``).

        PEFT reads them from its base model right before it writes an adapter (``PeftModel.save_pretrained``
        writes the model card first). When that base model is this wrapper (``get_peft_model(vlmkit.wrap(...))``),
        the adapter's keys would carry the wrapper's ``base_model.`` prefix and trained stage copies, and plain
        ``PeftModel.from_pretrained(hf_model, dir)`` would load none of them (with only a warning): refused here.
        """
        if "peft_config" in self.__dict__:  # PEFT's tuner sets it on the model it wraps
            raise ValueError(
                "this adapter was made with PEFT around the vlmkit wrapper (get_peft_model(vlmkit.wrap(model), ...)): "
                "its keys carry the wrapper's 'base_model.' prefix and would not load on the plain model with "
                "PeftModel.from_pretrained. Apply PEFT first and wrap the PEFT model, "
                "vlmkit.wrap(get_peft_model(model, config), *stages), then save with wrapped.save_pretrained(dir) "
                "or transformers.Trainer / trl.SFTTrainer")
        return self._hf_model.model_tags

    @model_tags.setter
    def model_tags(self, value) -> None:
        self._hf_model.model_tags = value

    def add_model_tags(self, tags: list[str] | str) -> None:
        self._hf_model.add_model_tags(tags)

    # --- TRL's fused LM head ---------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        """A replacement ``forward`` that takes ``fused_lm_head`` (TRL's fused LM head: it runs
        ``self.base_model(...)`` and projects its hidden states against the caller's labels) would bypass
        vlmkit: it is kept as the wrapper's fused LM head instead, and ``forward(..., fused_lm_head=True)`` runs
        it on the wrapped HF model with the assembled batch (``VLMWrapper._fused_forward``). Other replacements
        (accelerate's autocast wrapper of the forward) are set as usual."""
        if name == "forward" and _takes_fused_lm_head(value):
            if getattr(value, "__self__", None) is not self:
                raise TypeError(f"a fused LM head forward must be a method bound to this wrapper, got {value!r}")
            self.__dict__["_fused_lm_head"] = value.__func__
            return
        super().__setattr__(name, value)

    # --- Hub -------------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, processor=None, commit_message: str = "Upload vlmkit model",
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, save_base_model: bool = False, **save_kwargs):
        """``save_pretrained`` into a temporary folder (adapter, stages, ``processor``), then upload that folder
        as one commit with ``huggingface_hub`` (``create_repo(exist_ok=True)`` + ``upload_folder``). Returns the
        hub's ``CommitInfo``. Offline (``HF_HUB_OFFLINE=1``) the hub client raises before anything is sent."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, processor=processor, save_base_model=save_base_model, **save_kwargs)
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=folder,
                                     commit_message=commit_message, revision=revision, create_pr=create_pr)


def save_processor(processor, path: str | os.PathLike) -> None:
    """Write ``processor`` (or tokenizer) next to the weights, so that ``AutoProcessor.from_pretrained(path)``
    works on the folder."""
    if not callable(getattr(processor, "save_pretrained", None)):
        raise TypeError(f"processor must be a transformers processor or tokenizer, got {type(processor).__name__}")
    processor.save_pretrained(path)
