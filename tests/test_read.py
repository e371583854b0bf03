"""READ / LISA ``[SEG]`` head on a tiny LLaVA and a tiny SAM.

Independent facts used: hand-worked similarity maps and their points (READ ``similarity_map_to_points`` rules),
the reference's per-point loop for the continuous refinement, RandomPrune's seeded draw (recomputed
here), LISA's loss formulas evaluated by hand, direct calls of SAM's own prompt encoder and mask decoder,
teacher-forced ``forward`` vs. ``segment``, batch-N vs. batch-1, save → load round trips, and the
ground-truth masks of the shapes benchmark.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

import vlmkit
from vlmkit.seg.read import (
    ANSWER_LIST, EVAL_QUESTION, READConfig, continuous_coords, dice_loss, mask_losses, seg_token_mask,
    select_points, sigmoid_ce_loss, similarity_grid,
)
from vlmkit.testing import image_prompt, tiny_vlm


QUESTION = EVAL_QUESTION.format(sent="the red circle")


def make(*configs, **read_kw):
    """A tiny LLaVA wrapped with ``configs`` + a READ head on a tiny SAM; returns (wrapped, processor, head)."""
    torch.manual_seed(0)
    model, proc = tiny_vlm("llava", seed=0)
    read = READConfig(**{"sam": "tiny", **read_kw})
    wrapped = vlmkit.wrap(model, *configs, read, tokenizer=proc.tokenizer)
    return wrapped, proc, wrapped.stages[-1]


def shapes_images(n=2, seed=0):
    from vlmkit.data.shapes import generate

    return [s.image for s in generate(n, seed=seed)]


class ForceTokens(LogitsProcessor):
    """Make row b generate ``rows[b]`` (then end-of-sequence)."""

    def __init__(self, rows, eos):
        self.rows, self.eos, self.start = rows, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        k = input_ids.shape[1] - self.start
        out = torch.full_like(scores, -1e9)
        for b, row in enumerate(self.rows):
            out[b, row[k] if k < len(row) else self.eos] = 0.0
        return out


def forced(proc, rows):
    tok = proc.tokenizer
    ids = [[tok.convert_tokens_to_ids(t) for t in row] for row in rows]
    return LogitsProcessorList([ForceTokens(ids, tok.eos_token_id)])


def teacher_forced_logits(wrapped, proc, images, answers):
    """mask_logits of one forward over prompt + answer (the training path), right padded."""
    texts = [image_prompt(proc, QUESTION) + " " + a for a in answers]
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return wrapped(**inputs, sam_images=images).mask_logits


# ---------------------------------------------------------------------------------------------
# Config, shift convention, losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"sam": "vit_x"}, "'vit_x'"), ({"points": -1}, "-1"), ({"points": 2.5}, "2.5"),
    ({"pos_thresh": 0.2, "neg_thresh": 0.5}, "neg_thresh=0.5"), ({"down_sample": 0}, "down_sample"),
    ({"grid_view": "crop"}, "'crop'"), ({"token": "[ SEG]"}, "'[ SEG]'"), ({"bce_weight": -1.0}, "-1.0"),
    ({"continuous_points": 1}, "continuous_points"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        READConfig(**kwargs)


def test_config_round_trip_and_defaults():
    c = READConfig(sam="vit_h", sam_checkpoint="/x/sam_vit_h_4b8939.pth", points=30, pos_thresh=0.8, neg_thresh=0.2)
    d = c.to_dict()
    assert d["type"] == "read" and READConfig.from_dict(d) == c
    assert (c.ce_weight, c.bce_weight, c.dice_weight, c.dice_scale, c.down_sample) == (1.0, 2.0, 0.5, 1000.0, 2)


def test_seg_token_mask_marks_the_preceding_position():
    ids = torch.tensor([[5, 7, 9, 7, 3], [7, 1, 2, 3, 7]])
    att = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # the last [SEG] of row 1 is padding
    m = seg_token_mask(ids, 7, att)
    assert m.tolist() == [[True, False, True, False, False], [False] * 5]


def test_losses_match_hand_computation():
    logits = torch.zeros(1, 2, 2)
    target = torch.ones(1, 2, 2)
    # sigmoid(0) = 0.5 everywhere: numerator 2·4·0.5/1000, denominator 4·0.5/1000 + 4/1000
    expect_dice = 1 - (0.004 + 1e-6) / (0.006 + 1e-6)
    assert dice_loss(logits, target).item() == pytest.approx(expect_dice, rel=1e-5)
    assert sigmoid_ce_loss(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)
    # two samples, three masks in all: per-mask values averaged over the masks of the batch
    a, b = torch.randn(2, 3, 4), torch.randn(1, 5, 6)
    ta, tb = (torch.rand(2, 3, 4) > 0.5).float(), (torch.rand(1, 5, 6) > 0.5).float()
    bce, dice = mask_losses([a, b], [ta, tb])
    per = [F.binary_cross_entropy_with_logits(x, t) for x, t in ((a[0], ta[0]), (a[1], ta[1]), (b[0], tb[0]))]
    assert bce.item() == pytest.approx(sum(v.item() for v in per) / 3, rel=1e-5)
    assert dice.item() == pytest.approx((dice_loss(a, ta).sum() + dice_loss(b, tb).sum()).item() / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Similarity-as-Points
# ---------------------------------------------------------------------------------------------

# 4×4 similarity grid; its 2×2 blocks average (bilinear ×1/2) to TL 4, TR 0, BL 10, BR 6.
GRID = torch.tensor([
    [1.0, 3.0, 0.0, 0.0],
    [5.0, 7.0, 0.0, 0.0],
    [10.0, 10.0, 6.0, 6.0],
    [10.0, 10.0, 6.0, 6.0],
])


def test_points_match_a_hand_worked_map():
    # image H=20, W=40; the 2×2 map covers the centred 20×20 crop → padded to 2×4 with -1 on the left/right:
    #   [-1, 0.4, 0.0, -1]      cell (r, c) → pixel (floor((c + .5)·40/4), floor((r + .5)·20/2))
    #   [-1, 1.0, 0.6, -1]      positive: (1,1) → (15, 15); negative: (0,2) → (25, 5);
    #                           neutral in index order: (0,1) → (15, 5), (1,2) → (25, 15)
    p = select_points(GRID, (20, 40), num_points=30, down_sample=2)
    assert p.labels.tolist() == [1, 0, -1, -1]
    assert p.coords.tolist() == [[15, 15], [25, 5], [15, 5], [25, 15]]
    assert torch.allclose(p.score_map, torch.tensor([[-1, 0.4, 0.0, -1], [-1, 1.0, 0.6, -1]]))
    assert select_points(GRID, (20, 40), num_points=3, down_sample=2).labels.tolist() == [1, 0, -1]
    # "full" view: the map is squashed over the whole image, no padding: cell (r, c) → ((c+.5)·20, (r+.5)·10)
    q = select_points(GRID, (20, 40), num_points=30, down_sample=2, grid_view="full")
    assert q.coords.tolist() == [[10, 15], [30, 5], [10, 5], [30, 15]]


def test_pruned_cells_are_never_points_and_flat_maps_give_none():
    g = GRID.clone()
    g[:2, 2:] = float("nan")  # the whole TR block pruned: filled with the kept minimum (1), then -1
    p = select_points(g, (20, 20), num_points=30, down_sample=2)
    # kept blocks TL 4, BL 10, BR 6 → normalised 0, 1, 1/3; TR never chosen
    assert p.labels.tolist() == [1, 0, -1]
    assert p.coords.tolist() == [[5, 15], [5, 5], [15, 15]]
    assert p.score_map[0, 1].item() == -1.0
    part = GRID.clone()
    part[2, 0] = float("nan")  # one BL cell pruned: filled with the kept minimum 0 → BL averages 7.5
    score = select_points(part, (20, 20), down_sample=2).score_map  # max 7.5 now: BR 6/7.5, TL 4/7.5
    assert torch.allclose(score, torch.tensor([[4 / 7.5, 0.0], [1.0, 0.8]]))
    assert select_points(torch.full((4, 4), 2.5), (20, 20)).num_points == 0  # flat: no points, no NaN
    assert select_points(GRID, (20, 20), num_points=0).num_points == 0


def test_similarity_grid_is_a_raw_dot_product_with_nan_holes():
    seg = torch.tensor([1.0, 2.0, 0.0])
    img = torch.tensor([[1.0, 1.0, 5.0], [3.0, 0.0, 0.0]])
    sim = similarity_grid(seg, img, torch.tensor([3, 0]), (2, 2))
    assert sim[1, 1].item() == 3.0 and sim[0, 0].item() == 3.0  # not normalised, not cosine
    assert torch.isnan(sim[0, 1]) and torch.isnan(sim[1, 0])


def test_continuous_refinement_matches_the_reference_loop():
    torch.manual_seed(0)
    sim = torch.randn(3, 3)
    coords = torch.tensor([[0.0, 0.0], [4.0, 7.0], [8.0, 8.0]])
    H = W = 9
    got = continuous_coords(sim, coords, (H, W), "full")
    # reference (READ's Discrete_to_Continuous): loop over points, non-separable weights
    norm = (sim - sim.min()) / (sim.max() - sim.min())
    full = F.interpolate(norm[None, None], (H, W), mode="bilinear", align_corners=False)[0, 0].double().numpy()
    prob = np.exp(full - full.max())
    prob /= prob.sum()
    gy, gx = np.mgrid[0:H, 0:W]
    for (x, y), (cx, cy) in zip(coords.tolist(), got.tolist()):
        wgt = np.exp(-((gx - x) ** 2 + (gy - y) ** 2)) * prob
        wgt /= wgt.sum()
        assert cx == pytest.approx((gx * wgt).sum(), abs=1e-4) and cy == pytest.approx((gy * wgt).sum(), abs=1e-4)
    assert got[0, 0] > 0 and got[2, 0] < 8  # corner points move inwards
    leaf = sim.clone().requires_grad_(True)  # the coordinates are differentiable in the map (READ's point)
    continuous_coords(leaf, coords, (H, W), "full").sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def _one_hot_hidden(batch, dim, kept_cells, seg_pos, seg_vec):
    hidden = torch.zeros(1, batch.input_ids.shape[1], dim)
    vis = torch.nonzero(batch.visual_mask[0]).flatten()
    assert len(vis) == len(kept_cells)
    for pos, cell in zip(vis.tolist(), kept_cells):
        hidden[0, pos, cell] = 1.0  # the image state of grid cell `cell` is e_cell
    hidden[0, seg_pos] = seg_vec
    return hidden


@pytest.mark.parametrize("prune", ["random", "fopru"])
def test_similarity_map_lands_on_the_right_cells_after_pruning(prune):
    from vlmkit.compress.fopru import FoPruConfig
    from vlmkit.compress.random import RandomPruneConfig

    cfg = RandomPruneConfig(keep_ratio=0.5, seed=3) if prune == "random" else FoPruConfig(keep_ratio=0.5)
    wrapped, proc, head = make(cfg, points=30, down_sample=1, continuous_points=False)
    image = shapes_images(1)[0]
    inputs = proc(images=[[image]], text=[image_prompt(proc, QUESTION) + " sure , [SEG] ."], return_tensors="pt")
    batch = wrapped.assemble(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    if prune == "random":  # RandomPrune's draw, recomputed: 8 of the 16 cells, in grid order
        kept = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:8].sort().values.tolist()
    else:
        kept = batch.tokens[0].index.tolist()
    assert len(kept) == 8
    pruned = sorted(set(range(16)) - set(kept))
    target, runner_up = kept[-2], kept[0]
    seg_vec = torch.zeros(64)
    seg_vec[target], seg_vec[runner_up], seg_vec[pruned[0]] = 3.0, 1.0, 5.0  # pruned cells have no token
    (p,) = torch.nonzero(seg_token_mask(batch.input_ids, head.seg_token_id)[0]).flatten().tolist()
    hidden = _one_hot_hidden(batch, 64, kept, p, seg_vec)
    prompt = head.point_prompt(batch, hidden, 0, p, (64, 64))
    score = prompt.score_map.flatten()
    assert score[target] == 1.0 and score[runner_up].item() == pytest.approx(1 / 3)
    assert all(score[c] == -1.0 for c in pruned) and all(score[c] == 0.0 for c in kept if c not in (target, runner_up))
    # points: the target (positive), the other kept cells (negative), the runner-up (neutral); cell → pixel·16
    cell = lambda xy: int(xy[1] // 16) * 4 + int(xy[0] // 16)  # noqa: E731
    cells = [cell(xy) for xy in prompt.coords.tolist()]
    assert cells[0] == target and prompt.labels[0] == 1
    assert prompt.coords[0].tolist() == [(target % 4 + 0.5) * 16, (target // 4 + 0.5) * 16]
    assert sorted(cells) == kept and cells[-1] == runner_up and prompt.labels[-1] == -1
    assert (prompt.labels[1:-1] == 0).all()


# ---------------------------------------------------------------------------------------------
# SAM prompting, segment
# ---------------------------------------------------------------------------------------------


def test_prompt_tokens_are_points_pad_seg_for_read_and_seg_alone_for_lisa():
    images = shapes_images(1)
    for points, expected in ((30, 16 + 2), (0, 1)):  # 4×4 grid, down_sample 1: 16 points + pad + [SEG]
        wrapped, proc, head = make(points=points, down_sample=1)
        seen = []
        hook = head.mask_decoder.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["sparse_prompt_embeddings"]), with_kwargs=True)
        logits = teacher_forced_logits(wrapped, proc, images, ["sure , [SEG] ."])
        hook.remove()
        assert [s.shape[1] for s in seen] == [expected]
        if points == 0:  # LISA: the projected [SEG] state alone, through SAM's own modules
            sam = head.sam
            from vlmkit.seg.sam import embed_images, preprocess_image

            inp = preprocess_image(sam, images[0])
            emb = embed_images(sam, [inp])
            _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=seen[0], dense_prompt_embeddings=dense,
                                      multimask_output=False)
            ref = sam.postprocess_masks(low, inp.input_size, inp.original_size)[0, 0]
            assert torch.allclose(logits[0][0], ref, atol=1e-5)


def test_segment_gives_one_mask_per_generated_seg_at_original_size():
    wrapped, proc, head = make(points=30)
    wide = shapes_images(2, seed=5)[1].resize((80, 48))  # W=80, H=48
    images = [shapes_images(1)[0], wide]
    prompts = [image_prompt(proc, QUESTION)] * 2
    rows = [["[SEG]", ".", "[SEG]"], ["sure", "."]]
    preds = vlmkit.Predictor(wrapped, proc, prompt_style="raw").segment(images, prompts, max_new_tokens=6,
                                                                        logits_processor=forced(proc, rows))
    masks, texts = [p.masks for p in preds], [p.text for p in preds]
    assert texts == ["[SEG] . [SEG]", "sure ."]
    assert masks[0].dtype == torch.bool and masks[0].shape == (2, 64, 64)
    assert masks[1].shape == (0, 48, 80)  # no [SEG]: no mask
    assert 0 < masks[0].float().mean() < 1
    # the same text teacher-forced through forward (the training path) gives the same masks
    ref = teacher_forced_logits(wrapped, proc, images, ["[SEG] . [SEG]", "sure ."])
    assert torch.equal(ref[0] > 0, masks[0]) and ref[1].shape == (0, 48, 80)
    # batch of one == batch of two
    alone = [p.masks for p in vlmkit.Predictor(wrapped, proc, prompt_style="raw").segment(
        images[:1], prompts[:1], max_new_tokens=6, logits_processor=forced(proc, rows[:1]))]
    assert torch.equal(alone[0], masks[0])


def test_errors_name_what_is_missing():
    model, proc = tiny_vlm("llava", seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        vlmkit.wrap(model, READConfig(sam="tiny"))
    with pytest.raises(ValueError, match="sam_checkpoint"):
        vlmkit.wrap(model, READConfig(sam="vit_b"), tokenizer=proc.tokenizer)
    wrapped, proc, _ = make()
    images = shapes_images(1)
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=[images], text=[image_prompt(proc, QUESTION) + " sure , [SEG] ."], return_tensors="pt")
    with pytest.raises(ValueError, match=r"n_seg=1"):
        wrapped(**inputs, sam_images=images, masks=[torch.zeros(2, 64, 64)])
    with pytest.raises(ValueError, match="processor"):
        vlmkit.Predictor(wrapped, None, prompt_style="raw").segment(images, [QUESTION])


# ---------------------------------------------------------------------------------------------
# Training with the lisa recipe on the shapes referring data
# ---------------------------------------------------------------------------------------------


def refseg_records(tmp_path, n_images=3):
    """(image, sentence, mask) per ref, read back from the COCO / RefCOCO files of the shapes benchmark."""
    from PIL import Image

    from vlmkit.data.shapes import generate, write_coco_refs
    from vlmkit.seg.refseg_data import annotation_mask, load_instances, load_refs

    samples = generate(n_images, seed=2)
    paths = write_coco_refs(samples, tmp_path)
    instances, refs = load_instances(paths["instances"]), load_refs(paths["refs"])
    images = {s.image_id: s.image for s in samples}
    anns = {a["id"]: a for a in instances["annotations"]}
    out = []
    for ref in refs:
        img = images[ref["image_id"]]
        mask = annotation_mask(anns[ref["ann_id"]]["segmentation"], img.height, img.width)
        out.append((img, ref["sentences"][0]["sent"], mask))
    assert all(isinstance(im, Image.Image) for im, _, _ in out)
    return out


def test_training_lowers_the_loss_and_changes_only_the_intended_parameters(tmp_path):
    from vlmkit.seg.read import SHORT_QUESTION_LIST
    from vlmkit.train.data import Conversation, collate, encode_conversation
    from vlmkit.train.loop import build_model
    from vlmkit.train.recipes import load_recipe

    torch.manual_seed(0)
    model, proc = tiny_vlm("llava", seed=0)
    tok = proc.tokenizer
    recipe = load_recipe("lisa")
    # build_model adds [SEG] and grows the embeddings before PEFT wraps them, as `vlmkit finetune` does
    wrapped, notes = build_model(model, recipe, [READConfig(sam="tiny", down_sample=1)], tokenizer=tok)
    assert not any("'read'" in n for n in notes)
    head = wrapped.stages[0]

    records = refseg_records(tmp_path)[:4]
    feats, images, masks = [], [], []
    for i, (img, sent, mask) in enumerate(records):
        conv = Conversation(str(i), [
            {"role": "user", "content": "<image>\n" + SHORT_QUESTION_LIST[0].format(class_name=sent)},
            {"role": "assistant", "content": ANSWER_LIST[1]},  # "Sure, [SEG]."
        ], [str(i)])
        feats.append(encode_conversation(conv, proc, "plain", load_image=lambda k: records[int(k)][0]))
        images.append(img)
        masks.append(torch.as_tensor(mask)[None].float())
    batch = collate(feats, tok.pad_token_id)
    assert (batch["labels"] == head.seg_token_id).sum() == len(records)  # [SEG] is trained on

    def loss():
        wrapped.eval()
        with torch.no_grad():
            return wrapped(**batch, sam_images=images, masks=masks)

    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    frozen_sam = {k: v.clone() for part in ("image_encoder", "prompt_encoder")
                  for k, v in getattr(head.sam, part).state_dict(prefix=part + ".").items()}
    assert not any(p.requires_grad for p in head.sam.image_encoder.parameters())
    assert not any(p.requires_grad for p in head.sam.prompt_encoder.parameters())
    out0 = loss()
    c = head.config
    assert out0.loss.item() == pytest.approx(
        (c.ce_weight * out0.ce_loss + c.bce_weight * out0.mask_bce_loss + c.dice_weight * out0.mask_dice_loss).item())
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    wrapped.train()
    for _ in range(6):
        opt.zero_grad()
        wrapped(**batch, sam_images=images, masks=masks).loss.backward()
        opt.step()
    out1 = loss()
    assert out1.loss.item() < out0.loss.item()
    assert out1.mask_bce_loss.item() < out0.mask_bce_loss.item()

    changed = {n for n, p in wrapped.named_parameters() if not torch.equal(p.detach(), before[n])}
    intended = ("lora_", "modules_to_save", "stages.read.text_hidden_fcs.", "stages.read.mask_decoder.")
    assert changed and all(any(k in n for k in intended) for n in changed), sorted(changed)[:5]
    for k in intended:
        assert any(k in n for n in changed), k
    now = {k: v for part in ("image_encoder", "prompt_encoder")
           for k, v in getattr(head.sam, part).state_dict(prefix=part + ".").items()}
    assert all(torch.equal(now[k], v) for k, v in frozen_sam.items())


# ---------------------------------------------------------------------------------------------
# Evaluation harness, save / load
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vlmkit.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("readeval")
    write_dataset(root / "shapes", 3, seed=0)
    return root


def test_shapes_refseg_task_runs_through_the_runner_with_a_read_head(tmp_path, data_root):
    from vlmkit.evaluation import evaluate
    from vlmkit.evaluation.metrics import intersection_and_union
    from vlmkit.evaluation.readers import load_mask

    wrapped, proc, head = make(points=30)
    lm_head = wrapped.base_model.lm_head  # bias the [SEG] logit so the random model answers with [SEG]
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features))
    with torch.no_grad():
        lm_head.bias[head.seg_token_id] = 100.0
    res = evaluate(wrapped, "shapes_refseg_read", tmp_path / "out", processor=proc, data_root=data_root, limit=3,
                   batch_size=2, gen_kwargs={"max_new_tokens": 2}, quiet=True)
    r = res["results"]["shapes_refseg_read"]
    assert 0.0 <= r["cIoU,none"] <= 1.0 and 0.0 <= r["gIoU,none"] <= 1.0
    (path,) = (tmp_path / "out").rglob("*_samples_shapes_refseg_read.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and all(x["output"] == "[SEG] [SEG]" and x["parsed"]["num_masks"] == 2 for x in lines)
    # doc 0 re-predicted directly with segment: the runner scored the first [SEG]'s mask
    from vlmkit.evaluation.runner import load_docs
    from vlmkit.evaluation.tasks import get_task, render_prompt
    from vlmkit.evaluation.readers import load_image

    task = get_task("shapes_refseg_read")
    doc = load_docs(task, data_root)[0]
    image = load_image(doc)
    (pred,) = vlmkit.Predictor(wrapped, proc, prompt_style="raw").segment(
        [image], [image_prompt(proc, render_prompt(task, doc))], max_new_tokens=2)
    masks = pred.masks
    inter, union, _ = intersection_and_union(masks[0].numpy().astype(np.int64), load_mask(doc["mask"]), 2, 255)
    assert lines[0]["scores"]["intersection"] == int(inter[1]) and lines[0]["scores"]["union"] == int(union[1])
    assert lines[0]["parsed"]["fg_pixels"] == int(masks[0].sum())


def test_save_load_round_trip_keeps_masks(tmp_path):
    from vlmkit.seg.sam import tiny_sam

    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam(seed=3).state_dict(), ckpt)
    wrapped, proc, head = make(points=30, sam_checkpoint=str(ckpt))
    with torch.no_grad():  # move every saved weight away from its fresh value
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        wrapped.get_input_embeddings().weight[head.seg_token_id] += 0.5
    images = shapes_images(2, seed=7)
    prompts = [image_prompt(proc, QUESTION)] * 2
    rows = [["[SEG]", ".", "[SEG]"], ["sure", ",", "[SEG]"]]
    masks = [p.masks for p in vlmkit.Predictor(wrapped, proc, prompt_style="raw").segment(
        images, prompts, max_new_tokens=5, logits_processor=forced(proc, rows))]
    logits = teacher_forced_logits(wrapped, proc, images, ["[SEG] . [SEG]", "sure , [SEG]"])
    wrapped.save_pretrained(tmp_path / "saved")

    from safetensors.torch import load_file

    keys = load_file(tmp_path / "saved" / "vlmkit_stages.safetensors").keys()
    assert not any("image_encoder" in k or "prompt_encoder" in k for k in keys)  # frozen SAM is not copied
    assert any("text_hidden_fcs" in k for k in keys) and any("mask_decoder" in k for k in keys)

    model2, proc2 = tiny_vlm("llava", seed=0)
    loaded = vlmkit.load(model2, tmp_path / "saved", tokenizer=proc2.tokenizer)
    masks2 = [p.masks for p in vlmkit.Predictor(loaded, proc2, prompt_style="raw").segment(
        images, prompts, max_new_tokens=5, logits_processor=forced(proc2, rows))]
    assert all(torch.equal(a, b) for a, b in zip(masks, masks2))
    logits2 = teacher_forced_logits(loaded, proc2, images, ["[SEG] . [SEG]", "sure , [SEG]"])
    assert all(torch.equal(a, b) for a, b in zip(logits, logits2))
    # control: the same base without the saved head weights gives other masks
    fresh, proc3, _ = make(points=30, sam_checkpoint=str(ckpt))
    other = teacher_forced_logits(fresh, proc3, images, ["[SEG] . [SEG]", "sure , [SEG]"])
    assert not torch.allclose(other[0], logits[0])


def test_samples_without_seg_need_no_image_or_mask():
    wrapped, proc, head = make(points=30)
    images = shapes_images(2)
    texts = [image_prompt(proc, QUESTION) + a for a in (" sure , [SEG] .", " no .")]
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
    out = wrapped(**inputs, sam_images=[images[0], None], masks=[torch.zeros(1, 64, 64), None])
    assert out.mask_logits[0].shape == (1, 64, 64) and out.mask_logits[1].shape == (0, 0, 0)
    with pytest.raises(ValueError, match="sam_images"):
        wrapped(**inputs, sam_images=[None, images[1]])


def test_internvl_family():
    model, proc = tiny_vlm("internvl", seed=0)
    wrapped = vlmkit.wrap(model, READConfig(sam="tiny", grid_view="full", down_sample=1), tokenizer=proc.tokenizer)
    images = shapes_images(2)
    prompts = [image_prompt(proc, QUESTION)] * 2
    preds = vlmkit.Predictor(wrapped, proc, prompt_style="raw").segment(
        images, prompts, max_new_tokens=4, logits_processor=forced(proc, [["[SEG]"], ["no", "."]]))
    masks, texts = [p.masks for p in preds], [p.text for p in preds]
    assert texts == ["[SEG]", "no ."] and masks[0].shape == (1, 64, 64) and masks[1].shape == (0, 64, 64)
    ref = teacher_forced_logits(wrapped, proc, images, ["[SEG]", "no ."])
    assert torch.equal(ref[0] > 0, masks[0])


def test_cli_eval_on_a_saved_read_model(tmp_path, data_root, capsys):
    from vlmkit.cli import main

    wrapped, proc, _ = make(points=30)
    wrapped.save_pretrained(tmp_path / "model", save_base_model=True)
    proc.save_pretrained(tmp_path / "model")  # its tokenizer holds [SEG] at the saved id
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "shapes_refseg_read", "--output", str(out),
                 "--data-root", str(data_root), "--limit", "2", "--gen-kwargs", "max_new_tokens=3", "--quiet"]) == 0
    (path,) = out.rglob("*_results.json")
    res = json.loads(path.read_text())["results"]["shapes_refseg_read"]
    assert 0.0 <= res["cIoU,none"] <= 1.0 and 0.0 <= res["gIoU,none"] <= 1.0
    assert "cIoU" in capsys.readouterr().out
