"""Helpers shared by the SMTP server tests: a policy-free driver for the pure core."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
