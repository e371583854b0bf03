"""DART (``vlmkit.decoder.dart``) on tiny models of the real classes.

References are independent of the code under test: hand-worked selections, the unwrapped model's own outputs
(logits, ``generate``, ``output_hidden_states``, its KV cache), ``generate``'s own step logits and each sample run
alone. The tiny decoders have 2 layers, so the drop is before layer K=1 (keys from layer 0).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import make_batch, shared_tiny
from test_decoder_prune import QUESTIONS, wrapped_model

import vlmkit
from vlmkit import compat
from vlmkit.config import config_from_dict
from vlmkit.decoder.dart import DARTConfig, dart_select
from vlmkit.decoder.prune import average_visual_tokens

FAMILIES = ["llava", "internvl", "qwen2_5_vl"]
K = 1


def config(**kw) -> DARTConfig:
    return DARTConfig(**{"keep_ratio": 0.5, "layer": K, **kw})


# --- selection by hand --------------------------------------------------------------------------------------
# image tokens (2-D states): 0 = (1, 0) the pivot (largest key L1), 1 = a (-1, 0), 2 = b (0, -1), 3 = c (-1, -1),
# 4 = d (1, 1), 5 = e (-1, 0.2); text: 0 = (5, 5), 1 = (0, 1) the text pivot (largest key L1)
IMG = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, 0.2]])
TXT = torch.tensor([[5.0, 5.0], [0.0, 1.0]])
KEYS = torch.tensor([9.0, 1.0, 1.0, 1.0, 1.0, 1.0])
TEXT_KEYS = torch.tensor([1.0, 3.0])


def test_dart_select_by_hand():
    # budget 3 = 1 image pivot + 1 each for the two pivots. Image pivot (1,0): cosines 1:-1, 2:0, 3:-.71, 4:.71,
    # 5:-.98 -> takes 1; text pivot (0,1) among {2,3,4,5}: 2:-1, 3:-.71, 4:.71, 5:.2 -> takes 2
    assert dart_select(KEYS, TEXT_KEYS, IMG, TXT, 3, 1, 1).tolist() == [0, 1, 2]
    # budget 4: 3 to share over 2 pivots -> the first pivot in iteration order takes 2, the second 1.
    # Default positions (image 0..5, text 6, 7): pivots {0, 7} iterate ascending -> image pivot first: takes 1, 5
    # (-1, -.98); text pivot among {2, 3, 4}: 2 (-1)
    assert dart_select(KEYS, TEXT_KEYS, IMG, TXT, 4, 1, 1).tolist() == [0, 1, 2, 5]
    # the same tokens at sequence positions 30..35 (image) and 36, 37 (text): list(set([30, 37])) is [37, 30]
    # (CPython: 37 % 8 = 5 comes before 30 % 8 = 6), so the text pivot goes first and takes 2 (-1), 3 (-.71);
    # the image pivot then takes 1 (-1) of {1, 4, 5}
    assert list({30, 37}) == [37, 30]
    assert dart_select(KEYS, TEXT_KEYS, IMG, TXT, 4, 1, 1, image_positions=range(30, 36),
                       text_positions=[36, 37]).tolist() == [0, 1, 2, 3]
    # no text pivots (P_txt=0): the image pivot takes all: 1 (-1), 5 (-.98), 3 (-.71)
    assert dart_select(KEYS, TEXT_KEYS, IMG, TXT, 4, 1, 0).tolist() == [0, 1, 3, 5]
    # no text after the image: the same
    assert dart_select(KEYS, TEXT_KEYS[:0], IMG, TXT[:0], 4, 1, 4).tolist() == [0, 1, 3, 5]
    # two image pivots: 0 and 2 (keys 9, 5); 1 more to share: the first pivot (0) takes 1 (-1)
    keys = torch.tensor([9.0, 1.0, 5.0, 1.0, 1.0, 1.0])
    assert dart_select(keys, TEXT_KEYS, IMG, TXT, 3, 2, 1).tolist() == [0, 1, 2]
    # budget below P_img: only the top-`budget` pivots, nothing taken
    assert dart_select(keys, TEXT_KEYS, IMG, TXT, 2, 4, 4).tolist() == [0, 2]
    assert dart_select(keys, TEXT_KEYS, IMG, TXT, 0, 4, 4).tolist() == []
    assert dart_select(keys, TEXT_KEYS, IMG, TXT, 6, 4, 4).tolist() == list(range(6))


def test_dart_select_ties_go_to_the_lower_index():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0]])
    # equal key L1 (0 and 1): pivot 0; candidates 1 and 2 are equally dissimilar (cos 0) -> 1
    keys = torch.tensor([3.0, 3.0, 1.0, 2.0])
    assert dart_select(keys, torch.zeros(0), states, torch.zeros(0, 2), 2, 1, 4).tolist() == [0, 1]
    keys = torch.tensor([1.0, 3.0, 3.0, 2.0])  # pivot 1 (lower of 1, 2); cosines to (0,1): 0:0, 2:-1, 3:.71 -> 2
    assert dart_select(keys, torch.zeros(0), states, torch.zeros(0, 2), 2, 1, 4).tolist() == [1, 2]


def test_dart_select_refuses_bad_input():
    with pytest.raises(ValueError):
        dart_select(KEYS, TEXT_KEYS, IMG, TXT, 7, 1, 1)
    with pytest.raises(ValueError):
        dart_select(KEYS, TEXT_KEYS, IMG, TXT, 3, 0, 1)
    with pytest.raises(ValueError):
        dart_select(KEYS, TEXT_KEYS, IMG, TXT, 3, 1, 1, image_positions=[0, 1, 2, 3, 4, 6])  # 6 is text's


def test_budgets_and_config():
    c = DARTConfig()  # K=2, keep 1 - 0.778, 4 + 4 pivots
    assert (c.layer, c.pivot_image, c.pivot_text) == (2, 4, 4)
    assert c.drop_schedule(32, 576) == [(2, 127)]
    assert DARTConfig(keep_ratio=None, num_keep=132).drop_schedule(32, 576) == [(2, 132)]  # the LLaVA file's 132
    assert average_visual_tokens(c, 32, 576) == (2 * 576 + 30 * 127) / 32
    assert DARTConfig(keep_ratio=None, num_keep=64).drop_schedule(32, 16) == [(2, 16)]  # clamped
    for bad in ({"pivot_image": 0}, {"pivot_text": -1}, {"pivot_image": 2.0}, {"layer": 0}):
        with pytest.raises(ValueError):
            DARTConfig(**bad)
    assert config_from_dict(config(pivot_image=2).to_dict()) == config(pivot_image=2)


def _assembled(wrapped, batch):
    image_kwargs = {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}
    return wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **image_kwargs)


# The generic checks (keep everything = the unwrapped model, layer lengths and KV cache, teacher forcing = cached
# generate, padded batch = each sample alone, eager = SDPA) run for DART in tests/test_decoder_prune.py (METHODS).


# --- the selection inside the model against an independent recomputation ---------------------------------
def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@functools.lru_cache(maxsize=None)
def norm_weighted_tiny(family: str):
    """A copy of the tiny model whose final norm (and layer K's input norm) have random weights: with the init
    weight of ones an RMSNorm only rescales each token, which leaves every cosine similarity unchanged."""
    model, processor = shared_tiny(family)
    model = copy.deepcopy(model)
    lm = model.model.language_model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in (lm.norm, lm.layers[K].input_layernorm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 2 - 0.5)
    return model, processor


@pytest.mark.parametrize("pivots", [(4, 4), (2, 3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_selection_equals_independent_recomputation(family, pivots):
    model, processor = norm_weighted_tiny(family)
    c = config(keep_ratio=0.75 if pivots == (2, 3) else 0.5, pivot_image=pivots[0], pivot_text=pivots[1])
    batch = compat.make_batch(processor, [0, 1], "left")  # row 1: two images, text between and after them
    lm = model.model.language_model
    layer = lm.layers[K - 1]
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("cos_sin", kwargs["position_embeddings"])

    hook = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True, use_cache=True)
    finally:
        hook.remove()
    with torch.no_grad():
        # layer K-1's keys, by hand: input norm, k projection, RoPE with the model's own cos/sin
        x = layer.input_layernorm(out.hidden_states[K - 1])
        d = layer.self_attn.head_dim
        k = layer.self_attn.k_proj(x).view(*x.shape[:2], -1, d).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in seen["cos_sin"])
        k = k * cos + _rotate_half(k) * sin
        torch.testing.assert_close(k, out.past_key_values.layers[K - 1].keys)  # = what the model cached
        heads = model.config.get_text_config().num_attention_heads
        l1 = k.repeat_interleave(heads // k.shape[1], dim=1).float().abs().sum(dim=(1, 3))  # [B, S]
        states = lm.norm(out.hidden_states[K]).float()  # the final norm on what enters layer K
    wrapped = vlmkit.wrap(model, c)
    try:
        assert wrapped.family.decoder_final_norm is lm.norm
        assembled = _assembled(wrapped, batch)
        stage = wrapped.stages["dart"]
        chosen = []
        select = stage.select
        stage.select = lambda s, n: chosen.append((n, select(s, n))) or chosen[-1][1]
        with torch.no_grad():
            wrapped(**batch)
    finally:
        vlmkit.unwrap(wrapped)
    real = assembled.attention_mask.bool()
    visual = assembled.visual_mask & real
    expected = []
    for b in range(real.shape[0]):
        position = real[b].long().cumsum(0) - 1
        last_prompt = int(torch.nonzero(real[b]).max())
        for key in assembled.image_id[b][visual[b]].unique().tolist():
            cols = torch.nonzero(visual[b] & (assembled.image_id[b] == key)).flatten()
            ar = torch.arange(real.shape[1])
            text = torch.nonzero(real[b] & ~visual[b] & (ar > cols.max()) & (ar <= last_prompt)).flatten()
            n = c.visual_to_keep(cols.numel())
            expected.append((n, dart_select(l1[b, cols], l1[b, text], states[b, cols], states[b, text], n,
                                            *pivots, image_positions=position[cols],
                                            text_positions=position[text]).tolist()))
    assert len(expected) == 3  # row 0: one image, row 1: two
    assert [(n, picked.tolist()) for n, picked in chosen] == expected


def test_stage_leaves_no_state_behind():
    with wrapped_model("llava", config()) as (wrapped, _, processor):
        batch = make_batch(processor, QUESTIONS[:1], [1])
        with torch.no_grad():
            wrapped(**batch)
        assert wrapped.stages["dart"]._layout is None  # what the context recorded went with it
        assert not any(layer._forward_pre_hooks for layer in wrapped.family.decoder_layers)
