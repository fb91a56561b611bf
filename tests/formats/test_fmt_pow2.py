"""int4p2 / fp4p2: power-of-two group scales under an fp32 row scale, exact in FP8 e4m3."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, code_range, local_half_step, make_input, tol
from fourbit.formats import E2M1_VALUES, QuantizedTensor, make_format

E2M1_MAGS = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
# name -> (emin, qmax, grid of |value| for the half-step bound)
SPECS = {"int4p2": (-9, 7.0, torch.arange(0, 9.0)), "fp4p2": (-8, 6.0, E2M1_MAGS)}
NAMES = list(SPECS)


def values_of(name, codes):
    return codes.float() if name == "int4p2" else E2M1_VALUES[codes.long()]


def exact_in_e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float8_e4m3fn).float() == v


@pytest.mark.parametrize("name", NAMES)
def test_every_code_times_2e_is_e4m3(name):
    """code * 2^e is exactly representable in e4m3 for every code and every e in [emin, 0], and the range
    is tight: one step below emin some value is not (it would fall under the smallest subnormal 2^-9)."""
    emin = SPECS[name][0]
    vals = values_of(name, code_range(make_format(name)))
    for e in range(emin, 1):
        assert exact_in_e4m3(vals * 2.0 ** e).all(), e
    assert not exact_in_e4m3(vals * 2.0 ** (emin - 1)).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g=st.sampled_from([8, 32, 64]), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-30.0, 30.0))
def test_scales_error_and_fp8_exactness(name, seed, g, kind, log10_scale):
    emin, qmax, grid = SPECS[name]
    fmt = make_format(name, group_size=g)
    x = make_input(seed, 4, 4 * g, kind, log10_scale, g=g)
    q = fmt.quantize(x)
    r, e = q.row_scale.double(), q.scales
    assert q.scales.dtype == torch.int8 and ((e >= emin) & (e <= 0)).all()
    assert torch.equal(r.float(), (x.abs().amax(1, keepdim=True) / qmax))
    # e is the smallest exponent with max|x_group / r| <= qmax * 2^e (or emin), checked exactly in float64
    y = (x / torch.where(r > 0, r, 1).float()).double()  # what quantize divides by, fp32 then widened
    gmax = y.abs().reshape(4, 4, g).amax(-1)
    two_e = 2.0 ** e.double()
    assert (gmax <= qmax * two_e * (1 + 2 ** -23)).all()
    assert ((e == emin) | (gmax > qmax * two_e / 2)).all()
    # error within half a grid step of r * 2^e
    step = (r * two_e.repeat_interleave(g, dim=1))  # (R, K)
    v = x.abs().double() / torch.where(step > 0, step, 1)
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= step * local_half_step(v, grid) + tol(x)).all()
    # the FP8 operand reproduces dequantize bit for bit
    op, rs = fmt.to_fp8_operand(q)
    assert op.dtype == torch.float8_e4m3fn and op.shape == x.shape and rs.shape == (4, 1)
    assert torch.equal(op.float() * rs, fmt.dequantize(q))
    assert exact_in_e4m3(fmt.fp8_values(q)).all()


@pytest.mark.parametrize("name", NAMES)
def test_folds_into_a_row_column_scaled_fp8_gemm(name):
    """X^ W^T == diag(r_x) (A_fp8 B_fp8^T) diag(r_w): the 4-bit GEMM is an FP8 GEMM with an epilogue scale."""
    fmt = make_format(name)
    k = 4 * fmt.group_size
    xq, wq = fmt.quantize(make_input(1, 6, k, "outliers", 0.0)), fmt.quantize(make_input(2, 5, k, "normal", -2.0))
    (a, ra), (b, rb) = fmt.to_fp8_operand(xq), fmt.to_fp8_operand(wq)
    xd, wd = fmt.dequantize(xq).double(), fmt.dequantize(wq).double()
    fp8 = (a.double() @ b.double().T) * ra.double() * rb.double().T  # exact products, fp64 sums
    # the only difference: dequantize rounds each element op * r to fp32 (<= 2^-24 relative, twice)
    bound = 2.0 ** -23 * (xd.abs() @ wd.abs().T) + 1e-300
    assert ((fp8 - xd @ wd.T).abs() <= bound).all()


@pytest.mark.parametrize("name", NAMES)
def test_row_max_group_has_e0_and_zero_rows(name):
    fmt = make_format(name)
    g = fmt.group_size
    x = make_input(3, 3, 4 * g, "normal", 0.0)
    x[1] = 0.0
    x[2, g:] *= 1e-4  # groups 2^-13 below the row max: clamp to emin
    q = fmt.quantize(x)
    assert q.row_scale[1].item() == 0 and (fmt.dequantize(q)[1] == 0).all()
    top = x.abs().reshape(3, 4, g).amax(-1).argmax(-1)
    assert q.scales[0, top[0]] == 0 and q.scales[2, 0] == 0
    assert (q.scales[2, 1:] == SPECS[name][0]).all()


def test_int4p2_grid_and_codes():
    fmt = make_format("int4p2", group_size=8)
    codes = torch.tensor([[7, -3, 0, 1, -7, 2, 5, 6, 7, 1, -2, 0, 3, -1, 4, -5]], dtype=torch.int8)
    x = codes.float() * torch.tensor([1.0] * 8 + [0.25] * 8)
    q = fmt.quantize(x)
    assert torch.equal(q.codes, codes) and q.scales.tolist() == [[0, -2]]
    assert torch.equal(fmt.dequantize(q), x)


@pytest.mark.parametrize("name,k,bits", [("int4p2", 4096, 4.125 + 32 / 4096), ("fp4p2", 4096, 4.25 + 32 / 4096),
                                         ("int4p2", 3072, 4.125 + 32 / 3072)])
def test_bits_per_element(name, k, bits):
    assert make_format(name).bits_per_element(k) == pytest.approx(bits)


def test_defaults():
    assert make_format("int4p2").group_size == 64 and make_format("fp4p2").group_size == 32
    for name in NAMES:
        fmt = make_format(name)
        assert fmt.fp8_exact and fmt.has_row_scale and fmt.row_scale_shape(7) == (7, 1)
        assert fmt.scale_dtype == torch.int8
