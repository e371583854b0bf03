"""Position budget of one image under each position scheme, side by side with plain integer positions.

For every scheme: the positions one image occupies (measured with vlmkit's own position functions on a
``text, image, text`` row: position of the text after minus position of the text before, minus 1) and how
many such images fit in a 4k and a 32k position budget (``--text-per-image`` text tokens added per image).

    python scripts/bench_positions.py                       # LLaVA-1.5: 576 tokens, 24×24 grid
    python scripts/bench_positions.py --keep 0.25           # also after keeping 25 % of the tokens
"""

from __future__ import annotations

import argparse

import torch

from vlmkit.position.mousi import mousi_position_ids
from vlmkit.position.rotary import integer_positions
from vlmkit.position.v2pe import v2pe_position_ids


def image_row(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row ``t, image (kept cells), t``: attention_mask, image_id, visual_index, each [1, K + 2]."""
    k = kept.numel()
    image_id = torch.tensor([[-1] + [0] * k + [-1]])
    visual_index = torch.cat([torch.tensor([-1]), kept, torch.tensor([-1])])[None]
    return torch.ones_like(image_id), image_id, visual_index


def span(positions: torch.Tensor) -> float:
    """Positions the image takes: (text after) − (text before) − 1, from a [1, K + 2] row."""
    return float(positions[0, -1] - positions[0, 0] - 1)


def measure(n_tokens: int, grid: tuple[int, int], strides: list[int], kept: torch.Tensor) -> list[tuple[str, float]]:
    mask, image_id, index = image_row(kept)
    visual = image_id >= 0
    rows = [("plain integer", span(integer_positions(mask)))]
    for s in strides:
        rows.append((f"V2PE stride {s} (δ = {s}/{n_tokens})", span(v2pe_position_ids(visual, mask, s, n_tokens))))
    for mode in ("shared", "row", "original"):
        pos = mousi_position_ids(mode, mask, image_id, index, [grid[1]], [n_tokens])
        rows.append((f"MouSi {mode}", span(pos)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=2, default=(24, 24), metavar=("H", "W"), help="token grid of one image")
    parser.add_argument("--strides", type=int, nargs="+", default=[16, 64, 256], help="V2PE strides to show")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 32768], help="position budgets")
    parser.add_argument("--text-per-image", type=int, default=0, help="text tokens that come with every image")
    parser.add_argument("--keep", type=float, default=0.25, help="also show a pruned image keeping this fraction (0 = skip)")
    parser.add_argument("--quiet", action="store_true", help="accepted for symmetry with the other scripts")
    args = parser.parse_args(argv)
    h, w = args.grid
    n = h * w
    if args.text_per_image < 0 or not 0 <= args.keep <= 1:
        parser.error("--text-per-image must be ≥ 0 and --keep in [0, 1]")

    cases = [(f"{n}-token image ({h}×{w} grid)", torch.arange(n))]
    if 0 < args.keep < 1:
        k = max(1, round(n * args.keep))
        kept = torch.linspace(0, n - 1, k).round().long().unique()  # evenly spread cells
        cases.append((f"after pruning to {kept.numel()} of {n} tokens (positions per kept image)", kept))

    for title, kept in cases:
        rows = measure(n, (h, w), args.strides, kept)
        plain = rows[0][1]
        budgets = [f"fit in {b // 1024}k" if b % 1024 == 0 else f"fit in {b}" for b in args.budgets]
        header = f"{'scheme':<30} {'span':>7} {'vs plain':>9} " + " ".join(f"{c:>10}" for c in budgets)
        print(f"\n{title}; {args.text_per_image} text token(s) per image")
        print(header)
        print("-" * len(header))
        for name, s in rows:
            cost = s + args.text_per_image
            fits = [str(int(b // cost)) if cost > 0 else "∞" for b in args.budgets]
            ratio = f"{s / plain:.4f}" if plain else "-"
            print(f"{name:<30} {s:>7g} {ratio:>9} " + " ".join(f"{f:>10}" for f in fits))


if __name__ == "__main__":
    main()
