"""Real-size checks without weights: every shipped ``configs/*.json`` built on the ``meta`` device.

Each model is wrapped with FoPru and V2PE (where the family supports them; a known limit must fail
with its documented error), the vision tower runs on meta tensors of the real tile size with FoPru's
hook recording, and the decoder runs a shape-only forward on the assembled (pruned) sequence. Facts
asserted are the published token counts (576 for LLaVA-1.5 at 336 px, AnyRes counts computed by hand
below, 256 per InternVL tile, 64 per SmolVLM tile, 256 for a 448-px Qwen2.5-VL image) and the layer FoPru
hooks (the feature layer of each checkpoint).

Meta tensors carry shapes only, so the data-dependent steps (FoPru's top-k on the recorded scores,
``assemble``) run on CPU tensors of the recorded shapes; the decoder runs with ``eager`` attention (SDPA's
mask shortcut reads mask values).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.compress.fopru import FoPruConfig
from vlmkit.compress.random import RandomPruneConfig
from vlmkit.position.v2pe import V2PEConfig
from vlmkit.sequence import assemble
from vlmkit.tokens import VisualTokens

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KEEP = 0.25


def build_meta(name: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    data = json.loads((CONFIGS / name).read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager").eval()
    return model


def on_cpu(tokens):
    """Uncompressed meta ``VisualTokens`` -> CPU stand-ins of the same length (embeds [N, 1])."""
    return [dataclasses.replace(t, embeds=torch.zeros(t.num_tokens, 1), index=torch.arange(t.num_tokens), frame=None)
            for t in tokens]


def decoder_forward(wrapped, input_ids, tokens):
    """Assemble on CPU, then run the wrapped decoder (stage contexts and positions) on meta embeddings."""
    fam = wrapped.family
    mask = torch.ones_like(input_ids)
    batch = assemble(input_ids, mask, None, tokens, lambda ids: torch.zeros(*ids.shape, 1), fam.placeholder_id,
                     run_mask=fam.image_run_mask(input_ids))
    D = fam.model.config.text_config.hidden_size
    with wrapped._language_context(batch):
        inputs = {k: v.to("meta") for k, v in wrapped._language_inputs(batch).items()}
        inputs["inputs_embeds"] = torch.empty(*batch.attention_mask.shape, D, device="meta")
        out = fam.model(**inputs)
    vocab = fam.model.config.text_config.vocab_size
    assert out.logits.shape == (*input_ids.shape[:1], batch.attention_mask.shape[1], vocab)
    return batch


def prompt(ph: int, runs: list[int], extra: list[int] | None = None) -> torch.Tensor:
    ids = [11, 12]
    for n in runs:
        ids += [13] + [ph] * n + [14]
    return torch.tensor([ids + (extra or [15, 16])])


def run_fopru(wrapped, tokens):
    """FoPru's compress on CPU scores of the recorded shape (families that lack a capability FoPru requires
    are refused at wrap(), see the Qwen2.5-VL test)."""
    fopru = wrapped.stages_of("compressor")[0]
    with fopru.vision_context(wrapped.family):
        fopru._records[:] = [torch.rand(shape) for shape in tokens.records]
        return fopru.compress(on_cpu(tokens))


class Encoded(list):
    """The images' ``VisualTokens`` plus ``records``: the shapes of the scores FoPru's hook recorded."""

    records: list


def encode_with_hook(wrapped, pixel_values, input_ids=None, **image_kwargs):
    """The family's encode on meta inside every stage's vision context; keeps FoPru's recorded shapes."""
    fam = wrapped.family
    fopru = [s for s in wrapped.stages if s.config.type == "fopru"]
    out = Encoded()
    if fopru:
        with fopru[0].vision_context(fam):
            out.extend(fam.encode_images(pixel_values, input_ids, **image_kwargs))
            out.records = [r.shape for r in fopru[0]._records]
    else:
        out.extend(fam.encode_images(pixel_values, input_ids, **image_kwargs))
        out.records = []
    return out


