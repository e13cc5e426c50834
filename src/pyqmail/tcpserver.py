"""tcpserver: accept TCP connections and serve each in its own process.

Two ways to use it:

* As a library: ``serve(addresses, handler, ...)`` runs ``handler(sock_fd, env)`` in a child
  forked from this already-warm process, with no exec, so a Python protocol handler (the SMTP
  server) starts in well under a millisecond instead of paying interpreter startup.
* As the ``tcpserver`` program, compatible with ucspi-tcp's for the programs it execs: the
  child puts the socket on fd 0 and fd 1 and execs ``program [args...]``.

Each child gets the UCSPI variables (PROTO, TCPLOCALIP, TCPLOCALPORT, TCPLOCALHOST,
TCPREMOTEIP, TCPREMOTEPORT, TCPREMOTEHOST, TCPREMOTEINFO; unknown ones are absent) plus the
variables of the matching tcprules entry.  IPv6 clients get PROTO=TCP6 and the TCP6REMOTEIP,
TCP6REMOTEPORT, TCP6LOCALIP, TCP6LOCALPORT copies as ucspi-tcp6 sets them; IPv4-mapped
clients of a dual-stack socket appear as plain IPv4.

Concurrency: at most ``limit`` children at once; while that many run, the listening sockets
are not polled, so new connections wait in the kernel's listen queue (``backlog``) exactly as
with ucspi's tcpserver; once that queue is full the kernel drops further SYNs and clients retry.
``per_ip`` caps children per client address: a client over the cap gets ``over_limit_banner``
(if any) and is closed by the parent without a fork.

With ``max_use`` > 0 (library mode only) connections are served by a pool of long-lived
workers instead, at most ``limit`` of them, each serving one connection at a time and at most
``max_use`` in its life; the workers accept for themselves, and the same limits hold (see the
pool section below).

Differences from ucspi-tcp 0.88 defaults, chosen so that the hot path does no network lookups
unless asked: remote host names are looked up only with -h (default -H), ident only with -r
(default -R), and the local name is looked up only with -h when -l is not given.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import getopt
import hashlib
import mmap
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.cdb import CDB
from pyqmail.constants import EXIT_PERM, EXIT_TEMP
from pyqmail.procname import set_process_name
from pyqmail.tcprules import Decision, lookup, normalize_ip

Handler = Callable[[int, dict[str, str]], int]

# variables a child must not inherit from the server's own environment when unknown
_UCSPI_VARS = (
    "PROTO",
    "TCPLOCALIP",
    "TCPLOCALPORT",
    "TCPLOCALHOST",
    "TCPREMOTEIP",
    "TCPREMOTEPORT",
    "TCPREMOTEHOST",
    "TCPREMOTEINFO",
    "TCP6LOCALIP",
    "TCP6LOCALPORT",
    "TCP6LOCALHOST",
    "TCP6REMOTEIP",
    "TCP6REMOTEPORT",
    "TCP6REMOTEHOST",
    "TCP6REMOTEINFO",
    "TCP6INTERFACE",
)


@dataclass
class ServerOptions:
    """Everything tcpserver's flags control; the defaults are the cheap ones."""

    limit: int = 40  # -c
    per_ip: int = 0  # -C, 0 = no cap
    over_limit_banner: bytes = b""  # sent to a client refused by the per-IP cap
    rules: Path | None = None  # -x
    rules_missing_ok: bool = False  # -X
    banner: bytes = b""  # -B
    local_name: str | None = None  # -l
    remote_host: bool = False  # -h / -H
    paranoid: bool = False  # -p / -P
    ident: bool = False  # -r / -R
    ident_timeout: float = 26.0  # -t
    backlog: int = 20  # -b
    nodelay: bool = False  # -D / -d
    verbosity: int = 1  # 0 = -q, 1 = -Q (errors), 2 = -v
    uid: int | None = None  # -u
    gid: int | None = None  # -g
    stop_grace: float = 30.0  # how long SIGTERM waits for children before killing them
    log_fd: int = 2
    log_name: str = "tcpserver"
    set_os_environ: bool = True  # also export env to os.environ in the child
    # 0: fork a child per connection (ucspi's way).  N > 0: long-lived workers forked from
    # this process, each accepting and serving one connection at a time, at most N in its life
    max_use: int = 0
    # a pool worker idle this many seconds exits, unless it is the last idle one while
    # others are busy
    max_idle: float = 100.0
    # 0: a worker is forked as soon as none is idle.  N > 0: only while fewer than N workers
    # are quick (idle, or busy with a session younger than slow_session seconds); see the
    # pool section below
    quick_workers: int = 0
    slow_session: float = 0.05
    child_name: str = ""  # the process name (ps, top) of a connection's child or worker
    on_ready: Callable[[list[tuple[str, int]]], None] | None = field(default=None, repr=False)


@dataclass
class _Worker:
    """A pool worker as the parent sees it: its channel and its slot in the shared page."""

    pid: int
    chan: socket.socket
    slot: int


