"""Position schemes: V2PE against the reference rule, MouSi on hand-worked layouts, exact forward/generate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vlmkit
from vlmkit.config import StageConfig, register_stage
from vlmkit.position.mousi import mousi_position_ids
from vlmkit.position.rotary import PositionTable, integer_positions
from vlmkit.position.v2pe import TRAIN_STRIDES, draw_train_strides, v2pe_position_ids
from vlmkit.stage import CompressorStage
from vlmkit.testing import image_prompt, random_images, tiny_vlm

FAMILIES = ["llava", "internvl"]
QUESTIONS = ["what color is the circle ?", "how many ?", "is there a red square in the image ?"]
IMAGES_PER_SAMPLE = [1, 1, 2]


# --- an independent re-implementation of the reference loop ---------------------------------------
PAD, TXT, IMG_START, IMG_END, CTX = 0, 7, 1, 2, 3
TPT = 256  # the reference hard-codes 256 tokens per tile


def reference_rope_pos_id(ids: torch.Tensor, mask: torch.Tensor, stride: int, num_image_token: int = TPT):
    """V2PE ``get_rope_pos_id`` (``v2pe_fix``, batch 1) re-written from its description: float32 arange."""
    starts = torch.where(ids == IMG_START)[0].tolist()
    ends = torch.where(ids == IMG_END)[0].tolist()
    pieces, last, begin = [], torch.tensor(-1), 0
    for s, e in zip(starts, ends):
        seg = mask[begin : s + 1].long()
        pre = seg.cumsum(-1) - 1 + (last + 1)
        pre.masked_fill_(seg == 0, 1)
        pieces.append(pre.float())
        last = pre[-1].long()
        n = e - s - 1
        small = stride / num_image_token
        vis = torch.arange(last, last + small * (n + 1), small)[1:].to(torch.float32)
        assert vis.numel() == n
        pieces.append(vis)
        last = torch.ceil(vis[-1]).long()
        begin = e
    seg = mask[begin:].long()
    post = seg.cumsum(-1) - 1 + (last + 1)
    post.masked_fill_(seg == 0, 1)
    pieces.append(post.float())
    return torch.cat(pieces)


def layout(*parts, pad: int = 0) -> torch.Tensor:
    """ids of one row: ints are that many text tokens, ("img", n) an image of n tiles with its markers."""
    ids = [PAD] * pad
    for p in parts:
        ids += [TXT] * p if isinstance(p, int) else [IMG_START] + [CTX] * (TPT * p[1]) + [IMG_END]
    return torch.tensor(ids)


IMG, IMG2 = ("img", 1), ("img", 2)
LAYOUTS = {
    "text_image_text": layout(3, IMG, 4),
    "two_images": layout(2, IMG, 3, IMG, 2),
    "image_first": layout(IMG, 3),
    "image_last": layout(3, IMG),
    "two_tiles": layout(2, IMG2, 2),
    "left_padding": layout(2, IMG, 3, pad=5),
}


def ours(ids: torch.Tensor, stride) -> torch.Tensor:
    ids = ids[None] if ids.dim() == 1 else ids
    return v2pe_position_ids(ids == CTX, (ids != PAD).long(), stride, TPT)


@pytest.mark.parametrize("stride", [1, 2, 16, 64, 256])
def test_v2pe_text_image_text_matches_reference(stride):
    ids = LAYOUTS["text_image_text"]
    ref = reference_rope_pos_id(ids, (ids != PAD).long(), stride)
    got = ours(ids, stride)[0]
    assert got.dtype == torch.float32 and got.shape == ids.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("stride", [2, 64])
def test_v2pe_layouts_match_reference_in_one_padded_batch(name, stride):
    # Every layout, left-padded into one batch with the longest one: row by row equal to the reference.
    rows = list(LAYOUTS.values())
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.full((width - len(r),), PAD), r]) for r in rows])
    got = ours(batch, stride)
    i = list(LAYOUTS).index(name)
    ref = reference_rope_pos_id(batch[i], (batch[i] != PAD).long(), stride)
    torch.testing.assert_close(got[i], ref, atol=1e-6, rtol=0)


def test_v2pe_hand_values():
    # a a a <img> v×256 </img> b …, stride 64: δ = 1/4; </img> at L + stride + 1 (V2PE get_rope_pos_id).
    got = ours(LAYOUTS["text_image_text"], 64)[0]
    assert got[:5].tolist() == [0, 1, 2, 3, 3.25]
    assert got[3 + 256].item() == 3 + 64  # last visual token
    assert got[3 + 257 :].tolist() == [68, 69, 70, 71, 72]
    # The module docstring's example: tokens_per_tile 4, stride 2.
    ids = torch.tensor([[TXT, IMG_START, CTX, CTX, CTX, CTX, IMG_END, TXT]])
    got = v2pe_position_ids(ids == CTX, torch.ones_like(ids), 2, 4)
    assert got[0].tolist() == [0, 1, 1.5, 2, 2.5, 3, 4, 5]
    # left padding gets position 1, the first real token 0
    got = ours(LAYOUTS["left_padding"], 64)[0]
    assert got[:7].tolist() == [1, 1, 1, 1, 1, 0, 1]


def test_v2pe_run_without_markers_and_adjacent_images():
    vis = torch.tensor([[True] * 4 + [False] * 2])
    mask = torch.ones_like(vis, dtype=torch.long)
    # a run at the start of a row starts from L = -1, so δ = 1 gives 0, 1, 2, …
    assert v2pe_position_ids(vis, mask, 4, 4)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert v2pe_position_ids(vis, mask, 2, 4)[0].tolist() == [-0.5, 0, 0.5, 1, 2, 3]
    # two adjacent images: image_id splits them, each with its own stride
    vis = torch.tensor([[False] + [True] * 8 + [False]])
    image_id = torch.tensor([[-1] + [0] * 4 + [1] * 4 + [-1]])
    mask = torch.ones_like(image_id)
    got = v2pe_position_ids(vis, mask, [2, 4], 4, image_id=image_id)[0]
    assert got.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 7]
    # without image_id they are one run (like the tiles of one image)
    got = v2pe_position_ids(vis, mask, 2, 4)[0]
    assert got.tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5]
    # a partial run (after compression) rounds up: 3 tokens at δ = 1/2 end at 1.5 → next text at 3
    vis = torch.tensor([[False, True, True, True, False]])
    assert v2pe_position_ids(vis, torch.ones(1, 5), 2, 4)[0].tolist() == [0, 0.5, 1, 1.5, 3]


def test_v2pe_stride_equal_tokens_per_tile_is_integer_positions():
    rows = list(LAYOUTS.values())
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.full((width - len(r),), PAD), r]) for r in rows])
    mask = (batch != PAD).long()
    expected = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).float()
    assert torch.equal(ours(batch, TPT), expected)


def test_v2pe_exact_where_reference_float32_arange_fails():
    # L = 70 000, stride 1: the reference's float32 arange end yields 255 of 256 tokens (its assertion fails).
    L, small = 70_000, 1 / TPT
    last = torch.tensor(L)
    assert torch.arange(last, last + small * (TPT + 1), small)[1:].numel() == TPT - 1
    ids = layout(L, IMG, 1)
    got = ours(ids, 1)[0]
    exact = torch.tensor([L + j / TPT for j in range(1, TPT + 1)], dtype=torch.float64).float()
    assert torch.equal(got[L + 1 : L + 1 + TPT], exact)
    assert got[-2:].tolist() == [L + 2, L + 3]  # <img> sits at L, the last image token at L + 1


def test_v2pe_bad_arguments():
    vis = torch.zeros(1, 3, dtype=torch.bool)
    for stride in (0, -2, float("nan")):
        with pytest.raises(ValueError, match="stride"):
            v2pe_position_ids(vis, torch.ones(1, 3), stride, 4)
    with pytest.raises(ValueError, match="tokens_per_tile"):
        v2pe_position_ids(vis, torch.ones(1, 3), 2, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        v2pe_position_ids(vis, torch.ones(1, 4), 2, 4)
    with pytest.raises(ValueError, match="strides given"):
        v2pe_position_ids(torch.tensor([[False, True]]), torch.ones(1, 2), [2, 4], 4)


def test_v2pe_training_strides_are_drawn_per_image_and_seeded():
    torch.manual_seed(3)
    first = draw_train_strides(64, TRAIN_STRIDES)
    torch.manual_seed(3)
    assert draw_train_strides(64, TRAIN_STRIDES) == first
    assert set(first) <= set(TRAIN_STRIDES) and len(set(first)) > 1


# --- MouSi: hand-worked examples ------------------------------------------------------------------
def _row(mode, image_id, index, widths, lengths, mask=None):
    image_id, index = torch.tensor([image_id]), torch.tensor([index])
    mask = torch.ones_like(image_id) if mask is None else torch.tensor([mask])
    return mousi_position_ids(mode, mask, image_id, index, widths, lengths)[0].tolist()


def test_mousi_docstring_examples():
    # text a, one 2×3 image, text b
    image_id = [-1, 0, 0, 0, 0, 0, 0, -1]
    index = [-1, 0, 1, 2, 3, 4, 5, -1]
    assert _row("shared", image_id, index, [3], [6]) == [0, 1, 1, 1, 1, 1, 1, 2]
    assert _row("row", image_id, index, [3], [6]) == [0, 1, 1, 1, 2, 2, 2, 3]
    assert _row("original", image_id, index, [3], [6]) == [0, 1, 2, 3, 4, 5, 6, 7]
    # pruned to cells 0, 2, 4: kept tokens and the text after keep their uncompressed positions
    assert _row("original", [-1, 0, 0, 0, -1], [-1, 0, 2, 4, -1], [3], [6]) == [0, 1, 3, 5, 7]
    assert _row("row", [-1, 0, 0, 0, -1], [-1, 0, 2, 4, -1], [3], [6]) == [0, 1, 1, 2, 3]


def test_mousi_padding_two_images_and_tiles():
    # left padding, a 2×2 image, text, two adjacent images: a 2×2 one and one of two 1×2 tiles (2 rows)
    mask = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    image_id = [-1, -1, -1, 0, 0, 0, 0, -1, 1, 1, 1, 1, 2, 2, 2, -1]
    index = [-1, -1, -1, 0, 1, 2, 3, -1, 0, 1, 2, 3, 0, 2, 3, -1]
    widths, lengths = [2, 2, 2], [4, 4, 4]
    assert _row("shared", image_id, index, widths, lengths, mask) == [1, 1, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 5]
    assert _row("row", image_id, index, widths, lengths, mask) == [1, 1, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7, 8]
    assert _row("original", image_id, index, widths, lengths, mask) == [1, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14]


def test_mousi_tiles_split_by_text_are_blocks_each():
    # one image of three 1×2 tiles (h=1, w=2) whose runs are separated by marker text (SmolVLM), the last
    # tile pruned to its second cell: a t0 t0 m t1 t1 m t2 b
    image_id = [-1, 0, 0, -1, 0, 0, -1, 0, -1]
    index = [-1, 0, 1, -1, 2, 3, -1, 5, -1]
    rows = {mode: mousi_position_ids(mode, torch.ones(1, 9, dtype=torch.long), torch.tensor([image_id]),
                                     torch.tensor([index]), [2], [6], None, [1])[0].tolist()
            for mode in ("shared", "row", "original")}
    assert rows["shared"] == [0, 1, 1, 2, 3, 3, 4, 5, 6]
    assert rows["row"] == [0, 1, 1, 2, 3, 3, 4, 5, 6]
    assert rows["original"] == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # the pruned cell keeps its slot; b after the tile
    # 2×2 tiles: row mode counts the tile's rows
    image_id = [-1, 0, 0, 0, -1, 0, 0, -1]
    index = [-1, 0, 2, 3, -1, 4, 7, -1]
    row = mousi_position_ids("row", torch.ones(1, 8, dtype=torch.long), torch.tensor([image_id]),
                             torch.tensor([index]), [2], [8], None, [2])[0].tolist()
    assert row == [0, 1, 2, 2, 3, 4, 5, 6]


def test_mousi_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        _row("diagonal", [-1, 0], [-1, 0], [1], [1])
    with pytest.raises(ValueError, match="visual_index"):
        _row("row", [-1, 0], [-1, 7], [2], [4])
    with pytest.raises(ValueError, match="not contiguous"):
        _row("row", [0, -1, 0], [0, -1, 1], [2], [4])


# --- the rotary lookup ----------------------------------------------------------------------------
def test_position_table_lookup_continues_and_follows_repeated_rows():
    rope = torch.tensor([[1.0, 1.0, 0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 2.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    table = PositionTable(rope, mask)
    ids = torch.cat([integer_positions(mask), torch.tensor([[3, 4], [5, 6]])], dim=1)
    got = table.lookup(ids)
    assert got.dtype == torch.float32
    assert got[0].tolist() == [0, 0, 0, 0.5, 1, 2, 3]
    assert got[1].tolist() == [0, 0.25, 0.5, 0.75, 2, 3, 4]
    # generate() repeats rows with repeat_interleave for beams / num_return_sequences
    rep = table.lookup(torch.tensor([[3], [3], [5], [5]]))
    assert rep[:, 0].tolist() == [2, 2, 3, 3]
    with pytest.raises(RuntimeError, match="rows"):
        table.lookup(torch.zeros(3, 1, dtype=torch.long))


# --- models ---------------------------------------------------------------------------------------
_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_vlm(family, seed=0)
    return _MODELS[family]


def process(processor, samples, padding_side="left"):
    """samples: list of (question, images)."""
    processor.tokenizer.padding_side = padding_side
    prompts = [image_prompt(processor, q, len(imgs)) for q, imgs in samples]
    return processor(images=[imgs for _, imgs in samples], text=prompts, return_tensors="pt", padding=True)


def samples():
    images = random_images(sum(IMAGES_PER_SAMPLE), seed=1)
    out, start = [], 0
    for q, n in zip(QUESTIONS, IMAGES_PER_SAMPLE):
        out.append((q, images[start : start + n]))
        start += n
    return out


def generate(wrapped, batch, steps=4):
    out = wrapped.generate(
        **batch, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@torch.no_grad()
def manual_greedy(model, embeds, mask, positions, steps=4):
    """Greedy decoding without cache: every step re-runs the whole sequence with explicit positions + mask."""
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    B = embeds.shape[0]
    finished = torch.zeros(B, dtype=torch.bool)
    tokens, logits = [], []
    for _ in range(steps):
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        step_logits = out.logits[:, -1].float()
        tok = torch.where(finished, torch.full((B,), pad), step_logits.argmax(-1))
        finished |= tok == eos
        tokens.append(tok)
        logits.append(step_logits)
        embeds = torch.cat([embeds, model.get_input_embeddings()(tok)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if bool(finished.all()):
            break
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def assert_same_generation(tokens, logits, ref_tokens, ref_logits, atol=1e-5):
    assert torch.equal(tokens, ref_tokens)
    eos = 3  # </s> of both tiny tokenizers
    for b in range(tokens.shape[0]):  # logits are compared while the row is still running
        live = 1 + int((ref_tokens[b] == eos).nonzero()[0]) if bool((ref_tokens[b] == eos).any()) else tokens.shape[1]
        torch.testing.assert_close(logits[b, :live], ref_logits[b, :live], atol=atol, rtol=0)


@dataclasses.dataclass
class KeepCellsConfig(StageConfig):
    """Test-only pruning: keep the cells c with c % 3 == 1 or c % 5 == 2 (drops the first and often the last)."""

    type = "test_keep_cells"


@register_stage(KeepCellsConfig)
class KeepCells(CompressorStage):
    def compress(self, tokens):
        return [t.select(torch.nonzero((t.index % 3 == 1) | (t.index % 5 == 2)).flatten()) for t in tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_stride_equal_tokens_per_tile_generate_identical_to_unwrapped(family):
    model, processor = tiny(family)
    batch = process(processor, samples())
    assert (batch["attention_mask"] == 0).any()
    ref = model.generate(**batch, max_new_tokens=4, do_sample=False)
    # right padding: HF numbers columns from 0, which then equals ours on every real token
    right = process(processor, samples(), padding_side="right")
    real = right["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = model(**right).logits[real]
    for config in (vlmkit.V2PEConfig(stride=16), vlmkit.MouSiPositionConfig(mode="original")):
        wrapped = vlmkit.wrap(model, config)
        if config.type == "v2pe":
            assert wrapped.stages[0].tokens_per_tile == 16  # the family's tokens per tile
        assert torch.equal(wrapped.generate(**batch, max_new_tokens=4, do_sample=False), ref)
        with torch.no_grad():
            assert torch.equal(wrapped(**right).logits[real], ref_logits)
        assert "forward" not in vars(model.model.language_model.rotary_emb)  # patch removed after the call
        vlmkit.unwrap(wrapped)


SCHEMES = {
    "v2pe": (vlmkit.V2PEConfig(stride=4),),
    "shared": (vlmkit.MouSiPositionConfig(mode="shared"),),
    "pruned_original": (KeepCellsConfig(), vlmkit.MouSiPositionConfig(mode="original")),
}


@pytest.mark.parametrize("scheme", ["v2pe", "shared", "pruned_original"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_manual_loop_with_explicit_positions(family, scheme):
    model, processor = tiny(family)
    batch = process(processor, samples())
    wrapped = vlmkit.wrap(model, *SCHEMES[scheme])
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], padding_side="left")
    if scheme == "v2pe":
        positions = v2pe_position_ids(assembled.visual_mask, assembled.attention_mask, 4, 16, image_id=assembled.image_id)
    else:
        tokens = assembled.tokens
        positions = mousi_position_ids(
            "shared" if scheme == "shared" else "original", assembled.attention_mask, assembled.image_id,
            assembled.visual_index, [t.grid[1] for t in tokens], [t.num_uncompressed for t in tokens],
        ).float()
    real = assembled.attention_mask.bool()
    assert not torch.equal(positions[real], integer_positions(assembled.attention_mask).float()[real])
    ref_tokens, ref_logits = manual_greedy(model, assembled.inputs_embeds, assembled.attention_mask, positions)
    tokens, logits = generate(wrapped, batch)
    assert_same_generation(tokens, logits, ref_tokens, ref_logits)
    # the scheme's positions really matter: plain integer positions give other logits
    _, int_logits = manual_greedy(
        model, assembled.inputs_embeds, assembled.attention_mask, integer_positions(assembled.attention_mask), steps=1
    )
    assert (int_logits[:, 0] - ref_logits[:, 0]).abs().max() > 1e-3
    # forward (loss path) sees the same positions
    with torch.no_grad():
        fwd = wrapped(**batch).logits
        ref_fwd = model(inputs_embeds=assembled.inputs_embeds, attention_mask=assembled.attention_mask,
                        position_ids=positions).logits
    torch.testing.assert_close(fwd[real], ref_fwd[real], atol=1e-5, rtol=0)
    vlmkit.unwrap(wrapped)


@pytest.mark.parametrize(
    "family, config",
    [("llava", vlmkit.V2PEConfig(stride=4)), ("internvl", vlmkit.V2PEConfig(stride=4)),
     ("internvl", vlmkit.MouSiPositionConfig(mode="row"))],
    ids=["llava-v2pe", "internvl-v2pe", "internvl-row"],
)
def test_left_padded_batch_equals_each_sample_alone(family, config):
    model, processor = tiny(family)
    wrapped = vlmkit.wrap(model, config)
    cases = samples()
    batch = process(processor, cases)
    assert (batch["attention_mask"] == 0).any()
    tokens, logits = generate(wrapped, batch)
    for b, case in enumerate(cases):
        one_tokens, one_logits = generate(wrapped, process(processor, [case]))
        n = one_tokens.shape[1]
        assert_same_generation(tokens[b : b + 1, :n], logits[b : b + 1, :n], one_tokens, one_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family):
    model, processor = tiny(family)
    batch = process(processor, samples())
    wrapped = vlmkit.wrap(model, vlmkit.V2PEConfig(stride=4))
    tokens, logits = generate(wrapped, batch)
    with torch.no_grad():
        fwd = wrapped(**batch).logits
    try:
        model.set_attn_implementation("eager")
        assert model.model.language_model.config._attn_implementation == "eager"
        eager_tokens, eager_logits = generate(wrapped, batch)
        with torch.no_grad():
            eager_fwd = wrapped(**batch).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert_same_generation(eager_tokens, eager_logits, tokens, logits)
    real = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).attention_mask.bool()
    torch.testing.assert_close(eager_fwd[real], fwd[real], atol=1e-5, rtol=0)


def test_mousi_positions_on_a_real_llava_prompt():
    model, processor = tiny("llava")
    batch = process(processor, [("how many ?", random_images(1))])
    words = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert words == ["user", ":"] + ["<image>"] * 16 + ["how", "many", "?", "assistant", ":"]
    expect = {
        "shared": [0, 1] + [2] * 16 + [3, 4, 5, 6, 7],
        "row": [0, 1] + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [6, 7, 8, 9, 10],
        "original": list(range(23)),
    }
    for mode, positions in expect.items():
        wrapped = vlmkit.wrap(model, vlmkit.MouSiPositionConfig(mode=mode))
        assembled = wrapped.assemble(**batch)
        assert wrapped.stages[0].rope_positions(assembled)[0].tolist() == positions


@pytest.mark.parametrize("family", FAMILIES)
def test_original_after_pruning_keeps_uncompressed_positions(family):
    model, processor = tiny(family)
    batch = process(processor, samples())
    full = vlmkit.wrap(model, vlmkit.MouSiPositionConfig(mode="original"))
    pruned = vlmkit.wrap(model, KeepCellsConfig(), vlmkit.MouSiPositionConfig(mode="original"))
    bf, bp = full.assemble(**batch), pruned.assemble(**batch)
    pf = full.stages[0].rope_positions(bf)
    pp = pruned.stages_of("position")[0].rope_positions(bp)
    # without pruning, "original" is the ordinary integer numbering
    real_f = bf.attention_mask.bool()
    assert torch.equal(pf[real_f], integer_positions(bf.attention_mask).double()[real_f])
    assert bp.inputs_embeds.shape[1] < bf.inputs_embeds.shape[1]
    for b in range(bf.attention_mask.shape[0]):
        def keyed(assembled, pos):
            out, text = {}, 0
            for s in torch.nonzero(assembled.attention_mask[b]).flatten().tolist():
                if assembled.visual_mask[b, s]:
                    out[(int(assembled.image_id[b, s]), int(assembled.visual_index[b, s]))] = pos[b, s].item()
                else:
                    out[("text", text)] = pos[b, s].item()
                    text += 1
            return out

        kf, kp = keyed(bf, pf), keyed(bp, pp)
        assert set(kp) < set(kf)
        assert all(kp[k] == kf[k] for k in kp), b
    real_p = bp.attention_mask.bool()
    assert not torch.equal(pp[real_p], integer_positions(bp.attention_mask).double()[real_p])  # there are gaps

    # V2PE composes with the same pruning: a run of K kept tokens spans K·δ
    v2pe = vlmkit.wrap(model, KeepCellsConfig(), vlmkit.V2PEConfig(stride=4))
    bv = v2pe.assemble(**batch)
    pv = v2pe.stages_of("position")[0].rope_positions(bv)
    kept = bv.tokens[0].num_tokens
    cols = torch.nonzero(bv.image_id[0] == 0).flatten()
    before = pv[0, cols[0] - 1].item()
    assert pv[0, cols].tolist() == [before + j * 4 / 16 for j in range(1, kept + 1)]


def test_v2pe_training_mode_draws_a_stride_per_image():
    model, processor = tiny("internvl")
    batch = process(processor, samples())
    wrapped = vlmkit.wrap(model, vlmkit.V2PEConfig(stride=4))
    stage = wrapped.stages[0]
    assembled = wrapped.assemble(**batch)
    # the wrapper follows the wrapped model's mode (eval here): eval behaviour
    assert not wrapped.training and not stage.training and not stage.is_training()
    try:
        wrapped.train()  # the wrapper's train() reaches the model too
        assert stage.is_training()
    finally:
        wrapped.eval()
    assert not model.training
    eval_positions = stage.rope_positions(assembled, training=False)
    with torch.no_grad():
        torch.manual_seed(0)
        a = wrapped(**batch).logits
        torch.manual_seed(1)
        assert torch.equal(wrapped(**batch).logits, a)
    seed = next(s for s in range(100) if len(set(draw_train_strides(4, TRAIN_STRIDES, torch.Generator().manual_seed(s)))) > 1)
    torch.manual_seed(seed)
    strides = draw_train_strides(len(assembled.tokens), TRAIN_STRIDES)
    torch.manual_seed(seed)
    train_positions = stage.rope_positions(assembled, training=True)
    torch.manual_seed(seed)
    assert torch.equal(stage.rope_positions(assembled, training=True), train_positions)
    expected = v2pe_position_ids(
        assembled.visual_mask, assembled.attention_mask, strides, 16, image_id=assembled.image_id, dtype=torch.float64
    )
    assert torch.equal(train_positions, expected)
    assert not torch.equal(train_positions, eval_positions)


@pytest.mark.parametrize(
    "config",
    [
        lambda: vlmkit.V2PEConfig(stride=0),
        lambda: vlmkit.V2PEConfig(stride=-64),
        lambda: vlmkit.V2PEConfig(tokens_per_tile=0),
        lambda: vlmkit.V2PEConfig(train_strides=()),
        lambda: vlmkit.V2PEConfig(train_strides=(1, 0)),
        lambda: vlmkit.MouSiPositionConfig(mode="diagonal"),
    ],
    ids=["stride0", "stride_neg", "tpt0", "no_train_strides", "train_stride0", "unknown_mode"],
)
def test_bad_configs_raise_at_wrap_time(config):
    model, _ = tiny("llava")
    with pytest.raises(ValueError):
        vlmkit.wrap(model, config())


def test_configs_round_trip_and_one_position_scheme():
    for config in (vlmkit.V2PEConfig(stride=16, tokens_per_tile=256), vlmkit.MouSiPositionConfig(mode="shared")):
        assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="stride"):
        vlmkit.StageConfig.from_dict({"type": "v2pe", "stride": 0})
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="position scheme"):
        vlmkit.wrap(model, vlmkit.V2PEConfig(), vlmkit.MouSiPositionConfig())
