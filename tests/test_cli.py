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


def test_demo_runs_and_reports_fewer_tokens_when_compressing(capsys):
    assert main(["demo", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "identity" in out and "[16, 16]" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert main([]) == 2
