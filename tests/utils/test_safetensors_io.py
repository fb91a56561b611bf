"""Tensors read from safetensors files own 64-byte-aligned memory, so a reloaded model computes as the saved one."""
import torch
from safetensors.torch import save_file

from fourbit.utils.safetensors_io import ALIGNMENT, aligned, read_safetensors


def test_every_tensor_read_is_aligned_and_equal(tmp_path):
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(6)} | {"e": torch.empty(0), "h": torch.ones(5).half()}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    got, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and set(got) == set(tensors)
    for name, t in got.items():
        assert torch.equal(t, tensors[name]) and t.dtype == tensors[name].dtype
        assert t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0, name
    assert set(read_safetensors(tmp_path / "x.safetensors", keys=["t1"])[0]) == {"t1"}


def test_aligned_copies_only_what_is_off_the_boundary():
    base = torch.zeros(64)
    assert aligned(base) is base
    off = base[2:]  # 8 bytes in
    fixed = aligned(off)
    assert fixed is not off and fixed.data_ptr() % ALIGNMENT == 0 and torch.equal(fixed, off)


def test_a_linear_with_an_unaligned_weight_is_what_the_fix_is_for():
    """The check that failed on an AMD EPYC CPU machine (2026-12-05): the same values at another offset gave another
    result. Here: whatever the CPU does, the aligned copy computes exactly as torch's own allocation."""
    torch.manual_seed(0)
    w, x = torch.randn(32, 256), torch.randn(1, 256)
    buf = torch.empty(w.numel() + 10)
    shifted = buf[10:].view(32, 256)  # 40 bytes past a 64-byte boundary
    shifted.copy_(w)
    assert torch.equal(torch.nn.functional.linear(x, aligned(shifted)), torch.nn.functional.linear(x, w))
