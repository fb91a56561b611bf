"""Pieces shared by the methods: smoothing factors, low-rank splits, and the layer output error."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..formats import Format
from ..kernels.reference import smooth_reciprocal
from ..nn.state import QuantizedLinearState

EPS = 1e-5


def quantize_state(weight: Tensor, weight_format: Format, act_format: Optional[Format],
                   smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                   lr_up: Optional[Tensor] = None, rows: Optional[Tensor] = None,
                   gptq: Optional[dict] = None, **info) -> QuantizedLinearState:
    """Quantize ``weight`` (N, Kp) with ``weight_format`` and wrap everything in a state.

    rows (n, Kp): the calibration inputs as this weight sees them (smoothed); given, the weight is
    GPTQ-rounded with options ``gptq`` (see ``rounding_kwargs``), otherwise rounded to nearest.
    """
    return QuantizedLinearState(quantize_weight(weight, weight_format, rows, gptq), weight_format, act_format,
                                smooth=smooth, lr_down=lr_down, lr_up=lr_up, info=dict(info))


def quantize_weight(weight: Tensor, fmt: Format, rows: Optional[Tensor] = None,
                    gptq: Optional[dict] = None):
    """RTN (``rows`` None) or GPTQ on ``rows`` (n, Kp) of ``weight`` (N, Kp) -> QuantizedTensor."""
    if rows is None:
        return fmt.quantize(weight)
    from .gptq import gptq_quantize

    return gptq_quantize(weight, rows, fmt, **(gptq or {}))


def rounding_kwargs(cfg, stats, weight: Tensor, smooth: Optional[Tensor] = None) -> dict:
    """What ``quantize_state``/``quantize_weight`` need for ``cfg.weight_rounding``: {} for RTN, else the
    calibration rows as the quantized weight sees them (x * (1 / smooth), padded to Kp) and the GPTQ options."""
    if cfg.weight_rounding == "rtn":
        return {}
    if stats is None:
        raise ValueError(f"weight_rounding={cfg.weight_rounding!r} needs calibration rows; none were recorded "
                         f"for this layer")
    x = calibration_rows(stats, weight)
    return {"rows": x if smooth is None else x * smooth_reciprocal(smooth),
            "gptq": {"damp": cfg.gptq_damp, "static_groups": cfg.weight_rounding == "gptq_static"}}


def smoothing_factors(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """lambda_k = max|X[:, k]|^alpha / max|W[:, k]|^(1 - alpha); weight is (N, K). Returns (K,) fp32.

    A channel that was zero in every calibration row (and a padding channel) gets lambda = 1, no smoothing:
    its formula value ~EPS^alpha would divide any non-zero input it sees at inference by ~1e-3 (the
    quantization error of SVDQuant doubled on such a channel). ``fourbit.quantize`` warns about these layers.
    """
    a = act_absmax.float().clamp_min(EPS)
    w = weight.abs().amax(dim=0).float().clamp_min(EPS)
    lam = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(EPS)
    return torch.where(act_absmax.to(lam.device) > 0, lam, torch.ones_like(lam))


def low_rank(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation of weight (N, K) = lr_up (N, r) @ lr_down (r, K) (Eckart-Young).

    Computed exactly from the eigen-decomposition of the smaller Gram matrix in float64 (several times
    faster than a full SVD on CPU and GPU for the top-r directions); the factors share sqrt(sigma).
    """
    w = weight.double()
    n, k = w.shape
    r = min(rank, n, k)
    gram = w @ w.t() if n <= k else w.t() @ w  # (min(N, K),) squared
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    top = evecs[:, -r:].flip(-1)  # (min, r)
    sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()  # (r,)
    root = sigma.sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if n <= k:  # top = U_r: lr_up = U_r sqrt(S), lr_down = sqrt(S)^-1 U_r^T W = sqrt(S) V_r^T
        lr_up = top * root
        lr_down = inv_root[:, None] * (top.t() @ w)
    else:  # top = V_r: lr_down = sqrt(S) V_r^T, lr_up = W V_r sqrt(S)^-1 = U_r sqrt(S)
        lr_down = root[:, None] * top.t()
        lr_up = (w @ top) * inv_root
    return lr_down.float(), lr_up.float()


