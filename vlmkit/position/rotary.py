"""Shared machinery of the position schemes: integer positions outside, scheme positions inside RoPE.

Design choice (why not pass float ``position_ids`` to the model). transformers 5.x would accept float
``position_ids`` (Llama/Qwen2 RoPE computes ``position_ids.float() * inv_freq``) and ``generate`` extends
them by ``last + 1`` per step, but everything else that reads ``position_ids`` expects ordinary integer
positions: ``masking_utils`` infers *packed sequences* from any step ≠ 1 when no 2-D mask and no cache are
given (block-diagonal mask, silently wrong logits), FlashAttention-2's ``_is_packed_sequence`` does the same
for batch 1, ``generate`` drops an all-ones attention mask, and shared positions (MouSi) repeat the minimum.
So a position stage hands the model plain integer positions (``attention_mask.cumsum(-1) - 1``, the ones
``generate`` itself would compute) and, only while the language model runs, swaps the decoder's
``rotary_emb.forward(x, position_ids)`` for a per-row lookup integer → scheme position. Masking, packed-
sequence detection and ``generate``'s bookkeeping see integers; only cos/sin see the scheme's positions.
That works the same for eager and SDPA attention, with or without KV cache, and the cached keys carry the
fractional rotation exactly as in the V2PE reference (keys are rotated before they enter the cache).

Positions past the prompt continue at ``last scheme position + 1`` per step, as the V2PE reference does
in ``prepare_inputs_for_generation``.

M-RoPE decoders (Qwen2.5-VL …, family capability ``mrope``) work the same way in 3-D: the stage hands the model
integer positions on every row of its ``position_ids`` (``Family.mrope_input``: Qwen's [4, B, L]), the rotary
embedding receives them as [3, B, S] and looks up, per axis, the scheme's (t, h, w) positions, which the
*family* lays out (``Family.mrope_positions``) from the stage's ``mrope_layout``: a map of each image's own
(t, row, col) offsets (``vlmkit/families/qwen2_5_vl.py`` tabulates what V2PE and MouSi mean in 3-D). ``generate``
extends every row by one per step, and every axis continues at its last prompt position + 1 (the last prompt
token is text, whose three positions are equal).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ..sequence import integer_positions, visual_runs  # noqa: F401  (also public here: v2pe, mousi, tests)
from ..stage import PositionStage

if TYPE_CHECKING:
    from ..families.base import Family
    from ..sequence import AssembledBatch


def rotary_embedding(family: "Family") -> nn.Module:
    """The language model's rotary module (``Family.rotary_embedding``), checked to take 1-D positions, or M-RoPE
    positions that the family lays out (capability ``mrope``).

    Raises ValueError when the decoder has no RoPE module these schemes can remap, or uses another kind of RoPE
    (``Family.rope_kind``).
    """
    kind = family.rope_kind
    name = type(family.model).__name__
    if kind is None:
        raise ValueError(
            f"vlmkit position schemes remap the decoder's rotary embedding, but {name} ({family.model_type}) has none"
        )
    if kind == "mrope" and "mrope" not in family.capabilities:
        raise ValueError(f"{name} uses M-RoPE, but vlmkit's {family.model_type!r} family does not lay out M-RoPE "
                         "positions (capability 'mrope')")
    if kind not in ("1d", "mrope"):
        raise ValueError(f"position schemes need 1-D RoPE or M-RoPE; {name} uses {kind!r} rotary positions")
    return family.rotary_embedding


def check_masks(visual_mask: torch.Tensor, attention_mask: torch.Tensor, image_id) -> None:
    if visual_mask.dim() != 2 or attention_mask.shape != visual_mask.shape:
        raise ValueError(
            f"visual_mask and attention_mask must both be [B, S], got {tuple(visual_mask.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if image_id is not None and image_id.shape != visual_mask.shape:
        raise ValueError(f"image_id must be [B, S] like visual_mask, got {tuple(image_id.shape)}")


class PositionTable:
    """Per-row lookup integer position → scheme position, continuing at ``last + 1`` after the prompt.

    Built from scheme positions ``rope`` [B, S] (float; or [A, B, S]: one table per M-RoPE axis) and the
    ``attention_mask`` [B, S] they belong to: the k-th real token of row b (integer position k) maps to
    ``rope[(a,) b, that slot]``; integer position ``n_b - 1 + m`` (m ≥ 1, generated tokens) maps to
    ``last_b + m`` (per axis). Padding slots carry integer position 0 and therefore the first real token's value;
    they are masked, so that value never matters.
    """

    def __init__(self, rope: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if rope.shape[-2:] != attention_mask.shape or attention_mask.dim() != 2 or rope.dim() not in (2, 3):
            raise ValueError(
                f"rope positions {tuple(rope.shape)} must be [B, S] or [A, B, S] and attention_mask "
                f"{tuple(attention_mask.shape)} [B, S]"
            )
        self.axes = None if rope.dim() == 2 else int(rope.shape[0])
        rope = rope if self.axes is not None else rope[None]
        A, B, S = rope.shape
        real = attention_mask != 0
        self.lengths = real.sum(dim=1)  # [B]
        table = torch.zeros((A, B, max(S, 1)), dtype=torch.float64, device=rope.device)
        for b in range(B):
            n = int(self.lengths[b])
            table[:, b, :n] = rope[:, b][:, real[b]].to(torch.float64)
        index = (self.lengths - 1).clamp(min=0)[None, :, None].expand(A, B, 1)
        last = table.gather(2, index)[..., 0]  # [A, B]
        # [B, S] / [B] for 1-D, [A, B, S] / [A, B] per axis
        self.table, self.last = (table[0], last[0]) if self.axes is None else (table, last)

    def lookup(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Integer ``position_ids`` [B', S'] → float32 scheme positions [B', S'] (a per-axis table: [A, B', S'] or
        [B', S'] keys → [A, B', S']).

        B' may be a multiple of B (``generate`` repeats rows for beams / ``num_return_sequences`` with
        ``repeat_interleave``); integer positions past row b's prompt continue at ``last_b + 1`` per step.
        """
        if self.axes is None:
            if position_ids.dim() != 2:
                raise ValueError(f"this position scheme expects [B, S] position_ids in the rotary embedding, got "
                                 f"{tuple(position_ids.shape)}")
            return self._lookup(self.table, self.last, position_ids)
        if position_ids.dim() == 2:  # the same integer positions on every axis (what the stage hands the model)
            position_ids = position_ids[None].expand(self.axes, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != self.axes:
            raise ValueError(f"this position scheme expects [{self.axes}, B, S] position_ids in the rotary embedding, "
                             f"got {tuple(position_ids.shape)}")
        return torch.stack([self._lookup(self.table[a], self.last[a], position_ids[a]) for a in range(self.axes)])

    def _lookup(self, table: torch.Tensor, last: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        rows = position_ids.shape[0]
        B = table.shape[0]
        lengths = self.lengths
        if rows != B:
            if rows % B:
                raise RuntimeError(
                    f"the rotary embedding got {rows} rows of positions for a batch of {B}; the position scheme "
                    "can only follow rows that generate() repeats (beams, num_return_sequences)"
                )
            k = rows // B
            table, lengths, last = (t.repeat_interleave(k, dim=0) for t in (table, lengths, last))
        table, lengths, last = (t.to(position_ids.device) for t in (table, lengths, last))
        pos = position_ids.long()
        inside = pos < lengths[:, None]
        gathered = table.gather(1, pos.clamp(0, table.shape[1] - 1))
        beyond = last[:, None] + (pos - lengths[:, None] + 1).to(torch.float64)
        return torch.where(inside, gathered, beyond).to(torch.float32)


@contextlib.contextmanager
def remap_rotary(rotary: nn.Module, table: PositionTable) -> Iterator[None]:
    """Within the ``with``, ``rotary(x, position_ids)`` computes cos/sin at ``table.lookup(position_ids)`` (M-RoPE:
    ``position_ids`` [3, B, S], one lookup per axis).

    The module's previous ``forward`` (bound method or an instance attribute set by someone else, e.g.
    accelerate hooks) is called with the remapped positions and restored on exit. Float ``position_ids``
    are passed through unchanged (they are already scheme positions).
    """
    original = rotary.forward

    def forward(x, position_ids=None, *args, **kwargs):
        if position_ids is not None and not torch.is_floating_point(position_ids):
            position_ids = table.lookup(position_ids)
        return original(x, position_ids, *args, **kwargs)

    with patch_forward(rotary, forward):
        yield


@contextlib.contextmanager
def patch_forward(module: nn.Module, forward) -> Iterator[None]:
    """Within the ``with``, ``module.forward`` is ``forward`` (an instance attribute); the previous instance
    attribute, if any (e.g. an accelerate hook), is restored on exit, else the class method shows again."""
    had_own = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


class RotaryPositionStage(PositionStage):
    """Base of the position schemes: subclasses implement ``rope_positions(batch)`` (1-D RoPE) and
    ``mrope_layout(batch)`` (M-RoPE: how each image's (t, row, col) offsets map; the family lays out the rest).

    ``position_ids(batch)`` returns plain integer positions [B, L] (so masks, packed-sequence detection and
    ``generate`` see ordinary ids) and ``language_context`` makes the rotary embedding use
    ``rope_positions(batch)`` for them (see the module docstring for why). The integer positions are
    explicit, not None: ``forward`` then numbers a left-padded row from its first real token, as
    ``generate`` does (HF's own ``forward`` would number columns), so a padded batch equals each sample
    alone. ``VLMWrapper`` passes the batch's attention mask to every call; with integer positions even the
    all-ones mask ``generate`` drops cannot trigger packed-sequence detection.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self.family: "Family | None" = None

    def attach(self, family: "Family") -> None:
        rotary_embedding(family)  # ValueError at wrap() time for decoders without a remappable RoPE
        self.family = family  # a plain object (not a module): the wrapped model's adapter

    def detach(self, family: "Family") -> None:
        self.family = None

    def rope_positions(self, batch: "AssembledBatch", training: bool | None = None) -> torch.Tensor:
        """[B, L] float positions the rotary embedding uses for ``batch`` (override).

        ``training`` selects a scheme's training behaviour, if it has one; None means ``self.is_training()``.
        """
        raise NotImplementedError

    def mrope_layout(self, batch: "AssembledBatch", training: bool | None = None):
        """M-RoPE decoders: ``layout(image, offsets)`` mapping image ``image``'s own offsets [3, N] (LongTensor,
        (t, row, col) of every uncompressed cell from its first position) to the scheme's [3, N] (float64); the
        family places them after the text and resumes the text after the largest height/width position
        (``Family.mrope_positions``). Override; ``training`` as in ``rope_positions``."""
        raise NotImplementedError(f"{type(self).__name__} defines no M-RoPE layout")

    def scheme_positions(self, family: "Family", batch: "AssembledBatch", training: bool | None = None) -> torch.Tensor:
        """The positions the rotary embedding uses for ``batch``: ``rope_positions`` [B, L] for 1-D RoPE, the family's
        layout of ``mrope_layout`` [3, B, L] (float64) for M-RoPE."""
        if family.rope_kind == "mrope":
            return family.mrope_positions(batch, self.mrope_layout(batch, training))
        return self.rope_positions(batch, training)

    def is_training(self) -> bool:
        """Training behaviour only when this stage *and* the wrapped model are in training mode.

        ``VLMWrapper`` starts in ``nn.Module``'s default training mode even around a model in eval mode;
        requiring both keeps ``wrap(model.eval())`` deterministic and follows ``wrapper.train()/.eval()``.
        """
        return bool(self.training and (self.family is None or self.family.model.training))

    def position_ids(self, batch: "AssembledBatch") -> torch.LongTensor:
        """Integer positions [B, L]; for M-RoPE the same on every row of the decoder's ``position_ids``
        (``Family.mrope_input``), the keys the rotary embedding's per-axis lookup uses."""
        positions = integer_positions(batch.attention_mask)
        if self.family is not None and self.family.rope_kind == "mrope":
            return self.family.mrope_input(positions, positions[None].expand(3, -1, -1))
        return positions

    @contextlib.contextmanager
    def language_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        table = PositionTable(self.scheme_positions(family, batch), batch.attention_mask)
        with remap_rotary(rotary_embedding(family), table):
            yield
