"""Compatibility matrix: every model family × the stages that should work with it, run on tiny models.

``run_matrix()`` builds each family's tiny model (``vlmkit.testing.tiny_vlm``), a padded batch of two
samples (one image; two images of other sizes, so AnyRes grids differ and get unpadded) and, per cell,
wraps the model and checks facts that do not come from the code under test:

- ``forward(labels=...)`` on the right-padded batch gives a finite loss, and every sample's logits equal
  the logits of that sample run alone (batch-N == batch-1, atol 1e-4);
- ``generate`` on the left-padded batch returns the caller's prompt followed by new tokens, and every
  sample's new tokens equal those generated for it alone;
- identity: logits and ``generate`` are bit-exact against the unwrapped model;
- pruning (FoPru rank/row, random, keep_ratio 0.5): each image keeps all its image-newline tokens
  (LLaVA-NeXT / OneVision: the rows of the model's own ``get_image_features`` output equal to
  ``model.model.image_newline``) plus ``max(1, floor(G / 2))`` of its G other (grid) tokens;
- Text4Seg: generated answers parse into a mask of the image's size.

A cell that cannot work lists its reason in ``KNOWN_LIMITS``; it counts as *unsupported* only if it
fails with that error (``match``), and as *stale* if it suddenly passes (the limit was lifted: update
the table). ``scripts/compat_matrix.py`` writes the result as ``docs/compat_matrix.md``.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Callable

import torch

FAMILIES = ("llava", "internvl", "llava_next", "llava_onevision", "smolvlm", "idefics3", "qwen2_5_vl")
CELLS = ("identity", "fopru_rank", "fopru_row", "random", "v2pe", "mousi", "text4seg")
CELL_TITLES = {
    "identity": "identity", "fopru_rank": "FoPru rank", "fopru_row": "FoPru row", "random": "random baseline",
    "v2pe": "V2PE", "mousi": "MouSi positions", "text4seg": "Text4Seg parsing",
}
KEEP_RATIO = 0.5
QUESTIONS = ("what is the image ?", "how many shapes are there ?")


@dataclasses.dataclass(frozen=True)
class Limit:
    """Why a cell does not work, the error text that shows it (``match``) and what would lift it."""

    reason: str
    match: str
    fix: str = ""


_QWEN_FOPRU = Limit(
    reason="Qwen2.5-VL has dynamic resolution and windowed vision attention with a fused qkv: no fixed tile grid "
           "for FoPru's per-tile attention scores (wrap() refuses)", match="no fixed tile size")
_QWEN_POSITIONS = Limit(
    reason="position schemes remap 1-D positions; Qwen's decoder uses 3-D M-RoPE positions (wrap() refuses; "
           "families/qwen2_5_vl.py documents what each scheme would mean under M-RoPE)",
    match="position schemes need 1-D RoPE")
KNOWN_LIMITS: dict[tuple[str, str], Limit] = {
    ("qwen2_5_vl", "fopru_rank"): _QWEN_FOPRU,
    ("qwen2_5_vl", "fopru_row"): _QWEN_FOPRU,
    ("qwen2_5_vl", "v2pe"): _QWEN_POSITIONS,
    ("qwen2_5_vl", "mousi"): _QWEN_POSITIONS,
}


def cell_configs(cell: str) -> list:
    """The stage configs of one matrix column."""
    from .compress.fopru import FoPruConfig
    from .compress.random import RandomPruneConfig
    from .position.mousi import MouSiPositionConfig
    from .position.v2pe import V2PEConfig
    from .seg.text4seg import Text4SegConfig

    factories: dict[str, Callable[[], list]] = {
        "identity": lambda: [],
        "fopru_rank": lambda: [FoPruConfig(keep_ratio=KEEP_RATIO, strategy="rank")],
        "fopru_row": lambda: [FoPruConfig(keep_ratio=KEEP_RATIO, strategy="row")],
        "random": lambda: [RandomPruneConfig(keep_ratio=KEEP_RATIO, seed=0)],
        "v2pe": lambda: [V2PEConfig(stride=8)],
        "mousi": lambda: [MouSiPositionConfig(mode="row")],
        "text4seg": lambda: [Text4SegConfig(grid=4)],
    }
    if cell not in factories:
        raise ValueError(f"unknown matrix cell {cell!r}; known: {list(CELLS)}")
    return factories[cell]()


def sample_images(seed: int = 0):
    """Three random RGB images of different sizes (32×32, 32×56, 60×30; H×W)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (32, 56), (60, 30))]


