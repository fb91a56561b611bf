"""Row/column-scaled GEMM with the low-rank up-projection and the bias fused into the epilogue.

    y (M, N) = (A (M, K) @ B (N, K)^T) * a_scale[m] * b_scale[n]  +  L (M, R) @ U (N, R)^T  +  bias[n]

A and B are FP8 e4m3 (the Hopper-native 4-bit formats, exact), int8 (W8A8) or bf16/fp16 (dequantized
paper formats); the product accumulates in fp32 (int32 for int8), the epilogue is fp32 and the output is
rounded once to ``out_dtype``. L is the low-rank down-projection X^ L1 from ``act_quant`` (fp32) and U the
up-projection (the layer's own bf16 / fp16 factor, or fp32; rank padded to a power of two >= 16): the branch
costs one K=R dot per output tile (``add_branch``: 16-bit for a 16-bit U, TF32 for fp32) and never re-reads or
re-writes y.

Kernel: persistent over output tiles (grouped ordering for L2 reuse), operands through TMA descriptors, a
software-pipelined K loop; a partial last wave shared out by K iterations (stream-K), or, for launches of fewer
tiles than SMs, all of them (split-K). Tiles and schedule by shape: ``gemm_table.py`` (measured rows), else
``rule_config``. ``scaled_gemm_torch`` is the plain-torch twin (same signature, fp32 math).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemm_table
from ._common import ceil_div, cdiv, check_device, device_class, interpreting, next_pow2, num_sms, tma_aligned
from .activation import OutputActivation, activate_columns, activation_torch
from .gemm_table import GemmConfig  # noqa: F401 (the launcher's config type, re-exported)
from .row_amax import RowAmax, row_amax_torch, tile_row_amax

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share each column sweep, so B tiles stay in L2."""
    width = GROUP_M * num_pid_n
    group = tile // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mainloop(a_desc, b_desc, off_m, off_n, kt_lo, kt_hi, acc, BK: tl.constexpr, ACC_INT: tl.constexpr,
              MAX_IMPRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += A[off_m tile, K tiles kt_lo..kt_hi) @ B[off_n tile, same]^T (software-pipelined)."""
    for kt in range(kt_lo, kt_hi):
        a = a_desc.load([off_m, kt * BK])  # (BM, BK); TMA zero-fills past M and K
        b = b_desc.load([off_n, kt * BK])  # (BN, BK)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_INT:  # (Triton 3.6 needs out_dtype spelled out for an int32 accumulator)
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=MAX_IMPRECISE)
    return acc


@triton.jit
def _round16(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x rounded to the 16-bit ``dtype`` (nearest even, as torch): that type on a GPU; in the interpreter, whose
    bf16 conversion truncates, the rounded values in fp32 (the bits' nearest-even rounding; no NaN / inf here).
    A 16-bit x is returned as it is (an lr given in up's type). fp16: clamped to its finite range first (a value
    beyond it becomes +-65504, not inf; ``FP16_MAX``)."""
    if x.dtype != tl.float32:
        return x
    if dtype == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot16(l16, u16, y, UPCAST: tl.constexpr):
    """y + l16 (BM, RC) @ u16 (BN, RC)^T, 16-bit operands, fp32 accumulation (through fp32 in the interpreter, whose
    16-bit dot is wrong; the products of 16-bit values are exact in fp32 either way)."""
    if UPCAST:
        return tl.dot(l16.to(tl.float32), u16.to(tl.float32).T, y, input_precision="ieee")
    return tl.dot(l16, u16.T, y)


