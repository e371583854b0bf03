"""Where vlmkit departs from the reference code on purpose (issue 20, "fidelity details"): each difference is
documented in its module and, where offered, the reference's rule is an option. Independent facts: the
reference's formulas transcribed here (READ's padding, FC-CLIP's ``split_labels`` / overlap test, DivPrune's
``threshold_terms`` and its selection loop), and hand counts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# READ: the similarity map's padding
# ---------------------------------------------------------------------------------------------


def _read_reference_padded(sm: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """READ ``similarity_map_to_points`` (``model/READ.py``) from min-max to padding, transcribed: ``sm`` is the
    downsampled map [t, t]."""
    sm = (sm - sm.min()) / (sm.max() - sm.min())
    target_size = sm.shape[0]
    ori_h, ori_w = shape
    scale = target_size / min(ori_h, ori_w)
    new_h, new_w = int(ori_h * scale), int(ori_w * scale)
    pad_h = (new_h - target_size) // 2
    pad_w = (new_w - target_size) // 2
    return F.pad(sm, (pad_w, pad_w, pad_h, pad_h), mode="constant", value=-1)


def test_read_padding_rule_clamp_by_default_reference_as_option():
    from vlmkit.seg.read import READConfig, select_points

    # the rounding fact: int(m * (12 / m)) < 12 for 84 of the sides 1..2048, 94 among them
    short = [m for m in range(1, 2049) if int(m * (12 / m)) < 12]
    assert len(short) == 84 and 94 in short and 100 not in short

    sim = torch.randn(24, 24, generator=torch.Generator().manual_seed(0))
    small = F.interpolate(sim[None, None], (12, 12), mode="bilinear", align_corners=False)[0, 0]
    for shape in [(94, 141), (141, 94), (100, 141), (188, 188)]:
        ref = _read_reference_padded(small, shape)
        got_ref = select_points(sim, shape, down_sample=2, pad_rule="reference").score_map
        got = select_points(sim, shape, down_sample=2).score_map  # default: clamp
        torch.testing.assert_close(got_ref, ref, rtol=0, atol=1e-6)  # the reference's map, crop included
        pads = [(int(side * (12 / min(shape))) - 12) // 2 for side in shape]  # READ's per-side padding
        assert tuple(got.shape) == tuple(12 + 2 * max(0, p) for p in pads)  # clamp: never loses a cell
        assert tuple(ref.shape) == tuple(12 + 2 * p for p in pads)
        if min(pads) < 0:  # 94 x 141: 12 x 18 here, 10 x 18 in READ (its first and last rows cropped)
            rows = slice(1, -1) if pads[0] < 0 else slice(None)
            cols = slice(1, -1) if pads[1] < 0 else slice(None)
            torch.testing.assert_close(got_ref, got[rows, cols], rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert tuple(select_points(sim, (94, 141), down_sample=2).score_map.shape) == (12, 18)
    assert tuple(select_points(sim, (94, 141), down_sample=2, pad_rule="reference").score_map.shape) == (10, 18)
    assert READConfig(sam="tiny").pad_rule == "clamp"
    assert READConfig(sam="tiny", pad_rule="reference").to_dict()["pad_rule"] == "reference"
    with pytest.raises(ValueError, match="pad_rule must be one of .*'crop'"):
        READConfig(sam="tiny", pad_rule="crop")


# ---------------------------------------------------------------------------------------------
# FrozenSeg: which classes count as seen
# ---------------------------------------------------------------------------------------------


def _fc_clip_overlap(train_names, test_names):
    """FC-CLIP's ``split_labels`` + ``category_overlapping_mask``, transcribed."""
    def split_labels(x):
        return [x_.replace(", ", ",").split(",") for x_ in x]

    train = {label for labels in split_labels(train_names) for label in labels}
    return [not set(train).isdisjoint(set(names)) for names in split_labels(test_names)]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    import open_clip

    name = "vlmkit-fidelity-convnext-atto"
    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                          "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 64},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("clip_cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return name, open_clip.create_model(name).eval()


