"""SAM refinement of Text4Seg coarse masks on a tiny SAM: prior, points, call chain, determinism, loading.

Independent facts: the reference's float32 logit arithmetic, torchvision's ``to_pil_image(mode="F")``
+ ``resize`` path (what ``ResizeLongestSide.apply_image`` did on float logits), the reference's
point-sampling procedure under ``torch.manual_seed``, and a recording predictor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.seg.sam import load_sam, make_predictor, mask_prior, refine_with_sam, sam_refine, sample_points, tiny_sam
from vlmkit.seg.rrle import encode_rrle, grid_to_mask, wrap_answer
from vlmkit.seg.text4seg import Text4Seg, Text4SegConfig



@pytest.fixture(scope="module")
def sam():
    return tiny_sam(seed=0)


def coarse_grid(h=16, w=16):
    g = np.zeros((h, w), bool)
    g[4:10, 5:12] = True
    return g


def image(h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def answer_for(grid):
    return wrap_answer("Sure:", encode_rrle(np.where(grid, "the red cat", "others")))


# ---------------------------------------------------------------------------------------------
# Prior and points
# ---------------------------------------------------------------------------------------------


def test_prior_values_and_resize_match_reference_path():
    from torchvision.transforms.functional import resize, to_pil_image

    g = coarse_grid()
    prior = mask_prior(g)
    assert prior.shape == (1, 256, 256) and prior.dtype == np.float32
    # reference: float32 array of 1 - 1e-3 / 1e-3, then log(x / (1 - x)) in float32
    logits = np.where(g, np.float32(1 - 1e-3), np.float32(1e-3)).astype(np.float32)
    logits = np.log(logits / (1 - logits))
    assert abs(float(logits.max()) - 6.9068) < 1e-3 and abs(float(logits.min()) + 6.9068) < 1e-3
    expect = np.array(resize(to_pil_image(logits[..., None], mode="F"), [256, 256]))
    assert np.array_equal(prior[0], expect)
    # a grid already at the frame size passes through unchanged
    assert np.array_equal(mask_prior(np.ones((32, 32), bool), (32, 32))[0], np.full((32, 32), logits.max()))


def test_prior_nonsquare_and_aligned():
    g = np.ones((8, 16), bool)  # non-square grid: long side to 256, padded with 0 below
    p = mask_prior(g)[0]
    assert (p[:128] > 6.9).all() and (p[128:] == 0).all()
    # square grid, non-square image: the reference stretches over the whole frame ...
    assert (mask_prior(np.ones((16, 16), bool))[0] > 6.9).all()
    # ... align_prior puts it over the image's part of SAM's padded frame (48x80 -> 154x256)
    p = mask_prior(np.ones((16, 16), bool), (256, 256), image_size=(48, 80))[0]
    assert (p[:154] > 6.9).all() and (p[154:] == 0).all()


def _reference_points(mask, k, seed):
    """The reference's masks_sample_points procedure (meshgrid + masked_select + randperm)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = torch.as_tensor(mask, dtype=torch.float64)
        h, w = m.shape
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
        out = []
        for sel in (m > 0.5, m < 0.5):
            xs, ys = torch.masked_select(x, sel), torch.masked_select(y, sel)
            idx = torch.randperm(xs.size(0))[:k]
            out.append(torch.stack([xs[idx], ys[idx]], 1))
    return torch.cat(out).numpy(), np.array([1] * len(out[0]) + [0] * len(out[1]), np.uint8)


@pytest.mark.parametrize("k, seed", [(10, 42), (20, 0), (3, 7)])
def test_sample_points_match_reference_procedure(k, seed):
    mask = grid_to_mask(coarse_grid(), (48, 80))
    coords, labels = sample_points(mask, k, torch.Generator().manual_seed(seed))
    ref_coords, ref_labels = _reference_points(mask, k, seed)
    assert np.array_equal(coords, ref_coords) and np.array_equal(labels, ref_labels)
    assert coords.dtype == np.float64 and labels.tolist() == [1] * k + [0] * k
    xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert mask[ys[:k], xs[:k]].all() and not mask[ys[k:], xs[k:]].any()


def test_sample_points_small_sides():
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False
    coords, labels = sample_points(mask, 10, torch.Generator().manual_seed(0))
    assert labels.tolist() == [1] * 10 + [0] and coords[-1].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Refinement
# ---------------------------------------------------------------------------------------------


class RecordingPredictor:
    """Wraps a SamPredictor and records every predict call."""

    def __init__(self, predictor):
        self.inner, self.calls = predictor, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, **kwargs):
        out = self.inner.predict(**kwargs)
        self.calls.append((kwargs, out))
        return out


