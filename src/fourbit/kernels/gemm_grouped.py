"""Group-scaled GEMM for formats whose group scales do not fold into the operands (the paper's INT4).

    y (M, N) = sum_g (A_g @ B_g^T) * sa[g, m] * sb[g, n]  +  L @ U^T  +  bias

A and B hold the 4-bit *codes* as FP8 e4m3 values (int4 codes -8..7 are exact), one K-step per group of
``group`` elements; sa (G, M) and sb (G, N) are fp32 group scales stored group-major so that each step
reads them contiguously. The per-group rescale runs on CUDA cores and dominates on Hopper (see
docs/kernels.md): correct, about 0.3x of bf16. The epilogue is the same as ``gemm.scaled_gemm``'s.
``grouped_gemm_torch`` is the plain-torch twin.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import ceil_div, cdiv, check_device, interpreting, num_sms, tma_aligned
from .gemm import (GemmConfig, TensorDescriptor, _branch_hi_lo, _tile_coords, add_branch, branch_chunk, branch_operands,
                   branch_torch)


@triton.jit
def _grouped_gemm_kernel(
    a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, lr_ptr, up_ptr, bias_ptr,
    M, N, K, stride_cm, stride_sa, stride_sb, stride_lr, stride_up,
    G: tl.constexpr, RANK: tl.constexpr, RCHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BRANCH_UPCAST: tl.constexpr, BRANCH_HI_LO: tl.constexpr,  # as ``gemm.add_branch``'s UPCAST / HI_LO
    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = cdiv(M, BM)
    num_pid_n = cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    n_groups = K // G
    for tile in tl.range(pid, num_tiles, NUM_PROGS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        offs_m = off_m + tl.arange(0, BM)
        offs_n = off_n + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.full((BM, BN), 0, tl.float32)
        for g in range(n_groups):
            a = a_desc.load([off_m, g * G])  # (BM, G) codes
            b = b_desc.load([off_n, g * G])  # (BN, G)
            d = tl.dot(a, b.T)  # exact: |sum| <= 64 * G
            sa = tl.load(sa_ptr + g * stride_sa + offs_m, mask=mask_m, other=0.0)
            sb = tl.load(sb_ptr + g * stride_sb + offs_n, mask=mask_n, other=0.0)
            acc += d * (sa[:, None] * sb[None, :])
        y = acc
        if RANK > 0:
            y = add_branch(y, lr_ptr, up_ptr, offs_m, offs_n, mask_m, mask_n, stride_lr, stride_up, RANK, RCHUNK,
                           BRANCH_UPCAST, BRANCH_HI_LO)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


#: chosen by the benchmark's sweep (docs/kernels.md); BK is the group size
DEFAULT_CONFIG = GemmConfig(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, persistent=True)


def _check(a, b, sa, sb, group, lr, up, bias):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_gemm: a (M, K) and b (N, K) expected, got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise TypeError("grouped_gemm: operands must be float8_e4m3fn codes")
    m, k = a.shape
    n = b.shape[0]
    if k % group or group < 32:
        raise ValueError(f"grouped_gemm: K={k} must be a multiple of the group size {group} (>= 32)")
    if sa.shape != (k // group, m) or sb.shape != (k // group, n):
        raise ValueError(f"grouped_gemm: scales must be group-major (K/g, M) and (K/g, N); got "
                         f"{tuple(sa.shape)}, {tuple(sb.shape)}")
    if (lr is None) != (up is None):
        raise ValueError("grouped_gemm: pass both lr and up, or neither")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"grouped_gemm: bias has {bias.numel()} elements, expected N={n}")
    return m, n, k


def grouped_gemm(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, group: int, lr: Optional[Tensor] = None,
                 up: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 out_dtype: torch.dtype = torch.bfloat16, config: Optional[GemmConfig] = None) -> Tensor:
    """y = sum_g (a_g @ b_g^T) * sa[g, :, None] * sb[g, None, :] + lr @ up^T + bias, (M, N) in ``out_dtype``.

    a (M, K), b (N, K): float8_e4m3fn codes; sa (K/g, M), sb (K/g, N): contiguous fp32 group scales.
    """
    m, n, k = _check(a, b, sa, sb, group, lr, up, bias)
    check_device(a, b, sa, sb, lr, up, bias)
    cfg = config or DEFAULT_CONFIG
    lr, up, rank = branch_operands(lr, up)
    a, b = tma_aligned(a), tma_aligned(b)
    c = torch.empty((m, n), device=a.device, dtype=out_dtype)
    a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, group])
    b_desc = TensorDescriptor.from_tensor(b, [cfg.BN, group])
    tiles = ceil_div(m, cfg.BM) * ceil_div(n, cfg.BN)
    progs = min(tiles, num_sms(a.device)) if cfg.persistent else tiles
    _grouped_gemm_kernel[(progs,)](
        a_desc, b_desc, c, sa.contiguous(), sb.contiguous(),
        c if lr is None else lr, c if up is None else up, c if bias is None else bias,
        m, n, k, c.stride(0), sa.shape[1], sb.shape[1],
        0 if lr is None else lr.stride(0), 0 if up is None else up.stride(0),
        G=group, RANK=rank, RCHUNK=branch_chunk(rank), HAS_BIAS=bias is not None,
        BRANCH_UPCAST=interpreting(), BRANCH_HI_LO=_branch_hi_lo(lr, up, cfg), BM=cfg.BM, BN=cfg.BN,
        GROUP_M=cfg.GROUP_M,
        NUM_PROGS=progs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c


def grouped_gemm_torch(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, group: int, lr: Optional[Tensor] = None,
                       up: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       out_dtype: torch.dtype = torch.bfloat16, config: Optional[GemmConfig] = None) -> Tensor:
    """Plain-torch twin of ``grouped_gemm``: dequantize both operands in fp32 and multiply (the branch as
    ``scaled_gemm_torch``'s)."""
    m, n, k = _check(a, b, sa, sb, group, lr, up, bias)
    ad = (a.float().reshape(m, k // group, group) * sa.t().unsqueeze(-1)).reshape(m, k)
    bd = (b.float().reshape(n, k // group, group) * sb.t().unsqueeze(-1)).reshape(n, k)
    y = branch_torch(ad @ bd.t(), lr, up, config)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
