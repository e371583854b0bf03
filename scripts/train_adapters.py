"""Train the compression- and position-aware LoRA adapters of the shipped shapes model (issue 21) and write
their cards.

    python scripts/train_adapters.py                          # every adapter into vlmkit/assets/adapters/
    python scripts/train_adapters.py --only fopru --steps 600 # one adapter (cards of all are rewritten)
    python scripts/train_adapters.py --cards-only             # rewrite the cards from the saved metrics
    python scripts/train_adapters.py --out /tmp/a --steps 5 --eval-limit 8 --refseg-limit 4 --multi-limit 8 \\
        --images 40                                           # a quick end-to-end check, not for shipping

Each adapter is ``vlmkit finetune`` from ``vlmkit/assets/shapes-llava-tiny`` with the same LoRA recipe
(``RECIPE``, written next to the adapters as ``recipe.yaml``) and the stage on while training:

| name | stages (``--wrap``) | data |
|---|---|---|
| control | none: the full model + the same recipe (the control every recovered fraction divides by) | single |
| fopru | FoPru rank, keep 0.25 | single |
| random | random pruning, keep 0.25 (the control of FoPru's selection) | single |
| pvc | PVC: 4 frames × 4 tokens = 16 tokens per image, temporal blocks in the last 2 vision layers | single |
| v2pe | V2PE, one stride per image drawn from the paper's set | single |
| v2pe_multi | V2PE as above | multi |
| multi_control | none (the control of v2pe_multi) | multi |

Data (generated here, seeded, never the held-out images): *single*: ``--images`` shapes images of seed 2, one
single-turn record per VQA question (``vlmkit shapes --format single-turn``) plus one referring turn per
image exactly as the shipped model was trained on them (``vlmkit.train.shapes_data.refseg_turn``: a random
expression and templates, R-RLE on its 8×8 grid); *multi*: ``--multi-questions`` ``shapes_multi`` questions
with N drawn from 1..4 over the same seed-2 images (``vlmkit shapes --images 1,2,3,4``).

V2PE's training strides: the paper draws δ = stride / 256 per image from {1/256, …, 1/2, 1} (InternVL's 256
tokens per tile, ``TRAIN_STRIDES``); the shipped model has 64 tokens per image, so the stage is
``v2pe:64,tokens_per_tile=256``: the paper's δ set while training, and δ = 64/256 = 1/4 at evaluation, which
gives exactly the positions of ``v2pe:16`` on 64-token images (the demo's "V2PE stride 16").

Held out (never trained or tuned on): the evaluation tasks' data, shapes images of seed 0
(``shapes_vqa``, ``shapes_refseg``, ``shapes_multi_{1,4,8,16}``), written under ``--work``/eval_data.
recovered = (adapted − zero-shot) / (control − zero-shot), per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_REL = "vlmkit/assets/shapes-llava-tiny"
TEXT4SEG = "text4seg:grid=8"  # the shipped model's Text4Seg head (its vlmkit.json), so adapters parse its masks
V2PE_TRAIN = "v2pe:64,tokens_per_tile=256"  # δ ∈ {1/256 … 1} while training, 1/4 (= v2pe:16) at evaluation
TRAIN_SEED = 2  # training images; held-out data is seed 0 (tasks), the model card's evaluation seed 1

#: LoRA on every linear layer of the language model, nothing else of the model trained (a stage's own
#: parameters, PVC's, are trained with it); the issue's measured recipe: batch 16, lr 5e-4.
RECIPE = """\
# The recipe of the shipped adapters (scripts/train_adapters.py): LoRA on the language model's linear
# layers; the projector and the vision tower frozen; a stage's own parameters (PVC) trained with it.
name: adapters
description: LoRA r=8 on the language model; stage parameters (PVC) trained; nothing else
method: lora
lora:
  r: 8
  alpha: 16
  dropout: 0.05
  target: all-linear
  scope: [language_model]
train: []
stages:
  train: []
  optional: [pvc]
defaults:
  lr: 5.0e-4
  batch_size: 16
  epochs: 1
  warmup_ratio: 0.03
  scheduler: cosine
  weight_decay: 0.0
  max_grad_norm: 1.0
