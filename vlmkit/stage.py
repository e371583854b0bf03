"""``Stage``: the base ``nn.Module`` every pluggable pipeline stage derives from.

A stage implements only the hooks of its role (see ``StageConfig.role``):

- ``vision_context(family)``: a context manager active while the vision tower runs (encoder stages,
  and compressors that read the tower's attention, e.g. FoPru).
- ``compress(tokens)``: compressor stages map ``list[VisualTokens]`` to fewer tokens, order kept
  (``compress_input_names`` are extra ``forward`` / ``generate`` arguments it takes, e.g. PVC's
  ``video_frames``).
- ``position_ids(batch)``: position stages return positions for an assembled batch.
- ``language_context(family, batch)``: a context manager active while the language model runs
  (``forward`` or the whole ``generate``), e.g. to remap positions inside the rotary embedding.
- ``encode_images(family, pixel_values, input_ids)``: an encoder stage may replace the family's image
  encoding (e.g. MouSi experts); ``placeholders_per_image(family)`` then says how many placeholder slots
  each image needs, and the wrapper resizes the processor's placeholder runs to match.
- ``new_tokens()`` / ``bind_tokens(ids)``: a stage that adds vocabulary (READ's ``[SEG]``, SEED's image
  codes) names the tokens; ``wrap(..., tokenizer=tok)`` adds them and hands back their ids.
- heads post-process generated text (``masks_from_text``) or, with ``head_forward``, the language model's
  output (hidden states) inside ``forward``; ``head_input_names`` are the extra ``forward`` keyword
  arguments (targets, SAM images, …) a head consumes.

Stages hold no state across calls; whatever a ``vision_context`` records lives only inside the ``with``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from torch import nn

if TYPE_CHECKING:
    from .families.base import Family
    from .sequence import AssembledBatch
    from .tokens import VisualTokens

ROLES = ("encoder", "compressor", "position", "head")


class Stage(nn.Module):
    """Base class; ``self.config`` is the ``StageConfig`` it was built from."""

    #: extra keyword arguments of ``VLMWrapper.forward`` this head consumes (passed to ``head_forward``)
    head_input_names: ClassVar[tuple[str, ...]] = ()
    #: extra keyword arguments of ``forward`` / ``generate`` this compressor takes (passed to ``compress``)
    compress_input_names: ClassVar[tuple[str, ...]] = ()
    #: ``True``: ``forward`` asks the language model for ``hidden_states`` (for ``head_forward``)
    needs_hidden_states: ClassVar[bool] = False

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    @property
    def role(self) -> str:
        return self.config.role

    def attach(self, family: "Family") -> None:
        """Check the config against the wrapped model (raise ValueError at ``wrap()`` time) and set up."""

    def detach(self, family: "Family") -> None:
        """Undo whatever ``attach`` changed on the model."""

    @contextlib.contextmanager
    def vision_context(self, family: "Family") -> Iterator[None]:
        yield

    def compress(self, tokens: list["VisualTokens"]) -> list["VisualTokens"]:
        return tokens

    def position_ids(self, batch: "AssembledBatch"):
        return None

    @contextlib.contextmanager
    def language_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        yield

    def encode_images(self, family: "Family", pixel_values, input_ids=None, **image_kwargs) -> list["VisualTokens"] | None:
        """Encoder stages: the uncompressed ``VisualTokens`` of every image, or None to keep the family's."""
        return None

    def placeholders_per_image(self, family: "Family") -> int | None:
        """Placeholder slots one image needs when this stage's encoding differs from the processor's; None = same."""
        return None

    def new_tokens(self) -> list[str]:
        """Tokens this stage adds to the vocabulary, in order (consecutive ids)."""
        return []

    def bind_tokens(self, ids: dict[str, int]) -> None:
        """Receive the ids of ``new_tokens()`` once the wrapper added them to the tokenizer."""

    def head_forward(self, wrapper, batch: "AssembledBatch", outputs: Any, **head_inputs) -> Any:
        """Heads: post-process the language model's ``outputs`` inside ``VLMWrapper.forward``.

        Return the outputs, with ``loss`` replaced by the head's combined loss when its targets are given
        and extra keys set (``outputs["mask_logits"] = ...``).
        """
        return outputs

    def extra_repr(self) -> str:
        return repr(self.config)
