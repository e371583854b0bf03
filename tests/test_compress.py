"""Visual-token pruning: FoPru (rank/row), random and DivPrune baselines, pruning maps.

References are independent of the code under test: hand-computed selections, the eager tower's own
``output_attentions``, HF's ``pixel_shuffle`` for the InternVL patch→token map, the unwrapped model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_batch, shared_tiny

import vlmkit
from vlmkit.compress.divprune import divprune_select
from vlmkit.compress.fopru import fopru_select
from vlmkit.families.registry import family_for
from vlmkit.testing import image_prompt, random_images, tiny_vlm

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?"]
TOKENS_PER_TILE = 16  # both tiny models: 4×4 visual tokens per tile


@pytest.fixture
def tiny(family):
    """The tiny model of ``family``, built once (no test here changes its weights)."""
    return shared_tiny(family)


def _pruners(**budget):
    """Every registered pruner (FoPru once per strategy: the compatibility matrix's variants) with ``budget``;
    a pruner registered by a test module pytest has imported (``_pruner_example``) is among them."""
    import dataclasses

    from vlmkit.config import registered_configs

    budget = {"keep_ratio": None, "num_keep": None, **budget}
    configs = [dataclasses.replace(v, **budget) for c in registered_configs(role="compressor", pruner=True)
               for v in c.variants().values()]
    assert {"fopru", "random", "divprune"} <= {c.type for c in configs}
    return configs


# --- fopru_select: hand-computed selections ---------------------------------------------------------
def test_rank_equals_topk_of_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 24, generator=g)
    keep = fopru_select(scores, (4, 6), 7, "rank")
    assert keep.shape == (3, 7) and keep.dtype == torch.long
    for b in range(3):
        assert set(keep[b].tolist()) == set(torch.topk(scores[b], 7).indices.tolist())
        assert bool((keep[b, 1:] > keep[b, :-1]).all())


def test_row_by_hand():
    # 3 rows of 4; row means 1.0, 3.0, 2.0 -> order: row 1, row 2, row 0
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.5, 3.5, 3.0, 2.0, 4.0, 0.0, 2.0]])
    assert fopru_select(scores, (3, 4), 4, "row").tolist() == [[4, 5, 6, 7]]
    # 6 = one whole row (row 1) + the 2 best tokens of the next-best row (row 2: cols 1 and 0 (tie with 3 -> lower))
    assert fopru_select(scores, (3, 4), 6, "row").tolist() == [[4, 5, 6, 7, 8, 9]]
    # fewer than a row: the best tokens of the best row
    assert fopru_select(scores, (3, 4), 2, "row").tolist() == [[4, 6]]
    assert fopru_select(scores, (3, 4), 12, "row").tolist() == [list(range(12))]
    # rank on the same scores: 4.0 (9), 3.5 (6), then 3.0 at 4 and 7 -> lower index first
    assert fopru_select(scores, (3, 4), 3, "rank").tolist() == [[4, 6, 9]]


def test_row_keeps_whole_best_rows():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 36, generator=g)
    keep = fopru_select(scores, (6, 6), 12, "row")
    for b in range(4):
        grid = scores[b].view(6, 6).numpy()
        best_rows = sorted(np.argsort(-grid.mean(axis=1), kind="stable")[:2].tolist())
        expected = [r * 6 + c for r in best_rows for c in range(6)]
        assert keep[b].tolist() == expected


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fopru_select(torch.rand(1, 16), (4, 4), 17, "rank")
    with pytest.raises(ValueError):
        fopru_select(torch.rand(1, 16), (4, 4), 0, "row")
    with pytest.raises(ValueError):
        fopru_select(torch.rand(1, 16), (3, 4), 4, "rank")
    with pytest.raises(ValueError):
        fopru_select(torch.rand(1, 16), (4, 4), 4, "column")


# --- budgets through wrap() -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget,expected", [({"keep_ratio": 0.25}, 4), ({"keep_ratio": 0.3}, 4), ({"keep_ratio": 0.01}, 1),
                        ({"num_keep": 5}, 5), ({"num_keep": 16}, 16)],
)
def test_exact_kept_counts_and_increasing_indices(tiny, budget, expected):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    family = family_for(model)
    runnable = [c for c in _pruners(**budget) if set(c.requires) <= family.capabilities]
    refused = {c.type for c in _pruners(**budget)} - {c.type for c in runnable}
    assert refused <= {"downsample"}, f"{family.model_type} refuses {refused}"  # downsample: LLaVA's tower only
    for config in runnable:
        tokens = vlmkit.wrap(model, config).encode_visual(batch["pixel_values"], batch["input_ids"])
        assert len(tokens) == 3
        for t in tokens:
            assert t.num_tokens == expected, config
            assert t.num_uncompressed == TOKENS_PER_TILE
            assert bool((t.index[1:] > t.index[:-1]).all()) and int(t.index.max()) < TOKENS_PER_TILE


def test_multi_tile_images_budget_and_rows():
    """InternVL tiles: the budget is per image over all tiles; ``row`` keeps whole rows of tiles."""
    model, processor = tiny_vlm("internvl")
    processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 4
    images = random_images(2, size=64)
    batch = processor(images=[[images[0]], [images[1]]], text=[image_prompt(processor, q) for q in QUESTIONS[:2]],
                      return_tensors="pt", padding=True)
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.25, strategy="row"))
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    for t in tokens:
        n = t.num_uncompressed
        assert n > TOKENS_PER_TILE and n % TOKENS_PER_TILE == 0
        assert t.num_tokens == n // 4
        rows = t.index // 4
        assert all(int((rows == r).sum()) == 4 for r in rows.unique())  # whole rows of 4
    out = wrapped.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


# --- FoPru scores against the eager tower's attentions ----------------------------------------------
def _eager_token_scores(model, family, pixel_values, layer, cls_query=True):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref.model.vision_tower(pixel_values, output_attentions=True).attentions[layer]  # [B, H, S, S]
    rows = att.mean(1)
    if not cls_query:
        rows = rows[:, 1:]
    patch = rows.mean(1)[:, 1:]  # attention received by each patch; CLS key dropped
    if family == "internvl":  # one token = the patches HF's pixel_shuffle puts into it
        side = int(patch.shape[1] ** 0.5)
        shuffled = ref.model.pixel_shuffle(patch.reshape(-1, side, side, 1), scale_factor=model.config.downsample_ratio)
        return shuffled.sum(-1).reshape(patch.shape[0], -1)
    return patch


@pytest.mark.parametrize("cls_query", [True, False])
def test_scores_equal_eager_output_attentions(tiny, family, cls_query):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    layer = -2 if family == "llava" else -1  # the feature layer of each tiny model
    expected = _eager_token_scores(model, family, batch["pixel_values"], layer, cls_query)
    config = vlmkit.FoPruConfig(num_keep=5, cls_query=cls_query)
    tokens = vlmkit.wrap(model, config).encode_visual(batch["pixel_values"], batch["input_ids"])
    for i, t in enumerate(tokens):
        torch.testing.assert_close(t.scores, expected[i], rtol=1e-5, atol=1e-7)
        assert set(t.index.tolist()) == set(torch.topk(expected[i], 5).indices.tolist())


def test_explicit_layer_scores_that_layer():
    model, processor = tiny_vlm("llava")
    batch = make_batch(processor, QUESTIONS[:1], [1])
    expected = _eager_token_scores(model, "llava", batch["pixel_values"], 0)
    tokens = vlmkit.wrap(model, vlmkit.FoPruConfig(num_keep=4, layer=0)).encode_visual(batch["pixel_values"])
    torch.testing.assert_close(tokens[0].scores, expected[0], rtol=1e-5, atol=1e-7)


def test_scoring_does_not_switch_the_tower_to_eager(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:1], [1])
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5))
    wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks must not outlive the call"


# --- composition with the model ----------------------------------------------------------------------
def test_keep_ratio_one_is_identity(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 1, 2])
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref_logits = model(**batch).logits
    for config in (vlmkit.FoPruConfig(keep_ratio=1.0, strategy="row"), vlmkit.FoPruConfig(keep_ratio=1.0)):
        wrapped = vlmkit.wrap(model, config)
        assert torch.equal(wrapped.generate(**batch, max_new_tokens=6, do_sample=False), ref)
        with torch.no_grad():
            assert torch.equal(wrapped(**batch).logits, ref_logits)


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_padded_batch_equals_each_sample_alone(tiny, strategy):
    model, processor = tiny
    images = random_images(4, seed=5)
    nested = [[images[0]], [images[1], images[2]], [images[3]]]
    prompts = [image_prompt(processor, q, len(n)) for q, n in zip(QUESTIONS, nested)]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=nested, text=prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5, strategy=strategy))
    width = batch["input_ids"].shape[1]
    together = wrapped.generate(**batch, max_new_tokens=5, do_sample=False)[:, width:]
    for i in range(3):
        alone = processor(images=[nested[i]], text=[prompts[i]], return_tensors="pt")
        new = wrapped.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(new, together[i, : len(new)])  # a row that stopped early is padded after EOS


def test_language_model_receives_fewer_tokens(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1])
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["inputs_embeds"].shape[1], kw["attention_mask"].sum(1).tolist())),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(**batch)
            vlmkit.wrap(model, vlmkit.FoPruConfig(num_keep=3))(**batch)
    finally:
        handle.remove()
    (full_len, full_real), (pruned_len, pruned_real) = seen
    dropped = [n * (TOKENS_PER_TILE - 3) for n in (1, 2, 1)]
    assert pruned_real == [f - d for f, d in zip(full_real, dropped)]
    assert pruned_len == max(pruned_real) < full_len


def test_forward_with_labels_matches_hand_spliced_reference():
    """Batch of one: the pruned loss equals the model's loss on a sequence spliced by hand."""
    model, processor = tiny_vlm("llava")
    batch = make_batch(processor, QUESTIONS[:1], [1])
    labels = batch["input_ids"].clone()
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.25, strategy="row"))
    out = wrapped(**batch, labels=labels)
    kept = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])[0].index
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output[0]
    ids = batch["input_ids"][0]
    ph = (ids == model.config.image_token_id).nonzero().flatten()
    embeds = model.get_input_embeddings()(ids)
    keep_pos = torch.ones_like(ids, dtype=torch.bool)
    keep_pos[ph] = False
    keep_pos[ph[kept]] = True
    embeds = embeds.clone()
    embeds[ph[kept]] = feats[kept]
    ref_labels = labels[0].masked_fill(ids == model.config.image_token_id, -100)
    ref = model(inputs_embeds=embeds[keep_pos][None], labels=ref_labels[keep_pos][None])
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()  # pruning composes with training (gradients reach the base model)
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad()


