"""The demo's keep-ratio sweep is read from the stage registry: every registered pruner, each of its variants."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit import config as registry
from vlmkit.compress import PruneConfig, PruneStage
from vlmkit.demo import sweep_methods

@dataclasses.dataclass
class KeepFirstConfig(PruneConfig):
    """Keeps the first tokens of each image (a pruner known only to this test)."""

    type = "test_keep_first"


@dataclasses.dataclass
class KeepEndsConfig(PruneConfig):
    """Keeps the first or the last tokens of each image (``strategy``, one sweep entry per variant)."""

    type = "test_keep_ends"
    strategy: str = "first"

    @classmethod
    def variants(cls):
        return {s: cls(keep_ratio=0.5, strategy=s) for s in ("first", "last")}


@pytest.fixture
def test_pruners():
    """Register the two test pruners for one test only (the registry is global: the demo must not sweep them
    in other tests)."""

    @registry.register_stage(KeepFirstConfig)
    class KeepFirst(PruneStage):
        def select(self, tokens, num_keep: int) -> torch.Tensor:
            return torch.arange(num_keep)

    @registry.register_stage(KeepEndsConfig)
    class KeepEnds(PruneStage):
        def select(self, tokens, num_keep: int) -> torch.Tensor:
            n = tokens.num_tokens
            return torch.arange(num_keep) if self.config.strategy == "first" else torch.arange(n - num_keep, n)

    yield
    for cls in (KeepFirstConfig, KeepEndsConfig):
        registry._REGISTRY.pop(cls.type, None)


def test_builtin_sweep_is_the_model_card_one():
    # the labels, their order (plot colours) and the specs the model card was made with come first; pruners
    # other test modules register for the whole session (tests/_pruner_example.py) may follow
    assert list(sweep_methods().items())[:4] == [
        ("FoPru rank", "fopru:keep_ratio={k},strategy=rank"),
        ("FoPru row", "fopru:keep_ratio={k},strategy=row"),
        ("random", "random:keep_ratio={k}"),
        ("DivPrune", "divprune:keep_ratio={k}"),
    ]


def test_sweep_includes_a_pruner_registered_outside_vlmkit(test_pruners):
    methods = sweep_methods()
    assert list(methods)[:4] == ["FoPru rank", "FoPru row", "random", "DivPrune"]  # built-ins first, unchanged
    assert methods["KeepFirst"] == "test_keep_first:keep_ratio={k}"
    assert methods["KeepEnds first"] == "test_keep_ends:keep_ratio={k},strategy=first"
    assert methods["KeepEnds last"] == "test_keep_ends:keep_ratio={k},strategy=last"
    # every entry is a spec the harness can build
    for spec in methods.values():
        config = registry.parse_stage_spec(spec.format(k=0.25))
        assert config.pruner and config.keep_ratio == 0.25


def test_sweep_forgets_a_pruner_after_the_fixture():
    assert "KeepFirst" not in sweep_methods()
