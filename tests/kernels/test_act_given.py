"""``kernels/act_given`` (act_quant's path "given": the rows' max |X^| handed over, X read once) against ``act_quant``
without the maxima and against ``act_quant_torch``.

Codes and row scales: bit for bit, with the true row maxima. The down-projection (per-slice partials summed in a fixed
order): as ``test_act_quant``, elementwise 1e-5 relative in the interpreter, ``SQNR_GPU_ACCUMULATE_DB`` on a GPU.
Tiny tiles (16-row programs, 64-column steps, 128 columns per program) so that several row blocks and column slices
run, with ragged edges (M = 37 not a multiple of the row block, K = 200 not of the step, fp8 / int8's Kp = 208 not of
the slice). Operands: ``test_act_inline``'s (Kp 256 for the grouped formats). The GPU path (its own rounding, bf16
tensor cores) compiled for sm_90 without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from fourbit.formats import make_format

from .conftest import bits, compile_for_hopper
from .kernel_helpers import SQNR_GPU_ACCUMULATE_DB, act_operands, hard_rows, sqnr_db

GIVEN_FORMATS = ["int4p2", "fp4p2", "fp8", "int8"]
#: 16-row programs over column slices of 128: two at Kp = 256, 128 + 80 at fp8 / int8's Kp = 208
SLICES = dict(given_BM=16, given_BK=64, given_cols=128, given_cols_small=128)
M, K = 37, 200


def _operands(name, device, rank, smooth_on=True):
    """(format, x fp32 (M, K) with a row of zeros, Kp, smooth (Kp,) or None, lr_down (rank, Kp) bf16 or None)."""
    x, fmt, kp, smooth, down = act_operands(name, device, rank, smooth_on, M, K)
    x[5] = 0.0
    return fmt, x, kp, smooth, down


def _row_amax(x, smooth, kp):
    """What the producer hands over: each row's max |X^|, X^ = pad(X) * (1 / smooth) in fp32 (M,)."""
    from fourbit.kernels.reference import smooth_reciprocal

    xs = torch.nn.functional.pad(x.float(), (0, kp - x.shape[1]))
    if smooth is not None:
        xs = xs * smooth_reciprocal(smooth)
    return xs.abs().amax(1)


def _assert_same(got, ref, device, lr=True):
    """Codes and row scales bit for bit; the down-projection within the reorder tolerance (lr: compare it)."""
    assert got.q.dtype == ref.q.dtype and got.q.shape == ref.q.shape
    assert torch.equal(bits(got.q), bits(ref.q))
    assert torch.equal(bits(got.row_scale), bits(ref.row_scale))
    assert got.group_scale is None and ref.group_scale is None
    assert (got.lr is None) == (ref.lr is None)
    if got.lr is None or not lr:
        return
    assert got.lr.shape == ref.lr.shape
    if device == "cpu":  # X @ (hi + lo): 2^-16 relative per product, fp32 sums in another order
        assert torch.allclose(got.lr, ref.lr, rtol=1e-5, atol=1e-5 * ref.lr.abs().max().item())
    else:
        assert sqnr_db(ref.lr, got.lr) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.parametrize("rank", [0, 20], ids=["no-branch", "branch"])
@pytest.mark.parametrize("name", GIVEN_FORMATS)
def test_act_quant_given_bit_exact(device, name, rank):
    """fp32 and bf16 X, smoothed, over several row blocks and column slices: the codes and row scales of act_quant
    without the maxima and of its twin, bit for bit (a row of zeros: scale 0, codes 0)."""
    from fourbit.kernels.act_quant import ActConfig, act_path, act_quant, act_quant_torch, act_spec

    fmt, x, kp, smooth, down = _operands(name, device, rank)
    cfg = ActConfig(**SLICES)
    assert act_path(act_spec(fmt), M, kp, bool(rank), False, cfg, row_amax=True) == "given"
    for xin in (x, x.bfloat16()):
        amax = _row_amax(xin, smooth, kp)
        got = act_quant(xin, fmt, smooth, down, kp, cfg, row_amax=amax)
        _assert_same(got, act_quant(xin, fmt, smooth, down, kp, cfg), device)
        _assert_same(got, act_quant_torch(xin, fmt, smooth, down, kp, row_amax=amax), device)
        assert got.row_scale[5] == 0 and not got.q[5].view(torch.uint8).any()


