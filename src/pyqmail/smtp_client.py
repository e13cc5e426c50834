"""The SMTP client dialogue of qmail-remote, without any I/O (sans-I/O core).

`SMTPClient` is a state machine: the driver (pyqmail.remote) asks it for the
next action (`Send` bytes, `RECEIVE` bytes, negotiate `STARTTLS`, stream the
message with `SEND_MESSAGE`, or `DONE`), performs it, and feeds back what
happened (`receive()`, `tls_established()`, `tls_failed()`,
`message_sent()`, `connection_lost()` for EOF, errors and timeouts).  When it
is `DONE`, `reports` holds qmail-remote's result: one `r`/`h`/`s` report per
recipient tried, in order, then one `K`/`Z`/`D` message report, each a
(letter, text) pair whose text ends in a newline.

Compared with qmail 1.03's client, which speaks only HELO, this one sends
EHLO (falling back to HELO), uses PIPELINING, SIZE, 8BITMIME, SMTPUTF8 and
STARTTLS when offered, and keeps qmail's report texts for everything qmail
already reported.  The message body is serialised by `DataEncoder`, which
normalises every line ending (CRLF, bare LF, bare CR) to CRLF *before*
dot-stuffing, so nothing in a stored message can end DATA early at the next
hop (the SMTP-smuggling family of bugs).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

from .fmt import quote

SMTPTEXT_MAX = 5000  # bytes of a reply qmail-remote keeps to quote
LINE_MAX = 65536  # a longer reply line is treated as a broken peer, not buffered forever
MALFORMED_CODE = 451  # a reply without a 3-digit code counts as a temporary failure


class ProtocolError(Exception):
    """The peer sent something that is not an SMTP reply stream."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as qmail quotes it: every line, CR removed, each ended by `\\n`."""
        text = "".join(line + "\n" for line in self.lines).replace("\0", "?")
        if len(text) > SMTPTEXT_MAX:
            text = text[: SMTPTEXT_MAX - 1] + "\n"
        return text


def _code_of(line: bytes) -> int:
    if len(line) >= 3 and line[:3].isdigit():
        return int(line[:3])
    return MALFORMED_CODE


class ReplyParser:
    """Bytes from the server in, complete (possibly multi-line) replies out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0

    @property
    def pending(self) -> bool:
        """Whether bytes beyond the last complete reply are buffered."""
        return bool(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > LINE_MAX:
                    raise ProtocolError("reply line too long")
                return replies
            raw = bytes(self._buf[:end]).replace(b"\r", b"")
            del self._buf[: end + 1]
            if not self._lines:
                self._code = _code_of(raw)
            self._lines.append(raw.decode("utf-8", "replace"))
            # a line is a continuation only when a dash follows the three digits
            if len(raw) >= 4 and raw[3:4] == b"-" and _code_of(raw) != MALFORMED_CODE:
                if sum(len(x) for x in self._lines) > LINE_MAX:
                    raise ProtocolError("reply too long")
                continue
            replies.append(Reply(self._code, tuple(self._lines)))
            self._lines = []


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) mapped to their parameters; the first line is the greeting."""
    result: dict[str, str] = {}
    for line in reply.lines[1:]:
        body = line[4:].strip()
        if not body:
            continue
        keyword, _, params = body.partition(" ")
        result[keyword.upper()] = params.strip()
    return result


