"""Image grids and a minimal PNG writer (zlib only, no Pillow): 8-bit greyscale or RGB."""

from __future__ import annotations

import os
import struct
import zlib

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | os.PathLike, pixels: torch.Tensor) -> None:
    """Write uint8 pixels ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) as a PNG file."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"write_png wants uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        h, w = pixels.shape
        colour_type, channels = 0, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        h, w, _ = pixels.shape
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"write_png wants (H, W) or (H, W, 3), got {tuple(pixels.shape)}")
    rows = pixels.contiguous().cpu().reshape(h, w * channels)  # (H, W*C)
    # Each scanline starts with filter type 0 (None).
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rows], dim=1).numpy().tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(data)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map float images in [-1, 1] to uint8 [0, 255] (clamped, rounded)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, pad_value: int = 255) -> torch.Tensor:
    """Tile ``(N, 1, H, W)`` images (float in [-1, 1] or uint8) into one uint8 ``(rows*(H+pad)+pad, ...)`` picture.

    ``nrow`` is the number of images per row.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"image_grid wants (N, 1, H, W), got {tuple(images.shape)}")
    imgs = images if images.dtype == torch.uint8 else to_uint8(images)
    n, _, h, w = imgs.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = imgs[k, 0].cpu()
    return grid


def save_png(path: str | os.PathLike, images: torch.Tensor, nrow: int = 10, pad: int = 2) -> None:
    """Save ``(N, 1, H, W)`` images in [-1, 1] as one grid PNG with ``nrow`` images per row."""
    write_png(path, image_grid(images, nrow=nrow, pad=pad))
