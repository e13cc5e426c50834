#!/usr/bin/env python3
"""Inbound SMTP benchmark: pyqmail against a Postfix anchor, measured in the same run.

Postfix's smtp-source sends 5 KB messages (one connection per message) with 20 sessions and
with 1 session to each system in turn, A B A B ..., and the script prints messages/second
accepted (smtp-source's wall time) and delivered end to end (until that many new files sit in
the target Maildir), as medians with min and max, plus the pyqmail/Postfix ratio.  It also
prints the whole machine's busy CPU time per message over each run: both systems are bound by
CPU here, and CPU per message moves less with the shared machine's noise than wall time does.

The protocol of /work/shared/benchmarking.md is followed: before every measured run both
queues are empty, `sync` has run and the script sleeps (65 s by default) so that the inodes
freed by the previous run are reusable; delivered mail is moved aside, never deleted.

Both systems listen on 127.0.0.1 only.  Postfix gets its own config directory, queue and
Maildir under the work directory (virtual(8) delivery to a Maildir, fsync'd like qmail-local's).
Everything started here is stopped at the end, also on Ctrl-C.

Run as root (Postfix needs it):  python3 bench/smtp_in.py [--runs 3] [--sleep 65]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail import qstat

BIN = Path(sys.executable).parent
SMTP_SOURCE_CANDIDATES = ("/usr/sbin/smtp-source", "/usr/lib/postfix/sbin/smtp-source")
NOBODY = 65534


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def find_smtp_source() -> str:
    for path in SMTP_SOURCE_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("smtp-source")
    if found is None:
        sys.exit("smtp-source not found: install the postfix package")
    return found


def wait_for_greeting(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers SMTP on 127.0.0.1:{port}")


def count_files(directory: Path) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name


def wait_for_files(directory: Path, target: int, deadline: float) -> bool:
    """Return once `directory` holds `target` entries (True), or at `deadline` (False).

    The directory is watched with inotify, so waiting costs next to no CPU.  Polling it
    with listdir every few milliseconds, as this script first did, takes CPU and the
    directory's lock from the deliveries still being made, and so slows down most the
    system that still has deliveries to make; where inotify is missing it still polls.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    except (OSError, AttributeError):
        fd = -1
    if fd < 0:
        while count_files(directory) < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        # watch first, then list: a file made in between is in both, and counted once
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        names = set(os.listdir(directory))
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while len(names) < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not poller.poll(int(min(left, 1.0) * 1000) + 1):
                continue
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            pos = 0
            while pos + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, pos)
                start = pos + _EVENT.size
                pos = start + length
                if mask & _IN_Q_OVERFLOW:
                    names = set(os.listdir(directory))  # events were lost: count again
                elif length:
                    names.add(os.fsdecode(data[start:pos].rstrip(b"\0")))
        return True
    finally:
        os.close(fd)


def move_aside(maildir_new: Path, label: str) -> None:
    """Rename new/ out of the way and recreate it empty, same owner and mode (no deletes)."""
    st = maildir_new.stat()
    aside = maildir_new.parent.parent / f"{maildir_new.parent.name}-done-{label}"
    os.rename(maildir_new, aside)
    os.mkdir(maildir_new, st.st_mode & 0o7777)
    os.chown(maildir_new, st.st_uid, st.st_gid)


@dataclass
class System(ABC):
    name: str
    port: int
    work: Path
    rcpt: str = ""
    maildir_new: Path = field(default_factory=Path)
    end_to_end: bool = True

    @abstractmethod
    def setup(self) -> None:
        """Create the instance's files; sets rcpt and maildir_new."""

    @abstractmethod
    def start(self) -> None:
        """Start it and return once it greets on its port."""

    @abstractmethod
    def stop(self) -> None:
        """Stop everything start() started."""

    @abstractmethod
    def queue_files(self) -> int:
        """Messages still in the queue (0 = all delivered)."""


