"""``vlmkit finetune``: its arguments and entry point, the pure functions of the step, model loading and outputs.

The loop itself is ``vlmkit.train.trainer.Trainer`` (setup, resume, step, save); ``finetune(args)`` runs it.
It is a plain ``accelerate`` loop over the wrapped model, with exact checkpoints (``checkpoint.py``) and resume.

The model trained is ``vlmkit.wrap(apply_recipe(hf_model, recipe), *stages)``: compression, position
schemes and heads are active while training, the adapter stays a plain PEFT adapter of the HF model.
Determinism: the data order is a pure function of ``(seed, epoch)`` and the batch of step ``s`` a pure
function of ``(seed, s, number of records, batch size, world size, rank)``; the learning rate a pure
function of the step; checkpoints hold every RNG state. Resuming therefore replays the same steps.

Multi-process: the same command under ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun
--nproc_per_node N`` runs DDP (gloo on CPU-only hosts, where vlmkit forces the CPU path); every rank
takes its own slice of each global batch. ``--shard fsdp|zero2|zero3`` shards instead (torch FSDP2 or
DeepSpeed ZeRO driven by vlmkit, ``sharding.py``; also on CPU over gloo); an accelerate FSDP / DeepSpeed
config that accelerate cannot run here is an error, never a silent DDP run (``sharding.check_engine``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
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
    shard: str | None = None  # vlmkit's own sharding over the launcher's processes: fsdp | zero2 | zero3 (sharding.py)
    allow_absolute_paths: bool = False  # image names in --data that are absolute or leave their folder (data/images.py)


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
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(spec).model_type  # the family's part paths, not every family's
        kwargs["quantization_config"] = bnb_config(recipe, dtype, quantization_skip_modules(recipe, model_type))
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
# The entry point
# ------------------------------------------------------------------------------------------------


def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run a fine-tuning job; returns a summary (also written to ``OUTPUT/finetune.json`` by the main process).

    ``Trainer(args).run()`` (``vlmkit.train.trainer``): setup, resume (with ``args.resume``), train, finish.
    """
    from .trainer import Trainer  # trainer.py builds on this module's functions

    return Trainer(args).run()


def _count_4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@contextlib.contextmanager
def full_parameters(model, state: dict):
    """Inside the ``with``: every parameter and buffer of ``model`` named in ``state`` (a gathered full state
    dict, keys as ``model.state_dict()``) is replaced by that tensor; the originals are put back afterwards.

    A sharded model's own tensors are shards (FSDP2 ``DTensor``) or empty placeholders (DeepSpeed ZeRO-3), so
    the usual save code (PEFT's ``save_pretrained``, ``VLMWrapper.save_pretrained``, which also reads the
    embedding rows of added tokens) runs unchanged on the gathered weights. No collectives: rank 0 only."""
    from torch import nn

    swapped = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in ("_parameters", "_buffers"):
            entries = getattr(module, table)
            for leaf, value in list(entries.items()):
                key = f"{prefix}.{leaf}" if prefix else leaf
                if value is None or key not in state:
                    continue
                full = state[key]
                if full.shape != value.shape and not hasattr(value, "ds_tensor") and not hasattr(value, "to_local"):
                    raise ValueError(f"{key}: gathered shape {tuple(full.shape)} != the model's {tuple(value.shape)}")
                replacement = nn.Parameter(full, requires_grad=value.requires_grad) if table == "_parameters" else full
                swapped.append((entries, leaf, value))
                entries[leaf] = replacement
    try:
        yield model
    finally:
        for entries, leaf, value in reversed(swapped):
            entries[leaf] = value


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``json.dump(obj, indent=2)`` to ``path`` through ``<path>.tmp`` + ``os.replace``: a failure or a kill
    while writing leaves the previous file whole (the temp file is removed on failure)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(staging: Path, out: Path) -> None:
    """Move every file under ``staging`` to the same place under ``out`` (``os.replace``: each file is swapped
    whole), then remove ``staging``."""
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dst = out / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    shutil.rmtree(staging, ignore_errors=True)


