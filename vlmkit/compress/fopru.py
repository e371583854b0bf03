"""FoPru (Jiang et al., arXiv 2411.14164): training-free pruning by the attention each patch receives in the
vision encoder, with a global (``rank``) or whole-row (``row``) strategy; kept tokens keep raster order.

There is no public reference code; the choices below follow the FoPru paper's method description where it
is explicit, and are otherwise not fixed by the paper and chosen here:

- Layer: ``layer=None`` scores the vision layer whose *output* is the features the model uses
  (``family.feature_layer_index``: LLaVA's ``vision_feature_layer`` -2 → ``vision_layers[-2]``, i.e. layer
  22 of CLIP-L, the same map as VisionZip's ``attentions[-2]``; InternVL -1 → the last layer). An int
  indexes ``family.vision_layers``.
- Attention: recomputed for that one layer by a pre-hook on its attention module
  (``family.vision_attention``): the module's input is the layer-normed hidden states, so
  ``softmax(q kᵀ · scale)`` with the layer's own q/k (``family.vision_qk``: its projections, and q/k norms
  if it has them) reproduces the layer's probabilities exactly; the tower keeps its own (SDPA) attention.
  Scores are computed in float32 under ``no_grad``.
- Significance: mean over heads and over queries of the attention each key receives (the column mean;
  the row mean is constant 1/(N+1)). The CLS *key* column is dropped after the softmax (no
  renormalisation); the CLS *query* row is included unless ``cls_query=False``.
- InternVL: one language-model token is a pixel-shuffled 2×2 block of patches (token (r, c) holds
  patches rows 2r..2r+1, cols 2c..2c+1; see ``InternVLModel.pixel_shuffle``); its score is the **sum**
  of its patches' scores (the attention the block receives in total).
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
    requires = ("patch_grid",)
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


@torch.no_grad()
def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, cls_query: bool = True) -> torch.Tensor:
    """Mean attention each key receives: q, k [B, H, S, d] (``Family.vision_qk``) -> [B, S] (mean over heads
    and queries), computed in float32.

    ``cls_query=False`` leaves the first query (CLS) out of the mean.
    """
    q, k = q.float(), k.float()
    out = []
    for b in range(q.shape[0]):  # one image at a time keeps memory at H·S² floats
        probs = torch.softmax(q[b] @ k[b].transpose(-1, -2) * scale, dim=-1)  # [H, S, S]
        if not cls_query:
            probs = probs[:, 1:]
        out.append(probs.mean(dim=(0, 1)))
    return torch.stack(out)


def patch_to_token_scores(key_scores: torch.Tensor, patch_grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Key scores [B, S] (CLS first if S = h·w + 1) -> token scores [B, (h/f)·(w/f)]: drop CLS, sum f×f blocks."""
    ph, pw = patch_grid
    B, S = key_scores.shape
    if S == ph * pw + 1:
        key_scores = key_scores[:, 1:]
    elif S != ph * pw:
        raise ValueError(f"{S} attention keys do not match the {ph}×{pw} patch grid (+ optional CLS)")
    blocks = key_scores.reshape(B, ph // factor, factor, pw // factor, factor)
    return blocks.sum(dim=(2, 4)).reshape(B, -1)


@register_stage(FoPruConfig)
class FoPru(PruneStage):
    """Pre-LLM pruning from one vision layer's attention (training-free). Scores land in ``VisualTokens.scores``."""

    def __init__(self, config: FoPruConfig) -> None:
        super().__init__(config)
        self._records: list[torch.Tensor] | None = None  # lives only inside vision_context

    def _resolve_layer(self, family) -> int:
        n = len(family.vision_layers)
        layer = self.config.layer
        if layer is None:
            layer = family.feature_layer_index  # the layer whose output the model uses
            if layer is None:
                raise ValueError(f"FoPru cannot follow vision_feature_layer={family.feature_layer!r}; "
                                 "set FoPruConfig(layer=...)")
        if not -n <= layer < n:
            raise ValueError(f"FoPru layer={layer} out of range for {n} vision layers; accepted: {-n}..{n - 1}")
        return layer % n

    def attach(self, family) -> None:
        super().attach(family)
        patch_grid, factor = family.patch_pooling("FoPru")
        self._layer = self._resolve_layer(family)
        family.vision_attention(self._layer)  # fail at wrap() time, not mid-forward
        self._patch_grid, self._factor = patch_grid, factor

    @property
    def scored_layer(self) -> int:
        """0-based index into ``family.vision_layers`` of the layer FoPru scores (resolved at ``attach``)."""
        return self._layer

    def scored_attention(self, family) -> nn.Module:
        """The attention module whose probabilities FoPru recomputes (not stored: it belongs to the model)."""
        return family.vision_attention(self._layer)

    def token_scores(self, family, attention_input: torch.Tensor) -> torch.Tensor:
        """Input of the scored attention module [B, S, C] -> per-token scores [B, h·w] (float32)."""
        has_cls = attention_input.shape[1] == self._patch_grid[0] * self._patch_grid[1] + 1
        with torch.no_grad():
            q, k, scale = family.vision_qk(self._layer, attention_input)
        keys = attention_received(q, k, scale, self.config.cls_query or not has_cls)
        return patch_to_token_scores(keys, self._patch_grid, self._factor)

    @contextlib.contextmanager
    def vision_context(self, family) -> Iterator[None]:
        records: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            records.append(self.token_scores(family, hidden))

        handle = self.scored_attention(family).register_forward_pre_hook(hook, with_kwargs=True)
        self._records = records
        try:
            yield
        finally:
            handle.remove()
            self._records = None

    def compress(self, tokens: list[VisualTokens]) -> list[VisualTokens]:
        if self._records is None:
            raise RuntimeError("FoPru.compress needs the scores recorded by its vision_context (use VLMWrapper)")
        scores = torch.cat(self._records) if self._records else torch.empty(0)
        per_tile = self._patch_grid[0] * self._patch_grid[1] // self._factor**2
        # tower tokens each image came from: num_sources with a source map, else its run (tile-major)
        sizes = [t.num_uncompressed if t.source is None else int(t.num_sources) for t in tokens]
        if scores.shape[0] * per_tile != sum(sizes):
            raise ValueError(
                f"FoPru recorded {scores.shape[0]} tile(s) of attention ({scores.shape[0] * per_tile} tower tokens) "
                f"but the images come from {sum(sizes)} tower tokens: another stage re-ran the vision tower?"
            )
        out, start = [], 0
        for t, size in zip(tokens, sizes):
            if t.num_tokens != t.num_uncompressed:
                raise ValueError("FoPru prunes uncompressed images: put it before other compressors")
            if size % per_tile:
                raise ValueError(f"an image of {size} tower tokens is not a whole number of {per_tile}-token tiles")
            tiles = size // per_tile
            s = scores[start : start + tiles].reshape(1, -1).to(t.embeds.device)
            start += tiles
            if t.source is None:
                h, w = t.grid
                keep = fopru_select(s, (tiles * h, w), self.config.num_to_keep(t.num_tokens), self.config.strategy)[0]
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
