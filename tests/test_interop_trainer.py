"""The wrapper as a ``PreTrainedModel`` for transformers and PEFT: its delegated surface, ``transformers.Trainer``
(plain PEFT adapters from ``save_model``, activation checkpointing), ``save_pretrained`` with the processor,
``merge_and_unload`` and ``push_to_hub`` — each with the real library."""

from __future__ import annotations

import os

import pytest
import torch
from _stages import DropEveryOtherConfig
from conftest import make_batch
from safetensors.torch import load_file

import vlmkit
from vlmkit.testing import image_prompt, random_images, tiny_vlm

# PEFT reads the HF model's deprecated is_gradient_checkpointing; TrainingArguments renames gradient_checkpointing
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")]

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?",
             "what shape is red ?"]


def _peft_wrapped(seed: int = 0, keep_ratio: float = 0.5, **lora):
    """``vlmkit.wrap(PeftModel)`` (the documented order) of the tiny LLaVA, FoPru on; and its processor."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_vlm("llava", seed=seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora))
    return vlmkit.wrap(peft_model, vlmkit.FoPruConfig(keep_ratio=keep_ratio)), processor


class _Records(torch.utils.data.Dataset):
    """Four image + question + answer records; ``collate`` makes right-padded batches with labels."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.images = random_images(len(QUESTIONS), seed=3)

    def __len__(self) -> int:
        return len(QUESTIONS)

    def __getitem__(self, i: int) -> dict:
        return {"text": image_prompt(self.processor, QUESTIONS[i], 1) + " red", "image": self.images[i]}

    def collate(self, records: list[dict]) -> dict:
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(images=[[r["image"]] for r in records], text=[r["text"] for r in records],
                               return_tensors="pt", padding=True)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return dict(batch)


def _train(wrapped, processor, out, **args):
    """Two steps of ``transformers.Trainer`` (batch 2, lr 1e-2, no shuffling effects on the comparison)."""
    from transformers import Trainer, TrainingArguments

    data = _Records(processor)
    targs = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                              lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                              remove_unused_columns=False, disable_tqdm=True, seed=0, **args)
    trainer = Trainer(model=wrapped, args=targs, train_dataset=data, data_collator=data.collate)
    trainer.train()
    return trainer, data


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# --- the PreTrainedModel surface ----------------------------------------------------------------------


def test_wrapper_is_a_pretrained_model_by_delegation():
    from transformers import PreTrainedModel

    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5))
    assert isinstance(wrapped, PreTrainedModel)  # what Trainer checks before it calls save_pretrained
    assert wrapped.device == model.device == torch.device("cpu") and wrapped.dtype == model.dtype == torch.float32
    assert wrapped.config is model.config and wrapped.generation_config is model.generation_config
    assert wrapped.can_generate() and wrapped.main_input_name == "input_ids"
    assert wrapped.get_input_embeddings() is model.get_input_embeddings()
    assert wrapped.get_output_embeddings() is model.get_output_embeddings() is model.lm_head
    assert wrapped.accepts_loss_kwargs is False  # Trainer's num_items_in_batch would count visual slots

    wrapped.add_model_tags(["vlmkit", "sft"])
    assert model.model_tags == ["vlmkit", "sft"] and wrapped.model_tags == ["vlmkit", "sft"]

    layers = model.model.language_model.layers
    assert not wrapped.is_gradient_checkpointing
    wrapped.gradient_checkpointing_enable()
    assert wrapped.is_gradient_checkpointing and wrapped.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in layers)
    # the vision tower stays as it is: FoPru's hooks on its layers would be gone when backward recomputes them
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.model.vision_tower.modules())
    wrapped.gradient_checkpointing_disable()
    assert not wrapped.is_gradient_checkpointing and not any(layer.gradient_checkpointing for layer in layers)


def test_activation_checkpointing_is_refused_with_decoder_stages():
    from vlmkit.decoder.fastv import FastVConfig

    model, _ = tiny_vlm("llava", seed=0)
    wrapped = vlmkit.wrap(model, FastVConfig.example())
    with pytest.raises(ValueError, match=r"decoder stage\(s\) \['fastv'\]"):
        wrapped.activation_checkpointing_enable()
    assert not any(layer.gradient_checkpointing for layer in model.model.language_model.layers)


# --- transformers.Trainer -----------------------------------------------------------------------------


def test_trainer_save_model_writes_a_plain_peft_adapter(tmp_path):
    """Trainer on ``vlmkit.wrap(PeftModel)``: save_model writes the adapter of the HF model (not the wrapper's
    whole state dict), which plain PEFT loads on an unwrapped base with every key and the same logits."""
    from peft import PeftModel, get_peft_model_state_dict

    wrapped, processor = _peft_wrapped()
    before = _lora(wrapped)
    trainer, data = _train(wrapped, processor, tmp_path / "run")
    assert any(not torch.equal(before[n], p) for n, p in _lora(wrapped).items()), "the adapter must have trained"
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "vlmkit.json"} <= files
    assert "model.safetensors" not in files

    base, _ = tiny_vlm("llava", seed=0)
    loaded = PeftModel.from_pretrained(base, out)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(get_peft_model_state_dict(loaded)), "every key of the adapter loads, none is missing"
    trained = _lora(wrapped.base_model)
    assert _lora(loaded).keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in _lora(loaded).items())
    reloaded = vlmkit.load(loaded, out).eval()
    assert [c.type for c in reloaded.stage_configs] == ["fopru"]
    batch = data.collate([data[0], data[1]])
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, wrapped.eval()(**batch).logits)


