"""``kernels/act_quant`` (and its paths ``act_single``, ``act_two``, ``act_lowrank``, ``act_tiles``, ``act_spec``)
against ``act_quant_torch``.

Codes, row and group scales: bit for bit, on every path of ``act_path``. The low-rank down-projection
(X @ (lr_down / smooth) with the factor in bf16 hi + lo, 2^-16 relative per product): elementwise 1e-5 relative in the
interpreter (fp32 sums in another order); ``SQNR_GPU_ACCUMULATE_DB`` on a GPU (tensor-core sums, tf32 in the
two-launch path). Small shapes with ragged edges (M not a multiple of the row block, K not of the group).
"""
from __future__ import annotations

import pytest
import torch

from fourbit.formats import make_format

from .conftest import bits, sass_probe
from .kernel_helpers import ACT_FORMATS, SQNR_FP32_REORDER_DB, SQNR_GPU_ACCUMULATE_DB, hard_rows, ids, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


#: tiles of both paths (on CPU the branch takes the two launches, no branch the single pass; nvfp4 always two):
#: chunks of 128 columns / quantize tiles of 16 x 128 over 3 stats slices, whole rows / the planned split, and
#: chunks of 128 that give way to one chunk of next_pow2(Kp) = 256 (``whole_row_k``), loaded once (``one_load``);
#: whole rows walked twice (``one_load=False``)
ACT_CONFIGS = [dict(rows=4, chunk=128, BM=16, BK=128, stats_BK=64, split=3),
               dict(rows=1, chunk=0, one_load=False, BM=4, BK=256, stats_BK=32),
               dict(rows=2, chunk=128, whole_row_k=256, one_load=True, BM=4, BK=256, stats_BK=32)]