"""

ADAPTERS: dict[str, dict] = {
    "control": {"title": "control: the full model + the same LoRA recipe (no stage)", "wrap": [], "data": "single"},
    "fopru": {"title": "FoPru rank, keep 0.25", "wrap": ["fopru:0.25"], "data": "single", "control": "control"},
    "random": {"title": "random pruning, keep 0.25 (control of FoPru's selection)", "wrap": ["random:0.25"],
               "data": "single", "control": "control"},
    "pvc": {"title": "PVC, 4 frames × 4 tokens = 16 tokens per image",
            "wrap": ["pvc:frames=4,tokens_per_frame=4,temporal_layers=2"], "data": "single", "control": "control"},
    "v2pe": {"title": "V2PE, strides drawn per image, evaluated at stride 16 (δ = 1/4)", "wrap": [V2PE_TRAIN],
             "data": "single", "control": "control", "zero_shot_position": "v2pe:16"},
    "v2pe_multi": {"title": "V2PE on shapes_multi (N ≤ 4), evaluated on N up to 16", "wrap": [V2PE_TRAIN],
                   "data": "multi", "control": "multi_control"},
    "multi_control": {"title": "control of v2pe_multi: plain positions + the same recipe on shapes_multi (N ≤ 4)",
                      "wrap": [], "data": "multi"},
}
MULTI_N = (1, 4, 8, 16)


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (the commands are run from the repository root)."""
    path = Path(path).resolve()
    return os.fspath(path.relative_to(REPO)) if path.is_relative_to(REPO) else os.fspath(path)


def _argv() -> list[str]:
    return ["python", "scripts/train_adapters.py", *sys.argv[1:]]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def write_single(folder: Path, n_images: int) -> Path:
    """Single-turn VQA records of ``n_images`` seed-2 images plus one referring turn per image → its JSON."""
    import numpy as np

    from vlmkit.data import shapes
    from vlmkit.train.shapes_data import refseg_turn

    samples = shapes.generate(n_images, seed=TRAIN_SEED)
    shapes.write_images(samples, folder / "images")
    records = json.loads(shapes.write_llava(samples, folder, "llava_vqa.json", format="single-turn").read_text())
    rng = np.random.default_rng([TRAIN_SEED, 11])
    for s in samples:
        question, answer, _ = refseg_turn(s, rng)  # as the shipped model was trained: grid 8, random templates
        records.append({"id": f"{Path(s.file_name).stem}_ref", "image": s.file_name, "conversations": [
            {"from": "human", "value": f"<image> {question}"}, {"from": "gpt", "value": answer}]})
    out = folder / "llava_train.json"
    out.write_text(json.dumps(records))
    return out


def write_multi_data(folder: Path, n_questions: int, n_images: int) -> Path:
    from vlmkit.data import shapes

    return shapes.write_multi(folder, n_questions, [1, 2, 3, 4], seed=TRAIN_SEED, pool=n_images)["llava"]


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


class Evaluator:
    """Held-out numbers through the evaluation harness, cached in ``OUT/baselines.json`` for the rows that do
    not depend on an adapter (full model, zero-shot stages)."""

    def __init__(self, out: Path, work: Path, args) -> None:
        self.cache_file = out / "baselines.json"
        self.cache = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        self.data_root = work / "eval_data"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.args = args

    def run(self, model, tasks: dict[str, int], compress=(), position=None, processor=None, key=None) -> dict:
        """{task: {"vqa_accuracy" | "cIoU" | "gIoU": value}} of ``model`` on the first ``limit`` docs of each task."""
        from vlmkit.evaluation import evaluate

        if key is not None:
            key = json.dumps([key, sorted(tasks.items()), list(compress), position])
            if key in self.cache:
                return self.cache[key]
        out = {}
        for task, limit in tasks.items():
            res = evaluate(model, task, processor=processor, compress=list(compress) or None, position=position,
                           data_root=str(self.data_root), limit=limit, batch_size=32, quiet=True)
            r = res["results"][task]
            out[task] = {m: r[f"{m},none"] for m in ("vqa_accuracy", "cIoU", "gIoU") if f"{m},none" in r}
        if key is not None:
            self.cache[key] = out
            self.cache_file.write_text(json.dumps(self.cache, indent=1))
        return out

    def single_tasks(self) -> dict[str, int]:
        return {"shapes_vqa": self.args.eval_limit, "shapes_refseg": self.args.refseg_limit}

    def multi_tasks(self) -> dict[str, int]:
        return {f"shapes_multi_{n}": self.args.multi_limit for n in MULTI_N}


