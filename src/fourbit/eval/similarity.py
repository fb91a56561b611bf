"""Per-image PSNR and SSIM for images in [-1, 1] (data range 2), computed in float64 on CPU.

PSNR = 10 log10(2^2 / MSE), MSE over all channels and pixels; identical images give +inf.
SSIM (Wang et al., 2004): 11x11 Gaussian window (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03,
population (not sample) covariances, the SSIM map averaged over the valid (unpadded) region, then over
channels. This is skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_pair

DATA_RANGE = 2.0
PSNR_CAP_DB = 100.0  # used when averaging: +inf (identical images) counts as 100 dB; the count is reported


def psnr(img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, float64 (N,); +inf where the images are identical."""
    check_pair(img0, img1)
    mse = (img0.double().cpu() - img1.double().cpu()).pow(2).mean(dim=(1, 2, 3))  # (N,)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse = 0 -> +inf


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    img0: torch.Tensor, img1: torch.Tensor, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image SSIM, float64 (N,), mean over channels. Images must be at least ``win_size`` on each side."""
    check_pair(img0, img1)
    n, c, h, w = img0.shape
    if h < win_size or w < win_size:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {win_size}x{win_size} window")
    x, y = img0.double().cpu(), img1.double().cpu()
    g = _gaussian_1d(win_size, sigma)
    kh = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)
    kw = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)

    def filt(t: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian filter, per channel
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)  # (N, C, H-10, W-10)

    c1, c2 = (k1 * DATA_RANGE) ** 2, (k2 * DATA_RANGE) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)  # (N,)

