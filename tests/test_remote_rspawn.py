"""qmail-rspawn: its report rules, and the real program speaking the spawner protocol."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _remote_util import BIN, Script, ScriptedPeer, SMTPSink
from pyqmail import tcpto
from pyqmail.qq import queue_message
from pyqmail.rspawn import rspawn_report

EXIT0 = 0


def status(code: int) -> int:
    return code << 8


@pytest.mark.parametrize(
    ("wait_status", "output", "expected"),
    [
        (signal.SIGSEGV, b"", b"Zqmail-remote crashed.\n"),
        (status(111), b"", b"ZUnable to run qmail-remote.\n"),
        (status(100), b"", b"DUnable to run qmail-remote.\n"),
        (status(2), b"Kjunk\0", b"DUnable to run qmail-remote.\n"),
        (EXIT0, b"", b"Zqmail-remote produced no output.\n"),
        (
            EXIT0,
            b"r\0K192.0.2.1 accepted message.\nRemote host said: 250 ok 1700000000 qp 4242\n\0",
            b"K192.0.2.1 accepted message.\nRemote host said: 250 ok 1700000000 qp 4242\n",
        ),
        (
            EXIT0,
            b"h192.0.2.1 does not like recipient.\nRemote host said: 550 no such user\n\0"
            b"DGiving up on 192.0.2.1.\n\0",
            b"D192.0.2.1 does not like recipient.\nRemote host said: 550 no such user\n"
            b"Giving up on 192.0.2.1.\n",
        ),
        (
            EXIT0,
            b"s192.0.2.1 does not like recipient.\nRemote host said: 450 try later\n\0"
            b"DGiving up on 192.0.2.1.\n\0",
            b"Z192.0.2.1 does not like recipient.\nRemote host said: 450 try later\n"
            b"Giving up on 192.0.2.1.\n",
        ),
        (
            EXIT0,
            b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n\0",
            b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n",
        ),
        (
            EXIT0,
            b"r\0Z192.0.2.1 failed on DATA command.\nRemote host said: 451 later\n\0",
            b"Z192.0.2.1 failed on DATA command.\nRemote host said: 451 later\n",
        ),
    ],
)
def test_report_rules(wait_status: int, output: bytes, expected: bytes) -> None:
    assert rspawn_report(wait_status, output) == expected


class Rspawn:
    """qmail-rspawn as qmail-send sees it: commands on its stdin, results on its stdout."""

    def __init__(self, home: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "qmail-rspawn"), "--home", str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.fileno()
        assert self._read(1, 30) == bytes([120])  # the handshake: its slot limit
        self.buf = b""

    def _read(self, n: int, timeout: float) -> bytes:
        ready, _, _ = select.select([self.out], [], [], timeout)
        assert ready, "qmail-rspawn did not answer"
        return os.read(self.out, n)

    def command(self, slot: int, messid: str, sender: str, recipient: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(bytes([slot]) + f"{messid}\0{sender}\0{recipient}\0".encode())
        self.proc.stdin.flush()

    def results(self, count: int, timeout: float = 30) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            # a result is one slot byte (which may itself be NUL), its text, then NUL
            while len(self.buf) > 1 and b"\0" in self.buf[1:]:
                end = self.buf.index(b"\0", 1)
                found[self.buf[0]] = self.buf[1:end]
                self.buf = self.buf[end + 1 :]
            if len(found) >= count:
                break
            chunk = self._read(65536, max(0.1, deadline - time.monotonic()))
            assert chunk, "qmail-rspawn closed its output"
            self.buf += chunk
        return found

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            self.proc.stderr.close()


def queued(home: Path, message: bytes, rcpt: str) -> str:
    """Queue a message; returns its `S/N` name relative to queue/mess."""
    before = {p for p in (home / "queue" / "mess").rglob("*") if p.is_file()}
    result = queue_message(home, message, "a@example.test", [rcpt])
    assert result.ok, result.text
    (new,) = {p for p in (home / "queue" / "mess").rglob("*") if p.is_file()} - before
    return f"{new.parent.name}/{new.name}"


def test_rspawn_delivers_in_parallel_and_validates(qmail_home: Path) -> None:
    sink = SMTPSink()
    peer = ScriptedPeer(Script(rcpt=lambda a: b"550 nobody here"))
    try:
        (qmail_home / "control" / "smtproutes").write_text(
            f"sink.test:127.0.0.1:{sink.port}\nrefuse.test:127.0.0.1:{peer.port}\n"
        )
        # qmail-rspawn forgets remembered timeouts when it starts
        tcpto.TCPTO(qmail_home / "queue").record("192.0.2.1", True)
        one = queued(qmail_home, b"Subject: 1\n\nbody\n", "x@sink.test")
        two = queued(qmail_home, b"Subject: 2\n\nbody\n", "y@refuse.test")
        rs = Rspawn(qmail_home)
        try:
            assert tcpto.entries(qmail_home / "queue") == []
            rs.command(0, one, "a@example.test", "x@sink.test")
            rs.command(1, two, "a@example.test", "y@refuse.test")
            rs.command(2, "1/abc", "a@example.test", "x@sink.test")
            rs.command(3, one, "a@example.test", "nohost")
            found = rs.results(4)
        finally:
            assert rs.close() == 0
    finally:
        sink.stop()
        peer.stop()
    assert found[0].startswith(b"K127.0.0.1 accepted message.\nRemote host said: 250")
    assert found[1] == (
        b"D127.0.0.1 does not like recipient.\nRemote host said: 550 nobody here\n"
        b"Giving up on 127.0.0.1.\nTLS: not offered by the remote host; sent in clear text.\n"
    )
    assert found[2] == b"DInternal error: messid has nonnumerics. (#5.3.5)\n"
    assert found[3] == b"DSorry, address must include host name. (#5.1.3)\n"


def test_rspawn_workers_keep_their_connection_for_the_next_message(qmail_home: Path) -> None:
    peer = ScriptedPeer(Script())
    try:
        (qmail_home / "control" / "smtproutes").write_text(f":127.0.0.1:{peer.port}\n")
        one = queued(qmail_home, b"Subject: 1\n\nbody\n", "x@far.test")
        two = queued(qmail_home, b"Subject: 2\n\nbody\n", "y@far.test")
        rs = Rspawn(qmail_home)
        try:
            rs.command(0, one, "a@example.test", "x@far.test")
            first = rs.results(1)
            rs.command(0, two, "a@example.test", "y@far.test")
            second = rs.results(1)
        finally:
            # the spawner ends; its worker says QUIT on the kept connection before it exits
            assert rs.close() == 0
        deadline = time.monotonic() + 10
        while not peer.sessions[-1].commands[-1:] == [b"QUIT"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        peer.stop()
    assert first[0].startswith(b"K127.0.0.1 accepted message.")
    assert second[0].startswith(b"K127.0.0.1 accepted message.")
    (s,) = peer.sessions
    assert [c.split(b" ")[0].split(b":")[0] for c in s.commands] == [
        b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT",
    ]
