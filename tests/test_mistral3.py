"""Mistral 3 (Pixtral tower, patch merger, ``[IMG_BREAK]`` / ``[IMG_END]`` row ends) on the tiny model.

The batch is ``compat.SAMPLES``: sample 0 holds one 32×32 image, sample 1 a 32×56 and a 60×30 one (dynamic
resolution: the processor pads them to one size and reports ``image_sizes``). At 8 px per merged token the runs
are, worked out by hand: 32×32 → R×C = 4×4, run 4 × (4 + 1) = 20; 32×56 → 4×7, run 4 × 8 = 32; 60×30 → resized
up to 64×32 → 8×4, run 8 × 5 = 40. Facts are checked against the unwrapped model (logits, loss, ``generate``, its own
``get_image_features``, the eager tower's attention probabilities) and against these hand counts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import shared_tiny

import vlmkit
from vlmkit.compat import _labels, make_batch
from vlmkit.compress.fopru import FoPruConfig
from vlmkit.compress.random import RandomPruneConfig
from vlmkit.decoder.fastv import FastVConfig
from vlmkit.families import family_for
from vlmkit.position.mousi import MouSiPositionConfig
from vlmkit.position.v2pe import V2PEConfig
from vlmkit.sequence import integer_positions
from vlmkit.testing import tiny_vlm

GRIDS = [(4, 4), (4, 7), (8, 4)]  # (R, C) merged tokens of the three images, by hand (module docstring)


def tiny():
    return shared_tiny("mistral3")


def ids_of(processor):
    tok = processor.tokenizer
    return tuple(tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))


def image_kwargs(batch):
    return {"image_sizes": batch["image_sizes"]}


def decoder_lengths(wrapped, batch, layer=0):
    """Sequence length the attention of decoder layer ``layer`` gets in each call during ``wrapped(**batch)`` (a hook
    on the attention module sees what decoder stages hand the layer)."""
    seen = []
    handle = wrapped.family.decoder_attention(layer).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            wrapped(**batch)
    finally:
        handle.remove()
    return seen


# --- layout ----------------------------------------------------------------------------------------------
def test_runs_rows_and_break_tokens_by_hand():
    """Each image is one run of R rows of C + 1 tokens: the model's features at [IMG] cells (its own
    get_image_features, row-major), the text embedding of [IMG_BREAK] ending rows 0..R-2 and of [IMG_END] ending
    the last row; source = merged token r·C + c, -1 for break / end."""
    model, processor = tiny()
    img, brk, end = ids_of(processor)
    batch = make_batch(processor, [0, 1], "left")
    assert batch["image_sizes"].tolist() == [[32, 32], [32, 56], [64, 32]]
    wrapped = vlmkit.wrap(model)
    fam = wrapped.family
    try:
        run = fam.image_run_mask(batch["input_ids"])
        assert torch.equal(run, torch.isin(batch["input_ids"], torch.tensor([img, brk, end])))
        tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], **image_kwargs(batch))
    finally:
        vlmkit.unwrap(wrapped)
    with torch.no_grad():
        own = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        table = model.get_input_embeddings().weight
    assert [t.num_uncompressed for t in tokens] == [20, 32, 40] == [R * (C + 1) for R, C in GRIDS]
    for t, feats, (R, C) in zip(tokens, own, GRIDS):
        assert t.grid == (R, C + 1) and t.num_sources == R * C and torch.equal(t.index, torch.arange(R * (C + 1)))
        expected_source = [r * C + c if c < C else -1 for r in range(R) for c in range(C + 1)]
        assert t.source.tolist() == expected_source
        grid = t.embeds.view(R, C + 1, -1)
        assert torch.equal(grid[:, :C].reshape(R * C, -1), feats)
        assert torch.equal(grid[:-1, C], table[brk].expand(R - 1, -1)) and torch.equal(grid[-1, C], table[end])
    # the runs in input_ids are laid out the same way: row r of image k ends with the break / end token
    row = batch["input_ids"][1][run[1]]
    first = row[:32].view(4, 8)
    assert bool((first[:, :7] == img).all()) and first[:, 7].tolist() == [brk, brk, brk, end]


def test_bad_inputs_are_refused_with_the_reason():
    model, processor = tiny()
    img, brk, _ = ids_of(processor)
    batch = make_batch(processor, [0], "left")
    fam = family_for(model)
    with pytest.raises(ValueError, match="needs image_sizes"):
        fam.encode_images(batch["pixel_values"], batch["input_ids"])
    ids = batch["input_ids"].clone()
    ids[ids == brk] = img  # rows run together: one run of 4·5 - 1 = 19 [IMG] + [IMG_END]
    with pytest.raises(ValueError, match=r"needs 4 rows of 4 \[IMG\] tokens each followed by one break / end token"):
        fam.encode_images(batch["pixel_values"], ids, image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"image_sizes must be \[1, 2\]"):
        fam.encode_images(batch["pixel_values"], batch["input_ids"], image_sizes=torch.tensor([[64, 64]]))
    two = torch.cat([batch["input_ids"], batch["input_ids"]], dim=1)  # the image's run twice, one image
    with pytest.raises(ValueError, match=r"hold 40 image run tokens .* need 20"):
        fam.encode_images(batch["pixel_values"], two, image_sizes=batch["image_sizes"])


# --- identity --------------------------------------------------------------------------------------------
def test_identity_is_bit_exact_in_logits_loss_and_generate():
    """No stages: a padded batch of two samples (images of three sizes, two in one prompt) gives the unwrapped
    model's logits and loss (right padding, labels on the text, break / end tokens included) and its greedy
    tokens (left padding), bit for bit."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model)
    try:
        right = make_batch(processor, [0, 1], "right")
        labels = _labels(right, wrapped.family.placeholder_id)
        with torch.no_grad():
            out, ref = wrapped(**right, labels=labels), model(**right, labels=labels)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        left = make_batch(processor, [0, 1], "left")
        gen = wrapped.generate(**left, max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, model.generate(**left, max_new_tokens=4, do_sample=False))
        # the assembled batch keeps the ids and the caller's labels of the break / end tokens
        assembled = wrapped.assemble(right["input_ids"], right["pixel_values"], right["attention_mask"], labels,
                                     **image_kwargs(right))
        _, brk, end = ids_of(processor)
        marks = torch.isin(assembled.input_ids, torch.tensor([brk, end]))
        assert int(marks.sum()) == 4 + 4 + 8 and bool(assembled.visual_mask[marks].all())
        assert torch.equal(assembled.labels[marks], assembled.input_ids[marks])
    finally:
        vlmkit.unwrap(wrapped)


