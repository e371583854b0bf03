"""``vlmkit demo``, the main job: the shipped shapes model on held-out shapes, with and without compression
and V2PE, through the evaluation harness.

Prints a table (VQA accuracy, referring cIoU, visual tokens per image, latency) and writes PNGs into
``--out``: a FoPru pruning map, mask overlays of the model's Text4Seg answers, and accuracy against keep
ratio for every registered pruner (FoPru rank, FoPru row and the random / DivPrune baselines, then any
other). When no shipped model is found (``vlmkit/assets/shapes-llava-tiny``), it falls back to a tiny
random-weight model and says so: then the numbers show the pipeline at work, not answer quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .cli import ArgumentParser, command, positive_int, user_input

SHIPPED = Path(__file__).parent / "assets" / "shapes-llava-tiny"
# (label, compress specs, position spec) of the main table
MAIN_ROWS = [
    ("full (no stages)", [], None),
    ("FoPru rank keep 0.25", ["fopru:0.25"], None),
    ("V2PE stride 16", [], "v2pe:16"),
    ("FoPru 0.25 + V2PE 16", ["fopru:0.25"], "v2pe:16"),
]
#: LoRA adapters of the shipped model trained with a stage on (``scripts/train_adapters.py``; each folder's
#: README is its card: command, seed, time, measured numbers)
ADAPTERS = Path(__file__).parent / "assets" / "adapters"
PVC_16 = "pvc:frames=4,tokens_per_frame=4,temporal_layers=2"  # 4 frames × 4 tokens = 16 tokens per image
#: (label, adapter folder or None, compress specs, position spec) of the adaptation table: each stage
#: zero-shot next to the stage + its adapter; "control" is the full model + the same LoRA recipe, which the
#: recovered fractions divide by. An adapter row loads model + stages + adapter from the folder in one call.
ADAPTED_ROWS = [
    ("control: full + LoRA", "control", [], None),
    ("FoPru rank 0.25 + LoRA", "fopru", [], None),
    ("random 0.25 (zero-shot)", None, ["random:0.25"], None),
    ("random 0.25 + LoRA", "random", [], None),
    ("PVC 16 tok (zero-shot)", None, [PVC_16], None),
    ("PVC 16 tok + LoRA", "pvc", [], None),
    ("V2PE 16 + LoRA", "v2pe", [], None),
]
#: the stage rows (zero-shot, adapted) each recovered fraction compares, by the main and adaptation tables' labels
RECOVERED = {"FoPru rank 0.25": ("FoPru rank keep 0.25", "FoPru rank 0.25 + LoRA"),
             "random 0.25": ("random 0.25 (zero-shot)", "random 0.25 + LoRA"),
             "PVC 16 tok": ("PVC 16 tok (zero-shot)", "PVC 16 tok + LoRA"),
             "V2PE 16": ("V2PE stride 16", "V2PE 16 + LoRA")}
MULTI_N = [1, 4, 8, 16]
#: questions per N of the demo's shapes_multi curves (the N = 16 prompts dominate the demo's time; the
#: v2pe_multi card measures 300 per N)
MULTI_LIMIT = 16
#: (label, adapter folder or None, position spec) of the shapes_multi curves: accuracy against images per prompt
MULTI_CURVES = [
    ("plain positions", None, None),
    ("V2PE 16, zero-shot", None, "v2pe:16"),
    ("plain + LoRA on N<=4 (control)", "multi_control", None),
    ("V2PE 16 + LoRA on N<=4", "v2pe_multi", None),
]
SWEEP_KEEP = [1.0, 0.5, 0.25, 0.11]
#: the built-in pruners in the sweep's order (the plot's line colours follow it); any other registered pruner
#: comes after them, by type
SWEEP_ORDER = ("fopru", "random", "divprune")


def sweep_methods() -> dict[str, str]:
    """Label → compress spec (``{k}``: the keep ratio) of every registered pruner
    (``registered_configs(pruner=True)``) and each of its ``variants()``: ``{"FoPru rank":
    "fopru:keep_ratio={k},strategy=rank", …, "random": "random:keep_ratio={k}", "DivPrune": …}``. A spec names
    the fields in which a pruner's variants differ. Read from the registry on each call, so a pruner registered
    by an outside module joins the sweep."""
    import dataclasses

    from .config import registered_configs

    pruners = sorted(registered_configs(pruner=True), key=lambda c: (
        SWEEP_ORDER.index(c.type) if c.type in SWEEP_ORDER else len(SWEEP_ORDER), c.type))
    methods: dict[str, str] = {}
    for cls in pruners:
        variants = cls.variants()
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("keep_ratio", "num_keep")]
        varying = [n for n in fields if len({repr(getattr(v, n)) for v in variants.values()}) > 1]
        for name, config in variants.items():
            label = f"{cls.title()} {name}".strip()
            if label == "keep" or label in methods:  # "keep": the report's keep-ratio list
                raise ValueError(f"demo sweep label {label!r} of pruner {cls.type!r} is taken (by 'keep' or another "
                                 "pruner); give the config class another display_name")
            methods[label] = f"{cls.type}:keep_ratio={{k}}" + "".join(f",{n}={getattr(config, n)}" for n in varying)
    return methods


def load_default(model_path: str | None = None):
    """(model, processor, description, spec): ``model_path``, else the shipped model, else a tiny random one.

    ``spec`` is what the evaluation harness loads: the checkpoint path (so a saved ``vlmkit.json``, e.g. the
    shipped model's Text4Seg grid, is applied), or the ``(model, processor)`` pair of the random model.
    """
    path = Path(model_path) if model_path else SHIPPED
    if (path / "config.json").is_file():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        return model, processor, str(path), str(path)
    if model_path:
        raise FileNotFoundError(f"no config.json in --model {model_path!r}")
    from .testing import tiny_vlm

    model, processor = tiny_vlm("llava", seed=0)
    return (model, processor, "tiny random-weight LLaVA (no shipped model found: numbers are not meaningful)",
            (model, processor))


def _text4seg_config(spec):
    """The Text4Seg head saved with a checkpoint (``vlmkit.json``), else the reference 16×16 grid."""
    from .seg.text4seg import Text4SegConfig

    if isinstance(spec, str) and (Path(spec) / "vlmkit.json").is_file():
        from .config import config_from_dict
        from .wrapper import read_saved

        for d in read_saved(spec)["stages"]:
            if d.get("type") == "text4seg":
                return config_from_dict(d)
    return Text4SegConfig(grid=16)


def _score(results: dict, task: str, metric: str) -> float | None:
    value = results["results"].get(task, {}).get(f"{metric},none")
    return None if value is None else float(value)


def _run(spec, tasks, compress, position, data_root, limit, quiet) -> dict:
    from .evaluation import evaluate

    start = time.perf_counter()
    res = evaluate(spec, tasks, compress=compress, position=position, data_root=data_root,
                   limit=limit, batch_size=32, quiet=quiet)
    res["demo_seconds"] = time.perf_counter() - start
    return res


def _row(label: str, res: dict) -> dict:
    tp = res["throughput"]
    vqa = tp.get("shapes_vqa", {})
    return {
        "stages": label,
        "vqa_accuracy": _score(res, "shapes_vqa", "vqa_accuracy"),
        "cIoU": _score(res, "shapes_refseg", "cIoU"),
        "gIoU": _score(res, "shapes_refseg", "gIoU"),
        "visual_tokens_per_image": vqa.get("visual_tokens", 0) / max(1, vqa.get("samples", 1)),
        "ms_per_sample": 1000 * sum(t["wall_s"] for t in tp.values()) / max(1, sum(t["samples"] for t in tp.values())),
    }


def shipped_adapters(names) -> dict[str, Path]:
    """{name: folder} of the shipped adapters among ``names`` (a folder counts once its card's metrics exist)."""
    return {n: ADAPTERS / n for n in names if n and (ADAPTERS / n / "metrics.json").is_file()}


def _adapted(spec, data_root, limit, multi_limit, quiet, say) -> tuple[list[dict], dict]:
    """The adaptation table (``ADAPTED_ROWS`` whose adapter is shipped; ``limit`` questions and expressions, the
    main table's) and the shapes_multi curves ({label: accuracy per N}, ``multi_limit`` questions per N); only for
    the shipped model (``spec`` its path), which the adapters were trained from."""
    if not isinstance(spec, str) or Path(spec).resolve() != SHIPPED.resolve():
        say("[adapted] skipped: the adapters belong to the shipped model, not this one")
        return [], {}
    shipped = shipped_adapters([r[1] for r in ADAPTED_ROWS] + [c[1] for c in MULTI_CURVES])
    rows = []
    for i, (label, adapter, compress, position) in enumerate(ADAPTED_ROWS, start=1):
        if adapter is not None and adapter not in shipped:
            say(f"[adapted {i}/{len(ADAPTED_ROWS)}] {label}: not shipped (scripts/train_adapters.py writes it)")
            continue
        res = _run(str(shipped[adapter]) if adapter else spec, "shapes_vqa,shapes_refseg", compress, position,
                   data_root, limit, quiet)
        rows.append(_row(label, res))
        say(f"[adapted {i}/{len(ADAPTED_ROWS)}] {label}: VQA acc {_fmt(rows[-1]['vqa_accuracy'])}, cIoU "
            f"{_fmt(rows[-1]['cIoU'])} ({res['demo_seconds']:.1f} s)")
    curves = {}
    tasks = ",".join(f"shapes_multi_{n}" for n in MULTI_N)
    for i, (label, adapter, position) in enumerate(MULTI_CURVES, start=1):
        if adapter is not None and adapter not in shipped:
            say(f"[multi {i}/{len(MULTI_CURVES)}] {label}: not shipped")
            continue
        res = _run(str(shipped[adapter]) if adapter else spec, tasks, [], position, data_root, multi_limit, quiet)
        curves[label] = [_score(res, f"shapes_multi_{n}", "vqa_accuracy") for n in MULTI_N]
        say(f"[multi {i}/{len(MULTI_CURVES)}] {label}: VQA acc at N = {MULTI_N}: "
            f"{' '.join(_fmt(v) for v in curves[label])} ({res['demo_seconds']:.1f} s)")
    return rows, curves


def recovered(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """{stage: {metric: (adapted − zero-shot) / (control − zero-shot)}} over the demo's rows (``RECOVERED``)."""
    by = {r["stages"]: r for r in rows}
    control = by.get(ADAPTED_ROWS[0][0])
    out = {}
    for stage, (zero, adapted) in RECOVERED.items():
        if control is None or zero not in by or adapted not in by:
            continue
        out[stage] = {}
        for metric in ("vqa_accuracy", "cIoU"):
            z, a, c = by[zero][metric], by[adapted][metric], control[metric]
            out[stage][metric] = None if None in (z, a, c) or c == z else (a - z) / (c - z)
    return out


def _pictures(model, processor, spec, out: Path, data_root: Path, n_overlays: int = 4) -> list[Path]:
    """A FoPru pruning map and Text4Seg mask overlays (predicted against ground truth) of the first referring
    expressions. Every picture carries a title and a legend, drawn and as PNG text (``viz.annotate``)."""
    import numpy as np

    import vlmkit

    from .compress.fopru import FoPruConfig
    from .data.shapes import generate
    from .train.shapes_data import PROMPT, refseg_turn
    from .viz import mask_comparison, pruning_map
    from .viz.annotate import save_png

    samples = generate(n_overlays, seed=0)
    written = []
    keep = 0.25
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=keep, strategy="rank"))
    (tokens,) = vlmkit.Predictor(wrapped, processor, prompt_style="plain").visual_tokens([samples[0].image])
    save_png(pruning_map(samples[0].image, tokens, method="FoPru rank", keep_ratio=keep), out / "pruning_map.png")
    written.append(out / "pruning_map.png")
    vlmkit.unwrap(wrapped)

    wrapped = vlmkit.wrap(model, _text4seg_config(spec))
    rng = np.random.default_rng(0)
    turns = [refseg_turn(s, rng) for s in samples]
    prompts = [PROMPT.format(image=processor.image_token, question=q) for q, _, _ in turns]
    predictions = vlmkit.Predictor(wrapped, processor, prompt_style="raw").segment(
        [s.image for s in samples], prompts, max_new_tokens=200)
    results = [p.masks for p in predictions]  # Text4SegResult per sample
    up = np.ones((4, 4), bool)
    for i, (s, (q, _, obj), r) in enumerate(zip(samples, turns, results)):
        label = q.split("'")[1] if "'" in q else s.objects[obj].name
        pic = mask_comparison(s.image.resize((256, 256), 0), np.kron(r.mask, up), np.kron(s.objects[obj].mask, up),
                              f'"{label}"')
        save_png(pic, out / f"mask_overlay_{i}.png")
        written.append(out / f"mask_overlay_{i}.png")
    vlmkit.unwrap(wrapped)
    return written


def run(out: str | Path = "demo_out", model_path: str | None = None, limit: int = 64, sweep_limit: int = 48,
        quiet: bool = True, log: Callable[[str], None] | None = print, loaded: tuple | None = None,
        adapters: bool = True, multi_limit: int = MULTI_LIMIT) -> dict:
    """Evaluate the main rows, the keep-ratio sweep and (``adapters``, shipped model only) the adaptation rows
    (``limit`` each, as the main rows) and shapes_multi curves (``multi_limit`` per N); write PNGs and
    ``demo_results.json`` to ``out``.

    ``log`` gets one progress line per evaluated row and sweep point (None: silent); ``quiet`` hides the
    harness's progress bars; ``loaded``: what ``load_default(model_path)`` returned, when the caller has it."""
    import torch

    from .viz.annotate import save_png
    from .viz.plot import line_plot

    say = log or (lambda line: None)
    if quiet:  # the harness reloads the checkpoint for every row: no weight-loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    model, processor, description, spec = loaded if loaded is not None else load_default(model_path)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    say(f"model: {description}")
    methods = sweep_methods()
    n_main, n_sweep = len(MAIN_ROWS), len(methods) * len(SWEEP_KEEP)
    rows = []
    for i, (label, compress, position) in enumerate(MAIN_ROWS, start=1):
        res = _run(spec, "shapes_vqa,shapes_refseg", compress, position, data_root, limit, quiet)
        rows.append(_row(label, res))
        say(f"[table {i}/{n_main}] {label}: VQA acc {_fmt(rows[-1]['vqa_accuracy'])}, cIoU {_fmt(rows[-1]['cIoU'])} "
            f"({res['demo_seconds']:.1f} s)")
    sweep: dict[str, list[float]] = {}
    done = 0
    for method, method_spec in methods.items():
        sweep[method] = []
        for keep in SWEEP_KEEP:
            res = _run(spec, "shapes_vqa", [method_spec.format(k=keep)], None, data_root, sweep_limit, quiet)
            sweep[method].append(_score(res, "shapes_vqa", "vqa_accuracy"))
            done += 1
            say(f"[sweep {done}/{n_sweep}] {method} keep {keep:g}: VQA acc {_fmt(sweep[method][-1])} "
                f"({res['demo_seconds']:.1f} s)")
    adapted, curves = _adapted(spec, data_root, limit, multi_limit, quiet, say) if adapters else ([], {})
    say("[pictures] pruning map, mask overlays, accuracy plots")
    pictures = _pictures(model, processor, spec, out, data_root)
    # the adapted pruners at their keep ratio (0.25), evaluated on the table's questions, as single points
    by_label = {r["stages"]: r for r in adapted}
    points, colors = {}, {}
    for label, method in (("FoPru rank 0.25 + LoRA", "FoPru rank"), ("random 0.25 + LoRA", "random")):
        if label in by_label:
            name = f"{label} (table's {limit} q)"
            points[name] = [by_label[label]["vqa_accuracy"] if k == 0.25 else None for k in SWEEP_KEEP]
            if method in sweep:
                colors[name] = method  # the adapted point in its method's colour
    plot = line_plot(SWEEP_KEEP, {**sweep, **points},
                     title=f"shapes VQA accuracy vs keep ratio ({sweep_limit} questions per point; "
                     "diamonds: the pruner + its LoRA adapter)",
                     xlabel="keep ratio (share of each image's visual tokens the language model sees)",
                     ylabel="VQA accuracy", colors=colors)
    save_png(plot, out / "accuracy_vs_keep.png")
    pictures.append(out / "accuracy_vs_keep.png")
    if curves:
        plot = line_plot(MULTI_N, curves, title=f"shapes_multi: one question about image k of N "
                         f"({multi_limit} questions per point, 64 visual tokens per image)",
                         xlabel="N, images in the prompt", ylabel="VQA accuracy")
        save_png(plot, out / "multi_image_accuracy.png")
        pictures.append(out / "multi_image_accuracy.png")
    report = {"model": description, "rows": rows, "sweep": {"keep": SWEEP_KEEP, **sweep},
              "adapted_rows": adapted, "recovered": recovered(rows + adapted),
              "multi": {"N": MULTI_N, **curves}, "limit": limit, "sweep_limit": sweep_limit,
              "multi_limit": multi_limit, "pictures": [str(p) for p in pictures]}
    (out / "demo_results.json").write_text(json.dumps(report, indent=1))
    return report


def _fmt(value, pattern="{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


#: what each column of the demo's table means (printed under it)
COLUMNS = (
    ("VQA acc", "share of the {limit} held-out shapes questions answered right (VQAv2 accuracy)"),
    ("cIoU", "cumulative IoU over {limit} referring expressions: all intersections / all unions of the "
             "predicted and true masks"),
    ("gIoU", "mean of the per-expression IoUs"),
    ("vis tok/img", "visual tokens of each image the language model sees"),
    ("ms/sample", "wall time of whole generate calls per sample; answers differ in length, so this is "
                  "not a speed measure (scripts/bench_compression.py measures speed on equal work)"),
)


@command("vlmkit demo")
def cli_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="vlmkit demo", description=__doc__)
    parser.add_argument("--model", default=None, help="local checkpoint folder (default: the shipped shapes model, "
                        "vlmkit/assets/shapes-llava-tiny)")
    parser.add_argument("--out", default="demo_out", help="folder for the PNGs, demo_results.json and the data")
    parser.add_argument("--limit", type=positive_int, default=64, help="held-out questions / expressions per task")
    parser.add_argument("--sweep-limit", type=positive_int, default=48,
                        help="questions per point of the keep-ratio sweep")
    parser.add_argument("--multi-limit", type=positive_int, default=MULTI_LIMIT,
                        help="questions per number of images of the shapes_multi curves")
    parser.add_argument("--no-adapters", action="store_true",
                        help="skip the adaptation table and the shapes_multi curves (default: run them when the "
                        "shipped adapters are present)")
    parser.add_argument("--progress", action="store_true", help="show the harness's progress bars too")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with user_input():  # before anything is written or loaded
        if args.model is not None and not (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model!r}: not a checkpoint folder (no config.json; nothing is "
                             "downloaded)")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is a file; expected a folder")
        if not args.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        loaded = load_default(args.model)
    extra = "" if args.no_adapters else (f", {len(ADAPTED_ROWS)} adaptation rows and {len(MULTI_CURVES)} "
                                         f"shapes_multi curves ({args.multi_limit} questions per N)")
    print(f"vlmkit demo: {len(MAIN_ROWS)} table rows ({args.limit} questions and expressions each), a keep-ratio "
          f"sweep ({args.sweep_limit} questions per point){extra}; about two minutes on 2 CPU cores", flush=True)
    report = run(args.out, args.model, args.limit, args.sweep_limit, quiet=not args.progress,
                 log=lambda line: print(line, flush=True), loaded=loaded, adapters=not args.no_adapters,
                 multi_limit=args.multi_limit)
    print()
    print(f"{'stages':26s} {'VQA acc':>8s} {'cIoU':>7s} {'gIoU':>7s} {'vis tok/img':>12s} {'ms/sample':>10s}")
    for r in report["rows"] + report["adapted_rows"]:
        print(f"{r['stages']:26s} {_fmt(r['vqa_accuracy']):>8s} {_fmt(r['cIoU']):>7s} {_fmt(r['gIoU']):>7s} "
              f"{r['visual_tokens_per_image']:12.1f} {r['ms_per_sample']:10.1f}")
    for name, meaning in COLUMNS:
        print(f"  {name:12s} {meaning.format(limit=report['limit'])}")
    if report["recovered"]:
        print("recovered by the adapter = (stage + LoRA − zero-shot) / (control − zero-shot), control = full + the "
              "same LoRA recipe:")
        for stage, r in report["recovered"].items():
            print(f"  {stage:24s} VQA {_fmt(r['vqa_accuracy'], '{:.0%}')}, cIoU {_fmt(r['cIoU'], '{:.0%}')}")
        card = json.loads((ADAPTERS / "control" / "metrics.json").read_text())["limits"]
        print(f"  ({report['limit']} questions here; each adapter's card measures {card['shapes_vqa']} questions and "
              f"{card['shapes_refseg']} expressions: {ADAPTERS}/<adapter>/README.md)")
    if len(report["multi"]) > 1:
        print(f"shapes_multi, VQA accuracy against images per prompt ({report['multi_limit']} questions per N) "
              + " ".join(f"{'N=' + str(n):>6}" for n in report["multi"]["N"]))
        for label in [m for m in report["multi"] if m != "N"]:
            print(f"  {label:32s} " + " ".join(f"{_fmt(v):>6s}" for v in report["multi"][label]))
    print(f"VQA accuracy vs keep ratio ({report['sweep_limit']} questions per point) "
          + " ".join(f"{k:>6}" for k in report["sweep"]["keep"]))
    for method in [m for m in report["sweep"] if m != "keep"]:
        print(f"  {method:24s} " + " ".join(f"{_fmt(v):>6s}" for v in report["sweep"][method]))
    print(f"pictures: {', '.join(report['pictures'])}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
