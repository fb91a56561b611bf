"""The progress bar (issue 20 item 11): fits the terminal, clears instead of padding; calibration shows progress."""
import io
import re

import pytest

import fourbit
from fourbit.utils.progress import Progress

from ..helpers import TinyNet, loop_over, tiny_batches


@pytest.fixture(autouse=True)
def bars_on(monkeypatch):
    monkeypatch.delenv("FOURBIT_PROGRESS", raising=False)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_redraws_fit_the_width_and_clear_the_rest(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): shutil.os.terminal_size((40, 24)))
    out = Terminal()
    with Progress(3, "quantize", stream=out, min_interval=0) as bar:
        for name in ("blocks.0.attn.to_q", "blocks.0.mlp.fc1", "a_very_long_layer_name" * 5):
            bar.update(1, note=name)
    redraws = out.getvalue().rstrip("\n").split("\r")[1:]
    assert len(redraws) == 3
    for r in redraws:
        assert r.endswith("\x1b[K") and len(r) - len("\x1b[K") <= 39  # never wraps an 40-column terminal
        assert "  " * 10 not in r  # no padding to a fixed width


def test_log_lines_without_a_terminal():
    out = io.StringIO()
    with Progress(20, "sample", stream=out, min_interval=0) as bar:
        for _ in range(20):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sample [") and "1/20" in lines[0] and "20/20" in lines[-1]
    assert len(lines) == 11 and "\r" not in out.getvalue()  # the first and every tenth


def test_open_ended_count():
    out = io.StringIO()
    with Progress(None, "calibration", stream=out, min_interval=0, unit="forward calls") as bar:
        for _ in range(5):
            bar.update(1)
    assert [re.match(r"calibration (\d+) forward calls", ln).group(1) for ln in out.getvalue().splitlines()] == \
        ["1", "2", "4", "5"]  # powers of two, then the total when it closes


def test_calibration_shows_progress(capsys):
    fourbit.quantize(TinyNet(), fourbit.SVDQuantConfig(rank=4), forward_loop=loop_over(tiny_batches(3)),
                     verbose=False)
    err = capsys.readouterr().err
    # the first call is drawn at once, the total when calibration ends (whatever the redraw interval let through)
    assert "fourbit calibration (5 layers) 1 forward calls" in err
    assert "fourbit calibration (5 layers) 3 forward calls" in err
