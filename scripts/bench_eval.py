#!/usr/bin/env python
"""Batched vs one-by-one evaluation throughput, measured side by side in one run on a tiny model.

Writes the shapes benchmark to a temporary folder, loads the tiny model once, warms it up, then runs
the same task with ``--batch-size 1`` and ``--batch-size N`` (alternating, ``--repeats`` times) and
prints samples/s, prefill tokens/s and the speed-up, plus whether both runs gave identical outputs.

    python scripts/bench_eval.py --family llava --n 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _outputs(out_dir: Path) -> list[str]:
    (path,) = sorted(out_dir.rglob("*_samples_*.jsonl"))
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", help="tiny model family (llava | internvl)")
    parser.add_argument("--task", default="shapes_vqa")
    parser.add_argument("--n", type=int, default=32, help="docs evaluated per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--compress", default=None, help="e.g. fopru:0.25")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the median is shown")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models run fastest and steadiest on one)")
    args = parser.parse_args(argv)

    import torch

    from vlmkit.data.shapes import write_dataset
    from vlmkit.evaluation.runner import evaluate
    from vlmkit.testing import tiny_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = tiny_vlm(args.family, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "data" / "shapes", max(4, args.n // 4 + 1), seed=0)
        common = dict(processor=processor, limit=args.n, data_root=root / "data", quiet=True,
                      gen_kwargs={"max_new_tokens": args.max_new_tokens},
                      compress=[args.compress] if args.compress else None)
        evaluate(model, args.task, root / "warmup", batch_size=args.batch_size, **{**common, "limit": args.batch_size})
        modes = {"one-by-one": 1, "batched": args.batch_size}
        rows: dict[str, list[dict]] = {m: [] for m in modes}
        outputs: dict[str, list[str]] = {}
        for r in range(args.repeats):
            for mode, bs in modes.items():
                out = root / f"{mode}-{r}"
                res = evaluate(model, args.task, out, batch_size=bs, **common)
                rows[mode].append(res["throughput"][args.task])
                outputs[mode] = _outputs(out)
    print(f"tiny {args.family}, task {args.task}, {args.n} docs, max_new_tokens {args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} alternating runs"
          + (f", compress {args.compress}" if args.compress else ""))
    print(f"{'mode':12s} {'batch':>5s} {'wall s':>8s} {'samples/s':>10s} {'prefill tok/s':>14s} {'prefill tok':>12s}")
    med = {}
    for mode, bs in modes.items():
        wall = statistics.median(r["wall_s"] for r in rows[mode])
        sps = statistics.median(r["samples_per_s"] for r in rows[mode])
        pps = statistics.median(r["prefill_tokens_per_s"] for r in rows[mode])
        med[mode] = sps
        print(f"{mode:12s} {bs:5d} {wall:8.2f} {sps:10.2f} {pps:14.1f} {rows[mode][0]['prefill_tokens']:12d}")
    print(f"speed-up batched / one-by-one: {med['batched'] / med['one-by-one']:.2f}x")
    same = outputs["batched"] == outputs["one-by-one"]
    print(f"identical per-sample outputs: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
