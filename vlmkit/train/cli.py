"""``vlmkit finetune``: fine-tune a VLM with a PEFT recipe through the vlmkit wrapper (see ``loop.py``)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmkit finetune",
        description="Fine-tune a vision-language model with a PEFT recipe (adapters/*.yaml). Multi-process: "
        "accelerate launch --multi_gpu --num_processes N scripts/finetune.py ... (add --cpu on CPU hosts).",
    )
    p.add_argument("--recipe", required=True, help="recipe YAML file, or a recipe name (lora, qlora, dora, lisa, full-projector)")
    p.add_argument("--model", required=True, help="local checkpoint folder, or tiny:<family> (vlmkit.testing)")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON or ShareGPT messages JSON / JSONL")
    p.add_argument("--output", required=True, help="output folder: adapter, vlmkit stages, checkpoints/, logs")
    p.add_argument("--image-folder", default=None, help="folder image paths are relative to (default: next to --data, then its images/)")
    p.add_argument("--wrap", nargs="+", action="extend", default=[], metavar="SPEC",
                   help="vlmkit stages active while training, e.g. fopru:0.25 v2pe:64")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: epochs × steps per epoch)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="records per process per step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=None, help="write a checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (0: all)")
    p.add_argument("--max-length", type=int, default=None, help="truncate records to this many tokens (never inside images)")
    p.add_argument("--template", choices=["auto", "plain", "chat"], default="auto",
                   help="prompt format: the tokenizer's chat template, or plain 'user : … assistant : …' (auto: chat if the tokenizer has one)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --output")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is visible (DDP on gloo)")
    p.add_argument("--save-rank-weights", action="store_true",
                   help="every process writes its final trainable weights to OUTPUT/ranks/rank<i>.safetensors (DDP check)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return p


def cli_main(argv: list[str]) -> int:
    from .loop import FinetuneArgs, finetune

    args = build_parser().parse_args(argv)
    fields = vars(args)
    try:
        finetune(FinetuneArgs(**fields))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"vlmkit finetune: error: {e}", file=sys.stderr)
        return 2
    return 0