# a pool worker's state byte in the shared page
_EMPTY, _IDLE, _BUSY = 0, 1, 2
_EMPTY_BYTE, _IDLE_BYTE, _BUSY_BYTE = bytes([_EMPTY]), bytes([_IDLE]), bytes([_BUSY])
_ADDR_SIZE = 16  # a client address in the shared page: IPv6, or IPv4 as IPv4-mapped
_STAMP = struct.Struct("=I")  # when a busy worker took its client: monotonic ms, mod 2**32
# a parent that stops watching a saturated pool looks once more after this many seconds, for
# a worker that saw it still watching and so did not ask for another
_WATCH_CONFIRM = 1.0
_FORK_RETRY = 1.0  # seconds before the parent tries again after a failed fork
_ACCEPT_RETRY = 0.1  # seconds a worker pauses after accept fails for lack of resources
_DECISIONS_MAX = 4096  # rules decisions a worker remembers (per rules db)


class ServerError(Exception):
    """A fatal setup problem (bind, address, privileges), with tcpserver's message text."""


def _safe(text: str) -> str:
    """Log-safe text: the log layout uses ':' as separator, so it is masked too."""
    return "".join(c if 32 < ord(c) < 127 and c not in ":%" else "?" for c in text)


def _pack_ip(ip: str) -> bytes:
    """A client address in the shared page's 16 bytes."""
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return bytes(10) + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        # not a literal the kernel takes back (a scoped address): still one key per text
        return hashlib.blake2b(ip.encode(errors="replace"), digest_size=_ADDR_SIZE).digest()


def _stamp_ms() -> int:
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


def _errtext(exc: OSError) -> str:
    return (exc.strerror or errno.errorcode.get(exc.errno or 0, "error")).lower()


def full_environ(env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) without stale UCSPI variables, then ``env`` on top."""
    merged = dict(os.environ if base is None else base)
    for name in _UCSPI_VARS:
        merged.pop(name, None)
    merged.update(env)
    return merged


def _export(env: dict[str, str]) -> None:
    for name in _UCSPI_VARS:
        if name not in env:
            os.environ.pop(name, None)
    os.environ.update(env)


def _reverse_name(ip: str, paranoid: bool) -> str | None:
    try:
        name = socket.gethostbyaddr(ip)[0].lower()
    except (OSError, UnicodeError):
        return None
    if not name:
        return None
    if paranoid:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return None
        if ip not in {normalize_ip(str(info[4][0])) for info in infos}:
            return None
    return name


def ident_query(
    local_ip: str, local_port: int, remote_ip: str, remote_port: int, timeout: float
) -> str | None:
    """Ask the client's identd (RFC 1413) who owns the connection; None if no usable answer."""
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.bind((local_ip, 0))
            s.connect((remote_ip, 113))
            s.sendall(f"{remote_port} , {local_port}\r\n".encode())
            answer = b""
            while b"\n" not in answer and len(answer) < 1024:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                chunk = s.recv(1024)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    parts = answer.split(b"\n", 1)[0].rstrip(b"\r").split(b":", 3)
    if len(parts) != 4 or parts[1].strip().upper() != b"USERID":
        return None
    user = parts[3].lstrip(b" ")
    return os.fsdecode(user) if user else None


def _ensure_std_fds() -> None:
    """Put /dev/null on any closed fd 0-2 so no socket or pipe of ours ever lands there.

    A supervisor may start the server with fd 0 and fd 1 closed; a connection socket that got
    fd 0 would then be clobbered when a handler (qmail-queue's caller) dup2s pipes onto 0 and 1.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


class _Rules:
    """The rules cdb, re-read only when the file on disk changes (inode, size or mtime)."""

    def __init__(self, path: Path, missing_ok: bool) -> None:
        self.path = path
        self.missing_ok = missing_ok
        self.stamp: tuple[int, int, int, int] | None = None
        self.db: CDB | None = None
        # a pool worker sees the same few clients again and again: their decisions in db
        # (emptied whenever another db is opened)
        self._decisions: dict[tuple[str, str | None, str | None], Decision] = {}

    def current(self) -> tuple[CDB | None, str | None]:
        """(db, None) to use db (None = no rules), or (None, error text) to drop the client."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            self.stamp, self.db = None, None
            if self.missing_ok:
                return None, None
            return None, _errtext(exc)
        except OSError as exc:
            return None, _errtext(exc)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self.stamp or self.db is None:
            self._decisions.clear()
            try:
                self.db = CDB.open(self.path)
            except (OSError, ValueError) as exc:
                self.stamp, self.db = None, None
                text = _errtext(exc) if isinstance(exc, OSError) else str(exc)
                return None, text
            self.stamp = stamp
        return self.db, None

    def decide(self, db: CDB, ip: str, host: str | None, info: str | None) -> Decision:
        """lookup() in db, the db current() returned, remembered until another is opened."""
        key = (ip, host, info)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _DECISIONS_MAX:
                self._decisions.clear()
            decision = self._decisions[key] = lookup(db, ip, host, info)
        return decision


