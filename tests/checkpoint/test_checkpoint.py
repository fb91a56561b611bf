import json
import os

import pytest
import torch
from torch import nn

import fourbit
from fourbit.checkpoint import CheckpointError, HEADER_KEY, read_header

from ..helpers import TinyNet, loop_over, tiny_batches
from .edit import read_raw, write_raw


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
    assert h["format_version"] == 2 and h["library_version"] == fourbit.__version__
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


# ---- issue 20 item 1: the header is covered by a checksum ---------------------------------------
@pytest.mark.parametrize("act", ["int8", None])
def test_edited_layer_format_is_refused(saved, tmp_path, act):
    """One byte of a layer's act_format (int4 -> int8) or null (W4A16) used to load and change outputs."""
    _, path = saved
    tensors, header = read_raw(path)
    spec = header["layers"]["fc"]
    spec["act_format"] = None if act is None else {**spec["act_format"], "name": act}
    edited = write_raw(tmp_path / "edited.safetensors", tensors, header)
    with pytest.raises(CheckpointError, match="header does not match its checksum"):
        fourbit.load(TinyNet(), edited)
    with pytest.raises(CheckpointError, match="header does not match its checksum"):
        read_header(edited)


def test_header_checksum_ignores_key_order_and_spacing(saved, tmp_path):
    model, path = saved
    tensors, header = read_raw(path)
    text = json.dumps(dict(reversed(list(header.items()))), indent=3)
    same = write_raw(tmp_path / "same.safetensors", tensors, text)
    fresh = fourbit.load(TinyNet(), same)
    x = tiny_batches(1, seed=5)[0]
    assert torch.equal(fresh(x), model(x))


def test_version_1_files_are_refused_with_a_reason(saved, tmp_path):
    _, path = saved
    tensors, header = read_raw(path)
    header["format_version"] = 1
    del header["header_sha256"]
    old = write_raw(tmp_path / "v1.safetensors", tensors, header)
    with pytest.raises(CheckpointError, match="version 1 predates the header checksum.*quantize the model again"):
        fourbit.load(TinyNet(), old)


# ---- issue 20 item 2: a header with a missing or renamed key is refused with one sentence --------
@pytest.mark.parametrize("edit, match", [
    (lambda h: h["layers"]["fc"].pop("act_format"), "layer 'fc' lacks the field 'act_format'"),
    (lambda h: h["layers"]["fc"].update(kernl=h["layers"]["fc"].pop("kernel")), "unknown field.*'kernl'"),
    (lambda h: h.pop("config"), "the header lacks the field 'config'"),
    (lambda h: h["layers"].update(fc=[1, 2]), "layer 'fc': its spec must be a JSON object"),
    (lambda h: h["layers"]["conv"].update(stride=[1]), "'stride' must be a list of two integers"),
    (lambda h: h["layers"]["fc"]["weight_format"].update(name="int3"), "unknown format 'int3'"),
    (lambda h: h["layers"]["fc"].update(kernel="bogus"), "unknown kernel 'bogus'"),
    (lambda h: h["config"].update(method="magic"), "config is not valid here .*unknown method 'magic'"),
])
def test_schema_errors_are_one_sentence(saved, tmp_path, edit, match):
    _, path = saved
    tensors, header = read_raw(path)
    edit(header)
    bad = write_raw(tmp_path / "bad.safetensors", tensors, header, resign=True)
    for call in (lambda: read_header(bad), lambda: fourbit.load(TinyNet(), bad)):
        with pytest.raises(CheckpointError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_header_disagreeing_with_tensors_is_refused_at_load(saved, tmp_path):
    """Edits the schema allows but the tensors contradict (used to fail only at the first forward)."""
    _, path = saved
    tensors, header = read_raw(path)
    for edit, match in [(lambda h: h["layers"]["fc"].update(rank=3), "tensor lr_down has shape"),
                        (lambda h: h["layers"]["fc"].update(padded_in=576), "tensor weight_packed has shape"),
                        (lambda h: h["layers"]["odd"]["weight_format"].update(name="int8"), "weight_packed"),
                        (lambda h: h["layers"]["fc"]["weight_format"].update(group_size=32), "weight_scales")]:
        h = json.loads(json.dumps(header))
        edit(h)
        bad = write_raw(tmp_path / "bad.safetensors", tensors, h, resign=True)
        read_header(bad)  # the header alone is fine
        with pytest.raises(CheckpointError, match=match):
            fourbit.load(TinyNet(), bad)


# ---- issue 20 item 3: a refused load leaves the model as it was ----------------------------------
def test_refused_load_changes_nothing_and_a_retry_works(saved, tmp_path):
    model, path = saved
    tensors, header = read_raw(path)
    tensors["head.bias"] = tensors["head.bias"][:5].clone()  # the LAST layer is inconsistent
    header["tensor_sha256"] = fourbit.checkpoint._digest(tensors)
    bad = write_raw(tmp_path / "bad.safetensors", tensors, header, resign=True)
    fresh = TinyNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="layer head: tensor bias has shape"):
        fourbit.load(fresh, bad)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in (fresh.conv, fresh.conv2, fresh.fc, fresh.odd, fresh.head))
    after = fresh.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    fourbit.load(fresh, path)  # not "already quantized"
    x = tiny_batches(1, seed=5)[0]
    assert torch.equal(fresh(x), model(x))


def test_refused_load_with_siblings_unfuses(tmp_path):
    from ..test_siblings import Net, _loop

    net = Net()
    fourbit.fuse_siblings(net, fourbit.find_siblings(net, _loop))
    fourbit.quantize(net, fourbit.RTNConfig(), forward_loop=_loop, progress=False, verbose=False)
    path = fourbit.save(net, tmp_path / "q.safetensors")
    tensors, header = read_raw(path)
    name = sorted(header["layers"])[-1]
    tensors[name + ".bias"] = tensors[name + ".bias"][:3].clone()
    header["tensor_sha256"] = fourbit.checkpoint._digest(tensors)
    bad = write_raw(tmp_path / "bad.safetensors", tensors, header, resign=True)
    fresh = Net()
    names = [n for n, _ in fresh.named_modules()]
    with pytest.raises(CheckpointError, match="tensor bias has shape"):
        fourbit.load(fresh, bad)
    assert [n for n, _ in fresh.named_modules()] == names and not hasattr(fresh, "fourbit_siblings")
    fourbit.load(fresh, path)


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

    from fourbit.checkpoint import BUFFER_PREFIX, _digest, header_digest

    model = _WithTable()
    fourbit.quantize(model, fourbit.RTNConfig(), progress=False, verbose=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["fourbit"])
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(BUFFER_PREFIX)}
    header["tensor_sha256"] = _digest(tensors)  # as a checkpoint written before buffers were stored
    header["header_sha256"] = header_digest(header)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"fourbit": json.dumps(header)})
    with torch.device("meta"):
        fresh = _WithTable()
    with pytest.raises(fourbit.CheckpointError, match="buffer table is on the meta device"):
        fourbit.load(fresh, tmp_path / "old.safetensors")
    fourbit.load(_WithTable(), tmp_path / "old.safetensors")  # a model built on a real device has it


def test_load_tensors_validates_a_header_from_anywhere(saved):
    """A sharded folder's header comes from its index, not read_header: load_tensors checks it itself."""
    from fourbit.checkpoint import load_tensors

    _, path = saved
    tensors, header = read_raw(path)
    header["layers"]["fc"]["act_format"] = None  # an edit without a new checksum
    with pytest.raises(CheckpointError, match="index.json: the header does not match its checksum"):
        load_tensors(TinyNet(), header, lambda: dict(tensors), "index.json")
