"""Restricted, size-bounded loading of RefCOCO ``refs(unc).p`` / ``refs(umd).p`` pickles.

RefCOCO ships its referring expressions as Python 2 pickles: a list of dicts of str, int, float and lists
(``{"ref_id", "ann_id", "image_id", "split", "category_id", "file_name", "sent_ids", "sentences": [{"sent",
"raw", "tokens", "sent_id"}]}``). :func:`load_refs_pickle` admits that, plus what a Python 3 re-save of such
data holds (bytes, sets), and nothing that can allocate more than the file's own size:

- every opcode is checked first (``pickletools.genops``, which reads each argument without allocating its
  declared size and fails when the data is shorter than declared): allowed are the opcodes that build lists,
  dicts, tuples, sets, str (Python 2 ``str`` is decoded as latin-1), bytes, int, float, bool and None, marks,
  frames and the memo; ``REDUCE`` only ever calls the three admitted globals below;
- globals: only ``set`` / ``frozenset`` (protocol-2 sets) and ``_codecs.encode`` restricted to latin-1
  (protocol-2 bytes); ``bytearray`` (``bytearray(2**31)`` from a 43-byte pickle), ``bytes``, ``complex`` and
  everything else are refused, as are ``BUILD`` / ``INST`` / ``OBJ`` / ``NEWOBJ``, ``BYTEARRAY8``,
  out-of-band buffers, persistent ids and extension codes;
- a memo index may not exceed the pickle's length (the C unpickler grows its memo table to twice the largest
  index it sees: ``LONG_BINPUT 2**31`` in a 10-byte pickle would allocate 32 GB);
- the file may hold at most ``max_bytes`` (default :data:`MAX_PICKLE_BYTES`, 256 MiB; the released refs files
  are 30-60 MB).

So what is built is bounded by the file's size. Errors are :class:`RefsPickleError` (a ``ValueError`` and a
``pickle.UnpicklingError``) naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any

__all__ = ["MAX_PICKLE_BYTES", "ALLOWED_OPCODES", "ALLOWED_GLOBALS", "RefsPickleError", "load_refs_pickle",
           "loads_refs_pickle"]

#: Largest refs pickle accepted by default (bytes).
MAX_PICKLE_BYTES = 256 * 2**20

#: Opcodes a refs pickle may use: containers, str, bytes, numbers, bool, None, marks, frames, the memo, and
#: globals / REDUCE restricted to :data:`ALLOWED_GLOBALS`.
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "GLOBAL", "STACK_GLOBAL", "REDUCE",
})
#: (module, name) of the only globals: protocol-2 sets and bytes.
ALLOWED_GLOBALS = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
    ("_codecs", "encode"),
})
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


class RefsPickleError(ValueError, pickle.UnpicklingError):
    """A refs pickle that is refused or unreadable (the message names the file)."""


def _latin1_bytes(text: Any, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles of ``bytes`` call (``_codecs.encode(s, "latin1")``), latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefsPickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _refused(module: str, name: str) -> RefsPickleError:
    return RefsPickleError(f"refusing to load {module}.{name}: refs pickles may hold only lists, dicts, tuples, "
                           "sets, str, bytes, int, float, bool and None")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS` (``_codecs.encode`` as a latin-1-only wrapper)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise _refused(module, name)
        if module == "_codecs":
            return _latin1_bytes
        return {"set": set, "frozenset": frozenset}[name]


def _check_opcodes(data: bytes, source: str) -> None:
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name not in ALLOWED_OPCODES:
                raise RefsPickleError(f"{source}: opcode {op.name} at byte {pos} is not allowed in a refs pickle "
                                      "(only lists, dicts, tuples, sets, str, bytes, int, float, bool and None)")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in ALLOWED_GLOBALS:
                    raise RefsPickleError(f"{source}: {_refused(module, name)}")
            if op.name in _MEMO_PUTS and isinstance(arg, int) and not 0 <= arg <= len(data):
                raise RefsPickleError(f"{source}: memo index {arg} at byte {pos} is larger than the pickle "
                                      f"({len(data)} bytes)")
    except RefsPickleError:
        raise
    except ValueError as err:  # truncated, unknown opcode, argument shorter than declared
        raise RefsPickleError(f"{source}: not a readable refs pickle ({err})") from err


def loads_refs_pickle(data: bytes, source: str = "<refs pickle>", *, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Unpickle ``data`` under the rules of the module docstring; :class:`RefsPickleError` naming ``source``
    otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise RefsPickleError(f"{source}: {len(data)} bytes, more than the {max_bytes} a refs pickle may hold "
                         "(max_bytes)")
    _check_opcodes(data, source)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefsPickleError as err:
        raise RefsPickleError(f"{source}: {err}") from err
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, EOFError, MemoryError,
            RecursionError, AttributeError) as err:  # e.g. set() of an unhashable value, a bad memo key
        raise RefsPickleError(f"{source}: not a readable refs pickle ({type(err).__name__}: {err})") from err


def load_refs_pickle(path: str | os.PathLike, *, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Read a RefCOCO refs pickle file safely (see the module docstring). FileNotFoundError when it is missing,
    :class:`RefsPickleError` naming the file when it is too large, refused or not a pickle."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"RefCOCO refs file not found: {os.fspath(p)!r}")
    size = p.stat().st_size
    if size > max_bytes:
        raise RefsPickleError(f"{os.fspath(p)}: {size} bytes, more than the {max_bytes} a refs pickle may hold "
                         "(max_bytes)")
    return loads_refs_pickle(p.read_bytes(), os.fspath(p), max_bytes=max_bytes)
