"""The stage contract: one battery that every registered stage runs, on every tiny family it claims.

A stage is in the battery as soon as its ``@register_stage`` line has run: the built-in stages (found by
the registry's package discovery) and the test stages of the modules imported below (``_stages``,
``_pruner_example``). Cells are ``(stage type, family)``; each check is its own test id, parametrized over
the cells, and runs the stage's ``Config.example()``:

- ``test_config_round_trip``: ``config_from_dict(c.to_dict()) == c`` and the dict survives JSON;
- ``test_pruner_keeps_the_budget`` (compressor pruners): every image sends exactly ``c.num_to_keep(G)`` of its G
  grid tokens plus all its image-newline tokens to the language model (also with ``num_keep``); decoder pruners'
  per-layer counts are checked in ``tests/test_decoder_prune.py``;
- ``test_batch_equals_each_sample_alone``: on a padded batch of two samples (one image; two images of other
  sizes; one image each, of different sizes, for stages that take one image per sample), ``forward`` logits at
  every real position and per-sample head outputs (atol 1e-4) and greedy ``generate`` tokens equal those of
  each sample run alone;
- ``test_save_load_gives_identical_outputs``: stage parameters (and added token rows) are perturbed, saved,
  and ``vlmkit.load`` onto a fresh model gives identical logits, head outputs and stage weights;
- ``test_pruner_keep_ratio_one_is_the_unwrapped_model`` (pruners, compressors and decoder stages):
  bit-identical logits and ``generate``;
- ``test_unclaimed_family_is_refused``: on every family lacking a capability in ``requires``, ``wrap`` raises
  ValueError naming the stage type and the missing capability.

A family *claims* a stage when its adapter's ``capabilities`` include all of the stage's ``requires``.
Models: stages that add tokens get a fresh tiny model and processor per test (``wrap`` grows the embeddings
and the tokenizer, and ``unwrap`` keeps both); every other stage runs on the session's shared tiny model,
which must give its reference logits again after ``unwrap`` (checked after every such test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import _pruner_example  # noqa: F401  (registers the test-only pruner "test_largest_norm")
import _stages  # noqa: F401  (registers the test stages "test_drop_every_other", …)
import pytest
import torch
from _pruner_example import LargestNorm, LargestNormConfig, largest_norm_select
from conftest import shared_tiny

import vlmkit
from vlmkit import compat
from vlmkit.config import config_from_dict, registered_configs
from vlmkit.families import family_for
from vlmkit.testing import tiny_families, tiny_vlm
from vlmkit.tokens import VisualTokens

FAMILIES = tiny_families()
MAX_NEW_TOKENS = 3

#: The padded batch is ``compat.SAMPLES``: sample 0 holds one 32×32 image, sample 1 a 32×56 and a 60×30 one
#: (different image counts and sizes: AnyRes grids differ). Stages that take one image per sample
#: (``StageConfig.images_per_sample``: PMP decodes proposals on the grid of each sample's one image) get
#: ``compat.ONE_IMAGE_SAMPLES``: a 32×32 and a 60×30 image, one per sample.

#: (stage type, family, check) -> why the cell is expected to fail. Strict: a cell that passes fails the run
#: (lift the entry); an entry for a cell the family does not claim (after a ``requires`` change) fails
#: ``test_expected_failures_name_claimed_cells``. Checks: "round_trip", "budget", "batch", "save_load", "identity".
_REPEAT = ("test-only encoder: placeholders_per_image is 2 × tokens_per_tile, right only when an image is one tile "
           "without newline tokens (llava) and samples hold one image; it declares no 'single_tile' requirement "
           "because tests/test_stage_hooks.py runs it on one-tile InternVL images too")
EXPECTED_FAILURES: dict[tuple[str, str, str], str] = {
    **{("test_repeat_encoder", f, check): _REPEAT
       for f in ("internvl", "llava_next", "llava_onevision", "smolvlm", "idefics3", "qwen2_5_vl", "mistral3",
                 "qwen2_vl", "qwen3_vl", "llava_onevision1_5", "glm4v")
       for check in ("batch", "save_load")},
}


# --- the cells --------------------------------------------------------------------------------------------
def battery_configs() -> list[type]:
    """Config classes the battery runs: every registered stage, except those registered by *other* test files
    (``test_*.py``, e.g. test_positions' ``KeepCells``): those register only when pytest happens to import that
    file first, so the cell list would depend on which files are collected and in which order."""
    return [c for c in registered_configs() if not c.__module__.rpartition(".")[2].startswith("test_")]


@functools.lru_cache(maxsize=None)
def family_capabilities(family: str) -> frozenset:
    return frozenset(family_for(shared_tiny(family)[0]).capabilities)


def claims(config_cls, family: str) -> bool:
    return set(config_cls.requires) <= family_capabilities(family)


def claimed_cells(pruner: bool | None = None, role: str | None = None) -> list[tuple[str, str]]:
    """``(stage type, family)`` for every battery stage and every tiny family that claims it."""
    return [(c.type, f) for c in battery_configs() for f in FAMILIES
            if claims(c, f) and (pruner is None or c.pruner == pruner) and (role is None or c.role == role)]


def refused_cells() -> list[tuple[str, str]]:
    return [(c.type, f) for c in battery_configs() for f in FAMILIES if not claims(c, f)]


def _marks(key: tuple[str, str, str]) -> list:
    reason = EXPECTED_FAILURES.get(key)
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


def _params(cells, check: str):
    return [pytest.param(stage, family, id=f"{stage}-{family}", marks=_marks((stage, family, check)))
            for stage, family in cells]


def _config_class(stage: str):
    return next(c for c in battery_configs() if c.type == stage)


# --- models and batches -------------------------------------------------------------------------------------
def _layout(stage: str):
    config_cls = _config_class(stage)
    return compat.ONE_IMAGE_SAMPLES if config_cls.images_per_sample == 1 else compat.SAMPLES


def make_batch(processor, layout, padding_side: str, only: int | None = None) -> dict:
    """Processor output for every sample of ``layout`` (``compat.make_batch``), or for sample ``only`` alone."""
    samples = list(range(len(layout))) if only is None else [only]
    return compat.make_batch(processor, samples, padding_side, layout=layout)


@functools.lru_cache(maxsize=None)
def _reference_logits(family: str) -> torch.Tensor:
    model, processor = shared_tiny(family)
    with torch.no_grad():
        return model(**make_batch(processor, compat.SAMPLES, "right")).logits


@contextlib.contextmanager
def wrapped_cell(config, family: str):
    """``(wrapped, model, processor)`` for one cell; the stage is always detached again.

    Stages that add tokens get a fresh model and processor; the others the shared one, which must give its
    reference logits after ``unwrap`` (so sharing it cannot leak one stage's patches into another cell)."""
    fresh = config.stage_class.adds_tokens
    model, processor = tiny_vlm(family, seed=0) if fresh else shared_tiny(family)
    if not fresh:
        _reference_logits(family)
    wrapped = vlmkit.wrap(model, config, tokenizer=processor.tokenizer)
    try:
        yield wrapped, model, processor
    finally:
        vlmkit.unwrap(wrapped)
    if not fresh:
        with torch.no_grad():
            again = model(**make_batch(processor, compat.SAMPLES, "right")).logits
        assert torch.equal(again, _reference_logits(family)), f"unwrap did not restore the {family} model"


def _image_kwargs(wrapped, batch: dict) -> dict:
    return {k: batch[k] for k in wrapped.family.image_kwarg_names if k in batch}


def _assemble(wrapped, batch: dict):
    return wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                            **_image_kwargs(wrapped, batch))


def _generate(model, batch: dict) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)


