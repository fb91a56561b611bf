"""fourbit.plan_precision: rows recorded per layer, per-shape timing, the choice per layer, the planned config."""
import json

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn.rows import record_rows
from fourbit.precision_plan import SIXTEEN_BIT, exact_pattern
from fourbit.utils.timing import time_side_by_side

from .helpers import SingleBlock

FP8 = {"weights": "fp8", "activations": "fp8"}
FP8_LABEL = "weights=fp8, activations=fp8"


class TwoWidths(nn.Module):
    """A wide layer called on 32 rows and a narrow one called twice on 8 rows, a 3x3 conv, an unused linear."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(64, 128)
        self.narrow = nn.Linear(128, 64, bias=False)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        h = self.wide(x)
        y = self.narrow(h[:8]) + self.narrow(h[8:16])
        return y, self.conv(x[:4].reshape(1, 4, 4, 16))


def loop(model):
    gen = torch.Generator().manual_seed(0)
    model(torch.randn(32, 64, generator=gen))


def cfg(**kw):
    return fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, **kw)


def timer_from(table):
    """A timer returning ``table[label]`` ms per call for each variant it is given (and recording what it got)."""
    calls = []

    def timer(variants):
        calls.append(sorted(variants))
        return {label: table[label] for label in variants}
    timer.calls = calls
    return timer


def test_rows_are_recorded_per_call():
    model = TwoWidths()
    rows = record_rows(model, {"wide": model.wide, "narrow": model.narrow, "conv": model.conv}, loop)
    assert rows == {"wide": {32: 1}, "narrow": {8: 2}, "conv": {64: 1}}


def test_first_candidate_that_pays_is_chosen_in_order():
    model = TwoWidths()
    timer = timer_from({SIXTEEN_BIT: 1.0, "config": 0.8, FP8_LABEL: 0.5})
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], timer=timer, progress=False)
    assert [lp.choice for lp in plan.layers] == ["config"] * 3  # config first, although fp8 is faster
    assert plan.config.overrides == {}
    assert plan.untimed == {"unused": "not called by forward_loop"}
    conv = plan.layers[2]
    assert (conv.name, conv.rows, conv.in_features, conv.out_features) == ("conv", {64: 1}, 36, 4)  # 4 x 3 x 3 -> 4
    narrow = next(lp for lp in plan.layers if lp.name == "narrow")
    assert narrow.rows == {8: 2} and narrow.ms[SIXTEEN_BIT] == pytest.approx(2.0)  # two calls of 8 rows
    assert plan.estimated_speedup() == pytest.approx(1 / 0.8)
    assert all(sorted(c) == sorted([SIXTEEN_BIT, "config", FP8_LABEL]) for c in timer.calls)


def test_prefer_fastest_keeps_the_fastest_precision_that_pays(tmp_path):
    model = TwoWidths()
    table = {SIXTEEN_BIT: 1.0, "config": 0.8, FP8_LABEL: 0.5}
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], timer=timer_from(table), progress=False,
                                  prefer="fastest")
    assert {lp.choice for lp in plan.layers} == {FP8_LABEL} and plan.prefer == "fastest"
    assert "the fastest precision that pays kept" in plan.summary()
    assert fourbit.PrecisionPlan.load(plan.save(tmp_path / "p.json")).prefer == "fastest"
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], progress=False, prefer="fastest",
                                  min_speedup=2.5, timer=timer_from(table))  # none pays 2.5x: 16 bits
    assert {lp.choice for lp in plan.layers} == {SIXTEEN_BIT}
    d = plan.to_dict()
    del d["prefer"]  # a plan saved before the option: the first that pays
    assert fourbit.PrecisionPlan.from_dict(d).prefer == "first"
    with pytest.raises(ValueError, match="prefer must be 'first' .* or 'fastest', got 'speed'"):
        fourbit.plan_precision(model, cfg(), loop, timer=timer_from(table), progress=False, prefer="speed")


def test_slow_config_falls_back_then_keeps_16_bit():
    model = TwoWidths()
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], progress=False,
                                  timer=timer_from({SIXTEEN_BIT: 1.0, "config": 1.3, FP8_LABEL: 0.9}))
    assert {lp.choice for lp in plan.layers} == {FP8_LABEL}
    assert plan.config.overrides == {"wide": FP8, "narrow": FP8, "conv": FP8}
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], progress=False, min_speedup=1.2,
                                  timer=timer_from({SIXTEEN_BIT: 1.0, "config": 1.3, FP8_LABEL: 0.9}))
    assert {lp.choice for lp in plan.layers} == {SIXTEEN_BIT}
    assert plan.config.overrides == {name: {"keep": True} for name in ("wide", "narrow", "conv")}
    assert plan.counts() == {SIXTEEN_BIT: 3}


def test_planned_config_quantizes_the_mix_and_round_trips(tmp_path):
    model = TwoWidths()
    times = iter([{SIXTEEN_BIT: 1.0, "config": 1.5, FP8_LABEL: 0.9},   # wide: fp8
                  {SIXTEEN_BIT: 1.0, "config": 1.5, FP8_LABEL: 1.1}])  # narrow: 16-bit
    plan = fourbit.plan_precision(model, cfg(exclude=("conv", "unused")), loop, fallbacks=[FP8], progress=False,
                                  timer=lambda variants: next(times))
    assert [(lp.name, lp.choice) for lp in plan.layers] == [("wide", FP8_LABEL), ("narrow", SIXTEEN_BIT)]
    path = plan.save(tmp_path / "plan.json")
    again = fourbit.PrecisionPlan.load(path)
    assert again.summary() == plan.summary() and again.config == plan.config
    fourbit.quantize(model, again.config, loop, progress=False, verbose=False)
    assert model.wide.weight_format.name == "fp8" and isinstance(model.narrow, nn.Linear)
    assert model.fourbit_report.skipped["narrow"] == "kept 16-bit by an override"


def test_everything_kept_16_bit_says_so():
    model = TwoWidths()
    plan = fourbit.plan_precision(model, cfg(exclude=("unused", "conv")), loop, progress=False,
                                  timer=timer_from({SIXTEEN_BIT: 1.0, "config": 2.0}))
    with pytest.raises(ValueError, match="kept 16-bit by its overrides"):
        fourbit.quantize(model, plan.config, loop, progress=False, verbose=False)


def test_a_candidate_that_cannot_build_is_reported_not_chosen(monkeypatch):
    from fourbit import precision_plan

    build = precision_plan._ShapeTimer.layer

    def failing(self, label, cand, rows_seen):
        if label == FP8_LABEL:
            raise RuntimeError("no kernel for this pair")
        return build(self, label, cand, rows_seen)

    monkeypatch.setattr(precision_plan._ShapeTimer, "layer", failing)
    plan = fourbit.plan_precision(TwoWidths(), cfg(), loop, fallbacks=[FP8], progress=False,
                                  timer=timer_from({SIXTEEN_BIT: 1.0, "config": 2.0, FP8_LABEL: 0.1}))
    assert {lp.choice for lp in plan.layers} == {SIXTEEN_BIT}
    assert all(lp.errors == {FP8_LABEL: "RuntimeError: no kernel for this pair"} for lp in plan.layers)
    assert all(FP8_LABEL not in lp.ms for lp in plan.layers)
    assert (f"{FP8_LABEL} could not be timed on 3 layer(s) (e.g. wide): RuntimeError: no kernel for this pair"
            in plan.summary())


def test_a_candidate_that_cannot_be_timed_is_reported_and_the_others_are_kept():
    def timer(variants):  # fp8 cannot be captured (say); the others time fine
        if FP8_LABEL in variants:
            raise RuntimeError("operation not permitted when stream is capturing")
        return {label: {SIXTEEN_BIT: 1.0, "config": 0.8}[label] for label in variants}

    plan = fourbit.plan_precision(TwoWidths(), cfg(), loop, fallbacks=[FP8], timer=timer, progress=False)
    assert {lp.choice for lp in plan.layers} == {"config"}
    assert all(lp.ms == {SIXTEEN_BIT: lp.ms[SIXTEEN_BIT], "config": 0.8 * sum(lp.rows.values())} for lp in plan.layers)
    assert all(lp.errors == {FP8_LABEL: "RuntimeError: operation not permitted when stream is capturing"}
               for lp in plan.layers)


@pytest.fixture
def no_kernel_state(monkeypatch):
    """The twins are built without ``prepare_kernels`` (no Triton state on the CPU): the timers here are fakes."""
    import fourbit.nn.prepare

    monkeypatch.setattr(fourbit.nn.prepare, "prepare_kernels", lambda model, forward_loop=None: model)


@pytest.mark.usefixtures("no_kernel_state")
def test_several_kernels_each_precision_takes_its_fastest_and_layers_keep_it(tmp_path):
    model = TwoWidths()
    tri, cub = "config @ triton", "config @ triton-cublas"
    fp8_tri, fp8_cub = f"{FP8_LABEL} @ triton", f"{FP8_LABEL} @ triton-cublas"
    timer = timer_from({SIXTEEN_BIT: 1.0, tri: 0.9, cub: 0.7, fp8_tri: 0.5, fp8_cub: 0.4})
    plan = fourbit.plan_precision(model, cfg(), loop, fallbacks=[FP8], kernels=("triton", "triton-cublas"),
                                  timer=timer, progress=False)
    assert plan.candidates == [tri, cub, fp8_tri, fp8_cub, SIXTEEN_BIT]
    assert [lp.choice for lp in plan.layers] == [cub] * 3  # the config's fastest kernel; fp8 only if it does not pay
    assert plan.config.overrides == {name: {"kernel": "triton-cublas"} for name in ("wide", "narrow", "conv")}

    times = iter([{SIXTEEN_BIT: 1.0, tri: 0.9, cub: 1.2, fp8_tri: 0.5, fp8_cub: 0.5},    # wide: config on Triton
                  {SIXTEEN_BIT: 1.0, tri: 1.1, cub: 1.1, fp8_tri: 1.2, fp8_cub: 0.95}])  # narrow: fp8 on cuBLAS
    plan = fourbit.plan_precision(model, cfg(kernel="triton", exclude=("conv", "unused")), loop, fallbacks=[FP8],
                                  kernels=("triton", "triton-cublas"), timer=lambda v: next(times), progress=False)
    assert [lp.choice for lp in plan.layers] == [tri, fp8_cub]
    assert plan.config.overrides == {"narrow": {**FP8, "kernel": "triton-cublas"}}  # wide: the config's own kernel
    assert "triton-cublas" in plan.summary() and plan.counts() == {tri: 1, fp8_cub: 1}
    fourbit.quantize(model, fourbit.PrecisionPlan.load(plan.save(tmp_path / "plan.json")).config, loop,
                     progress=False, verbose=False)
    kinds = (model.wide.kernel, model.narrow.kernel, model.narrow.weight_format.name)
    assert kinds == ("triton", "triton-cublas", "fp8")
    fourbit.save(model, str(tmp_path / "ckpt"))
    fresh = TwoWidths()
    fourbit.load(fresh, str(tmp_path / "ckpt"))
    assert (fresh.wide.kernel, fresh.narrow.kernel) == ("triton", "triton-cublas")  # the checkpoint keeps the choice


def test_kernels_are_checked():
    with pytest.raises(ValueError, match="not both"):
        fourbit.plan_precision(TwoWidths(), cfg(), loop, kernel="triton", kernels=("triton", "triton-cublas"))
    with pytest.raises(TypeError, match="sequence of kernel names"):
        fourbit.plan_precision(TwoWidths(), cfg(), loop, kernels="triton")
    with pytest.raises(ValueError, match="distinct kernel names"):
        fourbit.plan_precision(TwoWidths(), cfg(), loop, kernels=("triton", "cutlass"))
    with pytest.raises(ValueError, match="distinct kernel names"):
        fourbit.plan_precision(TwoWidths(), cfg(), loop, kernels=("triton", "triton"))
    with pytest.raises(ValueError, match="run on CUDA GPUs and this plan would time them on cpu"):
        fourbit.plan_precision(TwoWidths(), cfg(), loop, kernels=("triton", "triton-cublas"))
    with pytest.raises(ValueError, match="run on CUDA GPUs"):
        fourbit.plan_precision(TwoWidths(), cfg(kernel="triton"), loop)


def test_a_spatial_convolution_is_timed_as_one_at_each_input_shape():
    """A 3x3 convolution is timed at the input shapes it was called with: fourbit's im2col layer against nn.Conv2d
    (the real modules, their outputs of the conv's shape); its rows are batch x output positions."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 1))  # a 1x1 one runs im2col too
    seen = []

    def timer(variants):
        for label, fns in variants.items():
            x = fns[0].args[0]
            seen.append((label, tuple(x.shape), tuple(fns[0]().shape)))
        return {label: 1.0 if label == SIXTEEN_BIT else 0.5 for label in variants}

    def two_shapes(m):
        m(torch.randn(2, 4, 8, 8))
        m(torch.randn(1, 4, 6, 6))
        m(torch.randn(2, 4, 8, 8))

    plan = fourbit.plan_precision(model, fourbit.RTNConfig(weights="int8", activations="int8"), two_shapes,
                                  timer=timer, progress=False)
    layer, pointwise = plan.layers
    assert layer.rows == {9: 1, 32: 2} and (layer.in_features, layer.out_features) == (36, 8)
    assert layer.ms == {SIXTEEN_BIT: 3.0, "config": 1.5} and layer.choice == "config"
    assert pointwise.rows == {9: 1, 32: 2} and (pointwise.in_features, pointwise.out_features) == (8, 8)
    assert sorted(set(seen)) == [("16-bit", (1, 4, 6, 6), (1, 8, 3, 3)), ("16-bit", (1, 8, 3, 3), (1, 8, 3, 3)),
                                 ("16-bit", (2, 4, 8, 8), (2, 8, 4, 4)), ("16-bit", (2, 8, 4, 4), (2, 8, 4, 4)),
                                 ("config", (1, 4, 6, 6), (1, 8, 3, 3)), ("config", (1, 8, 3, 3), (1, 8, 3, 3)),
                                 ("config", (2, 4, 8, 8), (2, 8, 4, 4)), ("config", (2, 8, 4, 4), (2, 8, 4, 4))]


def test_wall_clock_timing_on_the_cpu_runs_the_real_layers():
    model = nn.Sequential(nn.Linear(64, 64))
    plan = fourbit.plan_precision(model, fourbit.RTNConfig(weights="int8", activations="int8"),
                                  lambda m: m(torch.randn(16, 64)), rounds=2, progress=False)
    (layer,) = plan.layers
    assert layer.ms[SIXTEEN_BIT] > 0 and layer.ms["config"] > 0
    assert "cpu" in plan.summary() and json.loads(json.dumps(plan.to_dict()))["layers"][0]["name"] == "0"


def test_bad_input_is_refused_with_a_reason(tmp_path):
    model = TwoWidths()
    with pytest.raises(ValueError, match="a fallback is a dict of config field changes"):
        fourbit.plan_precision(model, cfg(), loop, fallbacks=[{"keep": True}])
    with pytest.raises(ValueError, match="min_speedup must be > 0"):
        fourbit.plan_precision(model, cfg(), loop, min_speedup=0)
    with pytest.raises(ValueError, match="unknown"):
        fourbit.plan_precision(model, cfg(), loop, fallbacks=[{"weights": "int3"}])
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a fourbit precision plan"):
        fourbit.PrecisionPlan.load(bad)
    fourbit.quantize(model, cfg(exclude=("conv", "unused")), loop, progress=False, verbose=False)
    with pytest.raises(ValueError, match="already quantized"):
        fourbit.plan_precision(model, cfg(), loop)


def test_exact_pattern_matches_only_the_name():
    from fnmatch import fnmatchcase

    name = "blocks[0].attn*q?"
    assert fnmatchcase(name, exact_pattern(name))
    assert not fnmatchcase("blocks0.attnXqY", exact_pattern(name))


def test_side_by_side_timer_on_the_cpu():
    out = time_side_by_side({"a": [lambda: sum(range(1000))], "b": [lambda: None]}, rounds=3, device="cpu")
    assert set(out) == {"a", "b"} and out["a"] > 0


class GeluMlp(nn.Module):
    """Two linears of one shape, only the first followed by a tanh-GELU (timed apart: the activation is part of what
    is timed)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.usefixtures("no_kernel_state")
def test_a_layer_followed_by_an_activation_is_timed_with_it(tmp_path):
    model = GeluMlp()
    x = torch.randn(16, 64)
    seen = []

    def timer(variants):
        fn = variants[SIXTEEN_BIT][0]
        seen.append(fn())
        return {label: 1.0 if label == SIXTEEN_BIT else 0.5 for label in variants}

    plan = fourbit.plan_precision(model, cfg(), lambda m: m(x), timer=timer, progress=False)
    assert [(lp.name, lp.activation) for lp in plan.layers] == [("fc1", ["gelu_tanh", 0, 64]), ("fc2", None)]
    assert len(seen) == 2  # one shape, two timings: with the GELU and without
    # the 16-bit twin with the GELU after it: nothing below GELU's minimum (-0.17); without it, a linear's outputs
    assert (seen[0] >= -0.2).all() and not (seen[1] >= -0.2).all()
    assert "16 x 64 x 64 + gelu_tanh" in plan.summary()
    again = fourbit.PrecisionPlan.load(plan.save(tmp_path / "plan.json"))
    assert [lp.activation for lp in again.layers] == [["gelu_tanh", 0, 64], None]


@pytest.mark.usefixtures("no_kernel_state")
def test_an_activation_on_a_sibling_groups_columns_is_timed_on_those_columns():
    block, x = SingleBlock(d=64, h=128), torch.randn(16, 64)
    fourbit.fuse_siblings(block, fourbit.find_siblings(block, lambda m: m(x)))
    seen = []

    def timer(variants):
        seen.append(variants[SIXTEEN_BIT][0]())
        return {label: 1.0 if label == SIXTEEN_BIT else 0.5 for label in variants}

    plan = fourbit.plan_precision(block, cfg(), lambda m: m(x), timer=timer, progress=False)
    (lp,) = plan.layers
    assert lp.activation == ["gelu_tanh", 64, 192] and "+ gelu_tanh on columns 64:192" in plan.summary()
    (out,) = seen  # the 16-bit twin: its Q columns as the linear gives them, the MLP's through the GELU
    assert (out[:, 64:] >= -0.2).all() and not (out[:, :64] >= -0.2).all()
