"""PSNR, SSIM and mean_ci: definitions, edge cases and errors."""

import math

import numpy as np
import pytest
import torch

from fourbit.eval import mean_ci, psnr, ssim


def _pair(seed: int = 0, shape=(4, 3, 28, 28), noise: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g) * 2 - 1
    return a, (a + noise * torch.randn(shape, generator=g)).clamp(-1, 1)


def _ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Reference for one (C, H, W) pair: Gaussian 11x11 sigma 1.5, valid region, population covariances."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    per_channel = []
    for xc, yc in zip(x, y):
        h, wd = xc.shape
        vals = []
        for i in range(h - 10):
            for j in range(wd - 10):
                px, py = xc[i : i + 11, j : j + 11], yc[i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cxy = (w * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_numpy_reference():
    a, b = _pair(shape=(2, 3, 16, 20))
    ours = ssim(a, b)
    for i in range(2):
        assert ours[i].item() == pytest.approx(_ssim_numpy(a[i].double().numpy(), b[i].double().numpy()), abs=1e-12)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _pair()
    ours = ssim(a, b)
    for i in range(a.shape[0]):
        ref = metrics.structural_similarity(
            a[i].double().numpy(), b[i].double().numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=2, channel_axis=0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)


def test_psnr_definition():
    a = torch.zeros(2, 1, 28, 28)
    assert psnr(a, a + 0.1).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2)  # 26.02 dB
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    ref = [skm.peak_signal_noise_ratio(x[i].double().numpy(), y[i].double().numpy(), data_range=2) for i in range(4)]
    assert psnr(x, y).tolist() == pytest.approx(ref, rel=1e-12)


def test_identical_and_constant_images():
    x, _ = _pair()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    c = torch.full((3, 1, 28, 28), 0.3)
    assert torch.allclose(ssim(c, c), torch.ones(3, dtype=torch.float64))
    s = ssim(c, -c)
    assert torch.isfinite(s).all() and (s < 1).all()
    assert torch.isfinite(psnr(c, -c)).all()


def test_errors():
    x, y = _pair()
    bad = y.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="img1: contains NaN or Inf"):
        ssim(x, bad)
    with pytest.raises(ValueError, match="img0: contains NaN or Inf"):
        psnr(bad, x)
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(x, y[:, :1])
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_mean_ci():
    v = torch.linspace(0, 1, 101)
    m, lo, hi = mean_ci(v, n_boot=500, seed=0)
    assert m == pytest.approx(0.5) and lo < m < hi
    assert mean_ci(v, n_boot=500, seed=0) == (m, lo, hi)
    assert mean_ci(np.array([2.0]), n_boot=100) == (2.0, 2.0, 2.0)
    p = torch.tensor([30.0, math.inf, 40.0])
    with pytest.raises(ValueError, match="cap"):
        mean_ci(p)
    assert mean_ci(p, n_boot=0, cap=100.0)[0] == pytest.approx(170 / 3)
