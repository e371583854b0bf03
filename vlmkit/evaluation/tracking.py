"""Results and resume: the per-sample records, the files under ``<output>/<model name>/`` and the results.

Files of run ``<run_id>`` (lmms-eval shaped):

* ``<run_id>_samples_<task>.jsonl``: one record per doc (``_score_sample``), appended and flushed batch by
  batch; rank r>0 appends to ``<run_id>_samples_<task>.rank<r>.jsonl`` until rank 0 merges them
  (``_merge_task``: doc-ordered, written atomically, rank files dropped);
* ``<run_id>_run.json``: the run manifest (model, stages, prompt style, generation overrides, task hashes)
  that a resumed run must match (``_write_manifest``);
* ``<run_id>_rank<r>.json``: rank r's throughput, summed by rank 0 (``_throughput``) and then deleted;
* ``<run_id>_results.json``: written by the runner from ``_task_results`` and ``_throughput``.

Records are keyed by (task, doc_id); a resumed run reuses the latest run id, skips the docs that have a
record (``_done_records``) and recomputes the results from all records in doc order, so it writes the same
results as an uninterrupted run. A truncated last line (an interrupted write) is ignored and cut off.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .distributed import _Dist


# ---------------------------------------------------------------------------------------------
# Records
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


def _score_sample(task, parser, scorers, doc, gen_out, prompt, image, head) -> dict[str, Any]:
    """One doc's record: its answer (``gen_out``, a ``generate_batch`` / ``segment_batch`` result) parsed and
    scored, with the prompt and token counts (``head``: the model's text-mask head for the parser, or None)."""
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


# ---------------------------------------------------------------------------------------------
# Sample files
# ---------------------------------------------------------------------------------------------


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


def _done_records(out_dir: Path | None, run_id: str, task, docs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The records already written for ``task`` in this run (any rank), by doc_id; ValueError when a doc
    among ``docs`` (the effective ones) now has another id than its record (the data changed)."""
    done: dict[int, dict[str, Any]] = {}
    if out_dir is not None:
        for path in _task_files(out_dir, run_id, task.task):
            for rec in _read_records(path):
                done.setdefault(int(rec["doc_id"]), rec)
    for d, rec in done.items():
        if d < len(docs) and rec.get("id") != _jsonable(docs[d]["id"]):
            raise ValueError(f"cannot resume task {task.task!r}: doc_id {d} was id {rec.get('id')!r}, now "
                             f"{docs[d]['id']!r}; the data changed since the samples were written")
    return done


def _merge_task(out_dir: Path, run_id: str, task: str, n_eff: int, dist: "_Dist", wait_timeout: float) -> list[dict]:
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


# ---------------------------------------------------------------------------------------------
# Run ids, manifest, atomic writes
# ---------------------------------------------------------------------------------------------


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


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127}$")


def _check_run_id(run_id: Any, what: str = "run id") -> None:
    """A run id names files inside the output folder (``<run_id>_results.json``): 1-128 letters, digits and
    ``_ . + -``, starting with a letter or digit, so it can never name a path elsewhere (``../../x``); ValueError
    naming it otherwise. None (choose one) passes."""
    if run_id is not None and (not isinstance(run_id, str) or not _RUN_ID.match(run_id)):
        raise ValueError(f"{what} {run_id!r}: expected 1-128 letters, digits and _ . + - starting with a letter or "
                         "digit (it names files inside the output folder)")


def _resolve_run_id(run_id: str | None, out_dir: Path | None, resume: bool, dist: "_Dist") -> str:
    """The run id every rank uses: the given one, else (ranks without torch.distributed) ``VLMKIT_RUN_ID``,
    else rank 0's choice (the latest run in ``out_dir`` with ``resume``, else a new one) broadcast."""
    _check_run_id(run_id)
    if dist.world > 1 and run_id is None and not dist.initialized:
        run_id = os.environ.get("VLMKIT_RUN_ID")
        _check_run_id(run_id, "VLMKIT_RUN_ID")
        if run_id is None:
            raise ValueError("several processes without torch.distributed need a shared run id "
                             "(--run-id or VLMKIT_RUN_ID)")
    if run_id is None and dist.rank == 0:
        run_id = (_latest_run_id(out_dir) if resume and out_dir is not None else None) or _new_run_id(out_dir)
    return dist.broadcast(run_id)


def _write_manifest(out_dir: Path, run_id: str, manifest: dict[str, Any]) -> None:
    """Write ``<run_id>_run.json``; when it exists (a resumed run), first check that the model, stages, prompt
    style, generation overrides and the hashes of the tasks run again are unchanged (ValueError otherwise),
    and keep the hashes of the tasks not run this time."""
    path = out_dir / f"{run_id}_run.json"
    task_hashes = manifest["task_hashes"]
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
        manifest = {**manifest, "task_hashes": {**old.get("task_hashes", {}), **task_hashes}}
    _write_json_atomic(path, manifest)


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
# Throughput, results file
# ---------------------------------------------------------------------------------------------


def _rank_path(out_dir: Path, run_id: str, rank: int) -> Path:
    return out_dir / f"{run_id}_rank{rank}.json"


def _write_rank_throughput(out_dir: Path, run_id: str, rank: int, throughput: dict[str, dict[str, Any]]) -> None:
    """Rank ``rank``'s throughput for rank 0 to sum (``_throughput``)."""
    _write_json_atomic(_rank_path(out_dir, run_id, rank), {"rank": rank, "throughput": throughput})


def _throughput(local: dict[str, dict[str, Any]], out_dir: Path | None, run_id: str, dist: "_Dist") -> dict[str, Any]:
    """Samples/s and token totals of this session, summed over ranks (wall time = the slowest rank)."""
    per_rank = [local]
    if dist.world > 1 and out_dir is not None:
        for r in range(1, dist.world):
            p = _rank_path(out_dir, run_id, r)
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


def _write_results(out_dir: Path, run_id: str, results: dict[str, Any]) -> None:
    """Write ``<run_id>_results.json`` and drop the ranks' throughput files."""
    _write_json_atomic(out_dir / f"{run_id}_results.json", results)
    for p in out_dir.glob(f"{glob.escape(run_id)}_rank*.json"):
        p.unlink(missing_ok=True)
