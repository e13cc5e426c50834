"""The on-disk queue: layout, paths and durability helpers (qmail's queue/ directory)."""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path
from typing import Any

from .constants import SPLIT

SPLIT_DIRS = ("mess", "info", "local", "remote")
FLAT_DIRS = ("pid", "intd", "todo", "bounce", "lock")
TCPTO_SIZE = 1024


def split_of(n: int) -> int:
    return n % SPLIT


def rel(kind: str, n: int) -> str:
    """Queue-relative name as qmail logs it: `local/20/457`, `todo/457`."""
    if kind in SPLIT_DIRS:
        return f"{kind}/{n % SPLIT}/{n}"
    return f"{kind}/{n}"


def fsync_dir(path: Path | str) -> None:
    """Make a link/unlink/rename in `path` durable (ext4 does not do it for us)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def libc_function(name: str, argtypes: list[Any]) -> Any:
    """The C library's function `name` returning int, with errno kept; None if it has none.

    For the Linux calls Python's os module lacks; callers fall back without them.
    """
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2
# not on Linux: every fsync then does all the work itself
_sync_file_range: Any = libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)


def start_writeback(fd: int) -> None:
    """Have the kernel start writing fd's data to disk now, without waiting for it.

    Only a head start, never a promise: fsync still decides what is durable.  A
    commit that must fsync two files starts both files' writes first, so the disk
    works on them together, and each fsync is left with less to wait for (measured
    here: two reused queue files and a directory durable in about 0.35 ms instead of
    0.5).  Errors are ignored: the fsync that follows meets them again.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def make_queue(queue: Path) -> list[Path]:
    """Create every queue directory and lock file that is missing; returns what was made."""
    made: list[Path] = []

    def mkdir(p: Path, mode: int) -> None:
        if not p.is_dir():
            p.mkdir(mode=mode)
            os.chmod(p, mode)
            made.append(p)

    mkdir(queue, 0o750)
    for name in FLAT_DIRS:
        mkdir(queue / name, 0o700 if name in ("pid", "intd", "bounce") else 0o750)
    for name in SPLIT_DIRS:
        mkdir(queue / name, 0o750 if name == "mess" else 0o700)
        for i in range(SPLIT):
            mkdir(queue / name / str(i), 0o750 if name == "mess" else 0o700)
    # recycled files (pyqmail.spare): q for qmail-queue's, s for qmail-send's
    mkdir(queue / "spare", 0o700)
    mkdir(queue / "spare" / "q", 0o700)
    mkdir(queue / "spare" / "s", 0o700)
    lock = queue / "lock"
    mutex = lock / "sendmutex"
    if not mutex.exists():
        mutex.touch(mode=0o600)
        made.append(mutex)
    trigger = lock / "trigger"
    if not trigger.exists():
        os.mkfifo(trigger, 0o622)
        os.chmod(trigger, 0o622)
        made.append(trigger)
    elif not stat.S_ISFIFO(trigger.stat().st_mode):
        raise OSError(f"{trigger} exists but is not a named pipe")
    tcpto = lock / "tcpto"
    if not tcpto.exists():
        tcpto.write_bytes(b"\0" * TCPTO_SIZE)
        os.chmod(tcpto, 0o644)
        made.append(tcpto)
    return made


def pull_trigger(queue: Path | str) -> None:
    """Wake qmail-send: one byte into lock/trigger; nobody listening is not an error."""
    try:
        fd = os.open(f"{queue}/lock/trigger", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, b"\0")
    except OSError:
        pass
    finally:
        os.close(fd)
