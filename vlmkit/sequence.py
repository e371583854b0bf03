"""Splice (possibly compressed) visual tokens into the text sequence and re-pad the batch.

The processor emits, per image, a run of ``num_uncompressed`` placeholder tokens. ``assemble`` keeps the
placeholder slots of the kept tokens (slot ``run_start + VisualTokens.index``), drops the others and
the padding, fills the kept slots with the visual embeddings, then re-pads every row to the longest
one. ``attention_mask``, ``labels`` (visual slots and padding get -100) and a bookkeeping map of which
image and grid cell every position holds shrink with it, so later stages never guess.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .tokens import VisualTokens

IGNORE_INDEX = -100


@dataclasses.dataclass
class AssembledBatch:
    """What the language model receives, plus where every position came from.

    inputs_embeds [B, L, D]; attention_mask [B, L] (1 = real token); labels [B, L] or None;
    input_ids [B, L]: text ids, the placeholder id at visual slots, the pad id at padding;
    visual_mask [B, L] bool; image_id [B, L]: index into ``tokens`` of the image a visual slot
    belongs to (-1 for text/padding); visual_index [B, L]: ``VisualTokens.index`` of the slot's token
    (-1 elsewhere); tokens: the per-image ``VisualTokens`` in batch order; padding_side "left"|"right".
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    input_ids: torch.Tensor
    visual_mask: torch.Tensor
    image_id: torch.Tensor
    visual_index: torch.Tensor
    tokens: list[VisualTokens]
    padding_side: str

    @property
    def visual_tokens_per_sample(self) -> list[int]:
        """How many visual tokens each sample sends to the language model."""
        return self.visual_mask.sum(dim=1).tolist()


def infer_padding_side(attention_mask: torch.Tensor) -> str:
    """``"left"`` if any row starts with padding, else ``"right"``."""
    return "left" if bool((attention_mask[:, 0] == 0).any()) else "right"


def _check_inputs(input_ids, attention_mask, labels, tokens, placeholder_id, run_mask=None) -> torch.Tensor:
    """Validate shapes and the placeholder count; return the [B, S] mask of the images' run slots (``run_mask``,
    default the placeholders)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    is_ph = input_ids == placeholder_id
    if run_mask is not None:
        if run_mask.shape != input_ids.shape or run_mask.dtype != torch.bool or bool((is_ph & ~run_mask).any()):
            raise ValueError(f"run_mask must be a bool [B, S] mask like input_ids {tuple(input_ids.shape)} that holds "
                             f"every placeholder, got {run_mask.dtype} of shape {tuple(run_mask.shape)}")
        is_ph = run_mask
    counts = [t.num_uncompressed for t in tokens]
    if int(is_ph.sum()) != sum(counts):
        n_other = int(is_ph.sum() - (input_ids == placeholder_id).sum())
        other = f" and {n_other} other tokens of image runs" if n_other else ""
        raise ValueError(
            f"input_ids hold {int((input_ids == placeholder_id).sum())} image placeholder tokens (id {placeholder_id})"
            f"{other} but the {len(tokens)} image(s) need {sum(counts)} ({' + '.join(map(str, counts)) or '0'}): "
            "the number of images does not match the image markers in the text"
        )
    if bool((is_ph & (attention_mask == 0)).any()):
        raise ValueError("image placeholder tokens lie under attention_mask == 0 (padding)")
    return is_ph


def check_pad_to_multiple_of(value) -> None:
    """ValueError unless ``value`` is None or a positive int."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {value!r}")


