"""PEFT recipes (``adapters/*.yaml``): which modules get LoRA / QLoRA / DoRA, which are trained in full.

A recipe names model *parts*, resolved by the family of the model being tuned:

- ``projector``, ``vision_tower``, ``language_model`` → ``Family.part_paths`` of the model's family (the
  transformers 5.x module paths, e.g. ``model.multi_modal_projector`` for LLaVA / InternVL,
  ``model.connector`` for SmolVLM, ``model.visual.merger`` for Qwen2.5-VL),
- ``embeddings`` → the module ``get_input_embeddings()`` returns, ``lm_head`` → ``get_output_embeddings()``.

Any other entry must be a dotted module path of the model (``model.language_model.norm``). LoRA goes
on the HF model (``peft.get_peft_model``), fully trained parts through PEFT's ``modules_to_save``, so
the saved adapter stays a plain PEFT adapter; vlmkit stages are trained in place on the wrapper.
Conventions follow LLaMA-Factory / ms-swift (``lora_target: all`` = every linear layer of the language
model, lm_head and projector excluded; alpha defaults to 2·r; vision tower frozen).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECIPE_DIRS_ENV = "VLMKIT_ADAPTERS"  # extra folders (os.pathsep-separated) searched for recipes by name

# part aliases whose module path the model's family knows (``Family.part_paths``); the two embeddings are
# found by identity instead
MODULE_PARTS = ("projector", "vision_tower", "language_model")
PARTS = (*MODULE_PARTS, "embeddings", "lm_head")
METHODS = ("lora", "freeze")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraSpec:
    """LoRA block. ``target``: ``"all-linear"`` or module-name suffixes (``[q_proj, v_proj]``);
    ``scope``: parts searched for targets; ``alpha`` None → 2·r (LLaMA-Factory default)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target: str | list[str] = "all-linear"
    scope: list[str] = dataclasses.field(default_factory=lambda: ["language_model"])
    use_dora: bool = False
    use_rslora: bool = False
    bias: str = "none"


@dataclasses.dataclass
class QuantSpec:
    """bitsandbytes k-bit base (QLoRA). ``modules``: parts whose linear layers are quantized
    (fully trained parts and lm_head never are); ``compute_dtype`` "auto" = the model's dtype."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    modules: list[str] = dataclasses.field(default_factory=lambda: ["language_model"])


@dataclasses.dataclass
class StageSpec:
    """vlmkit stages (by config ``type``) whose parameters train. ``train``: required (error when the
    wrapped model lacks them); ``optional``: trained when present, otherwise skipped with a note."""

    train: list[str] = dataclasses.field(default_factory=list)
    optional: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainDefaults:
    """Training hyper-parameters; command-line flags override them."""

    lr: float = 2e-4
    batch_size: int = 2
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    max_length: int | None = None
    save_every: int = 0


@dataclasses.dataclass
class Recipe:
    """One fine-tuning recipe. ``method``: ``lora`` (PEFT adapter; DoRA / QLoRA through ``lora`` /
    ``quantization``) or ``freeze`` (no adapter: only ``train`` parts learn, stage-1 style)."""

    name: str
    description: str = ""
    method: str = "lora"
    lora: LoraSpec | None = None
    quantization: QuantSpec | None = None
    train: list[str] = dataclasses.field(default_factory=list)
    stages: StageSpec = dataclasses.field(default_factory=StageSpec)
    defaults: TrainDefaults = dataclasses.field(default_factory=TrainDefaults)
    source: str = "<dict>"  # file the recipe came from (for error messages)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


_SECTIONS: dict[str, type] = {"lora": LoraSpec, "quantization": QuantSpec, "stages": StageSpec, "defaults": TrainDefaults}
_TOP_KEYS = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]


def _fail(source: str, where: str, message: str) -> ValueError:
    return ValueError(f"{source}: {where}: {message}")


def _names(value: Any, source: str, where: str) -> list[str]:
    """A list of strings (a single string is a one-item list)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, where, f"expected a list of names, got {value!r}")
    return list(value)


