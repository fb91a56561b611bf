"""Properties every registered format must have; a new format in FORMATS is covered automatically."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import DEVICES, KINDS, code_range, make_input, nearest_excess, sqnr_db, tol
from fourbit.formats import FORMATS, Format, QuantizedTensor, format_from_spec, make_format

NAMES = sorted(FORMATS)
# Option variants checked on top of each format's defaults.
VARIANTS = [(n, {}) for n in NAMES] + [
    ("int4", {"group_size": 32, "scale_dtype": "bfloat16"}),
    ("fp4", {"outer_scale": "tensor"}),
    ("fp4", {"outer_scale": "row", "group_size": 16}),
    ("int4p2", {"group_size": 32}),
    ("fp4p2", {"group_size": 16}),
    ("int8", {"group_size": 64, "scale_dtype": "float16"}),
    ("nf4", {"scale_dtype": "float16"}),
]
VARIANT_IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()) for n, o in VARIANTS]
# Formats that do not round to nearest by design (QuaRTZ truncates and saturates) declare picks_nearest = False.
NEAREST = [(n, o) for n, o in VARIANTS if FORMATS[n].picks_nearest]
NEAREST_IDS = [i for i, v in zip(VARIANT_IDS, VARIANTS) if v in NEAREST]


def build(name: str, opts: dict) -> Format:
    return make_format(name, **opts)


def k_for(fmt: Format, n_groups: int) -> int:
    return (fmt.group_size or 48) * n_groups


@pytest.mark.parametrize("name,opts", NEAREST, ids=NEAREST_IDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), groups=st.integers(1, 4),
       kind=st.sampled_from(KINDS), log10_scale=st.floats(-3.0, 2.0))
def test_quantize_picks_a_nearest_value(name, opts, seed, rows, groups, kind, log10_scale):
    """Under the scales it chose, quantize returns a nearest representable value for every element."""
    fmt = build(name, opts)
    k = k_for(fmt, groups)
    x = make_input(seed, rows, k, kind, log10_scale, g=fmt.group_for(k))
    q = fmt.quantize(x)
    excess = nearest_excess(fmt, x, q)
    assert (excess.double() <= tol(x)).all(), f"max excess {excess.max():.3g}"


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_dtypes(name, opts, in_dtype):
    fmt = build(name, opts)
    r, k = 3, k_for(fmt, 2)
    x = make_input(0, r, k, "normal", 0.0).to(in_dtype)
    q = fmt.quantize(x)
    assert q.codes.shape == (r, k) and q.codes.dtype == fmt.code_dtype
    assert q.scales.shape == (r, k // fmt.group_for(k)) and q.scales.dtype == fmt.scale_dtype
    if fmt.has_row_scale:
        assert q.row_scale.dtype == torch.float32 and tuple(q.row_scale.shape) == fmt.row_scale_shape(r)
    else:
        assert q.row_scale is None and fmt.row_scale_shape(r) is None
    lo, hi = code_range(fmt).min(), code_range(fmt).max()
    assert ((q.codes >= lo) & (q.codes <= hi)).all()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert fmt.dequantize(q, dtype=dt).dtype == dt
    fq = fmt.fake_quantize(x)
    assert fq.dtype == in_dtype and fq.shape == x.shape
    # storage_shapes describes exactly what pack() and quantize() produce
    shapes = fmt.storage_shapes(r, k)
    packed = fmt.pack(q.codes)
    assert shapes["codes"] == (tuple(packed.shape), packed.dtype)
    assert shapes["scales"] == (tuple(q.scales.shape), q.scales.dtype)
    assert ("row_scale" in shapes) == fmt.has_row_scale


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_zero_input_and_zero_groups(name, opts):
    fmt = build(name, opts)
    k = k_for(fmt, 3)
    x = torch.zeros(4, k)
    q = fmt.quantize(x)
    y = fmt.dequantize(q)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(q.scales.float()).all()
    if q.row_scale is not None:
        assert torch.isfinite(q.row_scale).all()
    # zero groups inside a non-zero tensor stay exactly zero, nothing becomes NaN
    g = fmt.group_for(k)
    x = make_input(1, 4, k, "normal", 0.0)
    x[:, :g] = 0.0
    x[2] = 0.0
    y = fmt.fake_quantize(x)
    assert torch.isfinite(y).all()
    assert (y[:, :g] == 0).all() and (y[2] == 0).all()


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_pack_roundtrip_every_code(name, opts):
    fmt = build(name, opts)
    codes_all = code_range(fmt)
    for k in (len(codes_all), len(codes_all) + 1, 1, 7):  # odd K too: pack pads
        gen = torch.Generator().manual_seed(k)
        idx = torch.randint(0, len(codes_all), (3, k), generator=gen)
        codes = codes_all[idx]
        packed = fmt.pack(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (3, (k * fmt.code_bits + 7) // 8)
        assert torch.equal(fmt.unpack(packed, k), codes)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_spec_roundtrip(name, opts):
    fmt = build(name, opts)
    spec = json.loads(json.dumps(fmt.spec()))
    again = format_from_spec(spec)
    assert type(again) is type(fmt) and again == fmt and hash(again) == hash(fmt)
    assert again.spec() == fmt.spec() and again.scale_dtype == fmt.scale_dtype
    x = make_input(2, 2, k_for(fmt, 2), "heavy", 0.0)
    assert torch.equal(again.fake_quantize(x), fmt.fake_quantize(x))
    assert format_from_spec(None) is None


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_bad_inputs(name, opts):
    fmt = build(name, opts)
    k = k_for(fmt, 2)
    x = make_input(3, 2, k, "normal", 0.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            fmt.quantize(y)
    with pytest.raises(ValueError, match="beyond the fp32 range"):
        fmt.quantize(torch.full((1, k), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        fmt.quantize(x.reshape(-1))
    with pytest.raises(ValueError, match="floating"):
        fmt.quantize(torch.ones(2, k, dtype=torch.int32))
    if fmt.group_size is not None and fmt.group_size > 1:
        with pytest.raises(ValueError, match="not a multiple"):
            fmt.quantize(make_input(3, 2, k + 1, "normal", 0.0))
    with pytest.raises(ValueError, match="option|argument"):
        make_format(name, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_group_size_rules(name):
    cls = FORMATS[name]
    fmt = make_format(name)
    assert fmt.group_size == cls.default_group_size
    if cls.fixed_group_size:
        assert make_format(name, group_size=cls.default_group_size) == fmt
        with pytest.raises(ValueError, match="fixed group size"):
            make_format(name, group_size=cls.default_group_size * 2)
    else:
        assert make_format(name, group_size=8).group_size == 8
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError):
            make_format(name, group_size=bad)


def test_unknown_format_name():
    with pytest.raises(ValueError, match="known formats"):
        make_format("int3")


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes(name):
    cls = FORMATS[name]
    assert cls.name == name
    assert cls.code_bits in (4, 8) and cls.code_dtype in (torch.int8, torch.uint8)
    assert isinstance(make_format(name).scale_dtype, torch.dtype)
    fmt = make_format(name)
    assert fmt.bits_per_element(4096) >= fmt.code_bits
    assert fmt.bits_per_element(4096) == pytest.approx(
        fmt.code_bits + fmt.scale_bits() / fmt.group_for(4096)
        + (32 / 4096 if fmt.has_row_scale and fmt.row_scale_kind == "row" else 0.0))


# Gaussian N(0, 1), 32 x 1024: floors for the signal-to-quantization-noise ratio. A 16-level absmax quantizer
# gives ~18-21 dB on Gaussian data (8 bits: ~40 dB); power-of-two scales lose up to 1 bit in some groups.
# The floors sit a few dB below what the formats reach, so a wrong scale (2x off) or scrambled codes fail.
SQNR_FLOOR_DB = {4: 16.0, 8: 38.0}


@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_sqnr_on_gaussian(name, opts):
    fmt = build(name, opts)
    x = make_input(4, 32, 1024, "normal", 0.0)
    floor = getattr(fmt, "sqnr_floor_db", None) or SQNR_FLOOR_DB[fmt.code_bits]  # a format may state its own
    assert sqnr_db(x, fmt.fake_quantize(x)) >= floor


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device"))])
@pytest.mark.parametrize("name,opts", VARIANTS, ids=VARIANT_IDS)
def test_device_matches_cpu(name, opts, device):
    """The same codes, scales and dequantized values on an accelerator as on CPU, bit for bit."""
    fmt = build(name, opts)
    for kind in KINDS:
        x = make_input(5, 8, k_for(fmt, 4), kind, -1.0, g=fmt.group_size or 16)
        qc, qd = fmt.quantize(x), fmt.quantize(x.to(device))
        assert qd.codes.device.type == device
        assert torch.equal(qc.codes, qd.codes.cpu())
        assert torch.equal(qc.scales.view(torch.uint8) if qc.scales.dtype == torch.float8_e4m3fn else qc.scales,
                           (qd.scales.view(torch.uint8) if qd.scales.dtype == torch.float8_e4m3fn else qd.scales).cpu())
        assert torch.equal(fmt.dequantize(qc), fmt.dequantize(qd).cpu())
        assert torch.equal(fmt.unpack(fmt.pack(qd.codes), qd.codes.shape[1]).cpu(), qc.codes)
