"""Every fourbit Triton kernel against its plain-torch twin, on CPU through Triton's interpreter.

Exact numerics are compared bit for bit (activation codes, FP8/int8/bf16 operands, row and group scales,
expanded weights). Where the arithmetic legitimately differs, the bound is stated:
  * the low-rank down-projection: fp32 sums in another order (and, single-pass, the smoothed factor split into
    bf16 hi + lo: 2^-16 relative per product), relative 1e-5;
  * GEMMs with fp32 output: fp32 sums in another order, relative 1e-5;
  * layers with fp32 activations vs ``quant_linear_reference``: 1e-5 relative (same codes, fp32 sums);
  * layers with bf16 activations: the interpreter casts fp32 -> bf16 by truncation (not round-to-nearest as
    GPUs do), so up to 2^-8 per element: 5e-3 relative.
Small shapes with ragged edges (M not a multiple of the row block, K not a multiple of the group).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fourbit
from fourbit.formats import make_format
from fourbit.nn import set_kernel

from .conftest import bits

pytestmark = pytest.mark.usefixtures("interpret")

ACT_FORMATS = [
    ("int4p2", {}), ("fp4p2", {}), ("int8", {}), ("fp8", {}), ("int4", {}), ("int4", {"scale_dtype": "bfloat16"}),
    ("fp4", {}), ("fp4", {"outer_scale": "row"}), ("fp4", {"outer_scale": "tensor"}), ("nvfp4", {}), ("mxfp4", {}),
]
WEIGHT_FORMATS = [("int4p2", {}), ("fp4p2", {}), ("int8", {}), ("fp8", {}), ("int4", {}), ("fp4", {}), ("fp4", {"outer_scale": "row"}),
                  ("nvfp4", {}), ("mxfp4", {})]


def _ids(params):
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


# ---- act_quant -------------------------------------------------------------------------------
#: tiles of both paths (on CPU the branch takes the two launches, no branch the single pass; nvfp4 always two):
#: chunks of 128 columns / quantize tiles of 16 x 128 over 3 stats slices, and whole rows / the planned split
ACT_CONFIGS = [dict(rows=4, chunk=128, BM=16, BK=128, stats_BK=64, split=3),
               dict(rows=1, chunk=0, BM=4, BK=256, stats_BK=32)]


@pytest.mark.parametrize("rank", [0, 20], ids=["no-branch", "branch"])
@pytest.mark.parametrize("cfg", ACT_CONFIGS, ids=["chunks", "whole-rows"])
@pytest.mark.parametrize("name,kw", ACT_FORMATS, ids=_ids(ACT_FORMATS))
def test_act_quant_bit_exact(name, kw, cfg, rank):
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_path, act_quant_torch, act_spec

    fmt = make_format(name, **kw)
    m, k, kp = 37, 200, 256  # ragged rows, K padded to the group multiple
    x = hard_rows(m, k)
    smooth = 2.0 ** torch.randint(-2, 3, (kp,)).float()  # powers of two keep the tie rows exact
    smooth[k // 3] = 0.7  # and one ordinary factor (IEEE division must match torch's)
    down = torch.randn(rank, kp).bfloat16() if rank else None
    path = act_path(act_spec(fmt), m, kp, bool(rank), False, ActConfig(**cfg))
    assert path == ("two" if rank or act_spec(fmt).outer == 1 else "single")
    for xin in (x, x.bfloat16()):
        got = act_quant(xin, fmt, smooth, down, kp, ActConfig(**cfg))
        ref = act_quant_torch(xin, fmt, smooth, down, kp)
        assert got.q.dtype == ref.q.dtype and got.q.shape == (m, kp)
        assert torch.equal(bits(got.q), bits(ref.q))
        for a, b in ((got.row_scale, ref.row_scale), (got.group_scale, ref.group_scale)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(bits(a), bits(b))
        # X @ (lr_down / smooth) with the factor in bf16 hi + lo (2^-16 relative per product), fp32 sums in
        # another order
        assert (got.lr is None) == (rank == 0)
        if rank:
            assert torch.allclose(got.lr, ref.lr, rtol=1e-5, atol=1e-5 * ref.lr.abs().max().item())


@pytest.mark.parametrize("rank", [0, 20], ids=["no-branch", "branch"])
@pytest.mark.parametrize("name,kw", [("int4p2", {}), ("fp4p2", {}), ("int8", {}), ("fp8", {}), ("int4", {})],
                         ids=["int4p2", "fp4p2", "int8", "fp8", "int4"])
def test_act_quant_two_column_blocks_bit_exact(name, kw, rank):
    """X given as two column blocks (the second a strided view of a wider tensor, the split not on a chunk or
    group boundary): the single pass reads both in place, other paths concatenate; either way the result is
    act_quant's on the concatenation, bit for bit (and its twin's)."""
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_quant_torch

    fmt = make_format(name, **kw)
    m, k1, k, kp = 37, 72, 200, 256
    x = hard_rows(m, k).bfloat16()
    wide = torch.randn(m, 300).bfloat16()
    wide[:, 100: 100 + k - k1] = x[:, k1:]
    blocks = [x[:, :k1].contiguous(), wide[:, 100: 100 + k - k1]]  # (m, 72), (m, 128) with row stride 300
    smooth = 2.0 ** torch.randint(-2, 3, (kp,)).float()
    down = torch.randn(rank, kp).bfloat16() if rank else None
    cfg = ActConfig(rows=4, chunk=128)
    got = act_quant(blocks, fmt, smooth, down, kp, cfg)
    ref = act_quant(x, fmt, smooth, down, kp, cfg)
    twin = act_quant_torch(blocks, fmt, smooth, down, kp)
    assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(bits(got.q), bits(twin.q))
    for a, b in ((got.row_scale, ref.row_scale), (got.group_scale, ref.group_scale)):
        assert (a is None) == (b is None) and (a is None or torch.equal(bits(a), bits(b)))
    if rank:
        assert torch.equal(got.lr, ref.lr)
    with pytest.raises(ValueError, match="share rows"):
        act_quant([x[:, :k1], wide[:-1, :k - k1]], fmt, smooth, down, kp, cfg)


def test_fold_down_is_the_smoothed_factor():
    from fourbit.kernels.act_quant import fold_down

    down = torch.randn(20, 256).bfloat16()
    smooth = torch.rand(256) + 0.5
    d = fold_down(down, smooth)
    assert d.shape == (2, 256, 32) and d.dtype == torch.bfloat16
    ref = (down.float() / smooth).t()
    got = d[0].float() + d[1].float()
    assert torch.equal(d[:, :, 20:].float(), torch.zeros(2, 256, 12))  # rank padding
    assert ((got[:, :20] - ref).abs() <= 2.0 ** -16 * ref.abs()).all()


@pytest.mark.parametrize("name", ["int4p2", "int4"])
def test_act_quant_bf16_input_no_smooth_no_rank(name):
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_quant_torch

    fmt = make_format(name)
    x = hard_rows(20, 128).bfloat16()
    got = act_quant(x, fmt, config=ActConfig(rows=8, chunk=64))
    ref = act_quant_torch(x, fmt)
    assert got.lr is None
    assert torch.equal(bits(got.q), bits(ref.q))


def test_act_spec_unsupported_formats_are_none():
    from fourbit.kernels.act_quant import act_spec

    assert act_spec(make_format("nf4")) is None
    assert act_spec(make_format("int8", group_size=64)) is None  # grouped int8: reference path
    assert act_spec(None) is None


# ---- weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", WEIGHT_FORMATS, ids=_ids(WEIGHT_FORMATS))
@pytest.mark.parametrize("kp", [256, 384], ids=["k-whole-tile", "k-partial-tile"])
def test_expand_weight_bit_exact(name, kw, kp):
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, **kw)
    w = hard_rows(45, kp, seed=1)
    q = fmt.quantize(w)
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, kp)
    ref = expand_weight_torch(packed, q.scales, q.row_scale, fmt, kp)
    assert torch.equal(bits(got.w), bits(ref.w))
    for a, b in ((got.col_scale, ref.col_scale), (got.group_scale, ref.group_scale)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    if name in ("int4p2", "fp4p2"):  # the operand times the row scale IS the format's dequantization
        deq = got.w.float() * got.col_scale[:, None]
        assert torch.equal(deq, fmt.dequantize(q))


@pytest.mark.parametrize("name", ["int4p2", "fp4", "int4"])
def test_expand_weight_group_not_a_power_of_two_bit_exact(name):
    """Group 48: the kernel that gathers the scale per byte (the main one needs power-of-two groups)."""
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, group_size=48)
    q = fmt.quantize(hard_rows(37, 384, seed=2))
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, 384)
    assert torch.equal(bits(got.w), bits(expand_weight_torch(packed, q.scales, q.row_scale, fmt, 384).w))


# ---- GEMMs -----------------------------------------------------------------------------------
def _operands(dtype, m, n, k):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a = torch.randint(-8, 8, (m, k)).to(torch.float16).to(dtype)
    b = (torch.randint(-8, 8, (n, k)).float() * 2.0 ** torch.randint(-9, 1, (n, 1)).float()).to(torch.float16).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16], ids=["fp8", "int8", "bf16"])
def test_scaled_gemm_matches_twin(dtype):
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 72, 128, 20
    a, b = _operands(dtype, m, n, k)
    cfg = GemmConfig(32, 32, 64 if dtype != torch.bfloat16 else 32, 2, 4, 2, persistent=True)
    cases = [  # (a_scale, b_scale, lowrank, bias)
        (torch.rand(m) + 0.5, torch.rand(n) + 0.5, True, True),
        (torch.rand(1) + 0.5, None, False, False),
        (None, torch.rand(1) + 0.5, True, False),
    ]
    for sa, sb, lowrank, bias in cases:
        lr, up = (torch.randn(m, r), torch.randn(n, r).bfloat16().float()) if lowrank else (None, None)
        bb = torch.randn(n) if bias else None
        got = scaled_gemm(a, b, sa, sb, lr, up, bb, out_dtype=torch.float32, config=cfg)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bb, out_dtype=torch.float32)
        assert torch.isfinite(got).all()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("n,rem", [(80, 3), (112, 1)], ids=["3-tail-tiles", "1-tail-tile"])
@pytest.mark.parametrize("k", [64, 320, 1024], ids=["k-tiles-2", "k-tiles-10", "k-tiles-32"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_scaled_gemm_stream_k_matches_twin(dtype, k, n, rem):
    """Stream-K tail: 4 programs (the interpreter's SM count) over 3 x (n / 16) tiles of 32 x 16, the last
    ``rem`` shared out by K iterations (a tile whole in one program, or split over 2-4 with the owner adding the
    partials): the twin's result, and the same bits on a second launch."""
    from fourbit.kernels import gemm as gm

    m = 70  # 3 row tiles, the last ragged
    a, b = _operands(dtype, m, n, k)
    cfg = gm.GemmConfig(32, 16, 32, 2, 4, 2, persistent=True, stream_k=True)
    k_tiles = -(-k // 32)
    dp, sk_iters, per, ws, flags = gm._stream_k_split(3 * (n // 16), 4, k_tiles, cfg, a)
    assert (dp, sk_iters) == (3 * (n // 16) - rem, rem * k_tiles) and flags is not None
    sa, sb = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    lr, up, bias = torch.randn(m, 20), torch.randn(n, 20).bfloat16().float(), torch.randn(n)
    got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg), got)


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_scaled_gemm_output_activation_matches_twin(kind):
    """The activation on a column range in the epilogue (tiles wholly inside, outside and across the range's
    edges; open-ended range): the twin's fp32 result to 1e-5; with bf16 output, within one bf16 rounding."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 136, 128, 20
    a, b = _operands(torch.float8_e4m3fn, m, n, k)
    sa, sb = torch.rand(m) * 0.1 + 0.05, torch.rand(n) + 0.5
    lr, up, bias = torch.randn(m, r), torch.randn(n, r).bfloat16().float(), torch.randn(n)
    for act, cfg in ((OutputActivation(kind, 17, 90), GemmConfig(32, 32, 64, 2, 4, 2, persistent=True)),
                     (OutputActivation(kind, 40), None)):
        got = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg, act=act)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, act=act)
        plain = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
        lo, hi = act.bounds(n)
        assert torch.equal(got[:, :lo], scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32,
                                                    config=cfg)[:, :lo])
        assert not torch.allclose(ref[:, lo:hi], plain[:, lo:hi])  # the activation did something
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
        got16 = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.bfloat16, config=cfg, act=act).float()
        assert ((got16 - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()  # the interpreter truncates to bf16
    with pytest.raises(ValueError, match="not one of"):
        OutputActivation("relu")


def test_default_configs_override_and_restore():
    """``default_configs``: the changed default inside the block (both size classes), the previous overrides after
    it, also when the block raises."""
    import dataclasses

    from fourbit.kernels import gemm as gm

    fp8 = torch.float8_e4m3fn
    before = gm.default_config(4608, 3072, 3072, fp8)
    with gm.default_configs(fp8, lambda c: dataclasses.replace(c, precise=True)):
        assert gm.default_config(4608, 3072, 3072, fp8).precise and gm.default_config(8192, 8192, 3072, fp8).precise
        assert not gm.default_config(4608, 3072, 3072, torch.int8).precise
    assert gm.default_config(4608, 3072, 3072, fp8) == before
    with pytest.raises(RuntimeError, match="inside"):
        with gm.default_configs(fp8, lambda c: dataclasses.replace(c, BN=128)):
            raise RuntimeError("inside")
    assert gm.default_config(4608, 3072, 3072, fp8) == before


def test_scaled_gemm_non_persistent_and_unaligned_k():
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    a = torch.randint(-127, 128, (33, 200), dtype=torch.int8)  # K = 200: rows copied to a 16-byte stride
    b = torch.randint(-127, 128, (50, 200), dtype=torch.int8)
    got = scaled_gemm(a, b, out_dtype=torch.float32, config=GemmConfig(32, 32, 64, 1, 4, 2, persistent=False))
    assert torch.equal(got, scaled_gemm_torch(a, b, out_dtype=torch.float32))


def test_grouped_gemm_matches_twin():
    from fourbit.kernels.gemm import GemmConfig
    from fourbit.kernels.gemm_grouped import grouped_gemm, grouped_gemm_torch

    m, n, k, g = 40, 72, 256, 64
    a, b = _operands(torch.float8_e4m3fn, m, n, k)
    sa, sb = torch.rand(k // g, m) + 0.1, torch.rand(k // g, n) + 0.1
    lr, up, bias = torch.randn(m, 24), torch.randn(n, 24), torch.randn(n)
    cfg = GemmConfig(32, 32, g, 2, 4, 2, persistent=True)
    got = grouped_gemm(a, b, sa, sb, g, lr, up, bias, out_dtype=torch.float32, config=cfg)
    ref = grouped_gemm_torch(a, b, sa, sb, g, lr, up, bias, out_dtype=torch.float32)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


# ---- the few-row GEMV ------------------------------------------------------------------------
GEMV_PAIRS = [("int4p2", "int4p2", None), ("fp4p2", "fp4p2", None), ("int4p2", "fp4p2", 32),
              ("fp4p2", "int4p2", 64)]  # (activations, weights, group size of both)


def _gemv_layer(af, wf, group=None, bias=True, k=200, n=40):
    lin = nn.Linear(k, n, bias=bias)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=20, alpha=0.5, group_size=group)
    model = nn.Sequential(lin)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(torch.randn(8, k)), progress=False, verbose=False)
    return model


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("af,wf,wg", GEMV_PAIRS, ids=[f"a{a}-w{w}-g{g}" for a, w, g in GEMV_PAIRS])
def test_gemv_matches_twin(af, wf, wg, m):
    """The GEMV against its twin, with and without the branch (stats launch / own row maxima) and bias, fp32
    and bf16 rows (the hard rows: ties, an all-zero row, subnormal-ish and clamped groups): fp32 sums in another
    order, relative 1e-5."""
    from fourbit.kernels.gemv import GemvConfig, gemv, gemv_torch
    from fourbit.kernels.linear import layer_state

    layer = _gemv_layer(af, wf, wg)[0]
    st = layer_state(layer)
    wfmt, packed, scales, row_scale = (layer.weight_format, layer.weight_packed, layer.weight_scales,
                                       layer.weight_row_scale)
    cfgs = (GemvConfig(BN=16, BK=128, act_programs=3, act_BK=64), GemvConfig(BN=8, BK=64, act_programs=1))
    x = hard_rows(8, 200)[{1: [5], 3: [0, 1, 3], 5: [0, 1, 2, 3, 4]}[m]]  # row 1 of several: all zeros
    for xin in (x, x.bfloat16()):
        for branch, bias in ((True, True), (False, False)):
            args = (xin, layer.act_format, wfmt, layer.padded_in, packed, scales, row_scale, st.smooth_recip,
                    st.down_folded if branch else None, st.up if branch else None, st.bias if bias else None)
            ref = gemv_torch(*args, out_dtype=torch.float32)
            got = gemv(*args, out_dtype=torch.float32, config=cfgs[branch])
            assert torch.isfinite(got).all()
            assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (xin.dtype, branch)
            if m > 1:
                assert torch.equal(got[1], ref[1])  # the all-zero row: bias (or zero) exactly


def test_gemv_rejects_bad_input():
    from fourbit.kernels.gemv import gemv
    from fourbit.kernels.linear import layer_state

    layer = _gemv_layer("int4p2", "int4p2")[0]
    st = layer_state(layer)
    base = dict(act_format=layer.act_format, weight_format=layer.weight_format, padded_in=layer.padded_in,
                packed=layer.weight_packed, scales=layer.weight_scales, row_scale=layer.weight_row_scale)
    with pytest.raises(ValueError, match="x must be"):
        gemv(torch.randn(1, 300), **base)
    with pytest.raises(ValueError, match="both down_folded and up"):
        gemv(torch.randn(1, 200), **base, down_folded=st.down_folded)
    with pytest.raises(NotImplementedError, match="no kernel"):
        gemv(torch.randn(1, 200), **dict(base, act_format=make_format("int8")))
    with pytest.raises(NotImplementedError, match="no kernel"):  # group sizes differ
        gemv(torch.randn(1, 200), **dict(base, act_format=make_format("int4p2", group_size=32)))


@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
def test_few_row_layer_takes_the_gemv(kernel, monkeypatch):
    """A layer called with one row runs the GEMV (no weight operand built) and matches the reference; more
    rows than ``GemvConfig.max_m`` take the GEMM."""
    from fourbit.kernels import gemv as gv
    from fourbit.kernels.linear import layer_state

    model = _gemv_layer("int4p2", "int4p2")
    layer = model[0]
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    x = torch.randn(2, 3, 200)
    for rows in (x[:1, :1], x[:1, :2], x):  # M = 1 (GEMV), 2 and 6 (GEMM)
        ref = model(rows)
        set_kernel(model, kernel)
        got = model(rows)
        set_kernel(model, "reference")
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert calls == [1]
    if kernel == "triton-memory":
        assert layer_state(layer).weight is None


# ---- layers through fourbit.quantize ---------------------------------------------------------
PAIRS = [("int4p2", "int4p2"), ("fp4p2", "fp4p2"), ("fp4p2", "int4p2"), ("int8", "int8"), ("fp8", "fp8"),
         ("int4p2", "fp8"), ("int4", "int4"),
         ("fp4", "fp4"), ("nvfp4", "nvfp4"), ("mxfp4", "mxfp4"), ("int4p2", None)]


def _quantized_linear(wf, af, dtype, k=200, n=96, kernel="reference"):
    lin = nn.Linear(k, n).to(dtype)
    x = torch.randn(3, 17, k).to(dtype)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=20, alpha=0.5, kernel=kernel)
    model = nn.Sequential(lin)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    return model, x


@pytest.mark.parametrize("wf,af", PAIRS, ids=[f"w{w}-a{a}" for w, a in PAIRS])
def test_layer_fp32_matches_reference(wf, af):
    model, x = _quantized_linear(wf, af, torch.float32)
    ref = model(x)
    for kernel in ("triton", "triton-memory"):
        set_kernel(model, kernel)
        got = model(x)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, kernel
    set_kernel(model, "reference")


def test_layer_bf16_within_output_rounding():
    model, x = _quantized_linear("int4p2", "int4p2", torch.bfloat16)
    ref = model(x).float()
    set_kernel(model, "triton")
    got = model(x).float()
    assert got.dtype == torch.float32 and ((got - ref).norm() / ref.norm()).item() < 5e-3


def test_lowrank_variants():
    from fourbit.kernels.linear import linear_forward
    from fourbit.kernels.reference import low_rank_branch, prepare_activation

    model, x = _quantized_linear("int4p2", "int4p2", torch.float32)
    layer, x2 = model[0], x.reshape(-1, 200)
    fused = linear_forward(layer, x2, lowrank="fused")
    unfused = linear_forward(layer, x2, lowrank="unfused")
    none = linear_forward(layer, x2, lowrank="none")
    branch = low_rank_branch(layer, prepare_activation(layer, x2))
    assert ((unfused - fused).norm() / fused.norm()).item() < 1e-5
    assert ((none + branch - fused).norm() / fused.norm()).item() < 1e-5


def test_scaled_gemm_writes_into_out_rows():
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    a = torch.randint(-7, 8, (40, 64)).float().to(torch.float8_e4m3fn)
    b = torch.randint(-7, 8, (48, 64)).float().to(torch.float8_e4m3fn)
    sa, sb = torch.rand(40) + 0.5, torch.rand(48) + 0.5
    big = torch.zeros(56, 48, dtype=torch.bfloat16)
    got = scaled_gemm(a, b, sa, sb, out=big[8:48])
    assert got.data_ptr() == big[8:48].data_ptr()
    assert torch.equal(bits(big[8:48]), bits(scaled_gemm(a, b, sa, sb)))  # the interpreter's bf16 cast truncates
    wide = torch.zeros(40, 56)
    scaled_gemm(a, b, sa, sb, out_dtype=torch.float32, out=wide[:, 8:])  # fp32 rows: 224-byte stride, 32-byte offset
    assert torch.allclose(wide[:, 8:], scaled_gemm_torch(a, b, sa, sb, out_dtype=torch.float32), rtol=1e-6)
    assert not big[:8].any() and not big[48:].any()
    with pytest.raises(ValueError, match="out must be"):
        scaled_gemm(a, b, sa, sb, out=big[:39])
    with pytest.raises(ValueError, match="16-byte"):
        scaled_gemm(a, b, sa, sb, out=torch.zeros(40, 49, dtype=torch.bfloat16)[:, :48])


def test_unsupported_pair_falls_back_to_reference_with_warning():
    model, x = _quantized_linear("nf4", "int4", torch.float32)
    ref = model(x)
    set_kernel(model, "triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(x)
    assert torch.equal(got, ref)


def test_speed_cache_invalidated_by_in_place_change():
    model, x = _quantized_linear("int4p2", "int4p2", torch.float32, kernel="triton")
    layer = model[0]
    y0 = model(x)
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place: same storage, new version
    y1 = model(x)
    assert torch.allclose(y1, y0 + 1.0, atol=1e-5)


def test_kernel_mode_recorded_in_checkpoint(tmp_path):
    model, x = _quantized_linear("int4p2", "int4p2", torch.float32, kernel="triton-memory")
    y = model(x)
    path = tmp_path / "m.fourbit.safetensors"
    fourbit.save(model, str(path))
    fresh = nn.Sequential(nn.Linear(200, 96))
    fourbit.load(fresh, str(path))
    assert fresh[0].kernel == "triton-memory"
    assert torch.equal(fresh(x), y)


def test_import_fourbit_does_not_import_triton():
    code = "import sys, fourbit, fourbit.kernels; assert 'triton' not in sys.modules; " \
           "assert {'triton', 'triton-memory'} <= set(fourbit.kernels.available_kernels())"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
def test_compiled_model_runs_layers_as_custom_ops(kernel):
    """torch.compile traces through prepared layers (no graph break) and computes what eager computes."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels

    lin1, lin2 = nn.Linear(200, 96), nn.Linear(96, 64)
    model = nn.Sequential(nn.LayerNorm(200), lin1, nn.GELU(), lin2)
    x = torch.randn(3, 17, 200)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=20, alpha=0.5, kernel=kernel)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    prepare_kernels(model)
    with torch.no_grad():  # inference: the layers have no autograd formula
        eager = model(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), eager)
    torch._dynamo.reset()


def test_compiled_model_without_prepared_state_breaks_graphs_and_says_so():
    import torch._dynamo

    from fourbit.kernels import compiled as compiled_mod

    model = nn.Sequential(nn.Linear(200, 96))
    x = torch.randn(5, 200)
    fourbit.quantize(model, fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton"),
                     progress=False, verbose=False)
    compiled_mod._WARNED[0] = False
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="prepare_kernels"):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count >= 1
    set_kernel(model, "reference")
    ref = model(x)
    set_kernel(model, "triton")
    assert ((model(x) - ref).norm() / ref.norm()).item() < 1e-5
    torch._dynamo.reset()



def test_compiled_w4a16_layers_break_quietly():
    """Plans without a custom op (16-bit activations) still compile, through a graph break, without the
    'prepare_kernels' warning (their state was prepared)."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels

    model = nn.Sequential(nn.Linear(200, 96))
    x = torch.randn(5, 200)
    fourbit.quantize(model, fourbit.RTNConfig(weights="nf4", activations=None, kernel="triton"),
                     progress=False, verbose=False)
    prepare_kernels(model)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            compiled = torch.compile(model, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)
    torch._dynamo.reset()


def test_loaded_checkpoint_with_siblings_compiles_without_graph_breaks(tmp_path):
    """quantize (siblings fused, Triton kernel) -> save -> load into a fresh model -> prepare_kernels ->
    torch.compile: one graph, the eager result."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels
    from fourbit.siblings import find_siblings, fuse_siblings

    class Attn(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            h = self.norm(x)
            q, k, v = self.q(h), self.k(h), self.v(h)
            return x + self.o(torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v)

    torch.manual_seed(0)
    net, x = nn.Sequential(Attn(), Attn()), torch.randn(2, 9, 64)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    fuse_siblings(net, find_siblings(net, lambda m: m(x), config=cfg))
    fourbit.quantize(net, cfg, forward_loop=lambda m: m(x), progress=False, verbose=False)
    path = fourbit.save(net, tmp_path / "q.safetensors")
    torch.manual_seed(1)
    fresh = fourbit.load(nn.Sequential(Attn(), Attn()), path)
    prepare_kernels(fresh)
    with torch.no_grad():
        eager = fresh(x)
        torch.testing.assert_close(eager, net(x), rtol=0, atol=0)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fresh)(x)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fresh, backend="aot_eager")(x), eager)
    torch._dynamo.reset()


