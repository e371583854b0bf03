"""A task's docs: read with the task's reader from the data root, synthesised first when the task says so.

Each doc gets ``doc_id`` = its index in the reader's order; the runner's resume files, sharding and results
are keyed by it. ``limit`` (first N docs, or a share < 1) becomes the effective doc count here too.

Confinement: a task's ``synthesize.out`` must name a folder inside the data root (ValueError naming it
otherwise, before anything is written), and image names in data files must stay inside their image folder
unless ``allow_absolute_paths`` (``vlmkit.data.images``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_docs", "synthetic_out"]


def synthetic_out(task, data_root: str | os.PathLike) -> Path:
    """``data_root / synthesize.out``; ValueError naming the task and the value when it is absolute or leaves
    the data root (``..``, or a symbolic link pointing out of it)."""
    out = task.synthesize["out"]
    root = Path(data_root)
    if not isinstance(out, str) or not out or os.path.isabs(out):
        raise ValueError(f"task {task.task!r}: synthesize.out must be a folder relative to the data root "
                         f"{os.fspath(root)!r}, got {out!r}")
    path = root / out
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real == real_root or os.path.commonpath([real, real_root]) != real_root:
        raise ValueError(f"task {task.task!r}: synthesize.out {out!r} resolves to {real!r}, not a folder inside "
                         f"the data root {os.fspath(root)!r}")
    return path


def _ensure_synthetic(task, data_root: Path, quiet: bool) -> None:
    """Write the task's synthetic data (shapes) under the data root when its files are missing.

    Generated in a private folder and moved in file by file (atomic), so concurrent ranks are safe.
    """
    import shutil

    from .tasks import resolve_dataset

    synth = task.synthesize
    if not synth:
        return
    out = synthetic_out(task, data_root)  # refuse an escaping folder even when the data is already there
    paths = [v for k, v in resolve_dataset(task, data_root).items() if isinstance(v, str) and k in
             ("questions", "annotations", "images", "refs", "instances")]
    if all(os.path.exists(p) for p in paths):
        return
    from vlmkit.data.shapes import write_dataset

    tmp = data_root / f".{Path(synth['out']).name}.tmp-{os.getpid()}"
    kwargs = {k: synth[k] for k in ("seed", "size", "split", "max_shapes", "background") if k in synth}
    if not quiet:
        print(f"[vlmkit eval] {task.task}: writing the synthetic shapes data ({synth.get('n', 100)} images) to {out}",
              file=sys.stderr)
    if synth.get("generator") == "shapes_multi":  # n questions, each over `images` images of a pool
        from vlmkit.data.shapes import write_multi

        write_multi(tmp, int(synth.get("n", 100)), synth.get("images", 4), pool=synth.get("pool"), **kwargs)
    else:
        write_dataset(tmp, int(synth.get("n", 100)), **kwargs)
    for src in sorted(tmp.rglob("*")):
        if src.is_file():
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)


def load_docs(task, data_root: str | os.PathLike, quiet: bool = True, *,
              allow_absolute_paths: bool = False) -> list[dict[str, Any]]:
    """All docs of ``task`` (synthesised first if the task says so), each with ``doc_id`` = its index.
    ``allow_absolute_paths``: accept image names in the data files that are absolute or leave their folder."""
    import inspect

    from .readers import READERS
    from .tasks import resolve_dataset

    root = Path(data_root)
    _ensure_synthetic(task, root, quiet)
    fn = READERS[task.format].fn
    kwargs = resolve_dataset(task, root)
    if "allow_absolute_paths" in inspect.signature(fn).parameters:
        kwargs["allow_absolute_paths"] = allow_absolute_paths
    try:
        docs = fn(**kwargs)
    except UnicodeDecodeError as err:  # a ValueError whose constructor takes 5 arguments; name the file instead
        raise ValueError(f"task {task.task!r} (data root {os.fspath(root)!r}): a data file is not UTF-8 text "
                         f"({err.reason} at byte {err.start})") from err
    except (FileNotFoundError, ValueError, ImportError) as err:
        kind = type(err) if type(err) in (FileNotFoundError, ValueError, ImportError) else ValueError
        raise kind(f"task {task.task!r} (data root {os.fspath(root)!r}): {err}") from err
    for i, doc in enumerate(docs):
        doc["doc_id"] = i
    return docs


def _effective_limit(n: int, limit: int | float | None) -> int:
    """How many of ``n`` docs ``limit`` keeps: all (None), the first ``limit``, or ``ceil(n * limit)`` for a
    float share in (0, 1)."""
    if limit is None:
        return n
    if isinstance(limit, float) and 0 < limit < 1:
        return min(n, int(math.ceil(n * limit)))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    return min(n, int(limit))
