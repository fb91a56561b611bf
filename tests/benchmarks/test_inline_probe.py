"""benchmarks/probes/inline_probe.py in its tiny CPU mode (Triton's interpreter, inductor on CPU, no timing): every
fourbit variant compiles, the inline variants lower their layer, the two lowerings give the same output, a row is
appended with meta."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_mode_lowers_and_appends_a_row(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"), FOURBIT_GIT_COMMIT="test",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    variants = "bf16,fourbit-w4a4,fourbit-w4a4-inline,fourbit-fp8-inline"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probes" / "inline_probe.py"), "--tiny",
                        "--variants", variants, "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "inline_probe.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["meta"]["git_commit"] == "test"
    regions = rows[0]["result"]["regions"]
    assert sorted(regions) == ["gelu-fc2", "norm-qkv"]
    for info in regions.values():
        assert [info[v]["lowered_layers"] for v in variants.split(",")[1:]] == [0, 1, 1]
        separate, inline = info["fourbit-w4a4"]["rel_diff_vs_bf16"], info["fourbit-w4a4-inline"]["rel_diff_vs_bf16"]
        assert abs(separate - inline) < 1e-4 * separate  # the same codes; fp32 sums apart