def make_batch(processor, samples: list[int], padding_side: str, seed: int = 0) -> dict:
    """Processor output for the samples numbered ``samples`` (indices into ``SAMPLES`` and ``QUESTIONS``)."""
    from .testing import image_prompt

    images = sample_images(seed)
    nested = [[images[i] for i in SAMPLES[k]] for k in samples]
    prompts = [image_prompt(processor, QUESTIONS[k], len(SAMPLES[k])) for k in samples]
    processor.tokenizer.padding_side = padding_side
    return dict(processor(images=nested, text=prompts, return_tensors="pt", padding=True))


SAMPLES = [[0], [1, 2]]  # sample k: images (indices into sample_images) with question QUESTIONS[k]
BATCH = [0, 1]


def _labels(batch: dict, placeholder_id: int) -> torch.Tensor:
    """Labels = input_ids with padding and image placeholders ignored (-100), as a training collator makes."""
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == placeholder_id)] = -100
    return labels


def _image_kwargs(wrapped, batch: dict) -> dict:
    return {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}


def _newline_counts(model, batch: dict, image_kwarg_names, kept_embeds: list[torch.Tensor]):
    """Image-newline tokens per image, uncompressed and among ``kept_embeds``: ``([n], [n_kept])``, or None for
    models without ``model.model.image_newline``. Counted on the model's own ``get_image_features`` output
    (rows equal to the learned newline embedding), independently of vlmkit's layout."""
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    if newline is None:
        return None
    kwargs = {k: batch[k] for k in image_kwarg_names if k in batch}
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], **kwargs).pooler_output
    counts = [[int((x == newline.to(x)).all(-1).sum()) for x in group] for group in (feats, kept_embeds)]
    return counts[0], counts[1]


def check_cell(model, processor, cell: str, max_new_tokens: int = 3) -> str:
    """Run one cell; return a short note on what was checked. Raises on any failure."""
    import vlmkit

    configs = cell_configs(cell)
    wrapped = vlmkit.wrap(model, *configs)
    ph = wrapped.family.placeholder_id
    try:
        notes = []
        # forward(labels) on a right-padded batch; each sample alone must give the same logits.
        batch = make_batch(processor, BATCH, "right")
        with torch.no_grad():
            out = wrapped(**batch, labels=_labels(batch, ph))
        if out.loss is None or not torch.isfinite(out.loss):
            raise AssertionError(f"forward(labels) gave loss {out.loss}")
        if cell == "identity":
            with torch.no_grad():
                ref = model(**batch, labels=_labels(batch, ph))
            if not torch.equal(out.logits, ref.logits) or not torch.equal(out.loss, ref.loss):
                raise AssertionError("identity forward is not bit-exact against the unwrapped model")
            notes.append("bit-exact")
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     **_image_kwargs(wrapped, batch))
        for b in BATCH:
            alone = make_batch(processor, [b], "right")
            with torch.no_grad():
                one = wrapped(**alone, labels=_labels(alone, ph))
            n = int(one.logits.shape[1])
            if not torch.allclose(out.logits[b, :n], one.logits[0], atol=1e-4, rtol=1e-4):
                diff = (out.logits[b, :n] - one.logits[0]).abs().max()
                raise AssertionError(f"sample {b}: padded-batch logits differ from batch-1 by {float(diff):.2e}")
        if cell in ("fopru_rank", "fopru_row", "random"):
            tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], **_image_kwargs(wrapped, batch))
            full = [t.num_uncompressed for t in tokens]
            kept = [t.num_tokens for t in tokens]
            newlines = _newline_counts(model, batch, wrapped.family.image_kwarg_names, [t.embeds for t in tokens])
            n_all, n_kept = newlines or ([0] * len(full), [0] * len(full))
            want = [nl + max(1, math.floor((n - nl) * KEEP_RATIO + 1e-9)) for n, nl in zip(full, n_all)]
            if kept != want or n_kept != n_all:
                raise AssertionError(f"kept {kept} visual tokens ({n_kept} newlines) of {full} ({n_all} newlines), "
                                     f"expected {want} (every newline and half the grid tokens)")
            per_sample = [sum(want[: len(SAMPLES[0])]), sum(want[len(SAMPLES[0]):])]
            if assembled.visual_tokens_per_sample != per_sample:
                raise AssertionError(f"assembled batch holds {assembled.visual_tokens_per_sample} visual tokens, "
                                     f"expected {per_sample}")
            notes.append(f"{sum(kept)}/{sum(full)} tokens")
        # generate on a left-padded batch: prompt kept, new tokens equal batch-1 generation.
        batch = make_batch(processor, BATCH, "left")
        gen = wrapped.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        S = batch["input_ids"].shape[1]
        if gen.shape[0] != len(BATCH) or not torch.equal(gen[:, :S], batch["input_ids"]) or gen.shape[1] <= S:
            raise AssertionError(f"generate returned shape {tuple(gen.shape)} without the prompt {tuple(batch['input_ids'].shape)}")
        if cell == "identity":
            ref = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            if not torch.equal(gen, ref):
                raise AssertionError("identity generate differs from the unwrapped model")
        for b in BATCH:
            alone = make_batch(processor, [b], "left")
            one = wrapped.generate(**alone, max_new_tokens=max_new_tokens, do_sample=False)
            if not torch.equal(gen[b, S:S + one.shape[1] - alone["input_ids"].shape[1]], one[0, alone["input_ids"].shape[1]:]):
                raise AssertionError(f"sample {b}: generated tokens differ between the padded batch and batch-1")
        if cell == "text4seg":
            texts = processor.tokenizer.batch_decode(gen[:, S:], skip_special_tokens=True)
            sizes = [(32, 32), (32, 56)]
            results = wrapped.masks_from_text(texts, image_sizes=sizes)
            if [tuple(r.mask.shape) for r in results] != sizes:
                raise AssertionError(f"Text4Seg masks {[r.mask.shape for r in results]} for image sizes {sizes}")
            notes.append("masks parsed")
        return ", ".join(notes) or "ok"
    finally:
        vlmkit.unwrap(wrapped)


