"""1 process vs N processes (torchrun) of ``fourbit compare`` and ``fourbit quantize``, side by side in one run.

Each command runs as a fresh process group, alternately 1 and N processes, ``--repeats`` times; the figure is
the median whole-command wall time (start-up and model load included, as a user waits for it) and its ratio.
Every pair is also checked for equal results: the report's numbers (compare) and the checkpoint's bytes
(quantize). One row is appended to ``benchmarks/results/distributed.jsonl``.

    python benchmarks/distributed.py --nproc 2                      # on a 2-GPU machine
    python benchmarks/distributed.py --nproc 2 --device cpu --samples 8 --steps 2 --calib-samples 4 \
        --batch-size 2 --data-samples 0 --no-write                  # a CPU smoke run (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("lpips", "psnr", "ssim", "fd_vs_fp16", "fd_vs_data", "weight_bits_per_element", "model_bytes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, fourbit_args: list) -> float:
    """Run ``fourbit ARGS`` in 1 process or under torchrun; the wall seconds (raises on a non-zero exit)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fourbit", *fourbit_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "fourbit", *fourbit_args]
    env = {**os.environ, "FOURBIT_PROGRESS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall


def _same_report(a: dict, b: dict) -> bool:
    return list(a["variants"]) == list(b["variants"]) and all(
        a["variants"][v].get(k) == b["variants"][v].get(k) for v in a["variants"] for k in METRICS)


def run(args) -> dict:
    common = ["--samples", str(args.samples), "--steps", str(args.steps), "--calib-samples", str(args.calib_samples),
              "--batch-size", str(args.batch_size), "--data-samples", str(args.data_samples)]
    dev = ["--device", args.device] if args.device else []
    walls = {"compare": {1: [], args.nproc: []}, "quantize": {1: [], args.nproc: []}}
    identical = {"compare": True, "quantize": True}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            reports, ckpts = {}, {}
            for n in (1, args.nproc):
                out = Path(tmp) / f"compare-{n}-{r}"
                walls["compare"][n].append(_launch(n, ["compare", "--model", args.model, "--variants", args.variants,
                                                       *common, *dev, "--out", str(out)]))
                reports[n] = json.loads((out / "report.json").read_text())
                seconds[n] = {v: {k: row[k] for k in ("calibration_seconds", "sampling_seconds")}
                              for v, row in reports[n]["variants"].items()}
                ck = Path(tmp) / f"q-{n}-{r}.safetensors"
                walls["quantize"][n].append(_launch(n, ["quantize", "--model", args.model, "--variant",
                                                        args.quantize_variant, "--calib-samples",
                                                        str(args.calib_samples), "--calib-steps", str(args.steps),
                                                        "--batch-size", str(args.batch_size), *dev, "--out", str(ck)]))
                ckpts[n] = ck.read_bytes()
            identical["compare"] &= _same_report(reports[1], reports[args.nproc])
            identical["quantize"] &= ckpts[1] == ckpts[args.nproc]
    result = {}
    for cmd, per_n in walls.items():
        med1, medn = statistics.median(per_n[1]), statistics.median(per_n[args.nproc])
        result[cmd] = {"wall_s_1": med1, f"wall_s_{args.nproc}": medn, "speedup": med1 / medn,
                       "walls": {str(n): w for n, w in per_n.items()}, "identical_results": identical[cmd]}
    result["compare"]["rank0_seconds_last_repeat"] = {str(n): s for n, s in seconds.items()}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="fashion-dit")
    p.add_argument("--variants", default="fp16,svdquant:w4a4:r32")
    p.add_argument("--quantize-variant", default="svdquant:w4a4:r32")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-samples", type=int, default=1000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "distributed.jsonl"))
    p.add_argument("--no-write", action="store_true", help="print the row only")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _util import environment

    env = environment()
    commit = os.environ.get("FOURBIT_GIT_COMMIT")
    if not commit:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    row = {"benchmark": "distributed", "nproc": args.nproc,
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_write")},
           **run(args),
           "meta": {**{k: env[k] for k in ("device", "date", "torch", "triton", "cuda")}, "git_commit": commit,
                    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}}
    print(json.dumps(row, indent=1))
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
