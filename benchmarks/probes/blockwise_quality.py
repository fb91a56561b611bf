"""What block scales (cuBLAS's 1x128 for X, 128x128 for W) would cost in accuracy, on the CPU, per layer.

    python benchmarks/probes/blockwise_quality.py              # synthetic outlier layer + the two bundled models
    python benchmarks/probes/blockwise_quality.py --quick      # fewer calibration samples (a smoke test)

SVDQuant (rank 32, int4p2 weights and activations) is run as fourbit runs it; its smoothing and low-rank branch are
then kept and only the quantizers of X^ and of the residual R = W^ - L2 L1 change (the branch stays in fp32):
  int4p2 row                today's format: one fp32 scale per row, power-of-two exponents per 64 (the reference)
  int4p2 X 1x128, W 128x128 the same codes with the row scale per 1x128 block of X^ and per 128x128 block of R
  int4p2 X 1x128, W 1x128   ... and per (output row, 128 columns) of R
  int4 X 1x128, W ...       int4 codes round(x / s), s = max|block| / 7 in fp32, per block: what a block-scaled
                            FP8 GEMM (DeepSeek-V3 style) computes exactly with int4-valued FP8 operands
Prints the relative output error ||y - y_ref|| / ||y_ref|| per layer and the geometric mean per model; writes
blockwise_quality.jsonl under --out. K and N are zero-padded to multiples of 128 (padding changes no value).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests/helpers.py
from _util import RESULTS_DIR, md_table  # noqa: E402

BLOCK = 128


def pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int4p2_fake(x: torch.Tensor) -> torch.Tensor:
    from fourbit.formats import make_format

    return make_format("int4p2").fake_quantize(x.float())


def rows_of_blocks_x(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M * K/128, 128): one row per 1x128 block."""
    return x.reshape(-1, BLOCK)


def rows_of_blocks_w(w: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/128 * K/128, 128 * 128): one row per 128x128 block (row-major inside the block)."""
    n, k = w.shape
    return w.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK).permute(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)


def from_blocks_w(b: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return b.reshape(n // BLOCK, k // BLOCK, BLOCK, BLOCK).permute(0, 2, 1, 3).reshape(n, k)


def int4_block_fake(rows: torch.Tensor) -> torch.Tensor:
    """int4 per row of blocks: s = max|row| / 7 (fp32), round half to even, clamp to [-8, 7]."""
    s = (rows.abs().amax(1, keepdim=True) / 7.0).clamp(min=1e-30)
    return torch.clamp(torch.round(rows / s), -8, 7) * s


def _x_blocks(q):
    return lambda x: q(rows_of_blocks_x(x)).reshape(x.shape)


def _w_blocks(q):
    return lambda w: from_blocks_w(q(rows_of_blocks_w(w)), *w.shape)


#: (quantizer of X^ (M, K), quantizer of R (N, K)); "1x128" on W: one scale per output row and 128 columns
QUANTIZERS = {
    "int4p2 row": (int4p2_fake, int4p2_fake),
    "int4p2 X 1x128, W 128x128": (_x_blocks(int4p2_fake), _w_blocks(int4p2_fake)),
    "int4p2 X 1x128, W 1x128": (_x_blocks(int4p2_fake), _x_blocks(int4p2_fake)),
    "int4 X 1x128, W 128x128": (_x_blocks(int4_block_fake), _w_blocks(int4_block_fake)),
    "int4 X 1x128, W 1x128": (_x_blocks(int4_block_fake), _x_blocks(int4_block_fake)),
}


def layer_errors(w: torch.Tensor, x: torch.Tensor, state) -> dict:
    """Relative output error of each quantizer pair with ``state``'s smoothing and branch; w (N, K), x (M, K)."""
    n, k = w.shape
    kp, np_ = -(-max(k, state.weight.codes.shape[1]) // BLOCK) * BLOCK, -(-n // BLOCK) * BLOCK
    smooth = state.smooth if state.smooth is not None else torch.ones(state.weight.codes.shape[1])
    xs = pad_to(x.float(), x.shape[0], smooth.numel()) / smooth  # X^ = X / lambda (Kp columns)
    what = pad_to(w.float(), n, smooth.numel()) * smooth  # W^ = W lambda
    branch = torch.zeros(x.shape[0], n)
    resid = what
    if state.lr_down is not None:
        branch = (xs @ state.lr_down.float().t()) @ state.lr_up.float().t()
        resid = what - state.lr_up.float() @ state.lr_down.float()
    y_ref = x.float() @ w.float().t()
    xs_p, r_p = pad_to(xs, x.shape[0], kp), pad_to(resid, np_, kp)
    out = {}
    for name, (qa, qw) in QUANTIZERS.items():
        y = (qa(xs_p) @ qw(r_p).t())[:, :n] + branch
        out[name] = float((y - y_ref).norm() / y_ref.norm())
    return out


def svdquant_state(w, x):
    import fourbit
    from fourbit.calibration import LayerStats
    from fourbit.methods import get_transform

    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=32)
    rows = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:512]]
    return get_transform(cfg)(w.float(), LayerStats(x.abs().amax(0), rows, x.shape[0], 1), cfg)


