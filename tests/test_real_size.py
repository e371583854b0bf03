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
import re
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
    batch = assemble(input_ids, mask, None, tokens, lambda ids: torch.zeros(*ids.shape, 1), fam.placeholder_id)
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


def test_qwen2_5_vl_real_size_refuses_fopru_and_1d_positions():
    model = build_meta("Qwen2.5-VL-3B-Instruct.json")
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    lacks = vlmkit.families.family_for(model).lacks
    for capability, config in (("patch_grid", FoPruConfig(keep_ratio=KEEP)), ("rope_1d", V2PEConfig(stride=64))):
        assert capability in config.requires
        with pytest.raises(ValueError, match=re.escape(lacks[capability])):
            vlmkit.wrap(model, config)


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
