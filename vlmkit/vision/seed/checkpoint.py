"""Loading a reference SEED checkpoint (``seed_quantizer.pt``) into a :class:`SeedTokenizer` by key renaming."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

from .tokenizer import SeedTokenizer

#: Reference checkpoint prefix → vlmkit module prefix (everything else keeps its name).
FOREIGN_KEY_PREFIXES = {"Qformer.bert.": "qformer.", "Reverse_Qformer.bert.": "reverse_qformer."}
#: Reference keys that are not SEED's own weights: the frozen ViT (you supply it as the feature module)
#: and BERT's position-id buffer.
FOREIGN_IGNORED_PREFIXES = ("visual_encoder.", "Qformer.bert.embeddings.position_ids",
                            "Reverse_Qformer.bert.embeddings.position_ids")
#: vlmkit weights used only by the contrastive phase; a released checkpoint need not have them.
TRAINING_ONLY_PREFIXES = ("vision_proj.", "text_proj.", "temp")


@dataclasses.dataclass
class CheckpointReport:
    """What :func:`load_seed_checkpoint` did: keys loaded, missing, unexpected, shape-mismatched, ignored."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 20) -> str:
        def show(keys: list[str]) -> str:
            more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return f"{len(keys)} {keys[:limit]}{more}"

        return (f"loaded {len(self.loaded)}, missing {show(self.missing)}, unexpected {show(self.unexpected)}, "
                f"shape mismatch {show(self.mismatched)}, ignored {len(self.ignored)}")


def map_foreign_key(key: str) -> str:
    """Reference checkpoint key → vlmkit ``SeedTokenizer`` key (``Qformer.bert.`` → ``qformer.``, …)."""
    for old, new in FOREIGN_KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_seed_checkpoint(tokenizer: SeedTokenizer, path: str | os.PathLike, *, strict: bool = True,
                         ignore_prefixes: Sequence[str] = FOREIGN_IGNORED_PREFIXES) -> CheckpointReport:
    """Load a reference SEED checkpoint (``seed_quantizer.pt``-style ``torch.save`` dict) from a local path.

    ``torch.load(weights_only=True)``; a ``{"model": state_dict}`` wrapper (SEED-1) is unwrapped. Keys are
    renamed with :data:`FOREIGN_KEY_PREFIXES`; keys under ``ignore_prefixes`` (the frozen ViT: supply it
    as the vision module) are skipped. Strict check: every tokenizer weight except the contrastive-only
    ones (:data:`TRAINING_ONLY_PREFIXES`) must be present with its shape, and no other key may remain;
    otherwise ValueError listing the missing / unexpected / mismatched keys (``strict=False``: load what
    matches and return the report). Nothing is changed when a strict load fails.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SEED checkpoint at {path!r}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(raw).__name__})")
    own = tokenizer.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored, unexpected, mismatched = [], [], []
    for key, value in raw.items():
        if any(key.startswith(p) for p in ignore_prefixes):
            ignored.append(key)
            continue
        new = map_foreign_key(key)
        if new not in own:
            unexpected.append(key)
        elif tuple(own[new].shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[new].shape)}")
        else:
            mapped[new] = value
    missing = [k for k in own if k not in mapped and not k.startswith(TRAINING_ONLY_PREFIXES)
               and not any(m.startswith(_unmap(k) + ":") for m in mismatched)]
    report = CheckpointReport(sorted(mapped), sorted(missing), sorted(unexpected), sorted(mismatched), sorted(ignored))
    if strict and not report.ok:
        raise ValueError(f"{path} does not match the SeedTokenizer ({tokenizer.config.image_head} head): "
                         f"{report.summary()}")
    tokenizer.load_state_dict(mapped, strict=False)
    return report


def _unmap(key: str) -> str:
    for old, new in FOREIGN_KEY_PREFIXES.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key