def test_llava_1_5_real_size():
    model = build_meta("llava-1.5-7b-hf.json")
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fopru, v2pe = wrapped.stages
    assert fopru.scored_layer == 22  # vision_feature_layer -2 of CLIP-L's 24 layers
    assert v2pe.tokens_per_tile == 576
    tokens = encode_with_hook(wrapped, torch.empty(2, 3, 336, 336, device="meta"))
    assert [t.num_uncompressed for t in tokens] == [576, 576]
    assert tokens.records == [torch.Size([2, 576])]
    assert tokens[0].embeds.shape == (576, 4096)
    kept = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in kept] == [144, 144]
    batch = decoder_forward(wrapped, prompt(32000, [576, 576]), kept)
    assert batch.visual_tokens_per_sample == [288]


@pytest.mark.parametrize("name, family, image, tiles, count, blocks", [
    # 672×672 on 336-px tiles: pinpoint 672×672 = 2×2 tiles + base; 576 + 48 rows × (48 + 1 newline)
    ("llava-v1.6-mistral-7b-hf.json", "llava_next", (672, 672), 5, 576 + 48 * 49, [(0, (24, 24)), (576, (48, 49))]),
    # 336×1008 (H×W): pinpoint 336×1008 = 1×3 tiles; 576 + 24 rows × (72 + 1)
    ("llava-v1.6-mistral-7b-hf.json", "llava_next", (336, 1008), 4, 576 + 24 * 73, [(0, (24, 24)), (576, (24, 73))]),
    # OneVision, 768×768 on 384-px SigLIP tiles (27×27 = 729 tokens, no CLS): 2×2 + base, no downsampling
    ("llava-onevision-qwen2-0.5b-ov-hf.json", "llava_onevision", (768, 768), 5, 729 + 54 * 55,
     [(0, (27, 27)), (729, (54, 55))]),
])
def test_anyres_real_size(name, family, image, tiles, count, blocks):
    model = build_meta(name)
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fopru, v2pe = wrapped.stages
    n_layers = len(wrapped.family.vision_layers)
    assert fopru.scored_layer == (n_layers - 2 if family == "llava_next" else n_layers - 1)
    side = model.config.vision_config.image_size
    per_tile = (side // model.config.vision_config.patch_size) ** 2
    assert v2pe.tokens_per_tile == per_tile
    pixel_values = torch.empty(1, tiles, 3, side, side, device="meta")
    tokens = encode_with_hook(wrapped, pixel_values, image_sizes=torch.tensor([image]))
    assert [t.num_uncompressed for t in tokens] == [count]
    assert tokens[0].blocks == blocks
    assert tokens.records == [torch.Size([tiles, per_tile])]  # the hook saw every tile at full size
    rows = blocks[1][1][0]  # one newline per stitched row: kept, not counted in the budget
    want = rows + math.floor((count - rows) * KEEP)
    kept = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in kept] == [want]
    assert int((kept[0].source == -1).sum()) == rows
    batch = decoder_forward(wrapped, prompt(model.config.image_token_id, [count]), kept)
    assert batch.visual_tokens_per_sample == [want]
    # The random baseline prunes AnyRes images (newlines kept) at real size.
    rnd = vlmkit.wrap(vlmkit.unwrap(wrapped), RandomPruneConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    pruned = rnd.stages[0].compress(on_cpu(tokens))
    assert [t.num_tokens for t in pruned] == [want]
    decoder_forward(rnd, prompt(model.config.image_token_id, [count]), pruned)


def test_internvl3_real_size():
    model = build_meta("InternVL3-1B-hf.json")
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fopru, v2pe = wrapped.stages
    assert fopru.scored_layer == 23 and v2pe.tokens_per_tile == 256  # 448/14 = 32², pixel shuffle 0.5 → 16²
    ph = model.config.image_token_id
    ids = prompt(ph, [2 * 256])  # one image of two tiles
    tokens = encode_with_hook(wrapped, torch.empty(2, 3, 448, 448, device="meta"), ids)
    assert [t.num_uncompressed for t in tokens] == [512]
    assert tokens.records == [torch.Size([2, 256])]
    kept = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in kept] == [128]
    decoder_forward(wrapped, ids, kept)


