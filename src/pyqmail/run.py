"""`pyqmail run`: start the whole MTA in the foreground, as qmail-start does.

The supervisor forks, from itself (already warm), the programs qmail-start
starts: two loggers, qmail-lspawn, qmail-rspawn, qmail-clean and qmail-send,
wired by the same pipes as in qmail, plus the SMTP listener (tcpserver with
qmail-smtpd in each connection's child).  No program is exec'd: each child
calls its program's entry function after its fds are in place.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from .control import Control, ControlError, SendControls
from .procname import set_process_name
from .queue import make_queue

Child = Callable[[], int]

_CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM}


def _place_fds(fdmap: dict[int, int]) -> None:
    """In a child: make fd `target` a copy of fd `source` for each pair; close all others."""
    high = {target: os.dup(source) for target, source in fdmap.items()}
    for target, copy in high.items():
        os.dup2(copy, target)
    keep = set(fdmap)
    for fd in list(high.values()):
        if fd not in keep:
            os.close(fd)
    top = max(keep) + 1 if keep else 0
    for fd in range(0, top):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(top, 65536)
    # fds 0-2 are never left closed: a later pipe() would land there and be mistaken
    # for stdin/stdout by code that wires fds 0 and 1 (qmail-queue's protocol)
    for fd in range(3):
        if fd not in keep:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def fork_child(
    body: Child, fdmap: dict[int, int], handles_signals: bool = False, name: str = ""
) -> int:
    """Fork a child that runs body with its fds placed as fdmap says.

    The supervisor holds TERM, INT, HUP and ALRM blocked while it starts children.
    A child that installs its own handlers for them (handles_signals) gets them still
    blocked and unblocks them itself once its handlers are in place, so a TERM that
    comes during its start-up is handled (qmail-send logs `status: exiting`) instead
    of killing it outright.
    """
    # unwritten stdio output would otherwise be written again by the child
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 111
    try:
        if name:
            set_process_name(name)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        if not handles_signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
        _place_fds(fdmap)
        if 2 in fdmap:
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        code = body()
    except BaseException as e:  # noqa: BLE001 - report, never unwind into the supervisor
        try:
            os.write(2, f"alert: {type(e).__name__}: {e}\n".encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(code)


def listen_addresses(ctl: Control, name: str, default: list[str]) -> list[tuple[str, int]]:
    lines = ctl.list(name)
    result = []
    for entry in lines if lines is not None else default:
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit() or not host:
            raise ControlError(ctl.path(name), f"expected ADDRESS:PORT, got {entry!r}")
        result.append((host, int(port)))
    return result


def default_quick_workers() -> int:
    """Four per CPU this process may run on: enough to keep them busy with quick clients."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 4 * max(cpus, 1)


