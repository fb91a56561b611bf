"""``fashion-dit``: a small class-conditional Diffusion Transformer with adaLN-Zero blocks (DiT, Peebles & Xie 2023).

Each block modulates LayerNorm'd tokens with shift/scale/gate vectors computed by its own
``adaLN_modulation = Sequential(SiLU, Linear(d, 6d))`` from the conditioning vector c = emb(t) + emb(y), as in
DiT, PixArt (shared variant) and FLUX. The modulation and output layers start at zero, so each block starts as
the identity. Every matmul is a plain ``nn.Linear`` (``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``blocks.{i}.adaLN_modulation.1``); the patch embedding is a
``Conv2d`` with kernel = stride = patch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.models.embeddings import sincos_pos_embed_2d, timestep_embedding


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT. ``num_classes`` real classes plus one null class (index ``num_classes``) for CFG."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 2
    width: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10
    freq_dim: int = 256

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ``(B, T, D)``, shift/scale ``(B, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t -> MLP -> ``(B, width)``."""

    def __init__(self, width: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row for the null (unconditional) class."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: x += gate * f(modulate(norm(x)))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class FashionDiT(nn.Module):
    """``forward(x (B,C,H,W), t (B,) long, y (B,) long in 0..num_classes) -> eps (B,C,H,W)``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.width, config.patch_size
        self.grid = config.image_size // p
        self.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d, config.freq_dim)
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid)[None], persistent=True)  # (1, T, D)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.in_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, zeroed adaLN and output layers (so every block starts as identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, p*p*C)`` -> ``(B, C, H, W)``."""
        b, p, g, c = x.shape[0], self.config.patch_size, self.grid, self.config.in_channels
        x = x.reshape(b, g, g, p, p, c)  # (B, gh, gw, ph, pw, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
