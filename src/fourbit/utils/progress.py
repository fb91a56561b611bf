"""A dependency-free progress bar on stderr: items done, rate and time left."""
from __future__ import annotations

import os
import sys
import time


class Progress:
    """``with Progress(total, "quantize") as p: ...; p.update(1, note="blocks.3.fc1")``."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, min_interval: float = 0.2):
        self.total, self.desc = max(int(total), 0), desc
        self.stream = stream or sys.stderr
        self.enabled = enabled and os.environ.get("FOURBIT_PROGRESS", "1") != "0"
        self.done = 0
        self.start = time.perf_counter()
        self.min_interval = min_interval
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.min_interval or self.done >= self.total):
            self._last = now
            self._draw(note)

    def _draw(self, note: str) -> None:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        left = elapsed / frac - elapsed if frac > 0 else float("nan")
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"{self.desc} [{bar}] {self.done}/{self.total} "
                f"{_fmt(elapsed)} elapsed, {_fmt(left)} left {note}")[:160]
        if self._tty:
            self.stream.write("\r" + line.ljust(160))
        elif self.done >= self.total or self.done == 1 or self.done % max(1, self.total // 10) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
