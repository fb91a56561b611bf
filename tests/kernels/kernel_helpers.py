"""Inputs and accuracy thresholds shared by the kernel tests.

Accuracy against a twin is SQNR in dB, ``sqnr_db(reference, result)`` (tests/formats' helper); each threshold is a
named constant with the reason for its value. ``db(r)`` is the SQNR of a relative Frobenius error r
(``||got - ref|| / ||ref|| < r``  <=>  ``sqnr_db(ref, got) > db(r)``).
Bit-exact results are compared bit for bit (``conftest.bits``), never through a threshold.
"""
from __future__ import annotations

import math

import torch

from ..formats.fmt_helpers import sqnr_db  # noqa: F401  (re-exported for the kernel tests)


def db(rel: float) -> float:
    """The SQNR (dB) of a relative Frobenius error ``rel``."""
    return -20.0 * math.log10(rel)


#: the same operands, fp32 sums in another order (interpreter GEMMs, the GEMV, the grouped GEMM, the epilogue
#: activation, layers with fp32 activations against ``quant_linear_reference``): relative 1e-5
SQNR_FP32_REORDER_DB = db(1e-5)  # 100 dB
#: on a GPU: the tensor cores' fp32 accumulation order and the tf32 low-rank epilogue; the single-pass
#: down-projection's bf16 hi + lo factor (2^-16 per product) with fp32 sums: relative 1e-4
SQNR_GPU_ACCUMULATE_DB = db(1e-4)  # 80 dB
#: a compiled graph (fusion pass) against eager on the same fp32 values: only fp32 rounding differs, relative 1e-6
SQNR_FUSED_FP32_DB = db(1e-6)  # 120 dB
#: inductor (CPU) around the fused layers: its own fp32 kernels for the norms and residuals, relative 1e-5
SQNR_INDUCTOR_FP32_DB = db(1e-5)  # 100 dB
#: bf16 activations in the interpreter: it casts fp32 -> bf16 by truncation (not round-to-nearest as GPUs do), up
#: to 2^-8 per element: relative 5e-3
SQNR_BF16_TRUNCATED_DB = db(5e-3)  # 46.0 dB
#: bf16 layer output on a GPU against the reference kernel: one bf16 rounding of the output, identical codes:
#: relative 4e-3
SQNR_BF16_OUTPUT_DB = db(4e-3)  # 48.0 dB
#: QuaRTZ's down-projection is a tf32 dot on a GPU (10-bit mantissa): relative ~1e-3 measured, bound 3e-3
SQNR_TF32_DOWN_DB = db(3e-3)  # 50.5 dB

ACT_FORMATS = [
    ("int4p2", {}), ("fp4p2", {}), ("int8", {}), ("fp8", {}), ("int4", {}), ("int4", {"scale_dtype": "bfloat16"}),
    ("fp4", {}), ("fp4", {"outer_scale": "row"}), ("fp4", {"outer_scale": "tensor"}), ("nvfp4", {}), ("mxfp4", {}),
]
WEIGHT_FORMATS = [("int4p2", {}), ("fp4p2", {}), ("int8", {}), ("fp8", {}), ("int4", {}), ("fp4", {}),
                  ("fp4", {"outer_scale": "row"}), ("nvfp4", {}), ("mxfp4", {})]
#: (weights, activations) pairs a quantized layer runs through the Triton kernels
PAIRS = [("int4p2", "int4p2"), ("fp4p2", "fp4p2"), ("fp4p2", "int4p2"), ("int8", "int8"), ("fp8", "fp8"),
         ("int4p2", "fp8"), ("int4", "int4"),
         ("fp4", "fp4"), ("nvfp4", "nvfp4"), ("mxfp4", "mxfp4"), ("int4p2", None)]


def ids(params):
    return [n + "".join(f"-{v}" for v in kw.values()) for n, kw in params]


def hard_rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """(m, k) fp32 rows that exercise the corner cases of every format's rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 2)
    x = x * torch.exp(torch.randn(1, k, generator=g) * 0.5)
    ties = torch.tensor([7.0, 6.0, 0.25, 0.5, 0.75, 1.25, 1.5, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -3.5, -5.0])
    x[0] = ties.repeat(k // 16 + 1)[:k]  # exact halves / e2m1 midpoints after scaling by a power of two
    x[1] = 0.0  # all-zero row: zero scales, no NaN
    x[2] *= 1e-5 / x[2].abs().max()  # fp16 / e4m3 group scales go subnormal (the "next value up" rule)
    x[3] = 1e-3 * torch.randn(k, generator=g)
    x[3, 5] = 1e4  # one huge value: power-of-two group exponents clamp at EMIN
    x[4, : k // 2] = 0.0  # half a row of zero groups
    return x


def gemm_operands(dtype, m, n, k):
    """(a (m, k), b (n, k)) of ``dtype`` whose products are exact (small integers times powers of two)."""
    if dtype == torch.int8:
        return torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a = torch.randint(-8, 8, (m, k)).to(torch.float16).to(dtype)
    b = (torch.randint(-8, 8, (n, k)).float() * 2.0 ** torch.randint(-9, 1, (n, 1)).float()).to(torch.float16).to(dtype)
    return a, b


def speed_equals_memory_near_reference(model, x):
    """The model in memory and speed mode: the same bits, within the output's bf16 rounding of the reference
    kernel's output (``SQNR_BF16_OUTPUT_DB``). Returns the speed-mode output; the model is left in speed mode."""
    from fourbit.nn import set_kernel

    from .conftest import bits

    ref = model(x).float()
    set_kernel(model, "triton-memory")
    memory = model(x)
    set_kernel(model, "triton")
    speed = model(x)
    assert torch.equal(bits(speed), bits(memory))
    assert sqnr_db(ref, speed.float()) > SQNR_BF16_OUTPUT_DB
    return speed


def act_operands(name, device, rank, smooth_on, m=37, k=200):
    """(x fp32 (m, k), format, Kp, smooth, lr_down): K padded to the group (int4p2/fp4p2) or by 8 columns (fp8)."""
    from fourbit.formats import make_format

    fmt = make_format(name)
    kp = -(-k // 256) * 256 if fmt.group_size else k + 8  # 200 -> 256, 1152 -> 1280
    smooth = None
    if smooth_on:
        smooth = 2.0 ** torch.randint(-2, 3, (kp,)).float()  # powers of two keep the tie rows exact
        smooth[k // 3] = 0.7  # and one ordinary factor
        smooth = smooth.to(device)
    down = torch.randn(rank, kp).bfloat16().to(device) if rank else None
    return hard_rows(m, k).to(device), fmt, kp, smooth, down
