"""FID proper: the FID InceptionV3 (TF ``inception-2015-12-05`` weights as ported by pytorch-fid), optional.

Nothing is downloaded. Give a local safetensors file through ``weights=`` or ``FOURBIT_INCEPTION_WEIGHTS``;
convert the usual ``pt_inception-2015-12-05-6726825d.pth`` once with
``python scripts/convert_inception_weights.py FILE.pth OUT.safetensors`` (the library never unpickles).
Without weights, ``fid`` returns ``{"value": None, "reason": ...}`` and callers skip.

Preprocessing matches pytorch-fid on float input: grey -> RGB, bilinear resize to 299x299
(align_corners=False), inputs in [-1, 1]. Features: the 2048-d global average pool after Mixed_7c.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ._checks import MetricUnavailable, check_images
from .fd import bootstrap_fd

ENV_VAR = "FOURBIT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; parameter names as torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:  # TF-style 3x3 average pool: padding excluded from the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35; out 224 + pool_features
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):  # 35 -> 17; out 384 + 96 + cin
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # 17x17, factorised 7x7; out 768
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 convs
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, h[0], padding=h[1])
        self.branch7x7_3 = ConvBN(c7, 192, v[0], padding=v[1])
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_3 = ConvBN(c7, c7, h[0], padding=h[1])
        self.branch7x7dbl_4 = ConvBN(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_5 = ConvBN(c7, 192, h[0], padding=h[1])
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):  # 17 -> 8; out 320 + 192 + cin
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8x8; out 2048. The FID net's last block pools with max, the one before with avg.
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 trunk of the FID network; ``forward`` gives the (N, 2048) pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 299, 299) in [-1, 1] -> (N, 2048)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The local safetensors file, from the argument or ``FOURBIT_INCEPTION_WEIGHTS``; else MetricUnavailable."""
    path = weights or os.environ.get(ENV_VAR)
    if not path:
        raise MetricUnavailable(f"FID needs local InceptionV3 weights: pass weights=FILE or set {ENV_VAR}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetricUnavailable(f"InceptionV3 weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise MetricUnavailable(
            f"{path}: expected a .safetensors file; convert with scripts/convert_inception_weights.py"
        )
    return path


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str) -> FIDInceptionV3:
    model = FIDInceptionV3()
    state = {k: v for k, v in load_file(path).items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Cached eval-mode FID InceptionV3. Raises MetricUnavailable without local weights."""
    return _load(str(resolve_inception_weights(weights)), str(torch.device(device)))


@torch.inference_mode()
def inception_features(
    images: torch.Tensor, model: nn.Module, batch_size: int = 50, device: str | torch.device | None = None
) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 2048) float64 CPU pool features."""
    check_images(images, "images")
    device = torch.device(device) if device is not None else images.device
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        out.append(model(x).cpu().double())
    return torch.cat(out)


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    weights: str | os.PathLike | None = None,
    n_boot: int = 0,
    seed: int = 0,
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> dict:
    """FID between two image sets: {"name", "value", "lo", "hi", "n_a", "n_b", "reason"}.

    Without local weights: value/lo/hi are None and "reason" says why. ``n_boot`` > 0 adds a bootstrap CI.
    """
    out = {"name": "FID", "value": None, "lo": None, "hi": None,
           "n_a": int(images_a.shape[0]), "n_b": int(images_b.shape[0]), "reason": None}
    try:
        model = load_inception(weights, device if device is not None else images_a.device)
    except MetricUnavailable as err:
        out["reason"] = str(err)
        return out
    fa = inception_features(images_a, model, batch_size, device)
    fb = inception_features(images_b, model, batch_size, device)
    out["value"], out["lo"], out["hi"] = bootstrap_fd(fa, fb, n_boot=n_boot, seed=seed)
    return out
