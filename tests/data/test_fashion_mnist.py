import gzip
import zlib

import numpy as np
import pytest
import torch

from fourbit.data import CLASS_NAMES, fashion_mnist_available, load_fashion_mnist, read_idx, write_png
from fourbit.data.idx import write_idx
from fourbit.data.png import image_grid


def _write_split(root, prefix, n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_parses_synthetic_idx(tmp_path):
    images, labels = _write_split(tmp_path, "train", 5)
    _write_split(tmp_path, "t10k", 3, seed=1)
    # Header sizes: 16 bytes for images, 8 for labels.
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert len(raw) == 16 + 5 * 28 * 28 and raw[:4] == b"\x00\x00\x08\x03"
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (5,)
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    assert load_fashion_mnist("test", root=tmp_path)[0].shape == (3, 28, 28)
    assert fashion_mnist_available(tmp_path)


def test_env_var_root(tmp_path, monkeypatch):
    _write_split(tmp_path, "t10k", 2)
    monkeypatch.setenv("FOURBIT_FASHION_MNIST", str(tmp_path))
    assert load_fashion_mnist("test")[0].shape == (2, 28, 28)


def test_missing_files_name_the_package(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_corrupt_idx_refused(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def test_png_writer_round_trip(tmp_path):
    pixels = torch.arange(6 * 5, dtype=torch.uint8).reshape(6, 5) * 7
    path = tmp_path / "x.png"
    write_png(path, pixels)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    idat_len = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + idat_len])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(6, 6)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:], pixels.numpy())


def test_image_grid_layout():
    imgs = torch.stack([torch.full((1, 3, 3), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (2 * 4 + 1, 2 * 4 + 1)
    assert grid[1, 1] == 0 and grid[1, 5] == 128 and grid[5, 1] == 255


@pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
)
def test_real_dataset():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert len(CLASS_NAMES) == 10
