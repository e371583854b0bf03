"""SEED modules (named as the reference) and the standalone :class:`SeedTokenizer`.

Causal Q-Former, ViT blocks, the vector quantiser, the frozen caption embedders and the tokenizer that
combines them (encode, decode, training losses, save/load). "The module docstring" in the docstrings
below is the package docstring (``vlmkit.vision.seed``), which documents the method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PHASES, SEEDConfig, _check_int

CONFIG_FILE = "seed_config.json"
WEIGHTS_FILE = "seed_tokenizer.safetensors"
_BERT_EPS = 1e-12
_VIT_EPS = 1e-6
_IMAGE_DOWN = (256, 128, 32)  # the released reverse head's per-token MLP widths


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
