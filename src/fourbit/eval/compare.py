"""One call that compares generated samples with paired reference samples (and optionally real data)."""

from __future__ import annotations

import os

import torch

from ._checks import check_images, check_pair
from .fd import bootstrap_fd, fd_features
from .fid import fid
from .lpips import DEFAULT_MIN_SIZE, lpips
from .similarity import PSNR_CAP_DB, psnr, ssim
from .stats import mean_ci

NET_NAMES = {"alex": "Alex", "vgg": "VGG"}


def _summary(name: str, values: torch.Tensor, n_boot: int, seed: int, level: float, **extra) -> dict:
    m, lo, hi = mean_ci(values, n_boot=n_boot, seed=seed, level=level, cap=extra.get("cap_db"))
    return {"name": name, "mean": m, "lo": lo, "hi": hi, "n": int(values.numel()), **extra}


def _fd(name: str, fa: torch.Tensor, fb: torch.Tensor, n_boot: int, seed: int, level: float) -> dict:
    v, lo, hi = bootstrap_fd(fa, fb, n_boot=n_boot, seed=seed, level=level)
    return {"name": name, "value": v, "lo": lo, "hi": hi, "n_a": int(fa.shape[0]), "n_b": int(fb.shape[0])}


def compare_images(
    samples: torch.Tensor,
    reference: torch.Tensor,
    data: torch.Tensor | None = None,
    *,
    net: str = "alex",
    min_size: int | None = DEFAULT_MIN_SIZE,
    n_boot: int = 1000,
    fd_n_boot: int = 100,
    seed: int = 0,
    level: float = 0.95,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    weights: str | os.PathLike | None = None,
    fid_weights: str | os.PathLike | None = None,
) -> dict:
    """Compare ``samples`` (N, C, H, W) with paired ``reference`` (same shape, same seeds/classes) in [-1, 1].

    Returns a JSON-friendly dict:
      n_samples, n_reference, n_data
      lpips, psnr, ssim: {name, mean, lo, hi, n} per-pair means with ``level`` bootstrap CIs (``n_boot``
        resamples of the pairs); psnr adds n_inf (identical pairs) and cap_db (their value in the mean)
      fd_vs_reference: {name: "FD-Alex", value, lo, hi, n_a, n_b} (``fd_n_boot`` resamples)
      fd_vs_data: the same against ``data`` (any count, same C/H/W handling), or None without data
      fid_vs_data: FID with CI if local Inception weights are given (``fid_weights`` or
        FOURBIT_INCEPTION_WEIGHTS), else {value: None, reason}; None without data
      settings: the parameters used
    """
    check_pair(samples, reference, ("samples", "reference"))
    if data is not None:
        check_images(data, "data")
    tag = NET_NAMES.get(net, net)
    kw = dict(net=net, batch_size=batch_size, min_size=min_size, weights=weights, device=device)

    out: dict = {"n_samples": int(samples.shape[0]), "n_reference": int(reference.shape[0]),
                 "n_data": None if data is None else int(data.shape[0])}
    out["lpips"] = _summary(f"LPIPS-{tag}", lpips(samples, reference, **kw), n_boot, seed, level)
    p = psnr(samples, reference)
    out["psnr"] = _summary("PSNR", p, n_boot, seed, level, unit="dB",
                           n_inf=int(torch.isinf(p).sum()), cap_db=PSNR_CAP_DB)
    out["ssim"] = _summary("SSIM", ssim(samples, reference), n_boot, seed, level)

    f_s, f_r = fd_features(samples, **kw), fd_features(reference, **kw)
    out["fd_vs_reference"] = _fd(f"FD-{tag}", f_s, f_r, fd_n_boot, seed, level)
    out["fd_vs_data"] = None if data is None else _fd(f"FD-{tag}", f_s, fd_features(data, **kw), fd_n_boot, seed, level)
    out["fid_vs_data"] = None if data is None else fid(samples, data, weights=fid_weights, n_boot=fd_n_boot,
                                                        seed=seed, device=device)
    out["settings"] = {"net": net, "min_size": min_size, "n_boot": n_boot, "fd_n_boot": fd_n_boot, "seed": seed,
                       "level": level, "fd_features": f"{net} relu1-5 spatial means, concatenated ({f_s.shape[1]}-d)"}
    return out
