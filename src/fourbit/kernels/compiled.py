"""The Triton layer path as one ``torch.library`` custom op, so that ``torch.compile`` traces through quantized
layers instead of breaking its graph at each of them.

    fourbit::quant_linear(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key,
                          x_tail, act, act_lo, act_hi, x_amax) -> (M, N)
    fourbit::quant_linear_amax(<the same>, amax_mult, amax_lo, amax_hi) -> ((M, N), (M,) row maxima)

Dynamo sees one opaque node per layer (its output shape comes from the fake implementation below) and
inductor compiles and fuses the code around it: norms, modulation, residual adds, activations. The layer's
state goes in as tensors (what ``layer_state`` caches, and the weight operand or, in memory mode, the packed
weight) plus ``key``, a string naming the formats, the plan and the shapes. The key is the same for layers
that differ only in their tensors, so the blocks of a model share compiled code (no recompilation per layer).

Requirement: the layer's state must exist before tracing (``prepare_kernels(model)``, or one eager call);
a layer without it falls back to the graph-breaking path and says so once.

The last five arguments are what the graph rewrites of ``fusion.py`` fill in (traced layers pass None, "", 0, 0,
None): ``x_tail``, a second column block of X (the layer's input was ``cat([x2, x_tail], -1)``, now never written),
``act`` on output columns [act_lo, act_hi) (an activation that followed the layer, now in the GEMM's epilogue), and
``x_amax``, the row maxima of X^ that the producer of X computed (``quant_linear_amax``: the next layer's smoothing
reciprocal over the columns it reads, ``amax_mult``), so that the activation quantization reads X once.

The inline lowering (``fusion.py`` with ``act_quant="inline"``) replaces a quant_linear node by
``quant_linear_inline`` (the same arguments): the activation quantization in plain torch ops
(``act_inline.act_quant_inline``), which inductor generates inside the kernel that produces X, then the GEMM alone:

    fourbit::scaled_gemm(a, b, a_scale, b_scale, lr, up, bias, out_dtype, act, act_lo, act_hi) -> (M, N)
"""
import warnings  # no ``from __future__ import annotations``: custom_op reads the annotations as types
from typing import Optional

import torch
from torch import Tensor

_SPECS: dict[str, tuple] = {}  # key -> (act_format, weight_format, padded_in, out_features, plan)
_WARNED = [False]


def _fmt_spec(fmt) -> str:
    return repr(sorted(fmt.spec().items()))


def register_layer(layer, plan: str) -> str:
    """The op key of ``layer`` (registered so that the op can find the format objects)."""
    key = "|".join([plan, _fmt_spec(layer.act_format), _fmt_spec(layer.weight_format), str(layer.padded_in),
                    str(layer.out_features)])
    _SPECS.setdefault(key, (layer.act_format, layer.weight_format, layer.padded_in, layer.out_features, plan))
    return key


def _lookup(key: str) -> tuple:
    try:
        return _SPECS[key.rsplit("|", 1)[0]]
    except KeyError:
        raise RuntimeError(f"fourbit::quant_linear: unknown layer key {key!r}: the layer's kernel state was not "
                           f"built in this process (call fourbit.nn.prepare_kernels(model) first)") from None


@torch.library.custom_op("fourbit::quant_linear", mutates_args=())
def quant_linear(x2: Tensor, weights: list[Optional[Tensor]], smooth_recip: Optional[Tensor],
                 down_folded: Optional[Tensor], down_cat: Optional[Tensor], up: Optional[Tensor],
                 bias: Optional[Tensor], key: str, x_tail: Optional[Tensor], act: str, act_lo: int,
                 act_hi: int, x_amax: Optional[Tensor]) -> Tensor:
    """x2 (M, K) -> (M, N) (with x_tail: [x2 | x_tail] (M, K1 + K2) -> (M, N)). weights: speed mode [operand
    (N, Kp), col_scale, group_scale, packed, scales, row_scale] and, where the 'cublas' GEMM backend folded the
    layer, [w_ext, its col_scale, lr_mult, bias16] (``gemm_cublas.FoldedWeight``); memory mode [packed, scales,
    row_scale] (expanded here). Few rows of the Hopper-native formats take the GEMV on the packed weight. key:
    ``register_layer``'s key + "|speed", "|cublas" (speed mode, the layer's GEMM on the 'cublas' backend: the
    "triton-cublas" kernel) or "|memory". act: "" or an ``activation.CODES`` kind for columns [act_lo, act_hi).
    x_amax: None, or (M,) fp32, each row's max |X^| (X^ = X * (1 / smooth)), which the producer of X computed
    (``quant_linear_amax``): the activation quantization then reads X once (``act_quant``'s path "given")."""
    return _run(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo, act_hi,
                x_amax)