class Pyqmail(System):
    """`pyqmail run` on a fresh home; mail to postmaster lands in alias/Maildir/."""

    proc: subprocess.Popen[bytes] | None = None
    smtpd_only: bool = False

    def setup(self) -> None:
        self.home = self.work / "pyqmail"
        subprocess.run(
            [
                str(BIN / "pyqmail"),
                "init",
                "--home",
                str(self.home),
                "--me",
                "pq.bench.test",
                "--smtp",
                f"127.0.0.1:{self.port}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # 20 sessions reconnect faster than finished children are reaped; keep the per-IP
        # cap (half of this) out of the way, as Postfix's default of 100 smtpd processes is
        (self.home / "control" / "concurrencyincoming").write_text("100\n")
        self.rcpt = "postmaster@pq.bench.test"
        self.maildir_new = self.home / "alias" / "Maildir" / "new"
        self.end_to_end = not self.smtpd_only

    def start(self) -> None:
        out = open(self.work / "pyqmail-run.out", "ab")  # noqa: SIM115 - lives with the process
        if self.smtpd_only:
            code = (
                "from pathlib import Path\n"
                "from pyqmail import smtpd, tcpserver\n"
                f"home = Path({str(self.home)!r})\n"
                f"tcpserver.serve([('127.0.0.1', {self.port})],"
                " lambda fd, env: smtpd.handle_connection(home, fd, env), limit=100)\n"
            )
            argv = [sys.executable, "-c", code]
        else:
            argv = [str(BIN / "pyqmail"), "run", "--home", str(self.home)]
        self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        out.close()
        wait_for_greeting(self.port)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            log("pyqmail did not stop within 60 s; killing it")
            self.proc.kill()
            self.proc.wait(10)

    def queue_files(self) -> int:
        if self.smtpd_only:
            return 0  # nothing delivers; the queue only grows
        # qmail-qstat's count: finished mess files kept in mess/ for reuse are not messages
        messages: int = qstat.counts(self.home)[0]
        return messages


class Postfix(System):
    """A private Postfix instance: own config dir, queue, log file and Maildir."""

    def setup(self) -> None:
        base = self.work / "postfix"
        self.conf = base / "etc"
        self.spool = base / "spool"
        data = base / "data"
        mail = base / "mail"
        for d in (self.conf, self.spool, data, mail):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        if Path("/etc/postfix/dynamicmaps.cf").exists():
            shutil.copy("/etc/postfix/dynamicmaps.cf", self.conf / "dynamicmaps.cf")
        (self.conf / "main.cf").write_text("")
        shutil.chown(data, user="postfix")
        os.chown(mail, NOBODY, NOBODY)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "pf.bench.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "virtual_mailbox_domains": "pf.bench.test",
            "virtual_mailbox_base": str(mail),
            "virtual_mailbox_maps": "static:bench/",
            "virtual_uid_maps": f"static:{NOBODY}",
            "virtual_gid_maps": f"static:{NOBODY}",
            "maillog_file": str(base / "maillog"),
            "maillog_file_prefixes": str(base),
        }
        self.postconf("-e", *(f"{k}={v}" for k, v in settings.items()))
        self.postconf("-MX", "smtp/inet")
        self.postconf(
            "-Me", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"
        )
        # no chroot: the private queue has no copies of /etc files for it
        self.postconf("-F", "*/*/chroot = n")
        self.rcpt = "bench@pf.bench.test"
        maildir = mail / "bench"
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
            os.chown(maildir / sub, NOBODY, NOBODY)
        os.chown(maildir, NOBODY, NOBODY)
        self.maildir_new = maildir / "new"

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), *args], check=True)

    def start(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, cwd="/")
        wait_for_greeting(self.port)

    def stop(self) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.conf), "stop"], cwd="/", stderr=subprocess.DEVNULL
        )

    def queue_files(self) -> int:
        total = 0
        for sub in ("maildrop", "incoming", "active", "deferred"):
            for _root, _dirs, files in os.walk(self.spool / sub):
                total += len(files)
        return total


@dataclass
class Result:
    accepted: float
    end_to_end: float | None
    cpu_ms: float | None = None  # whole machine's busy CPU per message, see cpu_seconds
    steal_pct: float | None = None  # share of the run's CPU time the hypervisor took