@triton.jit
def add_branch(y, lr_ptr, up_ptr, offs_m, offs_n, mask_m, mask_n, stride_lr, stride_up, RANK: tl.constexpr,
               RCHUNK: tl.constexpr, UPCAST: tl.constexpr, HI_LO: tl.constexpr):
    """y (BM, BN) fp32 + L[offs_m] @ U[offs_n]^T, over rank chunks of RCHUNK columns (the shared memory of a
    rank-RCHUNK branch whatever the rank). fp32 U: TF32 dots. 16-bit U: L rounded to U's type (or with HI_LO an
    fp32 L as hi + lo), 16-bit dots (``scaled_gemm``). UPCAST: the interpreter (its 16-bit dot is wrong)."""
    for r0 in tl.static_range(0, RANK, RCHUNK):
        offs_r = r0 + tl.arange(0, RCHUNK)
        lr = tl.load(lr_ptr + offs_m[:, None] * stride_lr + offs_r[None, :], mask=mask_m[:, None], other=0.0)
        up = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_r[None, :], mask=mask_n[:, None], other=0.0)
        if up_ptr.dtype.element_ty == tl.float32:
            y = tl.dot(lr, up.T, y, input_precision="tf32")  # (BM, RC) @ (RC, BN), fp32 accumulate into y
        else:
            hi = _round16(lr, up.dtype, UPCAST)
            y = _dot16(hi, up, y, UPCAST)
            if HI_LO:
                y = _dot16(_round16(lr - hi.to(tl.float32), up.dtype, UPCAST), up, y, UPCAST)
    return y


