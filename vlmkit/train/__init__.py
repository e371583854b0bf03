"""Fine-tuning: PEFT recipes (``adapters/*.yaml``), data, an accelerate loop with exact resume, and loading.

``import vlmkit.train`` is cheap: names resolve on first use.

    recipe = load_recipe("lora")                       # adapters/lora.yaml, validated
    model = apply_recipe(hf_model, recipe)             # PeftModel (or frozen model) with exactly the intended trainables
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=0.25))
    finetune(FinetuneArgs(recipe="lora", model="tiny:llava", data="x.json", output="out"))  # = Trainer(args).run()
    wrapped = load_finetuned("out", hf_model)          # PEFT adapter + saved vlmkit stages
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Recipe": "vlmkit.train.recipes",
    "load_recipe": "vlmkit.train.recipes",
    "recipe_from_dict": "vlmkit.train.recipes",
    "apply_recipe": "vlmkit.train.recipes",
    "select_trainable_stages": "vlmkit.train.recipes",
    "available_recipes": "vlmkit.train.recipes",
    "trainable_parameters": "vlmkit.train.recipes",
    "Conversation": "vlmkit.train.data",
    "load_conversations": "vlmkit.train.data",
    "encode_conversation": "vlmkit.train.data",
    "SupervisedDataset": "vlmkit.train.data",
    "collate": "vlmkit.train.data",
    "FinetuneArgs": "vlmkit.train.loop",
    "finetune": "vlmkit.train.loop",
    "Trainer": "vlmkit.train.trainer",
    "build_model": "vlmkit.train.loop",
    "load_base_model": "vlmkit.train.loop",
    "load_finetuned": "vlmkit.train.loop",
    "data_order": "vlmkit.train.loop",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
