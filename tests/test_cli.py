"""The ``vlmkit`` command: info, shapes and demo run end to end (in-process, tiny model)."""

from __future__ import annotations

import json

import pytest

from vlmkit.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["families"] == ["internvl", "llava"]
    assert info["packages"]["transformers"].startswith("5.")


def test_shapes_writes_every_format(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path), "--n", "3", "--seed", "7"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"images", "instances.json", "refs.json", "llava_shapes_vqa.json",
            "v2_OpenEnded_mscoco_val_questions.json", "v2_mscoco_val_annotations.json"} <= names
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_demo_writes_table_and_pictures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--limit", "4", "--sweep-limit", "4"]) == 0
    out = capsys.readouterr().out
    for label in ("full (no stages)", "FoPru rank keep 0.25", "V2PE stride 16", "FoPru row", "DivPrune"):
        assert label in out
    for name in ("pruning_map.png", "mask_overlay_0.png", "accuracy_vs_keep.png", "demo_results.json"):
        assert (tmp_path / name).is_file(), name
    rows = json.loads((tmp_path / "demo_results.json").read_text())["rows"]
    full, pruned = rows[0], rows[1]
    assert pruned["visual_tokens_per_image"] == full["visual_tokens_per_image"] / 4


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert main([]) == 2
