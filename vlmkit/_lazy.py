"""Lazy package exports (timm-style, no import-time work): names resolve on first use."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], fallback: str | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``exports`` map name -> defining module.

    ``fallback`` (``"module:function"``): asked for names not in ``exports``; returns the value or None.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            value = None
            if fallback is not None and not name.startswith("__"):
                module, func = fallback.split(":")
                value = getattr(importlib.import_module(module), func)(name)
            if value is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return value
        value = getattr(importlib.import_module(exports[name]), name)
        sys.modules[package].__dict__[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
