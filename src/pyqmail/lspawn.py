"""qmail-lspawn: the local delivery spawner qmail-send talks to.

For each command it forks (in pyqmail.spawn) and, in the child, finds who owns
the address (users/cdb, then the password database when running as root, then
the alias user), becomes that user when running as root, and runs qmail-local
in the same process.  The child's exit code and output become the report.
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import sys
from pathlib import Path

# Imported here, not on first use: a delivery child that has become an
# unprivileged user may no longer be able to read the installed package.
from . import qmail_queue as _qmail_queue  # noqa: F401
from .constants import EXIT_TEMP
from .control import Control, ControlError
from .home import resolve_home
from .local import qmail_local, queue_forward
from .spawn import WORKER_MAX_USE, DeliverFn, serve
from .users import (
    QLX_CDB,
    QLX_NFS,
    QLX_NOALIAS,
    QLX_NOMEM,
    QLX_ROOT,
    QLX_SYS,
    QLX_USAGE,
    Assignment,
    LookupFailure,
    resolve_local,
)

TRUNCREPORT = 3000
_TOO_LONG = b"\nError report too long, sorry.\n"

# exit codes whose report is a fixed text instead of qmail-local's output
_FIXED: dict[int, bytes] = {
    QLX_USAGE: b"ZInternal qmail-lspawn bug.\n",
    QLX_ROOT: b"ZNot allowed to perform deliveries as root.\n",
    QLX_NFS: b"ZNFS failure in qmail-local.\n",
    QLX_NOALIAS: b"ZUnable to find alias user!\n",
    QLX_CDB: b"ZTrouble reading users/cdb in qmail-lspawn.\n",
    QLX_SYS: b"ZTemporary failure in qmail-lspawn.\n",
    QLX_NOMEM: b"ZOut of memory in qmail-lspawn.\n",
    120: b"ZUnable to run qmail-local.\n",
    121: b"ZUnable to run qmail-getpw.\n",
    126: b"DUnable to run qmail-local.\n",
}
_TEMPORARY = frozenset({111, 71, 74, 75})

USAGE = (
    "usage: qmail-lspawn [--home DIR] [defaultdelivery]\n"
    "  reads qmail-send's delivery commands on fd 0, writes results on fd 1.\n"
    "  defaultdelivery: first line of HOME/control/defaultdelivery, else ./Maildir/\n"
    "  home: --home, else $QMAILHOME, else /var/qmail as root, else ~/.pyqmail\n"
)


def lspawn_report(status: int, output: bytes) -> bytes:
    """qmail-lspawn's report (letter + text) for a finished delivery child."""
    if os.WIFSIGNALED(status) or not os.WIFEXITED(status):
        return b"Zqmail-local crashed.\n"
    code = os.WEXITSTATUS(status)
    if code in _FIXED:
        return _FIXED[code]
    text = output.split(b"\0", 1)[0]
    if len(text) > TRUNCREPORT:
        text = text[: TRUNCREPORT - len(_TOO_LONG) - 3] + _TOO_LONG
    if code == 0:
        return b"K" + text
    if code in _TEMPORARY:
        return b"Z" + text
    return b"D" + text


def _plainly_below(top: str, path: str) -> tuple[str, os.stat_result] | None:
    """(path, its lstat) if path is top/a/b... with no symlink, '.' or '..' below top.

    top is already a real path, so such a path is its own realpath: asking for
    it costs a stat per component below top instead of one per component of the
    whole path.  None when that cannot be told this way (realpath decides then).
    """
    if not path.startswith(top + "/"):
        return None
    current = top
    st: os.stat_result | None = None
    for part in path[len(top) + 1 :].split("/"):
        if part in ("", ".", ".."):
            return None
        current += "/" + part
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):
            return None
    return (path, st) if st is not None else None


def root_managed_home(home: Path | str, homedir: str, real_home: str | None = None) -> bool:
    """True for a root-owned home pyqmail itself made: HOME/alias or under HOME/mailboxes/.

    Only root can write the .qmail files in such a directory, so following them
    as root gives nobody more power than they already have.  real_home is
    os.path.realpath(home), if the caller already knows it.
    """
    try:
        top = os.path.realpath(home) if real_home is None else real_home
        found = _plainly_below(top, homedir)
        if found is None:
            path = os.path.realpath(homedir)
            st = os.stat(path)
        else:
            path, st = found
    except OSError:
        return False
    if st.st_uid != 0 or st.st_mode & 0o022:
        return False
    return path == os.path.join(top, "alias") or path.startswith(os.path.join(top, "mailboxes", ""))


