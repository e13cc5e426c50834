"""qmail-remote: deliver one message to one remote domain by SMTP.

`qmail-remote [--home DIR] host sender recip [recip ...]` reads the message on
fd 0 and writes qmail's result protocol on fd 1: one report per recipient
tried (`r` accepted, `h` refused permanently, `s` refused temporarily) then
one message report (`K` delivered, `Z` try later, `D` give up), each ended by
a NUL.  It always exits 0.  qmail-rspawn calls `deliver()` in a forked child
instead of running this program.

Controls read at every delivery: `me`, `helohost` (default me),
`timeoutconnect` (60), `timeoutremote` (1200), `smtproutes` and
`nameservers` (see pyqmail.mx), `outgoingip` / `outgoingip6` (local address
to connect from, used for destinations of the same address family), and
`tlspolicy`:

    # destination domain : policy [: CA file [: expected certificate name]]
    secure.example:verify:/etc/ssl/certs/ca-certificates.crt:mx.secure.example
    .partner.example:encrypt
    broken.example:none
    :opportunistic

Keys are looked up like smtproutes (the recipient domain, its `.suffix`es,
then the empty key as the default).  Policies: `none` (never STARTTLS),
`opportunistic` (default; also spelled `may`: STARTTLS when offered, any
certificate, and if the handshake fails the same host is tried again at once
in clear text), `encrypt` (TLS required, certificate not checked), `verify`
(TLS required; the certificate must chain to the CA file, or to the system's
CAs when the field is empty, and match the expected name, by default the MX
or relay host name).  When a required TLS cannot be had the delivery is
deferred (Z), never sent in clear.  The TLS outcome is the last line of the
message report, so it appears in qmail-send's log line.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import mx
from .control import Control, ControlError
from .home import resolve_home
from .smtp_client import (
    DONE,
    RECEIVE,
    SEND_MESSAGE,
    STARTTLS,
    DataEncoder,
    MessageInfo,
    Send,
    SMTPClient,
    TLSInfo,
    TLSMode,
    format_reports,
    has_line_break,
)
from .tcpto import TCPTO

Report = tuple[str, str]

CHUNK = 1 << 20
TEXT_NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
TEXT_CONTROLS = "Unable to read control files. (#4.3.0)\n"
TEXT_READ = "Unable to read message. (#4.3.0)\n"
TEXT_PARTIAL = "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n"
TEXT_USAGE = "I (qmail-remote) was invoked improperly. (#5.3.5)\n"


# -- the message --------------------------------------------------------------------


class MessageSource:
    """The queued message: size, 8-bit content and completeness known before connecting."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self._tmp: Any = None
        if not stat.S_ISREG(st.st_mode):
            # a pipe (qmail-remote run by hand): keep a seekable copy, read it once
            self._tmp = tempfile.TemporaryFile()
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                self._tmp.write(data)
            self._tmp.flush()
            fd = self._tmp.fileno()
            st = os.fstat(fd)
        self.fd = fd
        self.size = st.st_size
        self.data: bytes | None = None
        self.has_8bit = False
        last = b""
        if self.size <= CHUNK:
            self.data = os.pread(fd, self.size, 0)
            self.size = len(self.data)
            self.has_8bit = not self.data.isascii()
            last = self.data[-1:]
        else:
            for chunk in self._read_chunks():
                self.has_8bit = self.has_8bit or not chunk.isascii()
                last = chunk[-1:]
        self.complete = last in (b"", b"\n", b"\r")

    def _read_chunks(self) -> Iterator[bytes]:
        offset = 0
        while True:
            chunk = os.pread(self.fd, CHUNK, offset)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk

    def wire(self) -> Iterator[bytes]:
        """The DATA payload in pieces, terminator included."""
        enc = DataEncoder()
        if self.data is not None:
            yield enc.feed(self.data) + enc.finish()
            return
        for chunk in self._read_chunks():
            yield enc.feed(chunk)
        yield enc.finish()

    def info(self) -> MessageInfo:
        return MessageInfo(self.size, self.has_8bit)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()


# -- controls -----------------------------------------------------------------------


@dataclass(frozen=True)
class TLSPolicy:
    mode: TLSMode
    cafile: str = ""
    name: str = ""


_MODES = {
    "none": TLSMode.NONE,
    "opportunistic": TLSMode.OPPORTUNISTIC,
    "may": TLSMode.OPPORTUNISTIC,
    "encrypt": TLSMode.ENCRYPT,
    "verify": TLSMode.VERIFY,
}


def tls_policy_for(ctl: Control, host: str) -> TLSPolicy:
    value = mx.find_in_map(ctl.mapping("tlspolicy"), host)
    if value is None:
        return TLSPolicy(TLSMode.OPPORTUNISTIC)
    word, _, rest = value.partition(":")
    mode = _MODES.get(word.strip().lower())
    if mode is None:
        raise ControlError(ctl.path("tlspolicy"), f"unknown policy {word!r}")
    cafile, name = "", ""
    if rest:
        cafile, _, name = rest.rpartition(":") if ":" in rest else (rest, "", "")
    return TLSPolicy(mode, cafile.strip(), name.strip())


