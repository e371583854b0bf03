"""Evaluation runner: ``vlmkit eval`` and ``vlmkit.evaluation.evaluate(...)``.

Loads a model (a local checkpoint, a vlmkit save directory, ``tiny:<family>`` or an object), wraps
it with the requested stages, and for each task reads the docs, generates answers in left-padded
batches, parses and scores them, and writes lmms-eval-shaped files under ``<output>/<model name>/``:

* ``<run_id>_samples_<task>.jsonl``: one line per doc (doc_id, id, target, prompt, output, parsed,
  scores, visual/prefill/generated token counts), written and flushed as soon as its batch is done;
* ``<run_id>_results.json``: ``results[task]["<metric>,none"]``, ``configs``, ``n-samples``,
  ``higher_is_better``, ``task_hashes``, ``config`` and ``throughput`` (samples/s, prefill tokens);
* ``<run_id>_run.json``: the run manifest (model, stages, task hashes) that ``--resume`` checks.

Resume: records are keyed by (task, doc_id); ``--resume`` reuses the latest run id in the folder,
skips the docs whose lines exist, and the results are recomputed from all lines sorted by doc_id,
so an interrupted + resumed run writes the same results as an uninterrupted one.

Several processes (``accelerate launch``, or RANK/WORLD_SIZE) shard docs by ``doc_id % world_size``;
rank r>0 appends to ``<run_id>_samples_<task>.rank<r>.jsonl``; rank 0 waits for every doc to be
done, merges the lines into the samples file and writes the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import parse_stage_spec

__all__ = ["evaluate", "cli_main", "parse_stage_spec", "parse_gen_kwargs", "load_model", "generate_batch",
           "segment_batch", "build_input_text", "load_docs", "LoadedModel"]


# ---------------------------------------------------------------------------------------------
# Specs: stages, generation overrides
# ---------------------------------------------------------------------------------------------


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_gen_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``"max_new_tokens=8,temperature=0"`` → dict (values parsed as YAML); dicts pass through."""
    from .tasks import GENERATION_KEYS

    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        out = dict(text)
    else:
        out = {}
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"--gen-kwargs expects key=value pairs separated by commas, got {part!r}")
            out[key.strip()] = _yaml_value(value.strip())
    for key in out:
        if key not in GENERATION_KEYS:
            raise ValueError(f"unknown generation kwarg {key!r}; accepted: {list(GENERATION_KEYS)}")
    return out


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A wrapped model ready to generate: ``wrapped`` (VLMWrapper), its ``processor``, the ``device``,
    a file-safe ``name`` and the ``spec`` it was loaded from."""

    wrapped: Any
    processor: Any
    device: Any
    name: str
    spec: str
    owns_wrapper: bool = False  # wrapped here around the caller's model: unwrap when done

    def release(self) -> None:
        """Remove the stages this loader added to a caller's model (``vlmkit.unwrap``)."""
        if self.owns_wrapper:
            from ..wrapper import unwrap

            unwrap(self.wrapped)
            self.owns_wrapper = False

    @property
    def stage_configs(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.wrapped.stage_configs]

    @property
    def text4seg_head(self):
        return next((s for s in self.wrapped.stages_of("head") if getattr(s.config, "type", "") == "text4seg"), None)

    @property
    def mask_head(self):
        """The stage that produces masks itself (``segment``, e.g. READ), or None."""
        return next((s for s in self.wrapped.stages if callable(getattr(s, "segment", None))), None)


def _sanitize(name: str) -> str:
    """lmms-eval style: path separators and odd characters → ``__``."""
    name = re.sub(r"[\"<>:/|\\?*\[\]\s]+", "__", name).strip("_.")
    return name or "model"


def _stage_label(config) -> str:
    d = config.to_dict()
    d.pop("type", None)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    parts = [f"{k}={v}" for k, v in d.items() if v is not None and defaults.get(k, object()) != v
             and not (isinstance(v, list) and defaults.get(k) == tuple(v))]
    return config.type + (("-" + "-".join(parts)) if parts else "")


