"""The stage registry: one ``@register_stage`` line per stage, found lazily, names unique."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vlmkit


def test_registering_a_type_twice_is_an_error():
    import dataclasses

    from vlmkit.config import StageConfig, config_class, register_stage
    from vlmkit.stage import CompressorStage

    @dataclasses.dataclass
    class ClashConfig(StageConfig):
        type = "fopru"  # taken by vlmkit's FoPru

    class Clash(CompressorStage):
        pass

    with pytest.raises(ValueError, match="'fopru' is already registered to vlmkit.compress.fopru.FoPru"):
        register_stage(ClashConfig)(Clash)
    assert config_class("fopru") is vlmkit.FoPruConfig  # the registry is unchanged
    with pytest.raises(TypeError, match="role base"):
        register_stage(ClashConfig)(torch.nn.Module)


def test_import_vlmkit_registers_nothing_until_asked():
    code = ("import sys, vlmkit, vlmkit.config as c; assert not c._REGISTRY and 'torch' not in sys.modules; "
            "assert 'fopru' in c.registered_types(); print(vlmkit.FoPruConfig.role, vlmkit.FoPruConfig.title())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["compressor", "FoPru"]


def test_registered_config_classes_are_package_attributes():
    from _pruner_example import LargestNormConfig

    assert vlmkit.LargestNormConfig is LargestNormConfig
    with pytest.raises(AttributeError, match="NoSuchConfig"):
        vlmkit.NoSuchConfig
