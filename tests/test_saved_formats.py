"""Saved models: the format-1 files (stage weights keyed by list position) still load and give the outputs
they gave when saved; format 2 keys weights by stage type, so adding a stage does not rename them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _stages import DropEveryOtherConfig, HiddenSumHeadConfig, RepeatEncoderConfig
from safetensors.torch import load_file

import vlmkit
from vlmkit.testing import image_prompt, random_images, tiny_vlm

V1 = Path(__file__).parent / "data" / "v1_save"


def _v1_batch(processor):
    """The batch ``expected_outputs.safetensors`` was computed on (when the v1 files were written)."""
    images = random_images(2, seed=3)
    processor.tokenizer.padding_side = "left"
    texts = [image_prompt(processor, "what is it ?"), image_prompt(processor, "how many shapes are there ?")]
    return processor(images=[[images[0]], [images[1]]], text=texts, return_tensors="pt", padding=True)


def test_format_1_save_loads_with_identical_outputs():
    meta = json.loads((V1 / "vlmkit.json").read_text())
    assert meta["version"] == 1 and [s["type"] for s in meta["stages"]] == ["pvc", "v2pe"]
    assert sorted({k.split(".")[0] for k in load_file(V1 / "vlmkit_stages.safetensors")}) == ["0"]  # old keys
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.load(model, V1)
    saved = load_file(V1 / "vlmkit_stages.safetensors")
    for key, value in wrapped.stages.state_dict().items():  # every weight came back, under its type's name
        assert key.startswith("pvc.") and torch.equal(value, saved["0." + key[len("pvc."):]])
    expected = load_file(V1 / "expected_outputs.safetensors")
    batch = _v1_batch(processor)
    with torch.no_grad():
        _assert_fixture_logits(wrapped(**batch).logits, expected["logits"])
        assert torch.equal(wrapped.generate(**batch, max_new_tokens=4, do_sample=False), expected["generated"])


def _assert_fixture_logits(logits: torch.Tensor, expected: torch.Tensor) -> None:
    """The fixture was computed on another CPU: float32 kernels round differently across CPUs (1.8e-7 at most
    on logits of magnitude ≤ 0.62, measured on a second machine), a wrong or missing weight moves them by far more."""
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_format_1_resaved_as_format_2_round_trips(tmp_path):
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.load(model, V1)
    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vlmkit.json").read_text())["version"] == 2
    assert {k.split(".")[0] for k in load_file(tmp_path / "vlmkit_stages.safetensors")} == {"pvc"}
    again = vlmkit.load(tiny_vlm("llava", seed=0)[0], tmp_path)
    batch = _v1_batch(processor)
    with torch.no_grad():
        resaved = again(**batch).logits
        assert torch.equal(resaved, wrapped(**batch).logits)  # same machine: bit for bit
        _assert_fixture_logits(resaved, load_file(V1 / "expected_outputs.safetensors")["logits"])


def test_saved_keys_do_not_depend_on_the_stage_list(tmp_path):
    """A stage's saved weights and PEFT name keep their key when other stages join the wrapper."""
    model, _ = tiny_vlm("llava", seed=0)
    alone = vlmkit.wrap(model, DropEveryOtherConfig(scale=1.5))
    with_more = vlmkit.wrap(vlmkit.unwrap(alone), HiddenSumHeadConfig(), DropEveryOtherConfig(scale=1.5),
                            RepeatEncoderConfig())  # an encoder now comes first in pipeline order
    assert [c.type for c in with_more.stage_configs][:2] == ["test_repeat_encoder", "test_drop_every_other"]
    assert alone.trainable_stage_names() == ["stages.test_drop_every_other"]
    assert with_more.trainable_stage_names() == ["stages.test_drop_every_other", "stages.test_hidden_sum_head"]
    assert set(alone.stages.state_dict()) <= set(with_more.stages.state_dict())
    alone.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "vlmkit_stages.safetensors")) == {"test_drop_every_other.scale"}


def test_unknown_format_version_is_refused(tmp_path):
    shutil.copytree(V1, tmp_path / "save")
    meta = json.loads((tmp_path / "save" / "vlmkit.json").read_text())
    meta["version"] = 7
    (tmp_path / "save" / "vlmkit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 7"):
        vlmkit.load(tiny_vlm("llava", seed=0)[0], tmp_path / "save")

