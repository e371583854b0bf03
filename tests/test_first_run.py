"""A first run explains itself (issue 20, "First run"): help texts with defaults, ``--version``, pictures that
carry their title and legend (drawn and as PNG text), ``prune-viz`` on the shipped model, the demo's progress
lines and column notes, quiet fine-tuning, and the README facts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmkit.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# --help and --version
# ---------------------------------------------------------------------------------------------


class _Parsed(Exception):
    pass


def _parser_of(command: str, monkeypatch):
    """The ``ArgumentParser`` a subcommand builds (its ``parse_args`` is stopped before anything runs)."""
    import vlmkit.cli

    seen = {}

    def stop(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(vlmkit.cli.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed):
        main([command])
    return seen["parser"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_says_its_default(command, monkeypatch):
    import argparse

    parser = _parser_of(command, monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        text = formatter._get_help_string(action)
        assert action.help, (command, action.option_strings)
        if action.required:
            assert "required" in text, (command, action.option_strings, text)
        else:
            assert "default" in text or "required" in text, (command, action.option_strings, text)
    help_text = parser.format_help()
    assert "`" not in help_text, help_text  # no reST markup
    assert "--debug" in help_text


def test_help_shows_defaults_and_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "docs per generate call (default: 1)" in out  # --batch-size
    assert re.search(r"--tasks TASKS comma-separated[^(]*\(required\)", out)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: 64)" in out and "(default: demo_out)" in out and "``" not in out


def test_version(capsys):
    import vlmkit

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlmkit {vlmkit.__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "--version" in out


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _text(path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def test_pruning_map_caption_names_method_ratio_and_count(tmp_path):
    from PIL import Image

    from vlmkit.tokens import VisualTokens
    from vlmkit.viz import pruning_map
    from vlmkit.viz.annotate import save_png
    from vlmkit.viz.pruning import KEPT_OUTLINE

    image = Image.new("RGB", (40, 40), (200, 100, 50))
    tokens = VisualTokens(torch.zeros(3, 4), torch.tensor([0, 5, 15]), (4, 4), num_uncompressed=16)
    plain = pruning_map(image, tokens, min_size=40)
    assert plain.size == (40, 40) and "Title" not in plain.info  # no caption unless asked
    pic = pruning_map(image, tokens, min_size=40, method="FoPru rank", keep_ratio=0.1875)
    assert pic.info["Title"] == "FoPru rank, keep ratio 0.1875: 3 of 16 visual tokens kept (4x4 grid)"
    assert "kept token" in pic.info["Legend"] and "pruned token" in pic.info["Legend"]
    assert pic.height > 40 and pic.width >= 40  # the band sits above the map, which is unchanged below it
    band = pic.height - 40
    x0 = (pic.width - 40) // 2
    assert pic.getpixel((x0 + 5, band + 5)) == plain.getpixel((5, 5))
    # the legend swatch of kept cells is drawn in the outline colour
    assert KEPT_OUTLINE in {pic.getpixel((x, y)) for x in range(pic.width) for y in range(band)}
    save_png(pic, tmp_path / "map.png")
    assert _text(tmp_path / "map.png") == {"Title": pic.info["Title"], "Legend": pic.info["Legend"]}


def test_mask_comparison_outlines_prediction_and_truth_in_two_colours():
    from PIL import Image

    from vlmkit.viz.masks import PREDICTED, TRUTH, mask_comparison

    image = Image.new("RGB", (20, 20), (128, 128, 128))
    pred = np.zeros((20, 20), bool)
    pred[2:10, 2:10] = True  # 64 px
    truth = np.zeros((20, 20), bool)
    truth[6:14, 6:14] = True  # 64 px, 16 shared: IoU 16 / 112
    pic = mask_comparison(image, pred, truth, '"the red circle"', width=1)
    assert pic.info["Title"] == f'"the red circle" (IoU {16 / 112:.2f})'
    assert "predicted mask" in pic.info["Legend"] and "ground truth" in pic.info["Legend"]
    assert PREDICTED != TRUTH
    band = pic.height - 20
    x0 = (pic.width - 20) // 2
    px = lambda x, y: pic.getpixel((x0 + x, band + y))  # noqa: E731
    assert px(2, 5) == PREDICTED  # left edge of the prediction
    assert px(13, 10) == TRUTH  # right edge of the truth
    blended = tuple(int(np.rint(0.65 * 128 + 0.35 * c)) for c in PREDICTED)  # alpha 0.35 over grey
    assert px(4, 4) == blended  # inside the prediction, off every edge: filled, not outlined
    assert px(11, 11) == (128, 128, 128)  # inside the truth only: the truth is outlined, not filled
    assert px(17, 17) == (128, 128, 128)  # outside both: the image


def test_line_plot_has_title_legend_and_a_readable_font():
    from PIL import ImageFont, features

    from vlmkit.viz.annotate import font
    from vlmkit.viz.plot import line_plot

    pic = line_plot([1.0, 0.5], {"FoPru rank": [0.9, 0.7], "random": [0.9, None]}, title="accuracy vs keep",
                    xlabel="keep ratio", ylabel="VQA accuracy")
    assert pic.info["Title"] == "accuracy vs keep" and pic.info["Legend"] == "FoPru rank; random"
    if features.check("freetype2"):
        assert isinstance(font(13), ImageFont.FreeTypeFont) and font(13).size == 13
    # the title's ink is taller than the 11-px bitmap font's
    arr = np.asarray(pic.convert("L"))[:40]
    rows = np.nonzero((arr < 128).any(axis=1))[0]
    assert rows.max() - rows.min() >= 11


def test_line_plot_fits_long_titles_and_colours_points_like_their_method():
    import pytest

    from vlmkit.viz.plot import SERIES_COLORS, line_plot

    title = "a title much longer than the plot area is wide " * 3
    pic = line_plot([1.0, 0.5], {"FoPru rank": [0.9, 0.7], "FoPru + LoRA": [None, 0.8]}, title=title,
                    colors={"FoPru + LoRA": "FoPru rank"})
    arr = np.asarray(pic.convert("RGB"))
    ink = np.nonzero((arr[:40].min(axis=2) < 128).any(axis=0))[0]
    assert ink.min() >= 8 and ink.max() < pic.width - 4, "the whole title is on the picture"
    # the one-point series is drawn in FoPru rank's colour, not the palette's next one
    assert (arr.reshape(-1, 3) == SERIES_COLORS[0]).all(axis=1).sum() > 60
    assert not (arr.reshape(-1, 3) == SERIES_COLORS[1]).all(axis=1).any(), "no second colour was used"
    with pytest.raises(ValueError, match="colors\\['a'\\] = 'nope'"):
        line_plot([1.0], {"a": [0.5]}, colors={"a": "nope"})


def test_prune_viz_defaults_to_the_shipped_model(tmp_path, capsys):
    from PIL import Image

    from vlmkit.demo import SHIPPED

    Image.new("RGB", (64, 64), (30, 160, 50)).save(tmp_path / "in.png")
    out = tmp_path / "map.png"
    assert main(["prune-viz", "--image", str(tmp_path / "in.png"), "--strategy", "row", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model: {SHIPPED}" in printed and "shipped shapes model" in printed
    text = _text(out)
    assert text["Title"] == "FoPru row, keep ratio 0.25: 16 of 64 visual tokens kept (8x8 grid)"
    assert "kept token" in text["Legend"] and str(SHIPPED) in text["Model"]


# ---------------------------------------------------------------------------------------------
# The demo explains itself
# ---------------------------------------------------------------------------------------------


def test_demo_prints_progress_and_explains_its_columns(tmp_path, capsys, monkeypatch):
    import vlmkit.demo as demo

    monkeypatch.setattr(demo, "MAIN_ROWS", demo.MAIN_ROWS[:2])
    monkeypatch.setattr(demo, "SWEEP_KEEP", [1.0, 0.25])
    monkeypatch.setattr(demo, "sweep_methods", lambda: {"FoPru rank": "fopru:keep_ratio={k},strategy=rank"})
    monkeypatch.setattr(demo, "ADAPTED_ROWS", [demo.ADAPTED_ROWS[0], demo.ADAPTED_ROWS[2]])
    monkeypatch.setattr(demo, "MULTI_CURVES", demo.MULTI_CURVES[:1])
    monkeypatch.setattr(demo, "MULTI_N", [1, 4])
    assert main(["demo", "--out", str(tmp_path), "--limit", "2", "--sweep-limit", "2", "--multi-limit", "2"]) == 0
    out = capsys.readouterr().out
    tags = [line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[")]
    assert tags == ["[table 1/2]", "[table 2/2]", "[sweep 1/2]", "[sweep 2/2]", "[adapted 1/2]", "[adapted 2/2]",
                    "[multi 1/1]", "[pictures]"]
    assert "not shipped" not in out, "the control adapter ships with the package"
    for column in ("VQA acc", "cIoU", "gIoU", "vis tok/img", "ms/sample"):
        assert any(line.strip().startswith(column) and len(line.split()) > 3 for line in out.splitlines()), column
    assert "2 referring expressions" in out and "not a speed measure" in out and "2 held-out" in out
    assert "FoPru rank, keep ratio 0.25" in _text(tmp_path / "pruning_map.png")["Title"]
    overlay = _text(tmp_path / "mask_overlay_0.png")
    assert overlay["Title"].startswith('"') and "IoU" in overlay["Title"] and "ground truth" in overlay["Legend"]
    plot = _text(tmp_path / "accuracy_vs_keep.png")
    assert "keep ratio" in plot["Title"] and plot["Legend"] == "FoPru rank"
    multi = _text(tmp_path / "multi_image_accuracy.png")
    assert multi["Title"].startswith("shapes_multi: one question about image k of N (2 questions per point")
    assert multi["Legend"] == "plain positions"
    assert "shapes_multi, VQA accuracy against images per prompt (2 questions per N)" in out


# ---------------------------------------------------------------------------------------------
# Quiet fine-tuning, README facts
# ---------------------------------------------------------------------------------------------


def test_quiet_lora_run_prints_nothing(tmp_path):
    """bitsandbytes' import-time CPU-kernel warning and the recipe notes stay out of a ``--quiet`` LoRA run
    (a fresh process: the warning is printed once, when peft first imports bitsandbytes)."""
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "a.png")
    rec = {"id": "r0", "image": "a.png",
           "conversations": [{"from": "human", "value": "<image> what colour?"}, {"from": "gpt", "value": "green"}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "vlmkit", "finetune", "--recipe", "lora", "--model", "tiny:llava",
                          "--data", str(tmp_path / "d.json"), "--output", str(tmp_path / "out"), "--max-steps", "1",
                          "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "" and run.stderr.strip() == "", (run.stdout, run.stderr)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_readme_snippet_has_the_image_marker_and_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "<image>" in snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].shape[0] == 1 and len(scope["answers"]) == 1
    assert (tmp_path / "run" / "vlmkit.json").is_file()


def test_mousi_experts_refuse_fopru_as_the_readme_says():
    import vlmkit
    from vlmkit.testing import tiny_vlm

    readme = (ROOT / "README.md").read_text()
    assert "refuses it next to FoPru" in readme
    model, _ = tiny_vlm("llava", seed=0)
    with pytest.raises(ValueError, match=r"\['fopru'\] cannot be combined with 'experts'"):
        vlmkit.wrap(model, vlmkit.ExpertsConfig(), vlmkit.FoPruConfig(keep_ratio=0.5))
    wrapped = vlmkit.wrap(model, vlmkit.ExpertsConfig(), vlmkit.RandomPruneConfig(keep_ratio=0.5))
    assert [c.type for c in wrapped.stage_configs] == ["experts", "random"]


def test_repository_facts():
    card = (ROOT / "vlmkit" / "assets" / "shapes-llava-tiny" / "README.md").read_text()
    assert "issue 7" not in card
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "/demo_out/", "/data/"} <= set(ignored)
