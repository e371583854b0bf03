"""Tiny models of the real ``transformers`` classes with a real processor, built offline in well under 2 s.

``tiny_vlm(family)`` returns ``(model, processor)``: random weights, small configs, and a word-level
tokenizer built locally with the ``tokenizers`` library over a closed vocabulary (the shapes benchmark
words plus the family's image markers). Tests and docs use it; nothing is downloaded.

Families: ``llava``, ``internvl``, ``llava_next`` and ``llava_onevision`` (AnyRes pinpoints up to 2×2 tiles
of 32 px), ``smolvlm`` and ``idefics3`` (32-px tiles, up to 2×2 split tiles + the global tile),
``qwen2_5_vl`` (dynamic resolution, 8 px per merged token, M-RoPE).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

# Closed vocabulary of the tiny tokenizer beyond the shapes benchmark words: chat roles and glue words.
BASE_WORDS = (
    "user", "assistant", "system", ":", ".", ",", "?", "!", "\n", "the", "a", "an", "is", "of", "in",
    "what", "which", "how", "many", "there", "image", "describe", "yes", "no", "and", "or", "to",
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
_SPLIT = re.compile(r"<[^<>\s]+>|\w+|[^\w\s]|\n")


def tokenizer_words() -> list[str]:
    """Every ordinary word of the tiny vocabulary: ``BASE_WORDS``, the shapes benchmark words and digits."""
    words = set(BASE_WORDS) | {str(d) for d in range(65)}  # run lengths of R-RLE rows up to 64 cells
    from .data.shapes import VOCAB_WORDS
    from .seg.refseg_data import ANSWER_PARTIAL, QUESTION_PARTIAL

    words |= set(VOCAB_WORDS)
    # Text4Seg answers: the reference templates, the background label, run syntax and <seg> tags.
    templates = " ".join(QUESTION_PARTIAL + ANSWER_PARTIAL).replace("[class_name]", " ")
    words |= {w.lower() for w in _SPLIT.findall(templates)} | {"others", "*", "|", "<seg>", "</seg>"}
    return sorted(words)


def build_tokenizer(extra_special: tuple[str, ...] = (), words: list[str] | None = None, **named_special):
    """A ``PreTrainedTokenizerFast`` (word level, closed vocabulary) built locally; no files, no network.

    ``extra_special`` are added as special tokens (image markers); ``named_special`` become tokenizer
    attributes such as ``image_token="<image>"`` (5.x ``extra_special_tokens``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    markers = list(dict.fromkeys([*extra_special, *named_special.values()]))
    vocab_list = [*SPECIAL_TOKENS, *markers, *(words if words is not None else tokenizer_words())]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()  # the vocabulary is lowercase; markers keep their case
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_SPLIT.pattern), behavior="isolated"),
    ])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=markers,
        extra_special_tokens=named_special or None,
        padding_side="left",
    )
    return tok


def _tiny_llama_text(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
    )


