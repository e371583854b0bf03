"""Where vlmkit's YAML data folders are: ``eval/`` (benchmark tasks) and ``adapters/`` (PEFT recipes).

The top-level ``eval/`` and ``adapters/`` folders of the source tree are the only source of truth. A wheel
cannot install top-level data folders next to the package, so the build copies them into the package:
``setup.py``'s ``build_py`` writes ``vlmkit/_shipped/eval/*.yaml`` and ``vlmkit/_shipped/adapters/**.yaml``
into the build folder (never into the source tree), and the wheel carries that copy.

``data_dir(name)`` finds the folder either way: in a source checkout (an editable install, or running from
the tree) the top-level folder next to the package, recognised by the ``pyproject.toml`` beside it; in a
wheel install the copy inside the package. The source checkout wins when both exist.
"""

from __future__ import annotations

from pathlib import Path

#: subfolder of the installed package that holds the copies made at build time
SHIPPED = "_shipped"
#: the data folders a wheel carries, and the file patterns copied from each (recursively)
DATA_FOLDERS = {"eval": ("*.yaml", "*.yml"), "adapters": ("*.yaml", "*.yml")}

_PACKAGE = Path(__file__).resolve().parent


def source_dir(name: str) -> Path | None:
    """The top-level ``name`` folder of the source checkout this package runs from, or None (installed)."""
    root = _PACKAGE.parent
    folder = root / name
    return folder if (root / "pyproject.toml").is_file() and folder.is_dir() else None


def shipped_dir(name: str) -> Path | None:
    """The build-time copy of ``name`` inside an installed wheel, or None (a source checkout has none)."""
    folder = _PACKAGE / SHIPPED / name
    return folder if folder.is_dir() else None


def data_dir(name: str) -> Path | None:
    """``eval`` or ``adapters``: the source checkout's folder, else the wheel's copy, else None."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; vlmkit ships {sorted(DATA_FOLDERS)}")
    return source_dir(name) or shipped_dir(name)
