"""benchmarks/gemm_tune.py's CPU parts: which configs it times at a shape, the table rows it derives from timings
(cells, the rule as the bar, variants only where they took effect), the printed rows as valid ``gemm_table`` code,
and the few-row / act_quant threshold recommendations. (The timing itself needs a GPU.)"""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

FP8_SMS = 132


@pytest.fixture(scope="module")
def tune():
    import gemm_tune

    return gemm_tune


def test_shape_configs_alias_variants_that_do_not_take_effect(tune):
    from fourbit.kernels import gemm as gm

    # PixArt's adaLN at 2 rows: 64-row tiles only, at most 108 tiles < 132 SMs: split-K variants timed, stream-K
    # ones aliased
    configs, aliases = tune.shape_configs(2, 6912, 1152, FP8_SMS, "sm90")
    keys = {c.key() for c in configs}
    assert all(c.BM == 64 for c in configs)
    assert any(c.split_k for c in configs) and not any(c.stream_k for c in configs)
    assert all(a.endswith("-sk") and t in keys for a, t in aliases.items())
    # 8192 x 640 x 640 (SDXL): 128 x 256 tiles 64 x 3 = 192 > 132: the stream-K tail is timed, split-K aliased
    configs, aliases = tune.shape_configs(8192, 640, 640, FP8_SMS, "sm90")
    assert "128x256x128-g8-w8-s3-p-tma-sk" in {c.key() for c in configs}
    assert aliases["128x256x128-g8-w8-s3-p-tma-split"] == "128x256x128-g8-w8-s3-p-tma"
    assert gm.rule_config(8192, 640, 640, tune.FP8).key() in {c.key() for c in configs}


def _result(m, k, n, ms, rule, alias=None):
    return dict(operands="fp8", family="f", M=m, K=k, N=n, bf16_ms=1.0, ms=ms, alias=alias or {}, errors={},
                default=rule, rule=rule)


def test_derive_rows_per_cell_against_the_rule(tune):
    from fourbit.kernels import gemm_table as gt

    rule, a, b = "128x256x128-g8-w8-s3-p-tma", "128x128x128-g8-w8-s4-p-tma", "64x128x128-g8-w4-s4-p-tma"
    results = [
        # one cell (M 2048, N (2048, 4096], K (0, 2048]): a wins at both shapes by 10% -> a row
        _result(2048, 1280, 3840, {rule: 1.1, a: 1.0, b: 1.2}, rule),
        _result(2048, 2048, 3000, {rule: 2.2, a: 2.0, b: 1.9}, rule),
        # another cell: b is 2% faster only -> no row (below --min-gain 3%)
        _result(8192, 640, 640, {rule: 1.02, a: 1.1, b: 1.0}, rule),
        # a cell where the fastest (b) was not timed at one of its shapes -> a, timed at both
        _result(154, 2048, 1280, {rule: 1.0, a: 0.8, b: 0.5}, rule),
        _result(154, 2048, 1920, {rule: 1.0, a: 0.8}, rule),
    ]
    rows = tune.derive_rows(results, "sm90", "2026-12-06", 0.03)
    assert [(r["m"], r["n"], r["k"], r["config"]) for r in rows] == [
        ((16, 256), (1024, 2048), (0, 2048), a), ((1024, 2048), (2048, 4096), (0, 2048), a)]
    assert rows[1]["gain"] == pytest.approx((1.1 * 2.2) ** 0.5 / 2 ** 0.5)
    assert "linear_tune 2026-12-06" in rows[1]["source"] and "2048x1280x3840" in rows[1]["source"]
    namespace = {"Row": gt.Row}
    exec("TABLE = (\n" + "\n".join(tune.row_code(r) for r in rows) + "\n)", namespace)
    table = namespace["TABLE"]
    assert [t.config for t in table] == [r["config"] for r in rows]
    assert table[1].holds(2048, 3840, 1280, "fp8", "sm90") and not table[1].holds(2049, 3840, 1280, "fp8", "sm90")


