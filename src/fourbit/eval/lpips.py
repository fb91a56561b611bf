"""LPIPS (Zhang et al., 2018) with the trained ImageNet AlexNet and the official v0.1 linear heads.

d(x0, x1) = sum_l mean_{h,w} sum_c w_lc (u0_lchw - u1_lchw)^2, where u = f / (||f||_c + 1e-10) is the
channel-unit-normalised ReLU tap f of layer l, computed on (x - shift) / scale. Inputs are in [-1, 1].
Images whose shorter side is below ``min_size`` (default 64; 28x28 samples are too small for AlexNet's
stride) are bilinearly upsampled first. The bundled weights file is safetensors; nothing here unpickles.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ._checks import MetricUnavailable, check_pair, to_network_input
from .backbones import MIN_SIDE, TAP_CHANNELS, build_backbone

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED = {"alex": WEIGHTS_DIR / "lpips_alex.safetensors"}
ENV_VAR = {"alex": "FOURBIT_LPIPS_ALEX_WEIGHTS", "vgg": "FOURBIT_LPIPS_VGG_WEIGHTS"}
DEFAULT_MIN_SIZE = 64
EPS = 1e-10  # as in the reference implementation's normalize_tensor

_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


class LPIPS(nn.Module):
    """Scaling layer + backbone taps + 5 non-negative 1x1 heads (no bias)."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        self.net = net
        self.backbone = build_backbone(net)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS[net])
        self.register_buffer("shift", _SHIFT.clone(), persistent=False)
        self.register_buffer("scale", _SCALE.clone(), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw ReLU taps for (N, 3, H, W) input in [-1, 1]; 5 tensors (N, C_l, H_l, W_l)."""
        return self.backbone((x - self.shift) / self.scale)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) x2 -> (N,)
        n = x0.shape[0]
        feats = self.taps(torch.cat([x0, x1]))  # one pass over both halves
        total = x0.new_zeros(n)
        for f, head in zip(feats, self.heads):
            u = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)  # unit norm over channels
            d = (u[:n] - u[n:]).pow(2)  # (N, C_l, H_l, W_l)
            total = total + head(d).mean(dim=(1, 2, 3))  # spatial average of (N, 1, H_l, W_l)
        return total


def resolve_weights(net: str, weights: str | os.PathLike | None = None) -> Path:
    """The weights file for ``net``: argument, else env var, else the bundled file (AlexNet only)."""
    if net not in ENV_VAR:
        raise ValueError(f"unknown net {net!r}; expected 'alex' or 'vgg'")
    path = weights or os.environ.get(ENV_VAR[net]) or BUNDLED.get(net)
    if path is None:
        raise MetricUnavailable(
            f"LPIPS-{net} weights are not bundled; convert them with "
            f"`python scripts/fetch_lpips_weights.py --vgg-out FILE` and pass weights=FILE or set {ENV_VAR[net]}"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetricUnavailable(f"LPIPS-{net} weights file not found: {path}")
    return path


def lpips_available(net: str = "alex", weights: str | os.PathLike | None = None) -> tuple[bool, str | None]:
    """(True, None) if ``net`` can be loaded, else (False, reason)."""
    try:
        resolve_weights(net, weights)
    except MetricUnavailable as err:
        return False, str(err)
    return True, None


@functools.lru_cache(maxsize=4)
def _load(net: str, path: str, device: str) -> LPIPS:
    model = LPIPS(net)
    state = load_file(path)  # convs.{i}.weight/bias (OIHW), heads.{i}.weight (1, C, 1, 1)
    model.load_state_dict({("backbone." + k if k.startswith("convs.") else k): v for k, v in state.items()})
    if any(float(h.weight.min()) < 0 for h in model.heads):
        raise ValueError(f"{path}: LPIPS heads must be non-negative")
    return model.to(device).eval().requires_grad_(False)


def load_lpips(
    net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> LPIPS:
    """Cached, eval-mode LPIPS model. Raises MetricUnavailable when the weights are absent."""
    return _load(net, str(resolve_weights(net, weights)), str(torch.device(device)))


@torch.inference_mode()
def lpips(
    img0: torch.Tensor,
    img1: torch.Tensor,
    net: str = "alex",
    batch_size: int = 64,
    min_size: int | None = DEFAULT_MIN_SIZE,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per-pair LPIPS distance, a float32 CPU tensor (N,). Inputs: (N, C, H, W) in [-1, 1], C = 1 or 3.

    ``min_size``: images with a shorter side below it are bilinearly upsampled to it (None: never resize).
    ``device``: where the network runs (default: the inputs' device).
    """
    check_pair(img0, img1)
    device = torch.device(device) if device is not None else img0.device
    model = load_lpips(net, weights, device)
    out = []
    for i in range(0, img0.shape[0], batch_size):
        x0 = to_network_input(img0[i : i + batch_size].to(device), min_size, MIN_SIDE[net])
        x1 = to_network_input(img1[i : i + batch_size].to(device), min_size, MIN_SIDE[net])
        out.append(model(x0, x1).float().cpu())
    return torch.cat(out)
