"""Batched vs one-image-at-a-time selection of the pre-LLM pruners whose rule is a loop (DivPrune: one pick per
kept token; VisPruner: one duplicate-removal round per 8 tokens), at LLaVA-1.5-7B sizes.

``PruneStage.compress`` hands equal-size images of a batch to ``select_many`` together; this prints, for each
batch size, the time of each selection run per image (as before) and batched, side by side in one run, and
checks that both keep the same tokens. The loops are launch-bound on a GPU (a few small kernels per pick or
round, ×B images), so the ratio there is the one that matters; on a CPU it shows the overhead removed.

    python scripts/bench_selection.py [--batches 1 8] [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=576, help="visual tokens per image (LLaVA-1.5: 24×24)")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def cases(batch: int, n: int, k: int, device: str):
    """{name: (per-image callable, batched callable)} on random inputs of LLaVA-1.5-7B widths."""
    import torch

    from vlmkit.compress.divprune import divprune_select
    from vlmkit.compress.vispruner import vispruner_select

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, n, 4096, generator=g).to(device)  # projected tokens (DivPrune's input)
    feats = torch.randn(batch, n, 1024, generator=g).to(device)  # CLIP-L features (VisPruner's input)
    attn = torch.rand(batch, n, generator=g).to(device)
    return {
        "DivPrune": (lambda: torch.stack([divprune_select(x, k) for x in tokens]), lambda: divprune_select(tokens, k)),
        "VisPruner": (lambda: torch.stack([vispruner_select(a, f, k) for a, f in zip(attn, feats)]),
                      lambda: vispruner_select(attn, feats, k)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    import torch
    from bench_compression import timed

    from vlmkit.compress import keep_count

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    k = keep_count(args.tokens, args.keep)
    print(f"{device}, {torch.get_num_threads()} threads; {args.tokens} tokens per image, keep {k}; median of "
          f"{args.repeats} repeats, per-image and batched timed alternately")
    print("| method | batch | per image (ms) | batched (ms) | speed-up | same tokens |\n|---|---|---|---|---|---|")
    for batch in args.batches:
        for name, (alone, batched) in cases(batch, args.tokens, k, device).items():
            same = torch.equal(alone().cpu(), batched().cpu())  # also the warm-up
            t_alone, t_batched = [], []
            for _ in range(args.repeats):
                t_alone.append(timed(alone, device))
                t_batched.append(timed(batched, device))
            a, b = statistics.median(t_alone), statistics.median(t_batched)
            print(f"| {name} | {batch} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} | {'yes' if same else 'NO'} |",
                  flush=True)
            if not same:
                raise SystemExit(f"{name}: the batched selection kept other tokens than the per-image one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