def bundled_layers(name: str, samples: int, steps: int, max_rows: int = 4096):
    """(layer name, W, X rows) for every nn.Linear of bundled model ``name``, inputs captured while sampling."""
    from fourbit.models import load_pretrained
    from fourbit.sampling.calibration import calibration_forward_loop

    model = load_pretrained(name).eval()
    seen: dict = {}
    handles = []
    for lname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features >= 64 and mod.out_features >= 64:
            def hook(m, args, lname=lname):
                xs = args[0].detach().reshape(-1, args[0].shape[-1])
                seen.setdefault(lname, []).append(xs[:: max(1, xs.shape[0] // 256)])
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        calibration_forward_loop(samples, steps)(model)
    for h in handles:
        h.remove()
    mods = dict(model.named_modules())
    for lname, chunks in seen.items():
        x = torch.cat(chunks)[:max_rows]
        yield lname, mods[lname].weight.detach(), x


def main(argv=None) -> int:
    from _util import append_row, environment, run_meta
    from tests.helpers import outlier_layer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="4 samples x 4 steps, no JSONL row")
    args = p.parse_args(argv)
    samples, steps = (4, 4) if args.quick else (32, 10)
    torch.manual_seed(0)
    results, md_rows = [], []
    x, w = outlier_layer()
    sets = [("synthetic outlier layer", [("2048 x 1536 -> 1536", w, x)])]
    for model in ("fashion-dit", "fashion-unet"):
        sets.append((model, list(bundled_layers(model, samples, steps))))
    for label, layers in sets:
        per = []
        for lname, w_, x_ in layers:
            e = layer_errors(w_, x_, svdquant_state(w_, x_))
            per.append(e)
            results.append(dict(set=label, layer=lname, shape=list(w_.shape), rows=x_.shape[0], errors=e))
        geo = {q: math.exp(sum(math.log(max(e[q], 1e-12)) for e in per) / len(per)) for q in QUANTIZERS}
        worse = {q: sum(e[q] > e["int4p2 row"] for e in per) for q in QUANTIZERS}
        md_rows.append([label, len(per)] + [f"{geo[q]:.4f} ({worse[q]} worse)" for q in QUANTIZERS])
        print(label, len(per), "layers", {q: round(v, 4) for q, v in geo.items()}, flush=True)
    md = (f"relative output error per layer, geometric mean (layers worse than int4p2 row); SVDQuant r32's smoothing "
          f"and branch from int4p2; bundled models' inputs from {samples} samples x {steps} DDIM steps\n\n"
          + md_table(["set", "layers"] + list(QUANTIZERS), md_rows))
    print(md)
    if not args.quick:
        path, run = append_row(args.out, "blockwise_quality", {"variant": None, "result": {
            "samples": samples, "steps": steps, "layers": results}, "markdown": md}, run_meta(environment()))
        print(f"appended {run} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
