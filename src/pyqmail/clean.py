"""qmail-clean: removes queue files on qmail-send's behalf.

qmail-send may not delete mess/, intd/ or todo/ files itself (in a root
install they belong to qmailq); it asks qmail-clean through a pipe.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from . import spare
from .constants import OSSIFIED, SPLIT
from .home import HOME_HELP, resolve_home
from .queue import fsync_dir


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _remove(spares: spare.SparePool, path: str, name: str) -> bool:
    """Remove a finished queue file, keeping its inode as a spare when the pool has room."""
    try:
        spares.remove(path, name)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _has_other_names(path: str) -> bool:
    try:
        return os.lstat(path).st_nlink > 1
    except OSError:
        return False


def sweep_pids(queue: Path, now: float | None = None) -> None:
    """Remove pid/ files left by qmail-queue processes that died 36 hours ago."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(queue / "pid")
    except OSError:
        return
    for name in names:
        path = queue / "pid" / name
        try:
            if now > os.stat(path).st_atime + OSSIFIED:
                os.unlink(path)
        except OSError:
            pass


# queues whose todo/ has had an entry unlinked since its last fsync here
_todo_unsynced: set[str] = set()


def _todo_durable(queue: Path) -> bool:
    """fsync todo/ if this process unlinked something there since it last did.

    A finished message's files are reused only after its todo/N removal is on disk:
    otherwise a power cut could bring todo/N back, pointing at the envelope file
    (kept at intd/N, or taken from the pool) a new message has written over.
    """
    key = str(queue)
    if key not in _todo_unsynced:
        return True
    try:
        fsync_dir(f"{queue}/todo")
    except OSError:
        return False
    _todo_unsynced.discard(key)
    return True


def handle(queue: Path, command: bytes) -> bytes:
    if len(command) < 7 or len(command) > 100:
        return b"x"
    prefix, number = command[:5], command[5:]
    if not number.isdigit():
        return b"x"
    n = int(number)
    spares = spare.pool(queue, "q")
    if prefix == b"foop/":
        if not _todo_durable(queue):
            return b"!"  # nothing reusable yet; the cleanup pass asks again
        mess = f"{queue}/mess/{n % SPLIT}/{n}"
        # kept at their names, the next message of this number is written over both
        # and neither mess/ nor intd/ changes (see pyqmail.spare)
        if spares.keep_in_place(mess, n):
            ok = True
        else:
            ok = _remove(spares, f"{queue}/intd/{n}", f"intd.{n}")
            if _has_other_names(mess):
                # a killed qmail-queue's pid/ file: a spare must have one name, and reuse
                # would keep that pid/ name young for sweep_pids forever
                ok = _unlink(mess) and ok
            else:
                ok = _remove(spares, mess, f"mess.{n}") and ok
    elif prefix == b"todo/":
        # intd/n, its other name, stays for the next message of this number; without
        # todo/n nobody reads it
        ok = _unlink(f"{queue}/todo/{n}")
        _todo_unsynced.add(str(queue))
    else:
        return b"x"
    return b"+" if ok else b"!"


def serve(queue: Path, cmd_fd: int = 0, reply_fd: int = 1) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    buf = bytearray()
    count = 0
    while True:
        try:
            data = os.read(cmd_fd, 4096)
        except InterruptedError:
            continue
        if not data:
            return 0
        buf += data
        while True:
            end = buf.find(b"\0")
            if end < 0:
                break
            command = bytes(buf[:end])
            del buf[: end + 1]
            if count % 30 == 0:
                sweep_pids(queue)
            count += 1
            try:
                os.write(reply_fd, handle(queue, command))
            except OSError:
                return 100


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    home = None
    if args[:1] in (["-h"], ["--help"]):
        print(f"usage: qmail-clean [--home DIR]\n  {HOME_HELP}")
        sys.exit(0)
    if len(args) >= 2 and args[0] == "--home":
        home = args[1]
    sys.exit(serve(resolve_home(home) / "queue"))