@triton.jit
def _epilogue(acc, off_m, off_n, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, lr_ptr, up_ptr, bias_ptr,
              amax_ptr, amax_mult_ptr, M, N, stride_cm, stride_lr, stride_up, act_lo, act_hi, amax_lo, amax_hi,
              A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TMA_STORE: tl.constexpr,
              RCHUNK: tl.constexpr, AMAX: tl.constexpr, BRANCH_UPCAST: tl.constexpr,
              BRANCH_HI_LO: tl.constexpr):
    """Scales, low-rank branch, bias, the output activation on columns [act_lo, act_hi); one rounding to the
    output type; with AMAX the rounded tile's row maxima over columns [amax_lo, amax_hi) (``row_amax.py``); store
    the (BM, BN) tile. The branch is summed over rank chunks of RCHUNK columns, so its shared memory is that of a
    rank-RCHUNK branch whatever the rank (a LoRA grows it to 48..288)."""
    y = acc.to(tl.float32)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if A_SCALE == 1:
        y = y * tl.load(a_scale_ptr)
    if A_SCALE == 2:
        y = y * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if B_SCALE == 1:
        y = y * tl.load(b_scale_ptr)
    if B_SCALE == 2:
        y = y * tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if RANK > 0:
        y = add_branch(y, lr_ptr, up_ptr, offs_m, offs_n, mask_m, mask_n, stride_lr, stride_up, RANK, RCHUNK,
                       BRANCH_UPCAST, BRANCH_HI_LO)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if ACT > 0:  # 16-bit outputs take the fast tanh (its error is below their rounding but in GELU's far tail)
        y = activate_columns(y, offs_n, off_n, act_lo, act_hi, ACT, BN, c_ptr.dtype.element_ty != tl.float32)
    yo = y.to(c_ptr.dtype.element_ty)  # the one rounding (c_desc holds the same dtype)
    if AMAX:
        tile_row_amax(yo.to(tl.float32), offs_m, offs_n, mask_m, off_n, amax_ptr, amax_mult_ptr, amax_lo, amax_hi,
                      BN)
    if TMA_STORE:
        c_desc.store([off_m, off_n], yo)
    else:
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, yo, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _scaled_gemm_kernel(
    a_desc, b_desc, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, lr_ptr, up_ptr, bias_ptr, ws_ptr, flag_ptr,
    amax_ptr, amax_mult_ptr,
    M, N, K, stride_cm, stride_lr, stride_up, DP_TILES, SK_ITERS, SK_PER, act_lo, act_hi, amax_lo, amax_hi,
    A_SCALE: tl.constexpr,  # 0: none, 1: one scalar, 2: one per row of A
    B_SCALE: tl.constexpr,  # 0: none, 1: one scalar, 2: one per row of B (= column of y)
    RANK: tl.constexpr,  # padded rank of the low-rank branch; 0 = no branch
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # output activation (``activation.CODES``) on columns [act_lo, act_hi); 0 = none
    ACC_INT: tl.constexpr,  # int8 operands: int32 accumulator
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr, FLATTEN: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong, so 16-bit operands go through fp32
    TMA_STORE: tl.constexpr,  # store the output tile through a TMA descriptor (else masked pointer stores)
    STREAM_K: tl.constexpr,  # SK_ITERS > 0 (compiled in only then; never with ACC_INT)
    RCHUNK: tl.constexpr,  # rank columns per branch dot in the epilogue (min(RANK, 32))
    AMAX: tl.constexpr,  # also the row maxima of output columns [amax_lo, amax_hi) (``row_amax.py``)
    BRANCH_UPCAST: tl.constexpr,  # interpreter only: a 16-bit branch's dots through fp32
    BRANCH_HI_LO: tl.constexpr,  # a 16-bit up with an fp32 lr: lr as hi + lo (two dots), else rounded once
):
    """Tiles [0, DP_TILES): one program each, round robin. The remaining tiles (fewer than one wave; SK_ITERS =
    their K tiles in all, 0 = none) are shared out by K iterations, SK_PER per program (stream-K): a program
    walks its range from the end; the segment holding a tile's last K iteration owns the tile: it adds the
    partial sums of the programs before it (fp32 slots in ``ws``, in program order: deterministic), then runs
    the epilogue; the other segments store their partial sum and raise their flag (zeroed per launch)."""
    pid = tl.program_id(0)
    num_pid_m = cdiv(M, BM)
    num_pid_n = cdiv(N, BN)
    k_tiles = cdiv(K, BK)
    # the grid's size, not a constexpr: one compiled kernel for every grid (few-tile and split-K launches vary it)
    for tile in tl.range(pid, DP_TILES, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        if ACC_INT:
            acc = tl.full((BM, BN), 0, tl.int32)
        else:
            acc = tl.full((BM, BN), 0, tl.float32)
        acc = _mainloop(a_desc, b_desc, pid_m * BM, pid_n * BN, 0, k_tiles, acc, BK, ACC_INT, MAX_IMPRECISE,
                        UPCAST)
        _epilogue(acc, pid_m * BM, pid_n * BN, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, lr_ptr, up_ptr, bias_ptr,
                  amax_ptr, amax_mult_ptr, M, N, stride_cm, stride_lr, stride_up, act_lo, act_hi, amax_lo, amax_hi,
                  A_SCALE, B_SCALE, RANK, HAS_BIAS, ACT, BM, BN, TMA_STORE, RCHUNK, AMAX,
                  BRANCH_UPCAST, BRANCH_HI_LO)
    if STREAM_K:
        start = pid * SK_PER
        it = tl.minimum(start + SK_PER, SK_ITERS)
        offs_tile = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]  # (BM, BN) in a workspace slot
        while it > start:
            t = (it - 1) // k_tiles  # stream-K tile index
            t_lo = t * k_tiles  # its first iteration
            seg_lo = tl.maximum(t_lo, start)
            pid_m, pid_n = _tile_coords(DP_TILES + t, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.full((BM, BN), 0, tl.float32)
            acc = _mainloop(a_desc, b_desc, pid_m * BM, pid_n * BN, seg_lo - t_lo, it - t_lo, acc, BK, ACC_INT,
                            MAX_IMPRECISE, UPCAST)
            if it == t_lo + k_tiles:  # owner: the partials of programs t_lo // SK_PER .. pid - 1, in order
                for q in range(t_lo // SK_PER, pid):
                    while tl.atomic_add(flag_ptr + q, 0, sem="acquire") == 0:
                        pass
                    acc += tl.load(ws_ptr + q * (BM * BN) + offs_tile, cache_modifier=".cg")
                _epilogue(acc, pid_m * BM, pid_n * BN, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, lr_ptr, up_ptr,
                          bias_ptr, amax_ptr, amax_mult_ptr, M, N, stride_cm, stride_lr, stride_up, act_lo, act_hi,
                          amax_lo, amax_hi, A_SCALE, B_SCALE, RANK, HAS_BIAS, ACT, BM, BN, TMA_STORE, RCHUNK, AMAX,
                          BRANCH_UPCAST, BRANCH_HI_LO)
            else:  # the head of a tile owned by a later program (only ever this program's last segment)
                tl.store(ws_ptr + pid * (BM * BN) + offs_tile, acc)
                tl.debug_barrier()  # every thread's part of the slot is written before the flag goes up
                tl.atomic_xchg(flag_ptr + pid, 1, sem="release")
            it = seg_lo


#: Per-(operand dtype, size class) defaults. Chosen by ``benchmarks/linear.py --tune`` on an H100 (2026-11-22,
#: Triton 3.6): 128x256x128, 3 stages, persistent, TMA store was best or within 2% of best at all nine
#: FLUX shapes (M = 4608 and 1024) for fp8; 128x128 tiles were 10-45% slower; promoting the fp8 accumulator
#: every BK ("precise") cost 40%. bf16: 128x256x64, 3 stages. int8 (not swept yet): the fp8 tiles.
_DEFAULTS: dict[tuple[str, str], GemmConfig] = {
    ("fp8", "large"): GemmConfig(128, 256, 128, 8, 8, 3, True, tma_store=True),
    ("fp8", "small"): GemmConfig(128, 256, 128, 8, 8, 3, True, tma_store=True),
    ("int8", "large"): GemmConfig(128, 256, 128, 8, 8, 3, True, tma_store=True),
    ("int8", "small"): GemmConfig(128, 256, 128, 8, 8, 3, True, tma_store=True),
    ("16", "large"): GemmConfig(128, 256, 64, 8, 8, 3, True),
    ("16", "small"): GemmConfig(128, 256, 64, 8, 8, 3, True),
}
_OVERRIDES: dict[tuple[str, str], GemmConfig] = {}


def _operand_kind(dtype: torch.dtype) -> str:
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    if dtype == torch.int8:
        return "int8"
    if dtype in (torch.bfloat16, torch.float16):
        return "16"
    raise TypeError(f"scaled_gemm: unsupported operand dtype {dtype}")


#: fp8 from this K on: the stream-K tail (branch_probe.h100.2026-11-22c: 3-4% at 4608 x 12288 x 3072 and
#: 4608 x 15360 x 3072, two rounds each; 10-15% slower at K = 3072, where its partial tiles are short)
STREAM_K_MIN_K = 8192


#: fp8 / int8 launches of at most FEW_TILES_MAX_M rows with fewer 128 x 256 tiles than this many waves of SMs take
#: ``FEW_TILES``: 64 x 128 tiles, one program each (step_shapes.h100.2026-11-22: the FLUX text stream at M = 512 and
#: the adaLN linears at M = 1, 48-144 tiles, 8-25% faster; at 192 tiles (1.45 waves) 3% slower, so not there; not
#: measured better at M = 1024, so only up to 512 rows)
FEW_TILES_WAVES = 1.25
FEW_TILES_MAX_M = 512
FEW_TILES = GemmConfig(64, 128, 128, 8, 4, 4, False, tma_store=True)


def _size(m: int, n: int) -> str:
    return "large" if m * n >= 4096 * 4096 else "small"


def rule_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int = 132) -> GemmConfig:
    """The rule for a problem no row of ``gemm_table.TABLE`` holds (FLUX.1 shapes, H100, 2026-11-22): the
    per-dtype default, ``FEW_TILES`` for few tiles of few rows, the stream-K tail for fp8 from ``STREAM_K_MIN_K``."""
    kind = _operand_kind(dtype)
    cfg = _DEFAULTS[(kind, _size(m, n))]
    if (kind in ("fp8", "int8") and m <= FEW_TILES_MAX_M
            and ceil_div(m, cfg.BM) * ceil_div(n, cfg.BN) < FEW_TILES_WAVES * sms):
        return FEW_TILES
    if kind == "fp8" and k >= STREAM_K_MIN_K:
        cfg = replace(cfg, stream_k=True)
    return cfg


_from_key = functools.lru_cache(maxsize=None)(GemmConfig.from_key)


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int = 132, device: str = "sm90") -> GemmConfig:
    """The tile config ``scaled_gemm`` uses for an (m, n, k) problem on a GPU of class ``device``
    (``_common.device_class``) with ``sms`` SMs: an override (``set_default_config`` / ``default_configs``), else
    the first row of ``gemm_table.TABLE`` that holds the problem, else ``rule_config``."""
    kind = _operand_kind(dtype)
    override = _OVERRIDES.get((kind, _size(m, n)))
    if override is not None:
        return override
    key = gemm_table.lookup(m, n, k, kind, device)
    return rule_config(m, n, k, dtype, sms) if key is None else _from_key(key)


