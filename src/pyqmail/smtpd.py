"""qmail-smtpd: receive mail over SMTP and hand it to qmail-queue.

The protocol lives in pyqmail.smtp_server; this module supplies qmail's policy
(rcpthosts, morercpthosts.cdb, RELAYCLIENT, badmailfrom, databytes,
localiphost), the Received line, the qmail-queue plumbing and the I/O loop.

Run it under tcpserver (`tcpserver 0 25 qmail-smtpd`): fd 0 reads from the
client, fd 1 writes to it, fd 2 is the log, one process per connection; or
call `handle_connection()` in a child forked by a warm pyqmail tcpserver.
Controls are read once per connection, so edits apply to the next one.

Differences from qmail-smtpd 1.03, all deliberate:
- no `rcpthosts` file means no relaying at all (qmail would be an open relay):
  only RELAYCLIENT clients get their recipients accepted;
- a bare CR in DATA is refused like a bare LF (451 and disconnect, see
  smtp_server), command lines are limited, a command line with a NUL byte is
  refused instead of being cut at the NUL;
- EHLO also offers SIZE, ENHANCEDSTATUSCODES and SMTPUTF8; MAIL parameters are
  checked (SIZE over databytes: 552 at MAIL already);
- the Received line says `ESMTP` after EHLO (RFC 3848) and `SMTP` after HELO;
- `localiphost` rewriting also knows IPv6 literals (`[IPv6:...]`);
- extra controls (all optional): `maxrcpt` (recipients per message, default
  100), `datalinemax` (longest DATA line in bytes including CRLF, default
  1000, 0 = no limit), `rejectunknownrcpt` (see below).

Rejecting unknown local recipients at RCPT time (off by default, qmail bounces
them later instead): enabled by a non-zero number in `control/rejectunknownrcpt`
or by `REJECTUNKNOWN` in the environment (`0` or empty turns it off again, so
tcprules can override the control file per client).  For an address whose
domain is in `locals` or routed by `virtualdomains`, the local part is looked
up the way qmail-lspawn and qmail-local would (users/cdb exact and wildcard
entries, the system password file only when running as root, else the alias
user with HOME/alias) and the `.qmail` file search of qmail-local is done
without reading or running anything; no match means
`550 sorry, no mailbox here by that name (#5.1.1)`.  A catch-all
`.qmail-default` accepts everything, and any doubt (unreadable files) accepts.

Log: one line per message outcome, per rejected recipient and per connection
end on fd 2, client text made log-safe.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import re
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .cdb import CDB
from .constants import BREAK
from .control import Control, ControlError, domain_suffixes
from .fmt import rfc822_date, safe
from .home import HOME_HELP, resolve_home
from .qq import InProcessQueue, QueueClient, QueueResult, open_queue
from .smtp_server import (
    R_QQT,
    AuthRequested,
    AuthResponse,
    Close,
    DataChunk,
    DataStart,
    Event,
    Helo,
    MailFrom,
    MessageAborted,
    MessageComplete,
    RcptTo,
    Reply,
    ServerConfig,
    SMTPServer,
    StartTLSRequested,
)
from .tcpserver import full_environ

READ_SIZE = 65536
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
DEFAULT_TIMEOUT = 1200

R_CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
R_NOMEM = b"421 out of memory (#4.3.0)\r\n"
R_INTERNAL = b"421 internal error, closing connection (#4.3.0)\r\n"
R_TIMEOUT = b"451 timeout (#4.4.2)\r\n"
R_BADMAILFROM = Reply.of(553, "sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
R_NORELAY = Reply.of(553, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
R_NO_MAILBOX = Reply.of(550, "sorry, no mailbox here by that name (#5.1.1)")
R_TLS_UNAVAILABLE = Reply.of(454, "TLS not available (#4.3.0)")
R_AUTH_UNAVAILABLE = Reply.of(503, "auth not available (#5.3.3)")

# qmail's Received sanitiser keeps only letters, digits and these: .@%+/=:-[]
_RECEIVED_UNSAFE = re.compile(r"[^a-zA-Z0-9.@%+/=:\[\]-]")


# -- settings --------------------------------------------------------------------------


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    value = value.strip()
    return bool(value) and value != "0"


@dataclass(frozen=True)
class Settings:
    """Everything qmail-smtpd reads at the start of a connection (shared: never changed)."""

    greeting: str
    localiphost: str | None
    timeout: int
    rcpthosts: frozenset[str] | None
    morercpthosts: CDB | None
    badmailfrom: frozenset[str]
    databytes: int
    maxrcpt: int
    datalinemax: int
    reject_unknown: bool

    @classmethod
    def load(cls, home: Path, env: Mapping[str, str]) -> Settings:
        """The settings for one connection: control files, then the environment's overrides."""
        settings = _settings_from_files(home)
        env_databytes = env.get("DATABYTES")
        if env_databytes is not None and env_databytes.strip().isdigit():
            settings = replace(settings, databytes=int(env_databytes.strip()))
        reject = _flag(env.get("REJECTUNKNOWN"))
        if reject is not None:
            settings = replace(settings, reject_unknown=reject)
        return settings

    @classmethod
    def read_files(cls, home: Path) -> Settings:
        c = Control(home)
        greeting = c.line("smtpgreeting") or c.me
        if not greeting:
            raise ControlError(c.path("me"), "neither smtpgreeting nor me is set")
        timeout = c.integer("timeoutsmtpd", DEFAULT_TIMEOUT)
        rcpthosts = c.list("rcpthosts")
        more: CDB | None = None
        if rcpthosts is not None:
            try:
                more = CDB.open(c.path("morercpthosts.cdb"))
            except FileNotFoundError:
                more = None
            except (OSError, ValueError) as e:
                raise ControlError(c.path("morercpthosts.cdb"), f"unable to read: {e}") from None
        return cls(
            greeting=greeting,
            localiphost=c.line_me("localiphost", "") or None,
            timeout=max(timeout, 1),
            rcpthosts=None if rcpthosts is None else frozenset(h.lower() for h in rcpthosts),
            morercpthosts=more,
            badmailfrom=frozenset(b.lower() for b in c.list("badmailfrom") or []),
            databytes=c.integer("databytes", 0),
            maxrcpt=c.integer("maxrcpt", 100) or 100,
            datalinemax=c.integer("datalinemax", 1000),
            reject_unknown=c.integer("rejectunknownrcpt", 0) != 0,
        )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            greeting=self.greeting,
            databytes=self.databytes,
            max_recipients=self.maxrcpt,
            text_line_max=self.datalinemax,
        )


