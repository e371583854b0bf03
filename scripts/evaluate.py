#!/usr/bin/env python
"""Thin entry to the evaluation runner (same flags as ``vlmkit eval``).

    python scripts/evaluate.py --model tiny:llava --tasks shapes_vqa,shapes_refseg --output runs/eval
    accelerate launch --num_processes 2 scripts/evaluate.py --model /ckpt --tasks pope --output runs/eval
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from vlmkit.evaluation.runner import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