# --- the checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [pytest.param(c.type, marks=_marks((c.type, "*", "round_trip")))
                                   for c in battery_configs()])
def test_config_round_trip(stage):
    config = _config_class(stage).example()
    data = config.to_dict()
    assert data["type"] == stage
    again = config_from_dict(data)
    assert again == config and type(again) is type(config)
    text = json.dumps(data)  # JSON-serialisable, and the JSON text gives the same config back
    assert config_from_dict(json.loads(text)) == config


def _outputs(wrapped, batch: dict) -> dict[str, torch.Tensor]:
    """Every tensor ``forward`` returns (logits and whatever heads add)."""
    with torch.no_grad():
        out = wrapped(**batch)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _newline_rows(model, embeds: list[torch.Tensor]) -> list[int] | None:
    """Rows equal to the model's learned image-newline embedding (LLaVA-NeXT / OneVision) in each tensor: an
    oracle independent of vlmkit's layout; None for models without one."""
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    if newline is None:
        return None
    return [int((x == newline.to(x)).all(-1).sum()) for x in embeds]


@pytest.mark.parametrize("stage, family", _params(claimed_cells(pruner=True, role="compressor"), "budget"))
def test_pruner_keeps_the_budget(stage, family):
    """Each image keeps ``num_to_keep(G)`` of its G grid tokens and every newline token, for ``keep_ratio``
    (the example) and for ``num_keep``. G and the newlines are counted on the unwrapped pipeline's tokens and
    checked against the processor's placeholder runs and the model's own ``get_image_features`` output."""
    model, processor = shared_tiny(family)
    batch = make_batch(processor, compat.SAMPLES, "right")
    identity = vlmkit.wrap(model)
    try:
        full = identity.encode_visual(batch["pixel_values"], batch["input_ids"], **_image_kwargs(identity, batch))
        placeholders = int(identity.family.image_run_mask(batch["input_ids"]).sum())  # Mistral 3: + row ends
    finally:
        vlmkit.unwrap(identity)
    assert sum(t.num_tokens for t in full) == placeholders
    grid = [int(t.grid_positions().numel()) for t in full]
    newlines = [t.num_tokens - g for t, g in zip(full, grid)]
    kwargs = {k: batch[k] for k in family_for(model).image_kwarg_names if k in batch}
    with torch.no_grad():
        own = model.model.get_image_features(pixel_values=batch["pixel_values"], **kwargs).pooler_output
    assert _newline_rows(model, own) in (None, newlines)
    per_sample = [len(images) for images in compat.SAMPLES]
    example = _config_class(stage).example()
    for config in (example, dataclasses.replace(example, keep_ratio=None, num_keep=3)):
        with wrapped_cell(config, family) as (wrapped, _, _):
            assembled = _assemble(wrapped, batch)
        want = [config.num_to_keep(g) + n for g, n in zip(grid, newlines)]
        kept = [t.num_tokens for t in assembled.tokens]
        kept_newlines = [int(t.is_newline.sum()) for t in assembled.tokens]
        assert (kept, kept_newlines) == (want, newlines), (config, grid, newlines)
        assert _newline_rows(model, [t.embeds for t in assembled.tokens]) in (None, newlines)
        sums = [sum(want[sum(per_sample[:k]):sum(per_sample[:k + 1])]) for k in range(len(per_sample))]
        assert assembled.visual_tokens_per_sample == sums


