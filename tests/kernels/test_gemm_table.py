"""``kernels/gemm_table``: the shape table's lookup (bucket edges, first match, device class, operand kind, the
rule as fallback, overrides first, the per-shape cache), config keys, and the launcher consulting the table.

That every config a row may name computes the twin's result: ``test_gemm.py::test_every_config_the_table_can_name_
matches_twin``.
"""
from __future__ import annotations

import re

import pytest
import torch

from .kernel_helpers import gemm_operands

FP8 = torch.float8_e4m3fn


def _row(config="64x128x128-g8-w4-s4-tma", device="sm90", operands="fp8", m=(256, 1024), n=(0, 1 << 30),
         k=(0, 1 << 30)):
    from fourbit.kernels.gemm_table import Row

    return Row(device, operands, m, n, k, config, "test row")


@pytest.fixture
def table(monkeypatch):
    """Replace ``gemm_table.TABLE`` for one test: ``table(rows)``."""
    from fourbit.kernels import gemm_table

    return lambda rows: monkeypatch.setattr(gemm_table, "TABLE", tuple(rows))


def test_bucket_edges_are_low_exclusive_high_inclusive(table):
    from fourbit.kernels import gemm_table as gt

    table([_row(m=(256, 1024), n=(1024, 2048), k=(0, 4096))])
    assert gt.lookup(257, 2048, 4096, "fp8", "sm90") == "64x128x128-g8-w4-s4-tma"
    assert gt.lookup(1024, 1025, 1, "fp8", "sm90") is not None
    for m, n, k in ((256, 2048, 4096), (1025, 2048, 4096), (512, 1024, 4096), (512, 2049, 4096), (512, 2048, 4097)):
        assert gt.lookup(m, n, k, "fp8", "sm90") is None, (m, n, k)
    assert gt.cell(256, gt.M_EDGES) == (16, 256) and gt.cell(257, gt.M_EDGES) == (256, 1024)
    with pytest.raises(ValueError, match="outside the bucket edges"):
        gt.cell(0, gt.M_EDGES)


def test_first_matching_row_wins_and_keys_are_per_device_class_and_operands(table):
    from fourbit.kernels import gemm_table as gt

    table([_row("128x128x128-g8-w8-s4-p-tma", m=(512, 1024)), _row("64x128x128-g8-w4-s4-tma", m=(0, 1 << 30)),
           _row("128x64x128-g8-w4-s3-p-tma", operands="int8", m=(0, 1 << 30))])
    assert gt.lookup(600, 4096, 4096, "fp8", "sm90") == "128x128x128-g8-w8-s4-p-tma"
    assert gt.lookup(2048, 4096, 4096, "fp8", "sm90") == "64x128x128-g8-w4-s4-tma"
    assert gt.lookup(600, 4096, 4096, "int8", "sm90") == "128x64x128-g8-w4-s3-p-tma"
    assert gt.lookup(600, 4096, 4096, "16", "sm90") is None
    assert gt.lookup(600, 4096, 4096, "fp8", "sm100") is None and gt.lookup(600, 4096, 4096, "fp8", "cpu") is None


def test_default_config_takes_the_row_else_the_rule_and_overrides_first(table):
    import dataclasses

    from fourbit.kernels import gemm as gm

    rule = gm.rule_config(600, 4096, 4096, FP8)
    table([])
    assert gm.default_config(600, 4096, 4096, FP8) == rule
    table([_row("128x128x128-g8-w8-s4-p-tma-split", m=(512, 1024))])
    want = gm.GemmConfig(128, 128, 128, 8, 8, 4, True, tma_store=True, split_k=True)
    assert gm.default_config(600, 4096, 4096, FP8) == want
    assert gm.default_config(600, 4096, 4096, FP8, device="sm89") == rule  # another device class: the rule
    assert gm.default_config(600, 4096, 4096, torch.int8) == gm.rule_config(600, 4096, 4096, torch.int8)
    assert gm.default_config(600, 4096, 4096, FP8, sms=4) == want  # rows are per device class, not SM count
    with gm.default_configs(FP8, lambda c: dataclasses.replace(c, precise=True)):
        assert gm.default_config(600, 4096, 4096, FP8).precise  # an override beats the table
    assert gm.default_config(600, 4096, 4096, FP8) == want