def load_model(
    model: Any, processor: Any = None, compress: Sequence[Any] = (), position: Any = None,
    device: str | None = None, dtype: str | None = None,
) -> LoadedModel:
    """Model spec or object → ``LoadedModel``.

    ``model``: ``"tiny:<family>"`` (``vlmkit.testing.tiny_vlm``), a local checkpoint path
    (``AutoModelForImageTextToText`` + ``AutoProcessor``, ``trust_remote_code=False``; a vlmkit save
    directory re-applies its stages with ``vlmkit.load``, plus ``compress`` / ``position``), a ``(model, processor)`` pair, a HF model or
    a ``VLMWrapper`` (then ``processor`` is required). ``compress`` / ``position``: stage specs
    (``"fopru:0.25"``) or configs.
    """
    import torch

    from .. import wrapper as core
    CONFIG_NAME, VLMWrapper, wrap, load_saved = core.CONFIG_NAME, core.VLMWrapper, core.wrap, core.load

    configs = [parse_stage_spec(c, "compressor") if isinstance(c, str) else c for c in (compress or ())]
    if position is not None:
        configs.append(parse_stage_spec(position, "position") if isinstance(position, str) else position)
    if isinstance(model, tuple):
        model, processor = model
    loaded_here = isinstance(model, str)
    if isinstance(model, str):
        spec = model
        if model.startswith("tiny:"):
            from vlmkit.testing import tiny_vlm

            model, processor = tiny_vlm(model.split(":", 1)[1])
        else:
            if not os.path.isdir(model):
                raise FileNotFoundError(f"--model {model!r}: not a local checkpoint folder (nothing is downloaded); "
                                        "use a path or tiny:<family>")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kwargs: dict[str, Any] = {"trust_remote_code": False}
            if dtype not in (None, "auto"):
                kwargs["dtype"] = getattr(torch, dtype)
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
            if os.path.isfile(os.path.join(model, CONFIG_NAME)):  # a vlmkit save: its stages plus the asked ones
                model = load_saved(model, tokenizer=processor.tokenizer, extra=configs, **kwargs)
                configs = []
            else:
                model = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    else:
        spec = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if processor is None:
            raise ValueError("evaluate(model=<object>) needs processor=<its processor>")
    owns = False
    if isinstance(model, VLMWrapper):
        if configs:
            raise ValueError("the model is already wrapped; pass compress/position only with an unwrapped model")
        wrapped = model
    else:
        wrapped = wrap(model, *configs)
        owns = not loaded_here
    wrapped.eval()
    if loaded_here:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        wrapped.to(dev)
    else:
        dev = next(wrapped.parameters()).device
        if device is not None and torch.device(device) != dev:
            wrapped.to(device)
            dev = torch.device(device)
    processor.tokenizer.padding_side = "left"  # decoder-only batch generation
    stages = [_stage_label(c) for c in wrapped.stage_configs]
    name = _sanitize(spec) + "".join(f"__{_sanitize(s)}" for s in stages)
    return LoadedModel(wrapped=wrapped, processor=processor, device=dev, name=name, spec=spec, owns_wrapper=owns)


# ---------------------------------------------------------------------------------------------
# Prompts and batched generation
# ---------------------------------------------------------------------------------------------


def build_input_text(processor: Any, text: str, style: str = "auto", n_images: int = 1) -> str:
    """The text the processor gets for one sample with ``n_images`` images.

    ``"chat"``: the processor's chat template (user turn = images + text, generation prompt added);
    ``"plain"``: ``"user : <image> {text} assistant :"`` with the processor's image marker (the tiny
    models' format); ``"auto"``: chat when the processor has a chat template, else plain.
    """
    if style not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt style must be 'auto', 'chat' or 'plain', got {style!r}")
    has_template = bool(getattr(processor, "chat_template", None))
    if style == "chat" or (style == "auto" and has_template):
        if not has_template:
            raise ValueError("prompt style 'chat' needs a processor with a chat_template")
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    marker = getattr(processor, "image_token", None) or "<image>"
    return "user : " + " ".join([marker] * n_images) + " " + text + " assistant :"


def _generate_kwargs(gen: dict[str, Any], tokenizer) -> dict[str, Any]:
    out = {k: v for k, v in gen.items() if k != "until"}
    out.setdefault("max_new_tokens", 32)
    if out.get("temperature", None) == 0:
        out.pop("temperature")
        out["do_sample"] = False
    out.setdefault("do_sample", False)
    out.setdefault("num_beams", 1)
    if not out["do_sample"]:
        for k in ("temperature", "top_p", "top_k"):
            out.pop(k, None)
    if tokenizer.pad_token_id is not None:
        out["pad_token_id"] = tokenizer.pad_token_id
    return out


