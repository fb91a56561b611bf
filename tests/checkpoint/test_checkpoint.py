import json
import os

import pytest
import torch
from torch import nn

import fourbit
from fourbit.checkpoint import CheckpointError, HEADER_KEY, read_header

from ..helpers import TinyNet, loop_over, tiny_batches


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(tiny_batches(2)), verbose=False)
    path = fourbit.save(model, tmp_path / "tiny.fourbit.safetensors")
    return model, path


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_round_trip_is_bit_exact(saved, device):
    model, path = saved
    with torch.device(device):
        fresh = TinyNet()
    fourbit.load(fresh, path)
    x = tiny_batches(1, seed=5)[0]
    assert torch.equal(fresh(x), model(x))
    for (n1, t1), (n2, t2) in zip(sorted(model.state_dict().items()), sorted(fresh.state_dict().items())):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_header_contents(saved):
    _, path = saved
    h = read_header(path)
    assert h["format_version"] == 1 and h["library_version"] == fourbit.__version__
    assert h["config"]["method"] == "svdquant" and h["config"]["rank"] == 4
    assert h["layers"]["conv"]["kind"] == "conv2d" and h["layers"]["conv"]["weight_format"]["name"] == "int4"


def test_different_architecture_refused(saved):
    _, path = saved

    class Other(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 32)
            self.odd = nn.Linear(32, 40)

    with pytest.raises(CheckpointError, match="layer fc is a linear 512->64 .* different architecture"):
        fourbit.load(Other(), path)


def test_missing_and_extra_layers_refused(saved):
    _, path = saved

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

    with pytest.raises(CheckpointError, match="missing from this model: conv2, fc"):
        fourbit.load(Fewer(), path)

    class More(TinyNet):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    with pytest.raises(CheckpointError, match="architecture fingerprint"):
        fourbit.load(More(), path)


def test_newer_format_version_refused(saved, tmp_path):
    _, path = saved
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[HEADER_KEY])
    header["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        fourbit.load(TinyNet(), newer)


def test_damaged_files_refused(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-10] ^= 0xFF  # a byte inside the tensor data
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        fourbit.load(TinyNet(), flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        fourbit.load(TinyNet(), truncated)
    with pytest.raises(CheckpointError, match="no such file"):
        fourbit.load(TinyNet(), tmp_path / "absent.safetensors")


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fourbit.save(model, path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_unquantized_model_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        fourbit.save(TinyNet(), tmp_path / "x.safetensors")


class _WithTable(torch.nn.Module):
    """A layer plus a non-persistent buffer computed at construction (like diffusers' PatchEmbed.pos_embed)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)
        self.register_buffer("table", torch.arange(32.0).sin(), persistent=False)

    def forward(self, x):
        return self.fc(x) + self.table


def test_load_on_meta_materialises_non_persistent_buffers(tmp_path):
    torch.manual_seed(0)
    model = _WithTable()
    fourbit.quantize(model, fourbit.RTNConfig(), progress=False, verbose=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = _WithTable()
    assert fresh.table.is_meta
    fourbit.load(fresh, path)
    assert not fresh.table.is_meta and torch.equal(fresh.table, model.table)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_load_on_meta_refuses_a_checkpoint_without_the_buffer(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from fourbit.checkpoint import BUFFER_PREFIX, _digest

    model = _WithTable()
    fourbit.quantize(model, fourbit.RTNConfig(), progress=False, verbose=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["fourbit"])
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(BUFFER_PREFIX)}
    header["tensor_sha256"] = _digest(tensors)  # as a checkpoint written before buffers were stored
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"fourbit": json.dumps(header)})
    with torch.device("meta"):
        fresh = _WithTable()
    with pytest.raises(fourbit.CheckpointError, match="buffer table is on the meta device"):
        fourbit.load(fresh, tmp_path / "old.safetensors")
    fourbit.load(_WithTable(), tmp_path / "old.safetensors")  # a model built on a real device has it
