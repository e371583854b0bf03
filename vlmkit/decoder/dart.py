"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More"): before decoder layer K keep a few pivot tokens and, per pivot, the visual tokens least similar to it.

Reference (``ZichenWen1/DART``, read as vendored in ``Chenfei-Liao/VTC-Bench@983e443ebb41fac8db19829499fe388c87885b58``
under ``external/DART/``): LLaVA: ``llava/model/language_model/modeling_llama_self.py:313-359`` (call site),
``:397-450`` (``get_retained_image_token``), ``:621`` (attention returns q, k, v), ``:962-993`` (decoder layer
returns them), ``llava/eval/model_vqa_loader.py:21-31,172-178`` (defaults); Qwen2.5-VL:
``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py:1456-1511,1553-1593``,
``lmms-eval/lmms_eval/models/qwen2_5_vl.py:332-338``, ``Qwen2_5-VL/eval_scripts/lmms_eval.sh:8-15``.

What the reference does, and kept here: in the prefill, before layer K (default K=2), the image tokens are
pruned once, from what layer K−1 produced: its **key states** (after RoPE) flattened over heads give an L1 norm per
token; the ``P_img`` (default 4) image tokens of largest L1 are the image pivots, the ``P_txt`` (default 4) tokens
of largest L1 among the text after the image are the text pivots. Duplicates are measured on the model's *final*
norm applied to layer K−1's output (= the hidden states entering layer K): for each pivot in turn, among the image
tokens not selected yet (image pivots excluded) the ``TOKEN_TOPK`` of lowest cosine similarity to the pivot are
taken and removed from the candidates. Kept = image pivots ∪ everything taken (text pivots are not image tokens
and are never removed); kept indices sorted (order kept), kept tokens keep their original RoPE positions; layers
< K cache the full prompt, layers ≥ K the pruned one; decode steps are not pruned.

Choices this module fixes where the reference is open or differs:

- **Budget**: vlmkit's uniform rule: each image keeps ``num_keep`` (clamped to its G grid tokens) or
  ``max(1, floor(G·keep_ratio))`` tokens in the layers ≥ K, exactly. The reference's count is
  ``P_img + (P_img+P_txt)·TOKEN_TOPK`` with ``TOKEN_TOPK = max_num_trunction // (P_img+P_txt)`` (LLaVA file,
  ``max_num_trunction=128`` → 16, i.e. 132 tokens of 576) or ``int(N·(1−reduction_ratio)/(P_img+P_txt))`` (Qwen
  file). Here, for a budget k: ``p_img = min(P_img, k)`` image pivots, ``p_txt = min(P_txt, text tokens after
  the image)`` text pivots, and the ``k − p_img`` remaining tokens are shared out: every pivot takes
  ``TOKEN_TOPK = (k − p_img) // (p_img + p_txt)``, the first ``(k − p_img) mod (p_img + p_txt)`` pivots in
  iteration order one more. When ``p_img + p_txt`` divides ``k − p_img`` this is the reference's rule exactly;
  the LLaVA file's default (132 of 576) is ``num_keep=132``. The default ``keep_ratio=0.222`` is the reference's
  default ``reduction_ratio=0.778`` (127 of 576 under the floor rule).
- **Pivot iteration order**: the reference loops over ``list(set(image_pivots + text_pivots))`` (sequence
  indices; each list in ``topk`` order). CPython hashes an int to itself, so when every pivot index is smaller
  than the set's table size (8 slots for up to 4 pivots, 32 for 5 to 18, e.g. the default 8) the set
  iterates in ascending index order; larger indices come in order of ``index mod table size``, collisions
  placed by probing in insertion order. This is **reproduced**: the same Python set is built from the tokens'
  original positions (index among the row's real tokens, which is the reference's sequence index for its
  unpadded batch-1 prompt, and does not move with padding), image pivots inserted first in decreasing-L1 order,
  then the text pivots. ``dart_select`` takes these positions (default: image tokens at 0…N_img−1, the text
  right after).
- **Ties**: lower index first, both for the pivots (equal L1) and for the least-similar picks (equal cosine);
  ``torch.topk`` leaves it open in the reference.
- **Batch and several images**: the reference asserts batch size 1 and one image span. Here each row and each
  image of a row is pruned on its own, with its own budget: the image's candidates are its grid tokens
  (image-newline tokens are always kept); its text pivots come from **all the text after that image** up to
  the row's last prompt token (the reference's "everything after the image span": instruction and template),
  i.e. the row's non-visual tokens after the image's last visual token, other images' visual tokens excluded;
  for the last image of a row that is the text after the last image. Padding and (with ``labels``) the
  supervised answer are not text pivots: the query is the prompt, so teacher-forced logits equal ``generate``'s.