def test_smolvlm_real_size():
    model = build_meta("SmolVLM-256M-Instruct.json")
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fam = wrapped.family
    assert wrapped.stages[0].scored_layer == 11 and fam.tokens_per_tile == 64  # (512/16)² / 4²
    assert wrapped.stages[1].tokens_per_tile == 64
    # get_image_features drops all-zero tiles by boolean indexing and the tower's mask shortcut reads values
    # (no meta kernels): run the tower's parts and the connector as they do, for 2×2 split tiles + global.
    ph = model.config.image_token_id
    ids = [11, 90]
    for r in range(2):
        for c in range(2):
            ids += [90, 100 + 2 * r + c] + [ph] * 64
        ids += [91]
    ids += [91, 90, 99] + [ph] * 64 + [90, 15]
    ids = torch.tensor([ids])
    assert fam.tiles_per_image(ids, 5) == [5]
    fopru = wrapped.stages[0]
    with fopru.vision_context(fam):
        pixel_values = torch.empty(5, 3, 512, 512, device="meta")
        tower = fam.vision_tower  # its forward, for unpadded tiles (all-ones patch mask = no mask)
        hidden = tower.embeddings(pixel_values=pixel_values,
                                  patch_attention_mask=torch.ones(5, 32, 32, dtype=torch.bool, device="meta"))
        hidden = tower.post_layernorm(tower.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state)
        feats = model.model.connector(hidden)
        shapes = [r.shape for r in fopru._records]
    assert feats.shape == (5, 64, 576) and shapes == [torch.Size([5, 64])]
    tokens = Encoded([VisualTokens.full(feats.reshape(-1, 576), fam.grid, frames=5)])
    tokens.records = shapes
    kept = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in kept] == [80]
    decoder_forward(wrapped, ids, kept)


def test_qwen2_5_vl_real_size_fopru_scores_a_full_attention_layer():
    """The windowed tower: FoPru may only score a layer of ``fullatt_block_indexes`` (7, 15, 23, 31 on the 3B)."""
    model = build_meta("Qwen2.5-VL-3B-Instruct.json")
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert list(model.config.vision_config.fullatt_block_indexes) == [7, 15, 23, 31]
    fam = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64)).family
    assert fam.global_vision_layers == [7, 15, 23, 31]


def test_qwen2_5_vl_real_size_mrope():
    model = build_meta("Qwen2.5-VL-3B-Instruct.json")
    wrapped = vlmkit.wrap(model, RandomPruneConfig(keep_ratio=KEEP))
    fam = wrapped.family
    assert len(fam.vision_layers) == 32
    # A 448×448 image: 32×32 patches of 14 px, merged 2×2 → 16×16 = 256 tokens (grid_thw (1, 32, 32)).
    tokens = [VisualTokens.full(torch.zeros(256, 1), (16, 16))]
    pruned = wrapped.stages[0].compress(tokens)
    assert [t.num_tokens for t in pruned] == [64]
    ph = model.config.image_token_id
    ids = torch.tensor([[11, 12, 151652] + [ph] * 256 + [151653, 15, 16]])
    batch = decoder_forward(wrapped, ids, pruned)
    pos = fam.language_inputs(batch)["position_ids"]
    # text after the image resumes at L + max(h, w) = 3 + 16 whatever was pruned
    assert pos[1:, 0, -3].tolist() == [19, 19, 19]


