"""The quantized-linear kernels "triton" (speed mode), "triton-cublas" (speed mode, the GEMM through cuBLAS) and
"triton-memory" (memory mode).

    y = GEMM(act_quant(x), weight operand)   with the low-rank branch and the bias in the GEMM epilogue

At most four launches per layer: ``act_quant`` (smoothing, dynamic quantization and the down-projection;
one launch without the low-rank branch, two with it), in memory mode ``expand_weight`` (4-bit weight ->
operand, just in time), and the GEMM (``scaled_gemm`` for formats whose scales factor out of the K loop,
``grouped_gemm`` for int4 with group scales). Which pair of formats runs on which path (``plan_for``):

    activations x weights           operands        GEMM
    int4p2/fp4p2 x int4p2/fp4p2     fp8 x fp8       scaled_gemm, per-token x per-channel fp32 scales
    fp8 (per row) x fp8 / int4p2    fp8 x fp8       scaled_gemm, per-token x per-channel fp32 scales
    int8 x int8 (per row)           int8 x int8     scaled_gemm, int32 accumulation
    fp4/nvfp4/mxfp4 x same family   bf16 x bf16     scaled_gemm (exact dequantized operands), outer scales
    int4 x int4 (same group >= 32)  fp8 codes       grouped_gemm (group scales on CUDA cores)
    16-bit x any weight format      -               dequantized weight (cached in speed mode) + torch GEMM
    anything else                   -               the reference (warns once)

The mode is part of the kernel name, so ``QuantConfig.kernel`` records it in checkpoints. "triton-cublas" is "triton"
with the 'cublas' GEMM backend for this layer alone (``gemm_cublas``: ``torch._scaled_mm``, the branch folded into K,
from ``set_gemm_backend``'s min_rows rows; an epilogue activation keeps the Triton GEMM): what a precision plan picks
per layer where cuBLAS's GEMM is faster (``plan_precision(kernels=...)``); "triton" follows ``set_gemm_backend``.
Speed mode caches the weight operand on the layer (FP8: 1 byte per parameter on top of the 4-bit buffers);
memory mode keeps only the 4-bit buffers and expands each layer's weight before its GEMM.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import low_rank_branch, prepare_activation, quant_linear_reference, smooth_reciprocal
from . import register_linear_kernel
from ._common import next_pow2
from .act_quant import E2M1_E4M3, FP8_ROW, INT4_GROUP, INT8_ROW, MX, P2_E2M1, P2_INT, act_quant, act_spec, cat_down, fold_down
from .gemm import GemmConfig, scaled_gemm
from .gemm_cublas import (FOLD_PARTS, FoldedWeight, cublas_gemm, cublas_min_rows, cublas_supported, fold_lr,
                          fold_weight, gemm_backend)
from .gemm_grouped import grouped_gemm
from . import gemv as _gemv
from .activation import OutputActivation, apply_rounded
from .row_amax import RowAmax, row_amax_torch
from .weights import WeightOperand, expand_weight, weight_kind

_CACHE_KEY = "fourbit.kernels.linear"
_WARNED: set = set()


def plan_for(layer) -> str:
    """'scaled' | 'grouped' | 'a16' (16-bit activations) | 'reference' for this layer's pair of formats."""
    if layer.act_format is None:
        return "a16"
    a = act_spec(layer.act_format)
    w = weight_kind(layer.weight_format)
    if a is None or w is None:
        return "reference"
    if a.mode in (P2_INT, P2_E2M1, FP8_ROW) and w == "fp8":
        return "scaled"
    if a.mode == INT8_ROW and w == "int8":
        return "scaled"
    if a.mode in (E2M1_E4M3, MX) and w == "bf16":
        return "scaled"
    if a.mode == INT4_GROUP and w == "codes" and layer.weight_format.group_size == a.group:
        return "grouped"
    return "reference"


