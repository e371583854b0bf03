"""Benchmark tasks: YAML files in ``eval/`` (lmms-eval style): the task config, YAML loading and
validation, the task registry, and data-path / prompt resolution.

A task names its data format (a reader of ``readers.READERS``) and default data paths relative to
``--data-root``, a prompt template, generation settings, an answer parser and its metrics::

    task: vqav2_val
    dataset: {format: vqav2, questions: vqav2/v2_OpenEnded_mscoco_val2014_questions.json, ...}
    doc_to_text: "{question}\\nAnswer the question using a single word or phrase."
    generation_kwargs: {max_new_tokens: 16}
    parser: strip
    metric_list: [{metric: vqa_accuracy, variant: official}]

``eval/README.md`` documents every key. ``load_task`` validates a file (an unknown key is an error
naming the file and the key); ``list_tasks`` / ``get_task`` form the registry over ``eval/*.yaml``.

The answer parsers live in ``vlmkit.evaluation.parsers`` (name table ``PARSERS``) and the scorers in
``vlmkit.evaluation.scorers`` (name table ``METRICS``); both, and every parser / scorer class, are
re-exported here, so ``from vlmkit.evaluation.tasks import MeanIoUScorer`` keeps working.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Sequence

from .parsers import (  # noqa: F401  (re-exported: the parsers used to live here)
    PARSERS,
    BoxParser,
    MaskHeadParser,
    Parsed,
    RawParser,
    SampleContext,
    StripParser,
    Text4SegParser,
    Text4SegSemanticParser,
    YesNoParser,
)
from .scorers import (  # noqa: F401  (re-exported: the scorers used to live here)
    METRICS,
    BoxAccuracy,
    GQAAccuracy,
    MeanIoUScorer,
    PopeScorer,
    ReferSegScorer,
    Scorer,
    VQAAccuracy,
    aggregate_mean_iou,
)

__all__ = [
    "TASK_KEYS", "GENERATION_KEYS", "TaskConfig", "Parsed", "SampleContext", "PARSERS", "METRICS", "Scorer",
    "load_task", "list_tasks", "get_task", "tasks_dir", "resolve_dataset", "render_prompt",
    "aggregate_mean_iou",
]

#: Top-level keys a task YAML may hold (``include`` is resolved while loading).
TASK_KEYS = (
    "task", "task_alias", "tag", "description", "include", "dataset", "synthesize", "doc_to_text",
    "generation_kwargs", "parser", "metric_list", "breakdown", "metadata",
)
#: ``generation_kwargs`` keys; ``until`` (stop strings) is applied to the decoded text, the rest go to
#: ``generate`` (``temperature: 0`` means greedy, as in lmms-eval).
GENERATION_KEYS = (
    "max_new_tokens", "min_new_tokens", "until", "do_sample", "temperature", "top_p", "top_k", "num_beams",
    "repetition_penalty",
)
_SYNTH_KEYS = ("generator", "out", "n", "seed", "size", "split", "max_shapes", "background",
               "images", "pool")  # images, pool: generator shapes_multi (vlmkit.data.shapes.write_multi)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


# ---------------------------------------------------------------------------------------------
# Task config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskConfig:
    """One validated task. ``raw`` is the resolved YAML (``include`` merged) as written to results'
    ``configs``; ``parser`` / ``scorers`` are built from it."""

    task: str
    dataset: dict[str, Any]
    doc_to_text: str
    metric_list: list[dict[str, Any]]
    parser_spec: dict[str, Any]
    generation_kwargs: dict[str, Any]
    source: str
    raw: dict[str, Any]
    task_alias: str | None = None
    breakdown: str | None = None
    synthesize: dict[str, Any] | None = None

    @property
    def format(self) -> str:
        return self.dataset["format"]

    def build_parser(self):
        spec = dict(self.parser_spec)
        return PARSERS[spec.pop("name")](**spec)

    def build_scorers(self) -> list[Scorer]:
        out = []
        for entry in self.metric_list:
            kwargs = {k: v for k, v in entry.items() if k not in ("metric", "higher_is_better")}
            out.append(METRICS[entry["metric"]](**kwargs))
        return out

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def hash(self) -> str:
        """sha256 of everything that changes the outputs or scores (names and descriptions excluded)."""
        keep = {k: v for k, v in self.raw.items() if k not in ("task_alias", "description", "tag", "metadata")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``child`` wins; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    import yaml

    path = path.resolve()
    if path in chain:
        raise ValueError(f"{path}: 'include' cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"task file not found: {os.fspath(path)!r}{where}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} in task YAML; accepted keys: {list(TASK_KEYS)}")
    include = data.pop("include", None)
    if include is not None:
        if not isinstance(include, str):
            raise ValueError(f"{path}: 'include' must be a file name, got {include!r}")
        data = _merge(_read_yaml(path.parent / include, (*chain, path)), data)
    return data


def _check_kwargs(cls: type, kwargs: dict[str, Any], what: str, path: Path) -> None:
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"{path}: unknown key {key!r} for {what}; accepted: {accepted}")
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid {what}: {err}") from err


def _template_fields(template: str) -> set[str]:
    fields = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name:
                raise ValueError("positional '{}' placeholders are not allowed; name a doc field")
            fields.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return fields


def _validate(data: dict[str, Any], path: Path) -> TaskConfig:
    from .readers import READERS

    def need(key: str, types: type | tuple[type, ...]):
        if key not in data:
            raise ValueError(f"{path}: missing required key {key!r}")
        if not isinstance(data[key], types):
            raise ValueError(f"{path}: {key!r} must be {types}, got {type(data[key]).__name__}: {data[key]!r}")
        return data[key]

    name = need("task", str)
    if not _NAME_RE.match(name):
        raise ValueError(f"{path}: task name {name!r} may only hold letters, digits and _ . + -")
    dataset = need("dataset", dict)
    fmt = dataset.get("format")
    if fmt not in READERS:
        raise ValueError(f"{path}: dataset.format must be one of {sorted(READERS)}, got {fmt!r}")
    spec = READERS[fmt]
    for key in dataset:
        if key != "format" and key not in spec.keys:
            raise ValueError(f"{path}: unknown key {key!r} in dataset (format {fmt!r}); accepted: {list(spec.keys)}")
    for key in spec.required:
        if key not in dataset:
            raise ValueError(f"{path}: dataset (format {fmt!r}) needs key {key!r}")
    fields = set(spec.fields) | (set(dataset.get("fields", {})) if fmt == "hf" else set())

    template = need("doc_to_text", str)
    try:
        used = _template_fields(template)
    except ValueError as err:
        raise ValueError(f"{path}: doc_to_text: {err}") from err
    missing = sorted(used - fields)
    if missing:
        raise ValueError(f"{path}: doc_to_text uses {missing}, which format {fmt!r} does not provide; fields: {sorted(fields)}")

    gen = data.get("generation_kwargs", {}) or {}
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: generation_kwargs must be a mapping")
    for key, value in gen.items():
        if key not in GENERATION_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} in generation_kwargs; accepted: {list(GENERATION_KEYS)}")
        if key == "until" and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
            raise ValueError(f"{path}: generation_kwargs.until must be a str or a list of str, got {value!r}")
        if key in ("max_new_tokens", "min_new_tokens", "num_beams", "top_k") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{path}: generation_kwargs.{key} must be a non-negative int, got {value!r}")

    parser = data.get("parser", "strip")
    parser_spec = {"name": parser} if isinstance(parser, str) else dict(parser) if isinstance(parser, dict) else None
    if parser_spec is None or parser_spec.get("name") not in PARSERS:
        raise ValueError(f"{path}: parser must be one of {sorted(PARSERS)} (or a mapping with 'name'), got {parser!r}")
    _check_kwargs(PARSERS[parser_spec["name"]], {k: v for k, v in parser_spec.items() if k != "name"},
                  f"parser {parser_spec['name']!r}", path)

    metrics = need("metric_list", list)
    if not metrics:
        raise ValueError(f"{path}: metric_list is empty")
    for i, entry in enumerate(metrics):
        if not isinstance(entry, dict) or entry.get("metric") not in METRICS:
            raise ValueError(f"{path}: metric_list[{i}] must be a mapping with 'metric' in {sorted(METRICS)}, got {entry!r}")
        kwargs = {k: v for k, v in entry.items() if k not in ("metric", "higher_is_better")}
        _check_kwargs(METRICS[entry["metric"]], kwargs, f"metric {entry['metric']!r}", path)

    breakdown = data.get("breakdown")
    if breakdown is not None and (not isinstance(breakdown, str) or breakdown not in fields):
        raise ValueError(f"{path}: breakdown must name a doc field of format {fmt!r} ({sorted(fields)}), got {breakdown!r}")
    synth = data.get("synthesize")
    if synth is not None:
        if not isinstance(synth, dict):
            raise ValueError(f"{path}: synthesize must be a mapping")
        for key in synth:
            if key not in _SYNTH_KEYS:
                raise ValueError(f"{path}: unknown key {key!r} in synthesize; accepted: {list(_SYNTH_KEYS)}")
        if synth.get("generator") not in ("shapes", "shapes_multi") or not isinstance(synth.get("out"), str):
            raise ValueError(f"{path}: synthesize needs generator: shapes or shapes_multi, and out: <folder under "
                             f"the data root>; got generator {synth.get('generator')!r}, out {synth.get('out')!r}")
    for key in ("task_alias", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{path}: {key!r} must be a str")
    for key in ("metadata",):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a mapping")

    return TaskConfig(
        task=name, dataset=dict(dataset), doc_to_text=template, metric_list=[dict(m) for m in metrics],
        parser_spec=parser_spec, generation_kwargs=dict(gen), source=os.fspath(path), raw=copy.deepcopy(data),
        task_alias=data.get("task_alias"), breakdown=breakdown, synthesize=synth,
    )


def load_task(path: str | os.PathLike) -> TaskConfig:
    """Read and validate one task YAML (``include`` resolved relative to the file)."""
    p = Path(path)
    return _validate(_read_yaml(p), p.resolve())


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def tasks_dir() -> Path:
    """The ``eval/`` folder: ``$VLMKIT_TASKS_DIR``, else the source checkout's ``eval/``, else the copy an
    installed wheel carries (``vlmkit.resources.data_dir``), else ``./eval``."""
    from ..resources import data_dir

    env = os.environ.get("VLMKIT_TASKS_DIR")
    if env:
        return Path(env)
    return data_dir("eval") or Path.cwd() / "eval"


def list_tasks(include_path: Sequence[str | os.PathLike] = ()) -> dict[str, Path]:
    """Task name → YAML file for every ``*.yaml`` in ``eval/`` and ``include_path`` (files starting
    with ``_`` are templates for ``include``, not tasks). Duplicate names are an error."""
    found: dict[str, Path] = {}
    for folder in (tasks_dir(), *map(Path, include_path)):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.name.startswith("_"):
                continue
            data = _read_yaml(path)
            name = data.get("task")
            if not isinstance(name, str):
                raise ValueError(f"{path}: missing required key 'task'")
            if name in found and found[name].resolve() != path.resolve():
                raise ValueError(f"task {name!r} is defined twice: {found[name]} and {path}")
            found[name] = path
    return found


def get_task(name_or_path: str | os.PathLike, include_path: Sequence[str | os.PathLike] = ()) -> TaskConfig:
    """A task by registry name, or from a path to a YAML file."""
    s = os.fspath(name_or_path)
    if s.endswith((".yaml", ".yml")) or os.path.sep in s:
        return load_task(s)
    tasks = list_tasks(include_path)
    if s not in tasks:
        raise ValueError(f"unknown task {s!r}; available: {sorted(tasks)} (or pass a path to a task YAML)")
    return load_task(tasks[s])


# ---------------------------------------------------------------------------------------------
# Data paths and prompts
# ---------------------------------------------------------------------------------------------


def resolve_dataset(task: TaskConfig, data_root: str | os.PathLike) -> dict[str, Any]:
    """The reader's keyword arguments: path keys joined onto ``data_root`` (absolute paths kept)."""
    from .readers import READERS

    spec = READERS[task.format]
    root = Path(data_root)
    out = {}
    for key, value in task.dataset.items():
        if key == "format":
            continue
        if key in spec.paths and value is not None:
            if isinstance(value, dict):
                value = {k: os.fspath(root / v) for k, v in value.items()}
            elif isinstance(value, list):
                value = [os.fspath(root / v) for v in value]
            else:
                value = os.fspath(root / value)
        out[key] = value
    return out


def render_prompt(task: TaskConfig, doc: dict[str, Any]) -> str:
    """``doc_to_text`` formatted with the doc's fields."""
    try:
        return task.doc_to_text.format(**doc)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"task {task.task!r}: doc {doc.get('id')!r}: cannot fill doc_to_text ({err!r})") from err
