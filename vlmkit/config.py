"""Stage configs: small dataclasses with a ``type`` string, a registry from type to class, JSON round trip.

A config only describes a stage; ``config.build()`` makes the stage module. The registry maps each
``type`` to ``"module:Class"`` strings and imports lazily, so ``import vlmkit`` does no work.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

# type string -> "module:ConfigClass" of the built-in stages. Imported on first use only (timm-style,
# no import-time work); third-party stages add themselves with ``register_config``.
_CONFIG_PATHS: dict[str, str] = {
    "fopru": "vlmkit.compress.fopru:FoPruConfig",
    "random": "vlmkit.compress.random:RandomPruneConfig",
    "divprune": "vlmkit.compress.divprune:DivPruneConfig",
    "pvc": "vlmkit.compress.pvc:PVCConfig",
    "v2pe": "vlmkit.position.v2pe:V2PEConfig",
    "mousi_position": "vlmkit.position.mousi:MouSiPositionConfig",
    "text4seg": "vlmkit.seg.text4seg:Text4SegConfig",
    "read": "vlmkit.seg.read:READConfig",
    "pmp": "vlmkit.seg.pmp:PMPConfig",
    "seed": "vlmkit.vision.seed:SEEDConfig",
    "experts": "vlmkit.vision.experts:ExpertsConfig",
}
_CONFIG_CLASSES: dict[str, type["StageConfig"]] = {}


def register_config(type_name: str, path: str) -> None:
    """Register a config class by dotted path, e.g. ``register_config("fopru", "vlmkit.compress.fopru:FoPruConfig")``."""
    if type_name in _CONFIG_PATHS and _CONFIG_PATHS[type_name] != path:
        raise ValueError(f"stage type {type_name!r} is already registered to {_CONFIG_PATHS[type_name]!r}")
    _CONFIG_PATHS[type_name] = path


def register_config_class(cls: type["StageConfig"]) -> type["StageConfig"]:
    """Class decorator registering a config class under its ``type`` (for stages outside vlmkit)."""
    if not cls.type:
        raise ValueError(f"{cls.__name__} sets no 'type'")
    _CONFIG_CLASSES[cls.type] = cls
    return cls


def registered_types() -> list[str]:
    """All stage ``type`` strings a config can name."""
    return sorted(set(_CONFIG_PATHS) | set(_CONFIG_CLASSES))


def config_class(type_name: str) -> type["StageConfig"]:
    """The config class registered for ``type_name``; ValueError naming the known types otherwise."""
    if type_name in _CONFIG_CLASSES:
        return _CONFIG_CLASSES[type_name]
    if type_name not in _CONFIG_PATHS:
        raise ValueError(f"unknown stage type {type_name!r}; known types: {registered_types()}")
    module, name = _CONFIG_PATHS[type_name].split(":")
    cls = getattr(importlib.import_module(module), name)
    _CONFIG_CLASSES[type_name] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> "StageConfig":
    """Rebuild a config from ``to_dict()`` output; unknown ``type`` or fields raise ValueError."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"a stage config must be a dict with a 'type' key, got {data!r}")
    fields = dict(data)
    cls = config_class(fields.pop("type"))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for stage type {cls.type!r}; accepted: {sorted(known)}")
    return cls(**fields)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class StageConfig:
    """Base of every stage config.

    Subclasses set ``type`` (registry key) and ``role``; ``role`` fixes where the stage runs in the
    pipeline: ``"encoder"`` (changes how images are encoded), ``"compressor"`` (drops or merges visual
    tokens), ``"position"`` (position ids) or ``"head"`` (output heads). ``validate()`` runs on
    construction and raises ValueError for values that are wrong regardless of the model; checks that
    need the model happen in ``Stage.attach`` at ``wrap()`` time.
    """

    type: ClassVar[str] = ""
    role: ClassVar[str] = ""
    stage_class: ClassVar[str] = ""  # "module:Class" of the nn.Module this config builds
    exclusive: ClassVar[bool] = False  # True: no other stage of the same role may be combined with it

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for invalid field values (override)."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageConfig":
        config = config_from_dict(data)
        if not isinstance(config, cls):
            raise ValueError(f"{data.get('type')!r} is not a {cls.__name__}")
        return config

    def build(self):
        """Instantiate the stage module (``vlmkit.stage.Stage``) this config describes."""
        module, name = self.stage_class.split(":")
        return getattr(importlib.import_module(module), name)(self)



def _literal(text: str) -> Any:
    """Parse a command-line value: int, float, true/false/none, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_stage_spec(spec: str, role: str | None = None) -> StageConfig:
    """Build a config from a command-line spec: ``TYPE[:VALUE,...][,FIELD=VALUE,...]``.

    Positional values fill the config's fields in order: ``"v2pe:64"`` is ``V2PEConfig(stride=64)``,
    ``"fopru:0.25,strategy=row"`` is ``FoPruConfig(keep_ratio=0.25, strategy="row")``. For pruning
    configs (fields ``keep_ratio`` and ``num_keep``) a lone value is a ratio when it is a float and a
    token count when it is an integer: ``"fopru:0.25"`` keeps a quarter, ``"fopru:64"`` keeps 64.
    ``role`` ("compressor", "position", …), when given, must be the config's role.
    """
    type_name, _, rest = spec.strip().partition(":")
    cls = config_class(type_name.strip())
    if role is not None and cls.role != role:
        raise ValueError(f"stage {type_name!r} is a {cls.role!r} stage, not a {role!r} stage (spec {spec!r})")
    names = [f.name for f in dataclasses.fields(cls)]
    parts = [p for p in rest.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0] and {"keep_ratio", "num_keep"} <= set(names):
        value = _literal(parts[0].strip())
        return cls(**{"num_keep" if isinstance(value, int) else "keep_ratio": value})
    kwargs: dict[str, Any] = {}
    named = False
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if eq:
            named = True
            kwargs[key.strip()] = _literal(value.strip())
        elif named or i >= len(names):
            raise ValueError(f"in stage spec {spec!r}: positional value {key!r} after named ones or too many values")
        else:
            kwargs[names[i]] = _literal(key.strip())
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"in stage spec {spec!r}: unknown field(s) {unknown}; {type_name} takes {names}")
    return cls(**kwargs)
