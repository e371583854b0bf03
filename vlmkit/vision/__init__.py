"""Vision-side stages: the SEED image tokenizer (``seed/``) and MouSi poly-visual experts (``experts/``)."""
