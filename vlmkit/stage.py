"""The stage contracts: one small base class per pipeline role, and the capabilities a stage can add.

A stage is an ``nn.Module`` built from a ``StageConfig`` and registered next to its method with
``@vlmkit.config.register_stage(ConfigClass)``. Its class says what it does: the role base it derives from
fixes where ``VLMWrapper`` calls it, and nothing is inferred from which methods happen to exist.

Pipeline (``VLMWrapper.assemble`` then the language model)::

    pixel_values ─▶ EncoderStage.encode_images (or the family's tower + projector)
                 ─▶ CompressorStage.compress × n          (list[VisualTokens] → fewer tokens)
                 ─▶ assemble (splice into inputs_embeds)  ─▶ PositionStage.position_ids
                 ─▶ language model, inside every PositionStage.language_context and DecoderStage.decoder_context
                 ─▶ HeadStage.head_forward × n             (forward only)

Roles (``Stage.role``):

- ``encoder`` (at most one): replaces the family's image encoding; ``placeholders_per_image`` resizes the
  processor's placeholder runs when its token count differs.
- ``compressor``: ``list[VisualTokens]`` → fewer tokens, order kept; ``vision_context`` may record what the
  vision tower computes (FoPru's attention). ``PruneStage`` (``vlmkit.compress``) is the template of a pruner.
- ``decoder``: acts *between* decoder layers while the language model runs (``decoder_context``), e.g.
  dropping visual positions at layer K; ``family.decoder_layers`` are the layers it hooks.
- ``position`` (at most one scheme per model, counting encoders whose config's ``sets_positions`` is true): the
  ``position_ids`` of an assembled batch and a ``language_context`` (e.g. remapping the rotary embedding).
- ``head``: post-processes the language model's output inside ``forward`` (``head_forward``: losses, mask
  logits). ``TextMaskHead`` turns generated text into masks; ``TokenMaskHead`` turns the hidden state of a
  generated mask token into a mask. ``vlmkit.Predictor`` drives both.
- ``vocabulary``: stages whose job is the tokens they add; ``ImageTokenStage`` (SEED) lets the model read
  and write images as discrete codes.

Capability: ``AddsTokens`` (any role): ``new_tokens`` / ``bind_tokens``; ``wrap(..., tokenizer=tok)`` adds the
tokens, grows the embeddings and saves / restores their rows.

Stages hold no state across calls; whatever a context records lives only inside its ``with``. The wrapper
dispatches on the declared class attributes (``role``, ``adds_tokens``), which PEFT's
``ModulesToSaveWrapper`` forwards to the trained copy.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from torch import nn

if TYPE_CHECKING:
    import torch

    from .families.base import Family
    from .sequence import AssembledBatch
    from .tokens import VisualTokens

ROLES = ("encoder", "compressor", "decoder", "position", "head", "vocabulary")


class Stage(nn.Module):
    """Base of every stage; ``self.config`` is the ``StageConfig`` it was built from. Derive from a role base."""

    role: ClassVar[str] = ""
    #: capability flag, set by ``AddsTokens``
    adds_tokens: ClassVar[bool] = False

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def attach(self, family: "Family") -> None:
        """Check the config against the wrapped model (raise ValueError at ``wrap()`` time) and set up."""

    def detach(self, family: "Family") -> None:
        """Undo whatever ``attach`` changed on the model."""

    def extra_repr(self) -> str:
        return repr(self.config)


class EncoderStage(Stage):
    """Replaces the family's image encoding (e.g. MouSi's poly-visual experts)."""

    role = "encoder"

    @contextlib.contextmanager
    def vision_context(self, family: "Family") -> Iterator[None]:
        """Active while images are encoded."""
        yield

    def encode_images(self, family: "Family", pixel_values, input_ids=None, **image_kwargs) -> list["VisualTokens"]:
        """The uncompressed ``VisualTokens`` of every image (one per image, in prompt order)."""
        raise NotImplementedError

    def placeholders_per_image(self, family: "Family") -> int | None:
        """Placeholder slots one image needs when this encoding's token count differs from the processor's."""
        return None

    @contextlib.contextmanager
    def language_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        """Active around the language model; an encoder whose config's ``sets_positions`` is true lays out its
        tokens' positions here (MouSi experts' ``shared`` / ``row``)."""
        yield


class CompressorStage(Stage):
    """Maps each image's ``VisualTokens`` to fewer (dropped or merged), before the language model."""

    role = "compressor"
    #: extra keyword arguments of ``forward`` / ``generate`` this compressor takes (passed to ``compress``)
    compress_input_names: ClassVar[tuple[str, ...]] = ()

    @contextlib.contextmanager
    def vision_context(self, family: "Family") -> Iterator[None]:
        """Active while the vision tower runs (record attention, patch layers); ``compress`` runs inside it."""
        yield

    def compress(self, tokens: list["VisualTokens"], **inputs) -> list["VisualTokens"]:
        """``list[VisualTokens]`` (one per image) → the same images with fewer tokens, order kept."""
        raise NotImplementedError


