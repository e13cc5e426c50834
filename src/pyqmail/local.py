"""qmail-local: deliver one message to one local address by following its .qmail file.

The message is on `msg_fd` (seekable).  Reports go to fd 1 (the summary) and
fd 2 (one error line), which qmail-lspawn joins into one pipe; the exit code
is 0 (delivered), 100 (permanent failure) or 111 (try again later).

Maildir and mbox deliveries happen in this process; only `|program` lines
start a new process (/bin/sh).  When called from qmail-lspawn this function
already runs in a freshly forked child, so changing cwd, umask and the
environment here affects nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from .constants import EXIT_PERM, EXIT_TEMP, PATRN
from .fmt import ctime_stamp, quote2
from .home import resolve_home
from .qq import QueueClient
from .sig import get_handler, set_handler

USAGE = (
    "qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender aliasempty"
)

# errno values qmail treats as "try again later" (its error_temp list)
TEMP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EINTR",
        "ENOMEM",
        "ETXTBSY",
        "EIO",
        "ETIMEDOUT",
        "EWOULDBLOCK",
        "EAGAIN",
        "EDEADLK",
        "EBUSY",
        "ENFILE",
        "EMFILE",
        "EFBIG",
        "ENOSPC",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "ECONNABORTED",
        "ECONNRESET",
        "ENOBUFS",
        "ECONNREFUSED",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "EUSERS",
        "EDQUOT",
        "ESTALE",
        "EREMOTE",
        "ENOLCK",
    )
    if hasattr(errno, name)
)

# program exit codes that make the whole delivery fail permanently
PERM_PROGRAM_CODES = frozenset({100, 64, 65, 70, 76, 77, 78, 112})

_CHUNK = 65536
_FROM_RE = re.compile(rb">*From ")
MAILDIR_TIMEOUT = 86400
MBOX_LOCK_TIMEOUT = 30

# (sender, recipients, dtline, msg_fd) -> (exit code, error line, qp), as queue_forward
ForwardFn = Callable[[str, list[str], bytes, int], tuple[int, str, int]]


def is_temp_errno(code: int | None) -> bool:
    return code in TEMP_ERRNOS


def _err(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno is not None else str(e)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class Die(Exception):
    """Stop the delivery: print `text` (unless empty) on fd 2 and exit with `code`."""

    def __init__(self, code: int, text: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Alarm(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Alarm()


class _AlarmGuard:
    """signal.alarm(seconds) raising _Alarm, with the old handler restored afterwards."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.old: object = None

    def __enter__(self) -> _AlarmGuard:
        self.old = set_handler(signal.SIGALRM, _on_alarm)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        set_handler(signal.SIGALRM, self.old)  # type: ignore[arg-type]


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue


def _say(fd: int, text: str) -> None:
    try:
        _write_fd(fd, _b(text))
    except OSError:
        pass  # nobody listens for the report any more; the exit code still tells


def rewind(fd: int) -> None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        raise Die(EXIT_TEMP, "Unable to rewind message. (#4.3.0)") from None


def read_chunks(fd: int) -> Iterator[bytes]:
    """The message from its current offset; read errors raise OSError to the caller."""
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except InterruptedError:
            continue
        if not chunk:
            return
        yield chunk


def read_lines(fd: int) -> Iterator[bytes]:
    """Lines with their `\\n`; a partial last line comes without one."""
    rest = b""
    for chunk in read_chunks(fd):
        data = rest + chunk
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            yield data[start : nl + 1]
            start = nl + 1
        rest = data[start:]
    if rest:
        yield rest


# -- pieces derived from the arguments ------------------------------------------------


def host_cut(host: str, times: int) -> str:
    """HOST2..HOST4: cut before the last `.` `times` times; with no `.` left, stop cutting."""
    end = len(host)
    for _ in range(times):
        dot = host.rfind(".", 0, end)
        if dot >= 0:
            end = dot
    return host[:end]


def ext_after(ext: str, times: int) -> str:
    """EXT2..EXT4: the text after the `times`-th `-` (empty when there are fewer)."""
    pos = 0
    for _ in range(times):
        dash = ext.find("-", pos)
        if dash < 0:
            return ""
        pos = dash + 1
    return ext[pos:]


def make_ufline(sender: str, when: float) -> str:
    if sender:
        shown = "".join("-" if c in " \t\n" else c for c in sender)
    else:
        shown = "MAILER-DAEMON"
    return f"From {shown} {ctime_stamp(when)}\n"