@dataclass(frozen=True)
class Settings:
    helo: str
    timeout_connect: int
    timeout_remote: int
    outgoing: dict[int, str]  # address family -> local address


def load_settings(ctl: Control) -> Settings:
    helo = ctl.line("helohost") or ctl.me
    if not helo:
        raise ControlError(ctl.path("helohost"), "neither helohost nor me is set")
    outgoing: dict[int, str] = {}
    for name in ("outgoingip", "outgoingip6"):
        value = ctl.line(name)
        if value:
            ip = mx.literal(value.strip()) or mx.literal(f"[{value.strip()}]")
            if ip is None:
                raise ControlError(ctl.path(name), f"not an IP address: {value!r}", 1)
            outgoing[socket.AF_INET6 if ":" in ip else socket.AF_INET] = ip
    return Settings(
        helo=helo,
        timeout_connect=max(1, ctl.integer("timeoutconnect", 60)),
        timeout_remote=max(1, ctl.integer("timeoutremote", 1200)),
        outgoing=outgoing,
    )


# -- TLS ----------------------------------------------------------------------------

_contexts: dict[tuple[TLSMode, str], ssl.SSLContext] = {}


def ssl_context(policy: TLSPolicy) -> ssl.SSLContext:
    """A client context per (mode, CA file); made once per process and inherited by children."""
    verify = policy.mode == TLSMode.VERIFY
    key = (TLSMode.VERIFY, policy.cafile) if verify else (TLSMode.OPPORTUNISTIC, "")
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if policy.mode == TLSMode.VERIFY:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            if policy.cafile:
                ctx.load_verify_locations(cafile=policy.cafile)
            else:
                ctx.load_default_certs()
        else:
            # opportunistic security (RFC 7435): any certificate beats clear text
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _contexts[key] = ctx
    return ctx


def warm() -> None:
    """Build what every delivery needs once, before forking children."""
    ssl_context(TLSPolicy(TLSMode.OPPORTUNISTIC))


# -- one connection -----------------------------------------------------------------


def _connect(ip: str, port: int, settings: Settings) -> tuple[socket.socket | None, bool]:
    """A connected socket, or (None, whether the attempt timed out)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None, False
    try:
        local = settings.outgoing.get(family)
        if local:
            sock.bind((local, 0))
        sock.settimeout(settings.timeout_connect)
        sock.connect((ip, port))
    except TimeoutError:
        sock.close()
        return None, True
    except OSError:
        sock.close()
        return None, False
    sock.settimeout(settings.timeout_remote)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, False


def _tls_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return e.verify_message or str(e)
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, TimeoutError):
        return "timed out"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


def run_session(
    sock: socket.socket,
    client: SMTPClient,
    msg: MessageSource,
    policy: TLSPolicy,
    target: mx.Target,
) -> socket.socket | None:
    """Drive the sans-I/O client over a connected socket until it is done.

    Returns the connection (TLS-wrapped if it was upgraded) when the client left it
    ready for another transaction, else closes it and returns None.
    """
    conn: socket.socket = sock
    keep = False
    try:
        while True:
            action = client.next_action()
            if isinstance(action, Send):
                try:
                    conn.sendall(action.data)
                except OSError:
                    client.connection_lost()
            elif action is RECEIVE:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    client.receive(data)
                else:
                    client.connection_lost()
            elif action is STARTTLS:
                verify = policy.mode == TLSMode.VERIFY
                name = (policy.name or target.name or target.ip) if verify else target.name
                try:
                    tls = ssl_context(policy).wrap_socket(conn, server_hostname=name or None)
                except (OSError, ValueError) as e:
                    client.tls_failed(_tls_reason(e))
                    continue
                conn = tls
                cipher = tls.cipher()
                client.tls_established(
                    TLSInfo(
                        tls.version() or "TLS",
                        cipher[0] if cipher else "?",
                        name if verify else None,
                    )
                )
            elif action is SEND_MESSAGE:
                try:
                    for piece in msg.wire():
                        conn.sendall(piece)
                    client.message_sent()
                except OSError:
                    client.connection_lost()
            elif action is DONE:
                keep = client.reusable
                return conn if keep else None
    finally:
        if not keep:
            try:
                conn.close()
            except OSError:
                pass
    return None


# -- connections kept between deliveries -----------------------------------------------

KEEP_IDLE = 5.0  # seconds a kept connection may sit unused before it is closed


@dataclass
class _Kept:
    key: tuple[object, ...]
    sock: socket.socket
    extensions: dict[str, str]
    tls_note: str
    since: float


_kept: _Kept | None = None  # at most one per process: a delivery worker's last connection


def _take_kept(key: tuple[object, ...]) -> _Kept | None:
    """The kept connection for key if it is still usable; any other one is closed."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    fresh = time.monotonic() - kept.since < KEEP_IDLE
    if kept.key == key and fresh and _quiet(kept.sock):
        return kept
    _quit_quietly(kept.sock)
    return None


