"""Pieces shared by the Triton kernels: device checks, SM count, and bit-exact scalar helpers.

The ``@triton.jit`` helpers reproduce the plain-torch format references bit for bit, on the GPU and under
Triton's interpreter (``TRITON_INTERPRET=1``) alike: the interpreter's float casts truncate instead of
rounding to nearest, so every *inexact* rounding (fp16 / e4m3 scales, round-half-even of codes) is done
here with integer arithmetic on the fp32 bit pattern; casts are only applied to values that are exact in
the target type.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


#: TRITON_INTERPRET as it was when this module was (re)loaded: Triton decides interpreter-or-compiler when a kernel
#: is defined, and the kernel modules are loaded after this one (the tests reload them all, this one first).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 when they were defined). Read
    once per load of this module (a layer call asked six times; each read of the environment costs microseconds)."""
    return _INTERPRETING


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels need CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"fourbit kernels: tensors on several devices: {sorted(map(str, devs))}")
    dev = next(iter(devs))
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"fourbit Triton kernels need CUDA tensors (got {dev}); use kernel='reference' on CPU")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 under the interpreter: small persistent grids)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def device_class(device: torch.device) -> str:
    """The rows of ``gemm_table.TABLE`` that apply to ``device``: "sm90" for compute capability 9.0 (H100, H200),
    "cpu" off CUDA (the interpreter; no row names it)."""
    if device.type != "cuda":
        return "cpu"
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def aligned_empty(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, cols) view of a buffer whose row stride is a multiple of 16 bytes (what TMA descriptors need)."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return torch.empty((rows, -(-cols // per) * per), dtype=dtype, device=device)[:, :cols]


def operand_buffer(rows: int, cols: int, extra: int, dtype: torch.dtype, device) -> tuple:
    """(q (rows, cols), q_ext (rows, cols + extra) or None): q is the first ``cols`` columns of q_ext, whose last
    ``extra`` columns are left for the caller (``gemm_cublas``'s folded branch)."""
    if not extra:
        return aligned_empty(rows, cols, dtype, device), None
    full = aligned_empty(rows, cols + extra, dtype, device)
    return full[:, :cols], full


def tma_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if its rows are contiguous and 16-byte aligned, else an aligned copy."""
    if t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = aligned_empty(t.shape[0], t.shape[1], t.dtype, t.device)
    out.copy_(t)
    return out


def ceil_div(a: int, b: int) -> int:
    """Host-side ceil(a / b) (``triton.cdiv`` is a slow wrapper in recent Triton; this runs per launch)."""
    return -(-a // b)


def next_pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, (int(n) - 1).bit_length()))


# ---- helpers usable under the interpreter ----------------------------------------------------------
# Triton's standard-library helpers (tl.cdiv, tl.max, ...) are themselves @jit functions whose kind was fixed
# when triton was imported; these equivalents are (re)defined with fourbit's kernels, so the interpreter
# fixture of the tests can switch them.
@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


# Triton's own max-combine: the interpreter recognises it and reduces with numpy (a custom combine function
# is applied element by element there, ~1000x slower); compiled, both are the same reduction.
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None) or _max_combine


@triton.jit
def amax(x, axis: tl.constexpr):
    """max of x along ``axis`` (callers pass tl.abs(.))."""
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _sum_combine(a, b):
    return a + b


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", None) or _sum_combine  # (numpy in the interpreter, as above)


@triton.jit
def total(x, axis: tl.constexpr):
    """sum of x along ``axis`` (one fixed reduction tree when compiled: deterministic)."""
    return tl.reduce(x, axis, _SUM_COMBINE)


# ---- bit-exact scalar helpers (element-wise on fp32 tensors) --------------------------------------
@triton.jit
def round_half_even(x):
    """fp32 -> nearest integer value (ties to even), as fp32; exact for |x| < 2^23 and beyond."""
    a = tl.abs(x)
    r = tl.floor(a)
    f = a - r  # exact: Sterbenz for a >= 1, trivial below
    odd = r - 2.0 * tl.floor(r * 0.5)
    up = (f > 0.5) | ((f == 0.5) & (odd == 1.0))
    r = r + up.to(tl.float32)
    return tl.where(x < 0, -r, r)


@triton.jit
def to_e4m3(v, GPU: tl.constexpr):
    """fp32 -> float8e4nv. GPU: round to nearest even, saturating at +-448 (NaN stays NaN), four at a time by two
    paired conversions and one register move (Triton's own cast packs each byte separately: ~5 integer ops per
    pair); else Triton's cast, for values already on the e4m3 grid (exact)."""
    if GPU:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi;\n"
            "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
            "mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r", [v], dtype=tl.float8e4nv, is_pure=True, pack=4)
    else:
        return v.to(tl.float8e4nv)


