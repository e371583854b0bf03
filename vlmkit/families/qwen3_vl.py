"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's layout, interleaved M-RoPE and DeepStack.

What the model does (transformers 5.25, ``models/qwen3_vl``):

- Images as Qwen2.5-VL (``qwen2_5_vl.py``), with patches of **16** px: ``Qwen2VLImageProcessor`` resizes each image
  to a multiple of ``patch · merge`` = 32 px, ``pixel_values`` are the flattened patches ``[Σ t·H·W, C·2·16·16]``
  and the processor repeats ``<|image_pad|>`` ``t·H·W / 4`` times between ``<|vision_start|>`` /
  ``<|vision_end|>`` (448×448 → 14×14 = 196 tokens), with ``mm_token_type_ids``.
- The tower (``model.model.visual``, ``Qwen3VLVisionModel``): Conv3d patch embedding plus a **learned position
  embedding** of a 48×48 grid (``num_position_embeddings`` 2304) bilinearly interpolated to each image's patch
  grid, 2-D RoPE, full attention within each image in every block (``cu_seqlens``, fused ``qkv``, no windows, no
  CLS), LayerNorm + GELU MLP; the ``merger`` (LayerNorm, then an MLP on 2×2 concatenated patches) gives the visual
  tokens, row-major per image.
- **DeepStack**: the outputs of the blocks ``deepstack_visual_indexes`` (e.g. 5, 11, 17) go through their own
  mergers (``deepstack_merger_list``) into n more [tokens, D] tensors, in the tokens' order.
  ``Qwen3VLTextModel.forward`` adds feature i to the hidden states of the visual positions (``visual_pos_masks``)
  **after decoder layer i**, i = 0 … n − 1.
- ``get_rope_index``: for images Qwen2.5-VL's rule exactly (text (p, p, p); the image starting at L gets
  (L + t, L + row, L + col) with t · 1 — no time scaling; text resumes at L + max(h, w)). Timestamps matter only for
  videos: the processor writes ``<t seconds>`` text before each frame's ``<|vision_start|>``, so
  ``get_rope_index`` splits ``video_grid_thw`` into one t = 1 grid per frame (each frame then is an image).
  The rotary embedding interleaves the axes (``mrope_section`` [24, 20, 20]): frequency index i takes the h row
  for i ≡ 1 (mod 3) below 3·20, the w row for i ≡ 2 (mod 3) below 3·20, the t row otherwise. vlmkit passes the
  (t, h, w) positions; the model's rotary embedding interleaves them.

How vlmkit handles it: as Qwen2.5-VL, whose code this family inherits (``VisualTokens`` per image with
``grid = (h, w)``; **pruning carries each kept token's (t, h, w) position** through ``mrope_positions``, so the
text after an image resumes exactly where ``get_rope_index`` puts it for the unpruned image; position schemes and
the vision-attention hooks of FoPru — every block attends globally, ``vision_window_index`` is None). What differs:

