"""LLaVA-OneVision-1.5 (1-D RoPE) and GLM-4.1V (M-RoPE) on tiny models of the real classes.

The batch is ``vlmkit.compat.make_batch``'s: sample 0 holds one 32×32 image, sample 1 a 32×56 and a 60×30 one
(several images of different sizes in one prompt). Both tiny processors resize to multiples of 8 px (patch 4,
merge 2), so by hand: 32×32 → 8×8 patches → 4×4 = 16 tokens; 32×56 → 8×14 → 4×7 = 28; 60×30 → round(7.5)·8 ×
round(3.75)·8 = 64×32 px → 16×8 → 8×4 = 32. Keep ratio 0.5 keeps ⌊G/2⌋ = 8, 14, 16.

References are independent of the code under test: the unwrapped model (logits, ``generate``, the positions its
rotary embedding receives, ``get_rope_index``), an eager copy of the vision tower (its own attention probabilities,
for FoPru), each sample run alone, and the counts above.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from conftest import shared_tiny

import vlmkit
from vlmkit.compat import make_batch
from vlmkit.compress.divprune import DivPruneConfig
from vlmkit.compress.fopru import FoPruConfig
from vlmkit.compress.random import RandomPruneConfig
from vlmkit.decoder.fastv import FastVConfig
from vlmkit.families import family_for
from vlmkit.sequence import integer_positions

# Glm4vProcessor builds mm_token_type_ids with np.array over tokenizer output, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FAMILIES = ["llava_onevision1_5", "glm4v"]
GRID_THW = [[1, 8, 8], [1, 8, 14], [1, 16, 8]]  # patches of 4 px, by hand (module docstring)
GRIDS = [(4, 4), (4, 7), (8, 4)]  # merged 2×2
KEPT = [8, 14, 16]  # ⌊G/2⌋ of 16, 28, 32
IMAGES_OF_ROW = [[0], [1, 2]]
METHODS = {"random": lambda r: RandomPruneConfig(keep_ratio=r), "divprune": lambda r: DivPruneConfig(keep_ratio=r),
           "fopru": lambda r: FoPruConfig(keep_ratio=r), "fastv": lambda r: FastVConfig(keep_ratio=r, layer=1)}
NEW = 4


@contextlib.contextmanager
def wrapped_model(family, *configs):
    model, processor = shared_tiny(family)
    wrapped = vlmkit.wrap(model, *configs)
    try:
        yield wrapped, model, processor
    finally:
        vlmkit.unwrap(wrapped)


@contextlib.contextmanager
def rope_positions(model):
    """The ``position_ids`` every call of the decoder's rotary embedding receives ([1 or B, S] or [3, B, S])."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

    handle = family_for(model).rotary_embedding.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def layer_inputs(model, layers):
    """Per listed decoder layer: the (sequence length, position_ids, cos) its attention receives in every call (what
    the layer runs on, after any decoder stage's own layer hooks)."""
    seen = {i: [] for i in layers}
    handles = []
    for i in layers:
        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i].append((hidden.shape[1], kwargs.get("position_ids"), kwargs["position_embeddings"][0]))
        handles.append(family_for(model).decoder_attention(i).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw)


# --- layout ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_processor_grids_and_tokens_by_hand(family):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, [0, 1], "right")
    assert batch["image_grid_thw"].tolist() == GRID_THW
    ph = family_for(model).placeholder_id
    assert (batch["input_ids"] == ph).sum(dim=1).tolist() == [16, 28 + 32]
    fam = family_for(model)
    tokens = fam.encode_images(batch["pixel_values"], batch["input_ids"], image_grid_thw=batch["image_grid_thw"])
    assert [t.grid for t in tokens] == GRIDS and [t.num_tokens for t in tokens] == [16, 28, 32]
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    for t, r in zip(tokens, ref):
        assert torch.equal(t.embeds, r) and t.index.tolist() == list(range(r.shape[0]))


def test_tokens_per_tile_is_the_processor_defaults_largest_image():
    """Upper bounds for the num_keep check: the default max pixels of each model's image processor class over
    28² px per token (GLM's smart_resize counts its 2 temporal copies)."""
    from transformers import Glm4vImageProcessor, Qwen2VLImageProcessor

    ov = family_for(shared_tiny("llava_onevision1_5")[0])
    glm = family_for(shared_tiny("glm4v")[0])
    assert ov.tokens_per_tile == Qwen2VLImageProcessor.size["longest_edge"] // 28**2 == 1280
    assert glm.tokens_per_tile == Glm4vImageProcessor.size["longest_edge"] // 2 // 28**2 == 7500
    assert ov.grid == (35, 35) and glm.grid == (86, 86)  # largest squares within
    assert ov.rope_kind == "1d" and glm.rope_kind == "mrope"


