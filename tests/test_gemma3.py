"""Gemma 3 (``vlmkit/families/gemma3.py``) on the tiny model of the real classes (``tiny_vlm("gemma3")``).

Facts checked against what does not come from vlmkit: the unwrapped model (identity, bit-exact, with and without
pan-and-scan crops), the tower's hidden states pooled 4×4 by hand, the tower's own eager attention probabilities
(FoPru), attention masks built here by hand from the assembled / re-packed layout (bidirectional blocks over the kept
tokens of each tile, sliding window), teacher-forced logits against ``generate``'s (the sliding KV cache after a
decoder-side drop), and integer positions (neutral V2PE / MouSi).

The tiny decoder has layers (sliding 24, sliding 24, global); its prompts are 30-170 slots long, so the window cuts.
Samples: 0 = one 32×32 image; 1 = a 32×56 and a 60×30 image, which pan-and-scan cuts into a thumbnail + 2 crops each
(7 tiles of 16 tokens in all).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import vlmkit
from vlmkit.compat import sample_images
from vlmkit.compress.divprune import DivPruneConfig
from vlmkit.compress.fopru import FoPruConfig
from vlmkit.compress.random import RandomPruneConfig
from vlmkit.decoder.fastv import FastVConfig
from vlmkit.families import family_for
from vlmkit.position.mousi import MouSiPositionConfig
from vlmkit.position.v2pe import V2PEConfig
from vlmkit.sequence import integer_positions
from vlmkit.testing import image_prompt, tiny_vlm

QUESTIONS = ("what is the image ?", "how many shapes are there ?")
LAYOUT = [[0], [1, 2]]  # sample k: images of compat.sample_images()
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=4,
                    pan_and_scan_min_ratio_to_activate=1.2)  # the processor's defaults, crops of ≥ 16 px
WINDOW = 24


@functools.lru_cache(maxsize=None)
def tiny():
    return tiny_vlm("gemma3", seed=0)


def make(processor, samples, side, pan_and_scan=False, crops=True):
    """Processor output for ``samples``; with ``pan_and_scan`` and ``crops`` also ``num_crops`` (crops per image, from
    the image processor: ``Gemma3Processor`` drops it)."""
    images = sample_images()
    nested = [[images[i] for i in LAYOUT[k]] for k in samples]
    prompts = [image_prompt(processor, QUESTIONS[k], len(LAYOUT[k])) for k in samples]
    processor.tokenizer.padding_side = side
    extra = PAN_AND_SCAN if pan_and_scan else {}
    batch = dict(processor(images=nested, text=prompts, return_tensors="pt", padding=True, **extra))
    if pan_and_scan and crops:
        flat = [image for sample in nested for image in sample]
        batch["num_crops"] = processor.image_processor(flat, return_tensors="pt", **extra)["num_crops"]
    return batch


def model_inputs(batch):
    """What the unwrapped model takes (``num_crops`` is vlmkit's)."""
    return {k: v for k, v in batch.items() if k != "num_crops"}


def image_kwargs(wrapped, batch):
    return {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}


def blocks_by_hand(visual_row: list[bool]) -> list[int]:
    """Block id of each slot: maximal runs of visual slots numbered from 0, -1 elsewhere."""
    out, block, prev = [], -1, False
    for v in visual_row:
        if v and not prev:
            block += 1
        out.append(block if v else -1)
        prev = v
    return out


def mask_by_hand(real: list[bool], visual: list[bool], window: int | None) -> torch.Tensor:
    """[L, L] may-attend of Gemma 3: key real and (causal or same image block) and, on a sliding layer, less than
    ``window`` slots before the query."""
    block = blocks_by_hand(visual)
    L = len(real)
    out = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            same = block[i] >= 0 and block[i] == block[j]
            out[i, j] = real[j] and (j <= i or same) and (window is None or j > i - window)
    return out


def as_allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D model mask [B, 1, q, k] as bool may-attend (SDPA bool, eager additive float)."""
    return mask if mask.dtype == torch.bool else mask == 0


def capture_attention_masks(fam):
    """Forward pre-hooks on every decoder layer's attention module: the mask it receives (after any stage's hook)."""
    seen, handles = {}, []
    for i in range(len(fam.decoder_layers)):
        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append((kwargs["attention_mask"], hidden.shape))
        handles.append(fam.decoder_attention(i).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


# --- layout ------------------------------------------------------------------------------------------------
def test_tiles_pool_4x4_patches_and_crops_group_into_images():
    model, processor = tiny()
    fam = family_for(model)
    assert fam.grid == (4, 4) and fam.patch_pooling("test") == ((16, 16), 4)
    assert [fam.decoder_sliding_window(i) for i in range(3)] == [WINDOW, WINDOW, None]
    batch = make(processor, [0, 1], "left", pan_and_scan=True)
    assert batch["num_crops"].tolist() == [0, 2, 2] and batch["pixel_values"].shape[0] == 7
    tokens = fam.encode_images(batch["pixel_values"], batch["input_ids"], token_type_ids=batch["token_type_ids"],
                               num_crops=batch["num_crops"])
    assert [t.num_uncompressed for t in tokens] == [16, 48, 48]
    assert tokens[1].frame.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    # by hand: SigLIP's last hidden state (post-layernorm) on the 16×16 patch grid, mean of each 4×4 block, row-major
    with torch.no_grad():
        hidden = fam.vision_tower(batch["pixel_values"]).last_hidden_state  # [7, 256, 32]
        pooled = hidden.reshape(7, 4, 4, 4, 4, 32).mean(dim=(2, 4)).reshape(7, 16, 32)
        projector = model.model.multi_modal_projector
        expected = projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight
    assert torch.allclose(torch.cat([t.embeds for t in tokens]), expected.reshape(-1, 64), atol=1e-5)
    assert float(expected.abs().max()) > 0.01  # the tiny factory's projection is not Gemma's zero init
    # without num_crops every tile (thumbnail or crop) is its own image, as the model's attention blocks are
    alone = fam.encode_images(batch["pixel_values"], batch["input_ids"])
    assert [t.num_uncompressed for t in alone] == [16] * 7
    assert torch.equal(torch.cat([t.embeds for t in alone]), torch.cat([t.embeds for t in tokens]))


def test_wrong_token_types_or_crop_counts_are_refused():
    model, processor = tiny()
    fam = family_for(model)
    batch = make(processor, [0, 1], "left", pan_and_scan=True)
    wrong = batch["token_type_ids"].clone()
    wrong[0, -1] = 1
    with pytest.raises(ValueError, match="token_type_ids must be 1 exactly on the image placeholders"):
        fam.encode_images(batch["pixel_values"], batch["input_ids"], token_type_ids=wrong)
    with pytest.raises(ValueError, match=r"num_crops=\[0, 2, 1\] gives 6 tiles .* pixel_values holds 7"):
        fam.encode_images(batch["pixel_values"], batch["input_ids"], num_crops=torch.tensor([0, 2, 1]))


# --- identity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_identity_is_bit_exact_in_logits_and_generate(pan_and_scan):
    """A padded batch of 2 (one image; two images, or with pan-and-scan 6 tiles): wrap() without stages gives the
    unwrapped model's logits and greedy tokens bit for bit (the decoder gets the assembled token_type_ids)."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model)
    try:
        right = make(processor, [0, 1], "right", pan_and_scan)
        with torch.no_grad():
            out = wrapped(**right)
            ref = model(**model_inputs(right))
        assert torch.equal(out.logits, ref.logits)
        left = make(processor, [0, 1], "left", pan_and_scan)
        gen = wrapped.generate(**left, max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, model.generate(**model_inputs(left), max_new_tokens=4, do_sample=False))
    finally:
        vlmkit.unwrap(wrapped)
    assert "prepare_inputs_for_generation" not in vars(model)  # generate's inputs_embeds patch is gone


