"""A failing rank ends the whole run with one line per process, never a hang.

Three ways a rank stops: its own error (``report_and_exit``), a collective that fails or outlives the timeout
because another rank died or stalled (the same path, the error says which collective), or the launcher's
SIGTERM after another rank died. A C++ collective blocks the main thread without running Python signal
handlers, so SIGTERM is also watched through ``signal.set_wakeup_fd`` by a small thread that can report and
exit while the main thread is stuck. Each process prints at most one line (a lock guards it) and exits with
``os._exit`` so that no background thread or half-closed process group can keep it alive.

Test hooks (read once, at launch): ``FOURBIT_FAIL_RANK=r`` makes rank r raise right after the process group is
up; ``FOURBIT_HANG_RANK=r`` makes rank r sleep, so the others meet the collective timeout.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

_lock = threading.RLock()  # re-entrant: a signal handler may interrupt the main thread inside it
_reported = [False]


def _say_once(line: str) -> bool:
    """Print ``line`` unless this process already reported; a second caller waits until the first has printed
    (the main thread's signal handler and the watch thread may both be on their way to ``os._exit``)."""
    with _lock:
        if _reported[0]:
            return False
        _reported[0] = True
        try:
            sys.stdout.flush()
        except Exception:  # stdout may be closed by the launcher; the line below still goes to stderr
            pass
        print(line, file=sys.stderr, flush=True)
        return True


def short(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_and_exit(prefix: str, exc: BaseException, code: int = 1) -> None:
    """Print ``prefix: Type: message`` once for this process and end it at once."""
    _say_once(f"{prefix}: {short(exc)}")
    os._exit(code)


def install_signal_report(prefix: str) -> None:
    """On SIGTERM (what torchrun sends the others when one rank fails) print one line and exit 143."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; the launcher's kill still ends us

    def stop(signum: int) -> None:
        _say_once(f"{prefix} stopped by the launcher ({signal.Signals(signum).name}), most likely because "
                  f"another rank failed; see that rank's line")
        os._exit(128 + signum)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop(signum))
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 1)
            if not data:
                return
            if data[0] == signal.SIGTERM:
                stop(data[0])

    threading.Thread(target=watch, name="fourbit-signal-watch", daemon=True).start()


def injected_failure(rank: int) -> None:
    """The test hooks: raise on ``FOURBIT_FAIL_RANK``, sleep on ``FOURBIT_HANG_RANK`` (when they name ``rank``)."""
    if os.environ.get("FOURBIT_FAIL_RANK") == str(rank):
        raise RuntimeError(f"injected failure on rank {rank} (FOURBIT_FAIL_RANK={rank})")
    if os.environ.get("FOURBIT_HANG_RANK") == str(rank):
        while True:  # the other ranks' collective timeout and then the launcher end this process
            time.sleep(1.0)