def test_prepare_kernels_skips_operands_of_single_row_layers():
    """With a forward loop, a layer only ever called with one row (a modulation linear) keeps no speed-mode
    operand; the compiled model has no graph break and eager's result (its GEMV reads the packed weight)."""
    import torch._dynamo

    from fourbit.kernels.linear import _CACHE_KEY
    from fourbit.nn import prepare_kernels

    class Modulated(nn.Module):
        def __init__(self):
            super().__init__()
            self.mod, self.lin = nn.Linear(64, 128), nn.Linear(64, 64)

        def forward(self, x, t):  # x (B, S, 64), t (1, 64): one row
            shift, scale = self.mod(t).chunk(2, dim=-1)
            return self.lin(x * (1 + scale) + shift)

    torch.manual_seed(0)
    model, x, t = Modulated(), torch.randn(2, 9, 64), torch.randn(1, 64)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(x, t), progress=False, verbose=False)
    prepare_kernels(model, forward_loop=lambda m: m(x, t))
    assert model.mod._cache[_CACHE_KEY].weight is None and model.lin._cache[_CACHE_KEY].weight is not None
    with torch.no_grad():
        eager = model(x, t)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x, t).graph_break_count == 0
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(x, t), eager)
    prepare_kernels(model)  # without a loop: every layer gets its operand again
    assert model.mod._cache[_CACHE_KEY].weight is not None
    torch._dynamo.reset()