# Every control file Settings.read_files looks at.  A long-lived qmail-smtpd
# worker keeps what it read and, at each connection, only stats these files: a
# file that appeared, went, was replaced or was written since is read again, so
# a change is seen by the next connection as in qmail, for the cost of a few stats.
_SETTINGS_FILES = (
    "smtpgreeting",
    "me",
    "timeoutsmtpd",
    "rcpthosts",
    "morercpthosts.cdb",
    "databytes",
    "rejectunknownrcpt",
    "localiphost",
    "badmailfrom",
    "maxrcpt",
    "datalinemax",
)
# a file changed this recently may change again within the same timestamp tick,
# unseen by a stat: such files are read at every connection until they settle
_SETTLE_SECONDS = 2.0
_settings_cache: dict[str, tuple[tuple[object, ...], Settings]] = {}
# per control directory: its state when these settings files were seen absent
_absent_cache: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}


def _control_stamp(control_dir: str) -> tuple[object, ...] | None:
    """What identifies the current contents of the settings files; None if not yet settled.

    Most of the files are usually absent.  A file can only appear by a new entry in
    the control directory, which changes the directory's mtime, so while that is
    unchanged the files seen absent need no stat (a dangling symlink is not absent:
    its target may appear elsewhere).
    """
    now = time.time()
    try:
        dst = os.stat(control_dir)
    except OSError:
        return None  # read_files reports it
    if now - dst.st_mtime < _SETTLE_SECONDS or now - dst.st_ctime < _SETTLE_SECONDS:
        return None
    dir_key = (dst.st_dev, dst.st_ino, dst.st_mtime_ns, dst.st_ctime_ns)
    known = _absent_cache.get(control_dir)
    absent = known[1] if known is not None and known[0] == dir_key else frozenset()
    stamp: list[object] = [dir_key]
    seen_absent: list[str] = []
    for name in _SETTINGS_FILES:
        if name in absent:
            stamp.append(None)
            continue
        path = f"{control_dir}/{name}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            stamp.append(None)
            if not os.path.lexists(path):
                seen_absent.append(name)
            continue
        except OSError:
            return None  # read_files reports it
        if now - st.st_mtime < _SETTLE_SECONDS or now - st.st_ctime < _SETTLE_SECONDS:
            return None
        stamp.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    if seen_absent:
        _absent_cache[control_dir] = (dir_key, absent | frozenset(seen_absent))
    return tuple(stamp)