def test_pad_to_multiple_of_pads_the_prompt_and_changes_no_generated_token(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1])
    config = vlmkit.FoPruConfig(num_keep=3)
    plain, padded = vlmkit.wrap(model, config), vlmkit.wrap(model, config, pad_to_multiple_of=7)
    lengths = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        reference = plain.generate(**batch, max_new_tokens=8, do_sample=False)
        steps = len(lengths)
        out = padded.generate(**batch, max_new_tokens=8, do_sample=False)
    finally:
        handle.remove()
    plain_len, padded_len = lengths[0], lengths[steps]  # the two prefills
    assert plain_len % 7 != 0 and padded_len == -(-plain_len // 7) * 7
    assert torch.equal(out, reference)
    assert vlmkit.wrap(model, config).assemble(**batch).inputs_embeds.shape[1] == plain_len  # forward: no padding


@pytest.mark.parametrize("name", ["llava_v2pe", "internvl_mousi", "qwen2_5_vl_random"])
def test_pad_to_multiple_of_keeps_position_schemes_and_mrope_exact(name):
    """Extra left padding must not move V2PE / MouSi positions or Qwen's M-RoPE positions."""
    from vlmkit.compat import make_batch as family_batch

    family, configs = {
        "llava_v2pe": ("llava", [vlmkit.FoPruConfig(num_keep=3), vlmkit.V2PEConfig(stride=4)]),
        "internvl_mousi": ("internvl", [vlmkit.FoPruConfig(num_keep=3), vlmkit.MouSiPositionConfig(mode="row")]),
        "qwen2_5_vl_random": ("qwen2_5_vl", [vlmkit.RandomPruneConfig(keep_ratio=0.5, seed=1)]),
    }[name]
    model, processor = shared_tiny(family)
    batch = family_batch(processor, [0, 1], "left")
    reference = vlmkit.wrap(model, *configs).generate(**batch, max_new_tokens=8, do_sample=False)
    wrapped = vlmkit.wrap(model, *configs, pad_to_multiple_of=13)
    lengths = [wrapped.assemble(**batch, padding_side="left", pad_to_multiple_of=m).inputs_embeds.shape[1]
               for m in (None, 13)]
    assert lengths[1] % 13 == 0 and lengths[1] > lengths[0]  # the padding really adds positions
    assert torch.equal(wrapped.generate(**batch, max_new_tokens=8, do_sample=False), reference)


@pytest.mark.parametrize("value", [0, -8, 2.0, True, "8"])
def test_pad_to_multiple_of_rejects_bad_values(value):
    model, _ = shared_tiny("llava")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        vlmkit.wrap(model, pad_to_multiple_of=value)


# --- invalid configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{"keep_ratio": 0.0}, {"keep_ratio": -0.5}, {"keep_ratio": 1.5}, {}, {"keep_ratio": 0.5, "num_keep": 4},
               {"num_keep": 0}, {"num_keep": 17}, {"keep_ratio": 0.5, "strategy": "column"},
               {"keep_ratio": 0.5, "layer": 7}],
)
def test_invalid_fopru_configs_raise_at_wrap(tiny, kwargs):
    model, _ = tiny
    with pytest.raises(ValueError):
        vlmkit.wrap(model, vlmkit.FoPruConfig(**kwargs))


