"""Means with percentile-bootstrap confidence intervals, for per-sample metrics (LPIPS, PSNR, SSIM)."""

from __future__ import annotations

import numpy as np
import torch


def as_float64(x, name: str) -> torch.Tensor:
    """torch or numpy -> float64 CPU tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.detach().to("cpu", torch.float64)


def percentile_interval(replicates: torch.Tensor, level: float) -> tuple[float, float]:
    """Lower and upper percentile of bootstrap replicates for a central ``level`` interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = (1.0 - level) / 2.0
    q = torch.quantile(replicates, torch.tensor([a, 1.0 - a], dtype=replicates.dtype))
    return float(q[0]), float(q[1])


def mean_ci(
    values, n_boot: int = 1000, seed: int = 0, level: float = 0.95, cap: float | None = None
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` (N,) and its percentile-bootstrap interval.

    ``cap`` clamps values from above first (e.g. PSNR's +inf for identical images); any value still not
    finite raises ValueError. With N = 1 or n_boot = 0 the interval collapses to the mean.
    """
    v = as_float64(values, "values").reshape(-1)  # (N,)
    if v.numel() == 0:
        raise ValueError("values: empty")
    if cap is not None:
        v = v.clamp(max=cap)
    if not torch.isfinite(v).all():
        raise ValueError("values: contains NaN or Inf (pass cap= to clamp +inf, e.g. PSNR of identical images)")
    mean = float(v.mean())
    if v.numel() == 1 or n_boot <= 0:
        return mean, mean, mean
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)  # (B, N)
    lo, hi = percentile_interval(v[idx].mean(dim=1), level)
    return mean, lo, hi
