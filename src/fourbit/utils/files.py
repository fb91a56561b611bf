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


# ---- atomic writes -------------------------------------------------------------------------------------
_TMP_SUFFIX = ".tmp"


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename, fsync the folder.

    A symbolic link is followed (its target is replaced, the link stays). The file gets the mode of the file it
    replaces, or 0666 minus the umask when new (not mkstemp's 0600). The temporary file is removed on any error,
    and ones left by killed writers of the same path (their process gone) are removed first. Returns ``path``.
    """
    path = Path(path)
    check_output_file(path)
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return path


def remove_stale_temp_files(target: Path) -> list[Path]:
    """Remove ``.<name>.<pid>.*.tmp`` files next to ``target`` whose writing process no longer exists (a save
    that was killed); returns them. Files of a live process (a concurrent save) are left alone."""
    removed = []
    prefix = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
