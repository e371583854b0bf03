"""Tiny models of the real ``transformers`` classes with a real processor, built offline in well under 2 s.

``tiny_vlm(family)`` returns ``(model, processor)``: random weights, small configs, and a word-level
tokenizer built locally with the ``tokenizers`` library over a closed vocabulary (the shapes benchmark
words plus the family's image markers). Tests and docs use it; nothing is downloaded.

Families: ``llava``, ``internvl``, ``llava_next`` and ``llava_onevision`` (AnyRes pinpoints up to 2×2 tiles
of 32 px), ``smolvlm`` and ``idefics3`` (32-px tiles, up to 2×2 split tiles + the global tile),
``qwen2_5_vl`` (dynamic resolution, 8 px per merged token, M-RoPE), ``llava_onevision1_5`` (the same dynamic
resolution, 1-D RoPE) and ``glm4v`` (the same, M-RoPE); ``gemma3`` (32-px SigLIP tiles, 16×16 patches pooled 4×4
into 16 tokens, sliding-window and global decoder layers, pan-and-scan crops on request); ``mistral3`` (Pixtral
tower, images of any size up to 64 px, 8 px per merged token, ``[IMG_BREAK]`` / ``[IMG_END]`` row ends);
``qwen2_vl`` (as ``qwen2_5_vl`` with Qwen2-VL's windowless tower) and ``qwen3_vl`` (the same layout, interleaved
M-RoPE, DeepStack after decoder layers 0 and 1 of 3).
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


def _tiny_llava_onevision1_5(seed: int, patch: int = 4, merge: int = 2):
    """LLaVA-OneVision-1.5: Qwen2-VL-style dynamic resolution (``patch·merge`` px per token, images of 16-64 px,
    ``temporal_patch_size=1`` as its Conv2d patch embedding needs), CLS token per image in the tower, Qwen3 decoder
    with 1-D RoPE. Random 32×32 images give 4×4 = 16 tokens each."""
    from transformers import (
        LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
    )
    from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor  # its auto processor class

    tok = build_tokenizer(
        extra_special=("<|vision_start|>", "<|vision_end|>"),
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
    )
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch, spatial_merge_size=merge,
                  out_hidden_size=64)
    text = dict(
        model_type="qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaOnevision15Config(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaOnevision15ForConditionalGeneration(config).eval()
    unit = patch * merge
    sizes = dict(patch_size=patch, merge_size=merge, temporal_patch_size=1,
                 size={"shortest_edge": 4 * unit * unit, "longest_edge": 64 * unit * unit})  # min / max pixels
    processor = Exaone4_5_Processor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**sizes))
    return model, processor


def _tiny_glm4v(seed: int, patch: int = 4, merge: int = 2):
    """GLM-4.1V: dynamic resolution (``patch·merge`` px per token, images of 16-64 px), learned position embedding
    of a 16-px grid resized per image, M-RoPE over half of each head (``partial_rotary_factor`` 0.5, as the
    checkpoint). Random 32×32 images give 4×4 = 16 tokens each. The tokenizer names ``<|begin_of_image|>`` /
    ``<|end_of_image|>`` ``vision_start_token`` / ``vision_end_token``, so ``image_prompt`` wraps each
    ``<|image|>`` in them as GLM's chat template does."""
    from transformers import (
        Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor,
    )

    tok = build_tokenizer(
        extra_special=("<|begin_of_video|>", "<|end_of_video|>"),
        image_token="<|image|>", video_token="<|video|>",
        vision_start_token="<|begin_of_image|>", vision_end_token="<|end_of_image|>",
    )
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2, out_hidden_size=64, image_size=4 * patch)
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "partial_rotary_factor": 0.5},  # head_dim 32 · 0.5 = 16 rotary dims = 2 · (2 + 3 + 3)
    )
    config = Glm4vConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).eval()
    unit = patch * merge
    # smart_resize counts the 2 temporal copies: min / max pixels are 2 × (4 … 64 tokens of unit² px)
    sizes = dict(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                 size={"shortest_edge": 2 * 4 * unit * unit, "longest_edge": 2 * 64 * unit * unit})
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(**sizes), tokenizer=tok,
                               video_processor=Glm4vVideoProcessor(**sizes))
    return model, processor


def _qwen_vl_tokenizer():
    """The tiny tokenizer of the Qwen-VL families: ``<|vision_start|><|image_pad|><|vision_end|>`` markers."""
    return build_tokenizer(
        extra_special=("<|vision_start|>", "<|vision_end|>"),
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
    )


def _qwen_vl_text(tok, **extra) -> dict:
    """Text config of the tiny Qwen-VL decoders (64 wide, head_dim 16: 8 rotary frequencies)."""
    return dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra,
    )


