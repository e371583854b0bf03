"""Qwen2-VL and Qwen3-VL (``vlmkit.families.qwen2_vl`` / ``qwen3_vl``) on tiny models of the real classes.

References are independent of the code under test: the unwrapped model's logits, hidden states and greedy
``generate``; the model's own ``get_rope_index`` and the rotary positions its own ``generate`` feeds the decoder;
each sample run alone; kept counts worked out by hand from the image sizes; and for DeepStack the model itself fed
by hand with only the kept tokens and their rows (its own ``mm_encoder_outputs`` path, or its own decoder layers and
``_deepstack_process`` run one by one).

The batch (``vlmkit.compat.make_batch``): sample 0 holds one 32×32 image, sample 1 a 32×56 and a 60×30 image (8 px
per merged token: grids 4×4, 4×7 and 8×4 = 16, 28 and 32 tokens), so a padded batch of 2 has images of different
sizes and several images in one prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import pytest
import torch

import vlmkit
from vlmkit.compat import make_batch
from vlmkit.compress.divprune import DivPruneConfig
from vlmkit.compress.random import RandomPruneConfig
from vlmkit.decoder.fastv import FastVConfig
from vlmkit.families import family_for
from vlmkit.testing import tiny_vlm
from vlmkit.tokens import VisualTokens

FAMILIES = ["qwen2_vl", "qwen3_vl"]
GRIDS = [(4, 4), (4, 7), (8, 4)]  # merged (h, w) of the three images, by hand: ceil to 8 px, / 8
PRUNERS = {"random": lambda r: RandomPruneConfig(keep_ratio=r), "divprune": lambda r: DivPruneConfig(keep_ratio=r)}


@functools.lru_cache(maxsize=None)
def tiny(family: str, **sizes):
    return tiny_vlm(family, seed=0, **sizes)


@contextlib.contextmanager
def wrapped(family, *configs, **sizes):
    model, processor = tiny(family, **sizes)
    w = vlmkit.wrap(model, *configs)
    try:
        yield w, model, processor
    finally:
        vlmkit.unwrap(w)


def batch_of(processor, samples=(0, 1), side="left"):
    return make_batch(processor, list(samples), side)


def image_kwargs(w, batch):
    return {k: batch[k] for k in w.family.image_kwarg_names if k in batch}


def assemble(w, batch):
    return w.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **image_kwargs(w, batch))


def rope_index(model, batch):
    """The model's own (positions [3, B, S], rope_deltas [B, 1]) of the processor's unpruned batch."""
    return model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                      image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])


def generate(model, batch, n=3, **kw):
    return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def test_families_are_registered_and_the_batch_is_what_the_tests_assume():
    for family, cls in (("qwen2_vl", "Qwen2VLFamily"), ("qwen3_vl", "Qwen3VLFamily")):
        model, processor = tiny(family)
        fam = family_for(model)
        assert type(fam).__name__ == cls and fam.model_type == family and fam.rope_kind == "mrope"
        batch = batch_of(processor)
        assert batch["image_grid_thw"].tolist() == [[1, 2 * h, 2 * w] for h, w in GRIDS]
        assert int((batch["input_ids"] == fam.placeholder_id).sum()) == sum(h * w for h, w in GRIDS)
    qwen2, _ = tiny("qwen2_vl")
    assert family_for(qwen2).vision_width == 32 != qwen2.config.vision_config.hidden_size  # embed_dim, not the merger's
    qwen3, _ = tiny("qwen3_vl")
    assert family_for(qwen3).deepstack_layers == 2 and len(family_for(qwen3).decoder_layers) == 3


# --- identity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_bit_exact(family):
    """No stages: logits, loss and hidden states of a right-padded batch and greedy (and beam) generate on a
    left-padded one equal the unwrapped model's bit for bit (Qwen3-VL: with its DeepStack features added by the
    family)."""
    with wrapped(family) as (w, model, processor):
        batch = batch_of(processor, side="right")
        ph = w.family.placeholder_id  # a collator's labels: padding and image slots ignored
        labels = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | (batch["input_ids"] == ph), -100)
        with torch.no_grad():
            ref = model(**batch, labels=labels, output_hidden_states=True)
            out = w(**batch, labels=labels, output_hidden_states=True)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        assert len(out.hidden_states) == len(ref.hidden_states)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
        batch = batch_of(processor, side="left")
        assert torch.equal(generate(w, batch, n=4), generate(model, batch, n=4))
        # beam search repeats each row before the prefill (Qwen3-VL: the DeepStack rows follow the expansion)
        assert torch.equal(generate(w, batch, n=2, num_beams=2), generate(model, batch, n=2, num_beams=2))


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_positions_equal_get_rope_index(family, method):
    """keep_ratio 1: the decoder's position_ids are [cumsum(mask) − 1; get_rope_index] exactly, their rope_deltas are
    the model's, and the logits are the unwrapped model's."""
    with wrapped(family, PRUNERS[method](1.0)) as (w, model, processor):
        batch = batch_of(processor)
        full = assemble(w, batch)
        pos = w.family.language_inputs(full)["position_ids"]
        ref, deltas = rope_index(model, batch)
        mask = batch["attention_mask"]
        assert torch.equal(pos[1:], ref)
        assert torch.equal(pos[0], ((mask.cumsum(-1) - 1) * mask))
        ours = torch.stack([pos[1:, b][:, mask[b].bool()].max() + 1 - mask[b].sum() for b in range(2)])[:, None]
        assert torch.equal(ours, deltas)
        with torch.no_grad():
            assert torch.equal(w(**batch).logits, model(**batch).logits)


# --- pre-LLM pruning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_counts_lengths_and_positions(family, method):
    """keep_ratio 0.25: images keep floor(G/4) = 4, 7, 8 tokens; the decoder runs on the shorter assembled batch;
    every kept token has the (t, h, w) of its cell in the model's own unpruned positions, and every text token its
    unpruned position (the text after an image resumes where it did)."""
    from _stages import LayerProbeConfig

    with wrapped(family, PRUNERS[method](0.25), LayerProbeConfig()) as (w, model, processor):
        batch = batch_of(processor)
        pruned = assemble(w, batch)
        kept = [[int(((pruned.image_id[b] == k) & pruned.visual_mask[b]).sum()) for k in range(3)] for b in range(2)]
        assert [sum(row) for row in kept] == [4, 7 + 8] and kept[0][0] == 4 and (kept[1][1], kept[1][2]) == (7, 8)
        assert [t.num_tokens for t in pruned.tokens] == [4, 7, 8]
        real = pruned.attention_mask.sum(-1).tolist()
        S = batch["input_ids"].shape[1]
        assert real == [(batch["attention_mask"][b].sum() - d).item() for b, d in ((0, 16 - 4), (1, 60 - 15))]
        probe = w.stages["test_layer_probe"]
        with torch.no_grad():
            w(**batch)
        assert probe.calls == [[pruned.attention_mask.shape[1]] * len(w.family.decoder_layers)]
        assert pruned.attention_mask.shape[1] == max(real) < S

        pos = w.family.language_inputs(pruned)["position_ids"][1:]
    ref, _ = rope_index(model, batch)
    with wrapped(family) as (identity, _, _):
        full = assemble(identity, batch)  # the unpruned slots: which image / cell each one holds
    for b in range(2):
        real_full = full.attention_mask[b].bool()
        cell = {(int(full.image_id[b, s]), int(full.visual_index[b, s])): ref[:, b, s]
                for s in torch.nonzero(real_full & full.visual_mask[b]).flatten().tolist()}
        real_p = pruned.attention_mask[b].bool()
        for s in torch.nonzero(real_p & pruned.visual_mask[b]).flatten().tolist():
            assert torch.equal(pos[:, b, s], cell[(int(pruned.image_id[b, s]), int(pruned.visual_index[b, s]))])
        text_new = pos[:, b][:, real_p & ~pruned.visual_mask[b]]
        text_old = ref[:, b][:, real_full & ~full.visual_mask[b]]
        assert torch.equal(text_new, text_old)


def _configs():
    return {"random": RandomPruneConfig(keep_ratio=0.25), "divprune": DivPruneConfig(keep_ratio=0.25),
            "fastv": FastVConfig(keep_ratio=0.5, layer=1)}


@pytest.mark.parametrize("method", ["random", "divprune", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(family, method):
    """Greedy generate on the left-padded batch gives each sample the tokens it gets alone; forward logits on the
    right-padded batch equal each sample's alone."""
    with wrapped(family, _configs()[method]) as (w, model, processor):
        batch = batch_of(processor)
        S = batch["input_ids"].shape[1]
        gen = generate(w, batch, n=4)
        right = batch_of(processor, side="right")
        with torch.no_grad():
            logits = w(**right).logits
        for b in range(2):
            alone = batch_of(processor, samples=(b,))
            one = generate(w, alone, n=4)
            assert torch.equal(gen[b, S:], one[0, alone["input_ids"].shape[1]:])
            with torch.no_grad():
                single = w(**batch_of(processor, samples=(b,), side="right")).logits
            n = single.shape[1]
            # the right-padded batch may be assembled longer than the sample alone: compare its real positions
            real = w.assemble(right["input_ids"], right["pixel_values"], right["attention_mask"],
                              **image_kwargs(w, right)).attention_mask[b].bool()
            assert torch.allclose(logits[b][real][:n], single[0], atol=1e-5, rtol=1e-5)