# --- pruning before the decoder --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [FoPruConfig(keep_ratio=0.5, strategy="rank"),
                                    FoPruConfig(keep_ratio=0.5, strategy="row"),
                                    RandomPruneConfig(keep_ratio=0.5), DivPruneConfig(keep_ratio=0.5)],
                         ids=["fopru_rank", "fopru_row", "random", "divprune"])
def test_pruned_counts_and_batch_equals_each_sample_alone(config):
    """Pan-and-scan images grouped by num_crops keep floor(48 / 2) of their 3 tiles' tokens, the single tile 8 of 16;
    the decoder sees fewer slots; greedy generate on the padded batch equals each sample alone."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, config)
    try:
        batch = make(processor, [0, 1], "left", pan_and_scan=True)
        tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], **image_kwargs(wrapped, batch))
        assert [t.num_tokens for t in tokens] == [8, 24, 24]
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     **image_kwargs(wrapped, batch))
        assert assembled.visual_tokens_per_sample == [8, 48]
        dropped = torch.tensor([8, 48])  # half of each sample's 16 and 96 visual slots
        assert assembled.attention_mask.sum(1).tolist() == (batch["attention_mask"].sum(1) - dropped).tolist()
        gen = wrapped.generate(**batch, max_new_tokens=3, do_sample=False)
        S = batch["input_ids"].shape[1]
        for b in range(2):
            alone = make(processor, [b], "left", pan_and_scan=True)
            one = wrapped.generate(**alone, max_new_tokens=3, do_sample=False)
            assert torch.equal(gen[b, S:], one[0, alone["input_ids"].shape[1]:])
    finally:
        vlmkit.unwrap(wrapped)


def test_fopru_scores_are_the_towers_attention_summed_over_each_tokens_4x4_patches():
    model, processor = tiny_vlm("gemma3", seed=0)
    model.set_attn_implementation("eager")  # for the reference probabilities only; FoPru recomputes them from q/k
    batch = make(processor, [1], "left", pan_and_scan=True)
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=0.5))
    fam, fopru = wrapped.family, wrapped.stages["fopru"]
    assert fopru.scored_layer == 1  # the feature layer: the last of the 2 (SigLIP's output feeds the pooling)
    with torch.no_grad():
        with fopru.vision_context(fam):
            tokens = fam.encode_images(batch["pixel_values"], batch["input_ids"], num_crops=batch["num_crops"])
            (records,) = [r.clone() for r in fopru._records]
            kept = fopru.compress(tokens)
        probs = fam.vision_tower(batch["pixel_values"], output_attentions=True).attentions[1]  # [6, H, 256, 256]
    received = probs.float().mean(dim=(1, 2))  # mean over heads and queries: [6 tiles, 256 patches]
    expected = received.reshape(6, 4, 4, 4, 4).sum(dim=(2, 4)).reshape(6, 16)
    assert torch.allclose(records, expected, atol=1e-6)
    for image, tiles in enumerate((slice(0, 3), slice(3, 6))):  # rank: the 24 best of each image's 3 tiles
        best = torch.sort(expected[tiles].flatten(), descending=True, stable=True).indices[:24].sort().values
        assert kept[image].index.tolist() == best.tolist()


def test_bidirectional_blocks_span_exactly_the_kept_tokens_of_each_tile():
    """After FoPru (rank over each image's 3 tiles), every decoder layer's mask equals the hand-built Gemma 3 mask of
    the assembled batch: each tile's kept tokens form one block that attends to itself in both directions, nothing
    else looks ahead, and the local layers see 24 slots back."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=0.5))
    fam = wrapped.family
    batch = make(processor, [0, 1], "right", pan_and_scan=True)
    seen, handles = capture_attention_masks(fam)
    try:
        with torch.no_grad():
            wrapped(**batch)
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     **image_kwargs(wrapped, batch))
    finally:
        for h in handles:
            h.remove()
        vlmkit.unwrap(wrapped)
    real, visual = assembled.attention_mask.bool(), assembled.visual_mask
    for b in range(2):
        blocks = blocks_by_hand(visual[b].tolist())
        runs = [len(list(g)) for k, g in itertools.groupby(blocks) if k >= 0]
        kept_tiles = [(assembled.image_id[b] == i) for i in assembled.image_id[b].unique().tolist() if i >= 0]
        assert sum(runs) == sum(int(m.sum()) for m in kept_tiles) == [8, 48][b]
        assert len(runs) == [1, 6][b]  # one block per tile: thumbnail and crops apart
    for layer, window in enumerate((WINDOW, WINDOW, None)):
        ((mask, _),) = seen[layer]
        allowed = as_allowed(mask)
        for b in range(2):
            want = mask_by_hand(real[b].tolist(), visual[b].tolist(), window)
            assert torch.equal(allowed[b, 0][real[b]], want[real[b]]), (layer, b)


