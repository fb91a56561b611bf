"""Frechet distance between Gaussian fits of network features ("FD-Alex", "FD-VGG"; not FID).

FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), with unbiased covariances (N - 1),
in float64. Features (``fd_features``): for each of the five LPIPS ReLU taps, the spatial mean of the raw
activation (after the LPIPS scaling layer, before any normalisation), concatenated: 64+192+384+256+256 = 1152
dims for AlexNet, 1472 for VGG16. Images go through the same grey->RGB and small-image upsampling as LPIPS.
"""

from __future__ import annotations

import os

import torch

from ._checks import check_images, to_network_input
from .backbones import MIN_SIDE
from .lpips import DEFAULT_MIN_SIZE, load_lpips
from .stats import as_float64, percentile_interval


@torch.inference_mode()
def fd_features(
    images: torch.Tensor,
    net: str = "alex",
    batch_size: int = 64,
    min_size: int | None = DEFAULT_MIN_SIZE,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, D) float64 CPU features (D = 1152 for AlexNet)."""
    check_images(images, "images")
    device = torch.device(device) if device is not None else images.device
    model = load_lpips(net, weights, device)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = to_network_input(images[i : i + batch_size].to(device), min_size, MIN_SIDE[net])
        taps = model.taps(x)  # 5 x (B, C_l, H_l, W_l)
        out.append(torch.cat([t.mean(dim=(2, 3)) for t in taps], dim=1).cpu().double())  # (B, D)
    return torch.cat(out)


def _check_feats(f, name: str) -> torch.Tensor:
    f = as_float64(f, name)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected (N, D) features with N >= 2, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    return f


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) for symmetric PSD (D, D) matrices, via symmetric eigenvalues.

    With S1 = L L^T (Cholesky), L^T S2 L is similar to S1 S2 and symmetric; if S1 is singular the route is
    S1^1/2 from an eigendecomposition. Tiny negative eigenvalues from rounding are clipped to 0.
    """
    L, info = torch.linalg.cholesky_ex(s1)
    if int(info) == 0:
        m = L.T @ s2 @ L
    else:
        h = _sqrt_psd(s1)
        m = h @ s2 @ h
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(ev.clamp_min(0).sqrt().sum())


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D)."""
    mu1, mu2 = as_float64(mu1, "mu1"), as_float64(mu2, "mu2")
    s1, s2 = as_float64(sigma1, "sigma1"), as_float64(sigma2, "sigma2")
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    d = float((mu1 - mu2).pow(2).sum()) + float(s1.trace() + s2.trace()) - 2.0 * trace_sqrt_product(s1, s2)
    return max(d, 0.0)


def _fd(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor | None = None, wb: torch.Tensor | None = None) -> float:
    """FD of rows a (U, D) and b (V, D) with integer multiplicities wa (U,), wb (V,) (default 1 each).

    A bootstrap resample is its unique rows with their counts: the same statistics at a fraction of the cost.
    """
    wa = torch.ones(a.shape[0], dtype=a.dtype) if wa is None else wa
    wb = torch.ones(b.shape[0], dtype=b.dtype) if wb is None else wb
    n, m, dim = float(wa.sum()), float(wb.sum()), a.shape[1]
    mu_a, mu_b = wa @ a / n, wb @ b / m  # (D,)
    ca = (a - mu_a) * wa.sqrt()[:, None]  # (U, D): ca^T ca = scatter of the resample
    cb = (b - mu_b) * wb.sqrt()[:, None]  # (V, D)
    u, v = sorted((a.shape[0], b.shape[0]))
    if u * v * dim + u * u * v + 2 * u**3 < (u + v) * dim * dim + 4 * dim**3:  # rough flop counts of the routes
        # Few rows: the nonzero eigenvalues of S_a S_b are those of C C^T / ((n-1)(m-1)), C = ca cb^T (U, V),
        # so the trace term is the sum of C's singular values / sqrt((n-1)(m-1)); exact, no (D, D) algebra.
        tr_sqrt = float(torch.linalg.svdvals(ca @ cb.T).sum()) / ((n - 1) * (m - 1)) ** 0.5
        tr_a, tr_b = float(ca.pow(2).sum()) / (n - 1), float(cb.pow(2).sum()) / (m - 1)
        return max(float((mu_a - mu_b).pow(2).sum()) + tr_a + tr_b - 2.0 * tr_sqrt, 0.0)
    return frechet_distance_from_stats(mu_a, ca.T @ ca / (n - 1), mu_b, cb.T @ cb / (m - 1))


def frechet_distance(feats_a, feats_b) -> float:
    """FD between Gaussian fits of two feature sets (N, D) and (M, D), float64."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature size mismatch: feats_a D={a.shape[1]} vs feats_b D={b.shape[1]}")
    return _fd(a, b)


def bootstrap_fd_replicates(feats_a, feats_b, n_boot: int = 100, seed: int = 0) -> torch.Tensor:
    """(n_boot,) FD values, each on both sets resampled independently with replacement."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature size mismatch: feats_a D={a.shape[1]} vs feats_b D={b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(n_boot):
        ca = torch.bincount(torch.randint(0, a.shape[0], (a.shape[0],), generator=g), minlength=a.shape[0])
        cb = torch.bincount(torch.randint(0, b.shape[0], (b.shape[0],), generator=g), minlength=b.shape[0])
        ka, kb = ca > 0, cb > 0
        reps.append(_fd(a[ka], b[kb], ca[ka].double(), cb[kb].double()))
    return torch.tensor(reps, dtype=torch.float64)


INTERVALS = ("centered", "percentile")


def bootstrap_fd(
    feats_a, feats_b, n_boot: int = 100, seed: int = 0, level: float = 0.95, interval: str = "centered"
) -> tuple[float, float, float]:
    """(value, lo, hi): FD on the full sets and a ``level`` bootstrap interval from ``n_boot`` replicates.

    Replicates resample both sets with replacement. FD is biased upwards by roughly tr(S)/N, and a resample
    (about 63% distinct rows) is more biased still, so at N below a few times D the replicates lie wholly
    above the value. ``interval="percentile"`` gives the raw percentiles of the replicates (then often
    lo > value); ``"centered"`` (default) shifts the replicates so their mean is the value and takes
    percentiles of that: the sampling spread around the value (lo clipped at 0). Compare variants at equal
    sample counts.
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
    value = frechet_distance(feats_a, feats_b)
    if n_boot <= 0:
        return value, value, value
    reps = bootstrap_fd_replicates(feats_a, feats_b, n_boot, seed)
    if interval == "centered":
        reps = reps - (reps.mean() - value)
    lo, hi = percentile_interval(reps, level)
    return value, max(lo, 0.0), hi  # FD >= 0; a centred lo can dip below 0 at tiny N