@pytest.mark.parametrize("cfg", [dict(given_BM=32, given_BK=32, given_cols=100, large_k=256),
                                 dict(given_BM=16, given_BK=64, large_k=4096)], ids=["large-k", "one-slice"])
def test_act_quant_given_slice_widths(device, cfg):
    """Columns per program from ``large_k`` (``given_cols`` rounded up to whole steps, here 128 for steps of at
    least the group of 64) and below it (``given_cols_small`` 512 >= Kp: one slice, its partial the result)."""
    from fourbit.kernels.act_given import given_meta
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_quant_torch, act_spec

    fmt, x, kp, smooth, down = _operands("int4p2", device, 20)
    x = x.bfloat16()
    cfg = ActConfig(**cfg)
    meta, cols = given_meta(act_spec(fmt), kp, cfg)
    assert (meta["BK"], cols) == ((64, 128) if cfg.large_k == 256 else (64, 512))
    got = act_quant(x, fmt, smooth, down, kp, cfg, row_amax=_row_amax(x, smooth, kp))
    _assert_same(got, act_quant_torch(x, fmt, smooth, down, kp), device)


@pytest.mark.parametrize("name", ["int4p2", "fp8"])
def test_act_quant_given_two_blocks_extra_columns(device, name):
    """X as two column blocks (the second a strided view of a wider tensor, split off a step and group boundary),
    read in place, into an operand buffer with 8 free columns: the concatenation's codes, q a view of q_ext."""
    from fourbit.kernels.act_quant import ActConfig, act_quant

    fmt, x, kp, smooth, down = _operands(name, device, 20)
    x = x.bfloat16()
    k1 = 72
    wide = torch.zeros(M, 400, dtype=torch.bfloat16, device=device)
    wide[:, 100: 100 + K - k1] = x[:, k1:]
    blocks = [x[:, :k1].contiguous(), wide[:, 100: 100 + K - k1]]
    cfg = ActConfig(**SLICES)
    got = act_quant(blocks, fmt, smooth, down, kp, cfg, extra_cols=8, row_amax=_row_amax(x, smooth, kp))
    assert got.q_ext.shape == (M, kp + 8) and got.q.data_ptr() == got.q_ext.data_ptr()
    assert torch.equal(bits(got.q_ext[:, :kp]), bits(got.q))
    _assert_same(got, act_quant(x, fmt, smooth, down, kp, cfg), device)


@pytest.mark.parametrize("name", ["int4p2", "int8"])
def test_act_quant_given_without_smoothing(device, name):
    """No smoothing (smooth_recip None), fp32 X (split into bf16 hi + lo for the down-projection on a GPU), with
    and without the branch."""
    from fourbit.kernels.act_quant import ActConfig, act_quant, act_quant_torch

    for rank in (0, 20):
        fmt, x, kp, _, down = _operands(name, device, rank, smooth_on=False)
        got = act_quant(x, fmt, None, down, kp, ActConfig(**SLICES), row_amax=_row_amax(x, None, kp))
        _assert_same(got, act_quant_torch(x, fmt, None, down, kp), device)


@pytest.mark.parametrize("name,kw", [("int4", {}), ("nvfp4", {}), ("fp4", {"outer_scale": "row"})],
                         ids=["int4", "nvfp4", "fp4-row"])
def test_act_quant_given_ignored_by_other_formats(device, name, kw):
    """Formats whose scales the row maxima do not decide take their usual path and match the twin; the launcher
    itself refuses them."""
    from fourbit.kernels.act_given import act_quant_given
    from fourbit.kernels.act_quant import ActConfig, act_path, act_quant, act_quant_torch, act_spec

    fmt = make_format(name, **kw)
    x = hard_rows(M, 256).to(device)
    amax = _row_amax(x, None, 256)
    cfg = ActConfig(**SLICES)
    assert act_path(act_spec(fmt), M, 256, False, False, cfg, row_amax=True) != "given"
    got = act_quant(x, fmt, None, None, 256, cfg, row_amax=amax)
    ref = act_quant_torch(x, fmt, None, None, 256, row_amax=amax)
    assert torch.equal(bits(got.q), bits(ref.q))
    for a, b in ((got.row_scale, ref.row_scale), (got.group_scale, ref.group_scale)):
        assert (a is None) == (b is None) and (a is None or torch.equal(bits(a), bits(b)))
    with pytest.raises(ValueError, match="no row-maxima path"):
        act_quant_given(x, act_spec(fmt), None, 256, cfg, amax)