def make_rpline(sender: str) -> str:
    return "Return-Path: <" + quote2(sender).replace("\n", "_") + ">\n"


def make_dtline(local: str, domain: str) -> str:
    return "Delivered-To: " + f"{local}@{domain}".replace("\n", "_") + "\n"


def safe_ext(ext: str) -> str:
    return ext.lower().replace(".", ":")


def qmail_candidates(dash: str, ext: str) -> list[tuple[str, int | None]]:
    """The .qmail names tried in order, each with the ext offset DEFAULT starts at (or None)."""
    sx = safe_ext(ext)
    names: list[tuple[str, int | None]] = [(".qmail" + dash + sx, None)]
    for i in range(len(sx), -1, -1):
        if i == 0 or sx[i - 1] == "-":
            names.append((".qmail" + dash + sx[:i] + "default", i))
    return names


# -- one delivery ---------------------------------------------------------------------


@dataclass
class _State:
    home: Path
    user: str
    homedir: str
    local: str
    dash: str
    ext: str
    domain: str
    sender: str
    defaultdelivery: str
    msg_fd: int
    doit: bool
    dtline: bytes = b""
    rpline: bytes = b""
    ufline: bytes = b""
    newsender: str = ""
    count_file: int = 0
    count_forward: int = 0
    count_program: int = 0
    forwards: list[str] = field(default_factory=list)
    stop_after_program: bool = False
    qp: int = 0
    forwarder: ForwardFn | None = None
    # qmail-local's environment for programs and forwards; exported only when one runs
    env: dict[str, str] = field(default_factory=dict)


_maildir_seq = 0
# False once this kernel or filesystem turned down an unnamed file (O_TMPFILE) or
# its linking through /proc: deliveries then use qmail's tmp/ file
_tmpfile_ok = True
_LINK_ATTEMPTS = 3


# this process's pid and host name for maildir file names, looked up once per process:
# a delivery worker makes many names, and a name only needs to be unique
_maildir_pid = ""
_maildir_hostname = ""


def _forget_maildir_ids() -> None:
    global _maildir_pid, _maildir_hostname
    _maildir_pid = _maildir_hostname = ""


os.register_at_fork(after_in_child=_forget_maildir_ids)


def _maildir_host() -> str:
    global _maildir_hostname
    if not _maildir_hostname:
        host = socket.gethostname()[:64] or "localhost"
        # `/` and `:` would break the file name or the maildir info separator
        _maildir_hostname = host.replace("/", "\\057").replace(":", "\\072")
    return _maildir_hostname


def _maildir_name() -> str:
    global _maildir_seq, _maildir_pid
    _maildir_seq += 1
    if not _maildir_pid:
        _maildir_pid = str(os.getpid())
    # qmail forks one child per maildir line, so its pid is unique per delivery;
    # here one process may deliver several times in a second
    pid = _maildir_pid
    if _maildir_seq > 1:
        pid += f"_{_maildir_seq}"
    return f"{int(time.time())}.{pid}.{_maildir_host()}"


def _write_message(fd: int, rpline: bytes, dtline: bytes, msg_fd: int, error: Die) -> None:
    """RPLINE + DTLINE + the message from msg_fd's start into fd, then fsync(fd)."""
    rewind(msg_fd)
    head = rpline + dtline
    chunks = read_chunks(msg_fd)
    while True:
        try:
            chunk = next(chunks, None)
        except OSError:
            raise Die(EXIT_TEMP, "Unable to read message. (#4.3.0)") from None
        try:
            if chunk is None:
                if head:
                    _write_fd(fd, head)
                break
            # the delivery lines go out with the first piece: one write, not two
            _write_fd(fd, head + chunk if head else chunk)
            head = b""
        except OSError:
            raise error from None
    try:
        os.fsync(fd)
    except OSError:
        raise error from None


