"""Offline image-quality metrics. Images: float (N, C, H, W) in [-1, 1], C = 1 or 3.

- ``lpips``: LPIPS with the trained AlexNet and official heads (bundled safetensors); VGG from a local file.
- ``psnr``, ``ssim``: per-image similarity (data range 2).
- ``fd_features``, ``frechet_distance``, ``bootstrap_fd``: Frechet distance over AlexNet features ("FD-Alex").
- ``fid``: FID proper, only with local InceptionV3 weights (otherwise value None with a reason).
- ``mean_ci``: mean with a percentile-bootstrap interval.
- ``compare_images``: all of the above for generated samples vs paired reference samples (and real data).
See docs/metrics.md.
"""

from ._checks import MetricUnavailable
from .compare import compare_images
from .fd import bootstrap_fd, fd_features, frechet_distance, frechet_distance_from_stats
from .fid import fid, load_inception
from .lpips import load_lpips, lpips, lpips_available
from .similarity import psnr, ssim
from .stats import mean_ci

__all__ = [
    "MetricUnavailable",
    "bootstrap_fd",
    "compare_images",
    "fd_features",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_inception",
    "load_lpips",
    "lpips",
    "lpips_available",
    "mean_ci",
    "psnr",
    "ssim",
]
