"""Test peers for remote delivery: a scripted SMTP server, smtp-sink, free ports, certificates."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on both loopback addresses (peers may listen on 127.0.0.1 and ::1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


@dataclass
class Session:
    commands: list[bytes] = field(default_factory=list)
    batches: list[bytes] = field(default_factory=list)  # raw bytes of each recv()
    data: list[bytes] = field(default_factory=list)  # raw DATA payloads, dot-stuffed, no terminator
    tls: bool = False
    helo: bytes = b""


@dataclass
class Script:
    greeting: bytes = b"220 peer.test ESMTP"
    ehlo: list[str] | None = field(default_factory=lambda: ["PIPELINING", "8BITMIME"])
    mail: bytes = b"250 ok"
    rcpt: Callable[[bytes], bytes] = lambda addr: b"250 ok"
    data: bytes = b"354 go ahead"
    dot: bytes = b"250 ok 1700000000 qp 4242"
    greeting_delay: float = 0.0
    drop_in_data: bool = False  # close after the first body bytes
    drop_after_dot: bool = False  # close after the terminator, before replying
    certfile: str | None = None  # offer STARTTLS with this certificate (key in the same file)
    inject_after_starttls: bytes = b""
    hang_up_after_message: bytes | None = None  # after the dot's reply send this, then close


class ScriptedPeer:
    """An SMTP server on loopback that answers as the script says and records everything."""

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = script
        self.sessions: list[Session] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def __enter__(self) -> ScriptedPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=10)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                conn, _ = self.sock.accept()
                session = Session()
                self.sessions.append(session)
                t = threading.Thread(target=self._talk, args=(conn, session), daemon=True)
                t.start()
                self._threads.append(t)

    def _talk(self, conn: socket.socket, session: Session) -> None:
        conn.settimeout(10)
        try:
            self._dialogue(conn, session)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def _dialogue(self, conn: socket.socket, s: Session) -> None:
        sc = self.script
        buf = bytearray()

        def send(line: bytes) -> None:
            conn.sendall(line + b"\r\n")

        def line() -> bytes | None:
            while b"\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return None
                s.batches.append(data)
                buf.extend(data)
            end = buf.index(b"\r\n")
            out = bytes(buf[:end])
            del buf[: end + 2]
            return out

        if sc.greeting_delay:
            time.sleep(sc.greeting_delay)
        send(sc.greeting)
        while True:
            cmd = line()
            if cmd is None:
                return
            s.commands.append(cmd)
            verb = cmd.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                if sc.ehlo is None:
                    send(b"502 unimplemented")
                    continue
                s.helo = cmd[5:]
                ext = list(sc.ehlo)
                if sc.certfile and not s.tls:
                    ext.append("STARTTLS")
                lines = [b"peer.test"] + [e.encode() for e in ext]
                for i, text in enumerate(lines):
                    sep = b" " if i == len(lines) - 1 else b"-"
                    send(b"250" + sep + text)
            elif verb == b"HELO":
                s.helo = cmd[5:]
                send(b"250 peer.test")
            elif verb == b"STARTTLS" and sc.certfile:
                send(
                    b"220 ready for tls"
                    + (b"\r\n" + sc.inject_after_starttls if sc.inject_after_starttls else b"")
                )
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(sc.certfile)
                conn = ctx.wrap_socket(conn, server_side=True)
                s.tls = True
                buf.clear()
            elif verb == b"MAIL":
                send(sc.mail)
            elif verb == b"RCPT":
                send(sc.rcpt(cmd[8:]))
            elif verb == b"DATA":
                send(sc.data)
                if not sc.data.startswith(b"354"):
                    continue
                body = bytearray()
                while True:
                    if sc.drop_in_data and (body or buf):
                        return
                    ln = line()
                    if ln is None:
                        return
                    if ln == b".":
                        break
                    body += ln + b"\r\n"
                s.data.append(bytes(body))
                if sc.drop_after_dot:
                    return
                send(sc.dot)
                if sc.hang_up_after_message is not None:
                    if sc.hang_up_after_message:
                        send(sc.hang_up_after_message)
                    return
            elif verb == b"QUIT":
                send(b"221 bye")
                return
            elif verb == b"RSET":
                send(b"250 ok")
            else:
                send(b"502 unimplemented")


def unstuff(payload: bytes) -> bytes:
    """The message a receiver stores from a DATA payload (dot-stuffing removed)."""
    lines = payload.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


class SMTPSink:
    """Postfix's smtp-sink on 127.0.0.1, counting what it accepts (-c)."""

    def __init__(
        self, port: int | None = None, extra: list[str] | None = None, stdout: Path | None = None
    ) -> None:
        self.port = port or free_port()
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(exe):
            exe = "/usr/lib/postfix/sbin/smtp-sink"
        args = [exe, *(extra or [])]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [f"127.0.0.1:{self.port}", "256"]
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL)
        finally:
            if stdout:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("smtp-sink did not start")

    @staticmethod
    def messages(counts: Path) -> int:
        """The last `mesg=N` counter smtp-sink -c wrote."""
        found = re.findall(rb"mesg=(\d+)", counts.read_bytes())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_cert(directory: Path, name: str) -> Path:
    """A self-signed certificate for `name` (key and certificate in one PEM file)."""
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pem = directory / f"{name}.pem"
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return pem


def run_remote(home: Path, message: bytes, host: str, sender: str, *rcpts: str) -> list[bytes]:
    """Run the qmail-remote program; returns its NUL-terminated reports."""
    proc = subprocess.run(
        [str(BIN / "qmail-remote"), "--home", str(home), host, sender, *rcpts],
        input=message,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.endswith(b"\0")
    return proc.stdout[:-1].split(b"\0")
