"""The fine-tuning loop: a plain ``accelerate`` loop over the wrapped model, exact checkpoints and resume.

The model trained is ``vlmkit.wrap(apply_recipe(hf_model, recipe), *stages)``: compression, position
schemes and heads are active while training, the adapter stays a plain PEFT adapter of the HF model.
Determinism: the data order is a pure function of ``(seed, epoch)`` and the batch of step ``s`` a pure
function of ``(seed, s, number of records, batch size, world size, rank)``; the learning rate a pure
function of the step; checkpoints hold every RNG state. Resuming therefore replays the same steps.

Multi-process: the same command under ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun
--nproc_per_node N`` runs DDP (gloo on CPU-only hosts, where vlmkit forces the CPU path); every rank
takes its own slice of each global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt

FINETUNE_META = "finetune.json"
TRAIN_LOG = "train_log.jsonl"
TRAINED_WEIGHTS = "trained_weights.safetensors"  # method "freeze": the trained HF parameters by name
RANKS_DIR = "ranks"


@dataclasses.dataclass
class FinetuneArgs:
    """Everything ``vlmkit finetune`` takes. ``None`` hyper-parameters come from the recipe's ``defaults``."""

    recipe: str
    model: str
    data: str
    output: str
    image_folder: str | None = None
    wrap: list[str] = dataclasses.field(default_factory=list)
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    save_every: int | None = None
    keep_checkpoints: int = 2
    max_length: int | None = None
    template: str = "auto"
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False
    quiet: bool = False
    save_rank_weights: bool = False


# ------------------------------------------------------------------------------------------------
# Pure functions of the step
# ------------------------------------------------------------------------------------------------


def data_order(num_records: int, seed: int, epoch: int) -> list[int]:
    """Permutation of the records for ``epoch``: a pure function of ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_records, generator=g).tolist()


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Optimizer steps per epoch; the last global batch is completed from the start of the same order."""
    return max(1, math.ceil(num_records / global_batch))


def batch_indices(step: int, num_records: int, batch_size: int, world_size: int, rank: int, seed: int) -> list[int]:
    """Record indices rank ``rank`` trains on at global step ``step`` (0-based): ``batch_size`` of them."""
    global_batch = batch_size * world_size
    per_epoch = steps_per_epoch(num_records, global_batch)
    epoch, b = divmod(step, per_epoch)
    order = data_order(num_records, seed, epoch)
    while len(order) < per_epoch * global_batch:
        order = order + order
    chunk = order[b * global_batch:(b + 1) * global_batch]
    return chunk[rank * batch_size:(rank + 1) * batch_size]


def lr_factor(step: int, total: int, warmup: int, scheduler: str) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: linear warm-up, then cosine / linear / constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------


def load_base_model(spec: str, recipe=None, device=None):
    """``(hf_model, processor)`` from ``tiny:<family>`` (``vlmkit.testing.tiny_vlm``, seed 0) or a local
    checkpoint folder (``AutoModelForImageTextToText`` / ``AutoProcessor``; quantized while loading
    when the recipe has a ``quantization`` section)."""
    if spec.startswith("tiny:"):
        from ..testing import tiny_vlm

        return tiny_vlm(spec[len("tiny:"):], seed=0)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r} is neither tiny:<family> nor a local checkpoint folder "
                                "(vlmkit never downloads)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": "auto"}
    if recipe is not None and recipe.quantization is not None:
        from .recipes import bnb_config, quantization_skip_modules

        q = recipe.quantization
        if q.compute_dtype == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        else:
            from .recipes import DTYPES

            dtype = DTYPES[q.compute_dtype]
        kwargs["quantization_config"] = bnb_config(recipe, dtype, quantization_skip_modules(recipe))
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
    processor = AutoProcessor.from_pretrained(spec)
    return model, processor


