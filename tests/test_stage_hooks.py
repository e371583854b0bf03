"""The core hooks new stages build on: added vocabulary, heads inside forward, replacement encoders."""

from __future__ import annotations

import pytest
import torch
from _stages import AddTokensConfig, DropEveryOtherConfig, HiddenSumHeadConfig, RepeatEncoderConfig
from conftest import make_batch

import vlmkit
from vlmkit.sequence import resize_placeholder_runs
from vlmkit.testing import tiny_vlm

QUESTIONS = ["what shape is it ?", "how many red circle", "is there a blue square ?"]


def test_added_tokens_grow_tokenizer_and_embeddings(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    n_tok, n_rows = len(tok), model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="tokenizer=tokenizer"):
        vlmkit.wrap(model, AddTokensConfig())
    wrapped = vlmkit.wrap(model, AddTokensConfig(), tokenizer=tok)
    assert len(tok) == n_tok + 2
    assert wrapped.added_tokens == {"<a1>": n_tok, "<a2>": n_tok + 1}
    assert wrapped.stages[0].bound == wrapped.added_tokens
    assert model.get_input_embeddings().weight.shape[0] == max(n_rows, n_tok + 2)
    assert model.get_output_embeddings().weight.shape[0] == max(n_rows, n_tok + 2)
    # the new tokens are whole words of the text, not lower-cased or split
    assert tok("red <a1> circle <a2>", add_special_tokens=False)["input_ids"][1::2] == [n_tok, n_tok + 1]


def test_added_token_collision_is_an_error(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="'red' is already in the tokenizer"):
        vlmkit.wrap(model, AddTokensConfig(tokens=("<a1>", "red")), tokenizer=processor.tokenizer)


def test_added_token_rows_survive_save_and_load(tmp_path, family):
    model, processor = tiny_vlm(family, seed=0)
    wrapped = vlmkit.wrap(model, AddTokensConfig(), tokenizer=processor.tokenizer)
    ids = torch.tensor(list(wrapped.added_tokens.values()))
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = torch.randn(2, model.get_input_embeddings().weight.shape[1])
        model.get_output_embeddings().weight[ids] = torch.randn(2, model.get_output_embeddings().weight.shape[1])
    wrapped.save_pretrained(tmp_path)

    fresh, fresh_processor = tiny_vlm(family, seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        vlmkit.load(fresh, tmp_path)
    loaded = vlmkit.load(fresh, tmp_path, tokenizer=fresh_processor.tokenizer)
    assert loaded.added_tokens == wrapped.added_tokens
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(fresh, get)().weight[ids], getattr(model, get)().weight[ids])
    # a tokenizer that already holds the tokens at the saved ids (saved along with the model) is accepted
    again, _ = tiny_vlm(family, seed=0)
    vlmkit.load(again, tmp_path, tokenizer=fresh_processor.tokenizer)


def test_head_forward_gets_hidden_states_and_its_inputs(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig(), HiddenSumHeadConfig())
    plain = vlmkit.wrap(model, DropEveryOtherConfig())
    target = torch.tensor([1.0, -2.0, 0.5])
    with torch.no_grad():
        out = wrapped(**batch, labels=labels, target=target)
        ref = plain(**batch, labels=labels, output_hidden_states=True)
        assembled = plain.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    expected_sum = 0.5 * (ref.hidden_states[-1] * assembled.visual_mask[..., None]).sum(dim=(1, 2))
    assert torch.allclose(out["visual_sum"], expected_sum, atol=1e-5)
    assert torch.allclose(out.loss, ref.loss + ((expected_sum - target) ** 2).mean(), atol=1e-5)
    with torch.no_grad():  # without its target the head leaves the loss alone
        assert torch.allclose(wrapped(**batch, labels=labels).loss, ref.loss, atol=1e-6)


