"""Helpers for the qmail-inject and sendmail tests: run the console scripts, read the queue."""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pyqmail.constants import SPLIT

BIN = Path(sys.executable).parent

# variables that would change the default From or the rewriting if inherited from the caller
_IDENTITY = (
    "QMAILUSER",
    "MAILUSER",
    "USER",
    "LOGNAME",
    "QMAILHOST",
    "MAILHOST",
    "QMAILNAME",
    "MAILNAME",
    "NAME",
    "QMAILSUSER",
    "QMAILSHOST",
    "QMAILINJECT",
    "QMAILDEFAULTDOMAIN",
    "QMAILDEFAULTHOST",
    "QMAILPLUSDOMAIN",
    "QMAILIDHOST",
    "QMAILMFTFILE",
    "QMAILQUEUE",
    "PROTO",
    "RELAYCLIENT",
)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _IDENTITY}
    env["QMAILHOME"] = str(home)
    env["USER"] = "alice"
    env.update(extra)
    return env


def run(
    program: str,
    args: list[str],
    home: Path,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    argv0: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    # argv0 is a link to the program: a script only sees the name it was started by
    cmd = [argv0 or str(BIN / program), *args]
    return subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        env=env if env is not None else clean_env(home),
        timeout=60,
        cwd=cwd,
    )


@dataclass
class Queued:
    number: int
    uid: int
    pid: int
    sender: str
    recipients: list[str]
    raw: bytes  # the mess file, Received line included

    @property
    def message(self) -> mailbox.Message:
        return mailbox.Message(self.raw)

    @property
    def after_received(self) -> bytes:
        """The message as the injector handed it to qmail-queue."""
        first, _, rest = self.raw.partition(b"\n")
        assert first.startswith(b"Received: (qmail ")
        return rest


def queued(home: Path) -> list[Queued]:
    """Every committed message (queue/todo), oldest commit first (inodes get reused)."""
    todo = home / "queue" / "todo"
    found = []
    # in queueing order: qmail-queue's pid (the p record) grows, inode numbers need not
    for entry in sorted(todo.iterdir(), key=lambda p: int(p.read_bytes().split(b"\0")[1][1:])):
        n = int(entry.name)
        parts = entry.read_bytes().split(b"\0")
        assert parts[0].startswith(b"u") and parts[1].startswith(b"p")
        assert parts[2].startswith(b"F")
        rcpts = []
        for part in parts[3:]:
            if not part:
                break
            assert part.startswith(b"T")
            rcpts.append(part[1:].decode("utf-8", "surrogateescape"))
        mess = home / "queue" / "mess" / str(n % SPLIT) / str(n)
        found.append(
            Queued(
                number=n,
                uid=int(parts[0][1:]),
                pid=int(parts[1][1:]),
                sender=parts[2][1:].decode("utf-8", "surrogateescape"),
                recipients=rcpts,
                raw=mess.read_bytes(),
            )
        )
    return found


def queue_is_empty(home: Path) -> bool:
    """Nothing committed and nothing left half-made in pid/, intd/ or mess/."""
    q = home / "queue"
    leftovers = list((q / "todo").iterdir()) + list((q / "intd").iterdir())
    leftovers += list((q / "pid").iterdir())
    for sub in (q / "mess").iterdir():
        leftovers += list(sub.iterdir())
    return not leftovers


def qq_script(directory: Path, code: int) -> Path:
    """A stand-in for qmail-queue that saves what it is given and exits with `code`."""
    script = directory / f"fakeqq{code}"
    script.write_text(
        "#!/bin/sh\n"
        f'cat > "{directory}/qq{code}.message"\n'
        f'cat <&1 > "{directory}/qq{code}.envelope"\n'
        f'pwd > "{directory}/qq{code}.cwd"\n'
        f"exit {code}\n"
    )
    script.chmod(0o755)
    return script
