"""qmail-rspawn: qmail-send's remote delivery channel.

It speaks the spawner protocol (pyqmail.spawn) with qmail-send and runs
qmail-remote's logic (pyqmail.remote.deliver) in a process forked from this
warm one: no interpreter is started per message.  The
child's r/h/s + K/Z/D reports are folded into the one-letter result
qmail-send expects by `rspawn_report`, following qmail-rspawn's rules.
Like qmail-lspawn it keeps reusable delivery workers instead of a fork per
delivery (see pyqmail.spawn); they run as qmailr too.

`rspawn_deliver(home)` does qmail-rspawn's start-up work before it returns
the delivery function: it forgets remembered connection timeouts
(queue/lock/tcpto), prepares the TLS client context, and, when running as
root, becomes the `qmailr` user (group `qmail`) if that account exists.
"""

from __future__ import annotations

import argparse
import gc
import grp
import os
import pwd
from pathlib import Path

from . import remote, spawn, tcpto
from .home import HOME_HELP, resolve_home
from .smtp_client import format_reports

_VALUE = {ord("K"): 1, ord("Z"): 0, ord("D"): -1}
_LETTER = {1: b"K", 0: b"Z", -1: b"D"}


def rspawn_report(status: int, output: bytes) -> bytes:
    """The result for qmail-send from qmail-remote's wait status and output (one recipient)."""
    if os.WIFSIGNALED(status):
        return b"Zqmail-remote crashed.\n"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 111
    if code == 111:
        return b"ZUnable to run qmail-remote.\n"
    if code != 0:
        return b"DUnable to run qmail-remote.\n"
    if not output:
        return b"Zqmail-remote produced no output.\n"
    reports = output.split(b"\0")
    if reports[-1] == b"":
        reports.pop()
    reports = [r for r in reports if r]
    if not reports:
        return b"Zqmail-remote produced no output.\n"
    result = next((_VALUE[r[0]] for r in reports if r[0] in _VALUE), -1)
    first = reports[0]
    verdict = {ord("s"): 0, ord("h"): -1}.get(first[0], result)
    text = _LETTER[verdict] + first[1:]
    if result <= verdict and len(reports) > 1 and reports[1][0] in _VALUE:
        text += reports[1][1:]
    return text


def drop_privileges() -> None:
    """As root, become qmailr (group qmail), as qmail-start does for qmail-rspawn."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam("qmailr")
    except KeyError:
        # unbuffered: a buffered stderr would be flushed later by every forked delivery child
        try:
            os.write(
                2, b"qmail-rspawn: warning: no qmailr account; remote deliveries run as root\n"
            )
        except OSError:
            pass
        return
    try:
        gid = grp.getgrnam("qmail").gr_gid
    except KeyError:
        gid = pw.pw_gid
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(pw.pw_uid)


def rspawn_deliver(home: Path | str, keep: bool = False) -> spawn.DeliverFn:
    """qmail-rspawn's start-up work, then its delivery function.

    keep: the function runs in long-lived workers, so a connection that delivered
    a message stays open for the next message to the same host (see
    pyqmail.remote.deliver); pass IDLE to pyqmail.spawn.serve to close it in time.
    """
    home = Path(home)
    try:
        tcpto.zero(home / "queue")
    except OSError:
        pass  # without tcpto memory every host is simply tried
    drop_privileges()
    remote.warm()
    # objects alive now are never collected: the collector then leaves their pages alone,
    # so forked children share them instead of copying them
    gc.freeze()

    def deliver(msg_fd: int, sender: str, recipient: str) -> int:
        host = recipient[recipient.rfind("@") + 1 :]
        try:
            reports = remote.deliver(home, host, sender, [recipient], msg_fd, keep=keep)
        except Exception as e:  # noqa: BLE001 - a report, never a traceback
            reports = [("Z", f"qmail-remote failed unexpectedly: {e}. (#4.3.0)\n")]
        view = memoryview(format_reports(reports))
        while view:
            view = view[os.write(1, view) :]
        return 0

    return deliver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmail-rspawn",
        description="Remote delivery channel of qmail-send: commands on fd 0, results on fd 1.",
    )
    parser.add_argument("--home", help=HOME_HELP)
    home = resolve_home(parser.parse_args(argv).home)
    return serve(home, home / "queue")


IDLE: spawn.IdleHook = (remote.KEEP_IDLE, remote.close_kept)


def serve(home: Path, queue: Path) -> int:
    """The spawner loop with reused workers that keep their SMTP connections a while."""
    return spawn.serve(
        rspawn_deliver(home, keep=True),
        rspawn_report,
        queue,
        max_use=spawn.WORKER_MAX_USE,
        idle=IDLE,
        child_name="qmail-remote",
    )
