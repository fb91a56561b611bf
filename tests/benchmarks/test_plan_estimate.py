"""benchmarks/probes/plan_estimate.py on the committed H200 per-layer rows: a plan never sums to more than bf16 or
all-W4A4 (it takes the faster per shape), unmeasured shapes are listed, not guessed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _probe():
    spec = importlib.util.spec_from_file_location("plan_estimate", ROOT / "benchmarks" / "probes" / "plan_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planned_sum_is_the_per_shape_minimum_on_the_committed_rows():
    probe = _probe()
    times = probe.load_rows(str(ROOT / "benchmarks" / "results" / "linear.jsonl"), "2026-12-04b")
    for family in ("pixart-sigma", "sd3-medium"):
        e = probe.estimate(probe.BLOCK_LAYERS[family], times)
        us = e["us"]
        assert e["layers"] == 7
        for name in ("Triton", "cuBLAS"):
            assert us[f"planned {name}"] <= min(us["bf16"], us[f"W4A4 {name}"]) + 1e-9
            assert us["planned per layer"] <= us[f"planned {name}"] + 1e-9
    sd3 = probe.estimate(probe.BLOCK_LAYERS["sd3-medium"], times)
    assert sd3["missing"] == [(666, 1536, 1536)]


def test_a_shape_faster_in_4_bits_is_kept_and_a_slower_one_is_not(tmp_path):
    probe = _probe()
    rows = [dict(M=m, K=k, N=n, format=f, variant=v, graph_ms=t) for (m, k, n), f, v, t in [
        ((4096, 64, 64), "bf16 nn.Linear", "-", 0.010), ((4096, 64, 64), "int4p2 W4A4", "fused", 0.008),
        ((4096, 64, 64), "int4p2 W4A4", "gemm-cublas", 0.005),
        ((4096, 64, 128), "bf16 nn.Linear", "-", 0.010), ((4096, 64, 128), "int4p2 W4A4", "fused", 0.020),
        ((4096, 64, 128), "int4p2 W4A4", "gemm-cublas", 0.011)]]
    path = tmp_path / "linear.jsonl"
    path.write_text(json.dumps({"run": "x", "result": {"rows": rows}}) + "\n")
    e = probe.estimate({(4096, 64, 64): 2, (4096, 64, 128): 1, (8, 8, 8): 1}, probe.load_rows(str(path), "x"))
    assert e["us"]["planned Triton"] == pytest.approx(2 * 8 + 10) and e["four_bit"]["planned Triton"] == 2
    assert e["us"]["planned cuBLAS"] == pytest.approx(2 * 5 + 10) and e["missing"] == [(8, 8, 8)]
    assert e["us"]["planned per layer"] == pytest.approx(2 * 5 + 10) and e["four_bit"]["planned per layer"] == 2


def test_step_estimate_replaces_each_blocks_linears(tmp_path):
    probe = _probe()
    e = dict(us={"bf16": 100.0, "W4A4 cuBLAS": 80.0, "planned cuBLAS": 70.0, "W4A4 Triton": float("nan")})
    row = dict(blocks=10, variants={"bf16": {"step_ms": 5.0}, "fourbit-w4a4-cublas": {"step_ms": 4.9}})
    got = probe.step_estimate(e, row)
    assert got["W4A4 cuBLAS"] == {"predicted": pytest.approx(5.0 - 10 * 20 / 1e3), "measured": 4.9}
    assert got["planned cuBLAS"] == {"predicted": pytest.approx(4.7), "measured": None}
    assert "W4A4 Triton" not in got  # a sum that could not be made is not estimated
    path = tmp_path / "models.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"run": "a", "result": {"rows": [dict(model="m", blocks=1, variants={"bf16": {"step_ms": 2.0}})]}},
        {"run": "b", "result": {"rows": [dict(model="m", blocks=1, variants={"bf16": {"step_ms": 3.0}})]}},
        {"run": "c", "result": {"rows": [dict(model="m", blocks=1, variants={"bf16": {"error": "x"}})]}}]) + "\n")
    assert probe.load_steps(str(path))["m"]["run"] == "b"  # the newest row with a bf16 step