def set_default_config(dtype: torch.dtype, size: str, config: GemmConfig) -> None:
    """Replace the default tile config for an operand dtype and size class ("large" / "small")."""
    _OVERRIDES[(_operand_kind(dtype), size)] = config


@contextlib.contextmanager
def default_configs(dtype: torch.dtype, change: Callable[[GemmConfig], GemmConfig]):
    """Within the block, both size classes of ``dtype`` use ``change(built-in default)`` (e.g. ``lambda c:
    replace(c, precise=True)``); the previous overrides come back afterwards, also on an exception."""
    kind = _operand_kind(dtype)
    saved = dict(_OVERRIDES)
    for size in ("large", "small"):
        _OVERRIDES[(kind, size)] = change(_DEFAULTS[(kind, size)])
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _scale_mode(s: Optional[Tensor], rows: int, name: str) -> int:
    if s is None:
        return 0
    if s.dtype != torch.float32 or not s.is_contiguous():
        raise TypeError(f"scaled_gemm: {name} must be contiguous fp32")
    if s.numel() == 1:
        return 1
    if s.numel() == rows:
        return 2
    raise ValueError(f"scaled_gemm: {name} has {s.numel()} elements; expected 1 or {rows}")


def _check(a, b, a_scale, b_scale, lr, up, bias):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_gemm: a (M, K) and b (N, K) expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"scaled_gemm: operand dtypes differ: {a.dtype} vs {b.dtype}")
    _operand_kind(a.dtype)
    m, n = a.shape[0], b.shape[0]
    if (lr is None) != (up is None):
        raise ValueError("scaled_gemm: pass both lr (M, R) and up (N, R), or neither")
    if lr is not None:
        if lr.shape[0] != m or up.shape[0] != n or lr.shape[1] != up.shape[1]:
            raise ValueError(f"scaled_gemm: lr {tuple(lr.shape)} / up {tuple(up.shape)} do not match M={m}, N={n}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"scaled_gemm: bias has {bias.numel()} elements, expected N={n}")
    return m, n, a.shape[1]


def _check_out(out: Optional[Tensor], m: int, n: int, out_dtype: torch.dtype) -> None:
    if out is None:
        return
    if out.shape != (m, n) or out.dtype != out_dtype:
        raise ValueError(f"scaled_gemm: out must be ({m}, {n}) {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.stride(1) != 1 or (out.stride(0) * out.element_size()) % 16 or out.data_ptr() % 16:
        raise ValueError("scaled_gemm: out needs contiguous rows with a 16-byte-aligned start and row stride "
                         f"(got strides {out.stride()})")


def _pad_rank(t: Tensor, r: int, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype)
    if t.shape[1] != r:
        t = torch.nn.functional.pad(t, (0, r - t.shape[1]))
    return t.contiguous()


#: the largest finite fp16: an fp32 lr beyond it is clamped before its rounding to fp16 (``_round16``)
FP16_MAX = 65504.0


def branch_operands(lr: Optional[Tensor], up: Optional[Tensor]) -> tuple:
    """(lr, up, padded rank) as the epilogue reads them: the rank padded to a power of two >= 16; a bf16 / fp16 up
    kept (no copy when padded already), anything else fp32; lr in up's 16-bit type if given so, else fp32."""
    if lr is None:
        return None, None, 0
    rank = next_pow2(lr.shape[1], 16)
    up = _pad_rank(up, rank, up.dtype if up.dtype in (torch.bfloat16, torch.float16) else torch.float32)
    return _pad_rank(lr, rank, up.dtype if lr.dtype == up.dtype else torch.float32), up, rank


def branch_torch(y: Tensor, lr: Optional[Tensor], up: Optional[Tensor], config: Optional["GemmConfig"]) -> Tensor:
    """The twins' y + lr @ up^T in fp32, a 16-bit up's lr rounded to its type first as the epilogue does."""
    if lr is None:
        return y
    if up.dtype != torch.float32 and not _branch_hi_lo(lr, up, config):  # the branch in up's 16 bits
        lr = (lr.clamp(-FP16_MAX, FP16_MAX) if up.dtype == torch.float16 else lr).to(up.dtype)
    return y + lr.float() @ up.float().t()


def _branch_hi_lo(lr: Optional[Tensor], up: Optional[Tensor], cfg: Optional["GemmConfig"]) -> bool:
    """Whether a 16-bit up-projection's fp32 lr goes in as hi + lo (``precise`` configs), not rounded once."""
    return (lr is not None and lr.dtype == torch.float32 and up.dtype != torch.float32 and cfg is not None
            and cfg.precise)


def _stream_k_split(tiles: int, progs: int, k_tiles: int, cfg: "GemmConfig", dtype: torch.dtype):
    """(data-parallel tiles, stream-K iterations, iterations per program) for one launch.

    Stream-K only where it can help: a persistent fp8 / 16-bit launch whose tiles leave the last wave partly
    empty (e.g. 432 tiles of 128 x 256 on 132 SMs: 3.27 waves run as 4 without it)."""
    rem = tiles % progs
    if not (cfg.stream_k and cfg.persistent and rem and tiles > progs and k_tiles > 1 and dtype != torch.int8):
        return tiles, 0, 0
    sk_iters = rem * k_tiles
    return tiles - rem, sk_iters, ceil_div(sk_iters, progs)


def _workspace(progs: int, cfg: "GemmConfig", a: Tensor) -> tuple[Tensor, Tensor]:
    """One fp32 (BM, BN) partial-sum slot and one zeroed flag per program of a stream-K / split-K launch. From the
    caching allocator at every call, so it is ordered on the caller's stream and safe under CUDA-graph capture (a
    cached workspace shared between streams or graph pools is not); its cost is one small memset."""
    ws = torch.empty((progs, cfg.BM * cfg.BN), device=a.device, dtype=torch.float32)
    return ws, torch.zeros((progs,), device=a.device, dtype=torch.int32)


def launch_plan(m: int, n: int, k: int, cfg: "GemmConfig", dtype: torch.dtype, sms: int) -> tuple[int, int, int, int]:
    """(programs, data-parallel tiles, stream-K iterations, iterations per program) of a launch.

    Split-K (``cfg.split_k``): a launch of fewer tiles than SMs (few rows, e.g. conditioning layers) would leave
    SMs idle; instead all its tiles' K iterations are dealt out in equal runs to as many programs as there are SMs,
    with stream-K's fix-up (the kernel's stream-K loop with no data-parallel tiles). Only where a run is shorter
    than a tile's K loop (else no tile would be split). Otherwise data-parallel, with the stream-K tail
    (``_stream_k_split``) where ``cfg.stream_k``."""
    tiles, k_tiles = ceil_div(m, cfg.BM) * ceil_div(n, cfg.BN), ceil_div(k, cfg.BK)
    if cfg.split_k and tiles < sms and k_tiles > 1 and dtype != torch.int8:
        sk_iters = tiles * k_tiles
        per = ceil_div(sk_iters, sms)
        if per < k_tiles:
            return ceil_div(sk_iters, per), 0, sk_iters, per  # (M, N) tiles x K tiles in runs of ``per``
    progs = min(tiles, sms) if cfg.persistent else tiles
    return (progs,) + _stream_k_split(tiles, progs, k_tiles, cfg, dtype)


def scaled_gemm(a: Tensor, b: Tensor, a_scale: Optional[Tensor] = None, b_scale: Optional[Tensor] = None,
                lr: Optional[Tensor] = None, up: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                out_dtype: torch.dtype = torch.bfloat16, config: Optional[GemmConfig] = None,
                act: Optional[OutputActivation] = None, out: Optional[Tensor] = None,
                next_amax: Optional[RowAmax] = None) -> Tensor:
    """y = act((a @ b^T) * a_scale[:, None] * b_scale[None, :] + lr @ up^T + bias), (M, N) in ``out_dtype``.

    a (M, K), b (N, K): both float8_e4m3fn, int8, bf16 or fp16; rows contiguous with a 16-byte-aligned stride
    (else they are copied).
    a_scale: fp32 (M,) or (1,); b_scale: fp32 (N,) or (1,); lr (M, R) and up (N, R): the low-rank branch (R is
    padded to a power of two >= 16). An fp32 up: one TF32 dot (lr and up rounded to 10-bit mantissas). A bf16 /
    fp16 up (a 16-bit model's own up-projection, exact; half the epilogue's bytes): the branch in that 16-bit
    type, as SVDQuant's: lr rounded to it once (~2^-9 relative on the branch), one 16-bit dot; with
    ``GemmConfig(precise=True)`` an fp32 lr as hi + lo instead (two dots, ~2^-16). The twin rounds the same way;
    bias (N,); act: an activation on a range of output columns,
    applied in fp32 before the rounding (``activation.py``); out: an (M, N) ``out_dtype`` tensor with contiguous,
    16-byte-aligned rows to write y into (e.g. a block of rows of a larger output), else y is allocated;
    next_amax: also the row maxima of the rounded y's columns [lo, hi) times ``mult``, into ``next_amax.out``
    (``row_amax.py``).
    """
    m, n, k = _check(a, b, a_scale, b_scale, lr, up, bias)
    _check_out(out, m, n, out_dtype)
    act_lo, act_hi = (0, 0) if act is None else act.bounds(n)
    if next_amax is not None:
        next_amax.check(m, n)
    check_device(a, b, a_scale, b_scale, lr, up, bias, out, *(() if next_amax is None else (next_amax.out,
                                                                                         next_amax.mult)))
    if TensorDescriptor is None:
        raise RuntimeError("scaled_gemm needs Triton >= 3.4 (tensor descriptors)")
    a, b = tma_aligned(a), tma_aligned(b)  # no copy for operands from act_quant / expand_weight
    sms = num_sms(a.device)
    cfg = config or default_config(m, n, k, a.dtype, sms, device_class(a.device))
    lr, up, rank = branch_operands(lr, up)
    c = torch.empty((m, n), device=a.device, dtype=out_dtype) if out is None else out
    a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK])
    b_desc = TensorDescriptor.from_tensor(b, [cfg.BN, cfg.BK])
    # TMA store stages the whole tile in shared memory: 16-bit outputs only (an fp32 tile does not fit)
    tma_store = cfg.tma_store and c.element_size() == 2 and (n * 2) % 16 == 0 and not interpreting()
    c_desc = TensorDescriptor.from_tensor(c, [cfg.BM, cfg.BN]) if tma_store else a_desc
    progs, dp_tiles, sk_iters, sk_per = launch_plan(m, n, k, cfg, a.dtype, sms)
    ws, flags = _workspace(progs, cfg, a) if sk_iters else (None, None)
    dummy = c  # never read when the matching flag is off
    is_fp8 = a.dtype == torch.float8_e4m3fn
    launch = lambda stages: _scaled_gemm_kernel[(progs,)](  # noqa: E731
        a_desc, b_desc, c_desc, c,
        dummy if a_scale is None else a_scale, dummy if b_scale is None else b_scale,
        dummy if lr is None else lr, dummy if up is None else up,
        dummy if bias is None else bias, dummy if ws is None else ws, dummy if flags is None else flags,
        dummy if next_amax is None else next_amax.out.view(torch.int32),  # (the maxima's bits: ``row_amax.py``)
        dummy if next_amax is None else next_amax.mult,
        m, n, k, c.stride(0), 0 if lr is None else lr.stride(0), 0 if up is None else up.stride(0),
        dp_tiles, sk_iters, sk_per, act_lo, act_hi,
        0 if next_amax is None else next_amax.lo, 0 if next_amax is None else next_amax.hi,
        A_SCALE=_scale_mode(a_scale, m, "a_scale"), B_SCALE=_scale_mode(b_scale, n, "b_scale"),
        RANK=rank, HAS_BIAS=bias is not None, ACT=0 if act_hi <= act_lo else act.code,
        ACC_INT=a.dtype == torch.int8,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        MAX_IMPRECISE=cfg.BK if (cfg.precise and is_fp8 and not interpreting()) else None,
        FLATTEN=cfg.flatten, UPCAST=interpreting() and a.element_size() == 2, TMA_STORE=tma_store,
        STREAM_K=sk_iters > 0, RCHUNK=branch_chunk(rank), AMAX=next_amax is not None, BRANCH_UPCAST=interpreting(),
        BRANCH_HI_LO=_branch_hi_lo(lr, up, cfg),
        num_warps=cfg.num_warps, num_stages=stages,
    )
    launch_with_fewer_stages(launch, cfg.num_stages, (cfg.key(), rank, a.dtype, tma_store, str(a.device),
                                                      next_amax is not None))
    return c


