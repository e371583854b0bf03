"""PyramidDrop (Xing et al., 2024): drop visual tokens in stages, at fractions of the decoder's depth.

Reference: ``Cooperx521/PyramidDrop@6444f304aee4b7edcb022839fb9e8cd07859704a``,
``llava/model/modeling_llama_pdrop.py:1106-1289`` (forward), ``:1291-1470`` (``pdrop_rank_drop``),
``llava/eval/model_vqa_loader.py:84-96,154-155``, ``README.md:75-76``, ``scripts/v1_5/pdrop_eval/gqa.sh``.

Kept from the reference: drops before layers 8, 16, 24 of LLaVA-1.5's 32 (``layer_list``), stage s keeping
``λ^s`` of the image's *original* visual tokens (λ = 0.5: 100/50/25/12.5%, i.e. ``keep_ratio=0.125``); the score of a drop before layer K
is recomputed with layer K's own input norm, q/k projections and RoPE on the hidden states entering K, from the
query of the last instruction token, softmax (float32) over its causal keys, mean over heads; top-k, indices
sorted (order kept); prefill only, each stage's layers cache the compacted sequence.

Choices this module fixes where the reference is open or differs:

- **Depth**: drop layers are given as fractions of the depth L (``layers=(0.25, 0.5, 0.75)`` = 8/16/24 of 32):
  ``K = floor(L·f + 0.5)``; they must come out strictly increasing in 1..L−1 (ValueError at ``wrap()``).
- **Budget**: as for every vlmkit pruner, ``keep_ratio`` is what the *later* layers see: the last stage keeps
  ``max(1, floor(N·keep_ratio))``; the reference's ratio λ is ``keep_ratio^(1/S)`` for S stages, and stage s < S
  keeps ``max(1, floor(N·λ^s))`` (the reference's ``int(N·ratio)`` plus vlmkit's at-least-one rule; the default
  ``keep_ratio=0.125`` over three stages is the reference's λ = 0.5). ``num_keep`` is not offered.
- **Positions**: the reference re-numbers the kept sequence 0..len−1 and shifts decode ids down; here kept tokens
  keep their original RoPE positions (``vlmkit.decoder.prune``, as FastV / DART / VTW do).
- **Batch / padding**: the reference loops over rows but requires right padding; here any padding (rows re-packed
  left-padded, per-row masks). GQA keys are repeated (the reference's 7B/13B models have none).
- **Ties**: lower index first (``torch.topk`` leaves it open). Training-time multi-query scoring (every token
  before an answer span) is not implemented: the query is the last prompt token (``forward`` with labels: the token
  before the first supervised label).
"""

from __future__ import annotations

import dataclasses
import math

from ..compress import keep_count
from ..config import StageConfig, register_stage
from .fastv import FastV
from .prune import DecoderPruneStage, check_drop_schedule, fix_ties_topk


@dataclasses.dataclass
class PDropConfig(StageConfig):
    """PyramidDrop: before layer ``floor(L·f + 0.5)`` for each f in ``layers``, keep λ^s of each image's visual
    tokens (s = 1 … S), λ = ``keep_ratio``^(1/S): the last stage keeps ``keep_ratio``."""

    type = "pdrop"
    display_name = "PDrop"
    pruner = True
    keep_ratio: float = 0.125
    layers: tuple = (0.25, 0.5, 0.75)

    def validate(self) -> None:
        self.layers = tuple(self.layers)  # JSON gives a list back
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or \
                not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if not self.layers or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0
                                  for f in self.layers):
            raise ValueError(f"layers must be fractions of the depth in (0, 1), got {self.layers!r}")

    @classmethod
    def example(cls):
        return cls(keep_ratio=0.5, layers=(0.5,))  # tiny test models have 2 decoder layers

    def drop_schedule(self, num_layers: int, num_visual: int) -> list[tuple[int, int]]:
        out, S = [], len(self.layers)
        for s, f in enumerate(self.layers, start=1):
            fraction = float(self.keep_ratio) if s == S else float(self.keep_ratio) ** (s / S)
            kept = keep_count(num_visual, fraction)
            out.append((math.floor(num_layers * float(f) + 0.5), min(kept, num_visual)))
        return check_drop_schedule(out, num_layers, self.type)


@register_stage(PDropConfig)
class PDrop(DecoderPruneStage):
    def score_layer(self, drop_layer):
        return drop_layer  # layer K's own q/k on the hidden states entering it

    scores = FastV.scores  # the last prompt token's attention row, from the scored layer's own q/k

    def select(self, scores, num_keep):
        return fix_ties_topk(scores, num_keep)
