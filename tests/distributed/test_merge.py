"""Calibration statistics merged across processes equal those of one process seeing every batch, exactly."""
import pytest
import torch

import fourbit
from fourbit.calibration import calibrate, merge_partials, select_targets
from fourbit.calibration.observers import ActivationObserver, row_keys

from ..helpers import TinyNet, loop_over, tiny_batches


class TwoRanks:
    """A stand-in collective for rank 0 of 2: rank 1's shares were recorded beforehand, layer by layer."""

    world_size = 2

    def __init__(self, other=None):
        self.other = other  # rank 1's shares in gather order (None: record this run's shares instead)
        self.sent = []

    def gather(self, obj, what=""):
        self.sent.append(obj)
        return [obj, self.other[len(self.sent) - 1]] if self.other is not None else [obj]


def _equal(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].absmax, b[name].absmax), name
        assert torch.equal(a[name].rows, b[name].rows), name
        assert (a[name].rows_seen, a[name].calls) == (b[name].rows_seen, b[name].calls), name


@pytest.mark.parametrize("max_rows", [7, 100_000])  # a sample smaller than the rows seen, and every row
def test_two_shards_merge_to_the_single_process_statistics(max_rows):
    model = TinyNet()
    targets, _ = select_targets(model, fourbit.SVDQuantConfig())
    batches = tiny_batches(5)
    single = calibrate(model, targets, loop_over(batches), max_rows=max_rows, seed=3)
    rank1 = TwoRanks()
    calibrate(model, targets, loop_over(batches[1::2]), max_rows=max_rows, seed=3, collective=rank1)
    merged = calibrate(model, targets, loop_over(batches[0::2]), max_rows=max_rows, seed=3,
                       collective=TwoRanks(rank1.sent))
    _equal(single, merged)
    assert merged["fc"].rows_seen == 20 and merged["fc"].calls == 5


def test_the_row_sample_ignores_call_order_and_batching():
    model = TinyNet()
    targets, _ = select_targets(model, fourbit.SVDQuantConfig())
    batches = tiny_batches(4)
    a = calibrate(model, targets, loop_over(batches), max_rows=9, seed=1)
    _equal(a, calibrate(model, targets, loop_over(batches[::-1]), max_rows=9, seed=1))  # other call order
    # other batch sizes: the first layer's input rows (im2col of the inputs) are the same bits, so the same sample;
    # deeper layers' rows may round differently in another GEMM shape, hence the fixed batches of fourbit.distributed
    rebatched = list(torch.cat(batches[::-1]).split(3))
    b = calibrate(model, targets, loop_over(rebatched), max_rows=9, seed=1)
    assert torch.equal(a["conv"].rows, b["conv"].rows) and torch.equal(a["conv"].absmax, b["conv"].absmax)
    c = calibrate(model, targets, loop_over(batches), max_rows=9, seed=2)
    assert not torch.equal(a["fc"].rows, c["fc"].rows)  # the seed picks another sample


def test_a_rank_that_saw_no_batch_contributes_nothing():
    model = TinyNet()
    targets, _ = select_targets(model, fourbit.SVDQuantConfig())
    batches = tiny_batches(2)
    single = calibrate(model, targets, loop_over(batches), max_rows=5, seed=0)
    idle = [ActivationObserver(t.name, t.module, 5, i, [0]).partial() for i, t in enumerate(targets)]  # no batch
    assert all(p.calls == 0 and p.absmax is None and p.rows is None for p in idle)
    _equal(single, calibrate(model, targets, loop_over(batches), max_rows=5, seed=0, collective=TwoRanks(idle)))
    with pytest.raises(fourbit.calibration.CalibrationError, match="never called"):
        merge_partials("fc", idle[:1] * 2, 5)


def test_row_keys_are_a_function_of_the_row_bits():
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randint(0, 2**62, (16,), generator=g, dtype=torch.int64) * 2 + 1
    rows = torch.randn(50, 16, generator=g)
    keys = row_keys(rows, coeffs, chunk=7)  # chunking does not matter
    assert torch.equal(keys, row_keys(rows, coeffs))
    assert torch.equal(keys[[3, 1]], row_keys(rows[[3, 1]], coeffs))
    assert keys.unique().numel() == 50
    # the top bit is a fair coin over rows (a poorly mixed hash would put most keys on one side)
    signs = (row_keys(torch.randn(4000, 16, generator=g), coeffs) < 0).float().mean()
    assert 0.45 < signs < 0.55