# --- pruning ---------------------------------------------------------------------------------------------
def test_pruning_keeps_break_tokens_and_exact_counts_and_batch_equals_alone():
    """Random pruning at 0.5 keeps floor(R·C / 2) [IMG] tokens of each image plus its R break / end tokens
    (8 + 4, 14 + 4, 16 + 8), the decoder gets rows shorter by the dropped tokens, and the padded batch gives each
    sample's logits and greedy tokens run alone."""
    model, processor = tiny()
    _, brk, end = ids_of(processor)
    wrapped = vlmkit.wrap(model, RandomPruneConfig(keep_ratio=0.5))
    try:
        right = make_batch(processor, [0, 1], "right")
        assembled = wrapped.assemble(right["input_ids"], right["pixel_values"], right["attention_mask"],
                                     **image_kwargs(right))
        assert [t.num_tokens for t in assembled.tokens] == [8 + 4, 14 + 4, 16 + 8]
        assert [int(t.is_newline.sum()) for t in assembled.tokens] == [4, 4, 8]
        for t, (R, C) in zip(assembled.tokens, GRIDS):  # every row end is kept, in place
            assert t.index[t.is_newline].tolist() == [r * (C + 1) + C for r in range(R)]
        marks = torch.isin(assembled.input_ids, torch.tensor([brk, end])).sum(1)
        assert marks.tolist() == [4, 12] == torch.isin(right["input_ids"], torch.tensor([brk, end])).sum(1).tolist()
        dropped = torch.tensor([8, 14 + 16])
        real = right["attention_mask"].sum(1)
        assert assembled.attention_mask.sum(1).tolist() == (real - dropped).tolist()
        assert decoder_lengths(wrapped, right) == [int((real - dropped).max())]
        with torch.no_grad():
            batch_logits = wrapped(**right).logits
        left = make_batch(processor, [0, 1], "left")
        gen = wrapped.generate(**left, max_new_tokens=4, do_sample=False)
        S = left["input_ids"].shape[1]
        for b in (0, 1):
            alone = make_batch(processor, [b], "right")
            with torch.no_grad():
                one = wrapped(**alone).logits[0]
            n = one.shape[0]
            torch.testing.assert_close(batch_logits[b, :n], one, atol=1e-5, rtol=0)
            alone = make_batch(processor, [b], "left")
            one = wrapped.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen[b, S:], one)
    finally:
        vlmkit.unwrap(wrapped)


