"""Test-only stages, one per role: a compressor that keeps every other visual token and scales them (one
parameter), a vocabulary adder, a head, an encoder and a decoder-layer probe."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from vlmkit.config import StageConfig, register_stage
from vlmkit.stage import AddsTokens, CompressorStage, DecoderStage, EncoderStage, HeadStage


@dataclasses.dataclass
class DropEveryOtherConfig(StageConfig):
    """Keep visual tokens 0, 2, 4, … of every image; multiply them by a trainable ``scale``."""

    type = "test_drop_every_other"
    scale: float = 1.0

    def validate(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


@register_stage(DropEveryOtherConfig)
class DropEveryOther(CompressorStage):
    def __init__(self, config: DropEveryOtherConfig) -> None:
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(float(config.scale)))

    def compress(self, tokens):
        out = []
        for t in tokens:
            kept = t.select(torch.arange(0, t.num_tokens, 2))
            out.append(dataclasses.replace(kept, embeds=kept.embeds * self.scale))
        return out


@dataclasses.dataclass
class AddTokensConfig(StageConfig):
    """Adds ``tokens`` to the vocabulary (as READ's [SEG] or SEED's image codes do)."""

    type = "test_add_tokens"
    tokens: tuple = ("<a1>", "<a2>")

    def validate(self) -> None:
        self.tokens = tuple(self.tokens)  # JSON gives a list back


@register_stage(AddTokensConfig)
class AddTokens(AddsTokens, HeadStage):
    def new_tokens(self):
        return list(self.config.tokens)

    def bind_tokens(self, ids):
        self.bound = dict(ids)


@dataclasses.dataclass
class HiddenSumHeadConfig(StageConfig):
    """Head: ``outputs["visual_sum"]`` = sum of the last hidden states at visual slots per sample;
    with ``target`` [B] given, loss += mean squared error of ``weight * visual_sum`` against it."""

    type = "test_hidden_sum_head"


@register_stage(HiddenSumHeadConfig)
class HiddenSumHead(HeadStage):
    head_input_names = ("target",)
    needs_hidden_states = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.weight = nn.Parameter(torch.tensor(0.5))

    def head_forward(self, batch, outputs, target=None):
        h = outputs.hidden_states[-1]
        visual_sum = (h * batch.visual_mask[..., None]).sum(dim=(1, 2)) * self.weight
        outputs["visual_sum"] = visual_sum
        if target is not None:
            outputs["loss"] = outputs.loss + ((visual_sum - target) ** 2).mean()
        return outputs


@dataclasses.dataclass
class RepeatEncoderConfig(StageConfig):
    """Encoder: each image's tokens twice (as if two experts), so it needs 2× the processor's placeholders."""

    type = "test_repeat_encoder"


@register_stage(RepeatEncoderConfig)
class RepeatEncoder(EncoderStage):
    def encode_images(self, family, pixel_values, input_ids=None, **image_kwargs):
        from vlmkit.tokens import VisualTokens

        out = []
        for t in family.encode_images(pixel_values, input_ids, **image_kwargs):
            embeds = torch.cat([t.embeds, t.embeds])
            out.append(VisualTokens(embeds=embeds, index=torch.arange(embeds.shape[0]), grid=t.grid,
                                    num_uncompressed=embeds.shape[0]))
        return out

    def placeholders_per_image(self, family):
        return 2 * family.tokens_per_tile


@dataclasses.dataclass
class LayerProbeConfig(StageConfig):
    """Decoder stage that changes nothing and records the sequence length every decoder layer runs on."""

    type = "test_layer_probe"


@register_stage(LayerProbeConfig)
class LayerProbe(DecoderStage):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.calls: list[list[int]] = []  # per language-model call: the length each layer saw
        self.batches: list = []

    @contextlib.contextmanager
    def decoder_context(self, family, batch):
        self.batches.append(batch)
        handles = []
        for i, layer in enumerate(family.decoder_layers):
            def hook(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                if i == 0:
                    self.calls.append([])
                self.calls[-1].append(int(hidden.shape[1]))
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
