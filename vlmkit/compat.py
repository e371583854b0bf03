"""Compatibility matrix: every tiny model family × every registered stage, run on tiny models.

Rows are the families ``vlmkit.testing.tiny_families()`` can build; columns are ``identity`` and every stage
the registry knows (``vlmkit.config.registered_configs()``, grouped by role), so a stage's
``@register_stage`` line is all it takes to get a column. A stage gives one column per entry of its
``variants()`` (default: one, its ``example()``; FoPru: ``rank`` and ``row``), titled by its display
name (``StageConfig.title()``: ``display_name``, default the config class name without ``Config``).

``run_matrix()`` builds each family's tiny model (``vlmkit.testing.tiny_vlm``; a fresh one for stages that
add tokens, as ``wrap`` grows the vocabulary for good), a padded batch of two samples (one image; two images
of other sizes, so AnyRes grids differ and get unpadded; stages that take one image per sample get one image
of a different size each) and, per cell, wraps the model and checks facts that do not come from the stage:

- ``forward(labels=...)`` on the right-padded batch gives a finite loss, and every sample's logits equal
  the logits of that sample run alone (batch-N == batch-1, atol 1e-4);
- ``generate`` on the left-padded batch returns the caller's prompt followed by new tokens, and every
  sample's new tokens equal those generated for it alone;
- identity: logits, loss and ``generate`` are bit-exact against the unwrapped model;
- pruners (``StageConfig.pruner``, keep_ratio 0.5 from ``example()``): each image keeps all its image-newline
  tokens plus ``num_to_keep(G)`` = ``max(1, floor(G / 2))`` of its G other (grid) tokens, counted on the
  family's uncompressed tokens;
- heads whose masks are text (``TextMaskHead``): the generated answers parse into masks of the image's size.

A cell is *unsupported* when the family lacks a capability the stage ``requires``: the cell then checks that
``wrap()`` refuses, and the family's ``lacks`` text is the reason. ``scripts/compat_matrix.py`` writes the
result as ``docs/compat_matrix.md``.
"""

from __future__ import annotations

import dataclasses
import traceback

import torch

QUESTIONS = ("what is the image ?", "how many shapes are there ?")
SAMPLES = [[0], [1, 2]]  # sample k: images (indices into sample_images) with question QUESTIONS[k]
ONE_IMAGE_SAMPLES = [[0], [2]]  # for stages that take one image per sample: still two sizes
BATCH = [0, 1]


# --- columns ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Column:
    """One matrix column: ``key`` (``fopru_rank``), ``title`` (``FoPru rank``), the stage's config class and
    the config it runs (both None for ``identity``)."""

    key: str
    title: str
    config_class: type | None = None
    config: object = None

    @property
    def configs(self) -> list:
        return [] if self.config is None else [self.config]


IDENTITY = Column("identity", "identity")


def matrix_columns(config_classes=None) -> list[Column]:
    """``identity``, then every stage's ``variants()`` (stages in role order, then by type).

    ``config_classes``: the stages to show (default: every registered stage)."""
    from .config import registered_configs
    from .stage import ROLES

    classes = registered_configs() if config_classes is None else list(config_classes)
    classes = sorted(classes, key=lambda c: (ROLES.index(c.role) if c.role in ROLES else len(ROLES), c.type))
    columns = [IDENTITY]
    for cls in classes:
        for label, config in cls.variants().items():
            key = f"{cls.type}_{label}" if label else cls.type
            title = f"{cls.title()} {label}" if label else cls.title()
            columns.append(Column(key, title, cls, config))
    return columns


def builtin_configs() -> list:
    """The registered stages that ship with vlmkit (what ``scripts/compat_matrix.py`` shows)."""
    from .config import registered_configs

    return [c for c in registered_configs() if c.__module__.split(".")[0] == "vlmkit"]


def matrix_families() -> list[str]:
    """The matrix rows: every family ``vlmkit.testing.tiny_vlm`` builds."""
    from .testing import tiny_families

    return tiny_families()


def missing_capabilities(family, column: Column) -> list[str]:
    """The capabilities the column's stage requires and the family adapter lacks."""
    if column.config_class is None:
        return []
    return [c for c in column.config_class.requires if c not in family.capabilities]


def unsupported_reason(family, capability: str) -> str:
    """Why ``family`` lacks ``capability``: its ``lacks`` text (the table's legend says what each capability is)."""
    why = family.lacks.get(capability, "does not provide it")
    return f"lacks `{capability}`: the family {why}"


