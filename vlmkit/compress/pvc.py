"""PVC (Yang et al., CVPR 2025, arXiv 2412.09613): Progressive Visual token Compression. **A trainable stage,
not training-free**: its new parameters must be fine-tuned (PEFT ``modules_to_save``) before it helps.

Reimplemented from the paper description (``OpenGVLab/PVC`` @ 3a031d2 has no model code; the released model
code is remote code for transformers 4.37 in HF ``OpenGVLab/PVC-InternVL2-8B``). What this module does:

- Frames: an image (each tile of it) becomes a static video of ``frames`` identical frames. A real
  video's frames are used as they are: ``forward`` / ``generate`` take ``video_frames`` (frames per
  video, in the order of the images: ``[1, 8, 1]`` = an image, an 8-frame video, an image), where the
  frames of a video are consecutive single-tile images of the prompt (as InternVL's processor emits a
  video: one ``<img>…</img>`` run per frame). Frame t of a video runs through the tower with frame index
  t and the temporal caches of frames 0…t-1 of that video only, and its run gets ``tokens_per_frame``
  tokens. ``encode_video`` does the same for one video's pixels outside a prompt.
- Progressive encoding: the ``temporal_layers`` vision layers ending at the feature layer gain
  (a) a causal temporal attention block before the layer: each token attends to the token at the same
  spatial position in the current and earlier frames; (b) AdaLN conditioning on the frame index
  (sinusoid(t) → MLP → shift/scale/gate, DiT-style) of the temporal block and of the layer's own
  attention and MLP inputs/outputs. Frames run through the tower one after another (causality makes
  a per-layer cache of earlier frames' keys/values exact): frame 0 is the family's own tower run,
  frames 1… re-run the tower on the same pixels with the next frame index.
- Compression: each frame's ``h×w`` tokens (the model's own projector output) are grouped s×s
  (pixel-shuffle) into ``tokens_per_frame`` tokens: mean of the group + MLP(group) (LM width).
- Identity at initialisation: every gate/shift/scale and the compression MLP's output layer start at
  zero, so frame t's features equal the unmodified model's and each output token is the mean of its s×s
  group (with ``frames=1`` and s=1 the wrapped model is exactly the base model).

Token accounting (what ``assemble`` sees): an image of n tiles yields n·frames·tokens_per_frame new tokens
on their own grid ``(q, q)`` (q² = tokens_per_frame); ``index`` = (tile·frames + t)·q² + cell, i.e. the
tokens take the *first* slots of the processor's placeholder run (``num_uncompressed`` stays the run
length, the remaining slots are dropped); ``frame`` = tile·frames + t. ``wrap()`` raises ValueError when
frames·tokens_per_frame exceeds the tokens of one tile's run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch
from torch import nn

from ..config import StageConfig, register_stage
from ..stage import CompressorStage
from ..tokens import VisualTokens

TIME_DIM = 256  # sinusoidal frame-index embedding width (DiT / PVC)


@dataclasses.dataclass
class PVCConfig(StageConfig):
    """PVC: ``frames`` frames per image, ``tokens_per_frame`` tokens each (a square), temporal attention +
    AdaLN in the last ``temporal_layers`` vision layers (ending at the feature layer). Trainable."""

    type = "pvc"
    display_name = "PVC"
    requires = ("patch_grid", "tile_rows")
    exclusive = True  # it re-runs the vision tower itself: no other compressor can share the images
    frames: int = 4
    tokens_per_frame: int = 64
    temporal_layers: int = 4

    @classmethod
    def example(cls) -> "PVCConfig":
        """Two frames of 4 tokens through one temporal layer: fits a 4×4-token tile."""
        return cls(frames=2, tokens_per_frame=4, temporal_layers=1)

    def validate(self) -> None:
        for name in ("frames", "tokens_per_frame", "temporal_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PVCConfig.{name} must be an int >= 1, got {value!r}")
        if math.isqrt(self.tokens_per_frame) ** 2 != self.tokens_per_frame:
            raise ValueError(f"tokens_per_frame must be a square (q×q grid), got {self.tokens_per_frame}")


def frame_embedding(t: int, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal embedding of the frame index: [dim] (cos | sin, periods up to 10⁴)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])


class TemporalBlock(nn.Module):
    """Causal temporal attention (same spatial position, frames ≤ t) with AdaLN-Zero, for one vision layer.

    ``forward(x [B, S, C], cond [C], cache)`` returns ``(x + gate·attn, mods)`` where ``mods`` are the
    (shift, scale, gate) pairs for the layer's own attention and MLP; ``cache`` collects (k, v) of frames.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.modulation = nn.Linear(width, 9 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cache: list) -> tuple[torch.Tensor, tuple]:
        shift, scale, gate, *mods = self.modulation(nn.functional.silu(cond)).chunk(9)
        B, S, C = x.shape
        q, k, v = self.qkv(self.norm(x) * (1 + scale) + shift).reshape(B, S, 3, self.heads, -1).unbind(2)
        cache.append((k, v))
        keys = torch.stack([c[0] for c in cache], dim=2)  # [B, S, T, H, d]
        values = torch.stack([c[1] for c in cache], dim=2)
        weights = torch.einsum("bshd,bsthd->bsht", q, keys) / math.sqrt(q.shape[-1])
        attn = torch.einsum("bsht,bsthd->bshd", weights.softmax(dim=-1), values).reshape(B, S, C)
        return x + gate * self.out(attn), tuple(mods)