def _settings_from_files(home: Path) -> Settings:
    control_dir = f"{home}/control"
    stamp = _control_stamp(control_dir)
    if stamp is not None:
        cached = _settings_cache.get(control_dir)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    settings = Settings.read_files(home)
    if stamp is not None:
        _settings_cache[control_dir] = (stamp, settings)
    return settings


# -- policy ----------------------------------------------------------------------------


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This host's interface addresses (qmail's ipme), read from /proc on Linux."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line and previous.strip().startswith("|--"):
                    found.add(ipaddress.IPv4Address(previous.strip()[3:].strip()))
                previous = line
    except (OSError, ValueError):
        found.add(ipaddress.IPv4Address("127.0.0.1"))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        found.add(ipaddress.IPv6Address("::1"))
    return found


def _literal_address(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def sanitize_received(text: str) -> str:
    """qmail's Received sanitiser: only letters, digits and `.@%+/=:-[]` survive."""
    return _RECEIVED_UNSAFE.sub("?", text)


def protocol_word(extended: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """RFC 3848/6531 `with` keyword; plain `SMTP` after HELO, as qmail writes."""
    if not extended:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if auth else "")
    return ("UTF8SMTP" if utf8 else "ESMTP") + suffix


def received_line(env: Mapping[str, str], helo: str | None, protocol: str, when: float) -> bytes:
    """The Received line qmail-smtpd puts on top of each message (queue format, LF ends)."""
    remotehost = env.get("TCPREMOTEHOST") or "unknown"
    remoteip = env.get("TCPREMOTEIP") or "unknown"
    info = env.get("TCPREMOTEINFO")
    local = env.get("TCPLOCALHOST") or env.get("TCPLOCALIP") or "unknown"
    helo_name = remotehost if helo is None else helo
    parts = [f"Received: from {sanitize_received(remotehost)}"]
    if helo_name.lower() != remotehost.lower():
        parts.append(f" (HELO {sanitize_received(helo_name)})")
    who = f"{sanitize_received(info)}@" if info else ""
    parts.append(f" ({who}{sanitize_received(remoteip)})\n")
    parts.append(f"  by {sanitize_received(local)} with {protocol}; {rfc822_date(when)}\n")
    return "".join(parts).encode("ascii", "replace")


class LocalRecipients:
    """Whether a local address has somewhere to go, by qmail-send/lspawn/local's rules."""

    def __init__(self, home: Path) -> None:
        self.home = home
        c = Control(home)
        me = c.me or ""
        self.locals = frozenset(d.lower() for d in (c.list("locals") or ([me] if me else [])))
        self.virtualdomains = c.mapping("virtualdomains")
        self.envnoathost = c.line_me("envnoathost", "envnoathost").lower()
        self._users: CDB | None = None
        try:
            self._users = CDB.open(home / "users" / "cdb")
        except FileNotFoundError:
            self._users = None
        except (OSError, ValueError) as e:
            raise ControlError(home / "users" / "cdb", f"unable to read: {e}") from None

    def local_part(self, address: str) -> str | None:
        """The local part qmail-lspawn would get, or None when delivery is remote."""
        at = address.rfind("@")
        if at < 0:
            local, domain = address, self.envnoathost
        else:
            local, domain = address[:at], address[at + 1 :].lower()
        if domain in self.locals:
            return local
        vd = self.virtualdomains
        whole = f"{local}@{domain}".lower()
        for key in [whole, domain, *domain_suffixes(domain), ""]:
            if key in vd:
                prefix = vd[key]
                if not prefix:
                    return None
                return f"{prefix}-{local}"
        return None

    def exists(self, address: str) -> bool:
        local = self.local_part(address)
        if local is None or not local:
            return True  # remote (relay policy decides) or trashed by lspawn
        hit = self._assigned(local)
        if hit is not None:
            homedir, dash, ext = hit
            return not dash or self._dot_qmail(Path(homedir), dash, ext)
        if os.geteuid() == 0:
            user = self._passwd_user(local)
            if user is not None:
                homedir, ext = user
                return not ext or self._dot_qmail(Path(homedir), "-", ext)
            try:
                alias_home = Path(pwd.getpwnam("alias").pw_dir)
            except KeyError:
                alias_home = self.home / "alias"
        else:
            alias_home = self.home / "alias"
        return self._dot_qmail(alias_home, "-", local)

    def _assigned(self, local: str) -> tuple[str, str, str] | None:
        db = self._users
        if db is None:
            return None
        wild = db.get(b"")
        if wild is None:
            return None
        key = b"!" + local.lower().encode("utf-8", "surrogateescape")
        value = db.get(key + b"\0")
        rest = ""
        if value is None:
            for i in range(len(key), 0, -1):
                if i == 1 or key[i - 1] in wild:
                    value = db.get(key[:i])
                    if value is not None:
                        rest = local[i - 1 :]
                        break
        if value is None:
            return None
        fields = value.decode("utf-8", "surrogateescape").split("\0")
        if len(fields) < 6:
            return None
        return fields[3], fields[4], fields[5] + rest

    @staticmethod
    def _passwd_user(local: str) -> tuple[str, str] | None:
        candidates = [local] + [
            local[:i] for i in range(len(local) - 1, 0, -1) if local[i] == BREAK
        ]
        for cand in candidates:
            if len(cand) >= 32:
                continue
            try:
                pw = pwd.getpwnam(cand.lower())
            except KeyError:
                continue
            if pw.pw_uid == 0:
                continue
            try:
                if os.stat(pw.pw_dir).st_uid != pw.pw_uid:
                    continue
            except OSError:
                continue
            return pw.pw_dir, local[len(cand) + 1 :] if cand != local else ""
        return None

    @staticmethod
    def _dot_qmail(homedir: Path, dash: str, ext: str) -> bool:
        safeext = ext.lower().replace(".", ":")
        names = [f".qmail{dash}{safeext}"]
        for i in range(len(safeext), -1, -1):
            if i == 0 or safeext[i - 1] == BREAK:
                names.append(f".qmail{dash}{safeext[:i]}default")
        for name in names:
            try:
                if (homedir / name).is_file():
                    return True
            except OSError:
                return True  # cannot tell: let delivery decide
        return False


class Policy:
    """qmail-smtpd's decisions about senders and recipients for one connection."""

    def __init__(self, home: Path, settings: Settings, env: Mapping[str, str]) -> None:
        self.home = home
        self.settings = settings
        self.relayclient = env.get("RELAYCLIENT")
        self.bad_sender = False
        self._ipme: set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
        self._local_ip = env.get("TCPLOCALIP")
        self._recipients: LocalRecipients | None = None

    def rewrite_literal(self, address: str) -> str:
        """`u@[our IP]` becomes `u@localiphost`, as in qmail (IPv6 literals too)."""
        at = address.rfind("@")
        if at < 0 or self.settings.localiphost is None:
            return address
        ip = _literal_address(address[at + 1 :])
        if ip is None:
            return address
        if self._ipme is None:
            self._ipme = local_addresses()
            if self._local_ip:
                try:
                    self._ipme.add(ipaddress.ip_address(self._local_ip))
                except ValueError:
                    pass
        if ip in self._ipme:
            return address[: at + 1] + self.settings.localiphost
        return address

    def mail(self, sender: str) -> str:
        sender = self.rewrite_literal(sender)
        bmf = self.settings.badmailfrom
        low = sender.lower()
        at = low.rfind("@")
        self.bad_sender = bool(low) and (low in bmf or (at >= 0 and low[at:] in bmf))
        return sender

    def rcpt_allowed(self, address: str) -> bool:
        at = address.rfind("@")
        if at < 0:
            return True
        rcpthosts = self.settings.rcpthosts
        if rcpthosts is None:
            return False
        domain = address[at + 1 :].lower()
        keys = [domain, *domain_suffixes(domain)]
        if any(k in rcpthosts for k in keys):
            return True
        more = self.settings.morercpthosts
        if more is not None:
            return any(more.get(k.encode("utf-8", "surrogateescape")) is not None for k in keys)
        return False

    def rcpt(self, address: str) -> tuple[Reply | None, str]:
        """(rejection or None, recipient to store)."""
        address = self.rewrite_literal(address)
        if self.bad_sender:
            return R_BADMAILFROM, address
        if self.relayclient is not None:
            return None, address + self.relayclient
        if not self.rcpt_allowed(address):
            return R_NORELAY, address
        if self.settings.reject_unknown:
            if self._recipients is None:
                self._recipients = LocalRecipients(self.home)
            if not self._recipients.exists(address):
                return R_NO_MAILBOX, address
        return None, address


# -- I/O -------------------------------------------------------------------------------


class _Gone(Exception):
    """The client cannot be written to any more (write timeout or error)."""


class Session:
    def __init__(
        self, home: Path, settings: Settings, env: Mapping[str, str], rfd: int, wfd: int
    ) -> None:
        self.home = home
        self.settings = settings
        self.env = env
        self.rfd = rfd
        self.wfd = wfd
        self.policy = Policy(home, settings, env)
        self.server = SMTPServer(settings.server_config())
        self.qq: QueueClient | InProcessQueue | None = None
        self.messages = 0
        self.remote = env.get("TCPREMOTEIP") or "unknown"
        # on a socket the kernel keeps the timeout, which saves a poll() per read and write
        self.socket_timeouts = _set_socket_timeouts(rfd, wfd, settings.timeout)

    def log(self, text: str) -> None:
        line = f"qmail-smtpd: pid {os.getpid()} {safe(self.remote)}: {text}\n"
        try:
            os.write(2, line.encode("utf-8", "replace"))
        except OSError:
            pass

    def write(self, data: bytes) -> None:
        if self.socket_timeouts:
            # the usual case: the reply fits the socket buffer and leaves in one call
            try:
                sent = os.write(self.wfd, data)
            except BlockingIOError:
                raise _Gone("write timeout") from None  # SO_SNDTIMEO ran out
            except InterruptedError:
                sent = 0
            except OSError as e:
                raise _Gone(f"write error: {e.strerror}") from None
            if sent == len(data):
                return
            data = data[sent:]
        view = memoryview(data)
        while view:
            if not self.socket_timeouts and not self._poll(self.wfd, select.POLLOUT):
                raise _Gone("write timeout")
            try:
                view = view[os.write(self.wfd, view) :]
            except BlockingIOError:
                raise _Gone("write timeout") from None  # SO_SNDTIMEO ran out
            except InterruptedError:
                continue
            except OSError as e:
                raise _Gone(f"write error: {e.strerror}") from None

    def flush(self) -> None:
        out = self.server.outgoing()
        if out:
            self.write(out)

    def read(self) -> bytes | None:
        """Input bytes, b"" at end of input, None on timeout."""
        while True:
            try:
                if not self.socket_timeouts and not self._poll(self.rfd, select.POLLIN):
                    return None
                return os.read(self.rfd, READ_SIZE)
            except BlockingIOError:
                return None  # SO_RCVTIMEO ran out
            except InterruptedError:
                continue
            except OSError:
                return b""

    def _poll(self, fd: int, event: int) -> bool:
        poller = select.poll()
        poller.register(fd, event)
        return bool(poller.poll(self.settings.timeout * 1000))

    def linger(self) -> None:
        """Let the last reply reach a client that is still sending, before we close.

        Closing a TCP socket with unread input makes the kernel send a reset,
        which can destroy our final reply (e.g. the 451 for a bare LF) before
        the client reads it.  So: half-close, then read and drop the client's
        input for a short, bounded while.
        """
        fd = os.dup(self.wfd)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return  # not a socket (pipes, inetd-like wrappers): nothing to half-close
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
        deadline = time.monotonic() + LINGER_SECONDS
        budget = LINGER_BYTES
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        while budget > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                return
            try:
                data = os.read(self.rfd, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            budget -= len(data)

    def run(self) -> int:
        srv = self.server
        srv.start()
        try:
            while True:
                ev = srv.next_event()
                if ev is None:
                    self.flush()
                    data = self.read()
                    if data is None:
                        self.drop_message()
                        self.log(f"end: timeout after {self.messages} messages")
                        self.write(R_TIMEOUT)
                        return 1
                    if data:
                        srv.feed(data)
                    else:
                        srv.eof()
                    continue
                if isinstance(ev, Close):
                    self.drop_message()
                    self.flush()
                    self.log(f"end: {ev.reason}, {self.messages} messages")
                    if not ev.clean and not ev.reason.startswith("client closed"):
                        self.linger()
                    return 0 if ev.clean else 1
                self.handle(ev)
        except _Gone as e:
            self.drop_message()
            self.log(f"end: {e}")
            return 1

    def handle(self, ev: Event) -> None:
        srv = self.server
        if isinstance(ev, DataChunk):
            if self.qq is not None:
                self.qq.write(ev.data)
        elif isinstance(ev, Helo):
            pass
        elif isinstance(ev, MailFrom):
            srv.accept(self.policy.mail(ev.address))
        elif isinstance(ev, RcptTo):
            refusal, rcpt = self.policy.rcpt(ev.address)
            if refusal is None:
                srv.accept(rcpt)
            else:
                self.log(f"rcpt <{safe(rcpt)}> refused: {refusal.code} {refusal.text}")
                srv.respond(refusal)
        elif isinstance(ev, DataStart):
            self.start_message(ev)
        elif isinstance(ev, MessageAborted):
            self.drop_message()
            self.log(f"message refused: {ev.reply.code} {ev.reply.text}")
        elif isinstance(ev, MessageComplete):
            srv.respond(self.finish_message(ev))
        elif isinstance(ev, StartTLSRequested):
            srv.respond(R_TLS_UNAVAILABLE)
        elif isinstance(ev, (AuthRequested, AuthResponse)):
            srv.respond(R_AUTH_UNAVAILABLE)

    def start_message(self, ev: DataStart) -> None:
        srv = self.server
        try:
            self.qq = open_queue(self.home, "from network", self.queue_environ())
        except OSError as e:
            self.log(f"message refused: unable to start qmail-queue: {e.strerror}")
            srv.respond(R_QQT)
            return
        protocol = protocol_word(
            srv.extended, srv.tls_active, srv.authenticated is not None, srv.smtputf8
        )
        self.qq.write(received_line(self.env, srv.helo, protocol, time.time()))
        srv.accept()

    def queue_environ(self) -> Mapping[str, str]:
        """The environment a $QMAILQUEUE program gets: ours with the connection's on top.

        Under `pyqmail run` the connection's variables (TCPREMOTEIP, RELAYCLIENT, rules'
        QMAILQUEUE...) stay out of os.environ, so nothing has to be undone for the next
        connection a pool worker serves.
        """
        if self.env is os.environ:
            return self.env
        if "QMAILQUEUE" not in self.env and "QMAILQUEUE" not in os.environ:
            return os.environ  # qmail-queue is run by our own code: nothing to build
        return full_environ(self.env)

    def finish_message(self, ev: MessageComplete) -> Reply:
        qq = self.qq
        self.qq = None
        if qq is None:
            return R_QQT
        result: QueueResult = qq.finish(ev.sender, list(ev.recipients))
        if result.ok:
            self.messages += 1
            # a worker queues many messages under one pid, so qp alone no longer tells
            # which of qmail-send's "new msg N" lines is this message's
            number = f" msg {result.number}" if result.number else ""
            self.log(
                f"message accepted qp {result.qp} bytes {ev.size} from <{safe(ev.sender)}>"
                f" rcpts {len(ev.recipients)}{number}"
            )
            return Reply.of(250, f"ok {int(time.time())} qp {result.qp}", "2.6.0")
        code = 554 if result.permanent else 451
        self.log(f"message refused: {code} {result.message} (qmail-queue exit {result.code})")
        return Reply.of(code, result.message)

    def drop_message(self) -> None:
        qq = self.qq
        self.qq = None
        if qq is not None:
            qq.abort()


def _set_socket_timeouts(rfd: int, wfd: int, seconds: int) -> bool:
    """Give blocking sockets rfd and wfd qmail-smtpd's timeout; False if they are not that."""
    timeval = struct.pack("@ll", seconds, 0)
    # a socket object costs several syscalls to make: one serves both when rfd is wfd
    plan: list[tuple[int, tuple[int, ...]]]
    if rfd == wfd:
        plan = [(rfd, (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO))]
    else:
        plan = [(rfd, (socket.SO_RCVTIMEO,)), (wfd, (socket.SO_SNDTIMEO,))]
    try:
        for fd, options in plan:
            if not os.get_blocking(fd):
                return False
            # only SOL_SOCKET options are set: any family will do, and naming one spares
            # the probes; a descriptor that is not a socket still fails here
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            try:
                for option in options:
                    sock.setsockopt(socket.SOL_SOCKET, option, timeval)
            finally:
                sock.detach()
    except OSError:
        return False  # a pipe (inetd-like wrappers, tests): poll() before each read and write
    return True


def _say(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass


def serve(home: Path, rfd: int, wfd: int, env: Mapping[str, str]) -> int:
    """One SMTP session on rfd/wfd; returns the exit code (0 after QUIT, else 1)."""
    try:
        settings = Settings.load(home, env)
    except ControlError as e:
        _say(2, f"qmail-smtpd: unable to read controls: {e}\n".encode("utf-8", "replace"))
        _say(wfd, R_CONTROLS)
        return 1
    session = Session(home, settings, env, rfd, wfd)
    try:
        return session.run()
    except MemoryError:
        session.drop_message()
        _say(wfd, R_NOMEM)
        return 1
    except ControlError as e:
        session.drop_message()
        session.log(f"unable to read controls: {e}")
        _say(wfd, R_CONTROLS)
        return 1
    except Exception as e:  # a bug must not leave a half-open session or a traceback
        session.drop_message()
        session.log(f"internal error: {type(e).__name__}: {e}")
        _say(wfd, R_INTERNAL)
        return 1


def handle_connection(home: Path, sock_fd: int, env: dict[str, str]) -> int:
    """Serve one connection in a child forked by a warm tcpserver; the socket is closed after.

    tcpserver has already put the parent's SIGCHLD, TERM, HUP and INT handlers back to
    their defaults in this child (they would reap qmail-queue behind our back or
    survive a TERM); a write to a client that went away must fail, not kill us.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        return serve(home, sock_fd, sock_fd, env)
    finally:
        try:
            os.close(sock_fd)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qmail-smtpd",
        description="Receive one SMTP session on fd 0/1 (run it under tcpserver).",
    )
    parser.add_argument("--home", help=HOME_HELP)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # usage errors are permanent failures in qmail's convention, not argparse's 2
        sys.exit(0 if e.code == 0 else 100)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    home = resolve_home(args.home)
    sys.exit(serve(home, 0, 1, os.environ))
