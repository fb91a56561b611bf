"""Persistence: statistics travel in the checkpoint header, keyed by setting; other settings are refused."""
import copy

import pytest

import fourbit
from fourbit.models import build_model, get_spec
from fourbit.ptqd import (PTQDSetting, PTQDStatsMismatch, attach_stats, collect_stats, find_stats, make_setting,
                          quant_digest, stored_settings)


def test_setting_key_and_differences():
    a = PTQDSetting("fashion-dit", "abc", "ddim", 50, 3.0, 0.0)
    b = PTQDSetting("fashion-dit", "abc", "ddim", 20, 3.0, 1.0)
    assert a.key == "fashion-dit|abc|ddim|steps=50|guidance=3|eta=0"
    diff = a.differences(b)
    assert len(diff) == 2 and diff[0].startswith("steps: 50") and diff[1].startswith("eta: 0.0")
    assert PTQDSetting("m", "q", "ddpm", 10, 1.0, 0.0).eta == 1.0  # DDPM is always eta = 1


def test_stats_round_trip_through_a_checkpoint_and_refusals(tiny_pair, tmp_path):
    fp, q0 = tiny_pair
    q = copy.deepcopy(q0)
    q.fourbit_header = copy.deepcopy(q0.fourbit_header)
    eta0 = collect_stats(fp, q, steps=2, eta=0.0, num_samples=2, act_formats=["int4", "int8"], model_name="tiny")
    eta1 = collect_stats(fp, q, steps=2, eta=1.0, num_samples=2, model_name="tiny")
    attach_stats(q, eta0)
    attach_stats(q, eta1)
    path = fourbit.save(q, tmp_path / "q.safetensors")

    header = fourbit.read_header(path)
    assert {s.key for s in stored_settings(header)} == {eta0.setting.key, eta1.setting.key}
    loaded = fourbit.load(build_model("fashion-dit", width=64, depth=1, num_heads=2, device="meta"), path)
    assert quant_digest(loaded) == quant_digest(q)
    back = find_stats(loaded, make_setting("tiny", loaded, "ddim", 2, 3.0, 0.0))
    assert back.to_dict() == eta0.to_dict() and back.schedule == eta0.schedule

    for setting, field in [(make_setting("tiny", loaded, "ddim", 3, 3.0, 0.0), "steps"),
                           (make_setting("tiny", loaded, "ddim", 2, 2.0, 0.0), "guidance_scale"),
                           (make_setting("tiny", loaded, "ddpm", 2, 3.0, 0.0), "sampler"),
                           (make_setting("other", loaded, "ddim", 2, 3.0, 0.0), "model")]:
        with pytest.raises(PTQDStatsMismatch, match=field):
            find_stats(header, setting)


def test_statistics_of_another_quantization_are_refused(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, steps=2, num_samples=2, model_name="tiny")
    other = copy.deepcopy(fp)
    fourbit.quantize(other, fourbit.RTNConfig(activations="int8", exclude=get_spec("fashion-dit").quant_exclude),
                     progress=False, verbose=False)
    assert quant_digest(other) != quant_digest(q)
    with pytest.raises(PTQDStatsMismatch, match="belong to quantized model"):
        attach_stats(other, stats)
    with pytest.raises(PTQDStatsMismatch, match="no PTQD statistics are stored"):
        find_stats(other, stats.setting)