def test_wrong_pixel_values_are_refused_with_the_expected_width():
    for family, width in (("llava_onevision1_5", 3 * 4 * 4), ("glm4v", 3 * 2 * 4 * 4)):
        fam = family_for(shared_tiny(family)[0])
        fam.check_pixel_values(torch.zeros(8, width))
        with pytest.raises(ValueError, match=rf"\[num_patches, {width}\]"):
            fam.check_pixel_values(torch.zeros(8, width + 1))


# --- identity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_bit_exact(family):
    """wrap() with no stage: logits and loss (right padding) and greedy generate (left padding) equal the model's."""
    with wrapped_model(family) as (wrapped, model, processor):
        batch = make_batch(processor, [0, 1], "right")
        ph = wrapped.family.placeholder_id  # a training collator's labels: padding and image slots ignored
        labels = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | (batch["input_ids"] == ph), -100)
        with torch.no_grad():
            ref, out = model(**batch, labels=labels), wrapped(**batch, labels=labels)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        batch = make_batch(processor, [0, 1], "left")
        assert torch.equal(_generate(wrapped, batch), _generate(model, batch))


@pytest.mark.parametrize("method", ["random", "fopru", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_gives_the_models_own_positions(family, method):
    """keep_ratio 1: the rotary embedding receives exactly the positions the unwrapped model gives it, in forward
    and at every generate step (prefill and decode), and the outputs are bit-exact."""
    model, processor = shared_tiny(family)
    right, left = make_batch(processor, [0, 1], "right"), make_batch(processor, [0, 1], "left")
    with torch.no_grad(), rope_positions(model) as ref_pos:
        ref_logits, ref_gen = model(**right).logits, _generate(model, left)
    with wrapped_model(family, METHODS[method](1.0)) as (wrapped, _, _):
        with torch.no_grad(), rope_positions(model) as pos:
            logits, gen = wrapped(**right).logits, _generate(wrapped, left)
    assert torch.equal(logits, ref_logits) and torch.equal(gen, ref_gen)
    assert len(pos) == len(ref_pos) == 1 + NEW
    for p, r in zip(pos, ref_pos):
        assert torch.equal(p, r)


def test_glm4v_positions_equal_get_rope_index():
    model, processor = shared_tiny("glm4v")
    for side in ("left", "right"):
        batch = make_batch(processor, [0, 1], side)
        ref, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=batch["attention_mask"])
        with wrapped_model("glm4v") as (wrapped, _, _):
            full = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                    image_grid_thw=batch["image_grid_thw"])
            pos = wrapped.family.language_inputs(full)["position_ids"]
        assert torch.equal(pos[1:], ref)
        assert torch.equal(pos[0], integer_positions(batch["attention_mask"]))


