"""SEED image tokenizer (vlmkit.vision.seed): codes, causal Q-Former, VQ, training, save/load, foreign
checkpoints, and SEED tokens inside wrapped tiny LLaVA / InternVL models.

Independent facts used: brute-force nearest codes (torch.cdist), the legacy VQ loss written out by hand,
perturbation of later queries (causality), key names and shapes of the reference ``seed_quantizer.pt``
classes (``AILab-CVC/SEED`` @ 93b3cf4 ``models/seed_qformer/qformer_quantizer.py``), sizes counted
before/after wrapping, step-by-step greedy decoding restricted to the image tokens, round trips.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import vlmkit
from vlmkit.vision import seed as S
from vlmkit.vision.seed import (
    SEED, CausalQFormer, SEEDConfig, SeedImageLogitsProcessor, SeedTokenIds, SeedTokenizer, VectorQuantizer,
    add_seed_tokens, image_token_strings, load_seed_checkpoint, resolve_markers, shapes_caption,
    shapes_pixel_values, train_seed_tokenizer,
)

TINY = dict(codebook=64, code_dim=8, width=32, layers=2, heads=2, intermediate=64, decoder_depth=1,
            decoder_heads=2, contrastive_dim=16)
PROMPT = "user : describe the image . assistant :"


class PatchFeatures(nn.Module):
    """A frozen random patch embedding: pixel_values [B, 3, 32, 32] -> [B, 16, 32]."""

    def __init__(self, dim: int = 32, patch: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, patch, patch)
        self.requires_grad_(False).eval()

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def make_tokenizer(seed: int = 0, **over) -> SeedTokenizer:
    vision = PatchFeatures()
    torch.manual_seed(seed)
    return SeedTokenizer(SEEDConfig(**{**TINY, "vision_dim": 32, **over}), vision).eval()


@pytest.fixture(scope="module")
def shapes():
    from vlmkit.data.shapes import generate

    samples = generate(32, seed=0, size=32)
    return shapes_pixel_values(samples), [shapes_caption(s) for s in samples]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_are_the_reference_and_validation_names_the_value():
    c = SEEDConfig()
    assert (c.num_queries, c.codebook, c.code_dim, c.width, c.beta) == (32, 8192, 32, 768, 0.25)
    assert (c.vq_weight, c.recon_weight, c.image_weight, c.temperature, c.label_smoothing) == (5, 2, 0.5, 0.07, 0.1)
    assert (c.boi, c.eoi, c.role, c.type) == ("<img>", "</img>", "vocabulary", "seed")
    assert image_token_strings(SEEDConfig(codebook=8192))[::8191] == ["<img_00000>", "<img_08191>"]
    data = json.loads(json.dumps(c.to_dict()))
    assert data.pop("type") == "seed" and SEEDConfig(**data) == c
    for bad, word in [(dict(codebook=1), "codebook"), (dict(width=30, heads=4), "width=30"),
                      (dict(markers="x"), "markers"), (dict(image_head="conv"), "image_head"),
                      (dict(image_token_format="<img>"), "same string"), (dict(boi="</img>"), "differ"),
                      (dict(label_smoothing=1.0), "label_smoothing"), (dict(num_queries=0), "num_queries")]:
        with pytest.raises(ValueError, match=word):
            SEEDConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Tokenizer: codes, causality, quantiser
# ---------------------------------------------------------------------------------------------


def test_codes_in_range_nearest_and_deterministic():
    tok = make_tokenizer()
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    codes = tok.encode(px)
    assert codes.dtype == torch.long and codes.shape == (3, 32)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert torch.equal(codes, tok.encode(px))  # eval mode: deterministic
    assert torch.equal(codes[1:2], tok.encode(px[1:2]))  # batch-N row == batch-1
    # independent: brute-force nearest codebook entry (Euclidean) of the projected causal queries
    with torch.no_grad():
        z = tok.encode_task_layer(tok.causal_embeddings(PatchFeatures()(px)))
        nearest = torch.cdist(z.reshape(-1, 8), tok.quantize.embedding.weight).argmin(1).reshape(3, 32)
    assert torch.equal(codes, nearest)
    assert len(set(codes.flatten().tolist())) > 1


def test_causal_mask_later_queries_do_not_reach_earlier_ones():
    torch.manual_seed(0)
    qf = CausalQFormer(width=32, layers=3, heads=2, inner=64, context_dim=24).eval()
    queries, image = torch.randn(2, 32, 32), torch.randn(2, 10, 24)
    base = qf(queries, image)
    for j in (5, 20, 31):
        moved = queries.clone()
        moved[:, j] += 3.0 * torch.randn(32)  # not a constant shift: the input LayerNorm would remove it
        out = qf(moved, image)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j:] - base[:, j:]).abs().amax() > 1e-2  # query j and later do change
    # control: without the mask an early query does see later ones (the test above can fail)
    qf.causal = False
    moved = queries.clone()
    moved[:, 20] += 3.0 * torch.randn(32)
    assert (qf(moved, image)[:, :20] - qf(queries, image)[:, :20]).abs().amax() > 1e-3


def test_causal_mask_inside_the_tokenizer():
    tok = make_tokenizer()
    feats = PatchFeatures()(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        base = tok.causal_embeddings(feats)
        tok.query_tokens[:, 16] += torch.randn(32)
        out = tok.causal_embeddings(feats)
    torch.testing.assert_close(out[:, :16], base[:, :16], rtol=0, atol=1e-6)
    assert (out[:, 16] - base[:, 16]).abs().amax() > 1e-3


def test_vector_quantizer_legacy_loss_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_e=5, e_dim=3, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0., 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
    z = torch.tensor([[[0.9, 0.1, 0.0], [0.6, 0.7, 0.8], [0.1, 0.0, -0.2]]], requires_grad=True)
    z_q, loss, codes = vq(z)
    assert codes.tolist() == [[1, 4, 0]]
    e = torch.tensor([[1., 0, 0], [1, 1, 1], [0, 0, 0]])
    d2 = ((e - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss, d2 + 0.25 * d2)  # both terms have the same value; β on the 2nd
    torch.testing.assert_close(z_q.detach(), e[None])
    (z_q * torch.arange(9.).reshape(1, 3, 3)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(9.).reshape(1, 3, 3))  # straight-through
    # legacy placement: the codebook gets β·2(e−z)/n, the encoder output 1·2(z−e)/n
    vq.zero_grad()
    z2 = z.detach().clone().requires_grad_(True)
    _, loss2, _ = vq(z2)
    loss2.backward()
    n = z2.numel()
    torch.testing.assert_close(z2.grad, 2 * (z2.detach() - e[None]) / n)
    torch.testing.assert_close(vq.embedding.weight.grad[[1, 4, 0]], 0.25 * 2 * (e - z2.detach()[0]) / n)


def test_decode_shapes_heads_and_code_checks():
    for head in ("mlp", "qformer"):
        tok = make_tokenizer(image_head=head, image_embed_dim=20)
        codes = torch.randint(0, 64, (2, 32))
        assert tok.decode(codes).shape == (2, 20)
        assert tok.reconstruct(codes).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="64"):
        tok.decode(torch.full((1, 32), 64))
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        tok.decode(torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ValueError, match="vision_dim"):
        SeedTokenizer(SEEDConfig(**TINY))
    with pytest.raises(ValueError, match=r"C=32"):
        wrong = SeedTokenizer(SEEDConfig(**TINY, vision_dim=32), lambda x: torch.zeros(x.shape[0], 4, 7))
        wrong.encode(torch.zeros(1, 3, 8, 8))


def test_vision_module_is_not_part_of_the_tokenizer():
    tok = make_tokenizer()
    assert not any(k.startswith(("_vision", "conv")) for k in tok.state_dict())
    assert all(not p.requires_grad for p in tok.vision.parameters())
    assert tok.features(torch.zeros(1, 3, 32, 32)).requires_grad is False


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_lowers_the_losses_on_shapes(shapes):
    px, caps = shapes
    tok = make_tokenizer()
    held_px, held_caps = px[:16], caps[:16]

    def losses(phase):
        with torch.no_grad():
            return {k: float(v) for k, v in tok.losses(held_px, held_caps, phase=phase).items()}

    before = losses("qformer")
    hist = train_seed_tokenizer(tok, px, caps, phase="qformer", steps=12, batch_size=16, lr=2e-3, quiet=True)
    after = losses("qformer")
    assert after["contrastive"] < before["contrastive"] - 0.05
    assert len(hist["qformer/contrastive"]) == 12

    q_before = {k: v.clone() for k, v in tok.qformer.state_dict().items()}
    before = losses("codebook")
    train_seed_tokenizer(tok, px, phase="codebook", steps=12, batch_size=16, lr=2e-3, quiet=True)
    after = losses("codebook")
    for key in ("vq", "recon", "image", "loss"):
        assert after[key] < before[key], (key, before, after)
    # the codebook phase keeps the Q-Former frozen
    assert all(torch.equal(q_before[k], v) for k, v in tok.qformer.state_dict().items())
    assert all(p.requires_grad for p in tok.parameters())  # the loop restores requires_grad
    codes = tok.encode(px[:4])
    assert codes.shape == (4, 32) and int(codes.max()) < 64


def test_training_arguments_are_checked(shapes):
    px, caps = shapes
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="caption"):
        train_seed_tokenizer(tok, px, None, phase="qformer", steps=1, quiet=True)
    with pytest.raises(ValueError, match="phase"):
        train_seed_tokenizer(tok, px, caps, phase="all", steps=1, quiet=True)


def test_hashed_text_embedder_is_frozen_and_deterministic():
    emb = S.HashedTextEmbedder(16)
    a = emb(["a red circle", "A red circle!", "a blue square", ""])
    torch.testing.assert_close(a[0], a[1])
    assert not torch.allclose(a[0], a[2]) and torch.equal(a[3], torch.zeros(16))
    torch.testing.assert_close(a[0], (emb.word_vector("a") + emb.word_vector("red") + emb.word_vector("circle")) / 3)
    torch.testing.assert_close(S.HashedTextEmbedder(16)(["a red circle"])[0], a[0])


# ---------------------------------------------------------------------------------------------
# Save / load, foreign checkpoints
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_codes(tmp_path, shapes):
    px, _ = shapes
    tok = make_tokenizer(seed=3, image_head="qformer")
    tok.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / S.CONFIG_FILE).read_text())
    assert meta["config"]["vision_dim"] == 32 and meta["config"]["codebook"] == 64
    loaded = SeedTokenizer.from_pretrained(tmp_path, PatchFeatures()).eval()
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode(px[:6]), tok.encode(px[:6]))
    codes = tok.encode(px[:2])
    torch.testing.assert_close(loaded.decode(codes), tok.decode(codes), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        SeedTokenizer.from_pretrained(tmp_path / "nothing")


def _reference_state(tok: SeedTokenizer) -> dict[str, torch.Tensor]:
    """The tokenizer's weights under the reference checkpoint's names, plus the frozen ViT."""
    inverse = {v: k for k, v in S.FOREIGN_KEY_PREFIXES.items()}
    out = {}
    for k, v in tok.state_dict().items():
        if k.startswith(S.TRAINING_ONLY_PREFIXES):
            continue
        prefix = next((p for p in inverse if k.startswith(p)), None)
        out[k if prefix is None else inverse[prefix] + k[len(prefix):]] = v.clone()
    out["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    return out


def test_reference_key_names_and_shapes_map_onto_the_tokenizer():
    tok = make_tokenizer(image_embed_dim=20)
    own = tok.state_dict()
    W, C, Q = 32, 32, 32
    # key names and shapes of Blip2QformerQuantizer (BERT Q-Former, cross-attention every 2nd layer)
    expected = {
        "query_tokens": (1, Q, W), "ln_vision.weight": (C,),
        "Qformer.bert.embeddings.LayerNorm.weight": (W,),
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": (W, W),
        "Qformer.bert.encoder.layer.0.attention.output.LayerNorm.bias": (W,),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (W, C),
        "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight": (64, W),
        "Qformer.bert.encoder.layer.1.output_query.dense.weight": (W, 64),
        "quantize.embedding.weight": (64, 8), "encode_task_layer.2.weight": (8, W),
        "decode_task_layer.2.weight": (W, 8), "pos_embed": (1, Q, W), "blocks.0.attn.qkv.weight": (3 * W, W),
        "blocks_image.0.mlp.fc1.weight": (4 * W, W), "pos_embed_image": (1, Q, W),
        "image_down.0.weight": (256, W), "image_down.4.weight": (32, 128), "distill_image_proj.weight": (20, Q * 32),
    }
    for key, shape in expected.items():
        assert tuple(own[S.map_foreign_key(key)].shape) == shape, key
    assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in _reference_state(tok)
    assert not any(re.search(r"layer\.\d+\.(intermediate|output)\.", k) for k in own)  # no text-path FFN


def test_foreign_checkpoint_loads_strictly(tmp_path, shapes):
    px, _ = shapes
    src = make_tokenizer(seed=5)
    path = tmp_path / "seed_quantizer.pt"
    torch.save(_reference_state(src), path)
    dst = make_tokenizer(seed=9)
    assert not torch.equal(dst.encode(px[:4]), src.encode(px[:4]))
    report = load_seed_checkpoint(dst, path)
    assert report.ok
    assert report.ignored == ["Qformer.bert.embeddings.position_ids", "visual_encoder.blocks.0.attn.qkv.weight"]
    assert torch.equal(dst.encode(px[:4]), src.encode(px[:4]))
    torch.save({"model": _reference_state(src)}, tmp_path / "wrapped.pth")  # SEED-1 style {"model": ...}
    assert load_seed_checkpoint(make_tokenizer(seed=9), tmp_path / "wrapped.pth").ok

    state = _reference_state(src)
    del state["quantize.embedding.weight"]
    state["Qformer.bert.encoder.layer.0.output.dense.weight"] = torch.zeros(32, 64)  # the removed text FFN
    torch.save(state, tmp_path / "bad.pt")
    fresh = make_tokenizer(seed=9)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_seed_checkpoint(fresh, tmp_path / "bad.pt")
    assert "quantize.embedding.weight" in str(err.value) and "layer.0.output.dense.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing loaded
    report = load_seed_checkpoint(fresh, tmp_path / "bad.pt", strict=False)
    assert report.missing == ["quantize.embedding.weight"]
    assert report.unexpected == ["Qformer.bert.encoder.layer.0.output.dense.weight"]
    state = _reference_state(src)
    state["distill_image_proj.weight"] = torch.zeros(1024, 32 * 32)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="distill_image_proj.weight"):
        load_seed_checkpoint(make_tokenizer(), tmp_path / "shape.pt")


# ---------------------------------------------------------------------------------------------
# Tokens in a vocabulary
# ---------------------------------------------------------------------------------------------


def test_add_seed_tokens_grows_tokenizer_and_embeddings_exactly():
    from vlmkit.testing import tiny_vlm

    model, proc = tiny_vlm("llava")
    tok = proc.tokenizer
    n, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    cfg = SEEDConfig(**TINY)
    ids = add_seed_tokens(tok, cfg, model)
    assert len(tok) == n + 66
    assert model.get_input_embeddings().weight.shape[0] == rows + 66
    assert model.get_output_embeddings().weight.shape[0] == rows + 66
    assert (ids.first_image_id, ids.boi, ids.eoi, ids.boi_id, ids.eoi_id) == (n, "<img>", "</img>", n + 64, n + 65)
    assert [tok.convert_tokens_to_ids(f"<img_{c:05d}>") for c in (0, 7, 63)] == [n, n + 7, n + 63]
    with pytest.raises(ValueError, match="already in the tokenizer"):
        add_seed_tokens(tok, cfg)


def test_markers_are_namespaced_when_the_tokenizer_has_them():
    from vlmkit.testing import build_tokenizer

    internvl_like = build_tokenizer(start_image_token="<img>", end_image_token="</img>")
    plain = build_tokenizer()
    cfg = SEEDConfig(**TINY)
    assert resolve_markers(cfg, internvl_like) == ("<seed_img>", "</seed_img>")
    assert resolve_markers(cfg, plain) == ("<img>", "</img>")
    assert resolve_markers(SEEDConfig(**TINY, markers="namespaced"), plain) == ("<seed_img>", "</seed_img>")
    assert resolve_markers(SEEDConfig(**TINY, markers="reference"), internvl_like) == ("<img>", "</img>")
    old = internvl_like.convert_tokens_to_ids("<img>")
    ids = add_seed_tokens(internvl_like, cfg)
    assert ids.boi == "<seed_img>" and internvl_like.convert_tokens_to_ids("<img>") == old


def test_logits_processor_states():
    ids = SeedTokenIds(first_image_id=10, codebook=4, boi_id=14, eoi_id=15, boi="<img>", eoi="</img>")
    proc = SeedImageLogitsProcessor(ids, num_queries=3)
    rows = torch.tensor([
        [1, 2, 3, 4, 5, 14],          # just after BOI: image tokens only
        [1, 2, 14, 10, 11, 12],       # 3 codes after BOI: EOI only
        [1, 2, 3, 4, 5, 6],           # no BOI: unconstrained
        [14, 10, 11, 12, 15, 3],      # past the image: unconstrained
        [1, 14, 13, 14, 10, 11],      # last BOI counts: 2 codes after it -> image tokens only
    ])
    scores = torch.zeros(5, 20)
    out = proc(rows, scores.clone())
    allowed = torch.isfinite(out)
    assert allowed[0].nonzero().flatten().tolist() == [10, 11, 12, 13]
    assert allowed[1].nonzero().flatten().tolist() == [15]
    assert allowed[2].all() and allowed[3].all()
    assert allowed[4].nonzero().flatten().tolist() == [10, 11, 12, 13]
    # after_boi: the prompt (ending with BOI) is not shown, only the new tokens
    inside = SeedImageLogitsProcessor(ids, num_queries=3, after_boi=True)
    assert torch.isfinite(inside(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 20)))[:, 10:14].all()
    out = torch.isfinite(inside(torch.tensor([[10, 11]]), torch.zeros(1, 20)))
    assert out[0].nonzero().flatten().tolist() == [10, 11, 12, 13]
    out = torch.isfinite(inside(torch.tensor([[10, 11, 12]]), torch.zeros(1, 20)))
    assert out[0].nonzero().flatten().tolist() == [15]
    assert torch.isfinite(inside(torch.tensor([[10, 11, 12, 15]]), torch.zeros(1, 20))).all()


# ---------------------------------------------------------------------------------------------
# SEED in a wrapped language model
# ---------------------------------------------------------------------------------------------


def _wrap(family: str, **over):
    import vlmkit
    from vlmkit.testing import tiny_vlm

    model, proc = tiny_vlm(family)
    tok = proc.tokenizer
    sizes = (len(tok), model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    wrapped = vlmkit.wrap(model, SEEDConfig(**{**TINY, **over}), tokenizer=tok)
    return wrapped, proc, sizes


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_wrapped_model_reads_and_generates_seed_tokens(family):
    wrapped, proc, (n, rows, out_rows) = _wrap(family)
    tok, stage = proc.tokenizer, wrapped.stages[0]
    assert isinstance(stage, SEED)
    assert len(tok) == n + 66 and wrapped.get_input_embeddings().weight.shape[0] == rows + 66
    assert wrapped.base_model.get_output_embeddings().weight.shape[0] == out_rows + 66
    ids = stage.token_ids
    assert ids.first_image_id == n and wrapped.added_tokens["<img_00005>"] == n + 5
    if family == "internvl":  # InternVL's own <img>/</img> stay; SEED's markers are namespaced
        assert stage.markers == ("<seed_img>", "</seed_img>") and ids.boi_id == n + 64
        assert tok.convert_tokens_to_ids("<img>") < n
    else:
        assert stage.markers == ("<img>", "</img>")

    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    codes = stage.encode(px)
    span = stage.image_token_ids(px)
    assert span.shape == (2, 34) and torch.equal(span[:, 1:-1], codes + n)
    assert span[:, 0].eq(ids.boi_id).all() and span[:, -1].eq(ids.eoi_id).all()
    # the prompt text of the span tokenizes to exactly those ids
    text = stage.image_text(px)[1]
    enc = tok("user : " + text + " what is this ? assistant :", return_tensors="pt")
    assert torch.equal(enc.input_ids[0, 2:36], span[1])
    assert stage.codes_from_ids(enc.input_ids[0])[0].tolist() == codes[1].tolist()
    assert stage.from_reference_text(stage.to_reference_text(text)) == text
    assert stage.to_reference_text(text).startswith("<img><img_")

    # forward consumes the image tokens: their (new) embedding rows get the gradient
    out = wrapped(input_ids=enc.input_ids, labels=enc.input_ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = wrapped.get_input_embeddings().weight.grad
    present = set(span[1].tolist())
    touched = set(grad.abs().sum(1).nonzero().flatten().tolist())
    new_touched = {i for i in touched if i >= n}
    assert new_touched == present

    # a prompt with the model's own image placeholders and a SEED image span
    from vlmkit.testing import image_prompt, random_images

    images = random_images(1)
    batch = proc(images=images, text=[image_prompt(proc, "is " + text + " the same ?")], return_tensors="pt")
    assert torch.isfinite(wrapped(**batch, labels=batch["input_ids"]).loss)

    # generation after a text prompt: exactly 32 valid codes per prompt
    wrapped.zero_grad()
    predictor = vlmkit.Predictor(wrapped, proc)
    gen = predictor.generate_image_tokens([PROMPT, "user : a red circle"])
    assert gen.shape == (2, 32) and int(gen.min()) >= 0 and int(gen.max()) < 64
    assert stage.decode(gen).shape == (2, stage.visual_tokenizer.config.image_embed_dim)
    # independent: greedy decoding by hand, argmax over the image-token logits only
    prompt = tok([PROMPT], return_tensors="pt").input_ids
    seq = torch.cat([prompt, torch.tensor([[ids.boi_id]])], dim=1)
    manual = []
    with torch.no_grad():
        for _ in range(32):
            logits = wrapped.base_model(input_ids=seq).logits[0, -1, n:n + 64]
            manual.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([[n + manual[-1]]])], dim=1)
    assert gen[0].tolist() == manual
    assert predictor.generate_image_tokens(prompt)[0].tolist() == manual  # ids prompt, BOI appended
    # a prompt with the model's own image: generate runs from inputs_embeds, still only image tokens
    batch = proc(images=images, text=[image_prompt(proc, "draw it")], return_tensors="pt")
    gen = predictor.generate_image_tokens(batch["input_ids"], batch["attention_mask"],
                                          pixel_values=batch["pixel_values"])
    assert gen.shape == (1, 32) and int(gen.min()) >= 0 and int(gen.max()) < 64


def test_stage_tokenizer_trains_on_the_frozen_model_features():
    wrapped, proc, _ = _wrap("llava")
    stage = wrapped.stages[0]
    lm = {k: v.clone() for k, v in wrapped.base_model.state_dict().items()}
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    stage.visual_tokenizer.set_text_encoder(stage.text_encoder(proc.tokenizer))  # the LM's own embeddings
    hist = train_seed_tokenizer(stage, torch.randn(8, 3, 32, 32), ["a red circle", "a blue square"] * 4,
                                steps=2, batch_size=4, lr=1e-3, quiet=True)
    assert all(len(v) == 2 and all(map(torch.isfinite, map(torch.tensor, v))) for v in hist.values())
    assert all(torch.equal(lm[k], v) for k, v in wrapped.base_model.state_dict().items())  # LM frozen
    assert not torch.equal(before["visual_tokenizer.qformer.encoder.layer.0.attention.self.query.weight"],
                           stage.visual_tokenizer.qformer.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(before["visual_tokenizer.quantize.embedding.weight"],
                           stage.visual_tokenizer.quantize.embedding.weight)


def test_first_image_id_is_checked():
    from vlmkit.testing import tiny_vlm

    n = len(tiny_vlm("llava")[1].tokenizer)
    assert _wrap("llava", first_image_id=n)[0].stages[0].token_ids.first_image_id == n
    with pytest.raises(ValueError, match="first_image_id=7"):
        _wrap("llava", first_image_id=7)


def test_internvl_reference_markers_collide():
    with pytest.raises(ValueError, match="<img>"):
        _wrap("internvl", markers="reference")


def test_wrapped_save_load_keeps_codes_and_token_rows(tmp_path):
    import vlmkit
    from vlmkit.testing import tiny_vlm

    wrapped, proc, _ = _wrap("llava")
    stage = wrapped.stages[0]
    with torch.no_grad():
        stage.visual_tokenizer.quantize.embedding.weight.normal_()
    px = torch.randn(2, 3, 32, 32)
    codes = stage.encode(px)
    rows = wrapped.get_input_embeddings().weight[stage.token_ids.first_image_id:].clone()
    wrapped.save_pretrained(tmp_path)
    model2, proc2 = tiny_vlm("llava")
    loaded = vlmkit.load(model2, tmp_path, tokenizer=proc2.tokenizer)
    assert torch.equal(loaded.stages[0].encode(px), codes)
    assert torch.equal(loaded.get_input_embeddings().weight[stage.token_ids.first_image_id:], rows)
    assert loaded.stages[0].token_ids == stage.token_ids


@pytest.mark.parametrize("variant", ["trainable_token_indices", "modules_to_save"])
def test_lora_with_trainable_new_embeddings(variant):
    from peft import LoraConfig, get_peft_model

    wrapped, proc, (n, _, _) = _wrap("llava")
    stage, tok = wrapped.stages[0], proc.tokenizer
    inner = wrapped.base_model
    new = list(wrapped.added_tokens.values())
    E0, H0 = inner.get_input_embeddings().weight.detach().clone(), inner.get_output_embeddings().weight.detach().clone()
    if variant == "trainable_token_indices":
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                         trainable_token_indices={"embed_tokens": new, "lm_head": new})
    else:
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(wrapped, cfg)
    span = stage.image_token_ids(torch.randn(1, 3, 32, 32))
    x = torch.cat([tok([PROMPT], return_tensors="pt").input_ids, span], dim=1)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    E, H = inner.get_input_embeddings(), inner.get_output_embeddings()
    with torch.no_grad():
        e1 = E(torch.arange(E0.shape[0])[None])[0]
        probe = torch.randn(1, 1, E0.shape[1])
        h1, h0 = H(probe)[0, 0], probe[0, 0] @ H0.t()
    used = sorted(set(x[0, :-1].tolist()) & set(new))  # the last input token feeds no prediction
    assert (e1[used] - E0[used]).abs().sum(1).gt(0).all()  # the image tokens' rows trained
    assert not torch.allclose(h1[n:], h0[n:])
    if variant == "trainable_token_indices":  # only the new rows move
        torch.testing.assert_close(e1[:n], E0[:n], rtol=0, atol=0)
        torch.testing.assert_close(h1[:n], h0[:n])
    gen = vlmkit.Predictor(peft_model, proc).generate_image_tokens(PROMPT)
    assert gen.shape == (1, 32) and int(gen.max()) < 64
