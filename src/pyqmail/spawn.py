"""The spawner loop shared by qmail-lspawn and qmail-rspawn.

qmail-send writes `slot S/N\\0sender\\0recipient\\0` commands; for each one the
spawner forks a child that performs the delivery with the message on fd 0 and
its report pipe on fds 1 and 2, and answers `slot letter text\\0` once the
child's output has ended and the child has been reaped.  The child is forked
from this already-warm process and calls the delivery function directly: no
new interpreter is started per delivery.

With `max_use` > 0 the spawner keeps long-lived delivery workers instead of
forking per delivery: each is forked once, gets a delivery's message and report
pipe as file descriptors over a Unix socket, runs the same delivery function,
puts back what a delivery may change (cwd, umask, environment, signal
dispositions, fds 0-2) and answers with the exit code.  A worker keeps the
spawner's uid; a delivery that must run as another user forks and drops to
that uid inside the worker, exactly as it does in a forked child.  A worker
that dies mid-delivery is reported exactly as a crashed child.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .constants import SPAWN
from .procname import set_process_name
from .sig import get_handler, set_handler

DeliverFn = Callable[[int, str, str], int]
# (seconds, hook): a worker that got no delivery for that long calls the hook once
# (qmail-rspawn closes its kept SMTP connection); it is also called before a worker exits
IdleHook = tuple[float, Callable[[], None]]
ReportFn = Callable[[int, bytes], bytes]

_READ = 65536


@dataclass
class _Worker:
    pid: int
    chan: socket.socket
    job: _Child | None = None
    idle_since: float = 0.0


@dataclass
class _Child:
    slot: int
    pid: int
    fd: int
    output: bytearray = field(default_factory=bytearray)
    eof: bool = False
    status: int | None = None
    worker: _Worker | None = None


WORKER_MAX_USE = 500  # deliveries one worker makes before it exits (a bounded life)
WORKER_MAX_IDLE = 100.0  # seconds an idle delivery worker waits before it is retired


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Spawner:
    def __init__(
        self,
        deliver: DeliverFn,
        report: ReportFn,
        queue_dir: Path,
        cmd_fd: int,
        result_fd: int,
        max_use: int = 0,
        idle: IdleHook | None = None,
        child_name: str = "",
    ) -> None:
        self.deliver = deliver
        self.child_name = child_name
        self.max_use = max_use
        self.idle_hook = idle
        self.workers: dict[int, _Worker] = {}  # by pid
        self.idle: list[_Worker] = []  # most recently used last
        self.jobs = 0
        self.report = report
        self.cmd_fd = cmd_fd
        self.result_fd = result_fd
        self.queue_owner = os.stat(queue_dir).st_uid
        self.children: dict[int, _Child] = {}  # by pid
        self.slots: set[int] = set()
        self.buf = bytearray()
        self.out = bytearray()

    # -- results --------------------------------------------------------------------

    def answer(self, slot: int, text: bytes) -> None:
        self.out += bytes([slot]) + text.replace(b"\0", b"?") + b"\0"

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.result_fd, self.out)
            except InterruptedError:
                continue
            del self.out[:n]

    # -- commands -------------------------------------------------------------------

    def parse_commands(self) -> None:
        while True:
            # a command is one slot byte followed by three NUL-terminated fields
            if len(self.buf) < 1:
                return
            pos = 1
            fields: list[bytes] = []
            for _ in range(3):
                end = self.buf.find(b"\0", pos)
                if end < 0:
                    return
                fields.append(bytes(self.buf[pos:end]))
                pos = end + 1
            slot = self.buf[0]
            del self.buf[:pos]
            self.start(slot, fields[0], _decode(fields[1]), _decode(fields[2]))

    def start(self, slot: int, messid: bytes, sender: str, recipient: str) -> None:
        if slot >= SPAWN:
            self.answer(slot, b"ZInternal error: delnum too big. (#4.3.5)\n")
            return
        if slot in self.slots:
            self.answer(slot, b"ZInternal error: delnum in use. (#4.3.5)\n")
            return
        if not messid:
            self.answer(slot, b"DInternal error: messid too short. (#5.3.5)\n")
            return
        if len(messid) > 100:
            self.answer(slot, b"DInternal error: messid too long. (#5.3.5)\n")
            return
        if not all(48 <= c <= 57 or (c == 47 and i > 0) for i, c in enumerate(messid)):
            self.answer(slot, b"DInternal error: messid has nonnumerics. (#5.3.5)\n")
            return
        if "@" not in recipient:
            self.answer(slot, b"DSorry, address must include host name. (#5.1.3)\n")
            return
        try:
            msg_fd = os.open(messid, os.O_RDONLY)
        except OSError:
            self.answer(slot, b"Zqmail-spawn unable to open message. (#4.3.0)\n")
            return
        try:
            try:
                st = os.fstat(msg_fd)
            except OSError:
                self.answer(slot, b"Zqmail-spawn unable to fstat message. (#4.3.0)\n")
                return
            if not stat.S_ISREG(st.st_mode):
                self.answer(slot, b"ZSorry, message has wrong type. (#4.3.5)\n")
                return
            if st.st_uid != self.queue_owner:
                self.answer(slot, b"ZSorry, message has wrong owner. (#4.3.5)\n")
                return
            try:
                rfd, wfd = os.pipe()
            except OSError:
                self.answer(slot, b"Zqmail-spawn unable to create pipe. (#4.3.0)\n")
                return
            if self.max_use > 0:
                self.hand_to_worker(slot, msg_fd, rfd, wfd, sender, recipient)
                return
            try:
                pid = _warm_fork()
            except OSError:
                os.close(rfd)
                os.close(wfd)
                self.answer(slot, b"Zqmail-spawn unable to fork. (#4.3.0)\n")
                return
            if pid == 0:
                self.child(msg_fd, wfd, sender, recipient)
            os.close(wfd)
            os.set_blocking(rfd, False)
            self.children[pid] = _Child(slot, pid, rfd)
            self.slots.add(slot)
        finally:
            os.close(msg_fd)

    def child(self, msg_fd: int, wfd: int, sender: str, recipient: str) -> None:
        code = 111
        try:
            if self.child_name:
                set_process_name(self.child_name)
            signal.set_wakeup_fd(-1)
            # SIGINT stays ignored: a Ctrl-C at `pyqmail run`'s terminal reaches the
            # whole process group, and must not kill deliveries half way
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(msg_fd, 0)
            os.dup2(wfd, 1)
            os.dup2(wfd, 2)
            # nothing of the spawner's (command pipe, result pipe, other reports) leaks
            os.closerange(3, 65536)
            sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)
            sys.stderr = sys.stdout
            gc.disable()  # a short-lived child: collecting would only copy shared pages
            code = self.deliver(0, sender, recipient)
        except BaseException as e:  # noqa: BLE001 - the child must always report
            _report_failure(e)
            code = 111
        finally:
            try:
                sys.stdout.flush()
            except Exception:
                pass
            os._exit(code)

    # -- delivery workers (max_use > 0) ----------------------------------------------

    def hand_to_worker(
        self, slot: int, msg_fd: int, rfd: int, wfd: int, sender: str, recipient: str
    ) -> None:
        job = b"\0".join(
            (sender.encode("utf-8", "surrogateescape"), recipient.encode("utf-8", "surrogateescape"))
        )
        try:
            while True:
                worker = self.idle.pop() if self.idle else self.fork_worker()
                if worker is None:
                    os.close(rfd)
                    self.answer(slot, b"Zqmail-spawn unable to fork. (#4.3.0)\n")
                    return
                try:
                    socket.send_fds(worker.chan, [job], [msg_fd, wfd])
                except OSError:
                    self.drop_worker(worker)  # it died while idle; try another
                    continue
                break
        finally:
            os.close(wfd)
        os.set_blocking(rfd, False)
        # a worker may take its next job before its last one's report is read to the
        # end, so jobs are keyed apart from pids (negative keys never clash with a pid)
        self.jobs += 1
        ch = _Child(slot, -self.jobs, rfd, worker=worker)
        worker.job = ch
        self.children[ch.pid] = ch
        self.slots.add(slot)

    def fork_worker(self) -> _Worker | None:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        try:
            pid = _warm_fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            self.worker_main(theirs)
        theirs.close()
        worker = _Worker(pid, ours)
        self.workers[pid] = worker
        return worker

    def drop_worker(self, worker: _Worker) -> None:
        """Forget a worker and close its channel, which makes an idle one exit."""
        if self.workers.pop(worker.pid, None) is None:
            return
        if worker in self.idle:
            self.idle.remove(worker)
        worker.chan.close()
        job, worker.job = worker.job, None
        if job is not None and job.status is None:
            job.status = signal.SIGKILL  # reported as a crash, as a killed child would be

    def worker_says(self, worker: _Worker) -> None:
        try:
            data = worker.chan.recv(32)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        job = worker.job
        # "<code>" is a finished delivery; "<code>x" its last one, after which it exits:
        # it must not be handed another job in the moment before its channel closes
        retiring = data.endswith(b"x")
        code = data[:-1] if retiring else data
        if not code or not code.isdigit() or job is None:
            self.drop_worker(worker)
            return
        job.status = (int(code) & 0xFF) << 8  # a wait status: exited with that code
        worker.job = None
        if retiring:
            self.drop_worker(worker)
            return
        worker.idle_since = time.monotonic()
        self.idle.append(worker)

    def retire_idle(self) -> None:
        now = time.monotonic()
        while self.idle and self.idle[0].idle_since + WORKER_MAX_IDLE <= now:
            self.drop_worker(self.idle[0])

    def worker_main(self, chan: socket.socket) -> None:
        """A delivery worker: one delivery at a time, each as a forked child would do it."""
        code = 0
        try:
            if self.child_name:
                set_process_name(self.child_name)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            for other in self.workers.values():
                other.chan.close()  # else a sibling's channel would never see its end
            keep = chan.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # kept: reused per delivery
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)
            sys.stderr = sys.stdout
            cwd = os.getcwd()
            umask = os.umask(0o077)
            os.umask(umask)
            baseline = dict(os.environ)
            baseline_state = _environ_state()
            dispositions = {sig: get_handler(sig) for sig in (signal.SIGPIPE, signal.SIGALRM)}
            for used in range(1, self.max_use + 1):
                job, fds = self.next_job(chan)
                if len(fds) != 2:
                    break  # the spawner closed our channel: it is done with us
                sender, _, recipient = job.partition(b"\0")
                os.dup2(fds[0], 0)
                os.dup2(fds[1], 1)
                os.dup2(fds[1], 2)
                os.close(fds[0])
                os.close(fds[1])
                try:
                    status = self.deliver(0, _decode(sender), _decode(recipient))
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 111
                except Exception as e:  # noqa: BLE001 - reported like a failed child
                    _report_failure(e)
                    status = 111
                try:
                    sys.stdout.flush()
                except Exception:  # noqa: BLE001 - the report pipe may be gone
                    pass
                # the report pipe's last writer must go, or the spawner never sees its end
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.chdir(cwd)
                os.umask(umask)
                if _environ_state() != baseline_state:  # most deliveries leave it alone
                    os.environ.clear()
                    os.environ.update(baseline)
                for sig, handler in dispositions.items():
                    if get_handler(sig) != handler:
                        set_handler(sig, handler)
                signal.alarm(0)
                chan.send(b"%d%s" % (status, b"x" if used == self.max_use else b""))
        except OSError:
            code = 0  # the spawner is gone
        except BaseException as e:  # noqa: BLE001 - never unwind into the spawner's loop
            _report_failure(e)
            code = 111
        finally:
            if self.idle_hook is not None:
                try:
                    self.idle_hook[1]()
                except BaseException:  # noqa: BLE001, S110 - exiting anyway
                    pass
            os._exit(code)

    def next_job(self, chan: socket.socket) -> tuple[bytes, list[int]]:
        """A worker's next delivery from the spawner: (sender NUL recipient, [msg, report]).

        With an idle hook, a worker that waits longer than its time calls it once first.
        """
        if self.idle_hook is not None:
            chan.settimeout(self.idle_hook[0])
            try:
                return socket.recv_fds(chan, 4096, 2)[:2]
            except TimeoutError:
                self.idle_hook[1]()
                chan.settimeout(None)
        return socket.recv_fds(chan, 4096, 2)[:2]

    # -- children -------------------------------------------------------------------

    def read_child(self, ch: _Child) -> None:
        while True:
            try:
                data = os.read(ch.fd, _READ)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                ch.eof = True
                os.close(ch.fd)
                return
            ch.output += data
            # reports are capped later; do not let a runaway program fill memory
            if len(ch.output) > 1 << 20:
                del ch.output[1 << 20 :]

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            worker = self.workers.get(pid)
            if worker is not None:
                if worker.job is not None:
                    # a worker that retired after its last delivery may be reaped before
                    # that delivery's answer is read: the answer is still in the channel
                    self.worker_says(worker)
                self.drop_worker(worker)  # a job still without an answer is a crash
                continue
            ch = self.children.get(pid)
            if ch is not None:
                ch.status = status

    def finish_done(self) -> None:
        for pid in [p for p, ch in self.children.items() if ch.eof and ch.status is not None]:
            ch = self.children.pop(pid)
            if ch.worker is not None and ch.worker.job is ch:
                ch.worker.job = None
            self.slots.discard(ch.slot)
            assert ch.status is not None
            self.answer(ch.slot, self.report(ch.status, bytes(ch.output)))

    def run(self) -> int:
        # a child's exit wakes the select at once (SIGCHLD through the wakeup pipe)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        try:
            os.write(self.result_fd, bytes([SPAWN]))
        except OSError:
            return 111  # qmail-send is already gone
        reading = True
        while reading or self.children:
            fds = [ch.fd for ch in self.children.values() if not ch.eof] + [wake_r]
            chans = {w.chan.fileno(): w for w in self.workers.values()}
            fds += chans
            if reading:
                fds.append(self.cmd_fd)
            try:
                ready, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                ready = []
            for fd in ready:
                if fd in chans:
                    if chans[fd].pid in self.workers:
                        self.worker_says(chans[fd])
                elif fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except OSError:
                        pass
                elif fd == self.cmd_fd:
                    try:
                        data = os.read(self.cmd_fd, _READ)
                    except InterruptedError:
                        continue
                    except OSError as e:
                        if e.errno == errno.EAGAIN:
                            continue
                        data = b""
                    if not data:
                        reading = False
                    else:
                        self.buf += data
                        self.parse_commands()
                else:
                    for ch in self.children.values():
                        if ch.fd == fd and not ch.eof:
                            self.read_child(ch)
                            break
            self.reap()
            self.finish_done()
            self.retire_idle()
            try:
                self.flush()
            except OSError:
                return 111  # qmail-send is gone
        for worker in list(self.workers.values()):
            self.drop_worker(worker)
        return 0


def _environ_state() -> object:
    """A copy of what os.environ holds, for telling whether a delivery changed it.

    os.environ keeps its contents encoded in a plain dict; copying that dict is
    about 50 times cheaper than decoding every name and value again (``dict(os.environ)``).
    """
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return dict(data)
    return dict(os.environ)


def _warm_fork() -> int:
    """os.fork, after putting what this process has aside for the child to share."""
    # objects the parent already has go to the permanent generation, so the child's
    # collector never walks (and copy-on-write copies) their pages
    gc.freeze()
    # unwritten stdio output would otherwise be written again by the child
    sys.stdout.flush()
    sys.stderr.flush()
    return os.fork()


def _report_failure(e: BaseException) -> None:
    try:
        os.write(2, f"Delivery process failed: {e}. (#4.3.0)\n".encode(errors="replace"))
    except OSError:
        pass


def serve(
    deliver: DeliverFn,
    report: ReportFn,
    queue_dir: Path,
    cmd_fd: int = 0,
    result_fd: int = 1,
    max_use: int = 0,
    idle: IdleHook | None = None,
    child_name: str = "",
) -> int:
    """Run the spawner until qmail-send closes the command pipe; returns the exit code.

    max_use > 0 delivers in long-lived workers (at most that many deliveries each)
    instead of a forked child per delivery; either is named child_name in ps.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # qmail-send's TERM/INT are for qmail-send: a spawner finishes what it started
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spawner = Spawner(deliver, report, queue_dir, cmd_fd, result_fd, max_use, idle, child_name)
    os.chdir(queue_dir / "mess")
    return spawner.run()
