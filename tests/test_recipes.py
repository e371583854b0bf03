"""Recipes: each builds on a tiny model with exactly the intended trainable parameters; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlmkit
from vlmkit.testing import tiny_vlm
from vlmkit.train.recipes import (
    apply_recipe, load_recipe, lora_target_modules, recipe_from_dict, select_trainable_stages, trainable_parameters,
)

from _stages import DropEveryOtherConfig  # noqa: F401  (registers the test stage type)


def _linear_sizes(module: nn.Module, names: tuple[str, ...] | None = None) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear under ``module`` (optionally only those whose last name is in ``names``)."""
    return [
        (m.in_features, m.out_features) for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and (names is None or n.rsplit(".", 1)[-1] in names)
    ]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expected(recipe_name: str, model: nn.Module) -> int:
    """Independent count from the HF model's own attributes (before any recipe touches it)."""
    lm, proj = model.model.language_model, model.model.multi_modal_projector
    if recipe_name in ("lora", "qlora"):
        return sum(8 * (i + o) for i, o in _linear_sizes(lm)) + _numel(proj)
    if recipe_name == "dora":  # + one magnitude per output feature
        return sum(8 * (i + o) + o for i, o in _linear_sizes(lm)) + _numel(proj)
    if recipe_name == "lisa":
        return (sum(8 * (i + o) for i, o in _linear_sizes(lm, ("q_proj", "v_proj")))
                + model.get_input_embeddings().weight.numel() + model.lm_head.weight.numel())
    if recipe_name == "full-projector":
        return _numel(proj)
    raise KeyError(recipe_name)


def _bnb_or_skip():
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        pytest.skip(f"bitsandbytes unavailable: {type(e).__name__}: {e}")
    return bnb


@pytest.mark.parametrize("name", ["lora", "qlora", "dora", "lisa", "full-projector"])
def test_each_recipe_trains_exactly_the_intended_parameters(name):
    if name == "qlora":
        _bnb_or_skip()
    model, _ = tiny_vlm("llava", seed=0)
    expected = _expected(name, model)
    trainable = trainable_parameters(apply_recipe(model, load_recipe(name)))
    assert sum(trainable.values()) == expected
    assert not any("vision_tower" in n for n in trainable), "vision tower must stay frozen"
    if name == "full-projector":
        assert all(n.startswith("model.multi_modal_projector.") for n in trainable)
    elif name == "lisa":
        assert not any("multi_modal_projector" in n for n in trainable)
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == {"q_proj", "v_proj"}
    else:
        assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
        assert not any("lm_head" in n for n in trainable)


def test_lora_recipe_is_family_aware_on_internvl():
    model, _ = tiny_vlm("internvl", seed=0)
    expected = _expected("lora", model)
    peft_model = apply_recipe(model, load_recipe("lora"))
    assert sum(trainable_parameters(peft_model).values()) == expected
    targets = lora_target_modules(tiny_vlm("internvl", seed=0)[0], load_recipe("lora"))
    assert targets and all(t.startswith("model.language_model.") for t in targets)


def test_qlora_quantizes_the_language_model_and_backpropagates():
    bnb = _bnb_or_skip()
    model, processor = tiny_vlm("llava", seed=0)
    n_lm_linear = len(_linear_sizes(model.model.language_model))
    peft_model = apply_recipe(model, load_recipe("qlora"))
    base = peft_model.get_base_model()
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == n_lm_linear and all(".language_model." in n for n in quantized)
    assert all(type(m) is nn.Linear for m in base.model.multi_modal_projector.modules() if isinstance(m, nn.Linear))
    assert base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8

    from conftest import make_batch

    batch = make_batch(processor, ["what color is the circle ?"], [1], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    wrapped = vlmkit.wrap(peft_model)
    wrapped(**batch, labels=labels).loss.backward()
    grads = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in wrapped.named_parameters() if p.requires_grad}


