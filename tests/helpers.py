"""Small models and synthetic layers shared by tests."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear and Conv2d layers, one input size that is not a multiple of 64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 64)
        self.odd = nn.Linear(64, 40)
        self.head = nn.Linear(40, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv2(h)).flatten(1)
        h = torch.relu(self.fc(h))
        return self.head(torch.relu(self.odd(h)))


def tiny_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def loop_over(batches):
    def forward_loop(model):
        for b in batches:
            model(b)

    return forward_loop


def outlier_layer(m=2048, k=1536, n=1536, seed=0, outlier_frac=0.01):
    """The issue's synthetic layer: Gaussian W plus a rank-8 component; 1% of input channels scaled 20-50x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w += (torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)) / k**0.5
    x = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[: max(1, int(k * outlier_frac))]
    x[:, idx] *= 20 + 30 * torch.rand(len(idx), generator=g)
    return x, w


class SingleBlock(nn.Module):
    """FLUX's single block in small: a query projection and an MLP input read one input (siblings), tanh-GELU on the
    MLP's output, the two concatenated."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.to_q, self.proj_mlp = nn.Linear(d, d), nn.Linear(d, h)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return torch.cat([self.to_q(x), self.act(self.proj_mlp(x))], -1)
