"""User mistakes give one line naming the value and what was expected, exit status 2, no traceback, and nothing
written; they are found before any model loads (issue 20, "Errors").

Every CLI case runs ``vlmkit.cli.main`` in-process. ``load_model`` / the finetune model loader are replaced by a
function that fails the test, so a case passes only when the mistake is caught before a model would load.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from vlmkit.cli import UsageError, main


class _ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: validation must come first."""

    def refuse(*args, **kwargs):
        raise _ModelLoaded("a model was loaded before the input was validated")

    import vlmkit.demo
    import vlmkit.evaluation.runner
    import vlmkit.train.loop
    import vlmkit.train.trainer
    import vlmkit.viz.pruning

    monkeypatch.setattr(vlmkit.evaluation.runner, "load_model", refuse)
    monkeypatch.setattr(vlmkit.train.loop, "load_base_model", refuse)
    monkeypatch.setattr(vlmkit.train.trainer, "load_base_model", refuse)
    monkeypatch.setattr(vlmkit.viz.pruning, "_load_model", refuse)
    monkeypatch.setattr(vlmkit.demo, "load_default", refuse)


def _error(capsys, argv: list[str], *expected: str) -> str:
    """Run ``vlmkit *argv``: exit status 2, stderr exactly one line ``vlmkit <cmd>: error: ...`` holding every
    ``expected`` text, no traceback. Returns the line."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (argv, captured.out, captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vlmkit {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from vlmkit.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "shapes", 3, seed=0)
    return root


def _pope_root(tmp_path, random_lines: bytes, image: bytes | None = b"not a picture\n"):
    """A data root with the three POPE files (adversarial / popular empty, random = ``random_lines``) and
    ``coco/val2014/a.png`` (``image`` bytes; None: no file)."""
    root = tmp_path / "data"
    (root / "pope").mkdir(parents=True)
    (root / "coco" / "val2014").mkdir(parents=True)
    for cat in ("adversarial", "popular"):
        (root / "pope" / f"coco_pope_{cat}.json").write_bytes(b"")
    (root / "pope" / "coco_pope_random.json").write_bytes(random_lines)
    if image is not None:
        (root / "coco" / "val2014" / "a.png").write_bytes(image)
    return root


POPE_LINE = b'{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"}\n'


def _truncated_png(path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])


# ---------------------------------------------------------------------------------------------
# vlmkit eval
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--tasks", "nope"], ["unknown task 'nope'"]),
    (["--tasks", "shapes_vqa,"], ["'shapes_vqa,'", "stray comma"]),
    (["--compress", "fopru:2"], ["'fopru:2'", "keep ratio in (0, 1]", "fopru:n=2"]),
    (["--compress", "fopru:1.5"], ["'fopru:1.5'", "'1.5'"]),
    (["--compress", "fopru:keep_ratio=abc"], ["keep_ratio must be a number", "'abc'"]),
    (["--compress", "v2pe:16"], ["'v2pe'", "not a compressor or pruner"]),
    (["--position", "fopru:0.5"], ["'fopru'", "not a 'position' stage"]),
    (["--gen-kwargs", "max_new_tokens=abc"], ["max_new_tokens must be an integer >= 1", "'abc'"]),
    (["--gen-kwargs", "top_p=2"], ["top_p must be a number in (0, 1]", "2"]),
    (["--gen-kwargs", "bogus=1"], ["unknown generation setting 'bogus'"]),
    (["--dtype", "float7"], ["--dtype", "'float7'"]),
    (["--dtype", "bfloat16"], ["'bfloat16'", "checkpoint folders only", "tiny:llava"]),
    (["--limit", "-3"], ["--limit", "'-3'"]),
    (["--limit", "2.5"], ["--limit", "'2.5'"]),
    (["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
    (["--data-root", "/nonexistent/vlmkit-data"], ["--data-root '/nonexistent/vlmkit-data'", "no such folder"]),
])
def test_eval_argument_mistakes(tmp_path, capsys, no_model, shapes_root, extra, expected):
    argv = ["eval", "--model", "tiny:llava", "--tasks", "shapes_vqa", "--output", str(tmp_path / "out"),
            "--data-root", str(shapes_root), "--quiet"]
    for i in range(0, len(extra), 2):  # later options replace earlier ones of the same name
        if extra[i] in argv and extra[i] not in ("--compress",):
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    _error(capsys, argv, *expected)
    assert not (tmp_path / "out").exists()


def test_eval_data_root_is_not_created(tmp_path, capsys, no_model):
    missing = tmp_path / "nope"
    _error(capsys, ["eval", "--model", "tiny:llava", "--tasks", "shapes_vqa", "--output", str(tmp_path / "o"),
                    "--data-root", str(missing)], repr(str(missing)))
    assert not missing.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case, lines, image, expected", [
    ("non-UTF-8 line", POPE_LINE + b'\xff\xfe{"a": 1}\n', b"x", ["coco_pope_random.json", "line 2", "not UTF-8"]),
    ("bad JSON line", POPE_LINE + b"\n" + b'{"question_id": 2,\n', b"x", ["coco_pope_random.json", "line 3",
                                                                          "not valid JSON"]),
    ("empty files", b"", b"x", ["task 'pope'", "no docs"]),
    ("text file as image", POPE_LINE, b"just text\n", ["record 0", "'random/1'", "a.png", "cannot read image"]),
    ("missing image", POPE_LINE, None, ["a.png", "not found"]),
])
def test_eval_data_mistakes(tmp_path, capsys, no_model, case, lines, image, expected):
    root = _pope_root(tmp_path, lines, image)
    _error(capsys, ["eval", "--model", "tiny:llava", "--tasks", "pope", "--output", str(tmp_path / "out"),
                    "--data-root", str(root)], *expected)
    assert not (tmp_path / "out").exists()


def test_eval_truncated_png_is_found_up_front(tmp_path, capsys, no_model):
    root = _pope_root(tmp_path, POPE_LINE, None)
    _truncated_png(root / "coco" / "val2014" / "a.png")
    _error(capsys, ["eval", "--model", "tiny:llava", "--tasks", "pope", "--output", str(tmp_path / "out"),
                    "--data-root", str(root)], "a.png", "cannot read image")


def test_eval_missing_model_is_one_line(tmp_path, capsys, shapes_root):
    _error(capsys, ["eval", "--model", str(tmp_path / "no-model"), "--tasks", "shapes_vqa", "--output",
                    str(tmp_path / "out"), "--data-root", str(shapes_root), "--limit", "1"], "no-model",
           "not a local checkpoint folder")
    assert not (tmp_path / "out").exists()


def test_eval_echoes_the_parsed_stage(tmp_path, capsys, no_model):
    """A token count is explicit, and the parsed stage is printed before anything else happens."""
    _error(capsys, ["eval", "--model", "tiny:llava", "--tasks", "nope", "--output", str(tmp_path / "o"),
                    "--compress", "fopru:n=2"], "unknown task 'nope'")
    # _error consumed the output; run again to read stdout
    main(["eval", "--model", "tiny:llava", "--tasks", "nope", "--output", str(tmp_path / "o"), "--compress",
          "fopru:n=2,strategy=row"])
    out = capsys.readouterr().out
    assert "FoPruConfig(keep_ratio=None, num_keep=2, strategy='row'" in out


def test_debug_shows_the_traceback(tmp_path, capsys, no_model):
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        main(["eval", "--model", "tiny:llava", "--tasks", "nope", "--output", str(tmp_path / "o"), "--debug"])
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        main(["--debug", "eval", "--model", "tiny:llava", "--tasks", "nope", "--output", str(tmp_path / "o")])


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch, shapes_root):
    """Only user mistakes become one line: a bug (here a TypeError inside the run) propagates."""
    import vlmkit.evaluation.runner as runner

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(runner, "load_model", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["eval", "--model", "tiny:llava", "--tasks", "shapes_vqa", "--output", str(tmp_path / "o"),
              "--data-root", str(shapes_root), "--limit", "1"])


# ---------------------------------------------------------------------------------------------
# vlmkit finetune
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ft_data(tmp_path):
    """A folder with a good image and a one-record LLaVA file naming it; returns (folder, records)."""
    from PIL import Image

    folder = tmp_path / "ft"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "good.png")
    rec = {"id": "r0", "image": "good.png",
           "conversations": [{"from": "human", "value": "<image> what colour?"}, {"from": "gpt", "value": "green"}]}
    return folder, [rec, {**rec, "id": "r1"}]


def _ft(tmp_path, data, *extra):
    return ["finetune", "--recipe", "lora", "--model", "tiny:llava", "--data", str(data), "--output",
            str(tmp_path / "out"), "--quiet", *extra]


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "nan"], ["--lr", "'nan'", "finite"]),
    (["--lr", "-1"], ["--lr", "'-1'", "> 0"]),
    (["--lr", "abc"], ["--lr", "'abc'"]),
    (["--max-steps", "0"], ["--max-steps", "'0'"]),
    (["--wrap", "fopru:2"], ["'fopru:2'", "fopru:n=2"]),
    (["--wrap", "nope:1"], ["unknown stage type 'nope'"]),
    (["--recipe", "nope"], ["no recipe file 'nope'"]),
])
def test_finetune_argument_mistakes(tmp_path, capsys, no_model, ft_data, extra, expected):
    folder, recs = ft_data
    (folder / "d.json").write_text(json.dumps(recs))
    _error(capsys, _ft(tmp_path, folder / "d.json", *extra), *expected)
    assert not (tmp_path / "out").exists()


def test_finetune_bad_images_are_found_before_the_model(tmp_path, capsys, no_model, ft_data):
    folder, recs = ft_data
    (folder / "text.png").write_text("not an image")
    _truncated_png(folder / "cut.png")
    for name in ("text.png", "cut.png"):
        (folder / "d.json").write_text(json.dumps([recs[0], {**recs[1], "image": name}]))
        _error(capsys, _ft(tmp_path, folder / "d.json"), "d.json", "record 1", "'r1'", name, "cannot read image")
    (folder / "d.json").write_text(json.dumps([recs[0], {**recs[1], "image": "gone.png"}]))
    _error(capsys, _ft(tmp_path, folder / "d.json"), "record 1", "gone.png", "not found")
    assert not (tmp_path / "out").exists()


def test_finetune_data_errors_name_the_file_and_line(tmp_path, capsys, no_model, ft_data):
    folder, recs = ft_data
    data = folder / "d.jsonl"
    data.write_bytes(json.dumps(recs[0]).encode() + b"\n\xff\xfe\n")
    _error(capsys, _ft(tmp_path, data), "d.jsonl", "line 2", "not UTF-8")
    data.write_bytes((json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n{oops\n").encode())
    _error(capsys, _ft(tmp_path, data), "d.jsonl", "line 3", "not valid JSON")


# ---------------------------------------------------------------------------------------------
# vlmkit prune-viz, vlmkit demo, vlmkit shapes
# ---------------------------------------------------------------------------------------------


def test_prune_viz_mistakes(tmp_path, capsys, no_model):
    from PIL import Image

    good = tmp_path / "in.png"
    Image.new("RGB", (48, 48)).save(good)
    (tmp_path / "text.png").write_text("hello")
    out = str(tmp_path / "map.png")
    _error(capsys, ["prune-viz", "--image", str(tmp_path / "text.png"), "--out", out], "text.png", "cannot read image")
    _error(capsys, ["prune-viz", "--image", str(tmp_path / "gone.png"), "--out", out], "gone.png", "not found")
    _error(capsys, ["prune-viz", "--image", str(good), "--out", out, "--keep", "2"], "--keep", "'2'", "(0, 1]")
    _error(capsys, ["prune-viz", "--image", str(good), "--out", out, "--strategy", "best"], "--strategy", "'best'")
    _error(capsys, ["prune-viz", "--image", str(good), "--out", str(tmp_path / "no" / "m.png")], "does not exist")
    _error(capsys, ["prune-viz", "--image", str(good), "--out", out, "--model", str(tmp_path / "nomodel")],
           "nomodel", "not a checkpoint folder")
    _error(capsys, ["prune-viz", "--out", out], "--image")
    assert not (tmp_path / "map.png").exists()


def test_demo_mistakes(tmp_path, capsys, no_model):
    out = tmp_path / "demo"
    _error(capsys, ["demo", "--out", str(out), "--model", str(tmp_path / "nomodel")], "nomodel",
           "not a checkpoint folder")
    _error(capsys, ["demo", "--out", str(out), "--limit", "0"], "--limit", "'0'")
    _error(capsys, ["demo", "--out", str(out), "--sweep-limit", "x"], "--sweep-limit", "'x'")
    assert not out.exists()


def test_shapes_mistakes(tmp_path, capsys):
    _error(capsys, ["shapes", "--out", str(tmp_path / "s"), "--n", "0"], "--n", "'0'")
    _error(capsys, ["shapes", "--out", str(tmp_path / "s"), "--size", "8"], "--size 8", ">= 32")
    assert not (tmp_path / "s").exists()


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'nope'" in err[0]


# ---------------------------------------------------------------------------------------------
# Saved files: every error names the file (and the tensor)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A tiny LLaVA wrapped with the test compressor (one trainable scalar ``scale``), saved to a folder."""
    import vlmkit
    from _stages import DropEveryOtherConfig
    from vlmkit.testing import tiny_vlm

    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig(scale=2.0))
    wrapped.save_pretrained(tmp_path / "save")
    vlmkit.unwrap(wrapped)
    return model, tmp_path / "save"


