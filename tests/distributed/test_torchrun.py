"""Two gloo processes under the standard launcher against one process, on the bundled fashion-dit.

Few samples, 2 steps, batches of 2 (so the 2 processes share the batches) keep each run to seconds. Both runs set
OMP_NUM_THREADS=1 (torchrun's own default for several processes): the images and checkpoints do not depend on the
thread count, but the bootstrap intervals of the metrics (float32 sums over threads) may in their last digits.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
RUN_LIMIT_S = 300  # a wall-clock bound on each launch: a hang fails the test instead of blocking CI
QUANTIZE = ["quantize", "--variant", "svdquant:w4a4:r8", "--calib-samples", "4", "--calib-steps", "2",
            "--batch-size", "2", "--device", "cpu"]
COMPARE = ["compare", "--variants", "fp16,svdquant:w4a4:r8", "--samples", "4", "--steps", "2", "--calib-samples", "4",
           "--batch-size", "2", "--data-samples", "0", "--device", "cpu"]
METRICS = ("lpips", "psnr", "ssim", "fd_vs_fp16", "fd_vs_data", "weight_bits_per_element", "model_bytes", "config")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOURBIT_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]), FOURBIT_PROGRESS="0",
               OMP_NUM_THREADS="1", **extra)
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on the host name resolving
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(args: list, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fourbit", *args], env=_env(**env), capture_output=True, text=True,
                          timeout=RUN_LIMIT_S)


def torchrun(args: list, logs: Path, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with each rank's stdout/stderr in its own file under ``logs``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "fourbit", *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=RUN_LIMIT_S)


def rank_stderr(logs: Path, rank: int) -> list[str]:
    (path,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
    return [line for line in path.read_text().splitlines() if line.strip()]


def _our_lines(logs: Path, rank: int) -> list[str]:
    lines = rank_stderr(logs, rank)
    assert not any("Traceback" in line for line in lines), lines
    return [line for line in lines if line.startswith("fourbit:")]


def _check(proc: subprocess.CompletedProcess, logs: Path | None = None) -> None:
    if proc.returncode != 0:
        ranks = "".join(f"\nrank {r}: {rank_stderr(logs, r)}" for r in (0, 1)) if logs else ""
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}{ranks}")


def test_quantize_on_two_processes_writes_the_same_checkpoint(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _check(one_process(QUANTIZE + ["--out", str(one)]))
    _check(torchrun(QUANTIZE + ["--out", str(two)], tmp_path / "logs"), tmp_path / "logs")
    assert one.read_bytes() == two.read_bytes()
    assert rank_stderr(tmp_path / "logs", 1) == []  # rank 1 neither writes nor reports


def test_compare_on_two_processes_gives_the_same_report(tmp_path):
    _check(one_process(COMPARE + ["--out", str(tmp_path / "one")]))
    _check(torchrun(COMPARE + ["--out", str(tmp_path / "two")], tmp_path / "logs"), tmp_path / "logs")
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert list(one["variants"]) == list(two["variants"]) == ["fp16", "svdquant:w4a4:r8"]
    for name, row in one["variants"].items():
        for key in METRICS:
            assert row.get(key) == two["variants"][name].get(key), (name, key)
    assert one["variants"]["svdquant:w4a4:r8"]["lpips"]["mean"] > 0  # a real comparison, not two empty ones
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()


def test_a_failing_rank_ends_both_processes_with_one_line_each(tmp_path):
    proc = torchrun(QUANTIZE + ["--out", str(tmp_path / "q.safetensors")], tmp_path / "logs", FOURBIT_FAIL_RANK="1")
    assert proc.returncode != 0
    # one line of ours per process (torch's C++ layer may log its own [E...] line about the closed connection)
    (line0,), (line1,) = (_our_lines(tmp_path / "logs", r) for r in (0, 1))
    assert line1 == "fourbit: rank 1 of 2 failed: RuntimeError: injected failure on rank 1 (FOURBIT_FAIL_RANK=1)"
    assert line0.startswith("fourbit: rank 0 of 2 stopped") and "another rank" in line0
    assert not (tmp_path / "q.safetensors").exists()


def test_a_stalled_rank_is_caught_by_the_collective_timeout(tmp_path):
    # rtn needs no calibration data: the barrier at the end of quantize is the only collective to time out
    args = ["quantize", "--variant", "rtn:w4a4", "--calib-samples", "2", "--calib-steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "q.safetensors")]
    proc = torchrun(args, tmp_path / "logs", FOURBIT_HANG_RANK="1", FOURBIT_DIST_TIMEOUT="5")
    assert proc.returncode != 0
    rank0 = [line for line in _our_lines(tmp_path / "logs", 0) if line.startswith("fourbit: rank")]
    (line1,) = _our_lines(tmp_path / "logs", 1)
    assert len(rank0) == 1 and "the end of quantization" in rank0[0] and "5s timeout" in rank0[0]
    assert line1.startswith("fourbit: rank 1 of 2 stopped by the launcher (SIGTERM)")