def test_fopru_scores_are_the_towers_attention_summed_over_merged_patches():
    """FoPru (last Pixtral layer) scores each merged token by the attention its 2×2 patches receive inside its own
    image, which the eager tower reports (block-diagonal mask, 2-D RoPE): column mean over heads and queries of the
    image's block, summed per 2×2 unit. It keeps the best half of the [IMG] tokens and every break / end token."""
    model, processor = tiny_vlm("mistral3", seed=0)
    model.set_attn_implementation("eager")
    batch = make_batch(processor, [0, 1], "left")
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=0.5))
    assert wrapped.stages[0].scored_layer == 1 and wrapped.family.global_vision_layers == [0, 1]
    try:
        kept = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], **image_kwargs(batch))
    finally:
        vlmkit.unwrap(wrapped)
    with torch.no_grad():
        att = model.model.vision_tower(batch["pixel_values"], image_sizes=batch["image_sizes"],
                                       output_attentions=True).attentions[-1][0]  # [H, S, S]
    start = 0
    for t, (R, C) in zip(kept, GRIDS):
        h, w = 2 * R, 2 * C  # patches
        n = h * w
        block = att[:, start:start + n, start:start + n]
        assert torch.allclose(block.sum(-1), torch.ones(()))  # the image attends only to itself
        start += n
        patch = block.float().mean(dim=(0, 1)).view(R, 2, C, 2).sum(dim=(1, 3)).reshape(-1)  # [R·C]
        run = torch.full((R, C + 1), float("nan"))
        run[:, :C] = patch.view(R, C)
        torch.testing.assert_close(t.scores, run.reshape(-1), atol=1e-6, rtol=0, equal_nan=True)
        best = torch.sort(patch, descending=True, stable=True).indices[: R * C // 2]
        cells = [int(k) // C * (C + 1) + int(k) % C for k in best] + [r * (C + 1) + C for r in range(R)]
        assert t.index.tolist() == sorted(cells)
    assert start == att.shape[-1]


def test_fastv_drops_inside_the_decoder_and_keeps_break_tokens():
    """FastV at layer 1, keep 0.5: layer 0 sees the whole assembled rows, layer 1 each row minus the dropped half of
    its [IMG] tokens (8; 14 + 16); break / end tokens are never candidates."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, FastVConfig(keep_ratio=0.5, layer=1))
    try:
        right = make_batch(processor, [0, 1], "right")
        real = right["attention_mask"].sum(1)
        assert decoder_lengths(wrapped, right, 0) == [right["input_ids"].shape[1]]
        assert decoder_lengths(wrapped, right, 1) == [int((real - torch.tensor([8, 30])).max())]
    finally:
        vlmkit.unwrap(wrapped)


# --- positions -------------------------------------------------------------------------------------------
def test_neutral_position_schemes_are_the_models_own_positions():
    """V2PE with δ = 1 (stride = tokens_per_tile = 64, the 8×8 merged tokens of the largest 64-px image) and MouSi
    ``original`` give the unwrapped model's greedy tokens and logits bit for bit, and their rotary positions are
    the integer positions at every real slot."""
    model, processor = tiny()
    left = make_batch(processor, [0, 1], "left")
    right = make_batch(processor, [0, 1], "right")
    real = right["attention_mask"].bool()
    ref = model.generate(**left, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref_logits = model(**right).logits[real]
    for config in (V2PEConfig(stride=64), MouSiPositionConfig(mode="original")):
        wrapped = vlmkit.wrap(model, config)
        try:
            if config.type == "v2pe":
                assert wrapped.stages[0].tokens_per_tile == 64
            assert torch.equal(wrapped.generate(**left, max_new_tokens=4, do_sample=False), ref)
            with torch.no_grad():
                assert torch.equal(wrapped(**right).logits[real], ref_logits)
            batch = wrapped.assemble(left["input_ids"], left["pixel_values"], left["attention_mask"],
                                     **image_kwargs(left))
            mask = batch.attention_mask.bool()
            pos = wrapped.stages[0].rope_positions(batch)
            assert torch.equal(pos[mask], integer_positions(batch.attention_mask)[mask].double())
        finally:
            vlmkit.unwrap(wrapped)


def test_mousi_row_gives_a_break_token_its_rows_position_and_original_survives_pruning():
    """Sample 0 alone: ``user :`` at 0, 1, then the 4×(4 + 1) run. MouSi ``row``: run token k at 2 + k // 5 (a
    break shares its row's position), the text after at 1 + 4 + 1 = 6. MouSi ``original`` after random pruning:
    kept token k at 2 + k, the text after at 1 + 20 + 1 = 22, as without pruning."""
    model, processor = tiny()
    batch = make_batch(processor, [0], "left")
    for configs, rule, after in (((MouSiPositionConfig(mode="row"),), lambda k: 2 + k // 5, 6),
                                 ((RandomPruneConfig(keep_ratio=0.5), MouSiPositionConfig(mode="original")),
                                  lambda k: 2 + k, 22)):
        wrapped = vlmkit.wrap(model, *configs)
        try:
            assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                         **image_kwargs(batch))
            pos = wrapped.stages_of("position")[0].rope_positions(assembled)[0]
        finally:
            vlmkit.unwrap(wrapped)
        vis = assembled.visual_mask[0]
        index = assembled.visual_index[0][vis]
        assert pos[vis].tolist() == [float(rule(int(k))) for k in index]
        assert pos[:2].tolist() == [0.0, 1.0]
        last = int(torch.nonzero(vis).flatten()[-1])
        assert float(pos[last + 1]) == after
        assert set(range(4, 20, 5)) <= set(index.tolist())  # break / end tokens kept (run positions 4, 9, 14, 19)