def _fsync_new(dfd: int, error: Die) -> None:
    try:
        newfd = os.open("new", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
        try:
            os.fsync(newfd)
        finally:
            os.close(newfd)
    except OSError:
        raise error from None


def _proc_fd_usable(fd: int) -> bool:
    try:
        os.stat(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return True


def _deliver_unnamed(dfd: int, rpline: bytes, dtline: bytes, msg_fd: int, error: Die) -> bool:
    """Maildir delivery through an unnamed file: written and fsync'd in tmp/'s filesystem
    with no name, then given its one name in new/.  Nothing is left in tmp/ to remove
    and nothing half-written can ever be seen, even after a crash (the kernel frees an
    unnamed file).  False if this system cannot do it; nothing was delivered then.
    """
    global _tmpfile_ok
    try:
        fd = os.open("tmp", os.O_WRONLY | os.O_TMPFILE, 0o644, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.EOPNOTSUPP, errno.EINVAL):
            _tmpfile_ok = False  # an old kernel or a filesystem without unnamed files
            return False
        raise error from None
    try:
        _write_message(fd, rpline, dtline, msg_fd, error)
        for _ in range(_LINK_ATTEMPTS):
            try:
                os.link(f"/proc/self/fd/{fd}", "new/" + _maildir_name(), dst_dir_fd=dfd)
                break
            except FileExistsError:
                # unlike a linked tmp/ file, this name is someone else's message
                continue
            except OSError:
                if _proc_fd_usable(fd):
                    raise error from None  # new/ is missing, unwritable, full...
                _tmpfile_ok = False  # no /proc here, or it will not let us through
                return False
        else:
            raise error
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # written and fsync'd already, or failing for another reason anyway
    _fsync_new(dfd, error)
    return True


def _deliver_via_tmp(dfd: int, rpline: bytes, dtline: bytes, msg_fd: int, error: Die) -> None:
    """qmail's way: a unique name in tmp/, written, fsync'd, linked to new/, unlinked."""
    fd = -1
    tmpname = ""
    for attempt in range(3):
        name = _maildir_name()
        try:
            fd = os.open("tmp/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
        except FileExistsError:
            if attempt == 2:
                raise error from None
            time.sleep(2)
            continue
        except OSError:
            raise error from None
        tmpname = name
        break
    try:
        try:
            _write_message(fd, rpline, dtline, msg_fd, error)
        finally:
            try:
                os.close(fd)
            except OSError:
                raise error from None
        try:
            os.link("tmp/" + tmpname, "new/" + tmpname, src_dir_fd=dfd, dst_dir_fd=dfd)
        except FileExistsError:
            pass  # as qmail: an existing new/ name almost surely means it worked
        except OSError:
            raise error from None
        _fsync_new(dfd, error)
    finally:
        try:
            os.unlink("tmp/" + tmpname, dir_fd=dfd)
        except OSError:
            pass


def deliver_maildir(path: bytes, rpline: bytes, dtline: bytes, msg_fd: int) -> None:
    """Write RPLINE + DTLINE + message into maildir `path`, fsync'd, then named in new/."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if is_temp_errno(e.errno):
            raise Die(EXIT_TEMP, "Temporary error on maildir delivery. (#4.3.0)") from None
        raise Die(EXIT_TEMP, "Unable to chdir to maildir. (#4.2.1)") from None
    error = Die(EXIT_TEMP, "Temporary error on maildir delivery. (#4.3.0)")
    try:
        with _AlarmGuard(MAILDIR_TIMEOUT):
            if not (_tmpfile_ok and _deliver_unnamed(dfd, rpline, dtline, msg_fd, error)):
                _deliver_via_tmp(dfd, rpline, dtline, msg_fd, error)
    except _Alarm:
        raise Die(EXIT_TEMP, "Timeout on maildir delivery. (#4.3.0)") from None
    finally:
        os.close(dfd)


def deliver_mbox(path: bytes, ufline: bytes, rpline: bytes, dtline: bytes, msg_fd: int) -> None:
    """Append one mboxrd record (From_ line, >From quoting, blank separator) under flock."""
    rewind(msg_fd)
    name = _s(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise Die(EXIT_TEMP, f"Unable to open {name}: {_err(e)}. (#4.2.1)") from None
    try:
        locked = False
        try:
            with _AlarmGuard(MBOX_LOCK_TIMEOUT):
                fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except _Alarm:
            raise Die(EXIT_TEMP, "File has been locked for 30 seconds straight. (#4.3.0)") from None
        except OSError:
            locked = False  # a filesystem without locks: deliver unlocked, as qmail does
        pos = os.lseek(fd, 0, os.SEEK_END)

        def undo() -> None:
            if locked:
                try:
                    os.ftruncate(fd, pos)
                except OSError:
                    pass

        out = bytearray(ufline + rpline + dtline)
        try:
            lines = read_lines(msg_fd)
            while True:
                try:
                    line = next(lines, None)
                except OSError as e:
                    undo()
                    raise Die(EXIT_TEMP, f"Unable to read message: {_err(e)}. (#4.3.0)") from None
                if line is None:
                    break
                if _FROM_RE.match(line):
                    out += b">"
                out += line
                if not line.endswith(b"\n"):
                    out += b"\n"
                if len(out) >= _CHUNK:
                    _write_fd(fd, bytes(out))
                    out.clear()
            out += b"\n"
            _write_fd(fd, bytes(out))
            os.fsync(fd)
        except OSError as e:
            undo()
            raise Die(EXIT_TEMP, f"Unable to write {name}: {_err(e)}. (#4.3.0)") from None
    finally:
        os.close(fd)


def deliver_program(command: bytes, msg_fd: int) -> bool:
    """Run `/bin/sh -c command` on the message; True if it asked (exit 99) to stop here."""
    rewind(msg_fd)
    try:
        # stdout/stderr stay fds 1 and 2: the program's output becomes the report
        proc = subprocess.Popen(
            [b"/bin/sh", b"-c", command], stdin=msg_fd, close_fds=True, restore_signals=True
        )
    except OSError as e:
        if e.filename is not None:
            raise Die(EXIT_TEMP, f"Unable to run /bin/sh: {_err(e)}. (#4.3.0)") from None
        raise Die(EXIT_TEMP, f"Unable to fork: {_err(e)}. (#4.3.0)") from None
    code = proc.wait()
    if code < 0:
        raise Die(EXIT_TEMP, "Aack, child crashed. (#4.3.0)")
    if code in PERM_PROGRAM_CODES:
        raise Die(EXIT_PERM)
    if code == 99:
        return True
    if code != 0:
        raise Die(EXIT_TEMP)
    return False


def queue_forward(
    home: Path, sender: str, recipients: list[str], dtline: bytes, msg_fd: int
) -> tuple[int, str, int]:
    """Queue DTLINE + message from `sender` to `recipients` through qmail-queue.

    Returns (0, "", qp) when queued, else (exit code, qmail-local's error line, qp).
    """
    try:
        rewind(msg_fd)
    except Die as e:
        return e.code, e.text, 0
    try:
        client = QueueClient(home)
    except OSError as e:
        return EXIT_TEMP, f"Unable to fork: {_err(e)}. (#4.3.0)", 0
    client.write(dtline)
    try:
        for chunk in read_chunks(msg_fd):
            client.write(chunk)
    except OSError as e:
        client.abort()
        return EXIT_TEMP, f"Unable to read message: {_err(e)}. (#4.3.0)", client.pid
    result = client.finish(sender, recipients)
    if result.ok:
        return 0, "", result.qp
    code = EXIT_PERM if result.permanent else EXIT_TEMP
    return code, f"Unable to forward message: {result.message}.", result.qp


def forward(st: _State) -> None:
    """Queue DTLINE + message once, from NEWSENDER, to every collected forward address."""
    if st.forwarder is not None:
        code, text, qp = st.forwarder(st.newsender, st.forwards, st.dtline, st.msg_fd)
    else:
        code, text, qp = queue_forward(st.home, st.newsender, st.forwards, st.dtline, st.msg_fd)
    st.qp = qp
    if code:
        raise Die(code, text)


def _check_home(doit: bool) -> None:
    try:
        st = os.stat(".")
    except OSError as e:
        raise Die(EXIT_TEMP, f"Unable to stat home directory: {_err(e)}. (#4.3.0)") from None
    if st.st_mode & PATRN:
        raise Die(EXIT_TEMP, "Uh-oh: home directory is writable. (#4.7.0)")
    if st.st_mode & stat.S_ISVTX:
        if doit:
            raise Die(
                EXIT_TEMP, "Home directory is sticky: user is editing his .qmail file. (#4.2.1)"
            )
        _say(2, "Warning: home directory is sticky.\n")


def _check_loop(st: _State) -> None:
    rewind(st.msg_fd)
    try:
        for line in read_lines(st.msg_fd):
            if not line.endswith(b"\n") or len(line) <= 1:
                break
            if line == st.dtline:
                raise Die(
                    EXIT_PERM,
                    "This message is looping: it already has my Delivered-To line. (#5.4.6)",
                )
    except OSError as e:
        raise Die(EXIT_TEMP, f"Unable to read message: {_err(e)}. (#4.3.0)") from None


def _open_qmail(name: str) -> tuple[bytes, bool] | None:
    """(contents, forward-only) of a usable .qmail file, None when it does not count."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        if is_temp_errno(e.errno) or e.errno in (errno.EPERM, errno.EACCES):
            raise Die(EXIT_TEMP, f"Unable to open {name}: {_err(e)}. (#4.3.0)") from None
        return None
    try:
        try:
            info = os.fstat(fd)
        except OSError as e:
            raise Die(EXIT_TEMP, f"Unable to open {name}: {_err(e)}. (#4.3.0)") from None
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_mode & PATRN:
            raise Die(EXIT_TEMP, "Uh-oh: .qmail file is writable. (#4.7.0)")
        data = bytearray()
        try:
            for chunk in read_chunks(fd):
                data += chunk
        except OSError as e:
            raise Die(EXIT_TEMP, f"Unable to open {name}: {_err(e)}. (#4.3.0)") from None
        return bytes(data), bool(info.st_mode & stat.S_IXUSR)
    finally:
        os.close(fd)


def _find_qmail(st: _State) -> tuple[bytes, bool] | None:
    for name, default_at in qmail_candidates(st.dash, st.ext):
        found = _open_qmail(name)
        if found is None:
            continue
        if default_at is None:
            sx = safe_ext(st.ext)
            if sx.endswith("default"):
                st.env["DEFAULT"] = st.ext[len(sx) - 7 :]
        elif default_at <= len(st.ext):
            st.env["DEFAULT"] = st.ext[default_at:]
        return found
    return None


def _owner_exists(st: _State, suffix: str) -> bool:
    name = ".qmail" + st.dash + safe_ext(st.ext) + suffix
    try:
        os.stat(name)
    except OSError as e:
        if is_temp_errno(e.errno):
            raise Die(EXIT_TEMP, f"Unable to open {name}: {_err(e)}. (#4.3.0)") from None
        return False
    return True


def _new_sender(st: _State) -> str:
    if st.sender in ("", "#@[]") or not _owner_exists(st, "-owner"):
        return st.sender
    if _owner_exists(st, "-owner-default"):
        return f"{st.local}-owner-@{st.domain}-@[]"
    return f"{st.local}-owner@{st.domain}"


def _set_env(st: _State) -> None:
    env = st.env
    env["HOST"] = st.domain
    env["HOME"] = st.homedir
    env["USER"] = st.user
    env["LOCAL"] = st.local
    env["RECIPIENT"] = f"{st.local}@{st.domain}"
    env["DTLINE"] = _s(st.dtline)
    # helper programs (forward, condredirect) must queue into this same home
    env["QMAILHOME"] = str(st.home)


def _export_env(st: _State) -> None:
    """Put qmail-local's variables into os.environ, for a program or a forward to see.

    Deliveries to files need none, so most deliveries never pay for the putenv calls
    (or, in a reused worker, for undoing them).
    """
    os.environ.update(st.env)
    if "DEFAULT" not in st.env:
        os.environ.pop("DEFAULT", None)


def _set_env_after_loop_check(st: _State) -> None:
    env = st.env
    env["SENDER"] = st.sender
    env["RPLINE"] = _s(st.rpline)
    env["UFLINE"] = _s(st.ufline)
    env["EXT"] = st.ext
    for n in (2, 3, 4):
        env[f"EXT{n}"] = ext_after(st.ext, n - 1)
        env[f"HOST{n}"] = host_cut(st.domain, n - 1)


def _run_line(st: _State, line: bytes, first: bool, forward_only: bool) -> bool:
    """Execute one .qmail line; returns the new forward-only flag."""
    if not line:
        if first:
            raise Die(EXIT_TEMP, "Uh-oh: first line of .qmail file is blank. (#4.2.1)")
        return forward_only
    kind = line[:1]
    if kind == b"#":
        return forward_only
    if kind in (b".", b"/"):
        st.count_file += 1
        if forward_only:
            raise Die(EXIT_TEMP, "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)")
        if line.endswith(b"/"):
            if st.doit:
                deliver_maildir(line, st.rpline, st.dtline, st.msg_fd)
            else:
                _say(1, "maildir " + _s(line) + "\n")
        elif st.doit:
            deliver_mbox(line, st.ufline, st.rpline, st.dtline, st.msg_fd)
        else:
            _say(1, "mbox " + _s(line) + "\n")
        return forward_only
    if kind == b"|":
        st.count_program += 1
        if forward_only:
            raise Die(EXIT_TEMP, "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)")
        if st.doit:
            _export_env(st)
            st.stop_after_program = deliver_program(line[1:], st.msg_fd)
        else:
            _say(1, "program " + _s(line[1:]) + "\n")
        return forward_only
    if kind == b"+":
        # `+list` turns on forward-only mode; other `+` lines mean nothing to qmail
        return True if line == b"+list" else forward_only
    address = line[1:] if kind == b"&" else line
    st.count_forward += 1
    if st.doit:
        st.forwards.append(_s(address))
    else:
        _say(1, "forward " + _s(address) + "\n")
    return forward_only


def _run(st: _State) -> None:
    os.umask(0o077)
    if get_handler(signal.SIGPIPE) != signal.SIG_IGN:  # a reused worker has it already
        set_handler(signal.SIGPIPE, signal.SIG_IGN)
    if not st.homedir.startswith("/"):
        raise Die(EXIT_PERM, USAGE)
    try:
        os.chdir(st.homedir)
    except OSError as e:
        raise Die(EXIT_TEMP, f"Unable to switch to {st.homedir}: {_err(e)}. (#4.3.0)") from None
    _check_home(st.doit)
    now = time.time()
    st.dtline = _b(make_dtline(st.local, st.domain))
    _set_env(st)
    if st.doit:
        _check_loop(st)
    st.rpline = _b(make_rpline(st.sender))
    st.ufline = _b(make_ufline(st.sender, now))
    _set_env_after_loop_check(st)

    found = _find_qmail(st)
    if found is None and st.dash:
        raise Die(EXIT_PERM, "Sorry, no mailbox here by that name. (#5.1.1)")
    st.newsender = _new_sender(st)
    st.env["NEWSENDER"] = st.newsender

    contents, forward_only = found if found is not None else (b"", False)
    if not contents:
        contents = _b(st.defaultdelivery)
        forward_only = False
    if not contents.endswith(b"\n"):
        contents += b"\n"

    for index, raw in enumerate(contents[:-1].split(b"\n")):
        # C string semantics: a NUL ends the line
        line = raw.split(b"\0", 1)[0].rstrip(b" \t")
        forward_only = _run_line(st, line, index == 0, forward_only)
        if st.stop_after_program:
            break

    if st.forwards and st.doit:
        _export_env(st)
        forward(st)


def qmail_local(
    home: Path,
    user: str,
    homedir: str,
    local: str,
    dash: str,
    ext: str,
    domain: str,
    sender: str,
    defaultdelivery: str,
    msg_fd: int = 0,
    print_only: bool = False,
    forwarder: ForwardFn | None = None,
) -> int:
    """Deliver (or with print_only, describe) one message; returns 0, 100 or 111.

    Changes cwd, umask, signal dispositions and os.environ: call it in a process
    of its own (qmail-lspawn's forked child, or the qmail-local program).
    `forwarder` replaces the in-process qmail-queue call for forwards (qmail-lspawn
    uses it when the queue is writable only by the root process it came from).
    """
    st = _State(
        home=home if isinstance(home, Path) else Path(home),
        user=user,
        homedir=homedir,
        local=local,
        dash=dash,
        ext=ext,
        domain=domain,
        sender=sender,
        defaultdelivery=defaultdelivery,
        msg_fd=msg_fd,
        doit=not print_only,
        forwarder=forwarder,
    )
    try:
        _run(st)
    except Die as e:
        if e.text:
            _say(2, e.text + "\n")
        return e.code
    except MemoryError:
        _say(2, "Out of memory. (#4.3.0)\n")
        return EXIT_TEMP
    summary = f"did {st.count_file}+{st.count_forward}+{st.count_program}\n"
    if st.qp:
        summary += f"qp {st.qp}\n"
    _say(1, summary)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    home_arg: str | None = None
    if len(args) >= 2 and args[0] == "--home":
        home_arg = args[1]
        args = args[2:]
    elif args and args[0].startswith("--home="):
        home_arg = args[0].split("=", 1)[1]
        args = args[1:]
    print_only = False
    # getopt-style: option clusters of n/N until `--` or the first operand
    while args and args[0].startswith("-") and args[0] != "-":
        opt = args.pop(0)
        if opt == "--":
            break
        for letter in opt[1:]:
            if letter == "n":
                print_only = True
            elif letter == "N":
                print_only = False
            else:
                _say(2, USAGE + "\n")
                sys.exit(EXIT_PERM)
    if len(args) != 8 or not args[1].startswith("/"):
        _say(2, USAGE + "\n")
        sys.exit(EXIT_PERM)
    user, homedir, local, dash, ext, domain, sender, defaultdelivery = args
    code = qmail_local(
        resolve_home(home_arg),
        user,
        homedir,
        local,
        dash,
        ext,
        domain,
        sender,
        defaultdelivery,
        msg_fd=0,
        print_only=print_only,
    )
    sys.exit(code)
