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