# --- LLaVA-OneVision-1.5 and GLM-4.1V: dynamic resolution, the model's own tower on meta ------------------------
def dynamic_tokens(wrapped, grid_thw):
    """The model's own ``get_image_features`` (tower and merger) on meta patches of ``grid_thw`` [N, 3], inside the
    stages' vision contexts: one uncompressed ``VisualTokens`` per image (meta embeds [h·w, D]) plus FoPru's
    recorded shapes. The vision RoPE positions are precomputed on CPU and handed in as meta (``position_ids``: the
    tower builds them with ``.tolist()``, which meta tensors cannot do); GLM's learned position table, bicubically
    resized per image and *added* (same shape), is skipped: its sampling indices are data."""
    import contextlib

    from transformers.vision_utils import get_vision_position_ids

    model = wrapped.family.model
    vc = model.config.vision_config
    width = vc.in_channels * getattr(vc, "temporal_patch_size", 1) * vc.patch_size**2
    patches = int(grid_thw.prod(-1).sum())
    visual = model.model.visual
    if hasattr(visual, "embeddings"):
        visual.embeddings.forward = lambda embeddings, *args, **kwargs: embeddings
    positions = get_vision_position_ids(grid_thw, vc.spatial_merge_size).to("meta")
    fopru = [s for s in wrapped.stages if s.config.type == "fopru"]
    out = Encoded()
    with fopru[0].vision_context(wrapped.family) if fopru else contextlib.nullcontext():
        feats = model.model.get_image_features(torch.empty(patches, width, device="meta"), grid_thw,
                                               position_ids=positions).pooler_output
        out.records = [r.shape for r in fopru[0]._records] if fopru else []
    merge = vc.spatial_merge_size
    out.extend(VisualTokens.full(f, (h // merge, w // merge)) for f, (_, h, w) in zip(feats, grid_thw.tolist()))
    return out


def processor_grids(processor, sizes):
    """``image_grid_thw`` of the real image processor for random images of ``sizes`` (H, W)."""
    from PIL import Image

    images = [Image.new("RGB", (w, h)) for h, w in sizes]
    return processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()


def test_llava_onevision1_5_real_size():
    """448×448 → 16 · 28 px: grid (1, 32, 32) patches of 14 px, merged 2×2 → 256 tokens; 448×896 → (1, 32, 64) → 512
    (Qwen2VLImageProcessor with temporal_patch_size 1, the default pixel range). FoPru scores the last of the 24
    layers (all attend over a whole image), one score per merged token (CLS dropped); 1-D RoPE: V2PE applies, with
    δ = 64 / 1280 (tokens_per_tile: the largest image of the default max_pixels, 28·28·1280 px)."""
    from transformers import Qwen2VLImageProcessor

    model = build_meta("LLaVA-OneVision-1.5-8B-Instruct.json")
    assert processor_grids(Qwen2VLImageProcessor(temporal_patch_size=1), [(448, 448), (448, 896)]) == \
        [[1, 32, 32], [1, 32, 64]]
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fam, (fopru, v2pe) = wrapped.family, wrapped.stages
    assert len(fam.vision_layers) == 24 and fopru.scored_layer == 23
    assert fam.rope_kind == "1d" and v2pe.tokens_per_tile == 1280
    tokens = dynamic_tokens(wrapped, torch.tensor([[1, 32, 32], [1, 32, 64]]))
    assert [tuple(t.embeds.shape) for t in tokens] == [(256, 4096), (512, 4096)]
    assert tokens.records == [torch.Size([768])]  # both images in one tower call
    pruned = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in pruned] == [64, 128]
    ph = model.config.image_token_id
    batch = decoder_forward(wrapped, prompt(ph, [256, 512]), pruned)
    assert batch.visual_tokens_per_sample == [192]


def test_glm4v_real_size():
    """Glm4vImageProcessor (defaults): 448×448 → grid (1, 32, 32) → 256 tokens, 448×896 → (1, 32, 64) → 512. M-RoPE on
    half of each 128-wide head: 2 · (8 + 12 + 12) = 64 rotary dims. FoPru would score the last of the 24 layers (no
    windows); the text after each image resumes at L + max(h, w) whatever was pruned."""
    from transformers import Glm4vImageProcessor

    model = build_meta("GLM-4.1V-9B-Thinking.json")
    assert processor_grids(Glm4vImageProcessor(), [(448, 448), (448, 896)]) == [[1, 32, 32], [1, 32, 64]]
    fopru = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP))
    assert fopru.family.global_vision_layers == list(range(24)) and fopru.stages[0].scored_layer == 23
    # the shared Qwen attention groups read token indices (.min()), which meta tensors do not hold: random pruning
    wrapped = vlmkit.wrap(vlmkit.unwrap(fopru), RandomPruneConfig(keep_ratio=KEEP))
    fam = wrapped.family
    assert fam.rope_kind == "mrope" and fam.rotary_embedding.inv_freq.shape == (32,)
    tokens = dynamic_tokens(wrapped, torch.tensor([[1, 32, 32], [1, 32, 64]]))
    assert [tuple(t.embeds.shape) for t in tokens] == [(256, 4096), (512, 4096)]
    pruned = wrapped.stages[0].compress(on_cpu(tokens))
    assert [t.num_tokens for t in pruned] == [64, 128]
    ph, boi, eoi = model.config.image_token_id, model.config.image_start_token_id, model.config.image_end_token_id
    ids = torch.tensor([[11, 12, boi] + [ph] * 256 + [eoi, boi] + [ph] * 512 + [eoi, 15, 16]])
    batch = decoder_forward(wrapped, ids, pruned)
    pos = fam.language_inputs(batch)["position_ids"]
    # image 1 at L = 3 spans max(16, 16): eoi, boi at 19, 20; image 2 at L = 21 spans max(16, 32): eoi, 15, 16 at 53-55
    assert pos[1:, 0, -3:].tolist() == [[53, 54, 55]] * 3
    assert batch.visual_tokens_per_sample == [192]


