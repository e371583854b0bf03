"""The embedded default model: a tiny LLaVA (real ``transformers`` classes, local tokenizer) trained on
the shapes benchmark to answer its questions and to emit Text4Seg descriptors for referring expressions.

Choices (see the model card written next to the weights):
- 64×64 images, CLIP patch 8 → an 8×8 grid of 64 visual tokens; vision 128-d × 4 layers, decoder
  256-d × 4 layers (about 4 M parameters).
- ``vision_feature_layer=-1``: with LLaVA's default −2 the last vision layer would never train.
- An auxiliary per-patch classification loss (background or colour×shape of the object covering the
  patch centre, from the exact masks) on the vision features, and a vision-only warm-up on it: without
  it training sits at chance for many minutes (the feasibility run in issue 7).
- Many question–answer turns per image in one sequence (loss on answers only), each isolated from the
  others by the attention mask and placed right after the image, as at inference (``shapes_data``), and
  a short curriculum (at most 2 shapes first).
- Grounding signals (training only, like the per-patch head): the vision features also predict their
  patch's row and column, and in a referring turn the decoder's last hidden state at the token that opens
  each mask row (``<seg>`` for row 0, the row-separating ``\n`` after it) predicts that row's foreground
  cells (binary cross-entropy); and a pointer: the ``<seg>`` state, scored against every visual token the
  decoder reads (scaled dot product), predicts the referred object's cells. The LM loss alone teaches the
  descriptor format and typical mask sizes but not where the object is: a run without these signals
  emitted well-formed masks in the wrong place, and one without the pointer often outlined the wrong
  object (held-out cIoU 0.39 against 0.60 with it, same schedule and seed).
- Text4Seg answers on an 8×8 grid, the visual-token grid, with the reference templates; the label of
  foreground cells is the referring expression. The reference grid is 16×16 (24×24 visual tokens in
  LLaVA-1.5); at 64 px a 16×16 grid has 4-pixel cells, finer than a patch, and two runs at 16×16
  learned only all-background answers in the time a CPU gives. The grid is saved with the model
  (``vlmkit.json``: a Text4Seg head with ``grid=8``), so ``vlmkit.load`` decodes with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import generate, generate_one
from .shapes_data import GRID, PROMPT, class_names, make_batch, refseg_turn

__all__ = ["TinyArch", "build_model", "AuxHead", "losses", "train", "evaluate", "answer", "write_model_card"]


@dataclasses.dataclass
class TinyArch:
    image_size: int = 64
    patch: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4


def build_model(arch: TinyArch = TinyArch(), seed: int = 0):
    """A fresh tiny ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with the closed vocabulary."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from ..testing import build_tokenizer

    tok = build_tokenizer(image_token="<image>")
    vision = CLIPVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden,
                              num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                              image_size=arch.image_size, patch_size=arch.patch, projection_dim=arch.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=arch.text_hidden, intermediate_size=int(2.75 * arch.text_hidden),
                       num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
                       num_key_value_heads=arch.text_heads, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": arch.image_size},
                                         crop_size={"height": arch.image_size, "width": arch.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=arch.patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


# --- training -----------------------------------------------------------------------------------------
class AuxHead(nn.Module):
    """Training-only heads (not shipped): per-patch class, row and column on the vision features the
    projector sees; per-row foreground cells on the decoder's hidden states (``row_slots``); and a pointer
    from each referring answer's ``<seg>`` state to the visual tokens of the referred object."""

    def __init__(self, vision_hidden: int, text_hidden: int, classes: int, side: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_hidden, classes)
        self.where = nn.Linear(vision_hidden, 2 * side)  # row logits, then column logits
        self.rows = nn.Linear(text_hidden, GRID)
        self.query = nn.Linear(text_hidden, text_hidden)
        self.key = nn.Linear(text_hidden, text_hidden)

    def patch_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats [B, N, H] (N = side², row-major), labels [B, N] → class CE + ½ (row CE + column CE)."""
        side = self.where.out_features // 2
        cells = torch.arange(feats.shape[1], device=feats.device)
        where = self.where(feats).flatten(0, 1)
        row, col = (cells // side).repeat(feats.shape[0]), (cells % side).repeat(feats.shape[0])
        return (F.cross_entropy(self.proj(feats).flatten(0, 1), labels.flatten())
                + 0.5 * (F.cross_entropy(where[:, :side], row) + F.cross_entropy(where[:, side:], col)))

    def row_loss(self, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, D], positions [B, M] (-1 = none), targets [B, M, GRID] → BCE (0 if no slot)."""
        used = positions >= 0
        if not used.any():
            return hidden.sum() * 0.0
        picked = hidden[torch.nonzero(used)[:, 0], positions[used]]  # [R, D]
        return F.binary_cross_entropy_with_logits(self.rows(picked), targets[used])

    def point_loss(self, hidden: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        """Which visual tokens show the referred object, from the ``<seg>`` state: hidden [B, S, D] (decoder,
        last layer), feats [B, N, D] (the visual tokens fed to the decoder, N = GRID², row-major), positions
        [B, R·GRID] and targets [B, R·GRID, GRID] (``row_slots``: the first slot of each group is ``<seg>``)
        → BCE of the scaled dot products query(<seg>) · key(token) against the object's cells (0 if none).
        It trains the lookup a mask row needs (expression → object) directly, on every cell at once."""
        starts = positions[:, ::GRID]  # [B, R]
        used = starts >= 0
        if not used.any():
            return hidden.sum() * 0.0
        b = torch.nonzero(used)[:, 0]
        q = self.query(hidden[b, starts[used]])  # [U, D]
        k = self.key(feats[b])  # [U, N, D]
        logits = torch.einsum("ud,und->un", q, k) / q.shape[-1] ** 0.5
        cells = targets.reshape(targets.shape[0], -1, GRID * GRID)[used]  # [U, N]
        return F.binary_cross_entropy_with_logits(logits, cells)


def losses(model, aux: AuxHead, batch, vision_only: bool = False) -> dict[str, torch.Tensor]:
    """Language-model loss on answers, the auxiliary per-patch loss and the grounding losses (rows, pointer),
    from one vision pass."""
    out = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
    aux_loss = aux.patch_loss(out.hidden_states[-1][:, 1:], batch["patch_labels"])
    if vision_only:
        return {"aux": aux_loss}
    feats = torch.stack(list(out.pooler_output))  # [B, N, D]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    is_img = batch["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(is_img[..., None], feats.to(embeds.dtype))
    lm = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
               labels=batch["labels"], output_hidden_states=True)
    hidden = lm.hidden_states[-1]
    rows = aux.row_loss(hidden, batch["row_positions"], batch["row_targets"])
    point = aux.point_loss(hidden, feats, batch["row_positions"], batch["row_targets"])
    return {"lm": lm.loss, "aux": aux_loss, "rows": rows, "point": point}


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(out_dir: str | Path, steps: int = 2000, vision_steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
          seed: int = 0, curriculum_steps: int = 400, refseg_turns: int = 1, draws: int = 3, aux_weight: float = 0.5,
          rows_weight: float = 1.0, point_weight: float = 1.0,
          eval_every: int = 0, save_every: int = 50, quiet: bool = False, arch: TinyArch = TinyArch(),
          init: str | Path | None = None) -> dict:
    """Train (from scratch, or on from the model saved in ``init``) and save the model, processor and a
    training log to ``out_dir``.

    The model is also saved every ``save_every`` joint steps (overwriting), so a stopped run leaves its
    latest weights behind. With ``init``, the auxiliary head starts fresh (it is not shipped): give it a few
    ``vision_steps``.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, processor = build_model(arch, seed)
    if init is not None:  # the same architecture and vocabulary, trained weights
        model = type(model).from_pretrained(init)
    aux = AuxHead(arch.vision_hidden, arch.text_hidden, len(class_names()), arch.image_size // arch.patch)
    model.train()
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    log, start, image_id = [], time.time(), 10_000_000  # training images never collide with eval ids
    total = vision_steps + steps
    for step in tqdm(range(total), disable=quiet, desc="train tiny shapes model"):
        vision_only = step < vision_steps
        max_shapes = 2 if step < vision_steps + curriculum_steps else 4
        samples = [generate_one(np.random.default_rng([seed, image_id + i]), image_id + i, size=arch.image_size,
                                max_shapes=max_shapes) for i in range(batch_size)]
        image_id += batch_size
        batch = make_batch(samples, processor, rng, arch.patch, refseg_turns, draws)
        for group in opt.param_groups:
            group["lr"] = _lr(step if vision_only else step - vision_steps, vision_steps if vision_only else steps,
                              lr, 50)
        parts = losses(model, aux, batch, vision_only)
        loss = parts["aux"] if vision_only else (parts["lm"] + aux_weight * parts["aux"] + rows_weight * parts["rows"]
                                                 + point_weight * parts["point"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            row = {"step": step, "minutes": (time.time() - start) / 60, **{k: float(v.detach()) for k, v in parts.items()}}
            log.append(row)
            if not quiet:
                tqdm.write(json.dumps(row))
        if save_every and step >= vision_steps and (step - vision_steps + 1) % save_every == 0:
            _save(model, processor, out_dir, log, start)
        if eval_every and step >= vision_steps and (step - vision_steps + 1) % eval_every == 0:
            model.eval()
            tqdm.write(json.dumps(evaluate(model, processor, n=64, seed=1, quiet=True)))
            model.train()
    model.eval()
    minutes = _save(model, processor, out_dir, log, start)
    return {"minutes": minutes, "steps": total, "seed": seed, "batch_size": batch_size}


def _save(model, processor, out_dir: str | Path, log: list, start: float) -> float:
    """Write weights (safetensors), processor files, ``vlmkit.json`` (the Text4Seg head and its grid) and
    the training log; return minutes since ``start``."""
    import vlmkit

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    wrapped = vlmkit.wrap(model, vlmkit.Text4SegConfig(grid=GRID))
    wrapped.save_pretrained(out_dir)  # vlmkit.json only: the head has no weights, the base model is saved above
    vlmkit.unwrap(wrapped)
    minutes = (time.time() - start) / 60
    (out_dir / "training_log.json").write_text(json.dumps({"minutes": minutes, "log": log}, indent=1))
    return minutes


# --- evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def answer(model, processor, images, questions, max_new_tokens: int) -> list[str]:
    """Greedy answers (text up to the end token) for a batch of single-image questions."""
    import vlmkit

    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts = [PROMPT.format(image=processor.image_token, question=q) for q in questions]
    batch = processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True)
    out = vlmkit.wrap(model).generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, processor, n: int = 200, seed: int = 1, batch_size: int = 32, quiet: bool = False) -> dict:
    """Held-out accuracy per question type and referring cIoU/gIoU on ``n`` fresh shapes images."""
    from tqdm.auto import tqdm

    from ..evaluation.metrics import refer_seg_scores
    from ..families import family_for
    from ..seg.rrle import decode_answer, grid_to_mask

    samples = generate(n, seed=seed, size=family_for(model).image_size[0])
    rng = np.random.default_rng(seed)
    qa = [(s, q) for s in samples for q in s.questions]
    correct: dict[str, list[float]] = {}
    for i in tqdm(range(0, len(qa), batch_size), disable=quiet, desc="shapes VQA"):
        chunk = qa[i : i + batch_size]
        outs = answer(model, processor, [s.image for s, _ in chunk], [q["question"] for _, q in chunk], 3)
        for (_, q), out in zip(chunk, outs):
            pred = out.strip().split(" ")[0] if out.strip() else ""
            correct.setdefault(q["type"], []).append(float(pred == q["answer"]))
    refs = [(s, *refseg_turn(s, rng)) for s in samples if s.refs]
    preds, targets = [], []
    for i in tqdm(range(0, len(refs), batch_size), disable=quiet, desc="shapes refseg"):
        chunk = refs[i : i + batch_size]
        outs = answer(model, processor, [r[0].image for r in chunk], [r[1] for r in chunk], 200)
        for (s, _, _, obj_index), out in zip(chunk, outs):
            grid = decode_answer(out, GRID, GRID)
            preds.append(grid_to_mask(grid, s.objects[obj_index].mask.shape))
            targets.append(s.objects[obj_index].mask)
    per_type = {k: float(np.mean(v)) for k, v in sorted(correct.items())}
    return {"vqa_accuracy": float(np.mean([x for v in correct.values() for x in v])), "per_type": per_type,
            "n_images": n, "n_questions": len(qa), "n_refs": len(refs), **refer_seg_scores(preds, targets)}


#: the model card's paragraph on the conversation format the model was trained on (what ``vlmkit shapes`` writes)
FORMAT_PARAGRAPH = """**Format it speaks: isolated single-question turns** — one image, one question, one answer
(`user : <image> QUESTION assistant : ANSWER </s>`, no BOS, no line break after the image). `vlmkit shapes`
writes its LLaVA training records in exactly that format by default (`--format single-turn`: one record per
question, `"<image> QUESTION"`), so `vlmkit shapes → vlmkit finetune → vlmkit eval` continues from this model.
The LLaVA multi-turn layout (`--format multi-turn`: every question of an image as turns of one record, each
seeing the earlier ones) is a format it never saw: its loss there is about 4, against below 0.1 on single-turn
VQA records (8 records of seed-2 images)."""


def write_model_card(out_dir: str | Path, arch: TinyArch, train_info: dict, metrics: dict, demo_rows: list[dict],
                     command: str) -> Path:
    """README.md (model card) + metrics.json next to the weights: what was trained, how, and measured how well."""
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    weights = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    card_metrics = {"held_out": metrics, "demo_rows": demo_rows, "train": train_info}
    (out_dir / "metrics.json").write_text(json.dumps(card_metrics, indent=1))
    per_type = "\n".join(f"| {k} | {v:.3f} |" for k, v in metrics["per_type"].items())
    rows = "\n".join(
        f"| {r['stages']} | {r['vqa_accuracy']:.3f} | {r['cIoU']:.3f} | {r['gIoU']:.3f} | {r['visual_tokens_per_image']:.0f} |"
        for r in demo_rows)
    text = f"""# shapes-llava-tiny

The embedded default model of vlmkit: a `LlavaForConditionalGeneration` (real transformers classes) with
random initialisation, trained from scratch on the synthetic `shapes` benchmark to answer its questions
and to emit Text4Seg R-RLE descriptors ({GRID}×{GRID} grid) for referring expressions. Tokenizer: a local
word-level vocabulary (`vlmkit.testing.build_tokenizer`). Prompt: `user : <image> QUESTION assistant :`.

{FORMAT_PARAGRAPH}

## Architecture
{json.dumps(dataclasses.asdict(arch))}; vision_feature_layer = {config.vision_feature_layer};
vocabulary {config.text_config.vocab_size} words; weights {weights / 1e6:.1f} MB (safetensors, float32).

## Training
- command: `{command}`
- data: shapes images generated on the fly from seed {train_info.get('seed', 0)} (image ids from 10,000,000 on,
  disjoint from every evaluation set); curriculum: at most 2 shapes for the first joint steps, then up to 4
- vision warm-up on auxiliary per-patch losses (class from the exact masks; row and column), then joint
  training: answers-only LM loss + 0.5 × per-patch losses + 1 × row-grounding loss (in a referring turn,
  the decoder state that opens each mask row predicts that row's cells) + 1 × pointer loss (the `<seg>`
  state, scored against every visual token, predicts the referred object's cells), AdamW, cosine
  schedule, batch {train_info.get('batch_size')}; the auxiliary heads are not shipped
- each sequence: one image and many turns (the distinct questions of several draws of the benchmark's
  question builders, and a referring turn), every turn isolated by the attention mask and positioned
  right after the image, exactly as a single-question prompt at inference
- steps: {train_info['steps']}; wall time: {train_info['minutes']:.1f} minutes on 2 CPU cores

## Measured (held out)
`vlmkit.train.shapes_model.evaluate`: {metrics['n_questions']} questions and {metrics['n_refs']} referring
expressions on {metrics.get('n_images', '?')} fresh images (seed 1).

VQA accuracy (exact match of the first answer word): **{metrics['vqa_accuracy']:.3f}**; referring
segmentation cIoU **{metrics['cIoU']:.3f}**, gIoU {metrics['gIoU']:.3f}.

| question type | accuracy |
|---|---|
{per_type}

`vlmkit demo` (the evaluation harness: tasks `shapes_vqa` with official VQA accuracy and `shapes_refseg`,
held-out shapes written from seed 0):

| stages | VQA acc | cIoU | gIoU | visual tokens / image |
|---|---|---|---|---|
{rows}
"""
    (out_dir / "README.md").write_text(text)
    return out_dir / "README.md"
