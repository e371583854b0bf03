"""SEED: a discrete image tokenizer for LLM vocabularies (Ge et al., arXiv 2307.08041 / 2310.01218).

An image becomes ``num_queries`` (32) discrete codes in ``[0, codebook)`` (8192) that a language model
reads and writes as ordinary vocabulary tokens ``<img_00000>`` … ``<img_08191>`` between ``<img>`` and
``</img>`` (reference/seg_seed.md §5). Pieces, each named as in the reference code so a SEED-2
``seed_quantizer.pt`` maps onto them by a prefix rename only (:func:`load_seed_checkpoint`):

- **Vision features**: any *frozen* callable ``pixel_values [B, 3, H, W] -> [B, N, C]`` (a tensor, or an
  output object with ``last_hidden_state``); it runs under ``torch.no_grad`` and is never saved with the
  tokenizer (pass it again when loading). The reference uses EVA-CLIP ViT-g/14 (C=1408). Inside a
  wrapped model (:class:`SEEDConfig` as a ``vlmkit.wrap`` stage) the features are the wrapped model's own
  frozen image features through the family (``Family.image_features``: vision tower + projector, the
  tokens the LM sees, C = LM width); each row of ``pixel_values`` is one image (tiled families: give one
  tile, e.g. the thumbnail, per image). ``ln_vision`` (LayerNorm over C) follows, as in the reference.
- **Causal Q-Former** (``qformer``): BLIP-2's BERT Q-Former without the text path: ``num_queries``
  learned queries, post-LN BERT layers (eps 1e-12, exact GELU), self-attention among the queries with a
  **causal** (lower-triangular) mask, full cross-attention to the image features every
  ``cross_attention_freq`` layers (layer i has it when ``i % freq == 0``), the query FFN
  (``intermediate_query``/``output_query``).
- **Quantiser**: ``encode_task_layer`` Linear(W,W)→Tanh→Linear(W,code_dim); ``quantize`` =
  ``VectorQuantizer2`` (squared-L2 nearest code, no L2 normalisation, straight-through estimator,
  codebook init uniform(±1/codebook), legacy β placement); ``decode_task_layer``
  Linear(code_dim,code_dim)→Tanh→Linear(code_dim,W).
- **Reverse head** (``decode``): codes → ``decode_task_layer`` → + ``pos_embed_image`` → ``blocks_image``
  (``decoder_depth`` pre-LN ViT blocks, eps 1e-6, qkv bias, mlp 4) → ``image_head="mlp"`` (the released
  inference class: ``image_down`` W→256→128→32 ReLU, no bias, flatten Q·32 → ``distill_image_proj``) or
  ``"qformer"`` (the training code: a 1-query Reverse Q-Former → ``distill_image_proj``) → one
  ``image_embed_dim`` image embedding (SEED-2: the 1024-d unCLIP CLIP-ViT-H image embedding).
  ``blocks`` + ``pos_embed`` reconstruct the 32 causal Q-Former embeddings (the L_recon branch).

Training (:func:`train_seed_tokenizer`, §5.3), two phases as the reference:

1. ``"qformer"``: image–text contrastive on the **last** causal query only: ``vision_proj`` (→256) and
   ``text_proj`` features L2-normalised, learnable temperature (init 0.07, clamped to [0.001, 0.5] as
   BLIP-2), symmetric cross-entropy with label smoothing 0.1 over the batch. Trains ``ln_vision``,
   ``query_tokens``, ``qformer`` and the two projections (the reference leaves ``ln_vision``
   trainable in this stage).
2. ``"codebook"``: Q-Former frozen; ``loss = 5·L_vq + 2·L_recon + 0.5·L_img`` with
   ``L_vq = mean((sg[zq]−z)²) + β·mean((zq−sg[z])²)`` (legacy: β on the codebook term),
   ``L_recon = 1 − cos(blocks(decoded + pos_embed), causal_emb)`` averaged over tokens, and
   ``L_img = MSE(decode(codes), target)``.

Design choices not fixed by the reference (written down here):

- **Text side of the contrastive loss.** The reference uses the Q-Former's own BERT text path (its
  ``[CLS]``). vlmkit uses a small *frozen* caption embedding: :class:`HashedTextEmbedder`, the mean of
  fixed random word vectors (each word's vector seeded by a CRC32 of the word, so no vocabulary, no
  download, identical across runs), followed by the trainable ``text_proj``. Any frozen callable
  ``list[str] -> [B, text_dim]`` can replace it (``SeedTokenizer(text_encoder=...)`` or
  ``set_text_encoder``), e.g. :class:`LMTextEmbedder`, the wrapped LM's own frozen input embeddings of
  the caption, mean-pooled (``stage.text_encoder(hf_tokenizer)``).
- **Image-embedding target (L_img).** The reference regresses the frozen CLIP-ViT-H-14 image embedding.
  vlmkit takes any frozen callable ``pixel_values -> [B, image_embed_dim]`` (``target=`` /
  ``set_target``); the default is
  the **mean over tokens of the frozen vision features** (then ``image_embed_dim`` = C), which needs
  nothing extra. Set ``image_embed_dim=1024`` and pass a CLIP-ViT-H embedder to match SEED-2.
- **Small training loop.** AdamW (wd 0.05), cosine decay to 0.1·lr (the reference's 1e-4 → 1e-5 ratio)
  with optional linear warm-up; no all-gather (one process). Losses are reported unweighted and
  weighted (``loss``).
- **Tokens in the LM.** Codes are added first, in order (``<img_00000>`` …), then BOI, EOI, so
  ``id = first_image_id + code`` and the markers follow the codes (the reference's order, §5.4). The
  markers are the reference ``<img>``/``</img>`` unless they already exist (InternVL uses them for its
  own images): then ``<seed_img>``/``</seed_img>`` (``markers="auto"``). :func:`add_seed_tokens` checks
  the tokenizer's vocabulary; the ``SEED`` stage decides from the wrapped family (``wrap`` hands stages no
  tokenizer before ``new_tokens``, and a vocabulary check would flip on a reload with a tokenizer that
  already holds SEED's ``<img>``); any other collision makes ``wrap`` raise (then set
  ``markers="namespaced"``). The reference strings stay in the config (``boi``/``eoi``) and
  :meth:`SEED.to_reference_text` / :meth:`SEED.from_reference_text` translate between the spellings.
- **Fine-tuning the LM** (peft 0.21, tested on the tiny models): LoRA plus
  ``LoraConfig(trainable_token_indices={"embed_tokens": ids, "lm_head": ids})`` with
  ``ids = list(wrapper.added_tokens.values())`` trains only the new rows (list ``lm_head`` too when it is
  not tied, or the model cannot learn to *write* image tokens); ``modules_to_save=["embed_tokens",
  "lm_head"]`` (the reference's choice) trains the full matrices. Both work through ``VLMWrapper``.
- **Generation.** :class:`SeedImageLogitsProcessor` constrains decoding: ``num_queries`` steps after the
  last BOI allow only image tokens, the next step allows only EOI. ``generate_image_tokens`` appends BOI
  to the prompt and decodes exactly ``num_queries`` tokens with it.
- **Role.** SEED is a ``"head"`` stage: it changes nothing in the image-placeholder pipeline; an image
  enters the LM as its discrete tokens in ``input_ids`` (``SEED.image_token_ids``), which the wrapped
  model embeds with its own (resized) embedding table. The stage's features skip the other stages
  (compressors, vision contexts): SEED tokenizes the uncompressed image.
- **Not implemented**: the SEED-1 de-tokenizer (Reverse Q-Former → 77×768 SD text embeddings) and pixel
  decoding through diffusers' unCLIP pipeline (``decode`` stops at the image embedding).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import StageConfig
from vlmkit.stage import Stage

__all__ = [
    "SEEDConfig", "SEED", "SeedTokenizer", "CausalQFormer", "VectorQuantizer", "ViTBlock",
    "HashedTextEmbedder", "LMTextEmbedder", "SeedImageLogitsProcessor", "SeedTokenIds", "CheckpointReport",
    "train_seed_tokenizer", "load_seed_checkpoint", "map_foreign_key", "add_seed_tokens", "resolve_markers",
    "image_token_strings",
    "shapes_caption", "shapes_pixel_values", "MARKER_MODES", "IMAGE_HEADS", "PHASES",
    "CONFIG_FILE", "WEIGHTS_FILE", "FOREIGN_KEY_PREFIXES", "FOREIGN_IGNORED_PREFIXES", "TRAINING_ONLY_PREFIXES",
]

MARKER_MODES = ("auto", "reference", "namespaced")
IMAGE_HEADS = ("mlp", "qformer")
PHASES = ("qformer", "codebook", "both")
CONFIG_FILE = "seed_config.json"
WEIGHTS_FILE = "seed_tokenizer.safetensors"
#: Reference checkpoint prefix → vlmkit module prefix (everything else keeps its name).
FOREIGN_KEY_PREFIXES = {"Qformer.bert.": "qformer.", "Reverse_Qformer.bert.": "reverse_qformer."}
#: Reference keys that are not SEED's own weights: the frozen ViT (you supply it as the feature module)
#: and BERT's position-id buffer.
FOREIGN_IGNORED_PREFIXES = ("visual_encoder.", "Qformer.bert.embeddings.position_ids",
                            "Reverse_Qformer.bert.embeddings.position_ids")
#: vlmkit weights used only by the contrastive phase; a released checkpoint need not have them.
TRAINING_ONLY_PREFIXES = ("vision_proj.", "text_proj.", "temp")
_BERT_EPS = 1e-12
_VIT_EPS = 1e-6
_IMAGE_DOWN = (256, 128, 32)  # the released reverse head's per-token MLP widths


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {value!r}")


@dataclasses.dataclass
class SEEDConfig(StageConfig):
    """SEED tokenizer sizes, loss weights and vocabulary strings (defaults: the reference, SEED-2).

    ``num_queries`` codes per image from a ``codebook``-entry codebook of ``code_dim``-d vectors.
    Q-Former: ``width``/``layers``/``heads``/``intermediate``, cross-attention every
    ``cross_attention_freq`` layers. ``vision_dim``: width C of the vision features (None: the wrapped
    model's LM width in a wrapper; required standalone). ``text_dim``: width of the frozen caption
    embedding (None: the LM width in a wrapper, ``width`` standalone). ``image_embed_dim``: width of the
    decoded image embedding (None: C, the default mean-pooled-feature target). Token strings:
    ``image_token_format`` (``str.format`` of the code), reference markers ``boi``/``eoi`` and their
    namespaced forms; ``markers`` picks them (``"auto"``: namespaced when the reference strings already
    exist: in the tokenizer for :func:`add_seed_tokens`, for the wrapped family in a wrapper).
    ``first_image_id``: when set, wrapping checks the added codes start there (interop with a fixed
    vocabulary).
    """

    type = "seed"
    role = "head"
    stage_class = "vlmkit.vision.seed:SEED"
    num_queries: int = 32
    codebook: int = 8192
    code_dim: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    cross_attention_freq: int = 2
    decoder_depth: int = 4
    decoder_heads: int = 12
    image_head: str = "mlp"
    vision_dim: int | None = None
    text_dim: int | None = None
    image_embed_dim: int | None = None
    contrastive_dim: int = 256
    beta: float = 0.25
    vq_weight: float = 5.0
    recon_weight: float = 2.0
    image_weight: float = 0.5
    temperature: float = 0.07
    label_smoothing: float = 0.1
    image_token_format: str = "<img_{:05d}>"
    boi: str = "<img>"
    eoi: str = "</img>"
    namespaced_boi: str = "<seed_img>"
    namespaced_eoi: str = "</seed_img>"
    markers: str = "auto"
    first_image_id: int | None = None

    def validate(self) -> None:
        own = "SEEDConfig"
        for name in ("num_queries", "code_dim", "width", "layers", "heads", "intermediate",
                     "cross_attention_freq", "decoder_depth", "decoder_heads", "contrastive_dim"):
            _check_int(own, name, getattr(self, name), 1)
        _check_int(own, "codebook", self.codebook, 2)
        for name in ("vision_dim", "text_dim", "image_embed_dim"):
            if getattr(self, name) is not None:
                _check_int(own, name, getattr(self, name), 1)
        if self.first_image_id is not None:
            _check_int(own, "first_image_id", self.first_image_id, 0)
        for name, heads in (("heads", self.heads), ("decoder_heads", self.decoder_heads)):
            if self.width % heads:
                raise ValueError(f"{own}.width={self.width} must be divisible by {name}={heads}")
        if self.image_head not in IMAGE_HEADS:
            raise ValueError(f"{own}.image_head must be one of {IMAGE_HEADS}, got {self.image_head!r}")
        if self.markers not in MARKER_MODES:
            raise ValueError(f"{own}.markers must be one of {MARKER_MODES}, got {self.markers!r}")
        for name in ("beta", "vq_weight", "recon_weight", "image_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{own}.{name} must be a number >= 0, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature <= 1:
            raise ValueError(f"{own}.temperature must be in (0, 1], got {self.temperature!r}")
        if isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, (int, float)) \
                or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{own}.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        try:
            first, second = self.image_token_format.format(0), self.image_token_format.format(1)
        except (IndexError, KeyError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{own}.image_token_format must be a str.format pattern of one int, e.g. '<img_{{:05d}}>', "
                f"got {self.image_token_format!r}"
            ) from err
        if first == second:
            raise ValueError(
                f"{own}.image_token_format={self.image_token_format!r} gives the same string for every code")
        strings = {"boi": self.boi, "eoi": self.eoi, "namespaced_boi": self.namespaced_boi,
                   "namespaced_eoi": self.namespaced_eoi}
        for name, value in strings.items():
            if not isinstance(value, str) or not value or value != value.strip():
                raise ValueError(f"{own}.{name} must be a non-empty string without surrounding spaces, got {value!r}")
        if self.boi == self.eoi or self.namespaced_boi == self.namespaced_eoi:
            raise ValueError(f"{own}: BOI and EOI must differ, got {strings}")
        if {self.namespaced_boi, self.namespaced_eoi} & {self.boi, self.eoi}:
            raise ValueError(f"{own}: the namespaced markers must differ from the reference ones, got {strings}")
        codes = {first, second, self.image_token_format.format(self.codebook - 1)}
        clash = sorted(codes & set(strings.values()))
        if clash:
            raise ValueError(f"{own}: image token strings collide with the markers: {clash}")


def image_token_strings(config: SEEDConfig) -> list[str]:
    """The ``codebook`` image token strings in code order: ``['<img_00000>', '<img_00001>', …]``."""
    return [config.image_token_format.format(i) for i in range(config.codebook)]


def resolve_markers(config: SEEDConfig, tokenizer=None, family_markers: Iterable[str] = ()) -> tuple[str, str]:
    """(BOI, EOI) strings to add: the reference ones, or the namespaced ones when those collide.

    ``markers="auto"`` picks the namespaced strings when ``tokenizer``'s vocabulary (or
    ``family_markers``, markers the wrapped model family is known to use) already holds ``boi``/``eoi``.
    """
    if config.markers == "reference":
        return config.boi, config.eoi
    if config.markers == "namespaced":
        return config.namespaced_boi, config.namespaced_eoi
    taken = set(family_markers)
    if tokenizer is not None:
        taken |= set(tokenizer.get_vocab())
    if config.boi in taken or config.eoi in taken:
        return config.namespaced_boi, config.namespaced_eoi
    return config.boi, config.eoi


# ---------------------------------------------------------------------------------------------
# Modules (named as the reference, see the module docstring)
# ---------------------------------------------------------------------------------------------


class _BertSelfAttention(nn.Module):
    """BERT attention projections; ``key``/``value`` read ``context_dim``-wide inputs (cross-attention)."""

    def __init__(self, width: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_dim, width)
        self.value = nn.Linear(context_dim, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, W = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, t.shape[1], self.heads, W // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                             split(self.value(context)), attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, W)


class _BertSelfOutput(nn.Module):
    """Post-LN residual: ``LayerNorm(dense(h) + input)``."""

    def __init__(self, width: int, inner: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(inner or width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=_BERT_EPS)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.self = _BertSelfAttention(width, heads, context_dim)
        self.output = _BertSelfOutput(width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.output(self.self(x, x if context is None else context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """One BERT Q-Former layer for queries only: self-attention, optional cross-attention, query FFN."""

    def __init__(self, width: int, heads: int, inner: int, context_dim: int, cross: bool) -> None:
        super().__init__()
        self.attention = _BertAttention(width, heads, width)
        self.crossattention = _BertAttention(width, heads, context_dim) if cross else None
        self.intermediate_query = _BertIntermediate(width, inner)
        self.output_query = _BertSelfOutput(width, inner)

    def forward(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask=mask)
        if self.crossattention is not None:
            x = self.crossattention(x, context=image)
        return self.output_query(self.intermediate_query(x), x)


class _Embeddings(nn.Module):
    """BERT embeddings reduced to what queries use: a LayerNorm (word/position tables are removed)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=_BERT_EPS)