# --- Qwen2-VL and Qwen3-VL ------------------------------------------------------------------------------------
def test_qwen2_vl_real_size():
    """Qwen2VLImageProcessor (patch 14, merge 2): 448×448 → grid (1, 32, 32) → (448/28)² = 256 tokens; 448×896 →
    (1, 32, 64) → 512. The tower attends globally in each of its 32 blocks (FoPru scores the last); it is embed_dim
    1280 wide and its merger maps to the decoder's 1536; the text after each image resumes at L + max(h, w)."""
    from transformers import Qwen2VLImageProcessor

    model = build_meta("Qwen2-VL-2B-Instruct.json")
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert processor_grids(Qwen2VLImageProcessor(), [(448, 448), (448, 896)]) == [[1, 32, 32], [1, 32, 64]]
    fopru = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP))
    fam = fopru.family
    assert fam.global_vision_layers == list(range(32)) and fopru.stages[0].scored_layer == 31
    assert (fam.vision_width, fam.text_width) == (1280, 1536)
    wrapped = vlmkit.wrap(vlmkit.unwrap(fopru), RandomPruneConfig(keep_ratio=KEEP))
    tokens = dynamic_tokens(wrapped, torch.tensor([[1, 32, 32], [1, 32, 64]]))
    assert [tuple(t.embeds.shape) for t in tokens] == [(256, 1536), (512, 1536)]
    pruned = wrapped.stages[0].compress(on_cpu(tokens))
    assert [t.num_tokens for t in pruned] == [64, 128]
    ph, vs, ve = model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id
    ids = torch.tensor([[11, 12, vs] + [ph] * 256 + [ve, vs] + [ph] * 512 + [ve, 15, 16]])
    batch = decoder_forward(wrapped, ids, pruned)
    pos = wrapped.family.language_inputs(batch)["position_ids"]
    # image 1 at L = 3 spans max(16, 16): ve, vs at 19, 20; image 2 at L = 21 spans max(16, 32): ve, 15, 16 at 53-55
    assert pos[1:, 0, -3:].tolist() == [[53, 54, 55]] * 3
    assert batch.visual_tokens_per_sample == [192]


