"""benchmarks/probes/rowmax_probe.py's kernel under Triton's interpreter: given the rows' maxima, its int4p2 codes and
row scales equal act_quant's bit for bit and its down-projection matches to the summation order (the probe's
``--check``), so its timings on a GPU time a correct pass."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_check_mode_matches_act_quant():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probes" / "rowmax_probe.py"), "--check"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("check")]
    assert len(lines) == 2 and all("equal: True" in line for line in lines)