class _Encoder(nn.Module):
    def __init__(self, layers: list[QFormerLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class CausalQFormer(nn.Module):
    """BLIP-2 Q-Former over image features, self-attention causal among the queries.

    ``forward(queries [B, Q, W], image [B, N, C]) -> [B, Q, W]``: query t sees queries ≤ t and every
    image token. ``causal=False`` gives BLIP-2's bidirectional Q-Former (used for the 1-query reverse head).
    """

    def __init__(self, width: int, layers: int, heads: int, inner: int, context_dim: int,
                 cross_attention_freq: int = 2, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.embeddings = _Embeddings(width)
        self.encoder = _Encoder([
            QFormerLayer(width, heads, inner, context_dim, cross=i % cross_attention_freq == 0)
            for i in range(layers)
        ])

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if queries.dim() != 3 or image.dim() != 3 or queries.shape[0] != image.shape[0]:
            raise ValueError(f"CausalQFormer needs queries [B, Q, W] and image [B, N, C] with the same B, got "
                             f"{tuple(queries.shape)} and {tuple(image.shape)}")
        Q = queries.shape[1]
        mask = None
        if self.causal and Q > 1:
            mask = torch.ones(Q, Q, dtype=torch.bool, device=queries.device).tril()  # True = may attend
        x = self.embeddings.LayerNorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, image, mask)
        return x


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W))


