"""Adapting the shipped shapes model (issue 21): the training format it speaks, training with PVC / V2PE on,
``vlmkit.load`` of a ``vlmkit finetune --wrap`` folder, and the shipped adapters' cards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "vlmkit" / "assets" / "shapes-llava-tiny"
ADAPTERS = REPO / "vlmkit" / "assets" / "adapters"


def _script():
    spec = importlib.util.spec_from_file_location("train_adapters", REPO / "scripts" / "train_adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The shipped adapters' recipe (scripts/train_adapters.py RECIPE) as a file."""
    path = tmp_path_factory.mktemp("recipe") / "adapters.yaml"
    path.write_text(_script().RECIPE)
    return path


# ------------------------------------------------------------------------------------------------
# The format the shipped model speaks
# ------------------------------------------------------------------------------------------------


def test_single_turn_records_tokenize_to_the_training_prompt(tmp_path):
    """Every single-turn record → exactly the ids and labels ``shapes_data.encode_turns`` trained the model on."""
    from transformers import AutoProcessor

    from vlmkit.data import shapes
    from vlmkit.train import shapes_data
    from vlmkit.train.data import encode_conversation, load_conversations

    processor = AutoProcessor.from_pretrained(SHIPPED)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    samples = shapes.generate(3, seed=4)
    path = shapes.write_dataset(tmp_path, 3, seed=4, llava_format="single-turn")["llava"]
    convs = load_conversations(path)
    assert [(c.messages[0]["content"], c.messages[1]["content"]) for c in convs] == [
        (f"<image> {q['question']}", q["answer"]) for s in samples for q in s.questions]
    for conv, qa in zip(convs, [q for s in samples for q in s.questions]):
        enc = encode_conversation(conv, processor, template="auto")  # no chat template: plain
        ids, labels, _, _ = shapes_data.encode_turns([(qa["question"], qa["answer"])], tok, image_id, 64)
        assert enc["input_ids"].tolist() == ids.tolist() and enc["labels"].tolist() == labels.tolist()
    multi = load_conversations(shapes.write_dataset(tmp_path / "m", 3, seed=4)["llava"])[0]
    first = encode_conversation(multi, processor)["input_ids"].tolist()
    assert tok.convert_tokens_to_ids("\n") in first  # the multi-turn layout puts "<image>\n": a token never trained


