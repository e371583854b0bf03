"""The ``vlmkit`` command. Each subcommand lives next to the code it drives and is imported on use."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vlmkit.info:cli_main", "versions, supported families and which optional parts are installed"),
    "shapes": ("vlmkit.data.shapes:cli_main", "write the synthetic shapes benchmark to a folder"),
    "demo": ("vlmkit.demo:cli_main", "the main job: run the default model through the pipeline"),
    "eval": ("vlmkit.evaluation.runner:cli_main", "evaluate a model on benchmark tasks (eval/*.yaml)"),
    "finetune": ("vlmkit.train.cli:cli_main", "fine-tune with a PEFT recipe (adapters/*.yaml)"),
    "prune-viz": ("vlmkit.viz.pruning:cli_main", "draw which visual tokens FoPru keeps on an image (PNG)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlmkit", description="vlmkit: extend Hugging Face VLMs")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module, func = COMMANDS[args.command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
