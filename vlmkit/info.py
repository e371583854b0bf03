"""``vlmkit info``: versions, supported families, stage types and which optional parts are installed."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util

OPTIONAL = {
    "bitsandbytes": "QLoRA (4-bit base models)",
    "segment_anything": "SAM refinement and segmentation heads",
    "open_clip": "open_clip experts and FrozenSeg",
    "lmms_eval": "lmms-eval bridge",
}
CORE = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    """The facts ``vlmkit info`` prints, as a dict."""
    from .config import registered_types
    from .families import supported_families

    return {
        "vlmkit": _version("vlmkit"),
        "packages": {name: _version(name) for name in CORE},
        "families": supported_families(),
        "stage_types": registered_types(),
        "optional": {mod: (importlib.util.find_spec(mod) is not None, what) for mod, what in OPTIONAL.items()},
    }


def cli_main(argv: list[str]) -> int:
    from .cli import command

    return command("vlmkit info")(_main)(argv)


def _main(argv: list[str]) -> int:
    import json

    from .cli import ArgumentParser

    parser = ArgumentParser(prog="vlmkit info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"vlmkit {info['vlmkit']}")
    for name, version in info["packages"].items():
        print(f"  {name:14s} {version}")
    print(f"families:    {', '.join(info['families'])}")
    print(f"stage types: {', '.join(info['stage_types'])}")
    for mod, (ok, what) in info["optional"].items():
        print(f"  [{'x' if ok else ' '}] {mod:18s} {what}")
    return 0