def _typed(value: Any, annotation: str, source: str, where: str) -> Any:
    """Check/convert one scalar field by its dataclass annotation string."""
    ann = annotation.replace(" ", "")
    if value is None:
        if "None" in ann:
            return None
        raise _fail(source, where, f"must not be null (expected {annotation})")
    if ann.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, where, f"expected an integer, got {value!r}")
        return value
    if ann.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, where, f"expected a number, got {value!r}")
        return float(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise _fail(source, where, f"expected true or false, got {value!r}")
        return value
    if ann == "str":
        if not isinstance(value, str):
            raise _fail(source, where, f"expected a string, got {value!r}")
        return value
    if ann == "list[float]":
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise _fail(source, where, f"expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if ann == "list[str]":
        return _names(value, source, where)
    if ann == "str|list[str]":
        return value if isinstance(value, str) else _names(value, source, where)
    raise TypeError(f"no checker for annotation {annotation!r}")  # programming error


def _section(cls: type, data: Any, source: str, section: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _fail(source, section, f"expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _fail(source, section, f"unknown key(s) {unknown}; accepted keys: {sorted(fields)}")
    kwargs = {k: _typed(v, str(fields[k].type), source, f"{section}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Build and validate a ``Recipe`` from parsed YAML; ValueError names ``source``, the key and what is accepted."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; accepted keys: {sorted(_TOP_KEYS)}")
    if "name" not in data:
        raise ValueError(f"{source}: missing required key 'name'")
    kwargs: dict[str, Any] = {"source": source}
    for key in ("name", "description", "method"):
        if key in data:
            kwargs[key] = _typed(data[key], "str", source, key)
    if "train" in data:
        kwargs["train"] = _names(data["train"], source, "train")
    for key, cls in _SECTIONS.items():
        if key in data:
            value = _section(cls, data[key], source, key)
            if value is not None:
                kwargs[key] = value
    recipe = Recipe(**kwargs)
    _check_values(recipe)
    return recipe


def _check_values(r: Recipe) -> None:
    s = r.source
    if r.method not in METHODS:
        raise _fail(s, "method", f"unknown method {r.method!r}; accepted: {list(METHODS)}")
    if r.method == "lora" and r.lora is None:
        raise _fail(s, "lora", "method 'lora' needs a 'lora' section (r, alpha, target, ...)")
    if r.method == "freeze":
        if r.lora is not None:
            raise _fail(s, "lora", "method 'freeze' trains no adapter; remove the 'lora' section or use method 'lora'")
        if r.quantization is not None:
            raise _fail(s, "quantization", "a quantized base needs an adapter (method 'lora'); freeze mode trains full weights")
        if not r.train and not r.stages.train and not r.stages.optional:
            raise _fail(s, "train", "method 'freeze' with nothing to train: list parts under 'train'")
    for i, part in enumerate(r.train):
        _check_part_name(part, s, f"train[{i}]")
    if r.lora is not None:
        lo = r.lora
        if lo.r < 1:
            raise _fail(s, "lora.r", f"must be >= 1, got {lo.r}")
        if not 0.0 <= lo.dropout < 1.0:
            raise _fail(s, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        if lo.bias not in ("none", "all", "lora_only"):
            raise _fail(s, "lora.bias", f"unknown value {lo.bias!r}; accepted: ['none', 'all', 'lora_only']")
        if isinstance(lo.target, str) and lo.target != "all-linear":
            lo.target = [lo.target]
        if isinstance(lo.target, list) and not lo.target:
            raise _fail(s, "lora.target", "empty list; use 'all-linear' or module names such as [q_proj, v_proj]")
        if not lo.scope:
            raise _fail(s, "lora.scope", "empty list; default is [language_model]")
        for i, part in enumerate(lo.scope):
            _check_part_name(part, s, f"lora.scope[{i}]")
    if r.quantization is not None:
        q = r.quantization
        if q.bits != 4:
            raise _fail(s, "quantization.bits", f"only 4-bit (QLoRA) is supported, got {q.bits}")
        if q.quant_type not in ("nf4", "fp4"):
            raise _fail(s, "quantization.quant_type", f"unknown {q.quant_type!r}; accepted: ['nf4', 'fp4']")
        if q.compute_dtype != "auto" and q.compute_dtype not in DTYPES:
            raise _fail(s, "quantization.compute_dtype", f"unknown {q.compute_dtype!r}; accepted: ['auto', {', '.join(map(repr, DTYPES))}]")
        for i, part in enumerate(q.modules):
            if part not in MODULE_PARTS:
                raise _fail(s, f"quantization.modules[{i}]", f"unknown part {part!r}; accepted: {list(MODULE_PARTS)}")
    d = r.defaults
    if d.scheduler not in SCHEDULERS:
        raise _fail(s, "defaults.scheduler", f"unknown {d.scheduler!r}; accepted: {list(SCHEDULERS)}")
    if d.lr <= 0 or d.batch_size < 1 or d.epochs < 1:
        raise _fail(s, "defaults", f"lr must be > 0, batch_size and epochs >= 1; got lr={d.lr}, batch_size={d.batch_size}, epochs={d.epochs}")
    if d.max_steps is not None and d.max_steps < 1:
        raise _fail(s, "defaults.max_steps", f"must be >= 1 or null, got {d.max_steps}")
    if not 0.0 <= d.warmup_ratio < 1.0:
        raise _fail(s, "defaults.warmup_ratio", f"must be in [0, 1), got {d.warmup_ratio}")
    if len(d.betas) != 2:
        raise _fail(s, "defaults.betas", f"expected two numbers, got {d.betas}")
    from ..config import registered_types

    known = registered_types()
    for i, name in enumerate(r.stages.train):
        if name not in known:
            raise _fail(s, f"stages.train[{i}]", f"unknown stage type {name!r}; registered stage types: {known} "
                        "(list stages that may not exist yet under stages.optional)")


def _check_part_name(name: str, source: str, where: str) -> None:
    """Aliases are always fine; dotted paths are checked against the model in ``apply_recipe``."""
    if name in PARTS or "." in name:
        return
    raise _fail(source, where, f"unknown part {name!r}; accepted: {list(PARTS)} or a dotted module path "
                "of the model (e.g. model.language_model.norm)")


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name: ``$VLMKIT_ADAPTERS``, ``./adapters``, then vlmkit's own
    ``adapters/`` (the source checkout's, or the copy an installed wheel carries: ``vlmkit.resources``)."""
    from ..resources import data_dir

    dirs = [Path(p) for p in os.environ.get(RECIPE_DIRS_ENV, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "adapters", *filter(None, [data_dir("adapters")])]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def available_recipes() -> list[str]:
    """Names of the recipes found in ``recipe_dirs()``."""
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def load_recipe(path_or_name: str | os.PathLike) -> Recipe:
    """Read a recipe from a YAML file, or by name (``"lora"`` → ``adapters/lora.yaml``)."""
    import yaml

    path = Path(path_or_name)
    if not path.is_file():
        name = str(path_or_name)
        candidates = [d / f"{name}.yaml" for d in recipe_dirs()] if path.suffix == "" and path.parent == Path(".") else []
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no recipe file {os.fspath(path_or_name)!r}; recipes by name: {available_recipes()} "
                f"(searched {[str(d) for d in recipe_dirs()]})"
            )
        path = found[0]
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    return recipe_from_dict(data, source=str(path))


# ------------------------------------------------------------------------------------------------
# Resolving parts on a model
# ------------------------------------------------------------------------------------------------


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def part_paths(model_type: str) -> dict[str, str]:
    """Part alias → module path (``Family.part_paths``) of the family of ``model_type`` (known before the model
    exists: quantizing while loading)."""
    from ..families.registry import family_class

    return dict(family_class(model_type).part_paths)


def _family_part_path(model: nn.Module, part: str, source: str) -> str:
    """Module path of a ``MODULE_PARTS`` alias in ``model``, from the model's family."""
    from ..families import family_for

    try:
        family = family_for(model)
    except ValueError as err:
        raise ValueError(f"{source}: part {part!r} is resolved by the model's vlmkit family: {err}; "
                         "name a dotted module path instead") from None
    return family.part_paths[part]


def resolve_part(model: nn.Module, part: str, source: str = "<recipe>") -> str:
    """Module path (relative to the HF model) of a part alias or a dotted path; ValueError listing what exists."""
    modules = dict(model.named_modules())
    if part == "embeddings":
        path = _path_of(model, model.get_input_embeddings())
    elif part == "lm_head":
        path = _path_of(model, model.get_output_embeddings())
    elif part in MODULE_PARTS:
        path = _family_part_path(model, part, source)
    else:
        path = part
    if path is None or path not in modules:
        top = sorted({n.rsplit(".", 1)[0] if n.count(".") >= 2 else n for n in modules if n and n.count(".") <= 1})
        raise ValueError(
            f"{source}: part {part!r} (module {path!r}) does not exist in {type(model).__name__}; "
            f"aliases: {list(PARTS)}; modules near the top: {top}"
        )
    return path


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit subclasses nn.Linear


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def lora_target_modules(model: nn.Module, recipe: Recipe) -> list[str]:
    """Full module paths of the linear layers that get LoRA (sorted by model order)."""
    lo = recipe.lora
    assert lo is not None
    scope = [resolve_part(model, p, recipe.source) for p in lo.scope]
    trained = [resolve_part(model, p, recipe.source) for p in recipe.train]
    head = _path_of(model, model.get_output_embeddings())
    candidates = [
        n for n, m in model.named_modules()
        if _is_linear(m) and _inside(n, scope) and not _inside(n, trained) and n != head
    ]
    if lo.target == "all-linear":
        if not candidates:
            raise ValueError(f"{recipe.source}: lora.scope {lo.scope} holds no linear layer to adapt")
        return candidates
    chosen, missing = [], []
    for suffix in lo.target:
        hits = [n for n in candidates if n == suffix or n.endswith("." + suffix)]
        if not hits:
            missing.append(suffix)
        chosen += hits
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"{recipe.source}: lora.target {missing} match no linear layer in {scope}; "
            f"linear layer names there: {names}"
        )
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(set(chosen), key=order.__getitem__)


# ------------------------------------------------------------------------------------------------
# Quantization (QLoRA)
# ------------------------------------------------------------------------------------------------


def _compute_dtype(spec: QuantSpec, model: nn.Module) -> torch.dtype:
    if spec.compute_dtype == "auto":
        return next(model.parameters()).dtype
    return DTYPES[spec.compute_dtype]


def quantization_skip_modules(recipe: Recipe, model_type: str) -> list[str]:
    """Module paths ``from_pretrained`` keeps unquantized (``llm_int8_skip_modules``): the parts not
    under ``quantization.modules``, the fully trained parts and ``lm_head``. Part aliases resolve through
    the family of ``model_type`` (``config.model_type`` of the checkpoint)."""
    q = recipe.quantization
    assert q is not None
    paths = part_paths(model_type)
    skip = {paths[alias] for alias in MODULE_PARTS if alias not in q.modules}
    skip |= {paths[p] for p in recipe.train if p in MODULE_PARTS}
    skip |= {p for p in recipe.train if p not in MODULE_PARTS and "." in p}
    skip.add("lm_head")
    return sorted(skip)


def bnb_config(recipe: Recipe, model_or_dtype: nn.Module | torch.dtype, skip: list[str]):
    """``transformers.BitsAndBytesConfig`` for ``from_pretrained`` (real checkpoints)."""
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    assert q is not None
    dtype = model_or_dtype if isinstance(model_or_dtype, torch.dtype) else _compute_dtype(q, model_or_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip,
    )


def is_quantized(model: nn.Module) -> bool:
    """True when the model already holds bitsandbytes 4-bit layers."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def quantize_4bit(model: nn.Module, recipe: Recipe) -> list[str]:
    """Replace the linear layers of ``quantization.modules`` by bitsandbytes ``Linear4bit`` in place.

    For models already in memory (``tiny:`` models); checkpoints on disk are quantized while loading
    (``from_pretrained(quantization_config=bnb_config(...))``). Returns the replaced module paths.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"{recipe.source}: the recipe quantizes the base model; install bitsandbytes (pip install 'vlmkit[quant]')") from e
    q = recipe.quantization
    assert q is not None
    dtype = _compute_dtype(q, model)
    keep = [resolve_part(model, p, recipe.source) for p in q.modules]
    skip = [resolve_part(model, p, recipe.source) for p in recipe.train]
    head = _path_of(model, model.get_output_embeddings())
    targets = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and _inside(n, keep) and not _inside(n, skip) and n != head
    ]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin: nn.Linear = getattr(parent, attr)
        device = lin.weight.device
        qlin = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
            compress_statistics=q.double_quant, quant_type=q.quant_type, device="cpu",
        )
        qlin.weight = bnb.nn.Params4bit(
            lin.weight.data.detach().to("cpu").clone(), requires_grad=False,
            compress_statistics=q.double_quant, quant_type=q.quant_type, module=qlin,
        )
        if lin.bias is not None:
            qlin.bias = nn.Parameter(lin.bias.data.detach().clone(), requires_grad=False)
        qlin = qlin.to(device if device.type != "cpu" else "cpu")  # quantizes on .to()
        setattr(parent, attr, qlin)
    return targets


# ------------------------------------------------------------------------------------------------
# Applying a recipe
# ------------------------------------------------------------------------------------------------


def apply_recipe(hf_model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze ``hf_model`` and make exactly the recipe's parameters trainable.

    ``method: lora`` returns ``peft.get_peft_model(hf_model, LoraConfig(...))`` (``train`` parts in
    ``modules_to_save``; a ``quantization`` section first quantizes the base, unless it is already
    4-bit); ``method: freeze`` returns ``hf_model`` itself with only the ``train`` parts trainable.
    Wrap the result with ``vlmkit.wrap`` and call ``select_trainable_stages`` for vlmkit stages.
    """
    if hasattr(hf_model, "peft_config") or hasattr(hf_model, "get_base_model"):
        raise TypeError("apply_recipe takes the plain transformers model, not a PEFT model")
    if type(hf_model).__name__ == "VLMWrapper":
        raise TypeError("apply_recipe takes the transformers model; wrap the returned model with vlmkit.wrap afterwards")
    trained = [resolve_part(hf_model, p, recipe.source) for p in recipe.train]
    for p in hf_model.parameters():
        p.requires_grad_(False)
    if recipe.method == "freeze":
        for path in trained:
            for p in hf_model.get_submodule(path).parameters():
                p.requires_grad_(True)
        return hf_model

    from peft import LoraConfig, get_peft_model

    lo = recipe.lora
    assert lo is not None
    if recipe.quantization is not None:
        if not is_quantized(hf_model):
            quantize_4bit(hf_model, recipe)
        if getattr(hf_model, "is_loaded_in_4bit", False):  # loaded with from_pretrained(quantization_config=...)
            from peft import prepare_model_for_kbit_training

            hf_model = prepare_model_for_kbit_training(hf_model, use_gradient_checkpointing=False)
    targets = lora_target_modules(hf_model, recipe)
    config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha if lo.alpha is not None else 2 * lo.r,
        lora_dropout=lo.dropout,
        target_modules=targets,
        modules_to_save=trained or None,
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        bias=lo.bias,
    )
    import warnings

    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(hf_model, config)


def select_trainable_stages(wrapped: nn.Module, recipe: Recipe) -> list[str]:
    """Make the recipe's vlmkit stages trainable on a ``VLMWrapper`` and freeze the others.

    Returns notes (optional stages skipped, stages frozen because the recipe does not list them).
    ValueError when a stage under ``stages.train`` is not in the wrapper.
    """
    notes: list[str] = []
    wanted = set(recipe.stages.train) | set(recipe.stages.optional)
    present: dict[str, bool] = {}
    for stage in wrapped.stages:
        kind = stage.config.type
        params = list(stage.parameters())
        train = kind in wanted and bool(params)
        present[kind] = present.get(kind, False) or bool(params)
        for p in params:
            p.requires_grad_(train)
        if params and kind not in wanted:
            notes.append(f"stage {kind!r} has {sum(p.numel() for p in params)} parameters; the recipe does not train it: frozen")
    for kind in recipe.stages.train:
        if not present.get(kind):
            have = [s.config.type for s in wrapped.stages]
            raise ValueError(
                f"{recipe.source}: stages.train names {kind!r} but the wrapped model has no such stage with "
                f"parameters (stages: {have}); add it with --wrap {kind}:... or move it to stages.optional"
            )
    from ..config import registered_types

    known = set(registered_types())
    for kind in recipe.stages.optional:
        if not present.get(kind):
            why = "not a registered stage type yet" if kind not in known else "not in the wrapped model (or has no parameters)"
            notes.append(f"optional stage {kind!r} skipped: {why}")
    return notes


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """``{name: numel}`` of the parameters with ``requires_grad``."""
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
