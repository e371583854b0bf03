"""FoPru (Jiang et al., arXiv 2411.14164): training-free pruning by the attention each patch receives in the
vision encoder, with a global (``rank``) or whole-row (``row``) strategy; kept tokens keep raster order.

There is no public reference code; the choices below follow the FoPru paper's method description where it
is explicit, and are otherwise not fixed by the paper and chosen here:

- Layer: a layer whose attention spans a whole tile / image (``family.global_vision_layers``; FoPru ranks an
  image's tokens against each other, which a windowed layer cannot). ``layer=None`` scores the vision layer whose
  *output* is the features the model uses (``family.feature_layer_index``: LLaVA's ``vision_feature_layer`` -2
  → ``vision_layers[-2]``, i.e. layer 22 of CLIP-L, the same map as VisionZip's ``attentions[-2]``; InternVL,
  Qwen2.5-VL -1 → the last layer), or, if that layer attends within windows only, the last global layer before
  it. An int indexes ``family.vision_layers`` and must be a global layer (ValueError naming them otherwise).
  Qwen2.5-VL's windowed tower: the full-attention layers are ``fullatt_block_indexes`` (7, 15, 23, 31 of 32), so
  the default is layer 31, the feature layer itself; Qwen2-VL's tower has no windows (every layer global).
- Attention: recomputed for that one layer from what its attention module receives
  (``family.on_vision_attention``, the tower keeps its own SDPA / flash attention): per independent attention
  group (a tile; one image of a packed tower such as Qwen's, cut by its ``cu_seqlens``), ``softmax(q kᵀ · scale)``
  with the layer's own q/k (``family.vision_qk``: its projections, q/k norms if it has them, the tower's rotary
  embedding if it has one) reproduces the layer's probabilities exactly. Scores are computed in float32 under
  ``no_grad``, in chunks of queries for long sequences.
- Significance: mean over heads and over queries of the attention each key receives (the column mean;
  the row mean is constant 1/(N+1)). The CLS *key* column is dropped after the softmax (no
  renormalisation); the CLS *query* row is included unless ``cls_query=False``.
- A language-model token that holds several patches gets the **sum** of its patches' scores (the attention
  the block receives in total): InternVL's pixel-shuffled 2×2 blocks (token (r, c) holds patch rows 2r..2r+1,
  cols 2c..2c+1; see ``InternVLModel.pixel_shuffle``), Qwen's 2×2 merge units, mapped back from the tower's window
  order to the model's token order (``AttentionGroup.token``).
- ``rank``: the K highest scores. ``row``: rows ranked by mean score; the ⌊K/w⌋ best rows are kept
  whole and the remaining K mod w tokens are the highest-scoring tokens of the next-best row (so K < w
  keeps the best tokens of the best row). Ties go to the lower index. Tiled images (InternVL) are
  pruned per image over all tiles: ``rank`` over every token, ``row`` over the ``tiles·h`` rows.
- Images whose run is not the tower's tile-major token order (``VisualTokens.source`` set: LLaVA-NeXT /
  OneVision AnyRes, base tile + cropped stitched grid + image-newline tokens): the recorded per-tile
  scores are gathered through ``source`` (token at run position p gets the score of tower token
  ``source[p]``; patches the model cropped are simply not in the run). Newline tokens (``source == -1``)
  are always kept and do not count: ``keep_ratio`` / ``num_keep`` give the exact number of kept *grid*
  tokens, ``max(1, floor(G · keep_ratio))`` of the G grid tokens. ``row`` then ranks the rows of the run
  as the language model sees them, i.e. the rows of ``VisualTokens.blocks`` without their newline (the
  base tile's h rows of w, then the stitched grid's R rows of C), not the rows of the tower tiles (which
  include cropped padding); rows of different length are taken whole in order of mean score while they
  fit, and the first that does not fit gives its best remaining tokens (``fopru_select_rows``; for rows
  of equal width this is exactly the rule above). ``VisualTokens.scores`` is then [N] over the run
  positions, NaN for newlines.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from . import PruneConfig, PruneStage
from ..config import register_stage
from ..tokens import VisualTokens

STRATEGIES = ("rank", "row")


@dataclasses.dataclass
class FoPruConfig(PruneConfig):
    """FoPru: keep ``keep_ratio`` (or ``num_keep``) of each image's tokens by vision attention.

    strategy: "rank" | "row"; layer: index into the vision layers (None = the feature layer);
    cls_query: whether the CLS token's attention row counts when averaging over queries.
    """

    type = "fopru"
    display_name = "FoPru"
    requires = ("vision_attention",)
    strategy: str = "rank"
    layer: int | None = None
    cls_query: bool = True

    @classmethod
    def variants(cls) -> dict[str, "FoPruConfig"]:
        return {s: dataclasses.replace(cls.example(), strategy=s) for s in STRATEGIES}

    def validate(self) -> None:
        super().validate()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown FoPru strategy {self.strategy!r}; accepted: {list(STRATEGIES)}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer must be an int index into the vision layers or None, got {self.layer!r}")


def fopru_select(scores: torch.Tensor, grid_hw: tuple[int, int], num_keep: int, strategy: str) -> torch.Tensor:
    """Indices to keep: scores [B, N] (N = h·w, row-major) -> LongTensor [B, K], strictly increasing per row."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    B, N = scores.shape
    if h * w != N:
        raise ValueError(f"grid {h}×{w} does not match the {N} scores per row")
    if not 1 <= num_keep <= N:
        raise ValueError(f"num_keep must be in 1..{N}, got {num_keep}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown FoPru strategy {strategy!r}; accepted: {list(STRATEGIES)}")
    if strategy == "rank":
        keep = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :num_keep]
        return keep.sort(dim=1).values
    rows = torch.sort(scores.view(B, h, w).mean(-1), dim=1, descending=True, stable=True).indices  # [B, h]
    full, rem = divmod(num_keep, w)
    cols = torch.arange(w, device=scores.device)
    parts = [(rows[:, :full, None] * w + cols).reshape(B, full * w)]
    if rem:
        nxt = rows[:, full]  # [B]: the next-best row gives its rem best tokens
        in_row = scores.view(B, h, w)[torch.arange(B, device=scores.device), nxt]  # [B, w]
        best = torch.sort(in_row, dim=1, descending=True, stable=True).indices[:, :rem]
        parts.append(nxt[:, None] * w + best)
    return torch.cat(parts, dim=1).sort(dim=1).values


