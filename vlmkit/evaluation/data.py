"""A task's docs: read with the task's reader from the data root, synthesised first when the task says so.

Each doc gets ``doc_id`` = its index in the reader's order; the runner's resume files, sharding and results
are keyed by it. ``limit`` (first N docs, or a share < 1) becomes the effective doc count here too.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_docs"]


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
    """How many of ``n`` docs ``limit`` keeps: all (None), the first ``limit``, or ``ceil(n * limit)`` for a
    float share in (0, 1)."""
    if limit is None:
        return n
    if isinstance(limit, float) and 0 < limit < 1:
        return min(n, int(math.ceil(n * limit)))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    return min(n, int(limit))
