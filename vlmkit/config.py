"""Stage configs (small dataclasses with a ``type`` string, JSON round trip) and the one stage registry.

A config only describes a stage; ``config.build()`` makes the stage module. ``@register_stage(Config)`` on
the stage class is the one registration point; the built-in stage packages are imported on the first
look-up, so ``import vlmkit`` does no work.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, ClassVar

#: Packages whose modules hold the built-in stages. On the first registry look-up every module below them is
#: imported once, so each method's ``@register_stage`` line is all it takes to be found (timm-style: nothing
#: happens at ``import vlmkit``). Stages outside vlmkit register when their module is imported.
STAGE_PACKAGES = ("vlmkit.compress", "vlmkit.decoder", "vlmkit.position", "vlmkit.seg", "vlmkit.vision")

#: type string -> (config class, stage class)
_REGISTRY: dict[str, tuple[type["StageConfig"], type]] = {}
_discovered = False


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_stage(config_cls: type["StageConfig"]):
    """Class decorator on a stage: ``@register_stage(FoPruConfig)`` above ``class FoPru(PruneStage)``.

    Registers ``config_cls.type`` for ``vlmkit.load``, ``config_from_dict``, the CLI specs, the compatibility
    matrix, the demo sweep (pruners) and the conformance tests. The config takes its ``role`` from the stage
    class's role base. A type registered twice (by other classes) is an error.
    """
    from .stage import ROLES, Stage

    def decorate(stage_cls: type) -> type:
        if not (isinstance(config_cls, type) and issubclass(config_cls, StageConfig) and dataclasses.is_dataclass(config_cls)):
            raise TypeError(f"register_stage takes a StageConfig dataclass, got {config_cls!r}")
        if not (isinstance(stage_cls, type) and issubclass(stage_cls, Stage)) or stage_cls.role not in ROLES:
            raise TypeError(f"{stage_cls!r} must derive from a role base of vlmkit.stage ({list(ROLES)})")
        name = config_cls.type
        if not isinstance(name, str) or not name:
            raise ValueError(f"{config_cls.__name__} sets no 'type'")
        if not stage_cls.__module__.startswith(tuple(p + "." for p in STAGE_PACKAGES)):
            _discover()  # a stage from outside: the built-in names must be known before it may take one
        known = _REGISTRY.get(name)
        if known is not None and (_qualname(known[0]), _qualname(known[1])) != (_qualname(config_cls), _qualname(stage_cls)):
            raise ValueError(f"stage type {name!r} is already registered to {_qualname(known[1])}; "
                             f"cannot register {_qualname(stage_cls)} under the same name")
        config_cls.role = stage_cls.role
        config_cls.stage_class = stage_cls
        _REGISTRY[name] = (config_cls, stage_cls)
        return stage_cls

    return decorate


def _discover() -> None:
    """Import every module of ``STAGE_PACKAGES`` once (their ``@register_stage`` lines fill the registry)."""
    global _discovered
    if _discovered:
        return
    import pkgutil

    _discovered = True
    for package in STAGE_PACKAGES:
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError as err:
            if err.name == package:
                continue
            raise
        for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
            importlib.import_module(info.name)


def registered_types() -> list[str]:
    """All stage ``type`` strings a config can name."""
    _discover()
    return sorted(_REGISTRY)


def registered_configs(role: str | None = None, pruner: bool | None = None) -> list[type["StageConfig"]]:
    """Registered config classes (sorted by type), optionally of one ``role`` / only pruners."""
    _discover()
    out = [_REGISTRY[t][0] for t in sorted(_REGISTRY)]
    if role is not None:
        out = [c for c in out if c.role == role]
    if pruner is not None:
        out = [c for c in out if c.pruner == pruner]
    return out


def registered_config_named(class_name: str) -> type["StageConfig"] | None:
    """The registered config class called ``class_name`` (``vlmkit.FoPruConfig``), or None."""
    if not class_name.endswith("Config"):
        return None
    _discover()
    return next((c for c, _ in _REGISTRY.values() if c.__name__ == class_name), None)


def config_class(type_name: str) -> type["StageConfig"]:
    """The config class registered for ``type_name``; ValueError naming the known types otherwise."""
    if type_name not in _REGISTRY:
        _discover()
    if type_name not in _REGISTRY:
        raise ValueError(f"unknown stage type {type_name!r}; known types: {registered_types()}")
    return _REGISTRY[type_name][0]


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
    """Base of every stage config: what a stage is, as a dataclass that round-trips through JSON.

    Subclasses set ``type`` (registry key); ``role`` and ``stage_class`` come from the stage class registered
    with ``@register_stage``. ``validate()`` runs on construction and raises ValueError for values that are
    wrong regardless of the model; checks that need the model happen at ``wrap()`` time: the family must
    have every capability in ``requires`` (``Family.require``), then ``Stage.attach`` checks the rest.
    """

    type: ClassVar[str] = ""
    role: ClassVar[str] = ""  # set by register_stage from the stage class's role base
    stage_class: ClassVar[type | None] = None  # set by register_stage
    exclusive: ClassVar[bool] = False  # True: no other stage of the same role may be combined with it
    #: family capabilities the stage needs, all of them (``vlmkit.families.base.CAPABILITIES``); wrap() refuses others.
    #: Alternatives are one implied name (``IMPLIED_CAPABILITIES``: ``rope_positions`` = ``rope_1d`` or ``mrope``)
    requires: ClassVar[tuple[str, ...]] = ()
    #: family capabilities that no longer hold once this stage replaced the model's visual tokens (an encoder whose
    #: tokens are not the tower's patch grid: MouSi experts); wrap() refuses other stages that require them
    hides_capabilities: ClassVar[tuple[str, ...]] = ()
    #: True for pruners (``keep_ratio`` / ``num_keep`` budgets: the visual tokens of each image the language model's
    #: later layers see), compressors and decoder stages alike: the demo sweep and the benchmarks run them
    pruner: ClassVar[bool] = False
    #: name in tables, plots and reports (default: the class name without ``Config``)
    display_name: ClassVar[str] = ""
    #: images each sample must hold for the stage to apply (PMP decodes one image per sample), None = any
    images_per_sample: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for invalid field values (override)."""

    @classmethod
    def example(cls) -> "StageConfig":
        """A small valid config for the conformance tests and the compatibility matrix (override when the
        defaults need arguments or are too large for a tiny model)."""
        return cls()

    @classmethod
    def variants(cls) -> dict[str, "StageConfig"]:
        """Named variants that reports show side by side (the compatibility matrix's columns, the demo's sweep):
        default one, ``{"": example()}``; FoPru: ``{"rank": …, "row": …}``."""
        return {"": cls.example()}

    @classmethod
    def title(cls) -> str:
        """``display_name``, else the class name without ``Config``."""
        name = cls.__name__
        return cls.display_name or (name[: -len("Config")] if name.endswith("Config") else name)

    @property
    def sets_positions(self) -> bool:
        """Whether the stage decides the language model's positions (at most one such stage per model)."""
        return self.role == "position"

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
        if self.stage_class is None:
            raise ValueError(f"{type(self).__name__} ({self.type!r}) has no registered stage: decorate its stage "
                             f"class with @vlmkit.config.register_stage({type(self).__name__})")
        return self.stage_class(self)


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


