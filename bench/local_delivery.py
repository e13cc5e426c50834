#!/usr/bin/env python3
"""Local delivery benchmark: `sendmail` injections into a running `pyqmail run`, to a Maildir.

    python bench/local_delivery.py [--messages 2000] [--concurrency 10] [--home DIR]

Each measured run injects --messages messages with --concurrency `sendmail`
processes at a time (one process per message, as cron jobs and scripts do), all
to one mailbox user, and times two things from the first injection on: until the
last `sendmail` has exited (injected msgs/s) and until the queue is empty and
every message is in the Maildir (delivered msgs/s, end to end).

The protocol is the one /work/shared/benchmarking.md asks for on these machines:
before each measured run the queue is empty, `sync` has run and the script sleeps
--settle seconds (65 by default: ext4 without a journal will not reuse the inodes
a previous run just freed for about a minute, and creating files past them is 50x
slower); delivered mail is never deleted, each run gets a fresh mailbox user; the
figures are medians of --runs runs with min and max.  The anchor, measured in the
same runs and alternated with pyqmail (A B A B ...), is the floor for this work on
this disk: the same messages written straight into a Maildir as qmail-local does
(tmp/, fsync, link into new/) by --concurrency threads, with no queue and no
process per message.  The ratio says how far above that floor pyqmail is.
A second reference, the "floor", times bare interpreter starts that import
sendmail's module (the same count and concurrency), since one Python process per
injected message is what `sendmail` costs before it does any mail work.

pyqmail's modules are byte-compiled first (see precompile()): an installed
system has its .pyc files, and without them every sendmail process would spend
about 10 ms compiling.

Everything the script starts is stopped before it exits, also on Ctrl-C.
A temporary home (the default) is removed afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pyqmail.fmt import tai64n_label
from pyqmail.init import HomeSettings, create_home
from pyqmail.users import add_user

BIN = Path(sys.executable).parent
DOMAIN = "example.test"
SENDER = f"bench@{DOMAIN}"


def message(size: int) -> bytes:
    head = f"From: {SENDER}\nTo: someone@{DOMAIN}\nSubject: local delivery benchmark\n\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head.encode() + body


def maildir_count(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))


def queue_empty(home: Path) -> bool:
    queue = home / "queue"
    if os.listdir(queue / "todo"):
        return False
    return not any(os.listdir(d) for d in (queue / "info").iterdir())


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"local_delivery: gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logged_since(logdir: Path, label: str, text: str) -> bool:
    """A log line starting with `text` stamped at or after `label`, in any file: a
    multilog that was killed has its `current` renamed aside when it starts again."""
    for path in logdir.glob("[@c]*"):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            stamp, _, rest = line.partition(" ")
            if stamp >= label and rest.startswith(text):
                return True
    return False


class MTA:
    """`pyqmail run` in its own process group, so that nothing it forked outlives us."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        listen = self.home / "control" / "smtplisten"
        if not listen.exists():  # never the shared default port
            listen.write_text(f"127.0.0.1:{free_port()}\n")
        since = tai64n_label(time.time() - 0.001)
        self.proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(self.home)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"local_delivery: pyqmail run exited {self.proc.returncode}")
            return logged_since(self.home / "log" / "send", since, "status: local")

        wait_until(started, 30, "qmail-send to start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        except subprocess.TimeoutExpired:
            print("local_delivery: pyqmail run ignored SIGTERM; killing it", file=sys.stderr)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.returncode is None:
                proc.wait(10)


@dataclass
class Figures:
    injected: float  # msgs/s until the last sendmail exited
    delivered: float  # msgs/s until all are in the Maildir and the queue is empty
    cpu_ms: float  # CPU per message of every process involved (user + system)
    inject_cpu_ms: float = 0.0  # of which the sendmail processes and their qmail-queue


def settle(home: Path, seconds: float) -> None:
    wait_until(lambda: queue_empty(home), 600, "the queue to empty")
    os.sync()
    time.sleep(seconds)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_pyqmail(home: Path, mta: MTA, maildir: Path, rcpt: str, args: argparse.Namespace) -> Figures:
    msg = message(args.size)
    env = dict(os.environ, QMAILHOME=str(home))
    failures: list[str] = []
    lock = threading.Lock()

    def inject(_: int) -> None:
        r = subprocess.run(
            [str(BIN / "sendmail"), "-f", SENDER, rcpt],
            input=msg, env=env, capture_output=True, timeout=120,
        )
        if r.returncode != 0:
            with lock:
                failures.append(f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()}")

    n = args.messages
    cpu0 = children_cpu()
    mta_cpu0 = process_group_cpu(mta)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(inject, range(n)))
    t_inj = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"local_delivery: {len(failures)} sendmail runs failed, e.g. {failures[0]}")
    wait_until(lambda: maildir_count(maildir) >= n and queue_empty(home), 600, "delivery")
    t_del = time.perf_counter() - t0
    inject_cpu = children_cpu() - cpu0
    cpu = inject_cpu + process_group_cpu(mta) - mta_cpu0
    if maildir_count(maildir) != n:
        raise SystemExit(f"local_delivery: {maildir_count(maildir)} messages delivered, sent {n}")
    return Figures(n / t_inj, n / t_del, 1000 * cpu / n, 1000 * inject_cpu / n)


