"""qmail-send: the scheduler.

It preprocesses queued messages (todo/ -> info/, local/, remote/), hands one
recipient at a time to qmail-lspawn or qmail-rspawn, records results, retries
on qmail's schedule, writes bounces, and asks qmail-clean to remove files.
Its fds are qmail's: log on fd 0, lspawn on 1/2, rspawn on 3/4, clean on 5/6
(when started as a program); `pyqmail run` forks it with the same pipes.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import math
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from . import spare
from .constants import (
    OSSIFIED,
    REPORTMAX,
    SLEEP_CLEANUP,
    SLEEP_FOREVER,
    SLEEP_FUZZ,
    SLEEP_SYSFAIL,
    SLEEP_TODO,
    SPLIT,
)
from .control import ControlError, SendControls, domain_suffixes
from .fmt import quote, quote2, rfc822_date, safe
from .home import HOME_HELP, resolve_home
from .qq import open_queue
from .queue import fsync_dir, rel

LOCAL, REMOTE = 0, 1
CHANNEL_NAMES = ("local", "remote")
CHANSKIP = (10, 20)
PREPROCESS_BATCH = 16  # todo messages preprocessed together
# a message still held by its todo entry is made durable (and loses the entry) once it
# is not delivered in one go (see preprocess_batch), or once it is this old: until then
# a crash repeats its deliveries
PROVISIONAL_MAX = 30.0
PROVISIONAL_CHECK = 5.0
COMMIT_BATCH = 256  # provisional messages committed together, at most
FRESH_MAX = 4096  # just-preprocessed messages remembered for their first pass
# a trigger this soon after a scan of todo/ waits for the rest of this gap: under load
# todo/ holds every message in flight, and one scan then serves the messages of several
# triggers (and their deliveries start together) instead of one listing per message
TODO_SCAN_GAP = 0.01
# seconds a finished message's files wait to be reused (see release_finished)
FINISHED_HOLD = 1.0
FINISHED_CLEAR_MAX = 100_000  # numbers remembered as having no leftover files
# how qmail-send takes qmail-clean's answer to a command (QmailSend.clean_waiting)
CLEAN_WAIT = "wait"  # clean_all waits for it
CLEAN_LATER = "later"  # nothing waits for it (foop/N)
CLEAN_FINISH = "finish"  # a finished provisional message's todo/N (finish_provisional)

Clock = Callable[[], float]


def file_clock(path: str) -> Clock:
    """A clock running ahead of real time by the number of seconds in `path`.

    Tests use it to step through qmail's retry schedule without sleeping; the
    file is read at each look at the clock, so a test can move time on and
    then pull the trigger to wake qmail-send.
    """

    def now() -> float:
        try:
            with open(path) as f:
                offset = float(f.read().strip() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return time.time() + offset

    return now


def next_retry(birth: float, now: float, channel: int) -> float:
    age = max(0, int(now - birth))
    return birth + (math.isqrt(age) + CHANSKIP[channel]) ** 2


def rewrite_recipient(ctl: SendControls, rcpt: str) -> tuple[int, str]:
    """qmail-send's recipient rewriting (§4.3): returns (channel, address)."""
    if "@" not in rcpt:
        rcpt = rcpt + "@" + ctl.envnoathost
    while True:
        at = rcpt.rfind("@")
        local, domain = rcpt[:at], rcpt[at + 1 :]
        if domain.lower() not in ctl.percenthack or "%" not in local:
            break
        pct = local.rfind("%")
        rcpt = local[:pct] + "@" + local[pct + 1 :]
    at = rcpt.rfind("@")
    domain = rcpt[at + 1 :].lower()
    if domain in ctl.locals:
        return LOCAL, rcpt
    vd = ctl.virtualdomains
    for key in [rcpt.lower(), domain, *domain_suffixes(domain), ""]:
        if key in vd:
            prepend = vd[key]
            if not prepend:
                return REMOTE, rcpt
            return LOCAL, prepend + "-" + rcpt
    return REMOTE, rcpt


def verp_sender(sender: str, recipient: str) -> str:
    """Per-recipient VERP expansion of a sender ending in `-@[]` (§4.4)."""
    if not sender.endswith("-@[]") or "@" not in recipient:
        return sender
    base = sender[:-4]
    at = base.rfind("@")
    if at < 0 or at == len(base) - 1:
        return sender
    box_at = recipient.rfind("@")
    return base[:at] + recipient[:box_at] + "=" + recipient[box_at + 1 :] + base[at:]


def strip_virtual(ctl: SendControls, recipient: str) -> str:
    """The recipient as the sender wrote it: a virtualdomains prepend removed."""
    at = recipient.rfind("@")
    domain = recipient[at + 1 :].lower()
    if domain in ctl.locals:
        return recipient
    for key in [domain, *domain_suffixes(domain), ""]:
        if key in ctl.virtualdomains:
            prepend = ctl.virtualdomains[key]
            if prepend and recipient.startswith(prepend + "-"):
                return recipient[len(prepend) + 1 :]
            return recipient
    return recipient


def bounce_paragraph(recipient: str, report: str) -> str:
    t = "<" + recipient.replace("\n", "_") + ">:\n" + report
    if report and not report.endswith("\n"):
        t += "\n"
    chars = list(t)
    for p in range(len(chars) - 2, 0, -1):
        if chars[p - 1] == "\n" and chars[p] == "\n":
            chars[p] = "/"
    return "".join(chars) + "\n"


@dataclass
class Delivery:
    number: int  # delivery id for the log
    msg: int
    job: Job
    recipient: str
    offset: int  # byte offset of the record's status letter in the channel file


@dataclass
class Job:
    msg: int
    channel: int
    path: str
    sender: str
    birth: float
    retry: float
    dying: bool
    records: list[tuple[int, str]]  # (offset, recipient) of records still NOT DONE
    next_record: int = 0
    outstanding: int = 0
    remaining: int = 0  # NOT DONE after this pass's results so far