- **Where the keys come from**: the reference returns the key states from layer K−1's attention (after the
  cache update; after ``repeat_kv`` in the LLaVA file, before it in the Qwen file). Here they are recomputed
  from layer K−1's input with the layer's own norm, k projection and RoPE (``family.decoder_qk``), GQA keys
  **repeated** to the query heads as in the LLaVA file (repeating multiplies every token's L1 by the group size,
  so the pivots are the same as with the Qwen file's un-repeated keys up to float rounding); the model keeps its
  attention kernel (never switched to eager). L1 norms and cosine similarities in float32.
- **UniPruneBench's variant** (``TianfanPeng/VLMUniPruneBench@f93768fcc159347d5a11a1f05c95efa5edb3eb8b``,
  ``methods/DART_IntraLLM.py:6-54``) compares ``layers[K].input_layernorm(h)`` instead of the final norm and uses
  ``P_img=10, P_txt=5, TOKEN_TOPK=int(N·keep/15)``: not what this module does (set ``pivot_image=10,
  pivot_text=5`` for its pivot counts).

How it sits on ``vlmkit.decoder.prune``: the drop's score layer is K itself (its input = layer K−1's output); the
stage's own pre-hook on layer K−1 keeps that layer's prefill input and RoPE cos/sin for the keys. ``scores`` runs
the whole selection per row and image and returns a 0/1 indicator of the kept image tokens, which ``select``
reads back (the greedy selection is not a ranking by one score).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from ..config import register_stage
from .prune import DecoderPruneConfig, DecoderPruneStage, image_layout


