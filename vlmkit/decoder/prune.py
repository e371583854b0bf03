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
  ``position_embeddings`` (cos/sin along the sequence axis, each layer its own: kept tokens keep their ORIGINAL
  positions, M-RoPE included, since its cos/sin are per token; Gemma 3's local and global layers use different
  bases), the gathered ``position_ids`` (``cache_position``, if a model passes it, is cut to the new length as in
  FastV's HF build) and our own 4-D mask: causal in slot order (= original order) over the real slots of the row,
  OR the family's bidirectional blocks among the kept slots (``Family.decoder_attention_blocks``: Gemma 3's image
  runs), AND, on a sliding-window layer (``Family.decoder_sliding_window``), keys less than W slots before the query,
  counted on the re-packed slots (the tokens the layer holds, as if it had been given the shorter sequence); padding
  slots attend to themselves only (no all-masked rows, hence no NaN). Eager gets an additive float mask in the dtype
  of the model's own mask, SDPA a bool mask.
- **Output**: a forward hook on the last layer scatters the final hidden states of the kept positions back to
  their original slots; a dropped position carries the hidden state it had when it was dropped. So the decoder
  returns the assembled length: ``logits`` [B, S, V] line up with ``batch.labels`` and the model's own loss is
  over the text positions (visual labels are −100), computed from what the pruned model produced there. Layers
  ≥ K's entries of ``output_hidden_states`` / ``output_attentions`` are over the shorter sequence.
- **KV cache** (DynamicCache): each layer's attention appends to its own cache layer, so layers < K hold the full
  prompt and layers ≥ K the re-packed one. **Decode steps**: layers < K run as the model built them; layers ≥ K
  get a mask over their own cache: the row's real slots of the re-packed prompt (kept per segment), then the
  model's own mask columns of the generated tokens (of that layer's mask). A sliding layer's cache keeps only its
  last W − 1 keys: its mask covers the keys ``cache.get_mask_sizes`` reports, those of its re-packed history inside
  the window. Positions of new tokens are the model's (original numbering).
- **Which query scores** (FastV, PDrop): the last prompt token of each row: the last real token, or, when
  ``forward`` gets ``labels``, the token before the row's first supervised label. Hence teacher-forced logits of
  prompt + answer equal the logits ``generate`` produces step by step.
- **A drop that removes nothing** (every image keeps all its tokens) leaves the layout and the layer inputs
  untouched, so it is bit-identical to the unwrapped model.

