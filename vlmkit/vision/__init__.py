"""Vision-side stages: the SEED image tokenizer (``seed.py``) and MouSi poly-visual experts (``experts.py``)."""
