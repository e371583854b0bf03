"""FrozenSeg on a tiny open_clip ConvNeXt and a tiny SAM: frozen backbones, shapes, open vocabulary, ensemble."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmkit.seg.frozenseg import FrozenSeg, FrozenSegConfig, build_frozenseg
from vlmkit.seg.pmp import classification_logits, mask_pool
from vlmkit.seg.sam import tiny_sam

CLIP_NAME = "vlmkit-test-convnext-atto"
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SMALL = dict(clip=CLIP_NAME, sam="tiny", queries=6, layers=3, hidden_dim=32, num_heads=2, ffn_dim=64,
             pixel_decoder_layers=1, pixel_decoder_ffn=64, train_classes=["cat", "dog"])


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("clip_cfg") / f"{CLIP_NAME}.json"
    path.write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(path)  # a small custom model config, offline
    torch.manual_seed(0)
    return open_clip.create_model(CLIP_NAME).eval()


def _model(clip_model, seed=0, **kw) -> FrozenSeg:
    torch.manual_seed(seed)
    return build_frozenseg(FrozenSegConfig(**{**SMALL, **kw}), clip_model=clip_model, sam=tiny_sam())


def _images(B=2, size=64, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def _targets():
    a = torch.zeros(1, 64, 64, dtype=torch.bool)
    a[0, 10:40, 5:30] = True
    b = torch.zeros(2, 64, 64, dtype=torch.bool)
    b[0, :32] = True
    b[1, 32:, 32:] = True
    return [{"labels": torch.tensor([0]), "masks": a}, {"labels": torch.tensor([1, 2]), "masks": b}]


def test_backbones_stay_frozen_through_an_optimizer_step(clip_model):
    model = _model(clip_model)
    model.set_classes(["cat", "dog", "tree"])
    model.train()
    assert not model.clip.training and not model.sam_encoder.training  # no drop-path in the frozen towers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("clip.", "sam_encoder."))}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained and not set(frozen) & set(trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(_images(), targets=_targets())
    assert out["loss"].dim() == 0 and set(out["losses"]) == {"loss_class", "loss_mask", "loss_dice"}
    out["loss"].backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert params[n].grad is None and not params[n].requires_grad, n
        assert torch.equal(params[n], before), n
    missing_grad = [n for n in trained if params[n].grad is None]
    assert not missing_grad  # every head part (injectors, void embedding, decoder, pixel decoder) learns
    assert all(not torch.equal(params[n], before) for n, before in trained.items())


def test_output_shapes(clip_model):
    model = _model(clip_model).eval()
    model.set_classes(["cat", "dog, puppy", "tree", "sky"])
    with torch.no_grad():
        out = model(_images(B=2, size=64))
    assert out["pred_masks"].shape == (2, 6, 16, 16)  # stride-4 mask logits
    assert out["pred_logits"].shape == (2, 6, 5)  # K + void
    assert out["out_vocab_logits"].shape == (2, 6, 5)
    assert out["class_scores"].shape == (2, 6, 5)
    assert torch.allclose(out["class_scores"].sum(-1), torch.ones(2, 6), atol=1e-5)
    assert len(out["aux_outputs"]) == 3
    sem = FrozenSeg.semantic_segmentation(out, size=(64, 64))
    assert sem.shape == (2, 4, 64, 64)
    # a non-square input
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 96) * 255)["pred_masks"].shape == (1, 6, 16, 24)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 60, 64))


def test_open_vocabulary_changes_at_inference_time(clip_model):
    model = _model(clip_model).eval()
    model.set_classes(["cat", "dog"])
    img = _images(B=1)
    with torch.no_grad():
        a = model(img)
        b = model(img, classes=["tree", "car", "person, people", "sky"])
        again = model(img)
    assert a["class_scores"].shape[-1] == 3 and b["class_scores"].shape[-1] == 5
    assert b["classes"] == ["tree", "car", "person, people", "sky"] and again["classes"] == ["cat", "dog"]
    assert torch.equal(a["pred_masks"], b["pred_masks"])  # without PMP the proposals ignore the vocabulary
    assert torch.equal(a["class_scores"], again["class_scores"])  # classes= does not change the set vocabulary
    model.set_classes(["tree", "car", "person, people", "sky"])
    with torch.no_grad():
        assert torch.allclose(model(img)["class_scores"], b["class_scores"])


def test_pmp_switch_makes_proposals_depend_on_the_vocabulary(clip_model):
    model = _model(clip_model, pmp=True).eval()
    assert any(n.startswith("decoder.text_layers") for n, _ in model.named_parameters())
    img = _images(B=1)
    with torch.no_grad():
        a = model(img, classes=["cat", "dog"])["pred_masks"]
        b = model(img, classes=["tree", "car", "sky"])["pred_masks"]
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4


def test_text_classifier_synonyms_and_templates(clip_model):
    model = _model(clip_model, templates="plain")
    emb, nsyn = model.text_classifier(["cat", "dog, puppy"])
    assert nsyn == [1, 2] and emb.shape == (3, 32)
    with torch.no_grad():
        direct = F.normalize(model.clip.encode_text(["cat", "dog", "puppy"]), dim=-1)
    assert torch.allclose(emb, direct, atol=1e-6)
    # a class's logit is the max over its synonyms
    x = torch.randn(1, 4, 32)
    clf = torch.cat([emb, F.normalize(torch.randn(1, 32), dim=-1)])
    scale = torch.tensor(2.0)
    logits = classification_logits(x, clf, scale, nsyn)
    full = scale.exp() * F.normalize(x, dim=-1) @ clf.T
    assert torch.allclose(logits, torch.stack([full[..., 0], full[..., 1:3].max(-1).values, full[..., 3]], -1), atol=1e-5)
    with pytest.raises(ValueError, match="class names"):
        model.set_classes("cat")


def test_clip_adapter_matches_clip_image_embedding(clip_model):
    """Mask-pooling the dense map with an all-ones mask and the tower head = open_clip's own encode_image."""
    model = _model(clip_model)
    img = _images(B=2)
    x = (img - model.clip_pixel_mean) / model.clip_pixel_std
    with torch.no_grad():
        dense = model.clip.features(x)["clip_vis_dense"]
        pooled = model.clip.visual_prediction(mask_pool(dense, torch.ones(2, 1, *dense.shape[-2:])))
        ref = clip_model.encode_image(x)
    assert torch.allclose(pooled[:, 0], ref, atol=1e-5)