@triton.jit
def rint_small(x):
    """fp32 -> nearest integer value (ties to even) as fp32, +0.0 (never -0.0) where it rounds to zero; exact for
    |x| < 2^22 (x + 1.5 * 2^23 lies where fp32's spacing is 1), larger |x| stay above 2^21 (callers clamp to a few
    units). Two full-rate adds: on Hopper the rounding and int conversions it replaces issue at 1/8 of that rate.
    x must be exact as computed (a product by a power of two, a ``div_rn``): Triton's FP fusion (on by default)
    contracts a multiply that produces x into the first add, which then rounds the unrounded product; the single
    pass's int4p2 codes are y * 2^-e (checked in its PTX: the FMAs' multiplier is built from exponent bits)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def pow2(e):
    """Exact 2^e as fp32 for int32 e in [-149, 127] (fp32 subnormals for e < -126)."""
    normal = (tl.minimum(tl.maximum(e + 127, 1), 254) << 23).to(tl.float32, bitcast=True)
    sub = (tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def frexp_exponent(a):
    """f with a = m * 2^f, m in [0.5, 1), for a finite a > 0 (subnormals report f = -126: callers clamp)."""
    bits = a.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 126


@triton.jit
def mantissa_bits(a):
    return a.to(tl.int32, bitcast=True) & 0x7FFFFF


@triton.jit
def round_to_mantissa(x, DROP: tl.constexpr, SUB_QUANTUM: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """x >= 0 fp32 rounded to nearest-even with (23 - DROP) mantissa bits; below MIN_NORMAL to multiples of
    SUB_QUANTUM (the target format's subnormals; MIN_NORMAL = 0 for bf16, whose subnormals are fp32's).
    Callers clamp to the format's maximum first."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> DROP) & 1
    half = (1 << (DROP - 1)) - 1
    mask = ~((1 << DROP) - 1)
    normal = ((bits + half + lsb) & mask).to(tl.float32, bitcast=True)
    if MIN_NORMAL > 0:  # the target has subnormals above fp32's: fixed quantum there
        sub = round_half_even(x * (1.0 / SUB_QUANTUM)) * SUB_QUANTUM
        normal = tl.where(x < MIN_NORMAL, sub, normal)
    return normal


@triton.jit
def e4m3_rn(v):
    """fp32 v -> the nearest e4m3 value (ties to even, saturating at +-448) as fp32, by integer rounding (identical
    in the interpreter and on GPUs); whatever rounds to zero is +0, as ``floats.e4m3_round``."""
    mag = round_to_mantissa(tl.minimum(tl.abs(v), 448.0), 20, 0.001953125, 0.015625)
    return tl.where((v < 0) & (mag > 0), -mag, mag)


@triton.jit
def next_up(s, DROP: tl.constexpr, SUB_QUANTUM: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """The next value above s >= 0 on the grid of ``round_to_mantissa`` (s on that grid)."""
    up = (((s.to(tl.int32, bitcast=True) >> DROP) + 1) << DROP).to(tl.float32, bitcast=True)
    if MIN_NORMAL > 0:
        up = tl.where(s < MIN_NORMAL, s + SUB_QUANTUM, up)
    return up


@triton.jit
def e2m1_index(a):
    """|v| -> e2m1 magnitude index 0..7 (nearest, ties to even, saturating at 6), as int32."""
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
    idx += (a > 5.0).to(tl.int32)
    return idx


@triton.jit
def e2m1_value(idx):
    """magnitude index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 (fp32)."""
    f = idx.to(tl.float32)
    return tl.where(idx < 4, f * 0.5, tl.where(idx < 6, f - 2.0, tl.where(idx == 6, 4.0, 6.0)))


@triton.jit
def e2m1_round(v):
    """v -> its e2m1 value (signed; +0 for values that round to zero), fp32."""
    idx = e2m1_index(tl.abs(v))
    mag = e2m1_value(idx)
    return tl.where((v < 0) & (idx > 0), -mag, mag)
