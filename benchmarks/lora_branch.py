"""GPU cost of LoRAs in the low-rank branch: a Triton W4A4 layer with its rank-32 branch grown by a LoRA of rank
16 / 64 / 128 (``fourbit.lora.apply``), against the same layer without a LoRA and a bf16 nn.Linear, at FLUX.1
linear shapes, in one run.

    python benchmarks/lora_branch.py                  # GPU: appends rows to benchmarks/results/lora_branch.jsonl
    TRITON_INTERPRET=1 python benchmarks/lora_branch.py --tiny --out /tmp/x   # CPU smoke test (no timing)

Per (format, shape, tokens): every variant is captured as a CUDA graph of 12+ calls rotating over inputs larger
than L2, then all are replayed in turn for ``--rounds`` rounds; the number is the median ms per call (clock drift
touches every variant alike). Error: relative Frobenius error of the Triton layer against ``quant_linear_reference``
on the same LoRA'd layer and input (the kernels run the grown branch correctly). One row per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import InterleavedGraphs, environment, next_run  # noqa: E402

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)
TOKENS = (4608, 1024)
BASE_RANK = 32
LORA_RANKS = (16, 64, 128)
FORMATS = (("int4p2 W4A4", "int4p2"), ("int4 g64 W4A4 (paper)", "int4"))
TINY = dict(shapes=[(128, 192)], tokens=(48,), lora_ranks=(16,), formats=(("int4 g64 W4A4 (paper)", "int4"),))


def make_layer(k, n, fmt, device, dtype, kernel, seed=0):
    """A QuantLinear (K -> N) with random weight, smoothing factors, a rank-32 branch and a bias."""
    from fourbit.formats import make_format
    from fourbit.nn import QuantizedLinearState, QuantLinear

    g = torch.Generator(device=device).manual_seed(seed)
    f = make_format(fmt)
    w = torch.randn(n, k, device=device, generator=g) / k ** 0.5
    smooth = torch.rand(k, device=device, generator=g) * 1.5 + 0.5
    down = (torch.randn(BASE_RANK, k, device=device, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(n, BASE_RANK, device=device, generator=g) * 0.1).to(dtype)
    bias = (torch.randn(n, device=device, generator=g) * 0.1).to(dtype)
    state = QuantizedLinearState(f.quantize(w), f, f, smooth=smooth, lr_down=down, lr_up=up)
    return QuantLinear.from_state(state, k, bias, kernel=kernel, dtype=dtype).to(device)


def with_lora(layer, rank, seed=1):
    """A copy of ``layer`` (in a one-layer model) with a random LoRA of ``rank`` applied through fourbit.lora."""
    import copy

    import fourbit.lora

    model = nn.ModuleDict({"layer": copy.deepcopy(layer)})
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5
    b = torch.randn(layer.out_features, rank, generator=g) * 0.05
    fourbit.lora.apply(model, {"layer.lora_A.weight": a, "layer.lora_B.weight": b}, name=f"r{rank}")
    assert model["layer"].rank == BASE_RANK + rank
    return model["layer"]


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def git_commit() -> str:
    env = os.environ.get("FOURBIT_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(args, cfg, device, log=print) -> list:
    from fourbit.kernels.reference import quant_linear_reference

    dtype = torch.bfloat16
    rows = []
    for label, fmt in cfg["formats"]:
        for k, n in cfg["shapes"]:
            base = make_layer(k, n, fmt, device, dtype, "triton")
            layers = {"none": base, **{f"+{r}": with_lora(base, r) for r in cfg["lora_ranks"]}}
            w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
            bias = (torch.randn(n, device=device) * 0.1).to(dtype)
            for m in cfg["tokens"]:
                count = 1 if device == "cpu" else max(2, -(-(2 * 50 * 2 ** 20) // (m * k * 2)))  # > 2x L2
                xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(count)]
                errs = {v: rel_err(layer(xs[0]), quant_linear_reference(layer, xs[0])) for v, layer in layers.items()}
                ms = {v: None for v in ["bf16", *layers]}
                if device == "cuda":
                    timer = InterleavedGraphs()
                    timer.add([lambda x=x: F.linear(x, w, bias) for x in xs])
                    for layer in layers.values():
                        timer.add([lambda x=x, layer=layer: layer(x) for x in xs])
                    ms = dict(zip(ms, timer.run(args.rounds)))
                for v in ["bf16", *layers]:
                    rank = 0 if v == "bf16" else BASE_RANK + (0 if v == "none" else int(v[1:]))
                    row = {"format": label, "K": k, "N": n, "M": m, "variant": v, "branch_rank": rank, "ms": ms[v],
                           "rel_err_vs_reference": errs.get(v)}
                    if ms[v] is not None:
                        row["vs_bf16"] = ms["bf16"] / ms[v]  # > 1: faster than bf16
                        row["vs_no_lora"] = ms[v] / ms["none"] if v != "bf16" else None  # > 1: slower than rank 32
                    rows.append(row)
                    log(json.dumps(row))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, no timing (CPU smoke test; set TRITON_INTERPRET=1)")
    p.add_argument("--lora-ranks", default=",".join(map(str, LORA_RANKS)), help="comma-separated LoRA ranks")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("lora_branch.py needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1 for a smoke test)", file=sys.stderr)
        return 2
    ranks = tuple(int(r) for r in args.lora_ranks.split(",") if r)
    cfg = TINY if args.tiny else dict(shapes=SHAPES, tokens=TOKENS, lora_ranks=ranks, formats=FORMATS)
    env = environment()
    meta = {k: env[k] for k in ("device", "date", "torch", "triton", "cuda")}
    meta.update(git_commit=git_commit(), command="python benchmarks/lora_branch.py " + " ".join(argv or sys.argv[1:]))
    rows = measure(args, cfg, device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lora_branch.jsonl")
    run = next_run(path, meta["date"])
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": "lora_branch", "run": run, **row, "meta": meta}) + "\n")
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