def use_batch_scheduling() -> bool:
    """Put this process, and all it forks from now on, under Linux's SCHED_BATCH policy.

    A woken SCHED_BATCH process does not preempt the one running; it waits until that one
    blocks or its time slice ends.  pyqmail's processes run in short bursts (a command, a
    delivery) and wake each other all the time: without preemption each burst runs to its
    end, with fewer context switches and warmer caches.  The fair share of CPU time is
    unchanged, and an idle CPU still runs a woken process at once.  Only a process under
    the ordinary policy is moved (never one an administrator put under a real-time or idle
    policy).  False where the policy does not exist or may not be set.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return False
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError:
        return False
    return True


def default_smtp() -> list[str]:
    return ["0.0.0.0:25", "[::]:25"] if os.geteuid() == 0 else ["127.0.0.1:2525"]


class Supervisor:
    def __init__(self, home: Path, out: Callable[[str], None]) -> None:
        self.home = home
        self.out = out
        self.pids: dict[int, str] = {}
        self.stopping = False
        self.failed = False

    def start(self) -> None:
        home = self.home
        ctl = Control(home)
        queue = home / "queue"
        # every control is read before anything is forked: a bad file stops us cleanly
        defaultdelivery = ctl.line("defaultdelivery") or "./Maildir/"
        smtp = listen_addresses(ctl, "smtplisten", default_smtp())
        conc = ctl.integer("concurrencyincoming", 40, minimum=1)
        me = ctl.me or default_me()
        per_ip = ctl.integer("concurrencyperip", 0)  # 0: no per-address limit, as tcpserver
        # connections one qmail-smtpd process serves, one after another, before it exits;
        # 0 forks a fresh process for every connection, as qmail under tcpserver does.
        # A new worker costs about 3.5 ms of CPU (the fork, then copy-on-write faults as it
        # touches the parent's objects, then its exit) against about 0.6 ms per session, and
        # with a fork per connection no client is accepted while tcpserver forks: a long life
        # keeps that out of the busy hours
        max_use = ctl.integer("smtpdmaxuse", 1000)
        # workers that may serve quick clients at once before more are forked (see
        # pyqmail.tcpserver's pool); 0 forks one whenever none is idle
        quick = ctl.integer("smtpdquickworkers", default_quick_workers())
        # with 20 clients on 2 cores: about 5% less CPU per message (docs/architecture.md)
        batch = ctl.integer("schedbatch", 1) != 0
        SendControls.load(home)
        # a queue made by an older version lacks newer parts (the spare pools, which
        # are optional: without them queue files are simply created and unlinked)
        try:
            make_queue(queue)
        except OSError as e:
            self.out(f"pyqmail: warning: unable to complete {queue}: {e.strerror}")
        for sub in ("send", "smtpd"):
            (home / "log" / sub).mkdir(parents=True, exist_ok=True)
        if batch:
            use_batch_scheduling()  # before the first fork: every process inherits it

        from . import clean, lspawn, multilog, rspawn, send, smtpd, spawn, tcpserver

        send_log = os.pipe()
        smtpd_log = os.pipe()
        lsp_cmd, lsp_res = os.pipe(), os.pipe()
        rsp_cmd, rsp_res = os.pipe(), os.pipe()
        cln_cmd, cln_res = os.pipe(), os.pipe()

        def logger(sub: str) -> Child:
            return lambda: multilog.run(0, home / "log" / sub)

        self.spawn("log/send", logger("send"), {0: send_log[0]})
        self.spawn("log/smtpd", logger("smtpd"), {0: smtpd_log[0]})
        self.spawn(
            "qmail-lspawn",
            lambda: spawn.serve(
                lspawn.lspawn_deliver(home, defaultdelivery),
                lspawn.lspawn_report,
                queue,
                max_use=spawn.WORKER_MAX_USE,
                child_name="qmail-local",
            ),
            {0: lsp_cmd[0], 1: lsp_res[1], 2: send_log[1]},
        )
        self.spawn(
            "qmail-rspawn",
            lambda: rspawn.serve(home, queue),
            {0: rsp_cmd[0], 1: rsp_res[1], 2: send_log[1]},
        )
        self.spawn(
            "qmail-clean",
            lambda: clean.serve(queue),
            {0: cln_cmd[0], 1: cln_res[1], 2: send_log[1]},
        )
        self.send_pid = self.spawn(
            "qmail-send",
            lambda: send.start(home, 0, (1, 3), (4, 5), (6, 7)),
            {
                0: send_log[1],
                1: lsp_cmd[1],
                2: send_log[1],
                3: lsp_res[0],
                4: rsp_cmd[1],
                5: rsp_res[0],
                6: cln_cmd[1],
                7: cln_res[0],
            },
            handles_signals=True,
        )
        rules = home / "control" / "tcp.smtp.cdb"
        self.smtpd_pid = self.spawn(
            "tcpserver smtpd",
            lambda: tcpserver.serve(
                smtp,
                lambda fd, env: smtpd.handle_connection(home, fd, env),
                limit=conc,
                per_ip=per_ip,
                rules=rules,
                rules_missing_ok=True,
                over_limit_banner=b"421 too many connections from your address (#4.3.2)\r\n",
                nodelay=True,
                max_use=max_use,
                quick_workers=quick,
                # qmail-smtpd takes the connection's variables from its env argument,
                # so a pool worker has no os.environ to reset between connections
                set_os_environ=False,
                child_name="qmail-smtpd",
                # as `tcpserver -l "$(cat control/me)"`: no lookup, and Received names us
                local_name=me,
            ),
            {2: smtpd_log[1]},
        )
        for fd in (
            *send_log,
            *smtpd_log,
            *lsp_cmd,
            *lsp_res,
            *rsp_cmd,
            *rsp_res,
            *cln_cmd,
            *cln_res,
        ):
            os.close(fd)
        self.out(f"pyqmail running: home {home}")
        self.out("  smtp: " + ", ".join(f"{h}:{p}" for h, p in smtp))
        self.out(
            f"  logs: {home / 'log' / 'send' / 'current'}, {home / 'log' / 'smtpd' / 'current'}"
        )
        self.out(f"  queue: {queue}   stop with Ctrl-C or SIGTERM; SIGHUP rereads controls")

    def spawn(
        self, name: str, body: Child, fdmap: dict[int, int], handles_signals: bool = False
    ) -> int:
        # ps shows the log writers as multilog, the others by the name they are spawned as
        comm = name.replace("log/", "multilog ")
        pid = fork_child(body, fdmap, handles_signals, comm)
        self.pids[pid] = name
        return pid

    def signal_children(self, sig: int, names: tuple[str, ...]) -> None:
        for pid, name in self.pids.items():
            if name in names:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self.signal_children(signal.SIGTERM, ("qmail-send", "tcpserver smtpd"))

    def on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.signal_children(signal.SIGHUP, ("qmail-send", "tcpserver smtpd"))

    def on_alrm(self, signum: int, frame: FrameType | None) -> None:
        self.signal_children(signal.SIGALRM, ("qmail-send",))

    def wait(self) -> int:
        while self.pids:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            name = self.pids.pop(pid, "?")
            if not self.stopping and name in ("qmail-send", "tcpserver smtpd"):
                code = os.waitstatus_to_exitcode(status)
                self.out(f"pyqmail: {name} exited unexpectedly (status {code}); stopping")
                self.failed = True
                self.on_term(signal.SIGTERM, None)
        return 111 if self.failed else 0


def run(home: Path, out: Callable[[str], None] = print) -> int:
    sup = Supervisor(home, out)
    signal.signal(signal.SIGTERM, sup.on_term)
    signal.signal(signal.SIGINT, sup.on_term)
    signal.signal(signal.SIGHUP, sup.on_hup)
    signal.signal(signal.SIGALRM, sup.on_alrm)
    sys.stdout.flush()
    # a TERM/HUP that comes while children are being started waits until all of them
    # exist, so it reaches every one of them
    signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
    try:
        sup.start()
    except BaseException:
        sup.on_term(signal.SIGTERM, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
        sup.wait()
        raise
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
    sys.stdout.flush()
    code = sup.wait()
    out(f"pyqmail stopped at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return code


def default_me() -> str:
    """This host's name for control/me: the FQDN, else the plain host name."""
    name = socket.getfqdn()
    if not name or name.startswith("localhost"):
        name = socket.gethostname() or "localhost"
    return name.lower()
