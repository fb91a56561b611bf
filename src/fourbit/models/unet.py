"""``fashion-unet``: a small class-conditional UNet of the DDPM / Stable Diffusion family.

28x28 -> 14x14 -> 7x7 and back. ResBlocks (GroupNorm, SiLU, 3x3 Conv2d, the time+class embedding added after
the first conv), self-attention over the 7x7 tokens, skip concatenations from every down-path output to the
matching up-path ResBlock. Convolutions are ``nn.Conv2d``; the embedding projections and the attention
projections are ``nn.Linear``. Output convolution starts at zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.models.embeddings import timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet. ``channels[i]`` is the width at resolution level i (level 0 = full size);
    ``attention_levels`` lists the levels with self-attention after each ResBlock."""

    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    groups: int = 32
    emb_dim: int = 256
    freq_dim: int = 64
    num_classes: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} cannot be halved {len(self.channels) - 1} times")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of groups {self.groups}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["attention_levels"] = list(self.channels), list(self.attention_levels)
        return d


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + Linear(emb), GroupNorm-SiLU-Conv, residual (1x1 conv when widths differ)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C, 1, 1) broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """GroupNorm, then multi-head attention over the H*W tokens with Linear qkv / out projections."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)  # (B, T, C)
        return x + self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level of the down or up path: ResBlocks, optional attention after each, optional resampler."""

    def __init__(
        self,
        resnets: list[ResBlock],
        attentions: list[SelfAttention] | None,
        resample: nn.Module | None,
        resample_name: str,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        setattr(self, resample_name, resample)


class FashionUNet(nn.Module):
    """``forward(x (B,C,H,W), t (B,) long, y (B,) long in 0..num_classes) -> eps (B,C,H,W)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, g, e, n = config.channels, config.groups, config.emb_dim, config.layers_per_level
        levels = len(ch)
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.class_embedding = nn.Embedding(config.num_classes + 1, e)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        def attn(i: int, c: int, count: int) -> list[SelfAttention] | None:
            return (
                [SelfAttention(c, config.num_heads, g) for _ in range(count)] if i in config.attention_levels else None
            )

        skips = [ch[0]]  # widths of the tensors pushed on the skip stack, in push order
        self.down_blocks = nn.ModuleList()
        c_prev = ch[0]
        for i, c in enumerate(ch):
            resnets = []
            for _ in range(n):
                resnets.append(ResBlock(c_prev, c, e, g))
                c_prev = c
                skips.append(c)
            down = Downsample(c) if i < levels - 1 else None
            if down is not None:
                skips.append(c)
            self.down_blocks.append(Level(resnets, attn(i, c, n), down, "downsample"))

        self.mid_block = Level(
            [ResBlock(c_prev, c_prev, e, g), ResBlock(c_prev, c_prev, e, g)],
            [SelfAttention(c_prev, config.num_heads, g)],
            None,
            "downsample",
        )

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            c = ch[i]
            resnets = []
            for _ in range(n + 1):
                resnets.append(ResBlock(c_prev + skips.pop(), c, e, g))
                c_prev = c
            up = Upsample(c) if i > 0 else None
            self.up_blocks.append(Level(resnets, attn(i, c, n + 1), up, "upsample"))
        assert not skips

        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(timestep_embedding(t, self.config.freq_dim).to(x.dtype)) + self.class_embedding(
            y
        )  # (B, E)
        h = self.conv_in(x)
        stack = [h]
        for level in self.down_blocks:
            for j, res in enumerate(level.resnets):
                h = res(h, emb)
                if level.attentions is not None:
                    h = level.attentions[j](h)
                stack.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                stack.append(h)
        h = self.mid_block.resnets[0](h, emb)
        h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, emb)
        for level in self.up_blocks:
            for j, res in enumerate(level.resnets):
                h = res(torch.cat([h, stack.pop()], dim=1), emb)  # skip concatenation on channels
                if level.attentions is not None:
                    h = level.attentions[j](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
