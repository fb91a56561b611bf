"""The number-format interface shared by every format module.

A format quantizes a 2-D tensor ``x`` of shape (R, K) along its last dimension: R rows (output channels
of a weight, or tokens of an activation) and K input channels split into groups of ``group_size``.
Quantization returns integer ``codes`` (unpacked, one per element, int8 or uint8) plus the format's
scales; ``dequantize`` inverts it. ``pack``/``unpack`` turn codes into the bytes stored at rest.
Every format here is a plain-torch reference: kernels are tested against these functions.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class QuantizedTensor:
    """Codes and scales of one quantized 2-D tensor (R, K).

    codes:     (R, K) unpacked integer codes (int8 or uint8; the format documents the meaning).
    scales:    (R, K // group_size) per-group scales in the format's scale dtype
               (fp16/bf16, float8_e4m3fn, or an integer exponent for power-of-two formats).
    row_scale: optional fp32 scale per row (R, 1) or per tensor (1, 1), multiplied on top.
    """

    codes: Tensor
    scales: Tensor
    row_scale: Optional[Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


class Format(ABC):
    """A number format: reference quantize / dequantize / pack / unpack and its storage cost."""

    #: registry name, e.g. "int4"
    name: str = ""
    #: bits per stored code
    code_bits: int = 4
    #: default group size along K (None = one group per row)
    default_group_size: Optional[int] = 64
    #: whether the group size may be changed from the default
    fixed_group_size: bool = False

    def __init__(self, group_size: Optional[int] = None, **options: Any):
        if group_size is None:
            group_size = self.default_group_size
        elif self.fixed_group_size and group_size != self.default_group_size:
            raise ValueError(
                f"format {self.name!r} has a fixed group size of {self.default_group_size}; "
                f"got group_size={group_size}. Leave group_size unset for this format."
            )
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.group_size = group_size
        self.options = options

    # ---- group geometry -------------------------------------------------------------------
    def group_for(self, k: int) -> int:
        """The group size used for a row of length ``k`` (per-row formats use k)."""
        return k if self.group_size is None else self.group_size

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor (rows, K), got shape {tuple(x.shape)}")
        g = self.group_for(x.shape[1])
        if x.shape[1] % g:
            raise ValueError(
                f"{self.name}: K={x.shape[1]} is not a multiple of the group size {g}; pad K first"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: input contains NaN or Inf")

    # ---- the reference numerics -----------------------------------------------------------
    @abstractmethod
    def quantize(self, x: Tensor) -> QuantizedTensor:
        """Quantize x (R, K) float -> QuantizedTensor."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """QuantizedTensor -> (R, K) tensor of ``dtype``."""

    def fake_quantize(self, x: Tensor) -> Tensor:
        """dequantize(quantize(x)) in x's dtype: what a quantized operand looks like to the GEMM."""
        return self.dequantize(self.quantize(x), dtype=torch.float32).to(x.dtype)

    # ---- storage -------------------------------------------------------------------------
    def pack(self, codes: Tensor) -> Tensor:
        """(R, K) codes -> (R, K * code_bits / 8) uint8. Default: two 4-bit codes per byte, low nibble first."""
        if self.code_bits == 8:
            return codes.contiguous().view(torch.uint8)
        if self.code_bits != 4:
            raise NotImplementedError(f"{self.name}: pack for {self.code_bits}-bit codes")
        return pack_nibbles(codes)

    def unpack(self, packed: Tensor, k: int) -> Tensor:
        """Inverse of pack: (R, K * code_bits / 8) uint8 -> (R, K) codes of the format's code dtype."""
        if self.code_bits == 8:
            return packed.contiguous().view(self.code_dtype)[:, :k]
        return unpack_nibbles(packed, k, signed=self.code_dtype == torch.int8)

    #: dtype of unpacked codes
    code_dtype: torch.dtype = torch.int8

    @abstractmethod
    def scale_bits(self) -> float:
        """Bits of scale storage per group (the row/tensor scale is amortised separately)."""

    def bits_per_element(self, k: int = 4096) -> float:
        """Storage bits per element including group scales (and a per-row fp32 scale amortised over k)."""
        g = self.group_for(k)
        bits = self.code_bits + self.scale_bits() / g
        if self.has_row_scale:
            bits += 32.0 / k
        return bits

    has_row_scale: bool = False

    def spec(self) -> dict:
        """JSON-able description, enough to rebuild the format with ``make_format(**spec)``."""
        return {"name": self.name, "group_size": self.group_size, **self.options}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(group_size={self.group_size}{opts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Format) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.spec().items())))


# ---- shared helpers ---------------------------------------------------------------------------
def grouped(x: Tensor, group_size: int) -> Tensor:
    """(R, K) -> (R, K // g, g) view (K must be a multiple of g)."""
    r, k = x.shape
    return x.reshape(r, k // group_size, group_size)


def pack_nibbles(codes: Tensor) -> Tensor:
    """(R, K) 4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]) -> (R, ceil(K/2)) uint8, low nibble first."""
    r, k = codes.shape
    c = codes.to(torch.int16) & 0xF  # two's complement nibble
    if k % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    c = c.reshape(r, -1, 2)  # (R, K/2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: Tensor, k: int, signed: bool = True) -> Tensor:
    """(R, ceil(K/2)) uint8 -> (R, K) codes: int8 in [-8, 7] if signed else uint8 in [0, 15]."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    c = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]  # (R, K)
    if signed:
        c = torch.where(c >= 8, c - 16, c)
        return c.to(torch.int8)
    return c.to(torch.uint8)
