import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourbit.models import build_model, load_pretrained, load_weights, pretrained_available, read_metadata, save_weights

from .test_models import TINY, _inputs, randomize_


def test_save_load_round_trip(tmp_path):
    model = randomize_(build_model("fashion-dit", **TINY["fashion-dit"]))
    path = tmp_path / "m.safetensors"
    save_weights(model, path, "fashion-dit", training={"steps": 3})
    meta = read_metadata(path)
    assert meta["model"] == "fashion-dit" and meta["arch"] == "dit" and meta["training"] == {"steps": 3}
    assert all(v.dtype == torch.float16 for v in load_file(path).values())
    loaded, _ = load_weights(path)
    x, t, y = _inputs()
    ref = model.half().float()  # the file holds fp16
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ref(x, t, y), rtol=0, atol=1e-6)


def test_full_model_round_trip_through_load_pretrained(tmp_path):
    model = randomize_(build_model("fashion-unet"))
    path = tmp_path / "u.safetensors"
    save_weights(model, path, "fashion-unet")
    loaded = load_pretrained("fashion-unet", path=path, dtype=torch.float32)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.half().float(), b), k


def test_refuses_other_model_and_other_config(tmp_path):
    path = tmp_path / "u.safetensors"
    save_weights(build_model("fashion-unet"), path, "fashion-unet")
    with pytest.raises(ValueError, match="not 'fashion-dit'"):
        load_pretrained("fashion-dit", path=path)
    tiny = tmp_path / "tiny.safetensors"
    save_weights(build_model("fashion-dit", **TINY["fashion-dit"]), tiny, "fashion-dit")
    with pytest.raises(ValueError, match="config differs"):
        load_pretrained("fashion-dit", path=tiny)


def test_refuses_missing_tensor_and_foreign_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_weights(build_model("fashion-dit", **TINY["fashion-dit"]), path, "fashion-dit")
    tensors, meta = load_file(path), read_metadata(path)
    del tensors["blocks.0.attn.qkv.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata={k: json.dumps(v) if isinstance(v, dict) else v for k, v in meta.items()})
    with pytest.raises(ValueError, match="missing.*blocks.0.attn.qkv.weight"):
        load_weights(broken)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a fourbit.model file"):
        load_weights(foreign)


@pytest.mark.parametrize("name", ["fashion-dit", "fashion-unet"])
def test_bundled_weights(name):
    if not pretrained_available(name):
        pytest.skip(f"no bundled weights for {name}")
    model = load_pretrained(name)
    meta = read_metadata(model_path := __import__("fourbit.models", fromlist=["weights_path"]).weights_path(name))
    assert model_path.stat().st_size <= 12 * 2**20
    assert {"steps", "wall_time_s", "final_loss", "seed", "torch_version", "date"} <= set(meta["training"])
    # A trained model predicts the noise far better than chance (MSE 1.0) on noised images.
    from fourbit.data import fashion_mnist_available, load_fashion_mnist
    from fourbit.sampling import NoiseSchedule

    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    images, labels = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    x0 = images[:32].float()[:, None] / 127.5 - 1
    t = torch.randint(50, 1000, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model(NoiseSchedule().add_noise(x0, noise, t), t, labels[:32])
    assert torch.mean((pred - noise) ** 2) < 0.1