def apply_until(text: str, until: Sequence[str] | str | None) -> str:
    """Cut ``text`` at the first occurrence of each stop string (lmms-eval's ``until``)."""
    if not until:
        return text
    for term in [until] if isinstance(until, str) else until:
        if term:
            text = text.split(term)[0]
    return text


@contextlib.contextmanager
def _capture_assembled(wrapped):
    """Within the ``with``, every ``AssembledBatch`` ``wrapped.assemble`` builds is appended to the yielded list."""
    captured: list[Any] = []
    original = wrapped.assemble

    def capture(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    wrapped.assemble = capture  # an instance attribute, removed on exit
    try:
        yield captured
    finally:
        del wrapped.assemble


def generate_batch(
    loaded: LoadedModel, images: Sequence[Any], texts: Sequence[str], gen: dict[str, Any]
) -> list[dict[str, Any]]:
    """Generate for one batch (one image list per sample, left-padded) → per sample ``{"raw", "output"
    (after ``until``), "visual_tokens", "prefill_tokens", "generated_tokens"}``.

    Token counts come from the ``AssembledBatch`` the wrapper really feeds the language model.
    """
    import torch

    proc = loaded.processor
    tok = proc.tokenizer
    nested = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    inputs = proc(images=nested, text=list(texts), return_tensors="pt", padding=True)
    inputs = inputs.to(loaded.device)
    wrapped = loaded.wrapped
    with _capture_assembled(wrapped) as captured, torch.no_grad():  # token counts of what the LM is fed
        out = wrapped.generate(**inputs, **_generate_kwargs(gen, tok))
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    new = seqs[:, inputs["input_ids"].shape[1]:].cpu()
    decoded = tok.batch_decode(new, skip_special_tokens=True)
    eos = getattr(getattr(wrapped.base_model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if captured:
        visual = captured[-1].visual_tokens_per_sample
        prefill = captured[-1].attention_mask.sum(dim=1).tolist()
    else:  # passthrough (no images): the processor's own counts
        visual = [0] * len(texts)
        prefill = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for i, text in enumerate(decoded):
        row = new[i].tolist()
        n_gen = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append({"raw": text, "output": apply_until(text, gen.get("until")), "visual_tokens": int(visual[i]),
                        "prefill_tokens": int(prefill[i]), "generated_tokens": int(n_gen)})
    return results


def segment_batch(
    loaded: LoadedModel, images: Sequence[Any], texts: Sequence[str], gen: dict[str, Any]
) -> list[dict[str, Any]]:
    """Like ``generate_batch`` for a model with a mask-producing head: the answers come from the wrapper's
    ``segment`` (generation, then the head's masks), and each result also holds ``"masks"`` (bool
    [n, H, W] at the image's size). Token counts come from the batch ``generate`` fed the language model."""
    import torch

    if loaded.mask_head is None:
        raise ValueError("this task's parser needs masks from a mask-producing head (e.g. vlmkit.READConfig); "
                         "the evaluated model has none")
    tok = loaded.processor.tokenizer
    nested = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    if any(len(n) != 1 for n in nested):
        raise ValueError("mask-producing heads take exactly one image per sample")
    wrapped = loaded.wrapped
    kwargs = _generate_kwargs(gen, tok)
    with _capture_assembled(wrapped) as captured, torch.no_grad():  # [0]: the prompt generate() prefills
        masks, raw = wrapped.segment([n[0] for n in nested], list(texts), processor=loaded.processor,
                                     return_text=True, **kwargs)
    prompt, full = captured[0], captured[-1]  # generate's prompt; the head's pass over prompt + answer
    visual = prompt.visual_tokens_per_sample
    prefill = prompt.attention_mask.sum(dim=1).tolist()
    answer = (full.attention_mask.sum(dim=1) - prompt.attention_mask.sum(dim=1)).tolist()  # tokens before eos
    results = []
    for i, text in enumerate(raw):
        results.append({"raw": text, "output": apply_until(text, gen.get("until")), "visual_tokens": int(visual[i]),
                        "prefill_tokens": int(prefill[i]), "generated_tokens": int(answer[i]), "masks": masks[i]})
    return results


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _ensure_synthetic(task, data_root: Path, quiet: bool) -> None:
    """Write the task's synthetic data (shapes) under the data root when its files are missing.

    Generated in a private folder and moved in file by file (atomic), so concurrent ranks are safe.
    """
    import shutil

    from .tasks import resolve_dataset

    synth = task.synthesize
    if not synth:
        return
    paths = [v for k, v in resolve_dataset(task, data_root).items() if isinstance(v, str) and k in
             ("questions", "annotations", "images", "refs", "instances")]
    if all(os.path.exists(p) for p in paths):
        return
    from vlmkit.data.shapes import write_dataset

    out = data_root / synth["out"]
    tmp = data_root / f".{Path(synth['out']).name}.tmp-{os.getpid()}"
    kwargs = {k: synth[k] for k in ("seed", "size", "split", "max_shapes", "background") if k in synth}
    if not quiet:
        print(f"[vlmkit eval] {task.task}: writing the synthetic shapes data ({synth.get('n', 100)} images) to {out}",
              file=sys.stderr)
    write_dataset(tmp, int(synth.get("n", 100)), **kwargs)
    for src in sorted(tmp.rglob("*")):
        if src.is_file():
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)


def load_docs(task, data_root: str | os.PathLike, quiet: bool = True) -> list[dict[str, Any]]:
    """All docs of ``task`` (synthesised first if the task says so), each with ``doc_id`` = its index."""
    from .readers import READERS
    from .tasks import resolve_dataset

    root = Path(data_root)
    _ensure_synthetic(task, root, quiet)
    try:
        docs = READERS[task.format].fn(**resolve_dataset(task, root))
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise type(err)(f"task {task.task!r} (data root {os.fspath(root)!r}): {err}") from err
    for i, doc in enumerate(docs):
        doc["doc_id"] = i
    return docs


def _effective_limit(n: int, limit: int | float | None) -> int:
    if limit is None:
        return n
    if isinstance(limit, float) and 0 < limit < 1:
        return min(n, int(math.ceil(n * limit)))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    return min(n, int(limit))


# ---------------------------------------------------------------------------------------------
# Files: per-sample JSONL, manifest, results
# ---------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return os.fspath(x)
    return x


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Lines of a samples file; a truncated last line (interrupted write) is ignored."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # no newline after it: cut off mid-write
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({err})") from err
    return out


def _open_append(path: Path):
    """Open a samples file for appending, first cutting a partial last line left by an interruption."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def _samples_path(out_dir: Path, run_id: str, task: str, rank: int = 0) -> Path:
    suffix = ".jsonl" if rank == 0 else f".rank{rank}.jsonl"
    return out_dir / f"{run_id}_samples_{task}{suffix}"


def _task_files(out_dir: Path, run_id: str, task: str) -> list[Path]:
    main = _samples_path(out_dir, run_id, task)
    ranks = sorted(Path(p) for p in glob.glob(glob.escape(os.fspath(out_dir / f"{run_id}_samples_{task}")) + ".rank*.jsonl"))
    return [main, *ranks]


def _new_run_id(out_dir: Path | None) -> str:
    base = time.strftime("%Y%m%d_%H%M%S")
    if out_dir is None:
        return base
    run_id, k = base, 0
    while glob.glob(glob.escape(os.fspath(out_dir / run_id)) + "_*"):
        k += 1
        run_id = f"{base}_{k}"
    return run_id


def _latest_run_id(out_dir: Path) -> str | None:
    manifests = sorted(out_dir.glob("*_run.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return manifests[-1].name[: -len("_run.json")] if manifests else None


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(payload), f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _write_samples_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Dist:
    rank: int
    world: int
    device: str | None = None
    owns_group: bool = False  # we initialised torch.distributed (gloo) and tear it down at the end

    @property
    def initialized(self) -> bool:
        try:
            import torch.distributed as dist

            return self.world > 1 and dist.is_available() and dist.is_initialized()
        except ImportError:  # pragma: no cover
            return False

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        if not self.initialized:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def _dist_info(rank: int | None, world_size: int | None) -> _Dist:
    """Rank and world size: explicit arguments, else accelerate's ``PartialState`` (``accelerate launch``),
    else ``RANK`` / ``WORLD_SIZE`` (torchrun), initialising a gloo group when ``MASTER_ADDR`` is set
    (accelerate runs CPU processes as independent single processes)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank and world_size go together with 0 <= rank < world_size, got {rank}, {world_size}")
        return _Dist(rank, world_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(0, 1)
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes == world:
            return _Dist(state.process_index, state.num_processes, str(state.device))
    except ImportError:
        pass
    import torch
    import torch.distributed as dist

    env_rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", env_rank))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    owns = False
    if dist.is_available() and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", rank=env_rank, world_size=world)
        owns = True
    return _Dist(env_rank, world, device, owns)


# ---------------------------------------------------------------------------------------------
# Scoring helpers
# ---------------------------------------------------------------------------------------------


def _task_results(task, records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, bool]]:
    """``results[task]`` entries and ``higher_is_better`` from the per-sample records (doc order)."""
    scorers = task.build_scorers()
    records = sorted(records, key=lambda r: r["doc_id"])
    res: dict[str, Any] = {"alias": task.task_alias or task.task}
    better: dict[str, bool] = {}
    for entry, scorer in zip(task.metric_list, scorers):
        hib = bool(entry.get("higher_is_better", scorer.higher_is_better))
        if not records:
            continue
        for key, value in scorer.aggregate(records).items():
            res[f"{key},none"] = value
            if not key.endswith("_stderr"):
                better[key] = hib
    if task.breakdown and records:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(str(r.get("breakdown")), []).append(r)
        for value in sorted(groups):
            for scorer in scorers:
                for key, v in scorer.aggregate(groups[value]).items():
                    if not key.endswith("_stderr"):
                        res[f"{key}_{value},none"] = v
    return res, better


def _score_sample(task, parser, scorers, doc, gen_out, prompt, image, head) -> dict[str, Any]:
    from .tasks import SampleContext

    ctx = SampleContext(doc=doc, image=image, image_size=(image.height, image.width), head=head,
                        masks=gen_out.get("masks"))
    parsed = parser(gen_out["output"], ctx)
    scores: dict[str, Any] = {}
    for scorer in scorers:
        scores.update(scorer.score(parsed, doc))
    rec = {
        "doc_id": doc["doc_id"], "id": doc["id"], "target": scorers[0].target(doc), "prompt": prompt,
        "output": gen_out["output"], "parsed": parsed.value, "scores": scores,
        "visual_tokens": gen_out["visual_tokens"], "prefill_tokens": gen_out["prefill_tokens"],
        "generated_tokens": gen_out["generated_tokens"],
    }
    if gen_out["raw"] != gen_out["output"]:
        rec["raw_output"] = gen_out["raw"]
    if task.breakdown:
        rec["breakdown"] = doc.get(task.breakdown)
    return _jsonable(rec)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _task_list(tasks: str | Sequence[Any], include_path: Sequence[str]) -> list[Any]:
    from .tasks import TaskConfig, get_task

    items = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not items:
        raise ValueError("no tasks given")
    out = [t if isinstance(t, TaskConfig) else get_task(t, include_path) for t in items]
    names = [t.task for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice: {names}")
    return out


def evaluate(
    model: Any,
    tasks: str | Sequence[Any],
    output: str | os.PathLike | None = None,
    *,
    processor: Any = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    compress: str | Sequence[Any] | None = None,
    position: Any = None,
    resume: bool = False,
    data_root: str | os.PathLike | None = None,
    gen_kwargs: str | dict | None = None,
    prompt_style: str = "auto",
    quiet: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    run_id: str | None = None,
    seed: int = 0,
    include_path: Sequence[str] = (),
    rank: int | None = None,
    world_size: int | None = None,
    wait_timeout: float = 6 * 3600.0,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``tasks``; return the results dict (lmms-eval layout) on rank 0, None elsewhere.

    ``model``: ``"tiny:<family>"``, a checkpoint path, ``(model, processor)``, or a model/``VLMWrapper``
    with ``processor=``. ``tasks``: names or YAML paths (list or comma-separated) or ``TaskConfig``s.
    ``output``: folder for the samples/results files (None: nothing written; no resume, one process).
    ``compress``/``position``: stage specs like ``"fopru:0.25"`` / ``"v2pe:64"`` or configs.
    ``gen_kwargs`` override every task's ``generation_kwargs``. ``resume`` continues the latest run in
    ``output``. ``rank``/``world_size`` override the process group (else accelerate / env vars).
    ``on_batch(task, batch_index)`` runs after each batch's lines are written (raise to abort).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if compress is not None and isinstance(compress, str):
        compress = [compress]
    dist = _dist_info(rank, world_size)
    if output is None and (resume or dist.world > 1):
        raise ValueError("resume and multi-process evaluation need an output folder")
    task_cfgs = _task_list(tasks, include_path)
    overrides = parse_gen_kwargs(gen_kwargs)
    root = Path(data_root if data_root is not None else os.environ.get("VLMKIT_DATA_ROOT", "data"))

    start_wall, start_time = time.time(), time.perf_counter()
    try:
        loaded = load_model(model, processor, compress or (), position, device or dist.device, dtype)
        try:
            return _run(loaded, task_cfgs, output, dist, root, overrides, batch_size=batch_size, limit=limit,
                        resume=resume, prompt_style=prompt_style, quiet=quiet, run_id=run_id, seed=seed,
                        wait_timeout=wait_timeout, on_batch=on_batch, start=(start_wall, start_time))
        finally:
            loaded.release()
    finally:
        dist.close()


def _run(loaded, task_cfgs, output, dist, root, overrides, *, batch_size, limit, resume, prompt_style, quiet,
         run_id, seed, wait_timeout, on_batch, start) -> dict[str, Any] | None:
    """The body of ``evaluate`` once the model is loaded."""
    import torch
    from tqdm.auto import tqdm

    from vlmkit import __version__
    from .readers import load_image
    from .tasks import render_prompt

    start_wall, start_time = start
    head = loaded.text4seg_head

    out_dir = None
    if output is not None:
        out_dir = Path(output) / loaded.name
        out_dir.mkdir(parents=True, exist_ok=True)
    if dist.world > 1 and run_id is None and not dist.initialized:
        run_id = os.environ.get("VLMKIT_RUN_ID")
        if run_id is None:
            raise ValueError("several processes without torch.distributed need a shared run id "
                             "(--run-id or VLMKIT_RUN_ID)")
    if run_id is None and dist.rank == 0:
        run_id = (_latest_run_id(out_dir) if resume and out_dir is not None else None) or _new_run_id(out_dir)
    run_id = dist.broadcast(run_id)

    task_hashes = {t.task: t.hash() for t in task_cfgs}
    manifest = {"run_id": run_id, "model": loaded.spec, "model_name": loaded.name, "stages": loaded.stage_configs,
                "prompt_style": prompt_style, "gen_kwargs": overrides, "task_hashes": task_hashes}
    if out_dir is not None and dist.rank == 0:
        path = out_dir / f"{run_id}_run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            for key in ("model", "stages", "prompt_style", "gen_kwargs"):
                if _jsonable(old.get(key)) != _jsonable(manifest[key]):
                    raise ValueError(f"cannot resume run {run_id}: {key} changed ({old.get(key)!r} -> {manifest[key]!r}); "
                                     "start a new run (no --resume) or use another output folder")
            for name, h in task_hashes.items():
                if name in old.get("task_hashes", {}) and old["task_hashes"][name] != h:
                    raise ValueError(f"cannot resume run {run_id}: task {name!r} changed since it started "
                                     f"(task hash {old['task_hashes'][name][:12]} -> {h[:12]})")
            manifest["task_hashes"] = {**old.get("task_hashes", {}), **task_hashes}
        _write_json_atomic(path, manifest)
    dist.barrier()

    all_records: dict[str, list[dict[str, Any]]] = {}
    n_samples: dict[str, dict[str, int]] = {}
    throughput: dict[str, dict[str, Any]] = {}
    for task in task_cfgs:
        docs = load_docs(task, root, quiet)
        n_eff = _effective_limit(len(docs), limit)
        n_samples[task.task] = {"original": len(docs), "effective": n_eff}
        docs = docs[:n_eff]
        done: dict[int, dict[str, Any]] = {}
        if out_dir is not None:
            for path in _task_files(out_dir, run_id, task.task):
                for rec in _read_records(path):
                    done.setdefault(int(rec["doc_id"]), rec)
        for d, rec in done.items():
            if d < n_eff and rec.get("id") != _jsonable(docs[d]["id"]):
                raise ValueError(f"cannot resume task {task.task!r}: doc_id {d} was id {rec.get('id')!r}, now "
                                 f"{docs[d]['id']!r}; the data changed since the samples were written")
        todo = [d for d in docs if d["doc_id"] % dist.world == dist.rank and d["doc_id"] not in done]
        gen = {**task.generation_kwargs, **overrides}
        parser, scorers = task.build_parser(), task.build_scorers()
        new_records: list[dict[str, Any]] = []
        stats = {"samples": 0, "prefill_tokens": 0, "visual_tokens": 0, "generated_tokens": 0, "wall_s": 0.0}
        fh = _open_append(_samples_path(out_dir, run_id, task.task, dist.rank)) if out_dir is not None else None
        bar = tqdm(total=len(todo), desc=task.task, disable=quiet or dist.rank != 0, dynamic_ncols=True)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        try:
            for b, start in enumerate(range(0, len(todo), batch_size)):
                batch = todo[start:start + batch_size]
                images = [load_image(d, f"task {task.task!r}: ") for d in batch]
                prompts = [build_input_text(loaded.processor, render_prompt(task, d), prompt_style) for d in batch]
                predict = segment_batch if getattr(parser, "needs_masks", False) else generate_batch
                outs = predict(loaded, images, prompts, gen)
                recs = [_score_sample(task, parser, scorers, d, o, p, im, head)
                        for d, o, p, im in zip(batch, outs, prompts, images)]
                if fh is not None:
                    fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                    fh.flush()
                new_records.extend(recs)
                for r in recs:
                    stats["samples"] += 1
                    for k in ("prefill_tokens", "visual_tokens", "generated_tokens"):
                        stats[k] += r[k]
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(task.task, b)
        finally:
            bar.close()
            if fh is not None:
                fh.close()
        stats["wall_s"] = time.perf_counter() - t0
        throughput[task.task] = stats
        all_records[task.task] = [*done.values(), *new_records]

    if dist.world > 1:
        _write_json_atomic(out_dir / f"{run_id}_rank{dist.rank}.json", {"rank": dist.rank, "throughput": throughput})
        dist.barrier()
        if dist.rank != 0:
            return None

    results: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                               "higher_is_better": {}, "n-samples": {}}
    for task in task_cfgs:
        n_eff = n_samples[task.task]["effective"]
        if out_dir is not None:
            records = _merge_task(out_dir, run_id, task.task, n_eff, dist, wait_timeout)
        else:
            records = sorted(all_records[task.task], key=lambda r: r["doc_id"])
        res, better = _task_results(task, records)
        results["results"][task.task] = res
        results["group_subtasks"][task.task] = []
        results["configs"][task.task] = task.to_dict()
        results["versions"][task.task] = (task.raw.get("metadata") or {}).get("version")
        results["n-shot"][task.task] = 0
        results["higher_is_better"][task.task] = better
        results["n-samples"][task.task] = n_samples[task.task]
    results["config"] = {
        "model": "vlmkit", "model_args": f"pretrained={loaded.spec}", "model_name": loaded.name,
        "stages": loaded.stage_configs, "batch_size": batch_size, "limit": limit, "gen_kwargs": overrides,
        "prompt_style": prompt_style, "seed": seed, "world_size": dist.world, "run_id": run_id,
    }
    results["task_hashes"] = task_hashes
    results["throughput"] = _throughput(throughput, out_dir, run_id, dist)
    import transformers

    results["versions_env"] = {"vlmkit": __version__, "transformers": transformers.__version__,
                               "torch": torch.__version__}
    results["date"] = start_wall
    results["start_time"] = start_time
    results["end_time"] = time.perf_counter()
    results["total_evaluation_time_seconds"] = str(results["end_time"] - start_time)
    if out_dir is not None:
        _write_json_atomic(out_dir / f"{run_id}_results.json", results)
        for p in out_dir.glob(f"{glob.escape(run_id)}_rank*.json"):
            p.unlink(missing_ok=True)
    return _jsonable(results)


def _merge_task(out_dir: Path, run_id: str, task: str, n_eff: int, dist: _Dist, wait_timeout: float) -> list[dict]:
    """Rank 0: wait until every doc < n_eff has a line in some rank file, then write the merged,
    doc-ordered samples file (atomically) and drop the rank files."""
    deadline = time.monotonic() + wait_timeout
    while True:
        files = _task_files(out_dir, run_id, task)
        merged: dict[int, dict[str, Any]] = {}
        for path in files:
            for rec in _read_records(path):
                merged.setdefault(int(rec["doc_id"]), rec)
        missing = [d for d in range(n_eff) if d not in merged]
        if not missing:
            break
        if dist.world == 1 or dist.initialized or time.monotonic() > deadline:
            raise RuntimeError(f"task {task!r}: {len(missing)} docs have no result line (e.g. doc_id {missing[:5]}) "
                               f"in {[os.fspath(p) for p in files]}")
        time.sleep(0.5)
    records = [merged[d] for d in range(n_eff)]
    _write_samples_atomic(_samples_path(out_dir, run_id, task), records)
    for path in files[1:]:
        path.unlink(missing_ok=True)
    return records


def _throughput(local: dict[str, dict[str, Any]], out_dir: Path | None, run_id: str, dist: _Dist) -> dict[str, Any]:
    """Samples/s and token totals of this session, summed over ranks (wall time = the slowest rank)."""
    per_rank = [local]
    if dist.world > 1 and out_dir is not None:
        for r in range(1, dist.world):
            p = out_dir / f"{run_id}_rank{r}.json"
            if p.is_file():
                per_rank.append(json.loads(p.read_text())["throughput"])
    out = {}
    for task in local:
        rows = [t[task] for t in per_rank if task in t]
        total = {k: sum(r[k] for r in rows) for k in ("samples", "prefill_tokens", "visual_tokens", "generated_tokens")}
        wall = max(r["wall_s"] for r in rows)
        total.update(wall_s=wall, processes=len(rows),
                     samples_per_s=total["samples"] / wall if wall > 0 else None,
                     prefill_tokens_per_s=total["prefill_tokens"] / wall if wall > 0 else None,
                     generated_tokens_per_s=total["generated_tokens"] / wall if wall > 0 else None)
        out[task] = total
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _print_tasks(include_path: Sequence[str]) -> None:
    from .tasks import list_tasks, load_task

    for name, path in sorted(list_tasks(include_path).items()):
        cfg = load_task(path)
        metrics = ",".join(m["metric"] for m in cfg.metric_list)
        print(f"{name:24s} {cfg.format:10s} {metrics:24s} {cfg.raw.get('description', '')}")


def _print_results(results: dict[str, Any]) -> None:
    print(f"{'task':24s} {'metric':28s} {'value':>10s}")
    for task, res in results["results"].items():
        for key, value in res.items():
            if key == "alias" or "_stderr" in key:
                continue
            shown = f"{value:10.4f}" if isinstance(value, float) else f"{value!s:>10s}"
            print(f"{task:24s} {key:28s} {shown}")
        tp = results["throughput"].get(task, {})
        if tp.get("samples_per_s") is not None:
            print(f"{task:24s} {'samples/s (this session)':28s} {tp['samples_per_s']:10.2f}")


def cli_main(argv: list[str]) -> int:
    """``vlmkit eval --model PATH|tiny:<family> --tasks a,b --output DIR [...]``; ``--tasks list`` lists tasks."""
    import argparse

    p = argparse.ArgumentParser(prog="vlmkit eval", description="Evaluate a model on benchmark tasks (eval/*.yaml).")
    p.add_argument("--model", help="local checkpoint folder, a vlmkit save folder, or tiny:<family>")
    p.add_argument("--tasks", required=True, help="comma-separated task names or YAML paths; 'list' lists them")
    p.add_argument("--output", help="output folder (files go to <output>/<model name>/)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=float, default=None, help="first N docs per task (a fraction < 1: that share)")
    p.add_argument("--compress", action="append", default=None, help="compressor spec, e.g. fopru:0.25 (repeatable)")
    p.add_argument("--position", default=None, help="position scheme spec, e.g. v2pe:64")
    p.add_argument("--resume", action="store_true", help="continue the latest run in the output folder")
    p.add_argument("--data-root", default=None, help="folder the task data paths are relative to "
                   "(default $VLMKIT_DATA_ROOT or ./data)")
    p.add_argument("--gen-kwargs", default=None, help="override generation_kwargs of every task: k=v,k=v")
    p.add_argument("--prompt-style", choices=["auto", "chat", "plain"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (checkpoints only)")
    p.add_argument("--run-id", default=None, help="run id shared by processes without torch.distributed")
    p.add_argument("--include-path", action="append", default=[], help="extra folder of task YAMLs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.tasks == "list":
        _print_tasks(args.include_path)
        return 0
    if not args.model or not args.output:
        p.error("--model and --output are required (except with --tasks list)")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate(
        args.model, args.tasks, args.output, batch_size=args.batch_size, limit=limit, compress=args.compress,
        position=args.position, resume=args.resume, data_root=args.data_root, gen_kwargs=args.gen_kwargs,
        prompt_style=args.prompt_style, quiet=args.quiet, device=args.device, dtype=args.dtype,
        run_id=args.run_id, seed=args.seed, include_path=args.include_path,
    )
    if results is not None:
        _print_results(results)
        out = Path(args.output) / results["config"]["model_name"]
        print(f"results: {out / (results['config']['run_id'] + '_results.json')}")
    return 0
