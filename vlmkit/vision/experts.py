"""MouSi poly-visual experts (Fan et al., arXiv 2401.17221): several vision encoders per image, each with its
own projector into the language model's width, fused into one run of visual tokens (reference notes
compression_pe.md §5).

``vlmkit.wrap(model, ExpertsConfig(experts=[{"name": "own"}, {"name": "sam", "variant": "vit_b",
"checkpoint": "sam_vit_b_01ec64.pth"}], fusion="mlp", positions="row"))`` replaces the family's image
encoding: every image becomes ``[own tower tokens | SAM tokens]`` and the wrapper resizes the processor's
placeholder run to that length, so prompts made by the model's own processor keep working.

MouSi released no code ("coming soon"); everything below marked *choice* is ours, written down here:

Experts (backbones), chosen by ``spec["name"]`` in ``EXPERT_TYPES`` (extend it with ``register_expert``):

- ``{"name": "own", "projector": "model" | "new", "layer": int}``: the wrapped model's own vision tower.
  *Choice*: ``"model"`` (default) yields the model's own projected tokens (``family.image_features``), i.e.
  exactly what the language model was trained on; its fusion is then the identity (MLP fusion, merge 1)
  and nothing new is trained for it. ``"new"`` takes the tower's hidden state at ``layer`` (default the
  model's ``vision_feature_layer``, CLS dropped) and gives it a new projector like any other expert.
- ``{"name": "open_clip", "model": "ViT-B-16" | "model_config": {...}, "checkpoint": PATH,
  "image_size": int, "layer": int, "mean": [3], "std": [3], "seed": int}``: an open_clip ViT. The
  architecture comes from open_clip's bundled config of ``model`` or from an inline ``model_config``
  (open_clip's JSON schema: ``embed_dim``, ``vision_cfg``, …); only the vision tower is built. The
  checkpoint (open_clip format, ``.bin``/``.pt`` read with ``torch.load(weights_only=True)`` or
  ``.safetensors``) is filtered to its ``visual.*`` keys and loaded strictly; ``image_size`` overrides the
  config's (positional embedding resized as open_clip does). Without a checkpoint the weights are random,
  seeded by ``seed`` (tests). Features: the patch tokens after block ``layer`` (default -2, the
  penultimate block as LLaVA uses CLIP), CLS dropped, before ``ln_post``. ``hf-hub:`` names are refused.
- ``{"name": "sam", "variant": "vit_b" | "vit_l" | "vit_h" | "tiny", "checkpoint": PATH, "seed": int}``: the
  segment-anything image encoder (``vlmkit.seg.sam.load_sam``, ``weights_only=True``); features are the
  neck output, ``out_chans`` × (img_size/16)² (256 × 64 × 64 = 4096 tokens for the released SAMs).
  ``"tiny"`` without a checkpoint is ``vlmkit.seg.sam.tiny_sam(seed)`` (random, tests).

Backbones are frozen: they live outside the stage's ``parameters()``/``state_dict()`` (so recipes and
optimizers never see them and ``save_pretrained`` does not copy them: they are re-read from their
checkpoint paths at ``wrap``/``load`` time), run under ``no_grad`` in eval mode, and follow the stage's
``.to()``. The ``own`` expert runs with autograd, since its modules belong to the model (a recipe may train
the model's projector).

Pixels. Experts see the model's ``pixel_values`` [N, 3, H, W] (one row per image): *choice*: they are
de-normalised with ``image_mean``/``image_std`` (the wrapped model's processor normalisation, default
OpenAI CLIP's = LLaVA's; set ``processor.image_processor.image_mean``/``image_std`` for other models),
resized bilinearly (antialiased) to the expert's input size and re-normalised with the expert's mean/std.
SAM gets the (square) image resized to its full input square, not letterboxed. Tiled inputs
(InternVL ``crop_to_patches``) are not supported: one pixel row is one image.

Fusion (``fusion``), one module per expert, trained (``stages.train: [experts]`` in a recipe):

- ``"mlp"``: LLaVA-1.5's ``mlp2x_gelu`` (Linear F·m → D, GELU, Linear D → D) per expert; the experts'
  token runs are concatenated in config order (reference §5.2). Multi-patch-one-token ``merge`` (config
  default, per-expert override ``spec["merge"]``): *choice*: an int m concatenates m horizontally
  adjacent patches (a 1×m window, so rows are kept: an R×C grid becomes R×(C/m)); a pair [mh, mw] merges
  mh×mw windows (R/mh × C/mw). Window features are concatenated row-major within the window.
- ``"qformer"``: per expert a Q-Former-style resampler: ``queries`` learned queries (config default,
  per-expert ``spec["queries"]``) of the language model's width, ``qformer_layers`` pre-LN blocks of
  query self-attention, cross-attention to the expert's linearly projected features and a 4× GELU MLP,
  then LayerNorm + Linear. *Choice*: the Q queries of an expert form the most square grid h×w = Q
  (h the largest divisor ≤ √Q; 16 → 4×4, 8 → 2×4), which is what the ``row`` scheme counts.

Every fused module is initialised under ``torch.manual_seed(seed)`` (global RNG untouched), at ``wrap``
time, because its sizes need the model (language-model width, the own tower).

Output: one ``VisualTokens`` per image, ``num_uncompressed`` = Σ tokens of all experts, ``index`` the run
position, ``grid`` = (1, T) (the run has no single 2-D layout) and ``blocks`` = [(offset, grid)] per expert.

Positions (``positions``, reference §5.3; per-expert blocks laid out one after the other, as
``vlmkit.position.mousi`` documents): ``"original"`` (default) leaves positions alone (each token takes the
next integer; a position stage given to ``wrap`` still applies, and ``MouSiPositionConfig`` honours the
expert blocks). ``"shared"`` (one position per expert block) and ``"row"`` (R positions for an R×C
expert) are realised by this stage itself: while the language model runs it remaps the decoder's rotary
embedding to ``mousi_position_ids(positions, …)``. *Choice*: since an encoder stage hands the model no
``position_ids``, the remap does not rely on the model's own integer numbering: the full prompt (the
call whose length is the assembled length) gets the scheme positions column by column, and later calls
(generated tokens) continue at ``last scheme position + (model position − model position of the last
prompt token)``, which is right whether the model numbers columns (``forward``) or real tokens
(``generate``). Combining ``positions="shared"|"row"`` with a position stage raises at ``wrap()`` time
(use ``positions="original"`` with ``MouSiPositionConfig(mode=...)`` instead, which gives the same
positions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import StageConfig, register_stage
from ..position.mousi import MODES, mousi_position_ids
from ..position.rotary import patch_forward
from ..stage import EncoderStage
from ..tokens import VisualTokens

if TYPE_CHECKING:
    from ..families.base import Family
    from ..sequence import AssembledBatch

__all__ = [
    "ExpertsConfig", "ExpertsStage", "ExpertBackbone", "ExpertType", "EXPERT_TYPES", "register_expert",
    "OwnTowerExpert", "OpenCLIPExpert", "SAMExpert", "MLPProjector", "QFormerResampler", "query_grid",
]

FUSIONS = ("mlp", "qformer")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COMMON_KEYS = ("name", "merge", "queries")  # keys every expert spec may hold


# ------------------------------------------------------------------------------------------------
# Small checks
# ------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_window(merge: Any, where: str = "merge") -> tuple[int, int]:
    """``m`` → (1, m) (m horizontally adjacent patches); ``[mh, mw]`` → (mh, mw); ValueError otherwise."""
    if _is_int(merge) and merge >= 1:
        return 1, int(merge)
    if isinstance(merge, (list, tuple)) and len(merge) == 2 and all(_is_int(m) and m >= 1 for m in merge):
        return int(merge[0]), int(merge[1])
    raise ValueError(f"{where} must be an int m >= 1 (1×m window) or a pair [mh, mw] of ints >= 1, got {merge!r}")


def query_grid(num_queries: int) -> tuple[int, int]:
    """The most square (h, w) with h·w = ``num_queries`` and h ≤ w (16 → (4, 4), 8 → (2, 4), 7 → (1, 7))."""
    if not _is_int(num_queries) or num_queries < 1:
        raise ValueError(f"queries must be an int >= 1, got {num_queries!r}")
    h = max(d for d in range(1, math.isqrt(num_queries) + 1) if num_queries % d == 0)
    return h, num_queries // h


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple)) or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{where} must be three numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or a ``torch.load(weights_only=True)``-able file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} checkpoint {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for anything but tensors and containers
            raise ValueError(f"{path!r} is not a plain state dict loadable with weights_only=True: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# Backbones
# ------------------------------------------------------------------------------------------------


class ExpertBackbone(nn.Module):
    """A vision encoder as a MouSi expert: images → a grid of features [N, R·C, F] (row-major cells).

    Subclasses implement ``features(x)`` on pixels already prepared for them (``image_size``, ``mean``,
    ``std`` in the 0–1 scale; None = take the model's pixel values as they are), or override ``encode``.
    ``frozen`` backbones run under ``no_grad``; ``in_language_space`` marks features already in the
    language model's space (the model's own projector), which MLP fusion with merge 1 passes through.
    """

    frozen: bool = True
    in_language_space: bool = False

    def __init__(
        self,
        grid: tuple[int, int],
        feature_dim: int,
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.feature_dim = int(feature_dim)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.mean = mean
        self.std = std

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] prepared pixels → [N, R·C, F] features (override)."""
        raise NotImplementedError

    def prepare(self, pixels01: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels in [0, 1] → this expert's input: resized (bilinear, antialiased), normalised."""
        x = pixels01
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def encode(
        self, family: "Family", pixel_values: torch.Tensor, model_mean: torch.Tensor, model_std: torch.Tensor,
        **image_kwargs,
    ) -> torch.Tensor:
        """The model's ``pixel_values`` [N, 3, H, W] (normalised with ``model_mean``/``model_std`` [3]) → [N, R·C, F]."""
        pixels01 = pixel_values.float() * model_std.view(1, 3, 1, 1) + model_mean.view(1, 3, 1, 1)
        x = self.prepare(pixels01)
        param = next(self.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            out = self.features(x)
        return out

    def extra_repr(self) -> str:
        return f"grid={self.grid}, feature_dim={self.feature_dim}, image_size={self.image_size}"


class OwnTowerExpert(ExpertBackbone):
    """The wrapped model's own vision tower. ``projector="model"``: its projected tokens [N, h·w, D]
    (``family.image_features``); ``"new"``: the tower's hidden state at ``layer``, CLS dropped [N, h·w, F]."""

    frozen = False  # the tower and projector are the model's; recipes decide what of them trains

    def __init__(self, family: "Family", projector: str = "model", layer: int | None = None) -> None:
        if projector == "model":
            grid = family.grid
            dim = family.model.get_input_embeddings().embedding_dim
        else:
            (H, W), (ph, pw) = family.image_size, family.patch_size
            grid = (H // ph, W // pw)
            dim = int(family.config.vision_config.hidden_size)
        super().__init__(grid, dim)
        self.projector = projector
        self.in_language_space = projector == "model"
        self.layer = family.feature_layer if layer is None else layer
        if not _is_int(self.layer):
            raise ValueError(
                f"own expert: layer must be one int index into the tower's hidden states, got {self.layer!r} "
                "(set spec['layer'] for models with several feature layers)"
            )

    def encode(self, family, pixel_values, model_mean, model_std, **image_kwargs) -> torch.Tensor:
        family.check_pixel_values(pixel_values)
        if self.projector == "model":
            return torch.stack(family.image_features(pixel_values, **image_kwargs), dim=0)
        tower = family.vision_tower
        dtype = next(tower.parameters()).dtype
        hidden = tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states[self.layer]
        if hidden.shape[1] < self.num_cells:
            raise ValueError(f"own tower gave {hidden.shape[1]} tokens, fewer than its {self.grid} grid")
        return hidden[:, hidden.shape[1] - self.num_cells :]  # drop CLS / prefix tokens


class OpenCLIPExpert(ExpertBackbone):
    """An open_clip ``VisionTransformer``: patch tokens after block ``layer`` [N, R·C, width], CLS dropped."""

    def __init__(self, visual: nn.Module, layer: int = -2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> None:
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "grid_size"):
            raise ValueError(f"open_clip expert needs a VisionTransformer tower, got {type(visual).__name__}")
        size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
        super().__init__(visual.grid_size, visual.transformer.width, size, tuple(mean), tuple(std))
        depth = len(visual.transformer.resblocks)
        if not -depth <= layer < depth:
            raise ValueError(f"open_clip expert: layer {layer} outside the tower's {depth} blocks [-{depth}, {depth})")
        self.visual = visual
        self.layer = int(layer)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixel_values, indices=[self.layer], output_fmt="NLC", intermediates_only=True,
        )
        return out["image_intermediates"][0]


class SAMExpert(ExpertBackbone):
    """A segment-anything ``ImageEncoderViT``: neck output [N, out_chans, R, C] → [N, R·C, out_chans]."""

    def __init__(self, image_encoder: nn.Module, pixel_mean, pixel_std) -> None:
        size = int(image_encoder.img_size)
        patch = int(image_encoder.patch_embed.proj.kernel_size[0])
        dim = int(image_encoder.neck[0].out_channels)
        mean = tuple(float(v) / 255.0 for v in torch.as_tensor(pixel_mean).flatten())
        std = tuple(float(v) / 255.0 for v in torch.as_tensor(pixel_std).flatten())
        super().__init__((size // patch, size // patch), dim, (size, size), mean, std)
        self.image_encoder = image_encoder

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixel_values).flatten(2).transpose(1, 2)


# --- builders --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise modules under ``torch.manual_seed(seed)`` without touching the global CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _check_own(spec: dict) -> None:
    if spec.get("projector", "model") not in ("model", "new"):
        raise ValueError(f"own expert: projector must be 'model' or 'new', got {spec.get('projector')!r}")
    if spec.get("layer") is not None and not _is_int(spec["layer"]):
        raise ValueError(f"own expert: layer must be an int, got {spec['layer']!r}")


def _build_own(spec: dict, family: "Family") -> ExpertBackbone:
    return OwnTowerExpert(family, spec.get("projector", "model"), spec.get("layer"))


def _check_open_clip(spec: dict) -> None:
    model, config = spec.get("model"), spec.get("model_config")
    if (model is None) == (config is None):
        raise ValueError(f"open_clip expert needs exactly one of 'model' (a name) or 'model_config' (a dict), got {spec!r}")
    if model is not None and (not isinstance(model, str) or model.startswith("hf-hub:")):
        raise ValueError(f"open_clip expert: model must be a bundled config name or 'local-dir:PATH', got {model!r} "
                         "(vlmkit never downloads)")
    if config is not None and (not isinstance(config, dict) or "vision_cfg" not in config):
        raise ValueError(f"open_clip expert: model_config must be an open_clip model config dict with 'vision_cfg', got {config!r}")
    for key in ("image_size", "layer", "seed"):
        if spec.get(key) is not None and not _is_int(spec[key]):
            raise ValueError(f"open_clip expert: {key} must be an int, got {spec[key]!r}")
    for key in ("mean", "std"):
        if spec.get(key) is not None:
            _triple(spec[key], f"open_clip expert {key}")
    if spec.get("checkpoint") is not None and not isinstance(spec["checkpoint"], str):
        raise ValueError(f"open_clip expert: checkpoint must be a path string, got {spec['checkpoint']!r}")


def _build_open_clip(spec: dict, family: "Family") -> ExpertBackbone:
    import copy
    import types

    import open_clip
    from open_clip.model import _build_vision_tower, resize_pos_embed

    config = copy.deepcopy(spec.get("model_config")) or open_clip.get_model_config(spec["model"])
    if config is None:
        raise ValueError(f"open_clip has no model config {spec['model']!r}; known: {open_clip.list_models()}")
    vision_cfg = dict(config["vision_cfg"])
    if spec.get("image_size") is not None:
        vision_cfg["image_size"] = spec["image_size"]
    with _seeded(spec.get("seed", 0)):
        visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
    if spec.get("checkpoint") is not None:
        state = _load_state_dict(spec["checkpoint"], "open_clip")
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        full = {f"visual.{k}": v for k, v in state.items()}
        resize_pos_embed(full, types.SimpleNamespace(visual=visual))  # checkpoint trained at another size
        state = {k[len("visual."):]: v for k, v in full.items()}
        try:
            visual.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"open_clip checkpoint {spec['checkpoint']!r} does not fit the model config: {err}") from err
    mean = _triple(spec["mean"], "mean") if spec.get("mean") is not None else OPENAI_CLIP_MEAN
    std = _triple(spec["std"], "std") if spec.get("std") is not None else OPENAI_CLIP_STD
    return OpenCLIPExpert(visual.eval(), spec.get("layer", -2), mean, std)


def _check_sam(spec: dict) -> None:
    from ..seg.sam import SAM_BUILDERS

    variant = spec.get("variant", "vit_b")
    if variant not in SAM_BUILDERS:
        raise ValueError(f"sam expert: unknown variant {variant!r}; accepted: {sorted(SAM_BUILDERS)}")
    if spec.get("checkpoint") is None and variant != "tiny":
        raise ValueError(f"sam expert {variant!r} needs a local 'checkpoint' path (only 'tiny' may be random)")
    if spec.get("seed") is not None and not _is_int(spec["seed"]):
        raise ValueError(f"sam expert: seed must be an int, got {spec['seed']!r}")


def _build_sam(spec: dict, family: "Family") -> ExpertBackbone:
    from ..seg.sam import load_sam, tiny_sam

    variant = spec.get("variant", "vit_b")
    if spec.get("checkpoint") is not None:
        sam = load_sam(spec["checkpoint"], variant)
    else:
        sam = tiny_sam(seed=spec.get("seed", 0))
    return SAMExpert(sam.image_encoder.eval(), sam.pixel_mean, sam.pixel_std)


@dataclasses.dataclass(frozen=True)
class ExpertType:
    """How to make one kind of expert: ``build(spec, family) -> ExpertBackbone``; ``keys``: the spec keys
    it reads besides ``name``/``merge``/``queries``; ``check(spec)`` raises ValueError for bad values."""

    build: Callable[[dict, "Family"], ExpertBackbone]
    keys: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None


#: ``spec["name"]`` → how to build that expert (timm-style registry; ``register_expert`` adds to it).
EXPERT_TYPES: dict[str, ExpertType] = {
    "own": ExpertType(_build_own, ("projector", "layer"), _check_own),
    "open_clip": ExpertType(
        _build_open_clip,
        ("model", "model_config", "checkpoint", "image_size", "layer", "mean", "std", "seed"),
        _check_open_clip,
    ),
    "sam": ExpertType(_build_sam, ("variant", "checkpoint", "seed"), _check_sam),
}


def register_expert(
    name: str,
    build: Callable[[dict, "Family"], ExpertBackbone],
    keys: tuple[str, ...] = (),
    check: Callable[[dict], None] | None = None,
    replace: bool = False,
) -> None:
    """Add an expert kind: ``ExpertsConfig(experts=[{"name": name, ...}])`` then calls ``build(spec, family)``.

    ``build`` returns an ``ExpertBackbone`` (subclass it and implement ``features``); this is also how tests
    and users plug in already-built modules (a builder that returns them). ``replace=True`` overrides.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"expert name must be a non-empty string, got {name!r}")
    if name in EXPERT_TYPES and not replace:
        raise ValueError(f"expert {name!r} is already registered (pass replace=True to override)")
    EXPERT_TYPES[name] = ExpertType(build, tuple(keys), check)


# ------------------------------------------------------------------------------------------------
# Fusion modules
# ------------------------------------------------------------------------------------------------


class MLPProjector(nn.Module):
    """Multi-patch-one-token MLP: [N, R·C, F] → mh×mw windows concatenated → [N, (R/mh)·(C/mw), D].

    LLaVA-1.5's ``mlp2x_gelu`` (Linear F·mh·mw → D, GELU, Linear D → D) on the merged windows.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], merge: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        (R, C), (mh, mw) = grid, merge
        if R % mh or C % mw:
            raise ValueError(f"merge window {mh}×{mw} does not tile the expert's {R}×{C} grid")
        self.grid, self.merge = (R, C), (mh, mw)
        self.fc1 = nn.Linear(in_dim * mh * mw, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    @property
    def out_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.merge[0], self.grid[1] // self.merge[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, n, dim = x.shape
        (R, C), (mh, mw) = self.grid, self.merge
        if n != R * C:
            raise ValueError(f"expected {R}×{C}={R * C} expert features, got {n}")
        if (mh, mw) != (1, 1):
            x = x.reshape(N, R // mh, mh, C // mw, mw, dim).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(N, (R // mh) * (C // mw), mh * mw * dim)
        return self.fc2(self.act(self.fc1(x)))


class QFormerBlock(nn.Module):
    """Pre-LN block on queries [N, Q, D]: self-attention, cross-attention to features [N, n, D], MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm2(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class QFormerResampler(nn.Module):
    """Q-Former-style resampler: features [N, n, F] → ``num_queries`` tokens [N, Q, D] of the LM width."""

    def __init__(self, in_dim: int, width: int, num_queries: int, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"qformer_heads {heads} must divide the language model's width {width}")
        self.input = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.blocks = nn.ModuleList([QFormerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, width)
        self.out_grid = query_grid(num_queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.input(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.output(self.norm(q))


# ------------------------------------------------------------------------------------------------
# Config and stage
# ------------------------------------------------------------------------------------------------


def _default_experts() -> list[dict]:
    return [{"name": "own"}]


@dataclasses.dataclass
class ExpertsConfig(StageConfig):
    """MouSi poly-visual experts (an ``"encoder"`` stage; see the module docstring for every choice).

    experts: expert specs (JSON dicts, ``{"name": "own" | "open_clip" | "sam" | registered, ...}``), in
    token order; fusion: ``"mlp"`` (per-expert projector, tokens concatenated) or ``"qformer"``
    (``queries`` tokens per expert); positions: ``"original"`` | ``"shared"`` | ``"row"`` (reference
    §5.3, per expert block); merge: default multi-patch-one-token window of MLP fusion (m or [mh, mw]);
    queries / qformer_layers / qformer_heads: the resampler; image_mean / image_std: the wrapped model's
    pixel normalisation (to de-normalise its ``pixel_values``); seed: initialisation of the fusion modules.
    Per-expert ``"merge"`` / ``"queries"`` in a spec override the defaults.
    """

    type = "experts"
    requires = ("single_tile",)
    exclusive = True  # one stage decides how images are encoded

    experts: list = dataclasses.field(default_factory=_default_experts)
    fusion: str = "mlp"
    positions: str = "original"
    merge: Any = 1
    queries: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 8
    image_mean: list = dataclasses.field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list = dataclasses.field(default_factory=lambda: list(OPENAI_CLIP_STD))
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON-normal form (lists, not tuples), so that from_dict(to_dict()) == self and specs are copies.
        if isinstance(self.experts, (list, tuple)):
            try:
                self.experts = json.loads(json.dumps(list(self.experts)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"ExpertsConfig.experts must be JSON-serialisable dicts: {err}") from None
        for name in ("merge", "image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        super().__post_init__()

    @property
    def sets_positions(self) -> bool:
        """``shared`` / ``row`` remap positions themselves: ``wrap`` refuses a position stage next to them."""
        return self.positions != "original"

    @classmethod
    def example(cls) -> "ExpertsConfig":
        """The wrapped model's own tower as the only expert (no open_clip / SAM weights needed)."""
        return cls(experts=[{"name": "own"}])

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"ExpertsConfig.fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        if self.positions not in MODES:
            raise ValueError(f"ExpertsConfig.positions must be one of {list(MODES)}, got {self.positions!r}")
        merge_window(self.merge, "ExpertsConfig.merge")
        query_grid(self.queries)
        for name in ("qformer_layers", "qformer_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"ExpertsConfig.{name} must be an int >= 1, got {value!r}")
        mean, std = _triple(self.image_mean, "image_mean"), _triple(self.image_std, "image_std")
        if min(std) <= 0 or not all(math.isfinite(v) for v in (*mean, *std)):
            raise ValueError(f"image_std must be positive and image_mean/std finite, got {self.image_mean}, {self.image_std}")
        if not _is_int(self.seed):
            raise ValueError(f"ExpertsConfig.seed must be an int, got {self.seed!r}")
        if not isinstance(self.experts, list) or not self.experts:
            raise ValueError(f"ExpertsConfig.experts must be a non-empty list of expert specs, got {self.experts!r}")
        for i, spec in enumerate(self.experts):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ValueError(f"experts[{i}] must be a dict with a 'name', got {spec!r}")
            kind = EXPERT_TYPES.get(spec["name"])
            if kind is None:
                raise ValueError(f"experts[{i}]: unknown expert {spec['name']!r}; known: {sorted(EXPERT_TYPES)} "
                                 "(add others with vlmkit.vision.experts.register_expert)")
            unknown = sorted(set(spec) - set(COMMON_KEYS) - set(kind.keys))
            if unknown:
                raise ValueError(f"experts[{i}] ({spec['name']}): unknown key(s) {unknown}; accepted: "
                                 f"{sorted(set(COMMON_KEYS) | set(kind.keys))}")
            if "merge" in spec:
                merge_window(spec["merge"], f"experts[{i}].merge")
            if "queries" in spec:
                query_grid(spec["queries"])
            if kind.check is not None:
                try:
                    kind.check(spec)
                except ValueError as err:
                    raise ValueError(f"experts[{i}]: {err}") from None

    def expert_merge(self, i: int) -> tuple[int, int]:
        return merge_window(self.experts[i].get("merge", self.merge))

    def expert_queries(self, i: int) -> int:
        return int(self.experts[i].get("queries", self.queries))


@register_stage(ExpertsConfig)
class ExpertsStage(EncoderStage):
    """Encodes every image with all experts and fuses them (``encode_images``); realises ``positions``.

    Built modules appear at ``attach`` (``wrap`` time): ``fusers`` (trainable, saved) and the frozen
    backbones (``experts``, hidden from ``parameters()``). ``tokens_per_expert`` / ``blocks`` give the layout.
    """

    def __init__(self, config: ExpertsConfig) -> None:
        super().__init__(config)
        self.fusers = nn.ModuleList()
        self._experts: list[ExpertBackbone] = []  # plain list: not registered, not trained, not saved
        self._grids: list[tuple[int, int]] = []

    # --- building ---------------------------------------------------------------------------------
    @property
    def experts(self) -> list[ExpertBackbone]:
        return list(self._experts)

    def attach(self, family: "Family") -> None:
        if self._experts:  # already built (attach after detach): keep the trained fusion modules
            return
        embeddings = family.model.get_input_embeddings()
        width = int(embeddings.embedding_dim)
        device, dtype = embeddings.weight.device, embeddings.weight.dtype
        cfg = self.config
        experts, fusers, grids = [], [], []
        for i, spec in enumerate(cfg.experts):
            expert = EXPERT_TYPES[spec["name"]].build(spec, family)
            if not isinstance(expert, ExpertBackbone):
                raise TypeError(f"experts[{i}] ({spec['name']}): the builder returned {type(expert).__name__}, "
                                "not an ExpertBackbone")
            experts.append(expert)
        with _seeded(cfg.seed):
            for i, expert in enumerate(experts):
                if cfg.fusion == "mlp":
                    merge = cfg.expert_merge(i)
                    if expert.in_language_space and merge == (1, 1):
                        fuser, grid = nn.Identity(), expert.grid
                    else:
                        try:
                            fuser = MLPProjector(expert.feature_dim, width, expert.grid, merge)
                        except ValueError as err:
                            raise ValueError(f"experts[{i}] ({cfg.experts[i]['name']}): {err}") from None
                        grid = fuser.out_grid
                else:
                    fuser = QFormerResampler(
                        expert.feature_dim, width, cfg.expert_queries(i), cfg.qformer_heads, cfg.qformer_layers,
                    )
                    grid = fuser.out_grid
                fusers.append(fuser)
                grids.append(grid)
        for expert in experts:
            if not isinstance(expert, OwnTowerExpert):
                expert.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.fusers = nn.ModuleList(fusers).to(device=device, dtype=dtype)
        self._experts, self._grids = experts, grids

    def _check_built(self) -> None:
        if not self._experts:
            raise ValueError("the experts stage is not attached to a model yet; use vlmkit.wrap(model, ExpertsConfig(...)) "
                             "or stage.attach(family) first")

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for expert in self._experts:  # hidden backbones follow .to() / .cuda() / .half()
            expert._apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for expert in self._experts:  # frozen backbones always run in eval mode
            expert.eval()
        return self

    # --- layout -----------------------------------------------------------------------------------
    @property
    def tokens_per_expert(self) -> list[int]:
        self._check_built()
        return [h * w for h, w in self._grids]

    @property
    def blocks(self) -> list[tuple[int, tuple[int, int]]]:
        """[(offset, (h, w))] of each expert's tokens in an image's run."""
        self._check_built()
        out, offset = [], 0
        for h, w in self._grids:
            out.append((offset, (h, w)))
            offset += h * w
        return out

    def placeholders_per_image(self, family: "Family") -> int:
        return sum(self.tokens_per_expert)

    # --- encoding ---------------------------------------------------------------------------------
    def encode_images(self, family: "Family", pixel_values, input_ids=None, **image_kwargs) -> list[VisualTokens]:
        """``pixel_values`` [N, 3, H, W] (one row per image) → N ``VisualTokens`` of Σ_k T_k fused tokens [T, D]."""
        self._check_built()
        family.check_pixel_values(pixel_values)
        device = pixel_values.device
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.config.image_std, dtype=torch.float32, device=device)
        runs = []
        for i, (expert, fuser, grid) in enumerate(zip(self._experts, self.fusers, self._grids)):
            feats = expert.encode(family, pixel_values, mean, std, **image_kwargs)
            if feats.dim() != 3 or feats.shape[1] != expert.num_cells or feats.shape[2] != expert.feature_dim:
                raise ValueError(
                    f"experts[{i}] ({self.config.experts[i]['name']}) gave features {tuple(feats.shape)}, expected "
                    f"[{pixel_values.shape[0]}, {expert.num_cells}, {expert.feature_dim}]"
                )
            param = next(fuser.parameters(), None)
            if param is not None:
                feats = feats.to(device=param.device, dtype=param.dtype)
            tokens = fuser(feats)
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"experts[{i}]: fusion gave {tokens.shape[1]} tokens, expected {grid[0] * grid[1]}")
            runs.append(tokens)
        embeds = torch.cat([r.to(runs[0].dtype) for r in runs], dim=1)  # [N, T, D]
        T = embeds.shape[1]
        index = torch.arange(T, device=embeds.device)
        blocks = self.blocks
        return [
            VisualTokens(embeds=embeds[n], index=index, grid=(1, T), num_uncompressed=T, blocks=list(blocks))
            for n in range(embeds.shape[0])
        ]

    # --- positions --------------------------------------------------------------------------------
    def rope_positions(self, batch: "AssembledBatch") -> torch.Tensor:
        """[B, L] float64 positions of ``batch`` under ``config.positions`` (expert blocks laid out in turn)."""
        return mousi_position_ids(
            self.config.positions, batch.attention_mask, batch.image_id, batch.visual_index,
            [t.grid[1] for t in batch.tokens], [t.num_uncompressed for t in batch.tokens],
            [t.blocks for t in batch.tokens],
        ).to(torch.float64)

    @contextlib.contextmanager
    def language_context(self, family: "Family", batch: "AssembledBatch") -> Iterator[None]:
        if self.config.positions == "original":
            yield
            return
        from ..position.rotary import rotary_embedding

        with _remap_prompt_positions(rotary_embedding(family), self.rope_positions(batch), batch.attention_mask,
                                     self.config.positions):
            yield


@contextlib.contextmanager
def _remap_prompt_positions(rotary: nn.Module, rope: torch.Tensor, attention_mask: torch.Tensor, mode: str):
    """Within the ``with``, ``rotary(x, position_ids)`` uses the scheme positions ``rope`` [B, L].

    A call over the whole prompt (``position_ids`` [B' or 1, L]) gets ``rope`` column by column (rows
    repeated when B' = k·B for beams); later calls continue at ``rope_last + (id - id_last)``, with id_last
    the model's own integer position of each row's last prompt token in the prompt call.
    """
    B, L = rope.shape
    cols = torch.arange(L, device=attention_mask.device)
    last_col = torch.where(attention_mask != 0, cols, torch.full_like(cols, -1)).max(dim=1).values.clamp(min=0)
    rope_last = rope.gather(1, last_col[:, None].to(rope.device))[:, 0]  # [B]
    state: dict[str, torch.Tensor] = {}
    original = rotary.forward

    def expand(t: torch.Tensor, rows: int) -> torch.Tensor:  # [B, ...] -> [rows, ...] (beams repeat rows)
        if rows % B:
            raise RuntimeError(f"the rotary embedding got {rows} rows of positions for a batch of {B}")
        return t.repeat_interleave(rows // B, dim=0)

    def forward(x, position_ids=None, *args, **kwargs):
        if position_ids is None or torch.is_floating_point(position_ids):
            raise ValueError(
                f"ExpertsConfig(positions={mode!r}) sets the visual positions itself, but the rotary embedding got "
                f"{'no' if position_ids is None else 'float (another position scheme)'} position ids; wrap with "
                "ExpertsConfig(positions='original') plus MouSiPositionConfig(mode=...) to use a position stage"
            )
        rows = B if position_ids.shape[0] == 1 else position_ids.shape[0]
        ids = position_ids.to(torch.float64).expand(rows, -1)  # [rows, S]
        dev = ids.device
        if ids.shape[-1] == L:  # the whole prompt
            id_last = ids.gather(1, expand(last_col.to(dev), rows)[:, None])[:, 0]
            state["delta"] = (expand(rope_last.to(dev), rows) - id_last).view(B, -1)[:, 0]  # [B]
            pos = expand(rope.to(dev), rows)
        else:
            if "delta" not in state:
                raise RuntimeError(f"the rotary embedding got {ids.shape[-1]} positions before the {L}-token prompt")
            pos = ids + expand(state["delta"].to(dev), rows)[:, None]
        return original(x, pos.to(torch.float32), *args, **kwargs)

    with patch_forward(rotary, forward):
        yield
