"""Writes and reads stay inside the folders they were given (issue 20): ``--run-id`` and ``synthesize.out``
never name a path outside ``--output`` / ``--data-root``; image names in data files resolve inside their image
folder (``..`` and symbolic links included) unless absolute paths are allowed explicitly; images are verified
up front naming the record and the file; and the final fine-tuning outputs are replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _files(root: Path) -> set[str]:
    return {os.fspath(p.relative_to(root)) for p in root.rglob("*")}


def _png(path: Path, size=(8, 6), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# --run-id
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../../../X", "a/b", "..", ".hidden", "/tmp/x", "x" * 129, "", "a b"])
def test_run_id_escapes_are_refused_before_anything_loads(tmp_path, monkeypatch, run_id):
    from vlmkit.evaluation import runner

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(runner, "load_model", no_load)
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    with pytest.raises(ValueError, match="run id") as info:
        runner.evaluate("tiny:llava", "shapes_vqa", out, data_root=data, run_id=run_id)
    assert repr(run_id) in str(info.value)
    assert _files(tmp_path) == {"data"}  # nothing written: no output folder, no synthetic data


def test_run_id_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    from vlmkit.cli import main

    (tmp_path / "data").mkdir()
    rc = main(["eval", "--model", "tiny:llava", "--tasks", "shapes_vqa", "--output", str(tmp_path / "out"),
               "--data-root", str(tmp_path / "data"), "--run-id", "../../../X", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'../../../X'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _files(tmp_path) == {"data"}
    assert not (tmp_path.parent.parent / "X_run.json").exists()


def test_ordinary_run_ids_pass():
    from vlmkit.evaluation.tracking import _check_run_id

    for run_id in (None, "20260101_120000", "20260101_120000_3", "run.v2+a-b", "x" * 128):
        _check_run_id(run_id)


# ---------------------------------------------------------------------------------------------
# synthesize.out
# ---------------------------------------------------------------------------------------------


def _synth_task(tmp_path: Path, out: str):
    from vlmkit.evaluation.tasks import load_task

    path = tmp_path / "task.yaml"
    path.write_text(f"""task: escape
synthesize: {{generator: shapes, out: "{out}", n: 2, seed: 0}}
dataset:
  format: vqav2
  questions: shapes/q.json
  annotations: shapes/a.json
  images: shapes/images
  image_pattern: "shapes_{{image_id:06d}}.png"