@dataclass
class LayerState:
    """Per-layer tensors in the layouts the kernels read, built once per (device, buffers)."""

    key: tuple
    plan: str
    smooth: Optional[Tensor] = None  # (Kp,) fp32
    smooth_recip: Optional[Tensor] = None  # (Kp,) fp32, smooth_reciprocal(smooth): activations are multiplied by it
    down: Optional[Tensor] = None  # (Rp, Kp), the layer's 16-bit dtype, rank zero-padded
    down_folded: Optional[Tensor] = None  # (2, Kp, Rp) bf16: fold_down(lr_down, smooth), act_quant's operand
    down_cat: Optional[Tensor] = None  # (Kp, 2 Rp) bf16: cat_down(down_folded), the cuBLAS down-projection's
    up: Optional[Tensor] = None  # (N, Rp): lr_up's dtype if 16-bit (the GEMM epilogue's bf16 dots), else fp32
    bias: Optional[Tensor] = None  # (N,) fp32
    weight: Optional[WeightOperand] = None  # speed mode
    w16: Optional[Tensor] = None  # 'a16' plan, speed mode: dequantized weight in the activation dtype
    op_key: str = ""  # the custom op's description of this layer (``compiled.py``): formats, plan, shapes
    gemv: bool = False  # few rows take the GEMV on the packed weight (``gemv.py``)
    fold_tried: bool = False  # the 'cublas' backend's folded weight was attempted for the cached operand


_BUFFERS = ("weight_packed", "weight_scales", "weight_row_scale", "smooth", "lr_down", "lr_up", "bias")


def _key(layer) -> tuple:
    """Changes when any buffer is replaced, moved or modified in place."""
    out = []
    buffers = layer._buffers
    for name in _BUFFERS:
        t = buffers.get(name)
        try:
            version = None if t is None else t._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        out.append(None if t is None else (t.device, t.data_ptr(), version))
    return (layer.act_format, layer.weight_format, tuple(out))


def layer_state(layer) -> LayerState:
    key = _key(layer)
    st = layer._cache.get(_CACHE_KEY)
    if st is not None and st.key == key:
        return st
    st = LayerState(key, plan_for(layer))
    st.smooth = None if layer.smooth is None else layer.smooth.float().contiguous()
    st.smooth_recip = None if st.smooth is None else smooth_reciprocal(st.smooth)
    if layer.lr_down is not None:
        rp = next_pow2(layer.lr_down.shape[0], 16)
        pad = rp - layer.lr_down.shape[0]
        st.down = F.pad(layer.lr_down, (0, 0, 0, pad)).contiguous()
        up = layer.lr_up if layer.lr_up.dtype in (torch.bfloat16, torch.float16) else layer.lr_up.float()
        st.up = F.pad(up, (0, pad)).contiguous()
        st.down_folded = fold_down(layer.lr_down, st.smooth)
        st.down_cat = cat_down(st.down_folded)
    st.bias = None if layer.bias is None else layer.bias.float().contiguous()
    st.gemv = st.plan == "scaled" and _gemv.gemv_supported(layer.act_format, layer.weight_format)
    if st.plan in ("scaled", "grouped"):
        from .compiled import register_layer

        st.op_key = register_layer(layer, st.plan)
    layer._cache[_CACHE_KEY] = st
    return st


def weight_operand(layer, st: LayerState, memory: bool, gemm: Optional[str] = None) -> WeightOperand:
    """The GEMM's weight operand: cached (speed) or expanded now (memory); folded for cuBLAS where ``gemm`` (the
    layer's backend, None: the process-wide one) is 'cublas'."""
    if memory:
        st.weight = None  # a layer switched from speed to memory mode gives its cache back
        return expand_weight(layer.weight_packed, layer.weight_scales, layer.weight_row_scale,
                             layer.weight_format, layer.padded_in)
    if st.weight is None:
        st.weight = expand_weight(layer.weight_packed, layer.weight_scales, layer.weight_row_scale,
                                  layer.weight_format, layer.padded_in)
        st.fold_tried = False
    if gemm_backend(gemm) == "cublas" and not st.fold_tried:
        st.fold_tried = True
        _fold(layer, st, st.weight)
    return st.weight


def _fold(layer, st: LayerState, w: WeightOperand) -> None:
    """Attach the 'cublas' backend's folded weight (``gemm_cublas``) where the layer can take it: the 'scaled' plan
    on FP8 operands, N and the folded K multiples of 16, the branch within e4m3's range. The operand then becomes
    a view of the folded one (no second copy)."""
    spec = act_spec(layer.act_format)
    if st.plan != "scaled" or spec is None or w.w.dtype != torch.float8_e4m3fn or spec.operand_dtype != w.w.dtype:
        return
    n, kp = w.w.shape
    rp = 0 if st.up is None else st.up.shape[1]
    if not cublas_supported(w.w.dtype, n, kp + FOLD_PARTS * rp, w.w.device):
        return
    l1 = None
    if rp:
        l1 = F.pad(layer.lr_down.float().abs().sum(1), (0, rp - layer.lr_down.shape[0]))  # (Rp,) ||d_j||_1
    folded = fold_weight(w.w, w.col_scale, st.up, l1, spec.qmax)
    if folded is None:
        return
    if rp:
        w.w = folded.w_ext[:, :kp]  # the same values, in the folded operand's storage
    if layer.bias is not None and layer.bias.dtype in (torch.bfloat16, torch.float16):
        folded.bias16 = layer.bias  # st.bias is its exact fp32 copy
    w.folded = folded


