"""Value checks for experts specs and ``ExpertsConfig``: ints, merge windows, query grids, RGB triples."""

from __future__ import annotations

import math
from typing import Any


# ------------------------------------------------------------------------------------------------
# Small checks
# ------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_window(merge: Any, where: str = "merge") -> tuple[int, int]:
    """``m`` → (1, m) (m horizontally adjacent patches); ``[mh, mw]`` → (mh, mw); ValueError otherwise."""
    if _is_int(merge) and merge >= 1:
        return 1, int(merge)
    if isinstance(merge, (list, tuple)) and len(merge) == 2 and all(_is_int(m) and m >= 1 for m in merge):
        return int(merge[0]), int(merge[1])
    raise ValueError(f"{where} must be an int m >= 1 (1×m window) or a pair [mh, mw] of ints >= 1, got {merge!r}")


def query_grid(num_queries: int) -> tuple[int, int]:
    """The most square (h, w) with h·w = ``num_queries`` and h ≤ w (16 → (4, 4), 8 → (2, 4), 7 → (1, 7))."""
    if not _is_int(num_queries) or num_queries < 1:
        raise ValueError(f"queries must be an int >= 1, got {num_queries!r}")
    h = max(d for d in range(1, math.isqrt(num_queries) + 1) if num_queries % d == 0)
    return h, num_queries // h


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple)) or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{where} must be three numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]
