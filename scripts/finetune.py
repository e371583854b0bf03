"""Thin entry for ``vlmkit finetune`` (a script path for ``accelerate launch`` / ``torchrun``).

    python scripts/finetune.py --recipe adapters/lora.yaml --model tiny:llava --data data.json --output out
    accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py --cpu --recipe lora ...
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        import vlmkit  # noqa: F401
    except ImportError:  # running from a source checkout without an install
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlmkit.train.cli import cli_main

    sys.exit(cli_main(sys.argv[1:]))
