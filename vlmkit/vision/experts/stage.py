"""The experts stage: ``ExpertsConfig`` and the ``ExpertsStage`` encoder stage (builds the experts and their
fusion at ``attach``, encodes images into fused token runs) with its rotary position remap."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ...config import StageConfig, register_stage
from ...position.mousi import MODES, mousi_position_ids
from ...position.rotary import patch_forward
from ...stage import EncoderStage
from ...tokens import VisualTokens
from .backbones import EXPERT_TYPES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ExpertBackbone, OwnTowerExpert, _seeded
from .checks import _is_int, _triple, merge_window, query_grid
from .fusion import MLPProjector, QFormerResampler

if TYPE_CHECKING:
    from ...families.base import Family
    from ...sequence import AssembledBatch

FUSIONS = ("mlp", "qformer")
COMMON_KEYS = ("name", "merge", "queries")  # keys every expert spec may hold


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
    (``queries`` tokens per expert); positions: ``"original"`` | ``"shared"`` | ``"row"`` (applied
    per expert block); merge: default multi-patch-one-token window of MLP fusion (m or [mh, mw]);
    queries / qformer_layers / qformer_heads: the resampler; image_mean / image_std: the wrapped model's
    pixel normalisation (to de-normalise its ``pixel_values``); seed: initialisation of the fusion modules.
    Per-expert ``"merge"`` / ``"queries"`` in a spec override the defaults.
    """

    type = "experts"
    display_name = "MouSi experts"
    requires = ("single_tile",)
    exclusive = True  # one stage decides how images are encoded
    # its fused token runs are not the tower's patch grid: FoPru, VisionZip, VisPruner, PVC cannot score them
    hides_capabilities = ("patch_grid", "vision_attention")

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
        embeddings = family.input_embeddings
        width = family.text_width
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
        from ...position.rotary import rotary_embedding

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
