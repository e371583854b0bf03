"""Exact-resume checkpoints: safetensors for tensors, JSON for everything else (no pickles).

``OUTPUT/checkpoints/step-00000012/`` holds

- ``trainable.safetensors``: every trainable parameter of the wrapped model, by name (LoRA, modules_to_save
  copies, vlmkit stages);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors (``"{i}.{key}"``,
  e.g. ``"3.exp_avg"``) and the rest of its ``state_dict`` (param groups, scalars, parameter names);
- ``rng_state_{rank}.safetensors`` + ``rng_state_{rank}.json``: torch CPU (uint8) / CUDA generator states
  and numpy's key array per process; Python's ``random`` state and numpy's counters in JSON;
- ``trainer_state.json`` (written last): global step, epoch, batch position, data / batch / seed facts.

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a run killed while writing
leaves only whole checkpoints behind; ``latest_checkpoint`` ignores anything else.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
FORMAT = "vlmkit-finetune-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed, with ``trainer_state.json``), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE_NAME).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --- trainable weights ----------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every parameter with ``requires_grad`` (unwrapped model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "") -> None:
    """Copy saved trainable weights into ``model``; ValueError unless the name sets match exactly."""
    params = trainable_state(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model's trainable parameters "
                         f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}); same recipe and --wrap?")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)} in the checkpoint, {tuple(p.shape)} in the model")
        p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))


# --- optimizer ------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``"{i}.{key}"``) and JSON (groups, scalars, names)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_names": names, "param_groups": groups, "scalars": scalars}
    return tensors, meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], source: str = "") -> None:
    """Inverse of ``optimizer_state``; checks the optimizer class and parameter order."""
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(f"{source}: optimizer {meta.get('class')!r} in the checkpoint, {type(optimizer).__name__} now")
    if meta.get("param_names") != names:
        raise ValueError(f"{source}: the optimizer's parameters differ from the checkpoint's (same recipe and --wrap?)")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    current = optimizer.state_dict()["param_groups"]
    groups = []
    for saved, now in zip(meta["param_groups"], current):
        groups.append({k: (tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v) for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator a training step may draw from: torch CPU/CUDA, numpy, Python ``random``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "python_random": [version, list(internal), gauss],
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v.to(torch.uint8) for _, v in cuda])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


# --- whole checkpoints ----------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    keep: int | None = 2,
) -> Path:
    """Write checkpoint ``step`` collectively: every rank writes its RNG state, the main process the
    weights, the optimizer and ``trainer_state.json``, then renames ``step-N.tmp`` → ``step-N``."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state()
    _save(rng_tensors, tmp / f"rng_state_{rank}.safetensors")
    _write_json(rng_meta, tmp / f"rng_state_{rank}.json")
    if is_main:
        params = trainable_state(model)
        _save(params, tmp / TRAINABLE_NAME)
        opt_tensors, opt_meta = optimizer_state(optimizer, list(params))
        _save(opt_tensors, tmp / OPTIMIZER_TENSORS)
        _write_json(opt_meta, tmp / OPTIMIZER_META)
    barrier()
    if is_main:
        _write_json({"format": FORMAT, "version": 1, **state}, tmp / STATE_NAME)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint folder."""
    with open(Path(path) / STATE_NAME) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vlmkit fine-tuning checkpoint ({STATE_NAME} format {state.get('format')!r})")
    return state


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG from ``path``; returns ``trainer_state.json``."""
    path = Path(path)
    state = read_state(path)
    load_trainable(model, _load(path / TRAINABLE_NAME), str(path))
    with open(path / OPTIMIZER_META) as f:
        opt_meta = json.load(f)
    load_optimizer_state(optimizer, list(trainable_state(model)), _load(path / OPTIMIZER_TENSORS), opt_meta, str(path))
    rng_file = path / f"rng_state_{rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(f"{path}: no RNG state for rank {rank} (saved with world size {state.get('world_size')})")
    with open(path / f"rng_state_{rank}.json") as f:
        set_rng_state(_load(rng_file), json.load(f))
    return state