def build_model(hf_model, recipe, stage_specs=(), tokenizer=None):
    """``apply_recipe`` + ``vlmkit.wrap`` + stage selection: returns ``(wrapped, notes)``.

    Stages that add tokens (READ's ``[SEG]``) need ``tokenizer``; the tokens are added and the embeddings
    grown *before* the recipe wraps the embeddings in PEFT copies (which cannot be resized).
    """
    from ..config import StageConfig, parse_stage_spec
    from ..wrapper import VLMWrapper, unwrap
    from .recipes import apply_recipe, select_trainable_stages

    configs = [s if isinstance(s, StageConfig) else parse_stage_spec(s) for s in stage_specs]
    probe = VLMWrapper(hf_model, *configs, tokenizer=tokenizer)  # adds tokens, grows embeddings
    added, stages = probe.added_tokens, list(probe.stages)
    unwrap(probe)
    model = apply_recipe(hf_model, recipe)
    wrapped = VLMWrapper(model, *configs, tokenizer=tokenizer, _expected_tokens=added or None, _stages=stages)
    notes = select_trainable_stages(wrapped, recipe)
    return wrapped, notes


def _to_device(value, device):
    """Tensors (and lists of them, e.g. per-record masks) to ``device``; images and None as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def unused_mask_keys(wrapped, dataset) -> set[str]:
    """Per-record segmentation inputs no head of ``wrapped`` takes (dropped from batches).

    Records with ``masks`` need a head that trains on them (``--wrap read`` / ``pmp``): ValueError otherwise.
    """
    from .data import PER_RECORD_KEYS

    consumed = {n for s in wrapped.stages for n in getattr(s, "head_input_names", ())}
    if any(c.masks for c in dataset.conversations) and "masks" not in consumed:
        raise ValueError("the data has masks but the model has no segmentation head to train on them; "
                         "wrap it with one, e.g. --wrap read (READ / LISA) or --wrap pmp")
    return set(PER_RECORD_KEYS) - consumed


def check_launch_env(env=None) -> None:
    """Fail loudly when ``accelerate launch --cpu --num_processes N>1`` started one process only.

    accelerate's CPU launcher needs mpirun for more than one process (huggingface/accelerate#2741):
    without it, it starts a single process with ``MASTER_ADDR`` set and no ``WORLD_SIZE``.
    """
    env = os.environ if env is None else env
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    sized = any(env.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if cpu and env.get("MASTER_ADDR") and not sized:
        raise RuntimeError(
            "accelerate launch --cpu with --num_processes > 1 started a single process: accelerate needs mpirun "
            "for multi-CPU runs (huggingface/accelerate#2741). Launch DDP on gloo with "
            "`accelerate launch --multi_gpu --num_processes N scripts/finetune.py --cpu ...` or "
            "`torchrun --nproc_per_node N scripts/finetune.py --cpu ...`"
        )


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run a fine-tuning job; returns a summary (also written to ``OUTPUT/finetune.json`` by the main process)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .data import SupervisedDataset, collate, load_conversations, pad_token_id
    from .recipes import load_recipe

    check_launch_env()
    recipe = load_recipe(args.recipe)
    d = recipe.defaults
    lr = args.lr if args.lr is not None else d.lr
    batch_size = args.batch_size if args.batch_size is not None else d.batch_size
    epochs = args.epochs if args.epochs is not None else d.epochs
    max_steps = args.max_steps if args.max_steps is not None else d.max_steps
    save_every = args.save_every if args.save_every is not None else d.save_every
    max_length = args.max_length if args.max_length is not None else d.max_length
    for name, value in (("batch size", batch_size), ("epochs", epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    conversations = load_conversations(args.data, args.image_folder)  # fail fast, before loading a model

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(args.output)
    existing = ckpt.list_checkpoints(out)
    if existing and not args.resume:
        if not args.overwrite:
            raise ValueError(f"{out} already holds checkpoints ({existing[-1].name}); pass --resume to continue "
                             "that run or --overwrite to start over")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(out / ckpt.CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    if main:
        out.mkdir(parents=True, exist_ok=True)

    seed_everything(args.seed)  # identical on every rank: same LoRA init everywhere
    hf_model, processor = load_base_model(args.model, recipe, accelerator.device)
    wrapped, notes = build_model(hf_model, recipe, args.wrap, tokenizer=processor.tokenizer)
    wrapped.train()
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{recipe.source}: nothing to train on this model")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(d.betas), weight_decay=d.weight_decay)
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and (save_every or args.resume):
        raise ValueError("exact-resume checkpoints (--save-every / --resume) support single-process and DDP runs; "
                         "under FSDP / DeepSpeed parameters and optimizer state are sharded (see adapters/README.md)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader to infer it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    model, aopt = accelerator.prepare(wrapped, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    dataset = SupervisedDataset(conversations, processor, args.template, max_length)
    unused = unused_mask_keys(wrapped, dataset)
    n = len(dataset)
    per_epoch = steps_per_epoch(n, batch_size * world)
    total = max_steps if max_steps is not None else epochs * per_epoch
    warmup = math.ceil(d.warmup_ratio * total)
    data_digest = _file_digest(args.data)
    facts = {"seed": args.seed, "num_records": n, "batch_size": batch_size, "world_size": world,
             "data_sha256": data_digest, "recipe": recipe.name, "total_steps": total}

    seed_everything(args.seed + 7919 * (rank + 1))  # per-rank dropout streams
    start = 0
    if args.resume:
        last = ckpt.latest_checkpoint(out)
        if last is not None:
            state = ckpt.read_state(last)
            changed = {k: (state.get(k), v) for k, v in facts.items() if k != "total_steps" and state.get(k) != v}
            if changed:
                raise ValueError(f"--resume from {last}: the run differs from the checkpoint in {changed} "
                                 "(saved, now); the data order would not be replayed")
            ckpt.load_checkpoint(last, unwrapped, optimizer, rank)
            start = int(state["global_step"])
            notes.append(f"resumed from {last} at step {start}")
        else:
            notes.append(f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS}; starting at step 0")

    log_path = out / TRAIN_LOG
    if main:
        kept = []
        if start and log_path.is_file():
            kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
        if not args.quiet:
            for note in notes:
                print(f"vlmkit finetune: {note}")
            trainable = sum(p.numel() for p in params)
            print(f"vlmkit finetune: recipe {recipe.name}, {trainable:,} trainable parameters, {n} records, "
                  f"{total} steps × {batch_size} × {world} process(es)")

    def state_at(step: int) -> dict[str, Any]:
        epoch, position = divmod(step, per_epoch)
        return {"global_step": step, "epoch": epoch, "batch_in_epoch": position, "steps_per_epoch": per_epoch, **facts}

    pad_id = pad_token_id(processor)
    bar = tqdm(total=total, initial=start, disable=args.quiet or not main, desc="finetune", dynamic_ncols=True)
    t0 = time.time()
    last_loss = float("nan")
    with open(log_path, "a") if main else open(os.devnull, "w") as log:
        for step in range(start, total):
            idx = batch_indices(step, n, batch_size, world, rank, args.seed)
            batch = collate([dataset[i] for i in idx], pad_id)
            batch = {k: _to_device(v, accelerator.device) for k, v in batch.items() if k not in unused}
            factor = lr_factor(step, total, warmup, d.scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            loss = model(**batch).loss
            accelerator.backward(loss)
            if d.max_grad_norm and d.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, d.max_grad_norm)
            aopt.step()
            aopt.zero_grad(set_to_none=True)
            last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            done = step + 1
            if main:
                log.write(json.dumps({"step": done, "loss": last_loss, "lr": lr * factor, "epoch": step // per_epoch}) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if save_every and done % save_every == 0 and done < total:
                ckpt.save_checkpoint(out, done, unwrapped, optimizer, state_at(done), rank, main,
                                     accelerator.wait_for_everyone, args.keep_checkpoints)
    bar.close()
    if not sharded and (start < total or not ckpt.list_checkpoints(out)):
        ckpt.save_checkpoint(out, total, unwrapped, optimizer, state_at(total), rank, main,
                             accelerator.wait_for_everyone, args.keep_checkpoints)
    if args.save_rank_weights:
        (out / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        ckpt._save(ckpt.trainable_state(unwrapped), out / RANKS_DIR / f"rank{rank}.safetensors")
    summary = {
        "format": "vlmkit-finetune", "version": 1, "recipe": recipe.to_dict(), "recipe_file": recipe.source,
        "model": args.model, "data": os.path.abspath(args.data), "stages": list(args.wrap),
        "args": dataclasses.asdict(args), "lr": lr, "steps": total, "resumed_from": start,
        "final_loss": last_loss, "world_size": world, "notes": notes, "seconds": round(time.time() - t0, 3),
        "trainable_parameters": sum(p.numel() for p in params),
        "quantized_linear_layers": _count_4bit(unwrapped),
    }
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model) if sharded else None  # collective: gathers the shards
    if main:
        save_outputs(out, unwrapped, recipe, processor, full_state)
        with open(out / FINETUNE_META, "w") as f:
            json.dump(summary, f, indent=2)
        if not args.quiet:
            print(f"vlmkit finetune: wrote {out} (final loss {last_loss:.4f})")
    accelerator.wait_for_everyone()
    return summary


def _count_4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def save_outputs(out: Path, wrapped, recipe, processor=None, full_state: dict | None = None) -> None:
    """Adapter (PEFT files) or trained weights, the vlmkit stage files and the processor into ``out``.

    ``full_state``: the gathered state dict of the wrapper (FSDP / DeepSpeed), used instead of the local shards.
    """
    inner = wrapped.base_model
    inner_state = None
    if full_state is not None:
        inner_state = {k[len("base_model."):]: v for k, v in full_state.items() if k.startswith("base_model.")}
    if recipe.method == "lora":
        inner.save_pretrained(out, state_dict=inner_state)  # adapter_config.json + adapter_model.safetensors
    else:
        names = [n for n, p in inner.named_parameters() if p.requires_grad]
        source = inner_state if inner_state is not None else dict(inner.named_parameters())
        ckpt._save({n: source[n] for n in names}, out / TRAINED_WEIGHTS)
    wrapped.save_pretrained(out)  # vlmkit.json + vlmkit_stages.safetensors
    stages = {k[len("stages."):]: v for k, v in (full_state or {}).items() if k.startswith("stages.")}
    if stages:
        import sys

        weights_name = getattr(sys.modules[type(wrapped).__module__], "WEIGHTS_NAME", "vlmkit_stages.safetensors")
        ckpt._save(stages, out / weights_name)
    if processor is not None:
        try:
            processor.save_pretrained(out)
        except Exception as e:  # a processor that cannot be saved must not lose the trained weights
            print(f"vlmkit finetune: processor not saved ({type(e).__name__}: {e})")


def load_finetuned(path: str | os.PathLike, base_model, is_trainable: bool = False):
    """Re-apply a ``vlmkit finetune`` output folder to a base model: the PEFT adapter (or the trained
    weights of a ``freeze`` recipe), then the saved vlmkit stages. ``base_model``: a loaded HF model, a
    local checkpoint path or ``tiny:<family>``. Returns a ``vlmkit.VLMWrapper`` (eval mode)."""
    import vlmkit
    from safetensors.torch import load_file

    from ..wrapper import read_saved

    path = Path(path)
    if isinstance(base_model, (str, os.PathLike)):
        base_model, _ = load_base_model(os.fspath(base_model))
    tokenizer = None
    added = read_saved(path).get("added_tokens") or {}
    if added:  # stages added tokens (READ's [SEG]): the saved tokenizer has them; grow rows before PEFT loads
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if base_model.get_input_embeddings().weight.shape[0] <= max(added.values()):
            base_model.resize_token_embeddings(max(added.values()) + 1)
    if (path / "adapter_config.json").is_file():
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
    elif (path / TRAINED_WEIGHTS).is_file():
        weights = load_file(str(path / TRAINED_WEIGHTS))
        missing, unexpected = base_model.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"{path / TRAINED_WEIGHTS} has weights the model lacks: {unexpected[:5]}")
        model = base_model
    else:
        raise FileNotFoundError(f"{path}: no adapter_config.json or {TRAINED_WEIGHTS}; not a vlmkit finetune output")
    wrapped = vlmkit.load(model, path, tokenizer=tokenizer)
    return wrapped.train(is_trainable) if is_trainable else wrapped.eval()