class DecoderStage(Stage):
    """Acts between the decoder layers (``family.decoder_layers``) while the language model runs."""

    role = "decoder"

    @contextlib.contextmanager
    def decoder_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        """Active around the language model's ``forward`` or the whole ``generate`` (prefill and decode steps)."""
        yield


class PositionStage(Stage):
    """Decides the language model's positions for an assembled batch."""

    role = "position"

    def position_ids(self, batch: "AssembledBatch") -> "torch.Tensor | None":
        """``position_ids`` handed to the language model (None: the model's own)."""
        return None

    @contextlib.contextmanager
    def language_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        """Active around the language model's ``forward`` or the whole ``generate``."""
        yield


class HeadStage(Stage):
    """Post-processes the language model's output inside ``VLMWrapper.forward``."""

    role = "head"
    #: how ``Predictor.segment`` gets masks from this head: None (it makes none at inference), ``"text"``
    #: (``TextMaskHead``: parse the generated answer) or ``"token"`` (``TokenMaskHead``: from mask-token states)
    mask_output: ClassVar[str | None] = None
    #: extra keyword arguments of ``VLMWrapper.forward`` this head consumes (passed to ``head_forward``)
    head_input_names: ClassVar[tuple[str, ...]] = ()
    #: ``True``: ``forward`` asks the language model for ``hidden_states``
    needs_hidden_states: ClassVar[bool] = False

    def head_forward(self, batch: "AssembledBatch", outputs: Any, **head_inputs) -> Any:
        """Return ``outputs``, with ``loss`` replaced by the head's combined loss when its targets are given
        and extra keys set (``outputs["mask_logits"] = ...``)."""
        return outputs


class TextMaskHead(HeadStage):
    """A head whose masks are written as text by the model (Text4Seg): parse generated answers."""

    mask_output = "text"

    def masks_from_text(self, texts: list[str], image_sizes=None, images=None) -> list:
        """One result per answer; ``image_sizes`` are (H, W) per answer (or taken from ``images``)."""
        raise NotImplementedError


class TokenMaskHead(HeadStage):
    """A head that decodes a mask from the hidden state that predicts a mask token (READ / LISA ``[SEG]``)."""

    mask_output = "token"
    needs_hidden_states = True

    @property
    def mask_token_id(self) -> int:
        """Vocabulary id of the mask token."""
        raise NotImplementedError

    def masks_from_states(self, batch: "AssembledBatch", hidden: "torch.Tensor", positions: list[list[int]],
                          images: list) -> list["torch.Tensor"]:
        """Mask logits [n, H, W] per sample from the last hidden states [B, L, D] at ``positions`` (the states
        that predicted each mask token) and the sample's original image."""
        raise NotImplementedError


class AddsTokens:
    """Capability mixin: the stage adds tokens to the vocabulary (consecutive ids, in ``new_tokens`` order)."""

    adds_tokens: ClassVar[bool] = True

    def new_tokens(self) -> list[str]:
        return []

    def bind_tokens(self, ids: dict[str, int]) -> None:
        """Receive the ids of ``new_tokens()`` once the wrapper added them to the tokenizer."""


class VocabularyStage(AddsTokens, Stage):
    """A stage whose job is the tokens it adds (SEED: images as discrete codes in the LM vocabulary)."""

    role = "vocabulary"
    #: True for ``ImageTokenStage``: ``Predictor.generate_image_tokens`` can ask the model for an image
    makes_image_tokens: ClassVar[bool] = False


class ImageTokenStage(VocabularyStage):
    """Images as a fixed number of discrete tokens the language model can write (SEED).

    ``Predictor.generate_image_tokens`` tokenizes the prompt, asks ``image_prompt`` for the ids to generate
    after, decodes exactly ``num_image_tokens`` tokens under ``image_logits_processor`` and hands the new
    tokens to ``codes_from_tokens``.
    """

    makes_image_tokens = True

    @property
    def num_image_tokens(self) -> int:
        raise NotImplementedError

    def image_prompt(self, input_ids: "torch.Tensor",
                     attention_mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Left-padded prompt ids / mask [B, S] → the same ending with the image-start token."""
        raise NotImplementedError

    def image_logits_processor(self):
        """A ``transformers`` logits processor that keeps the next ``num_image_tokens`` tokens image codes."""
        raise NotImplementedError

    def codes_from_tokens(self, tokens: "torch.Tensor") -> "torch.Tensor":
        """Generated image tokens [B, num_image_tokens] → codes [B, num_image_tokens] (ValueError if not codes)."""
        raise NotImplementedError