class ViTBlock(nn.Module):
    """Pre-LN ViT block (timm/LAVIS ``Block``: qkv bias, mlp ratio 4, LayerNorm eps 1e-6): [B, L, W] → same."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=_VIT_EPS)
        self.attn = _VitAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=_VIT_EPS)
        self.mlp = _Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VectorQuantizer(nn.Module):
    """``VectorQuantizer2`` (taming, legacy): nearest code by squared L2, straight-through gradient.

    ``forward(z [..., code_dim]) -> (z_q [..., code_dim], loss, codes [...])`` with
    ``loss = mean((sg[z_q] − z)²) + β·mean((z_q − sg[z])²)`` (legacy: β on the codebook term) and
    ``z_q`` carrying ``z``'s gradient.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for every vector of ``z [..., e_dim]`` (first on ties)."""
        flat = z.reshape(-1, self.e_dim)
        weight = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
        return d.argmin(dim=1).reshape(z.shape[:-1])

    def forward(self, z: torch.Tensor):
        codes = self.codes(z)
        z_q = self.embedding(codes)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        return z + (z_q - z).detach(), loss, codes


class HashedTextEmbedder:
    """Frozen caption embedding: mean of fixed random word vectors (``list[str] -> [B, dim]``).

    Word vectors are N(0, 1/dim), seeded by ``crc32(word) ^ seed``: no vocabulary, no parameters,
    the same on every machine. Words are lowercase runs of letters/digits; a caption without any gives 0.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        _check_int("HashedTextEmbedder", "dim", dim, 1)
        self.dim, self.seed = dim, seed

    def word_vector(self, word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed((zlib.crc32(word.encode("utf-8")) ^ self.seed) & 0xFFFFFFFF)
        return torch.randn(self.dim, generator=gen) / math.sqrt(self.dim)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.dim)
        for i, caption in enumerate(captions):
            words = re.findall(r"[a-z0-9]+", str(caption).lower())
            if words:
                out[i] = torch.stack([self.word_vector(w) for w in words]).mean(0)
        return out


class LMTextEmbedder:
    """Frozen caption embedding from a language model: mean of its input embeddings of the caption tokens.

    ``LMTextEmbedder(tokenizer, model.get_input_embeddings())``: ``list[str] -> [B, D]``, no gradient.
    """

    def __init__(self, tokenizer, embedding: nn.Module) -> None:
        self.tokenizer, self.embedding = tokenizer, embedding

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(captions), return_tensors="pt", padding=True, add_special_tokens=False)
        weight = self.embedding.weight
        ids = enc["input_ids"].to(weight.device)
        mask = enc["attention_mask"].to(weight.device, weight.dtype).unsqueeze(-1)
        emb = self.embedding(ids) * mask
        return emb.sum(1) / mask.sum(1).clamp(min=1)


def _set_plain(module: nn.Module, name: str, value: Any) -> None:
    """Set ``module.name = value`` without registering ``value`` as a submodule (frozen external modules)."""
    object.__setattr__(module, name, value)


def _features_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"the vision module must return a [B, N, C] tensor or an output with last_hidden_state, "
                    f"got {type(out).__name__}")


class SeedTokenizer(nn.Module):
    """The SEED tokenizer: frozen features → causal Q-Former → VQ codes; codes → image embedding.

    ``SeedTokenizer(config, vision=module)`` (``vision``: frozen ``pixel_values -> [B, N, C]``, not
    saved). ``encode(pixel_values) -> LongTensor [B, num_queries]`` in ``[0, codebook)``;
    ``decode(codes) -> [B, image_embed_dim]``. ``target`` (frozen ``pixel_values -> [B, E]``) and
    ``text_encoder`` (frozen ``list[str] -> [B, text_dim]``) feed the training losses; see the module
    docstring for their defaults.
    """

    def __init__(self, config: SEEDConfig, vision: Callable | None = None, *, vision_dim: int | None = None,
                 text_dim: int | None = None, target: Callable | None = None,
                 text_encoder: Callable | None = None) -> None:
        super().__init__()
        if not isinstance(config, SEEDConfig):
            raise TypeError(f"SeedTokenizer takes a SEEDConfig, got {type(config).__name__}")
        C = config.vision_dim or vision_dim
        if C is None:
            raise ValueError(
                "SeedTokenizer needs the vision feature width: set SEEDConfig.vision_dim or pass vision_dim=")
        if config.vision_dim is not None and vision_dim is not None and vision_dim != config.vision_dim:
            raise ValueError(f"vision_dim={vision_dim} disagrees with SEEDConfig.vision_dim={config.vision_dim}")
        T = config.text_dim or text_dim or config.width
        E = config.image_embed_dim or C
        # the resolved config (what save_pretrained writes)
        self.config = dataclasses.replace(config, vision_dim=C, text_dim=T, image_embed_dim=E)
        cfg = self.config
        W, Q = cfg.width, cfg.num_queries
        # plain attributes (not submodules): frozen external callables, never in state_dict or .to()
        _set_plain(self, "_vision", vision)
        _set_plain(self, "_target", target)
        _set_plain(self, "_text_encoder", text_encoder)

        self.ln_vision = nn.LayerNorm(C)
        self.query_tokens = nn.Parameter(torch.randn(1, Q, W) * 0.02)
        self.qformer = CausalQFormer(W, cfg.layers, cfg.heads, cfg.intermediate, C, cfg.cross_attention_freq)
        self.vision_proj = nn.Linear(W, cfg.contrastive_dim)
        self.text_proj = nn.Linear(T, cfg.contrastive_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))

        self.encode_task_layer = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, cfg.code_dim))
        self.quantize = VectorQuantizer(cfg.codebook, cfg.code_dim, cfg.beta)
        self.decode_task_layer = nn.Sequential(nn.Linear(cfg.code_dim, cfg.code_dim), nn.Tanh(),
                                               nn.Linear(cfg.code_dim, W))
        self.pos_embed = nn.Parameter(torch.zeros(1, Q, W))
        self.blocks = nn.ModuleList([ViTBlock(W, cfg.decoder_heads) for _ in range(cfg.decoder_depth)])
        self.pos_embed_image = nn.Parameter(torch.zeros(1, Q, W))
        self.blocks_image = nn.ModuleList([ViTBlock(W, cfg.decoder_heads) for _ in range(cfg.decoder_depth)])
        if cfg.image_head == "mlp":
            a, b, c = _IMAGE_DOWN
            self.image_down = nn.Sequential(nn.Linear(W, a, bias=False), nn.ReLU(), nn.Linear(a, b, bias=False),
                                            nn.ReLU(), nn.Linear(b, c, bias=False))
            self.distill_image_proj = nn.Linear(Q * c, E)
        else:
            self.reverse_qformer = CausalQFormer(W, cfg.layers, cfg.heads, cfg.intermediate, W,
                                                 cfg.cross_attention_freq, causal=False)
            self.reverse_tokens = nn.Parameter(torch.randn(1, 1, W) * 0.02)
            self.distill_image_proj = nn.Linear(W, E)

    # --- external frozen pieces -------------------------------------------------------------------
    @property
    def vision(self) -> Callable | None:
        return self._vision

    def set_vision(self, vision: Callable | None) -> None:
        """Attach (or replace) the frozen feature module ``pixel_values -> [B, N, C]``."""
        _set_plain(self, "_vision", vision)

    def set_target(self, target: Callable | None) -> None:
        """Set the frozen L_img target ``pixel_values -> [B, image_embed_dim]`` (None: mean-pooled features)."""
        _set_plain(self, "_target", target)

    def set_text_encoder(self, text_encoder: Callable | None) -> None:
        """Set the frozen caption embedder ``list[str] -> [B, text_dim]`` (None: :class:`HashedTextEmbedder`)."""
        _set_plain(self, "_text_encoder", text_encoder)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features [B, N, C] of ``pixel_values`` [B, 3, H, W] (no gradient)."""
        if self._vision is None:
            raise ValueError("this SeedTokenizer has no vision module: pass vision= (a frozen pixel_values -> "
                             "[B, N, C] module) or use encode_features() on features you computed")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a [B, C, H, W] tensor, got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        feats = _features_tensor(self._vision(pixel_values))
        C = self.config.vision_dim
        if feats.dim() != 3 or feats.shape[0] != pixel_values.shape[0] or feats.shape[-1] != C:
            raise ValueError(f"the vision module must give [B={pixel_values.shape[0]}, N, C={C}] features, "
                             f"got {tuple(feats.shape)}")
        return feats.to(self.device, self.dtype)

    @torch.no_grad()
    def image_target(self, pixel_values: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """L_img target [B, image_embed_dim]: ``target(pixel_values)``, default the mean-pooled features."""
        if self._target is not None:
            out = _features_tensor(self._target(pixel_values))
        else:
            feats = self.features(pixel_values) if features is None else features
            out = feats.mean(dim=1)
        E = self.config.image_embed_dim
        if out.dim() != 2 or out.shape[-1] != E:
            raise ValueError(f"the image-embedding target must be [B, {E}] (image_embed_dim), got {tuple(out.shape)}")
        return out.to(self.device, self.dtype)

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Frozen caption embeddings [B, text_dim] (default :class:`HashedTextEmbedder`)."""
        encoder = self._text_encoder or HashedTextEmbedder(self.config.text_dim)
        out = encoder(list(captions))
        T = self.config.text_dim
        if out.dim() != 2 or out.shape != (len(captions), T):
            raise ValueError(f"the text encoder must give [B={len(captions)}, text_dim={T}], got {tuple(out.shape)}")
        return out.to(self.device, self.dtype)

    # --- tokenizer --------------------------------------------------------------------------------
    def causal_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Causal Q-Former output [B, Q, W] for vision features [B, N, C]."""
        image = self.ln_vision(features.to(self.device, self.dtype))
        return self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), image)

    def quantize_embeddings(self, causal: torch.Tensor):
        """``(z [B, Q, code_dim], z_q (straight-through), L_vq, codes [B, Q])`` of causal embeddings."""
        z = self.encode_task_layer(causal)
        z_q, loss, codes = self.quantize(z)
        return z, z_q, loss, codes

    @torch.no_grad()
    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q] (int64, in ``[0, codebook)``) of vision features [B, N, C]."""
        return self.quantize.codes(self.encode_task_layer(self.causal_embeddings(features)))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_queries] (int64, in ``[0, codebook)``) of ``pixel_values`` [B, 3, H, W]."""
        return self.encode_features(self.features(pixel_values))

    def check_codes(self, codes: Any) -> torch.Tensor:
        """``codes`` as a LongTensor [B, Q] on this device; ValueError for a bad shape or out-of-range code."""
        codes = torch.as_tensor(codes)
        Q, K = self.config.num_queries, self.config.codebook
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != Q:
            raise ValueError(f"codes must be [B, {Q}] (num_queries), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            bad = codes[(codes < 0) | (codes >= K)][0].item()
            raise ValueError(f"code {bad} is out of range: codes must be in [0, {K}) (codebook)")
        return codes.to(self.device, torch.long)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoded codes in the Q-Former space: ``decode_task_layer(codebook[codes])`` [B, Q, W]."""
        return self.decode_task_layer(self.quantize.embedding(self.check_codes(codes)))

    def _image_head(self, up: torch.Tensor) -> torch.Tensor:
        x = up + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)
        if self.config.image_head == "mlp":
            return self.distill_image_proj(self.image_down(x).flatten(1))
        tokens = self.reverse_tokens.expand(x.shape[0], -1, -1)
        return self.distill_image_proj(self.reverse_qformer(tokens, x)).squeeze(1)

    def _recon_head(self, up: torch.Tensor) -> torch.Tensor:
        x = up + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def decode(self, codes: Any) -> torch.Tensor:
        """Image embeddings [B, image_embed_dim] of codes [B, Q] (the reverse head; differentiable)."""
        return self._image_head(self.code_vectors(codes))

    def reconstruct(self, codes: Any) -> torch.Tensor:
        """Reconstructed causal Q-Former embeddings [B, Q, W] of codes [B, Q] (the L_recon branch)."""
        return self._recon_head(self.code_vectors(codes))

    # --- losses -----------------------------------------------------------------------------------
    def contrastive_loss(self, causal: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Symmetric image–text CE (label smoothing) between the last causal query and the captions."""
        if causal.shape[0] < 2:
            raise ValueError(f"the contrastive loss needs a batch of >= 2 image-caption pairs, got {causal.shape[0]}")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image = F.normalize(self.vision_proj(causal[:, -1]), dim=-1)
        txt = F.normalize(self.text_proj(text), dim=-1)
        sim = image @ txt.t() / self.temp
        targets = torch.arange(sim.shape[0], device=sim.device)
        ls = self.config.label_smoothing
        i2t = F.cross_entropy(sim, targets, label_smoothing=ls)
        t2i = F.cross_entropy(sim.t(), targets, label_smoothing=ls)
        return (i2t + t2i) / 2

    def codebook_losses(self, features: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Phase-2 losses: ``vq``, ``recon`` (1 − cos), ``image`` (MSE) and the weighted ``loss``.

        The Q-Former output is the (detached) reconstruction target, as the reference freezes it.
        """
        with torch.no_grad():
            causal = self.causal_embeddings(features)
        _, z_q, vq, _ = self.quantize_embeddings(causal)
        up = self.decode_task_layer(z_q)
        recon = self._recon_head(up)
        recon_loss = (1 - F.cosine_similarity(recon, causal, dim=-1)).mean()
        image_loss = F.mse_loss(self._image_head(up), target)
        cfg = self.config
        total = cfg.vq_weight * vq + cfg.recon_weight * recon_loss + cfg.image_weight * image_loss
        return {"loss": total, "vq": vq, "recon": recon_loss, "image": image_loss}

    def losses(self, pixel_values: torch.Tensor, captions: Sequence[str] | None = None,
               phase: str = "both") -> dict[str, torch.Tensor]:
        """The training losses of ``phase`` on one batch (``captions`` needed for ``"qformer"``/``"both"``).

        Keys: ``contrastive``; ``vq``, ``recon``, ``image``; ``loss`` (the phase's weighted total).
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        feats = self.features(pixel_values)
        out: dict[str, torch.Tensor] = {}
        total = 0
        if phase in ("qformer", "both"):
            if captions is None or len(captions) != feats.shape[0]:
                raise ValueError(f"phase {phase!r} needs one caption per image ({feats.shape[0]}), got "
                                 f"{None if captions is None else len(captions)}")
            out["contrastive"] = self.contrastive_loss(self.causal_embeddings(feats), self.text_features(captions))
            total = total + out["contrastive"]
        if phase in ("codebook", "both"):
            cb = self.codebook_losses(feats, self.image_target(pixel_values, feats))
            total = total + cb.pop("loss")
            out.update(cb)
        out["loss"] = total
        return out

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """Parameters a training phase updates: ``"qformer"`` (contrastive) or ``"codebook"``."""
        first = ("ln_vision", "query_tokens", "qformer", "vision_proj", "text_proj", "temp")
        if phase == "qformer":
            return [p for n, p in self.named_parameters() if n.split(".")[0] in first]
        if phase == "codebook":
            return [p for n, p in self.named_parameters() if n.split(".")[0] not in first]
        raise ValueError(f"phase must be 'qformer' or 'codebook', got {phase!r}")

    # --- save / load ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``seed_config.json`` (resolved config) and ``seed_tokenizer.safetensors`` to ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({"format": "vlmkit-seed", "version": 1, "config": self.config.to_dict()}, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vision: Callable | None = None, *,
                        target: Callable | None = None, text_encoder: Callable | None = None,
                        map_location: str | torch.device = "cpu") -> "SeedTokenizer":
        """Load what ``save_pretrained`` wrote; ``vision`` (and the training hooks) are given again."""
        from safetensors.torch import load_file

        file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {os.fspath(path)!r}: not a saved SeedTokenizer")
        with open(file) as f:
            meta = json.load(f)
        if meta.get("format") != "vlmkit-seed" or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{file} is not a SeedTokenizer config (expected 'format': 'vlmkit-seed')")
        from vlmkit.config import config_from_dict

        fields = {"type": "seed", **meta["config"]}
        if fields["type"] != "seed":
            raise ValueError(f"{file} holds a config of another stage type")
        try:
            config = config_from_dict(fields)  # unknown fields: ValueError naming them
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
        model = cls(config, vision, target=target, text_encoder=text_encoder)
        state = load_file(os.path.join(path, WEIGHTS_FILE), device=str(map_location))
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


# ---------------------------------------------------------------------------------------------
# Foreign checkpoint (seed_quantizer.pt)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckpointReport:
    """What :func:`load_seed_checkpoint` did: keys loaded, missing, unexpected, shape-mismatched, ignored."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 20) -> str:
        def show(keys: list[str]) -> str:
            more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return f"{len(keys)} {keys[:limit]}{more}"

        return (f"loaded {len(self.loaded)}, missing {show(self.missing)}, unexpected {show(self.unexpected)}, "
                f"shape mismatch {show(self.mismatched)}, ignored {len(self.ignored)}")


def map_foreign_key(key: str) -> str:
    """Reference checkpoint key → vlmkit ``SeedTokenizer`` key (``Qformer.bert.`` → ``qformer.``, …)."""
    for old, new in FOREIGN_KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_seed_checkpoint(tokenizer: SeedTokenizer, path: str | os.PathLike, *, strict: bool = True,
                         ignore_prefixes: Sequence[str] = FOREIGN_IGNORED_PREFIXES) -> CheckpointReport:
    """Load a reference SEED checkpoint (``seed_quantizer.pt``-style ``torch.save`` dict) from a local path.

    ``torch.load(weights_only=True)``; a ``{"model": state_dict}`` wrapper (SEED-1) is unwrapped. Keys are
    renamed with :data:`FOREIGN_KEY_PREFIXES`; keys under ``ignore_prefixes`` (the frozen ViT: supply it
    as the vision module) are skipped. Strict check: every tokenizer weight except the contrastive-only
    ones (:data:`TRAINING_ONLY_PREFIXES`) must be present with its shape, and no other key may remain;
    otherwise ValueError listing the missing / unexpected / mismatched keys (``strict=False``: load what
    matches and return the report). Nothing is changed when a strict load fails.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SEED checkpoint at {path!r}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(raw).__name__})")
    own = tokenizer.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored, unexpected, mismatched = [], [], []
    for key, value in raw.items():
        if any(key.startswith(p) for p in ignore_prefixes):
            ignored.append(key)
            continue
        new = map_foreign_key(key)
        if new not in own:
            unexpected.append(key)
        elif tuple(own[new].shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[new].shape)}")
        else:
            mapped[new] = value
    missing = [k for k in own if k not in mapped and not k.startswith(TRAINING_ONLY_PREFIXES)
               and not any(m.startswith(_unmap(k) + ":") for m in mismatched)]
    report = CheckpointReport(sorted(mapped), sorted(missing), sorted(unexpected), sorted(mismatched), sorted(ignored))
    if strict and not report.ok:
        raise ValueError(f"{path} does not match the SeedTokenizer ({tokenizer.config.image_head} head): "
                         f"{report.summary()}")
    tokenizer.load_state_dict(mapped, strict=False)
    return report


