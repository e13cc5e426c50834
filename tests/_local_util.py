"""Helpers for the local-delivery tests: run qmail-local for real and read what it did."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
NOBODY = 65534


def bin_path(name: str) -> str:
    return str(BIN / name)


def make_maildir(path: Path) -> Path:
    for sub in ("", "tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)
    return path


def write_qmail(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def run_local(
    home: Path,
    homedir: Path,
    local: str,
    message: bytes,
    *,
    dash: str = "",
    ext: str = "",
    domain: str = "example.test",
    sender: str = "joe@example.org",
    defaultdelivery: str = "./Maildir/",
    user: str = "bob",
    options: list[str] | None = None,
    env: dict[str, str] | None = None,
    uid: int | None = None,
    tmp: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the qmail-local program with the message on a seekable fd 0."""
    fd, name = tempfile.mkstemp(dir=tmp)
    try:
        os.write(fd, message)
        os.lseek(fd, 0, os.SEEK_SET)
        if uid is not None:
            os.fchmod(fd, 0o644)
        if uid is not None:
            return _run_forked(
                uid,
                fd,
                home,
                [user, str(homedir), local, dash, ext, domain, sender],
                defaultdelivery,
            )
        full_env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        full_env.update(env or {})
        args = [bin_path("qmail-local"), "--home", str(home), *(options or []), "--"]
        args += [user, str(homedir), local, dash, ext, domain, sender, defaultdelivery]
        return subprocess.run(
            args,
            stdin=fd,
            capture_output=True,
            env=full_env,
            timeout=60,
        )
    finally:
        os.close(fd)
        os.unlink(name)


def _run_forked(
    uid: int, msg_fd: int, home: Path, args: list[str], defaultdelivery: str
) -> subprocess.CompletedProcess[bytes]:
    """qmail_local in a forked child that first becomes `uid`.

    The installed console scripts may live where that uid cannot read (e.g. under
    /root), so the already-imported function is called instead of the program.
    """
    from pyqmail.local import qmail_local

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            os.dup2(msg_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.setgroups([uid])
            os.setgid(uid)
            os.setuid(uid)
            user, homedir, local, dash, ext, domain, sender = args
            code = qmail_local(
                home, user, homedir, local, dash, ext, domain, sender, defaultdelivery
            )
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    outs = []
    for fd in (out_r, err_r):
        with os.fdopen(fd, "rb") as f:
            outs.append(f.read())
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), outs[0], outs[1])


@dataclass
class Queued:
    sender: str
    recipients: list[str]
    message: bytes


def queued(home: Path) -> list[Queued]:
    """Every message waiting in queue/todo, with its envelope."""
    out = []
    todo = home / "queue" / "todo"
    # in queueing order: qmail-queue's pid (the p record) grows, inode numbers need not
    for name in sorted(
        os.listdir(todo), key=lambda n: int((todo / n).read_bytes().split(b"\0")[1][1:])
    ):
        n = int(name)
        env = (todo / name).read_bytes().split(b"\0")
        sender = ""
        rcpts = []
        for field in env:
            if field[:1] == b"F":
                sender = field[1:].decode()
            elif field[:1] == b"T":
                rcpts.append(field[1:].decode())
        mess = (home / "queue" / "mess" / str(n % 23) / str(n)).read_bytes()
        out.append(Queued(sender, rcpts, mess))
    return out


def strip_received(message: bytes) -> bytes:
    """The message without the Received line qmail-queue put on top."""
    assert message.startswith(b"Received: (qmail ")
    return message.split(b"\n", 1)[1]


@contextmanager
def open_dir() -> Iterator[Path]:
    """A directory any uid can reach (pytest's tmp_path is private to root when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-local-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def other_uid() -> int | None:
    """A uid that file permissions apply to: nobody when we are root, else ourselves."""
    return NOBODY if os.geteuid() == 0 else None


def give_to(path: Path, uid: int | None) -> None:
    """chown a tree to uid (when set), so a test can deliver as that uid."""
    if uid is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid)