class _MlpBlock(nn.Module):
    """FLUX-like: a norm read by a query projection and an MLP input projection (siblings), tanh-GELU on the MLP
    columns, the two concatenated into an output projection; then a plain MLP with exact GELU."""

    def __init__(self, d=64, h=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.to_q, self.proj_mlp, self.proj_out = nn.Linear(d, d), nn.Linear(d, h), nn.Linear(d + h, d)
        self.act = nn.GELU(approximate="tanh")
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        n = self.norm(x)
        q, m = self.to_q(n), self.act(self.proj_mlp(n))
        y = x + self.proj_out(torch.cat([torch.tanh(q), m], dim=2))
        return y + self.fc2(torch.nn.functional.gelu(self.fc1(y)))


def _quantized_block(block, x, siblings=True):
    from fourbit.nn import prepare_kernels
    from fourbit.siblings import find_siblings, fuse_siblings

    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    if siblings:
        fuse_siblings(block, find_siblings(block, lambda m: m(x), config=cfg))
    fourbit.quantize(block, cfg, forward_loop=lambda m: m(x), progress=False, verbose=False)
    return prepare_kernels(block)


def _compile_with_pass(model, graphs):
    """torch.compile whose backend runs the fusion pass on dynamo's graph (appended to ``graphs``), then the graph
    as is (no inductor)."""
    from fourbit.kernels.fusion import FuseAroundQuantLinear

    def backend(gm, example_inputs):
        FuseAroundQuantLinear()(gm.graph)
        gm.recompile()
        graphs.append(gm.graph)
        return gm

    return torch.compile(model, backend=backend, fullgraph=True)


def _eager_and_compiled(model, inputs: tuple, compile_fn):
    """(eager output, compiled output, how many activations / concatenations the pass rewrote meanwhile)."""
    import torch._dynamo

    from fourbit.kernels.fusion import fusion_stats

    before = fusion_stats()
    with torch.no_grad(), _no_compile_caches():  # a cached compile would not run the pass (nothing to count)
        eager = model(*inputs)
        torch._dynamo.reset()
        got = compile_fn(model)(*inputs)
    torch._dynamo.reset()
    after = fusion_stats()
    return eager, got, tuple(after.get(k, 0) - before.get(k, 0) for k in ("activations", "concatenations"))


def _no_compile_caches():
    import contextlib

    import torch._functorch.config
    import torch._inductor.config

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def test_fusion_pass_moves_activations_and_concatenations():
    """Both GELUs go into their GEMM epilogues (one on the sibling group's MLP columns only), the concatenation
    is read in place; the result is eager's up to fp32 rounding (same codes; the activation before, not after,
    the output's rounding, which for fp32 output is the same value)."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64)
    graphs = []
    eager, got, fused = _eager_and_compiled(_quantized_block(_MlpBlock(), x), (x,),
                                            lambda m: _compile_with_pass(m, graphs))
    assert fused == (2, 1)
    targets = {n.target for n in graphs[0].nodes}
    assert torch.cat not in targets and torch._C._nn.gelu not in targets
    acts = sorted((n.args[9], n.args[10], n.args[11]) for n in graphs[0].nodes if "quant_linear" in str(n.target)
                  and n.args[9])
    assert acts == [("gelu", 0, 128), ("gelu_tanh", 64, 192)]
    assert ((got - eager).norm() / eager.norm()).item() < 1e-6


class _Unsafe(nn.Module):
    """Three shapes the pass must leave alone: the pre-activation output read again (residual), an activated
    column slice read by a consumer that may not accept strides (an in-place op), a concatenation read twice."""

    def __init__(self, d=64):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        ya = self.a(x)
        h = torch.nn.functional.gelu(ya) + ya
        yb = self.b(h)
        g = torch.nn.functional.silu(yb[..., 32:])
        g.mul_(2.0)
        cat = torch.cat([yb[..., :32], g], dim=-1)
        return self.c(cat) + cat[..., :64]


def test_fusion_pass_leaves_unsafe_graphs_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    eager, got, fused = _eager_and_compiled(_quantized_block(_Unsafe(), x, siblings=False), (x,),
                                            lambda m: _compile_with_pass(m, []))
    assert fused == (0, 0)
    assert torch.equal(got, eager)


class _RowsThenGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod, self.lin = nn.Linear(64, 64), nn.Linear(64, 96)

    def forward(self, x, t):  # t (1, 64): one row (the GEMV); x (B, 64) through lin
        return torch.nn.functional.gelu(self.lin(x)), torch.nn.functional.silu(self.mod(t))


@pytest.mark.parametrize("weights,acts", [("int4", "int4"), ("int4p2", "int4p2")], ids=["grouped-plan", "gemv"])
def test_fused_activation_without_epilogue_is_eager_bitwise(weights, acts):
    """Paths without the epilogue activation (the paper's int4 on the grouped GEMM; the single-row GEMV) apply it
    after the output's rounding, as eager does: their compiled result is eager's, bit for bit (int4p2's 5-row layer
    has the epilogue: eager's to fp32 rounding)."""
    torch.manual_seed(0)
    x, t = torch.randn(5, 64), torch.randn(1, 64)
    model = _RowsThenGelu()
    cfg = fourbit.RTNConfig(weights=weights, activations=acts, kernel="triton")
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(x, t), progress=False, verbose=False)
    from fourbit.nn import prepare_kernels

    prepare_kernels(model)
    eager, got, fused = _eager_and_compiled(model, (x, t), lambda m: _compile_with_pass(m, []))
    assert fused == (2, 0)
    assert torch.equal(got[1], eager[1])  # the GEMV (int4p2) / grouped GEMM (int4)
    if weights == "int4":
        assert torch.equal(got[0], eager[0])
    else:
        assert ((got[0] - eager[0]).norm() / eager[0].norm()).item() < 1e-6


def _tiny_diffusers(name):
    """(model, inputs, call) for a tiny random diffusers transformer of three families."""
    import diffusers

    if name == "flux":
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        inp = (torch.randn(1, 16, 16), torch.randn(1, 5, 64), torch.randn(1, 32), torch.tensor([0.5]),
               torch.tensor([3.5]), ids.reshape(-1, 3), torch.zeros(5, 3))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], pooled_projections=a[2],  # noqa
                                timestep=a[3], guidance=a[4], img_ids=a[5], txt_ids=a[6], return_dict=False)[0]
    elif name == "sd3":
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
        inp = (torch.randn(1, 4, 8, 8), torch.randn(1, 6, 16), torch.randn(1, 8), torch.tensor([3.0]))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], pooled_projections=a[2],  # noqa
                                timestep=a[3], return_dict=False)[0]
    else:
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                                               patch_size=2, caption_channels=16, norm_type="ada_norm_single",
                                               use_additional_conditions=False)
        inp = (torch.randn(1, 4, 8, 8), torch.randn(1, 6, 16), torch.tensor([3.0]))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], timestep=a[2],  # noqa
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return m.eval(), inp, call


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_fusion_pass_on_diffusers_transformers(name):
    """No per-architecture code: on tiny FLUX, SD3 and PixArt transformers (siblings fused, int4p2, Triton kernels)
    the pass finds activations to fuse (FLUX also its concatenation) and the result is eager's to fp32 rounding."""
    pytest.importorskip("diffusers")
    from fourbit.nn import prepare_kernels

    torch.manual_seed(0)
    model, inp, call = _tiny_diffusers(name)

    class Call(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return call(self.m, a)

    wrapped = Call(model)
    cfg = fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton")
    with torch.no_grad():
        fourbit.fuse_siblings(wrapped, fourbit.find_siblings(wrapped, lambda m: m(*inp), config=cfg))
    fourbit.quantize(wrapped, cfg, progress=False, verbose=False)
    prepare_kernels(wrapped)
    eager, got, fused = _eager_and_compiled(wrapped, inp, lambda m: _compile_with_pass(m, []))
    assert fused[0] >= 2 and (fused[1] >= 1) == (name == "flux"), fused
    assert ((got - eager).norm() / eager.norm()).item() < 1e-6


def test_inductor_options_fuse_under_torch_compile():
    """The public way: ``torch.compile(..., options=fourbit.nn.inductor_options())`` with inductor (CPU here)."""
    from fourbit.nn import inductor_options

    torch.manual_seed(1)
    x = torch.randn(2, 24, 64)
    eager, got, fused = _eager_and_compiled(_quantized_block(_MlpBlock(), x), (x,), lambda m: torch.compile(
        m, options=inductor_options(), fullgraph=True))
    assert fused == (2, 1)
    assert ((got - eager).norm() / eager.norm()).item() < 1e-5


def test_cublas_down_projection_falls_back_where_torch_lacks_it():
    """Where ``torch.mm(..., out_dtype=float32)`` does not run (here: CPU), the helper says so once and returns
    None, and act_quant keeps using the Triton down-projection."""
    from fourbit.kernels import act_quant as aq

    down = torch.randn(20, 256).bfloat16()
    folded = aq.fold_down(down, torch.rand(256) + 0.5)
    x = torch.randn(8, 256).bfloat16()
    try:
        torch.mm(x, aq.cat_down(folded), out_dtype=torch.float32)
        pytest.skip("this torch has mm(..., out_dtype) on CPU: nothing to fall back from")
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    saved = aq._MM_FP32_OUT[0]
    try:
        with pytest.warns(UserWarning, match="out_dtype"):
            assert aq._down_projection_mm(x, folded, None) is None
        assert aq._MM_FP32_OUT[0] is False
    finally:
        aq._MM_FP32_OUT[0] = saved


def test_gemm_launch_falls_back_to_fewer_stages_when_shared_memory_does_not_fit():
    """A branch grown by a LoRA (rank 32 + 64, padded to 128) needed 256 KiB of shared memory at 3 stages on an H200
    (227 KiB): the launch retries with fewer stages and remembers the depth that fit; other errors pass through."""
    from triton.runtime.errors import OutOfResources

    from fourbit.kernels import gemm

    tried = []

    def launch(stages):
        tried.append(stages)
        if stages > 1:
            raise OutOfResources(262144 if stages == 3 else 245760, 232448, "shared memory")

    key = ("test-cfg", 128, "fp8", True, "cuda:0")
    gemm._FITTING_STAGES.pop(key, None)
    gemm.launch_with_fewer_stages(launch, 3, key)
    assert tried == [3, 2, 1] and gemm._FITTING_STAGES[key] == 1
    tried.clear()
    gemm.launch_with_fewer_stages(launch, 3, key)  # remembered: one launch
    assert tried == [1]

    def never_fits(stages):
        raise OutOfResources(1 << 20, 232448, "shared memory")

    with pytest.raises(OutOfResources):
        gemm.launch_with_fewer_stages(never_fits, 2, ("other",))
    gemm._FITTING_STAGES.pop(key, None)
