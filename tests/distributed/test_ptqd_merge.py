"""PTQD's statistics pass sharded over two ranks gives the statistics of one process, bit for bit."""
import copy

import pytest
import torch

import fourbit
from fourbit.models import build_model, get_spec
from fourbit.ptqd.stats import collect_stats


class Recorded(Exception):
    pass


class Rank:
    """A stand-in collective: rank 1 records what it sends and stops; rank 0 gets rank 1's recorded share."""

    world_size = 2

    def __init__(self, rank, other=None):
        self.rank, self.other, self.sent = rank, other, None

    def gather(self, obj, what=""):
        self.sent = obj
        if self.other is None:
            raise Recorded
        return [obj, self.other]


def test_sharded_ptqd_statistics_equal_the_single_process_ones():
    torch.manual_seed(0)
    fp = build_model("fashion-dit", width=64, depth=1, num_heads=2)
    with torch.no_grad():  # adaLN-Zero starts with zero outputs: give every zero-initialised weight some signal
        for p in fp.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    q = fourbit.quantize(copy.deepcopy(fp), fourbit.RTNConfig(exclude=get_spec("fashion-dit").quant_exclude),
                         progress=False, verbose=False)
    kw = dict(steps=3, num_samples=5, batch_size=2, seed=7, act_formats=["int4", "int8"])  # 3 batches: 2 + 1
    single = collect_stats(fp, q, **kw)
    rank1 = Rank(1)
    with pytest.raises(Recorded):
        collect_stats(fp, q, collective=rank1, **kw)
    assert len(rank1.sent["int4"][0]) == 1  # rank 1 sampled batch 1 only
    merged = collect_stats(fp, q, collective=Rank(0, rank1.sent), **kw)
    assert merged.to_dict() == single.to_dict()
    assert merged.schedule == single.schedule and single.formats["int4"].k[0] != 0
