"""Shared helpers for the format tests: devices, test inputs, reference bounds."""
from __future__ import annotations

import torch

from fourbit.formats import Format, QuantizedTensor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Input kinds drawn by the property tests (each maps a seeded generator to an (R, K) fp32 tensor).
KINDS = ("normal", "heavy", "outliers", "zero_groups", "constant_groups", "uniform", "sparse")


def make_input(seed: int, r: int, k: int, kind: str, log10_scale: float, g: int = 16) -> torch.Tensor:
    """(R, K) fp32 test tensor of one kind, scaled by 10**log10_scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=gen)
    if kind == "heavy":  # Student-t like: normal / sqrt(chi2-ish)
        x = x / torch.rand(r, k, generator=gen).clamp_min(0.05)
    elif kind == "outliers":  # a few large input channels, as activations of diffusion transformers have
        cols = torch.randint(0, k, (max(1, k // 32),), generator=gen)
        x[:, cols] *= 50.0
    elif kind == "zero_groups":
        gk = k // g
        mask = torch.rand(r, gk, 1, generator=gen) < 0.4
        x = x.reshape(r, gk, g).masked_fill(mask, 0.0).reshape(r, k)
        x[0] = 0.0  # one all-zero row
    elif kind == "constant_groups":
        gk = k // g
        x = torch.randn(r, gk, 1, generator=gen).expand(r, gk, g).reshape(r, k).clone()
    elif kind == "uniform":
        x = torch.rand(r, k, generator=gen) * 2 - 1
    elif kind == "sparse":
        x = x * (torch.rand(r, k, generator=gen) < 0.1)
    return (x * 10.0 ** log10_scale).float()


def code_range(fmt: Format) -> torch.Tensor:
    """Every code the format may produce (``Format.all_codes``: e.g. -8..7, 0..15, fp8 without its NaN codes)."""
    return fmt.all_codes()


def candidates(fmt: Format, q: QuantizedTensor) -> torch.Tensor:
    """(C, R, K): the dequantized value of every code at every position, under q's own scales."""
    out = []
    for c in code_range(fmt).tolist():
        codes = torch.full_like(q.codes, c)
        out.append(fmt.dequantize(QuantizedTensor(codes, q.scales, q.row_scale)))
    return torch.stack(out)


def nearest_excess(fmt: Format, x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """|x - x^| minus the distance to the nearest representable value (<= tolerance if x^ is a nearest one)."""
    xf = x.float()
    err = (xf - fmt.dequantize(q)).abs()
    best = (candidates(fmt, q) - xf.unsqueeze(0)).abs().amin(dim=0)
    return err - best


def local_half_step(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Half the gap between the two grid points bracketing v (grid sorted ascending);
    below/above the grid: half the first/last gap (so saturation is allowed up to half a step)."""
    grid = grid.to(v.device, torch.float64)
    gaps = grid[1:] - grid[:-1]  # (n-1,)
    i = torch.bucketize(v.double().contiguous(), grid[1:-1].contiguous(), right=True)  # interval index 0..n-2
    return gaps[i] / 2


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum().clamp_min(1e-300)))


def tol(x: torch.Tensor) -> torch.Tensor:
    """Slack for fp32 rounding of x / s and of the dequantization product."""
    return 4e-7 * x.abs().double() + 1e-30
