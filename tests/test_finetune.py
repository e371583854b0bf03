"""``vlmkit finetune``: data formats and labels, loss goes down, QLoRA on CPU, DDP with 2 processes,
exact resume after SIGKILL, and the saved adapter loading with plain PEFT and with vlmkit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.testing import tiny_vlm
from vlmkit.train.cli import cli_main
from vlmkit.train.data import (
    IGNORE_INDEX, collate, encode_conversation, load_conversations, normalize_record, pad_token_id, SupervisedDataset,
)
from vlmkit.train.loop import batch_indices, check_launch_env, data_order, load_finetuned

from _stages import DropEveryOtherConfig  # noqa: F401  (registers the test stage type)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory) -> Path:
    """8 shapes images (32 px) with their QA pairs as LLaVA conversation JSON."""
    from vlmkit.data.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=0, size=32)["llava"]


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on shared cores, and the same arithmetic as the subprocesses below."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def _finetune(*args) -> None:
    assert cli_main([*map(str, args), "--quiet"]) == 0


def _dataset_loss(wrapped, processor, data: Path) -> float:
    """Mean answer-token loss of ``wrapped`` over every record of ``data`` (one batch)."""
    ds = SupervisedDataset(load_conversations(data), processor)
    batch = collate([ds[i] for i in range(len(ds))], pad_token_id(processor))
    with torch.no_grad():
        return wrapped.eval()(**batch).loss.item()


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --- data ------------------------------------------------------------------------------------------


def test_llava_labels_cover_only_the_answers(shapes_json):
    model, processor = tiny_vlm("llava", seed=0)
    conv = load_conversations(shapes_json)[0]
    enc = encode_conversation(conv, processor)
    tok = processor.tokenizer
    ids, labels = enc["input_ids"], enc["labels"]
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    trained = tok.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
    assert trained == [w for a in answers for w in (a, "</s>")]
    image_id = model.config.image_token_id
    n_image = int((ids == image_id).sum())
    assert n_image == (32 // 8) ** 2  # the processor expanded the marker: 16 patches (CLS dropped)
    assert (labels[ids == image_id] == IGNORE_INDEX).all()
    assert enc["pixel_values"].shape == (1, 3, 32, 32)


def test_sharegpt_messages_and_internvl_expansion(tmp_path):
    from vlmkit.testing import random_images

    random_images(1)[0].save(tmp_path / "a.png")
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([{"messages": [
        {"role": "system", "content": "describe the image ."},
        {"role": "user", "content": "<image> what color is the circle ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many shapes are there ?"},
        {"role": "assistant", "content": "2"},
    ], "images": ["a.png"]}]))
    conv = load_conversations(data)[0]
    _, processor = tiny_vlm("internvl", seed=0)
    enc = encode_conversation(conv, processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"].tolist())
    assert tokens.count("<IMG_CONTEXT>") == processor.image_seq_length and "<img>" in tokens and "</img>" in tokens
    trained = processor.tokenizer.convert_ids_to_tokens(enc["labels"][enc["labels"] != IGNORE_INDEX].tolist())
    assert trained == ["red", "</s>", "2", "</s>"]


def test_chat_template_split_gives_the_same_answer_spans(shapes_json):
    _, processor = tiny_vlm("llava", seed=0)
    processor.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}</s> {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    conv = load_conversations(shapes_json)[1]
    enc = encode_conversation(conv, processor, template="chat")
    trained = processor.tokenizer.convert_ids_to_tokens(enc["labels"][enc["labels"] != IGNORE_INDEX].tolist())
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    assert trained == [w for a in answers for w in (a, "</s>")]


def test_marker_count_must_match_images_and_errors_name_the_record(tmp_path):
    record = {"id": "r7", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(ValueError, match=r"data.json record 3 \(id 'r7'\): 2 <image> marker\(s\) in the text but 1 image"):
        normalize_record(record, 3, "data.json", check_files=False)
    with pytest.raises(ValueError, match=r"record 0: turn 0 has from='robot'; accepted"):
        normalize_record({"conversations": [{"from": "robot", "value": "x"}]}, 0, "d", check_files=False)
    with pytest.raises(ValueError, match="no assistant turn"):
        normalize_record({"messages": [{"role": "user", "content": "hi"}]}, 0, "d", check_files=False)
    record["conversations"][0]["value"] = "<image> what ?"
    with pytest.raises(FileNotFoundError, match=r"image 'x.png' not found"):
        normalize_record(record, 0, "d", json_dir=tmp_path)


def test_collate_right_pads():
    feats = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.ones(1, 3, 2, 2)},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None},
    ]
    b = collate(feats, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["pixel_values"].shape == (1, 3, 2, 2)


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    assert data_order(10, 3, 1) == data_order(10, 3, 1)
    assert data_order(10, 3, 1) != data_order(10, 3, 2) and sorted(data_order(10, 3, 2)) == list(range(10))
    # ranks split each global batch; the epoch's records are all seen once before wrapping
    steps = [batch_indices(s, 8, 2, 2, r, seed=0) for s in range(2) for r in range(2)]
    assert sorted(i for b in steps for i in b) == list(range(8))


def test_accelerate_cpu_single_process_trap_is_reported():
    with pytest.raises(RuntimeError, match=r"accelerate#2741.*--multi_gpu --num_processes N"):
        check_launch_env({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"})
    check_launch_env({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"})
    check_launch_env({"ACCELERATE_USE_CPU": "True"})


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_finetune_lowers_the_loss_and_reloads_with_plain_peft_and_vlmkit(shapes_json, tmp_path, one_thread):
    """LoRA + a trained vlmkit stage + FoPru active while training; interop of the output folder."""
    from peft import PeftModel

    recipe = tmp_path / "lora-stage.yaml"
    recipe.write_text((REPO / "adapters" / "lora.yaml").read_text().replace(
        "  train: []\n", "  train: [test_drop_every_other]\n", 1))
    out = tmp_path / "out"
    specs = ["fopru:0.5", "test_drop_every_other:1.0"]
    _finetune("--recipe", recipe, "--model", "tiny:llava", "--data", shapes_json, "--output", out,
              "--wrap", *specs, "--max-steps", 12, "--batch-size", 8, "--lr", 3e-3)

    for name in ("adapter_config.json", "adapter_model.safetensors", "vlmkit.json", "vlmkit_stages.safetensors"):
        assert (out / name).is_file(), name
    log = _log(out)
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"]  # same full batch every step

    from vlmkit.config import parse_stage_spec

    base, processor = tiny_vlm("llava", seed=0)
    before = _dataset_loss(vlmkit.wrap(base, *map(parse_stage_spec, specs)), processor, shapes_json)
    tuned = load_finetuned(out, tiny_vlm("llava", seed=0)[0])
    after = _dataset_loss(tuned, processor, shapes_json)
    assert after < before - 0.05, (before, after)
    assert [c.type for c in tuned.stage_configs] == ["fopru", "test_drop_every_other"]
    assert tuned.stages[1].scale.item() != 1.0  # the trained stage weight came back

    # plain PEFT on the base model, then the vlmkit stages from the same folder
    peft_model = PeftModel.from_pretrained(tiny_vlm("llava", seed=0)[0], out)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    assert any("multi_modal_projector" in k for k in adapter)
    reloaded = vlmkit.load(peft_model, out)
    ds = SupervisedDataset(load_conversations(shapes_json), processor)
    batch = collate([ds[0], ds[1]], pad_token_id(processor))
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, tuned(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("name", ["dora", "lisa", "full-projector", "qlora"])
def test_other_recipes_train_only_their_parameters(name, shapes_json, tmp_path, one_thread):
    if name == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # pragma: no cover
            pytest.skip(f"bitsandbytes unavailable: {type(e).__name__}: {e}")
    out = tmp_path / name
    model_spec = "tiny:llava"
    if name == "qlora":  # a checkpoint folder: quantized while loading (BitsAndBytesConfig), on CPU
        model_spec = tmp_path / "base"
        for part in tiny_vlm("llava", seed=0):
            part.save_pretrained(model_spec)
    _finetune("--recipe", name, "--model", model_spec, "--data", shapes_json, "--output", out,
              "--max-steps", 6, "--batch-size", 8, "--lr", 3e-3)
    log = _log(out)
    assert log[-1]["loss"] < log[0]["loss"], log
    meta = json.loads((out / "finetune.json").read_text())
    n_lm_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_vlm("llava")[0].model.language_model.modules())
    assert meta["quantized_linear_layers"] == (n_lm_linear if name == "qlora" else 0)
    ckpt = load_file(str(out / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    base = dict(tiny_vlm("llava", seed=0)[0].named_parameters())
    if name == "full-projector":
        trained = load_file(str(out / "trained_weights.safetensors"))
        assert set(trained) == {n for n in base if n.startswith("model.multi_modal_projector.")}
        assert all(not torch.equal(trained[n], base[n]) for n in trained if n.endswith("weight"))
        tuned = load_finetuned(out, "tiny:llava")
        assert torch.equal(tuned.base_model.model.multi_modal_projector.linear_1.weight,
                           trained["model.multi_modal_projector.linear_1.weight"])
    else:
        assert (out / "adapter_model.safetensors").is_file()
        assert all("lora_" in k or "modules_to_save" in k for k in ckpt)
    if name == "lisa":
        assert any("embed_tokens.modules_to_save" in k for k in ckpt) and any("lm_head.modules_to_save" in k for k in ckpt)


def test_cli_errors_before_loading_a_model(shapes_json, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nlora:\n  rank: 8\n")
    args = ["--model", "tiny:llava", "--data", str(shapes_json), "--output", str(tmp_path / "o")]
    assert cli_main(["--recipe", str(bad), *args]) == 2
    assert "bad.yaml: lora: unknown key(s) ['rank']" in capsys.readouterr().err
    stale = tmp_path / "o" / "checkpoints" / "step-00000002"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    assert cli_main(["--recipe", "lora", *args]) == 2
    assert "pass --resume to continue" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_run_agrees_across_ranks(shapes_json, tmp_path):
    """DDP on gloo with 2 CPU processes (`accelerate launch --multi_gpu` starts them with torchrun; vlmkit
    then uses gloo because of --cpu; plain `--cpu --num_processes 2` needs mpirun, see accelerate#2741)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "scripts" / "finetune.py"), "--cpu",
           "--recipe", "lora", "--model", "tiny:llava", "--data", str(shapes_json), "--output", str(out),
           "--max-steps", "3", "--batch-size", "2", "--save-rank-weights", "--quiet"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 3
    r0 = load_file(str(out / "ranks" / "rank0.safetensors"))
    r1 = load_file(str(out / "ranks" / "rank1.safetensors"))
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in r0.items())  # it did train
    last = out / "checkpoints" / "step-00000003"
    assert (last / "rng_state_0.safetensors").is_file() and (last / "rng_state_1.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(shapes_json, tmp_path, one_thread):
    common = ["--recipe", "lora", "--model", "tiny:llava", "--data", str(shapes_json), "--max-steps", "14",
              "--batch-size", "3", "--save-every", "3", "--lr", "2e-3", "--seed", "5", "--wrap", "fopru:0.5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit", "finetune", *common, "--output", str(killed), "--quiet"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "step-00000003").is_dir():
            assert proc.poll() is None, f"finetune exited early: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before it was killed"

    reference = tmp_path / "reference"
    _finetune(*common, "--output", reference)
    _finetune(*common, "--output", killed, "--resume")
    meta = json.loads((killed / "finetune.json").read_text())
    assert 3 <= meta["resumed_from"] < 14

    a = load_file(str(reference / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    log_a, log_b = _log(reference), _log(killed)
    assert [e["step"] for e in log_b] == list(range(1, 15))
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 for x, y in zip(log_a, log_b))


def _refseg_read_json(tmp_path: Path) -> Path:
    """Shapes referring expressions as LISA-style records: "[SEG]" answers and one mask PNG per record."""
    from PIL import Image

    from vlmkit.data.shapes import generate

    records = []
    for s in generate(4, seed=0, size=32):
        for ref in s.refs[:1]:
            img, mask = tmp_path / f"{s.image_id}.png", tmp_path / f"{s.image_id}_mask.png"
            s.image.save(img)
            Image.fromarray(s.objects[ref["object_index"]].mask.astype("uint8") * 255).save(mask)
            records.append({"id": str(s.image_id), "image": img.name, "masks": [mask.name], "conversations": [
                {"from": "human", "value": f"<image>\nplease segment the {ref['sentence']} in this image ."},
                {"from": "gpt", "value": "sure , [SEG] ."}]})
    path = tmp_path / "refseg_read.json"
    path.write_text(json.dumps(records))
    return path


def test_finetune_trains_a_read_head_on_masks_and_reloads(tmp_path, one_thread, capsys):
    data = _refseg_read_json(tmp_path)
    out = tmp_path / "out"
    _finetune("--recipe", "lisa", "--model", "tiny:llava", "--data", data, "--output", out,
              "--wrap", "read:sam=tiny,down_sample=1", "--max-steps", 6, "--batch-size", 4, "--lr", 1e-3)
    log = _log(out)
    assert log[-1]["loss"] < log[0]["loss"]  # CE + 2·BCE + 0.5·Dice on the same full batch
    tuned = load_finetuned(out, "tiny:llava")
    assert "[SEG]" in tuned.added_tokens and [c.type for c in tuned.stage_configs] == ["read"]
    # the SAM mask decoder moves only through the mask losses: the masks reached the head
    from vlmkit.seg.read import READConfig

    model, processor = tiny_vlm("llava", seed=0)
    fresh = vlmkit.wrap(model, READConfig(sam="tiny", down_sample=1), tokenizer=processor.tokenizer)
    before, after = fresh.stages[0].mask_decoder.state_dict(), tuned.stages[0].mask_decoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the data without a head is refused before training
    assert cli_main(["--recipe", "lora", "--model", "tiny:llava", "--data", str(data), "--output",
                     str(tmp_path / "bad"), "--max-steps", "1", "--quiet"]) != 0
    assert "no segmentation head" in capsys.readouterr().err