doc_to_text: "{{question}}"
metric_list: [{{metric: vqa_accuracy}}]
""")
    return load_task(path)


@pytest.mark.parametrize("out", ["../../X", "../data2", "/abs/X", ".", "link/sub"])
def test_synthesize_out_must_stay_in_the_data_root(tmp_path, out):
    from vlmkit.evaluation.data import load_docs

    root = tmp_path / "work" / "data"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)  # a link out of the data root
    task = _synth_task(tmp_path, out)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"synthesize\.out") as info:
        load_docs(task, root)
    assert repr(out) in str(info.value) and "'escape'" in str(info.value)
    assert _files(tmp_path) == before  # nothing written anywhere


def test_synthesize_out_inside_the_root_still_writes(tmp_path):
    from vlmkit.evaluation.data import synthetic_out

    root = tmp_path / "data"
    root.mkdir()
    task = _synth_task(tmp_path, "sub/shapes")
    assert synthetic_out(task, root) == root / "sub" / "shapes"


# ---------------------------------------------------------------------------------------------
# Image names in data files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pope_tree(tmp_path):
    """data/images/{a.png, link.png -> ../secret.png}, data/secret.png, /abs outside."""
    images = tmp_path / "data" / "images"
    _png(images / "a.png")
    secret = _png(tmp_path / "data" / "secret.png")
    (images / "link.png").symlink_to(secret)
    return tmp_path / "data"


def _pope(root: Path, image: str) -> Path:
    path = root / "pope.jsonl"
    lines = [{"question_id": 1, "image": "a.png", "text": "q?", "label": "yes"},
             {"question_id": 2, "image": image, "text": "q?", "label": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.mark.parametrize("name", ["../secret.png", "../../../../etc/passwd", "link.png", "sub/../../secret.png",
                                  "ABS"])
def test_reader_image_names_must_resolve_inside_the_image_folder(pope_tree, name):
    from vlmkit.evaluation.readers import read_pope

    name = os.fspath(pope_tree / "secret.png") if name == "ABS" else name
    path = _pope(pope_tree, name)
    with pytest.raises(ValueError, match="--allow-absolute-paths") as info:
        read_pope(str(pope_tree / "images"), file=str(path))
    msg = str(info.value)
    assert f"{path}: line 2 (question_id=2)" in msg and repr(name) in msg  # the record and the value
    docs = read_pope(str(pope_tree / "images"), file=str(path), allow_absolute_paths=True)  # the explicit opt-in
    assert [d["id"] for d in docs] == ["all/1", "all/2"]


def test_every_reader_with_image_names_confines_them(pope_tree):
    from vlmkit.evaluation import readers as R

    images = pope_tree / "images"
    q = pope_tree / "gqa.json"
    q.write_text(json.dumps({"7": {"imageId": "../secret", "question": "q", "answer": "a"}}))
    with pytest.raises(ValueError, match=r"gqa\.json: record 0 \(question_id='7'\): image path '\.\./secret\.png'"):
        R.read_gqa(str(q), str(images), image_ext=".png")
    t = pope_tree / "textvqa.json"
    t.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "../secret", "question": "q", "answers": []}]}))
    with pytest.raises(ValueError, match=r"textvqa\.json: record 0 \(question_id=1\): image path"):
        R.read_textvqa(str(t), str(images), image_ext=".png")
    v = pope_tree / "vqa.json"
    v.write_text(json.dumps({"questions": [{"question_id": 3, "image_id": 1, "question": "q", "name": "../secret"}]}))
    with pytest.raises(ValueError, match=r"vqa\.json: record 0 \(question_id=3\): image path"):
        R.read_vqav2(str(v), str(images), image_pattern="{name}.png")
    inst = pope_tree / "instances.json"
    inst.write_text(json.dumps({"images": [{"id": 1, "file_name": "../secret.png", "height": 6, "width": 8}],
                                "annotations": [{"id": 5, "segmentation": [], "bbox": [0, 0, 1, 1]}]}))
    refs = pope_tree / "refs.json"
    refs.write_text(json.dumps([{"ref_id": 9, "ann_id": 5, "image_id": 1, "split": "val",
                                 "sentences": [{"sent": "x", "sent_id": 4}]}]))
    with pytest.raises(ValueError, match=r"instances\.json: image id=1 \(ref 9\): image path '\.\./secret\.png'"):
        R.read_refcoco(str(refs), str(inst), str(images))
    assert R.read_refcoco(str(refs), str(inst), str(images), allow_absolute_paths=True)[0]["id"] == 4


def test_load_docs_passes_the_opt_in(pope_tree, tmp_path):
    from vlmkit.evaluation.data import load_docs
    from vlmkit.evaluation.tasks import load_task

    _pope(pope_tree, "../secret.png")
    yaml = tmp_path / "pope_task.yaml"
    yaml.write_text("task: pope_escape\ndataset: {format: pope, images: images, file: pope.jsonl}\n"
                    "doc_to_text: '{question}'\nparser: yes_no\nmetric_list: [{metric: pope}]\n")
    task = load_task(yaml)
    with pytest.raises(ValueError, match=r"pope_escape.*'\.\./secret\.png'"):
        load_docs(task, pope_tree)
    assert len(load_docs(task, pope_tree, allow_absolute_paths=True)) == 2


def test_finetune_data_image_names_are_confined(tmp_path):
    from vlmkit.train.data import load_conversations

    folder = tmp_path / "set"
    _png(folder / "images" / "ok.png")
    secret = _png(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(secret)

    def record(image):
        return {"id": "r1", "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": "a"}]}

    data = folder / "data.json"
    data.write_text(json.dumps([record("ok.png")]))  # found in images/ next to the file, as before
    assert load_conversations(data)[0].images == [str(folder / "images" / "ok.png")]
    for name in ("../secret.png", str(secret), "link.png", "images/../../secret.png"):
        data.write_text(json.dumps([record(name)]))
        with pytest.raises(ValueError, match="--allow-absolute-paths") as info:
            load_conversations(data)
        assert "record 0 (id 'r1')" in str(info.value) and repr(name) in str(info.value)
        assert load_conversations(data, allow_absolute_paths=True)[0].images  # the opt-in reads it
    data.write_text(json.dumps([record("../secret.png")]))
    with pytest.raises(ValueError, match="outside"):  # --image-folder is the root when given
        load_conversations(data, image_folder=folder / "images")


def test_refseg_records_name_only_relative_images(tmp_path):
    from vlmkit.seg.refseg_data import refseg_to_llava

    instances = {"images": [{"id": 1, "file_name": "../../etc/passwd", "height": 8, "width": 8}],
                 "annotations": [{"id": 5, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "bbox": [0, 0, 4, 4]}]}
    refs = [{"ref_id": 9, "ann_id": 5, "image_id": 1, "split": "val", "sentences": [{"sent": "box"}]}]
    with pytest.raises(ValueError, match=r"instances image id=1: image name '\.\./\.\./etc/passwd'"):
        refseg_to_llava(instances, refs, grid=4)
    assert refseg_to_llava(instances, refs, grid=4, allow_absolute_paths=True)[0]["image"] == "../../etc/passwd"
    instances["images"][0]["file_name"] = "a/b.jpg"
    assert refseg_to_llava(instances, refs, grid=4, image_prefix="coco/")[0]["image"] == "coco/a/b.jpg"
    with pytest.raises(ValueError, match="'/data/a/b.jpg'"):  # an absolute prefix makes absolute names
        refseg_to_llava(instances, refs, grid=4, image_prefix="/data")


# ---------------------------------------------------------------------------------------------
# Up-front verification
# ---------------------------------------------------------------------------------------------


def test_check_images_names_the_record_and_the_file(tmp_path):
    from vlmkit.data.images import check_images, open_image, verify_image
    from vlmkit.train.data import Conversation

    good = _png(tmp_path / "good.png", size=(40, 30))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    blob = good.read_bytes()
    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    assert blob and verify_image(good) == (40, 30)

    docs = [{"id": 1, "image": str(good)}, {"id": 2, "image": str(good)}, {"id": 3, "image": Image.new("RGB", (2, 2))}]
    assert check_images(docs, source="task 't'") == 1  # each file once; PIL images skipped
    for bad, kind in ((text, "UnidentifiedImageError"), (truncated, "OSError")):
        with pytest.raises(ValueError) as info:
            check_images([*docs, {"id": "q7", "image": str(bad)}], source="task 't'")
        msg = str(info.value)
        assert msg.startswith("task 't': record 3 (id 'q7'): cannot read image")
        assert repr(str(bad)) in msg and kind in msg
    conv = Conversation("r5", [], [str(good)], [str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match=r"data\.json: record 0 \(id 'r5'\): image not found: .*missing\.png"):
        check_images([conv], source="data.json")
    with pytest.raises(ValueError, match="outside"):
        check_images([("record 0", str(good))], root=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"record 9: cannot read image .*notes\.png"):
        open_image(text, where="record 9: ")


# ---------------------------------------------------------------------------------------------
# Atomic final fine-tuning outputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 1-step LoRA run of the tiny LLaVA: its output folder and the bytes of its final files."""
    from vlmkit.data.shapes import write_dataset
    from vlmkit.train.cli import cli_main

    root = tmp_path_factory.mktemp("ft")
    data = write_dataset(root / "shapes", 2, seed=0, size=32)["llava"]
    out = root / "out"
    args = ["--recipe", "lora", "--model", "tiny:llava", "--data", str(data), "--output", str(out),
            "--max-steps", "1", "--batch-size", "2", "--quiet"]
    assert cli_main(args) == 0
    return out, args


