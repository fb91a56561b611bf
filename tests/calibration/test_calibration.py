import copy

import pytest
import torch
from torch import nn

import fourbit
from fourbit.calibration import CalibrationError, calibrate, select_targets

from ..helpers import TinyNet, loop_over, tiny_batches


def test_targets_include_exclude_and_overrides():
    cfg = fourbit.RTNConfig(exclude=("head",), overrides={"conv2": {"keep": True}, "odd": {"activations": None}})
    targets, skipped = select_targets(TinyNet(), cfg)
    names = {t.name: t for t in targets}
    assert set(names) == {"conv", "fc", "odd"}
    assert names["odd"].config.activations is None and names["fc"].config.activations == "int4"
    assert skipped[0].name == "conv2" and "override" in skipped[0].reason


def test_padding_policy_pad_and_skip():
    model = TinyNet()  # conv: 3*3*3 = 27 inputs, odd: 64, head: 40
    pad = {t.name: t for t in select_targets(model, fourbit.RTNConfig(pad="pad"))[0]}
    assert (pad["conv"].in_features, pad["conv"].padded_in) == (27, 64)
    assert pad["fc"].padded_in == pad["fc"].in_features == 512
    targets, skipped = select_targets(model, fourbit.RTNConfig(pad="skip"))
    assert {s.name for s in skipped} == {"conv", "conv2", "head"}
    assert all("pad='skip'" in s.reason for s in skipped)


def test_bounded_seeded_row_sample():
    model = TinyNet()
    targets, _ = select_targets(model, fourbit.SVDQuantConfig())
    batches = tiny_batches(5)
    s1 = calibrate(model, targets, loop_over(batches), max_rows=7, seed=3)
    s2 = calibrate(model, targets, loop_over(batches), max_rows=7, seed=3)
    assert s1["fc"].rows.shape == (7, 512) and s1["fc"].rows_seen == 20 and s1["fc"].calls == 5
    assert s1["conv"].rows.shape == (7, 27) and s1["conv"].rows_seen == 5 * 4 * 64
    assert torch.equal(s1["fc"].rows, s2["fc"].rows)
    # absmax is over every row, not just the sample
    full = torch.cat([torch.relu(model.conv2(torch.relu(model.conv(b)))).flatten(1) for b in batches])
    assert torch.allclose(s1["fc"].absmax, full.abs().amax(0))
    # the hooks are gone afterwards
    assert not model.fc._forward_pre_hooks


def test_nan_stops_with_layer_name_and_step():
    model = TinyNet()
    batches = tiny_batches(3)
    batches[2][0, 0, 0, 0] = float("nan")  # a corner pixel: 4 of the 3x3 conv's im2col rows see it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=r"layer 'conv' received NaN/Inf inputs in 4 input channel\(s\) at calibration step 3"):
        fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(batches))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    assert isinstance(model.conv, nn.Conv2d) and not model.conv._forward_pre_hooks


def test_layer_never_called_is_reported():
    model = TinyNet()
    targets, _ = select_targets(model, fourbit.SVDQuantConfig())
    with pytest.raises(CalibrationError, match="never called"):
        calibrate(model, targets, lambda m: m.fc(torch.randn(2, 512)))


# ---- issue 20 item 7: zero-row batches, and channels that are zero in every calibration row --------
def test_zero_row_batches_are_skipped():
    torch.manual_seed(0)
    model = TinyNet()
    batches = [torch.zeros(0, 3, 8, 8)] + tiny_batches(2)
    fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(batches), verbose=False,
                     progress=False)
    assert model.fourbit_report.layers["fc"]["calib_rel_error"] < 0.5


def test_only_zero_row_batches_are_refused():
    with pytest.raises(CalibrationError, match="only with empty .zero-row. inputs"):
        fourbit.quantize(TinyNet(), fourbit.SVDQuantConfig(rank=4),
                         forward_loop=loop_over([torch.zeros(0, 3, 8, 8)]), verbose=False, progress=False)


def test_always_zero_channel_is_not_smoothed_and_warned():
    """A channel that calibration never saw non-zero used to get lambda ~ EPS^alpha: at inference, where it is
    non-zero, x / lambda blew up the activation range and SVDQuant's error doubled."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        layer[0].weight.copy_(torch.randn(64, 128, generator=g) / 128**0.5)
    calib = torch.randn(256, 128, generator=g)
    calib[:, 5] = 0.0
    test = torch.randn(256, 128, generator=g)  # channel 5 active
    with torch.no_grad():
        ref = layer(test)
    q = copy.deepcopy(layer)
    with pytest.warns(UserWarning, match=r"zero in every calibration row: 0 \(1 of 128\)"):
        fourbit.quantize(q, fourbit.SVDQuantConfig(rank=8), forward_loop=loop_over([calib]), verbose=False,
                         progress=False)
    assert q[0].smooth[5] == 1.0
    # the same layer calibrated on data where channel 5 is active is the yardstick
    q_seen = copy.deepcopy(layer)
    fourbit.quantize(q_seen, fourbit.SVDQuantConfig(rank=8), forward_loop=loop_over([test]), verbose=False,
                     progress=False)
    with torch.no_grad():
        err = float((q(test) - ref).norm() / ref.norm())
        err_seen = float((q_seen(test) - ref).norm() / ref.norm())
    assert err < 1.3 * err_seen, (err, err_seen)


def test_failed_conversion_leaves_the_model_untouched(monkeypatch):
    import fourbit.api as api

    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = api.convert_layer

    def failing(target, stats, device=None):
        if target.name == "fc":
            raise RuntimeError("conversion failed")
        return real(target, stats, device)

    monkeypatch.setattr(api, "convert_layer", failing)
    with pytest.raises(RuntimeError, match="conversion failed"):
        fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(tiny_batches(2)),
                         verbose=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.fc, nn.Linear)