def _a16(layer, st: LayerState, x2: Tensor, memory: bool) -> Tensor:
    """16-bit activations (W4A16 / W8A16): dequantized weight in x's dtype, fp32 branch and bias."""
    dtype = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = st.w16
    if w is None or w.dtype != dtype:
        w = layer.weight_format.dequantize(layer.quantized_weight(), dtype=dtype)
        st.w16 = None if memory else w
    xs = prepare_activation(layer, x2)  # (M, Kp) fp32
    y = F.linear(xs.to(dtype), w).float()
    if layer.lr_down is not None:
        y = y + low_rank_branch(layer, xs)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x2.dtype)


def linear_forward(layer, x2: Tensor, memory: bool = False, lowrank: str = "fused",
                   gemm_config: Optional[GemmConfig] = None, gemm: Optional[str] = None) -> Tensor:
    """(M, K) -> (M, N) through the Triton kernels.

    lowrank: "fused" (down-projection in act_quant, up-projection in the GEMM epilogue), "unfused" (both
    as separate torch GEMMs over x and y, for comparison), or "none" (skip the branch: NOT the layer's
    function, for measuring the branch's cost). ``gemm_config``: the GEMM's tiles (default: ``default_config``).
    gemm: the layer's GEMM backend ("cublas" for the "triton-cublas" kernel; None: ``set_gemm_backend``'s).
    """
    st = layer_state(layer)
    if st.plan == "a16":
        return _a16(layer, st, x2, memory)
    if st.plan == "reference":
        tag = (repr(layer.act_format), repr(layer.weight_format))
        if tag not in _WARNED:
            _WARNED.add(tag)
            warnings.warn(f"fourbit: no Triton kernel for activations {tag[0]} x weights {tag[1]}; "
                          f"using the reference implementation", stacklevel=3)
        return quant_linear_reference(layer, x2)
    fused = lowrank == "fused" and st.down is not None
    if st.gemv and few_rows(x2.shape[0]):  # few rows: the packed weight, no operand built
        y = _gemv.gemv(x2, layer.act_format, layer.weight_format, layer.padded_in, layer.weight_packed,
                       layer.weight_scales, layer.weight_row_scale, st.smooth_recip, st.down_folded if fused else None,
                       st.up if fused else None, st.bias)
    else:
        w = weight_operand(layer, st, memory, gemm)
        y = quantized_gemm(x2, layer.act_format, layer.padded_in, st.plan, w, st.smooth_recip,
                           st.down_folded if fused else None, st.down_cat if fused else None,
                           st.up if fused else None, st.bias, gemm_config, gemm=gemm)
    if lowrank == "unfused" and st.down is not None:  # separate GEMMs: x read again, y read and written again
        k = x2.shape[1]
        xs = x2 if st.smooth_recip is None else x2 * st.smooth_recip[:k].to(x2.dtype)
        y.addmm_(xs @ st.down[:, :k].t().to(x2.dtype), st.up.t().to(x2.dtype))
    return y


def few_rows(m: int) -> bool:
    """Whether m rows take the GEMV (``GemvConfig.max_m``) rather than act_quant + GEMM."""
    return 0 < m <= _gemv.DEFAULT_GEMV.max_m