# --- decoder-side pruning ------------------------------------------------------------------------------------
def _attention_inputs(family_obj, layer):
    """Record what decoder layer ``layer``'s attention gets (after every stage's pre-hooks): (position_ids row 0,
    cos) per call."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs.get("position_ids"), kwargs["position_embeddings"][0]))

    return seen, family_obj.decoder_attention(layer).register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_counts_and_the_positions_of_kept_tokens(family):
    """FastV (layer 1, keep 50 %): from layer 1 on each row holds its text plus floor(G/2) tokens of each image, and
    the rotary cos of every kept slot is the one its original slot had in layer 0 (M-RoPE positions kept)."""
    from _stages import LayerProbeConfig

    with wrapped(family, FastVConfig(keep_ratio=0.5, layer=1), LayerProbeConfig()) as (w, model, processor):
        batch = batch_of(processor)
        full = assemble(w, batch)
        kept = [int(full.attention_mask[b].sum() - full.visual_mask[b].sum()) for b in range(2)]
        kept = [kept[0] + 16 // 2, kept[1] + 28 // 2 + 32 // 2]
        seen0, h0 = _attention_inputs(w.family, 0)
        seen1, h1 = _attention_inputs(w.family, 1)
        try:
            with torch.no_grad():
                w(**batch)
        finally:
            h0.remove()
            h1.remove()
        S = full.attention_mask.shape[1]
        probe = w.stages["test_layer_probe"]
        assert probe.calls == [[S] + [max(kept)] * (len(w.family.decoder_layers) - 1)]
        (pos0, cos0), (pos1, cos1) = seen0[0], seen1[0]
        assert pos0.shape == (2, S) and pos1.shape == (2, max(kept))
        for b in range(2):
            real = full.attention_mask[b].bool()
            slot_of = {int(p): s for s, p in zip(torch.nonzero(real).flatten().tolist(), pos0[b][real].tolist())}
            slots = [slot_of[int(p)] for p in pos1[b, max(kept) - kept[b]:]]  # re-packed left: real slots at the end
            assert len(set(slots)) == kept[b] == len(slots)
            assert torch.equal(cos1[b, max(kept) - kept[b]:], cos0[b, slots])
            vis = full.visual_mask[b, slots]
            assert int(vis.sum()) == kept[b] - int((real & ~full.visual_mask[b]).sum())


@pytest.mark.parametrize("config", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_positions_and_teacher_forcing(family, config):
    """Through ``generate``: (a) the M-RoPE positions of every decode step equal those the *unwrapped* model's own
    ``generate`` uses (its rope_deltas rule on the unpruned prompt), so pruning never shifts the continuation;
    (b) teacher-forced forward logits of prompt + answer equal generate's step logits."""
    cfg = {"random": RandomPruneConfig(keep_ratio=0.5), "fastv": FastVConfig(keep_ratio=0.5, layer=1)}[config]
    with wrapped(family, cfg) as (w, model, processor):
        batch = batch_of(processor)
        rotary = w.family.rotary_embedding
        no_image = {"suppress_tokens": [w.family.placeholder_id]}  # a generated <|image_pad|> would be an image slot
        steps = []
        handle = rotary.register_forward_pre_hook(
            lambda module, args: steps.append(args[1].clone()) if args[1].shape[-1] == 1 else None)
        try:
            generate(model, batch, n=3, **no_image)
            ref_steps, steps[:] = list(steps), []
            gen = generate(w, batch, n=3, output_logits=True, return_dict_in_generate=True, **no_image)
        finally:
            handle.remove()
        assert len(ref_steps) == len(steps) == 2
        assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps))
        S = batch["input_ids"].shape[1]
        new = gen.sequences[:, S:]
        full_ids = torch.cat([batch["input_ids"], new], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
        labels = torch.cat([torch.full_like(batch["input_ids"], -100), new], dim=1)
        with torch.no_grad():
            out = w(input_ids=full_ids, attention_mask=mask, labels=labels, pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"])
        L = out.logits.shape[1]
        for step, logits in enumerate(gen.logits):
            assert torch.allclose(out.logits[:, L - 4 + step], logits, atol=1e-5, rtol=1e-5), step


# --- Qwen3-VL DeepStack --------------------------------------------------------------------------------------
def test_deepstack_rows_follow_select():
    from vlmkit.families.qwen3_vl import DeepstackTokens

    base = VisualTokens.full(torch.arange(12.0).reshape(6, 2), (2, 3))
    rows = torch.arange(2 * 6 * 4.0).reshape(2, 6, 4)
    t = DeepstackTokens(**{f.name: getattr(base, f.name) for f in dataclasses.fields(VisualTokens)}, deepstack=rows)
    kept = t.select(torch.tensor([1, 4, 5]))
    assert isinstance(kept, DeepstackTokens) and kept.index.tolist() == [1, 4, 5]
    assert torch.equal(kept.deepstack, rows[:, [1, 4, 5]]) and torch.equal(kept.embeds, base.embeds[[1, 4, 5]])
    again = dataclasses.replace(kept, scores=torch.zeros(6)).keep_with_newlines(torch.tensor([2, 0]))
    assert again.index.tolist() == [1, 5] and torch.equal(again.deepstack, rows[:, [1, 5]])
    with pytest.raises(ValueError, match=r"deepstack must be \[n, K=6, D\]"):
        DeepstackTokens(embeds=base.embeds, index=base.index, grid=(2, 3), deepstack=rows[:, :5])


def _image_outputs(model, batch):
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])