- **DeepStack follows every selection of tokens.** ``encode_images`` returns ``DeepstackTokens``: ``VisualTokens``
  that also carry each token's n DeepStack rows (``deepstack`` [n, K, D]); ``select`` (which every pruner goes
  through) keeps the same rows, so a kept token keeps its own features. The wrapper hands the decoder the
  assembled ``inputs_embeds`` (the model's own DeepStack path never runs) and ``language_context`` adds the
  features itself, by the model's rule: a forward pre-hook on decoder layer i + 1 adds feature i to the visual
  positions of its input (what the model's loop does after layer i, with the same ``hidden[mask] + rows``
  arithmetic, so without pruning the logits are bit-exact). Under decoder-side pruning (FastV … dropping before
  layer K ≤ i) the layer's input is re-packed: the hook finds which visual token each slot holds from the slots'
  original text positions (row 0 of the ``position_ids`` the layer received, which decoder-side pruning gathers
  with the kept slots, as layer i's forward hook records), so each kept token gets its own rows and dropped ones
  get none. Padding slots of a re-packed layout (never attended by real tokens, never scattered back) may get a
  feature added; decode steps add nothing (DeepStack rows exist for prompt tokens only). The hooks are pre-hooks on
  the *input* of the next layer rather than edits of layer i's output, so ``output_hidden_states`` stays the
  model's (layer outputs before DeepStack) and a decoder pruner's scores at layer K see the features added after
  layer K − 1, as in the model. DeepStack into the last layer's output (n = number of decoder layers) is refused.
- The tower's learned position embedding is interpolated per image inside the tower; nothing vlmkit does depends
  on it (the tower always runs on whole images).
- ``tokens_per_tile`` (upper bound for the ``num_keep`` check): the largest image the released checkpoints'
  ``preprocessor_config`` allows (``longest_edge`` 16 777 216 px = 4096², 32 px per token): 16 384 tokens.
- ``part_paths["projector"]`` is the main ``merger``; the DeepStack mergers belong to ``vision_tower``
  (``model.visual``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from ..tokens import VisualTokens
from .qwen2_5_vl import Qwen2_5_VLFamily

#: Tokens of the largest image the Qwen3-VL checkpoints' processor allows: 16 777 216 px / 32² px per token.
MAX_IMAGE_TOKENS = 16384


@dataclasses.dataclass
class DeepstackTokens(VisualTokens):
    """``VisualTokens`` of a Qwen3-VL image plus each token's DeepStack features.

    deepstack: [n, K, D] — row k of feature i is what the decoder adds to token k after decoder layer i. ``select``
    (and so ``keep_with_newlines`` and every pruner) keeps the same rows as the tokens.
    """

    deepstack: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.deepstack, torch.Tensor) or self.deepstack.dim() != 3 \
                or self.deepstack.shape[1] != self.embeds.shape[0]:
            raise ValueError(f"DeepstackTokens.deepstack must be [n, K={self.embeds.shape[0]}, D], got "
                             f"{getattr(self.deepstack, 'shape', type(self.deepstack).__name__)}")

    def select(self, keep: torch.Tensor) -> "DeepstackTokens":
        """``VisualTokens.select`` that keeps the same DeepStack rows."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(VisualTokens)}
        kept = VisualTokens.select(VisualTokens(**fields), keep)
        rows = keep.to(device=self.deepstack.device, dtype=torch.long)
        return DeepstackTokens(**{f.name: getattr(kept, f.name) for f in dataclasses.fields(VisualTokens)},
                               deepstack=self.deepstack[:, rows])


class Qwen3VLFamily(Qwen2_5_VLFamily):
    model_type = "qwen3_vl"
    model_class_names = ("Qwen3VLForConditionalGeneration",)
    lacks = {
        **Qwen2_5_VLFamily.lacks,
        "token_projector": "merges 2×2 patches inside its merger (and its DeepStack mergers), whose input is therefore "
                           "patches, not visual tokens",
    }

    max_image_tokens = MAX_IMAGE_TOKENS

    @property
    def deepstack_layers(self) -> int:
        """n: how many DeepStack features each visual token has (added after decoder layers 0 … n − 1)."""
        return len(self.config.vision_config.deepstack_visual_indexes)

    def encode_images(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                      **image_kwargs) -> list[DeepstackTokens]:
        """Qwen2.5-VL's ``VisualTokens`` per image, with the DeepStack features of the same tower run attached."""
        seen: list = []
        handle = self.vision_tower.register_forward_hook(lambda module, args, out: seen.append(out.deepstack_features))
        try:
            tokens = super().encode_images(pixel_values, input_ids, **image_kwargs)
        finally:
            handle.remove()
        if not self.deepstack_layers:  # a configuration without DeepStack: plain tokens
            return tokens
        if len(seen) != 1 or len(seen[0]) != self.deepstack_layers:
            raise RuntimeError(f"expected one tower run with {self.deepstack_layers} DeepStack features, got "
                               f"{[len(s) for s in seen]}")
        stacked = torch.stack(list(seen[0]))  # [n, Σ K, D], images one after the other
        sizes = [t.num_tokens for t in tokens]
        if stacked.shape[1] != sum(sizes):
            raise RuntimeError(f"DeepStack features cover {stacked.shape[1]} tokens, the images have {sizes}")
        fields = [f.name for f in dataclasses.fields(VisualTokens)]
        return [DeepstackTokens(**{n: getattr(t, n) for n in fields}, deepstack=rows)
                for t, rows in zip(tokens, stacked.split(sizes, dim=1))]

    @contextlib.contextmanager
    def language_context(self, batch) -> Iterator[None]:
        """Add the kept tokens' DeepStack features inside the decoder (module docstring) while the context is open."""
        if not batch.tokens or not bool(batch.visual_mask.any()) or not self.deepstack_layers:
            yield
            return
        layers = self.decoder_layers
        n = self.deepstack_layers
        if n >= len(layers):
            raise ValueError(f"this Qwen3-VL model adds DeepStack features after {n} decoder layers, but its decoder has "
                             f"{len(layers)}: vlmkit adds them at the next layer's input, so n must be < {len(layers)}")
        run = _DeepStack(batch, n)
        handles = []
        for i in range(n):
            handles.append(layers[i].register_forward_hook(run.record(i), with_kwargs=True))
            handles.append(layers[i + 1].register_forward_pre_hook(run.inject(i), with_kwargs=True, prepend=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class _DeepStack:
    """One language-model call sequence's DeepStack features and the layouts its layers ran on."""

    def __init__(self, batch, n: int) -> None:
        mask = batch.attention_mask.bool()
        self.B, self.L = mask.shape
        self.n = n
        self.visual = batch.visual_mask & mask  # [B, L]: the model's visual_pos_masks
        row = torch.full((self.B, self.L), -1, dtype=torch.long, device=mask.device)
        offset = 0
        for key, t in enumerate(batch.tokens):
            if not isinstance(t, DeepstackTokens) or t.deepstack.shape[0] != n:
                got = f"{t.deepstack.shape[0]} features" if isinstance(t, DeepstackTokens) else type(t).__name__
                raise ValueError(
                    f"image {key} reaches the decoder without its {n} DeepStack features (got {got}): a stage built "
                    "new VisualTokens instead of selecting the Qwen3-VL family's (DeepstackTokens.select)")
            where = self.visual & (batch.image_id == key)
            wanted = batch.visual_index[where].long()
            index = t.index.to(wanted.device)
            r = torch.searchsorted(index, wanted)
            if bool((r >= index.numel()).any()) or not torch.equal(index[r.clamp(max=index.numel() - 1)], wanted):
                raise ValueError(f"image {key}: the assembled batch holds tokens its VisualTokens do not have")
            row[where] = offset + r
            offset += t.num_tokens
        # [n, N_visual, D]: the rows of the visual slots in row-major order (the model's deepstack_visual_embeds)
        stacked = torch.cat([t.deepstack for t in batch.tokens], dim=1)
        self.feats = stacked[:, row[self.visual].to(stacked.device)]
        self.counts = self.visual.sum(dim=1).tolist()
        self.orig: torch.Tensor | None = None  # the positions layer 0 got in the prefill (the original layout)
        self.table: torch.Tensor | None = None  # [B', P]: original position -> feature row (-1: none)
        self.expand = 1  # rows of the call per batch row (generate's expansion for beams / samples)
        self.layout: dict[int, Any] = {}

    def record(self, i: int):
        """Forward hook of decoder layer i: the positions (row 0) its slots had, after every stage's pre-hooks."""
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            if i == 0 and self.orig is None:
                self._start(hidden, positions)
            self.layout[i] = (positions, tuple(hidden.shape[:2]))

        return hook

    def inject(self, i: int):
        """Forward pre-hook of decoder layer i + 1: add feature i to the visual slots of its input."""
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions, shape = self.layout[i]
            if tuple(hidden.shape[:2]) != shape:
                raise RuntimeError(f"DeepStack: decoder layer {i + 1} got {tuple(hidden.shape[:2])} hidden states, "
                                   f"layer {i} ran on {shape}")
            hidden = self._add(i, hidden, positions)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _start(self, hidden: torch.Tensor, positions) -> None:
        B, S = hidden.shape[:2]
        if S != self.L or B % self.B:
            raise RuntimeError(f"DeepStack: the first language-model call runs on {(B, S)}, the assembled batch is "
                               f"{(self.B, self.L)}")
        self.expand = B // self.B
        if self.expand > 1:  # generate repeats each row (repeat_interleave) for beams / samples
            self.visual = self.visual.repeat_interleave(self.expand, dim=0)
            parts = self.feats.split(self.counts, dim=1)
            self.feats = torch.cat([p for p in parts for _ in range(self.expand)], dim=1)
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != B):
            raise RuntimeError(f"DeepStack: decoder layers get position_ids of shape {tuple(positions.shape)}, "
                               f"expected [{B}, {S}]")
        self.orig = positions

    def _table(self) -> torch.Tensor:
        """[B', P]: the feature row of the visual token at each original text position (-1: none), built from the
        positions layer 0 got in the prefill (real tokens have distinct positions within a row)."""
        if self.table is None:
            pos = self.orig.to(self.visual.device)
            B, S = pos.shape
            rows = torch.full((B, S), -1, dtype=torch.long, device=pos.device)
            rows[self.visual] = torch.arange(int(self.visual.sum()), device=pos.device)
            table = torch.full((B, int(pos.max()) + 1), -1, dtype=torch.long, device=pos.device)
            b = torch.arange(B, device=pos.device)[:, None].expand(B, S)
            table[b[self.visual], pos[self.visual]] = rows[self.visual]
            if not torch.equal(table[b[self.visual], pos[self.visual]], rows[self.visual]):
                raise RuntimeError("DeepStack: two visual tokens of a row share a text position")
            self.table = table
        return self.table

    def _add(self, i: int, hidden: torch.Tensor, positions) -> torch.Tensor:
        """The model's ``_deepstack_process``: ``hidden[mask] += feats[i][rows]`` on the slots holding visual tokens
        (``mask`` turned into indices first, which keeps the row-major order of boolean indexing)."""
        B, S = hidden.shape[:2]
        if positions is self.orig or (positions is not None and self.orig is not None and positions.shape == self.orig.shape
                                      and positions.device.type != "meta" and torch.equal(positions, self.orig)):
            if S != self.L:
                raise RuntimeError(f"DeepStack: {S} hidden states in the original layout of {self.L}")
            b, s = torch.nonzero(self.visual, as_tuple=True)
            embeds = self.feats[i]
        else:
            if positions is None or self.orig is None:
                raise RuntimeError("DeepStack: a re-packed decoder layout without position_ids: cannot tell which "
                                   "visual token each slot holds")
            table = self._table()
            pos = positions.to(table.device).expand(B, S)
            inside = (pos >= 0) & (pos < table.shape[1])
            rows = torch.where(inside, table[torch.arange(B, device=pos.device)[:, None], pos.clamp(0, table.shape[1] - 1)],
                               torch.full_like(pos, -1))
            b, s = torch.nonzero(rows >= 0, as_tuple=True)
            if b.numel() == 0:
                return hidden
            embeds = self.feats[i][rows[b, s].to(self.feats.device)]
        if hidden.device.type != "meta":
            b, s = b.to(hidden.device), s.to(hidden.device)
        hidden = hidden.clone()
        hidden[b, s] = hidden[b, s] + embeds.to(hidden.device, hidden.dtype)
        return hidden
