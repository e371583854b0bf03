"""Sharded fine-tuning on CPU, on the real engines: ``vlmkit finetune --shard fsdp|zero2|zero3`` under
``torchrun --nproc_per_node 2`` (torch FSDP2 ``fully_shard`` / DeepSpeed ZeRO over gloo) gives the adapter of
a single-process run on the same global batches; each rank really holds only its shard; and an accelerate
FSDP / DeepSpeed config, which accelerate turns into plain DDP on CPU, stops with an error instead.

Why the runs are comparable, and the tolerance. Every engine averages the ranks' gradients, so a 2-process
step with 2 records per rank computes the gradient of (loss(rank 0 records) + loss(rank 1 records)) / 2,
while one process with 4 records computes the token-mean over all 4. The two are equal when every record has
the same number of answer tokens, which the data here guarantees (two one-word answers per record; the test
checks it). LoRA dropout is 0 (each rank has its own dropout stream). What remains is float32 rounding:
another summation order in the gradient reduction and unpadded vs padded batches, ~1e-7 relative. AdamW
divides each update by the root of its second moment, so an update is about ``lr`` = 1e-3 whatever the
gradient's scale; a rounding-level gradient difference moves an update by far less than that. Measured: at
most 1e-6 after 3 steps on this machine. Tolerance 1e-5 = 1 % of a single step's update; a run that trains
on other data per step (the negative control: half the global batch) lands > 1e-4 away.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS, PER_RANK, LR, TOL = 3, 2, 1e-3, 1e-5

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 shapes records cut to two question/answer turns each, and the lora recipe with dropout 0."""
    from vlmkit.data.shapes import write_dataset
    from vlmkit.testing import tiny_vlm
    from vlmkit.train.data import IGNORE_INDEX, SupervisedDataset, load_conversations

    root = tmp_path_factory.mktemp("sharded")
    records = json.loads(Path(write_dataset(root / "data", 8, seed=0, size=32)["llava"]).read_text())
    for r in records:
        r["conversations"] = r["conversations"][:4]
    data = root / "data" / "two_turns.json"
    data.write_text(json.dumps(records))
    text = (REPO / "adapters" / "lora.yaml").read_text()
    assert "dropout: 0.05" in text
    recipe = root / "lora_nodrop.yaml"
    recipe.write_text(text.replace("dropout: 0.05", "dropout: 0.0"))
    # the premise of the comparison: every record has the same number of answer (label) tokens
    _, processor = tiny_vlm("llava", seed=0)
    ds = SupervisedDataset(load_conversations(data), processor)
    counts = {int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds))}
    assert len(counts) == 1, counts
    return root, data, recipe


def _common(data: Path, recipe: Path) -> list[str]:
    return ["--recipe", str(recipe), "--model", "tiny:llava", "--data", str(data), "--max-steps", str(STEPS),
            "--lr", str(LR), "--seed", "0", "--quiet"]


@pytest.fixture(scope="module")
def single(setup):
    """The single-process reference (4 records per step = the 2 × 2 of the sharded runs) and the negative
    control (2 records per step: half the global batch)."""
    from vlmkit.train.cli import cli_main

    root, data, recipe = setup
    out = {}
    for name, batch in (("single", 2 * PER_RANK), ("half", PER_RANK)):
        assert cli_main([*_common(data, recipe), "--batch-size", str(batch), "--output", str(root / name), "--cpu"]) == 0
        out[name] = root / name
    return out


