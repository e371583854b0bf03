"""Foundation: identity wrap, splicing against hand-built references, bad input, save/load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _stages import DropEveryOtherConfig
from conftest import make_batch

import vlmkit
from vlmkit.testing import tiny_vlm

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?"]


# --- identity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("images", [[1], [1, 1, 2]], ids=["batch1", "padded3"])
def test_identity_logits_and_generate_bit_exact(tiny, images):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[: len(images)], images)
    if len(images) > 1:
        assert (batch["attention_mask"] == 0).any(), "the batch must really be left-padded"
    with torch.no_grad():
        ref_logits = model(**batch).logits
    ref_tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)

    wrapped = vlmkit.wrap(model)
    with torch.no_grad():
        logits = wrapped(**batch).logits
    tokens = wrapped.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)

    assert vlmkit.unwrap(wrapped) is model
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref_logits)


def test_generate_returns_dict_like_transformers(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1])
    ref = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    out = vlmkit.wrap(model).generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)


def test_text_only_passes_through(tiny):
    model, processor = tiny
    enc = processor.tokenizer(["how many ?", "what is the image ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(vlmkit.wrap(model)(**enc).logits, model(**enc).logits)


def test_encode_visual_full_grid(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    wrapped = vlmkit.wrap(model)
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    assert len(tokens) == 3
    h, w = wrapped.family.grid
    for t in tokens:
        assert t.grid == (h, w)
        assert torch.equal(t.index, torch.arange(h * w))
        assert t.embeds.shape == (h * w, model.config.text_config.hidden_size)
    ref = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert torch.equal(tokens[2].embeds, ref[2])


# --- a compressor that keeps every other token: references built by hand ---------------------------
def _manual_sequences(model, batch, keep_every=2):
    """Per sample: (embeddings [L, D], labels [L], is_visual [L]) built with plain Python loops."""
    full = list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    embed = model.get_input_embeddings()
    ph = model.config.image_token_id
    seqs, image = [], 0
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()]
        parts, labels, vis, i = [], [], [], 0
        while i < len(ids):
            if ids[i] == ph:  # this image's run is exactly its uncompressed token count
                kept = full[image][::keep_every]
                parts.append(kept)
                labels += [-100] * kept.shape[0]
                vis += [True] * kept.shape[0]
                i += full[image].shape[0]
                image += 1
            else:
                parts.append(embed(ids[i : i + 1]))
                labels.append(int(ids[i]))
                vis.append(False)
                i += 1
        seqs.append((torch.cat(parts), torch.tensor(labels), torch.tensor(vis)))
    return seqs


def _pad(seqs, side, pad_embed):
    L = max(s[0].shape[0] for s in seqs)
    embeds, masks, labels = [], [], []
    for e, lab, _ in seqs:
        n = L - e.shape[0]
        pad_e = pad_embed.expand(n, -1)
        embeds.append(torch.cat([pad_e, e]) if side == "left" else torch.cat([e, pad_e]))
        m = torch.cat([torch.zeros(n), torch.ones(e.shape[0])]) if side == "left" else torch.cat([torch.ones(e.shape[0]), torch.zeros(n)])
        masks.append(m.long())
        pl = torch.full((n,), -100)
        labels.append(torch.cat([pl, lab]) if side == "left" else torch.cat([lab, pl]))
    return torch.stack(embeds), torch.stack(masks), torch.stack(labels)


def test_dropped_tokens_loss_matches_hand_built_reference(family):
    model, processor = tiny_vlm(family, seed=1)
    # right padding (training), one sample with two images: samples keep different visual counts
    batch = make_batch(processor, QUESTIONS, [1, 2, 1], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig())
    with torch.no_grad():
        out = wrapped(**batch, labels=labels)
        seqs = _manual_sequences(model, batch)
        pad = model.get_input_embeddings()(torch.tensor([processor.tokenizer.pad_token_id]))
        embeds, mask, ref_labels = _pad(seqs, "right", pad)
        ref = model(inputs_embeds=embeds, attention_mask=mask, labels=ref_labels)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out.logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5)
    counts = [int(v.sum()) for _, _, v in seqs]
    assert len(set(counts)) > 1, "the samples should keep different numbers of visual tokens"
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    assert assembled.visual_tokens_per_sample == counts


def test_dropped_tokens_generate_matches_manual_greedy_loop(family):
    model, processor = tiny_vlm(family, seed=2)
    batch = make_batch(processor, QUESTIONS, [1, 2, 1], padding_side="left")
    steps = 5
    tokens = vlmkit.wrap(model, DropEveryOtherConfig()).generate(**batch, max_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        seqs = _manual_sequences(model, batch)
        embed = model.get_input_embeddings()
        pad = embed(torch.tensor([processor.tokenizer.pad_token_id]))
        embeds, mask, _ = _pad(seqs, "left", pad)
        new = []
        for _ in range(steps):  # no cache: recompute the whole sequence every step
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            new.append(nxt)
            embeds = torch.cat([embeds, embed(nxt)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    expected = torch.cat([batch["input_ids"], torch.stack(new, dim=1)], dim=1)
    assert torch.equal(tokens, expected)


def test_language_model_receives_fewer_tokens(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:1], [1])
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            vlmkit.wrap(model, DropEveryOtherConfig())(**batch)
    finally:
        handle.remove()
    n_vis = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert seen == [batch["input_ids"].shape[1] - n_vis // 2]


# --- bad input ---------------------------------------------------------------------------------------
def test_wrong_number_of_images(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1])
    wrapped = vlmkit.wrap(model)
    with pytest.raises(ValueError, match="placeholder"):
        wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"][:1])


def test_pixel_values_of_wrong_shape(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:1], [1])
    with pytest.raises(ValueError, match=r"pixel_values must be \[num_images, 3, 32, 32\].*\(1, 3, 16, 16\)"):
        vlmkit.wrap(model)(input_ids=batch["input_ids"], pixel_values=torch.zeros(1, 3, 16, 16))


def test_unsupported_model_names_type_and_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    families = re.escape(repr(vlmkit.supported_families()))
    assert "llava" in families and "qwen2_5_vl" in families
    with pytest.raises(ValueError, match=r"model_type='llama'.*" + families):
        vlmkit.wrap(model)


def test_bad_stage_arguments(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match="StageConfig"):
        vlmkit.wrap(model, {"type": "fopru"})
    with pytest.raises(ValueError, match="scale must be > 0, got -1"):
        DropEveryOtherConfig(scale=-1)
    wrapped = vlmkit.wrap(model)
    with pytest.raises(ValueError, match="already wrapped"):
        vlmkit.wrap(wrapped)


def test_load_unknown_config_type(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "vlmkit.json").write_text(json.dumps({"format": "vlmkit", "stages": [{"type": "no_such_stage"}]}))
    with pytest.raises(ValueError, match="unknown stage type 'no_such_stage'"):
        vlmkit.load(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="vlmkit.json"):
        vlmkit.load(model, tmp_path / "missing")


def test_load_unknown_config_field(tiny, tmp_path):
    model, _ = tiny
    stage = {"type": "test_drop_every_other", "scale": 1.0, "bogus": 3}
    (tmp_path / "vlmkit.json").write_text(json.dumps({"format": "vlmkit", "stages": [stage]}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        vlmkit.load(model, tmp_path)


# --- save / load ---------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, family):
    model, processor = tiny_vlm(family, seed=3)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1])
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig())
    with torch.no_grad():
        wrapped.stages[0].scale.fill_(1.75)  # a trained value the save must carry
        ref = wrapped(**batch).logits
    wrapped.save_pretrained(tmp_path / "stages")
    wrapped.save_pretrained(tmp_path / "full", save_base_model=True)

    fresh, _ = tiny_vlm(family, seed=3)
    reloaded = vlmkit.load(fresh, tmp_path / "stages")
    assert [c.to_dict() for c in reloaded.stage_configs] == [c.to_dict() for c in wrapped.stage_configs]
    standalone = vlmkit.load(tmp_path / "full")
    assert type(standalone.base_model) is type(model)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, ref)
        assert torch.allclose(standalone(**batch).logits, ref, atol=1e-6)
    saved = json.loads((tmp_path / "stages" / "vlmkit.json").read_text())
    assert saved["stages"] == [{"type": "test_drop_every_other", "scale": 1.0}]


def test_supported_families_and_lazy_import():
    import subprocess
    import sys

    assert vlmkit.supported_families() == [
        "gemma3", "glm4v", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "llava_onevision1_5",
        "mistral3", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm"]
    code = "import sys, vlmkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], "import vlmkit must not import torch/transformers"


def test_peft_lora_on_wrapped_model(tiny):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig())
    assert wrapped.trainable_stage_names() == ["stages.test_drop_every_other"]
    peft_model = get_peft_model(wrapped, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=wrapped.trainable_stage_names()))
    out = peft_model(**batch, labels=labels)
    out.loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or "stages" in n for n in grads)
    assert any("stages.test_drop_every_other.modules_to_save" in n for n in grads), "PEFT's trained copy of the stage must be used"


def test_parse_stage_spec():
    from vlmkit.config import parse_stage_spec

    assert parse_stage_spec("test_drop_every_other:2.5") == DropEveryOtherConfig(scale=2.5)
    assert parse_stage_spec("test_drop_every_other:scale=3") == DropEveryOtherConfig(scale=3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        parse_stage_spec("test_drop_every_other:bogus=1")
    with pytest.raises(ValueError, match="too many values"):
        parse_stage_spec("test_drop_every_other:1,2")
    with pytest.raises(ValueError, match="unknown stage type 'nope'"):
        parse_stage_spec("nope:1")


def test_wrap_a_peft_model_and_reload_adapter_with_plain_peft(tmp_path, family):
    """LoRA on the HF model, vlmkit on top: the adapter stays a plain PEFT adapter of the HF model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, processor = tiny_vlm(family, seed=4)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped = vlmkit.wrap(peft_model, DropEveryOtherConfig())
    out = wrapped(**batch, labels=labels)
    out.loss.backward()
    grads = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or n.startswith("stages.") for n in grads)
    peft_model.save_pretrained(tmp_path)

    fresh, _ = tiny_vlm(family, seed=4)
    reloaded = vlmkit.wrap(PeftModel.from_pretrained(fresh, tmp_path), DropEveryOtherConfig())
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, wrapped(**batch).logits, atol=1e-6)
    assert vlmkit.unwrap(wrapped) is peft_model


def test_wrapper_follows_model_mode_and_num_return_sequences(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1])
    wrapped = vlmkit.wrap(model)
    assert not wrapped.training and not model.training
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(wrapped.generate(**batch, **kw), model.generate(**batch, **kw))


def test_wrap_stays_a_function_whatever_is_imported_first():
    import subprocess
    import sys

    code = "import vlmkit; vlmkit.load; import vlmkit.wrapper; print(callable(vlmkit.wrap) and vlmkit.wrap.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "wrap"
