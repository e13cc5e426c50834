"""Helpers shared by the SMTP server tests: a policy-free driver for the pure core."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.smtp_server import (
    AuthRequested,
    AuthResponse,
    Close,
    DataChunk,
    DataStart,
    Event,
    MailFrom,
    MessageAborted,
    MessageComplete,
    RcptTo,
    Reply,
    ServerConfig,
    SMTPServer,
    StartTLSRequested,
)

REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)$")


def split_replies(out: bytes) -> list[tuple[int, list[str]]]:
    """Wire bytes -> [(code, lines)], checking every line's framing on the way."""
    assert out == b"" or out.endswith(b"\r\n"), out
    replies: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for raw in out.split(b"\r\n")[:-1]:
        m = REPLY_LINE.match(raw)
        assert m, raw
        assert b"\r" not in raw and b"\n" not in raw
        current.append(m.group(3).decode("utf-8", "surrogateescape"))
        if m.group(2) == b" ":
            replies.append((int(m.group(1)), current))
            current = []
    assert not current, "a multi-line reply was left unfinished"
    return replies


@dataclass
class Driver:
    """Feeds a core and answers every decision like an accept-all MTA."""

    config: ServerConfig
    srv: SMTPServer = field(init=False)
    events: list[Event] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    envelopes: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    reject_rcpt: set[str] = field(default_factory=set)
    fed: bytearray = field(default_factory=bytearray)
    data_start: int = -1
    complete_at: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.srv = SMTPServer(self.config)
        self.srv.start()

    @classmethod
    def make(cls, **kw: object) -> Driver:
        kw.setdefault("greeting", "mx.example.test")
        return cls(ServerConfig(**kw))  # type: ignore[arg-type]

    def consumed(self) -> int:
        return len(self.fed) - self.srv.buffered

    def pump(self) -> None:
        srv = self.srv
        while (ev := srv.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, DataChunk):
                self.data += ev.data
            elif isinstance(ev, MailFrom):
                srv.accept()
            elif isinstance(ev, RcptTo):
                if ev.address in self.reject_rcpt:
                    srv.respond(Reply.of(553, "not here (#5.7.1)"))
                else:
                    srv.accept()
            elif isinstance(ev, DataStart):
                srv.accept()
                self.data_start = self.consumed()
                self.data.clear()
            elif isinstance(ev, MessageComplete):
                self.complete_at.append((self.data_start, self.consumed()))
                self.messages.append(bytes(self.data))
                self.envelopes.append((ev.sender, ev.recipients))
                self.data.clear()
                srv.respond(Reply.of(250, "ok 1 qp 2", "2.6.0"))
            elif isinstance(ev, MessageAborted):
                self.data.clear()
            elif isinstance(ev, StartTLSRequested):
                srv.accept()
            elif isinstance(ev, AuthRequested):
                srv.challenge("")
            elif isinstance(ev, AuthResponse):
                srv.auth_success("user")

    def send(self, data: bytes) -> bytes:
        """Feed data (as one read) and return the replies the server has to send."""
        self.fed += data
        self.srv.feed(data)
        self.pump()
        return self.srv.outgoing()

    def send_bytewise(self, data: bytes) -> bytes:
        out = bytearray()
        for i in range(len(data)):
            out += self.send(data[i : i + 1])
        return bytes(out)

    def codes(self, data: bytes) -> list[int]:
        return [code for code, _ in split_replies(self.send(data))]

    def closes(self) -> list[Close]:
        return [e for e in self.events if isinstance(e, Close)]


def reference_decode(data: bytes) -> bytes:
    """What a correct server stores for DATA bytes that end in CRLF.CRLF: LF lines, unstuffed."""
    assert data.endswith(b".\r\n")
    body = data[: -len(b".\r\n")]
    if not body:
        return b""
    assert body.endswith(b"\r\n")
    lines = body[:-2].split(b"\r\n")
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)


# -- talking to a real qmail-smtpd ----------------------------------------------------------


def queued(home: Path) -> list[tuple[str, list[str], bytes]]:
    """Every message committed to queue/todo: (sender, recipients, message bytes)."""
    found = []
    todo = home / "queue" / "todo"
    # roughly in the order they were queued (the todo link's ctime, coarse-grained);
    # tests that queue several messages in one session compare them in any order
    def queued_order(p: Path) -> int:
        return p.stat().st_ctime_ns

    for entry in sorted(todo.iterdir(), key=queued_order):
        n = int(entry.name)
        fields = entry.read_bytes().split(b"\0")
        sender = ""
        rcpts: list[str] = []
        for f in fields:
            if f.startswith(b"F"):
                sender = f[1:].decode("utf-8", "surrogateescape")
            elif f.startswith(b"T"):
                rcpts.append(f[1:].decode("utf-8", "surrogateescape"))
        mess = (home / "queue" / "mess" / str(n % 23) / str(n)).read_bytes()
        found.append((sender, rcpts, mess))
    return found


def queue_leftovers(home: Path) -> list[str]:
    """Files a refused or dropped message must not leave behind."""
    q = home / "queue"
    left = [str(p.relative_to(q)) for p in (q / "mess").rglob("*") if p.is_file()]
    for sub in ("todo", "intd", "pid"):
        left += [f"{sub}/{p.name}" for p in (q / sub).iterdir()]
    return left


class Talk:
    """A line-level SMTP client over a connected socket, with a deadline on every read."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed after {lines!r} / {self.buf!r}")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\r\n", 1)
            m = REPLY_LINE.match(raw)
            assert m, raw
            lines.append(m.group(3).decode("utf-8", "surrogateescape"))
            if m.group(2) == b" ":
                return int(m.group(1)), lines

    def cmd(self, line: bytes) -> tuple[int, str]:
        self.send(line + b"\r\n")
        code, lines = self.reply()
        return code, lines[-1]

    def at_eof(self) -> bool:
        if self.buf:
            return False
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


class ForkedSMTPD:
    """qmail-smtpd's handle_connection() in a forked child on one end of a socketpair."""

    def __init__(self, home: Path, env: dict[str, str], log: Path) -> None:
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns to pytest
            code = 111
            try:
                parent.close()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 2)
                from pyqmail.smtpd import handle_connection

                code = handle_connection(home, child.detach(), env)
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.log = log
        self.talk = Talk(parent)

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        raise AssertionError("qmail-smtpd did not exit")

    def stop(self) -> None:
        self.talk.close()
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
