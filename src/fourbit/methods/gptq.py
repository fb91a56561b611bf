"""GPTQ weight rounding (Frantar et al., ICLR 2023) for any Format.

Rounding each weight to its nearest grid value (RTN) ignores that input channels are correlated. GPTQ
quantizes W (N, K) one input column at a time and pushes each column's rounding error onto the columns not
yet quantized, weighted by the inverse Hessian of the layer's squared output error on calibration rows X:

  H = 2 X^T X / n,  dead inputs (H_jj = 0) get H_jj = 1,  H += damp * mean(diag H) * I
  U = upper Cholesky factor of H^-1 (H^-1 = U^T U)
  for each column j:  q_j = nearest representable value of w_j (under the group's fixed scales)
                      e = (w_j - q_j) / U_jj;   w_k -= e * U_jk  for every k > j

Columns are taken in blocks of ``block_size`` (128): inside a block the updates are applied column by
column, the rest of W is updated once per block ("lazy batch"; same result, less memory traffic).

Group scales: when the quantizer reaches the first column of a group, the format quantizes that group's
current, error-updated columns and the scales it picks are kept for the whole group (blocks are aligned
to groups so those columns are up to date). ``static_groups=True`` takes every scale from the original W
instead (one RTN pass); it is always used for formats with a row or tensor scale (int4p2, fp4p2, nvfp4,
quartz with stage1="token") and for per-row formats, whose scales depend on the whole row.

"Nearest representable value under fixed scales" is asked of the format itself: it dequantizes every code
under those scales (16 candidates for a 4-bit format), so any format works, QuaRTZ's per-group flags
included. The result is the format's own QuantizedTensor (codes, the kept scales, row scale).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..formats import Format, QuantizedTensor

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def code_set(fmt: Format) -> Tensor:
    """Every code the format may hold, as a 1-D tensor of its code dtype.

    A format can narrow it with ``valid_codes()`` (QuaRTZ: -7..7); signed 8-bit codes are symmetric
    (-127..127, the int8 convention here); other formats use every value of their code width.
    """
    own = getattr(fmt, "valid_codes", None)
    if own is not None:
        return own()
    n = 1 << fmt.code_bits
    if fmt.code_dtype == torch.int8:
        lo = -(n // 2) + (1 if fmt.code_bits == 8 else 0)
        return torch.arange(lo, n // 2, dtype=torch.int16).to(torch.int8)
    return torch.arange(0, n, dtype=torch.int16).to(torch.uint8)


def candidate_values(fmt: Format, codes: Tensor, scales: Tensor, row_scale: Optional[Tensor],
                     shape: tuple[int, int]) -> Tensor:
    """(C, N, w): the value of each code at each position of an (N, w) slice under the given scales."""
    out = []
    for c in codes.tolist():
        filled = torch.full(shape, c, dtype=fmt.code_dtype, device=scales.device)
        out.append(fmt.dequantize(QuantizedTensor(filled, scales, row_scale)))
    return torch.stack(out)


def inverse_hessian_factor(rows: Tensor, k: int, damp: float = DEFAULT_DAMP) -> Tensor:
    """Upper Cholesky factor U of H^-1 (K, K) fp32 from rows (n, K), with relative dampening ``damp``."""
    x = rows.double()
    h = (x.t() @ x) * (2.0 / max(1, x.shape[0]))  # (K, K)
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0  # inputs never seen: no error feedback through them
    mean = float(torch.diagonal(h).mean())
    for attempt in range(4):  # raise the dampening if H is numerically singular
        hd = h + (damp * 10 ** attempt) * mean * torch.eye(k, dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
    raise ValueError(f"GPTQ: the calibration Hessian is not positive definite even with dampening "
                     f"{damp * 1000:g}; pass more calibration rows (calib_rows) or a larger gptq_damp")


def _block_size(fmt: Format, k: int, block_size: int) -> int:
    """Blocks aligned to the format's groups, so a group's columns are up to date when it is reached."""
    if fmt.group_size is None:  # one group per row: any block works (scales are static)
        return min(block_size, k)
    g = fmt.group_for(k)
    return g if g >= block_size else g * (block_size // g)


def gptq_quantize(weight: Tensor, rows: Tensor, fmt: Format, *, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK, static_groups: bool = False) -> QuantizedTensor:
    """GPTQ-round ``weight`` (N, K) for inputs like ``rows`` (n, K) into ``fmt``. Returns the QuantizedTensor.

    rows are the inputs exactly as the quantized weight sees them (e.g. smoothed x / lambda for SVDQuant).
    """
    if weight.dim() != 2 or rows.dim() != 2 or rows.shape[1] != weight.shape[1]:
        raise ValueError(f"GPTQ: weight (N, K) and rows (n, K) must share K; got {tuple(weight.shape)} and "
                         f"{tuple(rows.shape)}")
    if rows.shape[0] == 0:
        raise ValueError("GPTQ needs at least one calibration row")
    w = fmt.check_input(weight).clone()  # (N, K) fp32, validated
    n_out, k = w.shape
    g = fmt.group_for(k)
    static = static_groups or fmt.has_row_scale or fmt.group_size is None
    u = inverse_hessian_factor(rows.to(w.device, torch.float32), k, damp).to(w.device)  # (K, K)
    codes_all = code_set(fmt).to(w.device)
    bs = _block_size(fmt, k, block_size)

    ref = fmt.quantize(w) if static else None  # scales from the original weight
    row_scale = None if ref is None else ref.row_scale
    codes = torch.empty(n_out, k, dtype=fmt.code_dtype, device=w.device)
    kept_scales = []
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        w1 = w[:, b0:b1].clone()  # (N, B): updated column by column
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        if static:
            sc = ref.scales if fmt.group_size is None else ref.scales[:, b0 // g: b1 // g]
            cand, c0 = candidate_values(fmt, codes_all, sc, row_scale, (n_out, b1 - b0)), 0  # (C, N, B)
        for i in range(b1 - b0):
            if not static and (b0 + i) % g == 0:  # a new group: fix its scales from its current columns
                qg = fmt.quantize(w1[:, i:i + g])
                kept_scales.append(qg.scales)
                cand, c0 = candidate_values(fmt, codes_all, qg.scales, None, (n_out, g)), i  # (C, N, g)
            col = w1[:, i]  # (N,)
            values = cand[:, :, i - c0]  # (C, N)
            idx = (values - col).abs().argmin(dim=0)  # (N,) nearest candidate
            qv = values.gather(0, idx.unsqueeze(0)).squeeze(0)
            codes[:, b0 + i] = codes_all[idx]
            e = (col - qv) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    scales = ref.scales if static else torch.cat(kept_scales, dim=1)
    return QuantizedTensor(codes, scales, row_scale)
