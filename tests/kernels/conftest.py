"""Fixtures for the kernel tests.

``interpret``: run fourbit's Triton kernels in Triton's CPU interpreter for the tests of one module.
Triton decides interpreter-or-compiler when a kernel is *defined*, so the fixture sets TRITON_INTERPRET=1 and
re-executes fourbit's kernel modules, then restores the variable and re-executes them again afterwards:
other test modules (and GPU tests in the same session) see ordinary compiled kernels.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

# definition order: helpers first, then the modules that import them
_KERNEL_MODULES = ("_common", "activation", "gemm", "gemm_grouped", "act_spec", "act_tiles", "act_single", "act_two",
                   "act_lowrank", "act_quant", "weights", "gemv", "linear")


def _reload_kernels() -> None:
    for name in _KERNEL_MODULES:
        mod = importlib.import_module(f"fourbit.kernels.{name}")
        importlib.reload(mod)


_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out_ptr, n):
    acc = 0
    for i in range(0, n, 1):  # a loop over a runtime bound, as every fourbit kernel has
        acc += 1
    tl.store(out_ptr, acc)

out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert out.item() == 3
"""


def _interpreter_works() -> str:
    """'' if Triton's interpreter runs a loop with a runtime bound here, else why not. (Triton 3.6's
    interpreter converts loop bounds with int() of a 1-element array, which NumPy 2.4 refuses.)"""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:200]


@pytest.fixture(scope="module")
def interpret():
    broken = _interpreter_works()
    if broken:
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run fourbit's kernels with this NumPy "
                    f"({broken}); the CI machines' Triton runs them")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _reload_kernels()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        _reload_kernels()


def has_cuda() -> bool:
    return torch.cuda.is_available()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of t (for bit-for-bit comparisons that also tell -0 from +0)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view)