def _flat(res: dict) -> dict:
    """{task: {metric: v}} → {"vqa": …, "cIoU": …} for the single-image tasks, {"N=k": …} for shapes_multi."""
    out = {}
    for task, metrics in res.items():
        if task == "shapes_vqa":
            out["vqa"] = metrics["vqa_accuracy"]
        elif task == "shapes_refseg":
            out["cIoU"], out["gIoU"] = metrics["cIoU"], metrics["gIoU"]
        elif task.startswith("shapes_multi_"):
            out[f"N={task.rsplit('_', 1)[1]}"] = metrics["vqa_accuracy"]
    return out


def _with_position(adapter: Path, stride: float):
    """(wrapped, processor): an adapter loaded in one call, its V2PE stage replaced by ``v2pe:stride`` (64-token
    images: δ = stride / 64); other stages kept."""
    from transformers import AutoProcessor

    import vlmkit
    from vlmkit.position.v2pe import V2PEConfig

    wrapped = vlmkit.load(str(adapter))
    configs = [c for c in wrapped.stage_configs if c.type != "v2pe"]
    model = vlmkit.unwrap(wrapped)  # the PeftModel: the LoRA weights stay
    return vlmkit.wrap(model, *configs, V2PEConfig(stride=stride)).eval(), AutoProcessor.from_pretrained(adapter)


def measure(name: str, adapter: Path, ev: Evaluator, args) -> dict:
    """The held-out rows of one adapter's card: adapted, and the adapter-free rows it is compared with."""
    spec = ADAPTERS[name]
    shipped = str(REPO / SHIPPED_REL)
    stages = [s for s in spec["wrap"] if not s.startswith("v2pe")]
    rows: dict[str, dict] = {}
    if spec["data"] == "single":
        tasks = ev.single_tasks()
        rows["full"] = _flat(ev.run(shipped, tasks, key="full"))
        if spec["wrap"]:
            rows["zero_shot"] = _flat(ev.run(shipped, tasks, stages, spec.get("zero_shot_position"), key="zero_shot"))
        rows["adapted"] = _flat(ev.run(str(adapter), tasks))
        check = {"shapes_vqa": args.check_limit}
    else:
        tasks = ev.multi_tasks()
        rows["full"] = _flat(ev.run(shipped, {"shapes_vqa": args.eval_limit}, key="full"))
        rows["plain"] = _flat(ev.run(shipped, tasks, key="multi_plain"))
        for stride in args.multi_strides:
            if spec["wrap"]:
                rows[f"zero_shot_v2pe{stride:g}"] = _flat(ev.run(shipped, tasks, position=f"v2pe:{stride}",
                                                                 key="multi_zero_shot"))
                wrapped, processor = _with_position(adapter, stride)
                rows[f"adapted_v2pe{stride:g}"] = _flat(ev.run(wrapped, tasks, processor=processor))
        if not spec["wrap"]:
            rows["adapted"] = _flat(ev.run(str(adapter), tasks))
        check = {"shapes_multi_4": args.check_limit}
    return {"rows": rows, "check": {"limits": check, "values": _flat(ev.run(str(adapter), check))}}


# ------------------------------------------------------------------------------------------------
# Cards
# ------------------------------------------------------------------------------------------------


def _recovered(adapted, zero, control):
    if None in (adapted, zero, control) or control == zero:
        return None
    return (adapted - zero) / (control - zero)


def _fmt(v, pattern="{:.3f}") -> str:
    return "-" if v is None else pattern.format(v)


