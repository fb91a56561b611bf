"""Seeded fuzz of checkpoints (issue 20 acceptance): 360 header, text, byte and truncation mutations through
``fourbit.load``, and 60 more through ``fourbit inspect``.

Every mutated file is either refused with a one-line ``CheckpointError`` (and the model left untouched) or it
loads to outputs bit-identical to the original. Re-signed header edits (the header checksum recomputed, so the
schema and the consistency checks are all that stands in the way) are refused with one line or load to a model
whose forward pass runs: no traceback, no failure postponed to the first forward.
"""
import copy
import json
import random
import struct

import pytest
import torch

import fourbit
from fourbit.checkpoint import CheckpointError

from ..helpers import TinyNet, loop_over, tiny_batches
from .edit import read_raw, write_raw

SEED = 20
VALUES = [None, True, False, 0, -1, 1, 3, 2.5, 10**9, "", "int8", "int4", "bogus", "conv2d", [], [1], [0, 0],
          {}, {"name": "int4"}, "reference", "0" * 64]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet()
    fourbit.quantize(model, fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(tiny_batches(2)), verbose=False)
    path = fourbit.save(model, tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    x = tiny_batches(1, seed=5)[0]
    return path, x, model(x)


def _slots(obj, out, parent=None, key=None):
    """Every (container, key) in the JSON tree, the root excluded."""
    if parent is not None:
        out.append((parent, key))
    if isinstance(obj, dict):
        for k in list(obj):
            _slots(obj[k], out, obj, k)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            _slots(obj[i], out, obj, i)
    return out


def mutate_header(header: dict, rng: random.Random) -> str:
    """Apply one random edit to a copy of ``header`` in place; returns what it did."""
    container, key = rng.choice(_slots(header, []))
    op = rng.choice(["delete", "rename", "set", "set", "bump"] if isinstance(container, dict) else ["set", "bump"])
    if op == "delete":
        del container[key]
    elif op == "rename":
        container[key + "_"] = container.pop(key)
    elif op == "bump" and type(container[key]) in (int, float):
        container[key] += rng.choice([-1, 1])
    else:
        op = "set"
        container[key] = copy.deepcopy(rng.choice(VALUES))
    return f"{op} {key!r}"


def _expect_refused_or_identical(path, x, y0, allow_changed=False):
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fourbit.load(model, path)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(err), f"not one line: {err!r}"
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before), \
            "a refused load changed the model"
        assert getattr(model, "fourbit_header", None) is None
        return "refused"
    y = model(x)
    if allow_changed:
        assert y.shape == y0.shape
        return "loaded"
    assert torch.equal(y, y0), "loaded to different outputs"
    return "identical"


def test_header_edits(original, tmp_path):
    path, x, y0 = original
    tensors, header = read_raw(path)
    rng = random.Random(SEED)
    outcomes = {}
    for i in range(100):
        h = copy.deepcopy(header)
        what = mutate_header(h, rng)
        p = write_raw(tmp_path / f"h{i}.safetensors", tensors, h)
        outcome = _expect_refused_or_identical(p, x, y0)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome == "refused" or h == header or what.startswith("bump"), what
    assert outcomes.get("refused", 0) >= 90


def test_resigned_header_edits(original, tmp_path):
    """The checksum recomputed: the schema and the header/tensor checks alone must catch what cannot load."""
    path, x, y0 = original
    tensors, header = read_raw(path)
    rng = random.Random(SEED + 1)
    outcomes = {}
    for i in range(100):
        h = copy.deepcopy(header)
        what = mutate_header(h, rng)
        p = write_raw(tmp_path / f"r{i}.safetensors", tensors, h, resign=True)
        try:
            outcome = _expect_refused_or_identical(p, x, y0, allow_changed=True)
        except Exception as err:
            raise AssertionError(f"mutation {i} ({what}) reached {type(err).__name__}: {err}") from None
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) >= 60, outcomes


def test_header_text_edits(original, tmp_path):
    """Characters of the header's JSON text replaced: invalid JSON, other values, other keys."""
    path, x, y0 = original
    tensors, header = read_raw(path)
    text = json.dumps(header)
    rng = random.Random(SEED + 2)
    for i in range(60):
        pos = rng.randrange(len(text))
        edited = text[:pos] + rng.choice('x0"{}[],: 9') + text[pos + 1:]
        p = write_raw(tmp_path / f"t{i}.safetensors", tensors, edited)
        _expect_refused_or_identical(p, x, y0)


def test_tensor_byte_edits_and_truncations(original, tmp_path):
    """Bytes of the file flipped (safetensors' own JSON header and the tensor data), and the file cut short."""
    path, x, y0 = original
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]  # safetensors: 8-byte header length, JSON, then the tensor data
    rng = random.Random(SEED + 3)
    for i in range(80):
        blob = bytearray(data)
        pos = rng.randrange(8, 8 + n) if i % 2 else rng.randrange(8 + n, len(data))
        blob[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"b{i}.safetensors"
        p.write_bytes(bytes(blob))
        _expect_refused_or_identical(p, x, y0)
    for i in range(20):
        p = tmp_path / f"cut{i}.safetensors"
        p.write_bytes(data[: rng.randrange(len(data))])
        assert _expect_refused_or_identical(p, x, y0) == "refused"


def test_inspect_on_mutated_files(original, tmp_path, capsys):
    """``fourbit inspect`` on 40 header edits and 20 byte flips: exit 0 (an edit that changes nothing) or exit 2
    with one error line; never a traceback or exit 1 (an unexpected exception)."""
    from fourbit.cli import main

    path, _, _ = original
    tensors, header = read_raw(path)
    rng = random.Random(SEED + 4)
    files = []
    for i in range(40):
        h = copy.deepcopy(header)
        mutate_header(h, rng)
        files.append(write_raw(tmp_path / f"i{i}.safetensors", tensors, h, resign=i % 2 == 0))
    data = path.read_bytes()
    for i in range(20):
        blob = bytearray(data)
        blob[rng.randrange(8, len(data))] ^= 0x04
        files.append(tmp_path / f"j{i}.safetensors")
        files[-1].write_bytes(bytes(blob))
    for p in files:
        code = main(["inspect", str(p)])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2) and "Traceback" not in err, err
        assert (code == 0 and not err) or (code == 2 and len(err.splitlines()) == 1), err