class TemporalStack(nn.Module):
    """Frame-index MLP shared by the temporal blocks, one ``TemporalBlock`` per adapted vision layer."""

    def __init__(self, width: int, heads: int, num_layers: int) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([TemporalBlock(width, heads) for _ in range(num_layers)])

    def forward(self, i: int, x: torch.Tensor, frame: int, cache: list) -> tuple[torch.Tensor, tuple]:
        cond = self.time_mlp(frame_embedding(frame).to(device=x.device, dtype=x.dtype))
        return self.blocks[i](x, cond, cache)


class FrameCompressor(nn.Module):
    """Pixel-shuffle + MLP: frame tokens [M, h, w, D] -> [M, (h/s)·(w/s), D] = mean of each s×s group + MLP(group)."""

    def __init__(self, width: int, s: int) -> None:
        super().__init__()
        self.s = s
        self.mlp = nn.Sequential(
            nn.LayerNorm(s * s * width), nn.Linear(s * s * width, width), nn.GELU(), nn.Linear(width, width)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, h, w, D = x.shape
        s = self.s
        groups = x.reshape(M, h // s, s, w // s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(M, -1, s * s, D)
        return groups.mean(dim=2) + self.mlp(groups.flatten(2))


def _replace_first(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@dataclasses.dataclass
class _Run:
    """What one ``vision_context`` records (dropped at exit): frame index, temporal caches, modulations."""

    family: object
    frame: int = 0
    caches: list = dataclasses.field(default_factory=list)
    mods: list = dataclasses.field(default_factory=list)
    pixel_values: torch.Tensor | None = None


@register_stage(PVCConfig)
class PVC(CompressorStage):
    """Trainable PVC stage (see the module docstring). Submodules ``temporal`` and ``compressor``."""

    compress_input_names = ("video_frames",)

    def __init__(self, config: PVCConfig) -> None:
        super().__init__(config)
        self._run: _Run | None = None

    # --- set-up ---------------------------------------------------------------------------------
    def attach(self, family) -> None:
        cfg = self.config
        h, w = family.grid
        run = family.tokens_per_tile
        if cfg.frames * cfg.tokens_per_frame > run:
            raise ValueError(
                f"PVC needs frames × tokens_per_frame = {cfg.frames}×{cfg.tokens_per_frame} = "
                f"{cfg.frames * cfg.tokens_per_frame} slots but the processor emits {run} placeholders per "
                f"{family.model_type} tile: lower frames or tokens_per_frame"
            )
        s = math.isqrt(h * w // cfg.tokens_per_frame)
        if s * s * cfg.tokens_per_frame != h * w or h % s or w % s:
            ok = [h * w // (d * d) for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
            raise ValueError(f"tokens_per_frame={cfg.tokens_per_frame} does not pool the {h}×{w} grid; accepted: {ok}")
        layers = family.vision_layers
        last = family.feature_layer_index  # index of the layer producing the features
        if last is None:
            raise ValueError(f"PVC cannot follow vision_feature_layer={family.feature_layer!r}")
        if cfg.temporal_layers > last + 1:
            raise ValueError(
                f"temporal_layers={cfg.temporal_layers} but only {last + 1} vision layers lead to the features; "
                f"accepted: 1..{last + 1}"
            )
        self._layers = list(range(last + 1 - cfg.temporal_layers, last + 1))
        for i in self._layers:  # fail at wrap() time if the layer shape is unknown
            family.vision_attention(i), family.vision_mlp(i)
        param = next(layers[0].parameters())
        width, heads = family.vision_width, family.vision_heads
        self.temporal = TemporalStack(width, heads, cfg.temporal_layers).to(param.device, param.dtype)
        self.compressor = FrameCompressor(family.text_width, s).to(param.device, param.dtype)
        self._grid = (h // s, w // s)

    # --- vision hooks ---------------------------------------------------------------------------
    def _hooks(self, family, run: _Run) -> list:
        handles = []
        for j, i in enumerate(self._layers):
            layer = family.vision_layers[i]
            run.caches.append([])
            run.mods.append(None)

            def temporal(module, args, kwargs, j=j):
                x = args[0] if args else kwargs["hidden_states"]
                y, run.mods[j] = self.temporal(j, x, run.frame, run.caches[j])
                return _replace_first(args, kwargs, y)

            def modulate(k):
                def pre(module, args, kwargs, j=j):
                    shift, scale = run.mods[j][k], run.mods[j][k + 1]
                    x = args[0] if args else kwargs["hidden_states"]
                    return _replace_first(args, kwargs, x * (1 + scale) + shift)

                def post(module, args, output, j=j):
                    gate = run.mods[j][k + 2]
                    if isinstance(output, tuple):
                        return (output[0] * (1 + gate), *output[1:])
                    return output * (1 + gate)

                return pre, post

            handles.append(layer.register_forward_pre_hook(temporal, with_kwargs=True))
            for k, sub in ((0, family.vision_attention(i)), (3, family.vision_mlp(i))):
                pre, post = modulate(k)
                handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(sub.register_forward_hook(post))

        def capture(pixel_values):
            if run.frame == 0 and run.pixel_values is None:
                run.pixel_values = pixel_values

        handles.append(family.on_vision_input(capture))
        return handles

    @contextlib.contextmanager
    def vision_context(self, family) -> Iterator[None]:
        run = _Run(family)
        handles = self._hooks(family, run)
        self._run = run
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._run = None

    # --- compression ----------------------------------------------------------------------------
    def _compress_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame tokens [M, T, h·w, D] -> [M, T·q², D]."""
        M, T, _, D = frames.shape
        h, w = self._run.family.grid
        return self.compressor(frames.reshape(M * T, h, w, D)).reshape(M, -1, D)

    def _new_tokens(self, embeds: torch.Tensor, num_uncompressed: int) -> VisualTokens:
        index = torch.arange(embeds.shape[0], device=embeds.device)
        frame = index // (self._grid[0] * self._grid[1])
        return VisualTokens(embeds, index, self._grid, frame=frame, num_uncompressed=num_uncompressed)

    def compress(self, tokens: list[VisualTokens], video_frames=None) -> list[VisualTokens]:
        run = self._run
        if run is None or run.pixel_values is None:
            raise RuntimeError("PVC.compress runs inside its vision_context, after the vision tower (use VLMWrapper)")
        if any(t.num_tokens != t.num_uncompressed for t in tokens):
            raise ValueError("PVC encodes uncompressed images: put it before other compressors")
        n = run.family.tokens_per_tile
        first = torch.cat([t.embeds for t in tokens]).reshape(-1, n, tokens[0].embeds.shape[-1])  # frame 0, per tile
        frame0 = [list(layer) for layer in run.caches]  # the family's tower pass: frame 0 of every tile
        if video_frames is not None:
            return self._compress_with_videos(tokens, video_frames, first, frame0)
        later = [run.pixel_values] * (self.config.frames - 1)  # the same pixels, one frame index further
        packed = self._compress_frames(self._continue_frames(first, later, frame0))  # [tiles, frames·q², D]
        out, start = [], 0
        for t in tokens:
            tiles = t.num_uncompressed // n
            out.append(self._new_tokens(packed[start : start + tiles].flatten(0, 1), t.num_uncompressed))
            start += tiles
        return out

    def _compress_with_videos(self, tokens: list[VisualTokens], video_frames, first: torch.Tensor,
                              frame0: list) -> list[VisualTokens]:
        """``compress`` when ``video_frames`` groups the images into videos (module docstring)."""
        groups = [int(v) for v in (video_frames.tolist() if torch.is_tensor(video_frames) else video_frames)]
        if any(g < 1 for g in groups) or sum(groups) != len(tokens):
            raise ValueError(f"video_frames={groups} must be counts >= 1 summing to the {len(tokens)} images of "
                             "the batch (1 for an image, T for a video of T frames)")
        n = self._run.family.tokens_per_tile
        tiles = [t.num_uncompressed // n for t in tokens]
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        q2 = self.config.tokens_per_frame
        out, i = [], 0
        for g in groups:
            rows = slice(starts[i], starts[i] + sum(tiles[i : i + g]))
            pixels = self._run.pixel_values[rows]
            if g == 1:  # an image: a static video of its own pixels
                feats = self._continue_frames(first[rows], [pixels] * (self.config.frames - 1), frame0, rows)
                out.append(self._new_tokens(self._compress_frames(feats).flatten(0, 1), tokens[i].num_uncompressed))
            else:
                if any(tiles[j] != 1 for j in range(i, i + g)):
                    raise ValueError(f"video frames must be single-tile images, got tiles {tiles[i : i + g]}")
                video = slice(rows.start, rows.start + 1)  # frame 0's row and caches; frame t sees frames < t
                feats = self._continue_frames(first[video], [pixels[t : t + 1] for t in range(1, g)], frame0, video)
                packed = self._compress_frames(feats)[0]  # [g·q², D]
                out += [self._new_tokens(packed[t * q2 : (t + 1) * q2], tokens[i + t].num_uncompressed)
                        for t in range(g)]
            i += g
        return out

    def _continue_frames(self, first: torch.Tensor, later: list[torch.Tensor], frame0: list,
                         rows: slice = slice(None)) -> torch.Tensor:
        """Frames 1, 2, … after frame 0: ``first`` [M, h·w, D] is frame 0 (already through the tower, its
        temporal caches in ``frame0``, of which the ``rows`` are kept); frame t runs the tower on
        ``later[t-1]`` [M, C, H, W] with frame index t. Returns [M, T, h·w, D]."""
        run = self._run
        run.caches = [[(k[rows], v[rows]) for k, v in layer] for layer in frame0]  # hooks read run.caches[j]
        feats = [first]
        for t, px in enumerate(later, start=1):
            run.frame = t
            feats.append(torch.stack(run.family.image_features(px)))
        return torch.stack(feats, dim=1)

    def encode_video(self, family, frames: torch.Tensor, num_uncompressed: int | None = None) -> VisualTokens:
        """A video's frames as they are: pixel_values [T, C, H, W] -> VisualTokens of T·tokens_per_frame tokens.

        ``num_uncompressed`` is the length of the video's placeholder run (default T·tokens_per_frame).
        """
        with self.vision_context(family):
            first = torch.stack(family.image_features(frames[:1]))  # frame 0 (index 0, empty caches)
            later = [frames[t : t + 1] for t in range(1, frames.shape[0])]
            embeds = self._compress_frames(self._continue_frames(first, later, self._run.caches))[0]
            n = embeds.shape[0]
            return self._new_tokens(embeds, n if num_uncompressed is None else num_uncompressed)
