"""A dependency-free progress bar on stderr: items done, rate and time left.

On a terminal each redraw goes back to the start of the line (\\r), is cut to the terminal's width and clears
what is left of the previous line (ESC[K), so it never wraps or scrolls; elsewhere (a log file, CI) it writes
a plain line at about every tenth of the work. ``total=None`` counts without an end (calibration: forward
calls of the user's loop).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional

_CLEAR_TO_END = "\x1b[K"


class Progress:
    """``with Progress(total, "quantize") as p: ...; p.update(1, note="blocks.3.fc1")``."""

    def __init__(self, total: Optional[int], desc: str = "", enabled: bool = True, stream=None,
                 min_interval: float = 0.2, unit: str = ""):
        self.total = None if total is None else max(int(total), 0)
        self.desc, self.unit = desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and os.environ.get("FOURBIT_PROGRESS", "1") != "0"
        self.done = 0
        self.start = time.perf_counter()
        self.min_interval = min_interval
        self._last = 0.0
        self._drawn = False
        self._logged = 0  # the count of the last plain line written
        self._note = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if self.enabled and (now - self._last >= self.min_interval or finished):
            self._last = now
            self._draw(note)

    def line(self, note: str = "") -> str:
        """The text of one redraw (no control characters)."""
        elapsed = time.perf_counter() - self.start
        if self.total is None:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            return (f"{self.desc} {self.done}{' ' + self.unit if self.unit else ''} {_fmt(elapsed)} elapsed, "
                    f"{rate:.1f}/s {note}").rstrip()
        frac = self.done / self.total if self.total else 1.0
        left = elapsed / frac - elapsed if frac > 0 else float("nan")
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        return (f"{self.desc} [{bar}] {self.done}/{self.total} "
                f"{_fmt(elapsed)} elapsed, {_fmt(left)} left {note}").rstrip()

    def _draw(self, note: str) -> None:
        self._note = note
        line = self.line(note)
        if self._tty:
            columns = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r" + line[: max(columns - 1, 10)] + _CLEAR_TO_END)
            self._drawn = True
        elif self._log_now():
            self.stream.write(line + "\n")
            self._logged = self.done
        self.stream.flush()

    def _log_now(self) -> bool:
        if self.total is None:
            return self.done == 1 or (self.done & (self.done - 1)) == 0  # 1, 2, 4, 8, ... calls
        return self.done >= self.total or self.done == 1 or self.done % max(1, self.total // 10) == 0

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tty and self._drawn:
            self.stream.write("\n")
        elif not self._tty and self.total is None and self.done and self._logged != self.done:
            self.stream.write(self.line(self._note) + "\n")  # an open-ended count ends with its total
        self.stream.flush()


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