@pytest.mark.parametrize("rank", [0, 20], ids=["no-branch", "branch"])
@pytest.mark.parametrize("cfg", ACT_CONFIGS, ids=["chunks", "whole-rows", "one-chunk"])
@pytest.mark.parametrize("name,kw", ACT_FORMATS, ids=ids(ACT_FORMATS))
def test_act_quant_bit_exact(device, name, kw, cfg, rank):
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_path, act_quant_torch, act_spec

    fmt = make_format(name, **kw)
    m, k, kp = 37, 200, 256  # ragged rows, K padded to the group multiple
    x = hard_rows(m, k).to(device)
    smooth = 2.0 ** torch.randint(-2, 3, (kp,)).float()  # powers of two keep the tie rows exact
    smooth[k // 3] = 0.7  # and one ordinary factor (IEEE division must match torch's)
    smooth = smooth.to(device)
    down = torch.randn(rank, kp).bfloat16().to(device) if rank else None
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
        # another order (elementwise in the interpreter; tensor-core sums on a GPU)
        assert (got.lr is None) == (rank == 0)
        if rank and device == "cpu":
            assert torch.allclose(got.lr, ref.lr, rtol=1e-5, atol=1e-5 * ref.lr.abs().max().item())
        elif rank:
            assert sqnr_db(ref.lr, got.lr) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.usefixtures("interpret")
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


@pytest.mark.parametrize("name", ["int4p2", "int4"])
def test_act_quant_bf16_input_no_smooth_no_rank(device, name):
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_quant_torch

    fmt = make_format(name)
    x = hard_rows(20, 128).bfloat16().to(device)
    got = act_quant(x, fmt, config=ActConfig(rows=8, chunk=64))
    ref = act_quant_torch(x, fmt)
    assert got.lr is None
    assert torch.equal(bits(got.q), bits(ref.q))


@pytest.mark.usefixtures("interpret")
def test_act_spec_unsupported_formats_are_none():
    from fourbit.kernels.act_quant import act_spec

    assert act_spec(make_format("nf4")) is None
    assert act_spec(make_format("int8", group_size=64)) is None  # grouped int8: reference path
    assert act_spec(None) is None


@pytest.mark.usefixtures("interpret")
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


@pytest.mark.usefixtures("interpret")
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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", ["single", "single+mm", "single+mm-side", "two"])
@pytest.mark.parametrize("name,kw", ACT_FORMATS, ids=ids(ACT_FORMATS))
def test_act_quant_bit_exact_gpu(name, kw, path):
    """Every path of ``act_path`` (chosen here by the config's thresholds) against the twin: codes and scales bit for
    bit, the branch within 1e-4 of the fp32 reference (X times the bf16 hi + lo folded factor, fp32 sums)."""
    import dataclasses

    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_path, act_quant, act_quant_torch, act_spec

    fmt = make_format(name, **kw)
    m, k, kp = 333, 1000, 1024
    x = hard_rows(m, k).cuda()
    smooth = (torch.rand(kp) + 0.5).cuda()
    down = None if path == "single" else torch.randn(32, kp).bfloat16().cuda()
    mm_rows = 1 if path.startswith("single+mm") else 0
    cfg = dataclasses.replace(DEFAULT_CONFIG, lr_mm_rows=mm_rows, lr_mm_stream_max_k=kp if path.endswith("side") else 0)
    for xin in (x, x.bfloat16()):
        for c in (cfg, dataclasses.replace(cfg, chunk=0, rows=2), dataclasses.replace(cfg, rows=4, chunk=256, BM=16,
                                                                                    BK=256)):
            want = path if act_spec(fmt).outer != 1 else "two"
            if path.startswith("single+mm") and xin.dtype != torch.bfloat16:
                want = "two"
            assert act_path(act_spec(fmt), m, kp, down is not None, xin.dtype == torch.bfloat16, c) == want
            got = act_quant(xin, fmt, smooth, down, kp, config=c)
            ref = act_quant_torch(xin, fmt, smooth, down, kp)
            assert torch.equal(bits(got.q), bits(ref.q))
            for a, b in ((got.row_scale, ref.row_scale), (got.group_scale, ref.group_scale)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(bits(a), bits(b))
            if down is not None:
                assert sqnr_db(ref.lr, got.lr) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.gpu
@needs_cuda
def test_act_quant_large_m_down_projection_paths_gpu():
    """The large-M down-projection paths (cuBLAS GEMM beside the single pass, on the same stream or concurrent on
    a side stream; the two launches): the same codes, the branch within 1e-4 of the fp32 reference (bf16
    hi + lo factor, fp32 sums); the side stream's result is complete when act_quant returns."""
    import dataclasses

    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_quant, act_quant_torch

    fmt = make_format("int4p2")
    m, k = 2048 + 77, 1000
    x = hard_rows(m, k).cuda().bfloat16()
    smooth = (torch.rand(1024) + 0.5).cuda()
    down = torch.randn(32, 1024).bfloat16().cuda()
    ref = act_quant_torch(x, fmt, smooth, down, 1024)
    mm = dataclasses.replace(DEFAULT_CONFIG, lr_mm_rows=2048, lr_mm_stream_max_k=0)
    for cfg in (DEFAULT_CONFIG, mm, dataclasses.replace(mm, lr_mm_stream_max_k=1024),
                dataclasses.replace(mm, lr_mm_rows=0)):
        got = act_quant(x, fmt, smooth, down, 1024, config=cfg)
        assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(bits(got.row_scale), bits(ref.row_scale))
        assert sqnr_db(ref.lr, got.lr) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.gpu
@needs_cuda
def test_act_quant_two_column_blocks_gpu():
    """X as two column blocks at FLUX's single-block proj_out split (3072 | 12288, the second a strided view of a
    wider output) on the large-M path (single pass + cuBLAS down-projection, both reading the blocks in place):
    codes and row scales bit-exact with the concatenation's, the branch within 1e-5."""
    from fourbit.kernels.act_quant import act_quant

    fmt = make_format("int4p2")
    m, k1, k2 = 2304, 3072, 12288
    x = (torch.randn(m, k1 + k2, device="cuda") * 3).bfloat16()
    wide = torch.empty(m, 9216 + k2, device="cuda", dtype=torch.bfloat16)
    wide[:, 9216:] = x[:, k1:]
    blocks = [x[:, :k1].contiguous(), wide[:, 9216:]]
    smooth = (torch.rand(k1 + k2, device="cuda") + 0.5)
    down = torch.randn(32, k1 + k2, device="cuda").bfloat16()
    for rank_down in (None, down):
        got = act_quant(blocks, fmt, smooth, rank_down, k1 + k2)
        ref = act_quant(x, fmt, smooth, rank_down, k1 + k2)
        assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(bits(got.row_scale), bits(ref.row_scale))
        if rank_down is not None:
            assert sqnr_db(ref.lr, got.lr) > SQNR_FP32_REORDER_DB



@pytest.mark.parametrize("name", ["int4p2", "fp8"])
def test_single_pass_compiles_for_hopper_without_per_element_conversions(compiled, name):
    """The GPU path (inline PTX, the GPU's rounding) compiles for sm_90 here, and its SASS has no rounding or int
    conversion per element: those issue at 1/8 the rate of fp32 adds on Hopper (the pass measured bound by them)."""
    probe = sass_probe()
    kernel, meta = probe.compile_single_pass(name, 1152)
    counts = probe.sass_counts(kernel.asm["cubin"])
    assert meta["ONE_LOAD"] and meta["HW_ROUND"]
    assert not {"FRND", "F2I", "I2F", "I2FP"} & set(counts["ops"]), counts["top"]
    per_thread = meta["BK"] // (32 * meta["num_warps"])  # elements each thread quantizes
    assert counts["ops"].get("F2FP", 0) == per_thread // 2  # one paired fp8 conversion per two elements


@pytest.mark.parametrize("kp", [1152, 4608], ids=["one-chunk", "chunks"])
def test_rounding_adds_stay_exact_under_fp_fusion(compiled, kp):
    """``rint_small`` rounds by x + 1.5 * 2^23; Triton's FP fusion contracts a multiply producing x into that add, so
    the product is then rounded only once, with the add: codes differ from the reference's where RN(product) sits on
    a tie. The int4p2 pass may only fuse multiplies by exact powers of two (2^-e built from exponent bits): every
    such FMA in its sm_90 PTX must have an operand made by integer instructions."""
    import re

    probe = sass_probe()
    kernel, _ = probe.compile_single_pass("int4p2", kp)
    ptx = [line.strip() for line in kernel.asm["ptx"].splitlines()]
    define = {}
    for line in ptx:
        m = re.match(r"^([a-z][\w.]*)\s+(%\w+),", line)
        if m:
            define[m.group(2)] = m.group(1)
    fmas = [line for line in ptx if line.startswith("fma") and "0f4B400000" in line]
    assert fmas  # the add-based rounding is there (fused or not, it must be checked)
    for line in fmas:
        operands = re.findall(r"%\w+", line)[1:3]
        ops = [define.get(r, "?") for r in operands]
        assert any(re.search(r"\.(s32|u32|b32)$", op) for op in ops), (line, ops)


def _single_pass_formats():
    """ACT_FORMATS without a per-tensor outer scale (those take the two-launch path)."""
    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import act_spec

    return [(name, kw) for name, kw in ACT_FORMATS if act_spec(make_format(name, **kw)).outer != 1]


SINGLE_PASS_FORMATS = _single_pass_formats()


@pytest.mark.parametrize("kp", [1152, 4608], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("name,kw", SINGLE_PASS_FORMATS, ids=ids(SINGLE_PASS_FORMATS))
def test_single_pass_compiles_for_hopper_in_every_format(compiled, name, kw, kp):
    """Every format the single pass runs compiles for sm_90 with the GPU's own instructions (the paths the CPU
    interpreter never takes), for a row of one chunk and a row of several."""
    probe = sass_probe()
    kernel, meta = probe.compile_single_pass(name, kp, fmt_kwargs=kw)
    assert meta["HW_ROUND"] and meta["ONE_LOAD"] == (kp == 1152)
    counts = probe.sass_counts(kernel.asm["cubin"])
    assert counts["body"] > 0 and counts["ops"].get("STG", 0) > 0  # a kernel that stores its operand
