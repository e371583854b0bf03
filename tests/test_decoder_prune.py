"""In-decoder pruning (``vlmkit.decoder``: FastV, VTW, PyramidDrop) on tiny models of the real classes.

References are independent of the code under test: hand-worked selections, the unwrapped model's own outputs,
the eager model's ``output_attentions``, ``generate``'s own step logits and each sample run alone. The tiny
decoders have 2 layers, so the drop is before layer K=1 (scores from layer 0); PyramidDrop's three drops run on
4-layer copies (K = 1, 2, 3).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from _stages import LayerProbeConfig
from conftest import make_batch, shared_tiny

import vlmkit
from vlmkit import compat
from vlmkit.decoder.dart import DARTConfig
from vlmkit.decoder.fastv import FastVConfig, fastv_select
from vlmkit.decoder.pdrop import PDropConfig
from vlmkit.decoder.prune import average_visual_tokens
from vlmkit.decoder.vtw import VTWConfig
from vlmkit.families import family_for

FAMILIES = ["llava", "internvl", "qwen2_5_vl"]
QUESTIONS = ["what shape is it ?", "how many red circle are there in the image"]
METHODS = {"fastv": lambda: FastVConfig(keep_ratio=0.5, layer=1), "vtw": lambda: VTWConfig(),
           "dart": lambda: DARTConfig(keep_ratio=0.5, layer=1)}
K = 1


@contextlib.contextmanager
def wrapped_model(family, *configs, attn=None):
    model, processor = shared_tiny(family)
    old = model.config._attn_implementation
    if attn is not None:
        model.set_attn_implementation(attn)
    wrapped = vlmkit.wrap(model, *configs)
    try:
        yield wrapped, model, processor
    finally:
        vlmkit.unwrap(wrapped)
        model.set_attn_implementation(old)


def _generate(model, batch, n=3, **kw):
    return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _expected_kept(wrapped, batch, method: str) -> list[int]:
    """Real tokens each row keeps after the drop: text + per image floor(G/2) (FastV, DART) or nothing (VTW)."""
    image_kwargs = {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **image_kwargs)
    out = []
    for b in range(assembled.attention_mask.shape[0]):
        real = assembled.attention_mask[b].bool()
        n = int(real.sum()) - int((assembled.visual_mask[b] & real).sum())
        if method in ("fastv", "dart"):
            for key in assembled.image_id[b][assembled.visual_mask[b]].unique().tolist():
                n += max(1, int((assembled.image_id[b] == key).sum()) // 2)
        out.append(n)
    return out


# --- selection and budgets by hand -------------------------------------------------------------------------
def test_fastv_select_by_hand():
    assert fastv_select(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2).tolist() == [1, 2]
    assert fastv_select(torch.tensor([0.3, 0.3, 0.3]), 2).tolist() == [0, 1]  # ties: lower index
    assert fastv_select(torch.tensor([1.0, 3.0, 2.0, 3.0]), 1).tolist() == [1]
    assert fastv_select(torch.tensor([0.4, 0.1, 0.9, 0.2, 0.9]), 3).tolist() == [0, 2, 4]  # sorted indices
    assert fastv_select(torch.tensor([0.4, 0.1]), 0).tolist() == []
    with pytest.raises(ValueError):
        fastv_select(torch.tensor([0.4, 0.1]), 3)


def test_budgets_and_average_visual_tokens():
    c = FastVConfig()  # K=2, R=50%
    assert c.drop_schedule(32, 576) == [(2, 288)]
    assert average_visual_tokens(c, 32, 576) == (2 * 576 + 30 * 288) / 32
    assert FastVConfig(keep_ratio=0.29, layer=3).drop_schedule(32, 100) == [(3, 29)]
    assert FastVConfig(keep_ratio=None, num_keep=64).drop_schedule(32, 16) == [(2, 16)]  # clamped to the image
    v = VTWConfig()
    assert v.drop_schedule(32, 576) == [(15, 0)] and average_visual_tokens(v, 32, 576) == 15 * 576 / 32
    assert [VTWConfig().drop_layer(n) for n in (2, 28, 40)] == [1, 13, 19]
    assert VTWConfig(layer=20).drop_schedule(32, 576) == [(20, 0)]
    with pytest.raises(ValueError):
        FastVConfig(layer=0)
    with pytest.raises(ValueError):
        FastVConfig(layer=2).drop_schedule(2, 10)  # no layer 2 in a 2-layer decoder
    model, _ = shared_tiny("llava")
    with pytest.raises(ValueError):
        vlmkit.wrap(model, FastVConfig(layer=2))


# --- identity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [FastVConfig, DARTConfig])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_the_unwrapped_model(family, config):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1])
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits, _generate(model, batch)
    with wrapped_model(family, config(keep_ratio=1.0, layer=K)) as (wrapped, _, _):
        with torch.no_grad():
            assert torch.equal(wrapped(**batch).logits, ref_logits)
        assert torch.equal(_generate(wrapped, batch), ref_tokens)


#: the setting of each other decoder pruner that removes nothing, for a decoder of L layers
NOTHING_PRUNED = {"pdrop": lambda L: PDropConfig(keep_ratio=1.0, layers=(0.5,)),
                  "vtw": lambda L: VTWConfig(layer=L)}  # withdrawn "before layer L": after the last one


@pytest.mark.parametrize("method", sorted(NOTHING_PRUNED))
@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_is_the_unwrapped_model(family, method):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1])
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits, _generate(model, batch)
    L = len(family_for(model).decoder_layers)
    with wrapped_model(family, NOTHING_PRUNED[method](L)) as (wrapped, _, _):
        with torch.no_grad():
            assert torch.equal(wrapped(**batch).logits, ref_logits)
        assert torch.equal(_generate(wrapped, batch), ref_tokens)


def test_vtw_neutral_layer():
    assert VTWConfig(layer=32).drop_schedule(32, 576) == []
    assert average_visual_tokens(VTWConfig(layer=32), 32, 576) == 576
    assert VTWConfig(layer=31).drop_schedule(32, 576) == [(31, 0)]
    with pytest.raises(ValueError, match="layer=33"):
        VTWConfig(layer=33).drop_schedule(32, 576)
    model, _ = shared_tiny("llava")  # 2 decoder layers
    with pytest.raises(ValueError, match="layer=3"):
        vlmkit.wrap(model, VTWConfig(layer=3))


# --- lengths the layers see and the cache holds -----------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_lengths_and_cache(family, method):
    with wrapped_model(family, METHODS[method](), LayerProbeConfig()) as (wrapped, _, processor):
        batch = make_batch(processor, QUESTIONS, [1, 1])
        probe = wrapped.stages["test_layer_probe"]
        S = batch["input_ids"].shape[1]  # no compressor: the assembled length
        kept = _expected_kept(wrapped, batch, method)
        S_kept = max(kept)
        assert S_kept < S
        masks = []  # key length of the mask layer K's attention gets at every decode step

        def record(module, args, kwargs):
            if kwargs["hidden_states"].shape[1] == 1:
                masks.append(kwargs["attention_mask"].shape[-1])

        hook = wrapped.family.decoder_attention(K).register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                out = wrapped(**batch)
                assert out.logits.shape[1] == S  # scattered back to the assembled length
                assert probe.calls == [[S, S_kept]]
                probe.calls.clear()
                gen = _generate(wrapped, batch, n=4, return_dict_in_generate=True)
        finally:
            hook.remove()
        assert probe.calls == [[S, S_kept]] + [[1, 1]] * 3
        lengths = [layer.keys.shape[-2] for layer in gen.past_key_values.layers]
        assert lengths == [S + 3, S_kept + 3]  # layer < K: the full prompt; layer ≥ K: the pruned one
        assert masks == [S_kept + t for t in (1, 2, 3)]  # each step attends over its own (shorter) cache


# --- teacher forcing equals the cached generate path -------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_logits_equal_generate(family, method):
    with wrapped_model(family, METHODS[method]()) as (wrapped, _, processor):
        batch = make_batch(processor, QUESTIONS[1:], [1])
        S = batch["input_ids"].shape[1]
        gen = _generate(wrapped, batch, n=4, return_dict_in_generate=True, output_logits=True)
        answer = gen.sequences[:, S:S + 3]
        full = dict(batch)
        full["input_ids"] = torch.cat([batch["input_ids"], answer], dim=1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        full.pop("mm_token_type_ids", None)
        labels = torch.full_like(full["input_ids"], -100)
        labels[:, S:] = answer
        with torch.no_grad():
            out = wrapped(**full, labels=labels)
        step = torch.stack(gen.logits, dim=1)  # [1, 4, V]
        torch.testing.assert_close(out.logits[:, S - 1:], step, atol=1e-4, rtol=1e-4)
        # the loss is over the text labels, from the logits of the kept sequence scattered back
        ce = torch.nn.functional.cross_entropy(out.logits[0, S - 1:-1], answer[0])
        torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=1e-5)


# --- batches, attention kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_sample_alone(family, method):
    with wrapped_model(family, METHODS[method]()) as (wrapped, _, processor):
        # compat.SAMPLES: sample 0 holds one image, sample 1 two images of other sizes
        batch = compat.make_batch(processor, [0, 1], "left")
        S = batch["input_ids"].shape[1]
        assert len(set(_expected_kept(wrapped, batch, method))) > 1
        gen = _generate(wrapped, batch)
        for k in range(2):
            alone = compat.make_batch(processor, [k], "left")
            one = _generate(wrapped, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen[k, S:], one), f"sample {k}"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa(family, method):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1])
    results = {}
    for attn in ("eager", "sdpa"):
        with wrapped_model(family, METHODS[method](), attn=attn) as (wrapped, _, _):
            with torch.no_grad():
                results[attn] = (wrapped(**batch).logits, _generate(wrapped, batch))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(results["eager"][0][real], results["sdpa"][0][real], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][1], results["sdpa"][1])


# --- FastV's scores against the eager model's attentions -----------------------------------------------------
def _eager_last_row_attention(family, batch, layer):
    """The eager model's head-mean attention row of the last slot (left padding: the last prompt token) at decoder
    layer ``layer`` [B, S], and the assembled batch."""
    with wrapped_model(family, attn="eager") as (plain, _, _):
        with torch.no_grad():
            attn = plain(**batch, output_attentions=True).attentions[layer]  # [B, H, S, S]
        image_kwargs = {k: batch[k] for k in plain.family.image_kwarg_names if k in batch}
        assembled = plain.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **image_kwargs)
    return attn[:, :, -1].mean(dim=1), assembled


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_scores_equal_eager_output_attentions(family):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1], padding_side="left")
    expected, assembled = _eager_last_row_attention(family, batch, K - 1)
    with wrapped_model(family, FastVConfig(keep_ratio=0.5, layer=K)) as (wrapped, _, _):  # the model's sdpa
        stage = wrapped.stages["fastv"]
        seen, chosen = [], []
        scores, select = stage.scores, stage.select
        stage.scores = lambda *a, **kw: seen.append(scores(*a, **kw)) or seen[-1]
        stage.select = lambda s, k: chosen.append((s, k, select(s, k))) or chosen[-1][2]
        with torch.no_grad():
            wrapped(**batch)
    (got,) = seen
    visual = assembled.visual_mask
    torch.testing.assert_close(got[visual], expected[visual].float(), atol=1e-5, rtol=1e-4)
    # every image kept the top floor(G/2) of the reference row (ties to the lower index)
    images = [(b, key) for b in range(visual.shape[0]) for key in assembled.image_id[b][visual[b]].unique().tolist()]
    assert len(chosen) == len(images)
    for (b, key), (_, k, picked) in zip(images, chosen):
        cols = torch.nonzero(assembled.image_id[b] == key).flatten()
        assert k == max(1, cols.numel() // 2)
        assert picked.tolist() == fastv_select(expected[b, cols], k).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_pdrop_scores_equal_eager_output_attentions_of_the_drop_layer(family):
    """PDrop scores a drop before layer K with layer K's own attention (not K−1's, as FastV does)."""
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1], padding_side="left")
    config = PDropConfig(keep_ratio=0.5, layers=(0.5,))  # 2 decoder layers: one drop, before layer 1
    assert config.drop_schedule(2, 16)[0][0] == K
    expected, assembled = _eager_last_row_attention(family, batch, K)
    with wrapped_model(family, config) as (wrapped, _, _):  # the model's sdpa
        stage = wrapped.stages["pdrop"]
        seen, chosen = [], []
        scores, select = stage.scores, stage.select
        stage.scores = lambda *a, **kw: seen.append(scores(*a, **kw)) or seen[-1]
        stage.select = lambda s, k: chosen.append((k, select(s, k))) or chosen[-1][1]
        with torch.no_grad():
            wrapped(**batch)
    (got,) = seen
    visual = assembled.visual_mask
    torch.testing.assert_close(got[visual], expected[visual].float(), atol=1e-5, rtol=1e-4)
    images = [(b, key) for b in range(visual.shape[0]) for key in assembled.image_id[b][visual[b]].unique().tolist()]
    for (b, key), (k, picked) in zip(images, chosen, strict=True):
        cols = torch.nonzero(assembled.image_id[b] == key).flatten()
        assert picked.tolist() == fastv_select(expected[b, cols], k).tolist()  # top-k, ties to the lower index


# --- PyramidDrop: several drops, on a 4-layer decoder ------------------------------------------------------
@functools.lru_cache(maxsize=None)
def deep_tiny(family: str, num_layers: int = 4):
    """The tiny model of ``family`` with a ``num_layers``-layer decoder (random weights, seed 0)."""
    model, processor = shared_tiny(family)
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    text.num_hidden_layers = num_layers
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[0]] * num_layers
    torch.manual_seed(0)
    return type(model)(config).eval(), processor


def test_pdrop_schedule():
    c = PDropConfig()
    assert c.drop_schedule(32, 576) == [(8, 288), (16, 144), (24, 72)]
    assert average_visual_tokens(c, 32, 576) == (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32
    assert c.drop_schedule(4, 16) == [(1, 8), (2, 4), (3, 2)]
    with pytest.raises(ValueError):
        c.drop_schedule(2, 16)  # 2 layers cannot hold three drops


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_pdrop_stages(family):
    model, processor = deep_tiny(family)
    wrapped = vlmkit.wrap(model, PDropConfig(), LayerProbeConfig())
    try:
        probe = wrapped.stages["test_layer_probe"]
        batch = compat.make_batch(processor, [0, 1], "left")
        S = batch["input_ids"].shape[1]
        image_kwargs = {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **image_kwargs)
        lengths = []
        for s in range(4):  # real tokens each row keeps in segment s: text + per image max(1, floor(G / 2^s))
            rows = []
            for b in range(2):
                vis = assembled.visual_mask[b]
                n = int(assembled.attention_mask[b].sum()) - int(vis.sum())
                for key in assembled.image_id[b][vis].unique().tolist():
                    g = int((assembled.image_id[b] == key).sum())
                    n += g if s == 0 else max(1, g // 2 ** s)
                rows.append(n)
            lengths.append(S if s == 0 else max(rows))
        gen = _generate(wrapped, batch, n=3, return_dict_in_generate=True)
        assert probe.calls == [lengths, [1] * 4, [1] * 4]
        assert [layer.keys.shape[-2] for layer in gen.past_key_values.layers] == [n + 2 for n in lengths]
        for k in range(2):  # each sample alone
            alone = compat.make_batch(processor, [k], "left")
            one = _generate(wrapped, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen.sequences[k, S:], one), f"sample {k}"
        # teacher forcing equals the cached generate path
        alone = compat.make_batch(processor, [1], "left")
        S1 = alone["input_ids"].shape[1]
        steps = _generate(wrapped, alone, n=4, return_dict_in_generate=True, output_logits=True)
        answer = steps.sequences[:, S1:S1 + 3]
        full = {k: v for k, v in alone.items() if k != "mm_token_type_ids"}
        full["input_ids"] = torch.cat([alone["input_ids"], answer], dim=1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        labels = torch.full_like(full["input_ids"], -100)
        labels[:, S1:] = answer
        with torch.no_grad():
            out = wrapped(**full, labels=labels)
        torch.testing.assert_close(out.logits[:, S1 - 1:], torch.stack(steps.logits, dim=1), atol=1e-4, rtol=1e-4)
    finally:
        vlmkit.unwrap(wrapped)
