"""Shared machinery of in-decoder visual-token pruning (FastV, VTW, …): drop visual positions at layer K.

Budget (uniform for every method): a method's ``drop_schedule(L, N)`` lists ``(K, kept)`` pairs: before decoder
layer K (0-based) each image keeps ``kept`` of its N visual grid tokens (N = the image's tokens as they enter the
language model, image-newline tokens excluded: those are always kept and never counted). ``keep_ratio`` /
``num_keep`` follow ``vlmkit.compress.PruneConfig`` (``max(1, floor(N · keep_ratio))``; ``num_keep`` is clamped to
N for images that have fewer tokens). ``average_visual_tokens(config, L, N)`` is what in-LLM papers report: the
visual tokens per layer averaged over the L layers, ``(K·N + (L−K)·kept) / L`` for one drop.

How a drop works (``DecoderPruneStage.decoder_context``; one ``_Run`` per language-model call sequence):

- **Prefill** (the first language-model call inside the context: ``forward``, or ``generate``'s prompt pass).
  Forward pre-hooks (with kwargs) on the decoder layers. Before the method's score layer runs (FastV: K−1), its
  input and kwargs are scored (``DecoderPruneStage.scores``: q/k from ``family.decoder_qk``, never by switching
  the model to eager attention). Before layer K, each row keeps its text tokens, its newline tokens and the
  selected visual tokens (``select``), order preserved; the rows are re-packed **left-padded** to the longest
  kept row (the batch's own padding is dropped too), so the last real token sits in the last slot. Layers ≥ K
  get, in place of what the decoder loop hands every layer: the gathered hidden states, the gathered RoPE
  ``position_embeddings`` (cos/sin along the sequence axis: kept tokens keep their ORIGINAL positions, M-RoPE
  included, since its cos/sin are per token), the gathered ``position_ids`` (``cache_position``, if a model
  passes it, is cut to the new length as in FastV's HF build) and our own 4-D mask: causal in slot order (=
  original order) over the real slots of the row; padding slots attend to themselves only (no all-masked rows,
  hence no NaN). Eager gets an additive float mask in the dtype of the model's own mask, SDPA a bool mask.
- **Output**: a forward hook on the last layer scatters the final hidden states of the kept positions back to
  their original slots; a dropped position carries the hidden state it had when it was dropped. So the decoder
  returns the assembled length: ``logits`` [B, S, V] line up with ``batch.labels`` and the model's own loss is
  over the text positions (visual labels are −100), computed from what the pruned model produced there. Layers
  ≥ K's entries of ``output_hidden_states`` / ``output_attentions`` are over the shorter sequence.
- **KV cache** (DynamicCache): each layer's attention appends to its own cache layer, so layers < K hold the full
  prompt and layers ≥ K the re-packed one. **Decode steps**: layers < K run as the model built them; layers ≥ K
  get a mask over their own cache: the row's real slots of the re-packed prompt (kept per segment), then the
  model's own mask columns of the generated tokens. Positions of new tokens are the model's (original numbering).
- **Which query scores** (FastV, PDrop): the last prompt token of each row: the last real token, or, when
  ``forward`` gets ``labels``, the token before the row's first supervised label. Hence teacher-forced logits of
  prompt + answer equal the logits ``generate`` produces step by step.
- **A drop that removes nothing** (every image keeps all its tokens) leaves the layout and the layer inputs
  untouched, so it is bit-identical to the unwrapped model.

Not supported: beam search (the cache rows are reordered, the per-row slot masks are not), static / sliding-window
caches, FlashAttention kernels (2-D masks) — refused when the context is entered — and several language-model calls
sharing one prefill (assisted decoding).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..compress import PruneConfig
from ..stage import DecoderStage

if TYPE_CHECKING:
    from ..families.base import Family
    from ..sequence import AssembledBatch

SUPPORTED_ATTENTION = ("eager", "sdpa")


def check_drop_schedule(schedule: list[tuple[int, int]], num_layers: int, name: str) -> list[tuple[int, int]]:
    """ValueError unless the drop layers are strictly increasing in 1..num_layers−1."""
    layers = [k for k, _ in schedule]
    if any(k < 1 or k >= num_layers for k in layers) or layers != sorted(set(layers)):
        raise ValueError(f"{name}: drop layers {layers} must be strictly increasing in 1..{num_layers - 1} for a "
                         f"decoder of {num_layers} layers")
    return schedule


def average_visual_tokens(config, num_layers: int, num_visual: int) -> float:
    """Visual tokens per decoder layer, averaged over the ``num_layers`` layers, for an image of ``num_visual``
    tokens: ``(K·N + (L−K)·kept) / L`` for one drop, the sum over the segments for several."""
    total, start, current = 0, 0, num_visual
    for k, kept in config.drop_schedule(num_layers, num_visual):
        total += (k - start) * current
        start, current = k, kept
    total += (num_layers - start) * current
    return total / num_layers


@dataclasses.dataclass
class DecoderPruneConfig(PruneConfig):
    """Base config of a one-drop decoder pruner: keep ``keep_ratio`` / ``num_keep`` visual tokens of each image
    before layer ``layer``. Methods with such a budget set ``pruner = True`` (FastV, PDrop: the demo sweep and the
    benchmarks run them); the language model's *input* is not shortened, so the checks of what the assembled
    batch holds apply to compressors only."""

    pruner = False
    keep_ratio: float | None = 0.5
    layer: int = 2

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (the scores come from layer - 1), got {self.layer!r}")

    @classmethod
    def example(cls):
        return cls(keep_ratio=0.5, layer=1)  # tiny test models have 2 decoder layers

    def visual_to_keep(self, num_tokens: int) -> int:
        """Tokens an image of ``num_tokens`` grid tokens keeps (``num_keep`` clamped to ``num_tokens``)."""
        if num_tokens == 0:
            return 0
        if self.num_keep is not None:
            return min(self.num_keep, num_tokens)
        return self.num_to_keep(num_tokens)

    def drop_schedule(self, num_layers: int, num_visual: int) -> list[tuple[int, int]]:
        return check_drop_schedule([(self.layer, self.visual_to_keep(num_visual))], num_layers, self.type)


@dataclasses.dataclass
class _Segment:
    """The re-packed layout layers from one drop on run on: ``slots`` [B, S'] original position of each slot,
    ``valid`` [B, S'] real slots (left padding is False)."""

    slots: torch.Tensor
    valid: torch.Tensor
    replace: dict[str, Any]  # prefill kwargs of the layers of this segment


class DecoderPruneStage(DecoderStage):
    """Base of in-decoder pruners. Subclasses give ``score_layer`` / ``scores`` / ``select``; the config gives
    ``drop_schedule``."""

    def score_layer(self, drop_layer: int) -> int | None:
        """The layer whose *input* (hidden states and kwargs) scores the drop before ``drop_layer`` (None: no score)."""
        return drop_layer - 1

    def scores(self, family: "Family", layer_index: int, hidden: torch.Tensor, kwargs: dict[str, Any],
               query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, S] scores of every slot (higher = keep) from the input of ``layer_index``; ``query`` [B] is the
        slot of each row's last prompt token, ``valid`` [B, S] its real slots."""
        raise NotImplementedError

    def drop_newlines(self) -> bool:
        """Whether image-newline tokens go too (default: always kept, as in ``vlmkit.compress``)."""
        return False

    def select(self, scores: torch.Tensor, num_keep: int) -> torch.Tensor:
        """Sorted positions into ``scores`` [n] (one image's candidates) of the ``num_keep`` to keep."""
        raise NotImplementedError

    def attach(self, family: "Family") -> None:
        L = len(family.decoder_layers)
        self.config.drop_schedule(L, 1)  # raises for drop layers the decoder does not have

    @contextlib.contextmanager
    def decoder_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        impl = family.decoder_attention_implementation()
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"{self.config.type} builds 4-D masks for {list(SUPPORTED_ATTENTION)} attention; the "
                             f"decoder runs {impl!r} (model.set_attn_implementation('sdpa'))")
        run = _Run(self, family, batch, impl)
        layers = family.decoder_layers
        handles = [layer.register_forward_pre_hook(run.pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles.append(layers[len(layers) - 1].register_forward_hook(run.post_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def image_layout(batch: "AssembledBatch") -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, newline)`` [B, S] of the assembled batch: per slot the image it belongs to (−1: text or padding)
    and whether it is an image-newline token."""
    mask = batch.attention_mask.bool()
    image = torch.where(batch.visual_mask & mask, batch.image_id, torch.full_like(batch.image_id, -1))
    newline = torch.zeros_like(mask)
    for key, tokens in enumerate(batch.tokens):
        where = image == key
        if int(where.sum()) == tokens.num_tokens:  # slots of the image in token order
            newline[where] = tokens.is_newline.to(mask.device)
    return image, newline


def _gather_seq(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t`` [1 or B, S, …] gathered along the sequence axis at ``slots`` [B, S'] → [B, S', …]."""
    B = slots.shape[0]
    t = t.expand(B, *t.shape[1:])
    idx = slots.to(t.device).reshape(*slots.shape, *([1] * (t.dim() - 2))).expand(*slots.shape, *t.shape[2:])
    return t.gather(1, idx)


class _Run:
    """State of one decoder context: the prefill's layouts, then the decode steps' masks."""

    def __init__(self, stage: DecoderPruneStage, family: "Family", batch: "AssembledBatch", impl: str) -> None:
        self.stage, self.family, self.impl = stage, family, impl
        self.L = len(family.decoder_layers)
        mask = batch.attention_mask.bool()
        self.B, self.S = mask.shape
        self.valid0 = mask
        self.image0, self.newline0 = image_layout(batch)
        grid = (self.image0 >= 0) & ~self.newline0
        self.grid_count = {key: int((grid & (self.image0 == key)).sum()) for key in range(len(batch.tokens))}
        self.schedules = {key: stage.config.drop_schedule(self.L, n) for key, n in self.grid_count.items()}
        self.drop_layers = [k for k, _ in stage.config.drop_schedule(self.L, 1)]
        self.score_layers = {stage.score_layer(k): k for k in self.drop_layers if stage.score_layer(k) is not None}
        self.query0 = self._query_slots(batch, mask)
        self.prefilled = False
        self.in_prefill = False
        self.segment: _Segment | None = None  # the layout the current layer runs on (None: the original)
        self.segment_of: dict[int, _Segment] = {}  # layer -> segment, for decode steps
        self.pending: dict[int, torch.Tensor] = {}  # drop layer -> scores [B, S_cur]
        self.full: torch.Tensor | None = None  # [B, S, D] latest hidden state of every original position
        self.generated = 0
        self.model_mask: Any = None  # the mask of the current decode step, as the model built it
        self.decode_masks: dict[int, Any] = {}

    @staticmethod
    def _query_slots(batch, mask: torch.Tensor) -> torch.Tensor:
        """[B] original slot of each row's last prompt token."""
        S = mask.shape[1]
        ar = torch.arange(S, device=mask.device)
        last = torch.where(mask, ar, torch.full_like(ar, -1)).max(dim=1).values
        if batch.labels is not None:
            supervised = (batch.labels != -100) & mask
            first = torch.where(supervised, ar, torch.full_like(ar, S)).min(dim=1).values
            last = torch.where((first < S) & (first > 0), first - 1, last)
        return last

    # --- hooks --------------------------------------------------------------------------------------------
    def pre_hook(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                self._start_call(hidden, kwargs)
            if self.in_prefill:
                hidden, kwargs = self._prefill(i, hidden, kwargs)
            else:
                seg = self.segment_of.get(i)
                if seg is not None:
                    kwargs = {**kwargs, "attention_mask": self._decode_mask(seg, hidden.shape[1])}
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
            return args, kwargs

        return hook

    def post_hook(self, module, args, output):
        if not self.in_prefill:
            return None
        self.in_prefill, self.prefilled = False, True
        if self.segment is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = self._scatter(hidden, self.segment)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # --- prefill ------------------------------------------------------------------------------------------
    def _start_call(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if not self.prefilled:
            if hidden.shape[:2] != (self.B, self.S):
                raise RuntimeError(f"decoder pruning: the first language-model call runs on {tuple(hidden.shape[:2])}, "
                                   f"the assembled batch is {(self.B, self.S)}")
            self.in_prefill = True
            return
        if hidden.shape[0] != self.B:
            raise RuntimeError("decoder pruning: the batch changed size after the prefill (beam search / expanded "
                               "decoding is not supported)")
        self.generated += hidden.shape[1]
        self.model_mask = kwargs.get("attention_mask")
        self.decode_masks = {}

    def _current(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.segment is None:
            ar = torch.arange(self.S, device=self.valid0.device)
            return ar.expand(self.B, -1), self.valid0
        return self.segment.slots, self.segment.valid

    def _prefill(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]):
        if self.segment is not None:
            kwargs = {**kwargs, **self.segment.replace}
        if i in self.score_layers:  # scored on this layer's input, before a drop at this same layer
            slots, valid = self._current()
            query = (slots == self.query0[:, None].to(slots.device)) & valid
            with torch.no_grad():
                self.pending[self.score_layers[i]] = self.stage.scores(
                    self.family, i, hidden, kwargs, query.float().argmax(dim=1), valid)
        if i in self.drop_layers:
            hidden = self._drop(i, hidden, kwargs)
            if self.segment is not None:
                kwargs = {**kwargs, **self.segment.replace}
        if self.segment is not None:
            self.segment_of[i] = self.segment
        return hidden, kwargs

    def _drop(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        stage_index = self.drop_layers.index(layer)
        slots, valid = self._current()
        image = self.image0.gather(1, slots)
        newline = self.newline0.gather(1, slots)
        scores = self.pending.pop(layer, None)
        removable = (image >= 0) & (~newline | self.stage.drop_newlines())
        keep = valid & ~removable  # text (and newline) tokens
        for b in range(self.B):
            for key in image[b][valid[b]].unique().tolist():
                if key < 0:
                    continue
                cand = torch.nonzero(valid[b] & (image[b] == key) & ~newline[b]).flatten()
                k = self.schedules[key][stage_index][1]
                if k >= cand.numel():
                    keep[b, cand] = True
                elif k > 0:
                    row = scores[b, cand] if scores is not None else torch.zeros(cand.numel())
                    keep[b, cand[self.stage.select(row, k).to(cand.device)]] = True
        if bool((keep == valid).all()):
            return hidden  # nothing removed: the layout (and the layer inputs) stay as they are
        counts = keep.sum(dim=1).tolist()
        S_new = max(counts)
        new_slots = torch.zeros((self.B, S_new), dtype=torch.long, device=slots.device)
        new_valid = torch.zeros((self.B, S_new), dtype=torch.bool, device=slots.device)
        # positions into the current layout (not the original) for the gathers of this layer's inputs
        pos = torch.zeros_like(new_slots)
        for b, n in enumerate(counts):
            pos[b, S_new - n:] = torch.nonzero(keep[b]).flatten()
            new_slots[b, S_new - n:] = slots[b, pos[b, S_new - n:]]
            new_valid[b, S_new - n:] = True
        if self.full is None:
            self.full = hidden.clone()
        else:
            self.full = self._scatter(hidden, self.segment)
        hidden = torch.where(new_valid[..., None].to(hidden.device), _gather_seq(hidden, pos),
                             torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        replace: dict[str, Any] = {}
        base = kwargs  # this layer's inputs in the current layout
        cos_sin = base.get("position_embeddings")
        if cos_sin is not None:
            replace["position_embeddings"] = tuple(_gather_seq(t, pos) for t in cos_sin)
        pid = base.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[1] == slots.shape[1]:
            replace["position_ids"] = _gather_seq(pid, pos)
        if isinstance(base.get("cache_position"), torch.Tensor):
            replace["cache_position"] = base["cache_position"][:S_new]
        replace["attention_mask"] = self._prefill_mask(new_valid, kwargs.get("attention_mask"), hidden.dtype)
        self.segment = _Segment(new_slots, new_valid, replace)
        return hidden

    def _scatter(self, hidden: torch.Tensor, seg: _Segment) -> torch.Tensor:
        full = self.full.clone()
        b = torch.arange(self.B, device=seg.slots.device)[:, None].expand_as(seg.slots)
        full[b[seg.valid], seg.slots[seg.valid]] = hidden[seg.valid.to(hidden.device)].to(full.dtype)
        return full

    # --- masks --------------------------------------------------------------------------------------------
    def _format(self, allowed: torch.Tensor, model_mask: Any, dtype: torch.dtype) -> torch.Tensor:
        """A bool "may attend" tensor in the format of the model's mask (additive float for eager)."""
        if isinstance(model_mask, torch.Tensor) and model_mask.is_floating_point():
            dtype = model_mask.dtype
        elif model_mask is not None or self.impl != "eager":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device))

    def _prefill_mask(self, valid: torch.Tensor, model_mask: Any, dtype: torch.dtype) -> torch.Tensor:
        S = valid.shape[1]
        ar = torch.arange(S, device=valid.device)
        causal = ar[None, :] <= ar[:, None]
        allowed = (valid[:, None, :] & causal[None]) | torch.eye(S, dtype=torch.bool, device=valid.device)[None]
        return self._format(allowed[:, None], model_mask, dtype)

    def _decode_mask(self, seg: _Segment, q: int) -> torch.Tensor:
        key = id(seg)
        if key in self.decode_masks:
            return self.decode_masks[key]
        n = self.generated
        model_mask = self.model_mask
        prompt = seg.valid[:, None, None, :].expand(-1, 1, q, -1)
        if isinstance(model_mask, torch.Tensor):
            tail = model_mask[..., -n:].expand(self.B, 1, q, n)
            if model_mask.is_floating_point():
                zero = torch.zeros((), dtype=model_mask.dtype, device=model_mask.device)
                low = torch.full((), torch.finfo(model_mask.dtype).min, dtype=model_mask.dtype, device=model_mask.device)
                prompt = torch.where(prompt.to(model_mask.device), zero, low)
            mask = torch.cat([prompt.to(tail.device), tail], dim=-1)
        else:
            r = torch.arange(q, device=seg.valid.device)[:, None]
            c = torch.arange(n, device=seg.valid.device)[None, :]
            tail = (c <= n - q + r)[None, None].expand(self.B, 1, q, n)
            mask = self._format(torch.cat([prompt, tail], dim=-1), None, torch.float32)
        self.decode_masks[key] = mask
        return mask


def fix_ties_topk(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Sorted indices of the ``num_keep`` largest of ``scores`` [n]; equal scores go to the lower index (a stable
    descending sort keeps equal values in index order)."""
    n = scores.numel()
    if not 0 <= num_keep <= n:
        raise ValueError(f"num_keep={num_keep} must be in 0..{n}")
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return order[:num_keep].sort().values


__all__ = ["DecoderPruneConfig", "DecoderPruneStage", "average_visual_tokens", "check_drop_schedule", "fix_ties_topk",
           "image_layout"]