def test_finetune_on_single_turn_starts_at_the_training_loss(tmp_path, recipe):
    """``vlmkit shapes`` → ``vlmkit finetune`` on the shipped model: its first step's loss is its training loss
    (< 1.5); on the multi-turn export the same model is lost (> 3)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmkit.cli import main
    from vlmkit.train.data import SupervisedDataset, collate, load_conversations

    assert main(["shapes", "--out", str(tmp_path / "s"), "--n", "4", "--seed", "2"]) == 0  # single-turn default
    out = tmp_path / "ft"
    assert main(["finetune", "--recipe", str(recipe), "--model", str(SHIPPED), "--data",
                 str(tmp_path / "s" / "llava_shapes_vqa.json"), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "8", "--quiet"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[0] < 1.5, losses
    assert main(["shapes", "--out", str(tmp_path / "m"), "--n", "4", "--seed", "2", "--format", "multi-turn"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED)
    ds = SupervisedDataset(load_conversations(tmp_path / "m" / "llava_shapes_vqa.json"), processor)
    with torch.no_grad():
        loss = model(**collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id)).loss.item()
    assert loss > 3, loss


# ------------------------------------------------------------------------------------------------
# Training with PVC (and V2PE) on; vlmkit.load of the output
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pvc_run(tmp_path_factory, recipe):
    """3 steps of ``vlmkit finetune --wrap pvc:... v2pe:8`` on tiny:llava with the adapters' recipe: the trainer
    (its wrapped model as trained, in memory), every parameter before training, and the output folder."""
    from vlmkit.data import shapes
    from vlmkit.train.loop import FinetuneArgs
    from vlmkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("pvc")
    data = shapes.write_dataset(root / "data", 4, seed=0, size=32, llava_format="single-turn")["llava"]
    args = FinetuneArgs(recipe=str(recipe), model="tiny:llava", data=str(data), output=str(root / "out"),
                        wrap=["pvc:frames=2,tokens_per_frame=4,temporal_layers=1", "v2pe:8"], max_steps=3,
                        batch_size=2, quiet=True)
    trainer = Trainer(args).setup()
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    trainer.train()
    trainer.finish()
    return trainer, before, root


def test_training_with_pvc_changes_pvc_and_lora_parameters_only(pvc_run):
    trainer, before, _ = pvc_run
    after = dict(trainer.unwrapped.named_parameters())
    assert set(after) == set(before)
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    pvc = {n for n in after if n.startswith("stages.pvc.")}
    lora = {n for n in after if ".lora_A." in n or ".lora_B." in n}
    assert pvc and lora and not pvc & lora
    assert trainable == pvc | lora  # the recipe trains LoRA and the stage's own parameters, nothing else
    assert changed == trainable, (sorted(trainable - changed)[:5], sorted(changed - trainable)[:5])


def test_load_restores_model_stages_and_adapter_in_one_call(pvc_run, tmp_path):
    """``vlmkit.load(folder)`` of a ``vlmkit finetune --wrap`` output = the trained wrapper in memory (logits
    bit-exact), and ``vlmkit eval --model folder`` runs it with its stages (PVC: 2 × 4 tokens per image)."""
    import vlmkit
    from vlmkit.evaluation import evaluate
    from vlmkit.train.data import collate

    trainer, _, root = pvc_run
    out = root / "out"
    assert not (out / "config.json").exists()  # no base weights there: the base comes from finetune.json
    loaded = vlmkit.load(str(out)).eval()
    trained = trainer.unwrapped.eval()
    assert [c.to_dict() for c in loaded.stage_configs] == [c.to_dict() for c in trained.stage_configs]
    assert type(loaded.base_model).__name__ == "PeftModel"
    batch = collate([trainer.dataset[i] for i in range(3)], trainer.pad_id)
    with torch.no_grad():
        expected = trained(**batch).logits
        got = loaded(**batch).logits
    assert torch.equal(got, expected)
    vlmkit.unwrap(loaded)
    with torch.no_grad():  # the adapter and stage weights matter: without them the logits differ
        assert not torch.equal(vlmkit.wrap(loaded.base_model.get_base_model()).eval()(**batch).logits, expected)
    data = tmp_path / "data"
    data.mkdir()
    res = evaluate(str(out), "shapes_vqa", limit=2, data_root=str(data), quiet=True)
    assert res["n-samples"]["shapes_vqa"]["effective"] == 2
    assert res["throughput"]["shapes_vqa"]["visual_tokens"] == 2 * 2 * 4


# ------------------------------------------------------------------------------------------------
# V2PE: strides drawn per image while training, seeded
# ------------------------------------------------------------------------------------------------


def _multi_image_batch(processor, counts):
    from PIL import Image

    from vlmkit.predictor import build_prompt

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]
    images = [[Image.new("RGB", (32, 32), colours[(i + j) % 6]) for j in range(n)] for i, n in enumerate(counts)]
    texts = [build_prompt(processor, "how many shapes are there ?", "plain", n) for n in counts]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _deltas(batch, positions) -> list[float]:
    """Per image (in ``batch.tokens`` order): the position step inside its visual run."""
    out = []
    for i in range(len(batch.tokens)):
        slots = (batch.image_id == i) & batch.visual_mask
        (row,) = slots.any(dim=1).nonzero()[:, 0].tolist()
        steps = positions[row][slots[row]].diff().unique()
        assert steps.numel() == 1, steps  # one stride per image
        out.append(float(steps[0]))
    return out


def test_v2pe_training_draws_one_stride_per_image_seeded():
    import vlmkit
    from vlmkit.position.v2pe import V2PEConfig, draw_train_strides
    from vlmkit.testing import tiny_vlm

    model, processor = tiny_vlm("llava", seed=0)
    strides = (1, 2, 4, 8, 16)
    wrapped = vlmkit.wrap(model, V2PEConfig(stride=8, train_strides=strides))  # tiny LLaVA: 16 tokens per image
    stage = wrapped.stages["v2pe"]
    inputs = _multi_image_batch(processor, [1, 3, 2, 4])
    batch = wrapped.assemble(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    assert len(batch.tokens) == 10

    def drawn(seed):
        torch.manual_seed(seed)
        return [d * 16 for d in _deltas(batch, stage.rope_positions(batch))]

    wrapped.train()
    first = drawn(5)
    torch.manual_seed(5)
    assert first == [float(s) for s in draw_train_strides(10, strides)]  # one draw per image, torch's RNG
    assert set(first) <= set(strides) and len(set(first)) > 1  # per image, not one per batch
    assert drawn(5) == first and drawn(6) != first  # reproducible with the seed
    wrapped.eval()
    assert drawn(5) == [8.0] * 10  # evaluation: the configured stride

    # through the wrapper's training forward: the language model runs with per-image strides from the set
    seen = []
    original = stage.rope_positions

    def spy(b, training=None):
        positions = original(b, training)
        seen.append(_deltas(b, positions))
        return positions

    stage.rope_positions = spy
    wrapped.train()
    for seed in (3, 3):
        torch.manual_seed(seed)
        wrapped(**inputs, labels=inputs["input_ids"])
    assert len(seen) == 2 and seen[0] == seen[1] and len(set(seen[0])) > 1
    assert {d * 16 for d in seen[0]} <= set(strides)


# ------------------------------------------------------------------------------------------------
# The shipped adapters reproduce their cards
# ------------------------------------------------------------------------------------------------

SHIPPED_ADAPTERS = sorted(p.parent for p in ADAPTERS.glob("*/metrics.json")) if ADAPTERS.is_dir() else []


@pytest.mark.skipif(not SHIPPED_ADAPTERS, reason="no adapters shipped yet (scripts/train_adapters.py writes them)")
def test_shipped_adapters_reproduce_their_card_numbers(tmp_path):
    """Each adapter under vlmkit/assets/adapters, loaded in one call, scores its card's ``check`` numbers (a fixed
    held-out subset) within 2 points."""
    from vlmkit.evaluation import evaluate

    data = tmp_path / "data"
    data.mkdir()
    for folder in SHIPPED_ADAPTERS:
        check = json.loads((folder / "metrics.json").read_text())["check"]
        for task, limit in check["limits"].items():
            res = evaluate(str(folder), task, limit=limit, data_root=str(data), batch_size=32, quiet=True)
            value = res["results"][task]["vqa_accuracy,none"]
            key = "vqa" if task == "shapes_vqa" else f"N={task.rsplit('_', 1)[1]}"
            assert abs(value - check["values"][key]) <= 0.02, (folder.name, task, value, check["values"][key])