def save_outputs(out: Path, wrapped, recipe, processor=None, full_state: dict | None = None) -> None:
    """Adapter (PEFT files) or trained weights, the vlmkit stage files and the processor into ``out``.

    Atomic like the checkpoints: everything is first written to a private folder ``out/.final.tmp-<pid>``
    and only then moved over the previous files one by one with ``os.replace``, so a failure (or a kill) while
    writing leaves the previous adapter, ``vlmkit.json`` and stage weights intact (and the folder removed on
    failure).

    ``full_state``: the gathered state dict of the wrapper (FSDP / DeepSpeed), read in place of the model's own
    shards: the adapter is saved from it explicitly (``state_dict=``: FSDP2's state-dict hooks would put the
    shards back), everything else inside ``full_parameters``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".final.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _save_outputs(staging, wrapped, recipe, processor, full_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out)


def _save_outputs(out: Path, wrapped, recipe, processor=None, full_state: dict | None = None) -> None:
    """The writes of :func:`save_outputs`, into ``out`` (its private staging folder)."""
    inner = wrapped.base_model
    inner_state = None
    if full_state is not None:
        inner_state = {k[len("base_model."):]: v for k, v in full_state.items() if k.startswith("base_model.")}
    with full_parameters(wrapped, full_state) if full_state is not None else contextlib.nullcontext():
        if recipe.method == "lora":
            inner.save_pretrained(out, state_dict=inner_state)  # adapter_config.json + adapter_model.safetensors
        else:
            names = [n for n, p in inner.named_parameters() if p.requires_grad]
            source = inner_state if inner_state is not None else dict(inner.named_parameters())
            ckpt._save({n: source[n] for n in names}, out / TRAINED_WEIGHTS)
        wrapped.save_pretrained(out)  # vlmkit.json + vlmkit_stages.safetensors (+ added-token rows)
    if processor is not None:
        part = out / ".processor"  # its files replace the previous ones only when all were written
        try:
            processor.save_pretrained(part)
        except Exception as e:  # a processor that cannot be saved must not lose the trained weights
            shutil.rmtree(part, ignore_errors=True)
            print(f"vlmkit finetune: processor not saved ({type(e).__name__}: {e})")
        else:
            _publish(part, out)


def finetuned_base(path: str | os.PathLike) -> str:
    """The base model a ``vlmkit finetune`` output (or a vlmkit save holding a PEFT adapter) was trained from, as a
    ``load_base_model`` spec: ``finetune.json``'s ``model``, else ``vlmkit.json``'s ``base_model``, else the
    adapter's ``base_model_name_or_path``. ``tiny:<family>`` as it is; a folder as given (absolute, or relative to
    the working directory), else relative to ``path``, else the model shipped in ``vlmkit/assets`` under that
    folder name (how the shipped adapters find the shipped model from anywhere). FileNotFoundError otherwise."""
    path = Path(path)
    specs = []
    if (path / FINETUNE_META).is_file():
        specs.append(json.loads((path / FINETUNE_META).read_text()).get("model"))
    if (path / "vlmkit.json").is_file():
        specs.append(json.loads((path / "vlmkit.json").read_text()).get("base_model"))
    if (path / "adapter_config.json").is_file():
        specs.append(json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path"))
    spec = next((s for s in specs if isinstance(s, str) and s), None)
    if spec is None:
        raise FileNotFoundError(f"{os.fspath(path)}: names no base model ({FINETUNE_META} 'model', vlmkit.json "
                                "'base_model' or adapter_config.json 'base_model_name_or_path'); load it yourself "
                                f"and call vlmkit.load(model, {os.fspath(path)!r})")
    if spec.startswith("tiny:"):
        return spec
    tried = [Path(spec), path / spec, Path(__file__).resolve().parents[1] / "assets" / Path(spec).name]
    for candidate in tried:
        if (candidate / "config.json").is_file():
            return os.fspath(candidate)
    raise FileNotFoundError(f"{os.fspath(path)}: its base model {spec!r} is not found (tried "
                            f"{[os.fspath(t) for t in tried]}); load it yourself and call "
                            f"vlmkit.load(model, {os.fspath(path)!r})")


def apply_finetuned(path: str | os.PathLike, base_model, is_trainable: bool = False):
    """``(model, tokenizer)``: ``base_model`` (a loaded HF model, a local checkpoint path or ``tiny:<family>``)
    with a ``vlmkit finetune`` folder's PEFT adapter (a ``PeftModel``) or a ``freeze`` recipe's trained weights
    applied; ``tokenizer``: the saved one when the stages added tokens (their rows are grown first), else None."""
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
    return model, tokenizer


def load_finetuned(path: str | os.PathLike, base_model=None, is_trainable: bool = False):
    """Re-apply a ``vlmkit finetune`` output folder to a base model: the PEFT adapter (or the trained
    weights of a ``freeze`` recipe), then the saved vlmkit stages. ``base_model``: a loaded HF model, a
    local checkpoint path or ``tiny:<family>``; None: the one it was trained from (``finetuned_base``; what
    ``vlmkit.load(path)`` does). Returns a ``vlmkit.VLMWrapper`` (eval mode)."""
    import vlmkit

    model, tokenizer = apply_finetuned(path, finetuned_base(path) if base_model is None else base_model, is_trainable)
    wrapped = vlmkit.load(model, path, tokenizer=tokenizer)
    return wrapped.train(is_trainable) if is_trainable else wrapped.eval()