def low_rank_randomized(weight: Tensor, rank: int, oversample: int = 16, power_iters: int = 2,
                        seed: int = 0) -> tuple[Tensor, Tensor]:
    """A rank-r approximation of weight (N, K) = lr_up (N, r) @ lr_down (r, K) by a seeded randomized range finder
    (Halko, Martinsson and Tropp 2011): a basis of W's range from W @ Omega (Omega (K, r + oversample) Gaussian,
    drawn on the CPU from ``seed``: the same on any device) sharpened by ``power_iters`` rounds of W W^T, then
    the exact top-r split of W projected on it. Close to ``low_rank`` when W's spectrum decays (real weights), and
    it costs GEMMs with r + oversample columns and one small eigen-decomposition instead of a min(N, K) one.
    Same factor convention as ``low_rank`` (float64 inside, fp32 out)."""
    w = weight.double()
    n, k = w.shape
    r = min(rank, n, k)
    q = r + oversample
    if q >= min(n, k):  # nothing to gain: the exact split
        return low_rank(weight, rank)
    g = torch.Generator().manual_seed(seed)
    y = w @ torch.randn(k, q, generator=g, dtype=torch.float64).to(w.device)  # (N, q)
    for _ in range(power_iters):  # re-orthonormalised each half step (keeps the small directions)
        z = w.t() @ torch.linalg.qr(y).Q  # (K, q)
        y = w @ torch.linalg.qr(z).Q  # (N, q)
    basis = torch.linalg.qr(y).Q  # (N, q) orthonormal
    b = basis.t() @ w  # (q, K): W projected on the basis
    evals, evecs = torch.linalg.eigh(b @ b.t())  # (q,), (q, q) ascending
    u = basis @ evecs[:, -r:].flip(-1)  # (N, r) left singular vectors of the projection
    sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()
    root = sigma.sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    lr_up = u * root
    lr_down = inv_root[:, None] * (u.t() @ w)  # sqrt(S) V^T
    return lr_down.float(), lr_up.float()


def state_output(state: QuantizedLinearState, x: Tensor) -> Tensor:
    """What the quantized layer computes for rows x (n, Kp) (no bias): the reference numerics."""
    xs = x if state.smooth is None else x * smooth_reciprocal(state.smooth)
    xq = xs if state.act_format is None else state.act_format.fake_quantize(xs)
    y = xq @ state.weight_format.dequantize(state.weight).t()
    if state.lr_down is not None:
        y = y + (xs @ state.lr_down.t()) @ state.lr_up.t()
    return y


def relative_error(y_ref: Tensor, y: Tensor) -> float:
    """||y - y_ref||_F / ||y_ref||_F (0 when both are zero)."""
    den = y_ref.norm()
    return float((y - y_ref).norm() / den) if den > 0 else float((y - y_ref).norm())


def output_error(state: QuantizedLinearState, x: Tensor, y_ref: Tensor) -> float:
    return relative_error(y_ref, state_output(state, x))


def best_of(candidates):
    """The (error, state) pair with the smallest error."""
    return min(candidates, key=lambda c: c[0])


def calibration_rows(stats, weight: Tensor) -> Tensor:
    """The calibration rows padded to the weight's Kp, on the weight's device, fp32 (n, Kp)."""
    rows = stats.rows.to(weight.device, torch.float32)
    if rows.shape[1] != weight.shape[1]:
        rows = torch.nn.functional.pad(rows, (0, weight.shape[1] - rows.shape[1]))
    return rows


def padded_absmax(stats, weight: Tensor) -> Tensor:
    a = stats.absmax.to(weight.device, torch.float32)
    if a.numel() != weight.shape[1]:
        a = torch.nn.functional.pad(a, (0, weight.shape[1] - a.numel()))
    return a