#: spec-only short names of fields: ``fopru:n=64`` is ``num_keep=64``
SPEC_ALIASES = {"n": "num_keep"}


def _spec_value(cls, name: str, value: Any, spec: str) -> Any:
    """``value`` for field ``name`` of ``cls``, checked against the field's annotation: a ``float`` field takes a
    number (ints become floats), an ``int`` field an integer, a ``bool`` field true/false (``None`` passes when the
    annotation allows it). Other annotations are left to the config's own ``validate()``."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    kinds = set(re.findall(r"[A-Za-z_]+", annotation))
    if value is None and "None" in kinds:
        return value
    if kinds - {"None"} == {"bool"}:
        if not isinstance(value, bool):
            raise ValueError(f"in stage spec {spec!r}: {name} must be true or false, got {value!r}")
    elif kinds - {"None"} in ({"float"}, {"int", "float"}):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"in stage spec {spec!r}: {name} must be a number, got {value!r}")
    elif kinds - {"None"} == {"int"}:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"in stage spec {spec!r}: {name} must be an integer, got {value!r}")
    return value


def parse_stage_spec(spec: str, role: str | None = None) -> StageConfig:
    """Build a config from a command-line spec: ``TYPE[:VALUE,...][,FIELD=VALUE,...]``.

    Positional values fill the config's fields in order: ``"v2pe:64"`` is ``V2PEConfig(stride=64)``,
    ``"fopru:0.25,strategy=row"`` is ``FoPruConfig(keep_ratio=0.25, strategy="row")``. For pruning configs
    (fields ``keep_ratio`` and ``num_keep``) a lone value is always a keep ratio in (0, 1] (``"fopru:1"`` keeps
    every token); a token count is written out: ``"fopru:n=64"`` (or ``num_keep=64``) keeps 64 tokens, and
    ``"fopru:64"`` is an error that says so. Values are checked against the fields' annotations (a number field
    takes a number). ``role`` ("compressor", "position", …), when given, must be the config's role.
    Every error is a ``ValueError`` naming the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty stage spec {spec!r}; expected TYPE[:VALUE,...], e.g. fopru:0.25")
    type_name, _, rest = spec.strip().partition(":")
    cls = config_class(type_name.strip())
    if role is not None and cls.role != role:
        raise ValueError(f"stage {type_name!r} is a {cls.role!r} stage, not a {role!r} stage (spec {spec!r})")
    names = [f.name for f in dataclasses.fields(cls)]
    raw = rest.split(",") if rest.strip() else []
    if any(not p.strip() for p in raw):
        raise ValueError(f"in stage spec {spec!r}: an empty value (a stray comma?)")
    parts = [p.strip() for p in raw]
    budget = {"keep_ratio", "num_keep"} <= set(names)
    if len(parts) == 1 and "=" not in parts[0] and budget:
        value = _literal(parts[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            hint = (f"; to keep {value} tokens write {type_name}:n={value}"
                    if isinstance(value, int) and not isinstance(value, bool) and value > 1 else "")
            raise ValueError(f"in stage spec {spec!r}: a lone value is a keep ratio in (0, 1], got {parts[0]!r}{hint}")
        return _build(cls, {"keep_ratio": float(value)}, spec)
    kwargs: dict[str, Any] = {}
    named = False
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        key = key.strip()
        if eq:
            named = True
            key = SPEC_ALIASES.get(key, key) if budget else key
            if key in kwargs:
                raise ValueError(f"in stage spec {spec!r}: {key} is given twice")
            kwargs[key] = _literal(value.strip())
        elif named or i >= len(names):
            raise ValueError(f"in stage spec {spec!r}: positional value {key!r} after named ones or too many values")
        else:
            kwargs[names[i]] = _literal(key)
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"in stage spec {spec!r}: unknown field(s) {unknown}; {type_name} takes {names}")
    return _build(cls, {k: _spec_value(cls, k, v, spec) for k, v in kwargs.items()}, spec)


def _build(cls, kwargs: dict[str, Any], spec: str) -> StageConfig:
    """``cls(**kwargs)``; its validation errors (and type errors of odd values) name the spec."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"in stage spec {spec!r}: {err}") from err
