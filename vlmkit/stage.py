"""``Stage``: the base ``nn.Module`` every pluggable pipeline stage derives from.

A stage implements only the hooks of its role (see ``StageConfig.role``):

- ``vision_context(family)``: a context manager active while the vision tower runs (encoder stages,
  and compressors that read the tower's attention, e.g. FoPru).
- ``compress(tokens)``: compressor stages map ``list[VisualTokens]`` to fewer tokens, order kept.
- ``position_ids(batch)``: position stages return positions for an assembled batch.
- ``language_context(family, batch)``: a context manager active while the language model runs
  (``forward`` or the whole ``generate``), e.g. to remap positions inside the rotary embedding.
- heads post-process generated text / hidden states.

Stages hold no state across calls; whatever a ``vision_context`` records lives only inside the ``with``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from torch import nn

if TYPE_CHECKING:
    from .families.base import Family
    from .sequence import AssembledBatch
    from .tokens import VisualTokens

ROLES = ("encoder", "compressor", "position", "head")


class Stage(nn.Module):
    """Base class; ``self.config`` is the ``StageConfig`` it was built from."""

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

    def extra_repr(self) -> str:
        return repr(self.config)