def lspawn_deliver(home: Path, defaultdelivery: str, allow_root_managed: bool = True) -> DeliverFn:
    """The function pyqmail.spawn.serve runs in each forked delivery child.

    As root, each delivery runs as the address's owner (groups, gid, uid set
    first) and an owner with uid 0 is refused, as in qmail, with one exception
    unless allow_root_managed is False: homes pyqmail made itself and root
    still owns (a root-run install whose alias/ and mailboxes were never given
    to an unprivileged account) are delivered to as root.
    """
    home = Path(home).absolute()
    real_home = os.path.realpath(home)  # the home does not move while we run

    def deliver(msg_fd: int, sender: str, recipient: str) -> int:
        at = recipient.rfind("@")
        local, domain = recipient[:at], recipient[at + 1 :]
        if not local:
            return 0  # `@host` is the trash address
        as_root = os.geteuid() == 0
        try:
            owner = resolve_local(home, local, as_root)
        except LookupFailure as e:
            return e.code
        except MemoryError:
            return QLX_NOMEM
        except OSError:
            return QLX_SYS
        if as_root and owner.uid == 0:
            if not (allow_root_managed and root_managed_home(home, owner.homedir, real_home)):
                return QLX_ROOT
        elif as_root:
            return _deliver_as(home, owner, local, domain, sender, defaultdelivery, msg_fd)
        return qmail_local(
            home,
            owner.user,
            owner.homedir,
            local,
            owner.dash,
            owner.ext,
            domain,
            sender,
            defaultdelivery,
            msg_fd=msg_fd,
        )

    return deliver


def _send_frame(fd: int, parts: list[bytes]) -> None:
    data = b"\0".join(parts)
    frame = struct.pack(">I", len(data)) + data
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


def _recv_frame(fd: int) -> list[bytes] | None:
    """One length-prefixed frame; None at end of file."""

    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    head = exactly(4)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    body = exactly(size) if size else b""
    return None if body is None else body.split(b"\0")


def _deliver_as(
    home: Path,
    owner: Assignment,
    local: str,
    domain: str,
    sender: str,
    defaultdelivery: str,
    msg_fd: int,
) -> int:
    """Run qmail_local as the owner in a child; forwards are queued here, still as root.

    The queue belongs to root (there is no setuid qmail-queue in pyqmail), so a
    user's forward is sent back over a pipe and queued by this process, which
    reads the message itself from the shared descriptor while the child waits.
    """
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = QLX_SYS
        try:
            os.close(req_r)
            os.close(rep_w)
            os.setgroups([owner.gid])
            os.setgid(owner.gid)
            os.setuid(owner.uid)

            def forwarder(
                new_sender: str, recipients: list[str], dtline: bytes, fd: int
            ) -> tuple[int, str, int]:
                enc = [new_sender.encode("utf-8", "surrogateescape"), dtline]
                enc += [r.encode("utf-8", "surrogateescape") for r in recipients]
                _send_frame(req_w, enc)
                reply = _recv_frame(rep_r)
                if reply is None or len(reply) != 3:
                    return EXIT_TEMP, "Unable to forward message: qq crashed (#4.3.0).", 0
                return int(reply[0]), reply[1].decode("utf-8", "surrogateescape"), int(reply[2])

            code = qmail_local(
                home,
                owner.user,
                owner.homedir,
                local,
                owner.dash,
                owner.ext,
                domain,
                sender,
                defaultdelivery,
                msg_fd=msg_fd,
                forwarder=forwarder,
            )
        except OSError:
            code = QLX_SYS
        finally:
            os._exit(code)
    os.close(req_w)
    os.close(rep_r)
    try:
        request = _recv_frame(req_r)
        if request is not None and len(request) >= 2:
            new_sender = request[0].decode("utf-8", "surrogateescape")
            recipients = [r.decode("utf-8", "surrogateescape") for r in request[2:]]
            code, text, qp = queue_forward(home, new_sender, recipients, request[1], msg_fd)
            try:
                _send_frame(rep_w, [str(code).encode(), text.encode(), str(qp).encode()])
            except OSError:
                pass  # the child died; its wait status tells
    finally:
        os.close(req_r)
        os.close(rep_w)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        # pass the crash on, so the report says qmail-local crashed
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.WEXITSTATUS(status)


def default_delivery(home: Path) -> str:
    """The rc-script convention: first line of control/defaultdelivery, else ./Maildir/."""
    value = Control(home).line("defaultdelivery")
    return value if value else "./Maildir/"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    home_arg: str | None = None
    if len(args) >= 2 and args[0] == "--home":
        home_arg, args = args[1], args[2:]
    elif args and args[0].startswith("--home="):
        home_arg, args = args[0].split("=", 1)[1], args[1:]
    if args and args[0] in ("-h", "--help"):
        sys.stderr.write(USAGE)
        sys.exit(100)
    if len(args) > 1:
        sys.stderr.write(USAGE)
        sys.exit(100)
    home = resolve_home(home_arg)
    try:
        dd = args[0] if args else default_delivery(home)
    except ControlError as e:
        sys.stderr.write(f"qmail-lspawn: fatal: {e}\n")
        sys.exit(111)
    # programs run from .qmail files (forward, condredirect) queue into this home
    os.environ["QMAILHOME"] = str(home)
    try:
        code = serve(
            lspawn_deliver(home, dd),
            lspawn_report,
            home / "queue",
            max_use=WORKER_MAX_USE,
            child_name="qmail-local",
        )
    except OSError as e:
        sys.stderr.write(f"qmail-lspawn: fatal: unable to start in {home}/queue: {e.strerror}\n")
        sys.exit(111)
    sys.exit(code)