def _targets(name: str, metrics: dict, all_metrics: dict) -> list[str]:
    """Each target of issue 21 that applies to ``name``: measured numbers and met / missed / pending."""
    spec, rows = ADAPTERS[name], metrics["rows"]
    control = all_metrics.get(spec.get("control", ""), {}).get("rows", {}).get("adapted")
    lines = []
    if name in ("fopru", "pvc", "random", "v2pe"):
        if control is None:
            return [f"- recovered fractions: pending (the control `{spec['control']}` has no metrics yet)"]
        for metric, goal in (("vqa", 0.75), ("cIoU", 0.60)):
            r = _recovered(rows["adapted"].get(metric), rows["zero_shot"].get(metric), control.get(metric))
            if name in ("fopru", "pvc"):
                verdict = "pending" if r is None else ("met" if r >= goal else "missed")
                lines.append(f"- recovered {metric}: {_fmt(r, '{:.0%}')} (target ≥ {goal:.0%}): **{verdict}**")
            else:
                lines.append(f"- recovered {metric}: {_fmt(r, '{:.0%}')} (reported; no target)")
        if name == "v2pe":
            lines.append(f"- adapted at δ = 1/4 (`{V2PE_TRAIN}` = `v2pe:16` on 64-token images) vs full, VQA: "
                         f"{_fmt(rows['adapted'].get('vqa'))} vs {_fmt(rows['full'].get('vqa'))} (the issue's "
                         "within-3-points target is stated on shapes_multi: see the v2pe_multi card)")
        if name == "fopru" and "random" in all_metrics:
            rnd = all_metrics["random"]["rows"]["adapted"]
            lines.append(f"- FoPru adapted vs random adapted (same budget and recipe): VQA {_fmt(rows['adapted']['vqa'])} "
                         f"vs {_fmt(rnd['vqa'])}, cIoU {_fmt(rows['adapted']['cIoU'])} vs {_fmt(rnd['cIoU'])}")
    if name == "v2pe_multi":
        full = rows["full"]["vqa"]
        a = rows.get("adapted_v2pe16")
        if a is None:
            return ["- targets are stated at stride 16, which --multi-strides did not include"]
        close = abs(a["N=1"] - full) <= 0.03
        lines.append(f"- adapted at stride 16 within 3 points of full (shapes_vqa, the same held-out images, single-image "
                     f"prompt) at N = 1: {_fmt(a['N=1'])} vs {_fmt(full)}: **{'met' if close else 'missed'}**")
        keep = a["N=16"] / a["N=1"] if a["N=1"] else None
        verdict = "pending" if keep is None else ("met" if keep >= 0.8 else "missed")
        lines.append(f"- adapted at stride 16 keeps ≥ 80 % of its N = 1 accuracy at N = 16: {_fmt(keep, '{:.0%}')}: "
                     f"**{verdict}**")
        ctl = all_metrics.get("multi_control", {}).get("rows", {}).get("adapted")
        if ctl is not None and ctl["N=1"]:
            plain_keep = ctl["N=16"] / ctl["N=1"]
            falls = keep is not None and plain_keep < keep
            lines.append(f"- plain positions (multi_control, same recipe) keep {_fmt(plain_keep, '{:.0%}')} at N = 16: "
                         f"{'falls further' if falls else 'does not fall further'} than V2PE")
        else:
            lines.append("- plain positions adapted with the same recipe: pending (multi_control has no metrics yet)")
    return lines or ["- (a control: no target of its own)"]