def test_refinement_call_chain_and_size(sam):
    predictor = RecordingPredictor(make_predictor(sam))
    predictor.set_image(image())
    ref = refine_with_sam(predictor, coarse_grid(), points=10, iterations=3, seed=0)
    assert ref.mask.shape == (48, 80) and ref.mask.dtype == bool and isinstance(ref.score, float)
    assert len(predictor.calls) == 3
    first = predictor.calls[0][0]
    assert np.array_equal(first["mask_input"], mask_prior(coarse_grid(), (32, 32)))  # tiny SAM frame: 32²
    for (prev_kwargs, prev_out), (kwargs, out) in zip(predictor.calls, predictor.calls[1:]):
        assert kwargs["mask_input"] is prev_out[2]  # fed the previous low-res logits
        assert np.array_equal(kwargs["point_coords"], first["point_coords"])
        assert kwargs["multimask_output"] is False
    assert np.array_equal(ref.mask, predictor.calls[-1][1][0][0])
    assert ref.point_labels.tolist() == [1] * 10 + [0] * 10


def test_refinement_deterministic_by_seed(sam):
    img = image()
    a = sam_refine(sam, img, coarse_grid(), seed=3)
    b = sam_refine(sam, img, coarse_grid(), seed=3)
    c = sam_refine(sam, img, coarse_grid(), seed=4)
    assert np.array_equal(a.mask, b.mask) and a.score == b.score and np.array_equal(a.point_coords, b.point_coords)
    assert not np.array_equal(a.point_coords, c.point_coords)


def test_all_background_skips_sam():
    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"SAM was used: {name}")

    out = sam_refine(Boom(), image(30, 20), np.zeros((16, 16), bool))
    assert out.skipped and out.mask.shape == (30, 20) and not out.mask.any()


def test_stage_refines_and_skips(sam):
    head = Text4Seg(Text4SegConfig(refine="sam", points=5, seed=1), sam=sam)
    img_a, img_b = image(48, 80, 1), image(40, 40, 2)
    texts = [answer_for(coarse_grid()), "Sure:\n<seg>" + encode_rrle(np.full((16, 16), "others")) + "</seg>",
             "no mask", answer_for(coarse_grid())]
    out = head.masks_from_text(texts, images=[img_a, img_a, img_b, img_b])
    assert [r.mask.shape for r in out] == [(48, 80), (48, 80), (40, 40), (40, 40)]
    assert [r.refined for r in out] == [True, False, False, True]
    assert not out[1].mask.any() and not out[2].mask.any() and out[1].score is None
    assert np.array_equal(out[0].coarse_mask, grid_to_mask(coarse_grid(), (48, 80)))
    again = head.masks_from_text(texts, images=[img_a, img_a, img_b, img_b])
    for r, s in zip(out, again):
        assert np.array_equal(r.mask, s.mask)
    direct = sam_refine(sam, img_a, coarse_grid(), points=5, seed=1)
    assert np.array_equal(out[0].mask, direct.mask)
    with pytest.raises(ValueError, match="images"):
        head.masks_from_text(texts[:1], [(48, 80)])
    assert head.state_dict() == {} and list(head.modules()) == [head]  # SAM stays out of saved weights
    aligned = Text4Seg(Text4SegConfig(refine="sam", points=5, seed=1, align_prior=True), sam=sam)
    assert aligned.masks_from_text(texts[:1], images=[img_a])[0].mask.shape == (48, 80)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_from_checkpoint_weights_only(sam, tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    loaded = load_sam(path, "tiny")
    for (k, v), (k2, v2) in zip(sam.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    head = Text4SegConfig(refine="sam", sam_checkpoint=str(path), sam_type="tiny", points=5, seed=1).build()
    head.attach(None)  # the wrap()-time check passes for an existing file
    out = head.masks_from_text([answer_for(coarse_grid())], images=[image(48, 80, 1)])
    direct = sam_refine(sam, image(48, 80, 1), coarse_grid(), points=5, seed=1)
    assert out[0].refined and np.array_equal(out[0].mask, direct.mask)


def test_load_rejects_bad_checkpoints(tmp_path):
    torch.save({"model": _Opaque()}, tmp_path / "obj.pth")  # arbitrary objects need unpickling code
    with pytest.raises(ValueError, match="weights_only"):
        load_sam(tmp_path / "obj.pth", "tiny")
    torch.save({"not_a_sam.weight": torch.zeros(2)}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_sam(tmp_path / "keys.pth", "tiny")
    with pytest.raises(ValueError, match="not a file"):
        load_sam(tmp_path / "absent.pth", "tiny")
    with pytest.raises(ValueError, match="vit_q"):
        load_sam(tmp_path / "keys.pth", "vit_q")
    other = tiny_sam(dim=16)
    torch.save(other.state_dict(), tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_sam(tmp_path / "shape.pth", "tiny")


class _Opaque:
    pass


def test_tiny_sam_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = tiny_sam(seed=0), tiny_sam(seed=0), tiny_sam(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.mask_decoder.iou_prediction_head.layers[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
