"""The evaluation runner on a tiny model: batching, resume, sharding, the CLI, stage specs, the lmms-eval bridge.

Every run uses the shapes benchmark written to a temporary folder, a handful of docs (``limit``) and a few
new tokens, so the whole file stays well within a minute on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit.evaluation.runner import evaluate, parse_stage_spec

TASKS = "shapes_vqa,shapes_refseg"
TIMING = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "throughput")



@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vlmkit.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("evaldata")
    write_dataset(root / "shapes", 3, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_llava():
    from vlmkit.testing import tiny_vlm

    return tiny_vlm("llava", seed=0)


def _run(model, out, data_root, **kw):
    kw.setdefault("gen_kwargs", {"max_new_tokens": 4})
    kw.setdefault("quiet", True)
    return evaluate(model, kw.pop("tasks", TASKS), out, data_root=data_root, **kw)


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _results_file(out: Path) -> dict:
    (path,) = sorted(out.rglob("*_results.json"))
    return json.loads(path.read_text())


def _strip_timing(results: dict, *extra: str) -> dict:
    out = {k: v for k, v in results.items() if k not in TIMING}
    out["config"] = {k: v for k, v in out["config"].items() if k not in extra}
    return out


# ---------------------------------------------------------------------------------------------
# Batched == one by one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [None, "fopru:0.5"])
def test_batched_outputs_equal_batch_size_one(tmp_path, data_root, tiny_llava, compress):
    kw = dict(tasks="shapes_vqa", limit=7, compress=compress, gen_kwargs={"max_new_tokens": 5})
    r1 = _run(tiny_llava, tmp_path / "b1", data_root, batch_size=1, **kw)
    r4 = _run(tiny_llava, tmp_path / "b4", data_root, batch_size=4, **kw)  # 4 + 3: uneven last batch
    one, four = _samples(tmp_path / "b1", "shapes_vqa"), _samples(tmp_path / "b4", "shapes_vqa")
    assert [s["doc_id"] for s in four] == list(range(7))
    assert len({s["prefill_tokens"] for s in one}) > 1  # prompts of different lengths: real left padding
    keys = ("doc_id", "id", "prompt", "output", "parsed", "scores", "visual_tokens", "prefill_tokens", "generated_tokens")
    assert [{k: s[k] for k in keys} for s in four] == [{k: s[k] for k in keys} for s in one]
    assert any(s["output"].strip() for s in one)  # the model really generated text
    assert r1["results"] == r4["results"]
    expected_tokens = 16 if compress is None else 8  # 4x4 CLIP patches, FoPru keeps half
    assert {s["visual_tokens"] for s in one} == {expected_tokens}
    assert r4["throughput"]["shapes_vqa"]["samples"] == 7 and r4["throughput"]["shapes_vqa"]["samples_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# Resume after an interruption
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, tiny_llava):
    out = tmp_path_factory.mktemp("full")
    results = _run(tiny_llava, out, data_root, batch_size=2, limit=7)
    return out, results


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, data_root, tiny_llava, uninterrupted):
    full_dir, full = uninterrupted
    out = tmp_path / "interrupted"

    def kill(task, batch_index):  # dies after the 2nd batch of the 2nd task (shapes_vqa already complete)
        if task == "shapes_refseg" and batch_index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tiny_llava, out, data_root, batch_size=2, limit=7, on_batch=kill)
    assert not list(out.rglob("*_results.json"))
    (partial,) = out.rglob("*_samples_shapes_refseg.jsonl")
    assert len(partial.read_text().splitlines()) == 4
    with open(partial, "a") as f:  # a line cut off mid-write by the kill
        f.write('{"doc_id": 4, "id": 4, "targ')

    resumed = _run(tiny_llava, out, data_root, batch_size=2, limit=7, resume=True)
    assert resumed["throughput"]["shapes_vqa"]["samples"] == 0  # nothing redone
    assert resumed["throughput"]["shapes_refseg"]["samples"] == 3  # only the missing docs
    # run_id is the start timestamp of each output folder's run: a timing field like "date"
    assert _strip_timing(_results_file(out), "run_id") == _strip_timing(_results_file(full_dir), "run_id")
    assert _strip_timing(resumed, "run_id") == _strip_timing(full, "run_id")
    for task in TASKS.split(","):
        assert _samples(out, task) == _samples(full_dir, task)  # no duplicates, nothing lost, doc order


def test_resume_refuses_a_changed_configuration(tmp_path, data_root, tiny_llava):
    out = tmp_path / "run"
    _run(tiny_llava, out, data_root, tasks="shapes_vqa", limit=2)
    with pytest.raises(ValueError, match=r"cannot resume run .*: gen_kwargs changed"):
        _run(tiny_llava, out, data_root, tasks="shapes_vqa", limit=2, resume=True, gen_kwargs={"max_new_tokens": 5})


# ---------------------------------------------------------------------------------------------
# Several processes: shard by doc_id, merge on rank 0
# ---------------------------------------------------------------------------------------------


def test_two_ranks_shard_and_merge_like_one_process(tmp_path, data_root, tiny_llava, uninterrupted):
    full_dir, full = uninterrupted
    out = tmp_path / "sharded"
    common = dict(batch_size=2, limit=7, run_id="shard", world_size=2)
    assert _run(tiny_llava, out, data_root, rank=1, **common) is None  # rank 1 only writes its lines
    rank_files = sorted(p.name for p in out.rglob("*.rank1.jsonl"))
    assert rank_files == ["shard_samples_shapes_refseg.rank1.jsonl", "shard_samples_shapes_vqa.rank1.jsonl"]
    merged = _run(tiny_llava, out, data_root, rank=0, **common)
    assert not list(out.rglob("*.rank1.jsonl"))
    assert _strip_timing(merged, "world_size", "run_id") == _strip_timing(full, "world_size", "run_id")
    for task in TASKS.split(","):
        assert _samples(out, task) == _samples(full_dir, task)


# ---------------------------------------------------------------------------------------------
# `vlmkit eval` end to end
# ---------------------------------------------------------------------------------------------


def test_cli_eval_on_shapes_writes_results_and_samples(tmp_path, data_root, capsys):
    from vlmkit.cli import main

    out = tmp_path / "cli"
    argv = ["eval", "--model", "tiny:llava", "--tasks", TASKS, "--output", str(out), "--data-root", str(data_root),
            "--limit", "3", "--batch-size", "2", "--gen-kwargs", "max_new_tokens=4", "--quiet"]
    assert main(argv) == 0
    model_dir = out / "tiny__llava"
    results_files = list(model_dir.glob("*_results.json"))
    samples_files = sorted(p.name.split("_samples_")[1] for p in model_dir.glob("*_samples_*.jsonl"))
    assert len(results_files) == 1 and samples_files == ["shapes_refseg.jsonl", "shapes_vqa.jsonl"]
    results = json.loads(results_files[0].read_text())
    assert set(results["results"]["shapes_vqa"]) >= {"alias", "vqa_accuracy,none", "vqa_accuracy_stderr,none"}
    assert set(results["results"]["shapes_refseg"]) >= {"cIoU,none", "gIoU,none"}
    assert results["n-samples"]["shapes_vqa"]["effective"] == 3
    assert results["configs"]["shapes_refseg"]["parser"]["name"] == "text4seg"
    assert results["throughput"]["shapes_vqa"]["prefill_tokens"] > 0
    line = _samples(out, "shapes_refseg")[0]
    assert {"doc_id", "prompt", "output", "parsed", "scores", "visual_tokens"} <= set(line)
    assert {"iou", "intersection", "union"} == set(line["scores"])
    assert "cIoU,none" in capsys.readouterr().out


def test_cli_lists_tasks(capsys):
    from vlmkit.cli import main

    assert main(["eval", "--tasks", "list"]) == 0
    listed = capsys.readouterr().out
    assert "vqav2_val" in listed and "shapes_refseg" in listed


def test_checkpoint_folders_load_like_the_model_object(tmp_path, tiny_llava):
    import vlmkit
    from vlmkit.data.shapes import generate
    from vlmkit.evaluation.runner import build_input_text, generate_batch, load_model

    model, processor = tiny_llava
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5))
    wrapped.save_pretrained(tmp_path / "vk", save_base_model=True)
    vlmkit.unwrap(wrapped)
    processor.save_pretrained(tmp_path / "vk")
    samples = generate(2, seed=0)
    images = [s.image for s in samples]
    texts = [build_input_text(processor, s.questions[0]["question"]) for s in samples]
    gen = {"max_new_tokens": 4}
    reference = load_model((model, processor))
    try:
        want = generate_batch(reference, images, texts, gen)
    finally:
        reference.release()
    from_path = generate_batch(load_model(str(tmp_path / "hf"), device="cpu"), images, texts, gen)
    assert from_path == want
    saved = load_model(str(tmp_path / "vk"), device="cpu")  # vlmkit save folder: its stages come back
    assert saved.name.endswith("__fopru-keep_ratio=0.5")
    assert [r["visual_tokens"] for r in generate_batch(saved, images, texts, gen)] == [8, 8]


def test_missing_data_is_a_clear_error(tmp_path, tiny_llava):
    with pytest.raises(FileNotFoundError, match=r"task 'gqa' \(data root .*\): GQA questions file not found"):
        evaluate(tiny_llava, "gqa", None, data_root=tmp_path, quiet=True)


def test_synthetic_task_writes_its_data(tmp_path, tiny_llava):
    yaml_path = tmp_path / "mini.yaml"
    shapes_yaml = Path(__file__).resolve().parents[1] / "eval" / "shapes_vqa.yaml"
    yaml_path.write_text(f"task: mini_shapes\ninclude: {shapes_yaml}\nsynthesize: {{n: 2}}\n")
    res = evaluate(tiny_llava, str(yaml_path), None, data_root=tmp_path / "data", limit=2, quiet=True,
                   gen_kwargs={"max_new_tokens": 2})
    assert (tmp_path / "data" / "shapes" / "images" / "shapes_000002.png").is_file()
    assert res["n-samples"]["mini_shapes"] == {"original": len(_shape_questions(2)), "effective": 2}


def _shape_questions(n):
    from vlmkit.data.shapes import generate

    return [q for s in generate(n, seed=0) for q in s.questions]


# ---------------------------------------------------------------------------------------------
# Stage specs
# ---------------------------------------------------------------------------------------------


def test_stage_specs():
    assert parse_stage_spec("fopru:0.25", "compressor").keep_ratio == 0.25
    # token counts are explicit (issue 20): a lone value is a keep ratio, a count is n= / num_keep=
    assert parse_stage_spec("fopru:n=64").num_keep == 64
    assert parse_stage_spec("fopru:num_keep=64").num_keep == 64
    with pytest.raises(ValueError, match="write fopru:n=64"):
        parse_stage_spec("fopru:64")
    row = parse_stage_spec("fopru:keep_ratio=0.5,strategy=row")
    assert (row.keep_ratio, row.strategy) == (0.5, "row")
    assert parse_stage_spec("v2pe:32", "position").stride == 32
    with pytest.raises(ValueError, match="unknown stage type 'nope'"):
        parse_stage_spec("nope:1")
    with pytest.raises(ValueError, match="'v2pe' is a 'position' stage, not a 'compressor' stage"):
        parse_stage_spec("v2pe:64", "compressor")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['keep'\]"):
        parse_stage_spec("fopru:keep=0.5")


def test_compress_takes_compressors_and_every_decoder_stage():
    from vlmkit.evaluation.loading import compress_configs

    # VTW has no keep budget (not a `pruner`) but drops visual tokens in the decoder: evaluated like FastV
    assert [c.type for c in compress_configs(["fopru:0.5", "fastv:0.5", "vtw"])] == ["fopru", "fastv", "vtw"]
    assert compress_configs(None) == []
    with pytest.raises(ValueError, match="compress='v2pe': a 'position' stage, not a compressor or pruner"):
        compress_configs(["v2pe:16"])


# ---------------------------------------------------------------------------------------------
# lmms-eval bridge
# ---------------------------------------------------------------------------------------------


def test_lmms_bridge_core_answers_simple_requests(data_root, tiny_llava):
    from types import SimpleNamespace

    from vlmkit.data.shapes import generate
    from vlmkit.evaluation.lmms_bridge import VlmkitGenerator
    from vlmkit.evaluation.runner import build_input_text, generate_batch

    samples = generate(3, seed=0)
    docs = [{"image": s.image, "q": s.questions[0]["question"]} for s in samples]
    task_dict = {"shapes": {"test": docs}}
    gen = {"max_new_tokens": 4, "until": ["\n\n"]}
    requests = [SimpleNamespace(args=(f"<image>\n{d['q']}", gen, lambda doc: [doc["image"]], i, "shapes", "test"))
                for i, d in enumerate(docs)]
    core = VlmkitGenerator(tiny_llava[0], processor=tiny_llava[1], batch_size=2)
    try:
        got = core.generate_until(requests, task_dict)
        texts = [build_input_text(core.loaded.processor, d["q"]) for d in docs]
        want = [r["output"] for r in generate_batch(core.loaded, [d["image"] for d in docs], texts, gen)]
    finally:
        core.loaded.release()
    assert got == want


def test_lmms_eval_model_class():
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra")
    from vlmkit.evaluation.lmms_bridge import VlmkitLMM

    assert hasattr(VlmkitLMM, "generate_until") and VlmkitLMM.is_simple