def _tiny_llava(seed: int, image_size: int = 32, patch: int = 8):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    tok = build_tokenizer(image_token="<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = _tiny_llama_text(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return model, processor


def _tiny_internvl(seed: int, image_size: int = 32, patch: int = 4):
    from transformers import (
        GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
        InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config,
    )

    tok = build_tokenizer(
        extra_special=("<video>",),
        start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=(image_size, image_size), patch_size=(patch, patch),
    )
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    seq_len = (image_size // patch) ** 2 // 4  # pixel shuffle 0.5 merges 2×2 patches
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq_len, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=seq_len,
    )
    return model, processor


def _tiny_llava_next(seed: int, image_size: int = 32, patch: int = 8):
    """LLaVA-NeXT: CLIP tiles of ``image_size`` px, AnyRes pinpoints up to 2×2 tiles, Llama decoder."""
    from transformers import (
        CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tokenizer(image_token="<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = _tiny_llama_text(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return model, processor


def _tiny_llava_onevision(seed: int, image_size: int = 32, patch: int = 8):
    """LLaVA-OneVision: SigLIP tiles (no CLS, strategy "full", feature layer -1), AnyRes, Qwen2 decoder."""
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig,
    )

    tok = build_tokenizer(image_token="<image>", video_token="<video>")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch,
    )
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": s, "width": s}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(s // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return model, processor

def _tiny_idefics3_like(model_type: str, seed: int, image_size: int = 32, patch: int = 4, scale: int = 2,
                        splits: int = 2):
    """SmolVLM / Idefics3: SigLIP-style tiles, pixel shuffle ``scale``, Llama decoder, images split into up to
    ``splits × splits`` tiles plus the global tile.

    Both use ``Idefics3Processor``: ``SmolVLMProcessor`` needs the ``num2words`` package (not installed here)
    and builds the same image prompt (row/col markers, ``<global-img>``) for images.
    """
    import transformers
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    names = {"smolvlm": ("SmolVLMConfig", "SmolVLMVisionConfig", "SmolVLMForConditionalGeneration"),
             "idefics3": ("Idefics3Config", "Idefics3VisionConfig", "Idefics3ForConditionalGeneration")}
    config_cls, vision_cls, model_cls = (getattr(transformers, n) for n in names[model_type])
    markers = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = build_tokenizer(
        extra_special=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *markers),
        image_token="<image>",
    )
    vision = vision_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch,
    )
    text = _tiny_llama_text(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    config = config_cls(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": splits * image_size}, max_image_size={"longest_edge": image_size},
        do_image_splitting=splits > 1,
    )
    seq_len = (image_size // patch) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len)
    return model, processor


def _tiny_smolvlm(seed: int, **sizes):
    return _tiny_idefics3_like("smolvlm", seed, **sizes)


def _tiny_idefics3(seed: int, **sizes):
    return _tiny_idefics3_like("idefics3", seed, **sizes)

def _tiny_qwen2_5_vl(seed: int, patch: int = 4, merge: int = 2):
    """Qwen2.5-VL: dynamic resolution (``patch·merge`` px per token, images of 16-64 px), windowed vision
    attention, M-RoPE decoder. Random 32×32 images give 4×4 = 16 tokens each."""
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_tokenizer(
        extra_special=("<|vision_start|>", "<|vision_end|>"),
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
    )
    ids = tok.convert_tokens_to_ids
    unit = patch * merge
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch, spatial_merge_size=merge,
        temporal_patch_size=2, window_size=2 * unit, out_hidden_size=64, fullatt_block_indexes=[1],
    )
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 4 * unit * unit, "longest_edge": 64 * unit * unit}  # min / max pixels
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2, size=size),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2, size=size),
    )
    return model, processor


_FACTORIES: dict[str, Callable] = {
    "llava": _tiny_llava, "internvl": _tiny_internvl, "llava_next": _tiny_llava_next,
    "llava_onevision": _tiny_llava_onevision, "smolvlm": _tiny_smolvlm, "idefics3": _tiny_idefics3,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
}


def tiny_families() -> list[str]:
    """Families ``tiny_vlm`` can build."""
    return sorted(_FACTORIES)


def tiny_vlm(family: str = "llava", seed: int = 0, **sizes):
    """Build ``(model, processor)`` of ``family`` with random weights seeded by ``seed`` (eval mode, fp32)."""
    if family not in _FACTORIES:
        raise ValueError(f"tiny_vlm has no family {family!r}; available: {tiny_families()}")
    return _FACTORIES[family](seed, **sizes)


def image_prompt(processor, question: str, n_images: int = 1) -> str:
    """A plain prompt with ``n_images`` image markers before ``question`` for the processor's family."""
    marker = getattr(processor, "image_token", "<image>")
    if hasattr(processor, "start_image_token"):  # InternVL: the processor expands <IMG_CONTEXT>
        marker = processor.image_token
    start = getattr(processor.tokenizer, "vision_start_token", None)
    if start is not None:  # Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>, the pad is expanded
        marker = start + processor.image_token + processor.tokenizer.vision_end_token
    return "user : " + " ".join([marker] * n_images) + " " + question + " assistant :"


def random_images(n: int, size: int = 32, seed: int = 0):
    """``n`` random RGB PIL images (deterministic by seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