class DataEncoder:
    """Message bytes in, DATA wire bytes out: CRLF line ends, dot-stuffed.

    Every CRLF, bare LF and bare CR in the input counts as one line end and
    leaves as CRLF; then every line that starts with `.` gets another `.`.
    Doing it in this order means the output holds no CR or LF except as
    CRLF pairs and the only `CRLF . CRLF` is the terminator `finish()` adds.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._skip_lf = False  # the previous chunk ended in CR, already sent as a line end
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if not chunk:
            return b""
        self._empty = False
        self._skip_lf = chunk[-1:] == b"\r"
        text = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = text.replace(b"\n.", b"\n..")
        if self._line_start and text[:1] == b".":
            text = b"." + text
        self._line_start = text[-1:] == b"\n"
        return text.replace(b"\n", b"\r\n")

    @property
    def complete(self) -> bool:
        """Whether what was fed so far ends at a line end (or was empty)."""
        return self._empty or self._line_start

    def finish(self) -> bytes:
        if not self.complete:
            raise ValueError("partial final line")
        return b".\r\n"


def encode_message(data: bytes) -> bytes:
    """The whole DATA payload for a message held in memory, terminator included."""
    enc = DataEncoder()
    return enc.feed(data) + enc.finish()


def is_complete(data: bytes) -> bool:
    """Whether a stored message ends at a line end (qmail refuses a partial final line)."""
    return not data or data[-1:] in (b"\n", b"\r")


# -- addresses ----------------------------------------------------------------------


def has_line_break(addr: str) -> bool:
    """An address SMTP cannot carry: a CR, LF or NUL would end or corrupt the command."""
    return "\r" in addr or "\n" in addr or "\0" in addr


def mangle(addr: str) -> bytes:
    """An envelope address as it goes inside `<>` (qmail's addrmangle).

    The local part is quoted with qmail's quote() when it is not a dot-atom;
    non-ASCII characters count as atom characters, as RFC 6531 allows.
    """
    at = addr.rfind("@")
    if at < 0:
        return addr.encode("utf-8", "surrogateescape")
    local, domain = addr[:at], addr[at:]
    if not local.isascii():
        probe = "".join(c if c.isascii() else "a" for c in local)
        local = local if quote(probe) == probe else quote(local)
    else:
        local = quote(local)
    return (local + domain).encode("utf-8", "surrogateescape")


def needs_smtputf8(sender: str, recipients: Iterable[str]) -> bool:
    return not sender.isascii() or not all(r.isascii() for r in recipients)


# -- the dialogue -------------------------------------------------------------------


class TLSMode(enum.Enum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, any certificate
    ENCRYPT = "encrypt"  # STARTTLS required, certificate not checked
    VERIFY = "verify"  # STARTTLS required, certificate must verify

    @property
    def required(self) -> bool:
        return self in (TLSMode.ENCRYPT, TLSMode.VERIFY)


@dataclass(frozen=True)
class Send:
    data: bytes


class Action(enum.Enum):
    RECEIVE = "receive"  # read from the peer and call receive() or connection_lost()
    STARTTLS = "starttls"  # handshake, then tls_established() or tls_failed()
    SEND_MESSAGE = "send_message"  # stream the encoded message and `.CRLF`, then message_sent()
    DONE = "done"  # reports are ready; close the connection unless `reusable` says keep it


RECEIVE = Action.RECEIVE
STARTTLS = Action.STARTTLS
SEND_MESSAGE = Action.SEND_MESSAGE
DONE = Action.DONE


@dataclass(frozen=True)
class MessageInfo:
    size: int
    has_8bit: bool


@dataclass(frozen=True)
class TLSInfo:
    version: str
    cipher: str
    verified_name: str | None  # the name the certificate was verified for, None if unchecked

    def describe(self) -> str:
        check = (
            f"certificate verified for {self.verified_name}"
            if self.verified_name is not None
            else "certificate not verified"
        )
        return f"TLS: {self.version} {self.cipher}, {check}.\n"


class _Lost(Exception):
    pass


@dataclass
class SMTPClient:
    """One SMTP transaction for one message to one connected peer."""

    peer: str  # the IP address, as qmail prints it in reports
    helo: str
    sender: str
    recipients: list[str]
    message: MessageInfo
    tls: TLSMode = TLSMode.OPPORTUNISTIC
    reports: list[tuple[str, str]] = field(default_factory=list)
    tls_info: TLSInfo | None = None
    tls_note: str = ""  # the TLS outcome line added to the message report
    retry_plaintext: bool = False  # opportunistic handshake failed: try this peer again in clear
    extensions: dict[str, str] = field(default_factory=dict)
    # a connection kept from an earlier transaction: greeting, EHLO and TLS are behind us, and
    # `extensions` and `tls_note` are what they gave then
    resumed: bool = False
    keep_open: bool = False  # after a delivered message, end without QUIT so it can be reused
    reusable: bool = False  # set when DONE leaves the connection ready for another transaction
    stale: bool = False  # a resumed connection that was already dead: nothing was transacted

    def __post_init__(self) -> None:
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._lost = False
        self._dot_sent = False
        self._tls_error: str | None = None
        self._heard = False  # any reply received on this connection in this transaction
        self._gen = self._dialogue()

    # -- driver interface -----------------------------------------------------------

    def next_action(self) -> Send | Action:
        return next(self._gen)

    def receive(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError:
            self._lost = True
            return
        if replies:
            self._heard = True
        self._replies.extend(replies)

    def connection_lost(self) -> None:
        self._lost = True

    def tls_established(self, info: TLSInfo) -> None:
        self.tls_info = info
        # nothing learnt in clear text may survive the handshake (CVE-2011-0411 class)
        self._parser = ReplyParser()
        self._replies.clear()

    def tls_failed(self, reason: str) -> None:
        self._tls_error = reason

    def message_sent(self) -> None:
        self._dot_sent = True

    @property
    def tls_error(self) -> str:
        return self._tls_error or ""

    @property
    def done(self) -> bool:
        return bool(self.reports) and self.reports[-1][0] in "KZD"

    # -- the dialogue ---------------------------------------------------------------

    def _dialogue(self) -> Generator[Send | Action, None, None]:
        try:
            yield from self._run()
        except _Lost:
            if self.resumed and not self._heard:
                # the peer closed a kept connection while it sat idle: no command reached
                # it, so the caller simply connects afresh
                self.stale = True
                self.reports.clear()
            else:
                dup = "Possible duplicate! " if self._dot_sent else ""
                self._final("Z", f"Connected to {self.peer} but connection died. {dup}(#4.4.2)\n")
        while True:
            yield DONE

    def _final(self, letter: str, text: str, reply: Reply | None = None) -> None:
        if reply is not None:
            text += "Remote host said: " + reply.text
        self.reports.append((letter, text + self.tls_note))

    def _send(self, data: bytes) -> Generator[Send | Action, None, None]:
        yield Send(data)
        if self._lost:
            raise _Lost

    def _read(self) -> Generator[Send | Action, None, Reply]:
        while not self._replies:
            if self._lost:
                raise _Lost
            yield RECEIVE
        return self._replies.popleft()

    def _quit(
        self, letter: str, text: str, reply: Reply | None = None
    ) -> Generator[Send | Action, None, None]:
        self._final(letter, text, reply)
        if not self._lost:
            yield Send(b"QUIT\r\n")

    def _hello(self) -> Generator[Send | Action, None, dict[str, str] | None]:
        helo = self.helo.encode("utf-8", "surrogateescape")
        yield from self._send(b"EHLO " + helo + b"\r\n")
        reply = yield from self._read()
        if reply.code == 250:
            return parse_ehlo(reply)
        yield from self._send(b"HELO " + helo + b"\r\n")
        reply = yield from self._read()
        if reply.code != 250:
            yield from self._quit(
                "Z", f"Connected to {self.peer} but my name was rejected.\n", reply
            )
            return None
        return {}

    def _starttls(
        self, ext: dict[str, str]
    ) -> Generator[Send | Action, None, dict[str, str] | None]:
        """Negotiate TLS as the policy asks; the extensions to use afterwards, or None if done."""
        peer = self.peer
        if "STARTTLS" not in ext:
            if self.tls.required:
                yield from self._quit(
                    "Z",
                    f"Connected to {peer} but it does not offer STARTTLS, "
                    "which control/tlspolicy requires. (#4.7.4)\n",
                )
                return None
            self.tls_note = "TLS: not offered by the remote host; sent in clear text.\n"
            return ext
        yield from self._send(b"STARTTLS\r\n")
        reply = yield from self._read()
        if reply.code != 220:
            if self.tls.required:
                yield from self._quit(
                    "Z",
                    f"Connected to {peer} but STARTTLS was refused, "
                    "and control/tlspolicy requires TLS. (#4.7.4)\n",
                    reply,
                )
                return None
            said = reply.text.replace("\n", " ").strip()
            self.tls_note = f"TLS: STARTTLS refused ({said}); sent in clear text.\n"
            return ext
        if self._parser.pending or self._replies:
            # bytes after the 220 were never sent by the TLS peer: someone injected them
            self._final(
                "Z",
                f"Connected to {peer} but it sent data after its STARTTLS reply; "
                "possible attack, giving up. (#4.7.0)\n",
            )
            return None
        yield STARTTLS
        if self._tls_error is not None:
            if self.tls == TLSMode.OPPORTUNISTIC:
                self.retry_plaintext = True
                self._final("Z", f"TLS handshake with {peer} failed: {self._tls_error}. (#4.7.5)\n")
            elif self.tls == TLSMode.VERIFY:
                self._final(
                    "Z", f"TLS unable to verify server {peer}: {self._tls_error}. (#4.7.5)\n"
                )
            else:
                self._final("Z", f"TLS handshake with {peer} failed: {self._tls_error}. (#4.7.5)\n")
            return None
        assert self.tls_info is not None
        self.tls_note = self.tls_info.describe()
        return (yield from self._hello())

    def _mail_command(self, ext: dict[str, str], utf8: bool) -> bytes:
        cmd = b"MAIL FROM:<" + mangle(self.sender) + b">"
        if "SIZE" in ext:
            cmd += b" SIZE=%d" % self.message.size
        if (self.message.has_8bit or utf8) and "8BITMIME" in ext:
            cmd += b" BODY=8BITMIME"
        if utf8:
            cmd += b" SMTPUTF8"
        return cmd + b"\r\n"

    def _run(self) -> Generator[Send | Action, None, None]:
        peer = self.peer
        if self.resumed:
            ext = self.extensions
        else:
            reply = yield from self._read()
            if reply.code != 220:
                yield from self._quit("Z", f"Connected to {peer} but greeting failed.\n", reply)
                return
            hello = yield from self._hello()
            if hello is None:
                return
            if self.tls != TLSMode.NONE:
                hello = yield from self._starttls(hello)
                if hello is None:
                    return
            ext = self.extensions = hello

        limit = ext.get("SIZE", "").split(" ")[0]
        if "SIZE" in ext and limit.isdigit() and 0 < int(limit) < self.message.size:
            yield from self._quit(
                "D",
                f"Connected to {peer} but the message is {self.message.size} bytes, "
                f"over its limit of {int(limit)} bytes. (#5.3.4)\n",
            )
            return
        utf8 = needs_smtputf8(self.sender, self.recipients)
        if utf8 and "SMTPUTF8" not in ext:
            yield from self._quit(
                "D",
                f"Connected to {peer} but it does not support SMTPUTF8, which the "
                "non-ASCII addresses of this message need. (#5.6.7)\n",
            )
            return

        mail = self._mail_command(ext, utf8)
        rcpts = [
            None if has_line_break(r) else b"RCPT TO:<" + mangle(r) + b">\r\n"
            for r in self.recipients
        ]
        pipelining = "PIPELINING" in ext
        if pipelining:
            yield from self._send(mail + b"".join(c for c in rcpts if c) + b"DATA\r\n")
        else:
            yield from self._send(mail)
        reply = yield from self._read()
        if self.resumed and reply.code == 421:
            # the peer is closing the kept connection (idle too long): nothing was
            # transacted, and the caller connects afresh
            self.stale = True
            return
        if reply.code >= 400:
            letter = "D" if reply.code >= 500 else "Z"
            yield from self._quit(letter, f"Connected to {peer} but sender was rejected.\n", reply)
            return
        accepted = 0
        for cmd in rcpts:
            if cmd is None:
                self.reports.append(
                    (
                        "h",
                        "Sorry, this address holds a line break, which SMTP cannot carry. (#5.1.3)\n",
                    )
                )
                continue
            if not pipelining:
                yield from self._send(cmd)
            reply = yield from self._read()
            if reply.code >= 400:
                letter = "h" if reply.code >= 500 else "s"
                said = "Remote host said: " + reply.text
                self.reports.append((letter, f"{peer} does not like recipient.\n{said}"))
            else:
                accepted += 1
                self.reports.append(("r", ""))
        if accepted == 0:
            # the pipelined DATA is answered with an error (or ignored): nothing more to say
            yield from self._quit("D", f"Giving up on {peer}.\n")
            return
        if not pipelining:
            yield from self._send(b"DATA\r\n")
        reply = yield from self._read()
        if reply.code >= 400:
            letter = "D" if reply.code >= 500 else "Z"
            yield from self._quit(letter, f"{peer} failed on DATA command.\n", reply)
            return
        yield SEND_MESSAGE
        if self._lost:
            raise _Lost
        reply = yield from self._read()
        if reply.code >= 500:
            yield from self._quit("D", f"{peer} failed after I sent the message.\n", reply)
        elif reply.code >= 400:
            yield from self._quit("Z", f"{peer} failed after I sent the message.\n", reply)
        elif self.keep_open and not self._parser.pending and not self._replies:
            # the transaction is over and the peer said nothing more: the connection is
            # back where it was after EHLO, ready for the next MAIL
            self._final("K", f"{peer} accepted message.\n", reply)
            self.reusable = True
        else:
            yield from self._quit("K", f"{peer} accepted message.\n", reply)


def format_reports(reports: Iterable[tuple[str, str]]) -> bytes:
    """qmail-remote's output: each report's letter and text, NUL-terminated."""
    return b"".join(
        (letter + text).encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"
        for letter, text in reports
    )
