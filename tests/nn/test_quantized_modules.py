import pytest
import torch
from torch import nn

import fourbit
from fourbit.formats import make_format
from fourbit.nn import QuantConv2d, QuantLinear, activation_format, quantized_layers, set_kernel

from ..helpers import TinyNet, loop_over, tiny_batches


def test_reference_forward_matches_manual_emulation():
    lin = nn.Linear(128, 48)
    model = nn.Sequential(lin)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(5, 7, 128)
    fourbit.quantize(model, fourbit.RTNConfig(), verbose=False)
    f = make_format("int4")
    expected = f.fake_quantize(x.reshape(-1, 128)) @ f.fake_quantize(w).t() + b
    assert torch.allclose(model(x).reshape(-1, 48), expected, atol=1e-5)


def test_conv_matches_unfolded_linear_math():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9)
    ref = conv(x)
    model = nn.Sequential(conv)
    fourbit.quantize(model, fourbit.RTNConfig(weights="int8", activations=None), verbose=False)
    assert isinstance(model[0], QuantConv2d)
    y = model(x)
    assert y.shape == ref.shape
    assert (y - ref).norm() / ref.norm() < 0.02  # int8 per-channel weights only


def test_activation_format_switch_and_kernel_names():
    model = TinyNet()
    fourbit.quantize(model, fourbit.RTNConfig(), verbose=False)
    x = tiny_batches(1)[0]
    y4 = model(x)
    with activation_format(model, None):
        y16 = model(x)
    assert not torch.equal(y4, y16)
    assert torch.equal(model(x), y4)  # restored
    with pytest.raises(ValueError, match="unknown kernel"):
        set_kernel(model, "no-such-kernel")


def test_quantize_errors_are_clear():
    with pytest.raises(TypeError, match="fourbit config"):
        fourbit.quantize(TinyNet(), {"weights": "int4"})
    with pytest.raises(ValueError, match="needs calibration data"):
        fourbit.quantize(TinyNet(), fourbit.SVDQuantConfig())
    with pytest.raises(ValueError, match="no layer matched"):
        fourbit.quantize(TinyNet(), fourbit.RTNConfig(include=("nothing*",)))
    model = fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False)
    with pytest.raises(ValueError, match="already quantized"):
        fourbit.quantize(model, fourbit.RTNConfig())


def test_report_lists_padding_and_kept_layers():
    model = TinyNet()
    fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4, overrides={"head": {"keep": True}}),
                     forward_loop=loop_over(tiny_batches(2)), verbose=False)
    rep = model.fourbit_report
    assert rep.layers["conv"]["padded_from"] == 27
    assert "head" in rep.skipped and "alpha" in rep.layers["fc"]
    assert "kept 16-bit: head" in rep.summary()
    assert {n for n, _ in quantized_layers(model)} == {"conv", "conv2", "fc", "odd"}