def test_geometric_ensemble_is_the_reference_formula(clip_model):
    model = _model(clip_model, train_classes=["cat", "dog"], alpha=0.4, beta=0.8).eval()
    names = ["dog", "tree", "cat, kitty", "sky"]
    assert model.seen_mask(names).tolist() == [True, False, True, False]
    with torch.no_grad():
        out = model(_images(B=1), classes=names)
    in_p = out["pred_logits"][..., :-1].softmax(-1)
    out_p = out["out_vocab_logits"][..., :-1].softmax(-1)
    seen = torch.tensor([1, 0, 1, 0])
    logits = ((in_p ** 0.6 * out_p ** 0.4).log() * seen + (in_p ** 0.2 * out_p ** 0.8).log() * (1 - seen))
    void = out["pred_logits"].softmax(-1)[..., -1:]
    expected = torch.cat([logits.softmax(-1) * (1 - void), void], dim=-1)
    assert torch.allclose(out["class_scores"], expected, atol=1e-5)


def test_training_lowers_the_loss(clip_model):
    model = _model(clip_model)
    model.set_classes(["cat", "dog", "tree"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    img, tg = _images(), _targets()
    losses = []
    for _ in range(5):
        loss = model(img, targets=tg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_build_from_local_paths_and_save_round_trip(clip_model, tmp_path):
    from vlmkit.seg.sam import tiny_sam as make_sam

    clip_file, sam_file = tmp_path / "clip.pt", tmp_path / "sam.pt"
    torch.save(clip_model.state_dict(), clip_file)
    torch.save(make_sam().state_dict(), sam_file)
    model = _model(clip_model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "fs")
    saved = json.loads((tmp_path / "fs" / "frozenseg.json").read_text())
    assert saved["type"] == "frozenseg" and saved["queries"] == 6
    config = FrozenSegConfig.from_dict({**saved, "clip_pretrained": str(clip_file), "sam_checkpoint": str(sam_file)})
    from_paths = build_frozenseg(config)  # open_clip.create_model(name, pretrained=file) + load_sam(file, "tiny")
    from_paths.load_state_dict(model.trainable_state_dict(), strict=False)
    loaded = FrozenSeg.from_pretrained(tmp_path / "fs", clip_model=clip_model, sam=make_sam())
    img = _images(B=1)
    for m in (model, from_paths, loaded):
        m.eval().set_classes(["cat", "dog"])
    with torch.no_grad():
        ref = model(img)
        for other in (from_paths, loaded):
            out = other(img)
            assert torch.allclose(out["pred_masks"], ref["pred_masks"], atol=1e-5)
            assert torch.allclose(out["class_scores"], ref["class_scores"], atol=1e-5)
    with pytest.raises(ValueError, match="clip_pretrained"):
        build_frozenseg(FrozenSegConfig(**SMALL))


def test_config_round_trip_and_validation():
    c = FrozenSegConfig(clip="convnext_large_d_320", sam="vit_b", queries=250, layers=9)
    assert FrozenSegConfig.from_json(c.to_json()) == c
    assert c.alpha == 0.4 and c.beta == 0.8 and c.hidden_dim == 256
    with pytest.raises(ValueError, match="unknown FrozenSegConfig field"):
        FrozenSegConfig.from_dict({"queries": 4, "query": 5})
    for bad, match in [(dict(queries=0), "queries"), (dict(alpha=1.5), "alpha"), (dict(sam="vit_x"), "sam"),
                       (dict(templates="x"), "templates"), (dict(sam_query_fuse_level=3), "sam_query_fuse_level"),
                       (dict(hidden_dim=30, num_heads=4), "hidden_dim")]:
        with pytest.raises(ValueError, match=match):
            FrozenSegConfig(**bad)


def test_dense_evaluation_on_an_ade20k_style_task(clip_model, tmp_path):
    """evaluate_semantic runs a FrozenSeg model over an ADE20K-format task and scores it exactly as
    metrics.mean_iou does on the same predictions (reduce_zero_label, mmseg)."""
    import numpy as np
    from PIL import Image

    from vlmkit.evaluation.metrics import mean_iou
    from vlmkit.evaluation.semantic import _resize_shape, evaluate_semantic

    rng = np.random.default_rng(0)
    img_dir, ann_dir = tmp_path / "ade" / "images", tmp_path / "ade" / "annotations"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    labels = []
    for i, (h, w) in enumerate([(48, 80), (70, 60)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{i}.jpg")
        label = rng.integers(0, 4, (h, w)).astype(np.uint8)  # 0 = other (ignored), 1..3 = the three classes
        Image.fromarray(label).save(ann_dir / f"{i}.png")
        labels.append(label)
    task = tmp_path / "tiny_ade.yaml"
    task.write_text("""task: tiny_ade
dataset: {format: ade20k, images: ade/images, annotations: ade/annotations}
doc_to_text: "unused by dense models"
parser: {name: text4seg_semantic, class_names: [cat, dog, tree]}
metric_list:
  - {metric: mean_iou, num_classes: 3, reduce_zero_label: true, mode: mmseg}
""")
    model = _model(clip_model)
    got = evaluate_semantic(model, str(task), data_root=tmp_path, size=64)

    preds = []
    for i, label in enumerate(labels):
        x = torch.from_numpy(np.asarray(Image.open(img_dir / f"{i}.jpg").convert("RGB"), dtype=np.float32))
        x = torch.nn.functional.interpolate(x.permute(2, 0, 1)[None], size=_resize_shape(*label.shape, 64),
                                            mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores = model.semantic_segmentation(model(x, classes=["cat", "dog", "tree"]), size=label.shape)
        preds.append(scores[0].argmax(0).numpy())
    ref = mean_iou(preds, labels, num_classes=3, reduce_zero_label=True)
    assert abs(got["mIoU"] - ref["mIoU"]) < 1e-6 and abs(got["aAcc"] - ref["aAcc"]) < 1e-6
    assert _resize_shape(48, 80, 64) == (64, 96) and _resize_shape(70, 60, 64) == (64, 64)
