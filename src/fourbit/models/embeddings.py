"""Fixed sinusoidal embeddings shared by the bundled models."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` ``(B,)`` -> ``(B, dim)`` float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table for a ``grid x grid`` token map -> ``(grid*grid, dim)``, row-major tokens.

    Half of the channels encode the row, half the column (as in MAE / DiT).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None]  # (grid, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (grid, dim/2)

    rows = one_axis(coords)[:, None, :].expand(grid, grid, dim // 2)
    cols = one_axis(coords)[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()
