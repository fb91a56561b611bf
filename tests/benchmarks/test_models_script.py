"""benchmarks/models.py on tiny configs of the five families (CPU, reference kernel, no compile): every variant
builds, quantizes and runs, and the quantized outputs stay near bf16."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def test_models_tiny_every_family_and_variant():
    import models

    rows = models.main(["--tiny", "--no-compile"])
    assert [r["model"] for r in rows] == list(models.FAMILIES)
    for r in rows:
        assert r["blocks"] > 0
        for name in models.VARIANTS:
            v = r["variants"][name]
            assert "error" not in v, (r["model"], name, v)
            assert v["finite"] and v["weight_bytes"] > 0
            # random weights: fp8 stays within a few %, W4A4 with a random branch within 50% of bf16's output
            w4a4 = name.startswith(("fourbit-w4a4", "fourbit-mixed"))  # the mix is W4A4 where 4 bits pay
            assert v["rel_diff_vs_bf16"] < (0.5 if w4a4 else 0.06), (r["model"], name, v)
        assert r["variants"]["fourbit-fp8"]["quantized_layers"] > 0
        for name in ("fourbit-w4a4", "fourbit-w4a4-inline", "fourbit-fp8-inline"):
            assert r["variants"][name]["quantized_layers"] == r["variants"]["fourbit-fp8"]["quantized_layers"]
        assert r["variants"]["fourbit-w4a4-inline"]["act_quant"] == "inline"
        assert r["variants"]["fourbit-w4a4"]["act_quant"] == "pass"
        assert r["variants"]["fourbit-w4a4-given-planned"]["act_quant"] == "given"
        assert r["variants"]["fourbit-w4a4-cublas"]["gemm"] == "cublas"
        assert r["variants"]["fourbit-w4a4"]["gemm"] == "triton"
        planned = r["variants"]["fourbit-w4a4-cublas-planned"]
        assert planned["gemm"] == "cublas" and r["variants"]["fourbit-w4a4-planned"]["gemm"] == "triton"
        # the smoke test keeps every timed layer in 4 bits (the reference kernel is slower than bf16 on a CPU)
        assert planned["plan_counts"] == {"config": sum(sh["layers"] for sh in planned["plan_shapes"])}
        assert planned["quantized_layers"] == r["variants"]["fourbit-fp8"]["quantized_layers"]
        assert r["variants"]["fourbit-fp8-planned"]["plan_counts"] == planned["plan_counts"]
        assert r["variants"]["bf16-siblings"]["sibling_groups"] == r["variants"]["fourbit-fp8"]["sibling_groups"]
        assert r["variants"]["bf16-siblings"]["rel_diff_vs_bf16"] < 1e-2  # fusion is exact up to GEMM rounding
        assert all(sh["ms"]["16-bit"] > 0 and sh["ms"]["config"] > 0 for sh in planned["plan_shapes"])


def test_models_budget_skips_later_variants_and_keeps_the_first():
    import models

    rows = models.main(["--tiny", "--no-compile", "--models", "pixart-sigma", "--variants", "bf16,fourbit-fp8",
                        "--budget", "0"])
    v = rows[0]["variants"]
    assert v["bf16"]["finite"] and "skipped" not in v["bf16"]
    assert v["fourbit-fp8"]["skipped"].startswith("budget:") and "weight_bytes" not in v["fourbit-fp8"]


def test_a_plan_that_keeps_every_layer_is_reported_not_timed_twice(monkeypatch):
    """Where no layer pays in 4 bits the planned model is the bf16-siblings one: the variant says so and is not
    compiled or timed again."""
    import models

    import fourbit

    real = fourbit.plan_precision

    def bf16_always_faster(model, config, loop, **kw):
        kw["timer"] = lambda variants: {label: 1.0 if label == "16-bit" else 2.0 for label in variants}
        kw["min_speedup"] = 1.0  # (the smoke test's own is ~0: it keeps every layer in 4 bits)
        return real(model, config, loop, **kw)

    monkeypatch.setattr(fourbit, "plan_precision", bf16_always_faster)
    rows = models.main(["--tiny", "--no-compile", "--models", "pixart-sigma", "--variants",
                        "bf16,fourbit-w4a4-planned"])
    v = rows[0]["variants"]["fourbit-w4a4-planned"]
    assert v["quantized_layers"] == 0 and v["skipped"].startswith("the plan kept every layer 16-bit")
    assert set(v["plan_counts"]) == {"16-bit"} and "weight_bytes" not in v


def test_mixed_plan_falls_back_to_fp8_without_a_branch(monkeypatch):
    """fourbit-mixed-planned: where W4A4 does not pay and fp8 does, the layer is fp8 W8A8 with no (synthetic) branch."""
    import models

    import fourbit

    real = fourbit.plan_precision

    def fp8_pays(model, config, loop, **kw):
        kw["timer"] = lambda variants: {label: {"16-bit": 1.0, "config": 2.0}.get(label, 0.5) for label in variants}
        kw["min_speedup"] = 1.0
        return real(model, config, loop, **kw)

    branched = []
    add = models.add_synthetic_branch

    def counting(model, rank, only=None, **kw):
        from fourbit.nn import quantized_layers
        branched.extend(name for name, layer in quantized_layers(model) if only is None or only(layer))
        return add(model, rank, only=only, **kw)

    monkeypatch.setattr(fourbit, "plan_precision", fp8_pays)
    monkeypatch.setattr(models, "add_synthetic_branch", counting)
    rows = models.main(["--tiny", "--no-compile", "--models", "pixart-sigma", "--variants",
                        "bf16,fourbit-mixed-planned"])
    v = rows[0]["variants"]["fourbit-mixed-planned"]
    assert "error" not in v and v["finite"], v
    assert v["plan_counts"] == {"weights=fp8, activations=fp8, rank=0": v["quantized_layers"]} and v["quantized_layers"] > 0
    assert branched == []  # every layer fell back to fp8: none got the int4p2 branch


def test_mixed_fastest_plan_takes_fp8_where_it_beats_a_paying_w4a4(monkeypatch):
    """fourbit-mixed-fastest-planned: W4A4 pays (0.8 ms vs 1.0) but fp8 is faster (0.5): fp8; the first-that-pays
    variant keeps W4A4 on the same times."""
    import models

    import fourbit

    real = fourbit.plan_precision

    def both_pay(model, config, loop, **kw):
        kw["timer"] = lambda variants: {label: {"16-bit": 1.0, "config": 0.8}.get(label, 0.5) for label in variants}
        kw["min_speedup"] = 1.0
        return real(model, config, loop, **kw)

    monkeypatch.setattr(fourbit, "plan_precision", both_pay)
    rows = models.main(["--tiny", "--no-compile", "--models", "pixart-sigma", "--variants",
                        "bf16,fourbit-mixed-planned,fourbit-mixed-fastest-planned"])
    first, fastest = (rows[0]["variants"][k] for k in ("fourbit-mixed-planned", "fourbit-mixed-fastest-planned"))
    n = fastest["quantized_layers"]
    assert n > 0 and first["plan_counts"] == {"config": n}
    assert fastest["plan_counts"] == {"weights=fp8, activations=fp8, rank=0": n}


def test_a_time_limit_while_building_keeps_the_row(monkeypatch):
    """SIGTERM (the run script's timeout) while a variant builds: the later variants are not built, the row says
    so and is still returned (on the GPU: the variants built so far are timed and the row written)."""
    import models

    def cut(*a, **k):
        raise models.TimeLimit()

    monkeypatch.setattr(models, "fp8_peer", cut)
    (row,) = models.main(["--tiny", "--no-compile", "--models", "pixart-sigma", "--variants",
                          "bf16,fp8-peer,fourbit-fp8"])
    v = row["variants"]
    assert "finite" in v["bf16"] and v["fp8-peer"]["skipped"].startswith("time limit") and "fourbit-fp8" not in v
    assert "fp8-peer" in row["cut"]


def test_models_compiles_through_the_library_call():
    """The compile path (``fourbit.nn.compile_model``, inductor on the CPU, reference kernel): the blocks compiled,
    the quantized step still the model's (a tiny model's W4A4 error, not a broken graph)."""
    import models

    (row,) = models.main(["--tiny", "--models", "pixart-sigma", "--variants", "bf16,fourbit-w4a4"])
    bf16, w4a4 = row["variants"]["bf16"], row["variants"]["fourbit-w4a4"]
    assert bf16["graphs"] >= 1 and w4a4["graphs"] >= 1 and bf16["compile_seconds"] > 0
    assert 0 < w4a4["rel_diff_vs_bf16"] < 0.5


@pytest.fixture
def clock(monkeypatch):
    """A fake GPU clock: ``torch.cuda.Event`` records ``clock["t"]`` (the timed work advances it); synchronize is a
    no-op."""
    clock = {"t": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return clock


def test_uncaptured_calls_are_timed_in_rotation_per_call(clock):
    """``uncaptured``: every model called ``calls`` times between two events, orders rotated, ms per call."""
    import models

    order = []

    def model(name, ms):
        def call(**inputs):
            order.append(name)
            clock["t"] += ms
        return call

    got = models.uncaptured({"bf16": model("bf16", 10.0), "w4a4": model("w4a4", 8.0)}, {}, rounds=3, calls=4,
                            warmup=1)
    assert got == {"bf16": 10.0, "w4a4": 8.0}
    firsts = [order[i] for i in range(0, len(order), 8)]  # each round: 4 calls of one model, then 4 of the other
    assert firsts == ["bf16", "w4a4", "bf16", "w4a4"]
    row = dict(model="m", variants={"bf16": dict(step_ms=10.0, call_ms_uncaptured=12.0, uncaptured_speedup_vs_bf16=1.0),
                                    "w4a4": dict(step_ms=8.0, call_ms_uncaptured=10.0,
                                                 uncaptured_speedup_vs_bf16=1.2)})
    assert "| 10.00 (1.20x) |" in models.table([row])


def test_alternated_rounds_give_the_ratio_spread(clock):
    """``alternate(samples=)`` keeps each round's ms; ``round_ratios`` pairs them round by round with bf16 (10th
    percentile, median, 90th percentile) and the table shows the spread beside the ratio of the medians."""
    import models

    class FakeGraph:
        def __init__(self, times):
            self.times = iter(times)

        def replay(self):
            clock["t"] += next(self.times)

    bf16 = [9.0] + [10.0] * 10  # one warm-up round, then ten timed
    w4a4 = [9.0] + [8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 10.0, 5.0]  # ratios 1.25 x 8, 1.0, 2.0
    samples = {}
    got = models.alternate({"bf16": (FakeGraph(bf16), 1), "w4a4": (FakeGraph(w4a4), 1)}, rounds=10, warmup=1,
                           samples=samples)
    assert got == {"bf16": 10.0, "w4a4": 8.0}
    assert samples["w4a4"] == w4a4[1:]
    spread = models.round_ratios(samples)
    assert spread["bf16"] == [1.0, 1.0, 1.0]
    assert spread["w4a4"] == [1.25, 1.25, 1.25]  # the outliers sit beyond the 10th / 90th percentiles
    samples["w4a4"][2:4] = [10.0, 10.0]  # three rounds at 1.0: the 10th percentile moves, the median does not
    assert models.round_ratios(samples)["w4a4"] == [1.0, 1.25, 1.25]
    assert models.round_ratios({"w4a4": [1.0]}) == {}  # no bf16: no ratio
    row = dict(model="m", variants={"bf16": dict(step_ms=10.0, speedup_vs_bf16_rounds=[1.0, 1.0, 1.0]),
                                    "w4a4": dict(step_ms=8.0, speedup_vs_bf16_rounds=[1.2, 1.25, 1.3])})
    md = models.table([row])
    assert "| m | w4a4 | 8.00 | 1.25x (1.20-1.30) |" in md
    assert "| m | bf16 | 10.00 | 1.00x |" in md


def test_front_door_times_graph_forward_and_releases_it(monkeypatch):
    """``front_door``: each model's forward under ``graph_forward`` while timed (what compile_pipeline leaves on
    CUDA), the module's own forward again afterwards; its ratio in the table."""
    import models
    from fourbit.nn import cuda_graph

    wrapped = []

    def fake_uncaptured(ms, inputs, rounds, calls=4, warmup=2):
        wrapped.extend(isinstance(getattr(m, cuda_graph._ATTR, None), cuda_graph.GraphForward) for m in ms.values())
        return {"bf16": 10.0, "w4a4": 8.0}

    host_wrapped = []

    def fake_host(m, inputs, calls=8):
        host_wrapped.append(isinstance(getattr(m, cuda_graph._ATTR, None), cuda_graph.GraphForward))
        return 0.1

    monkeypatch.setattr(models, "uncaptured", fake_uncaptured)
    monkeypatch.setattr(models, "host_ms_per_call", fake_host)
    ms = {"bf16": torch.nn.Linear(2, 2), "w4a4": torch.nn.Linear(2, 2)}
    assert models.front_door(ms, {}, rounds=2) == ({"bf16": 10.0, "w4a4": 8.0}, {"bf16": 0.1, "w4a4": 0.1})
    assert wrapped == [True, True] and host_wrapped == [True, True]
    assert all(not hasattr(m, cuda_graph._ATTR) and "forward" not in vars(m) for m in ms.values())
    row = dict(model="m", variants={"bf16": dict(step_ms=10.0, call_ms_front_door=10.5, front_door_speedup_vs_bf16=1.0),
                                    "w4a4": dict(step_ms=8.0, call_ms_front_door=8.4,
                                                 front_door_speedup_vs_bf16=1.25)})
    md = models.table([row])
    assert "graph_forward ms (vs bf16)" in md and "| 8.40 (1.25x) |" in md


def test_table_gives_both_baselines_and_the_solo_ratio():
    """The acceptance's two baselines in every row: bf16 and the FP8 peer (alternated), and bf16 solo."""
    import models

    row = dict(model="m", variants={"bf16": dict(step_ms=12.0, step_ms_solo=12.0),
                                    "fp8-peer": dict(step_ms=10.0, step_ms_solo=11.0),
                                    "fourbit-w4a4-planned": dict(step_ms=8.0, step_ms_solo=10.0),
                                    "fourbit-fp8": dict(skipped="budget")})
    md = models.table([row])
    assert "| vs bf16 | vs FP8 peer | solo vs bf16 |" in md
    assert "| m | fourbit-w4a4-planned | 8.00 | 1.50x | 1.25x | 1.20x |" in md
    assert "| m | fp8-peer | 10.00 | 1.20x | 1.00x | 1.09x |" in md
    assert "| m | fourbit-fp8 | - | - | - | - |" in md


def test_table_without_a_peer_leaves_its_column_empty():
    import models

    md = models.table([dict(model="m", variants={"bf16": dict(step_ms=12.0), "w": dict(step_ms=6.0)})])
    assert "| m | w | 6.00 | 2.00x | - | - |" in md
