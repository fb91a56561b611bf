"""Fashion-MNIST (Xiao et al. 2017, MIT licence): 60k train + 10k test grey 28x28 images in 10 classes.

Files are looked up in ``root``, else ``$FOURBIT_FASHION_MNIST``, else where the Debian package
``dataset-fashion-mnist`` installs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fourbit.data.idx import read_idx

ENV_VAR = "FOURBIT_FASHION_MNIST"
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that is searched: ``root``, else ``$FOURBIT_FASHION_MNIST``, else the Debian location."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEBIAN_ROOT)


def _files(split: str, root: Path) -> tuple[Path, Path]:
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    p = _PREFIX[split]
    return root / f"{p}-images-idx3-ubyte.gz", root / f"{p}-labels-idx1-ubyte.gz"


def fashion_mnist_available(root: str | os.PathLike | None = None, split: str | None = None) -> bool:
    """True when the image and label files of ``split`` (default: both splits) exist under the searched folder."""
    r = fashion_mnist_root(root)
    return all(f.is_file() for s in ([split] if split else _PREFIX) for f in _files(s, r))


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split. Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)`` tensors.

    Raises FileNotFoundError naming the install command when the files are missing.
    """
    r = fashion_mnist_root(root)
    img_path, lbl_path = _files(split, r)
    missing = [str(f) for f in (img_path, lbl_path) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}. Install them with "
            f"`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root), or point ${ENV_VAR} "
            f"or the root argument at a folder holding the four *-ubyte.gz files."
        )
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected (N, 28, 28) images, got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{lbl_path}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype("int64"))


def reference_images(n: int, seed: int = 0, split: str = "test",
                     root: str | os.PathLike | None = None) -> torch.Tensor | None:
    """``n`` seeded random images of ``split`` as float (n, 1, 28, 28) in [-1, 1], or None when the data is absent.

    The real-image reference of the harness's "FD vs data".
    """
    if n <= 0 or not fashion_mnist_available(root, split=split):
        return None
    imgs, _ = load_fashion_mnist(split, root)
    idx = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return imgs[idx].float().div(127.5).sub(1.0).unsqueeze(1)  # (n, 1, 28, 28)
