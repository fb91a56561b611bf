"""Step-aware mixed precision: the schedule rule, the per-step switch, and BOPs accounting."""
import copy

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import quantized_layers
from fourbit.ptqd import BOPCounter, FormatStats, PTQDHook, PTQDSetting, PTQDStats, choose_schedule, collect_stats
from fourbit.sampling import StepInfo, sample, sample_plan


def _fs(label, bits, snr_q):
    n = len(snr_q)
    return FormatStats(label, None, bits, [0.0] * n, [0.0] * n, [[0.0]] * n, [0.0] * n, list(snr_q), [0.0] * n)


def _stats(alpha_bar, a4, a8):
    return PTQDStats(PTQDSetting("m", "q", "ddim", len(alpha_bar), 3.0, 0.0), list(range(len(alpha_bar))),
                     list(alpha_bar), {"int8": _fs("int8", 8, a8), "int4": _fs("int4", 4, a4)}, base="int4")


def test_schedule_uses_the_smallest_width_whose_snr_beats_the_schedule():
    # SNR_F = ab / (1 - ab): 0.0101, 0.25, 1.5, 9, 99
    ab = [0.01, 0.2, 0.6, 0.9, 0.99]
    stats = _stats(ab, a4=[5.0, 5.0, 5.0, 5.0, 5.0], a8=[20.0, 20.0, 20.0, 20.0, 20.0])
    assert choose_schedule(stats) == ["int4", "int4", "int4", "int8", "int8"]  # the last: none beats 99 -> largest
    assert choose_schedule(stats, squared=True) == ["int4", "int4", "int4", "int4", "int8"]
    assert stats.snr_f[1] == pytest.approx(0.25)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.fc(x))


def test_bop_counter_counts_macs_times_bits():
    m = _Two()
    fourbit.quantize(m, fourbit.RTNConfig(exclude=("head", "conv")), progress=False, verbose=False)
    counter = BOPCounter()
    step = StepInfo(0, 1, 0, -1, 0.9, 1.0, 0.1, 0.0, 0.0, "ddim", 1.0)
    counter.before_step(step, m)
    m(torch.randn(5, 64))
    m.conv(torch.randn(5, 2, 6, 6))
    counter.on_eps(step, torch.zeros(5, 1), None)
    fc, head, conv = 5 * 64 * 32, 5 * 32 * 8, 5 * 4 * 6 * 6 * 2 * 9
    assert counter.bops == fc * 4 * 4 + (head + conv) * 256
    assert counter.bops_if(8) == fc * 4 * 8 + (head + conv) * 256
    r = counter.result()
    assert r["images"] == 5 and r["bops_vs_all_a4"] == 1.0 and 0 < r["bops_vs_all_a8"] < 1
    assert not m.fc._forward_hooks  # removed after the step


def test_mixed_hook_switches_per_step_and_restores(tiny_pair):
    fp, q0 = tiny_pair
    q = copy.deepcopy(q0)
    stats = collect_stats(fp, q, steps=3, num_samples=2, act_formats=["int4", "int8"], model_name="tiny")
    schedule = ["int4", "int8", "int4"]
    seen = []
    layer = next(l for _, l in quantized_layers(q))
    layer.register_forward_hook(lambda mod, i, o: seen.append(mod.act_format.name))
    counter = BOPCounter()
    classes, seeds = sample_plan(2, 0)
    sample(q, classes, seeds, steps=3, guidance_scale=3.0, hooks=[PTQDHook(stats, schedule=schedule), counter])
    assert seen == schedule
    assert all(l.act_format.name == "int4" for _, l in quantized_layers(q))  # switched back
    assert counter.bops_if(4) < counter.bops < counter.bops_if(8)
    with pytest.raises(KeyError, match="measured: int4, int8"):
        PTQDHook(stats, schedule=["int4", "fp4", "int4"])