# --- pruning inside the decoder ------------------------------------------------------------------------------
def test_decoder_drop_keeps_blocks_and_window_on_the_repacked_sequence():
    """FastV before layer 1 on pan-and-scan tiles taken as images of their own (8 of 16 kept each): layers 1 and 2 get
    the hand-built mask of the re-packed rows (text and kept tokens in order, left-padded): each tile's kept run one
    bidirectional block, layer 1's window counted on the re-packed slots, layer 2 global."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, FastVConfig(keep_ratio=0.5, layer=1))
    fam = wrapped.family
    batch = make(processor, [0, 1], "right", pan_and_scan=True, crops=False)
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 **image_kwargs(wrapped, batch))
    rows = []
    for b in range(2):  # the re-packed row: real slots, each tile's run cut to its first 8 (which 8 does not matter)
        real = assembled.attention_mask[b].bool()
        image = assembled.image_id[b][real].tolist()
        rows.append([v >= 0 for i, v in enumerate(image) if v < 0 or image[:i].count(v) < 8])
    S = max(map(len, rows))
    seen, handles = capture_attention_masks(fam)
    try:
        with torch.no_grad():
            wrapped(**batch)
    finally:
        for h in handles:
            h.remove()
        vlmkit.unwrap(wrapped)
    for layer, window in ((1, WINDOW), (2, None)):
        ((mask, shape),) = seen[layer]
        assert shape[1] == S
        allowed = as_allowed(mask)
        for b, row in enumerate(rows):
            real = [False] * (S - len(row)) + [True] * len(row)
            visual = [False] * (S - len(row)) + row
            want = mask_by_hand(real, visual, window)
            keep = torch.tensor(real)
            assert torch.equal(allowed[b, 0][keep], want[keep]), (layer, b)


def test_decoder_drop_generate_equals_teacher_forcing_through_the_sliding_cache():
    """Sample 1 alone (54 slots, 38 after FastV's drop before layer 1: longer than the 24-slot window, so layer 1's
    sliding cache holds 23 keys): the logits generate produces step by step equal the teacher-forced logits of the
    prompt plus the answer (the decode masks follow that cache)."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, FastVConfig(keep_ratio=0.5, layer=1))
    fam = wrapped.family
    try:
        batch = make(processor, [1], "left")
        S = batch["input_ids"].shape[1]
        out = wrapped.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, suppress_tokens=[fam.placeholder_id])
        new = out.sequences[:, S:]
        assert S - 16 > WINDOW and new.shape[1] == 6
        ids = torch.cat([batch["input_ids"], new], dim=1)
        labels = torch.cat([torch.full_like(batch["input_ids"], -100), new], dim=1)
        forced = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids),
                      token_type_ids=torch.cat([batch["token_type_ids"], torch.zeros_like(new)], dim=1))
        with torch.no_grad():
            logits = wrapped(**forced, labels=labels).logits[0, S - 1:S + 5]
    finally:
        vlmkit.unwrap(wrapped)
    assert torch.allclose(logits, torch.cat(out.logits), atol=1e-4)