FINAL = ("adapter_model.safetensors", "adapter_config.json", "vlmkit.json", "finetune.json")


def _snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FINAL}


def test_a_failing_final_save_leaves_the_previous_outputs_whole(finetuned, monkeypatch, capsys):
    import vlmkit.wrapper
    from vlmkit.train.cli import cli_main

    out, args = finetuned
    before = _snapshot(out)

    def half_written(self, path, *a, **k):  # the writer dies half-way through vlmkit.json
        Path(path, "vlmkit.json").write_text('{"format": ')
        raise OSError("disk full")

    monkeypatch.setattr(vlmkit.wrapper.VLMWrapper, "save_pretrained", half_written)
    capsys.readouterr()
    assert cli_main([*args, "--overwrite", "--lr", "0.5"]) != 0  # trained other weights, then failed to save
    assert "disk full" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".final.tmp")]  # the staging folder is gone


def test_a_failing_finetune_json_write_leaves_the_previous_file(finetuned, monkeypatch, capsys):
    import vlmkit.train.loop as loop
    from vlmkit.train.cli import cli_main

    out, args = finetuned
    before = (out / "finetune.json").read_bytes()
    real_dump = json.dump

    def dump(obj, f, *a, **k):
        if getattr(f, "name", "").endswith("finetune.json.tmp"):
            f.write('{"format": "vlmkit-fine')
            raise OSError("disk full")
        return real_dump(obj, f, *a, **k)

    monkeypatch.setattr(loop.json, "dump", dump)
    capsys.readouterr()
    assert cli_main([*args, "--overwrite", "--seed", "3"]) != 0
    assert "disk full" in capsys.readouterr().err
    assert (out / "finetune.json").read_bytes() == before
    assert not (out / "finetune.json.tmp").exists()
    monkeypatch.undo()
    assert cli_main([*args, "--overwrite", "--seed", "3"]) == 0  # and a good write replaces it
    assert json.loads((out / "finetune.json").read_text())["args"]["seed"] == 3


def test_write_json_atomic_replaces_whole_files(tmp_path, monkeypatch):
    from vlmkit.train.loop import write_json_atomic

    path = tmp_path / "x.json"
    write_json_atomic({"a": 1}, path)
    write_json_atomic({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 2} and _files(tmp_path) == {"x.json"}
