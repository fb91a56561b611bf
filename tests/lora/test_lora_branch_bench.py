"""benchmarks/lora_branch.py in its tiny CPU mode (Triton's interpreter): the LoRA'd layers run through the Triton
kernels, match the reference (bf16 activations under the interpreter: 5e-3, see tests/kernels), rows are appended."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_mode_appends_rows(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"), FOURBIT_GIT_COMMIT="test")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_branch.py"), "--tiny", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "lora_branch.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == ["bf16", "none", "+16"]
    assert rows[2]["branch_rank"] == 48 and rows[2]["rel_err_vs_reference"] < 5e-3
    assert rows[0]["meta"]["git_commit"] == "test" and "lora_branch.py --tiny" in rows[0]["meta"]["command"]