def test_qwen3_vl_real_size():
    """Qwen3-VL: patch 16 × merge 2 = 32 px per token: 448×448 → grid (1, 28, 28) → 14² = 196 tokens; 512×1024 →
    (1, 32, 64) → 16 · 32 = 512. The tower (24 blocks, all global: FoPru scores the last) gives each token 3 DeepStack
    features (blocks 5, 11, 17) besides its embedding; random pruning keeps them for the kept tokens, and the decoder
    (interleaved M-RoPE over the 64 frequencies of a 128-wide head) runs with them on meta; the text after each
    image resumes at L + max(h, w)."""
    from transformers import Qwen2VLImageProcessor
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    from vlmkit.families.qwen3_vl import DeepstackTokens

    model = build_meta("Qwen3-VL-2B-Instruct.json")
    vc = model.config.vision_config
    assert processor_grids(Qwen2VLImageProcessor(patch_size=16), [(448, 448), (512, 1024)]) == [[1, 28, 28], [1, 32, 64]]
    fopru = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP))
    assert fopru.family.global_vision_layers == list(range(24)) and fopru.stages[0].scored_layer == 23
    wrapped = vlmkit.wrap(vlmkit.unwrap(fopru), RandomPruneConfig(keep_ratio=KEEP))
    fam = wrapped.family
    assert fam.deepstack_layers == 3 and fam.rope_kind == "mrope" and fam.rotary_embedding.inv_freq.shape == (64,)
    # The model's own tower and mergers on meta; the data-dependent inputs (vision RoPE positions, the sampling of
    # the learned 48×48 position table) precomputed on CPU as the tower would, handed in as meta.
    grid = torch.tensor([[1, 28, 28], [1, 32, 64]])
    index, weight = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=48, mode="bilinear",
                                                                 align_corners=True, spatial_merge_size=2)
    patches = int(grid.prod(-1).sum())
    out = model.model.get_image_features(
        torch.empty(patches, 3 * 2 * 16 * 16, device="meta"), grid, position_ids=get_vision_position_ids(grid, 2).to("meta"),
        interp_indices=index.to("meta"), interp_weights=weight.to("meta"))
    assert [tuple(f.shape) for f in out.pooler_output] == [(196, 2048), (512, 2048)]
    assert [[tuple(f.shape) for f in layer] for layer in out.deepstack_features] == [[(196, 2048), (512, 2048)]] * 3
    assert list(vc.deepstack_visual_indexes) == [5, 11, 17]
    tokens = [DeepstackTokens(embeds=torch.zeros(n, 1), index=torch.arange(n), grid=(h // 2, w // 2),
                              deepstack=torch.stack([layer[i] for layer in out.deepstack_features]))
              for i, (n, (_, h, w)) in enumerate(zip((196, 512), grid.tolist()))]
    pruned = wrapped.stages[0].compress(tokens)
    assert [(t.num_tokens, tuple(t.deepstack.shape)) for t in pruned] == [(49, (3, 49, 2048)), (128, (3, 128, 2048))]
    ph, vs, ve = model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id
    ids = torch.tensor([[11, 12, vs] + [ph] * 196 + [ve, vs] + [ph] * 512 + [ve, 15, 16]])
    batch = decoder_forward(wrapped, ids, pruned)
    pos = fam.language_inputs(batch)["position_ids"]
    # image 1 at L = 3 spans max(14, 14): ve, vs at 17, 18; image 2 at L = 19 spans max(16, 32): ve, 15, 16 at 51-53
    assert pos[1:, 0, -3:].tolist() == [[51, 52, 53]] * 3
    assert batch.visual_tokens_per_sample == [177]


# --- Mistral 3 (Mistral-Small-3.1): Pixtral tower, [IMG_BREAK] / [IMG_END] row ends ----------------------------------
def test_mistral3_real_size():
    """Mistral-Small-3.1: Pixtral patches of 14 px merged 2×2, so 28 px per token; the processor fits the longest side
    into 1540 px and rounds each side up to a multiple of 28 px. A run is R rows of C ``[IMG]`` + one break / end token.

    - 3080×1540 (H×W): scaled by 1540/3080 = 1/2 to 1540×770, rounded up to 1540×784 → R = 1540/28 = 55,
      C = 784/28 = 28: 55 × (28 + 1) = 1595 tokens (1540 ``[IMG]``, 54 ``[IMG_BREAK]``, 1 ``[IMG_END]``).
    - 560×840: fits, multiples of 28 already → R = 20, C = 30: 20 × (30 + 1) = 620 tokens (600 ``[IMG]``).

    FoPru scores the last of the 24 Pixtral layers (``vision_feature_layer`` -1), one attention block per image
    (55·28·4 and 20·30·4 patches), 1540 + 600 merged-token scores; keep 0.25: 55 + 385 and 20 + 150 tokens (break /
    end tokens kept, not counted). The tower and projector run on meta as ``get_image_features`` runs them (its
    split sizes need ``.tolist()``, which meta tensors cannot do)."""
    from PIL import Image
    from transformers import PixtralImageProcessor

    model = build_meta("Mistral-Small-3.1-24B-Instruct-2503.json")
    processed = PixtralImageProcessor(size={"longest_edge": 1540}, patch_size={"height": 28, "width": 28})(
        images=[Image.new("RGB", (1540, 3080)), Image.new("RGB", (840, 560))], return_tensors="pt")
    sizes = processed["image_sizes"]
    assert sizes.tolist() == [[1540, 784], [560, 840]]
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fam, (fopru, v2pe) = wrapped.family, wrapped.stages
    assert fam.rope_kind == "1d" and model.config.text_config.sliding_window is None
    assert fopru.scored_layer == 23 and v2pe.tokens_per_tile == 55 * 55  # the largest image: 1540 px a side
    assert fam.token_grids(sizes) == [(55, 28), (20, 30)]
    img, brk, end = 10, 12, 13  # [IMG], [IMG_BREAK], [IMG_END] of the Tekken tokenizer
    run = lambda R, C: ([img] * C + [brk]) * (R - 1) + [img] * C + [end]  # noqa: E731 - the processor's run
    ids = torch.tensor([[1, 3] + run(55, 28) + run(20, 30) + [1086, 4]])
    assert model.config.image_token_id == img and int((ids == img).sum()) == 1540 + 600
    with torch.no_grad(), fopru.vision_context(fam):
        pixel_values = torch.empty(*processed["pixel_values"].shape, device="meta")
        hidden = fam.vision_tower(pixel_values, image_sizes=sizes, output_hidden_states=True).hidden_states[-1]
        feats = model.model.multi_modal_projector(hidden.squeeze(0), sizes)
        records = [r.shape for r in fopru._records]
    assert hidden.shape == (1, 55 * 28 * 4 + 20 * 30 * 4, 1024) and feats.shape == (2140, 5120)
    assert records == [torch.Size([2140])]
    tokens = Encoded(fam.image_tokens(list(feats.split([1540, 600])), sizes, ids))
    tokens.records = records
    # the break / end map stays on CPU (embeds are meta)
    assert [(t.num_uncompressed, t.grid, int((t.source == -1).sum())) for t in tokens] == [(1595, (55, 29), 55),
                                                                                           (620, (20, 31), 20)]
    assert int(fam.image_run_mask(ids).sum()) == 1595 + 620
    kept = run_fopru(wrapped, tokens)
    assert [(t.num_tokens, int(t.is_newline.sum())) for t in kept] == [(55 + 385, 55), (20 + 150, 20)]
    batch = decoder_forward(wrapped, ids, kept)
    assert batch.visual_tokens_per_sample == [440 + 170]


# --- Gemma 3 ------------------------------------------------------------------------------------------------
def test_gemma3_real_size():
    """gemma-3-4b-it: 896-px SigLIP tiles of 64×64 patches (14 px, no CLS), average-pooled 4×4 → 16×16 = 256 tokens
    per tile; the real processor (default sizes, pan-and-scan on) cuts an 896×1792 image into 2 crops: 3 runs of 256.
    FoPru scores the last of the 27 layers (the feature layer) and sums each token's 4×4 patches: records [tiles, 256];
    the decoder (29 of 34 layers sliding over 1024 slots) runs the pruned sequence with its bidirectional blocks."""
    import itertools

    from PIL import Image
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    from vlmkit.testing import build_tokenizer

    model = build_meta("gemma-3-4b-it.json")
    text = model.config.text_config
    assert text.layer_types.count("sliding_attention") == 29 and text.sliding_window == 1024
    tok = build_tokenizer(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}), tokenizer=tok)
    out = processor(images=[[Image.new("RGB", (1792, 896))]], text=["<start_of_image>"], do_pan_and_scan=True,
                    return_tensors="pt")
    runs = [len(list(g)) for k, g in itertools.groupby(out["token_type_ids"][0].tolist()) if k == 1]
    assert tuple(out["pixel_values"].shape) == (3, 3, 896, 896) and runs == [256] * 3
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=KEEP), V2PEConfig(stride=64))
    fam, (fopru, v2pe) = wrapped.family, wrapped.stages
    assert fam.patch_pooling("test") == ((64, 64), 4) and fam.tokens_per_tile == 256
    assert fopru.scored_layer == 26 and v2pe.tokens_per_tile == 256
    tokens = encode_with_hook(wrapped, torch.empty(3, 3, 896, 896, device="meta"), num_crops=torch.tensor([2]))
    assert [t.num_uncompressed for t in tokens] == [768] and tokens[0].embeds.shape == (768, 2560)
    assert tokens.records == [torch.Size([3, 256])]
    kept = run_fopru(wrapped, tokens)
    assert [t.num_tokens for t in kept] == [192]
    batch = decoder_forward(wrapped, prompt(model.config.image_token_id, [256, 256, 256]), kept)
    assert batch.visual_tokens_per_sample == [192]