Not supported: beam search (the cache rows are reordered, the per-row slot masks are not), static caches,
FlashAttention kernels (2-D masks) — refused when the context is entered — and several language-model calls
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
    visual: torch.Tensor | None = None  # [B, S'] visual slots (bidirectional blocks: Family.decoder_attention_blocks)
    masks: dict = dataclasses.field(default_factory=dict)  # prefill mask per sliding window (None: global layers)
    rope: dict = dataclasses.field(default_factory=dict)  # id(cos) of a layer type's RoPE -> (cos, sin) at ``slots``


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
                    kwargs = {**kwargs, "attention_mask": self._decode_mask(seg, hidden.shape[1], i, kwargs)}
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
        own = dict(kwargs)  # what the decoder hands this layer, over the original slots
        if self.segment is not None:
            kwargs = {**kwargs, **self.segment.replace, **self._layer_inputs(self.segment, i, own, hidden.dtype)}
        if i in self.score_layers:  # scored on this layer's input, before a drop at this same layer
            slots, valid = self._current()
            query = (slots == self.query0[:, None].to(slots.device)) & valid
            with torch.no_grad():
                self.pending[self.score_layers[i]] = self.stage.scores(
                    self.family, i, hidden, kwargs, query.float().argmax(dim=1), valid)
        if i in self.drop_layers:
            hidden = self._drop(i, hidden, kwargs)
            if self.segment is not None:
                kwargs = {**kwargs, **self.segment.replace, **self._layer_inputs(self.segment, i, own, hidden.dtype)}
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
        visual = (self.image0.gather(1, new_slots) >= 0) & new_valid
        self.segment = _Segment(new_slots, new_valid, replace, visual)  # masks per layer: _layer_mask
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

    def _layer_inputs(self, seg: _Segment, layer: int, own: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Prefill inputs of decoder layer ``layer`` on the re-packed layout ``seg`` that depend on the layer: its mask
        (one per sliding window) and its own RoPE cos/sin gathered at the kept slots (Gemma 3's local and global
        layers rotate with different bases)."""
        window = self.family.decoder_sliding_window(layer)
        if window not in seg.masks:
            seg.masks[window] = self._prefill_mask(seg.valid, own.get("attention_mask"), dtype, seg.visual, window)
        out = {"attention_mask": seg.masks[window]}
        cos_sin = own.get("position_embeddings")
        if cos_sin is not None:
            key = id(cos_sin[0])
            if key not in seg.rope:
                seg.rope[key] = tuple(_gather_seq(t, seg.slots) for t in cos_sin)
            out["position_embeddings"] = seg.rope[key]
        return out

    def _prefill_mask(self, valid: torch.Tensor, model_mask: Any, dtype: torch.dtype,
                      visual: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
        """[B, 1, S, S] mask: causal in slot order over the real slots (``valid`` [B, S]), OR both slots in one of the
        family's bidirectional blocks of ``visual`` [B, S] (Gemma 3's images), AND, for a sliding layer, the key
        less than ``window`` slots before the query (the model's rule, on the re-packed slots); padding rows attend
        to themselves only."""
        S = valid.shape[1]
        ar = torch.arange(S, device=valid.device)
        allowed = (ar[None, :] <= ar[:, None])[None]
        blocks = None if visual is None else self.family.decoder_attention_blocks(visual)
        if blocks is not None:
            blocks = blocks.to(valid.device)
            allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
        if window is not None:
            allowed = allowed & (ar[None, :] > ar[:, None] - window)[None]
        allowed = (valid[:, None, :] & allowed) | torch.eye(S, dtype=torch.bool, device=valid.device)[None]
        return self._format(allowed[:, None], model_mask, dtype)

    def _window_decode_mask(self, seg: _Segment, q: int, layer: int, window: int,
                            kwargs: dict[str, Any]) -> torch.Tensor:
        """Decode-step mask of a sliding layer on ``seg``: its keys are the last ones of its own history (the re-packed
        prompt, then the generated tokens), as many as its cache holds (``cache.get_mask_sizes``; a sliding cache
        keeps the last ``window`` − 1); a query sees the real keys at most ``window`` − 1 slots before it."""
        n, S1 = self.generated, seg.valid.shape[1]
        total = S1 + n  # the layer's history, this step's q tokens last
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_mask_sizes"):
            length, start = (int(v) for v in cache.get_mask_sizes(q, layer))
        else:
            start = max(total - q - (window - 1), 0)
            length = total - start
        if start + length != total:
            raise RuntimeError(f"decoder pruning: layer {layer}'s cache ends at {start + length}, its re-packed "
                               f"history at {total}")
        key = ("window", id(seg), window, start, length, q)
        if key not in self.decode_masks:
            dev = seg.valid.device
            qpos = total - q + torch.arange(q, device=dev)[:, None]
            kpos = start + torch.arange(length, device=dev)[None, :]
            allowed = (kpos <= qpos) & (kpos > qpos - window)  # [q, length]
            real = torch.ones((self.B, length), dtype=torch.bool, device=dev)
            if start < S1:
                real[:, :S1 - start] = seg.valid[:, start:]
            allowed = allowed[None, None] & real[:, None, None, :]
            self.decode_masks[key] = self._format(allowed, kwargs.get("attention_mask"), torch.float32)
        return self.decode_masks[key]

    def _decode_mask(self, seg: _Segment, q: int, layer: int | None = None,
                     kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        window = None if layer is None else self.family.decoder_sliding_window(layer)
        if window is not None:
            return self._window_decode_mask(seg, q, layer, window, kwargs or {})
        # the model's own mask of this layer (another layer's may cover fewer keys: Gemma 3's sliding layer 0)
        model_mask = self.model_mask if kwargs is None else kwargs.get("attention_mask")
        key = (id(seg), id(model_mask))
        if key in self.decode_masks:
            return self.decode_masks[key]
        n = self.generated
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
