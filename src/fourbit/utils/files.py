"""Output paths checked before work starts, and what an input path is when it is not a readable file."""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def error_text(err: BaseException) -> str:
    """An OSError as 'file: reason' (without '[Errno N]'), anything else as its message."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def describe(path: Path) -> str:
    """What is at ``path`` when it is not a regular file, in words ("a directory", "a FIFO", ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file" if not os.path.islink(path) else "a broken symbolic link"
    except PermissionError:
        return "not accessible (permission denied)"
    except OSError as err:
        return f"not accessible ({err.strerror})"
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a regular file"


def check_readable_file(path: PathLike) -> Path:
    """``path`` as a Path if it is a readable regular file; else ValueError/FileNotFoundError saying what it is."""
    path = Path(path)
    what = describe(path)
    if what == "no such file":
        raise FileNotFoundError(f"{path}: no such file")
    if what != "a regular file":
        raise ValueError(f"{path}: is {what}, not a checkpoint file" if what.startswith("a ")
                         else f"{path}: {what}")
    if not os.access(path, os.R_OK):
        raise PermissionError(errno.EACCES, f"{path}: not readable (permission denied)")
    return path


def check_output_file(path: PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (a symbolic link: at its target): the
    target is not a directory or other non-file, and its folder exists or can be created and takes new files.
    Returns the path. Raises ValueError / OSError with one sentence."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise ValueError(f"{path}: is {describe(target)}; give a file path for the output")
    _check_folder(target.parent, path)
    return path


def check_output_dir(path: PathLike) -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a directory that takes new files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is {describe(path)}, not a directory; give a directory for the output")
    _check_folder(path, path)
    return path


def _check_folder(folder: Path, shown: Path) -> None:
    existing = folder
    while not existing.exists():  # the first ancestor that exists must be a writable directory
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{shown}: cannot create it: {existing} is {describe(existing)}, not a directory")
    try:  # os.access is not enough (root, read-only mounts): create and remove a file
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".fourbit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"{shown}: cannot write in {existing} ({err.strerror})") from None