#: rank columns per epilogue dot of the low-rank branch: rank 32 (SVDQuant's) is one dot; a LoRA-grown branch
#: takes several, in the shared memory of one (rank 32 + 128 in one dot needed 384 KiB at 1 stage on an H200)
BRANCH_CHUNK = 32


def branch_chunk(rank: int) -> int:
    """The epilogue's rank columns per dot for a (padded) branch rank (any power of two >= 16 when there is none)."""
    return min(rank, BRANCH_CHUNK) if rank else BRANCH_CHUNK

#: (config key, branch rank, operand dtype, TMA store, device) -> the pipeline depth that fits in shared memory
_FITTING_STAGES: dict[tuple, int] = {}


def launch_with_fewer_stages(launch: Callable[[int], object], stages: int, key: tuple) -> None:
    """``launch(num_stages)``, retried with one stage fewer while Triton reports that the kernel's shared memory
    does not fit (a large low-rank branch, e.g. rank 32 + a rank-64 LoRA padded to 128, stages its fp32 operands
    beside the pipeline: 256 KiB at 3 stages on an H200 with 227 KiB); the depth that fits is remembered."""
    from triton.runtime.errors import OutOfResources

    stages = _FITTING_STAGES.get(key, stages)
    while True:
        try:
            launch(stages)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return


