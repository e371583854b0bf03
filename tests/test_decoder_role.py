"""The decoder role: a decoder stage's context is active around the language model in ``forward`` and over
the whole ``generate`` (prefill and every decode step), on every family's decoder layers."""

from __future__ import annotations

import pytest
import torch
from _stages import DropEveryOtherConfig, LayerProbeConfig
from conftest import make_batch, shared_tiny

import vlmkit
from vlmkit.testing import tiny_families

QUESTIONS = ["what shape is it ?", "how many red circle"]


@pytest.mark.parametrize("family", tiny_families())
def test_decoder_stage_sees_every_layer_in_forward_and_generate(family):
    model, processor = shared_tiny(family)
    batch = make_batch(processor, QUESTIONS, [1, 1])
    wrapped = vlmkit.wrap(model, DropEveryOtherConfig(), LayerProbeConfig())
    probe = wrapped.stages["test_layer_probe"]
    n_layers = len(wrapped.family.decoder_layers)
    try:
        with torch.no_grad():
            out = wrapped(**batch)
            length = out.logits.shape[1]
            assert probe.calls == [[length] * n_layers]  # one call, every layer on the assembled (pruned) length
            assert probe.batches[0].inputs_embeds.shape[1] == length < batch["input_ids"].shape[1]
            probe.calls.clear()
            gen = wrapped.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert gen.shape[1] == batch["input_ids"].shape[1] + 3
        # prefill on the assembled prompt, then one token per step, each through every layer
        assert probe.calls == [[length] * n_layers, [1] * n_layers, [1] * n_layers]
        plain = vlmkit.wrap(vlmkit.unwrap(wrapped), DropEveryOtherConfig())
        with torch.no_grad():  # the probe changes nothing
            assert torch.equal(plain(**batch).logits, out.logits)
            assert torch.equal(plain.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False), gen)
    finally:
        vlmkit.unwrap(plain if "plain" in locals() else wrapped)


def test_decoder_role_is_dispatched_by_role_only():
    assert LayerProbeConfig.role == "decoder"
    assert vlmkit.config.config_class("test_layer_probe") is LayerProbeConfig