@dataclasses.dataclass
class CellResult:
    family: str
    cell: str
    status: str  # "pass" | "unsupported" | "fail" | "stale"
    detail: str


def run_cell(family: str, cell: str, model, processor, limits: dict | None = None) -> CellResult:
    """``check_cell`` classified against ``limits`` (default ``KNOWN_LIMITS``)."""
    limits = KNOWN_LIMITS if limits is None else limits
    limit = limits.get((family, cell))
    try:
        note = check_cell(model, processor, cell)
    except Exception as err:  # noqa: BLE001 - every failure is classified and reported
        text = f"{type(err).__name__}: {err}"
        if limit is not None and limit.match in str(err):
            return CellResult(family, cell, "unsupported", limit.reason)
        return CellResult(family, cell, "fail", text + "\n" + traceback.format_exc(limit=-3))
    if limit is not None:
        return CellResult(family, cell, "stale", f"passes ({note}) but KNOWN_LIMITS says: {limit.reason}")
    return CellResult(family, cell, "pass", note)


def run_matrix(families=FAMILIES, cells=CELLS, limits: dict | None = None, seed: int = 0) -> list[CellResult]:
    """Every (family, cell) result, families in order; one tiny model per family."""
    from .testing import tiny_vlm

    torch.manual_seed(seed)
    results = []
    for family in families:
        model, processor = tiny_vlm(family, seed=seed)
        for cell in cells:
            results.append(run_cell(family, cell, model, processor, limits))
    return results


def to_markdown(results: list[CellResult], limits: dict | None = None) -> str:
    """The matrix table (✅ pass, ❌ unsupported with a numbered reason, 💥 failure) plus the reasons."""
    limits = KNOWN_LIMITS if limits is None else limits
    families = list(dict.fromkeys(r.family for r in results))
    cells = list(dict.fromkeys(r.cell for r in results))
    by_key = {(r.family, r.cell): r for r in results}
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(CELL_TITLES.get(c, c) for c in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for f in families:
        row = []
        for c in cells:
            r = by_key[(f, c)]
            if r.status == "pass":
                row.append("✅")
            elif r.status == "unsupported":
                limit = limits[(f, c)]
                text = limit.reason + (f" *(would be lifted by: {limit.fix})*" if limit.fix else "")
                if text not in reasons:
                    reasons.append(text)
                row.append(f"❌ ({reasons.index(text) + 1})")
            else:
                row.append("💥 " + r.status)
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i}. {t}" for i, t in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"
