"""Checkpoint files on disk (issue 20 item 8): modes, symbolic links, temp files of killed saves, paths that are
not files, format_version values."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import fourbit
from fourbit.checkpoint import CheckpointError, read_header

from ..helpers import TinyNet
from .edit import read_raw, write_raw


@pytest.fixture(scope="module")
def model():
    return fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False, progress=False)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_file_mode_follows_the_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        path = fourbit.save(model, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert _mode(path) == 0o640  # 0666 minus the umask, not mkstemp's 0600


def test_replacing_a_file_keeps_its_mode(model, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    fourbit.save(model, path)
    assert _mode(path) == 0o644 and read_header(path)["config"]["method"] == "rtn"


def test_saving_to_a_symlink_writes_its_target(model, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    fourbit.save(model, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_header(target)["config"]["method"] == "rtn"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["m.safetensors"]


def test_temp_files_of_killed_saves_are_removed(model, tmp_path):
    """A save killed between writing and renaming leaves .NAME.PID.*.tmp; the next save of that path removes it
    (only when that process is gone: a concurrent save's file is left alone)."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        import fourbit
        from tests.helpers import TinyNet
        m = fourbit.quantize(TinyNet(), fourbit.RTNConfig(), verbose=False, progress=False)
        os.replace = lambda *a: (print("written", flush=True), time.sleep(600))
        fourbit.save(m, {str(tmp_path / "m.safetensors")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "written"
    live = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(live) == 1 and str(proc.pid) in live[0].name
    fourbit.save(model, tmp_path / "other.safetensors")  # another path: not touched
    fourbit.save(model, tmp_path / "m.safetensors")  # the writer still runs: its file stays
    assert live[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fourbit.save(model, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "other.safetensors"]


def test_saving_onto_a_directory_is_refused_before_work(model, tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        fourbit.save(model, tmp_path)


@pytest.mark.parametrize("make, what", [
    (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
    (lambda p: os.mkfifo(p), "is a FIFO \\(named pipe\\), not a checkpoint file"),
    (lambda p: p.symlink_to(p.parent / "gone"), "a broken symbolic link"),
    (lambda p: None, "no such file"),
])
def test_paths_that_are_not_files_are_named(tmp_path, make, what):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(CheckpointError, match=what):
        fourbit.load(TinyNet(), path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(model, tmp_path):
    path = fourbit.save(model, tmp_path / "m.safetensors")
    os.chmod(path, 0)
    with pytest.raises(CheckpointError, match="not readable .permission denied."):
        read_header(path)


@pytest.mark.parametrize("version", [0, -1, True, 2.0, "2", None])
def test_format_version_is_strictly_an_integer(model, tmp_path, version):
    path = fourbit.save(model, tmp_path / "m.safetensors")
    tensors, header = read_raw(path)
    header["format_version"] = version
    bad = write_raw(tmp_path / "bad.safetensors", tensors, header, resign=True)
    with pytest.raises(CheckpointError, match="format_version .* is not a positive integer"):
        read_header(bad)