def quantized_gemm(x2, act_format, padded_in: int, plan: str, w: WeightOperand,
                   smooth_recip: Optional[Tensor], down_folded: Optional[Tensor], down_cat: Optional[Tensor],
                   up: Optional[Tensor], bias: Optional[Tensor], gemm_config: Optional[GemmConfig] = None,
                   act: Optional[OutputActivation] = None, gemm: Optional[str] = None,
                   x_amax: Optional[Tensor] = None, next_amax: Optional[RowAmax] = None) -> Tensor:
    """act_quant + GEMM for the 'scaled' / 'grouped' plans: (M, K) -> (M, N) in x2's dtype. ``down_folded``,
    ``down_cat`` and ``up`` (all or none): the low-rank branch, fused (down-projection in act_quant, up in the
    GEMM's epilogue). x2 may be a list of column blocks (``act_quant``); ``act``: an activation on a range of
    output columns (in the epilogue on the 'scaled' plan, after the rounding on the 'grouped' one). gemm: the
    layer's GEMM backend (None: the process-wide one). x_amax: X^'s row maxima, given (``act_quant(row_amax=)``);
    next_amax: a request for the output's row maxima (``row_amax.py``; in the epilogue of the Triton GEMM, else
    computed from y)."""
    dtype = x2.dtype if isinstance(x2, Tensor) else x2[0].dtype
    rows = x2.shape[0] if isinstance(x2, Tensor) else x2[0].shape[0]
    folded = _cublas_weight(plan, w, act, down_folded is not None, padded_in, rows, gemm)
    if folded is not None:  # the 'cublas' backend: torch._scaled_mm, the branch folded into K
        a = act_quant(x2, act_format, padded_in=padded_in, down_folded=down_folded, smooth_recip=smooth_recip,
                      down_cat=down_cat, extra_cols=0 if folded.lr_mult is None else FOLD_PARTS * up.shape[1],
                      row_amax=x_amax)
        q = a.q
        if folded.lr_mult is not None:
            q = a.q_ext  # (M, Kp + 3 Rp): the operand, then the folded branch's columns
            fold_lr(a.lr, a.row_scale, folded.lr_mult, q[:, padded_in:])
        y = cublas_gemm(q, folded, a.row_scale, bias, dtype)
        row_amax_torch(y, next_amax)
        return y
    a = act_quant(x2, act_format, padded_in=padded_in, down_folded=down_folded, smooth_recip=smooth_recip,
                  down_cat=down_cat, row_amax=x_amax)
    lr = a.lr if down_folded is not None else None
    if plan == "grouped":
        y = apply_rounded(grouped_gemm(a.q, w.w, a.group_scale, w.group_scale, act_format.group_size, lr, up,
                                       bias, out_dtype=dtype, config=gemm_config), act)
        row_amax_torch(y, next_amax)
        return y
    return scaled_gemm(a.q, w.w, a.row_scale, w.col_scale, lr, up, bias, out_dtype=dtype, config=gemm_config,
                       act=act, next_amax=next_amax)


def _cublas_weight(plan: str, w: WeightOperand, act: Optional[OutputActivation], branch: bool,
                   padded_in: int, rows: int, gemm: Optional[str]) -> Optional[FoldedWeight]:
    """The folded weight if this call takes the 'cublas' backend (set, folded, no epilogue activation, at least
    ``set_gemm_backend``'s min_rows), else None. A call without the branch (``lowrank="none"``) uses the folded operand's
    first Kp columns."""
    folded = w.folded
    if (folded is None or plan != "scaled" or gemm_backend(gemm) != "cublas" or act is not None
            or rows < cublas_min_rows()):
        return None
    if not branch and folded.lr_mult is not None:
        return FoldedWeight(folded.w_ext[:, :padded_in], folded.col_scale, None)
    return folded


# torch.compile: layers on the 'scaled' / 'grouped' plans run as one custom op (``compiled.py``), so dynamo traces
# through them and inductor fuses the code around them; other plans are opaque (a graph break per layer).
def triton_speed(layer, x2: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        from .compiled import compiled_forward

        return compiled_forward(layer, x2, memory=False)
    return linear_forward(layer, x2, memory=False)


#: the per-layer GEMM backend a kernel name implies (others: the process-wide ``set_gemm_backend``)
KERNEL_GEMM = {"triton-cublas": "cublas"}


def kernel_gemm(kernel: str) -> Optional[str]:
    """The GEMM backend of layers on ``kernel`` ("cublas" for "triton-cublas"), None for the process-wide one."""
    return KERNEL_GEMM.get(kernel)


def triton_cublas(layer, x2: Tensor) -> Tensor:
    gemm = kernel_gemm("triton-cublas")
    if torch.compiler.is_compiling():
        from .compiled import compiled_forward

        return compiled_forward(layer, x2, memory=False, gemm=gemm)
    return linear_forward(layer, x2, memory=False, gemm=gemm)


def triton_memory(layer, x2: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        from .compiled import compiled_forward

        return compiled_forward(layer, x2, memory=True)
    return linear_forward(layer, x2, memory=True)


@torch.compiler.disable
def linear_forward_uncompiled(layer, x2: Tensor, memory: bool, gemm: Optional[str] = None) -> Tensor:
    """``linear_forward`` kept out of dynamo's graphs (a graph break)."""
    return linear_forward(layer, x2, memory=memory, gemm=gemm)


register_linear_kernel("triton", triton_speed)
register_linear_kernel("triton-cublas", triton_cublas)
register_linear_kernel("triton-memory", triton_memory)