def _qwen_vl_sizes(patch: int, merge: int) -> dict:
    """Image / video processor sizes: ``patch·merge`` px per token, 4 to 64 tokens per image."""
    unit = patch * merge
    return dict(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                size={"shortest_edge": 4 * unit * unit, "longest_edge": 64 * unit * unit})  # min / max pixels


def _tiny_qwen2_vl(seed: int, patch: int = 4, merge: int = 2):
    """Qwen2-VL: as ``_tiny_qwen2_5_vl`` (dynamic resolution, 8 px per merged token, M-RoPE) with Qwen2-VL's tower:
    full attention in every block, LayerNorm + quick-GELU MLP, a LayerNorm + MLP merger (``embed_dim`` → the
    decoder's width)."""
    from transformers import (
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _qwen_vl_tokenizer()
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2)
    text = _qwen_vl_text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    sizes = _qwen_vl_sizes(patch, merge)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**sizes))
    return model, processor


def _tiny_qwen3_vl(seed: int, patch: int = 4, merge: int = 2, layers: int = 3, deepstack: tuple = (0, 1)):
    """Qwen3-VL: dynamic resolution (8 px per merged token), a learned 4×4 position grid interpolated to each
    image, DeepStack (the outputs of vision blocks ``deepstack``, through their own mergers, are added to the
    visual tokens after decoder layers 0, 1, …), Qwen3 decoder (q/k norms) of ``layers`` layers with interleaved
    M-RoPE (``mrope_section`` [4, 2, 2] of 8 frequencies: h at 1, 4; w at 2, 5; t elsewhere, as [24, 20, 20])."""
    from transformers import (
        Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _qwen_vl_tokenizer()
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=max(deepstack) + 2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack))
    text = _qwen_vl_text(tok, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    text["num_hidden_layers"] = layers
    config = Qwen3VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    sizes = _qwen_vl_sizes(patch, merge)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(**sizes))
    return model, processor


def _tiny_gemma3(seed: int, image_size: int = 32, patch: int = 2, tokens: int = 16, sliding_window: int = 24,
                 layer_types: tuple = ("sliding_attention", "sliding_attention", "full_attention")):
    """Gemma 3: SigLIP tiles of ``image_size`` px (no CLS), ``patch`` px patches average-pooled 4×4 into ``tokens``
    tokens (as the real 64×64 → 16×16), a Gemma 3 decoder whose local layers slide over ``sliding_window`` slots
    (shorter than the prompts, so the window matters) and a global last layer. ``Gemma3Processor`` wraps each tile's
    run in ``<start_of_image>`` / ``<end_of_image>`` and returns ``token_type_ids``; pan-and-scan needs
    ``do_pan_and_scan=True, pan_and_scan_min_crop_size=16`` at call time (the processor's defaults override the
    image processor's)."""
    from transformers import (
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = build_tokenizer(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")
    ids = tok.convert_tokens_to_ids
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=sliding_window, layer_types=list(layer_types), pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=tokens, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma 3 initialises its projection to zeros: every image would embed to 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens)
    return model, processor


def _tiny_mistral3(seed: int, patch: int = 4, merge: int = 2, longest_edge: int = 64):
    """Mistral 3: Pixtral tower (2-D RoPE, images of any size up to ``longest_edge`` px packed with a block mask),
    2×2 patch merger, Mistral decoder without sliding window (as Mistral-Small-3.1). ``patch·merge`` px per token;
    each image row of C ``[IMG]`` ends with ``[IMG_BREAK]``, the last with ``[IMG_END]``: a 32×32 image gives 4 rows
    of 4 + 1 = 20 tokens, 32×56 → 4 × (7 + 1), 60×30 → 64×32 → 8 × (4 + 1)."""
    from transformers import (
        Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralImageProcessor, PixtralProcessor,
        PixtralVisionConfig,
    )

    tok = build_tokenizer(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=longest_edge, patch_size=patch, hidden_act="silu")
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, sliding_window=None,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                            spatial_merge_size=merge, vision_feature_layer=-1, tie_word_embeddings=False)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": longest_edge}),
                                 tokenizer=tok, patch_size=patch, spatial_merge_size=merge)
    return model, processor


_FACTORIES: dict[str, Callable] = {
    "llava": _tiny_llava, "internvl": _tiny_internvl, "llava_next": _tiny_llava_next,
    "llava_onevision": _tiny_llava_onevision, "smolvlm": _tiny_smolvlm, "idefics3": _tiny_idefics3,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    "llava_onevision1_5": _tiny_llava_onevision1_5, "glm4v": _tiny_glm4v,
    "qwen2_vl": _tiny_qwen2_vl, "qwen3_vl": _tiny_qwen3_vl,
    "gemma3": _tiny_gemma3, "mistral3": _tiny_mistral3,
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
