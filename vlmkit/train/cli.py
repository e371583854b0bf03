"""``vlmkit finetune``: fine-tune a VLM with a PEFT recipe through the vlmkit wrapper (see ``loop.py``)."""

from __future__ import annotations

import argparse

from ..cli import ArgumentParser, command, non_negative_int, positive_float, positive_int, user_input


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="vlmkit finetune",
        description="Fine-tune a vision-language model with a PEFT recipe (adapters/*.yaml). Multi-process: "
        "accelerate launch --multi_gpu --num_processes N scripts/finetune.py ... (add --cpu on CPU hosts). The recipe, "
        "the stage specs, every record and every image of --data are checked before the model loads. Settings not "
        "given come from the recipe's defaults section.",
    )
    p.add_argument("--recipe", required=True, help="recipe YAML file, or a recipe name (lora, qlora, dora, lisa, full-projector)")
    p.add_argument("--model", required=True, help="local checkpoint folder, or tiny:<family> (vlmkit.testing)")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON or ShareGPT messages JSON / JSONL")
    p.add_argument("--output", required=True, help="output folder: adapter, vlmkit stages, checkpoints/, logs")
    p.add_argument("--image-folder", default=None, help="folder image paths are relative to (default: next to --data, then its images/)")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept image names in --data that are absolute or resolve outside their folder (default: refused)")
    p.add_argument("--wrap", nargs="+", action="extend", default=[], metavar="SPEC",
                   help="vlmkit stages active while training, e.g. fopru:0.25 (a lone value is a keep ratio in (0, 1]; "
                   "fopru:n=64 keeps 64 tokens) v2pe:64 (default: none)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps (default: the recipe's, else epochs × steps per epoch)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the data (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="records per process per step (default: the recipe's)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate, > 0 (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the init and dropout")
    p.add_argument("--save-every", type=non_negative_int, default=None,
                   help="write a checkpoint every N steps, 0: only at the end (default: the recipe's)")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=2, help="how many recent checkpoints to keep (0: all)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate records to this many tokens, never inside images (default: the recipe's)")
    p.add_argument("--template", choices=["auto", "plain", "chat"], default="auto",
                   help="prompt format: the tokenizer's chat template, or plain 'user : … assistant : …' (auto: chat if the tokenizer has one)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --output")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is visible (DDP on gloo)")
    p.add_argument("--save-rank-weights", action="store_true",
                   help="every process writes its final trainable weights to OUTPUT/ranks/rank<i>.safetensors (DDP check)")
    p.add_argument("--shard", choices=["fsdp", "zero2", "zero3"], default=None,
                   help="shard across the launched processes with vlmkit's own engine: fsdp (torch FSDP2 fully_shard), "
                   "zero2 / zero3 (DeepSpeed ZeRO); torchrun --nproc_per_node N scripts/finetune.py --shard fsdp ... "
                   "(gloo on CPU; see adapters/README.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, messages or library warnings")
    return p


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be checked before a model loads: the recipe, the stage specs, every record of ``--data`` and every
    image and mask it names (opened and verified: ``vlmkit.data.images.check_images``). Also quiets the
    warnings bitsandbytes (and the ``kernels`` package it probes) log when peft imports it, about CPU 4-bit
    kernels, when nothing is quantized (or with ``--quiet``), and DeepSpeed's CPU-fallback notice (``--quiet``)."""
    import logging
    import os

    from ..config import parse_stage_spec
    from ..data.images import check_images
    from .data import load_conversations
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    if args.quiet or recipe.quantization is None:  # peft imports bitsandbytes, which probes the `kernels` hub
        for name in ("bitsandbytes", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.quiet:
        import torch

        # accelerate imports DeepSpeed when installed, which warns on stdout that it fell back to the CPU unless
        # told so; naming the accelerator it would pick anyway keeps a quiet run quiet
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for spec in args.wrap:
        parse_stage_spec(spec)
    if not args.model.startswith("tiny:") and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is neither tiny:<family> nor a local checkpoint folder "
                         "(vlmkit never downloads)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a file; expected a folder")
    conversations = load_conversations(args.data, args.image_folder,
                                       allow_absolute_paths=getattr(args, "allow_absolute_paths", False))
    check_images(conversations, source=str(args.data))


@command("vlmkit finetune")
def cli_main(argv: list[str]) -> int:
    from .loop import FinetuneArgs, finetune

    args = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "debug"}
    with user_input():  # user mistakes (ValueError, OSError, ImportError) are one line; RuntimeError: see below
        _check_inputs(args)
        try:
            finetune(FinetuneArgs(**fields))
        except RuntimeError as err:
            if not _raised_here(err):  # torch's and other libraries' RuntimeErrors are bugs: keep the traceback
                raise
            raise ValueError(str(err)) from err  # vlmkit.train's launch / sharding checks: a set-up mistake
    return 0


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by code in ``vlmkit/train`` itself (not by a library it called)."""
    import os

    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == os.path.dirname(
        os.path.abspath(__file__))