def _top_desc(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest of ``values`` [n] in decreasing order; equal values: lower index first."""
    return torch.sort(values.detach().float().cpu(), descending=True, stable=True).indices[:k].tolist()


def dart_select(keys_l1: torch.Tensor, text_keys_l1: torch.Tensor, states_img: torch.Tensor,
                states_txt: torch.Tensor, num_keep: int, P_img: int = 4, P_txt: int = 4, *,
                image_positions: torch.Tensor | list[int] | None = None,
                text_positions: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """Sorted indices into the N_img image tokens of the ``num_keep`` DART keeps.

    ``keys_l1`` [N_img] / ``text_keys_l1`` [N_txt]: L1 norms of layer K−1's keys of the image tokens and of the
    text after the image; ``states_img`` [N_img, D] / ``states_txt`` [N_txt, D]: the final-normed hidden states
    entering layer K. Image pivots: the ``min(P_img, num_keep)`` largest ``keys_l1``; text pivots: the
    ``min(P_txt, N_txt)`` largest ``text_keys_l1`` (ties: lower index). The pivots are visited in the order of
    ``list(set(image pivot positions + text pivot positions))`` (CPython's int-set order, as the reference);
    ``image_positions`` / ``text_positions`` are the tokens' positions in the sequence (default: image tokens at
    0…N_img−1, text at N_img…). Each pivot takes the ``(num_keep − p_img) // n_pivots`` still-unselected image
    tokens (image pivots excluded) of lowest cosine similarity to it (ties: lower index); the first
    ``(num_keep − p_img) % n_pivots`` pivots take one more. Result: image pivots ∪ taken, sorted.
    """
    N, T = int(keys_l1.numel()), int(text_keys_l1.numel())
    if not 0 <= num_keep <= N:
        raise ValueError(f"num_keep={num_keep} must be in 0..{N}")
    if P_img < 1 or P_txt < 0:
        raise ValueError(f"P_img must be >= 1 and P_txt >= 0, got {P_img}, {P_txt}")
    if states_img.shape[0] != N or states_txt.shape[0] != T:
        raise ValueError(f"states [{states_img.shape[0]}, …] / [{states_txt.shape[0]}, …] do not match the "
                         f"{N} image / {T} text key norms")
    if num_keep == 0:
        return torch.zeros(0, dtype=torch.long)
    img_pos = list(range(N)) if image_positions is None else [int(p) for p in image_positions]
    txt_pos = list(range(N, N + T)) if text_positions is None else [int(p) for p in text_positions]
    if len(img_pos) != N or len(txt_pos) != T or len(set(img_pos + txt_pos)) != N + T:
        raise ValueError("image_positions / text_positions must give N_img + N_txt distinct positions")
    p_img, p_txt = min(P_img, num_keep), min(P_txt, T)
    img_pivots = _top_desc(keys_l1, p_img)
    txt_pivots = _top_desc(text_keys_l1, p_txt)
    pivot_of = {img_pos[i]: states_img[i] for i in img_pivots}
    pivot_of.update({txt_pos[j]: states_txt[j] for j in txt_pivots})
    # CPython's set order over the pivots' sequence positions, inserted image pivots first (topk order): what the
    # reference's ``for item in list(tmp_set)`` iterates
    order = list(set([img_pos[i] for i in img_pivots] + [txt_pos[j] for j in txt_pivots]))
    base, extra = divmod(num_keep - p_img, len(order))
    takes = [base + (1 if n < extra else 0) for n in range(len(order))]
    states = states_img.detach().float()
    # ``cosine_similarity(pivot[None], states[cand])`` = ``sum((pivot / max(‖pivot‖, eps)) · (x / max(‖x‖, eps)))``
    # per row: the same elementwise ops and per-row reductions, done once for all N image tokens (not per pivot on
    # the shrinking candidate set), then read at the candidates: bit-identical values
    eps = 1e-8
    unit = states / torch.linalg.vector_norm(states, 2, dim=-1, keepdim=True).clamp_min(eps)
    visited = [(position, take) for position, take in zip(order, takes) if take > 0]
    sims = []
    for position, _ in visited:
        pivot = pivot_of[position].detach().float().to(states.device)
        pivot = pivot / torch.linalg.vector_norm(pivot, 2, dim=-1, keepdim=True).clamp_min(eps)
        sims.append((pivot[None] * unit).sum(-1))
    sims = torch.stack(sims).cpu() if sims else torch.zeros((0, N))  # [pivots visited, N]: one host transfer
    free = torch.ones(N, dtype=torch.bool)
    free[img_pivots] = False
    for n, (_, take) in enumerate(visited):
        candidates = free.nonzero().flatten()  # ascending: the stable sort gives ties to the lower index
        picked = candidates[torch.sort(sims[n, candidates], stable=True).indices[:take]]
        free[picked] = False
    return (~free).nonzero().flatten()


@dataclasses.dataclass
class DARTConfig(DecoderPruneConfig):
    """DART: before decoder layer ``layer`` (K ≥ 1) each image keeps ``keep_ratio`` (or ``num_keep``) of its
    visual tokens: ``pivot_image`` image pivots (largest L1 of layer K−1's keys) and, per pivot (those and
    ``pivot_text`` text pivots from the text after the image), the tokens least similar to it."""

    type = "dart"
    display_name = "DART"
    pruner = True
    keep_ratio: float | None = 0.222
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self) -> None:
        super().validate()
        for name, low in (("pivot_image", 1), ("pivot_text", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class _Layout:
    """What a decoder context needs to know of the assembled batch: per slot the image (−1: text) and whether it
    is an image-newline token, the grid tokens of each image, the layer K−1 input of the prefill."""

    def __init__(self, batch) -> None:
        self.image, self.newline = image_layout(batch)
        self.key_input: tuple | None = None  # (hidden, position_embeddings) entering layer K−1 in the prefill


@register_stage(DARTConfig)
class DART(DecoderPruneStage):
    _layout: _Layout | None = None

    def score_layer(self, drop_layer):
        return drop_layer  # the hidden states entering K (= layer K−1's output); the keys come from K−1's input

    @contextlib.contextmanager
    def decoder_context(self, family, batch) -> Iterator[None]:
        layout = _Layout(batch)

        def keep_input(module, args, kwargs):
            if layout.key_input is None:  # the prefill is the first language-model call of the context
                layout.key_input = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        with super().decoder_context(family, batch):
            layer = family.decoder_layers[self.config.layer - 1]
            handle = layer.register_forward_pre_hook(keep_input, with_kwargs=True)
            self._layout = layout
            try:
                yield
            finally:
                handle.remove()
                self._layout = None

    def scores(self, family, layer_index, hidden, kwargs, query, valid):
        """A [B, S] 0/1 indicator of the image tokens DART keeps (``select`` reads it back)."""
        layout = self._layout
        if layout is None or layout.key_input is None or hidden.shape[1] != layout.image.shape[1]:
            raise RuntimeError("dart: scored outside its decoder context or on a re-packed layout")
        key_hidden, position_embeddings = layout.key_input
        B, S = valid.shape
        _, k, _ = family.decoder_qk(layer_index - 1, key_hidden, position_embeddings,
                                    query_index=torch.zeros((B, 1), dtype=torch.long, device=key_hidden.device))
        l1 = k.float().abs().sum(dim=(1, 3)).cpu()  # [B, S]: L1 over all (repeated) heads of the post-RoPE keys
        # [B, S, D] stays on the model's device: dart_select computes the cosines there and reads back only
        # [pivots, N] of them (not B·S·D floats)
        states = family.decoder_final_norm(hidden).float()
        device = valid.device
        image, newline, valid = layout.image.cpu(), layout.newline.cpu(), valid.cpu()
        query = query.cpu()
        ar = torch.arange(S)
        keep = torch.zeros((B, S))
        for b in range(B):
            position = valid[b].long().cumsum(0) - 1  # index among the row's real tokens
            for key in image[b][valid[b]].unique().tolist():
                if key < 0:
                    continue
                cand = torch.nonzero(valid[b] & (image[b] == key) & ~newline[b]).flatten()
                num_keep = self.config.visual_to_keep(cand.numel())
                if num_keep >= cand.numel():
                    keep[b, cand] = 1.0
                    continue
                last = int(torch.nonzero(image[b] == key).max())
                text = torch.nonzero(valid[b] & (image[b] < 0) & (ar > last) & (ar <= query[b])).flatten()
                picked = dart_select(l1[b, cand], l1[b, text], states[b, cand.to(device)],
                                     states[b, text.to(device)], num_keep,
                                     self.config.pivot_image, self.config.pivot_text,
                                     image_positions=position[cand], text_positions=position[text])
                keep[b, cand[picked]] = 1.0
        return keep.to(device)

    def select(self, scores, num_keep):
        picked = torch.nonzero(scores > 0).flatten()
        if picked.numel() != num_keep:
            raise RuntimeError(f"dart: selected {picked.numel()} tokens of an image, the budget is {num_keep}")
        return picked


__all__ = ["DARTConfig", "DART", "dart_select"]
