"""The caller's side of qmail-queue (qmail's qmail.c): start it, feed it, read its verdict.

Without $QMAILQUEUE the qmail-queue process is forked from the caller, which
has already imported this module, instead of exec'ing a new interpreter per
message; it is still a separate process fed through two pipes, as in qmail.
With $QMAILQUEUE the named program is exec'd from the qmail home, as qmail does.

A long-lived caller that runs as the queue's owner (qmail-smtpd when one user
runs the whole MTA) may instead use InProcessQueue: the same steps, in the same
order, without a process per message.  A separate qmail-queue process buys no
isolation there (both would run as the same uid), and it costs a fork.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# imported here, not in the child: the forked qmail-queue must not pay for an import
from .qmail_queue import (
    QQ_BUG,
    QQ_NOMEM,
    Enqueuer,
    QueueExit,
    check_envelope,
    invoked_how,
    run_child,
)

_TEXTS: dict[int, str] = {
    11: "Denvelope address too long for qq (#5.1.3)",
    31: "Dmail server permanently rejected message (#5.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    62: "Zqq trouble creating files in queue (#4.3.0)",
    63: "Zqq trouble creating files in queue (#4.3.0)",
    64: "Zqq trouble creating files in queue (#4.3.0)",
    65: "Zqq trouble creating files in queue (#4.3.0)",
    66: "Zqq trouble creating files in queue (#4.3.0)",
    71: "Zmail server temporarily rejected message (#4.3.0)",
    72: "Zconnection to mail server timed out (#4.4.1)",
    73: "Zconnection to mail server rejected (#4.4.1)",
    74: "Zcommunication with mail server failed (#4.4.2)",
    81: "Zqq internal bug (#4.3.0)",
    91: "Zqq internal bug (#4.3.0)",
    115: "Denvelope address too long for qq (#5.1.3)",
    120: "Zunable to exec qq (#4.3.0)",
}


def qq_text(code: int) -> str:
    """qmail.c's verdict text for a qmail-queue exit code; empty means queued."""
    if code == 0:
        return ""
    if code in _TEXTS:
        return _TEXTS[code]
    if 11 <= code <= 40:
        return "Dqq permanent problem (#5.3.0)"
    return "Zqq temporary problem (#4.3.0)"


@dataclass(frozen=True)
class QueueResult:
    code: int
    text: str  # "" when queued, else a verdict letter (D perm, Z temp) and text
    qp: int  # pid of the qmail-queue process, for logs
    # the queued message's number (its inode, as qmail-send logs it) when qmail-queue ran in
    # this process; 0 when it ran as its own program, which does not tell it
    number: int = 0

    @property
    def ok(self) -> bool:
        return self.text == ""

    @property
    def permanent(self) -> bool:
        return self.text.startswith("D")

    @property
    def message(self) -> str:
        """The text without its verdict letter."""
        return self.text[1:]


def envelope(sender: str, recipients: list[str]) -> bytes:
    parts = [b"F" + sender.encode("utf-8", "surrogateescape") + b"\0"]
    parts += [b"T" + r.encode("utf-8", "surrogateescape") + b"\0" for r in recipients]
    parts.append(b"\0")
    return b"".join(parts)


