"""Every registered pruner side by side: accuracy on the shipped shapes model, cost at LLaVA-1.5-7B width.

Writes ``docs/methods.md`` (tables) and ``docs/methods_tradeoff.png`` (accuracy against the visual tokens the
decoder layers see). Methods are read from the registry (``vlmkit.demo.sweep_methods()``: every pruner and each
of its variants), so a newly registered pruner is a new row; random pruning is always one. Decoder stages without a
keep budget (VTW: every visual token withdrawn before its layer K) are rows at keep 0, at their default K: what
their later layers see (``withdrawal_methods``).

A. Shapes model (``vlmkit/assets/shapes-llava-tiny``), the evaluation harness with the same questions for every
   row: VQA accuracy (``shapes_vqa``) and referring cIoU (``shapes_refseg``) at each keep ratio; and, measured on
   one prompt: the visual tokens each decoder layer runs on (a hook counts every layer's input length; the mean
   over layers is what in-LLM papers report), prefill FLOPs counted by ``torch.utils.flop_counter`` (whole
   forward: vision tower, projector, decoder; attention score products of CPU SDPA are not counted by torch's
   counter), and KV-cache bytes after the prompt (summed over the cache's tensors).
B. Real width (``configs/llava-1.5-7b-hf.json``, random weights, ``--layers`` decoder layers): prefill time of
   the wrapped model vs no pruning, measured side by side (each setting between two full prefills, medians of the
   paired ratios), the ideal speed-up from counted FLOPs, their ratio, and the KV-cache bytes measured vs counted
   from the layer lengths (2 · kv_heads · head_dim · bytes per cached token). The prefill timed is ``generate``'s
   with one new token through ``wrap(..., pad_to_multiple_of=--pad-to-multiple-of)`` (default 8, as
   ``scripts/bench_compression.py`` pads FoPru: on a 2-core CPU the 4096-wide float32 GEMMs ran up to 17 % slower
   at 199 rows than at 200); the ideal counts the unpadded lengths, so the padding is charged to the method. On
   the CPU in float32 the decoder's linears are pre-packed for oneDNN as there (``--cpu-linear``). For
   decoder-side methods, the wall time of their scoring and selection (every call of the stage's ``scores`` /
   ``select``, timed inside the same timed prefills; ``scoring_timer``) as a share of the prefill. ``--dtype
   bfloat16`` builds the model directly in bf16 (13.5 GB at 32 layers), so the CPU can run the full depth.

``--accuracy-from`` takes section A's rows of the methods an earlier run measured from its
``methods_results.json`` and measures only the others (A's numbers do not depend on the other rows); section B is
always measured anew, since its ratios are only meaningful side by side.

CPU: ``--quick`` (16 questions per point, 2 decoder layers at 7B width, 2 repeats) takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.11])
    p.add_argument("--limit", type=int, default=64, help="questions / expressions per task and point (A)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers at 7B width (B)")
    p.add_argument("--config", default=None, help="LLaVA config.json for B (default configs/llava-1.5-7b-hf.json)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (B)")
    p.add_argument("--batch", type=int, default=1, help="prompts per prefill (B; the cost rows are per batch)")
    p.add_argument("--pad-to-multiple-of", type=int, default=8,
                   help="B: the prompt generate prefills is left-padded to a multiple of this after pruning, as "
                        "`vlmkit.wrap(..., pad_to_multiple_of=N)` does (0: not padded); ideals count unpadded lengths")
    p.add_argument("--cpu-linear", choices=["onednn", "mkl"], default="onednn",
                   help="B on the CPU in float32: the decoder's linears pre-packed for oneDNN once, as "
                        "scripts/bench_compression.py times FoPru (the usual CPU inference route), or plain MKL "
                        "sgemm (repacks the weights on every call, a cost that does not shrink with the tokens)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--methods", nargs="*", default=None, help="method labels to run (default: every pruner, and VTW)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="B's weights and activations (default: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(REPO / "docs"), help="folder for methods.md and methods_tradeoff.png")
    p.add_argument("--speed-from", action="append", default=[],
                   help="methods_results.json of an earlier run (e.g. on a GPU): its section B is added to the report")
    p.add_argument("--reuse", default=None,
                   help="methods_results.json of an earlier run: re-render its sections A and B (no measuring)")
    p.add_argument("--accuracy-from", default=None,
                   help="methods_results.json of an earlier run: section A rows of the methods (and keeps) it holds "
                        "are taken from it, only the others are measured; section B is measured anew")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.layers, args.repeats = min(args.limit, 16), min(args.layers, 2), min(args.repeats, 2)
    return args


def _bench_compression():
    """``scripts/bench_compression.py`` as a module (its LLaVA-1.5-7B builder, batch and timer)."""
    spec = importlib.util.spec_from_file_location("bench_compression", REPO / "scripts" / "bench_compression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def withdrawal_methods() -> dict[str, str]:
    """Label → compress spec of the registered decoder stages without a keep budget (``pruner`` False: VTW, which
    withdraws every visual token before its layer K): rows at keep 0, what their later layers see, at the
    method's default K."""
    from vlmkit.config import registered_configs

    return {cls.title(): cls.type for cls in registered_configs(role="decoder", pruner=False)}