def test_head_loss_trains_the_head_parameter(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    wrapped = vlmkit.wrap(model, HiddenSumHeadConfig())
    out = wrapped(**batch, labels=batch["input_ids"], target=torch.zeros(2))
    out.loss.backward()
    assert wrapped.stages[0].weight.grad is not None and wrapped.stages[0].weight.grad != 0


def test_resize_placeholder_runs_hand_computed():
    P, PAD = 9, 0
    ids = torch.tensor([[0, 0, 5, P, P, 6], [5, P, P, P, P, 7]])  # left padded; row 1 holds two images
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, -100, -100, 6], [5, -100, -100, -100, -100, 7]])
    out_ids, out_mask, out_labels = resize_placeholder_runs(ids, mask, labels, [2, 2, 2], [3, 1, 3], P, PAD)
    # image 0 (row 0): 2 -> 3 slots; images 1 and 2 (row 1, adjacent runs): 2 -> 1 and 2 -> 3
    assert out_ids.tolist() == [[PAD, 5, P, P, P, 6], [5, P, P, P, P, 7]]
    assert out_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out_labels.tolist() == [[-100, 5, -100, -100, -100, 6], [5, -100, -100, -100, -100, 7]]
    right = resize_placeholder_runs(torch.tensor([[5, P, P, 6, 0]]), torch.tensor([[1, 1, 1, 1, 0]]), None,
                                    [2], [1], P, PAD)
    assert right[0].tolist() == [[5, P, 6]] and right[1].tolist() == [[1, 1, 1]] and right[2] is None
    with pytest.raises(ValueError, match="need 5"):
        resize_placeholder_runs(ids, mask, None, [2, 3], [1, 1], P, PAD)


def test_replacement_encoder_with_more_tokens_than_placeholders(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1], padding_side="right")
    wrapped = vlmkit.wrap(model, RepeatEncoderConfig())
    plain = vlmkit.wrap(model)
    with torch.no_grad():
        out = wrapped(**batch)
        tokens = plain.encode_visual(batch["pixel_values"], batch["input_ids"])
    # hand-built: every image's run doubled, the same features twice
    fam = plain.family
    rows = []
    img = 0
    for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
        parts, s = [], 0
        ids = ids[m.bool()]
        while s < len(ids):
            if ids[s] == fam.placeholder_id:
                n = tokens[img].num_uncompressed
                parts.append(torch.cat([tokens[img].embeds, tokens[img].embeds]))
                img += 1
                s += n
            else:
                parts.append(fam.embed(ids[s : s + 1][None])[0])
                s += 1
        rows.append(torch.cat(parts))
    for b, row in enumerate(rows):
        with torch.no_grad():
            ref = model(inputs_embeds=row[None], attention_mask=torch.ones(1, row.shape[0], dtype=torch.long))
        n = row.shape[0]
        assert torch.allclose(out.logits[b, :n], ref.logits[0], atol=1e-4), b
    with torch.no_grad():  # generate works on the processor's prompt too
        batch_left = make_batch(processor, QUESTIONS, [1, 2, 1], padding_side="left")
        gen = wrapped.generate(**batch_left, max_new_tokens=3, do_sample=False)
    assert gen.shape == (3, batch_left["input_ids"].shape[1] + 3)


def test_single_stage_delegation_errors(tiny):
    model, processor = tiny
    predictor = vlmkit.Predictor(vlmkit.wrap(model), processor)
    with pytest.raises(ValueError, match="READConfig"):
        predictor.segment([], [])
    with pytest.raises(ValueError, match="SEEDConfig"):
        predictor.generate_image_tokens("a")
    with pytest.raises(ValueError, match="at most one stage may replace the image encoder"):
        vlmkit.wrap(model, RepeatEncoderConfig(), RepeatEncoderConfig())


def test_load_with_extra_stages_keeps_saved_weights(tmp_path, family):
    model, _ = tiny_vlm(family, seed=0)
    wrapped = vlmkit.wrap(model, HiddenSumHeadConfig())
    with torch.no_grad():
        wrapped.stages[0].weight.fill_(1.25)
    wrapped.save_pretrained(tmp_path)
    fresh, _ = tiny_vlm(family, seed=0)
    loaded = vlmkit.load(fresh, tmp_path, extra=[DropEveryOtherConfig(scale=2.0)])
    assert [c.type for c in loaded.stage_configs] == ["test_drop_every_other", "test_hidden_sum_head"]
    assert loaded.stages[1].weight.item() == 1.25  # the saved head moved from index 0 to 1
    assert loaded.stages[0].scale.item() == 2.0  # the extra stage starts from its config