def write_card(out: Path, name: str, all_metrics: dict) -> None:
    m = all_metrics[name]
    spec = ADAPTERS[name]
    folder = out / name
    t = m["training"]
    lines = [f"# {name}: {spec['title']}", "",
             (f"A LoRA adapter (+ stage weights) of the shipped `{SHIPPED_REL}` model, trained with the stage on. Load "
             f"model + stages + adapter in one call: `vlmkit.load(\"{SHIPPED_REL.rsplit('/', 1)[0]}/adapters/{name}\")`, "
             f"or evaluate it with `vlmkit eval --model <this folder> --tasks ...`."), "",
             "## Training", "",
             f"- command: `{t['command']}` (data generated by it, seeded)",
             f"- inner command: `{t['finetune_command']}`",
             (f"- recipe: `recipe.yaml` next to the adapters (LoRA r = 8 on the language model's linear layers; stage "
             f"parameters trained; nothing else), lr {t['lr']}, batch {t['batch_size']}, {t['steps']} steps, seed "
             f"{t['seed']}, {t['threads']} threads"),
             (f"- stages while training and at evaluation: {', '.join(f'`{s}`' for s in t['wrap']) or 'none'} "
             f"(`{TEXT4SEG}`: the shipped model's own Text4Seg head, which parses its 8×8 masks; no parameters)"),
             f"- data: {t['data_description']}",
             (f"- wall time: {t['seconds']:.0f} s ({t['seconds'] / 60:.1f} min); final loss {t['final_loss']:.4f}; "
             f"{t['trainable_parameters']:,} trainable parameters"), "",
             "## Measured (held out: the evaluation tasks' seed-0 shapes images, never trained or tuned on)", ""]
    rows = m["rows"]
    if spec["data"] == "single":
        lines += [(f"First {m['limits']['shapes_vqa']} `shapes_vqa` questions (official VQA accuracy) and first "
                  f"{m['limits']['shapes_refseg']} `shapes_refseg` expressions."), "",
                  "| row | VQA | cIoU | gIoU |", "|---|---|---|---|"]
        ctl = all_metrics.get(spec.get("control", ""), {}).get("rows", {}).get("adapted")
        table = [("full (no stages)", rows["full"]), ("stage, zero-shot", rows.get("zero_shot")),
                 ("stage + adapter" if spec["wrap"] else "full + adapter", rows["adapted"]),
                 ("control: full + the same recipe", ctl if spec["wrap"] else None)]
        for label, r in table:
            if r is not None:
                lines.append(f"| {label} | {_fmt(r.get('vqa'))} | {_fmt(r.get('cIoU'))} | {_fmt(r.get('gIoU'))} |")
        if spec["wrap"] and ctl is not None:
            rec = [_recovered(rows["adapted"].get(k), rows["zero_shot"].get(k), ctl.get(k)) for k in ("vqa", "cIoU")]
            lines += ["", (f"Recovered = (adapted − zero-shot) / (control − zero-shot): VQA {_fmt(rec[0], '{:.0%}')}, "
                          f"cIoU {_fmt(rec[1], '{:.0%}')}.")]
    else:
        lines += [(f"First {m['limits']['multi']} questions of each `shapes_multi_N` task (official VQA accuracy); "
                  f"`full` is the shipped model on `shapes_vqa` (first {m['limits']['shapes_vqa']} questions)."), "",
                  "| row | " + " | ".join(f"N = {n}" for n in MULTI_N) + " |", "|---|" + "---|" * len(MULTI_N)]
        ctl = all_metrics.get("multi_control", {}).get("rows", {}).get("adapted") if name != "multi_control" else None
        table = [(k, r) for k, r in rows.items() if k != "full"] + ([("multi_control adapted", ctl)] if ctl else [])
        for label, r in table:
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(f"N={n}")) for n in MULTI_N) + " |")
        lines += ["", f"full (shapes_vqa): {_fmt(rows['full']['vqa'])}"]
    lines += ["", "## Targets (issue 21)", "", *_targets(name, m, all_metrics), "",
              (f"Card check: `metrics.json` `check` holds the adapter's numbers on a fixed subset "
              f"({m['check']['limits']}); `tests/test_adaptation.py` reloads the adapter and compares within 2 points."), ""]
    (folder / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train_one(name: str, out: Path, work: Path, data: dict, args) -> dict:
    from vlmkit.cli import main as vlmkit_main

    spec = ADAPTERS[name]
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    wrap = [TEXT4SEG, *spec["wrap"]]
    finetune = ["finetune", "--recipe", _rel(out / "recipe.yaml"), "--model", SHIPPED_REL, "--data",
                _rel(data[spec["data"]]), "--output", _rel(folder), "--max-steps", str(args.steps), "--batch-size",
                str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed), "--save-every", "0",
                "--template", "plain", "--wrap", *wrap, "--quiet"]
    command = "vlmkit " + " ".join(f"'{a}'" if " " in a else a for a in finetune)
    print(f"[train_adapters] {name}: {command}", flush=True)
    start = time.time()
    if vlmkit_main(finetune) != 0:
        raise SystemExit(f"[train_adapters] {name}: vlmkit finetune failed")
    seconds = time.time() - start
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # exact-resume state (optimizer …): not shipped
    summary = json.loads((folder / "finetune.json").read_text())
    descriptions = {
        "single": f"{args.images} shapes images of seed {TRAIN_SEED}: one single-turn record per VQA question + one "
                  "referring turn per image (as the shipped model was trained)",
        "multi": f"{args.multi_questions} shapes_multi questions, N uniform in 1..4, over {args.images} shapes images "
                 f"of seed {TRAIN_SEED}",
    }
    return {"command": " ".join(_argv()), "finetune_command": command, "seconds": seconds, "seed": args.seed,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
            "wrap": wrap, "final_loss": summary["final_loss"], "trainable_parameters": summary["trainable_parameters"],
            "data_description": descriptions[spec["data"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "vlmkit" / "assets" / "adapters"), help="adapters folder")
    parser.add_argument("--work", default=None, help="training and evaluation data (default: TMPDIR/vlmkit_adapters_work)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {list(ADAPTERS)}")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per adapter")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="seed-2 training images")
    parser.add_argument("--multi-questions", type=int, default=10000, help="shapes_multi training questions")
    parser.add_argument("--eval-limit", type=int, default=300, help="held-out shapes_vqa questions")
    parser.add_argument("--refseg-limit", type=int, default=150, help="held-out shapes_refseg expressions")
    parser.add_argument("--multi-limit", type=int, default=300, help="held-out questions per shapes_multi_N task")
    parser.add_argument("--multi-strides", default="4,16,32", help="V2PE strides (64-token images) of the N curves")
    parser.add_argument("--check-limit", type=int, default=32, help="fixed subset the card check reproduces")
    parser.add_argument("--cards-only", action="store_true", help="rewrite every card from its metrics.json")
    args = parser.parse_args()
    args.multi_strides = [float(s) for s in args.multi_strides.split(",")]
    names = list(ADAPTERS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(names) - set(ADAPTERS))
    if unknown:
        parser.error(f"--only: unknown adapter(s) {unknown}; accepted: {list(ADAPTERS)}")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.gettempdir()) / "vlmkit_adapters_work"
    os.chdir(REPO)  # the recorded --model is the repository-relative path of the shipped model

    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(RECIPE)
    if not args.cards_only:
        data: dict[str, Path] = {}
        kinds = {ADAPTERS[n]["data"] for n in names}
        if "single" in kinds:
            data["single"] = write_single(work / "single", args.images)
        if "multi" in kinds:
            data["multi"] = write_multi_data(work / "multi", args.multi_questions, args.images)
        ev = Evaluator(out, work, args)
        for name in names:
            training = train_one(name, out, work, data, args)
            measured = measure(name, out / name, ev, args)
            metrics = {"adapter": name, "training": training, **measured,
                       "limits": {"shapes_vqa": args.eval_limit, "shapes_refseg": args.refseg_limit,
                                  "multi": args.multi_limit}}
            (out / name / "metrics.json").write_text(json.dumps(metrics, indent=1))
            print(f"[train_adapters] {name}: {json.dumps(measured['rows'])}", flush=True)
    all_metrics = {n: json.loads((out / n / "metrics.json").read_text())
                   for n in ADAPTERS if (out / n / "metrics.json").is_file()}
    for name in all_metrics:
        write_card(out, name, all_metrics)
    print(f"[train_adapters] cards: {', '.join(str(out / n / 'README.md') for n in all_metrics)}")


if __name__ == "__main__":
    main()