# --- measuring one prefill ------------------------------------------------------------------------------
def measure_prefill(wrapped, inputs: dict) -> dict:
    """One prefill (batch 1) of ``wrapped``: per-layer sequence lengths, visual tokens per layer, counted FLOPs,
    KV-cache bytes (measured and counted from the lengths)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lengths: list[int] = []

    def ran_on(module, args, output):  # a layer's output has the length it ran on (after any drop before it)
        lengths.append(int((output[0] if isinstance(output, tuple) else output).shape[1]))

    # registered before the wrapper's decoder stages add theirs, so each runs ahead of a stage's own output hook
    handles = [layer.register_forward_hook(ran_on) for layer in wrapped.family.decoder_layers]
    text: list[int] = []
    hook = wrapped.register_assemble_hook(
        lambda _, batch: text.append((int(batch.attention_mask.sum()) - sum(batch.visual_tokens_per_sample))
                                     // batch.attention_mask.shape[0]))  # text tokens per row (rows alike)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = wrapped(**inputs, use_cache=True)
    finally:
        hook.remove()
        for h in handles:
            h.remove()
    cache = out.past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    k0 = cache.layers[0].keys  # [B, kv_heads, S, head_dim]
    per_token = 2 * k0.shape[0] * k0.shape[1] * k0.shape[3] * k0.element_size()  # every row of the batch
    return {"layer_lengths": lengths, "visual_per_layer": [n - text[0] for n in lengths],
            "avg_visual_per_layer": statistics.fmean(n - text[0] for n in lengths),
            "flops": counter.get_total_flops(), "kv_bytes": measured, "kv_bytes_counted": per_token * sum(lengths)}


@contextlib.contextmanager
def scoring_timer(wrapped, device: str):
    """Accumulate the wall time (seconds, appended to the yielded list) of every ``scores`` / ``select`` call of
    the decoder-side pruners of ``wrapped`` (``DecoderPruneStage``: FastV, PDrop, DART, VTW) while inside; on CUDA
    each call is bracketed by synchronisations so that its kernels are counted. Nothing is timed for wrappers
    without such stages."""
    import torch

    from vlmkit.decoder.prune import DecoderPruneStage

    spent: list[float] = []
    cuda = device.startswith("cuda")

    def timed(fn):
        def run(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                spent.append(time.perf_counter() - start)
        return run

    stages = [s for s in wrapped.stages_of("decoder") if isinstance(s, DecoderPruneStage)]
    for stage in stages:
        for name in ("scores", "select"):
            setattr(stage, name, timed(getattr(stage, name)))  # instance attributes shadow the methods
    try:
        yield spent
    finally:
        for stage in stages:
            for name in ("scores", "select"):
                delattr(stage, name)


# --- A: the shapes model ----------------------------------------------------------------------------------
def section_a(plan: dict, args, earlier: dict | None = None) -> dict:
    """Section A over ``plan`` (label → keep → compress spec); ``earlier``: section A of an earlier run, whose rows
    (per method and keep) are taken as they are. ``measured_by`` names, per method of an earlier run, the command
    that measured it (carried over from run to run; methods measured by this run are not listed)."""
    import torch

    from vlmkit import Predictor
    from vlmkit.config import parse_stage_spec
    from vlmkit.data.shapes import generate
    from vlmkit.demo import _run, _score, load_default
    from vlmkit.wrapper import wrap, unwrap

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness reloads the checkpoint for every point
    model, processor, description, spec = load_default()
    description = os.path.relpath(description, REPO) if os.path.isabs(description) else description
    data_root = Path(tempfile.mkdtemp(prefix="bench_methods_"))  # the harness writes the shapes data here
    sample = generate(1, seed=123)[0]
    predictor_prompt = "how many shapes are there ?"

    def one(label, compress):
        res = _run(spec, "shapes_vqa,shapes_refseg", compress, None, data_root, args.limit, True)
        wrapped = wrap(model, *[parse_stage_spec(c) for c in compress])
        try:
            predictor = Predictor(wrapped, processor, prompt_style="plain")
            inputs = predictor.inputs([[sample.image]], [predictor.prompt(predictor_prompt, 1)])
            cost = measure_prefill(wrapped, inputs)
        finally:
            unwrap(wrapped)
        return {"vqa": _score(res, "shapes_vqa", "vqa_accuracy"), "ciou": _score(res, "shapes_refseg", "cIoU"), **cost}

    torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    old = {} if earlier is None else {m: {float(k): r for k, r in per_keep.items()}
                                      for m, per_keep in earlier["rows"].items()}
    if earlier is not None and "reused" in earlier:  # the first format: {"rows": [...], "command": ...}
        earlier = {**earlier, "measured_by": {m: earlier["reused"]["command"] for m in earlier["reused"]["rows"]}}
    by = {} if earlier is None else {m: earlier.get("measured_by", {}).get(m, earlier["command"]) for m in old}
    reused: list[str] = []
    rows = {"full": old["full"]} if 1.0 in old.get("full", {}) else {"full": {1.0: one("full", [])}}
    if "full" in by and 1.0 in old.get("full", {}):
        reused.append("full")
    for label, per_keep in plan.items():
        rows[label] = {}
        if all(keep in old.get(label, {}) for keep in per_keep):
            rows[label] = {keep: old[label][keep] for keep in per_keep}
            reused.append(label)
            continue
        for keep, method_spec in per_keep.items():
            rows[label][keep] = one(label, [method_spec])
            if not args.quiet:
                r = rows[label][keep]
                print(f"  {label:18s} keep {keep:<5} VQA {r['vqa']:.3f} cIoU {r['ciou']:.3f} "
                      f"visual/layer {r['avg_visual_per_layer']:.1f}", flush=True)
    out = {"model": description, "rows": rows, "limit": args.limit}
    if reused:
        out["measured_by"] = {m: by[m] for m in reused}
    return out


def _provenance(a: dict) -> str:
    """The sentence saying which rows of section A earlier runs measured (empty when this run measured all)."""
    groups: dict[str, list[str]] = {}
    for method, command in a.get("measured_by", {}).items():
        groups.setdefault(command, []).append(method)
    if not groups:
        return ""
    parts = [f"rows of {', '.join(methods)} by `{command}`" for command, methods in groups.items()]
    rest = [m for m in a["rows"] if m not in a["measured_by"]]
    return (" Measured by earlier runs: " + "; ".join(parts) + "; "
            + (f"the rows of {', '.join(rest)} by this run." if rest else "no row by this run."))


# --- B: real width ------------------------------------------------------------------------------------------
def section_b(plan: dict, args) -> dict:
    import torch

    from vlmkit.config import parse_stage_spec
    from vlmkit.families.registry import family_for
    from vlmkit.wrapper import unwrap, wrap

    bc = _bench_compression()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if device == "cpu" else torch.bfloat16
    if args.threads:
        torch.set_num_threads(args.threads)
    config, full_layers = bc.load_config(args.config or bc.DEFAULT_CONFIG, args.layers)
    model = bc.build_model(config, device, dtype)
    ids, mask, pixels = bc.synthetic_batch(config, args.batch, 35, 20, device, dtype)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    pad = args.pad_to_multiple_of or None
    settings = {"full": []} | {f"{label} @ {keep}": [method_spec]
                               for label, per_keep in plan.items() for keep, method_spec in per_keep.items()}
    cost, times, scoring = {}, {name: [] for name in settings}, {name: [] for name in settings}

    def wrapped_as(name: str, **kwargs):
        return wrap(model, *[parse_stage_spec(c) for c in settings[name]], **kwargs)

    def first_token(wrapped):  # generate's prefill: the prompt as users run it (re-padded, positions kept)
        return wrapped.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)

    for name in settings:
        wrapped = wrapped_as(name)
        cost[name] = measure_prefill(wrapped, inputs)
        unwrap(wrapped)
    full_len = cost["full"]["layer_lengths"][0]
    shorter = sorted({c["layer_lengths"][0] for c in cost.values()
                      if len(set(c["layer_lengths"])) == 1 and c["layer_lengths"][0] < full_len}, reverse=True)
    ceiling = machine_ceiling(family_for(model).language_model, full_len, shorter, args, device, dtype, bc)
    onednn = device == "cpu" and dtype == torch.float32 and args.cpu_linear == "onednn"
    if onednn:  # after every FLOP count: the counter does not see packed linears
        bc.prepack_decoder(model)
    for name in settings:
        wrapped = wrapped_as(name, pad_to_multiple_of=pad)
        seen: list[int] = []  # the prompt length the timed route prefills (also its warm-up)
        wrapped.register_assemble_hook(lambda _, batch: seen.append(int(batch.inputs_embeds.shape[1])))
        first_token(wrapped)
        cost[name]["timed_prompt_length"] = seen[0]
        unwrap(wrapped)

    def prefill(name: str) -> float:
        wrapped = wrapped_as(name, pad_to_multiple_of=pad)
        with torch.no_grad(), scoring_timer(wrapped, device) as spent:
            t = bc.timed(lambda: first_token(wrapped), device)
        times[name].append(t)
        if spent:  # a decoder-side method scored: its share of this very prefill
            scoring[name].append(sum(spent) / t)
        unwrap(wrapped)
        return t

    paired = paired_speedups(lambda: prefill("full"), {name: (lambda name=name: prefill(name))
                                                       for name in settings if name != "full"}, args.repeats)
    base_t, base_f = statistics.median(times["full"]), cost["full"]["flops"]
    rows = {}
    for name in settings:
        t = statistics.median(times[name])
        speedup = statistics.median(paired[name]) if name in paired else 1.0
        rows[name] = {**cost[name], "seconds": t, "times": times[name], "speedup": speedup,
                      "ideal": base_f / cost[name]["flops"],
                      "layer_lengths": cost[name]["layer_lengths"]}
        rows[name]["efficiency"] = rows[name]["speedup"] / rows[name]["ideal"]
        if scoring[name]:
            rows[name]["scoring_fraction"] = statistics.median(scoring[name])
    linears = "" if device != "cpu" or dtype != torch.float32 else \
        f", decoder linears {'oneDNN pre-packed' if onednn else 'MKL sgemm (not pre-packed)'}"
    return {"device": f"{device} {str(dtype).replace('torch.', '')}{linears}, {torch.get_num_threads()} threads, "
                      f"batch {args.batch}, prefill of the full prompt {base_t * 1e3:.1f} ms",
            "layers": args.layers, "full_layers": full_layers, "rows": rows, "timing": "paired",
            "route": "generate", "pad_to_multiple_of": pad, "ceiling": ceiling()}


def paired_speedups(full, settings: dict, repeats: int) -> dict[str, list[float]]:
    """Per setting, its speed-up in each repeat: ``full`` and every ``settings[name]`` are callables that run once and
    return their time. Each repeat times full, s1, full, s2, full, …; a setting's speed-up is the mean of the full
    runs just before and after it over its own time, so drifts of the machine's speed (on a shared 2-core VM a fixed
    GEMM's time moved between 0.18 and 0.52 s within a minute) cancel instead of landing on one setting."""
    paired: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        before = full()
        for name, run in settings.items():
            t = run()
            after = full()
            paired[name].append((before + after) / 2 / t)
            before = after
    return paired


