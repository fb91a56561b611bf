"""Batch sharding and the single-process ``Ranks`` (no torch.distributed involved)."""
import pytest
import torch

from fourbit.distributed import Ranks, batch_slices, init_from_env, owner_of_batches, shard_batches, split_items


def test_batches_are_dealt_round_robin_and_cover_every_item_once():
    assert batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert batch_slices(0, 4) == []
    for n, b, world in [(7, 3, 2), (10, 2, 3), (4, 8, 2), (9, 1, 4)]:
        shards = [shard_batches(n, b, r, world) for r in range(world)]
        items = sorted(i for shard in shards for s in shard for i in range(n)[s])
        assert items == list(range(n))  # each item on exactly one rank
        owners = owner_of_batches(n, b, world)
        for r, shard in enumerate(shards):
            assert shard == [s for s, o in zip(batch_slices(n, b), owners) if o == r]
    assert shard_batches(4, 8, 1, 2) == []  # more ranks than batches: rank 1 idles
    assert split_items(["a", "b", "c", "d", "e"], 2, 1, 2) == [(slice(2, 4), ["c", "d"])]


@pytest.mark.parametrize("bad", [dict(rank=2, world_size=2), dict(rank=-1, world_size=2)])
def test_a_rank_outside_the_world_is_refused(bad):
    with pytest.raises(ValueError, match="outside a world"):
        shard_batches(8, 2, **bad)


def test_single_process_ranks_are_the_identity():
    ranks = Ranks()
    assert ranks.is_root and ranks.gather(5) == [5] and ranks.gather_to_root("x") == ["x"]
    ranks.barrier()
    parts = [torch.full((2, 1), float(i)) for i in range(3)]  # batches 0..2 of 5 items, batch size 2
    out = ranks.gather_batches(parts[:2] + [torch.full((1, 1), 2.0)], 5, 2)
    assert out.flatten().tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="result batches"):
        ranks.gather_batches(parts[:2], 5, 2)
    assert ranks.gather_items([["a", "b"], ["c", "d"], ["e"]], 5, 2) == list("abcde")


class _FakeGroup(Ranks):
    """Rank ``rank`` of a world whose other ranks' payloads are given: exercises the reordering of the gathers."""

    def __init__(self, rank, world_size, others):
        super().__init__(rank=rank, world_size=world_size)
        object.__setattr__(self, "others", others)

    def gather_to_root(self, obj, what=""):
        return [obj if r == self.rank else self.others[r] for r in range(self.world_size)]


def test_gathered_batches_come_back_in_item_order():
    # 7 items, batches of 2 -> 4 batches; 3 ranks: rank 0 has batches 0 and 3, rank 1 batch 1, rank 2 batch 2
    items = [f"p{i}" for i in range(7)]
    shares = {r: [items[s] for s in shard_batches(7, 2, r, 3)] for r in range(3)}
    assert shares[0] == [["p0", "p1"], ["p6"]]
    assert _FakeGroup(0, 3, shares).gather_items(shares[0], 7, 2) == items
    tensors = {r: [torch.tensor([float(i) for i in range(7)][s]) for s in shard_batches(7, 2, r, 3)] for r in range(3)}
    assert _FakeGroup(0, 3, tensors).gather_batches(tensors[0], 7, 2).tolist() == list(range(7))


def test_without_torchrun_no_process_group_is_made(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = init_from_env("cpu")
    assert (ranks.world_size, ranks.backend, ranks.device) == (1, None, "cpu")
    monkeypatch.setenv("FOURBIT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FOURBIT_DIST_TIMEOUT"):
        init_from_env("cpu")

