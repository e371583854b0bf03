"""Expert backbones (frozen vision encoders as MouSi experts), their spec builders and the ``EXPERT_TYPES``
registry (``register_expert``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checks import _is_int, _triple

if TYPE_CHECKING:
    from ...families.base import Family

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
            dim = family.text_width
        else:
            (H, W), (ph, pw) = family.image_size, family.patch_size
            grid = (H // ph, W // pw)
            dim = family.vision_width
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
        hidden = family.vision_hidden_states(pixel_values, self.layer)
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
    from ...seg.sam import SAM_BUILDERS

    variant = spec.get("variant", "vit_b")
    if variant not in SAM_BUILDERS:
        raise ValueError(f"sam expert: unknown variant {variant!r}; accepted: {sorted(SAM_BUILDERS)}")
    if spec.get("checkpoint") is None and variant != "tiny":
        raise ValueError(f"sam expert {variant!r} needs a local 'checkpoint' path (only 'tiny' may be random)")
    if spec.get("seed") is not None and not _is_int(spec["seed"]):
        raise ValueError(f"sam expert: seed must be an int, got {spec['seed']!r}")


def _build_sam(spec: dict, family: "Family") -> ExpertBackbone:
    from ...seg.sam import load_sam, tiny_sam

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
