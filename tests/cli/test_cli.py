import os
import subprocess
import sys

import pytest
import torch

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


# ---- issue 20 item 4: every ordinary mistake is one line on stderr and a non-zero exit ------------
def _one_line_error(capsys, *texts):
    """The error is the last line of stderr, one line, no traceback (progress lines may come before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err, err
    last = err.splitlines()[-1]
    assert last.startswith("fourbit ") and sum("error" in line for line in err.splitlines()) == 1, err
    for t in texts:
        assert t in last, err
    return last


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: the error must come before the work."""
    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("fourbit.models.load_pretrained", no_work)


@pytest.mark.parametrize("argv, texts", [
    (["quantize", "--variant", "rtn:w4a4:gg=32", "--out", "{tmp}/q.safetensors"], ["option 'gg' is not read"]),
    (["quantize", "--variant", "nf4:w4a4", "--out", "{tmp}/q.safetensors"], ["nf4 is 4-bit weight-only"]),
    (["quantize", "--out", "{tmp}"], ["is a directory; give a file path"]),
    (["quantize", "--out", "{tmp}/afile/q.safetensors"], ["afile is a regular file, not a directory"]),
    (["compare", "--variants", "fp16,rtn:w4a4:fmt=int3", "--out", "{tmp}/c"], ["unknown format 'int3'"]),
    (["compare", "--out", "{tmp}/afile"], ["is a regular file, not a directory"]),
])
def test_mistakes_are_refused_before_any_work(argv, texts, tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    _one_line_error(capsys, *texts)


@pytest.mark.parametrize("argv, text", [
    (["quantize", "--model", "bogus", "--out", "q.safetensors"], "unknown model 'bogus'"),
    (["quantize", "--calib-samples", "0", "--out", "q.safetensors"], "--calib-samples: must be >= 1, got 0"),
    (["compare", "--samples", "-3"], "--samples: must be >= 1, got -3"),
    (["compare", "--samples", "1"], "--samples: must be >= 2"),
    (["demo", "--batch-size", "x"], "expected an integer, got 'x'"),
])
def test_bad_argument_values_are_usage_errors(argv, text, capsys, no_model):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys, no_model):
    assert main(["quantize", "--device", "cuda", "--out", str(tmp_path / "q.safetensors")]) == 2
    _one_line_error(capsys, "CUDA is not available here", "--device cpu")
    assert main(["compare", "--device", "nonsense", "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "is not a device name")


def _tiny_pretrained(tmp_path, monkeypatch):
    from fourbit.models import build_model
    from fourbit.models import io as model_io

    tiny = build_model("fashion-dit", width=64, depth=1, num_heads=2)
    weights = tmp_path / "tiny.safetensors"
    model_io.save_weights(tiny, weights, "fashion-dit")
    monkeypatch.setattr("fourbit.models.load_pretrained",
                        lambda name, device="cpu": model_io.load_weights(weights, device)[0])


def test_disk_full_during_save_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    import errno
    import os

    _tiny_pretrained(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["quantize", "--variant", "rtn:w4a4", "--calib-samples", "1", "--calib-steps", "1",
                 "--device", "cpu", "--out", str(out / "q.safetensors")]) == 2
    _one_line_error(capsys, "No space left on device")
    assert list(out.iterdir()) == []


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys, tmp_path):
    import fourbit.cli as cli

    def bug(args):
        raise IndexError("list index out of range")

    help_text, add_arguments, _ = cli.COMMANDS["inspect"]
    monkeypatch.setitem(cli.COMMANDS, "inspect", (help_text, add_arguments, bug))
    assert main(["inspect", "x"]) == 1
    _one_line_error(capsys, "internal error (IndexError; run with --debug", "list index out of range")
    with pytest.raises(IndexError):
        main(["--debug", "inspect", "x"])


def test_broken_pipe_ends_quietly(tmp_path):
    """``fourbit inspect x | head -1``: the reader goes away before fourbit writes."""
    model = fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False, progress=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "fourbit", "inspect", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode == 1


# ---- issue 17 item 7: inspect verifies the checksums and shows size and bits per weight -----------
def test_inspect_verifies_and_reports_size_and_bits(tmp_path, capsys):
    model = fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False, progress=False)
    path = fourbit.save(model, tmp_path / "m.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"({path.stat().st_size} bytes), header and tensor checksums OK" in out
    # fc: 512 -> 64 int4 group 64: 4 bits + one fp16 scale per 64 weights = 4.25 bits per weight
    assert "W=int4 A=int4 rank=0 kernel=reference  4.25 bits/w" in out
    assert "kernels: reference 5 (layers;" in out
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 2
    _one_line_error(capsys, "tensor data does not match its checksum")
    assert main(["inspect", "--header-only", str(path)]) == 0
    assert "header checksum OK" in capsys.readouterr().out


@pytest.mark.parametrize("make, what", [(lambda p: p.mkdir(), "is a directory"),
                                        (lambda p: os.mkfifo(p), "is a FIFO")])
def test_inspect_names_what_a_path_is(tmp_path, capsys, make, what):
    target = tmp_path / "thing"
    make(target)
    assert main(["inspect", str(target)]) == 2
    _one_line_error(capsys, what)


def test_seeded_cli_misuse_fuzz(tmp_path, capsys, no_model):
    """60 seeded command lines, each with one bad value among good ones: every one ends with exit status 2 and
    one error line, before any model is loaded (a load would fail the test with exit status 1)."""
    import random

    (tmp_path / "afile").write_text("x")
    good = {"--model": "fashion-dit", "--calib-samples": "2", "--calib-steps": "2", "--seed": "3",
            "--device": "cpu", "--samples": "4", "--steps": "2", "--batch-size": "8", "--data-samples": "0"}
    bad = {"--model": ["bogus", ""], "--calib-samples": ["0", "-1", "x"], "--calib-steps": ["0", "1.5"],
           "--samples": ["1", "-3", "0"], "--steps": ["0", "-2"], "--batch-size": ["0", "b"],
           "--data-samples": ["-1"], "--device": ["cuda:7", "tpu", "nonsense"],
           "--variant": ["rtn:w4a4:gg=32", "nf4:w4a4", "rtn:w3a4", "svdquant:w4a4:alpha=2", "rtn:w4a4:r8",
                         "magic:w4a4", "rtn", "fp16", "rtn:w4a4+nope", "rtn:w4a4:kernel=bogus"],
           "--variants": ["fp16,rtn:w4a4:fmt=int3", "fp16,,svdquant:w4a4:g=0", "rtn:w4a4:calib_rows=0"],
           "--out": ["{tmp}/afile/x", "{out}"]}  # {out}: a directory for quantize, a file for compare
    allowed = {"quantize": ["--model", "--variant", "--calib-samples", "--calib-steps", "--seed", "--device", "--out"],
               "compare": ["--model", "--variants", "--samples", "--steps", "--calib-samples", "--calib-steps",
                           "--data-samples", "--batch-size", "--seed", "--device", "--out"]}
    rng = random.Random(20)
    for i in range(60):
        cmd = rng.choice(sorted(allowed))
        flags = [f for f in allowed[cmd] if f in good or f == "--out"]
        wrong = rng.choice([f for f in allowed[cmd] if f in bad])
        argv = [cmd]
        for f in rng.sample(flags, k=rng.randrange(len(flags) + 1)):
            if f != wrong:
                argv += [f, good.get(f, str(tmp_path / f"ok{i}.safetensors" if cmd == "quantize" else tmp_path / f"o{i}"))]
        value = rng.choice(bad[wrong]).replace("{out}", str(tmp_path / ("afile" if cmd == "compare" else "")))
        argv += [wrong, value.replace("{tmp}", str(tmp_path))]
        if cmd == "quantize" and "--out" not in argv:
            argv += ["--out", str(tmp_path / f"q{i}.safetensors")]
        try:
            code = main(argv)
        except SystemExit as ex:  # argparse: a usage line and the error line
            code = ex.code
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("fourbit "), argv
            continue
        assert code == 2, (" ".join(argv), capsys.readouterr().err)
        _one_line_error(capsys)


def test_read_only_output_folder_is_refused_before_work(tmp_path, capsys, no_model, monkeypatch):
    """A read-only mount (simulated: root ignores chmod) is found by creating a probe file, before the work."""
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["quantize", "--out", str(tmp_path / "q.safetensors")]) == 2
    _one_line_error(capsys, f"cannot write in {tmp_path}", "Read-only file system")