def scaled_gemm_torch(a: Tensor, b: Tensor, a_scale: Optional[Tensor] = None, b_scale: Optional[Tensor] = None,
                      lr: Optional[Tensor] = None, up: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      out_dtype: torch.dtype = torch.bfloat16, config: Optional[GemmConfig] = None,
                      act: Optional[OutputActivation] = None, out: Optional[Tensor] = None,
                      next_amax: Optional[RowAmax] = None) -> Tensor:
    """Plain-torch twin of ``scaled_gemm`` (fp32 math; int8 sums exact; a 16-bit up's branch rounded as there)."""
    m, n, _ = _check(a, b, a_scale, b_scale, lr, up, bias)
    _check_out(out, m, n, out_dtype)
    if a.dtype == torch.int8:  # exact integer sums in float64 (|sum| < 2^53), then fp32
        y = (a.double() @ b.double().t()).float()
    else:
        y = a.float() @ b.float().t()
    if a_scale is not None:
        y = y * a_scale.reshape(-1, 1)
    if b_scale is not None:
        y = y * b_scale.reshape(1, -1)
    y = branch_torch(y, lr, up, config)
    if bias is not None:
        y = y + bias.float()
    y = activation_torch(y, act).to(out_dtype)
    row_amax_torch(y, next_amax)
    return y if out is None else out.copy_(y)