def _state(path):
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize("damage, expected", [
    ("json", ["vlmkit.json", "not valid JSON", "line"]),
    ("json-type", ["vlmkit.json", "stages[0]", "unknown stage type 'nope'"]),
    ("truncated", ["vlmkit_stages.safetensors", "not a readable safetensors file"]),
    ("garbage", ["vlmkit_stages.safetensors", "not a readable safetensors file"]),
    ("shape", ["vlmkit_stages.safetensors", "'test_drop_every_other.scale'", "shape (3,)", "expects ()"]),
    ("nan", ["vlmkit_stages.safetensors", "'test_drop_every_other.scale'", "NaN"]),
    ("int", ["vlmkit_stages.safetensors", "'test_drop_every_other.scale'", "torch.int64", "torch.float32"]),
])
def test_load_errors_name_the_file(saved, damage, expected):
    import vlmkit
    from safetensors.torch import save_file

    model, folder = saved
    weights, config = folder / "vlmkit_stages.safetensors", folder / "vlmkit.json"
    state = _state(weights)
    if damage == "json":
        config.write_text(config.read_text()[:-3])
    elif damage == "json-type":
        meta = json.loads(config.read_text())
        meta["stages"][0]["type"] = "nope"
        config.write_text(json.dumps(meta))
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b"garbage")
    else:
        value = {"shape": torch.zeros(3), "nan": torch.tensor(float("nan")),
                 "int": torch.tensor(2, dtype=torch.int64)}[damage]
        save_file({**state, "test_drop_every_other.scale": value}, str(weights))
    with pytest.raises(ValueError) as err:
        vlmkit.load(model, folder)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_load_reads_the_saved_files_before_the_base_model(saved, monkeypatch):
    """``vlmkit.load(path)`` refuses a broken save before ``from_pretrained`` runs."""
    import transformers

    import vlmkit

    _, folder = saved
    (folder / "vlmkit.json").write_text("{")

    def refuse(*args, **kwargs):
        raise _ModelLoaded("the base model loaded before vlmkit.json was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(ValueError, match="vlmkit.json: not valid JSON"):
        vlmkit.load(folder)


def test_refs_pickle_errors_name_the_file(tmp_path):
    from vlmkit.seg.refseg_data import load_refs

    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p"):
        load_refs(bad)


# ---------------------------------------------------------------------------------------------
# Stage specs and generation settings (the parsers behind the CLI)
# ---------------------------------------------------------------------------------------------


def test_stage_specs_make_counts_explicit():
    from vlmkit.config import parse_stage_spec

    assert parse_stage_spec("fopru:1").keep_ratio == 1.0  # a lone 1 is the ratio 1 (keep all)
    assert (parse_stage_spec("fopru:n=2").num_keep, parse_stage_spec("fopru:n=2").keep_ratio) == (2, None)
    assert parse_stage_spec("v2pe:16").stride == 16  # other configs' positional values are unchanged
    for spec, text in [("fopru:2", "fopru:n=2"), ("fopru:0", "keep ratio in (0, 1]"), ("fopru:nan", "'nan'"),
                       ("fopru:0.5,", "stray comma"), ("fopru:0.5,layer=1.5", "layer must be an integer"),
                       ("fopru:n=2,num_keep=3", "given twice"), ("", "empty stage spec")]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
                           .replace("[", r"\[")):
            parse_stage_spec(spec)


def test_gen_kwargs_types_are_checked():
    from vlmkit.evaluation.prediction import parse_gen_kwargs

    assert parse_gen_kwargs("max_new_tokens=8,temperature=0,until=###") == {
        "max_new_tokens": 8, "temperature": 0, "until": "###"}
    for text, msg in [("max_new_tokens=abc", "max_new_tokens must be an integer >= 1, got 'abc'"),
                      ("max_new_tokens=0", "got 0"), ("do_sample=maybe", "do_sample must be true or false"),
                      ("temperature=-1", "temperature must be a number >= 0"), ("num_beams=1.5", "num_beams"),
                      ("max_new_tokens=8,", "key=value"), ("until=1,until=2", "given twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_gen_kwargs(text)


def test_truncated_png_helper_is_sound(tmp_path):
    """The truncated PNG these tests use really is a PNG whose pixel data is cut (it opens, the decode
    fails), so it is the up-front decode that catches it."""
    from PIL import Image

    path = tmp_path / "cut.png"
    _truncated_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (32, 32)
    with pytest.raises(OSError):
        with Image.open(path) as im:
            im.load()