def test_deepstack_follows_prellm_pruning():
    """Random pruning (keep 25 %): the wrapped logits equal the model's own forward fed by hand with only the kept
    placeholders, their embeddings and *their* DeepStack rows (from the model's own tower run on the whole images,
    through ``mm_encoder_outputs``) and the unpruned ``get_rope_index`` positions of the kept slots. Feeding the rows
    of the first kept-count tokens instead (DeepStack not following the selection) changes the logits."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    with wrapped("qwen3_vl", RandomPruneConfig(keep_ratio=0.25)) as (w, model, processor):
        batch = batch_of(processor)
        pruned = assemble(w, batch)
        with torch.no_grad():
            ours = w(**batch).logits
        feats = _image_outputs(model, batch)
        keep = [t.index for t in pruned.tokens]
        assert [k.numel() for k in keep] == [4, 7, 8]

        # positions: the model's own, of the unpruned batch, at the slots that survive (text and kept tokens)
        ref, _ = rope_index(model, batch)
        mask, ids, ph = batch["attention_mask"].bool(), batch["input_ids"], model.config.image_token_id
        survive = mask.clone()
        image_of = torch.cumsum((ids == ph).flatten().long(), 0).reshape(ids.shape) - 1  # placeholder number
        start = 0
        for (h, wd), k in zip(GRIDS, keep):  # image i's placeholders are numbers start .. start + h·w − 1
            run = (ids == ph) & (image_of >= start) & (image_of < start + h * wd)
            survive &= ~run | torch.isin(image_of - start, k)
            start += h * wd
        rows = [torch.nonzero(survive[b]).flatten() for b in range(2)]
        L = max(r.numel() for r in rows)
        position_ids = torch.zeros(4, 2, L, dtype=torch.long)
        new_ids = torch.full((2, L), processor.tokenizer.pad_token_id)
        new_mask = torch.zeros(2, L, dtype=torch.long)
        for b, r in enumerate(rows):  # left padded, as the wrapper re-pads
            position_ids[1:, b, L - r.numel():] = ref[:, b, r]
            position_ids[0, b, L - r.numel():] = torch.arange(r.numel())
            new_ids[b, L - r.numel():] = ids[b, r]
            new_mask[b, L - r.numel():] = 1
        assert torch.equal(new_ids, pruned.input_ids) and torch.equal(new_mask, pruned.attention_mask)

        def hand_fed(rows_of):
            outputs = BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(f[k] for f, k in zip(feats.pooler_output, keep)),
                deepstack_features=[tuple(f[r] for f, r in zip(layer, rows_of)) for layer in feats.deepstack_features])
            with torch.no_grad():
                return model(input_ids=new_ids, attention_mask=new_mask, position_ids=position_ids,
                             mm_encoder_outputs={"image": outputs}).logits

        assert torch.equal(ours, hand_fed(keep))
        first = [torch.arange(k.numel()) for k in keep]
        assert not torch.allclose(ours, hand_fed(first), atol=1e-3)


def test_deepstack_follows_decoder_pruning():
    """FastV before layer 1 of a 4-layer Qwen3-VL decoder whose DeepStack adds features after layers 0, 1 and 2: two
    of the three additions happen on the re-packed sequence. Reference, by hand with the model's own modules: layer
    0 and DeepStack 0 on the whole sequence, then only the kept slots (recorded from the wrapped run) with their
    rotary cos/sin through layers 1-3, DeepStack 1 and 2 added (``_deepstack_process``) to the kept visual tokens with
    *their* rows, then the final norm and LM head. Leaving DeepStack 1-2 out of the reference changes the logits."""
    with wrapped("qwen3_vl", FastVConfig(keep_ratio=0.5, layer=1), layers=4, deepstack=(0, 1, 2)) as (w, model, processor):
        batch = batch_of(processor, samples=(1,))  # one row, no padding: text position = slot
        seen, handle = _attention_inputs(w.family, 1)
        try:
            with torch.no_grad():
                ours = w(**batch).logits
        finally:
            handle.remove()
        kept = seen[0][0][0]  # the slots layer 1 runs on
        S = batch["input_ids"].shape[1]
        lm = model.model.language_model
        vis = batch["input_ids"] == model.config.image_token_id
        assert kept.numel() == S - int(vis.sum()) + 28 // 2 + 32 // 2
        feats = [torch.cat(layer) for layer in _image_outputs(model, batch).deepstack_features]
        assert len(feats) == 3
        ref_pos, _ = rope_index(model, batch)

        def causal(n):  # additive float mask [1, 1, n, n], what eager and SDPA both take
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

        def reference(deepstack_after_drop: bool):
            with torch.no_grad():
                h = model.get_input_embeddings()(batch["input_ids"])
                h = h.masked_scatter(vis[..., None], torch.cat(_image_outputs(model, batch).pooler_output))
                cos, sin = lm.rotary_emb(h, ref_pos)
                text = torch.arange(S)[None]
                h = lm.layers[0](h, attention_mask=causal(S), position_embeddings=(cos, sin), position_ids=text)
                h = lm._deepstack_process(h, vis, feats[0])
                h, cos, sin, text, vk = h[:, kept], cos[:, kept], sin[:, kept], text[:, kept], vis[:, kept]
                rows = torch.cumsum(vis[0].long(), 0)[kept] - 1  # feature row of each kept visual slot
                for i in (1, 2, 3):
                    h = lm.layers[i](h, attention_mask=causal(h.shape[1]), position_embeddings=(cos, sin),
                                     position_ids=text)
                    if i < 3 and deepstack_after_drop:
                        h = lm._deepstack_process(h, vk, feats[i][rows[vk[0]]])
                return model.lm_head(lm.norm(h))[:, -1]

        assert torch.allclose(ours[:, -1], reference(True), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours[:, -1], reference(False), atol=1e-3)


def test_deepstack_refusals():
    """Tokens that lost their DeepStack rows (a stage building new VisualTokens) and DeepStack into the decoder's last
    layer fail with errors that say so."""
    with wrapped("qwen3_vl") as (w, model, processor):
        batch = assemble(w, batch_of(processor))
        plain = [VisualTokens(**{f.name: getattr(t, f.name) for f in dataclasses.fields(VisualTokens)})
                 for t in batch.tokens]
        with pytest.raises(ValueError, match="image 0 reaches the decoder without its 2 DeepStack features"):
            with w.family.language_context(dataclasses.replace(batch, tokens=plain)):
                pass
    with wrapped("qwen3_vl", layers=2) as (w, model, processor):
        with pytest.raises(ValueError, match=r"DeepStack features after 2 decoder layers, but its decoder has 2"):
            w(**batch_of(processor))
