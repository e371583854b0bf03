"""Prefill speed with FoPru pruning vs no compression, and FoPru's scoring overhead, at LLaVA-1.5-7B size.

Builds ``LlavaForConditionalGeneration`` from ``configs/llava-1.5-7b-hf.json`` with random weights: the real
CLIP ViT-L/14-336 tower (24 layers, 576 visual tokens) and a Vicuna-7B-width decoder (4096 wide) with
``--layers`` decoder layers. In one run, side by side (settings interleaved per repeat, medians):

- LM prefill (``logits_to_keep=1``, KV cache on) of the full sequence and of the sequences FoPru keeps at
  each ratio: measured speed-up, ideal speed-up from FLOPs counted by ``torch.utils.flop_counter`` on a
  meta-device copy (no weights), and their ratio (target >= 0.9). Each setting runs twice: as assembled,
  and left-padded to a multiple of ``--pad-to-multiple-of`` as ``vlmkit.wrap(..., pad_to_multiple_of=N)``
  makes ``generate`` do (padded rows are compared with the padded full sequence; their ideal speed-up is
  still counted on the unpadded lengths, so the padding is charged to them);
- FoPru's scoring (one layer's attention recomputed from its q/k) as a fraction of the vision tower's
  forward (target <= 5 %), against the naive route: an eager tower with ``output_attentions=True``.

CPU: ``--quick`` (1 decoder layer, 1 vision repeat) takes about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "llava-1.5-7b-hf.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="LLaVA config.json (default: the shipped 1.5-7B one)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting (default 5)")
    p.add_argument("--vision-repeats", type=int, default=None, help="timed vision repeats (default 3; --quick 1)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.11])
    p.add_argument("--strategy", choices=["rank", "row"], default="rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=35, help="text tokens before the image (LLaVA's system prompt)")
    p.add_argument("--question", type=int, default=20, help="text tokens after the image")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-linear", choices=["onednn", "mkl"], default="onednn",
                   help="CPU float32 decoder linears: oneDNN with pre-packed weights (the usual CPU inference "
                        "route, flat efficiency over sequence lengths) or plain MKL sgemm (repacks the weights "
                        "on every call, which costs the same for short sequences as for long ones)")
    p.add_argument("--pad-to-multiple-of", type=int, default=8,
                   help="also time every setting padded to a multiple of this (0: don't)")
    p.add_argument("--quick", action="store_true", help="small CPU run: 1 decoder layer, 1 vision repeat")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.layers = args.layers or (1 if args.quick else 2)
    args.repeats = args.repeats or 5
    args.vision_repeats = args.vision_repeats or (1 if args.quick else 3)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_config(path: str, layers: int):
    """(config with ``layers`` decoder layers, the config's own decoder layer count)."""
    from transformers import LlavaConfig

    with open(path) as f:
        config = LlavaConfig.from_dict(json.load(f))
    full = config.text_config.num_hidden_layers
    config.text_config.num_hidden_layers = layers
    return config, full


def build_model(config, device: str, dtype):
    """Random-weight model of ``config`` (eval mode): weights ~ U(±0.02·√3) (std 0.02), norms at 1 / 0.

    Skips transformers' per-module initialisation (minutes at 7B width on a small CPU); buffers (rotary
    frequencies, position ids) are built as usual. Timing does not depend on the values as long as they
    are finite.
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: a 7B model in float32 first would need 26 GB
    try:
        with torch.device(device), no_init_weights():
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for name, param in module.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5)
    return model.to(dtype).eval()


def synthetic_batch(config, batch: int, prefix: int, question: int, device: str, dtype):
    """input_ids [B, prefix + 576 + question] (BOS, random text, image placeholders), pixel_values [B, 3, 336, 336]."""
    import torch

    g = torch.Generator().manual_seed(0)
    vision = config.vision_config
    n_img = (vision.image_size // vision.patch_size) ** 2
    high = min(31999, config.text_config.vocab_size)  # random text ids, never the image token

    def text(n):
        ids = torch.randint(2, high, (batch, n), generator=g)
        return ids.masked_fill(ids == config.image_token_id, 2)

    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text(prefix - 1),
                     torch.full((batch, n_img), config.image_token_id), text(question)], dim=1)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device, dtype)


def prepack_decoder(model) -> None:
    """Pre-pack the decoder's and the LM head's float32 linear weights for oneDNN, once, in place (the vision
    tower is left as is): the usual CPU inference route. Plain MKL sgemm repacks the weights on every call, a cost
    that does not shrink with the sequence, so it understates what fewer tokens save. ``torch.utils.flop_counter``
    does not see the packed linears: count FLOPs before."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script_method inside torch.utils.mkldnn
        from torch.utils.mkldnn import to_mkldnn

        to_mkldnn(model.model.language_model)
        model.lm_head = to_mkldnn(model.lm_head)


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def naive_scores(eager_tower, pixels, layer: int):
    """The naive route: every layer's attention from an eager tower, then the same column mean."""
    out = eager_tower(pixels, output_hidden_states=True, output_attentions=True)
    return out.attentions[layer].float().mean(dim=(1, 2))[:, 1:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch
    from tqdm.auto import tqdm

    import vlmkit
    from vlmkit.compress.fopru import fopru_select
    from vlmkit.families import family_for
    from vlmkit.sequence import assemble

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config, full_layers = load_config(args.config, args.layers)
    with torch.device("meta"):
        from transformers import LlavaForConditionalGeneration

        meta = LlavaForConditionalGeneration(config)
    t0 = time.perf_counter()
    model = build_model(config, args.device, dtype)
    onednn = args.device == "cpu" and dtype == torch.float32 and args.cpu_linear == "onednn"
    if onednn:
        prepack_decoder(model)
    ids, mask, pixels = synthetic_batch(config, args.batch, args.prefix, args.question, args.device, dtype)
    text, vision = config.text_config, config.vision_config
    print(f"vlmkit compression benchmark: {os.path.relpath(args.config, REPO)} with random weights "
          f"(built in {time.perf_counter() - t0:.0f} s)")
    n_img = int(ids.eq(config.image_token_id).sum(1)[0])
    print(f"  vision: CLIP {vision.num_hidden_layers} layers × {vision.hidden_size}, {vision.image_size} px, "
          f"{n_img} tokens | decoder: width {text.hidden_size}, {args.layers} of {full_layers} layers, "
          f"vocab {text.vocab_size}")
    linear = "" if args.device != "cpu" else f", decoder linears: {'oneDNN pre-packed' if onednn else 'MKL sgemm'}"
    print(f"  {args.device} {args.dtype}{linear}, {torch.get_num_threads()} threads, batch {args.batch}, prompt "
          f"{args.prefix} + {n_img} image + {args.question} text tokens, FoPru {args.strategy}; "
          f"{args.repeats} LM / {args.vision_repeats} vision repeats, settings interleaved")

    # --- FoPru scores once (tower run with the scoring hook), then every ratio's LM input -------------
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=1.0, strategy=args.strategy))
    family, stage = wrapped.family, wrapped.stages[0]
    with torch.no_grad():
        full = wrapped.encode_visual(pixels, ids)
    pad = args.pad_to_multiple_of
    ratios = [("none", 1.0)] + [(f"fopru {r:.2f}", r) for r in args.ratios]
    # (name, keep ratio, pad multiple or None, row it is compared with, unpadded row whose FLOPs count)
    settings = [(name, r, None, "none", name) for name, r in ratios]
    settings += [(f"{name} x{pad}", r, pad, f"none x{pad}", name) for name, r in ratios] if pad else []
    inputs = {}
    for name, ratio, multiple, *_ in settings:
        kept = []
        for t in full:
            k = vlmkit.FoPruConfig(keep_ratio=ratio).num_to_keep(t.num_uncompressed)
            kept.append(t.select(fopru_select(t.scores[None], t.grid, k, args.strategy)[0]))
        with torch.no_grad():
            batch = assemble(ids, mask, None, kept, family.embed, family.placeholder_id, family.pad_token_id,
                             padding_side="left", pad_to_multiple_of=multiple)
        inputs[name] = (batch.inputs_embeds, batch.attention_mask, kept[0].num_tokens)

    def prefill(name):
        embeds, attn, _ = inputs[name]
        return lambda: model(inputs_embeds=embeds, attention_mask=attn, use_cache=True, logits_to_keep=1)

    flops = {}
    for name, *_ in settings[: len(ratios)]:  # counted on the unpadded lengths only
        shape = inputs[name][0].shape
        flops[name] = counted_flops(lambda: meta(inputs_embeds=torch.empty(shape, device="meta"), logits_to_keep=1))

    # Diagnostic: the backend's throughput on one decoder GEMM ([B·L, 4096] x [4096, 11008]) at each length
    # to tell a pruning overhead from a BLAS that is less efficient on short sequences.
    up = model.model.language_model.layers[0].mlp.up_proj
    gemm = lambda name: (lambda: up(inputs[name][0]))
    times = {name: [] for name, *_ in settings}
    gemm_times = {name: [] for name, *_ in settings}
    with torch.no_grad():
        for name, *_ in settings[-1:] if args.quick else settings:  # warm-up: allocator, kernels per shape
            prefill(name)()
        steps = tqdm(total=args.repeats * len(settings), desc="LM prefill", disable=args.quiet, file=sys.stdout)
        for _ in range(args.repeats):
            for name, *_ in settings:
                times[name].append(timed(prefill(name), args.device))
                gemm_times[name].append(timed(gemm(name), args.device))
                steps.update()
        steps.close()

    print("\nLM prefill (logits for the last position only); speed-ups from the best of the repeats "
          "(least disturbed by other processes), median-based ratio in the last column")
    print(f"{'setting':<16}{'vis tok':>8}{'seq len':>9}{'GFLOPs':>9}{'best ms':>10}{'median ms':>11}"
          f"{'measured x':>12}{'ideal x':>9}{'meas/ideal':>12}{'(median)':>10}{'GEMM GFLOP/s':>14}")
    achieved = {None: [], pad: []}
    for name, _, multiple, base, plain in settings:
        best, med, f = min(times[name]), statistics.median(times[name]), flops[plain]
        measured, ideal = min(times[base]) / best, flops["none"] / f
        med_ratio = statistics.median(times[base]) / med / ideal
        if name != base:
            achieved[multiple].append(measured / ideal)
        rows = inputs[name][0].shape[0] * inputs[name][0].shape[1]
        gemm_rate = 2 * rows * text.hidden_size * text.intermediate_size / min(gemm_times[name]) / 1e9
        print(f"{name:<16}{inputs[name][2]:>8}{inputs[name][0].shape[1]:>9}{f / 1e9:>9.1f}{best * 1e3:>10.0f}"
              f"{med * 1e3:>11.0f}{measured:>12.2f}{ideal:>9.2f}{measured / ideal:>12.2f}{med_ratio:>10.2f}"
              f"{gemm_rate:>14.1f}")

    # --- scoring overhead vs the vision tower ---------------------------------------------------------
    tower = family.vision_tower
    attn = stage.scored_attention(family)
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.append(a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        tower(pixels, output_hidden_states=True)
    handle.remove()
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    layer = stage.scored_layer - len(family.vision_layers)
    with torch.no_grad():  # the naive route and the hook agree (sanity check of what is being timed)
        agree = torch.allclose(naive_scores(eager, pixels, layer), stage.token_scores(family, captured[0]),
                               rtol=1e-3, atol=1e-6)
    v_times, s_times, n_times = [], [], []
    with torch.no_grad():
        steps = tqdm(total=args.vision_repeats, desc="vision", disable=args.quiet, file=sys.stdout)
        for _ in range(args.vision_repeats):
            v_times.append(timed(lambda: tower(pixels, output_hidden_states=True), args.device))
            s_times.extend(timed(lambda: stage.token_scores(family, captured[0]), args.device) for _ in range(5))
            n_times.append(timed(lambda: naive_scores(eager, pixels, layer), args.device))
            steps.update()
        steps.close()
    v_meta = torch.empty(pixels.shape, device="meta")
    meta_family = family_for(meta)
    tower_flops = counted_flops(lambda: meta_family.vision_tower(v_meta, output_hidden_states=True))
    x_meta = torch.empty(captured[0].shape, device="meta")
    score_flops = counted_flops(lambda: stage.token_scores(meta_family, x_meta))
    tv, ts, tn = min(v_times), min(s_times), min(n_times)
    print(f"\nFoPru scoring: attention of vision layer {stage.scored_layer} (0-based) of {len(family.vision_layers)}, "
          f"recomputed by a hook (matches the eager output_attentions route: {agree})")
    print("  (best of the repeats)")
    print(f"  vision tower forward (sdpa)             {tv * 1e3:10.1f} ms  {tower_flops / 1e9:8.1f} GFLOPs")
    print(f"  FoPru scoring (hook, one layer)         {ts * 1e3:10.1f} ms  {score_flops / 1e9:8.1f} GFLOPs"
          f"  overhead {100 * ts / tv:6.2f} % of the tower ({100 * score_flops / tower_flops:.2f} % of its FLOPs)")
    print(f"  naive: eager tower + output_attentions  {tn * 1e3:10.1f} ms"
          f"                  overhead {100 * (tn - tv) / tv:6.2f} % of the tower")

    print("\ntargets:")
    for multiple, got in achieved.items():
        if got:
            route = "as assembled" if multiple is None else f"padded to x{multiple}"
            print(f"  measured/ideal >= 0.9 at every ratio, {route}: {'PASS' if min(got) >= 0.9 else 'FAIL'} "
                  f"(min {min(got):.2f})")
    print(f"  scoring overhead <= 5 %: {'PASS' if ts / tv <= 0.05 else 'FAIL'} ({100 * ts / tv:.2f} %)")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