@dataclass
class Channel:
    index: int
    cmd_fd: int
    result_fd: int
    concurrency: int
    slots: list[Delivery | None] = field(default_factory=list)
    pending: bytearray = field(default_factory=bytearray)
    results: bytearray = field(default_factory=bytearray)
    queue: list[tuple[float, int]] = field(default_factory=list)  # heap of (due, msg)
    scheduled: dict[int, float] = field(default_factory=dict)  # msg -> due, for dedup
    jobs: list[Job] = field(default_factory=list)  # passes open, in order

    @property
    def used(self) -> int:
        return len(self.slots) - self.slots.count(None)

    def free_slot(self) -> int | None:
        for i, s in enumerate(self.slots):
            if s is None:
                return i
        return None

    def schedule(self, msg: int, due: float) -> None:
        self.scheduled[msg] = due
        heapq.heappush(self.queue, (due, msg))

    def pop_due(self, now: float) -> int | None:
        while self.queue:
            due, msg = self.queue[0]
            if self.scheduled.get(msg) != due:
                heapq.heappop(self.queue)  # stale entry
                continue
            if due > now:
                return None
            heapq.heappop(self.queue)
            del self.scheduled[msg]
            return msg
        return None

    def next_due(self) -> float | None:
        while self.queue and self.scheduled.get(self.queue[0][1]) != self.queue[0][0]:
            heapq.heappop(self.queue)
        return self.queue[0][0] if self.queue else None


@dataclass
class _Prepared:
    """A todo message whose info and channel files are written but not yet durable."""

    n: int
    sender: str
    size: int
    qp: str
    uid: str
    channel_data: list[bytearray]
    fds: dict[str, int] = field(default_factory=dict)
    ok: bool = True
    birth: float = 0.0
    since: float = 0.0  # when it was preprocessed


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _sync_one(target: int | str) -> bool:
    """fsync an open file (fd) or a directory (path); False on failure."""
    try:
        if isinstance(target, str):
            fsync_dir(target)
        else:
            os.fsync(target)
    except OSError:
        return False
    return True


