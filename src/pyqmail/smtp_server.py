"""The SMTP server protocol as a pure state machine (no sockets, files or clocks).

The I/O layer (pyqmail.smtpd) feeds received bytes with `feed()`, pulls events
with `next_event()` until it returns None, sends `outgoing()` to the client and
only then reads again.  That order is what makes PIPELINING work: replies to a
pipelined batch leave together when the input runs dry (qmail's flush-before-read).

Events that need a policy decision (`MailFrom`, `RcptTo`, `DataStart`,
`MessageComplete`, `StartTLSRequested`, `AuthRequested`, `AuthResponse`) stop
the machine until the caller answers with `accept()`, `respond()`,
`challenge()` or `auth_success()`; everything buffered behind the command waits.
Informational events (`Helo`, `DataChunk`, `MessageAborted`, `Close`) need no
answer.

Replies are qmail-smtpd's texts.  After EHLO, with ENHANCEDSTATUSCODES on, an
RFC 3463 code is put right after the reply code (taken from qmail's `(#x.y.z)`
suffix, which stays in the text for log parsers); after HELO the replies are
byte-for-byte qmail's.

Memory limits (nothing grows with client input beyond these):
- a command line may be `command_line_max` bytes (default 2048, RFC 5321 asks
  for at least 512) including CRLF; a longer one is discarded as it arrives and
  answered `500 line too long (#5.5.2)` at its LF; an AUTH response line may be
  12288 bytes (RFC 4954);
- message data is never held: each `feed()` yields at most one `DataChunk` with
  the stored bytes of that input, so the caller streams it to qmail-queue;
- per header line only the first 9 bytes are kept (for hop counting), so a
  header flood costs no memory; databytes is enforced while streaming;
- a text line longer than `text_line_max` (default 1000 including CRLF, 0 turns
  the check off) makes the message refused after its final dot with
  `554 ... (#5.6.0)`; the line itself is streamed, not buffered;
- at most `max_recipients` recipients (default 100) per transaction, the rest
  get `452 too many recipients (#4.5.3)` so the client retries them later.
The caller must feed only after `next_event()` returned None; then the input
buffer never holds more than one read plus one partial line.

DATA and SMTP smuggling: data ends only at CR LF `.` CR LF.  A bare LF or a bare
CR anywhere in the data (which covers `\\n.\\n`, `\\r.\\r`, `\\r\\n.\\n`,
`\\n.\\r\\n` and every other smuggling variant) gets qmail's immediate
`451 See https://cr.yp.to/docs/smtplf.html.` and a `Close`: nothing is queued
and nothing after it is ever read as a command.  qmail does this for bare LF;
the bare CR rule is ours (qmail stored bare CRs, which a later hop could turn
into a line end).  CRLF is stored as LF (queue format), dot-stuffing is undone,
NUL bytes are data and stored as they are.

STARTTLS and AUTH are states and hooks here; the handshake and the credential
check belong to the I/O layer.  When STARTTLS is accepted while more input is
already buffered (plaintext injection, CVE-2011-0411), the session is closed
without a reply.  `tls_started()` then forgets HELO, transaction and input.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

COMMAND_LINE_MAX = 2048
AUTH_LINE_MAX = 12288
TEXT_LINE_MAX = 1000
ADDRESS_MAX = 900
MAX_HOPS = 100
MAX_RECIPIENTS = 100

SMTPLF_TEXT = "See https://cr.yp.to/docs/smtplf.html."

_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E
_CR_OR_LF = re.compile(rb"[\r\n]")
_STATUS_SUFFIX = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)\s*$")


# -- replies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, text lines, and the RFC 3463 status for enhanced mode.

    status None: taken from a trailing `(#x.y.z)` in the text, else `c.0.0`.
    status "": never carries an enhanced code (greeting, HELO/EHLO, 3xx).
    """

    code: int
    lines: tuple[str, ...]
    status: str | None = None
    # render()'s bytes per mode: the common replies are constants, made once per process
    _rendered: dict[bool, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def of(cls, code: int, text: str, status: str | None = None) -> Reply:
        return cls(code, (text,), status)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def enhanced_status(self) -> str:
        if self.status is not None:
            return self.status
        if self.code // 100 not in (2, 4, 5):
            return ""
        m = _STATUS_SUFFIX.search(self.lines[-1])
        if m and m.group(1)[0] == str(self.code)[0]:
            return m.group(1)
        return f"{self.code // 100}.0.0"

    def render(self, enhanced: bool) -> bytes:
        out = self._rendered.get(enhanced)
        if out is None:
            out = self._rendered[enhanced] = self._render(enhanced)
        return out

    def _render(self, enhanced: bool) -> bytes:
        status = self.enhanced_status() if enhanced else ""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            body = f"{status} {line}" if status else line
            out.append(f"{self.code}{sep}{body}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")


R_MAIL_OK = Reply.of(250, "ok", "2.1.0")
R_RCPT_OK = Reply.of(250, "ok", "2.1.5")
R_OK = Reply.of(250, "ok", "2.0.0")
R_FLUSHED = Reply.of(250, "flushed", "2.0.0")
R_GO_AHEAD = Reply.of(354, "go ahead", "")
R_VRFY = Reply.of(252, "send some mail, i'll try my best", "2.1.5")
R_HELP = Reply.of(214, "pyqmail, a qmail-compatible mail server", "2.0.0")
R_UNIMPLEMENTED = Reply.of(502, "unimplemented (#5.5.1)")
R_MAIL_FIRST = Reply.of(503, "MAIL first (#5.5.1)")
R_RCPT_FIRST = Reply.of(503, "RCPT first (#5.5.1)")
R_NESTED_MAIL = Reply.of(503, "nested MAIL command (#5.5.1)")
R_SYNTAX = Reply.of(555, "syntax error (#5.5.4)")
R_LINE_TOO_LONG = Reply.of(500, "line too long (#5.5.2)")
R_BAD_BYTES = Reply.of(500, "command contains a NUL or a bare CR (#5.5.2)")
R_TOO_MANY_RCPTS = Reply.of(452, "too many recipients (#4.5.3)")
R_DATABYTES = Reply.of(552, "sorry, that message size exceeds my databytes limit (#5.3.4)")
R_HOPS = Reply.of(554, "too many hops, this message is looping (#5.4.6)")
R_BARE_LF = Reply.of(451, SMTPLF_TEXT, "4.6.0")
R_QQT = Reply.of(451, "qqt failure (#4.3.0)")
R_NON_ASCII = Reply.of(553, "sorry, non-ASCII address without SMTPUTF8 (#5.6.7)")
R_BAD_SIZE = Reply.of(501, "bad SIZE parameter (#5.5.4)")
R_BAD_BODY = Reply.of(501, "bad BODY parameter (#5.5.4)")
R_BAD_SMTPUTF8 = Reply.of(501, "SMTPUTF8 takes no value (#5.5.4)")
R_MAIL_PARAM = Reply.of(555, "unsupported MAIL parameter (#5.5.4)")
R_RCPT_PARAM = Reply.of(555, "unsupported RCPT parameter (#5.5.4)")
R_TLS_ARGS = Reply.of(501, "Syntax error (no parameters allowed) (#5.5.4)")
R_TLS_ACTIVE = Reply.of(503, "TLS already active (#5.5.1)")
R_TLS_READY = Reply.of(220, "ready for tls", "")
R_AUTH_NEEDS_TLS = Reply.of(
    538, "encryption required for requested authentication mechanism (#5.7.11)"
)
R_AUTH_AGAIN = Reply.of(503, "you're already authenticated (#5.5.1)")
R_AUTH_IN_TXN = Reply.of(503, "no auth during mail transaction (#5.5.1)")
R_AUTH_MECH = Reply.of(504, "auth type unimplemented (#5.5.4)")
R_AUTH_CANCEL = Reply.of(501, "auth exchange canceled (#5.0.0)")
R_AUTH_OK = Reply.of(235, "ok, go ahead (#2.7.0)")
R_AUTH_REQUIRED = Reply.of(530, "authentication required (#5.7.0)")


def long_line_reply(limit: int) -> Reply:
    return Reply.of(554, f"message contains a line longer than {limit} bytes (#5.6.0)")


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    greeting: str
    databytes: int = 0  # 0: no limit
    max_recipients: int = MAX_RECIPIENTS
    command_line_max: int = COMMAND_LINE_MAX
    text_line_max: int = TEXT_LINE_MAX  # 0: no limit
    max_hops: int = MAX_HOPS
    enhanced_status_codes: bool = True
    smtputf8: bool = True
    starttls: bool = False  # offer STARTTLS (the I/O layer has a certificate)
    tls_active: bool = False  # the connection started with TLS (port 465)
    auth_mechanisms: tuple[str, ...] = ()
    auth_plaintext: bool = False  # allow AUTH before TLS
    auth_required: bool = False  # submission: MAIL needs AUTH first
    strict_mail: bool = False  # 503 on MAIL inside a transaction (qmail restarts it)


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Helo:
    name: str
    extended: bool


@dataclass(frozen=True)
class MailFrom:
    """Decision: accept(value) stores value (default: address) as the sender."""

    address: str
    params: dict[str, str | None]


@dataclass(frozen=True)
class RcptTo:
    """Decision: accept(value) appends value (default: address) to the recipients."""

    address: str
    params: dict[str, str | None]


@dataclass(frozen=True)
class DataStart:
    """Decision: accept() sends 354 and enters DATA; any other reply ends the transaction."""

    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class DataChunk:
    data: bytes


@dataclass(frozen=True)
class MessageComplete:
    """Decision: the final dot arrived and the message is acceptable; respond() the verdict."""

    sender: str
    recipients: tuple[str, ...]
    size: int
    hops: int


@dataclass(frozen=True)
class MessageAborted:
    """The message was refused after its final dot with `reply`; drop what was streamed."""

    reply: Reply


@dataclass(frozen=True)
class StartTLSRequested:
    """Decision: accept() sends 220 and waits for tls_started(); respond() e.g. a 454."""


@dataclass(frozen=True)
class AuthRequested:
    """Decision: challenge(), auth_success(user) or respond() a failure."""

    mechanism: str
    initial: str | None


@dataclass(frozen=True)
class AuthResponse:
    """Decision: the client's answer to a 334 challenge (cancel `*` is handled here)."""

    line: str


@dataclass(frozen=True)
class Close:
    """Send what is in outgoing(), then close the connection."""

    reason: str
    clean: bool = False  # True after QUIT


Event: TypeAlias = (
    Helo
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | MessageComplete
    | MessageAborted
    | StartTLSRequested
    | AuthRequested
    | AuthResponse
    | Close
)


class State(Enum):
    COMMAND = "command"
    DATA = "data"
    AUTH = "auth"  # waiting for the answer to a 334 challenge
    TLS_WAIT = "tls-wait"  # 220 sent, waiting for the handshake
    CLOSED = "closed"


class ProtocolUsageError(Exception):
    """The caller broke the feed/next_event/decide contract (a bug, not client input)."""


# -- address parsing (qmail-smtpd's addrparse plus ESMTP parameters) -------------------


def parse_path(arg: bytes) -> tuple[bytes, bytes]:
    """Split a MAIL/RCPT argument into the bare address and the parameter text.

    qmail's rules: with `<`, the address starts after it and ends at the first
    unquoted `>`; without, it starts after the first `:` (and spaces) and ends
    at the first unquoted space, and no `:` gives the empty address.  A
    leading source route `@a,@b:` is dropped, `\\` escapes a byte, `"` quotes.
    The FROM:/TO: keywords are not checked, as in qmail.
    """
    lt = arg.find(b"<")
    if lt >= 0:
        s = arg[lt + 1 :]
        stop = b">"
    else:
        colon = arg.find(b":")
        if colon < 0:
            return b"", b""
        s = arg[colon + 1 :].lstrip(b" ")
        stop = b" "
    if s.startswith(b"@"):
        c = s.find(b":")
        if c >= 0:
            s = s[c + 1 :]
    if b"\\" not in s and b'"' not in s:
        # nothing escaped or quoted (nearly every address): the address ends at the first stop
        end = s.find(stop)
        return (s, b"") if end < 0 else (s[:end], s[end + 1 :])
    out = bytearray()
    quoted = False
    i = 0
    n = len(s)
    while i < n:
        ch = s[i]
        if ch == 0x5C:  # backslash
            if i + 1 < n:
                out.append(s[i + 1])
            i += 2
            continue
        if ch == 0x22:
            quoted = not quoted
        elif not quoted and ch == stop[0]:
            return bytes(out), s[i + 1 :]
        else:
            out.append(ch)
        i += 1
    return bytes(out), b""


def parse_params(text: bytes) -> dict[str, str | None] | None:
    """`KEY[=VALUE]` words into a dict with upper-case keys; None when malformed."""
    params: dict[str, str | None] = {}
    for word in text.split(b" "):
        if not word:
            continue
        key, eq, value = word.partition(b"=")
        if not key or not key.isascii() or not key.replace(b"-", b"").isalnum():
            return None
        params[key.decode("ascii").upper()] = (
            value.decode("utf-8", "surrogateescape") if eq else None
        )
    return params


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# -- the machine -----------------------------------------------------------------------

# per greeting: the 220 banner and the reply to HELO, so that a long-lived process renders
# them once instead of at every connection (a few greetings at most: one per listener)
_GREETING_REPLIES: dict[str, tuple[Reply, Reply]] = {}


def _greeting_replies(greeting: str) -> tuple[Reply, Reply]:
    replies = _GREETING_REPLIES.get(greeting)
    if replies is None:
        if len(_GREETING_REPLIES) >= 16:
            _GREETING_REPLIES.clear()
        replies = (Reply.of(220, f"{greeting} ESMTP", ""), Reply.of(250, greeting, ""))
        _GREETING_REPLIES[greeting] = replies
    return replies


@dataclass
class _DataScan:
    """Per-message DATA state; O(1) in the size of the message."""

    line_start: bool = True
    line_len: int = 0
    in_header: bool = True
    prefix: bytearray = field(default_factory=bytearray)
    hops: int = 0
    size: int = 0
    too_big: bool = False
    long_line: bool = False


class SMTPServer:
    """One SMTP session's protocol state."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = State.COMMAND
        self.helo: str | None = None
        self.extended = False  # last greeting was EHLO
        self.tls_active = config.tls_active
        self.authenticated: str | None = None
        self.sender: str | None = None  # None: no transaction
        self.recipients: list[str] = []
        self.smtputf8 = False
        self._buf = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._discarding = False  # inside an over-long command line
        self._scan = _DataScan()
        self._eof = False

    # -- feeding and pulling ------------------------------------------------------------

    def start(self) -> None:
        """Queue the greeting."""
        self._reply(_greeting_replies(self.config.greeting)[0])

    def feed(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is State.TLS_WAIT and data:
            # bytes where the TLS handshake should be: never read them as commands
            self._close("input while waiting for TLS")
            return
        self._buf += data

    def eof(self) -> None:
        """The client closed its side; a pending message is dropped."""
        if self.state is not State.CLOSED:
            self._eof = True

    def outgoing(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def enhanced(self) -> bool:
        return self.config.enhanced_status_codes and self.extended

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def waiting(self) -> Event | None:
        """The decision event the machine is waiting on, if any."""
        return self._pending

    def next_event(self) -> Event | None:
        """The next event, or None when more input is needed (or the session is over)."""
        while True:
            if self._events:
                ev = self._events.popleft()
                return ev
            if self._pending is not None:
                raise ProtocolUsageError(f"{type(self._pending).__name__} is waiting for an answer")
            if self.state is State.CLOSED or self.state is State.TLS_WAIT:
                return None
            if not self._step():
                if self._eof:
                    self._eof = False
                    what = "in DATA" if self.state is State.DATA else "without QUIT"
                    self._close(f"client closed the connection {what}")
                    continue
                return None

    # -- answering decisions --------------------------------------------------------------

    def accept(self, value: str | None = None) -> None:
        ev = self._take_pending()
        if isinstance(ev, MailFrom):
            self._mail_accepted(ev.address if value is None else value, R_MAIL_OK)
        elif isinstance(ev, RcptTo):
            self.recipients.append(ev.address if value is None else value)
            self._reply(R_RCPT_OK)
        elif isinstance(ev, DataStart):
            self._enter_data()
        elif isinstance(ev, StartTLSRequested):
            self._start_tls()
        elif isinstance(ev, (AuthRequested, AuthResponse)):
            if value is None:
                raise ProtocolUsageError("accepting AUTH needs the user name")
            self._auth_ok(value)
        else:
            raise ProtocolUsageError(f"{type(ev).__name__} needs respond(), not accept()")

    def respond(self, reply: Reply, value: str | None = None) -> None:
        """Answer the waiting decision with an explicit reply (positive or not)."""
        ev = self._take_pending()
        if isinstance(ev, MailFrom):
            if reply.positive:
                self._mail_accepted(ev.address if value is None else value, reply)
                return
            self._end_transaction()
        elif isinstance(ev, RcptTo):
            if reply.positive:
                self.recipients.append(ev.address if value is None else value)
        elif isinstance(ev, DataStart):
            if reply.code == 354:
                self._enter_data(reply)
                return
            self._end_transaction()
        elif isinstance(ev, StartTLSRequested):
            if reply.code == 220:
                self._start_tls(reply)
                return
        elif isinstance(ev, (AuthRequested, AuthResponse)):
            if reply.code == 334:
                self.state = State.AUTH
            elif reply.code == 235:
                raise ProtocolUsageError("use auth_success() to grant AUTH")
            else:
                self.state = State.COMMAND
        self._reply(reply)

    def challenge(self, text: str) -> None:
        """Send `334 text` and hand the client's next line over as AuthResponse."""
        self.respond(Reply.of(334, text, ""))

    def auth_success(self, user: str) -> None:
        ev = self._take_pending()
        if not isinstance(ev, (AuthRequested, AuthResponse)):
            raise ProtocolUsageError("auth_success() without an AUTH exchange")
        self._auth_ok(user)

    def tls_started(self) -> None:
        """The handshake succeeded: everything learnt in plaintext is forgotten."""
        if self.state is not State.TLS_WAIT:
            raise ProtocolUsageError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.helo = None
        self.extended = False
        self.authenticated = None
        self._end_transaction()
        self._buf.clear()
        self.state = State.COMMAND

    # -- internals ------------------------------------------------------------------------

    def _take_pending(self) -> Event:
        ev = self._pending
        if ev is None:
            raise ProtocolUsageError("no decision is waiting")
        self._pending = None
        return ev

    def _wait_for(self, ev: Event) -> None:
        self._pending = ev
        self._events.append(ev)

    def _reply(self, reply: Reply) -> None:
        self._out += reply.render(self.enhanced)

    def _close(self, reason: str, clean: bool = False) -> None:
        self.state = State.CLOSED
        self._buf.clear()
        self._pending = None
        self._events.append(Close(reason, clean))

    def _end_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.smtputf8 = False

    def _mail_accepted(self, sender: str, reply: Reply) -> None:
        self.sender = sender
        self.recipients = []
        self._reply(reply)

    def _auth_ok(self, user: str) -> None:
        self.authenticated = user
        self.state = State.COMMAND
        self._reply(R_AUTH_OK)

    def _start_tls(self, reply: Reply = R_TLS_READY) -> None:
        if self._buf:
            self._close("plaintext pipelined after STARTTLS")
            return
        self._reply(reply)
        self.state = State.TLS_WAIT

    def _enter_data(self, reply: Reply = R_GO_AHEAD) -> None:
        self._reply(reply)
        self.state = State.DATA
        self._scan = _DataScan()

    def _step(self) -> bool:
        """Consume some input; False when nothing more can be done without input."""
        if self.state is State.DATA:
            return self._scan_data()
        limit = AUTH_LINE_MAX if self.state is State.AUTH else self.config.command_line_max
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0:
            if len(buf) >= limit:
                # keep nothing of an over-long line; answer once its LF arrives
                self._discarding = True
                buf.clear()
            return False
        line = bytes(buf[:lf])
        del buf[: lf + 1]
        if self._discarding or lf + 1 > limit:
            self._discarding = False
            if self.state is State.AUTH:
                self.state = State.COMMAND
            self._reply(R_LINE_TOO_LONG)
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self.state is State.AUTH:
            self._auth_line(line)
        else:
            self._command(line)
        return True

    def _auth_line(self, line: bytes) -> None:
        self.state = State.COMMAND
        if line.strip() == b"*":
            self._reply(R_AUTH_CANCEL)
            return
        self._wait_for(AuthResponse(_decode(line)))

    def _command(self, line: bytes) -> None:
        if b"\0" in line or b"\r" in line:
            self._reply(R_BAD_BYTES)
            return
        verb_b, _, arg = line.partition(b" ")
        arg = arg.lstrip(b" ")
        verb = verb_b.upper()
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._reply(R_UNIMPLEMENTED)
            return
        handler(self, arg)

    # command handlers ----------------------------------------------------------------

    def _cmd_helo(self, arg: bytes) -> None:
        self._greet(arg, False)
        self._reply(_greeting_replies(self.config.greeting)[1])

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._greet(arg, True)
        c = self.config
        lines = [c.greeting, "PIPELINING", "8BITMIME", f"SIZE {c.databytes}"]
        if c.enhanced_status_codes:
            lines.append("ENHANCEDSTATUSCODES")
        if c.smtputf8:
            lines.append("SMTPUTF8")
        if c.starttls and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered() and self.authenticated is None:
            lines.append("AUTH " + " ".join(c.auth_mechanisms))
        self._reply(Reply(250, tuple(lines), ""))

    def _greet(self, arg: bytes, extended: bool) -> None:
        self._end_transaction()
        self.helo = _decode(arg)
        self.extended = extended
        self._events.append(Helo(self.helo, extended))

    def _auth_offered(self) -> bool:
        c = self.config
        return bool(c.auth_mechanisms) and (self.tls_active or c.auth_plaintext)

    def _cmd_mail(self, arg: bytes) -> None:
        c = self.config
        if c.auth_required and self.authenticated is None:
            self._reply(R_AUTH_REQUIRED)
            return
        if c.strict_mail and self.sender is not None:
            self._reply(R_NESTED_MAIL)
            return
        address, rest = parse_path(arg)
        if len(address) > ADDRESS_MAX:
            self._reply(R_SYNTAX)
            return
        params = parse_params(rest)
        if params is None:
            self._reply(R_SYNTAX)
            return
        utf8 = False
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                    self._reply(R_BAD_SIZE)
                    return
                if c.databytes and int(value) > c.databytes:
                    self._reply(R_DATABYTES)
                    return
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply(R_BAD_BODY)
                    return
            elif key == "SMTPUTF8" and c.smtputf8:
                if value is not None:
                    self._reply(R_BAD_SMTPUTF8)
                    return
                utf8 = True
            elif key == "AUTH":
                continue  # RFC 4954: accepted from anyone, trusted from no one
            else:
                self._reply(R_MAIL_PARAM)
                return
        if not address.isascii() and not utf8:
            self._reply(R_NON_ASCII)
            return
        self._end_transaction()  # a new MAIL restarts the transaction, as in qmail
        self.smtputf8 = utf8
        self._wait_for(MailFrom(_decode(address), params))

    def _cmd_rcpt(self, arg: bytes) -> None:
        if self.sender is None:
            self._reply(R_MAIL_FIRST)
            return
        address, rest = parse_path(arg)
        if len(address) > ADDRESS_MAX:
            self._reply(R_SYNTAX)
            return
        params = parse_params(rest)
        if params is None:
            self._reply(R_SYNTAX)
            return
        if params:
            self._reply(R_RCPT_PARAM)
            return
        if not address.isascii() and not self.smtputf8:
            self._reply(R_NON_ASCII)
            return
        if len(self.recipients) >= self.config.max_recipients:
            self._reply(R_TOO_MANY_RCPTS)
            return
        self._wait_for(RcptTo(_decode(address), params))

    def _cmd_data(self, arg: bytes) -> None:
        if self.sender is None:
            self._reply(R_MAIL_FIRST)
            return
        if not self.recipients:
            self._reply(R_RCPT_FIRST)
            return
        self._wait_for(DataStart(self.sender, tuple(self.recipients)))

    def _cmd_rset(self, arg: bytes) -> None:
        self._end_transaction()
        self._reply(R_FLUSHED)

    def _cmd_noop(self, arg: bytes) -> None:
        self._reply(R_OK)

    def _cmd_vrfy(self, arg: bytes) -> None:
        self._reply(R_VRFY)

    def _cmd_help(self, arg: bytes) -> None:
        self._reply(R_HELP)

    def _cmd_quit(self, arg: bytes) -> None:
        self._reply(Reply.of(221, self.config.greeting, "2.0.0"))
        self._close("quit", clean=True)

    def _cmd_starttls(self, arg: bytes) -> None:
        if not self.config.starttls:
            self._reply(R_UNIMPLEMENTED)
        elif self.tls_active:
            self._reply(R_TLS_ACTIVE)
        elif arg.strip(b" "):
            self._reply(R_TLS_ARGS)
        else:
            self._wait_for(StartTLSRequested())

    def _cmd_auth(self, arg: bytes) -> None:
        c = self.config
        if not c.auth_mechanisms:
            self._reply(R_UNIMPLEMENTED)
            return
        if not self._auth_offered():
            self._reply(R_AUTH_NEEDS_TLS)
            return
        if self.authenticated is not None:
            self._reply(R_AUTH_AGAIN)
            return
        if self.sender is not None:
            self._reply(R_AUTH_IN_TXN)
            return
        words = arg.split()
        if not words or len(words) > 2:
            self._reply(R_SYNTAX)
            return
        mech = _decode(words[0]).upper()
        if mech not in (m.upper() for m in c.auth_mechanisms):
            self._reply(R_AUTH_MECH)
            return
        initial = _decode(words[1]) if len(words) == 2 else None
        self._wait_for(AuthRequested(mech, initial))

    # DATA ------------------------------------------------------------------------------

    def _scan_data(self) -> bool:
        buf = self._buf
        n = len(buf)
        if n == 0:
            return False
        sc = self._scan
        out = bytearray()
        i = 0
        careful_until = 0  # lines the quick path turned down go through the careful scan once
        while i < n:
            if sc.line_start and not sc.in_header and i >= careful_until and buf[i] != _DOT:
                i, careful_until = self._scan_body_lines(buf, i, n, out)
                if i >= n:
                    break
            if sc.line_start:
                if buf[i] == _DOT:
                    if i + 1 >= n:
                        break  # need the next byte to know what this dot is
                    nxt = buf[i + 1]
                    if nxt == _CR:
                        if i + 2 >= n:
                            break
                        if buf[i + 2] == _LF:
                            del buf[: i + 3]
                            self._emit(out)
                            self._end_of_data()
                            return True
                        return self._bare_cr_lf(out)
                    if nxt == _LF:
                        return self._bare_cr_lf(out)
                    i += 1  # undo dot-stuffing
                sc.line_start = False
            m = _CR_OR_LF.search(buf, i)
            if m is None:
                self._store(buf[i:n], False, out)
                i = n
                break
            p = m.start()
            if buf[p] == _LF:
                return self._bare_cr_lf(out)
            if p + 1 >= n:
                self._store(buf[i:p], False, out)
                i = p  # keep the CR until its LF arrives
                break
            if buf[p + 1] != _LF:
                return self._bare_cr_lf(out)
            self._store(buf[i:p], True, out)
            sc.line_start = True
            i = p + 2
        del buf[:i]
        self._emit(out)
        return i > 0

    def _scan_body_lines(self, buf: bytearray, i: int, n: int, out: bytearray) -> tuple[int, int]:
        """Take whole body lines from buf[i:] in one piece when nothing in them needs care.

        The line-by-line scan decides the same for each line; this only skips it for
        a run of complete lines with no dot at a line start, no bare CR or LF, none
        over the line limit, within databytes, while data is still being kept.
        Returns (where scanning goes on, where the careful scan may stop): when the
        run is turned down, the careful scan takes all of it, so no byte is looked
        at by this quick path twice.
        """
        sc = self._scan
        c = self.config
        end = buf.rfind(b"\r\n", i, n)
        if end < i:
            return i, n
        if sc.too_big or sc.long_line or sc.hops >= c.max_hops:
            return i, n
        stop = end + 2
        # the run ends before the first line that starts with a dot (the end of data
        # is usually in the same read as the body's last lines)
        dot = buf.find(b"\n.", i, stop)
        if dot >= 0:
            stop = dot + 1
        # no line of the run starts with a dot: the find above cut it before one.  Split
        # at CRLF, the run is clean when no CR or LF is left in its lines (memchr-fast
        # checks; counting CRs and LFs took three times as long), and its lines joined
        # with LF are what gets stored
        lines = buf[i:stop].split(b"\r\n")
        rest = b"".join(lines)
        quick = b"\r" not in rest and b"\n" not in rest
        if quick and c.text_line_max:
            quick = max(map(len, lines)) + 2 <= c.text_line_max
        # the run ends with CRLF when it is clean, so the last piece is empty
        stored = stop - i - (len(lines) - 1)
        if quick and c.databytes:
            quick = sc.size + stored <= c.databytes
        if not quick:
            return i, stop
        sc.size += stored
        out += b"\n".join(lines)
        return stop, stop

    def _store(self, seg: bytes | bytearray, eol: bool, out: bytearray) -> None:
        sc = self._scan
        c = self.config
        sc.line_len += len(seg)
        if sc.in_header:
            if len(sc.prefix) < 9:
                sc.prefix += seg[: 9 - len(sc.prefix)]
            if eol:
                if sc.line_len == 0:
                    sc.in_header = False
                else:
                    head = bytes(sc.prefix).lower()
                    if head.startswith(b"received") or head.startswith(b"delivered"):
                        sc.hops += 1
                sc.prefix.clear()
        if c.text_line_max and sc.line_len + (2 if eol else 0) > c.text_line_max:
            sc.long_line = True
        stored = len(seg) + (1 if eol else 0)
        sc.size += stored
        if c.databytes and sc.size > c.databytes:
            sc.too_big = True
        if not (sc.too_big or sc.long_line or sc.hops >= c.max_hops):
            out += seg
            if eol:
                out.append(_LF)
        if eol:
            sc.line_len = 0

    def _emit(self, out: bytearray) -> None:
        if out:
            self._events.append(DataChunk(bytes(out)))

    def _bare_cr_lf(self, out: bytearray) -> bool:
        self._emit(out)
        self._reply(R_BARE_LF)
        self._end_transaction()
        self._close("bare LF or bare CR in DATA")
        return True

    def _end_of_data(self) -> None:
        sc = self._scan
        c = self.config
        self.state = State.COMMAND
        sender = self.sender or ""
        recipients = tuple(self.recipients)
        self._end_transaction()
        problem: Reply | None = None
        if sc.hops >= c.max_hops:
            problem = R_HOPS
        elif sc.too_big:
            problem = R_DATABYTES
        elif sc.long_line:
            problem = long_line_reply(c.text_line_max)
        if problem is not None:
            self._reply(problem)
            self._events.append(MessageAborted(problem))
            return
        self._wait_for(MessageComplete(sender, recipients, sc.size, sc.hops))


_HANDLERS = {
    b"HELO": SMTPServer._cmd_helo,
    b"EHLO": SMTPServer._cmd_ehlo,
    b"MAIL": SMTPServer._cmd_mail,
    b"RCPT": SMTPServer._cmd_rcpt,
    b"DATA": SMTPServer._cmd_data,
    b"RSET": SMTPServer._cmd_rset,
    b"NOOP": SMTPServer._cmd_noop,
    b"VRFY": SMTPServer._cmd_vrfy,
    b"HELP": SMTPServer._cmd_help,
    b"QUIT": SMTPServer._cmd_quit,
    b"STARTTLS": SMTPServer._cmd_starttls,
    b"AUTH": SMTPServer._cmd_auth,
}