@pytest.mark.parametrize("name", ["RandomPruneConfig", "DivPruneConfig"])
@pytest.mark.parametrize("kwargs", [{"keep_ratio": 0.0}, {"keep_ratio": 2.0}, {}, {"keep_ratio": 0.5, "num_keep": 2},
                                    {"num_keep": 17}])
def test_invalid_baseline_configs_raise_at_wrap(tiny, name, kwargs):
    model, _ = tiny
    with pytest.raises(ValueError):
        vlmkit.wrap(model, getattr(vlmkit, name)(**kwargs))


def test_configs_round_trip_through_the_registry():
    from vlmkit.config import config_from_dict

    for config in _pruners(num_keep=3) + [vlmkit.FoPruConfig(keep_ratio=0.1, layer=-3, cls_query=False)]:
        again = config_from_dict(config.to_dict())
        assert again == config and type(again) is type(config)
    with pytest.raises(ValueError):
        config_from_dict({"type": "fopru", "keep_ratio": 0.5, "strategy": "diagonal"})


# --- baselines ---------------------------------------------------------------------------------------
def test_random_is_seeded_and_batch_independent(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    pick = lambda seed: [t.index.tolist() for t in vlmkit.wrap(model, vlmkit.RandomPruneConfig(num_keep=6, seed=seed))
                         .encode_visual(batch["pixel_values"], batch["input_ids"])]
    a, b, c = pick(0), pick(0), pick(1)
    assert a == b and a != c
    expected = sorted(torch.randperm(16, generator=torch.Generator().manual_seed(0))[:6].tolist())
    assert a == [expected] * 3


def _divprune_reference(x: np.ndarray, k: int) -> list[int]:
    """The published loop (vbdi/divprune): first = largest nearest-neighbour distance, then farthest point."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - xn @ xn.T
    chosen = [int(np.argmax(np.sort(dist, axis=0)[1]))]
    for _ in range(k - 1):
        chosen.append(int(np.argmax(dist[chosen].min(axis=0))))
    return sorted(chosen)


def test_divprune_matches_published_loop():
    rng = np.random.default_rng(0)
    for k in (1, 4, 9):
        x = rng.standard_normal((30, 16)).astype(np.float32)
        assert divprune_select(torch.from_numpy(x), k).tolist() == _divprune_reference(x.astype(np.float64), k)


def test_divprune_keeps_one_per_cluster():
    x = torch.tensor([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0]])
    keep = divprune_select(x, 3).tolist()
    assert 2 in keep and 3 in keep and len({0, 1} & set(keep)) == 1


# --- pictures ----------------------------------------------------------------------------------------
def test_pruning_map_highlights_kept_cells():
    from PIL import Image

    from vlmkit.tokens import VisualTokens
    from vlmkit.viz import pruning_map

    image = Image.new("RGB", (40, 40), (200, 100, 50))
    tokens = VisualTokens(torch.zeros(2, 4), torch.tensor([0, 5]), (4, 4), num_uncompressed=16)
    out = pruning_map(image, tokens, min_size=40)
    assert out.size == (40, 40)
    assert out.getpixel((5, 5)) == (200, 100, 50)  # cell 0 kept (inside the outline)
    assert out.getpixel((15, 15)) == (200, 100, 50)  # cell 5 = row 1, col 1
    dim = out.getpixel((35, 35))  # cell 15 pruned
    assert all(d < c for d, c in zip(dim, (200, 100, 50)))


def test_prune_viz_command(tmp_path):
    from PIL import Image

    from vlmkit.cli import main

    random_images(1, size=48)[0].save(tmp_path / "in.png")
    out = tmp_path / "map.png"
    assert main(["prune-viz", "--image", str(tmp_path / "in.png"), "--keep", "0.25", "--strategy", "row",
                 "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 336


# --- tokens with a source map and image-newline tokens (LLaVA-NeXT / OneVision AnyRes) -------------------
def _with_newlines():
    """A hand-made AnyRes-like run of 12 slots: base tile 2×2 (tower tokens 0-3), then 2 stitched rows of 3
    grid tokens + a newline (slots 7 and 11), the grid tokens from tower tokens 4-11 in a shuffled order."""
    from vlmkit.tokens import VisualTokens

    source = torch.tensor([0, 1, 2, 3, 9, 4, 11, -1, 5, 8, 10, -1])
    embeds = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    return VisualTokens(embeds, torch.arange(12), (2, 2), blocks=[(0, (2, 2)), (4, (2, 4))],
                        source=source, num_sources=12)


def test_source_is_validated_and_carried_by_select():
    from vlmkit.tokens import VisualTokens

    t = _with_newlines()
    kept = t.select(torch.tensor([1, 4, 7]))
    assert kept.source.tolist() == [1, 9, -1] and kept.num_sources == 12
    assert t.grid_positions().tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert t.keep_with_newlines(torch.tensor([9, 0])).index.tolist() == [0, 7, 9, 11]
    with pytest.raises(ValueError, match="newline positions"):
        t.keep_with_newlines(torch.tensor([7]))
    with pytest.raises(ValueError, match="go together"):
        VisualTokens(torch.zeros(2, 1), torch.arange(2), (1, 2), source=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"0\.\.1 \(num_sources=2\)"):
        VisualTokens(torch.zeros(2, 1), torch.arange(2), (1, 2), source=torch.tensor([0, 2]), num_sources=2)
    plain = VisualTokens.full(torch.zeros(4, 1), (2, 2))
    assert plain.source is None and plain.select(torch.tensor([1])).source is None
    assert plain.grid_positions().tolist() == [0, 1, 2, 3]


def _fopru_on(tokens, records, **config):
    """``FoPru.compress`` of a tiny LLaVA FoPru stage on ``tokens`` with the recorded tile scores ``records``."""
    model, _ = shared_tiny("llava")
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(**config))
    fopru = wrapped.stages[0]
    try:
        with fopru.vision_context(wrapped.family):
            fopru._records[:] = records
            return fopru.compress(tokens)
    finally:
        vlmkit.unwrap(wrapped)


def test_fopru_gathers_scores_through_source_and_keeps_newlines():
    """One 16-token tile (tiny LLaVA) laid out as 4 rows of 4 permuted grid tokens + a newline each;
    recorded score of tower token j = j, so the expected selection follows from the permutation."""
    from vlmkit.tokens import VisualTokens

    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    source = torch.cat([torch.cat([perm[4 * r : 4 * r + 4], torch.tensor([-1])]) for r in range(4)])  # 4 rows of 4 + nl
    t = VisualTokens(torch.randn(20, 4), torch.arange(20), (4, 4), blocks=[(0, (4, 5))], source=source,
                     num_sources=16)
    records = [torch.arange(16, dtype=torch.float32)[None]]
    (rank,) = _fopru_on([t], records, keep_ratio=0.25, strategy="rank")
    # 4 of the 16 grid tokens (newlines do not count): tower 12-15, wherever the permutation put them
    expected = sorted([int(torch.nonzero(source == j)) for j in (12, 13, 14, 15)] + [4, 9, 14, 19])
    assert rank.index.tolist() == expected and rank.num_tokens == 4 + 4
    assert rank.scores[source >= 0].tolist() == source[source >= 0].float().tolist()
    assert bool(rank.scores[source == -1].isnan().all())
    (row,) = _fopru_on([t], records, num_keep=6, strategy="row")
    means = [float(perm[4 * r : 4 * r + 4].float().mean()) for r in range(4)]
    best = sorted(range(4), key=lambda r: -means[r])
    nxt = best[1]
    top2 = sorted(range(4), key=lambda c: -int(perm[4 * nxt + c]))[:2]
    expected = sorted([5 * best[0] + c for c in range(4)] + [5 * nxt + c for c in top2] + [4, 9, 14, 19])
    assert row.index.tolist() == expected


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_fopru_identity_source_equals_no_source(strategy):
    """source = arange (no newlines) is the identity: the same selection as without a source map."""
    import dataclasses

    from vlmkit.tokens import VisualTokens

    g = torch.Generator().manual_seed(4)
    records = [torch.rand(2, 16, generator=g)]
    embeds = torch.randn(32, 4, generator=g)
    for k in (1, 3, 4, 9, 16):
        plain = VisualTokens.full(embeds, (4, 4), frames=2)
        mapped = dataclasses.replace(plain, source=torch.arange(32), num_sources=32)
        (a,) = _fopru_on([plain], records, num_keep=k, strategy=strategy)
        (b,) = _fopru_on([mapped], records, num_keep=k, strategy=strategy)
        assert a.index.tolist() == b.index.tolist()


def test_fopru_select_rows_by_hand_and_equal_rows_match_fopru_select():
    from vlmkit.compress.fopru import fopru_select_rows

    # rows: 0 = [1, 1] (mean 1), 1 = [5, 0, 4] (mean 3), 2 = [2, 2, 2, 2] (mean 2)
    scores = torch.tensor([1.0, 1.0, 5.0, 0.0, 4.0, 2.0, 2.0, 2.0, 2.0])
    row = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert fopru_select_rows(scores, row, 3, "row").tolist() == [2, 3, 4]
    # row 1 whole (3), then row 2 does not fit in 5: its 2 best (all tied -> lowest positions 5, 6)
    assert fopru_select_rows(scores, row, 5, "row").tolist() == [2, 3, 4, 5, 6]
    assert fopru_select_rows(scores, row, 7, "row").tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert fopru_select_rows(scores, row, 2, "rank").tolist() == [2, 4]
    with pytest.raises(ValueError, match="num_keep must be in 1..9"):
        fopru_select_rows(scores, row, 10, "row")
    g = torch.Generator().manual_seed(5)
    s = torch.rand(1, 30, generator=g)
    for k in (1, 5, 6, 13, 30):
        for strategy in ("rank", "row"):
            ref = fopru_select(s, (5, 6), k, strategy)[0]
            assert fopru_select_rows(s[0], torch.arange(30) // 6, k, strategy).tolist() == ref.tolist()


def test_random_and_divprune_keep_newlines_and_count_grid_tokens():
    t = _with_newlines()
    grid = t.grid_positions()
    random = vlmkit.wrap(shared_tiny("llava")[0], vlmkit.RandomPruneConfig(keep_ratio=0.5, seed=7))
    (kept,) = random.stages[0].compress([t])
    vlmkit.unwrap(random)
    pick = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:5]  # 5 of the 10 grid tokens
    assert kept.index.tolist() == sorted(grid[pick].tolist() + [7, 11])
    div = vlmkit.wrap(shared_tiny("llava")[0], vlmkit.DivPruneConfig(num_keep=4))
    (kept,) = div.stages[0].compress([t])
    vlmkit.unwrap(div)
    assert kept.index.tolist() == sorted(grid[divprune_select(t.embeds[grid], 4)].tolist() + [7, 11])
