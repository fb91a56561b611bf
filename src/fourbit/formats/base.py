"""The number-format interface shared by every format module.

A format quantizes a 2-D tensor ``x`` of shape (R, K) along its last dimension: R rows (output channels
of a weight, or tokens of an activation) and K input channels split into groups of ``group_size``.
Quantization returns integer ``codes`` (unpacked, one per element, int8 or uint8) plus the format's
scales; ``dequantize`` inverts it. ``pack``/``unpack`` turn codes into the bytes stored at rest.
Every format here is a plain-torch reference (CPU and CUDA): kernels are tested against these functions.

What a format object tells storage code (checkpoints, meta-device skeletons):

- ``code_dtype``  dtype of unpacked codes (int8 or uint8); ``code_bits`` bits per code at rest.
- ``scale_dtype`` dtype of ``QuantizedTensor.scales`` as stored (fp16/bf16/fp32, float8_e4m3fn, or an
  integer exponent: uint8 for E8M0, int8 for the power-of-two formats). May depend on options, so read it
  from the format object, not the class.
- ``has_row_scale`` whether ``row_scale`` (always fp32) is present; ``row_scale_shape(r)`` gives its shape,
  (r, 1) per row or (1, 1) per tensor. May depend on options (instance attribute).
- ``storage_shapes(r, k)`` all of the above for one (R, K) tensor: packed codes, scales, row scale.
- ``picks_nearest`` False for formats that do not round to nearest by design (QuaRTZ truncation).
- ``fp8_exact`` True when every dequantized value is (e4m3 value) * row_scale exactly, so the format folds
  into an FP8 GEMM with row/column scales (the formats then have ``to_fp8_operand(q)``).
"""
from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

_FINITE_CHECK: ContextVar[bool] = ContextVar("fourbit_finite_check", default=True)


@contextmanager
def skip_finite_check():
    """Inside this block quantize() does not scan its input for NaN/Inf (a full extra pass).

    Used by the forward pass of quantized layers, where activations are quantized every call; weights and
    calibration data are always checked.
    """
    token = _FINITE_CHECK.set(False)
    try:
        yield
    finally:
        _FINITE_CHECK.reset(token)