@quant_linear.register_fake
def _(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo, act_hi, x_amax):
    n = _lookup(key)[3]
    return x2.new_empty((x2.shape[0], n))


@torch.library.custom_op("fourbit::quant_linear_amax", mutates_args=())
def quant_linear_amax(x2: Tensor, weights: list[Optional[Tensor]], smooth_recip: Optional[Tensor],
                      down_folded: Optional[Tensor], down_cat: Optional[Tensor], up: Optional[Tensor],
                      bias: Optional[Tensor], key: str, x_tail: Optional[Tensor], act: str, act_lo: int,
                      act_hi: int, x_amax: Optional[Tensor], amax_mult: Tensor, amax_lo: int,
                      amax_hi: int) -> tuple[Tensor, Tensor]:
    """``quant_linear`` that also returns, for the next layer, each row's max |y[:, amax_lo:amax_hi] * amax_mult|
    over its rounded output y (M,) fp32: in the GEMM epilogue on the Triton GEMM (``row_amax.py``), else from y
    (the same values). What ``fusion.hand_over_row_maxima`` makes the producer of a layer's input call."""
    from .row_amax import RowAmax

    req = RowAmax.zeros(x2.shape[0], amax_mult, amax_lo, amax_hi)
    y = _run(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo, act_hi, x_amax,
             req)
    return y, req.out


@quant_linear_amax.register_fake
def _(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo, act_hi, x_amax,
      amax_mult, amax_lo, amax_hi):
    n = _lookup(key)[3]
    return x2.new_empty((x2.shape[0], n)), x2.new_empty((x2.shape[0],), dtype=torch.float32)


def _run(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo, act_hi, x_amax,
         next_amax=None) -> Tensor:
    """The body of both ops. ``next_amax``: a ``RowAmax`` request the GEMM's epilogue fills (other paths: from y)."""
    from . import gemv  # imported here: the test suite re-executes kernel modules (interpreter)
    from .activation import OutputActivation, apply_rounded
    from .gemm_cublas import FoldedWeight
    from .linear import few_rows, quantized_gemm
    from .row_amax import row_amax_torch
    from .weights import WeightOperand, expand_weight

    act_format, weight_format, padded_in, _, plan = _lookup(key)
    out_act = OutputActivation(act, act_lo, act_hi) if act else None
    memory = key.endswith("|memory")
    gemm = "cublas" if key.endswith("|cublas") else None
    packed = weights[:3] if memory else weights[3:6]
    if plan == "scaled" and few_rows(x2.shape[0]) and gemv.gemv_supported(act_format, weight_format):
        x = x2 if x_tail is None else torch.cat([x2, x_tail], 1)
        y = apply_rounded(gemv.gemv(x, act_format, weight_format, padded_in, packed[0], packed[1], packed[2],
                                    smooth_recip, down_folded, up, bias), out_act)
        row_amax_torch(y, next_amax)
        return y
    if memory:
        w = expand_weight(weights[0], weights[1], weights[2], weight_format, padded_in)
    else:
        folded = FoldedWeight(*weights[6:10]) if len(weights) > 6 else None
        w = WeightOperand(weights[0], weights[1], weights[2], folded=folded)
    x = x2 if x_tail is None else [x2, x_tail]
    return quantized_gemm(x, act_format, padded_in, plan, w, smooth_recip, down_folded, down_cat, up, bias,
                          act=out_act, gemm=gemm, x_amax=x_amax, next_amax=next_amax)


def compiled_forward(layer, x2: Tensor, memory: bool, gemm: Optional[str] = None,
                     act: Optional["OutputActivation"] = None) -> Tensor:
    """What a quantized layer runs while dynamo traces it: the custom op if its state is ready. gemm: the layer's
    GEMM backend in speed mode ("cublas" for "triton-cublas"; None: the process-wide one). act: an activation in
    the op's epilogue, as the fusion pass sets it (``forward_with_activation``; the fallbacks apply it after)."""
    from .activation import apply_rounded
    from .linear import _CACHE_KEY, few_rows, linear_forward_uncompiled

    st = layer._cache.get(_CACHE_KEY)
    if st is not None and not memory and st.weight is None and st.gemv and few_rows(x2.shape[0]):
        memory = True  # a single-row layer that ``prepare_kernels`` gave no operand: the GEMV reads the packed weight
    if st is not None and st.plan not in ("scaled", "grouped"):  # no custom op for 16-bit activations or the
        return apply_rounded(linear_forward_uncompiled(layer, x2, memory, gemm), act)  # reference: a graph break
    if st is None or (not memory and st.weight is None):
        if not _WARNED[0]:
            _WARNED[0] = True
            warnings.warn("fourbit: a quantized layer was traced by torch.compile before its kernel state was "
                          "built, so it breaks the graph; call fourbit.nn.prepare_kernels(model) (after moving the "
                          "model to the GPU) before compiling", stacklevel=3)
        return apply_rounded(linear_forward_uncompiled(layer, x2, memory, gemm), act)
    packed = [layer.weight_packed, layer.weight_scales, layer.weight_row_scale]
    weights = packed if memory else [st.weight.w, st.weight.col_scale, st.weight.group_scale] + packed
    folded = None if memory else st.weight.folded
    if folded is not None:
        weights = weights + [folded.w_ext, folded.col_scale, folded.lr_mult, folded.bias16]
    mode = "|memory" if memory else "|cublas" if gemm == "cublas" else "|speed"
    kind, lo, hi = ("", 0, 0) if act is None else (act.kind, *act.bounds(layer.out_features))
    return torch.ops.fourbit.quant_linear(x2, weights, st.smooth_recip, st.down_folded, st.down_cat, st.up,
                                          st.bias, st.op_key + mode, None, kind, lo, hi, None)