def run_floor(args: argparse.Namespace) -> Figures:
    """What one Python process per message costs before any mail work: start the
    interpreter and import sendmail's module, --concurrency at a time."""
    def start(_: int) -> None:
        subprocess.run([sys.executable, "-c", "import pyqmail.sendmail"], check=True, timeout=60)

    n = args.messages
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(start, range(n)))
    elapsed = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    return Figures(n / elapsed, n / elapsed, 1000 * cpu / n, 1000 * cpu / n)


def process_group_cpu(mta: MTA) -> float:
    """CPU seconds used so far by the MTA's living processes and the children they reaped."""
    if mta.proc is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[2] is the process group; 11-14 are utime, stime, cutime, cstime
        if int(fields[2]) == mta.proc.pid:
            total += sum(int(f) for f in fields[11:15])
    return total / tick


def run_anchor(maildir: Path, args: argparse.Namespace) -> Figures:
    """The same messages written straight into a Maildir, qmail-local's way, from threads."""
    msg = message(args.size)
    host = socket.gethostname()
    pid = os.getpid()
    fd_dir = os.open(maildir, os.O_RDONLY)

    def deliver(i: int) -> None:
        name = f"{time.time():.0f}.{pid}_{i}.{host}"
        fd = os.open(f"tmp/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd_dir)
        try:
            view = memoryview(msg)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(f"tmp/{name}", f"new/{name}", src_dir_fd=fd_dir, dst_dir_fd=fd_dir)
        os.unlink(f"tmp/{name}", dir_fd=fd_dir)

    n = args.messages
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(deliver, range(n)))
    finally:
        os.close(fd_dir)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return Figures(n / elapsed, n / elapsed, 1000 * cpu / n)


def mailbox_owner(args: argparse.Namespace) -> tuple[int, int]:
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    # qmail never delivers as root: a root run delivers as an ordinary account
    pw = pwd.getpwnam(args.mailbox_owner)
    return pw.pw_uid, pw.pw_gid


def summary(name: str, values: list[float], unit: str) -> str:
    return (
        f"{name:<28} median {statistics.median(values):8.1f} {unit}"
        f"   (min {min(values):.1f}, max {max(values):.1f}, runs {len(values)})"
    )


