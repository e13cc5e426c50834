"""qmail-queue: put one message into the queue, crash-safely.

Message on fd 0, envelope on fd 1 (`F<sender>\\0T<rcpt>\\0...\\0`), exit code only.
The order of operations is qmail's, but for the envelope being written before
the message's fsync returns (Enqueuer.commit); the extra directory fsyncs make
the links durable on Linux filesystems, where link() returning is not enough.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import spare
from .constants import ADDRESS_LIMIT, DEATH, SPLIT
from .fmt import rfc822_date
from .home import resolve_home
from .queue import fsync_dir, pull_trigger, start_writeback

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
WRITE_BATCH = 65536  # message bytes gathered before a write to the mess file


class QueueExit(Exception):
    """A qmail-queue exit code, raised where qmail-queue would exit."""

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
        raise QueueExit(QQ_READ) from None


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        raise QueueExit(QQ_WRITE) from None


def _read_envelope(fd: int) -> bytes:
    """Read the envelope from fd to its end; returns what goes into intd after `u` and `p`."""
    data = bytearray()
    while True:
        chunk = _read(fd, _CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > 64 * 1024 * 1024:
            raise QueueExit(QQ_NOMEM)
    return check_envelope(data)


def check_envelope(data: bytes | bytearray) -> bytes:
    """Validate a whole envelope; returns what goes into intd after `u` and `p`."""
    if not data:
        raise QueueExit(QQ_READ)
    if data[0:1] != b"F":
        raise QueueExit(QQ_ENVELOPE)
    out = bytearray()
    pos = 0
    first = True
    while True:
        if pos >= len(data):
            raise QueueExit(QQ_READ)
        letter = data[pos : pos + 1]
        if not first:
            if letter == b"\0":
                return bytes(out)
            if letter != b"T":
                raise QueueExit(QQ_ENVELOPE)
        first = False
        end = data.find(b"\0", pos + 1)
        if end < 0:
            # the address never ended: too long if it is already over the limit
            if len(data) - pos - 1 > ADDRESS_LIMIT:
                raise QueueExit(QQ_ADDR_TOO_LONG)
            raise QueueExit(QQ_READ)
        if end - pos - 1 > ADDRESS_LIMIT:
            raise QueueExit(QQ_ADDR_TOO_LONG)
        out += data[pos : end + 1]
        pos = end + 1


def _open_kept_envelope(intdfn: str) -> int | None:
    """intd/N kept from the last message of this number, opened to be written over.

    Written in place, intd/ stays unchanged, so the envelope's fsync has no directory
    to write (see pyqmail.spare).  None when there is none.  An intd file with a second
    name is linked into todo/: a live envelope, never to be touched, which means
    this number is not ours (QQ_INTD).
    """
    try:
        fd = os.open(intdfn, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        raise QueueExit(QQ_INTD) from None
    try:
        st = os.fstat(fd)
        usable = stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    except OSError:
        usable = False
    if not usable:
        os.close(fd)
        raise QueueExit(QQ_INTD)
    return fd


class Enqueuer:
    """qmail-queue's algorithm in steps, so a caller can stream a message into the queue.

    begin() makes the mess file (a spare renamed to mess/N/inode, else qmail's pid
    file linked there) and starts with the Received line; write() appends message
    bytes (gathered into large writes); commit() makes it durable and links it into
    todo; abort() removes what was made.  Each returns or raises qmail-queue's
    exit code (as QueueExit).  qmail-queue itself and callers that run as the queue's
    owner (qmail-smtpd in a single-user install) share this code, so the commit
    order and the crash-safety argument are the same for both.
    """

    def __init__(self, queue: str | os.PathLike[str], how: str, uid: int | None = None) -> None:
        self.queue = os.fspath(queue)  # a str: the names below are made per message
        self.how = how
        self.pid = os.getpid()
        self.uid = os.getuid() if uid is None else uid
        self.fd = -1
        self.inode = 0
        self.size = 0  # bytes written to the mess file
        self.pending = bytearray()  # bytes for the mess file not yet written
        self.made: list[str] = []  # files only write/read failures may remove (as qmail)
        # whether the mess file's name in mess/N is durable already (a spare kept there)
        self.mess_named = False

    def begin(self) -> None:
        queue = self.queue
        start = time.time()
        try:
            os.stat(queue)
        except OSError:
            raise QueueExit(QQ_QUEUE) from None
        # best a spare still at its mess name; else a spare's inode number is known
        # before it is renamed, so it becomes mess/N/inode in one step; only a new
        # file needs qmail's pid file
        spares = spare.pool(queue, "q")
        taken = spares.take_in_place(queue)
        self.mess_named = taken is not None
        if taken is None:
            taken = spares.take_as(lambda ino: f"{queue}/mess/{ino % SPLIT}/{ino}")
        if taken is not None:
            self.fd, messfn = taken
            self.inode = int(messfn.rsplit("/", 1)[1])
        else:
            messfn = self._new_mess(start)
        self.made.append(messfn)
        self.pending += received_line(self.pid, self.how, start)

    def _new_mess(self, start: float) -> str:
        """qmail's way: create pid/..., link it to mess/N/inode, unlink the pid file."""
        queue = self.queue
        old_umask = os.umask(0o033)
        try:
            for seq in range(1, 10):
                pidfn = f"{queue}/pid/{self.pid}.{int(start)}.{seq}"
                try:
                    fd = os.open(pidfn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                except OSError:
                    raise QueueExit(QQ_PID) from None
                break
            else:
                raise QueueExit(QQ_PID)
        finally:
            os.umask(old_umask)
        self.fd = fd
        try:
            self.inode = n = os.fstat(fd).st_ino
            messfn = f"{queue}/mess/{n % SPLIT}/{n}"
            try:
                os.link(pidfn, messfn)
            except OSError:
                raise QueueExit(QQ_MESS) from None
            try:
                os.unlink(pidfn)
            except OSError:
                raise QueueExit(QQ_PID) from None
        except QueueExit:
            self.close()
            raise
        return messfn

    def write(self, data: bytes | memoryview) -> None:
        # gathered, so a message costs a few large writes instead of one per read
        pending = self.pending
        pending += data
        if len(pending) >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            _write_all(self.fd, self.pending)
            self.size += len(self.pending)
            del self.pending[:]

    def commit(self, read_envelope: Callable[[], bytes]) -> None:
        """Make the message and its envelope durable, then hand them to qmail-send.

        read_envelope runs after intd exists, as in qmail-queue, and returns what
        follows `u` and `p` in it (see _read_envelope) or raises QueueExit.

        qmail writes and fsyncs the message, then writes and fsyncs intd.  Here both
        are written first, with their writeback started (start_writeback), and then
        fsync'd in that order, so the disk works on both at once.  The commit point is
        unchanged: todo is linked only once both fsyncs have returned, so a crash
        before it leaves at most a message and an envelope that are not in todo, as a
        crash between qmail's two fsyncs does.
        """
        try:
            self._commit(read_envelope)
        finally:
            self.close()

    def _commit(self, read_envelope: Callable[[], bytes]) -> None:
        queue, n = self.queue, self.inode
        self.flush()
        try:
            spare.finish(self.fd, self.size)
        except OSError:
            raise QueueExit(QQ_WRITE) from None
        start_writeback(self.fd)
        intdfn = f"{queue}/intd/{n}"
        taken = _open_kept_envelope(intdfn)
        if taken is None:
            taken = spare.pool(queue, "q").take(intdfn)
        if taken is not None:
            ifd = taken
        else:
            old_umask = os.umask(0o033)
            try:
                ifd = os.open(intdfn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError:
                raise QueueExit(QQ_INTD) from None
            finally:
                os.umask(old_umask)
        self.made.append(intdfn)
        try:
            envelope = b"u%d\0p%d\0" % (self.uid, self.pid) + read_envelope()
            _write_all(ifd, envelope)
            try:
                spare.finish(ifd, len(envelope))
                start_writeback(ifd)
                os.fsync(self.fd)
                if not self.mess_named:
                    fsync_dir(f"{queue}/mess/{n % SPLIT}")
                os.fsync(ifd)
            except OSError:
                raise QueueExit(QQ_WRITE) from None
        finally:
            os.close(ifd)
        try:
            os.link(intdfn, f"{queue}/todo/{n}")
        except OSError:
            raise QueueExit(QQ_TODO) from None
        self.made.clear()  # linked into todo: the queue owns it now, whatever happens next
        try:
            fsync_dir(f"{queue}/todo")
        except OSError:
            raise QueueExit(QQ_TODO) from None
        pull_trigger(queue)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Remove what this message made; qmail-send's cleanup would otherwise do it in 36 h."""
        self.close()
        self.pending.clear()
        for fn in self.made:
            try:
                os.unlink(fn)
            except OSError:
                pass
        self.made.clear()


def enqueue(queue: Path, msg_fd: int, env_fd: int, how: str, uid: int | None = None) -> int:
    """Run qmail-queue's algorithm against `queue`; returns qmail-queue's exit code."""
    job = Enqueuer(queue, how, uid)
    try:
        job.begin()
        while True:
            chunk = _read(msg_fd, _CHUNK)
            if not chunk:
                break
            job.write(chunk)
            job.flush()  # reads from a pipe come in large pieces already
        job.commit(lambda: _read_envelope(env_fd))
        return QQ_OK
    except QueueExit as e:
        if e.code in (QQ_WRITE, QQ_READ):
            job.abort()
        job.close()
        return e.code
    except MemoryError:
        job.close()
        return QQ_NOMEM


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