def forward_with_activation(layer, x2: Tensor, act: "OutputActivation") -> Tensor:
    """(M, K) -> act((M, N)) in eager, as a compiled model runs the layer once the fusion pass moved ``act`` into
    its GEMM epilogue (kernels "triton" and "triton-memory"; a "triton-cublas" layer keeps the activation apart:
    ``fusion.fuse_activations``). ``precision_plan`` times a layer followed by an activation so."""
    from . import EPILOGUE_KERNELS

    if layer.kernel not in EPILOGUE_KERNELS:
        raise ValueError(f"forward_with_activation runs a layer on one of the kernels {EPILOGUE_KERNELS}, not "
                         f"{layer.kernel!r}")
    return compiled_forward(layer, x2, memory=layer.kernel == "triton-memory", act=act)


# ---- the inline lowering: quantization in torch ops + the GEMM alone ---------------------------------------------
@torch.library.custom_op("fourbit::scaled_gemm", mutates_args=())
def scaled_gemm_op(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor], lr: Optional[Tensor],
                   up: Optional[Tensor], bias: Optional[Tensor], out_dtype: torch.dtype, act: str, act_lo: int,
                   act_hi: int) -> Tensor:
    """``gemm.scaled_gemm`` as an op: a (M, K) x b (N, K) with row / column scales, the low-rank up-projection
    (lr (M, R) @ up (N, R)^T), bias and ``act`` on output columns [act_lo, act_hi) -> (M, N) ``out_dtype``."""
    from .activation import OutputActivation
    from .gemm import scaled_gemm

    a_scale = None if a_scale is None else a_scale.contiguous()
    return scaled_gemm(a, b, a_scale, b_scale, lr, up, bias, out_dtype=out_dtype,
                       act=OutputActivation(act, act_lo, act_hi) if act else None)


@scaled_gemm_op.register_fake
def _(a, b, a_scale, b_scale, lr, up, bias, out_dtype, act, act_lo, act_hi):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def inlinable(key: str, rows) -> bool:
    """Whether the inline lowering takes a quant_linear node with this key and ``rows`` rows (an int, or symbolic):
    speed mode, the 'scaled' plan, an activation format of ``act_inline.INLINE_MODES``, and more rows than the GEMV
    takes (those keep the op, whose GEMV reads the packed weight)."""
    from .act_inline import inline_supported
    from .linear import few_rows

    if not key.endswith("|speed"):
        return False
    act_format, _, _, _, plan = _lookup(key)
    return plan == "scaled" and inline_supported(act_format) and not (isinstance(rows, int) and few_rows(rows))


def quant_linear_inline(x2, weights, smooth_recip, down_folded, down_cat, up, bias, key, x_tail, act, act_lo,
                        act_hi, x_amax=None):
    """``quant_linear`` (same arguments, speed mode) as torch ops around ``fourbit::scaled_gemm``: what the inline
    lowering makes inductor trace. X's concatenation (``x_tail``) is a torch.cat that inductor may fuse; ``x_amax``
    is not read (the row maxima are part of the torch ops)."""
    from .act_inline import act_quant_inline

    act_format, _, padded_in, _, _ = _lookup(key)
    x = x2 if x_tail is None else torch.cat([x2, x_tail], 1)  # (M, K)
    a = act_quant_inline(x, act_format, padded_in=padded_in, down_folded=down_folded, smooth_recip=smooth_recip,
                         down_cat=down_cat)
    return torch.ops.fourbit.scaled_gemm(a.q, weights[0], a.row_scale, weights[1], a.lr,
                                         None if a.lr is None else up, bias, x2.dtype, act, act_lo, act_hi)