# --- batches ---------------------------------------------------------------------------------------------
def sample_images(seed: int = 0):
    """Three random RGB images of different sizes (32×32, 32×56, 60×30; H×W)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (32, 56), (60, 30))]


def make_batch(processor, samples: list[int], padding_side: str, seed: int = 0, layout=None) -> dict:
    """Processor output for the samples numbered ``samples`` (indices into ``layout``, default ``SAMPLES``:
    sample k holds images ``layout[k]`` of ``sample_images`` and asks ``QUESTIONS[k]``)."""
    from .testing import image_prompt

    layout = SAMPLES if layout is None else layout
    images = sample_images(seed)
    nested = [[images[i] for i in layout[k]] for k in samples]
    prompts = [image_prompt(processor, QUESTIONS[k], len(layout[k])) for k in samples]
    processor.tokenizer.padding_side = padding_side
    return dict(processor(images=nested, text=prompts, return_tensors="pt", padding=True))


def sample_layout(column: Column) -> list[list[int]]:
    """The images of each sample for a column: ``SAMPLES``, or one image each for one-image stages."""
    if column.config_class is not None and column.config_class.images_per_sample == 1:
        return ONE_IMAGE_SAMPLES
    return SAMPLES


def _labels(batch: dict, placeholder_id: int) -> torch.Tensor:
    """Labels = input_ids with padding and image placeholders ignored (-100), as a training collator makes."""
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == placeholder_id)] = -100
    return labels


def _image_kwargs(wrapped, batch: dict) -> dict:
    return {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}


def _check_budget(model, wrapped, config, batch: dict, layout) -> str:
    """Each image keeps every newline token and ``num_to_keep(G)`` of its G grid tokens (G and the newlines
    counted on the family's uncompressed tokens of the same batch)."""
    import vlmkit

    identity = vlmkit.wrap(model)
    try:
        full = identity.encode_visual(batch["pixel_values"], batch["input_ids"], **_image_kwargs(identity, batch))
    finally:
        vlmkit.unwrap(identity)
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], **_image_kwargs(wrapped, batch))
    grid = [int(t.grid_positions().numel()) for t in full]
    newlines = [t.num_tokens - g for t, g in zip(full, grid)]
    kept = [t.num_tokens for t in tokens]
    kept_newlines = [int(t.is_newline.sum()) for t in tokens]
    want = [config.num_to_keep(g) + n for g, n in zip(grid, newlines)]
    if kept != want or kept_newlines != newlines:
        raise AssertionError(f"kept {kept} visual tokens ({kept_newlines} newlines) of {[t.num_tokens for t in full]} "
                             f"({newlines} newlines), expected {want} (every newline and num_to_keep(G) grid tokens)")
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 **_image_kwargs(wrapped, batch))
    per_sample, start = [], 0
    for images in layout:
        per_sample.append(sum(want[start:start + len(images)]))
        start += len(images)
    if assembled.visual_tokens_per_sample != per_sample:
        raise AssertionError(f"assembled batch holds {assembled.visual_tokens_per_sample} visual tokens, "
                             f"expected {per_sample}")
    return f"{sum(kept)}/{sum(t.num_tokens for t in full)} tokens"


def check_cell(model, processor, column: Column, max_new_tokens: int = 3) -> str:
    """Run one supported cell; return a short note on what was checked. Raises on any failure."""
    import vlmkit

    wrapped = vlmkit.wrap(model, *column.configs, tokenizer=processor.tokenizer)
    ph = wrapped.family.placeholder_id
    layout = sample_layout(column)
    identity = column.config is None
    try:
        notes = []
        # forward(labels) on a right-padded batch; each sample alone must give the same logits.
        batch = make_batch(processor, BATCH, "right", layout=layout)
        with torch.no_grad():
            out = wrapped(**batch, labels=_labels(batch, ph))
        if out.loss is None or not torch.isfinite(out.loss):
            raise AssertionError(f"forward(labels) gave loss {out.loss}")
        if identity:
            with torch.no_grad():
                ref = model(**batch, labels=_labels(batch, ph))
            if not torch.equal(out.logits, ref.logits) or not torch.equal(out.loss, ref.loss):
                raise AssertionError("identity forward is not bit-exact against the unwrapped model")
            notes.append("bit-exact")
        for b in BATCH:
            alone = make_batch(processor, [b], "right", layout=layout)
            with torch.no_grad():
                one = wrapped(**alone, labels=_labels(alone, ph))
            n = int(one.logits.shape[1])
            if not torch.allclose(out.logits[b, :n], one.logits[0], atol=1e-4, rtol=1e-4):
                diff = (out.logits[b, :n] - one.logits[0]).abs().max()
                raise AssertionError(f"sample {b}: padded-batch logits differ from batch-1 by {float(diff):.2e}")
        if column.config_class is not None and column.config_class.pruner and column.config_class.role == "compressor":
            notes.append(_check_budget(model, wrapped, column.config, batch, layout))
        # generate on a left-padded batch: prompt kept, new tokens equal batch-1 generation.
        batch = make_batch(processor, BATCH, "left", layout=layout)
        gen = wrapped.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        S = batch["input_ids"].shape[1]
        if gen.shape[0] != len(BATCH) or not torch.equal(gen[:, :S], batch["input_ids"]) or gen.shape[1] <= S:
            raise AssertionError(f"generate returned shape {tuple(gen.shape)} without the prompt {tuple(batch['input_ids'].shape)}")
        if identity:
            ref = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            if not torch.equal(gen, ref):
                raise AssertionError("identity generate differs from the unwrapped model")
        for b in BATCH:
            alone = make_batch(processor, [b], "left", layout=layout)
            one = wrapped.generate(**alone, max_new_tokens=max_new_tokens, do_sample=False)
            if not torch.equal(gen[b, S:S + one.shape[1] - alone["input_ids"].shape[1]], one[0, alone["input_ids"].shape[1]:]):
                raise AssertionError(f"sample {b}: generated tokens differ between the padded batch and batch-1")
        for head in wrapped.stages_of("head"):
            if head.mask_output == "text":
                texts = processor.tokenizer.batch_decode(gen[:, S:], skip_special_tokens=True)
                images = sample_images()
                sizes = [images[layout[b][0]].size[::-1] for b in BATCH]  # (H, W) of each sample's first image
                results = head.masks_from_text(texts, image_sizes=sizes)
                if [tuple(r.mask.shape) for r in results] != sizes:
                    raise AssertionError(f"{column.title} masks {[r.mask.shape for r in results]} for image sizes {sizes}")
                notes.append("masks parsed")
        return ", ".join(notes) or "ok"
    finally:
        vlmkit.unwrap(wrapped)


