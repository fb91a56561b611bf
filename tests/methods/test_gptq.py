"""GPTQ weight rounding: better than RTN on correlated inputs, any format, wired into every method."""
import pytest
import torch

import fourbit
from fourbit.calibration import LayerStats
from fourbit.formats import make_format
from fourbit.methods import get_transform
from fourbit.methods.common import output_error
from fourbit.methods.gptq import code_set, gptq_quantize

from ..helpers import TinyNet, loop_over, tiny_batches


def correlated_layer(seed=0, n=512, k=256, n_out=128):
    """Inputs with strongly correlated channels (a random mixing of Gaussian sources) and a Gaussian W."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)
    held_out = torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)
    w = torch.randn(n_out, k, generator=g) / k**0.5
    return x, held_out, w


def rel_err(x, w, w_q):
    y = x @ w.t()
    return float((y - x @ w_q.t()).norm() / y.norm())


@pytest.mark.parametrize("name", ["int4", "nvfp4", "int4p2", "nf4", "quartz", "quartz_tok"])
def test_gptq_beats_rtn_on_correlated_inputs(name):
    """Measured (seed 0): int4 RTN 0.108 -> GPTQ 0.071 on the calibration rows, 0.087 held out; QuaRTZ on
    the weights (truncation) gains most, 0.175 -> 0.067. Required: >= 15% lower error, held-out too."""
    x, held_out, w = correlated_layer()
    fmt = make_format(name)
    rtn = fmt.dequantize(fmt.quantize(w))
    q = gptq_quantize(w, x, fmt)
    gptq = fmt.dequantize(q)
    assert rel_err(x, w, gptq) < 0.85 * rel_err(x, w, rtn)
    assert rel_err(held_out, w, gptq) < 0.9 * rel_err(held_out, w, rtn)
    # a valid tensor of the format: codes from its code set, the storage round trip is exact
    assert q.codes.dtype == fmt.code_dtype and q.scales.dtype == fmt.scale_dtype
    assert torch.isin(q.codes, code_set(fmt)).all()
    assert torch.equal(fmt.unpack(fmt.pack(q.codes), w.shape[1]), q.codes)


@pytest.mark.parametrize("name,nearest", [("int4", "int4"), ("fp4", "fp4"), ("quartz", "quartz_round")])
def test_uncorrelated_orthogonal_inputs_reduce_to_rtn(name, nearest):
    """With X^T X proportional to I there is no error to spread: GPTQ returns the round-to-nearest codes.

    GPTQ always picks the nearest value under the group's scales, so for truncating QuaRTZ it gives what
    QuaRTZ's round mode gives (same flags, nearest code instead of truncated).
    """
    k = 128
    x = torch.eye(k) * 3.0  # H = 2 X^T X / n is diagonal (and stays so after dampening)
    w = torch.randn(64, k)
    q, ref = gptq_quantize(w, x, make_format(name)), make_format(nearest).quantize(w)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)


def test_static_groups_keep_the_rtn_scales():
    x, _, w = correlated_layer(1)
    fmt = make_format("int4")
    q = gptq_quantize(w, x, fmt, static_groups=True)
    assert torch.equal(q.scales, fmt.quantize(w).scales)
    dyn = gptq_quantize(w, x, fmt)
    assert not torch.equal(dyn.scales, q.scales)  # dynamic groups re-fit scales to the updated columns
    for qq in (q, dyn):
        assert rel_err(x, w, fmt.dequantize(qq)) < rel_err(x, w, fmt.dequantize(fmt.quantize(w)))


def test_dead_inputs_and_few_rows():
    """Channels never active (zero-padded K) and fewer rows than K: dampening keeps it well posed."""
    x, _, w = correlated_layer(2, n=64)
    x[:, -64:] = 0.0
    fmt = make_format("int4")
    q = gptq_quantize(w, x, fmt)
    assert torch.isfinite(fmt.dequantize(q)).all()
    assert rel_err(x, w, fmt.dequantize(q)) < rel_err(x, w, fmt.dequantize(fmt.quantize(w)))
    with pytest.raises(ValueError, match="share K"):
        gptq_quantize(w, x[:, :10], fmt)


# ---- wiring into the methods ---------------------------------------------------------------------
def _stats(x):
    return LayerStats(x.abs().amax(0), x, x.shape[0], 1)


@pytest.mark.parametrize("cfg_cls,kw", [
    (fourbit.RTNConfig, {}),
    (fourbit.NF4Config, {}),
    (fourbit.SVDConfig, {"rank": 8}),
    (fourbit.LoRCConfig, {"rank": 8}),
    (fourbit.SmoothQuantConfig, {"alpha": 0.5}),
    (fourbit.SVDQuantConfig, {"rank": 8, "alpha": 0.5}),
    (fourbit.QuaRTZConfig, {}),
    (fourbit.SVDQuantQuaRTZConfig, {"rank": 8, "alpha": 0.5}),
])
def test_every_method_takes_gptq(cfg_cls, kw):
    """weight_rounding="gptq" lowers each method's layer error (activations quantized as configured)."""
    x, _, w = correlated_layer(3)
    x[:, :4] *= 10.0  # a few outlier channels, so smoothing has something to do
    stats, y = _stats(x), x @ w.t()
    errs = {}
    for rounding in ("rtn", "gptq"):
        cfg = cfg_cls(**kw, weight_rounding=rounding)
        assert cfg.needs_calibration_data() == (rounding == "gptq" or cfg_cls.needs_calibration)
        errs[rounding] = output_error(get_transform(cfg)(w, stats, cfg), x, y)
    assert errs["gptq"] < errs["rtn"], errs


