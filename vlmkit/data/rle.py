"""COCO run-length encoding of binary masks, byte-compatible with pycocotools.

A COCO RLE is ``{"size": [H, W], "counts": ...}``. ``counts`` are the lengths of alternating runs
of 0s and 1s over the mask flattened in column-major (Fortran) order, always starting with a run
of 0s (possibly empty). The compressed string form is the one of ``maskApi.c`` (``rleToString`` /
``rleFrString``): from the fourth count on, each count is stored as the difference to the count
two places before it, and every value is written as a little-endian sequence of 5-bit groups, one
ASCII character (``chr(48 + group)``) per group, bit 0x20 meaning "more groups follow" and bit 0x10
of the last group giving the sign.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rle_encode", "rle_decode", "mask_to_counts", "counts_to_string", "string_to_counts"]

_CHAR_OFFSET = 48  # '0': the 64 symbols are chr(48) .. chr(111)
_GROUP_BITS = 5
_GROUP_MASK = 0x1F
_SIGN_BIT = 0x10
_MORE_BIT = 0x20
_UINT32 = 1 << 32


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a bool/0-1 mask [H, W] (column-major runs, first run is 0s)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def counts_to_string(counts: list[int]) -> str:
    """Compress counts into the COCO string (``rleToString`` in maskApi.c)."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & _GROUP_MASK
            x >>= _GROUP_BITS  # arithmetic shift, like C's >> on a signed long
            more = x != -1 if group & _SIGN_BIT else x != 0
            if more:
                group |= _MORE_BIT
            chars.append(chr(group + _CHAR_OFFSET))
    return "".join(chars)


def string_to_counts(s: str | bytes) -> list[int]:
    """Decompress a COCO counts string into a list of ints (``rleFrString`` in maskApi.c)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError(f"truncated COCO RLE string {s!r}: value at char {p} never ends")
            c = ord(s[p]) - _CHAR_OFFSET
            if not 0 <= c < 64:
                raise ValueError(f"invalid COCO RLE character {s[p]!r} at {p} (accepted '0'..'o')")
            x |= (c & _GROUP_MASK) << (_GROUP_BITS * k)
            more = bool(c & _MORE_BIT)
            p += 1
            k += 1
            if not more and c & _SIGN_BIT:
                x |= -1 << (_GROUP_BITS * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x % _UINT32)  # the C code stores into uint
    return counts


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool mask [H, W] as compressed COCO RLE ``{"size": [H, W], "counts": str}``.

    Same output as ``pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))`` with the
    ``counts`` bytes decoded to ``str`` (as stored in COCO JSON files).
    """
    counts = mask_to_counts(mask)
    h, w = np.asarray(mask).shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(counts)}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE to bool [H, W]; ``counts`` may be a compressed str/bytes or a list of ints."""
    try:
        h, w = (int(v) for v in rle["size"])
        raw = rle["counts"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a COCO RLE dict with 'size' [H, W] and 'counts': {rle!r}") from err
    counts = string_to_counts(raw) if isinstance(raw, (str, bytes)) else [int(c) for c in raw]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(
            f"RLE counts must be non-negative and sum to H*W={h * w} for size {[h, w]}, "
            f"got sum {sum(counts)} from {counts[:8]}{'...' if len(counts) > 8 else ''}"
        )
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")