def precompile() -> None:
    """Make sure pyqmail's bytecode is on disk before timing process starts.

    Every sendmail is a new interpreter; without .pyc files (an editable install
    run under PYTHONDONTWRITEBYTECODE=1, as on these machines) each one compiles
    pyqmail's modules from source again, which is not what an installed system does.
    """
    import compileall

    import pyqmail

    package = Path(pyqmail.__file__).parent
    if not compileall.compile_dir(package, quiet=1, force=False, workers=1):
        print(f"local_delivery: could not byte-compile {package}; "
              "the figures include compiling pyqmail in every process", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Local delivery benchmark: concurrent sendmail -> pyqmail run -> Maildir.",
    )
    p.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    p.add_argument("--concurrency", type=int, default=10,
                   help="sendmail processes at a time (default 10)")
    p.add_argument("--home", type=Path,
                   help="qmail home to use (created if missing; default: a temporary one)")
    p.add_argument("--size", type=int, default=5000, help="message size in bytes (default 5000)")
    p.add_argument("--runs", type=int, default=3, help="measured runs of each (default 3)")
    p.add_argument("--settle", type=float, default=65.0,
                   help="seconds to sleep after sync before each run (default 65)")
    p.add_argument("--no-anchor", action="store_true", help="skip the plain-Maildir anchor")
    p.add_argument("--no-floor", action="store_true",
                   help="skip timing bare interpreter starts (python -c 'import pyqmail.sendmail')")
    p.add_argument("--mailbox-owner", default="nobody",
                   help="account owning the mailbox when run as root (default nobody)")
    p.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = p.parse_args(argv)
    if args.messages < 1 or args.concurrency < 1 or args.runs < 1:
        p.error("--messages, --concurrency and --runs must be at least 1")

    precompile()
    temp = None
    if args.home is None:
        temp = Path(tempfile.mkdtemp(prefix="pyqmail-bench-"))
        home = temp / "qmail"
    else:
        home = args.home.resolve()
    if not (home / "control").is_dir():
        create_home(home, HomeSettings(me=f"mx.{DOMAIN}", locals=[DOMAIN, f"mx.{DOMAIN}"]))
    uid, gid = mailbox_owner(args)
    stamp = int(time.time())
    mta = MTA(home)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    ours: list[Figures] = []
    anchor: list[Figures] = []
    floor: list[Figures] = []
    try:
        mta.start()
        print(f"home {home}; {args.messages} messages of {args.size} bytes, "
              f"{args.concurrency} concurrent sendmail; {os.cpu_count()} CPUs", flush=True)
        for run in range(1, args.runs + 1):
            local = f"bench{stamp}r{run}"
            userhome = add_user(home, f"{local}@{DOMAIN}", uid=uid, gid=gid)
            print(f"run {run}: settling {args.settle:.0f}s ...", flush=True)
            settle(home, args.settle)
            f = run_pyqmail(home, mta, userhome / "Maildir", f"{local}@{DOMAIN}", args)
            ours.append(f)
            print(f"run {run}: pyqmail  injected {f.injected:7.1f} msgs/s, delivered "
                  f"{f.delivered:7.1f} msgs/s, {f.cpu_ms:.1f} ms CPU/msg "
                  f"({f.inject_cpu_ms:.1f} in sendmail + qmail-queue)", flush=True)
            if not args.no_floor:
                fl = run_floor(args)
                floor.append(fl)
                print(f"run {run}: floor    {fl.injected:7.1f} interpreter starts/s "
                      f"({fl.cpu_ms:.1f} ms CPU each)", flush=True)
            if not args.no_anchor:
                plain = home / "anchor" / f"r{run}-{stamp}"
                for sub in ("tmp", "new", "cur"):
                    (plain / sub).mkdir(parents=True, exist_ok=True)
                settle(home, args.settle)
                a = run_anchor(plain, args)
                anchor.append(a)
                print(f"run {run}: anchor   {a.delivered:7.1f} msgs/s "
                      f"({a.cpu_ms:.2f} ms CPU/msg)", flush=True)
    except KeyboardInterrupt:
        print("local_delivery: interrupted", file=sys.stderr)
        return 130
    finally:
        mta.stop()
        if temp is not None and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)

    print()
    print(f"pyqmail local delivery, {args.messages} x {args.size} B, "
          f"{args.concurrency} concurrent sendmail (medians of {args.runs} runs)")
    print(summary("injected (sendmail exit)", [f.injected for f in ours], "msgs/s"))
    print(summary("delivered (end to end)", [f.delivered for f in ours], "msgs/s"))
    print(summary("CPU per message", [f.cpu_ms for f in ours], "ms"))
    print(summary("  of which injection", [f.inject_cpu_ms for f in ours], "ms"))
    if floor:
        print(summary("floor: interpreter starts", [f.injected for f in floor], "/s"))
        print(summary("  CPU per start", [f.cpu_ms for f in floor], "ms"))
    if anchor:
        print(summary("anchor: plain Maildir writes", [a.delivered for a in anchor], "msgs/s"))
        ratio = statistics.median(f.delivered for f in ours) / statistics.median(
            a.delivered for a in anchor
        )
        print(f"{'delivered / anchor':<28} {ratio:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
