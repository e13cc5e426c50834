"""Helpers for the tcpserver/tcprules tests: a library-mode server in its own process.

Run as a script (``python _tcp_util.py CONFIG_JSON``) it serves with pyqmail.tcpserver.serve and
a small line-protocol handler, printing the bound addresses as one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def handler_main(config: dict[str, Any]) -> None:
    from pyqmail.tcpserver import serve

    active_dir = Path(config["active_dir"]) if config.get("active_dir") else None

    def handle(fd: int, env: dict[str, str]) -> int:
        std_open = all(_is_open(n) for n in (0, 1, 2))
        sock = socket.socket(fileno=os.dup(fd))
        mark = None
        active = 0
        if active_dir is not None:
            mark = active_dir / str(os.getpid())
            mark.touch()
            active = len(os.listdir(active_dir))
        try:
            greeting = {
                "pid": os.getpid(),
                "fd": fd,
                "std_open": std_open,
                "env": env,
                "active": active,
                "os_relay": os.environ.get("RELAYCLIENT"),
            }
            sock.sendall(json.dumps(greeting).encode() + b"\n")
            reader = sock.makefile("rb")
            for line in reader:
                word = line.strip().decode()
                if word == "quit":
                    sock.sendall(b"bye\n")
                    return 0
                if word.startswith("exit "):
                    return int(word.split()[1])
                if word.startswith("sleep "):
                    time.sleep(float(word.split()[1]))
                sock.sendall(b"echo " + line)
            return 0
        finally:
            if mark is not None:
                mark.unlink()

    def ready(bound: list[tuple[str, int]]) -> None:
        sys.stdout.write(json.dumps(bound) + "\n")
        sys.stdout.flush()

    opts = dict(config.get("options", {}))
    if "over_limit_banner" in opts:
        opts["over_limit_banner"] = opts["over_limit_banner"].encode()
    if "banner" in opts:
        opts["banner"] = opts["banner"].encode()
    rules = Path(config["rules"]) if config.get("rules") else None
    if config.get("close_stdin"):
        # as a supervisor may start us: nothing on fd 0
        os.close(0)
    if config.get("fail_forks"):
        # the first forks fail, as they do when the system is out of processes
        real_fork = os.fork
        failures = [int(config["fail_forks"])]

        def failing_fork() -> int:
            if failures[0] > 0:
                failures[0] -= 1
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return real_fork()

        os.fork = failing_fork
    addresses = [tuple(a) for a in config["addresses"]]
    sys.exit(
        serve(
            addresses,  # type: ignore[arg-type]
            handle,
            limit=config.get("limit", 40),
            per_ip=config.get("per_ip", 0),
            rules=rules,
            on_ready=ready,
            **opts,
        )
    )


class Server:
    """A running library-mode server process and what it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], bound: list[tuple[str, int]], log: Path):
        self.proc = proc
        self.bound = bound
        self.log = log

    @property
    def port(self) -> int:
        return self.bound[0][1]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """Live (or zombie) children of the server, from /proc."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid:
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode


@contextmanager
def library_server(tmp_path: Path, **config: Any) -> Iterator[Server]:
    """Start the library-mode server; always stopped (and killed if need be) on exit."""
    config.setdefault("addresses", [["127.0.0.1", 0]])
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_tcp_util.py"), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"server did not start: {log.read_text()}")
        bound = [(a, p) for a, p in json.loads(line)]
        server = Server(proc, bound, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class Client:
    """A line-oriented test client with a bounded read timeout."""

    def __init__(self, host: str, port: int, source: str | None = None, timeout: float = 5.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def readline(self, timeout: float | None = None) -> bytes:
        """One line, or b"" at EOF; raises socket.timeout when nothing arrives in time."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def greeting(self, timeout: float | None = None) -> dict[str, Any]:
        line = self.readline(timeout)
        assert line, "connection closed before the greeting"
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


if __name__ == "__main__":
    handler_main(json.loads(sys.argv[1]))
