"""Datasets and image I/O: Fashion-MNIST loading (IDX files), image grids and a dependency-free PNG writer."""

from fourbit.data.fashion_mnist import (
    CLASS_NAMES,
    NUM_CLASSES,
    fashion_mnist_available,
    fashion_mnist_root,
    load_fashion_mnist,
)
from fourbit.data.idx import read_idx
from fourbit.data.png import image_grid, save_png, write_png

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "fashion_mnist_available",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "read_idx",
    "image_grid",
    "save_png",
    "write_png",
]
