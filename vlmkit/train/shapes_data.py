"""Training batches of the embedded shapes model: one image, many isolated question–answer turns.

Each sequence is the image prefix ``user : <image>×N`` followed by turns ``QUESTION assistant : ANSWER
</s>``. Every turn attends to the prefix and to itself only (a 4-D attention mask), and its positions
continue from the end of the prefix, so each turn is exactly the single-question prompt the model sees at
inference, and no turn can read another's answer. (An earlier design let turns see each other: questions
name the objects present — "the purple triangle" — so existence questions could be answered from the
conversation instead of the image, and the shipped model's existence accuracy stayed near chance.)
Several draws of the benchmark's question builders per image give dense supervision for one vision pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.shapes import COLORS, SHAPES, ShapesSample, draw_questions

GRID = 8  # Text4Seg grid of the shipped model: one cell per visual token (see shapes_model's docstring)
PROMPT = "user : {image} {question} assistant :"
TURN_SEP = "</s>"


def class_names() -> list[str]:
    """Per-patch classes of the auxiliary loss: background, then every colour×shape."""
    return ["background"] + [f"{c} {s}" for c in COLORS for s in SHAPES]


def patch_labels(sample: ShapesSample, patch: int) -> torch.Tensor:
    """[h·w] class of each patch: the object covering the patch centre, else background (0)."""
    size = sample.image.size[0]
    centres = np.arange(patch // 2, size, patch)
    names = class_names()
    out = np.zeros((len(centres), len(centres)), dtype=np.int64)
    for obj in sample.objects:  # painted back to front; masks are the visible pixels
        hit = obj.mask[np.ix_(centres, centres)]
        out[hit] = names.index(f"{obj.color} {obj.shape}")
    return torch.from_numpy(out.reshape(-1))


def refseg_turn(sample: ShapesSample, rng: np.random.Generator, grid: int = GRID,
                ref_index: int | None = None) -> tuple[str, str, int]:
    """(question, answer, object index) of a referring expression (``ref_index``, else a random one),
    answer in Text4Seg R-RLE."""
    from ..seg.refseg_data import ANSWER_PARTIAL, QUESTION_PARTIAL
    from ..seg.rrle import encode_rrle, mask_to_labels, wrap_answer

    ref = sample.refs[int(rng.integers(len(sample.refs))) if ref_index is None else ref_index]
    expr = ref["sentence"]
    obj = sample.objects[ref["object_index"]]
    question = QUESTION_PARTIAL[int(rng.integers(len(QUESTION_PARTIAL)))].replace("[class_name]", expr)
    sentence = ANSWER_PARTIAL[int(rng.integers(len(ANSWER_PARTIAL)))].replace("[class_name]", expr)
    labels = mask_to_labels(obj.mask, expr, grid, grid)
    return question, wrap_answer(sentence, encode_rrle(labels)), ref["object_index"]


def dense_questions(sample: ShapesSample, rng: np.random.Generator, draws: int) -> list[tuple[str, str]]:
    """The distinct (question, answer) pairs of ``draws`` draws of the benchmark's question builders."""
    seen: dict[str, str] = {}
    for _ in range(draws):
        for q in draw_questions(rng, sample.objects, sample.image.size[0]):
            seen.setdefault(q["question"], q["answer"])
    return list(seen.items())


def conversation(sample: ShapesSample, rng: np.random.Generator, refseg_turns: int = 1, draws: int = 3,
                 grid: int = GRID) -> list[tuple[str, str]]:
    """The (question, answer) turns trained on one image, in random order: ``dense_questions`` and up to
    ``refseg_turns`` referring turns on distinct expressions."""
    turns = dense_questions(sample, rng, draws)
    refs = rng.permutation(len(sample.refs))[:refseg_turns]
    turns += [refseg_turn(sample, rng, grid, int(i))[:2] for i in refs]
    return [turns[i] for i in rng.permutation(len(turns))]


