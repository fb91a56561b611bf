"""Input checks shared by the metrics. Images are float (N, C, H, W) in [-1, 1] with C = 1 or 3."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Values beyond this bound are taken as a scaling mistake (0..255 data, or unclamped samples gone wild).
RANGE_LIMIT = 1.5


class MetricUnavailable(RuntimeError):
    """A metric's weights are not present locally; ``str(err)`` says what to provide."""


def check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """Validate one image batch; returns it unchanged. Raises ValueError/TypeError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_LIMIT or hi > RANGE_LIMIT:
        raise ValueError(f"{name}: values must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")
    return x


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("img0", "img1")) -> None:
    """Validate two paired batches of the same shape."""
    check_images(a, names[0])
    check_images(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {names[0]} {tuple(a.shape)} vs {names[1]} {tuple(b.shape)}")


def to_network_input(x: torch.Tensor, min_size: int | None, min_side: int = 1) -> torch.Tensor:
    """float32, 3 channels, and bilinear upsampling so the shorter side is at least ``min_size``.

    Grey images are repeated to 3 channels. Images already at least ``min_size`` on the shorter side are left
    as they are; ``min_size=None`` never resizes. Raises ValueError if the result is below ``min_side``.
    """
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    h, w = x.shape[-2:]
    if min_size is not None and min(h, w) < min_size:
        s = min_size / min(h, w)
        size = (max(min_size, round(h * s)), max(min_size, round(w * s)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"images of {h}x{w} are too small for the network (min side {min_side}); set min_size")
    return x