def fopru_select_rows(scores: torch.Tensor, row: torch.Tensor, num_keep: int, strategy: str) -> torch.Tensor:
    """FoPru's selection over tokens grouped in rows of any length: scores [G], row [G] (row id of each token,
    any ints) -> LongTensor [K] of increasing positions into the G tokens.

    ``rank``: the K highest scores. ``row``: rows ranked by mean score (ties: lower row id); whole rows are
    taken in that order while they fit in K, and the first row that does not fit gives its K - taken
    highest-scoring tokens. Ties between tokens go to the lower position.
    """
    if scores.dim() != 1 or row.shape != scores.shape:
        raise ValueError(f"scores and row must both be [G], got shapes {tuple(scores.shape)} and {tuple(row.shape)}")
    G = int(scores.numel())
    if not 1 <= num_keep <= G:
        raise ValueError(f"num_keep must be in 1..{G}, got {num_keep}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown FoPru strategy {strategy!r}; accepted: {list(STRATEGIES)}")
    if strategy == "rank":
        return torch.sort(scores, descending=True, stable=True).indices[:num_keep].sort().values
    ids = torch.unique(row)  # sorted row ids
    members = [torch.nonzero(row == r).flatten() for r in ids.tolist()]
    means = torch.stack([scores[m].mean() for m in members])
    parts, taken = [], 0
    for r in torch.sort(means, descending=True, stable=True).indices.tolist():
        m = members[r]
        if taken + m.numel() <= num_keep:
            parts.append(m)
            taken += m.numel()
        else:
            parts.append(m[torch.sort(scores[m], descending=True, stable=True).indices[: num_keep - taken]])
            taken = num_keep
        if taken == num_keep:
            break
    return torch.cat(parts).sort().values


