"""FID: the skip path and the network's shape (random weights). compare_images end to end on small images."""

import pytest
import torch
from safetensors.torch import save_file

from fourbit.eval import MetricUnavailable, compare_images, fid, load_inception
from fourbit.eval.fid import FIDInceptionV3


def test_fid_skips_without_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("FOURBIT_INCEPTION_WEIGHTS", raising=False)
    x = torch.zeros(2, 1, 28, 28)
    out = fid(x, x)
    assert out["value"] is None and "FOURBIT_INCEPTION_WEIGHTS" in out["reason"]
    with pytest.raises(MetricUnavailable):
        load_inception()
    pth = tmp_path / "pt_inception.pth"
    pth.write_bytes(b"not read")
    assert "convert_inception_weights" in fid(x, x, weights=pth)["reason"]
    assert "not found" in fid(x, x, weights=tmp_path / "missing.safetensors")["reason"]


def test_inception_shape_and_loading(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    assert sum(p.numel() for p in model.parameters()) == 21_785_568  # torchvision's trunk without fc/aux
    with torch.no_grad():
        assert model(torch.randn(2, 3, 75, 75)).shape == (2, 2048)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert isinstance(load_inception(path), FIDInceptionV3)


def test_compare_images(monkeypatch):
    monkeypatch.delenv("FOURBIT_INCEPTION_WEIGHTS", raising=False)
    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(8, 1, 28, 28, generator=g) * 2 - 1).clamp(-1, 1)
    samples = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    samples[0] = ref[0]  # one identical pair: PSNR +inf, capped in the mean
    data = torch.rand(10, 1, 28, 28, generator=g) * 2 - 1
    r = compare_images(samples, ref, data, n_boot=200, fd_n_boot=10)
    assert (r["n_samples"], r["n_reference"], r["n_data"]) == (8, 8, 10)
    for key in ("lpips", "psnr", "ssim"):
        assert r[key]["lo"] <= r[key]["mean"] <= r[key]["hi"] and r[key]["n"] == 8
    assert r["lpips"]["name"] == "LPIPS-Alex" and r["psnr"]["n_inf"] == 1
    assert r["fd_vs_reference"]["name"] == "FD-Alex" and r["fd_vs_reference"]["value"] > 0
    assert r["fd_vs_reference"]["lo"] <= r["fd_vs_reference"]["value"] <= r["fd_vs_reference"]["hi"]
    assert r["fd_vs_data"]["n_b"] == 10
    assert r["fid_vs_data"]["value"] is None and r["fid_vs_data"]["reason"]
    same = compare_images(ref, ref, n_boot=10, fd_n_boot=0)
    assert same["fd_vs_reference"]["value"] < 1e-6 and same["fd_vs_data"] is None and same["lpips"]["mean"] == 0
    with pytest.raises(ValueError, match="reference"):
        compare_images(samples, ref[:4])