def test_lookup_is_cached_per_shape_and_follows_a_replaced_table(table):
    from fourbit.kernels import gemm_table as gt

    table([_row("64x64x128-g8-w4-s3-tma", m=(0, 1 << 30))])
    assert gt.lookup(8, 8, 8, "fp8", "sm90") == "64x64x128-g8-w4-s3-tma"
    assert (8, 8, 8, "fp8", "sm90") in gt._CACHE
    table([_row("64x128x128-g8-w4-s3-tma", m=(0, 1 << 30))])
    assert gt.lookup(8, 8, 8, "fp8", "sm90") == "64x128x128-g8-w4-s3-tma"
    table([])
    assert gt.lookup(8, 8, 8, "fp8", "sm90") is None


def test_config_keys_round_trip_and_bad_keys_say_how_to_write_them():
    from fourbit.kernels import gemm as gm
    from fourbit.kernels.gemm_table import GemmConfig, candidates, schedules

    configs = [c for cfg in candidates() for c in [cfg] + schedules(cfg)]
    configs += [gm.FEW_TILES, GemmConfig(precise=True, flatten=True)]
    for cfg in configs:
        assert GemmConfig.from_key(cfg.key()) == cfg
    with pytest.raises(ValueError, match="does not start like"):
        GemmConfig.from_key("128x256-g8-w8-s3")
    with pytest.raises(ValueError, match="unknown parts"):
        GemmConfig.from_key("128x256x128-g8-w8-s3-p-fast")
    with pytest.raises(ValueError, match="key\\(\\) order"):
        GemmConfig.from_key("128x256x128-g8-w8-s3-tma-p")


def test_candidates_hold_the_rule_configs_and_fit_shared_memory():
    """The sweep times the rule's own configs (the fallback is a candidate like the others), and none whose
    pipeline and store tile exceed sm90's 227 KiB (128 x 256 at 4 stages: 256 KiB)."""
    import dataclasses

    from fourbit.kernels import gemm as gm
    from fourbit.kernels import gemm_table as gt

    keys = {c.key() for cfg in gt.candidates() for c in [cfg] + gt.schedules(cfg)}
    for dtype in (FP8, torch.int8):
        for m, n, k in ((1, 3072, 3072), (4608, 3072, 3072), (4608, 3072, 12288), (8192, 8192, 8192)):
            assert gm.rule_config(m, n, k, dtype).key() in keys, (m, n, k, dtype)
    assert all(gt.fits(c) for c in gt.candidates())
    assert not gt.fits(dataclasses.replace(gm.rule_config(4608, 3072, 3072, FP8), num_stages=4))
    assert len(gt.candidates()) == 30 and len(gt.candidates(operand_bytes=2)) < 30


def test_committed_rows_are_valid():
    """Each row of the table: a known device class and operand kind, non-empty ranges, a config from the candidate
    space, and the result row that chose it."""
    from fourbit.kernels import gemm_table as gt

    keys = {c.key() for cfg in gt.candidates() for c in [cfg] + gt.schedules(cfg)}
    for row in gt.TABLE:
        assert re.fullmatch(r"sm\d+", row.device) and row.operands in ("fp8", "int8", "16"), row
        assert all(lo < hi for lo, hi in (row.m, row.n, row.k)), row
        assert row.config in keys and "linear_tune" in row.source, row


@pytest.mark.usefixtures("interpret")
def test_scaled_gemm_consults_the_table_for_its_device_class(table, monkeypatch):
    """Without ``config=``, the launcher runs the config of the row for its device's class ("cpu" under the
    interpreter) and shape, and the rule where no row holds the shape."""
    from fourbit.kernels import gemm as gm

    launched = []
    real = gm.launch_with_fewer_stages
    monkeypatch.setattr(gm, "launch_with_fewer_stages", lambda fn, stages, key: (launched.append(key[0]),
                                                                                   real(fn, stages, key)))
    a, b = gemm_operands(FP8, 40, 48, 128)
    table([_row("64x64x128-g8-w4-s3-p-tma-split", device="cpu", m=(32, 64))])
    got = gm.scaled_gemm(a, b, out_dtype=torch.float32)
    a2, b2 = gemm_operands(FP8, 24, 48, 128)
    gm.scaled_gemm(a2, b2, out_dtype=torch.float32)  # M = 24: no row
    assert launched == ["64x64x128-g8-w4-s3-p-tma-split", gm.rule_config(24, 48, 128, FP8, sms=4).key()]
    assert torch.allclose(got, gm.scaled_gemm_torch(a, b, out_dtype=torch.float32), rtol=1e-6)
