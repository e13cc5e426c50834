"""qmail-smtpd under the real ucspi-tcp tcpserver, driven by smtplib and swaks.

This execs a Python interpreter per connection (that is how tcpserver runs
programs); it checks compatibility with the UCSPI environment and tcprules,
not speed.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _smtp_util import Talk, queue_leftovers, queued
from pyqmail.control import write_control

BIN = Path(sys.executable).parent
TCPSERVER = Path("/usr/bin/tcpserver")
TCPRULES = Path("/usr/bin/tcprules")
SWAKS = Path("/usr/bin/swaks")

pytestmark = pytest.mark.skipif(
    not (TCPSERVER.exists() and TCPRULES.exists()),
    reason="needs ucspi-tcp's tcpserver and tcprules (Debian package ucspi-tcp)",
)

RULES = """\
127.0.0.1:allow,RELAYCLIENT=""
127.0.0.3:allow,QMAILQUEUE="{qq}"
127.0.0.4:allow,DATABYTES="50"
127.0.0.5:deny
:allow
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, home: Path, tmp: Path) -> None:
        qq = tmp / "qq71"
        qq.write_text("#!/bin/sh\ncat >/dev/null\nexit 71\n")
        qq.chmod(0o755)
        (tmp / "rules.txt").write_text(RULES.format(qq=qq))
        with open(tmp / "rules.txt", "rb") as f:
            subprocess.run(
                [str(TCPRULES), str(tmp / "rules.cdb"), str(tmp / "rules.tmp")],
                stdin=f,
                check=True,
                timeout=30,
            )
        self.port = free_port()
        self.log = tmp / "tcpserver.log"
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in ("QMAILQUEUE", "RELAYCLIENT")}
        env["QMAILHOME"] = str(home)
        self.proc = subprocess.Popen(
            [
                str(TCPSERVER),
                "-R",
                "-H",
                "-l0",
                "-v",
                "-x",
                str(tmp / "rules.cdb"),
                "127.0.0.1",
                str(self.port),
                str(BIN / "qmail-smtpd"),
                "--home",
                str(home),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=env,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tcpserver exited: {self.log.read_text()}")
            if "status: 0/" in self.log.read_text():
                return
            time.sleep(0.02)
        raise AssertionError("tcpserver did not start")

    def smtp(self, source: str = "127.0.0.1") -> smtplib.SMTP:
        s = smtplib.SMTP(timeout=20, source_address=(source, 0))
        s.connect("127.0.0.1", self.port)
        return s

    def talk(self, source: str = "127.0.0.1") -> Talk:
        sock = socket.create_connection(
            ("127.0.0.1", self.port), timeout=20, source_address=(source, 0)
        )
        return Talk(sock, 20)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def server(qmail_home: Path, tmp_path: Path) -> Iterator[Server]:
    s = Server(qmail_home, tmp_path)
    yield s
    s.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


MSG = b"From: a@example.org\r\nTo: u@example.test\r\nSubject: test\r\n\r\nhello there\r\n"


def test_smtplib_message_reaches_the_queue(server: Server, qmail_home: Path) -> None:
    with server.smtp(source="127.0.0.2") as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("size")
        refused = s.sendmail("a@example.org", ["u@example.test", "v@mx.example.test"], MSG)
        assert refused == {}
    [(sender, rcpts, mess)] = queued(qmail_home)
    assert sender == "a@example.org"
    assert rcpts == ["u@example.test", "v@mx.example.test"]
    lines = mess.split(b"\n")
    assert b"invoked from network" in lines[0]
    # -H: no remote host name, -R: no ident, -l0: local name "0"
    assert lines[1] == b"Received: from unknown (HELO client.test) (127.0.0.2)"
    assert lines[2].startswith(b"  by 0 with ESMTP; ")
    assert mess.endswith(b"\n\nhello there\n")


def test_relay_refused_for_strangers_allowed_by_rules(server: Server, qmail_home: Path) -> None:
    with server.smtp(source="127.0.0.2") as s:
        s.ehlo("stranger.test")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("a@example.org", ["victim@elsewhere.example"], MSG)
        code, text = e.value.recipients["victim@elsewhere.example"]
        assert code == 553 and b"allowed rcpthosts" in text
    assert queued(qmail_home) == []
    with server.smtp(source="127.0.0.1") as s:  # tcprules gives RELAYCLIENT=""
        s.ehlo("friend.test")
        assert s.sendmail("a@example.org", ["friend@elsewhere.example"], MSG) == {}
    assert [m[1] for m in queued(qmail_home)] == [["friend@elsewhere.example"]]


def test_denied_client_gets_no_session(server: Server) -> None:
    t = server.talk(source="127.0.0.5")
    try:
        assert t.at_eof()
    finally:
        t.close()


def test_badmailfrom_with_swaks(server: Server, qmail_home: Path) -> None:
    write_control(qmail_home, "badmailfrom", ["@bad.example"])
    proc = subprocess.run(
        [
            str(SWAKS),
            "--server",
            f"127.0.0.1:{server.port}",
            "--helo",
            "swaks.test",
            "--from",
            "spammer@bad.example",
            "--to",
            "u@example.test",
            "--local-interface",
            "127.0.0.2",
            "--timeout",
            "20",
        ],
        capture_output=True,
        timeout=60,
    )
    out = proc.stdout.decode()
    assert proc.returncode != 0
    assert "553 5.7.1 sorry, your envelope sender is in my badmailfrom list (#5.7.1)" in out
    assert queued(qmail_home) == []


def test_swaks_pipelining_delivers(server: Server, qmail_home: Path) -> None:
    proc = subprocess.run(
        [
            str(SWAKS),
            "--server",
            f"127.0.0.1:{server.port}",
            "--helo",
            "swaks.test",
            "--from",
            "a@example.org",
            "--to",
            "u@example.test",
            "--pipeline",
            "--body",
            "piped body",
            "--local-interface",
            "127.0.0.2",
            "--timeout",
            "20",
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    [(sender, rcpts, mess)] = queued(qmail_home)
    assert (sender, rcpts) == ("a@example.org", ["u@example.test"])
    assert b"piped body" in mess


def test_databytes_from_rules(server: Server, qmail_home: Path) -> None:
    with server.smtp(source="127.0.0.4") as s:
        s.ehlo("c.test")
        assert s.esmtp_features["size"] == "50"
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("a@example.org", ["u@example.test"], MSG)  # smtplib sends SIZE=
        assert e.value.smtp_code == 552
        s.rset()
        s.mail("a@example.org")
        s.rcpt("u@example.test")
        code, text = s.data(MSG)
        assert code == 552 and b"databytes" in text
    assert queued(qmail_home) == []


def test_qq_failure_from_qmailqueue_rule(server: Server, qmail_home: Path) -> None:
    with server.smtp(source="127.0.0.3") as s:
        s.helo("c.test")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@example.org", ["u@example.test"], MSG)
        assert e.value.smtp_code == 451
        assert e.value.smtp_error == b"mail server temporarily rejected message (#4.3.0)"
    assert queued(qmail_home) == []


def test_client_dropping_mid_data(server: Server, qmail_home: Path) -> None:
    t = server.talk(source="127.0.0.2")
    assert t.reply()[0] == 220
    assert t.cmd(b"HELO c.test")[0] == 250
    assert t.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@example.test>")[0] == 250
    assert t.cmd(b"DATA")[0] == 354
    t.send(b"Subject: cut short\r\n\r\n" + b"x" * 100_000)
    t.close()
    wait_until(lambda: "client closed the connection in DATA" in server.log.read_text())
    assert queued(qmail_home) == []
    assert queue_leftovers(qmail_home) == []


def test_client_that_never_speaks_times_out(server: Server, qmail_home: Path) -> None:
    write_control(qmail_home, "timeoutsmtpd", ["1"])
    t = server.talk(source="127.0.0.2")
    try:
        assert t.reply()[0] == 220
        start = time.monotonic()
        assert t.reply() == (451, ["timeout (#4.4.2)"])
        assert time.monotonic() - start < 10
        assert t.at_eof()
    finally:
        t.close()


def test_smuggling_attempt_gets_its_451_over_tcp(server: Server, qmail_home: Path) -> None:
    t = server.talk(source="127.0.0.2")
    try:
        assert t.reply()[0] == 220
        t.send(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
        assert [t.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        # the smuggled second message follows in the same write, and more keeps coming
        t.send(
            b"Subject: one\r\n\r\nbody\n.\r\nMAIL FROM:<ceo@example.test>\r\n"
            b"RCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n.\r\n" + b"junk\r\n" * 20000
        )
        assert t.reply() == (451, ["See https://cr.yp.to/docs/smtplf.html."])
    finally:
        t.close()
    wait_until(lambda: "bare LF or bare CR" in server.log.read_text())
    assert queued(qmail_home) == []