def assemble(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    tokens: list[VisualTokens],
    embed: Callable[[torch.Tensor], torch.Tensor],
    placeholder_id: int,
    pad_token_id: int = 0,
    padding_side: str | None = None,
    pad_to_multiple_of: int | None = None,
    run_mask: torch.Tensor | None = None,
) -> AssembledBatch:
    """Build the language model's input from ``input_ids`` [B, S] and one ``VisualTokens`` per image.

    Images are matched to placeholder runs in reading order (row-major over the batch), as the
    transformers models do. ``padding_side=None`` keeps the input's side (right if unpadded).
    ``pad_to_multiple_of``: pad the output length up to a multiple (as a tokenizer's option of that name;
    pruning changes the length the tokenizer padded to). Matrix kernels can be much slower at some
    lengths: oneDNN's float32 GEMM on a 4096-wide decoder ran 20 % slower at 343 rows than at 344
    (``scripts/bench_compression.py`` prints it).
    ``run_mask`` [B, S] bool: the slots of the images' runs (``Family.image_run_mask``; default the placeholders).
    Run slots that are not placeholders (Mistral 3's ``[IMG_BREAK]`` / ``[IMG_END]``) are filled from the
    ``VisualTokens`` like the placeholders but keep their ids and labels in the output.
    """
    check_pad_to_multiple_of(pad_to_multiple_of)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_ph = _check_inputs(input_ids, attention_mask, labels, tokens, placeholder_id, run_mask)
    if padding_side is None:
        padding_side = infer_padding_side(attention_mask)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B, S = input_ids.shape
    device = input_ids.device

    # Placeholder p (row-major order) belongs to image img_of[p] at run offset off_of[p].
    counts = torch.tensor([t.num_uncompressed for t in tokens], dtype=torch.long, device=device)
    img_of = torch.repeat_interleave(torch.arange(len(tokens), device=device), counts)
    run_start = torch.cumsum(counts, 0) - counts
    off_of = torch.arange(img_of.numel(), device=device) - run_start[img_of]
    # Kept placeholder -> row in the pooled visual embeddings (cat of every image's kept tokens).
    num_kept = torch.tensor([t.num_tokens for t in tokens], dtype=torch.long, device=device)
    kept_start = torch.cumsum(num_kept, 0) - num_kept
    pool_row = torch.full((img_of.numel(),), -1, dtype=torch.long, device=device)
    for i, t in enumerate(tokens):
        pool_row[run_start[i] + t.index.to(device)] = kept_start[i] + torch.arange(t.num_tokens, device=device)

    text_embeds = embed(input_ids)  # [B, S, D]
    D = text_embeds.shape[-1]
    pad_embed = embed(torch.tensor([pad_token_id], device=device))
    vis_embeds = [t.embeds.to(device=device, dtype=text_embeds.dtype) for t in tokens]
    pool = torch.cat([text_embeds.reshape(B * S, D), *vis_embeds, pad_embed.reshape(1, D)], dim=0)
    pad_src = pool.shape[0] - 1

    # Source row of every input position (-1 = dropped), plus bookkeeping.
    src = torch.arange(B * S, device=device).reshape(B, S)
    img_map = torch.full((B, S), -1, dtype=torch.long, device=device)
    idx_map = torch.full((B, S), -1, dtype=torch.long, device=device)
    ph_rows = pool_row.clone()
    ph_rows[ph_rows >= 0] += B * S
    src[is_ph] = ph_rows
    img_map[is_ph] = img_of
    idx_map[is_ph] = off_of
    keep = (attention_mask != 0) & (src >= 0)

    lengths = keep.sum(dim=1)
    L = int(lengths.max()) if B else 0
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    out_src = torch.full((B, L), pad_src, dtype=torch.long, device=device)
    out_mask = torch.zeros((B, L), dtype=attention_mask.dtype, device=device)
    out_ids = torch.full((B, L), pad_token_id, dtype=input_ids.dtype, device=device)
    out_img = torch.full((B, L), -1, dtype=torch.long, device=device)
    out_idx = torch.full((B, L), -1, dtype=torch.long, device=device)
    out_labels = None if labels is None else torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=device)
    for b in range(B):
        n = int(lengths[b])
        cols = slice(L - n, L) if padding_side == "left" else slice(0, n)
        row = keep[b]
        out_src[b, cols] = src[b, row]
        out_mask[b, cols] = 1
        out_ids[b, cols] = input_ids[b, row]
        out_img[b, cols] = img_map[b, row]
        out_idx[b, cols] = idx_map[b, row]
        if labels is not None:
            placeholder = input_ids[b, row] == placeholder_id  # other run slots keep their labels
            out_labels[b, cols] = torch.where(placeholder, IGNORE_INDEX, labels[b, row])

    inputs_embeds = pool[out_src.reshape(-1)].reshape(B, L, D)
    return AssembledBatch(
        inputs_embeds=inputs_embeds,
        attention_mask=out_mask,
        labels=out_labels,
        input_ids=out_ids,
        visual_mask=out_img >= 0,
        image_id=out_img,
        visual_index=out_idx,
        tokens=tokens,
        padding_side=padding_side,
    )


