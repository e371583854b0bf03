"""vlmkit: wrap a Hugging Face vision-language model with visual-token compression, visual position
encodings, segmentation outputs, PEFT fine-tuning and evaluation.

``import vlmkit`` is cheap: names resolve on first use (torch and transformers load then). Every registered
stage's config class is reachable as ``vlmkit.<ConfigClassName>`` too (``vlmkit.config.register_stage``).
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "wrap": "vlmkit.wrapper",
    "load": "vlmkit.wrapper",
    "unwrap": "vlmkit.wrapper",
    "VLMWrapper": "vlmkit.wrapper",
    "VisualTokens": "vlmkit.tokens",
    "StageConfig": "vlmkit.config",
    "Stage": "vlmkit.stage",
    "Predictor": "vlmkit.predictor",
    "Prediction": "vlmkit.predictor",
    "register_stage": "vlmkit.config",
    "supported_families": "vlmkit.families.registry",
    "FoPruConfig": "vlmkit.compress.fopru",
    "RandomPruneConfig": "vlmkit.compress.random",
    "DivPruneConfig": "vlmkit.compress.divprune",
    "PVCConfig": "vlmkit.compress.pvc",
    "V2PEConfig": "vlmkit.position.v2pe",
    "MouSiPositionConfig": "vlmkit.position.mousi",
    "Text4SegConfig": "vlmkit.seg.text4seg",
    "READConfig": "vlmkit.seg.read",
    "PMPConfig": "vlmkit.seg.pmp",
    "PMPDecoder": "vlmkit.seg.pmp",
    "FrozenSegConfig": "vlmkit.seg.frozenseg",
    "FrozenSeg": "vlmkit.seg.frozenseg",
    "build_frozenseg": "vlmkit.seg.frozenseg",
    "SEEDConfig": "vlmkit.vision.seed",
    "SeedTokenizer": "vlmkit.vision.seed",
    "train_seed_tokenizer": "vlmkit.vision.seed",
    "load_seed_checkpoint": "vlmkit.vision.seed",
    "ExpertsConfig": "vlmkit.vision.experts",
    "register_expert": "vlmkit.vision.experts",
    "ExpertBackbone": "vlmkit.vision.experts",
}

__all__ = sorted([*_EXPORTS, "__version__"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, fallback="vlmkit.config:registered_config_named")