class QueueClient:
    """One qmail-queue run: write() the message, then finish() with the envelope."""

    def __init__(
        self,
        home: Path | str,
        invoked: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """environ, if given, is the whole environment of a $QMAILQUEUE program (the
        caller's own os.environ otherwise); its QMAILQUEUE picks the program."""
        self.home = Path(home)
        self._failed = False
        msg_r, self._msg_w = os.pipe()
        env_r, self._env_w = os.pipe()
        program = (os.environ if environ is None else environ).get("QMAILQUEUE")
        # objects the parent already has go to the permanent generation, so the
        # child's collector never walks (and copy-on-write copies) their pages
        gc.freeze()
        # unwritten stdio output would otherwise be written again by the child
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child becomes qmail-queue
            code = 120
            try:
                os.dup2(msg_r, 0)
                os.dup2(env_r, 1)
                # nothing else of the caller's (the client's socket, above all) stays open
                os.closerange(3, 65536)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.chdir(self.home)
                if program:
                    if environ is None:
                        os.execv(program, [program])
                    os.execve(program, [program], dict(environ))
                how = invoked or invoked_how(os.getuid())
                code = run_child(self.home / "queue", how)
            except OSError as e:
                code = 61 if not program else 120
                del e
            finally:
                os._exit(code)
        os.close(msg_r)
        os.close(env_r)
        self.pid = pid

    def write(self, data: bytes | memoryview) -> None:
        if self._failed:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._msg_w, view) :]
        except OSError:
            self._failed = True  # qmail-queue went away; its exit code tells why

    def finish(self, sender: str, recipients: list[str]) -> QueueResult:
        os.close(self._msg_w)
        try:
            self._write_envelope(envelope(sender, recipients))
        finally:
            os.close(self._env_w)
        return self._wait()

    def abort(self) -> None:
        """Give up on this message: qmail-queue sees a broken envelope and queues nothing."""
        os.close(self._msg_w)
        os.close(self._env_w)
        self._wait()

    def _write_envelope(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._env_w, view) :]
        except OSError:
            self._failed = True

    def _wait(self) -> QueueResult:
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
                break
            except ChildProcessError:
                return QueueResult(-1, "Zqq waitpid surprise (#4.3.0)", self.pid)
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            return QueueResult(-1, "Zqq crashed (#4.3.0)", self.pid)
        code = os.WEXITSTATUS(status)
        if code == 0 and self._failed:
            code = 54
        return QueueResult(code, qq_text(code), self.pid)


class InProcessQueue:
    """QueueClient's interface, with qmail-queue's algorithm run in this process."""

    def __init__(self, home: Path | str, invoked: str) -> None:
        self.job = Enqueuer(f"{home}/queue", invoked)
        self.pid = self.job.pid
        self.code = 0
        self._attempt(self.job.begin)

    def _attempt(self, step: Callable[[], None]) -> None:
        if self.code:
            return
        try:
            step()
        except QueueExit as e:
            self.code = e.code
        except MemoryError:
            self.code = QQ_NOMEM
        except Exception:  # noqa: BLE001 - qmail-queue would have exited 81, not crashed us
            self.code = QQ_BUG
        if self.code:
            self.job.abort()

    def write(self, data: bytes | memoryview) -> None:
        if not self.code:
            self._attempt(lambda: self.job.write(data))

    def finish(self, sender: str, recipients: list[str]) -> QueueResult:
        data = envelope(sender, recipients)
        self._attempt(lambda: self.job.commit(lambda: check_envelope(data)))
        number = 0 if self.code else self.job.inode
        return QueueResult(self.code, qq_text(self.code), self.pid, number)

    def abort(self) -> None:
        self.job.abort()


def same_owner(home: Path | str) -> bool:
    """True when this process owns the queue, so running qmail-queue in-process isolates nothing."""
    try:
        return os.stat(f"{home}/queue").st_uid == os.geteuid()
    except OSError:
        return False


def open_queue(
    home: Path | str, invoked: str, environ: Mapping[str, str] | None = None
) -> QueueClient | InProcessQueue:
    """qmail-queue for a long-lived caller: in-process when that isolates nothing.

    That is when $QMAILQUEUE names no other program and this process owns the queue;
    otherwise qmail-queue (or $QMAILQUEUE) runs as its own process, as in qmail.
    environ is as for QueueClient.
    """
    if not (os.environ if environ is None else environ).get("QMAILQUEUE") and same_owner(home):
        return InProcessQueue(home, invoked)
    return QueueClient(home, invoked=invoked, environ=environ)


def queue_message(
    home: Path | str,
    message: bytes,
    sender: str,
    recipients: list[str],
    invoked: str | None = None,
) -> QueueResult:
    client = QueueClient(home, invoked)
    client.write(message)
    return client.finish(sender, recipients)
