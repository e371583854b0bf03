"""``vlmkit demo``: run shapes questions through a wrapped model, with and without compression.

Until a trained default model ships, the demo uses a tiny random-weight LLaVA from
``vlmkit.testing`` (or ``--model PATH``, loaded with ``from_pretrained``): it shows the pipeline at
work — visual tokens in, tokens the language model really received, greedy answers, latency — not
answer quality.
"""

from __future__ import annotations

import time


def _load(model_path: str | None):
    if model_path is None:
        from .testing import tiny_vlm

        return tiny_vlm("llava", seed=0), "tiny random LLaVA (vlmkit.testing)"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    return (model, AutoProcessor.from_pretrained(model_path)), model_path


def _stage_sets(keep: float) -> list[tuple[str, tuple]]:
    """(label, configs) pairs to compare; compression stages join when they are installed."""
    sets = [("identity", ())]
    try:
        from .compress.fopru import FoPruConfig
    except ImportError:
        return sets
    return sets + [(f"FoPru rank keep={keep}", (FoPruConfig(keep_ratio=keep),))]


def run(n: int = 4, seed: int = 0, model_path: str | None = None, keep: float = 0.25, max_new_tokens: int = 4):
    """Answer one question for each of ``n`` shapes images with every stage set; return (rows, samples)."""
    import torch

    import vlmkit

    from .data.shapes import generate

    (model, processor), name = _load(model_path)
    samples = generate(n, seed=seed, size=64)
    marker = getattr(processor, "image_token", "<image>")
    prompts = [f"user : {marker} {s.questions[0]['question']} assistant :" for s in samples]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[[s.image] for s in samples], text=prompts, return_tensors="pt", padding=True)
    print(f"model: {name}; {n} shapes images, batch padded to {batch['input_ids'].shape[1]} tokens")
    rows = []
    for label, configs in _stage_sets(keep):
        wrapped = vlmkit.wrap(model, *configs)
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        start = time.perf_counter()
        with torch.no_grad():
            out = wrapped.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        latency = time.perf_counter() - start
        answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"stages": label, "visual_tokens": assembled.visual_tokens_per_sample,
                     "sequence_length": int(assembled.attention_mask.shape[1]), "latency_s": latency,
                     "answers": answers})
        vlmkit.unwrap(wrapped)
    return rows, samples


def cli_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vlmkit demo", description=__doc__)
    parser.add_argument("--model", default=None, help="local checkpoint path (default: tiny random model)")
    parser.add_argument("--n", type=int, default=4, help="number of shapes images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=float, default=0.25, help="FoPru keep ratio")
    args = parser.parse_args(argv)
    rows, samples = run(n=args.n, seed=args.seed, model_path=args.model, keep=args.keep)
    for i, s in enumerate(samples):
        print(f"  q{i}: {s.questions[0]['question']}  (truth: {s.questions[0]['answer']})")
    print(f"{'stages':24s} {'visual tokens/sample':22s} {'seq len':>8s} {'latency':>9s}  answers")
    for r in rows:
        print(f"{r['stages']:24s} {str(r['visual_tokens']):22s} {r['sequence_length']:8d} "
              f"{r['latency_s'] * 1000:7.1f}ms  {r['answers']}")
    return 0
