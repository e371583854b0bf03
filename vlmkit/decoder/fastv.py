"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): drop the least-attended visual tokens
before decoder layer K.

Reference: ``pkunlp-icler/FastV@d1659729b5bf1be225e99ee15783deeea80f63b1``,
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py:1023-1116`` (HF-LLaVA build with
KV cache) and ``src/transformers/src/transformers/models/llama/modeling_llama.py:717-809`` (original build),
``README.md:122-196``.

What the reference does, and kept here: the hidden states entering layer K (default K=2) are pruned once, in the
prefill; the score of a visual token is layer K−1's attention probability, averaged over heads, from the query row
of the last prompt token to that token's column; the top-k are kept, the kept indices sorted (original order);
kept tokens keep their original RoPE positions; layers < K cache the full prompt, layers ≥ K the pruned one; decode
steps use the original position numbering. Defaults K=2, R=50% (``keep_ratio=0.5``).

Choices this module fixes where the reference is open or differs:

- **Per-row scores**: the reference scores batch row 0 and applies its indices to every row (with constant image
  start/length); here each row is scored from its own attention row and its own image spans, with any padding.
- **Several images**: the reference has one image span; here every image keeps its own budget, all scored from
  the same query row.
- **Budget**: the reference keeps ``round(N·(1−R))`` (Python's banker's rounding) in the HF build, an absolute
  ``fast_v_attention_rank`` in the original build; here the uniform ``vlmkit`` rule
  ``max(1, floor(N·keep_ratio))`` (equal for N=576, R=50%) or ``num_keep`` (clamped to N).
- **Ties**: ``torch.topk``'s order among equal scores is not specified (the reference does not handle ties);
  ``fastv_select`` keeps the lower index.
- **Scores without eager attention**: the reference forces ``output_attentions`` (eager) for layer K−1; here the
  probabilities of the one query row are recomputed from layer K−1's own q/k (``family.decoder_qk``: input norm,
  projections, RoPE, GQA keys repeated), softmax in float32 over the row's real causal keys (on a sliding-window
  layer, ``family.decoder_sliding_window``, only the keys inside its window, as the layer attends) — the model keeps
  its attention kernel.
- **Query row under ``forward`` with labels**: the last prompt token = the token before the first supervised
  label (the reference scores row −1 of whatever sequence it gets), so teacher-forced logits equal ``generate``'s.
- **Padding / mask**: the reference rebuilds a padding-free causal mask after pruning; here rows are re-packed
  left-padded with a per-row mask (see ``vlmkit.decoder.prune``).
- Re-scoring at decode steps (the reference's "mask" variant) is not done: static KV-cache pruning, as the HF build.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import register_stage
from .prune import DecoderPruneConfig, DecoderPruneStage, fix_ties_topk


def fastv_select(attn_row: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Sorted indices of the ``num_keep`` highest scores of ``attn_row`` [n]; ties go to the lower index."""
    return fix_ties_topk(attn_row, num_keep)


def last_row_attention(q: torch.Tensor, k: torch.Tensor, scale: float, query: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities [B, S] of one query row per batch row: ``q`` [B, H, 1, d], ``k``
    [B, H, S, d], ``query`` [B] the query's slot (keys after it are masked: causal), ``valid`` [B, S] real slots."""
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, 1, S], as eager attention computes it
    S = k.shape[2]
    allowed = valid & (torch.arange(S, device=valid.device)[None, :] <= query[:, None])
    w = w.masked_fill(~allowed[:, None, None, :].to(w.device), torch.finfo(w.dtype).min)
    return torch.softmax(w, dim=-1, dtype=torch.float32).mean(dim=1)[:, 0]


@dataclasses.dataclass
class FastVConfig(DecoderPruneConfig):
    """FastV: before decoder layer ``layer`` (K ≥ 1) each image keeps ``keep_ratio`` (or ``num_keep``) of its visual
    tokens, those layer K−1's last prompt token attends to most."""

    type = "fastv"
    display_name = "FastV"
    pruner = True
    keep_ratio: float | None = 0.5
    layer: int = 2


@register_stage(FastVConfig)
class FastV(DecoderPruneStage):
    def scores(self, family, layer_index, hidden, kwargs, query, valid):
        q, k, scale = family.decoder_qk(layer_index, hidden, kwargs["position_embeddings"],
                                        query_index=query[:, None].to(hidden.device))
        window = family.decoder_sliding_window(layer_index)
        if window is not None:  # a sliding layer's query sees only the keys less than `window` slots before it
            ar = torch.arange(valid.shape[1], device=valid.device)
            valid = valid & (ar[None, :] > query.to(valid.device)[:, None] - window)
        return last_row_attention(q, k, scale, query.to(valid.device), valid)

    def select(self, scores, num_keep):
        return fastv_select(scores, num_keep)