def test_act_quant_given_uses_the_given_maxima(device):
    """Maxima half the truth: row scales half act_quant's (int4p2: r = max / 7, exact halving) and the codes of the
    largest values saturate, so they differ: the kernel quantizes from what it is given."""
    from fourbit.kernels.act_quant import ActConfig, act_quant

    fmt, x, kp, smooth, _ = _operands("int4p2", device, 0)
    x = x.bfloat16()
    amax = _row_amax(x, smooth, kp)
    cfg = ActConfig(**SLICES)
    got = act_quant(x, fmt, smooth, None, kp, cfg, row_amax=amax * 0.5)
    ref = act_quant(x, fmt, smooth, None, kp, cfg)
    assert torch.equal(got.row_scale, ref.row_scale * 0.5)
    assert not torch.equal(bits(got.q), bits(ref.q))


@pytest.mark.usefixtures("interpret")
def test_act_quant_given_leaves_a_large_branch_to_the_usual_path():
    """A LoRA-grown branch (rank 100, padded to 128 > GIVEN_MAX_RANK) ignores the maxima: even wrong ones change
    nothing (the usual path finds its own)."""
    from fourbit.kernels.act_quant import GIVEN_MAX_RANK, ActConfig, act_quant

    fmt, x, kp, smooth, down = _operands("int4p2", "cpu", 100)
    assert 128 > GIVEN_MAX_RANK
    cfg = ActConfig(**SLICES)
    got = act_quant(x, fmt, smooth, down, kp, cfg, row_amax=_row_amax(x, smooth, kp) * 0.5)
    ref = act_quant(x, fmt, smooth, down, kp, cfg)
    assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(got.lr, ref.lr)


def test_act_quant_given_checks_its_inputs(interpret):
    """row_amax of the wrong shape, dtype or device, or not a tensor, and tiles that are not powers of two: a
    ValueError saying what was expected."""
    from fourbit.kernels.act_quant import ActConfig, act_quant

    fmt, x, kp, smooth, _ = _operands("int4p2", "cpu", 0)
    amax = _row_amax(x, smooth, kp)
    for bad in (amax[:-1], amax.double(), amax[:, None], amax.tolist()):
        with pytest.raises(ValueError, match=rf"row_amax must be a \({M},\) float32 tensor"):
            act_quant(x, fmt, smooth, None, kp, row_amax=bad)
    with pytest.raises(ValueError, match="row_amax must be"):  # also where the format would ignore it
        act_quant(x, make_format("int4"), smooth, None, kp, row_amax=amax[:-1])
    with pytest.raises(ValueError, match="row_amax is on meta"):
        act_quant(x, fmt, smooth, None, kp, row_amax=torch.empty(M, device="meta"))
    with pytest.raises(ValueError, match="given_BK must be a power of two"):
        act_quant(x, make_format("fp8"), smooth, None, kp, ActConfig(given_BK=48), row_amax=amax)


@pytest.mark.parametrize("name", GIVEN_FORMATS)
def test_act_given_compiles_for_hopper(compiled, name):
    """The GPU path (the GPU's rounding, bf16 tensor-core down-projection, two column blocks) compiles for sm_90
    here at the default tiles, in every format the path takes."""
    from fourbit.kernels.act_given import _act_given_kernel, given_meta
    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_spec

    spec = act_spec(make_format(name))
    meta, _ = given_meta(spec, 12288, DEFAULT_CONFIG, two=True, rank=32)
    assert meta["HW_ROUND"] and not meta["UPCAST"]
    q = "*i8" if spec.operand_dtype == torch.int8 else "*fp8e4nv"
    sig = dict(x_ptr="*bf16", x2_ptr="*bf16", rsmooth_ptr="*fp32", down_ptr="*bf16", amax_ptr="*fp32", q_ptr=q,
               rs_ptr="*fp32", plr_ptr="*fp32", **dict.fromkeys(("M", "K1", "K", "Kp", "stride_xm", "stride_x2m",
                                                                  "stride_qm", "cols_per_slice"), "i32"))
    warps = meta.pop("num_warps")
    kernel = compile_for_hopper(_act_given_kernel, sig, meta, warps)
    assert "mma" in kernel.asm["ptx"]  # the down-projection on tensor cores