class TCPServer:
    """Listening sockets plus the accept/fork/reap loop."""

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        handler: Handler,
        options: ServerOptions | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.handler = handler
        self.opts = options or ServerOptions()
        self.listeners: list[socket.socket] = []
        self.children: dict[int, str] = {}
        self.per_ip_count: dict[str, int] = {}
        self.stopping = False
        self.rules = (
            _Rules(self.opts.rules, self.opts.rules_missing_ok) if self.opts.rules else None
        )
        self._wake_r = -1
        self._wake_w = -1
        self._sel: selectors.BaseSelector | None = None
        self._polling = False
        self.workers: dict[int, _Worker] = {}  # pool mode, by pid
        self._pool: mmap.mmap | None = None  # pool mode: the page the workers share
        self._pool_fd = -1
        self._fork_retry_at = 0.0
        self._check_at: float | None = None  # pool mode: when _grow looks at the pool again
        self._stamps_at = 0  # offsets in the pool page (see _open_pool)
        self._watching_at = 0

    # -- logging --------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        try:
            os.write(self.opts.log_fd, f"{self.opts.log_name}: {text}\n".encode(errors="replace"))
        except OSError:
            pass

    def _status(self) -> None:
        if self.opts.verbosity >= 2:
            self._log(f"status: {self._active()}/{self.opts.limit}")

    def _active(self) -> int:
        """Connections being served now."""
        return self._pool_active() if self.opts.max_use > 0 else len(self.children)

    # -- setup ----------------------------------------------------------------------------

    def bind(self) -> list[tuple[str, int]]:
        """Create the listening sockets; returns the bound (address, port) pairs."""
        _ensure_std_fds()
        bound: list[tuple[str, int]] = []
        for host, port in self.addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # several listeners may share a port across families; a lone "::" stays
                    # dual-stack so it also serves IPv4 clients
                    only = len(self.addresses) > 1
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if only else 0)
                s.bind((host, port))
                s.listen(self.opts.backlog)
                s.setblocking(False)
            except OSError as exc:
                s.close()
                self.close()
                raise ServerError(f"unable to bind {host} port {port}: {_errtext(exc)}") from exc
            self.listeners.append(s)
            name = s.getsockname()
            bound.append((normalize_ip(str(name[0])), int(name[1])))
        self._drop_privileges()
        return bound

    def _drop_privileges(self) -> None:
        try:
            if self.opts.gid is not None:
                os.setgroups([self.opts.gid])
                os.setgid(self.opts.gid)
            if self.opts.uid is not None:
                os.setuid(self.opts.uid)
        except OSError as exc:
            self.close()
            raise ServerError(f"unable to set uid/gid: {_errtext(exc)}") from exc

    def close(self) -> None:
        for s in self.listeners:
            s.close()
        self.listeners = []

    # -- the loop -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stopping = True

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _set_polling(self, on: bool) -> None:
        assert self._sel is not None
        if on == self._polling:
            return
        for s in self.listeners:
            if on:
                self._sel.register(s, selectors.EVENT_READ)
            else:
                self._sel.unregister(s)
        self._polling = on

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop); returns the exit code (0)."""
        if not self.listeners:
            self.bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        old_handlers = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGCHLD, lambda signum, frame: None),
                # a supervisor's "reread controls" must not kill the listener; the rules cdb
                # is re-read on change anyway
                (signal.SIGHUP, lambda signum, frame: None),
                (signal.SIGTERM, self._on_stop_signal),
                (signal.SIGINT, self._on_stop_signal),
            )
        }
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        pooled = self.opts.max_use > 0
        # objects alive now are shared copy-on-write with every child; keep the collector
        # from touching (and so copying) their pages there
        gc.collect()
        gc.freeze()
        try:
            if pooled:
                self._open_pool()
            if self.opts.on_ready is not None:
                self.opts.on_ready(
                    [
                        (normalize_ip(str(s.getsockname()[0])), int(s.getsockname()[1]))
                        for s in self.listeners
                    ]
                )
            self._status()
            while not self.stopping:
                if pooled:
                    # workers accept for themselves; an empty pool gets a worker on demand
                    self._set_polling(not self.workers and time.monotonic() >= self._fork_retry_at)
                else:
                    self._set_polling(self._active() < self.opts.limit)
                for key, _ in self._sel.select(self._loop_timeout()):
                    if key.fileobj == self._wake_r:
                        self._drain_wakeup()
                    elif isinstance(key.data, _Worker):
                        self._worker_says(key.data)
                    elif self.stopping:
                        pass
                    elif pooled:
                        self._grow()
                    else:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        self._accept_from(sock)
                self._reap()
                if self._check_at is not None and time.monotonic() >= self._check_at:
                    self._check_at = None
                    self._grow()
            self._set_polling(False)
            self.close()
            # a worker's closed channel tells it to exit once its client is done
            for worker in list(self.workers.values()):
                self._drop_worker(worker, gone=False)
            self._shutdown_children()
        finally:
            gc.unfreeze()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._close_pool()
        return 0

    def _loop_timeout(self) -> float | None:
        """A pool being watched, or empty and waiting to retry a failed fork, wakes up by itself."""
        if self.opts.max_use > 0:
            if not self.workers:
                wait = self._fork_retry_at - time.monotonic()
                if wait > 0:
                    return wait
            elif self._check_at is not None:
                return max(0.0, self._check_at - time.monotonic())
        return None

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ip = self.children.pop(pid, None)
            if ip is None:
                continue
            worker = self.workers.get(pid)
            if worker is not None:
                self._drop_worker(worker, gone=True)
                self._grow_if_serving()
            elif ip:
                self._uncount(ip)
            if self.opts.verbosity >= 2:
                self._log(f"end {pid} status {status}")
            if self.opts.max_use == 0:
                self._status()  # pool workers say it themselves

    def _uncount(self, ip: str) -> None:
        left = self.per_ip_count.get(ip, 1) - 1
        if left > 0:
            self.per_ip_count[ip] = left
        else:
            self.per_ip_count.pop(ip, None)

    def _accept_from(self, lsock: socket.socket) -> None:
        while True:
            # under load this loop can run for a while; finished children must not keep
            # their slots (or their address's per-IP count) as unreaped zombies meanwhile
            self._reap()
            if self._active() >= self.opts.limit:
                return
            try:
                conn, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ECONNABORTED and resource shortages must not stop the server
                if self.opts.verbosity >= 1:
                    self._log(f"warning: unable to accept: {_errtext(exc)}")
                return
            self._start(conn, peer)

    def _refuse_over_limit(self, conn: socket.socket) -> None:
        if self.opts.over_limit_banner:
            try:
                conn.send(self.opts.over_limit_banner, socket.MSG_DONTWAIT)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        conn.close()

    def _start(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        ip = normalize_ip(str(peer[0]))
        if self.opts.per_ip > 0 and self.per_ip_count.get(ip, 0) >= self.opts.per_ip:
            if self.opts.verbosity >= 2:
                self._log(f"per-ip limit {ip} {self.per_ip_count.get(ip, 0)}/{self.opts.per_ip}")
            self._refuse_over_limit(conn)
            return
        rules: tuple[CDB | None, str | None] = (None, None)
        if self.rules is not None:
            rules = self.rules.current()
        try:
            # objects the parent already has go to the permanent generation, so the
            # child's collector never walks (and copy-on-write copies) their pages
            gc.freeze()
            pid = os.fork()
        except OSError as exc:
            self._log(f"warning: unable to fork: {_errtext(exc)}")
            conn.close()
            return
        if pid == 0:
            self._child(conn, peer, rules)
        conn.close()
        self.children[pid] = ip
        self.per_ip_count[ip] = self.per_ip_count.get(ip, 0) + 1
        self._status()

    # -- the worker pool (max_use > 0) ------------------------------------------------------
    #
    # Workers accept connections themselves, as Postfix's smtpd processes do: the parent is not
    # on a connection's path at all, which spares it two context switches and the descriptor
    # passing per connection.  Each worker waits on every listener in its own epoll with
    # EPOLLEXCLUSIVE: the kernel wakes one waiting worker per connection, the one whose epoll
    # was registered first, so light load stays on the same few warm processes.
    #
    # The pool's state is one shared page: a state byte per worker slot (empty, idle, busy),
    # the address of the client each busy worker serves and when it took that client, and a
    # byte the parent sets while it watches a saturated pool.  A worker that takes a
    # connection and finds no idle worker left asks the parent to fork another (up to the
    # limit), unless the parent is watching already; with every worker busy, clients wait in
    # the listen queue as with ucspi-tcp.
    #
    # With quick_workers N, more workers are forked only while fewer than N are quick: idle,
    # or busy with a session younger than slow_session.  Clients that talk fast (a local
    # submitter, a relay next door, a benchmark) then queue briefly for a few busy processes
    # instead of each getting one of many that compete for the same CPUs: measured here with
    # 20 clients on 2 cores, 8 workers spent about a fifth less CPU per session than 21, and
    # left the deliveries enough CPU to keep up.  A worker held by a slow client (any client
    # across the Internet) stops counting after slow_session, so such clients still get a
    # worker each, up to the limit, within about that time; a connection waits at most about
    # 1.5 * slow_session for a worker to be forked.  The parent looks at the pool every
    # slow_session / 2 while no worker is idle, and forks at once as many workers as there
    # are clients waiting in the listen queues, but no more than would make N quick ones.

    def _open_pool(self) -> None:
        limit = self.opts.limit
        self._stamps_at = limit * (1 + _ADDR_SIZE)
        self._watching_at = self._stamps_at + limit * _STAMP.size
        size = self._watching_at + 1
        self._pool_fd = os.memfd_create("tcpserver-pool")
        os.ftruncate(self._pool_fd, size)
        self._pool = mmap.mmap(self._pool_fd, size)

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._pool_fd >= 0:
            os.close(self._pool_fd)
            self._pool_fd = -1

    def _pool_active(self) -> int:
        assert self._pool is not None
        return self._pool[: self.opts.limit].count(_BUSY)

    def _pool_has_idle(self) -> bool:
        assert self._pool is not None
        return self._pool.find(_IDLE_BYTE, 0, self.opts.limit) >= 0

    def _grow(self) -> None:
        """Fork workers if none is idle, the limit allows and (quick_workers) they are needed."""
        if self.stopping or self._pool is None:
            return
        now = time.monotonic()
        limit = self.opts.limit
        quick = self.opts.quick_workers
        if self._pool_has_idle() or len(self.workers) >= limit:
            self._stop_watching(now)
            return
        if now < self._fork_retry_at:
            if quick > 0:
                self._watch(self._fork_retry_at)
            return
        count = 1
        if quick > 0:
            wanted = quick - self._quick_busy()
            if wanted <= 0:
                # every worker busy, with sessions young enough to end soon: another process
                # would only compete with them for the CPU
                self._watch(now + self.opts.slow_session / 2)
                return
            count = max(1, min(wanted, self._waiting_connections()))
            # still saturated once these are busy too: go on watching
            self._watch(now + self.opts.slow_session / 2)
        for _ in range(min(count, limit - len(self.workers))):
            self._fork_worker()
            if self._fork_retry_at > now:
                break  # the fork failed

    def _watch(self, at: float) -> None:
        """Look at the pool again at `at` (or sooner); workers need not ask meanwhile."""
        assert self._pool is not None
        self._pool[self._watching_at] = 1
        if self._check_at is None or at < self._check_at:
            self._check_at = at

    def _stop_watching(self, now: float) -> None:
        assert self._pool is not None
        if self._pool[self._watching_at]:
            self._pool[self._watching_at] = 0
            # a worker may have seen the byte set just before: if it took the last idle
            # worker, nobody asked for another, so look once more a little later
            self._check_at = now + _WATCH_CONFIRM
        else:
            self._check_at = None

    def _quick_busy(self) -> int:
        """Busy workers whose session began less than slow_session ago."""
        pool = self._pool
        assert pool is not None
        limit = self.opts.limit
        now = _stamp_ms()
        young = int(self.opts.slow_session * 1000)
        count = 0
        slot = pool.find(_BUSY_BYTE, 0, limit)
        while slot >= 0:
            (began,) = _STAMP.unpack_from(pool, self._stamps_at + slot * _STAMP.size)
            if (now - began) & 0xFFFFFFFF < young:
                count += 1
            slot = pool.find(_BUSY_BYTE, slot + 1, limit)
        return count

    def _waiting_connections(self) -> int:
        """Connections in the listen queues: Linux gives a listener's in TCP_INFO."""
        total = 0
        for s in self.listeners:
            try:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
                # tcpi_unacked: for a listening socket, the accept queue's length
                total += struct.unpack_from("=I", info, 24)[0]
            except (OSError, AttributeError, struct.error):
                total += 1
        return total

    def _fork_worker(self) -> None:
        assert self._sel is not None and self._pool is not None
        taken = {w.slot for w in self.workers.values()}
        slot = next(i for i in range(self.opts.limit) if i not in taken)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # idle before it even runs: a sibling taking a connection meanwhile must not ask
        # for yet another worker
        self._pool[slot] = _IDLE
        try:
            gc.freeze()
            pid = os.fork()
        except OSError as exc:
            self._log(f"warning: unable to fork: {_errtext(exc)}")
            self._pool[slot] = _EMPTY
            ours.close()
            theirs.close()
            self._fork_retry_at = time.monotonic() + _FORK_RETRY
            return
        if pid == 0:
            ours.close()
            self._worker_main(theirs, slot)
        theirs.close()
        worker = _Worker(pid, ours, slot)
        self.workers[pid] = worker
        self.children[pid] = ""
        self._sel.register(ours, selectors.EVENT_READ, worker)

    def _worker_says(self, worker: _Worker) -> None:
        try:
            data = worker.chan.recv(16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data == b"g":
            self._grow()
            return
        # end of channel: the worker has exited (max_use, idle, or it died)
        self._drop_worker(worker, gone=True)
        self._grow_if_serving()

    def _grow_if_serving(self) -> None:
        """After a worker left: a pool that still serves must keep one worker waiting."""
        if self.workers:
            self._grow()

    def _drop_worker(self, worker: _Worker, gone: bool) -> None:
        """Forget a worker; closing its channel makes it exit after its current client.

        ``gone``: the worker is known to have exited, so its slot (and the client address
        in it, which counts for the per-IP limit) is free again.
        """
        if self.workers.pop(worker.pid, None) is None:
            return
        if gone and self._pool is not None:
            self._pool[worker.slot] = _EMPTY
        if self._sel is not None:
            self._sel.unregister(worker.chan)
        worker.chan.close()

    def _worker_main(self, chan: socket.socket, slot: int) -> None:
        """A pool worker: accept and serve one connection at a time, up to max_use."""
        code = 0
        pool = self._pool
        assert pool is not None
        try:
            self._leave_parent(keep_listeners=True)
            for other in self.workers.values():
                other.chan.close()  # else a sibling's channel would never see its end
            poller = select.epoll()
            by_fd: dict[int, socket.socket] = {}
            for lsock in self.listeners:
                poller.register(lsock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
                by_fd[lsock.fileno()] = lsock
            chan_fd = chan.fileno()
            poller.register(chan_fd, select.EPOLLIN)
            baseline = dict(os.environ)
            served = 0
            idle_until = time.monotonic() + self.opts.max_idle
            while served < self.opts.max_use:
                events = poller.poll(max(0.0, idle_until - time.monotonic()))
                if not events:
                    if self._may_retire(slot):
                        break
                    idle_until = time.monotonic() + self.opts.max_idle
                    continue
                if any(fd == chan_fd for fd, _ in events):
                    break  # the server is stopping (or gone)
                for fd, _ in events:
                    lsock = by_fd[fd]
                    try:
                        conn, peer = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue  # another worker was faster
                    except OSError as exc:
                        self._accept_failed(exc)
                        continue
                    if self._serve_accepted(conn, peer, slot, chan, baseline, served + 1):
                        served += 1
                    idle_until = time.monotonic() + self.opts.max_idle
                    break  # look at the channel before taking another client
        except OSError:
            # the server went away, or our own epoll or channel failed: the parent sees
            # our channel end and forks a replacement if one is needed
            code = 0
        except BaseException as exc:  # noqa: BLE001 - a worker must never unwind into the loop
            self._log(f"warning: worker {os.getpid()} failed: {type(exc).__name__}: {exc}")
            code = EXIT_TEMP
        finally:
            pool[slot] = _EMPTY
            os._exit(code)

    def _may_retire(self, slot: int) -> bool:
        """Idle for max_idle: leave, unless that would leave busy workers with no idle one."""
        pool = self._pool
        assert pool is not None
        limit = self.opts.limit
        others_idle = pool[:limit].count(_IDLE) > 1
        return others_idle or pool.find(_BUSY_BYTE, 0, limit) < 0

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return  # the client gave up before we got to it
        if self.opts.verbosity >= 1:
            self._log(f"warning: unable to accept: {_errtext(exc)}")
        # out of descriptors or memory: the listener stays readable, so do not spin on it
        time.sleep(_ACCEPT_RETRY)

    def _serve_accepted(
        self,
        conn: socket.socket,
        peer: tuple[object, ...],
        slot: int,
        chan: socket.socket,
        baseline: dict[str, str],
        number: int,
    ) -> bool:
        """Serve one accepted client; False if the per-IP limit turned it away."""
        pool = self._pool
        assert pool is not None
        opts = self.opts
        try:
            _STAMP.pack_into(pool, self._stamps_at + slot * _STAMP.size, _stamp_ms())
            if opts.per_ip > 0:
                ip = normalize_ip(str(peer[0]))
                count = self._admit(slot, ip)
                if count > opts.per_ip:
                    if opts.verbosity >= 2:
                        self._log(f"per-ip limit {ip} {count - 1}/{opts.per_ip}")
                    self._refuse_over_limit(conn)
                    return False
            else:
                pool[slot] = _BUSY
            # the last idle worker asks for another, unless the pool is already full or the
            # parent is watching it anyway
            if (
                not pool[self._watching_at]
                and not self._pool_has_idle()
                and pool.find(_EMPTY_BYTE, 0, opts.limit) >= 0
            ):
                try:
                    chan.send(b"g")
                except OSError:
                    pass  # the server is gone; the channel's end shows after this client
            self._status()
            rules = self.rules.current() if self.rules is not None else (None, None)
            status = self._session(conn, peer, rules)
        finally:
            # the handler may have closed the fd already; nothing was opened since
            fd = conn.detach()
            try:
                os.close(fd)
            except OSError:
                pass
            pool[slot] = _IDLE
            # one client's variables (RELAYCLIENT above all) must not reach the next
            if opts.set_os_environ:
                os.environ.clear()
                os.environ.update(baseline)
        if opts.verbosity >= 2:
            self._log(f"end {os.getpid()} status {status} served {number}")
        self._status()
        return True

    def _admit(self, slot: int, ip: str) -> int:
        """Mark this worker busy with ``ip``; returns how many busy workers serve ``ip`` now.

        Under a lock shared by the workers (a POSIX lock, which a killed worker drops), so
        two workers taking clients from one address at the same moment both count each
        other: the limit is never exceeded.  The address is written before the state byte,
        and a finished worker clears only the state byte, so no reader sees a torn address.
        """
        pool = self._pool
        assert pool is not None
        limit = self.opts.limit
        packed = _pack_ip(ip)
        fcntl.lockf(self._pool_fd, fcntl.LOCK_EX)
        try:
            start = limit + slot * _ADDR_SIZE
            pool[start : start + _ADDR_SIZE] = packed
            pool[slot] = _BUSY
            # only busy slots are looked at: the cost follows the connections, not -c
            count = 0
            other = pool.find(_BUSY_BYTE, 0, limit)
            while other >= 0:
                at = limit + other * _ADDR_SIZE
                if pool[at : at + _ADDR_SIZE] == packed:
                    count += 1
                other = pool.find(_BUSY_BYTE, other + 1, limit)
            if count > self.opts.per_ip:
                pool[slot] = _IDLE
            return count
        finally:
            fcntl.lockf(self._pool_fd, fcntl.LOCK_UN)

    def _leave_parent(self, keep_listeners: bool = False) -> None:
        """In a fresh child: drop the parent's signal set-up, wakeup pipe and listeners."""
        if self.opts.child_name:
            set_process_name(self.opts.child_name)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        if self._sel is not None:
            self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if not keep_listeners:
            for s in self.listeners:
                s.close()

    def _shutdown_children(self) -> None:
        """Wait for children up to stop_grace, then TERM, then KILL the stragglers."""
        self._wait_children(self.opts.stop_grace)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not self.children:
                return
            for pid in list(self.children):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            self._wait_children(wait)

    def _wait_children(self, seconds: float) -> None:
        assert self._sel is not None
        deadline = time.monotonic() + seconds
        self._reap()
        while self.children:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._sel.select(min(left, 0.5))
            self._drain_wakeup()
            self._reap()

    # -- the child ------------------------------------------------------------------------

    def _child(
        self,
        conn: socket.socket,
        peer: tuple[object, ...],
        rules: tuple[CDB | None, str | None],
    ) -> None:
        code = EXIT_TEMP
        try:
            self._leave_parent()
            code = self._session(conn, peer, rules)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - a child must never unwind into the loop
            self._log(f"warning: child {os.getpid()} failed: {type(exc).__name__}: {exc}")
            code = EXIT_TEMP
        finally:
            os._exit(code)

    def _session(
        self,
        conn: socket.socket,
        peer: tuple[object, ...],
        rules: tuple[CDB | None, str | None],
    ) -> int:
        opts = self.opts
        pid = os.getpid()
        conn.setblocking(True)
        if opts.nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if opts.banner:
            try:
                conn.sendall(opts.banner)
            except OSError:
                return 0
        local = conn.getsockname()
        local_ip = normalize_ip(str(local[0]))
        local_port = int(local[1])
        remote_ip = normalize_ip(str(peer[0]))
        remote_port = int(str(peer[1]))
        v6 = ":" in remote_ip
        if opts.verbosity >= 2:
            self._log(f"pid {pid} from {remote_ip}")

        env: dict[str, str] = {
            "PROTO": "TCP6" if v6 else "TCP",
            "TCPLOCALIP": local_ip,
            "TCPLOCALPORT": str(local_port),
            "TCPREMOTEIP": remote_ip,
            "TCPREMOTEPORT": str(remote_port),
        }
        if v6:
            env.update(
                TCP6LOCALIP=local_ip,
                TCP6LOCALPORT=str(local_port),
                TCP6REMOTEIP=remote_ip,
                TCP6REMOTEPORT=str(remote_port),
            )
        local_host = opts.local_name
        if local_host is None and opts.remote_host:
            local_host = _reverse_name(local_ip, False)
        remote_host = _reverse_name(remote_ip, opts.paranoid) if opts.remote_host else None
        info = None
        if opts.ident:
            info = ident_query(local_ip, local_port, remote_ip, remote_port, opts.ident_timeout)
        if local_host is not None:
            env["TCPLOCALHOST"] = local_host
        if remote_host is not None:
            env["TCPREMOTEHOST"] = remote_host
            if v6:
                env["TCP6REMOTEHOST"] = remote_host
        if info is not None:
            env["TCPREMOTEINFO"] = info

        db, problem = rules
        if problem is not None:
            self._log(f"warning: dropping connection, unable to read {opts.rules}: {problem}")
            return EXIT_TEMP
        # a db comes only from self.rules.current()
        if db is None or self.rules is None:
            decision = Decision()
        else:
            decision = self.rules.decide(db, remote_ip, remote_host, info)
        if opts.verbosity >= 2:
            verdict = "ok" if decision.allow else "deny"
            self._log(
                f"{verdict} {pid} {_safe(local_host or '')}:{local_ip}:{local_port} "
                f"{_safe(remote_host or '')}:{remote_ip}:{_safe(info or '')}:{remote_port}"
            )
        if not decision.allow:
            return EXIT_PERM
        env.update(decision.env)
        if opts.set_os_environ:
            _export(env)
        return self.handler(conn.fileno(), env)


def serve(
    addresses: list[tuple[str, int]],
    handler: Handler,
    limit: int = 40,
    per_ip: int = 0,
    rules: Path | None = None,
    **options: object,
) -> int:
    """Listen on ``addresses`` and run ``handler(sock_fd, env)`` in a forked child per connection.

    Further keyword arguments are ServerOptions fields (over_limit_banner, banner, local_name,
    remote_host, verbosity, stop_grace, on_ready, ...).  Returns 0 after SIGTERM/SIGINT once
    the children are gone; raises ServerError if the sockets cannot be set up.
    """
    opts = ServerOptions(limit=limit, per_ip=per_ip, rules=rules)
    for name, value in options.items():
        if not hasattr(opts, name):
            raise TypeError(f"unknown tcpserver option {name!r}")
        setattr(opts, name, value)
    server = TCPServer(addresses, handler, opts)
    server.bind()
    return server.run()


# -- the tcpserver program ----------------------------------------------------------------

USAGE = (
    "tcpserver: usage: tcpserver [ -146UXpPhHrRoOdDqQv ] [ -c limit ] [ -C perip[:text] ]"
    " [ -x rules.cdb ] [ -B banner ] [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ]"
    " [ -t timeout ] host port program [ arg ... ]"
)


def exec_handler(argv: list[str], log_fd: int = 2) -> Handler:
    """A handler that makes the socket fd 0 and fd 1 and execs ``argv`` (UCSPI program mode)."""

    def run(fd: int, env: dict[str, str]) -> int:
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        if fd > 2:
            os.close(fd)
        # Python ignores SIGPIPE for itself; the program must get the ordinary default
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, full_environ(env))
        except OSError as exc:
            msg = f"tcpserver: fatal: unable to run {argv[0]}: {_errtext(exc)}\n"
            os.write(log_fd, msg.encode(errors="replace"))
        return EXIT_TEMP

    return run


def _parse_port(text: str) -> int:
    if text.isdigit():
        port = int(text)
        if port < 65536:
            return port
    else:
        try:
            return socket.getservbyname(text, "tcp")
        except OSError:
            pass
    raise ServerError(f"unable to figure out port number for {text}")


def _resolve_hosts(text: str, port: int, want4: bool, want6: bool) -> list[tuple[str, int]]:
    """Host argument: 0 (all addresses), IP literals, names; comma-separated for several."""
    out: list[tuple[str, int]] = []
    for host in text.split(","):
        if host in ("0", ""):
            if want4:
                out.append(("0.0.0.0", port))
            if want6 and socket.has_ipv6:
                out.append(("::", port))
            continue
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise ServerError(f"no IP address for {host}") from exc
        for info in infos:
            addr = str(info[4][0])
            if (":" in addr and want6) or (":" not in addr and want4):
                if (addr, port) not in out:
                    out.append((addr, port))
    if not out:
        raise ServerError(f"no IP address for {text}")
    return out


def _parse_args(argv: list[str]) -> tuple[ServerOptions, str, str, list[str], bool, bool, bool]:
    opts = ServerOptions()
    opts.verbosity = 1
    want4 = want6 = True
    print_port = False
    try:
        flags, rest = getopt.getopt(argv, "146UXpPhHrRoOdDqQvc:C:x:B:g:u:b:l:t:")
    except getopt.GetoptError as exc:
        raise ValueError(str(exc)) from exc
    for flag, value in flags:
        if flag in ("-c", "-b", "-u", "-g", "-t") and not value.isdigit():
            raise ValueError(f"{flag} needs a number")
        match flag:
            case "-1":
                print_port = True
            case "-4":
                want4, want6 = True, False
            case "-6":
                want4, want6 = False, True
            case "-U":
                if "UID" in os.environ:
                    opts.uid = int(os.environ["UID"])
                if "GID" in os.environ:
                    opts.gid = int(os.environ["GID"])
            case "-X":
                opts.rules_missing_ok = True
            case "-p":
                opts.paranoid = True
            case "-P":
                opts.paranoid = False
            case "-h":
                opts.remote_host = True
            case "-H":
                opts.remote_host = False
            case "-r":
                opts.ident = True
            case "-R":
                opts.ident = False
            case "-o" | "-O":
                # accepted for compatibility; IP options are left to the kernel's policy
                pass
            case "-d":
                opts.nodelay = False
            case "-D":
                opts.nodelay = True
            case "-q":
                opts.verbosity = 0
            case "-Q":
                opts.verbosity = 1
            case "-v":
                opts.verbosity = 2
            case "-c":
                opts.limit = max(1, int(value))
            case "-C":
                count, _, text = value.partition(":")
                if not count.isdigit():
                    raise ValueError("-C needs a number")
                opts.per_ip = int(count)
                opts.over_limit_banner = (text + "\r\n").encode() if text else b""
            case "-x":
                opts.rules = Path(value)
            case "-B":
                opts.banner = os.fsencode(value)
            case "-g":
                opts.gid = int(value)
            case "-u":
                opts.uid = int(value)
            case "-b":
                opts.backlog = int(value)
            case "-l":
                opts.local_name = value
            case "-t":
                opts.ident_timeout = float(value)
    if len(rest) < 3:
        raise ValueError("host, port and program are required")
    return opts, rest[0], rest[1], rest[2:], want4, want6, print_port


def main(argv: list[str] | None = None) -> int:
    """The tcpserver program."""
    args = sys.argv[1:] if argv is None else argv
    try:
        opts, host, port_text, program, want4, want6, print_port = _parse_args(args)
    except ValueError:
        os.write(2, (USAGE + "\n").encode())
        return EXIT_PERM
    try:
        port = _parse_port(port_text)
        addresses = _resolve_hosts(host, port, want4, want6)
        if print_port:
            # printed once SIGTERM is handled, so whoever reads the port may signal at once
            opts.on_ready = _print_port
        server = TCPServer(addresses, exec_handler(program, opts.log_fd), opts)
        server.bind()
    except ServerError as exc:
        os.write(2, f"tcpserver: fatal: {exc}\n".encode(errors="replace"))
        return EXIT_TEMP
    return server.run()


def _print_port(bound: list[tuple[str, int]]) -> None:
    sys.stdout.write(f"{bound[0][1]}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
