"""How each activation format maps onto the act_quant kernels: its mode, group and constants (``act_spec``), and
what ``act_quant`` returns (``ActOperand``).

The GEMM operand per mode:
    P2_INT / P2_E2M1   int4p2 / fp4p2     float8_e4m3fn  value(code) * 2^e          (exact; row scale r)
    INT8_ROW           int8 per token     int8 codes                                (row scale s)
    FP8_ROW            fp8 per token      float8_e4m3fn  e4m3(X^ / s)               (row scale s = max|X^_row| / 448)
    INT4_GROUP         int4 groups        float8_e4m3fn codes -8..7                 (fp32 group scales, group-major)
    E2M1_E4M3          fp4 / nvfp4        bfloat16      e2m1 value * e4m3 scale     (exact; outer fp32 scale apart)
    MX                 mxfp4              bfloat16      e2m1 value * 2^e            (exact)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# kernel modes (one per family of format numerics)
P2_INT, P2_E2M1, INT8_ROW, INT4_GROUP, E2M1_E4M3, MX, FP8_ROW = range(7)
_TINY = 1.1754943508222875e-38  # smallest normal fp32 (floor of fp4/nvfp4 outer scales)
_FP32_MAX = 3.4028234663852886e38
_BF16_MAX = 3.3895313892515355e38


@dataclass(frozen=True)
class ActSpec:
    """How a format's activation quantizer maps onto the kernel (see ``act_spec``)."""

    mode: int
    group: int  # group size (== block width for per-row int8)
    qmax: float = 7.0
    emin: int = 0
    scale16: str = "float16"  # int4's group-scale dtype
    outer: int = 0  # fp4 family: 0 none, 1 per tensor, 2 per row

    @property
    def row_pass(self) -> bool:
        return self.mode in (P2_INT, P2_E2M1, INT8_ROW, FP8_ROW) or self.outer == 2

    @property
    def operand_dtype(self) -> torch.dtype:
        if self.mode == INT8_ROW:
            return torch.int8
        if self.mode in (E2M1_E4M3, MX):
            return torch.bfloat16
        return torch.float8_e4m3fn


@functools.lru_cache(maxsize=256)
def act_spec(fmt) -> Optional[ActSpec]:
    """The kernel spec of activation format ``fmt``, or None if no kernel implements it (use the reference).
    Cached: formats are immutable and hash by their spec."""
    name = getattr(fmt, "name", None)
    g = fmt.group_size if fmt is not None else None
    pow2_group = g is not None and g >= 16 and (g & (g - 1)) == 0
    if name == "int4p2" and pow2_group:
        return ActSpec(P2_INT, g, 7.0, int(fmt.EMIN))
    if name == "fp4p2" and pow2_group:
        return ActSpec(P2_E2M1, g, 6.0, int(fmt.EMIN))
    if name == "int8" and g is None and fmt.scale_dtype == torch.float32:
        return ActSpec(INT8_ROW, 0, 127.0)
    if name == "fp8" and g is None:
        return ActSpec(FP8_ROW, 0, 448.0)
    if name == "int4" and pow2_group and g >= 32:
        return ActSpec(INT4_GROUP, g, 7.0, scale16=str(fmt.scale_dtype).replace("torch.", ""))
    if name == "fp4" and pow2_group:
        return ActSpec(E2M1_E4M3, g, 6.0, outer={None: 0, "tensor": 1, "row": 2}[fmt.outer_scale])
    if name == "nvfp4":
        return ActSpec(E2M1_E4M3, 16, 6.0, outer=1)
    if name == "mxfp4":
        return ActSpec(MX, 32, 6.0)
    return None


@dataclass
class ActOperand:
    """What ``act_quant`` returns (shapes in the module docstring)."""

    q: Tensor
    row_scale: Optional[Tensor] = None
    group_scale: Optional[Tensor] = None
    lr: Optional[Tensor] = None
    q_ext: Optional[Tensor] = None  # (M, Kp + extra): the buffer q is the first Kp columns of (``extra_cols``)