def run_rows(tokens: VisualTokens) -> torch.Tensor:
    """[K] row id of each token of ``tokens`` in its run: the rows of ``blocks`` one after the other, or the
    ``tiles·h`` rows of ``grid`` width without blocks."""
    index = tokens.index
    if tokens.blocks is None:
        return index // tokens.grid[1]
    row = torch.empty_like(index)
    base = 0
    for offset, (h, w) in tokens.blocks:
        inside = (index >= offset) & (index < offset + h * w)
        row[inside] = base + (index[inside] - offset) // w
        base += h
    return row


#: float elements of one chunk of attention probabilities (H · queries · keys) in ``attention_received``
CHUNK_ELEMENTS = 1 << 26


@torch.no_grad()
def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, cls_query: bool = True) -> torch.Tensor:
    """Mean attention each key receives: q [B, H, Sq, d], k [B, H, S, d] (``Family.vision_qk``) -> [B, S] (mean
    over heads and queries), computed in float32.

    ``cls_query=False`` leaves the first query (CLS) out of the mean. Long sequences are summed over chunks of
    queries (softmax is per query, so chunking is exact up to float rounding), at most ``CHUNK_ELEMENTS`` floats each.
    """
    q, k = q.float(), k.float()
    if not cls_query:
        q = q[:, :, 1:]
    H, Sq, S = q.shape[1], q.shape[2], k.shape[2]
    step = max(1, CHUNK_ELEMENTS // max(1, H * S))
    out = []
    for b in range(q.shape[0]):  # one image at a time keeps memory at H·S² floats (or a chunk of it)
        if step >= Sq:
            out.append(torch.softmax(q[b] @ k[b].transpose(-1, -2) * scale, dim=-1).mean(dim=(0, 1)))
            continue
        total = torch.zeros(S, dtype=torch.float32, device=q.device)
        for i in range(0, Sq, step):
            total += torch.softmax(q[b, :, i:i + step] @ k[b].transpose(-1, -2) * scale, dim=-1).sum(dim=(0, 1))
        out.append(total / (H * Sq))
    return torch.stack(out)


def group_token_scores(group, cls_query: bool = True) -> torch.Tensor:
    """FoPru's token scores of one ``AttentionGroup`` (a tile / an image of a vision layer's attention) -> [n] float32:
    the mean attention each key receives (``attention_received``; the prefix (CLS) queries count unless
    ``cls_query=False``), summed over the keys that feed each token (prefix keys dropped, no renormalisation)."""
    q = group.q if cls_query or not group.prefix else group.q[:, group.prefix:]
    keys = attention_received(q[None], group.k[None], group.scale)[0][group.prefix:]
    scores = torch.zeros(group.num_tokens, dtype=torch.float32, device=keys.device)
    return scores.index_add_(0, group.token.to(keys.device), keys.float())  # bf16 under autocast


@register_stage(FoPruConfig)
class FoPru(PruneStage):
    """Pre-LLM pruning from one vision layer's attention (training-free). Scores land in ``VisualTokens.scores``."""

    def __init__(self, config: FoPruConfig) -> None:
        super().__init__(config)
        self._records: list[torch.Tensor] | None = None  # lives only inside vision_context

    def _resolve_layer(self, family) -> int:
        n = len(family.vision_layers)
        global_layers = family.global_vision_layers
        layer = self.config.layer
        if layer is None:
            feature = family.feature_layer_index  # the layer whose output the model uses
            if feature is None:
                raise ValueError(f"FoPru cannot follow vision_feature_layer={family.feature_layer!r}; "
                                 "set FoPruConfig(layer=...)")
            before = [i for i in global_layers if i <= feature]
            if not before:
                raise ValueError(f"FoPru: no vision layer up to the feature layer {feature} attends globally "
                                 f"(global layers: {global_layers}); set FoPruConfig(layer=...)")
            return before[-1]
        if not -n <= layer < n:
            raise ValueError(f"FoPru layer={layer} out of range for {n} vision layers; accepted: {-n}..{n - 1}")
        if layer % n not in global_layers:
            raise ValueError(f"FoPru layer={layer} attends within windows only; the layers whose attention spans a "
                             f"whole image are {global_layers}")
        return layer % n

    def attach(self, family) -> None:
        super().attach(family)
        self._layer = self._resolve_layer(family)
        family.check_vision_attention(self._layer, "FoPru")  # fail at wrap() time, not mid-forward

    @property
    def scored_layer(self) -> int:
        """0-based index into ``family.vision_layers`` of the layer FoPru scores (resolved at ``attach``)."""
        return self._layer

    def scored_attention(self, family) -> nn.Module:
        """The attention module whose probabilities FoPru recomputes (not stored: it belongs to the model)."""
        return family.vision_attention(self._layer)

    def group_scores(self, groups) -> torch.Tensor:
        """Token scores of the attention groups of one call of the scored layer: [groups, n] when every group
        has n tokens (tiles), else [Σ n] (images of a packed tower), in group order."""
        with torch.no_grad():
            scores = [group_token_scores(g, self.config.cls_query) for g in groups]
        if len({int(s.numel()) for s in scores}) == 1:
            return torch.stack(scores)
        return torch.cat(scores)

    def token_scores(self, family, attention_input: torch.Tensor) -> torch.Tensor:
        """Input of the scored attention module [B, S, C] (one tile per row) -> per-token scores [B, h·w]
        (float32)."""
        return self.group_scores(family.vision_attention_groups(self._layer, attention_input))

    @contextlib.contextmanager
    def vision_context(self, family) -> Iterator[None]:
        records: list[torch.Tensor] = []
        handle = family.on_vision_attention(self._layer, lambda groups: records.append(self.group_scores(groups)))
        self._records = records
        try:
            yield
        finally:
            handle.remove()
            self._records = None

    def compress(self, tokens: list[VisualTokens]) -> list[VisualTokens]:
        if self._records is None:
            raise RuntimeError("FoPru.compress needs the scores recorded by its vision_context (use VLMWrapper)")
        # one score per tower token, in the order the tower ran them (tiles / images one after the other)
        scores = torch.cat([r.reshape(-1) for r in self._records]) if self._records else torch.empty(0)
        # tower tokens each image came from: num_sources with a source map, else its run (tile-major)
        sizes = [t.num_uncompressed if t.source is None else int(t.num_sources) for t in tokens]
        if scores.numel() != sum(sizes):
            raise ValueError(
                f"FoPru recorded the attention of {scores.numel()} tower tokens but the images come from "
                f"{sum(sizes)} tower tokens: another stage re-ran the vision tower?"
            )
        out, start = [], 0
        for t, size in zip(tokens, sizes):
            if t.num_tokens != t.num_uncompressed:
                raise ValueError("FoPru prunes uncompressed images: put it before other compressors")
            s = scores[start : start + size][None].to(t.embeds.device)
            start += size
            if t.source is None:
                h, w = t.grid
                if size % (h * w):
                    raise ValueError(f"an image of {size} tokens is not a whole number of {h}×{w} tiles")
                keep = fopru_select(s, (size // w, w), self.config.num_to_keep(t.num_tokens), self.config.strategy)[0]
                out.append(dataclasses.replace(t, scores=s[0]).select(keep))
                continue
            grid = t.grid_positions()
            grid_scores = s[0][t.source[grid].to(s.device)]
            run_scores = torch.full((t.num_tokens,), float("nan"), dtype=s.dtype, device=s.device)
            run_scores[grid] = grid_scores
            k = self.config.num_to_keep(int(grid.numel()))
            keep = fopru_select_rows(grid_scores, run_rows(t)[grid], k, self.config.strategy)
            out.append(dataclasses.replace(t, scores=run_scores).keep_with_newlines(grid[keep]))
        return out
