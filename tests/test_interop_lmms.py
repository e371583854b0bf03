"""lmms-eval's own CLI runs vlmkit: ``python -m lmms_eval --model vlmkit --model_args
pretrained=PATH,compress=fopru:0.25`` finds the model through the ``lmms_eval.models`` entry point that
``pyproject.toml`` declares, and on a local lmms-eval task built from the shapes benchmark (an ``--include_path``
YAML over a ``datasets.save_to_disk`` folder, scored by lmms-eval's own VQAv2 ``process_results``) gives, sample
by sample, the answers and the accuracy of ``vlmkit eval`` on the same questions.

Needs the ``lmms`` extra (``pip install -e ".[lmms]"``); skipped, with the reason printed, only where
lmms-eval is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    _REASON = "lmms-eval is not installed (the `lmms` extra: pip install -e '.[lmms]'); lmms-eval's CLI is not tested"
    print(_REASON)
    pytest.skip(_REASON, allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "vlmkit" / "assets" / "shapes-llava-tiny"
N = 24  # questions (three batches of 8)

# an lmms-eval task over a local dataset; prompts, visuals and the metric are lmms-eval's own VQAv2 functions
TASK_YAML = """\
task: shapes_vqa_lmms
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.vqav2_doc_to_visual
doc_to_text: !function utils.vqav2_doc_to_text
doc_to_target: question_id
generation_kwargs:
  max_new_tokens: 8
  until: []
process_results: !function utils.vqav2_process_results_val
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
metadata:
  version: 0.0
"""
TASK_UTILS = "from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text, vqav2_doc_to_visual, vqav2_process_results_val  # noqa\n"


def _samples(folder: Path, pattern: str) -> list[dict]:
    (path,) = folder.rglob(pattern)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lmms_eval_resolves_vlmkit_through_its_entry_point():
    from lmms_eval.models import get_model

    from vlmkit.evaluation.lmms_bridge import VlmkitLMM

    assert get_model("vlmkit") is VlmkitLMM and VlmkitLMM.is_simple
    with pytest.raises(TypeError, match=r"unknown model_args \['compres'\]"):  # a typo never runs the plain model
        VlmkitLMM.create_from_arg_string("pretrained=tiny:llava,compres=fopru:0.25", {"batch_size": 1})


@pytest.mark.slow
def test_lmms_eval_cli_equals_vlmkit_eval_on_shapes(tmp_path):
    import datasets

    from vlmkit.evaluation import evaluate

    data_root = tmp_path / "data"
    data_root.mkdir()
    common = dict(limit=N, batch_size=8, data_root=data_root, quiet=True)
    evaluate(str(SHIPPED), "shapes_vqa", tmp_path / "vk", compress=["fopru:0.25"], **common)
    evaluate(str(SHIPPED), "shapes_vqa", tmp_path / "vk_full", **common)
    ours = {s["id"]: s for s in _samples(tmp_path / "vk", "*_samples_shapes_vqa.jsonl")}
    full = {s["id"]: s["output"] for s in _samples(tmp_path / "vk_full", "*_samples_shapes_vqa.jsonl")}
    assert len(ours) == N
    assert any(full[q] != s["output"] for q, s in ours.items())  # compress=fopru:0.25 must matter below

    # the same questions as an lmms-eval dataset, read from the VQAv2 files `vlmkit eval` wrote
    shapes = data_root / "shapes"
    questions = json.loads((shapes / "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"][:N]
    answers = {a["question_id"]: a for a in json.loads((shapes / "v2_mscoco_val_annotations.json").read_text())["annotations"]}
    rows = [{"question_id": q["question_id"], "question": q["question"],
             "image": str(shapes / "images" / f"shapes_{q['image_id']:06d}.png"),
             "answers": answers[q["question_id"]]["answers"]} for q in questions]
    assert {r["question_id"] for r in rows} == set(ours)
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "lmms_data"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_vqa_lmms.yaml").write_text(TASK_YAML.format(data=tmp_path / "lmms_data"))
    (tasks / "utils.py").write_text(TASK_UTILS)

    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vlmkit",
           "--model_args", f"pretrained={SHIPPED},compress=fopru:0.25", "--tasks", "shapes_vqa_lmms",
           "--include_path", str(tasks), "--batch_size", "8", "--device", "cpu",
           "--output_path", str(tmp_path / "lmms"), "--log_samples"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    (results_file,) = (tmp_path / "lmms").rglob("*_results.json")  # lmms-eval exits 0 on errors: check the files
    theirs = _samples(tmp_path / "lmms", "*_samples_shapes_vqa_lmms.jsonl")
    assert len(theirs) == N, log

    for sample in theirs:
        mine = ours[int(sample["target"])]
        answer = sample["filtered_resps"]
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer == mine["output"], (sample, mine)
        assert sample["exact_match"] == pytest.approx(mine["scores"]["vqa_accuracy"], abs=1e-12), (sample, mine)
    results = json.loads(results_file.read_text())["results"]["shapes_vqa_lmms"]
    (vk_results,) = (tmp_path / "vk").rglob("*_results.json")
    accuracy = json.loads(vk_results.read_text())["results"]["shapes_vqa"]["vqa_accuracy,none"]
    assert results["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
    assert 0 < accuracy < 1  # neither all right nor all wrong: the comparison can tell outputs apart