def test_frozenseg_seen_classes_match_exact_strings_like_the_reference(clip_model):
    from vlmkit.seg.frozenseg import FrozenSegConfig, build_frozenseg
    from vlmkit.seg.sam import tiny_sam

    name, clip = clip_model
    train = ["person, people", "Cat", "dog ,puppy"]
    test = ["person", "people, crowd", "cat", "Cat", "puppy", "dog", "dog ", " person", "tree"]
    small = dict(clip=name, sam="tiny", queries=2, layers=1, hidden_dim=32, num_heads=2, ffn_dim=32,
                 pixel_decoder_layers=0, pixel_decoder_ffn=32, train_classes=train)

    exact = build_frozenseg(FrozenSegConfig(**small), clip_model=clip, sam=tiny_sam())
    want = _fc_clip_overlap(train, test)
    assert want == [True, True, False, True, True, False, True, False, False]
    assert exact.config.seen_match == "exact"  # the default is the reference's rule
    assert exact.seen_mask(test).tolist() == want

    normalized = build_frozenseg(FrozenSegConfig(**small, seen_match="normalized"), clip_model=clip, sam=tiny_sam())
    assert normalized.seen_mask(test).tolist() == [True, True, True, True, True, True, True, True, False]
    with pytest.raises(ValueError, match="seen_match must be one of .*'lower'"):
        FrozenSegConfig(**{**small, "seen_match": "lower"})


# ---------------------------------------------------------------------------------------------
# SEED: the Q-Former is causal for any number of queries (the reference: only for exactly 32)
# ---------------------------------------------------------------------------------------------


def test_seed_qformer_is_causal_at_any_query_count_and_says_so():
    import vlmkit.vision.seed as seed
    from vlmkit.vision.seed import CausalQFormer

    assert "exactly 32 queries" in seed.__doc__
    torch.manual_seed(0)
    qf = CausalQFormer(width=16, layers=2, heads=2, inner=32, context_dim=8).eval()
    queries, image = torch.randn(1, 16, 16), torch.randn(1, 5, 8)  # 16 queries: the reference is bidirectional
    moved = queries.clone()
    moved[:, 10] += 3.0 * torch.randn(16)
    with torch.no_grad():
        base, out = qf(queries, image), qf(moved, image)
    torch.testing.assert_close(out[:, :10], base[:, :10], rtol=0, atol=1e-6)  # earlier queries unaffected
    assert (out[:, 10:] - base[:, 10:]).abs().amax() > 1e-2


# ---------------------------------------------------------------------------------------------
# DivPrune: budget rounding and distance dtype
# ---------------------------------------------------------------------------------------------


def _divprune_reference(visual_feature_vectors, threshold_ratio):
    """``DivPrune`` of the reference (``llava_arch.py``), transcribed; returns the picks in pick order."""
    image_feature_length = visual_feature_vectors.shape[0]
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def test_divprune_budget_floor_by_default_round_as_the_reference():
    from vlmkit.compress.divprune import DivPrune, DivPruneConfig
    from vlmkit.tokens import VisualTokens

    assert int(round(0.1 * 576)) == 58 and int(576 * 0.1) == 57  # the two rules on LLaVA's 576 tokens
    assert DivPruneConfig(keep_ratio=0.1).num_to_keep(576) == 57
    assert DivPruneConfig(keep_ratio=0.1, budget="round").num_to_keep(576) == 58
    assert DivPruneConfig(keep_ratio=0.001, budget="round").num_to_keep(576) == 1  # round gives 1 (0.576)
    assert DivPruneConfig(keep_ratio=0.0005, budget="round").num_to_keep(576) == 1  # round gives 0: at least 1
    assert DivPruneConfig(num_keep=7, budget="round").num_to_keep(576) == 7
    embeds = torch.randn(576, 16, generator=torch.Generator().manual_seed(0))
    tokens = VisualTokens.full(embeds, (24, 24))
    for budget, k in (("floor", 57), ("round", 58)):
        cfg = DivPruneConfig(keep_ratio=0.1, budget=budget)
        kept = DivPrune(cfg).compress([tokens])[0]
        assert kept.num_tokens == k
        ref = _divprune_reference(embeds, 0.1)  # float32 input: the reference's own picks
        assert kept.index.tolist() == sorted(ref[:k].tolist())
    with pytest.raises(ValueError, match="budget must be one of .*'ceil'"):
        DivPruneConfig(keep_ratio=0.1, budget="ceil")


def test_divprune_reference_distances_reproduce_bfloat16_picks():
    from vlmkit.compress.divprune import divprune_select

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(40, 8, generator=gen)
    embeds = torch.cat([base, base[:24] + 0.01 * torch.randn(24, 8, generator=gen)]).to(torch.bfloat16)  # near-ties
    ref = sorted(_divprune_reference(embeds, 0.25).tolist())  # bfloat16 arithmetic, 16 picks
    assert len(set(ref)) == 16
    assert divprune_select(embeds, 16, "reference").tolist() == ref
    f32 = divprune_select(embeds, 16).tolist()  # float32: a documented difference, not the reference's picks
    assert f32 == sorted(_divprune_reference(embeds.float(), 0.25).tolist())
    assert f32 != ref  # here bfloat16 rounding changes the picks: the option matters
    with pytest.raises(ValueError, match="distances must be one of"):
        divprune_select(embeds, 4, "float16")
