"""SEED config: :class:`SEEDConfig`, its choices, the image token strings and the BOI/EOI resolution.

The method and the design choices are documented in the package docstring (``vlmkit.vision.seed``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from vlmkit.config import StageConfig

MARKER_MODES = ("auto", "reference", "namespaced")
IMAGE_HEADS = ("mlp", "qformer")
PHASES = ("qformer", "codebook", "both")


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
    display_name = "SEED"
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

    @classmethod
    def example(cls) -> "SEEDConfig":
        return cls(codebook=64, code_dim=8, width=32, layers=2, heads=2, intermediate=64, decoder_depth=1,
                   decoder_heads=2, contrastive_dim=16)

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