def test_derive_rows_counts_a_variant_only_where_it_took_effect(tune):
    plain, split = "64x128x128-g8-w4-s4-p-tma", "64x128x128-g8-w4-s4-p-tma-split"
    rule = "64x128x128-g8-w4-s4-tma"
    # the split variant aliased to its plain config at both shapes: never a row of its own, however the noise falls
    res = [_result(2, 1536, 9216, {rule: 2.0, plain: 1.0}, rule, {split: plain}),
           _result(2, 1536, 9216 + 16, {rule: 2.0, plain: 1.0}, rule, {split: plain})]
    assert [r["config"] for r in tune.derive_rows(res, "sm90", "r", 0.03)] == [plain]
    # timed at one shape (it took effect there), aliased at the other: eligible, its plain time stands in
    res[0]["ms"][split] = 0.5
    assert [r["config"] for r in tune.derive_rows(res, "sm90", "r", 0.03)] == [split]


def test_recommendations(tune):
    gemv = [dict(M=1, gemv_ms=1.0, gemm_ms=2.0), dict(M=1, gemv_ms=1.0, gemm_ms=1.5),
            dict(M=2, gemv_ms=1.0, gemm_ms=1.1), dict(M=2, gemv_ms=1.2, gemm_ms=1.1),
            dict(M=4, gemv_ms=1.0, gemm_ms=3.0)]
    assert tune.recommend_max_m(gemv) == 1  # M = 2 lost at one shape; M = 4 is not taken past that
    assert tune.recommend_max_m(gemv[2:]) == 0

    def act(m, k, two, mm, side):
        return {"M": m, "K": k, "two_ms": two, "single+mm_ms": mm, "single+mm-side_ms": side}

    rows = [act(8192, 1152, 2.0, 1.0, 0.9), act(8192, 4608, 2.0, 1.0, 1.1), act(2048, 2240, 1.0, 0.9, 0.8),
            act(600, 1152, 1.0, 1.2, 1.1), act(154, 2048, 1.0, 0.5, 0.5)]
    assert tune.recommend_act(rows) == dict(lr_mm_rows=2048, lr_mm_stream_max_k=2240)
    assert tune.recommend_act([act(600, 1152, 1.0, 1.2, 1.1)]) == dict(lr_mm_rows=0, lr_mm_stream_max_k=0)


def test_compile_groups_one_per_kernel(tune):
    """Launches are grouped by the kernel they compile (tiles, warps, stages): persistence and split-K only change
    the grid, so a config and its variants share a worker (no kernel compiled twice in parallel)."""
    shapes = ((2, 1152, 6912), (8192, 640, 640))
    plans = {(ops, "f", (m, k, n)): tune.shape_configs(m, n, k, FP8_SMS, "sm90", dtype=tune.OPERANDS[ops])
             for ops in ("fp8", "int8") for m, k, n in shapes}
    groups = tune.compile_groups(plans)
    for g in groups:
        assert len({(ops, key.split("-p")[0].split("-tma")[0]) for ops, key, _ in g}) == 1, g
    assert sum(len(g) for g in groups) == sum(len(c) for c, _ in plans.values())
    assert not any(c.split_k or c.stream_k for c in plans["int8", "f", shapes[0]][0])  # int8: data-parallel only
    assert len(groups) == 2 * 15  # operands x (TILES x STAGES that fit: 8 x 2 - 1)


def test_report_renders(tune):
    rule, a = "128x256x128-g8-w8-s3-p-tma", "128x128x128-g8-w8-s4-p-tma"
    results = [_result(2048, 1280, 3840, {rule: 1.1, a: 1.0}, rule),
               _result(2048, 2048, 3000, {rule: 2.2, a: 2.0}, rule)]
    rows = tune.derive_rows(results, "sm90", "r", 0.03)
    gemv = [dict(family="f", M=1, K=3072, N=9216, gemv_ms=1.0, gemm_ms=2.0, bf16_ms=1.5)]
    act = [{"family": "f", "M": 8192, "K": 1152, "two_ms": 2.0, "single+mm_ms": 1.0, "single+mm-side_ms": 0.9}]
    md = tune.markdown(results, rows, gemv, act, {"GemvConfig.max_m": 1})
    assert "| fp8 | f | 2048x1280x3840 | 1 | 1.1 | 128x256x128-g8-w8-s3-p-tma | 1 | 128x128x128-g8-w8-s4-p-tma" in md
    assert tune.row_code(rows[0]) in md and "GemvConfig.max_m" in md and "| f | 8192x1152 | 2 | 1 | 0.9 |" in md
