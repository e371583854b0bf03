"""The benchmark scripts run end to end on tiny configs (their numbers are only meaningful at real size)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vlmkit.testing import tiny_vlm

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_compression_runs_every_setting_padded_and_not(tmp_path, capsys):
    model, _ = tiny_vlm("llava")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(model.config.to_dict()))
    bench = _script("bench_compression")
    assert bench.main(["--config", str(config), "--quick", "--repeats", "1", "--quiet", "--prefix", "5",
                       "--question", "6", "--pad-to-multiple-of", "8", "--ratios", "0.5", "0.25"]) == 0
    out = capsys.readouterr().out
    rows = {line[:16].strip(): line[16:].split() for line in out.splitlines() if line.startswith(("none", "fopru"))}
    assert set(rows) == {"none", "fopru 0.50", "fopru 0.25", "none x8", "fopru 0.50 x8", "fopru 0.25 x8"}
    seq_len = {name: int(cols[1]) for name, cols in rows.items()}  # setting, vis tok, seq len, ...
    # 16 visual tokens (4x4 tiny grid) + 11 text: 27; kept 8 / 4 → 19 / 15; padded up to multiples of 8
    assert seq_len == {"none": 27, "fopru 0.50": 19, "fopru 0.25": 15, "none x8": 32, "fopru 0.50 x8": 24,
                       "fopru 0.25 x8": 16}
    assert "matches the eager output_attentions route: True" in out
    assert "padded to x8:" in out and "as assembled:" in out


def test_bench_methods_writes_the_report_with_exact_kv_bytes(tmp_path):
    model, _ = tiny_vlm("llava")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(model.config.to_dict()))
    bench = _script("bench_methods")
    assert bench.main(["--config", str(config), "--layers", "3", "--repeats", "1", "--limit", "2", "--keeps", "0.5",
                       "--methods", "random", "FastV", "VTW", "--out", str(tmp_path), "--quiet"]) == 0
    report = (tmp_path / "methods.md").read_text()
    assert (tmp_path / "methods_tradeoff.png").is_file()
    results = json.loads((tmp_path / "methods_results.json").read_text())
    a, b = results["A"]["rows"], results["B"]["rows"]
    assert set(a) == {"full", "random", "FastV", "VTW"}
    assert set(b) == {"full", "random @ 0.5", "FastV @ 0.5", "VTW @ 0.0"}
    # shipped model: 4 decoder layers, 64 visual tokens; FastV drops before layer 2, random before the LM; VTW (no
    # keep budget: a row at keep 0) withdraws all before layer floor(4 · 15/32 + 0.5) = 2
    assert a["random"]["0.5"]["visual_per_layer"] == [32] * 4
    assert a["FastV"]["0.5"]["visual_per_layer"] == [64, 64, 32, 32]
    assert list(a["VTW"]) == ["0.0"] and a["VTW"]["0.0"]["visual_per_layer"] == [64, 64, 0, 0]
    # 3 layers at real-width code paths: withdrawn before layer floor(3 · 15/32 + 0.5) = 1
    assert b["VTW @ 0.0"]["visual_per_layer"][1:] == [0, 0] and b["VTW @ 0.0"]["visual_per_layer"][0] > 0
    assert "| VTW | 0.0 |" in report and "| VTW @ 0.0 |" in report
    for rows in (a["random"], a["FastV"], a["VTW"], {"": r for r in b.values()}):
        for r in rows.values():
            assert r["kv_bytes"] == r["kv_bytes_counted"]
    # paired timing: full, random, full, FastV, full, VTW, full — each setting's speed-up from the fulls around it
    assert results["B"]["timing"] == "paired" and len(b["full"]["times"]) == 4
    assert len(b["random @ 0.5"]["times"]) == len(b["FastV @ 0.5"]["times"]) == 1
    t_full, t_random = b["full"]["times"], b["random @ 0.5"]["times"][0]
    assert b["random @ 0.5"]["speedup"] == pytest.approx((t_full[0] + t_full[1]) / 2 / t_random)
    full = b["full"]["layer_lengths"]
    assert b["FastV @ 0.5"]["layer_lengths"][:2] == full[:2] and b["FastV @ 0.5"]["layer_lengths"][2] < full[2]
    assert "| FastV | 0.5 |" in report and "| random @ 0.5 |" in report
    # timed through generate with the pruned prompt left-padded to a multiple of 8 (the default), FLOPs unpadded
    assert results["B"]["route"] == "generate" and results["B"]["pad_to_multiple_of"] == 8
    for r in b.values():
        prompt = r["timed_prompt_length"]
        assert prompt % 8 == 0 and 0 <= prompt - r["layer_lengths"][0] < 8
    assert "left-padded to a multiple of 8" in report
    # on the CPU in float32 the decoder's linears are pre-packed for oneDNN (as bench_compression times FoPru), after
    # every FLOP count (the counter does not see packed linears)
    assert "decoder linears oneDNN pre-packed" in results["B"]["device"] and b["random @ 0.5"]["ideal"] > 1
    # the machine's ceiling: the bare decoder stack at random's (pre-LLM, uniform) length, paired against the full one
    ceiling = results["B"]["ceiling"]
    short = b["random @ 0.5"]["layer_lengths"][0]
    assert ceiling["full_len"] == full[0] and list(ceiling["rows"]) == [str(short)]
    c, c_full = ceiling["rows"][str(short)], ceiling["full_times"]
    assert len(c_full) == 2 and c["speedup"] == pytest.approx((c_full[0] + c_full[1]) / 2 / c["times"][0])
    assert c["ideal"] > 1 and c["efficiency"] == pytest.approx(c["speedup"] / c["ideal"])
    assert f"| {full[0]} → {short} |" in report


def test_bench_selection_prints_batched_and_per_image_side_by_side(capsys):
    bench = _script("bench_selection")
    assert bench.main(["--tokens", "40", "--batches", "1", "3", "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| Div")
            or line.startswith("| VisP")]
    assert [(r[0].strip(), r[1].strip(), r[-1].strip()) for r in rows] == [
        ("DivPrune", "1", "yes"), ("VisPruner", "1", "yes"), ("DivPrune", "3", "yes"), ("VisPruner", "3", "yes")]
