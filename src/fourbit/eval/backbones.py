"""ImageNet feature stacks used by LPIPS and FD: AlexNet and VGG16, in plain torch.

The layouts follow torchvision's ``alexnet().features`` / ``vgg16().features``. ``forward`` returns the five
ReLU outputs that LPIPS taps (AlexNet: relu1..relu5; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
Weights come from safetensors files written by ``scripts/fetch_lpips_weights.py`` (names ``convs.{i}.*``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# (out_channels, kernel, stride, padding, max-pool before this conv)
_ALEX = [
    (64, 11, 4, 2, False),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, True),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, False),
]
# VGG16 blocks: channels per conv; a 2x2 max-pool separates blocks; the last ReLU of each block is tapped.
_VGG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]

TAP_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
MIN_SIDE = {"alex": 31, "vgg": 16}  # smallest input side for which every tap is non-empty


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet ``features`` (5 convs, max-pool 3/2 after relu1 and relu2); returns 5 ReLU taps."""

    def __init__(self) -> None:
        super().__init__()
        convs, cin = [], 3
        for cout, k, s, p, _ in _ALEX:
            convs.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
            cin = cout
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: (N, 3, H, W), already LPIPS-scaled
        taps = []
        for conv, (_, _, _, _, pool_first) in zip(self.convs, _ALEX):
            if pool_first:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` up to relu5_3; returns the 5 block-final ReLU taps."""

    def __init__(self) -> None:
        super().__init__()
        convs, cin = [], 3
        for block in _VGG:
            for cout in block:
                convs.append(nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, i = [], 0
        for b, block in enumerate(_VGG):
            if b > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for _ in block:
                x = F.relu(self.convs[i](x))
                i += 1
            taps.append(x)
        return taps


def build_backbone(net: str) -> nn.Module:
    if net == "alex":
        return AlexNetFeatures()
    if net == "vgg":
        return VGG16Features()
    raise ValueError(f"unknown net {net!r}; expected 'alex' or 'vgg'")
