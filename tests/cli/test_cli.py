import subprocess
import sys

import fourbit
from fourbit.cli import main

from ..helpers import TinyNet


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "compare", "inspect", "train"):
        assert cmd in out


def test_python_dash_m_is_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "fourbit", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and fourbit.__version__ in res.stdout


def test_inspect_prints_header_and_layers(tmp_path, capsys):
    model = fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"method": "rtn"' in out and "conv2d" in out and "W=int4 A=int4" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["compare", "--variants", "fp16,magic:w4a4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'magic'" in err and "Traceback" not in err
    assert main(["inspect", str(tmp_path / "absent.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_quantize_writes_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    import torch

    from fourbit.models import build_model
    from fourbit.models import io as model_io

    tiny = build_model("fashion-dit", width=64, depth=1, num_heads=2)
    weights = tmp_path / "tiny.safetensors"
    model_io.save_weights(tiny, weights, "fashion-dit")
    monkeypatch.setattr("fourbit.models.load_pretrained", lambda name, device="cpu": model_io.load_weights(weights, device)[0])
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--variant", "rtn:w4a4", "--calib-samples", "2", "--calib-steps", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    header = fourbit.read_header(out)
    assert header["config"]["method"] == "rtn" and header["extra"]["variant"] == "rtn:w4a4"
    fresh = model_io.load_weights(weights)[0]
    fourbit.load(fresh, out)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 500]), torch.tensor([1, 10])
    assert fresh(x, t, y).shape == (2, 1, 28, 28)