# --- pruned ---------------------------------------------------------------------------------------------------------
def _run(family, *configs, select_calls=None):
    """Right-padded forward and left-padded generate; what the decoder saw. ``select_calls`` records (candidates,
    kept) of every decoder-pruner selection."""
    model, processor = shared_tiny(family)
    right, left = make_batch(processor, [0, 1], "right"), make_batch(processor, [0, 1], "left")
    with wrapped_model(family, *configs) as (wrapped, _, _):
        if select_calls is not None:
            stage = wrapped.stages_of("decoder")[0]
            original = stage.select

            def select(scores, k):
                keep = original(scores, k)
                select_calls.append((scores.numel(), keep.numel()))
                return keep

            stage.select = select
        batches = []
        handle = wrapped.register_assemble_hook(lambda w, b: batches.append(b))
        try:
            with torch.no_grad(), rope_positions(model) as fwd_pos, layer_inputs(model, [0, 1]) as layers:
                out = wrapped(**right)
            with rope_positions(model) as gen_pos:
                gen = _generate(wrapped, left)
            alone = []
            for b in (0, 1):
                one = make_batch(processor, [b], "right")
                with torch.no_grad():
                    logits = wrapped(**one).logits
                alone.append((logits, _generate(wrapped, make_batch(processor, [b], "left"))))
        finally:
            handle.remove()
    return dict(right=right, left=left, logits=out.logits, gen=gen, batch=batches[0], fwd_pos=fwd_pos[0],
                gen_pos=gen_pos, layers=layers, alone=alone)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned(family, method):
    calls = []
    full = _run(family)
    run = _run(family, METHODS[method](0.5), select_calls=calls if method == "fastv" else None)
    right, batch = run["right"], run["batch"]
    real = right["attention_mask"].sum(dim=1).tolist()
    S = right["input_ids"].shape[1]
    removed = [sum(g[0] * g[1] - k for g, k in zip([GRIDS[i] for i in row], [KEPT[i] for i in row]))
               for row in IMAGES_OF_ROW]
    S_kept = max(n - r for n, r in zip(real, removed))

    # exact kept counts per image, and the decoder sees fewer tokens
    if method == "fastv":
        per_call = [(16, 8), (28, 14), (32, 16)]  # row 0's image, then row 1's two images
        alone = [(16, 8)] * 2 + [(28, 14), (32, 16)] * 2  # each sample alone: forward, then generate's prefill
        assert calls == per_call * 2 + alone  # forward, generate's prefill (decode steps select nothing)
        assert batch.visual_tokens_per_sample == [16, 60]  # the input is not shortened …
        assert [n for n, _, _ in run["layers"][0]] == [S] and [n for n, _, _ in run["layers"][1]] == [S_kept]  # … layer 1 is
    else:
        per_image = [int(((batch.image_id == i) & batch.visual_mask).sum()) for i in range(3)]
        assert per_image == KEPT and batch.visual_tokens_per_sample == [8, 30]
        assert [n for n, _, _ in run["layers"][0]] == [n for n, _, _ in run["layers"][1]] == [S_kept] and S_kept < S

    # batch N equals each sample alone (forward at real positions; greedy generate)
    P = run["left"]["input_ids"].shape[1]
    for b, (logits, gen) in enumerate(run["alone"]):
        n = logits.shape[1]
        assert torch.allclose(run["logits"][b, :n], logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(run["gen"][b, P:], gen[0, gen.shape[1] - NEW:])

    # positions of the kept tokens
    if method == "fastv":
        _check_fastv_positions(run, full, [n - r for n, r in zip(real, removed)])
    elif family == "glm4v":
        _check_mrope_positions_follow_cells(run, full)
    else:
        # 1-D: the decoder numbers the (shorter) sequence it sees, as the unwrapped model does for these inputs
        assert torch.equal(run["fwd_pos"], torch.arange(batch.attention_mask.shape[1])[None])
        model = shared_tiny(family)[0]
        with torch.no_grad():
            ref = model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        assert torch.equal(run["logits"], ref)
    _check_decode_positions(family, method, run, full)


def _check_mrope_positions_follow_cells(run, full):
    """Every kept visual token has the (t, h, w) of its cell in the unpruned batch; text tokens keep theirs."""
    new, old = run["batch"], full["batch"]
    for b in range(2):
        cells = {}
        text_old = []
        for s in torch.nonzero(old.attention_mask[b]).flatten().tolist():
            if old.visual_mask[b, s]:
                cells[(int(old.image_id[b, s]), int(old.visual_index[b, s]))] = full["fwd_pos"][:, b, s]
            else:
                text_old.append(full["fwd_pos"][:, b, s])
        text_new = []
        for s in torch.nonzero(new.attention_mask[b]).flatten().tolist():
            if new.visual_mask[b, s]:
                assert torch.equal(run["fwd_pos"][:, b, s], cells[(int(new.image_id[b, s]), int(new.visual_index[b, s]))])
            else:
                text_new.append(run["fwd_pos"][:, b, s])
        assert torch.equal(torch.stack(text_new), torch.stack(text_old))


def _check_fastv_positions(run, full, kept_real):
    """Layer 1 runs on the kept tokens re-packed left-padded: its position_ids are their original slots (right
    padding: integer position = slot) in order, every text slot among them, and its cos are the unpruned cos there."""
    _, pid, cos = run["layers"][1][0]
    _, _, cos0 = full["layers"][1][0]
    batch = run["batch"]
    for b, n in enumerate(kept_real):
        slots = pid.expand(2, -1)[b, -n:]
        assert bool((slots[1:] > slots[:-1]).all())
        text = torch.nonzero(batch.attention_mask[b].bool() & ~batch.visual_mask[b]).flatten()
        assert set(text.tolist()) <= set(slots.tolist())
        assert torch.equal(cos[b, -n:], cos0.expand(2, -1, -1)[b, slots])


def _check_decode_positions(family, method, run, full):
    """Generate's decode steps: M-RoPE (and FastV, which keeps the original numbering) continue exactly where the
    unpruned prompt does; 1-D pre-LLM pruning continues after the shorter prompt (its last position + step)."""
    steps, ref_steps = run["gen_pos"][1:], full["gen_pos"][1:]
    assert len(steps) == len(ref_steps) == NEW - 1
    if family == "glm4v" or method == "fastv":
        for p, r in zip(steps, ref_steps):
            assert torch.equal(p, r)
    else:
        prompt = run["gen_pos"][0]
        for j, p in enumerate(steps, 1):
            assert torch.equal(p[..., 0], prompt[..., -1] + j)


# --- FoPru: the tower's own attention ---------------------------------------------------------------------------
def eager_token_scores(model, batch, layer, monkeypatch) -> list[torch.Tensor]:
    """Per image: the attention probabilities [H, S, S] of vision layer ``layer`` in an eager copy of the tower (its
    own ``eager_attention_forward``, one call per image), mean over heads and queries per key; a CLS key (LLaVA-OV-1.5:
    position 0 of each image) dropped; the patches summed per merged token (4 consecutive patches, no windows)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    target = ref.model.visual.blocks[layer].attn
    module = sys.modules[type(target).__module__]
    original, probs = module.eager_attention_forward, []

    def recording(attn, *args, **kwargs):
        out = original(attn, *args, **kwargs)
        if attn is target:
            probs.append(out[1][0])
        return out

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        ref.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    monkeypatch.undo()
    out = []
    for p, (_, H, W) in zip(probs, batch["image_grid_thw"].tolist()):
        cls = p.shape[-1] - H * W  # 1 for LLaVA-OneVision-1.5's CLS token, 0 for GLM-4.1V
        out.append(p.mean(dim=(0, 1))[cls:].reshape(-1, 4).sum(-1))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fopru_scores_are_the_towers_attention(family, monkeypatch):
    """FoPru's per-token scores equal the eager tower's attention, the model keeps its own kernel; every layer of
    these towers attends over a whole image, the default is the last (the features the merger takes)."""
    model, processor = shared_tiny(family)
    batch = make_batch(processor, [0, 1], "left")
    with wrapped_model(family, FoPruConfig(keep_ratio=0.5)) as (wrapped, _, _):
        assert wrapped.family.global_vision_layers == [0, 1] and wrapped.stages[0].scored_layer == 1
        tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], image_grid_thw=batch["image_grid_thw"])
    eager = eager_token_scores(model, batch, 1, monkeypatch)
    assert [int(e.numel()) for e in eager] == [16, 28, 32]
    for t, e in zip(tokens, eager):
        torch.testing.assert_close(t.scores, e, rtol=1e-5, atol=1e-7)
    assert (model.model.visual.blocks[1].attn.config._attn_implementation == "sdpa"
            and not any(m._forward_pre_hooks for m in model.modules()))


# --- position schemes: the neutral setting is the model ----------------------------------------------------------
@pytest.mark.parametrize("scheme", ["v2pe_delta_1", "mousi_original"])
@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_position_scheme_is_the_model(family, scheme):
    """V2PE with δ = 1 and MouSi ``original`` lay out the model's own positions: logits at every real token (right
    padding) and greedy generate (left padding) are bit-identical to the unwrapped model's."""
    config = {"v2pe_delta_1": vlmkit.V2PEConfig(stride=1, tokens_per_tile=1),
              "mousi_original": vlmkit.MouSiPositionConfig(mode="original")}[scheme]
    model, processor = shared_tiny(family)
    right, left = make_batch(processor, [0, 1], "right"), make_batch(processor, [0, 1], "left")
    with torch.no_grad():
        ref = model(**right).logits
    ref_gen = _generate(model, left)
    with wrapped_model(family, config) as (wrapped, _, _):
        with torch.no_grad():
            logits = wrapped(**right).logits
        gen = _generate(wrapped, left)
    real = right["attention_mask"].bool()
    assert torch.equal(logits[real], ref[real]) and torch.equal(gen, ref_gen)
