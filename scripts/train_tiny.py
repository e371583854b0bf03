"""Train the embedded default model on the shapes benchmark (logic: vlmkit/train/shapes_model.py).

    python scripts/train_tiny.py --out vlmkit/assets/shapes-llava-tiny --steps 2000
"""

from __future__ import annotations

import argparse
import json

import torch

from vlmkit.train.shapes_model import evaluate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2000, help="joint steps after the vision warm-up")
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--curriculum-steps", type=int, default=400, help="joint steps with at most 2 shapes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refseg-prob", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50, help="also save every N joint steps")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out images for the final evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = train(args.out, steps=args.steps, vision_steps=args.vision_steps, batch_size=args.batch_size, lr=args.lr,
                 seed=args.seed, curriculum_steps=args.curriculum_steps, refseg_prob=args.refseg_prob,
                 eval_every=args.eval_every, save_every=args.save_every, quiet=args.quiet)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.out).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    metrics = evaluate(model, processor, n=args.eval_n, seed=1, quiet=args.quiet)
    print(json.dumps({**info, **metrics}, indent=1))


if __name__ == "__main__":
    main()
