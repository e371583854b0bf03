"""Train the embedded default model on the shapes benchmark (logic: vlmkit/train/shapes_model.py).

    python scripts/train_tiny.py --out vlmkit/assets/shapes-llava-tiny --steps 2000 --card

``--card`` then evaluates the model on held-out shapes, runs ``vlmkit demo`` on it and writes the model
card (README.md + metrics.json) next to the weights; ``--card-only`` does that for an existing run
(training facts from its training_log.json; say how it was trained with ``--train-command``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from vlmkit.train.shapes_model import TinyArch, evaluate, train, write_model_card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2000, help="joint steps after the vision warm-up")
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--curriculum-steps", type=int, default=400, help="joint steps with at most 2 shapes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refseg-turns", type=int, default=1, help="referring turns per image (distinct expressions)")
    parser.add_argument("--draws", type=int, default=3, help="draws of the benchmark's question builders per image")
    parser.add_argument("--point-weight", type=float, default=1.0, help="weight of the <seg> → object pointer loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50, help="also save every N joint steps")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out images for the final evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--init", default=None, help="train on from the model saved in this folder")
    parser.add_argument("--card", action="store_true", help="after training: evaluate, run the demo, write the card")
    parser.add_argument("--card-only", action="store_true", help="no training: write the card of the run in --out")
    parser.add_argument("--train-command", default=None, help="with --card-only: the command that trained it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = args.train_command or "python " + " ".join(sys.argv)
    if args.card_only:
        log = json.loads((Path(args.out) / "training_log.json").read_text())
        info = {"minutes": log["minutes"], "steps": log["log"][-1]["step"] + 1, "seed": args.seed,
                "batch_size": args.batch_size}
    else:
        info = train(args.out, steps=args.steps, vision_steps=args.vision_steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, curriculum_steps=args.curriculum_steps,
                     refseg_turns=args.refseg_turns, draws=args.draws,
                     point_weight=args.point_weight, eval_every=args.eval_every, save_every=args.save_every,
                     quiet=args.quiet, init=args.init)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.out).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    metrics = evaluate(model, processor, n=args.eval_n, seed=1, quiet=args.quiet)
    print(json.dumps({**info, **metrics}, indent=1))
    if args.card or args.card_only:
        from vlmkit import demo

        report = demo.run(Path(args.out) / "demo_check", model_path=args.out, quiet=args.quiet)
        shutil.rmtree(Path(args.out) / "demo_check")
        print(write_model_card(args.out, TinyArch(), info, metrics, report["rows"], command))


if __name__ == "__main__":
    main()