class QmailSend:
    def __init__(
        self,
        home: Path,
        log_fd: int,
        local_fds: tuple[int, int],
        remote_fds: tuple[int, int],
        clean_fds: tuple[int, int],
        clock: Clock = time.time,
    ) -> None:
        self.home = home
        self.queue = home / "queue"
        self.queue_dir = str(self.queue)
        self.log_fd = log_fd
        self.clock = clock
        self.ctl: SendControls
        self.channels = [
            Channel(LOCAL, local_fds[0], local_fds[1], 0),
            Channel(REMOTE, remote_fds[0], remote_fds[1], 0),
        ]
        self.clean_cmd, self.clean_reply = clean_fds
        self.delivery_count = 0
        self.todo: list[int] = []
        # the names in todo/ of every message in self.todo or self.provisional: a scan
        # skips them with one set operation instead of a conversion per name (under load
        # todo/ holds every message in flight, and it is scanned at each trigger)
        self.todo_held: set[str] = set()
        self.todo_scan_at = 0.0
        self.todo_scanned_at = 0.0
        self.cleanup_at = 0.0
        self.done_checks: list[tuple[float, int]] = []
        self.stat_retries: list[tuple[float, int]] = []
        self.exitasap = False
        self.hup = False
        self.alarm = False
        self.trigger_fd = -1
        self.trigger_keep = -1
        self.wake_r = -1
        self.ctl_stamp: tuple[float, ...] = ()
        self.log_buf = bytearray()
        # (command, how its answer is taken: CLEAN_WAIT, CLEAN_LATER or CLEAN_FINISH)
        self.clean_waiting: deque[tuple[str, str]] = deque()
        self.fresh: dict[int, _Prepared] = {}
        # preprocessed messages whose todo entry still stands: their info and channel
        # files are not yet durable (see preprocess_batch)
        self.provisional: dict[int, _Prepared] = {}
        self.to_commit: set[int] = set()
        self.finishing: list[int] = []
        # finished provisional messages whose todo entry qmail-clean is removing, and
        # (number, removed) answers not yet acted on (see finish_provisional)
        self.todo_removing: set[int] = set()
        self.todo_removed: list[tuple[int, bool]] = []
        # numbers of messages this process finished: none of their info, channel or
        # bounce files is left (only this process makes them), so a new message under
        # the number needs no leftovers unlinked (see prepare)
        self.finished_clear: set[int] = set()
        self.provisional_check_at = 0.0
        self.spares = spare.pool(self.queue, "s")
        self.spares.hold_recycled = True
        # finished messages whose files are not yet reusable (see release_finished)
        self.removed_from: set[str] = set()
        self.finished_held: list[int] = []
        self.release_at: float | None = None
        # fsync waits for the disk, not the CPU, and the disk serves many at once
        self.syncer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

    # -- logging --------------------------------------------------------------------

    def log(self, line: str) -> None:
        # lines are gathered and written once per turn of the main loop (before it waits),
        # not one write per line: a message makes about seven of them
        self.log_buf += (line + "\n").encode("utf-8", "replace")
        if len(self.log_buf) >= 16384:
            self.flush_log()

    def flush_log(self) -> None:
        view = memoryview(self.log_buf)
        try:
            while view:
                try:
                    view = view[os.write(self.log_fd, view) :]
                except InterruptedError:
                    continue
        except OSError:
            pass  # a dead logger must not stop deliveries
        finally:
            view.release()
            self.log_buf.clear()

    def log_status(self) -> None:
        loc, rem = self.channels
        line = f"status: local {loc.used}/{loc.concurrency} remote {rem.used}/{rem.concurrency}"
        self.log(line + (" exitasap" if self.exitasap else ""))

    # -- paths ----------------------------------------------------------------------

    def path(self, kind: str, n: int) -> str:
        # called some twenty times per message: the queue's name is a string made once
        return f"{self.queue_dir}/{rel(kind, n)}"

    # -- qmail-clean ----------------------------------------------------------------

    def clean(self, command: str) -> bool:
        return self.clean_all([command])[0]

    def clean_all(self, commands: list[str]) -> list[bool]:
        """Send qmail-clean these commands and wait for their answers (in order)."""
        if not commands:
            return []
        self.clean_send(commands)
        results: list[bool] = []
        while len(results) < len(commands):
            results += [ok for how, ok in self.clean_collect(block=True) if how == CLEAN_WAIT]
        return results

    def clean_later(self, command: str) -> None:
        """A removal whose outcome nothing waits for: its answer is read in passing.

        Only `foop/N` goes this way: if it fails, the 36-hour cleanup pass finds the
        orphaned files and asks again, as it does after a crash.
        """
        self.clean_send([command], CLEAN_LATER)
        self.clean_bound()

    def clean_bound(self) -> None:
        while len(self.clean_waiting) > 1000:
            # qmail-clean blocks once its answer pipe is full: never let it get there
            self.clean_collect(block=True)

    def clean_send(self, commands: list[str], how: str = CLEAN_WAIT) -> None:
        data = b"".join(c.encode() + b"\0" for c in commands)
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.clean_cmd, view) :]
                except InterruptedError:
                    continue
        except OSError:
            self.log("alert: oh no! lost qmail-clean connection! dying...")
            self.die()
        for c in commands:
            self.clean_waiting.append((c, how))

    def clean_collect(self, block: bool) -> list[tuple[str, bool]]:
        """Read the answers qmail-clean has ready (at least one if block).

        Returns (how it was sent, ok) per answer, in order; failures are logged.  The
        answers for finish_provisional's removals also go to self.todo_removed.
        """
        if not self.clean_waiting:
            return []
        if not block:
            ready, _, _ = select.select([self.clean_reply], [], [], 0)
            if not ready:
                return []
        while True:
            try:
                replies = os.read(self.clean_reply, len(self.clean_waiting))
                break
            except InterruptedError:
                continue
            except OSError:
                replies = b""
                break
        if not replies:
            self.log("alert: oh no! lost qmail-clean connection! dying...")
            self.die()
        out: list[tuple[str, bool]] = []
        for byte in replies:
            command, how = self.clean_waiting.popleft()
            ok = byte == ord("+")
            if not ok:
                self.log(f"warning: qmail-clean unable to clean up {command}")
            if how == CLEAN_FINISH:
                self.todo_removed.append((int(command.removeprefix("todo/")), ok))
            out.append((how, ok))
        return out

    def die(self) -> None:
        self.flush_log()
        os._exit(111)

    # -- startup --------------------------------------------------------------------

    def handshake(self) -> None:
        for ch in self.channels:
            try:
                byte = os.read(ch.result_fd, 1)
            except OSError:
                byte = b""
            if not byte:
                self.log("alert: cannot start: hath the daemon spawn no fire?")
                self.flush_log()
                sys.exit(111)
            limit = byte[0]
            conc = self.ctl.concurrencylocal if ch.index == LOCAL else self.ctl.concurrencyremote
            ch.concurrency = min(conc, limit)
            ch.slots = [None] * ch.concurrency
            os.set_blocking(ch.result_fd, False)
            os.set_blocking(ch.cmd_fd, False)

    def recover(self) -> None:
        """Rebuild the schedule from info/ after a start or a crash (§3.7)."""
        now = self.clock()
        for s in range(SPLIT):
            try:
                names = os.listdir(f"{self.queue}/info/{s}")
            except OSError:
                self.log(f"alert: unable to opendir info/{s}, sleeping...")
                continue
            for name in names:
                if name.isdigit():
                    self.schedule_existing(int(name), now)

    def schedule_existing(self, n: int, now: float) -> None:
        if os.path.exists(self.path("todo", n)):
            return  # it will be preprocessed again
        found = False
        for ch in self.channels:
            kind = CHANNEL_NAMES[ch.index]
            try:
                st = os.stat(self.path(kind, n))
            except FileNotFoundError:
                continue
            except OSError:
                self.log(f"warning: unable to stat {rel(kind, n)}; will try again later")
                self.stat_retries.append((now + SLEEP_SYSFAIL, n))
                return
            found = True
            ch.schedule(n, st.st_mtime)
        if not found:
            self.done_checks.append((now, n))

    def open_trigger(self) -> None:
        trigger = f"{self.queue}/lock/trigger"
        try:
            self.trigger_fd = os.open(trigger, os.O_RDONLY | os.O_NONBLOCK)
            # our own writer keeps the FIFO from signalling EOF once injectors close it
            self.trigger_keep = os.open(trigger, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            self.trigger_fd = -1

    # -- todo -----------------------------------------------------------------------

    def scan_todo(self) -> None:
        try:
            names = os.listdir(f"{self.queue}/todo")
        except OSError:
            self.log("alert: unable to opendir todo, sleeping...")
            return
        fresh = set(names)
        fresh.difference_update(self.todo_held)
        # only names as qmail writes them: a number, without leading zeros
        found = [int(name) for name in fresh if name.isdigit() and str(int(name)) == name]
        found.sort()
        self.todo.extend(found)
        self.todo_held.update(str(n) for n in found)

    def preprocess_batch(self, numbers: list[int]) -> None:
        """todo/ -> info/, local/, remote/ for several messages, provisionally.

        qmail makes info and the channel files durable and then removes the todo
        entry before the first delivery.  Here the todo entry stays until the
        message is finished, so those files need no fsync: nearly every message is
        delivered at its first pass, and then all of them go.  A crash meanwhile
        leaves the todo entry, the message is preprocessed again and its deliveries
        are repeated (a duplicate, never a loss).  A message that is deferred, gets
        a failure, has a delivery done while others remain or is still there after
        PROVISIONAL_MAX seconds is committed as qmail would: its files are fsync'd
        and its todo entry removed (commit_batch).
        """
        try:
            self._preprocess_batch(numbers)
        finally:
            # what did not become provisional is no longer held: the next scan sees it again
            for n in numbers:
                if n not in self.provisional:
                    self.todo_held.discard(str(n))

    def _preprocess_batch(self, numbers: list[int]) -> None:
        prepared = [p for p in (self.prepare(n) for n in numbers) if p is not None]
        if not prepared:
            return
        now = self.clock()
        for p in prepared:
            try:
                p.birth = os.fstat(p.fds["info"]).st_mtime
            except OSError:
                p.ok = False
            for fd in p.fds.values():
                os.close(fd)
            p.fds.clear()
        for p in prepared:
            if not p.ok:
                continue  # stays in todo for the next scan
            self.log(f"info msg {p.n}: bytes {p.size} from <{safe(p.sender)}> qp {p.qp} uid {p.uid}")
            p.since = now
            self.provisional[p.n] = p
            any_channel = False
            for ch in self.channels:
                if p.channel_data[ch.index]:
                    ch.schedule(p.n, now)
                    any_channel = True
            if not any_channel:
                self.done_checks.append((now, p.n))
            elif len(self.fresh) < FRESH_MAX:
                # the first pass needs what was just written: spare it the reading back
                self.fresh[p.n] = p

    def commit_batch(self, numbers: list[int]) -> None:
        """Make provisional messages durable as qmail's preprocessing leaves them.

        Their info and channel files (with the done marks so far) and those files'
        directories are fsync'd together, then qmail-clean removes the todo entries.
        A message that fails here stays provisional and is tried again later.
        """
        batch = [
            self.provisional[n]
            for n in numbers
            if n in self.provisional and n not in self.todo_removing
        ]
        if not batch:
            return
        targets: list[tuple[_Prepared | None, str, int | str]] = []
        dirs: set[str] = set()
        for p in batch:
            for kind in ("info", *CHANNEL_NAMES):
                try:
                    fd = os.open(self.path(kind, p.n), os.O_RDONLY)
                except FileNotFoundError:
                    continue  # a channel already finished with it
                except OSError:
                    self.log(f"warning: trouble opening {rel(kind, p.n)}")
                    p.ok = False
                    continue
                p.fds[kind] = fd
                targets.append((p, kind, fd))
                dirs.add(f"{self.queue}/{kind}/{p.n % SPLIT}")
        targets += [(None, "", d) for d in sorted(dirs)]
        outcomes = self.syncer.map(_sync_one, [t[2] for t in targets])
        failed_dirs = False
        for (owner, kind, _), ok in zip(targets, outcomes, strict=True):
            if ok:
                continue
            if owner is None:
                failed_dirs = True
            elif owner.ok:
                self.log(f"warning: trouble fsyncing {rel(kind, owner.n)}")
                owner.ok = False
        for p in batch:
            for fd in p.fds.values():
                os.close(fd)
            p.fds.clear()
        ready = [p for p in batch if p.ok and not failed_dirs]
        for p in batch:
            p.ok = True  # a failed one is tried afresh later
        cleaned = self.clean_all([f"todo/{p.n}" for p in ready])
        for p, ok in zip(ready, cleaned, strict=True):
            if ok:
                del self.provisional[p.n]
                self.todo_held.discard(str(p.n))

    def prepare(self, n: int) -> _Prepared | None:
        """Read todo/n and write (not yet fsync) its info and channel files."""
        todo_rel = rel("todo", n)
        try:
            data = read_all(self.path("todo", n))
        except FileNotFoundError:
            return None
        except OSError:
            self.log(f"warning: unable to open {todo_rel}")
            return None
        try:
            size = os.stat(self.path("mess", n)).st_size
        except OSError:
            self.log(f"warning: unable to stat {rel('mess', n)}")
            return None
        # bounce too: a provisional message (preprocess_batch) may have begun one
        # before a crash, and all its deliveries are now made again.  Message numbers
        # come back all the time (mess files are reused), and after a message this
        # process finished there is nothing to unlink.
        if n in self.finished_clear:
            self.finished_clear.discard(n)
        else:
            for kind in ("local", "remote", "info", "bounce"):
                try:
                    os.unlink(self.path(kind, n))
                except FileNotFoundError:
                    pass
                except OSError:
                    self.log(f"warning: unable to unlink {rel(kind, n)}")
                    return None
        for ch in self.channels:
            ch.scheduled.pop(n, None)
        uid = pid = "?"
        sender: str | None = None
        channel_data: list[bytearray] = [bytearray(), bytearray()]
        for rec in data.split(b"\0"):
            if not rec:
                continue
            letter, value = rec[:1], rec[1:].decode("utf-8", "surrogateescape")
            if letter == b"u":
                uid = value
            elif letter == b"p":
                pid = value
            elif letter == b"F":
                sender = value
            elif letter == b"T":
                chan, addr = rewrite_recipient(self.ctl, value)
                channel_data[chan] += b"T" + addr.encode("utf-8", "surrogateescape") + b"\0"
            else:
                self.log(f"warning: unknown record type in {todo_rel}")
        if sender is None:
            self.log(f"warning: trouble reading {todo_rel}")
            return None
        p = _Prepared(n, sender, size, pid, uid, channel_data)
        self.log(f"new msg {n}")
        try:
            p.fds["info"] = self.write_unsynced(
                "info", n, b"F" + sender.encode("utf-8", "surrogateescape") + b"\0"
            )
            for ch in self.channels:
                if channel_data[ch.index]:
                    kind = CHANNEL_NAMES[ch.index]
                    p.fds[kind] = self.write_unsynced(kind, n, bytes(channel_data[ch.index]))
        except OSError:
            for fd in p.fds.values():
                os.close(fd)
            return None  # todo stays; retried on the next scan
        return p

    def write_unsynced(self, kind: str, n: int, data: bytes) -> int:
        """Create and fill queue file kind/n; returns its fd, still open for the fsync."""
        fname = rel(kind, n)
        taken = self.spares.take(self.path(kind, n))
        try:
            fd = (
                taken
                if taken is not None
                else os.open(self.path(kind, n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            )
        except OSError:
            self.log(f"warning: unable to create {fname}")
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            spare.finish(fd, len(data))
        except OSError:
            os.close(fd)
            self.log(f"warning: trouble writing to {fname}")
            raise
        return fd

    # -- passes and deliveries ------------------------------------------------------

    def open_pass(self, ch: Channel, n: int, now: float) -> None:
        kind = CHANNEL_NAMES[ch.index]
        fresh = self.fresh.get(n)
        if fresh is not None and fresh.channel_data[ch.index]:
            data = bytes(fresh.channel_data[ch.index])
            fresh.channel_data[ch.index] = bytearray()  # a later pass reads the file again
            if not any(fresh.channel_data):
                del self.fresh[n]
            self.start_job(ch, n, now, data, fresh.sender, fresh.birth)
            return
        fname = rel(kind, n)
        try:
            with open(self.path(kind, n), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.done_checks.append((now, n))
            return
        except OSError:
            self.log(f"warning: trouble opening {fname}; will try again later")
            ch.schedule(n, now + SLEEP_SYSFAIL)
            return
        try:
            with open(self.path("info", n), "rb") as f:
                info = f.read()
                birth = os.fstat(f.fileno()).st_mtime
        except OSError:
            self.log(f"warning: trouble opening {rel('info', n)}; will try again later")
            ch.schedule(n, now + SLEEP_SYSFAIL)
            return
        sender = info[1:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        self.start_job(ch, n, now, data, sender, birth)

    def start_job(
        self, ch: Channel, n: int, now: float, data: bytes, sender: str, birth: float
    ) -> None:
        kind = CHANNEL_NAMES[ch.index]
        fname = rel(kind, n)
        records: list[tuple[int, str]] = []
        pos = 0
        bad = False
        while pos < len(data):
            end = data.find(b"\0", pos)
            if end < 0:
                self.log(f"warning: trouble reading {fname}; will try again later")
                bad = True
                break
            letter = data[pos : pos + 1]
            if letter == b"T":
                records.append((pos, data[pos + 1 : end].decode("utf-8", "surrogateescape")))
            elif letter != b"D":
                self.log(f"warning: unknown record type in {fname}!")
            pos = end + 1
        job = Job(
            msg=n,
            channel=ch.index,
            path=self.path(kind, n),
            sender=sender,
            birth=birth,
            retry=next_retry(birth, now, ch.index),
            dying=now > birth + self.ctl.queuelifetime,
            records=records,
            remaining=len(records) + (1 if bad else 0),
        )
        ch.jobs.append(job)
        self.maybe_finish_job(ch, job)

    def start_deliveries(self, ch: Channel) -> bool:
        """Start as many deliveries as slots allow; True if something happened."""
        progressed = False
        for job in list(ch.jobs):
            while job.next_record < len(job.records):
                if ch.pending or self.exitasap:
                    return progressed
                slot = ch.free_slot()
                if slot is None:
                    return progressed
                offset, recipient = job.records[job.next_record]
                job.next_record += 1
                job.outstanding += 1
                self.delivery_count += 1
                d = Delivery(self.delivery_count, job.msg, job, recipient, offset)
                ch.slots[slot] = d
                sender = verp_sender(job.sender, recipient)
                messid = f"{job.msg % SPLIT}/{job.msg}"
                ch.pending += (
                    bytes([slot])
                    + messid.encode()
                    + b"\0"
                    + sender.encode("utf-8", "surrogateescape")
                    + b"\0"
                    + recipient.encode("utf-8", "surrogateescape")
                    + b"\0"
                )
                self.flush_pending(ch)
                self.log(
                    f"starting delivery {d.number}: msg {job.msg} to "
                    f"{CHANNEL_NAMES[ch.index]} {safe(recipient)}"
                )
                self.log_status()
                progressed = True
        return progressed

    def flush_pending(self, ch: Channel) -> None:
        while ch.pending:
            try:
                n = os.write(ch.cmd_fd, ch.pending)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self.log("alert: oh no! lost spawn connection! dying...")
                self.die()
                return
            del ch.pending[:n]

    def read_results(self, ch: Channel) -> None:
        while True:
            try:
                data = os.read(ch.result_fd, 65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                self.log("alert: oh no! lost spawn connection! dying...")
                self.die()
                return
            ch.results += data
        while True:
            end = ch.results.find(b"\0", 1)
            if end < 0:
                if len(ch.results) > REPORTMAX + 2:
                    # overlong report: keep only what qmail-send would have kept
                    del ch.results[REPORTMAX + 1 : -1]
                return
            report = bytes(ch.results[:end])
            del ch.results[: end + 1]
            self.handle_result(ch, report[0], report[1:][:REPORTMAX])

    def handle_result(self, ch: Channel, slot: int, report: bytes) -> None:
        if slot >= len(ch.slots) or ch.slots[slot] is None:
            self.log("warning: internal error: delivery report out of range")
            return
        d = ch.slots[slot]
        assert d is not None
        ch.slots[slot] = None
        job = d.job
        letter = report[:1]
        text = report[1:].decode("utf-8", "replace")
        if letter == b"K":
            self.log(f"delivery {d.number}: success: {safe(text)}")
            self.mark_done(d)
            job.remaining -= 1
            if job.remaining > 0 or self.other_channel_has(ch, d.msg):
                # a crash would repeat this delivery with the message's others: only a
                # message delivered in one go stays provisional
                self.commit_soon(d.msg)
        elif letter == b"Z" and not job.dying:
            self.log(f"delivery {d.number}: deferral: {safe(text)}")
            self.commit_soon(d.msg)
        elif letter in (b"D", b"Z"):
            self.commit_soon(d.msg)
            if letter == b"Z":
                text += "I'm not going to try again; this message has been in the queue too long.\n"
            self.log(f"delivery {d.number}: failure: {safe(text)}")
            self.add_bounce(d, text)
            self.mark_done(d)
            job.remaining -= 1
        else:
            self.log(f"delivery {d.number}: report mangled, will defer")
            self.commit_soon(d.msg)
        job.outstanding -= 1
        self.log_status()
        self.maybe_finish_job(ch, job)

    def add_bounce(self, d: Delivery, text: str) -> None:
        paragraph = bounce_paragraph(strip_virtual(self.ctl, d.recipient), text)
        data = paragraph.encode("utf-8", "surrogateescape")
        while True:
            try:
                fd = os.open(
                    self.path("bounce", d.msg), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
                )
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                return
            except OSError:
                self.log("alert: unable to append to bounce message; HELP! sleeping...")
                self.flush_log()
                time.sleep(10)

    def mark_done(self, d: Delivery) -> None:
        try:
            fd = os.open(d.job.path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"D", d.offset)
            finally:
                os.close(fd)
        except OSError:
            kind = CHANNEL_NAMES[d.job.channel]
            self.log(
                f"warning: trouble marking {rel(kind, d.msg)}; message will be delivered twice!"
            )

    def maybe_finish_job(self, ch: Channel, job: Job) -> None:
        if job.next_record < len(job.records) or job.outstanding:
            return
        ch.jobs.remove(job)
        now = self.clock()
        if job.remaining <= 0:
            kind = CHANNEL_NAMES[ch.index]
            try:
                self.spares.remove(job.path, f"{kind}.{job.msg}")
                self.removed_from.add(os.path.dirname(job.path))
                self.release_soon()
            except FileNotFoundError:
                pass
            except OSError:
                self.log(f"warning: unable to unlink {rel(kind, job.msg)}; will try again later")
                ch.schedule(job.msg, now + SLEEP_SYSFAIL)
                return
            other = CHANNEL_NAMES[1 - ch.index]
            if not os.path.exists(self.path(other, job.msg)):
                if job.msg in self.provisional:
                    self.no_channel_left(job.msg)  # only joins self.finishing
                else:
                    self.done_checks.append((now, job.msg))
        else:
            self.commit_soon(job.msg)
            ch.schedule(job.msg, job.retry)

    def other_channel_has(self, ch: Channel, n: int) -> bool:
        other = self.channels[1 - ch.index]
        return n in other.scheduled or any(job.msg == n for job in other.jobs)

    def commit_soon(self, n: int) -> None:
        """The message stays in the queue for a while: commit it at the end of this step."""
        if n in self.provisional and n not in self.todo_removing:
            self.to_commit.add(n)

    # -- finishing messages ---------------------------------------------------------

    def message_done(self, n: int) -> bool:
        """Send the bounce if any, log end msg, remove the message (§3.6)."""
        for kind in ("local", "remote"):
            if os.path.exists(self.path(kind, n)):
                return True  # not finished; someone else holds it
        return self.no_channel_left(n)

    def no_channel_left(self, n: int) -> bool:
        """message_done for a message whose channel files are both gone."""
        if any(job.msg == n for ch in self.channels for job in ch.jobs):
            return True
        if n in self.provisional:
            if n not in self.finishing and n not in self.todo_removing:
                self.finishing.append(n)  # its todo entry goes first (finish_provisional)
            return True
        if os.path.exists(self.path("todo", n)):
            return True
        return self.finish_message(n)

    def finish_message(self, n: int) -> bool:
        """The end of message_done, for a message with no channel file, job or todo entry."""
        if os.path.exists(self.path("bounce", n)):
            if not self.inject_bounce(n):
                return False
        self.fresh.pop(n, None)
        self.log(f"end msg {n}")
        info = self.path("info", n)
        try:
            self.spares.remove(info, f"info.{n}")
            self.removed_from.add(os.path.dirname(info))
        except FileNotFoundError:
            pass
        except OSError:
            self.log(f"warning: unable to unlink {rel('info', n)}; will try again later")
            return False
        self.finished_held.append(n)
        if len(self.finished_clear) >= FINISHED_CLEAR_MAX:
            self.finished_clear.clear()  # forgetting only costs the unlinks again
        self.finished_clear.add(n)
        self.release_soon()
        return True

    def release_soon(self) -> None:
        if self.release_at is None:
            self.release_at = self.clock() + FINISHED_HOLD

    def release_finished(self) -> bool:
        """Make the finished messages' removals durable, then let their files be reused.

        A finished message's info and channel files leave the queue by a rename into
        the spare pool, and its mess file (with todo/N already gone) by qmail-clean's
        foop.  Until the directories they left are on disk, a power cut can bring the
        old names back; had the inodes been written for a new message meanwhile,
        qmail-send would deliver that new text to the old recipients.  So the pool's
        new spares stay unused, and foop/N unsent, until those directories are fsync'd:
        once for every message finished in FINISHED_HOLD seconds.  False if an fsync
        failed (everything stays held and is tried again later).
        """
        dirs = sorted(self.removed_from)
        if dirs and not all(self.syncer.map(_sync_one, dirs)):
            self.log("warning: trouble fsyncing queue directories; will try again later")
            self.release_at = self.clock() + SLEEP_SYSFAIL
            return False
        self.removed_from.clear()
        self.spares.publish()
        numbers, self.finished_held = self.finished_held, []
        for n in numbers:
            self.clean_later(f"foop/{n}")
        self.release_at = None
        return True

    def inject_bounce(self, n: int) -> bool:
        try:
            with open(self.path("info", n), "rb") as f:
                info = f.read()
            with open(self.path("bounce", n), "rb") as f:
                report = f.read()
            mess = open(self.path("mess", n), "rb")  # noqa: SIM115 - streamed below
        except OSError:
            self.log(f"warning: unable to stat {rel('bounce', n)}")
            return False
        with mess:
            sender = info[1:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if sender.endswith("-@[]"):
                sender = sender[:-4]
            if sender == "#@[]":
                self.log(f"triple bounce: discarding {rel('bounce', n)}")
            else:
                ctl = self.ctl
                if sender:
                    rcpt, bsender, double = sender, "", False
                else:
                    rcpt = f"{ctl.doublebounceto}@{ctl.doublebouncehost}"
                    bsender, double = "#@[]", True
                head = (
                    f"Date: {rfc822_date(time.time())}\n"
                    f"From: {quote(ctl.bouncefrom)}@{ctl.bouncehost}\n"
                    f"To: {quote2(rcpt)}\n"
                    "Subject: failure notice\n"
                    "\n"
                    f"Hi. This is the qmail-send program at {ctl.bouncehost}.\n"
                )
                if double:
                    head += (
                        "I tried to deliver a bounce message to this address, "
                        "but the bounce bounced!\n\n"
                    )
                else:
                    head += (
                        "I'm afraid I wasn't able to deliver your message to the "
                        "following addresses.\n"
                        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
                    )
                tail = (
                    "--- Below this line is the original bounce.\n"
                    if double
                    else "--- Below this line is a copy of the message.\n"
                )
                tail += f"\nReturn-Path: <{quote2(sender)}>\n"
                try:
                    # in-process, no fork from this process (it runs fsync threads), unless
                    # qmail-queue must run as another uid or is replaced by $QMAILQUEUE
                    qq = open_queue(self.home, "for bounce")
                except OSError:
                    self.log("warning: unable to start qmail-queue, will try later")
                    return False
                qq.write(head.encode("utf-8", "surrogateescape"))
                qq.write(report)
                qq.write(tail.encode("utf-8", "surrogateescape"))
                while chunk := mess.read(65536):
                    qq.write(chunk)
                result = qq.finish(bsender, [rcpt])
                if not result.ok:
                    self.log("warning: trouble injecting bounce message, will try later")
                    return False
                self.log(f"bounce msg {n} qp {result.qp}")
        try:
            os.unlink(self.path("bounce", n))
        except OSError:
            self.log(f"warning: unable to unlink {rel('bounce', n)}")
            return False
        return True

    # -- cleanup of crashed injections ------------------------------------------------

    def cleanup(self, now: float) -> None:
        for s in range(SPLIT):
            try:
                names = os.listdir(f"{self.queue}/mess/{s}")
            except OSError:
                continue
            for name in names:
                if not name.isdigit():
                    continue
                n = int(name)
                try:
                    st = os.stat(self.path("mess", n))
                except OSError:
                    continue
                if now <= st.st_atime + OSSIFIED:
                    continue
                if st.st_nlink > 1 and spare.pool(self.queue, "q").is_kept_in_place(n, st):
                    # a spare kept at its name (spare.keep_in_place), perhaps with its
                    # envelope file: the next message of its number writes over both.  A
                    # stray with a killed qmail-queue's pid/ name is not one; qmail-clean
                    # sweeps that name on its own, and take_in_place wants exactly two names
                    continue
                if os.path.exists(self.path("info", n)) or os.path.exists(self.path("todo", n)):
                    continue
                self.clean_later(f"foop/{n}")

    # -- signals --------------------------------------------------------------------

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.exitasap = True

    def on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.hup = True

    def on_alrm(self, signum: int, frame: FrameType | None) -> None:
        self.alarm = True

    def reread(self) -> None:
        try:
            ctl = SendControls.load(self.home)
        except ControlError as e:
            self.log(f"alert: unable to reread controls: {safe(str(e))}")
            return
        self.ctl = ctl
        self.ctl_stamp = self.control_stamp()
        for ch in self.channels:
            conc = ctl.concurrencylocal if ch.index == LOCAL else ctl.concurrencyremote
            if conc > len(ch.slots):
                ch.slots += [None] * (conc - len(ch.slots))
            ch.concurrency = conc
        # shrinking takes effect as busy slots above the new limit become free
        self.log_status()

    def control_stamp(self) -> tuple[float, ...]:
        stamps = []
        for name in ("locals", "virtualdomains", "percenthack"):
            try:
                stamps.append(os.stat(f"{self.home}/control/{name}").st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)

    def controls_changed(self) -> bool:
        """True once after locals/virtualdomains/percenthack change on disk.

        qmail needs a HUP after these change; pyqmail also notices by itself
        before preprocessing, so `pyqmail user add` works on a running MTA.
        """
        stamp = self.control_stamp()
        if stamp == self.ctl_stamp:
            return False
        self.ctl_stamp = stamp
        return True

    def save_schedule(self) -> None:
        for ch in self.channels:
            kind = CHANNEL_NAMES[ch.index]
            for n, due in ch.scheduled.items():
                try:
                    os.utime(self.path(kind, n), (due, due))
                except FileNotFoundError:
                    pass
                except OSError:
                    self.log(
                        f"warning: unable to utime {rel(kind, n)}; message will be retried too soon"
                    )

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, self.on_hup)
        signal.signal(signal.SIGALRM, self.on_alrm)
        # `pyqmail run` starts us with these blocked; a TERM that came meanwhile is
        # delivered now, to the handler
        signal.pthread_sigmask(
            signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM}
        )
        # select() is restarted after a signal handler runs (PEP 475); the wakeup
        # pipe makes a TERM/HUP/ALRM end the wait at once
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        os.umask(0o077)
        self.ctl_stamp = self.control_stamp()
        self.handshake()
        self.recover()
        self.open_trigger()
        now = self.clock()
        self.todo_scan_at = now
        self.cleanup_at = now
        self.log_status()
        while True:
            if self.hup:
                self.hup = False
                self.reread()
            if self.alarm:
                self.alarm = False
                for ch in self.channels:
                    for n in list(ch.scheduled):
                        ch.schedule(n, 0.0)
            now = self.clock()
            if self.exitasap and not any(ch.used for ch in self.channels):
                # what is still provisional stays queued: make it durable, so a
                # restart does not deliver it again
                self.step(now)
                while self.todo_removing:  # finished, not committed: see them through
                    self.clean_collect(block=True)
                    self.finish_removed(self.clock())
                waiting = sorted(self.provisional)
                for i in range(0, len(waiting), COMMIT_BATCH):
                    self.commit_batch(waiting[i : i + COMMIT_BATCH])
                if self.finished_held:
                    self.release_finished()  # a failure leaves them to the cleanup pass
                break
            busy = self.step(now)
            timeout = 0.0 if busy else self.timeout(now)
            self.wait(timeout)
        self.save_schedule()
        while self.clean_waiting:  # qmail-clean finishes what it was asked before we go
            self.clean_collect(block=True)
        self.log("status: exiting")
        self.flush_log()
        return 0

    def step(self, now: float) -> bool:
        busy = False
        for ch in self.channels:
            self.flush_pending(ch)
        if not self.exitasap:
            if now >= self.todo_scan_at:
                self.scan_todo()
                self.todo_scanned_at = now
                self.todo_scan_at = now + SLEEP_TODO
            if self.todo and self.controls_changed():
                self.reread()
            # preprocessing is cheap next to deliveries; a bounded batch keeps the loop lean
            if self.todo:
                batch, self.todo = self.todo[:PREPROCESS_BATCH], self.todo[PREPROCESS_BATCH:]
                self.preprocess_batch(batch)
                busy = True
            busy = busy or bool(self.todo)
            for ch in self.channels:
                if ch.concurrency == 0:
                    continue
                while ch.free_slot() is not None and not ch.pending:
                    if self.start_deliveries(ch):
                        busy = True
                    if ch.free_slot() is None or ch.pending:
                        break
                    if any(j.next_record < len(j.records) for j in ch.jobs):
                        break
                    n = ch.pop_due(now)
                    if n is None:
                        break
                    self.open_pass(ch, n, now)
                    busy = True
        for queue, handler in (
            (self.stat_retries, self.retry_stat),
            (self.done_checks, self.done_check),
        ):
            due_now = [item for item in queue if item[0] <= now]
            if due_now:
                queue[:] = [item for item in queue if item[0] > now]
                for _, n in due_now:
                    handler(n, now)
                busy = True
        if not self.exitasap and now >= self.cleanup_at:
            self.cleanup(now)
            self.cleanup_at = now + SLEEP_CLEANUP
        if now >= self.provisional_check_at:
            self.provisional_check_at = now + PROVISIONAL_CHECK
            self.to_commit.update(
                n
                for n, p in self.provisional.items()
                if p.since <= now - PROVISIONAL_MAX and n not in self.todo_removing
            )
        if self.finishing:
            self.finish_provisional()
            busy = True
        if self.todo_removed:
            self.finish_removed(now)
            busy = True
        if self.release_at is not None and now >= self.release_at:
            self.release_finished()
        if self.to_commit:
            # bounded: the age check may find a whole backlog at once, and qmail-clean's
            # answers must never fill their pipe while we are still writing commands
            numbers = sorted(self.to_commit)[:COMMIT_BATCH]
            self.to_commit.difference_update(numbers)
            self.commit_batch(numbers)
            busy = busy or bool(self.to_commit)
        return busy

    def finish_provisional(self) -> None:
        """Finished provisional messages: their todo entries go, then the rest as usual.

        Nothing of them needs to be durable any more.  qmail-clean is asked to remove
        the todo entries of every message finished in this step, and its answers are
        taken as they come (wait, clean_collect), then acted on by finish_removed:
        meanwhile qmail-send goes on with other messages.  Waiting for the answers
        here cost about a quarter of qmail-send's time under load (qmail-clean first
        has to be scheduled), and deliveries fell behind the SMTP side.
        """
        numbers, self.finishing = self.finishing, []  # none is out already: no_channel_left
        self.todo_removing.update(numbers)
        self.to_commit.difference_update(numbers)
        self.clean_send([f"todo/{n}" for n in numbers], CLEAN_FINISH)
        self.clean_bound()

    def finish_removed(self, now: float) -> None:
        """Act on qmail-clean's answers to finish_provisional's removals."""
        answers, self.todo_removed = self.todo_removed, []
        for n, ok in answers:
            self.todo_removing.discard(n)
            if not ok:
                self.done_checks.append((now + SLEEP_SYSFAIL, n))  # still provisional
                continue
            self.provisional.pop(n, None)
            self.todo_held.discard(str(n))
            self.to_commit.discard(n)
            # it joined self.finishing with no channel file or job left, and a provisional
            # message gets neither again (its todo entry is held from preprocessing); its
            # todo entry is gone now: only the bounce is left to look for
            if not self.finish_message(n):
                self.done_checks.append((now + SLEEP_SYSFAIL, n))

    def retry_stat(self, n: int, now: float) -> None:
        self.schedule_existing(n, now)

    def done_check(self, n: int, now: float) -> None:
        if not self.message_done(n):
            self.done_checks.append((now + SLEEP_SYSFAIL, n))

    def timeout(self, now: float) -> float:
        if self.todo_removed:
            return 0.0  # answers taken in passing (clean_all) are acted on at once
        candidates = [self.todo_scan_at, self.cleanup_at]
        if self.release_at is not None:
            candidates.append(self.release_at)
        for ch in self.channels:
            if ch.concurrency and ch.free_slot() is not None and not self.exitasap:
                due = ch.next_due()
                if due is not None:
                    candidates.append(due)
        candidates += [t for t, _ in self.done_checks] + [t for t, _ in self.stat_retries]
        wait = min(candidates) - now
        if wait <= 0:
            return 0.0
        # a todo scan held back by TODO_SCAN_GAP is due on time, not a second late
        return min(wait + SLEEP_FUZZ, SLEEP_FOREVER, self.todo_scan_at - now)

    def wait(self, timeout: float) -> None:
        self.flush_log()
        rfds = [ch.result_fd for ch in self.channels] + [self.wake_r]
        if self.clean_waiting:
            rfds.append(self.clean_reply)
        if self.trigger_fd >= 0 and not self.exitasap:
            rfds.append(self.trigger_fd)
        wfds = [ch.cmd_fd for ch in self.channels if ch.pending]
        try:
            readable, writable, _ = select.select(rfds, wfds, [], timeout)
        except InterruptedError:
            return
        except OSError as e:
            if e.errno != errno.EINTR:
                self.log("warning: trouble in select")
            return
        for ch in self.channels:
            if ch.result_fd in readable:
                self.read_results(ch)
            if ch.cmd_fd in writable:
                self.flush_pending(ch)
        if self.clean_reply in readable:
            self.clean_collect(block=False)
        if self.wake_r in readable:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except OSError:
                pass
        if self.trigger_fd in readable:
            try:
                while os.read(self.trigger_fd, 4096):
                    pass
            except OSError:
                pass
            now = self.clock()
            # at once after a quiet spell, else at the end of the gap (never later, even
            # if the clock has jumped)
            due = min(max(now, self.todo_scanned_at + TODO_SCAN_GAP), now + TODO_SCAN_GAP)
            self.todo_scan_at = min(self.todo_scan_at, due)


def start(
    home: Path,
    log_fd: int,
    local_fds: tuple[int, int],
    remote_fds: tuple[int, int],
    clean_fds: tuple[int, int],
) -> int:
    """qmail-send's startup (§4.1) then its loop; returns the exit code."""
    clock_file = os.environ.get("PYQMAIL_CLOCK_FILE")
    clock = file_clock(clock_file) if clock_file else time.time
    send = QmailSend(home, log_fd, local_fds, remote_fds, clean_fds, clock)
    try:
        return _start(send, home)
    finally:
        send.flush_log()


def _start(send: QmailSend, home: Path) -> int:
    try:
        os.chdir(home)
    except OSError:
        send.log("alert: cannot start: unable to switch to home directory")
        return 111
    try:
        send.ctl = SendControls.load(home)
    except ControlError as e:
        send.log(f"alert: cannot start: unable to read controls: {safe(str(e))}")
        return 111
    try:
        os.chdir(home / "queue")
    except OSError:
        send.log("alert: cannot start: unable to switch to queue directory")
        return 111
    try:
        mutex = os.open(f"{home}/queue/lock/sendmutex", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        send.log("alert: cannot start: unable to open mutex")
        return 111
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        send.log("alert: cannot start: qmail-send is already running")
        return 111
    return send.run()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(
            "usage: qmail-send [--home DIR]\n"
            "  fds as qmail: log on 0, lspawn 1/2, rspawn 3/4, qmail-clean 5/6;\n"
            "  normally started by `pyqmail run`.\n"
            f"  {HOME_HELP}"
        )
        sys.exit(0)
    home = resolve_home(args[1] if len(args) >= 2 and args[0] == "--home" else None)
    sys.exit(start(home, 0, (1, 2), (3, 4), (5, 6)))
