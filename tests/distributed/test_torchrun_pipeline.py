"""``quantize --pipeline`` and ``compare --pipeline`` on two gloo processes against one process, on the tiny
Stable Diffusion pipeline of ``tests/pipelines/tiny.py`` saved to disk (real CLIP tokenizer and text encoder).

Three calibration prompts and three evaluation prompts (so rank 0 runs two and rank 1 one: uneven shares), 2
steps, 16x16 images. Launch helpers and environment (OMP_NUM_THREADS=1, free port) are those of test_torchrun.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from fourbit.distributed import Ranks  # noqa: E402
from fourbit.pipelines.calibrate import pipeline_forward_loop  # noqa: E402

from ..pipelines.tiny import save_sd_pipeline  # noqa: E402
from .test_torchrun import _check, one_process, rank_stderr, torchrun  # noqa: E402

VARIANT = "svdquant:w4a4:r4:g=8:alpha=0.5"
SIZE = ["--height", "16", "--width", "16", "--device", "cpu"]
PROMPTS = "a red fox in snow\na lighthouse at night, waves\na bowl of fruit on a table\n"
EVAL_PROMPTS = "a small house\na cat on a tree\na boat on a lake\n"
METRICS = ("lpips", "psnr", "ssim", "fd_vs_fp16", "weight_bits_per_element", "model_bytes", "config", "preset")


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("sd"))


class _RecordingPipe:
    """Stands in for a pipeline: records (prompt, first draw of the generator) for each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, **kw):
        self.calls.append((prompt, int(torch.randint(2**30, (1,), generator=generator))))


def test_each_rank_runs_its_share_of_the_prompts_with_the_global_seeds():
    prompts = [f"p{i}" for i in range(5)]
    pipes = []
    for ranks in (Ranks(), Ranks(0, 2), Ranks(1, 2)):
        pipe = _RecordingPipe()
        pipeline_forward_loop(pipe, prompts, seed=7, ranks=ranks, progress=False)(None)
        pipes.append(pipe.calls)
    single, rank0, rank1 = pipes
    assert [p for p, _ in rank0] == ["p0", "p2", "p4"] and [p for p, _ in rank1] == ["p1", "p3"]
    assert sorted(rank0 + rank1) == sorted(single)  # same prompt with the same seed as in one process


def one_stdout(logs, rank: int) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/stdout.log")
    return path.read_text()


def test_quantize_pipeline_on_two_processes_writes_the_same_folder(sd_path, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    args = ["quantize", "--pipeline", sd_path, "--variant", VARIANT, "--prompts", str(tmp_path / "prompts.txt"),
            "--calib-steps", "2", *SIZE]
    _check(one_process(args + ["--out", str(tmp_path / "one")]))
    _check(torchrun(args + ["--out", str(tmp_path / "two")], tmp_path / "logs"), tmp_path / "logs")
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and any(p.suffix == ".safetensors" for p in one)
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert not (tmp_path / "two.work").exists()  # no work folder under torchrun
    # rank 1 neither writes nor reports (diffusers/transformers may print their own loading lines)
    assert not [ln for ln in rank_stderr(tmp_path / "logs", 1) if ln.startswith("fourbit")]
    assert "wrote" in one_stdout(tmp_path / "logs", 0) and not one_stdout(tmp_path / "logs", 1).strip()


def test_quantize_pipeline_under_torchrun_refuses_a_work_folder(sd_path, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    args = ["quantize", "--pipeline", sd_path, "--variant", VARIANT, "--prompts", str(tmp_path / "prompts.txt"),
            "--calib-steps", "2", *SIZE, "--out", str(tmp_path / "q"), "--work", str(tmp_path / "w")]
    proc = torchrun(args, tmp_path / "logs")
    assert proc.returncode != 0
    for rank in (0, 1):
        (line,) = [ln for ln in rank_stderr(tmp_path / "logs", rank) if "--work" in ln]
        assert "one process only" in line and "torchrun" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "w").exists()


def test_compare_pipeline_on_two_processes_gives_the_same_report(sd_path, tmp_path):
    (tmp_path / "eval.txt").write_text(EVAL_PROMPTS)
    args = ["compare", "--pipeline", sd_path, "--variants", f"fp16,{VARIANT}", "--prompts",
            str(tmp_path / "eval.txt"), "--samples", "3", "--steps", "2", "--calib-samples", "3", "--calib-steps", "2",
            *SIZE]
    _check(one_process(args + ["--out", str(tmp_path / "one")]))
    _check(torchrun(args + ["--out", str(tmp_path / "two")], tmp_path / "logs"), tmp_path / "logs")
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert list(one["variants"]) == list(two["variants"]) == ["fp16", VARIANT]
    for name, row in one["variants"].items():
        for key in METRICS:
            assert row.get(key) == two["variants"][name].get(key), (name, key)
    assert one["variants"][VARIANT]["lpips"]["mean"] > 0  # a real comparison, not two empty ones
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()
    assert "lpips" in one_stdout(tmp_path / "logs", 0).lower() and not one_stdout(tmp_path / "logs", 1).strip()
