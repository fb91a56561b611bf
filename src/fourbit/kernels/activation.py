"""Activations applied to a range of a layer's output columns in the GEMM epilogue.

    y[:, lo:hi] = act(y[:, lo:hi])        act: "gelu_tanh" | "gelu" | "silu"

Fusing the activation that follows a linear layer (FLUX's MLP GELU, also when the MLP input projection is fused
with Q/K/V as one sibling group, hence a column range) saves a read and a write of the layer's output. The kernel
applies it to the fp32 epilogue value before the one rounding to the output type; the unfused graph rounds the
linear's output first, then the activation's. The two differ by at most about one rounding of the output type.

``OutputActivation`` describes it, ``activation_torch`` is the plain-torch twin of the epilogue step (fp32), and
``apply_rounded`` is what paths without the fused epilogue run (the unfused semantics, in place on the output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting

try:  # the GPU's tanhf (libdevice; the interpreter never calls it)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

#: compiled kernels: the tanh-GELU as torch's CUDA kernel computes it (libdevice tanhf, its order of operations),
#: so the fused fp32 epilogue gives eager's values; the interpreter (no libdevice tanh) keeps the sigmoid form.
#: For 16-bit outputs the compiled epilogue takes the GPU's tanh.approx.f32 instead (one MUFU op): libdevice's
#: tanhf branches per element (sm_90 SASS of the 128 x 256 epilogue: 4096 instructions with 113 divergent regions
#: against 1200 without the activation) and made PixArt-Sigma's fc1 (8192 x 1152 -> 4608) take 0.26 ms in the
#: compiled step against 0.13 ms without the GELU (H200, 2026-12-05 profile)
_TORCH_GELU_TANH: tl.constexpr = tl.constexpr(not interpreting())
#: tanh.approx.f32's absolute error, assumed at most 2^-10 (the GPU test checks the bound it implies): the fast
#: GELU is within |y| * TANH_APPROX_ERR / 2 = |y| 2^-11 of the exact one, within a bf16 ulp (2^-8 relative) where
#: GELU(y) >= |y| / 8 (y >= -1.15); below, in the tail where GELU(y) is small, at most |y| 2^-11 absolute
TANH_APPROX_ERR = 2.0 ** -10

#: kind -> the epilogue's constexpr code (0: none)
CODES = {"gelu_tanh": 1, "gelu": 2, "silu": 3}


@dataclass(frozen=True)
class OutputActivation:
    """``kind`` applied to output columns [lo, hi) (hi None: to the last column)."""

    kind: str
    lo: int = 0
    hi: Optional[int] = None

    def __post_init__(self):
        if self.kind not in CODES:
            raise ValueError(f"output activation {self.kind!r} is not one of {sorted(CODES)}")
        if self.lo < 0 or (self.hi is not None and self.hi < self.lo):
            raise ValueError(f"output activation columns [{self.lo}, {self.hi}) are not a range")

    @property
    def code(self) -> int:
        return CODES[self.kind]

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) clipped to n output columns."""
        hi = n if self.hi is None else min(self.hi, n)
        return min(self.lo, hi), hi


def _torch_fn(kind: str, y: Tensor) -> Tensor:
    if kind == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if kind == "gelu":
        return F.gelu(y)
    return F.silu(y)


def activation_torch(y: Tensor, act: Optional[OutputActivation]) -> Tensor:
    """The epilogue step in plain torch: ``act`` on y's columns [lo, hi) (a new tensor; y's dtype)."""
    if act is None:
        return y
    lo, hi = act.bounds(y.shape[-1])
    out = y.clone()
    out[..., lo:hi] = _torch_fn(act.kind, y[..., lo:hi])
    return out


def apply_rounded(y: Tensor, act: Optional[OutputActivation]) -> Tensor:
    """The unfused semantics, for paths without the epilogue: ``act`` on the already rounded output's columns,
    in place (what the model's own activation would have done to them)."""
    if act is not None:
        lo, hi = act.bounds(y.shape[-1])
        if hi > lo:
            y[..., lo:hi] = _torch_fn(act.kind, y[..., lo:hi])
    return y


@triton.jit
def _tanh_approx(x):
    """The GPU's tanh.approx.f32 (sm_75+): one MUFU instruction, absolute error below ``TANH_APPROX_ERR``."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def activate(y, CODE: tl.constexpr, FAST: tl.constexpr = False):
    """fp32 y -> act(y). gelu_tanh: compiled, 0.5 y (1 + tanh u), u = sqrt(2/pi) (y + 0.044715 y^3), in the order
    of operations of torch's CUDA kernel with the same tanhf (eager's fp32 values; a fused layer whose GELU differs
    by an ulp can move a 4-bit code, even a row scale, of the next layer's input), or with FAST (a 16-bit output)
    the GPU's tanh.approx (``TANH_APPROX_ERR``); interpreter: y * sigmoid(2u), the same function without libdevice.
    gelu: 0.5 y (1 + erf(y / sqrt 2)), as torch's."""
    if CODE == 1:
        if _TORCH_GELU_TANH:
            inner = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
            if FAST:
                return 0.5 * y * (1.0 + _tanh_approx(inner))
            return 0.5 * y * (1.0 + libdevice.tanh(inner))
        else:
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            return y / (1.0 + tl.exp(-2.0 * u))
    elif CODE == 2:
        return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    else:
        return y / (1.0 + tl.exp(-y))


@triton.jit
def activate_columns(y, offs_n, off_n, lo, hi, CODE: tl.constexpr, BN: tl.constexpr, FAST: tl.constexpr = False):
    """A (BM, BN) epilogue tile starting at column off_n with ``activate`` on its columns in [lo, hi) (FAST: the
    output is 16-bit, see ``activate``)."""
    if (off_n + BN > lo) & (off_n < hi):
        inside = (offs_n >= lo) & (offs_n < hi)
        y = tl.where(inside[None, :], activate(y, CODE, FAST), y)
    return y
