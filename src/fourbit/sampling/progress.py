"""A minimal text progress bar on stderr."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, desc: str = "sampling", enabled: bool = True, width: int = 30) -> None:
        self.total, self.desc, self.enabled, self.width = total, desc, enabled, width
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(
            f"\r{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {elapsed:.1f}s"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
