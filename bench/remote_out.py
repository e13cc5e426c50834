"""Outbound relay speed: pyqmail vs Postfix, both relaying to the same smtp-sink.

For each system, N messages of about 5 KB are queued while its delivery is
held back, then delivery is released and the time until the queue is empty
gives messages/second.  pyqmail: messages are queued with
pyqmail.qq.queue_message while `pyqmail run` is stopped, smtproutes sends
everything to the sink.  Postfix: a private instance (own config directory
and queue, `postconf -c`) receives the messages over SMTP with
`defer_transports = smtp`, then the deferral is lifted, the queue flushed,
and relayhost points at the same sink.

Follows /work/shared/benchmarking.md: queues empty, `sync` and a pause
(default 65 s) before every measured run, systems alternated A B A B,
medians of the runs with min and max, and the ratio from the same run.

Run as root (Postfix needs it):  python bench/remote_out.py [--runs 3] [--messages 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyqmail import qstat
from pyqmail.init import HomeSettings, create_home
from pyqmail.qq import queue_message

BIN = Path(sys.executable).parent
SINK_CANDIDATES = ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink")
SOURCE_CANDIDATES = ("/usr/sbin/smtp-source", "/usr/lib/postfix/sbin/smtp-source")


def find(candidates: tuple[str, ...]) -> str:
    for c in candidates:
        if os.path.exists(c):
            return c
    sys.exit(f"{candidates[0]} not found: install the postfix package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def message(i: int) -> bytes:
    head = f"From: bench@example.test\nTo: rcpt{i}@far.example\nSubject: bench {i}\n\n"
    return head.encode() + (b"0123456789" * 7 + b"\n") * 70  # about 5 KB


def count_files(path: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(path))


def settle(pause: float) -> None:
    subprocess.run(["sync"], check=False)
    time.sleep(pause)


class PyQmail:
    name = "pyqmail"

    def __init__(self, work: Path, sink_port: int) -> None:
        self.home = work / "pyqmail"
        create_home(self.home, HomeSettings(me="mx.bench.test", locals=["bench.test"]))
        (self.home / "control" / "smtproutes").write_text(f":127.0.0.1:{sink_port}\n")
        (self.home / "control" / "smtplisten").write_text(f"127.0.0.1:{free_port()}\n")

    def fill(self, n: int) -> None:
        for i in range(n):
            r = queue_message(self.home, message(i), "bench@bench.test", [f"rcpt{i}@far.example"])
            if not r.ok:
                raise RuntimeError(f"queueing failed: {r.text}")

    def queued(self) -> int:
        # qmail-qstat's count: finished mess files kept for reuse are not messages
        messages: int = qstat.counts(self.home)[0]
        return messages

    def deliver(self, n: int) -> float:
        start = time.monotonic()
        proc = subprocess.Popen(
            [str(BIN / "pyqmail"), "run", "--home", str(self.home)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while self.queued():
                if time.monotonic() - start > 1800:
                    raise RuntimeError("pyqmail did not empty its queue in 30 minutes")
                time.sleep(0.05)
            elapsed = time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return n / elapsed

    def close(self) -> None:
        pass


class Postfix:
    name = "postfix"

    def __init__(self, work: Path, sink_port: int) -> None:
        base = work / "postfix"
        self.conf = base / "etc"
        self.spool = base / "spool"
        data = base / "data"
        for d in (self.conf, self.spool, data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        if Path("/etc/postfix/dynamicmaps.cf").exists():
            shutil.copy("/etc/postfix/dynamicmaps.cf", self.conf / "dynamicmaps.cf")
        (self.conf / "main.cf").write_text("")
        shutil.chown(data, user="postfix")
        self.port = free_port()
        self.sink_port = sink_port
        self.postconf(
            "-e",
            "compatibility_level=3.6",
            f"queue_directory={self.spool}",
            f"data_directory={data}",
            "mail_owner=postfix",
            "setgid_group=postdrop",
            "myhostname=pf.bench.test",
            "mydestination=",
            "inet_interfaces=127.0.0.1",
            "inet_protocols=ipv4",
            "mynetworks=127.0.0.0/8",
            "alias_maps=",
            "alias_database=",
            f"relayhost=[127.0.0.1]:{sink_port}",
            "smtp_tls_security_level=none",
            "default_destination_concurrency_limit=20",
            "defer_transports=smtp",
            f"maillog_file={base / 'maillog'}",
            f"maillog_file_prefixes={base}",
        )
        self.postconf("-MX", "smtp/inet")
        self.postconf(
            "-Me", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"
        )
        self.postconf("-F", "*/*/chroot = n")
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, cwd="/")
        wait_port(self.port)

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), *args], check=True)

    def reload(self) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.conf), "reload"],
            check=True,
            cwd="/",
            stderr=subprocess.DEVNULL,
        )

    def queued(self) -> int:
        return sum(
            count_files(self.spool / q) for q in ("maildrop", "incoming", "active", "deferred")
        )

    def fill(self, n: int) -> None:
        self.postconf("-e", "defer_transports=smtp")
        self.reload()
        subprocess.run(
            [
                find(SOURCE_CANDIDATES),
                "-s",
                "20",
                "-m",
                str(n),
                "-l",
                "5120",
                "-f",
                "bench@bench.test",
                "-t",
                "rcpt@far.example",
                f"127.0.0.1:{self.port}",
            ],
            check=True,
        )
        deadline = time.monotonic() + 600
        while count_files(self.spool / "deferred") < n:
            if time.monotonic() > deadline:
                raise RuntimeError("Postfix did not take all the messages")
            time.sleep(0.2)

    def deliver(self, n: int) -> float:
        start = time.monotonic()
        self.postconf("-e", "defer_transports=")
        self.reload()
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True)
        while self.queued():
            if time.monotonic() - start > 1800:
                raise RuntimeError("Postfix did not empty its queue in 30 minutes")
            time.sleep(0.05)
        return n / (time.monotonic() - start)

    def close(self) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.conf), "stop"], cwd="/", stderr=subprocess.DEVNULL
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=65.0, help="seconds to wait before each run")
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.no_postfix:
        sys.exit("run as root (the Postfix anchor needs it), or pass --no-postfix")
    work = Path(tempfile.mkdtemp(prefix="remote_out."))
    os.chmod(work, 0o755)  # Postfix daemons run as the postfix user and must reach their dirs
    sink_port = free_port()
    sink_args = [find(SINK_CANDIDATES)]
    if os.geteuid() == 0:
        sink_args += ["-u", "nobody"]
    sink = subprocess.Popen(
        [*sink_args, f"127.0.0.1:{sink_port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    systems: list[PyQmail | Postfix] = []
    rates: dict[str, list[float]] = {}
    try:
        wait_port(sink_port)
        systems.append(PyQmail(work, sink_port))
        if not args.no_postfix:
            systems.append(Postfix(work, sink_port))
        for run in range(args.runs):
            for system in systems:
                system.fill(args.messages)
                settle(args.pause)
                rate = system.deliver(args.messages)
                rates.setdefault(system.name, []).append(rate)
                print(f"run {run + 1} {system.name}: {rate:.0f} msgs/s", flush=True)
    finally:
        for system in systems:
            system.close()
        sink.terminate()
        sink.wait(10)
    print(f"\n{args.messages} messages of about 5 KB relayed to smtp-sink, {args.runs} runs:")
    med: dict[str, float] = {}
    for name, values in rates.items():
        med[name] = statistics.median(values)
        print(
            f"  {name:8s} median {med[name]:.0f} msgs/s (min {min(values):.0f}, max {max(values):.0f})"
        )
    if "postfix" in med and med["postfix"]:
        print(f"  ratio pyqmail/postfix: {med['pyqmail'] / med['postfix']:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
