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

This module is the orchestration and the CLI; the parts live next to it: ``loading`` (the model),
``data`` (a task's docs), ``prediction`` (prompts, generation settings, one batch through
``vlmkit.Predictor``), ``tracking`` (records, sample / manifest / results files, resume, merging,
throughput) and ``distributed`` (ranks and sharding). Their public names are importable from here too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cli import ArgumentParser, command, doc_limit, positive_int, user_input
from ..config import parse_stage_spec
from .data import _effective_limit, load_docs
from .distributed import _dist_info, _shard
from .loading import LoadedModel, compress_configs, load_model
from .prediction import (apply_until, build_input_text, check_gen_kwargs, generate_batch, parse_gen_kwargs,
                         segment_batch)
from .tracking import (_check_run_id, _done_records, _jsonable, _merge_task, _open_append, _resolve_run_id,
                       _samples_path, _score_sample, _task_results, _throughput, _write_manifest,
                       _write_rank_throughput, _write_results)

__all__ = ["evaluate", "cli_main", "parse_stage_spec", "parse_gen_kwargs", "load_model", "generate_batch",
           "segment_batch", "build_input_text", "load_docs", "LoadedModel", "apply_until"]


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _task_list(tasks: str | Sequence[Any], include_path: Sequence[str]) -> list[Any]:
    from .tasks import TaskConfig, get_task

    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not items or any(isinstance(t, str) and not t for t in items):
        raise ValueError(f"tasks {tasks!r}: expected comma-separated task names or YAML paths, without empty "
                         "names (a stray comma?)")
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
    allow_absolute_paths: bool = False,
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
    ``run_id`` names files in the output folder (letters, digits, ``_ . + -``); ``allow_absolute_paths``
    accepts image names in data files that are absolute or leave their image folder (``vlmkit.data.images``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    # everything that can be checked is checked before the model loads: stage specs, settings, tasks, every
    # doc and every image; nothing is written before that
    _check_limit(limit)
    _check_run_id(run_id)  # it names files: never a path out of the output folder
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype not in (None, "auto", "float32") and not (isinstance(model, str) and not model.startswith("tiny:")):
        what = repr(model) if isinstance(model, str) else "a loaded model"
        raise ValueError(f"dtype {dtype!r} applies to checkpoint folders only; {what} keeps its own dtype "
                         "(tiny:<family> models are float32)")
    if compress is not None and isinstance(compress, str):
        compress = [compress]
    configs = compress_configs(compress)
    if isinstance(position, str):
        position = parse_stage_spec(position, "position")
    dist = _dist_info(rank, world_size)
    try:
        if output is None and (resume or dist.world > 1):
            raise ValueError("resume and multi-process evaluation need an output folder")
        task_cfgs = _task_list(tasks, include_path)
        overrides = parse_gen_kwargs(gen_kwargs)
        for t in task_cfgs:
            check_gen_kwargs({**t.generation_kwargs, **overrides}, f"task {t.task!r} generation_kwargs")
        root = Path(data_root if data_root is not None else os.environ.get("VLMKIT_DATA_ROOT", "data"))
        task_docs = {t.task: _task_docs(t, root, limit, quiet, allow_absolute_paths) for t in task_cfgs}

        start_wall, start_time = time.time(), time.perf_counter()
        loaded = load_model(model, processor, configs, position, device or dist.device, dtype)
        try:
            return _run(loaded, task_cfgs, task_docs, output, dist, overrides, batch_size=batch_size, limit=limit,
                        resume=resume, prompt_style=prompt_style, quiet=quiet, run_id=run_id, seed=seed,
                        wait_timeout=wait_timeout, on_batch=on_batch, start=(start_wall, start_time))
        finally:
            loaded.release()
    finally:
        dist.close()


#: ``dtype`` values ``evaluate`` / ``vlmkit eval --dtype`` accept
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_limit(limit: int | float | None) -> None:
    """``limit``: None, a count (an int >= 1) or a share in (0, 1); ValueError naming it otherwise."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"limit must be a number of docs or a share in (0, 1), got {limit!r}")
    if isinstance(limit, float) and 0 < limit < 1:
        return
    if limit < 1 or limit != int(limit):
        raise ValueError(f"limit {limit!r}: expected a number of docs (an integer >= 1) or a share in (0, 1)")


def _task_docs(task, root: Path, limit, quiet: bool, allow_absolute_paths: bool = False,
               ) -> tuple[int, list[dict[str, Any]]]:
    """(number of docs, the first ``limit`` of them) of ``task``, with every image they name verified
    (``vlmkit.data.images.check_images``); ValueError when the task has no docs."""
    from ..data.images import check_images

    docs = load_docs(task, root, quiet, allow_absolute_paths=allow_absolute_paths)
    if not docs:
        raise ValueError(f"task {task.task!r}: its data (under {os.fspath(root)!r}) holds no docs: "
                         f"{task.dataset}")
    n_all = len(docs)
    docs = docs[:_effective_limit(n_all, limit)]
    check_images(docs, source=f"task {task.task!r}")
    return n_all, docs


def _run(loaded, task_cfgs, task_docs, output, dist, overrides, *, batch_size, limit, resume, prompt_style, quiet,
         run_id, seed, wait_timeout, on_batch, start) -> dict[str, Any] | None:
    """The body of ``evaluate`` once the docs are read and checked and the model is loaded."""
    import torch

    from vlmkit import __version__

    start_wall, start_time = start
    out_dir = None
    if output is not None:
        out_dir = Path(output) / loaded.name
        out_dir.mkdir(parents=True, exist_ok=True)
    run_id = _resolve_run_id(run_id, out_dir, resume, dist)

    task_hashes = {t.task: t.hash() for t in task_cfgs}
    manifest = {"run_id": run_id, "model": loaded.spec, "model_name": loaded.name, "stages": loaded.stage_configs,
                "prompt_style": prompt_style, "gen_kwargs": overrides, "task_hashes": task_hashes}
    if out_dir is not None and dist.rank == 0:
        _write_manifest(out_dir, run_id, manifest)
    dist.barrier()

    all_records: dict[str, list[dict[str, Any]]] = {}
    n_samples: dict[str, dict[str, int]] = {}
    throughput: dict[str, dict[str, Any]] = {}
    for task in task_cfgs:
        n_docs, docs = task_docs[task.task]
        n_eff = len(docs)
        n_samples[task.task] = {"original": n_docs, "effective": n_eff}
        done = _done_records(out_dir, run_id, task, docs)
        todo = _shard(docs, dist, skip=done)
        torch.manual_seed(seed)
        new_records, throughput[task.task] = _run_task(loaded, task, todo, {**task.generation_kwargs, **overrides},
                                                       out_dir, run_id, dist, batch_size=batch_size,
                                                       prompt_style=prompt_style, quiet=quiet, on_batch=on_batch)
        all_records[task.task] = [*done.values(), *new_records]

    if dist.world > 1:
        _write_rank_throughput(out_dir, run_id, dist.rank, throughput)
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
        _write_results(out_dir, run_id, results)
    return _jsonable(results)


def _run_task(loaded, task, todo, gen, out_dir, run_id, dist, *, batch_size, prompt_style, quiet, on_batch,
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run this rank's ``todo`` docs of ``task`` in batches, appending each batch's records to the rank's
    samples file as soon as it is scored → (the new records, this rank's throughput stats for the task)."""
    from tqdm.auto import tqdm

    from .readers import load_image
    from .tasks import render_prompt

    head = loaded.text4seg_head
    parser, scorers = task.build_parser(), task.build_scorers()
    predict = segment_batch if getattr(parser, "needs_masks", False) else generate_batch
    new_records: list[dict[str, Any]] = []
    stats = {"samples": 0, "prefill_tokens": 0, "visual_tokens": 0, "generated_tokens": 0, "wall_s": 0.0}
    fh = _open_append(_samples_path(out_dir, run_id, task.task, dist.rank)) if out_dir is not None else None
    bar = tqdm(total=len(todo), desc=task.task, disable=quiet or dist.rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for b, start in enumerate(range(0, len(todo), batch_size)):
            batch = todo[start:start + batch_size]
            # a doc's image, or its list of images (multi-image docs: shapes_multi), in prompt order
            images = [[load_image({**d, "image": src}, f"task {task.task!r}: ") for src in d["image"]]
                      if isinstance(d["image"], list) else load_image(d, f"task {task.task!r}: ") for d in batch]
            prompts = [build_input_text(loaded.processor, render_prompt(task, d), prompt_style,
                                        len(im) if isinstance(im, list) else 1) for d, im in zip(batch, images)]
            outs = predict(loaded, images, prompts, gen)
            recs = [_score_sample(task, parser, scorers, d, o, p, im[0] if isinstance(im, list) else im, head)
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
    return new_records, stats


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


def _check_device(device: str | None) -> None:
    """``device``: None, or a torch device this machine has; ValueError naming it otherwise."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here; use --device cpu")


@command("vlmkit eval")
def cli_main(argv: list[str]) -> int:
    """``vlmkit eval --model PATH|tiny:<family> --tasks a,b --output DIR [...]``; ``--tasks list`` lists tasks."""
    p = ArgumentParser(prog="vlmkit eval", description="Evaluate a model on benchmark tasks (eval/*.yaml). "
                       "Arguments, stage specs, generation settings, every doc and every image are checked before "
                       "the model loads.")
    p.add_argument("--model", help="local checkpoint folder, a vlmkit save folder, or tiny:<family> "
                   "(required, except with --tasks list)")
    p.add_argument("--tasks", required=True, help="comma-separated task names or YAML paths; 'list' lists them")
    p.add_argument("--output", help="output folder; files go to OUTPUT/<model name>/ "
                   "(required, except with --tasks list)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="docs per generate call")
    p.add_argument("--limit", type=doc_limit, default=None,
                   help="the first N docs of each task, or a share in (0, 1) of them (default: all)")
    p.add_argument("--compress", action="append", default=None, metavar="SPEC",
                   help="compressor or pruner spec, repeatable: fopru:0.25 (a lone value is a keep ratio in (0, 1]), "
                   "fopru:n=64 (keep 64 tokens), fopru:0.25,strategy=row, fastv:0.5, vtw (default: none)")
    p.add_argument("--position", default=None, metavar="SPEC",
                   help="position scheme spec, e.g. v2pe:64 (default: none)")
    p.add_argument("--resume", action="store_true", help="continue the latest run in the output folder")
    p.add_argument("--data-root", default=None, help="existing folder the task data paths are relative to "
                   "(default: $VLMKIT_DATA_ROOT, else ./data, created for synthetic tasks)")
    p.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                   help="override every task's generation_kwargs, e.g. max_new_tokens=8,temperature=0 "
                   "(default: each task's own)")
    p.add_argument("--prompt-style", choices=["auto", "chat", "plain"], default="auto",
                   help="chat: the processor's chat template; plain: 'user : <image> … assistant :'; auto: chat when "
                   "the processor has a template")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype of a checkpoint folder (default: as saved; tiny:<family> models are float32)")
    p.add_argument("--run-id", default=None, help="run id shared by processes without torch.distributed "
                   "(default: a new time stamp; with --resume the latest run's)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra folder of task YAMLs, repeatable (default: only eval/)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before each task")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept image names in data files that are absolute or resolve outside their image folder "
                   "(default: refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no echo of the parsed stages")
    args = p.parse_args(argv)
    with user_input():
        for folder in args.include_path:
            if not os.path.isdir(folder):
                raise ValueError(f"--include-path {folder!r}: no such folder")
        if args.tasks == "list":
            _print_tasks(args.include_path)
            return 0
        missing = [name for name, value in (("--model", args.model), ("--output", args.output)) if not value]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required (except with --tasks list)")
        if args.data_root is not None and not os.path.isdir(args.data_root):
            raise ValueError(f"--data-root {args.data_root!r}: no such folder (create it first; synthetic tasks "
                             "write their data into it)")
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"--output {args.output!r} is a file; expected a folder")
        _check_device(args.device)
        compress = [parse_stage_spec(c) for c in args.compress or ()]
        position = parse_stage_spec(args.position, "position") if args.position else None
        if not args.quiet and (compress or position):
            for config in [*compress, *([position] if position else [])]:
                print(f"vlmkit eval: stage {config!r}")
        results = evaluate(
            args.model, args.tasks, args.output, batch_size=args.batch_size, limit=args.limit, compress=compress,
            position=position, resume=args.resume, data_root=args.data_root, gen_kwargs=args.gen_kwargs,
            prompt_style=args.prompt_style, quiet=args.quiet, device=args.device, dtype=args.dtype,
            run_id=args.run_id, seed=args.seed, include_path=args.include_path,
            allow_absolute_paths=args.allow_absolute_paths,
        )
    if results is not None:
        _print_results(results)
        out = Path(args.output) / results["config"]["model_name"]
        print(f"results: {out / (results['config']['run_id'] + '_results.json')}")
    return 0