def machine_ceiling(language_model, full_len: int, lengths: list[int], args, device: str, dtype, bc):
    """What this machine gives back for fewer tokens, with no pruning code involved: the unwrapped decoder stack on
    random ``inputs_embeds`` [B, n, hidden] of ``full_len`` and of each shorter uniform length the pre-LLM rows ran
    at, timed paired as section B (full, n1, full, n2, full, … each repeat). Its efficiency (measured / counted
    FLOPs ratio) is what a pre-LLM method at the same length can expect here: GEMMs over fewer rows run at a lower
    FLOP rate, so a row below 1 need not be the pruner's overhead. With ``--pad-to-multiple-of`` each length is
    timed left-padded (masked) as the rows are, and its FLOPs counted unpadded.

    Counts the FLOPs now and returns the timing as a callable (→ the result dict), so the caller can pre-pack the
    linears in between and time the ceiling after the rows, on the same weights."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    pad = args.pad_to_multiple_of

    def inputs(n: int, total: int) -> dict:
        mask = torch.ones(args.batch, total, dtype=torch.long, device=device)
        mask[:, : total - n] = 0
        return {"inputs_embeds": torch.randn(args.batch, total, language_model.config.hidden_size,
                                             generator=g).to(device, dtype), "attention_mask": mask}

    def run(batch: dict):
        with torch.no_grad():
            language_model(**batch, use_cache=True)

    made = {n: inputs(n, -(-n // pad) * pad if pad else n) for n in [full_len, *lengths]}  # as timed

    times: dict[int, list[float]] = {n: [] for n in made}

    def timed(n: int) -> float:
        times[n].append(bc.timed(lambda: run(made[n]), device))
        return times[n][-1]

    flops = {n: bc.counted_flops(lambda n=n: run(inputs(n, n))) for n in made}  # unpadded

    def measure() -> dict:
        for batch in made.values():  # warm-up on the weights as they are now
            run(batch)
        paired = paired_speedups(lambda: timed(full_len), {n: (lambda n=n: timed(n)) for n in lengths},
                                 args.repeats if lengths else 0)
        rows = {}
        for n in lengths:
            speedup, ideal = statistics.median(paired[n]), flops[full_len] / flops[n]
            rows[str(n)] = {"speedup": speedup, "ideal": ideal, "efficiency": speedup / ideal, "times": times[n]}
        return {"full_len": full_len, "full_times": times[full_len], "rows": rows, "pad_to_multiple_of": pad or None}

    return measure


# --- report ----------------------------------------------------------------------------------------------
def _speed_table(b: dict, repeats) -> list[str]:
    device = b["device"]
    if device.startswith("cpu float32") and "decoder linears" not in device:  # runs before --cpu-linear
        device = device.replace("cpu float32", "cpu float32, decoder linears MKL sgemm (not pre-packed)", 1)
    lines = [f"## B. Real width: LLaVA-1.5-7B architecture, random weights, {b['layers']} of {b['full_layers']} "
             f"decoder layers ({device})", "",
             _route(b)
             + (f"{repeats} repeats, each timing full, setting 1, full, setting 2, full, …: a setting's speed-up is "
                "the median over repeats of (mean of the full prefills just before and after it) / its own time. "
                if b.get("timing") == "paired" else  # runs before the paired timing
                f"median of {repeats} interleaved repeats (full / setting of the medians). ") +
             "Ideal = counted FLOPs of full / method; efficiency = "
             "measured speed-up / ideal. KV bytes: measured on the cache; counted = 2 · kv_heads · head_dim · "
             "bytes · Σ layer lengths. Scoring (decoder-side methods): wall time of the method's `scores` + "
             "`select` calls inside the same timed prefill, as a share of it (median over repeats; – where not "
             "measured)." + _spread(b["rows"]["full"]), "",
             "| setting | layer lengths | measured speed-up | ideal | efficiency | scoring / prefill "
             "| KV bytes measured | counted |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in b["rows"].items():
        lengths = r["layer_lengths"]
        shown = " ".join(map(str, lengths)) if len(lengths) <= 8 else \
            " ".join(f"{n}×{k}" for k, n in _runs(lengths))
        scoring = f"{100 * r['scoring_fraction']:.2f} %" if "scoring_fraction" in r else "–"
        lines.append(f"| {name} | {shown} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['efficiency']:.2f} "
                     f"| {scoring} | {r['kv_bytes']} | {r['kv_bytes_counted']} |")
    return lines + [""] + _ceiling_table(b.get("ceiling"))


def _route(b: dict) -> str:
    """What was timed (runs before the generate route timed the wrapped forward, unpadded)."""
    if b.get("route") != "generate":
        return ("Whole wrapped prefill: `forward` (vision tower, projector, decoder, `use_cache=True`, one token of "
                "logits), the prompt not padded (measured before the script timed `generate`'s padded prefill), ")
    pad = b.get("pad_to_multiple_of")
    return ("Whole wrapped prefill: `generate(max_new_tokens=1)` (vision tower, projector, decoder, one token), "
            + (f"the pruned prompt left-padded to a multiple of {pad} (`wrap(..., pad_to_multiple_of={pad})`; ideals "
               "and KV bytes count the unpadded lengths), " if pad else "the prompt not padded, "))


def _ceiling_table(c: dict | None) -> list[str]:
    """The machine's own efficiency at the pre-LLM rows' lengths (runs before it was measured have none)."""
    if not c or not c["rows"]:
        return []
    padded = f" (each left-padded to a multiple of {c['pad_to_multiple_of']}, FLOPs counted unpadded)" \
        if c.get("pad_to_multiple_of") else ""
    lines = [f"The machine's ceiling, same run: the unwrapped decoder stack alone on {c['full_len']} vs fewer "
             f"`inputs_embeds` tokens{padded}, paired the same way, no pruning code involved. Its efficiency is what "
             "a pre-LLM pruner at that length can expect on this machine (fewer tokens make smaller GEMMs, which "
             "run at a lower FLOP rate); the rows' spread around it is the machine's noise.", "",
             "| decoder tokens | measured speed-up | ideal (counted FLOPs) | efficiency |", "|---|---|---|---|"]
    for n, r in c["rows"].items():
        lines.append(f"| {c['full_len']} → {n} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['efficiency']:.2f} |")
    return lines + [""]


def _spread(full: dict) -> str:
    """How much the same full prefill's time moved over the run: the noise every ratio of the table carries."""
    times = full.get("times", [])
    if len(times) < 2:
        return ""
    lo, hi = min(times), max(times)
    return (f" The full prefill, timed {len(times)} times, took {lo * 1e3:.1f}–{hi * 1e3:.1f} ms ({hi / lo:.1f}× "
            "apart): single ratios carry that machine's noise.")


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[(value, count)] of consecutive equal values."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [(v, n) for v, n in out]


