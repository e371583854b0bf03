"""TRL's ``SFTTrainer`` on a wrapped PEFT model with pruning on: its fused LM head runs through vlmkit (the
decoder sees the pruned sequence), its loss equals vlmkit's own loop on the same batches, and its saved adapter
is a plain PEFT adapter of the HF model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.testing import image_prompt, random_images, tiny_vlm

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'vlmkit[trl]'")
datasets = pytest.importorskip("datasets", reason="datasets (a dependency of TRL) is not installed")

# PEFT reads the HF model's deprecated is_gradient_checkpointing; SFTConfig renames gradient_checkpointing
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")]

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?",
             "what shape is red ?"]
KEEP = 0.5


def _dataset(processor):
    """TRL's vision "text" format: one image per record; the collator labels every non-padding token."""
    images = random_images(len(QUESTIONS), seed=5)
    texts = [image_prompt(processor, q, 1) + " red" for q in QUESTIONS]
    return datasets.Dataset.from_dict({"text": texts, "images": [[im] for im in images]})


def _config(out, steps: int):
    # fp32 and a constant rate, so that a plain AdamW loop can replay the run; TRL turns checkpointing on
    return trl.SFTConfig(str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                         lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         max_length=None, dataset_text_field="text", remove_unused_columns=False,
                         disable_tqdm=True, seed=0)


def _peft_wrapped():
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_vlm("llava", seed=0)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return vlmkit.wrap(peft_model, vlmkit.FoPruConfig(keep_ratio=KEEP)), processor


def _decoder_lengths(wrapped) -> list[int]:
    """Sequence length of every call of the decoder (``family.language_model``), recorded by a hook."""
    lengths: list[int] = []
    wrapped.family.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    return lengths


def _record(trainer) -> tuple[list[dict], list[float]]:
    """The batches TRL's collator makes and the loss of each step (``compute_loss``), as the trainer sees them."""
    batches, losses = [], []
    collate, compute = trainer.data_collator, trainer.compute_loss

    def recording_collate(examples):
        batch = collate(examples)
        batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    def recording_loss(model, inputs, *args, **kwargs):
        loss = compute(model, inputs, *args, **kwargs)
        losses.append(loss.detach().item())
        return loss

    trainer.data_collator, trainer.compute_loss = recording_collate, recording_loss
    return batches, losses


def test_sft_trainer_lora_with_pruning_equals_vlmkit_loop(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    steps = 3
    wrapped, processor = _peft_wrapped()
    lengths = _decoder_lengths(wrapped)
    trainer = trl.SFTTrainer(model=wrapped, args=_config(tmp_path / "run", steps), train_dataset=_dataset(processor),
                             processing_class=processor)
    # TRL's fused LM head is kept as the wrapper's, not installed over vlmkit's forward
    assert "forward" not in wrapped.__dict__ and "_fused_lm_head" in wrapped.__dict__
    batches, losses = _record(trainer)
    trainer.train()
    assert len(losses) == steps and len(batches) >= steps  # the data loader may collate one batch ahead
    batches = batches[:steps]
    assert wrapped.is_gradient_checkpointing  # TRL's default, on the decoder

    # the decoder saw the pruned sequence: one call per step, of the assembled length (KEEP of each image's tokens)
    with torch.no_grad():
        assembled = [wrapped.assemble(b["input_ids"], b["pixel_values"], b["attention_mask"]).inputs_embeds.shape[1]
                     for b in batches]
    image_tokens = [int((b["input_ids"][0] == wrapped.family.placeholder_id).sum()) for b in batches]
    assert lengths == assembled
    assert assembled == [b["input_ids"].shape[1] - round(n * (1 - KEEP)) for b, n in zip(batches, image_tokens)]

    # vlmkit's own loop (forward loss, AdamW, clipping at 1.0) on the same batches gives the same losses
    own, _ = _peft_wrapped()
    own.train()
    params = [p for p in own.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    own_losses = []
    for batch in batches:
        loss = own(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        own_losses.append(loss.item())
    assert own_losses == pytest.approx(losses, abs=1e-5)  # fused log-softmax vs cross-entropy: ~5e-7
    assert losses[-1] != losses[0]  # the steps changed the adapter

    # the saved adapter is a plain PEFT adapter of the HF model
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert "model.safetensors" not in os.listdir(out)
    loaded = PeftModel.from_pretrained(tiny_vlm("llava", seed=0)[0], out)
    assert set(load_file(str(out / "adapter_model.safetensors"))) == set(get_peft_model_state_dict(loaded))
    reloaded = vlmkit.load(loaded, out).eval()
    with torch.no_grad():
        batch = {k: v for k, v in batches[0].items() if k != "use_cache"}
        assert torch.equal(reloaded(**batch).logits, wrapped.eval()(**batch).logits)


def test_sft_trainer_peft_config_around_the_wrapper_trains_but_refuses_to_save(tmp_path):
    """``SFTTrainer(wrapped, peft_config=...)`` puts PEFT around the wrapper: training still goes through vlmkit,
    but the adapter would not load on the plain model, so saving it raises."""
    from peft import LoraConfig

    model, processor = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=KEEP))
    lengths = _decoder_lengths(wrapped)
    trainer = trl.SFTTrainer(model=wrapped, args=_config(tmp_path / "run", 1), train_dataset=_dataset(processor),
                             processing_class=processor,
                             peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batches, _ = _record(trainer)
    trainer.train()
    full = batches[0]["input_ids"].shape[1]
    assert len(lengths) == 1 and lengths[0] < full
    with pytest.raises(ValueError, match=r"Apply PEFT first"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "adapter_model.safetensors").exists()