def check_refused(model, processor, column: Column, missing: list[str]) -> None:
    """``wrap()`` must refuse an unsupported cell with a ValueError naming the stage and a missing capability."""
    import vlmkit

    try:
        wrapped = vlmkit.wrap(model, *column.configs, tokenizer=processor.tokenizer)
    except ValueError as err:
        text = str(err)
        if repr(column.config_class.type) not in text or not any(repr(m) in text for m in missing):
            raise AssertionError(f"wrap() refused, but without naming {column.config_class.type!r} and one of "
                                 f"{missing}: {text}") from err
        return
    vlmkit.unwrap(wrapped)
    raise AssertionError(f"wrap() accepted {column.config_class.type!r} although the family lacks {missing}")


@dataclasses.dataclass
class CellResult:
    family: str
    cell: str  # the column key
    status: str  # "pass" | "unsupported" | "fail"
    detail: str  # pass: what was checked; unsupported: the reason (the family's lacks text); fail: the error
    title: str = ""  # the column title (default: the key)


def run_cell(family: str, column: Column, model, processor) -> CellResult:
    """One cell: unsupported (the family lacks a required capability and ``wrap()`` refuses), pass or fail."""
    from .families import family_for

    title = column.title
    try:
        adapter = family_for(model)
        missing = missing_capabilities(adapter, column)
        if missing:
            check_refused(model, processor, column, missing)
            reason = "; ".join(unsupported_reason(adapter, m) for m in missing)
            return CellResult(family, column.key, "unsupported", reason, title)
        note = check_cell(model, processor, column)
    except Exception as err:  # noqa: BLE001 - every failure is classified and reported
        text = f"{type(err).__name__}: {err}"
        return CellResult(family, column.key, "fail", text + "\n" + traceback.format_exc(limit=-3), title)
    return CellResult(family, column.key, "pass", note, title)


def run_matrix(families=None, columns=None, seed: int = 0) -> list[CellResult]:
    """Every (family, column) result, families in order. One tiny model per family, built again for each
    column whose stage adds tokens (``wrap`` grows the tokenizer and the embeddings for good)."""
    from .testing import tiny_vlm

    families = matrix_families() if families is None else list(families)
    columns = matrix_columns() if columns is None else list(columns)
    torch.manual_seed(seed)
    results = []
    for family in families:
        shared = None
        for column in columns:
            if column.config_class is not None and column.config_class.stage_class.adds_tokens:
                model, processor = tiny_vlm(family, seed=seed)
            else:
                shared = shared or tiny_vlm(family, seed=seed)
                model, processor = shared
            results.append(run_cell(family, column, model, processor))
    return results


def to_markdown(results: list[CellResult]) -> str:
    """The matrix table (✅ pass, ❌ unsupported with a numbered reason, 💥 failure) plus the reasons."""
    from .families.base import CAPABILITIES

    families = list(dict.fromkeys(r.family for r in results))
    cells = list(dict.fromkeys(r.cell for r in results))
    titles = {r.cell: r.title or r.cell for r in results}
    by_key = {(r.family, r.cell): r for r in results}
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(titles[c] for c in cells) + " |", "|---|" + "---|" * len(cells)]
    for f in families:
        row = []
        for c in cells:
            r = by_key[(f, c)]
            if r.status == "pass":
                row.append("✅")
            elif r.status == "unsupported":
                if r.detail not in reasons:
                    reasons.append(r.detail)
                row.append(f"❌ ({reasons.index(r.detail) + 1})")
            else:
                row.append("💥 " + r.status)
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i}. {t}" for i, t in enumerate(reasons, 1)]
    used = [c for c in CAPABILITIES if any(f"`{c}`" in t for t in reasons)]
    if used:
        lines += ["", "Capabilities: " + "; ".join(f"`{c}`: {CAPABILITIES[c]}" for c in used) + "."]
    return "\n".join(lines) + "\n"