@dataclass
class QuantizedTensor:
    """Codes and scales of one quantized 2-D tensor (R, K).

    codes:     (R, K) unpacked integer codes (int8 or uint8; the format documents the meaning).
    scales:    (R, K // group_size) per-group scales in the format's ``scale_dtype``
               (fp16/bf16/fp32, float8_e4m3fn, or an integer exponent for power-of-two formats).
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
    #: dtype of unpacked codes
    code_dtype: torch.dtype = torch.int8
    #: dtype of ``QuantizedTensor.scales`` as stored (formats with a scale_dtype option set it per instance)
    scale_dtype: torch.dtype = torch.float16
    #: whether ``QuantizedTensor.row_scale`` (fp32) is present (may be set per instance by an option)
    has_row_scale: bool = False
    #: row_scale granularity when present: "row" -> (R, 1), "tensor" -> (1, 1)
    row_scale_kind: str = "row"
    #: dequantized values are exactly e4m3(operand) * row_scale (see ``to_fp8_operand`` on such formats)
    fp8_exact: bool = False
    #: quantize returns a nearest representable value under the scales it chose (False for formats that
    #: truncate by design, e.g. QuaRTZ); the generic tests check nearest-ness only where this is True
    picks_nearest: bool = True

    def __init__(self, group_size: Optional[int] = None, **options: Any):
        if group_size is None:
            group_size = self.default_group_size
        elif self.fixed_group_size and group_size != self.default_group_size:
            raise ValueError(
                f"format {self.name!r} has a fixed group size of {self.default_group_size}; "
                f"got group_size={group_size}. Leave group_size unset for this format."
            )
        if group_size is not None:
            try:
                group_size = operator.index(group_size)  # ints, numpy ints; not floats
            except TypeError:
                raise ValueError(f"group_size must be a positive int, got {group_size!r}") from None
            if group_size <= 0:
                raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.group_size = group_size
        self.options = options

    def _set_scale_dtype(self, value: str, allowed: tuple) -> None:
        """Validate the ``scale_dtype`` option (a torch dtype name from ``allowed``) and apply it."""
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{self.name}: scale_dtype must be one of {choices}, got {value!r}")
        self.scale_dtype = getattr(torch, value)

    # ---- group geometry -------------------------------------------------------------------
    def group_for(self, k: int) -> int:
        """The group size used for a row of length ``k`` (per-row formats use k)."""
        return k if self.group_size is None else self.group_size

    def check_input(self, x: Tensor) -> Tensor:
        """Validate x (2-D, K > 0 and a multiple of the group, finite) and return it as fp32."""
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor (rows, K), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"{self.name}: K must be positive, got shape {tuple(x.shape)}")
        g = self.group_for(x.shape[1])
        if x.shape[1] % g:
            raise ValueError(
                f"{self.name}: K={x.shape[1]} is not a multiple of the group size {g}; pad K first"
            )
        xf = x.float()
        if _FINITE_CHECK.get() and not torch.isfinite(xf).all():
            raise ValueError(f"{self.name}: input contains NaN or Inf (or values beyond the fp32 range)")
        return xf

    def row_scale_shape(self, r: int) -> Optional[tuple[int, int]]:
        """Shape of ``row_scale`` for R rows: (r, 1), (1, 1), or None when the format has none."""
        if not self.has_row_scale:
            return None
        return (1, 1) if self.row_scale_kind == "tensor" else (r, 1)

    def storage_shapes(self, r: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one (R, K) tensor stores: {"codes": packed, "scales": ..., ["row_scale": ...]} -> (shape, dtype)."""
        out = {
            "codes": ((r, (k * self.code_bits + 7) // 8), torch.uint8),
            "scales": ((r, k // self.group_for(k)), self.scale_dtype),
        }
        rs = self.row_scale_shape(r)
        if rs is not None:
            out["row_scale"] = (rs, torch.float32)
        return out

    # ---- the reference numerics -----------------------------------------------------------
    @abstractmethod
    def quantize(self, x: Tensor) -> QuantizedTensor:
        """Quantize x (R, K) float -> QuantizedTensor."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """QuantizedTensor -> (R, K) tensor of ``dtype`` (computed in fp32, then cast)."""

    def fake_quantize(self, x: Tensor) -> Tensor:
        """dequantize(quantize(x)) in x's dtype: what a quantized operand looks like to the GEMM."""
        return self.dequantize(self.quantize(x), dtype=torch.float32).to(x.dtype)

    # ---- storage -------------------------------------------------------------------------
    def pack(self, codes: Tensor) -> Tensor:
        """(R, K) codes -> (R, ceil(K * code_bits / 8)) uint8. 4-bit: two codes per byte, low nibble first."""
        if self.code_bits == 8:
            return codes.contiguous().view(torch.uint8)
        if self.code_bits != 4:
            raise NotImplementedError(f"{self.name}: pack for {self.code_bits}-bit codes")
        return pack_nibbles(codes)

    def unpack(self, packed: Tensor, k: int) -> Tensor:
        """Inverse of pack: (R, ceil(K * code_bits / 8)) uint8 -> (R, K) codes of the format's code dtype."""
        if self.code_bits == 8:
            return packed.contiguous().view(self.code_dtype)[:, :k]
        return unpack_nibbles(packed, k, signed=self.code_dtype == torch.int8)

    def all_codes(self) -> Tensor:
        """Every code ``quantize`` may produce, 1-D in ``code_dtype`` (the whole code width; fp8 leaves out NaN)."""
        n = 1 << self.code_bits
        if self.code_dtype == torch.int8:
            return torch.arange(-(n // 2), n // 2, dtype=torch.int8)
        return torch.arange(0, n, dtype=torch.int16).to(torch.uint8)

    @abstractmethod
    def scale_bits(self) -> float:
        """Bits of scale storage per group (the row/tensor scale is amortised separately)."""

    def bits_per_element(self, k: int = 4096, rows: Optional[int] = None) -> float:
        """Storage bits per element: code + group scale / g + fp32 row scale amortised over k.

        A per-tensor scale (row_scale_kind "tensor") is 32 bits for the whole tensor: it is amortised over
        rows * k when ``rows`` is given and counted as 0 otherwise (< 0.01 bit for any tensor of 4096+ elements).
        """
        g = self.group_for(k)
        bits = self.code_bits + self.scale_bits() / g
        if self.has_row_scale:
            if self.row_scale_kind == "tensor":
                bits += 0.0 if rows is None else 32.0 / (rows * k)
            else:
                bits += 32.0 / k
        return bits

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
    """(R, K) 4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]) -> (R, ceil(K/2)) uint8, low nibble first.

    Element 2j goes to bits 0-3 of byte j and element 2j+1 to bits 4-7 (signed codes as two's complement
    nibbles); an odd K is padded with a zero nibble.
    """
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


def pow2(e: Tensor) -> Tensor:
    """Exact 2**e as fp32 for integer e in [-149, 127], built from the bit pattern (no libm, any device)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(1, 254) << 23  # 2^e for e in [-126, 127]
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)  # 2^e for e in [-149, -127] (fp32 subnormals)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def saturating_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 -> dtype, round to nearest even, values beyond the dtype's largest finite value clamp to it."""
    big = torch.finfo(dtype).max
    return x.float().clamp(-big, big).to(dtype)


def next_up(s: Tensor) -> Tensor:
    """The next representable value above each non-negative finite ``s`` (same float dtype, any width)."""
    iv = _INT_VIEW[s.element_size()]
    return (s.contiguous().view(iv) + 1).view(s.dtype)


def cast_scale(amax: Tensor, qmax: float, limit: float, dtype: torch.dtype) -> Tensor:
    """Group scale ``amax / qmax`` stored in ``dtype``: nearest value, saturating at the dtype's maximum.

    Rounding a scale down makes ``amax / s`` exceed ``qmax``; codes clamp there. Where that would put the
    group maximum beyond ``limit`` (the largest |x/s| whose clamping error stays within half a step), the
    next value up is used instead. With fp16/bf16/e4m3 this only happens for subnormal (or zero) scales,
    i.e. groups whose amax is below the dtype's normal range times qmax. amax = 0 gives scale 0.
    """
    amax = amax.float()
    s = saturating_cast(div_scalar(amax, qmax), dtype)
    sf = s.float()
    bump = (amax > limit * sf) & (sf < torch.finfo(dtype).max)
    return torch.where(bump, next_up(s), s)


def div_scalar(a: Tensor, b: float) -> Tensor:
    """a / b correctly rounded on every device. PyTorch's CUDA kernel turns division by a Python (CPU) scalar
    into multiplication by its reciprocal, which differs from CPU in the last bit; dividing by a 0-dim
    tensor on a's device keeps CPU and CUDA results identical."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def reciprocal(t: Tensor) -> Tensor:
    """1 / t correctly rounded on every device (a tensor-by-tensor division: see ``div_scalar``)."""
    return torch.ones_like(t) / t


def safe_divisor(s: Tensor) -> Tensor:
    """s with zeros replaced by 1 (a zero scale means an all-zero group: codes 0, no NaN)."""
    return torch.where(s != 0, s, torch.ones_like(s))
