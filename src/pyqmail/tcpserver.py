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

Differences from ucspi-tcp 0.88 defaults, chosen so that the hot path does no network lookups
unless asked: remote host names are looked up only with -h (default -H), ident only with -r
(default -R), and the local name is looked up only with -h when -l is not given.
"""

from __future__ import annotations

import errno
import gc
import getopt
import os
import selectors
import signal
import socket
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
    # this process, each serving one connection at a time and at most N in its life
    max_use: int = 0
    max_idle: float = 100.0  # a worker idle this many seconds exits (pool mode)
    child_name: str = ""  # the process name (ps, top) of a connection's child or worker
    on_ready: Callable[[list[tuple[str, int]]], None] | None = field(default=None, repr=False)


@dataclass
class _Worker:
    """A pool worker as the parent sees it: its channel and whom it serves now."""

    pid: int
    chan: socket.socket
    ip: str | None = None  # the client being served; None while idle
    idle_since: float = 0.0


class ServerError(Exception):
    """A fatal setup problem (bind, address, privileges), with tcpserver's message text."""


def _safe(text: str) -> str:
    """Log-safe text: the log layout uses ':' as separator, so it is masked too."""
    return "".join(c if 32 < ord(c) < 127 and c not in ":%" else "?" for c in text)


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
            try:
                self.db = CDB.open(self.path)
            except (OSError, ValueError) as exc:
                self.stamp, self.db = None, None
                text = _errtext(exc) if isinstance(exc, OSError) else str(exc)
                return None, text
            self.stamp = stamp
        return self.db, None


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
        self.idle: list[_Worker] = []  # most recently used last
        self.busy = 0

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
        return self.busy if self.opts.max_use > 0 else len(self.children)

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
        # objects alive now are shared copy-on-write with every child; keep the collector
        # from touching (and so copying) their pages there
        gc.collect()
        gc.freeze()
        try:
            if self.opts.on_ready is not None:
                self.opts.on_ready(
                    [
                        (normalize_ip(str(s.getsockname()[0])), int(s.getsockname()[1]))
                        for s in self.listeners
                    ]
                )
            self._status()
            while not self.stopping:
                self._set_polling(self._active() < self.opts.limit)
                for key, _ in self._sel.select(self._idle_timeout()):
                    if key.fileobj == self._wake_r:
                        self._drain_wakeup()
                    elif isinstance(key.data, _Worker):
                        self._worker_says(key.data)
                    elif not self.stopping:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        self._accept_from(sock)
                self._reap()
                self._retire_idle()
            self._set_polling(False)
            self.close()
            # a worker's closed channel tells it to exit once its client is done
            for worker in list(self.workers.values()):
                self._drop_worker(worker)
            self._shutdown_children()
        finally:
            gc.unfreeze()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0

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
                self._drop_worker(worker)
            elif ip:
                self._uncount(ip)
            if self.opts.verbosity >= 2:
                self._log(f"end {pid} status {status}")
            self._status()

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

    def _refuse_over_limit(self, conn: socket.socket, ip: str) -> None:
        if self.opts.verbosity >= 2:
            self._log(f"per-ip limit {ip} {self.per_ip_count.get(ip, 0)}/{self.opts.per_ip}")
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
            self._refuse_over_limit(conn, ip)
            return
        if self.opts.max_use > 0:
            self._dispatch(conn, peer, ip)
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

    def _dispatch(self, conn: socket.socket, peer: tuple[object, ...], ip: str) -> None:
        """Hand the connection to an idle worker, forking one if none is idle."""
        payload = f"{peer[0]}\0{peer[1]}".encode()
        if not self.idle:
            self._collect_ready()
        try:
            while True:
                worker = self.idle.pop() if self.idle else self._fork_worker(conn)
                if worker is None:
                    return
                try:
                    socket.send_fds(worker.chan, [payload], [conn.fileno()])
                except OSError:
                    self._drop_worker(worker)  # it died while idle; try the next one
                    continue
                worker.ip = ip
                self.busy += 1
                self.per_ip_count[ip] = self.per_ip_count.get(ip, 0) + 1
                self._status()
                return
        finally:
            conn.close()  # the worker has its own copy now

    def _collect_ready(self) -> None:
        """Take in the workers' "ready" notes that are already waiting.

        Under load the accept loop runs ahead of the main loop; a worker that has
        finished may have said so already, and using it is far cheaper than a fork.
        """
        assert self._sel is not None
        for key, _ in self._sel.select(0):
            if isinstance(key.data, _Worker):
                self._worker_says(key.data)

    def _fork_worker(self, in_hand: socket.socket) -> _Worker | None:
        """Fork a worker while the parent holds ``in_hand``, a client's connection."""
        assert self._sel is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            gc.freeze()
            pid = os.fork()
        except OSError as exc:
            self._log(f"warning: unable to fork: {_errtext(exc)}")
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            # the worker gets this client through its channel like any other; an inherited
            # copy would outlive the session and keep the connection open until the worker
            # exits, in a process that goes on to serve other clients
            in_hand.close()
            self._worker_main(theirs)
        theirs.close()
        worker = _Worker(pid, ours)
        self.workers[pid] = worker
        self.children[pid] = ""
        self._sel.register(ours, selectors.EVENT_READ, worker)
        return worker

    def _worker_says(self, worker: _Worker) -> None:
        try:
            data = worker.chan.recv(16, socket.MSG_DONTWAIT)  # _collect_ready may have taken it
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data != b"r":  # end of channel: it exited (max_use reached, or it died)
            self._drop_worker(worker)
            return
        self._release(worker)
        worker.idle_since = time.monotonic()
        self.idle.append(worker)
        self._status()

    def _drop_worker(self, worker: _Worker) -> None:
        """Forget a worker; closing its channel makes it exit after its current client."""
        if self.workers.pop(worker.pid, None) is None:
            return
        self._release(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        if self._sel is not None:
            self._sel.unregister(worker.chan)
        worker.chan.close()

    def _release(self, worker: _Worker) -> None:
        """The worker's client is gone: free its slot and its address's count."""
        if worker.ip is not None:
            self._uncount(worker.ip)
            worker.ip = None
            self.busy -= 1

    def _idle_timeout(self) -> float | None:
        if not self.idle:
            return None
        return max(0.0, self.idle[0].idle_since + self.opts.max_idle - time.monotonic())

    def _retire_idle(self) -> None:
        now = time.monotonic()
        while self.idle and self.idle[0].idle_since + self.opts.max_idle <= now:
            self._drop_worker(self.idle[0])

    def _worker_main(self, chan: socket.socket) -> None:
        """A pool worker: serve one connection at a time until told to stop or max_use."""
        code = 0
        try:
            self._leave_parent()
            for other in self.workers.values():
                other.chan.close()  # else a sibling's channel would never see its end
            baseline = dict(os.environ)
            served = 0
            while served < self.opts.max_use:
                payload, fds, _flags, _addr = socket.recv_fds(chan, 512, 1)
                if not fds:
                    break  # the server is stopping, or retired us for idleness
                host, _, port = payload.decode().partition("\0")
                # the kind of socket is known: saying so spares the probes for it
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                conn = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fds[0])
                try:
                    rules = self.rules.current() if self.rules is not None else (None, None)
                    status = self._session(conn, (host, int(port)), rules)
                finally:
                    # the handler may have closed the fd already; nothing was opened since
                    fd = conn.detach()
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                    # one client's variables (RELAYCLIENT above all) must not reach the next
                    if self.opts.set_os_environ:
                        os.environ.clear()
                        os.environ.update(baseline)
                served += 1
                if self.opts.verbosity >= 2:
                    self._log(f"end {os.getpid()} status {status} served {served}")
                if served < self.opts.max_use:
                    chan.send(b"r")
        except OSError:
            code = 0  # the server went away while we were busy: nothing left to do
        except BaseException as exc:  # noqa: BLE001 - a worker must never unwind into the loop
            self._log(f"warning: worker {os.getpid()} failed: {type(exc).__name__}: {exc}")
            code = EXIT_TEMP
        finally:
            os._exit(code)

    def _leave_parent(self) -> None:
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
        decision = lookup(db, remote_ip, remote_host, info) if db is not None else Decision()
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