def write_report(a: dict | None, b: dict | None, args, seconds: float) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Pruning methods side by side", "",
             f"Measured by `{args.command}` ({seconds:.0f} s); do not edit by hand. Every registered pruner (and each "
             "of its variants) is a row; random pruning is the baseline every method must beat; VTW, which withdraws "
             "every visual token before its layer K and has no keep budget, is a row at keep 0 (its default K). The "
             "budget of every method is the number of visual tokens per image the language model's *later* layers "
             "see (`keep_ratio` / `num_keep`); decoder-side methods see "
             "all of them in their first layers, so the mean over layers is reported too.", ""]
    if a is not None:
        lines += [f"## A. Shipped shapes model ({a['model']})", "",
                  f"Evaluation harness, {args.limit} held-out questions (`shapes_vqa`) and expressions "
                  "(`shapes_refseg`) per point, the same for every row. Visual tokens per layer, FLOPs and KV-cache "
                  "bytes are measured on one prompt (batch 1) relative to no pruning." + _provenance(a), "",
                  "| method | keep | VQA acc | cIoU | visual tokens / layer (mean) | per layer | prefill FLOPs vs full "
                  "| KV bytes vs full |", "|---|---|---|---|---|---|---|---|"]
        full = a["rows"]["full"][1.0]
        for label, per_keep in a["rows"].items():
            for keep, r in per_keep.items():
                lines.append(f"| {label} | {keep} | {r['vqa']:.3f} | {r['ciou']:.3f} | {r['avg_visual_per_layer']:.1f} "
                             f"| {' '.join(map(str, r['visual_per_layer']))} | {r['flops'] / full['flops']:.3f} "
                             f"| {r['kv_bytes'] / full['kv_bytes']:.3f} |")
        lines.append("")
    if b is not None:
        lines += _speed_table(b, args.repeats)
    for extra in args.speed_from:
        earlier = json.loads(Path(extra).read_text())
        lines += _speed_table(earlier["B"], earlier.get("repeats", "?"))
        lines += [f"Measured by `{earlier.get('command', '?')}`.", ""]  # after the blank line: not a table row
    path = out / "methods.md"
    path.write_text("\n".join(lines))
    (out / "methods_results.json").write_text(json.dumps(
        {"A": a, "B": b, "repeats": args.repeats, "command": args.command, "seconds": seconds}, indent=1, default=str))
    if a is not None:
        from vlmkit.viz.plot import scatter_lines

        series = {label: [(r["avg_visual_per_layer"], r["vqa"]) for r in per_keep.values()]
                  for label, per_keep in a["rows"].items()}
        scatter_lines(series, title="shapes VQA accuracy vs visual tokens per decoder layer (mean)",
                      xlabel="visual tokens per decoder layer (mean over layers)",
                      ylabel="VQA accuracy").save(out / "methods_tradeoff.png")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    from vlmkit.demo import sweep_methods

    plan = {label: {keep: spec.format(k=keep) for keep in args.keeps} for label, spec in sweep_methods().items()}
    plan |= {label: {0.0: spec} for label, spec in withdrawal_methods().items()}
    if args.methods:
        unknown = sorted(set(args.methods) - set(plan))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; registered: {list(plan)}")
        plan = {k: v for k, v in plan.items() if k in args.methods}
    print(f"methods: {', '.join(plan)}; keeps {args.keeps} (withdrawals: keep 0)", flush=True)
    args.command = "python scripts/bench_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = None
    if args.reuse:  # re-render (e.g. with other --speed-from tables) without measuring again
        earlier = json.loads(Path(args.reuse).read_text())
        a, b, args.repeats = earlier["A"], earlier["B"], earlier.get("repeats", args.repeats)
        args.command, seconds = earlier.get("command", "?"), earlier.get("seconds")
        if a is not None:  # JSON turned the keep ratios into strings
            a["rows"] = {m: {float(k): r for k, r in per_keep.items()} for m, per_keep in a["rows"].items()}
    else:
        earlier = None
        if args.accuracy_from:
            data = json.loads(Path(args.accuracy_from).read_text())
            earlier = {**data["A"], "command": data.get("command", "?")}
            if earlier.get("limit", args.limit) != args.limit:
                raise SystemExit(f"--accuracy-from {args.accuracy_from} used --limit {earlier['limit']}, "
                                 f"not {args.limit}")
        a = None if args.skip_accuracy else section_a(plan, args, earlier)
        b = None if args.skip_speed else section_b(plan, args)
    path = write_report(a, b, args, seconds if seconds is not None else time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