def test_recipe_stages_train_listed_stages_and_freeze_the_rest():
    recipe = recipe_from_dict({
        "name": "s", "method": "lora", "lora": {"r": 2, "target": ["q_proj"]},
        "stages": {"train": ["test_drop_every_other"], "optional": ["read"]},
    })
    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(apply_recipe(model, recipe), DropEveryOtherConfig(scale=1.0))
    notes = select_trainable_stages(wrapped, recipe)
    assert wrapped.stages[0].scale.requires_grad
    assert any("'read' skipped" in n for n in notes)

    frozen = recipe_from_dict({"name": "f", "method": "lora", "lora": {"r": 2, "target": ["q_proj"]}})
    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(apply_recipe(model, frozen), DropEveryOtherConfig(scale=1.0))
    notes = select_trainable_stages(wrapped, frozen)
    assert not wrapped.stages[0].scale.requires_grad
    assert any("does not train it: frozen" in n for n in notes)

    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(apply_recipe(model, recipe))  # required stage absent
    with pytest.raises(ValueError, match=r"stages.train names 'test_drop_every_other'.*--wrap"):
        select_trainable_stages(wrapped, recipe)


def test_lisa_notes_the_missing_segmentation_head():
    model, _ = tiny_vlm("llava", seed=0)
    recipe = load_recipe("lisa")
    notes = select_trainable_stages(vlmkit.wrap(apply_recipe(model, recipe)), recipe)
    assert any("optional stage 'read' skipped" in n for n in notes)


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_keys_name_the_file_key_and_accepted_keys(tmp_path):
    path = _write(tmp_path, "name: x\nmethod: lora\nlora:\n  rank: 8\n")
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "lora" in msg and "'rank'" in msg and "accepted keys" in msg and "'r'" in msg

    path = _write(tmp_path, "name: x\nlora_target: all\n", "top.yaml")
    with pytest.raises(ValueError, match=r"top\.yaml: unknown key\(s\) \['lora_target'\]; accepted keys: .*'lora'"):
        load_recipe(path)


def test_bad_values_and_module_names(tmp_path):
    with pytest.raises(ValueError, match=r"method: unknown method 'qlora'; accepted: \['lora', 'freeze'\]"):
        recipe_from_dict({"name": "x", "method": "qlora"})
    with pytest.raises(ValueError, match=r"train\[0\]: unknown part 'projecter'; accepted: \['projector'"):
        recipe_from_dict({"name": "x", "method": "freeze", "train": ["projecter"]})
    with pytest.raises(ValueError, match=r"lora.r: expected an integer, got 'eight'"):
        recipe_from_dict({"name": "x", "lora": {"r": "eight"}})
    with pytest.raises(ValueError, match=r"stages.train\[0\]: unknown stage type 'nope'; registered stage types: .*'fopru'"):
        recipe_from_dict({"name": "x", "lora": {}, "stages": {"train": ["nope"]}})

    path = _write(tmp_path, "name: x\nlora:\n  target: [q_projj, v_proj]\n", "target.yaml")
    model, _ = tiny_vlm("llava", seed=0)
    with pytest.raises(ValueError) as e:
        apply_recipe(model, load_recipe(path))
    msg = str(e.value)
    assert "target.yaml" in msg and "['q_projj']" in msg and "'q_proj'" in msg and "'gate_proj'" in msg

    path = _write(tmp_path, "name: x\nmethod: freeze\ntrain: [model.no_such_module]\n", "part.yaml")
    with pytest.raises(ValueError, match=r"part\.yaml: part 'model.no_such_module'.*does not exist.*multi_modal_projector"):
        apply_recipe(tiny_vlm("llava", seed=0)[0], load_recipe(path))


def test_load_recipe_by_name_and_unknown_name():
    assert load_recipe("dora").lora.use_dora is True
    assert load_recipe("qlora").quantization.quant_type == "nf4"
    with pytest.raises(FileNotFoundError, match=r"recipes by name: \[.*'full-projector'.*'lora'"):
        load_recipe("no-such-recipe")
