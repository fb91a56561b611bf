"""Validated PTQD: components are kept only where they measurably help, decided on the statistics seeds."""
import copy

import pytest
import torch

from fourbit.ptqd import PTQDHook, PTQDStats, collect_stats, ptqd_hooks, validate_components, validated_components
from fourbit.ptqd.validate import candidate_sets, validation_mode

KW = dict(steps=3, guidance_scale=1.0, model_name="tiny")


def _biased(q, shift: float):
    """A copy of the quantized model whose prediction carries a planted constant bias (final layer, 16-bit)."""
    q = copy.deepcopy(q)
    with torch.no_grad():
        q.final_layer.linear.bias.add_(shift)
    return q


def test_candidates_cover_vsc_only_when_noise_is_injected():
    assert candidate_sets(False) == ["none", "bias", "correlated+bias"]
    assert candidate_sets(True)[-1] == "correlated+bias+vsc"


def test_planted_bias_is_corrected_and_kept(tiny_pair):
    fp, q = tiny_pair
    qb = _biased(q, 0.5)
    stats = collect_stats(fp, qb, num_samples=12, **KW)
    assert min(m[0] for m in stats.formats[stats.base].mu) > 0.3  # the statistics see the planted bias
    d = validate_components(fp, qb, stats, batch_size=12)
    assert d["chosen"] in ("bias", "correlated+bias") and d["components"]["bias"]
    assert d["candidates"][d["chosen"]]["diff"] < 0
    assert validated_components(stats, stats.base) == d["components"]
    # the decision travels with the statistics (checkpoint header) ...
    again = PTQDStats.from_dict(stats.to_dict())
    assert validated_components(again, again.base) == d["components"]
    # ... and ptqd_hooks applies it
    hook = ptqd_hooks(stats, q_model=qb, components="auto")[0]
    assert (hook.correlated, hook.bias) == (d["components"]["correlated"], True)


def test_harmful_correction_is_dropped(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, num_samples=12, **KW)
    fs = stats.formats[stats.base]
    fs.mu = [[3.0] for _ in fs.mu]  # a bias correction that wrecks every sample
    fs.k = [2.0 for _ in fs.k]
    d = validate_components(fp, q, stats, batch_size=12)
    assert d["chosen"] == "none" and not any(d["components"].values())
    assert d["candidates"]["bias"]["diff"] > 0 and d["candidates"]["correlated+bias"]["diff"] > 0
    hook = ptqd_hooks(stats, q_model=q)[0]
    assert not (hook.correlated or hook.bias or hook.variance)


def test_components_option(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, num_samples=2, **KW)
    with pytest.raises(ValueError, match="no validation"):
        ptqd_hooks(stats, components="validated")
    paper = ptqd_hooks(stats, components="auto")[0]  # nothing validated yet: the paper's full PTQD
    assert (paper.correlated, paper.bias, paper.variance) == (True, True, True)
    assert isinstance(ptqd_hooks(stats, components={"correlated": False, "bias": True, "variance": False})[0],
                      PTQDHook)
    with pytest.raises(ValueError, match="components must be"):
        ptqd_hooks(stats, components="some")
    assert validation_mode(None, stats) == stats.base and validation_mode("auto", stats) == "auto"
    assert validation_mode([stats.base] * 3, stats) == stats.base