def encode_turns(turns: list[tuple[str, str]], tokenizer, image_token_id: int, n_image_tokens: int):
    """One image's turns → input_ids, labels (answers + end token only), segments (0 = image prefix, k + 1
    = turn k) and position_ids, each [S]; every turn's positions continue from the prefix."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    before, after = PROMPT.split("{image}")
    prefix = encode(before) + [image_token_id] * n_image_tokens
    ids, labels, segments, positions = list(prefix), [-100] * len(prefix), [0] * len(prefix), list(range(len(prefix)))
    for k, (question, answer) in enumerate(turns):
        asked, answered = encode(after.format(question=question)), encode(f"{answer} {TURN_SEP}")
        n = len(asked) + len(answered)
        ids += asked + answered
        labels += [-100] * len(asked) + answered
        segments += [k + 1] * n
        positions += range(len(prefix), len(prefix) + n)
    return tuple(torch.tensor(x) for x in (ids, labels, segments, positions))


def turn_mask(segments: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask [B, 1, S, S] from segments [B, S] and valid [B, S] (False = padding): a
    query sees earlier-or-same keys of the image prefix (segment 0) and of its own turn. Padding queries
    see themselves, so no row is empty."""
    S = segments.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    allowed = causal & same & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(S, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def row_slots(ids: torch.Tensor, turns: list[tuple[str, str]], tokenizer, grid: int = GRID):
    """Where each mask row of the sequence's referring answers starts, and its foreground cells.

    Returns positions [R·grid] (per referring answer, in sequence order: its ``<seg>`` token for row 0,
    then the first ``grid - 1`` ``\\n`` tokens after it) and targets [R·grid, grid] (1 = the cell belongs
    to the referred object), decoded from the answer text itself.
    """
    from ..seg.rrle import SEG_START, decode_answer, labels_to_mask

    answers = [a for _, a in turns if SEG_START in a]
    if not answers:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, grid))
    seg_id, newline_id = tokenizer.convert_tokens_to_ids([SEG_START, "\n"])
    positions, targets = [], []
    for start, answer in zip((ids == seg_id).nonzero()[:, 0].tolist(), answers):
        newlines = (ids[start:] == newline_id).nonzero()[:, 0] + start
        positions += [start] + newlines[: grid - 1].tolist()
        targets.append(torch.from_numpy(labels_to_mask(decode_answer(answer, grid, grid)).astype(np.float32)))
    return torch.tensor(positions), torch.cat(targets)


def make_batch(samples: list[ShapesSample], processor, rng, patch: int, refseg_turns: int = 1, draws: int = 3):
    """Right-padded training batch: input_ids, labels, position_ids [B, S]; attention_mask [B, 1, S, S]
    (``turn_mask``); pixel_values; patch_labels [B, N]; row_positions [B, M] (-1 = none) and row_targets
    [B, M, GRID] (``row_slots``)."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    n_img = (samples[0].image.size[0] // patch) ** 2
    convs = [conversation(s, rng, refseg_turns, draws) for s in samples]
    seqs = [encode_turns(turns, tok, image_id, n_img) for turns in convs]
    slots = [row_slots(seq[0], turns, tok) for seq, turns in zip(seqs, convs)]
    B, L, M = len(seqs), max(len(s[0]) for s in seqs), max(1, max(len(p) for p, _ in slots))
    input_ids = torch.full((B, L), tok.pad_token_id)
    labels = torch.full((B, L), -100)
    segments = torch.full((B, L), -1)
    positions = torch.zeros((B, L), dtype=torch.long)
    row_positions = torch.full((B, M), -1)
    row_targets = torch.zeros((B, M, GRID))
    for b, ((ids, lab, seg, pos), (rp, rt)) in enumerate(zip(seqs, slots)):
        n = len(ids)
        input_ids[b, :n], labels[b, :n], segments[b, :n], positions[b, :n] = ids, lab, seg, pos
        row_positions[b, : len(rp)], row_targets[b, : len(rp)] = rp, rt
    pixel_values = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
            "attention_mask": turn_mask(segments, segments >= 0), "pixel_values": pixel_values,
            "patch_labels": torch.stack([patch_labels(s, patch) for s in samples]),
            "row_positions": row_positions, "row_targets": row_targets}