# --- positions -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [V2PEConfig(stride=16), MouSiPositionConfig(mode="original")], ids=["v2pe", "mousi"])
def test_neutral_position_schemes_equal_the_models_positions(scheme):
    """V2PE with δ = stride / 16 = 1 and MouSi 'original', with nothing pruned (keep 1.0), on pan-and-scan tiles whose
    runs are separated by text: the positions are the integer ones generate uses, and logits (real slots) and greedy
    tokens equal the unwrapped model's."""
    model, processor = tiny()
    wrapped = vlmkit.wrap(model, RandomPruneConfig(keep_ratio=1.0), scheme)
    try:
        right = make(processor, [0, 1], "right", pan_and_scan=True)
        assembled = wrapped.assemble(right["input_ids"], right["pixel_values"], right["attention_mask"],
                                     **image_kwargs(wrapped, right))
        real = assembled.attention_mask.bool()
        pos = wrapped.stages[1].rope_positions(assembled)
        assert torch.equal(pos[real], integer_positions(assembled.attention_mask)[real].to(pos.dtype))
        with torch.no_grad():
            out = wrapped(**right)
            ref = model(**model_inputs(right))
        assert torch.equal(out.logits[real], ref.logits[real])
        left = make(processor, [0, 1], "left", pan_and_scan=True)
        gen = wrapped.generate(**left, max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, model.generate(**model_inputs(left), max_new_tokens=4, do_sample=False))
    finally:
        vlmkit.unwrap(wrapped)


def test_mousi_original_keeps_unpruned_positions_of_kept_tokens_and_text():
    model, processor = tiny()
    batch = make(processor, [0, 1], "left", pan_and_scan=True)
    wrapped = vlmkit.wrap(model, MouSiPositionConfig(mode="original"))
    full = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                            **image_kwargs(wrapped, batch))
    vlmkit.unwrap(wrapped)
    wrapped = vlmkit.wrap(model, RandomPruneConfig(keep_ratio=0.25), MouSiPositionConfig(mode="original"))
    pruned = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                              **image_kwargs(wrapped, batch))
    pos = wrapped.stages[1].rope_positions(pruned)
    vlmkit.unwrap(wrapped)
    ref = integer_positions(full.attention_mask)
    for b in range(2):
        keyed = {}
        text_ref = []
        for s in torch.nonzero(full.attention_mask[b]).flatten().tolist():
            if full.visual_mask[b, s]:
                keyed[(int(full.image_id[b, s]), int(full.visual_index[b, s]))] = int(ref[b, s])
            else:
                text_ref.append(int(ref[b, s]))
        real = pruned.attention_mask[b].bool()
        vis = pruned.visual_mask[b] & real
        for s in torch.nonzero(vis).flatten().tolist():
            assert pos[b, s] == keyed[(int(pruned.image_id[b, s]), int(pruned.visual_index[b, s]))]
        assert pos[b][real & ~pruned.visual_mask[b]].tolist() == text_ref