def test_svdquant_gptq_sees_the_smoothed_rows(monkeypatch):
    """The residual is multiplied by x / lambda, so that is what GPTQ's Hessian must be built from."""
    import fourbit.methods.gptq as gptq_mod

    seen = []
    real = gptq_mod.gptq_quantize
    monkeypatch.setattr(gptq_mod, "gptq_quantize", lambda w, rows, fmt, **kw: seen.append(rows) or real(w, rows, fmt, **kw))
    x, _, w = correlated_layer(4)
    x[:, :4] *= 10.0
    cfg = fourbit.SVDQuantConfig(rank=8, alpha=0.5, weight_rounding="gptq")
    state = get_transform(cfg)(w, _stats(x), cfg)
    assert len(seen) == 1 and torch.allclose(seen[0], x / state.smooth)


def test_gptq_config_validation_and_calibration_requirement():
    with pytest.raises(ValueError, match="weight_rounding"):
        fourbit.RTNConfig(weight_rounding="adaround")
    with pytest.raises(ValueError, match="gptq_damp"):
        fourbit.RTNConfig(weight_rounding="gptq", gptq_damp=0.0)
    assert not fourbit.RTNConfig().needs_calibration_data()
    cfg = fourbit.RTNConfig(weight_rounding="gptq", exclude=("head",))
    assert fourbit.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="needs calibration data"):
        fourbit.quantize(TinyNet(), cfg, progress=False, verbose=False)


def test_gptq_end_to_end_on_a_tiny_model():
    """W4A16 through fourbit.quantize: GPTQ on the recorded rows beats RTN on those inputs."""
    batches = tiny_batches(4)
    errors = {}
    for rounding in ("rtn", "gptq"):
        torch.manual_seed(0)  # the same 16-bit model both times
        model = TinyNet()
        ref = [model(b) for b in batches]
        cfg = fourbit.RTNConfig(weight_rounding=rounding, activations=None)
        fourbit.quantize(model, cfg, loop_over(batches), progress=False, verbose=False)
        with torch.no_grad():
            errors[rounding] = sum(float((model(b) - r).norm() / r.norm()) for b, r in zip(batches, ref))
    assert errors["gptq"] < errors["rtn"], errors
