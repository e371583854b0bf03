"""The SEED tokenizer training loop (two phases, see the package docstring) and shapes-data helpers."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import PHASES, _check_int
from .stage import SEED
from .tokenizer import SeedTokenizer


def train_seed_tokenizer(
    tokenizer: "SeedTokenizer | SEED",
    pixel_values: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    phase: str = "both",
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Train a SEED tokenizer on ``pixel_values`` [N, 3, H, W] (+ ``captions``, one per image).

    ``phase="qformer"``: contrastive only; ``"codebook"``: VQ + recon + image MSE with the Q-Former
    frozen; ``"both"``: ``steps`` of each, in that order. Batches are drawn without replacement (a new
    seeded permutation per epoch). Returns the per-step loss history, keyed ``"<phase>/<loss>"``.
    A tqdm bar shows progress unless ``quiet``.
    """
    from tqdm.auto import tqdm

    model = tokenizer.visual_tokenizer if isinstance(tokenizer, SEED) else tokenizer
    if not isinstance(model, SeedTokenizer):
        raise TypeError(f"train_seed_tokenizer takes a SeedTokenizer or a SEED stage, got {type(tokenizer).__name__}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    _check_int("train_seed_tokenizer", "steps", steps, 1)
    _check_int("train_seed_tokenizer", "batch_size", batch_size, 2)
    _check_int("train_seed_tokenizer", "warmup_steps", warmup_steps, 0)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = getattr(pixel_values, "shape", pixel_values)
        raise ValueError(f"pixel_values must be a [N, 3, H, W] tensor, got {got!r}")
    N = pixel_values.shape[0]
    if N < 2:
        raise ValueError(f"need at least 2 images to train, got {N}")
    phases = ["qformer", "codebook"] if phase == "both" else [phase]
    if "qformer" in phases and (captions is None or len(captions) != N):
        raise ValueError(f"the contrastive phase needs one caption per image ({N}), got "
                         f"{None if captions is None else len(captions)}")
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {}
    was_training = model.training
    model.train()
    try:
        for name in phases:
            params = model.phase_parameters(name)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

            def factor(step: int) -> float:
                if step < warmup_steps:
                    return (step + 1) / warmup_steps
                t = (step - warmup_steps) / max(1, steps - warmup_steps)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            order = torch.randperm(N, generator=gen)
            cursor = 0
            bar = tqdm(range(steps), desc=f"SEED {name}", disable=quiet, leave=False)
            for _ in bar:
                if cursor + min(batch_size, N) > N:
                    order, cursor = torch.randperm(N, generator=gen), 0
                idx = order[cursor : cursor + batch_size]
                cursor += len(idx)
                batch = pixel_values[idx]
                caps = [captions[i] for i in idx.tolist()] if captions is not None else None
                losses = model.losses(batch, caps, phase=name)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                sched.step()
                for key, value in losses.items():
                    history.setdefault(f"{name}/{key}", []).append(float(value.detach()))
                bar.set_postfix(loss=f"{history[f'{name}/loss'][-1]:.4f}")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return history


def shapes_caption(sample) -> str:
    """Caption of a ``vlmkit.data.shapes`` sample: its objects in paint order ("a red circle and a blue square")."""
    return " and ".join(f"a {o.color} {o.shape}" for o in sample.objects)


def shapes_pixel_values(samples, size: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                        std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """Images of shapes samples as float pixel_values [N, 3, size, size] normalised by ``mean``/``std``."""
    import numpy as np
    from PIL import Image

    out = []
    for s in samples:
        img = s.image.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