def _unmap(key: str) -> str:
    for old, new in FOREIGN_KEY_PREFIXES.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


def train_seed_tokenizer(
    tokenizer: "SeedTokenizer | SEED",
    pixel_values: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    phase: str = "both",
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Train a SEED tokenizer on ``pixel_values`` [N, 3, H, W] (+ ``captions``, one per image).

    ``phase="qformer"``: contrastive only; ``"codebook"``: VQ + recon + image MSE with the Q-Former
    frozen; ``"both"``: ``steps`` of each, in that order. Batches are drawn without replacement (a new
    seeded permutation per epoch). Returns the per-step loss history, keyed ``"<phase>/<loss>"``.
    A tqdm bar shows progress unless ``quiet``.
    """
    from tqdm.auto import tqdm

    model = tokenizer.visual_tokenizer if isinstance(tokenizer, SEED) else tokenizer
    if not isinstance(model, SeedTokenizer):
        raise TypeError(f"train_seed_tokenizer takes a SeedTokenizer or a SEED stage, got {type(tokenizer).__name__}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    _check_int("train_seed_tokenizer", "steps", steps, 1)
    _check_int("train_seed_tokenizer", "batch_size", batch_size, 2)
    _check_int("train_seed_tokenizer", "warmup_steps", warmup_steps, 0)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = getattr(pixel_values, "shape", pixel_values)
        raise ValueError(f"pixel_values must be a [N, 3, H, W] tensor, got {got!r}")
    N = pixel_values.shape[0]
    if N < 2:
        raise ValueError(f"need at least 2 images to train, got {N}")
    phases = ["qformer", "codebook"] if phase == "both" else [phase]
    if "qformer" in phases and (captions is None or len(captions) != N):
        raise ValueError(f"the contrastive phase needs one caption per image ({N}), got "
                         f"{None if captions is None else len(captions)}")
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {}
    was_training = model.training
    model.train()
    try:
        for name in phases:
            params = model.phase_parameters(name)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

            def factor(step: int) -> float:
                if step < warmup_steps:
                    return (step + 1) / warmup_steps
                t = (step - warmup_steps) / max(1, steps - warmup_steps)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            order = torch.randperm(N, generator=gen)
            cursor = 0
            bar = tqdm(range(steps), desc=f"SEED {name}", disable=quiet, leave=False)
            for _ in bar:
                if cursor + min(batch_size, N) > N:
                    order, cursor = torch.randperm(N, generator=gen), 0
                idx = order[cursor : cursor + batch_size]
                cursor += len(idx)
                batch = pixel_values[idx]
                caps = [captions[i] for i in idx.tolist()] if captions is not None else None
                losses = model.losses(batch, caps, phase=name)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                sched.step()
                for key, value in losses.items():
                    history.setdefault(f"{name}/{key}", []).append(float(value.detach()))
                bar.set_postfix(loss=f"{history[f'{name}/loss'][-1]:.4f}")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return history


def shapes_caption(sample) -> str:
    """Caption of a ``vlmkit.data.shapes`` sample: its objects in paint order ("a red circle and a blue square")."""
    return " and ".join(f"a {o.color} {o.shape}" for o in sample.objects)


def shapes_pixel_values(samples, size: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                        std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """Images of shapes samples as float pixel_values [N, 3, size, size] normalised by ``mean``/``std``."""
    import numpy as np
    from PIL import Image

    out = []
    for s in samples:
        img = s.image.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# Tokens in the LM vocabulary
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedTokenIds:
    """Ids of the SEED tokens in one tokenizer: code c is ``first_image_id + c``; the marker strings used."""

    first_image_id: int
    codebook: int
    boi_id: int
    eoi_id: int
    boi: str
    eoi: str

    def span(self, codes: torch.Tensor) -> torch.Tensor:
        """``[BOI, first+codes…, EOI]`` ids [B, Q+2] for codes [B, Q]."""
        B = codes.shape[0]
        boi = torch.full((B, 1), self.boi_id, dtype=torch.long, device=codes.device)
        eoi = torch.full((B, 1), self.eoi_id, dtype=torch.long, device=codes.device)
        return torch.cat([boi, codes.long() + self.first_image_id, eoi], dim=1)


def _check_bound(config: SEEDConfig, ids: dict[str, int], boi: str, eoi: str) -> SeedTokenIds:
    strings = image_token_strings(config)
    missing = [s for s in (*strings[:1], *strings[-1:], boi, eoi) if s not in ids]
    if missing:
        raise ValueError(f"SEED token ids are missing for {missing}")
    first = ids[strings[0]]
    bad = [s for i, s in enumerate(strings) if ids.get(s) != first + i]
    if bad:
        raise ValueError(f"SEED image tokens must have consecutive ids (id = first_image_id + code); "
                         f"{len(bad)} do not, e.g. {bad[0]!r} has {ids.get(bad[0])}, "
                         f"expected {first + strings.index(bad[0])}")
    if config.first_image_id is not None and first != config.first_image_id:
        raise ValueError(f"SEEDConfig.first_image_id={config.first_image_id} but the image tokens start at id {first}")
    return SeedTokenIds(first, config.codebook, ids[boi], ids[eoi], boi, eoi)


def add_seed_tokens(tokenizer, config: SEEDConfig, model: nn.Module | None = None,
                    family_markers: Iterable[str] = ()) -> SeedTokenIds:
    """Add the SEED tokens to a HF ``tokenizer`` (codes in order, then BOI, EOI) outside ``vlmkit.wrap``.

    The markers come from :func:`resolve_markers`. With ``model``, its input/output embeddings are
    resized to ``len(tokenizer)``. ValueError when an image token already exists (the codes must get
    consecutive new ids).
    """
    from transformers import AddedToken

    boi, eoi = resolve_markers(config, tokenizer, family_markers)
    strings = [*image_token_strings(config), boi, eoi]
    vocab = tokenizer.get_vocab()
    taken = [s for s in strings if s in vocab]
    if taken:
        raise ValueError(f"SEED tokens already in the tokenizer: {taken[:5]}{' …' if len(taken) > 5 else ''}")
    tokenizer.add_tokens([AddedToken(s, normalized=False, special=False) for s in strings])
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in strings}
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return _check_bound(config, ids, boi, eoi)


class SeedImageLogitsProcessor:
    """Constrained decoding of SEED images (a transformers ``LogitsProcessor``).

    For each row, let n be the number of tokens after its last BOI: n < ``num_queries`` allows only the
    image tokens ``[first_image_id, first_image_id + codebook)``; n == ``num_queries`` allows only EOI
    (when ``force_eoi``); rows without BOI, or past the image, are unconstrained. ``after_boi=True``:
    a row without BOI counts as if BOI came just before its first id (``generate`` from
    ``inputs_embeds`` shows the processor the new tokens only, not the prompt that ends with BOI).
    """

    def __init__(self, ids: SeedTokenIds, num_queries: int, force_eoi: bool = True, after_boi: bool = False) -> None:
        self.ids, self.num_queries, self.force_eoi, self.after_boi = ids, num_queries, force_eoi, after_boi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        is_boi = input_ids == self.ids.boi_id
        has = is_boi.any(dim=1)
        L = input_ids.shape[1]
        B = input_ids.shape[0]
        pos = torch.arange(1, L + 1, device=input_ids.device)
        last = (is_boi * pos).amax(dim=1) if L else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        since = torch.where(has, L - last, torch.full_like(last, L))  # tokens after the last BOI (1-based last)
        if self.after_boi:
            has = torch.ones_like(has)
        in_image = has & (since < self.num_queries)
        at_end = has & (since == self.num_queries) & self.force_eoi
        if not bool(in_image.any() or at_end.any()):
            return scores
        V = scores.shape[-1]
        vocab = torch.arange(V, device=scores.device)
        first = self.ids.first_image_id
        image_ok = (vocab >= first) & (vocab < first + self.ids.codebook)
        eoi_ok = vocab == self.ids.eoi_id
        allowed = torch.ones_like(scores, dtype=torch.bool)
        allowed[in_image] = image_ok
        allowed[at_end] = eoi_ok
        return scores.masked_fill(~allowed, float("-inf"))


class _FamilyFeatures:
    """Frozen features of the wrapped model: ``Family.image_features`` stacked to [B, N, D] (no gradient)."""

    def __init__(self, family) -> None:
        self.family = family

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.family.check_pixel_values(pixel_values)
        feats = self.family.image_features(pixel_values)
        return torch.stack(list(feats))


#: Image markers a family is known to use (so ``markers="auto"`` namespaces SEED's without a tokenizer).
_FAMILY_MARKERS = {"internvl": ("<img>", "</img>", "<IMG_CONTEXT>")}


class SEED(Stage):
    """SEED in the language model: the tokenizer over the wrapped model's frozen features, the image
    tokens in its vocabulary, reading images as tokens and generating them (see the module docstring).

    Built by ``vlmkit.wrap(model, SEEDConfig(...), tokenizer=tok)``; ``visual_tokenizer`` (the
    :class:`SeedTokenizer`, its weights are this stage's) exists after ``attach`` and ``token_ids`` after
    the tokens were added. The BOI/EOI strings are resolved from the config and the family alone
    (``markers="auto"``: namespaced for families known to use ``<img>``, i.e. InternVL), never from the
    tokenizer's current vocabulary, so a reload with a tokenizer that already holds the SEED tokens
    resolves the same strings; a tokenizer of another family that happens to hold ``<img>`` makes
    ``wrap`` fail loudly (set ``markers="namespaced"``).
    """

    def __init__(self, config: SEEDConfig) -> None:
        super().__init__(config)
        self._family = None
        self._markers: tuple[str, str] | None = None
        self.token_ids: SeedTokenIds | None = None

    # --- wrap-time hooks --------------------------------------------------------------------------
    def attach(self, family) -> None:
        D = int(family.config.text_config.hidden_size)
        if self.config.vision_dim is not None and self.config.vision_dim != D:
            raise ValueError(f"SEEDConfig.vision_dim={self.config.vision_dim} but the {family.model_type} model's "
                             f"image features are {D}-wide (its LM width); leave vision_dim=None")
        embedding = family.model.get_input_embeddings()
        weight = embedding.weight
        self._family = family
        self.visual_tokenizer = SeedTokenizer(self.config, _FamilyFeatures(family), vision_dim=D, text_dim=D).to(
            weight.device, weight.dtype)
        _set_plain(self, "_embedding_for_text", embedding)  # for LMTextEmbedder; not a submodule

    def detach(self, family) -> None:
        self._family = None

    def _family_markers(self) -> tuple[str, ...]:
        return _FAMILY_MARKERS.get(getattr(self._family, "model_type", ""), ())

    @property
    def markers(self) -> tuple[str, str]:
        """(BOI, EOI) strings this stage uses in the LM vocabulary."""
        if self.token_ids is not None:
            return self.token_ids.boi, self.token_ids.eoi
        if self._markers is None:
            self._markers = resolve_markers(self.config, None, self._family_markers())
        return self._markers

    def new_tokens(self) -> list[str]:
        return [*image_token_strings(self.config), *self.markers]

    def bind_tokens(self, ids: dict[str, int]) -> None:
        boi, eoi = self.markers
        self.token_ids = _check_bound(self.config, ids, boi, eoi)

    def _ids(self) -> SeedTokenIds:
        if self.token_ids is None:
            raise ValueError("the SEED tokens are not in the vocabulary yet: wrap the model with "
                             "vlmkit.wrap(model, SEEDConfig(...), tokenizer=tok)")
        return self.token_ids

    # --- images ↔ tokens --------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_queries] of ``pixel_values`` (one image per row) through the wrapped model's features."""
        return self.visual_tokenizer.encode(pixel_values)

    def decode(self, codes: Any) -> torch.Tensor:
        """Image embeddings [B, image_embed_dim] of codes [B, num_queries]."""
        return self.visual_tokenizer.decode(codes)

    def image_token_ids(self, pixel_values: torch.Tensor | None = None,
                        codes: torch.Tensor | None = None) -> torch.Tensor:
        """The id span ``<img> <img_xxxxx>×num_queries </img>`` [B, num_queries + 2] of images (or codes)."""
        if (pixel_values is None) == (codes is None):
            raise ValueError("give exactly one of pixel_values and codes")
        codes = self.encode(pixel_values) if codes is None else self.visual_tokenizer.check_codes(codes)
        return self._ids().span(codes)

    def image_text(self, pixel_values: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> list[str]:
        """The span as text, one string per image, to put in a prompt (the tokenizer maps it to
        :meth:`image_token_ids` exactly since every piece is an added token)."""
        ids = self.image_token_ids(pixel_values, codes)
        boi, eoi = self.markers
        fmt = self.config.image_token_format
        first = self._ids().first_image_id
        return [boi + "".join(fmt.format(int(i) - first) for i in row[1:-1]) + eoi for row in ids]

    def to_reference_text(self, text: str) -> str:
        """Replace this stage's markers by the reference ``<img>``/``</img>`` (interop with SEED-LLaMA text)."""
        boi, eoi = self.markers
        if (boi, eoi) == (self.config.boi, self.config.eoi):
            return text
        return text.replace(boi, self.config.boi).replace(eoi, self.config.eoi)

    def from_reference_text(self, text: str) -> str:
        """Replace the reference ``<img>``/``</img>`` by this stage's markers (inverse of :meth:`to_reference_text`)."""
        boi, eoi = self.markers
        if (boi, eoi) == (self.config.boi, self.config.eoi):
            return text
        return text.replace(self.config.eoi, eoi).replace(self.config.boi, boi)

    def codes_from_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Codes of every complete image span in a 1-D id sequence (BOI, num_queries image ids, EOI)."""
        t = self._ids()
        ids = torch.as_tensor(ids).flatten().tolist()
        out, Q = [], self.config.num_queries
        for i, tok in enumerate(ids):
            if tok == t.boi_id and i + Q + 1 < len(ids) and ids[i + Q + 1] == t.eoi_id:
                body = ids[i + 1 : i + 1 + Q]
                if all(t.first_image_id <= x < t.first_image_id + t.codebook for x in body):
                    out.append(torch.tensor(body) - t.first_image_id)
        return out

    def logits_processor(self, force_eoi: bool = True, after_boi: bool = False) -> SeedImageLogitsProcessor:
        """The constrained-decoding processor for this stage's tokens (see :class:`SeedImageLogitsProcessor`)."""
        return SeedImageLogitsProcessor(self._ids(), self.config.num_queries, force_eoi, after_boi)

    def text_encoder(self, tokenizer) -> LMTextEmbedder:
        """A frozen caption embedder from the wrapped LM's input embeddings and its HF ``tokenizer``
        (``stage.visual_tokenizer.set_text_encoder(stage.text_encoder(tok))``; needs ``text_dim`` None or
        the LM width)."""
        return LMTextEmbedder(tokenizer, self._embedding_for_text)

    @torch.no_grad()
    def generate_image_tokens(self, wrapper, prompt: Any, attention_mask: torch.Tensor | None = None,
                              **generate_kwargs) -> torch.Tensor:
        """Codes [B, num_queries] the LM writes after ``prompt`` (text, list of texts, or left-padded ids [B, S]).

        BOI is appended to each prompt (unless it already ends with it) and exactly ``num_queries`` tokens
        are decoded under :class:`SeedImageLogitsProcessor`, so every code is a valid image token.
        ``generate_kwargs`` go to ``wrapper.generate`` (``pixel_values`` for multimodal prompts,
        ``do_sample``, …); decode the result with :meth:`decode`.
        """
        from transformers import LogitsProcessorList

        t = self._ids()
        Q = self.config.num_queries
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
            tok = getattr(wrapper, "tokenizer", None)
            if tok is None:
                raise ValueError("a text prompt needs the tokenizer given to vlmkit.wrap(..., tokenizer=tok)")
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            input_ids = torch.as_tensor(prompt)
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2:
                raise ValueError(f"prompt ids must be [B, S], got shape {tuple(input_ids.shape)}")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the prompt "
                             f"{tuple(input_ids.shape)}")
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("prompts must be left-padded (every row's last token real) to append BOI")
        device = self.visual_tokenizer.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        ends = input_ids[:, -1] == t.boi_id
        if bool(ends.any()) and not bool(ends.all()):
            raise ValueError("either every prompt or none may end with BOI")
        if not bool(ends.all()):
            input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], t.boi_id)], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        # after_boi: every prompt ends with BOI, and generate may show the processor only the new tokens
        processors = LogitsProcessorList([self.logits_processor(force_eoi=True, after_boi=True)])
        extra = generate_kwargs.pop("logits_processor", None)
        if extra:
            processors.extend(extra)
        for name in ("max_new_tokens", "min_new_tokens"):
            value = generate_kwargs.pop(name, Q)
            if value != Q:
                raise ValueError(f"generate_image_tokens decodes exactly num_queries={Q} tokens, got {name}={value}")
        generate_kwargs.setdefault("do_sample", False)
        out = wrapper.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                               max_new_tokens=Q, min_new_tokens=Q, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        codes = sequences[:, -Q:] - t.first_image_id
        if codes.shape[1] != Q or int(codes.min()) < 0 or int(codes.max()) >= t.codebook:
            raise RuntimeError(f"generation returned non-image tokens: {sequences[:, -Q:].tolist()}")
        return codes