@pytest.mark.parametrize("stage, family", _params(claimed_cells(), "batch"))
def test_batch_equals_each_sample_alone(stage, family):
    samples = _layout(stage)
    with wrapped_cell(_config_class(stage).example(), family) as (wrapped, _, processor):
        right = make_batch(processor, samples, "right")
        outputs = _outputs(wrapped, right)
        logits = outputs.pop("logits")
        left = make_batch(processor, samples, "left")
        generated = _generate(wrapped, left)
        S = left["input_ids"].shape[1]
        assert torch.equal(generated[:, :S], left["input_ids"])
        real = _assemble(wrapped, right).attention_mask.bool()  # what the LM saw (compressed, right-padded)
        for k in range(len(samples)):
            alone = make_batch(processor, samples, "right", only=k)
            alone_outputs = _outputs(wrapped, alone)
            one = alone_outputs.pop("logits")[0]
            assert int(real[k].sum()) == one.shape[0] and bool(real[k, :one.shape[0]].all())
            torch.testing.assert_close(logits[k, :one.shape[0]], one, atol=1e-4, rtol=1e-4)
            for name, value in outputs.items():  # per-sample head outputs (PMP proposals, …)
                if value.dim() and value.shape[0] == len(samples) and value.shape[1:] == alone_outputs[name].shape[1:]:
                    torch.testing.assert_close(value[k], alone_outputs[name][0], atol=1e-4, rtol=1e-4, msg=name)
            alone = make_batch(processor, samples, "left", only=k)
            one = _generate(wrapped, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(generated[k, S:S + one.shape[0]], one), f"sample {k}: generated tokens differ"


def _perturb(wrapped, model) -> None:
    """Move every trainable stage parameter and every added token row off its initial value."""
    own = {p.data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.stages.named_parameters():
            assert p.data_ptr() not in own, f"stage parameter {name} is a weight of the wrapped model"
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
        if wrapped.added_tokens:
            ids = torch.tensor(list(wrapped.added_tokens.values()))
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                emb.weight[ids] += torch.randn(emb.weight[ids].shape, generator=g).to(emb.weight)


@pytest.mark.parametrize("stage, family", _params(claimed_cells(), "save_load"))
def test_save_load_gives_identical_outputs(stage, family, tmp_path):
    config = _config_class(stage).example()
    with wrapped_cell(config, family) as (wrapped, model, processor):
        batch = make_batch(processor, _layout(stage), "right")
        before = _outputs(wrapped, batch)
        _perturb(wrapped, model)
        expected = _outputs(wrapped, batch)
        acting = [p for s in wrapped.stages if s.role in ("encoder", "compressor", "decoder", "position")
                  for p in s.parameters()]  # these act on the logits; a head's may act only on its own inputs
        if acting or wrapped.added_tokens:
            assert any(not torch.equal(before[k], expected[k]) for k in before), "perturbing changed nothing"
        wrapped.save_pretrained(tmp_path)
        state = {k: v.clone() for k, v in wrapped.stages.state_dict().items()}
    fresh, fresh_processor = tiny_vlm(family, seed=0)
    loaded = vlmkit.load(fresh, tmp_path, tokenizer=fresh_processor.tokenizer)
    try:
        assert [c.to_dict() for c in loaded.stage_configs] == [config.to_dict()]
        assert loaded.added_tokens == wrapped.added_tokens
        got = loaded.stages.state_dict()
        assert sorted(got) == sorted(state)
        for k in state:
            assert torch.equal(got[k], state[k]), k
        outputs = _outputs(loaded, make_batch(fresh_processor, _layout(stage), "right"))
        assert sorted(outputs) == sorted(expected)
        for k in expected:
            assert torch.equal(outputs[k], expected[k]), k
    finally:
        vlmkit.unwrap(loaded)


@pytest.mark.parametrize("stage, family", _params(claimed_cells(pruner=True), "identity"))
def test_pruner_keep_ratio_one_is_the_unwrapped_model(stage, family):
    example = _config_class(stage).example()
    budget = {"keep_ratio": 1.0, **({"num_keep": None} if hasattr(example, "num_keep") else {})}
    config = dataclasses.replace(example, **budget)
    with wrapped_cell(config, family) as (wrapped, model, processor):
        right = make_batch(processor, compat.SAMPLES, "right")
        with torch.no_grad():
            assert torch.equal(wrapped(**right).logits, model(**right).logits)
        left = make_batch(processor, compat.SAMPLES, "left")
        assert torch.equal(_generate(wrapped, left), _generate(model, left))


@pytest.mark.parametrize("stage, family", _params(refused_cells(), "refused"))
def test_unclaimed_family_is_refused(stage, family):
    config_cls = _config_class(stage)
    missing = sorted(set(config_cls.requires) - family_capabilities(family))
    model, processor = shared_tiny(family)
    n_tokens = len(processor.tokenizer)
    with pytest.raises(ValueError) as err:
        vlmkit.wrap(model, config_cls.example(), tokenizer=processor.tokenizer)
    message = str(err.value)
    assert repr(stage) in message and any(repr(m) in message for m in missing), message
    assert len(processor.tokenizer) == n_tokens  # refused before anything was changed


# --- the cell list itself ------------------------------------------------------------------------------------
def test_every_stage_has_a_cell_and_the_example_pruner_is_one():
    """Registering a stage is all it takes: the test-only pruner (one file, one registration line) is a
    claimed cell of every check on every family, and every stage is claimed or refused on each family."""
    claimed = claimed_cells()
    assert {("test_largest_norm", f) for f in FAMILIES} <= set(claimed_cells(pruner=True))
    assert len(claimed) + len(refused_cells()) == len(battery_configs()) * len(FAMILIES)
    types = {c.type for c in battery_configs()}
    assert {"test_largest_norm", "test_drop_every_other", "fopru", "random", "read", "seed"} <= types


def test_expected_failures_name_claimed_cells():
    """An entry for a cell no longer claimed (its stage now declares the missing capability) must go."""
    claimed = {(s, f, c) for s, f in claimed_cells() for c in ("batch", "save_load", "budget", "identity")}
    claimed |= {(c.type, "*", "round_trip") for c in battery_configs()}
    assert not sorted(set(EXPECTED_FAILURES) - claimed)


def test_largest_norm_select_by_hand():
    """Norms of the rows below: 5, 1, 13, 13, 2 (3-4-5 and 5-12-13 triangles)."""
    embeds = torch.tensor([[3.0, 4.0], [0.0, 1.0], [5.0, 12.0], [12.0, 5.0], [2.0, 0.0]])
    assert largest_norm_select(embeds, 1).tolist() == [2]  # tie 13 = 13: the lower index
    assert largest_norm_select(embeds, 2).tolist() == [2, 3]
    assert largest_norm_select(embeds, 3).tolist() == [0, 2, 3]
    assert largest_norm_select(embeds, 5).tolist() == [0, 1, 2, 3, 4]
    # through PruneStage.compress: half of 4 grid tokens (norms 1, 3, 2, 4 → keep 1 and 3) and the newline
    tokens = VisualTokens(embeds=torch.tensor([[1.0], [3.0], [7.0], [2.0], [4.0]]), index=torch.arange(5),
                          grid=(2, 2), source=torch.tensor([0, 1, -1, 2, 3]), num_sources=4)
    (kept,) = LargestNorm(LargestNormConfig(keep_ratio=0.5)).compress([tokens])
    assert kept.index.tolist() == [1, 2, 4]