def cpu_seconds() -> tuple[float, float, float] | None:
    """(busy, stolen, all) CPU time of the whole machine so far (all cores), from /proc/stat.

    Busy is user, nice, system, irq and softirq time; idle, I/O wait and time stolen by
    the hypervisor are not.  Over a run it counts everything that ran: the system under
    test, smtp-source and this script's polling (the same for both systems), and whatever
    else the shared machine did, so it is a figure to compare within one run only.
    Stolen time is when this machine's virtual CPUs wanted to run and the host ran
    something else: a run with much of it was disturbed by a neighbour, and its
    processes also pay more CPU for the same work (caches are cold when they get back).
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


def python_calibration_ms() -> float:
    """Milliseconds for a fixed piece of plain Python work, best of 9 (lower is faster).

    Taken at the start and again at the end of the benchmark; the lower one is reported.

    pyqmail runs on the interpreter that runs this script, and interpreters differ a lot
    in speed (a build with profile-guided and link-time optimization, as Debian's
    python3 is, against one without, as pyenv builds by default): this figure tells
    runs on different interpreters apart.
    """

    def work() -> int:
        counts: dict[int, int] = {}
        total = 0
        for i in range(20000):
            k = i & 255
            counts[k] = counts.get(k, 0) + len(str(i))
            total += k
        return total

    return min(timeit.repeat(work, number=1, repeat=9)) * 1000


def settle(systems: list[System], pause: float) -> None:
    """Queues empty, disk synced, freed inodes reusable again."""
    deadline = time.monotonic() + 600
    while any(s.queue_files() for s in systems):
        if time.monotonic() > deadline:
            raise RuntimeError("queues did not drain within 10 minutes")
        time.sleep(0.5)
    os.sync()
    if pause > 0:
        log(f"  sleeping {pause:.0f} s (inode reuse, see benchmarking.md)")
        time.sleep(pause)


def measure(smtp_source: str, system: System, sessions: int, messages: int, size: int) -> Result:
    before = count_files(system.maildir_new)
    argv = [
        smtp_source,
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-f",
        "load@client.bench.test",
        "-t",
        system.rcpt,
        "-M",
        "client.bench.test",
        f"127.0.0.1:{system.port}",
    ]
    cpu_before = cpu_seconds()
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=3600)
    accepted_at = time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(
            f"smtp-source against {system.name} failed: {proc.stderr.decode(errors='replace')}"
        )
    e2e = None
    if system.end_to_end:
        if not wait_for_files(system.maildir_new, before + messages, accepted_at + 600):
            raise RuntimeError(f"{system.name}: not all messages delivered in 10 minutes")
        e2e = messages / (time.monotonic() - start)
    # to the last delivery when there is one: what a message costs from SMTP to Maildir
    cpu_after = cpu_seconds()
    cpu_ms = steal_pct = None
    if cpu_before is not None and cpu_after is not None:
        busy, stolen, total = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        cpu_ms = busy * 1000 / messages
        steal_pct = 100 * stolen / total if total > 0 else 0.0
    return Result(messages / (accepted_at - start), e2e, cpu_ms, steal_pct)


def summary(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:7.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per system (3)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per 20-session run")
    parser.add_argument(
        "--messages-single", type=int, default=500, help="messages per 1-session run"
    )
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (5120)")
    parser.add_argument("--sleep", type=float, default=65.0, help="pause before each run (65 s)")
    parser.add_argument("--pyqmail-port", type=int, default=2601)
    parser.add_argument("--postfix-port", type=int, default=2602)
    parser.add_argument("--workdir", help="where homes and queues go (default: a new temp dir)")
    parser.add_argument(
        "--smtpd-only",
        action="store_true",
        help="run pyqmail's tcpserver+smtpd alone instead of `pyqmail run` (no end-to-end)",
    )
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix anchor")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()

    if os.geteuid() != 0 and not args.no_postfix:
        sys.exit("run as root: the Postfix anchor needs it (or pass --no-postfix)")
    smtp_source = find_smtp_source()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="smtp-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # Postfix daemons run as the postfix user and must reach their dirs
    log(f"work directory: {work}")
    calibration = python_calibration_ms()
    python = f"{sys.executable} (Python {sys.version.split()[0]})"
    log(f"python: {python}, plain-Python calibration {calibration:.2f} ms")

    pyqmail = Pyqmail("pyqmail", args.pyqmail_port, work)
    pyqmail.smtpd_only = args.smtpd_only
    systems: list[System] = [pyqmail]
    if not args.no_postfix:
        systems.append(Postfix("postfix", args.postfix_port, work))

    results: dict[str, dict[int, list[Result]]] = {s.name: {} for s in systems}
    started: list[System] = []
    try:
        for s in systems:
            s.setup()
            s.start()
            started.append(s)
            # one unmeasured round as large as a measured one, so every process and cache
            # is warm, pyqmail's pools of recycled queue files included (pyqmail.spare)
            measure(smtp_source, s, 20, args.messages, args.size)
        for sessions, messages in ((20, args.messages), (1, args.messages_single)):
            for run in range(args.runs):
                for s in systems:
                    settle(systems, args.sleep)
                    for t in systems:
                        move_aside(t.maildir_new, f"s{sessions}-r{run}-before-{s.name}")
                    log(
                        f"run {run + 1}/{args.runs}: {s.name}, {sessions} sessions, {messages} msgs"
                    )
                    r = measure(smtp_source, s, sessions, messages, args.size)
                    results[s.name].setdefault(sessions, []).append(r)
                    shown = f"{r.end_to_end:.0f}" if r.end_to_end is not None else "-"
                    cost = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
                    steal = f"{r.steal_pct:.1f}%" if r.steal_pct is not None else "-"
                    log(
                        f"  accepted {r.accepted:.0f} msg/s, end to end {shown} msg/s,"
                        f" machine CPU {cost} ms/msg, stolen by the host {steal}"
                    )
        settle(systems, 0)
    finally:
        for s in reversed(started):
            s.stop()

    print(f"\nsmtp-source, {args.size}-byte messages, one connection per message, {args.runs} runs")
    print("median (min-max) messages/second; machine CPU ms per message (all cores, to the")
    print("last delivery; lower is better)")
    # measured again with the machine quiet: a neighbour busy at the start inflates it
    calibration = min(calibration, python_calibration_ms())
    print(f"pyqmail ran on {python}; plain-Python calibration {calibration:.2f} ms")
    for sessions in (20, 1):
        print(f"\n{sessions} session(s):")
        print(f"  {'system':10} {'accepted':>22} {'end to end':>22} {'CPU ms/msg':>22}")
        medians: dict[str, tuple[float, float | None, float | None]] = {}
        for s in systems:
            rs = results[s.name].get(sessions, [])
            acc = [r.accepted for r in rs]
            e2e = [r.end_to_end for r in rs if r.end_to_end is not None]
            cpu = [r.cpu_ms for r in rs if r.cpu_ms is not None]
            print(f"  {s.name:10} {summary(acc):>22} {summary(e2e):>22} {summary(cpu, 2):>22}")
            medians[s.name] = (
                statistics.median(acc) if acc else 0.0,
                statistics.median(e2e) if e2e else None,
                statistics.median(cpu) if cpu else None,
            )
        if "postfix" in medians and medians["postfix"][0]:
            pa, pe, pc = medians["pyqmail"]
            fa, fe, fc = medians["postfix"]
            line = f"  ratio pyqmail/postfix: accepted {pa / fa:.2f}"
            if pe is not None and fe:
                line += f", end to end {pe / fe:.2f}"
            if pc and fc:
                # inverted so that, like the others, above 1.0 means pyqmail does better
                line += f", CPU per message (postfix/pyqmail) {fc / pc:.2f}"
            print(line)
    if args.json:
        raw = {
            name: {
                str(k): [
                    {
                        "accepted": r.accepted,
                        "end_to_end": r.end_to_end,
                        "cpu_ms": r.cpu_ms,
                        "steal_pct": r.steal_pct,
                    }
                    for r in v
                ]
                for k, v in per.items()
            }
            for name, per in results.items()
        }
        document: dict[str, object] = {
            "python": {
                "executable": sys.executable,
                "version": sys.version.split()[0],
                "calibration_ms": calibration,
            },
            **raw,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    log(f"delivered mail was moved aside under {work}; remove it when done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
