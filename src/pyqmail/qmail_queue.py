"""qmail-queue: put one message into the queue, crash-safely.

Message on fd 0, envelope on fd 1 (`F<sender>\\0T<rcpt>\\0...\\0`), exit code only.
The order of operations is qmail's; the extra directory fsyncs make the
links durable on Linux filesystems, where link() returning is not enough.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .constants import ADDRESS_LIMIT, DEATH, SPLIT
from .fmt import rfc822_date
from .home import resolve_home
from .queue import fsync_dir, pull_trigger

# qmail-queue's own exit codes
QQ_OK = 0
QQ_ADDR_TOO_LONG = 11
QQ_NOMEM = 51
QQ_TIMEOUT = 52
QQ_WRITE = 53
QQ_READ = 54
QQ_HOME = 61
QQ_QUEUE = 62
QQ_PID = 63
QQ_MESS = 64
QQ_INTD = 65
QQ_TODO = 66
QQ_BUG = 81
QQ_ENVELOPE = 91

_CHUNK = 65536


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def invoked_how(uid: int) -> str:
    """qmail's `invoked ...` phrase, chosen by the caller's real uid."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = ""
    return {"alias": "by alias", "qmaild": "from network", "qmails": "for bounce"}.get(
        name, f"by uid {uid}"
    )


def received_line(pid: int, how: str, when: float) -> bytes:
    return f"Received: (qmail {pid} invoked {how}); {rfc822_date(when)}\n".encode()


def _read(fd: int, n: int) -> bytes:
    try:
        return os.read(fd, n)
    except OSError:
        raise _Exit(QQ_READ) from None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        raise _Exit(QQ_WRITE) from None


def _read_envelope(fd: int) -> bytes:
    """Validate the envelope and return what goes into intd after `u` and `p`."""
    data = bytearray()
    while True:
        chunk = _read(fd, _CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > 64 * 1024 * 1024:
            raise _Exit(QQ_NOMEM)
    if not data:
        raise _Exit(QQ_READ)
    if data[0:1] != b"F":
        raise _Exit(QQ_ENVELOPE)
    out = bytearray()
    pos = 0
    first = True
    while True:
        if pos >= len(data):
            raise _Exit(QQ_READ)
        letter = data[pos : pos + 1]
        if not first:
            if letter == b"\0":
                return bytes(out)
            if letter != b"T":
                raise _Exit(QQ_ENVELOPE)
        first = False
        end = data.find(b"\0", pos + 1)
        if end < 0:
            # the address never ended: too long if it is already over the limit
            if len(data) - pos - 1 > ADDRESS_LIMIT:
                raise _Exit(QQ_ADDR_TOO_LONG)
            raise _Exit(QQ_READ)
        if end - pos - 1 > ADDRESS_LIMIT:
            raise _Exit(QQ_ADDR_TOO_LONG)
        out += data[pos : end + 1]
        pos = end + 1


def enqueue(queue: Path, msg_fd: int, env_fd: int, how: str, uid: int | None = None) -> int:
    """Run qmail-queue's algorithm against `queue`; returns qmail-queue's exit code."""
    pid = os.getpid()
    start = time.time()
    real_uid = os.getuid() if uid is None else uid
    received = received_line(pid, how, start)
    old_umask = os.umask(0o033)
    made: list[str] = []  # files only write/read failures may remove (as qmail)
    try:
        try:
            os.stat(queue)
        except OSError:
            return QQ_QUEUE
        pidfn = ""
        for seq in range(1, 10):
            candidate = f"{queue}/pid/{pid}.{int(start)}.{seq}"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            except OSError:
                return QQ_PID
            pidfn = candidate
            break
        else:
            return QQ_PID
        try:
            n = os.fstat(fd).st_ino
            messfn = f"{queue}/mess/{n % SPLIT}/{n}"
            intdfn = f"{queue}/intd/{n}"
            todofn = f"{queue}/todo/{n}"
            try:
                os.link(pidfn, messfn)
            except OSError:
                return QQ_MESS
            try:
                os.unlink(pidfn)
            except OSError:
                return QQ_PID
            made.append(messfn)
            try:
                _write_all(fd, received)
                while True:
                    chunk = _read(msg_fd, _CHUNK)
                    if not chunk:
                        break
                    _write_all(fd, chunk)
                os.fsync(fd)
                fsync_dir(f"{queue}/mess/{n % SPLIT}")
            except _Exit:
                raise
            except OSError:
                raise _Exit(QQ_WRITE) from None
        finally:
            os.close(fd)
        try:
            ifd = os.open(intdfn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return QQ_INTD
        made.append(intdfn)
        try:
            envelope = _read_envelope(env_fd)
            _write_all(ifd, b"u%d\0p%d\0" % (real_uid, pid) + envelope)
            try:
                os.fsync(ifd)
            except OSError:
                raise _Exit(QQ_WRITE) from None
        finally:
            os.close(ifd)
        try:
            os.link(intdfn, todofn)
            fsync_dir(f"{queue}/todo")
        except OSError:
            return QQ_TODO
        made.clear()  # committed: the queue owns it now
        pull_trigger(queue)
        return QQ_OK
    except _Exit as e:
        if e.code in (QQ_WRITE, QQ_READ):
            for fn in made:
                try:
                    os.unlink(fn)
                except OSError:
                    pass
        return e.code
    except MemoryError:
        return QQ_NOMEM
    finally:
        os.umask(old_umask)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    os._exit(QQ_TIMEOUT)


def run_child(queue: Path, how: str, uid: int | None = None) -> int:
    """Body of a qmail-queue process whose fds 0 and 1 are already wired."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(DEATH)
    try:
        return enqueue(queue, 0, 1, how, uid)
    except Exception:
        return QQ_BUG


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    home = None
    if len(args) >= 2 and args[0] == "--home":
        home = args[1]
    elif args and args[0].startswith("--home="):
        home = args[0].split("=", 1)[1]
    elif args and args[0] in ("-h", "--help"):
        sys.stderr.write(
            "usage: qmail-queue [--home DIR]\n"
            "  reads a message on fd 0 and an envelope on fd 1; exit 0 = queued.\n"
            "  home: --home, else $QMAILHOME, else /var/qmail as root, else ~/.pyqmail\n"
        )
        sys.exit(100)
    root = resolve_home(home)
    try:
        os.chdir(root)
    except OSError as e:
        sys.exit(QQ_HOME if e.errno != errno.ENOMEM else QQ_NOMEM)
    sys.exit(run_child(root / "queue", invoked_how(os.getuid())))