def resize_placeholder_runs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    old_counts: list[int],
    new_counts: list[int],
    placeholder_id: int,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Give image k a run of ``new_counts[k]`` placeholders instead of ``old_counts[k]`` (reading order).

    For encoders whose token count differs from what the model's processor emits (e.g. MouSi experts):
    input_ids [B, S] -> [B, S'] re-padded on the input's padding side; new slots get attention 1 and
    label -100. Placeholders are counted in reading order, so adjacent images' runs may touch.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if len(old_counts) != len(new_counts):
        raise ValueError(f"old_counts ({len(old_counts)} images) and new_counts ({len(new_counts)}) differ in length")
    is_ph = (input_ids == placeholder_id) & (attention_mask != 0)
    if int(is_ph.sum()) != sum(old_counts):
        raise ValueError(
            f"input_ids hold {int(is_ph.sum())} image placeholder tokens (id {placeholder_id}) but the "
            f"{len(old_counts)} image(s) need {sum(old_counts)} ({' + '.join(map(str, old_counts)) or '0'})"
        )
    side = infer_padding_side(attention_mask)
    # Per placeholder (reading order): its image and offset in the run; a run keeps its first slot's place.
    img_of = [k for k, n in enumerate(old_counts) for _ in range(n)]
    off_of = [i for n in old_counts for i in range(n)]
    rows: list[tuple[list[int], list[int]]] = []
    lab_in = labels.tolist() if labels is not None else None
    p = 0
    for b, (row_ids, row_mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        ids, lab = [], []
        for s, (tok, m) in enumerate(zip(row_ids, row_mask)):
            if not m:
                continue
            if tok == placeholder_id:
                k, off = img_of[p], off_of[p]
                p += 1
                if off == 0:  # the run's first slot stands for the whole resized run
                    ids += [placeholder_id] * new_counts[k]
                    lab += [IGNORE_INDEX] * new_counts[k]
                continue
            ids.append(tok)
            lab.append(lab_in[b][s] if lab_in is not None else IGNORE_INDEX)
        rows.append((ids, lab))
    L = max((len(r[0]) for r in rows), default=0)
    out_ids = torch.full((len(rows), L), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros((len(rows), L), dtype=attention_mask.dtype, device=input_ids.device)
    out_lab = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    for b, (ids, lab) in enumerate(rows):
        cols = slice(L - len(ids), L) if side == "left" else slice(0, len(ids))
        out_ids[b, cols] = torch.tensor(ids, dtype=input_ids.dtype)
        out_mask[b, cols] = 1
        out_lab[b, cols] = torch.tensor(lab, dtype=torch.long)
    return out_ids, out_mask, (out_lab.to(labels.dtype) if labels is not None else None)


# --- positions of an assembled batch (shared by the position stages and the families) ------------------
def integer_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """[B, S] ``attention_mask.cumsum(-1) - 1`` with padding at 0: exactly what ``generate`` computes itself."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _segments(key: torch.Tensor) -> list[tuple[int, int, int]]:
    """Split a 1-D key (-1 = text, ≥ 0 = visual run key) into maximal runs: (start, end, key)."""
    n = int(key.numel())
    if n == 0:
        return []
    change = torch.nonzero(key[1:] != key[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    keys = key.tolist()
    return [(s, e, keys[s]) for s, e in zip(bounds[:-1], bounds[1:])]


def visual_runs(visual_mask: torch.Tensor, attention_mask: torch.Tensor, image_id: torch.Tensor | None = None):
    """Yield ``(b, cols, segments)`` per row: the real columns [n] and their text/visual segments.

    A visual run is a maximal stretch of visual slots (of one image, when ``image_id`` [B, S] is given, so
    two adjacent images are two runs). Segments are ``(start, end, key)`` over ``cols``; key -1 is text,
    otherwise the image id (or 0 without ``image_id``).
    """
    for b in range(visual_mask.shape[0]):
        cols = torch.nonzero(attention_mask[b] != 0).flatten()
        vis = visual_mask[b, cols].bool()
        if image_id is not None:
            key = torch.where(vis, image_id[b, cols].long(), torch.full_like(cols, -1))
        else:
            key = vis.long() - 1  # 0 visual, -1 text
        yield b, cols, _segments(key)
