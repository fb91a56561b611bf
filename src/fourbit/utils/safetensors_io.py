"""Reading safetensors files into tensors that own aligned memory.

``safe_open(...).get_tensor`` may hand back a tensor whose data starts at any 8-byte offset. CPU matmul kernels
pick their code path by alignment, so such a weight gives (slightly) different results from the same values in
memory torch allocated (64-byte aligned): a reloaded model would not reproduce the one that was saved, bit for bit.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import torch

#: torch's CPU allocator aligns to 64 bytes; a tensor whose data starts elsewhere is copied
ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its data starts on an ``ALIGNMENT``-byte boundary (or it is empty), else a copy that does."""
    if t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def read_safetensors(path: Union[str, os.PathLike], keys: Optional[Iterable[str]] = None,
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: every tensor (or those named in ``keys``), each aligned."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=device) as f:
        names = list(f.keys()) if keys is None else list(keys)
        return {k: aligned(f.get_tensor(k)) for k in names}, dict(f.metadata() or {})
