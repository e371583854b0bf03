"""Family adapters (LLaVA-NeXT, LLaVA-OneVision, SmolVLM/Idefics3, Qwen2.5-VL) and the compatibility matrix.

The matrix (``vlmkit.compat``) has one row per tiny family and one column per registered stage; its cells
check identity bit-exactness against the unwrapped model, batch-N == batch-1 for ``forward(labels)`` and
``generate``, and the pruning budget. A cell is unsupported exactly where the family lacks a capability the
stage ``requires`` (``wrap()`` refusing, the family's ``lacks`` text the reason). The layout tests compare the
adapters' ``VisualTokens`` against facts worked out by hand from the models' packing rules.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import _pruner_example  # noqa: F401  (registers the test-only pruner "test_largest_norm")
import pytest
import torch
from _pruner_example import LargestNormConfig
from test_stage_contract import EXPECTED_FAILURES

import vlmkit
from vlmkit import compat
from vlmkit.compat import make_batch
from vlmkit.families import family_for, supported_families
from vlmkit.testing import tiny_families, tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def tiny(family):
    return tiny_vlm(family, seed=0)


# --- the matrix -------------------------------------------------------------------------------------
#: every built-in stage plus the test-only pruner (a stage registered outside vlmkit gets its column too)
MATRIX_COLUMNS = compat.matrix_columns([*compat.builtin_configs(), LargestNormConfig])


def expected_status(family: str, column) -> tuple[str, str]:
    """(status, detail) a cell must have: unsupported (reason: the family's lacks text) where the family lacks
    a capability the stage requires; fail where the conformance battery expects the stage's batch check to
    fail on this family (``test_stage_contract.EXPECTED_FAILURES``, with the reason); pass otherwise."""
    adapter = family_for(tiny(family)[0])
    missing = compat.missing_capabilities(adapter, column)
    if missing:
        return "unsupported", "; ".join(compat.unsupported_reason(adapter, m) for m in missing)
    why = column.config_class is not None and EXPECTED_FAILURES.get((column.config_class.type, family, "batch"))
    return ("fail", why) if why else ("pass", "")


@pytest.mark.parametrize("family", tiny_families())
def test_matrix_row(family):
    """Every cell of the row runs and ends as ``expected_status`` says."""
    results = compat.run_matrix([family], MATRIX_COLUMNS)
    got = {r.cell: (r.status, r.detail if r.status == "unsupported" else "") for r in results}
    want = {c.key: expected_status(family, c) for c in MATRIX_COLUMNS}
    want = {k: (status, detail if status == "unsupported" else "") for k, (status, detail) in want.items()}
    failures = {r.cell: r.detail for r in results if r.status == "fail" and want[r.cell][0] != "fail"}
    assert got == want, failures


def test_matrix_columns_and_rows_come_from_the_registry():
    """Rows: the tiny families; columns: identity and every registered stage (FoPru per strategy, pruners at
    keep_ratio 0.5, titles from the config class); compat.py names no family."""
    from vlmkit.config import registered_configs

    assert compat.matrix_families() == tiny_families()
    columns = compat.matrix_columns()
    keys = [c.key for c in columns]
    assert keys[0] == "identity" and len(set(keys)) == len(keys)
    assert {c.config_class for c in columns[1:]} == set(registered_configs())
    assert {"fopru_rank", "fopru_row", "random", "v2pe", "mousi_position", "text4seg"} <= set(keys)
    titles = {c.key: c.title for c in columns}
    assert titles["fopru_rank"] == "FoPru rank" and titles["fopru_row"] == "FoPru row" and titles["v2pe"] == "V2PE"
    for c in columns[1:]:
        if c.config_class.pruner:
            assert c.config.keep_ratio == 0.5 and getattr(c.config, "num_keep", None) is None, c
    tree = ast.parse((ROOT / "vlmkit" / "compat.py").read_text())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & set(supported_families())


def test_example_pruner_is_a_matrix_column():
    """Importing ``_pruner_example`` (one file, one ``@register_stage`` line) is all it takes for a column."""
    columns = {c.key: c for c in compat.matrix_columns()}
    assert columns["test_largest_norm"].title == "LargestNorm"
    assert columns["test_largest_norm"].config == LargestNormConfig(keep_ratio=0.5)
    assert "test_largest_norm" not in {c.key for c in compat.matrix_columns(compat.builtin_configs())}


def test_matrix_markdown_marks_and_explains_unsupported_cells():
    results = [compat.CellResult("llava", "identity", "pass", ""),
               compat.CellResult("qwen2_5_vl", "identity", "pass", ""),
               compat.CellResult("llava", "v2pe", "pass", "", "V2PE"),
               compat.CellResult("qwen2_5_vl", "v2pe", "unsupported", "lacks `rope_1d`: M-RoPE", "V2PE")]
    text = compat.to_markdown(results)
    assert "| family | identity | V2PE |" in text
    assert "| qwen2_5_vl | ✅ | ❌ (1) |" in text
    assert "1. lacks `rope_1d`: M-RoPE" in text


def _expected_doc_table() -> str:
    """The table ``scripts/compat_matrix.py`` writes, as ``expected_status`` (checked by test_matrix_row on real
    runs) implies it, for the built-in stages."""
    columns = compat.matrix_columns(compat.builtin_configs())
    return compat.to_markdown([
        compat.CellResult(f, c.key, *expected_status(f, c), c.title) for f in tiny_families() for c in columns
    ]).rstrip("\n")


def test_doc_shows_the_matrix_the_tests_establish():
    assert _expected_doc_table() in (ROOT / "docs" / "compat_matrix.md").read_text(), \
        "docs/compat_matrix.md: regenerate with python scripts/compat_matrix.py"


def test_readme_shows_the_matrix_the_tests_establish():
    assert _expected_doc_table() in (ROOT / "README.md").read_text(), \
        "README.md: paste the table of docs/compat_matrix.md (python scripts/compat_matrix.py)"


# --- unsupported checkpoints fail at wrap() with the list of families ---------------------------------
class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


class _OldStyleLlava(torch.nn.Module):
    """What ``liuhaotian/llava-v1.5-7b`` (``LlavaLlamaForCausalLM``, model_type ``llava_llama``) loads as."""

    def __init__(self, model_type="llava_llama"):
        super().__init__()
        self.config = _Config(model_type)


@pytest.mark.parametrize("model_type", ["llava_llama", "qwen2_audio", None])
def test_unknown_or_old_checkpoint_fails_at_wrap_with_supported_families(model_type):
    with pytest.raises(ValueError) as err:
        vlmkit.wrap(_OldStyleLlava(model_type))
    message = str(err.value)
    assert repr(model_type) in message
    for family in ("llava", "llava_next", "llava_onevision", "smolvlm", "idefics3", "internvl", "qwen2_5_vl"):
        assert repr(family) in message
    assert supported_families() == sorted(supported_families())


def test_known_model_type_on_an_unexpected_class_fails_at_wrap():
    with pytest.raises(ValueError, match=r"'llava_next' family wraps \['LlavaNextForConditionalGeneration'\]"):
        vlmkit.wrap(_OldStyleLlava("llava_next"))


# --- LLaVA-NeXT / OneVision layout ----------------------------------------------------------------------
def _expected_sources(grid_hw, tiles_hw, crop_cols=0, crop_rows=0):
    """Hand-computed AnyRes run: base tile cells, then each row's kept columns (source = tile·hw + cell), -1."""
    h, w = grid_hw
    nph, npw = tiles_hw
    out = list(range(h * w))
    for r in range(crop_rows, nph * h - crop_rows):
        for c in range(crop_cols, npw * w - crop_cols):
            tile = 1 + (r // h) * npw + c // w
            out.append(tile * h * w + (r % h) * w + c % w)
        out.append(-1)
    return out


@pytest.mark.parametrize("size, tiles, crop_cols", [((32, 56), (1, 2), 0), ((32, 40), (1, 2), 1), ((60, 30), (2, 1), 0)])
def test_llava_next_anyres_layout_by_hand(size, tiles, crop_cols):
    """32×40 is scaled into the 32×64 pinpoint as 32×40 → 4×5 patches, centred: column 0 and 7 are cropped."""
    import numpy as np
    from PIL import Image

    from vlmkit.testing import image_prompt

    model, processor = tiny("llava_next")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    batch = processor(images=[[image]], text=[image_prompt(processor, "what is the image ?")], return_tensors="pt")
    fam = family_for(model)
    (tokens,) = fam.encode_images(batch["pixel_values"], batch["input_ids"], image_sizes=batch["image_sizes"])
    expected = _expected_sources((4, 4), tiles, crop_cols=crop_cols)
    (sources,) = fam.token_sources(batch["image_sizes"])
    assert sources.tolist() == expected
    assert tokens.num_uncompressed == len(expected) == int((batch["input_ids"] == fam.placeholder_id).sum())
    rows = tiles[0] * 4
    cols = tiles[1] * 4 - 2 * crop_cols
    assert tokens.blocks == [(0, (4, 4)), (16, (rows, cols + 1))]
    newline = torch.tensor(expected) == -1
    assert torch.equal(tokens.frame == -1, newline)
    # the newline slots hold the model's learned image_newline; the others the tower features by source
    assert torch.equal(tokens.embeds[newline], model.model.image_newline.detach().expand(int(newline.sum()), -1))
    with torch.no_grad():
        out = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
        vision = model.model.vision_tower(batch["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
        per_tile = model.model.multi_modal_projector(vision).reshape(-1, model.config.text_config.hidden_size)
    assert torch.equal(tokens.embeds, out.pooler_output[0])
    src = torch.tensor(expected)
    assert torch.allclose(tokens.embeds[src >= 0], per_tile[src[src >= 0]], atol=1e-6)


def test_llava_onevision_multi_image_sample_is_base_tile_plus_one_newline():
    model, processor = tiny("llava_onevision")
    batch = make_batch(processor, [1], "left")  # sample 1: two images → no AnyRes tiles
    wrapped = vlmkit.wrap(model)
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"], image_sizes=batch["image_sizes"],
                                   batch_num_images=batch["batch_num_images"])
    assert [t.num_uncompressed for t in tokens] == [17, 17]
    for t in tokens:
        assert t.blocks == [(0, (4, 4)), (16, (1, 1))]
        assert t.frame.tolist() == [0] * 16 + [-1]
        assert torch.equal(t.embeds[-1], model.model.image_newline.detach())


def test_anyres_pruning_keeps_newlines_and_mousi_rows_follow_blocks():
    """Random pruning keeps every newline and half the grid tokens; MouSi 'row' gives a newline its row."""
    from vlmkit.compress.random import RandomPruneConfig
    from vlmkit.position.mousi import MouSiPositionConfig

    model, processor = tiny("llava_next")
    batch = make_batch(processor, [0], "left")  # one 32×32 image: 16 base + 4 rows × (4 + 1)
    wrapped = vlmkit.wrap(model, RandomPruneConfig(keep_ratio=0.5), MouSiPositionConfig(mode="row"))
    assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 image_sizes=batch["image_sizes"])
    assert assembled.visual_tokens_per_sample == [4 + 16]  # 4 newlines + floor(32 grid tokens / 2)
    pos = wrapped.stages[1].rope_positions(assembled)[0]
    vis = assembled.visual_mask[0]
    idx = assembled.visual_index[0][vis]
    assert set(range(20, 36, 5)) <= set(idx.tolist())  # the newlines: run positions 16 + 5r + 4
    first = int(torch.nonzero(vis)[0])
    L = pos[first - 1]  # the token before the image
    row = torch.where(idx < 16, idx // 4, 4 + (idx - 16) // 5)  # base rows 0-3, AnyRes rows 4-7
    assert torch.equal(pos[vis], L + 1 + row.double())
    assert pos[vis.nonzero()[-1] + 1] == L + 8 + 1  # text resumes after 4 + 4 rows


def _anyres_fopru(strategy, keep_ratio=0.5):
    """FoPru on one 32×40 LLaVA-NeXT image (1×2 tiles, stitched columns 0 and 7 cropped) with the recorded
    scores replaced by ``score(tower token) = tower token index`` so the expected selection is plain.

    Returns (kept VisualTokens, tower token of each run position or -1, found by embedding equality)."""
    import numpy as np
    from PIL import Image

    from vlmkit.compress.fopru import FoPruConfig
    from vlmkit.testing import image_prompt

    model, processor = tiny("llava_next")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    batch = processor(images=[[image]], text=[image_prompt(processor, "what is the image ?")], return_tensors="pt")
    wrapped = vlmkit.wrap(model, FoPruConfig(keep_ratio=keep_ratio, strategy=strategy))
    fopru = wrapped.stages[0]
    with torch.no_grad(), fopru.vision_context(wrapped.family):
        (tokens,) = wrapped.family.encode_images(batch["pixel_values"], image_sizes=batch["image_sizes"])
        assert [r.shape for r in fopru._records] == [torch.Size([3, 16])]  # base + 2 tiles of 4×4
        fopru._records[:] = [torch.arange(48, dtype=torch.float32).reshape(3, 16)]
        (kept,) = fopru.compress([tokens])
    with torch.no_grad():
        vision = model.model.vision_tower(batch["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
        per_tile = model.model.multi_modal_projector(vision).reshape(48, -1)
    tower = []
    for e in tokens.embeds:
        match = torch.nonzero((per_tile - e).abs().amax(-1) < 1e-6).flatten().tolist()
        tower.append(match[0] if match else -1)
        assert len(match) <= 1
    vlmkit.unwrap(wrapped)
    return kept, torch.tensor(tower)


def test_fopru_anyres_rank_gathers_tile_scores_and_keeps_newlines():
    kept, tower = _anyres_fopru("rank")
    # run: 16 base tokens (tower 0-15), then 4 rows × (6 grid + newline); 40 grid tokens, 4 newlines
    assert tower.numel() == 16 + 4 * 7 and int((tower == -1).sum()) == 4
    grid = torch.nonzero(tower >= 0).flatten()
    best = grid[torch.argsort(tower[grid], descending=True)[:20]]  # scores = tower index: the 20 largest
    expected = torch.cat([best, torch.nonzero(tower == -1).flatten()]).sort().values
    assert kept.index.tolist() == expected.tolist()
    assert kept.num_tokens == 4 + 20
    assert torch.equal(kept.scores[grid], tower[grid].float()) and bool(kept.scores[tower == -1].isnan().all())


def test_fopru_anyres_row_takes_rows_of_the_stitched_grid():
    """Rows: base rows of 4 (mean tower index 1.5 .. 13.5), stitched rows of 6 grid tokens: row r holds
    tile 1 cols 1-3 and tile 2 cols 0-2 of patch row r, mean (16+4r+2 + 32+4r+1) / 2 = 25.5 + 4r. Keep 20 of 40:
    stitched rows 3, 2, 1 whole (18 tokens), then the 2 best of stitched row 0 (tower 34 and 33)."""
    kept, tower = _anyres_fopru("row")
    stitched = lambda r: [16 + 7 * r + c for c in range(6)]  # noqa: E731 - run positions of stitched row r
    expected = sorted(stitched(3) + stitched(2) + stitched(1) + [16 + 7 * r + 6 for r in range(4)]
                      + [p for p in stitched(0) if int(tower[p]) in (33, 34)])
    assert kept.index.tolist() == expected
    assert tower[torch.tensor(stitched(0))].tolist() == [17, 18, 19, 32, 33, 34]


def test_onevision_downsampled_grid_sources_are_nearest_patches():
    """anyres_max_1 on a 2×2-tile image: the 8×8 stitched grid is bilinearly resized to 4×4, sample point of
    output i at input 2i + 0.5, so the nearest patch (ties to top / left) is 2i; token_sources says -2."""
    model, _ = tiny_vlm("llava_onevision", seed=0)
    model.config.vision_aspect_ratio = "anyres_max_1"
    fam = family_for(model)
    sizes = torch.tensor([[64, 64]])
    (mixed,) = fam.token_sources(sizes)
    (src,), (tiles,) = fam._sources(sizes, {}, nearest=True)
    assert tiles == 5 and src.numel() == 16 + 4 * 5
    assert mixed[:16].tolist() == list(range(16)) and mixed[16:].tolist() == ([-2] * 4 + [-1]) * 4
    expected = list(range(16))
    for i in range(4):
        for j in range(4):
            r, c = 2 * i, 2 * j
            expected.append((1 + (r // 4) * 2 + c // 4) * 16 + (r % 4) * 4 + c % 4)
        expected.append(-1)
    assert src.tolist() == expected


# --- SmolVLM / Idefics3 -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
def test_smolvlm_groups_tiles_into_images(family):
    """32×32 → 64×64: 2×2 tiles + global = 5; 32×56 → 64×64: 5; 60×30 → 64×32: 2×1 + global = 3."""
    model, processor = tiny(family)
    batch = make_batch(processor, [0, 1], "left")
    fam = family_for(model)
    assert fam.tiles_per_image(batch["input_ids"], 13) == [5, 5, 3]
    tokens = fam.encode_images(batch["pixel_values"], batch["input_ids"],
                               pixel_attention_mask=batch["pixel_attention_mask"])
    assert [t.num_uncompressed for t in tokens] == [80, 80, 48]
    assert tokens[2].frame.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    assert torch.equal(torch.cat([t.embeds for t in tokens]), torch.cat(list(ref)))


# --- Qwen2.5-VL -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["visionzip", "vispruner"])
def test_qwen_refuses_cls_row_pruners_at_wrap_with_the_models_reason(config):
    """FoPru and the position schemes run on Qwen (tests/test_qwen_stages.py); the CLS-row pruners cannot, and the
    refusal gives the model's reasons (no fixed tile whose patch grid they split; no CLS token)."""
    from vlmkit.compress.visionzip import VisionZipConfig
    from vlmkit.compress.vispruner import VisPrunerConfig

    model, _ = tiny("qwen2_5_vl")
    stage = {"visionzip": VisionZipConfig(keep_ratio=0.5), "vispruner": VisPrunerConfig(keep_ratio=0.5)}[config]
    with pytest.raises(ValueError, match="dynamic resolution: there is no fixed tile"):
        vlmkit.wrap(model, stage)


def test_qwen_mrope_positions_equal_get_rope_index_and_survive_pruning():
    from vlmkit.compress.random import RandomPruneConfig

    model, processor = tiny("qwen2_5_vl")
    batch = make_batch(processor, [0, 1], "left")
    ref, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    wrapped = vlmkit.wrap(model)
    full = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                            image_grid_thw=batch["image_grid_thw"])
    pos = wrapped.family.language_inputs(full)["position_ids"]
    assert torch.equal(pos[1:], ref)
    assert torch.equal(pos[0], (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0) * batch["attention_mask"])

    pruned_w = vlmkit.wrap(vlmkit.unwrap(wrapped), RandomPruneConfig(keep_ratio=0.25))
    pruned = pruned_w.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                               image_grid_thw=batch["image_grid_thw"])
    ppos = pruned_w.family.language_inputs(pruned)["position_ids"]
    for b in range(2):
        # every kept token has the (t, h, w) it had unpruned; text keeps its positions
        keyed = {}
        for s in range(full.input_ids.shape[1]):
            if full.attention_mask[b, s]:
                keyed[(int(full.image_id[b, s]), int(full.visual_index[b, s]), int(full.input_ids[b, s]))] = ref[:, b, s]
        real = pruned.attention_mask[b].bool()
        vis = pruned.visual_mask[b] & real
        for s in torch.nonzero(vis).flatten().tolist():
            key = (int(pruned.image_id[b, s]), int(pruned.visual_index[b, s]), int(pruned.input_ids[b, s]))
            assert torch.equal(ppos[1:, b, s], keyed[key])
        text_new = ppos[1:, b][:, real & ~pruned.visual_mask[b]]
        text_old = ref[:, b][:, full.attention_mask[b].bool() & ~full.visual_mask[b]]
        assert torch.equal(text_new, text_old)