def test_trainer_gradient_checkpointing_on_a_wrapped_peft_model(tmp_path):
    """``TrainingArguments(gradient_checkpointing=True)``: the decoder layers are checkpointed while training and
    the adapter after two steps equals the one trained without checkpointing."""
    seen = []
    plain, processor = _peft_wrapped(seed=1)
    _train(plain, processor, tmp_path / "plain")
    checkpointed, processor = _peft_wrapped(seed=1)
    checkpointed.register_assemble_hook(lambda w, batch: seen.append(w.is_gradient_checkpointing))
    _train(checkpointed, processor, tmp_path / "ckpt", gradient_checkpointing=True)
    assert seen and all(seen)
    ref, got = _lora(plain), _lora(checkpointed)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)


def test_peft_around_the_wrapper_refuses_to_save(tmp_path):
    """``get_peft_model(vlmkit.wrap(model))`` trains, but its adapter is keyed under the wrapper and would not load
    on the plain model: saving it (Trainer or PEFT) raises, and writes no adapter."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_vlm("llava", seed=0)
    peft_model = get_peft_model(vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5)),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, _ = _train(peft_model, processor, tmp_path / "run")
    with pytest.raises(ValueError, match=r"vlmkit\.wrap\(get_peft_model\(model, config\)"):
        trainer.save_model(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="would not load on the plain model"):
        peft_model.save_pretrained(tmp_path / "direct")
    for folder in ("saved", "direct"):
        assert not (tmp_path / folder / "adapter_model.safetensors").exists()


# --- save_pretrained, merge_and_unload, push_to_hub -----------------------------------------------------


def test_save_pretrained_writes_the_processor_and_checks_adapter_keys(tmp_path):
    from transformers import AutoProcessor

    wrapped, processor = _peft_wrapped(init_lora_weights=False)
    wrapped.save_pretrained(tmp_path / "full", processor=processor)
    reread = AutoProcessor.from_pretrained(tmp_path / "full")
    assert type(reread) is type(processor)
    questions = QUESTIONS[:2]
    ours, theirs = make_batch(processor, questions, [1, 1]), make_batch(reread, questions, [1, 1])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "full" / "adapter_model.safetensors").is_file()

    # the wrapper's own gathered state dict (what FSDP / DeepSpeed hand over) writes the same adapter
    wrapped.save_pretrained(tmp_path / "gathered", state_dict=wrapped.state_dict())
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "gathered"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a state dict keyed otherwise (e.g. a DDP "module." prefix) would write keys PEFT cannot find: refused
    foreign = {f"module.{k}": v for k, v in wrapped.state_dict().items()}
    with pytest.raises(ValueError, match="would not load on the model"):
        wrapped.save_pretrained(tmp_path / "foreign", state_dict=foreign)
    # and one without a stage's weights would save the stage untrained
    staged = vlmkit.wrap(vlmkit.unwrap(wrapped), DropEveryOtherConfig())
    partial = {k: v for k, v in staged.state_dict().items() if not k.startswith("stages.")}
    with pytest.raises(ValueError, match=r"missing \['test_drop_every_other.scale'\]"):
        staged.save_pretrained(tmp_path / "partial", state_dict=partial)


def test_merge_and_unload_returns_a_wrapper_around_the_merged_model():
    from peft.tuners.lora import LoraLayer

    wrapped, processor = _peft_wrapped(init_lora_weights=False)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1])
    hook_calls = []
    wrapped.register_assemble_hook(lambda w, b: hook_calls.append(b.inputs_embeds.shape[1]))
    stage = wrapped.stages["fopru"]
    with torch.no_grad():
        ref = wrapped(**batch).logits
    merged = wrapped.merge_and_unload()
    assert isinstance(merged, vlmkit.VLMWrapper) and merged.stages["fopru"] is stage
    assert type(merged.base_model).__name__ == "LlavaForConditionalGeneration"
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert len(hook_calls) == 2 and hook_calls[0] == hook_calls[1]  # the assemble hook moved along

    plain, _ = tiny_vlm("llava", seed=0)
    with pytest.raises(ValueError, match="holds no PEFT adapter"):
        vlmkit.wrap(plain).merge_and_unload()


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    """One ``create_repo`` + ``upload_folder`` commit of the folder ``save_pretrained`` writes (hub calls
    replaced: no network); offline, the hub client refuses before anything is sent."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled
    from peft import PeftModel

    wrapped, processor = _peft_wrapped(init_lora_weights=False)
    calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        calls.append(("create_repo", repo_id, private, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, **kw):
        files = sorted(os.listdir(folder_path))
        base, _ = tiny_vlm("llava", seed=0)  # the folder is a complete save: it loads while it exists
        loaded = vlmkit.load(PeftModel.from_pretrained(base, folder_path), folder_path)
        calls.append(("upload_folder", repo_id, files, commit_message, create_pr, [c.type for c in loaded.stage_configs]))
        return "commit"

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests run offline (conftest sets HF_HUB_OFFLINE=1)"
    with pytest.raises(OfflineModeIsEnabled):
        wrapped.push_to_hub("someone/tiny-llava-fopru", processor=processor)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = wrapped.push_to_hub("someone/tiny-llava-fopru", processor=processor, private=True,
                                 commit_message="first")
    assert result == "commit"
    assert calls[0] == ("create_repo", "someone/tiny-llava-fopru", True, True)
    name, repo, files, message, create_pr, stages = calls[1]
    assert (name, repo, message, create_pr, stages) == ("upload_folder", "someone/tiny-llava-fopru", "first", False,
                                                        ["fopru"])
    assert {"adapter_config.json", "adapter_model.safetensors", "vlmkit.json", "processor_config.json",
            "tokenizer.json"} <= set(files)