def _torchrun(out: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "scripts" / "finetune.py"), "--cpu", *args, "--output", str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("engine", ["fsdp", "zero2", "zero3"])
def test_two_process_sharded_run_equals_the_single_process_run(engine, setup, single):
    if engine.startswith("zero") and not _has_deepspeed():
        reason = "DeepSpeed is not installed (pip install -e '.[deepspeed]'); ZeRO runs are not tested here"
        print(reason)
        pytest.skip(reason)
    root, data, recipe = setup
    out = root / engine
    run = _torchrun(out, ["--shard", engine, *_common(data, recipe), "--batch-size", str(PER_RANK), "--save-rank-weights"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == STEPS
    assert meta["engine"] == {"fsdp": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[engine]

    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(single["single"] / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in got.items())  # it trained
    assert _max_diff(got, want) <= TOL
    # negative control: the same tolerance tells a run on other batches apart
    assert _max_diff(load_file(str(single["half"] / "adapter_model.safetensors")), want) > 10 * TOL
    log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["loss"] for line in (single["single"] / "train_log.jsonl").read_text().splitlines()]
    assert log == pytest.approx(ref, abs=1e-5)

    # what each rank holds: FSDP2 and ZeRO-3 shard the parameters (half each), ZeRO-2 keeps them whole
    ranks = [load_file(str(out / "ranks" / f"rank{r}.safetensors")) for r in (0, 1)]
    total = meta["trainable_parameters"]
    held = [sum(t.numel() for t in r.values()) for r in ranks]
    if engine == "zero2":
        assert held == [total, total]
    else:
        assert sum(held) >= total and max(held) < total, (held, total)

    # the saved adapter is a plain PEFT adapter of the unwrapped model
    from peft import PeftModel

    from vlmkit.testing import tiny_vlm

    base, _ = tiny_vlm("llava", seed=0)
    loaded = PeftModel.from_pretrained(base, out)
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert state and all(torch.equal(state[k.replace(".weight", ".default.weight")], v)
                         for k, v in got.items() if "lora_" in k)


def test_accelerate_configs_are_files_accelerate_reads():
    """adapters/accelerate/{fsdp,zero2,zero3}.yaml load with accelerate's own config reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(REPO / "adapters" / "accelerate" / "fsdp.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config["fsdp_version"] == 2
    for stage in (2, 3):
        cfg = load_config_from_file(str(REPO / "adapters" / "accelerate" / f"zero{stage}.yaml"))
        assert str(cfg.distributed_type).endswith("DEEPSPEED") and cfg.deepspeed_config["zero_stage"] == stage
    from vlmkit.train.recipes import available_recipes

    assert not {"fsdp", "zero2", "zero3"} & set(available_recipes())  # configs, not recipes


def test_check_engine_refuses_a_silent_fallback():
    from vlmkit.train.sharding import check_engine

    with pytest.raises(RuntimeError, match=r"asks for FSDP.*runs MULTI_CPU.*--shard fsdp"):
        check_engine("MULTI_CPU", None, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(RuntimeError, match=r"asks for DEEPSPEED.*runs MULTI_GPU.*--shard zero2\|zero3"):
        check_engine("MULTI_GPU", None, {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(RuntimeError, match=r"--shard fsdp .* accelerate already runs DEEPSPEED"):
        check_engine("DEEPSPEED", "fsdp", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match=r"--shard 'zero1'"):
        check_engine("MULTI_CPU", "zero1", {})
    check_engine("FSDP", None, {"ACCELERATE_USE_FSDP": "true"})  # what was asked for runs
    check_engine("MULTI_CPU", "fsdp", {})
    check_engine("NO", None, {})


def test_sharding_without_a_launcher_is_an_error(setup, tmp_path):
    from vlmkit.train.cli import cli_main

    _, data, recipe = setup
    assert cli_main([*_common(data, recipe), "--shard", "fsdp", "--output", str(tmp_path / "o"), "--cpu"]) == 2
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("config", ["fsdp", "zero2"])
def test_accelerate_sharding_config_on_cpu_stops_instead_of_running_ddp(config, setup, tmp_path):
    """`accelerate launch --config_file adapters/accelerate/<config>.yaml` on a CPU host: accelerate would run
    MULTI_CPU (DDP, full copies); vlmkit stops every rank with an error naming the fix."""
    root, data, recipe = setup
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "adapters" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(REPO / "scripts" / "finetune.py"), "--cpu",
           *_common(data, recipe), "--batch-size", "2", "--max-steps", "1", "--output", str(out)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert not (out / "adapter_model.safetensors").exists()
    text = run.stdout + run.stderr
    if config == "zero2" and not _has_deepspeed():  # accelerate's DeepSpeed launcher refuses before vlmkit runs
        assert "DeepSpeed is not installed" in text, text[-3000:]
        return
    engine = "FSDP" if config == "fsdp" else "DEEPSPEED"
    assert f"the accelerate config asks for {engine}" in text and "runs MULTI_CPU" in text, text[-3000:]