def _quiet(sock: socket.socket) -> bool:
    """True if the peer has sent nothing since (a 421 on idle, or its end of the connection)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _quit_quietly(sock: socket.socket) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(b"QUIT\r\n")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def close_kept() -> None:
    """Say QUIT on the kept connection, if any (a worker calls this when it falls idle)."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        _quit_quietly(kept.sock)


# -- a whole delivery ---------------------------------------------------------------


def deliver(
    home: Path | str,
    host: str,
    sender: str,
    recipients: list[str],
    msg_fd: int,
    resolver: Any = None,
    keep: bool = False,
) -> list[Report]:
    """qmail-remote's work for one message and one domain; returns its reports in order.

    All recipients share one SMTP transaction (one MAIL, one RCPT each, one DATA).
    With keep, a connection that delivered its message is kept open for the next
    delivery to the same host, port and TLS policy in this process (as Postfix's
    connection cache does), and such a kept connection is used when it fits;
    close_kept() ends it.  Only a long-lived process may ask for this.
    """
    global _kept
    home = Path(home)
    ctl = Control(home)
    try:
        settings = load_settings(ctl)
        policy = tls_policy_for(ctl, host)
    except ControlError as e:
        return [("Z", TEXT_CONTROLS + f"{e}\n")]
    try:
        msg = MessageSource(msg_fd)
    except OSError:
        return [("Z", TEXT_READ)]
    try:
        if not msg.complete:
            return [("D", TEXT_PARTIAL)]
        if has_line_break(sender):
            return [
                (
                    "D",
                    "Sorry, the envelope sender holds a line break, which SMTP cannot carry. (#5.1.7)\n",
                )
            ]
        try:
            route = mx.route_for(ctl, host)
            # a relay given as an address needs no DNS at all: the smarthost hot path
            if resolver is None and (route.relay is None or mx.literal(route.relay) is None):
                resolver = mx.make_resolver(home)
            targets, port = mx.targets_for(ctl, resolver, host)
        except mx.RouteError as e:
            return [(e.letter, e.text)]
        except ControlError as e:
            return [("Z", TEXT_CONTROLS + f"{e}\n")]
        tcpto = TCPTO(home / "queue")
        for target in targets:
            if tcpto.dead(target.ip):
                continue
            key = (target.ip, port, settings, policy.mode, policy.cafile, policy.name)

            def client_for(mode: TLSMode, ip: str = target.ip, **more: Any) -> SMTPClient:
                return SMTPClient(ip, settings.helo, sender, recipients, msg.info(), mode, **more)

            kept = _take_kept(key) if keep else None
            if kept is not None:
                client = client_for(
                    policy.mode,
                    tls_note=kept.tls_note,
                    extensions=kept.extensions,
                    resumed=True,
                    keep_open=True,
                )
                conn = run_session(kept.sock, client, msg, policy, target)
                if not client.stale:
                    if conn is not None:
                        _kept = _Kept(key, conn, kept.extensions, kept.tls_note, time.monotonic())
                    return client.reports
            sock, timed_out = _connect(target.ip, port, settings)
            tcpto.record(target.ip, timed_out)
            if sock is None:
                continue
            client = client_for(policy.mode, keep_open=keep)
            conn = run_session(sock, client, msg, policy, target)
            if conn is not None:
                _kept = _Kept(key, conn, client.extensions, client.tls_note, time.monotonic())
            if client.retry_plaintext:
                failed = client.tls_error
                sock, _ = _connect(target.ip, port, settings)
                if sock is None:
                    return client.reports
                client = client_for(
                    TLSMode.NONE,
                    tls_note=f"TLS: handshake failed ({failed}); sent in clear text.\n",
                )
                run_session(sock, client, msg, TLSPolicy(TLSMode.NONE), target)
            return client.reports
        return [("Z", TEXT_NO_CONNECTION)]
    finally:
        msg.close()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    home_arg = None
    if args in (["-h"], ["--help"]):
        print(
            "usage: qmail-remote [--home DIR] host sender recip [recip ...]\n"
            "  delivers the message on fd 0 by SMTP; writes qmail's r/h/s and K/Z/D reports\n"
            "  (each ended by NUL) on fd 1 and always exits 0"
        )
        return 0
    if len(args) >= 2 and args[0] == "--home":
        home_arg = args[1]
        args = args[2:]
    if len(args) < 3:
        reports: list[Report] = [("D", TEXT_USAGE)]
    else:
        try:
            reports = deliver(resolve_home(home_arg), args[0], args[1], args[2:], 0)
        except Exception as e:  # noqa: BLE001 - qmail-remote always answers in its protocol
            reports = [("Z", f"qmail-remote failed unexpectedly: {e}. (#4.3.0)\n")]
    out = format_reports(reports)
    view = memoryview(out)
    while view:
        view = view[os.write(1, view) :]
    return 0
