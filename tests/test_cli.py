"""The ``vlmkit`` command: info, shapes and demo run end to end (in-process, tiny model)."""

from __future__ import annotations

import json

import pytest

from vlmkit.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["families"] == [
        "gemma3", "glm4v", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "llava_onevision1_5",
        "mistral3", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm"]
    assert info["packages"]["transformers"].startswith("5.")


def test_shapes_writes_every_format(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path), "--n", "3", "--seed", "7"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"images", "instances.json", "refs.json", "llava_shapes_vqa.json",
            "v2_OpenEnded_mscoco_val_questions.json", "v2_mscoco_val_annotations.json"} <= names
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_demo_writes_table_and_pictures(tmp_path, capsys):
    from vlmkit import demo

    assert main(["demo", "--out", str(tmp_path), "--limit", "4", "--sweep-limit", "4", "--multi-limit", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("full (no stages)", "FoPru rank keep 0.25", "V2PE stride 16", "FoPru row", "DivPrune",
                  "PVC 16 tok + LoRA", "V2PE 16 + LoRA on N<=4"):
        assert label in out
    for name in ("pruning_map.png", "mask_overlay_0.png", "accuracy_vs_keep.png", "multi_image_accuracy.png",
                 "demo_results.json"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "demo_results.json").read_text())
    full, pruned = report["rows"][0], report["rows"][1]
    assert pruned["visual_tokens_per_image"] == full["visual_tokens_per_image"] / 4
    # every adaptation row ran from its shipped adapter; PVC's rows see 16 tokens per image
    assert [r["stages"] for r in report["adapted_rows"]] == [r[0] for r in demo.ADAPTED_ROWS]
    assert all(r["visual_tokens_per_image"] == 16 for r in report["adapted_rows"] if r["stages"].startswith("PVC"))
    assert set(report["recovered"]) == set(demo.RECOVERED)
    assert [len(report["multi"][c[0]]) for c in demo.MULTI_CURVES] == [len(demo.MULTI_N)] * len(demo.MULTI_CURVES)


def test_demo_reports_the_shipped_model_card_numbers(tmp_path):
    """The main job on a fresh checkout: the shipped model scores at least its card's numbers minus 2 points."""
    from vlmkit import demo

    card = json.loads((demo.SHIPPED / "metrics.json").read_text())
    report = demo.run(tmp_path, quiet=True, adapters=False)  # the adapters' cards: tests/test_adaptation.py
    assert report["model"] == str(demo.SHIPPED)
    assert [r["stages"] for r in report["rows"]] == [r["stages"] for r in card["demo_rows"]]
    for got, want in zip(report["rows"], card["demo_rows"]):
        for metric in ("vqa_accuracy", "cIoU", "gIoU"):
            assert got[metric] >= want[metric] - 0.02, (got["stages"], metric, got[metric], want[metric])
        assert got["visual_tokens_per_image"] == want["visual_tokens_per_image"]


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert main([]) == 2


def test_saved_text4seg_grid_reaches_the_harness_and_demo(tmp_path):
    """A checkpoint saved with a Text4Seg head (as the shipped model is) is evaluated with that head,
    next to the compressors asked for."""
    import vlmkit
    from vlmkit.demo import _text4seg_config
    from vlmkit.evaluation.runner import load_model
    from vlmkit.testing import tiny_vlm

    model, processor = tiny_vlm("llava", seed=0)
    vlmkit.wrap(model, vlmkit.Text4SegConfig(grid=8)).save_pretrained(tmp_path, save_base_model=True)
    processor.save_pretrained(tmp_path)
    assert _text4seg_config(str(tmp_path)).grid == 8
    assert _text4seg_config(None).grid == 16
    loaded = load_model(str(tmp_path), compress=["fopru:0.5"])
    assert [(c["type"], c.get("grid")) for c in loaded.stage_configs] == [("fopru", None), ("text4seg", 8)]
    assert loaded.text4seg_head.config.grid == 8
