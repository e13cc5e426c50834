"""qmail-smtpd's policy and I/O layer, in forked sessions over real sockets into a real queue."""

from __future__ import annotations

import itertools
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _smtp_util import ForkedSMTPD, queue_leftovers, queued
from pyqmail import smtpd as smtpd_module
from pyqmail.cdb import cdb_write
from pyqmail.control import ControlError, write_control
from pyqmail.smtpd import (
    LocalRecipients,
    Settings,
    protocol_word,
    received_line,
    sanitize_received,
)

BIN = Path(sys.executable).parent

Start = Callable[..., ForkedSMTPD]

ENV = {
    "PROTO": "TCP",
    "TCPREMOTEIP": "192.0.2.7",
    "TCPREMOTEHOST": "client.example.org",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALHOST": "mx.example.test",
}


@pytest.fixture
def smtpd(qmail_home: Path, tmp_path: Path) -> Iterator[Start]:
    started: list[ForkedSMTPD] = []

    def start(**env: str) -> ForkedSMTPD:
        s = ForkedSMTPD(qmail_home, {**ENV, **env}, tmp_path / "smtpd.log")
        started.append(s)
        code, text = s.talk.reply()
        assert code == 220, text
        return s

    yield start
    for s in started:
        s.stop()


def send_message(s: ForkedSMTPD, sender: bytes, rcpts: list[bytes], body: bytes) -> tuple[int, str]:
    t = s.talk
    assert t.cmd(b"MAIL FROM:<" + sender + b">")[0] == 250
    for r in rcpts:
        assert t.cmd(b"RCPT TO:<" + r + b">")[0] == 250
    assert t.cmd(b"DATA")[0] == 354
    t.send(body + b".\r\n")
    code, lines = t.reply()
    return code, lines[-1]


def qq_script(tmp_path: Path, code: int, name: str = "qq") -> Path:
    script = tmp_path / name
    script.write_text(
        f"#!/bin/sh\ncat > {tmp_path}/{name}.msg\ncat 0<&1 > {tmp_path}/{name}.env\nexit {code}\n"
    )
    script.chmod(0o755)
    return script


# -- a normal session ----------------------------------------------------------------------


def test_message_is_queued_with_received_line(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd()
    assert s.talk.cmd(b"HELO laptop") == (250, "mx.example.test")
    code, text = send_message(
        s,
        b"alice@example.org",
        [b"bob@example.test", b"Carol@mx.example.test"],
        b"Subject: hi\r\n\r\n..dotted\r\nbody\r\n",
    )
    assert code == 250 and text.startswith("ok ") and " qp " in text
    assert s.talk.cmd(b"QUIT") == (221, "mx.example.test")
    assert s.wait() == 0
    [(sender, rcpts, mess)] = queued(qmail_home)
    assert sender == "alice@example.org"
    assert rcpts == ["bob@example.test", "Carol@mx.example.test"]
    lines = mess.split(b"\n")
    assert lines[0].startswith(b"Received: (qmail ")
    assert b" invoked from network); " in lines[0]
    assert lines[1] == (b"Received: from client.example.org (HELO laptop) (192.0.2.7)")
    assert lines[2].startswith(b"  by mx.example.test with SMTP; ")
    assert lines[2].endswith(b" -0000")
    assert mess.endswith(b"Subject: hi\n\n.dotted\nbody\n")
    log = s.log.read_text()
    assert "message accepted qp" in log
    # the message number qmail-send will log as "new msg N", for matching the two logs
    [number] = os.listdir(qmail_home / "queue" / "todo")
    assert f"from <alice@example.org> rcpts 2 msg {number}\n" in log
    assert "end: quit" in log


def test_ehlo_session_uses_esmtp_and_enhanced_codes(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd(TCPREMOTEINFO="ident")
    s.talk.send(b"EHLO client.example.org\r\n")
    code, lines = s.talk.reply()
    assert code == 250 and "SIZE 0" in lines and "PIPELINING" in lines
    code, text = send_message(s, b"", [b"postmaster"], b"x\r\n")
    assert code == 250 and text.startswith("2.6.0 ok ")
    [(sender, rcpts, mess)] = queued(qmail_home)
    assert sender == "" and rcpts == ["postmaster"]
    # HELO equal to the remote host name is not repeated; ident shows as info@ip
    assert (
        b"Received: from client.example.org (ident@192.0.2.7)\n  by mx.example.test with ESMTP;"
        in mess
    )


def test_pipelined_batch_over_the_socket(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd()
    s.talk.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n"
        b"RCPT TO:<v@example.test>\r\nDATA\r\n"
    )
    codes = [s.talk.reply()[0] for _ in range(5)]
    assert codes == [250, 250, 250, 250, 354]
    s.talk.send(b"one\r\n.\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<w@example.test>\r\nDATA\r\n")
    assert [s.talk.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    s.talk.send(b"two\r\n.\r\nQUIT\r\n")
    assert [s.talk.reply()[0] for _ in range(2)] == [250, 221]
    assert s.wait() == 0
    msgs = queued(qmail_home)
    assert sorted((m[0], m[1]) for m in msgs) == [
        ("a@example.org", ["u@example.test", "v@example.test"]),
        ("b@example.org", ["w@example.test"]),
    ]
    bodies = {m[0]: m[2] for m in msgs}
    assert bodies["a@example.org"].endswith(b"one\n")
    assert bodies["b@example.org"].endswith(b"two\n")


def test_smtpgreeting(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "smtpgreeting", ["mail.example.test welcomes you"])
    s = ForkedSMTPD(qmail_home, ENV, qmail_home / "log.txt")
    try:
        assert s.talk.reply() == (220, ["mail.example.test welcomes you ESMTP"])
        assert s.talk.cmd(b"QUIT") == (221, "mail.example.test welcomes you")
    finally:
        s.stop()


def test_missing_me_and_greeting_refuses_to_run(qmail_home: Path, tmp_path: Path) -> None:
    (qmail_home / "control" / "me").unlink()
    s = ForkedSMTPD(qmail_home, ENV, tmp_path / "log")
    try:
        assert s.talk.reply() == (421, ["unable to read controls (#4.3.0)"])
        assert s.wait() == 1
        assert "unable to read controls" in (tmp_path / "log").read_text()
    finally:
        s.stop()


def test_settings_are_reread_while_control_files_are_fresh(qmail_home: Path) -> None:
    # a file written just now may be written again within the same timestamp tick,
    # so it is read at every connection until it has settled
    write_control(qmail_home, "databytes", ["100"])
    first = Settings.load(qmail_home, {})
    write_control(qmail_home, "databytes", ["200"])  # same size, probably the same tick
    second = Settings.load(qmail_home, {})
    assert (first.databytes, second.databytes) == (100, 200)
    assert second is not Settings.load(qmail_home, {})


_DIR_TICKS = itertools.count(1)


def _mark_changed(directory: Path) -> None:
    """Give the directory an mtime of its own: with no settle time, two changes within
    one timestamp tick would otherwise look alike (the settle time exists for that)."""
    ns = (1_000_000_000 + next(_DIR_TICKS)) * 1_000_000_000
    os.utime(directory, ns=(ns, ns))


def _settled_write(home: Path, name: str, lines: list[str]) -> None:
    write_control(home, name, lines)
    _mark_changed(home / "control")


def test_settled_settings_are_kept_until_a_file_changes(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtpd_module, "_SETTLE_SECONDS", 0.0)
    _settled_write(qmail_home, "databytes", ["100"])
    first = Settings.load(qmail_home, {})
    assert Settings.load(qmail_home, {}) is first  # nothing changed: no file read again
    _settled_write(qmail_home, "badmailfrom", ["spam@example.org"])
    assert Settings.load(qmail_home, {}).badmailfrom == {"spam@example.org"}
    (qmail_home / "control" / "badmailfrom").unlink()
    _mark_changed(qmail_home / "control")
    assert Settings.load(qmail_home, {}).badmailfrom == frozenset()
    _settled_write(qmail_home, "databytes", ["20000"])
    assert Settings.load(qmail_home, {}).databytes == 20000
    # the environment's overrides apply per connection and leave the files' values alone
    assert Settings.load(qmail_home, {"DATABYTES": "10"}).databytes == 10
    assert Settings.load(qmail_home, {"REJECTUNKNOWN": "1"}).reject_unknown is True
    assert Settings.load(qmail_home, {}).databytes == 20000
    assert Settings.load(qmail_home, {}).reject_unknown is False
    write_control(qmail_home, "databytes", ["lots"])
    with pytest.raises(ControlError):
        Settings.load(qmail_home, {})


def test_absent_settings_files_are_not_looked_at_until_the_directory_changes(
    qmail_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtpd_module, "_SETTLE_SECONDS", 0.0)
    control = qmail_home / "control"
    _mark_changed(control)
    Settings.load(qmail_home, {})
    present = [n for n in smtpd_module._SETTINGS_FILES if (control / n).exists()]
    looked_at: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        looked_at.append(os.fspath(path))
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", counting_stat)
    settings = Settings.load(qmail_home, {})
    monkeypatch.setattr(os, "stat", real_stat)
    # the directory itself and the files that exist; none of the absent ones
    assert sorted(looked_at) == sorted([str(control)] + [f"{control}/{n}" for n in present])
    assert settings.maxrcpt == 100
    # a new file is a new directory entry: seen at the next connection
    _settled_write(qmail_home, "maxrcpt", ["7"])
    assert Settings.load(qmail_home, {}).maxrcpt == 7
    (control / "maxrcpt").unlink()
    # a dangling symlink is not absent: its target can appear without the directory changing
    target = tmp_path / "maxrcpt-elsewhere"
    (control / "maxrcpt").symlink_to(target)
    _mark_changed(control)
    assert Settings.load(qmail_home, {}).maxrcpt == 100
    assert Settings.load(qmail_home, {}).maxrcpt == 100
    target.write_text("3\n")
    assert Settings.load(qmail_home, {}).maxrcpt == 3


def test_broken_control_file_is_421(qmail_home: Path, tmp_path: Path) -> None:
    write_control(qmail_home, "databytes", ["lots"])
    s = ForkedSMTPD(qmail_home, ENV, tmp_path / "log")
    try:
        assert s.talk.reply() == (421, ["unable to read controls (#4.3.0)"])
        assert s.wait() == 1
    finally:
        s.stop()


# -- relay control ---------------------------------------------------------------------------


def test_relay_control(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "rcpthosts", ["example.test", ".sub.example.test"])
    cdb_write(qmail_home / "control" / "morercpthosts.cdb", [(b"more.example", b"")])
    s = smtpd()
    t = s.talk
    t.cmd(b"MAIL FROM:<a@example.org>")
    refused = (553, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
    assert t.cmd(b"RCPT TO:<u@EXAMPLE.test>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@deep.sub.example.test>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@sub.example.test>") == refused  # only subdomains of it
    assert t.cmd(b"RCPT TO:<u@more.example>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@elsewhere.example>") == refused
    assert t.cmd(b"RCPT TO:<u@[192.0.2.99]>") == refused
    assert t.cmd(b"RCPT TO:<nodomain>")[0] == 250
    # address tricks are judged by the last @, the one qmail routes on
    assert t.cmd(b"RCPT TO:<@example.test:victim@elsewhere.example>") == refused
    assert t.cmd(b"RCPT TO:<victim@elsewhere.example.>") == refused
    assert t.cmd(b'RCPT TO:<"victim@elsewhere.example"@example.test>')[0] == 250
    assert t.cmd(b"RCPT TO:<victim%elsewhere.example@example.test>")[0] == 250
    assert t.cmd(b"RCPT TO:<victim@elsewhere.example@example.test>")[0] == 250
    assert "refused: 553" in s.log.read_text()


def test_missing_rcpthosts_means_no_relaying(smtpd: Start, qmail_home: Path) -> None:
    (qmail_home / "control" / "rcpthosts").unlink()
    s = smtpd()
    s.talk.cmd(b"MAIL FROM:<a@example.org>")
    assert s.talk.cmd(b"RCPT TO:<u@example.test>")[0] == 553
    assert s.talk.cmd(b"RCPT TO:<u@anywhere.example>")[0] == 553


def test_relayclient_appends_its_value(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd(RELAYCLIENT="@fixme")
    code, _ = send_message(s, b"a@example.org", [b"u@elsewhere.example"], b"x\r\n")
    assert code == 250
    s2 = smtpd(RELAYCLIENT="")
    assert send_message(s2, b"a@example.org", [b"v@elsewhere.example"], b"y\r\n")[0] == 250
    rcpts = [m[1] for m in queued(qmail_home)]
    assert rcpts == [["u@elsewhere.example@fixme"], ["v@elsewhere.example"]]


def test_badmailfrom(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "badmailfrom", ["spammer@bad.example", "@worse.example"])
    s = smtpd(RELAYCLIENT="")
    t = s.talk
    bmf = (553, "sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
    assert t.cmd(b"MAIL FROM:<Spammer@BAD.example>")[0] == 250  # MAIL itself passes
    assert t.cmd(b"RCPT TO:<u@example.test>") == bmf  # even for relay clients
    assert t.cmd(b"MAIL FROM:<anyone@worse.example>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@example.test>") == bmf
    assert t.cmd(b"MAIL FROM:<anyone@sub.worse.example>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@example.test>")[0] == 250
    assert t.cmd(b"MAIL FROM:<>")[0] == 250
    assert t.cmd(b"RCPT TO:<u@example.test>")[0] == 250


def test_localiphost_rewrites_our_literals(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "localiphost", ["example.test"])
    s = smtpd()
    assert send_message(s, b"a@example.org", [b"u@[127.0.0.1]"], b"x\r\n")[0] == 250
    assert s.talk.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
    assert s.talk.cmd(b"RCPT TO:<u@[192.0.2.250]>")[0] == 553
    assert queued(qmail_home)[0][1] == ["u@example.test"]


# -- DATA outcomes ---------------------------------------------------------------------------


def test_databytes_control_and_env(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "databytes", ["100"])
    s = smtpd()
    s.talk.send(b"EHLO c\r\n")
    assert "SIZE 100" in s.talk.reply()[1]
    code, text = send_message(s, b"a@example.org", [b"u@example.test"], b"z" * 200 + b"\r\n")
    assert (code, text) == (
        552,
        "5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)",
    )
    assert s.talk.cmd(b"MAIL FROM:<a@example.org> SIZE=101")[0] == 552
    assert send_message(s, b"a@example.org", [b"u@example.test"], b"small\r\n")[0] == 250
    s2 = smtpd(DATABYTES="10")
    assert send_message(s2, b"a@example.org", [b"u@example.test"], b"0123456789a\r\n")[0] == 552
    assert len(queued(qmail_home)) == 1
    assert "message refused: 552" in s.log.read_text()


def test_bare_lf_in_data_disconnects_and_queues_nothing(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd()
    t = s.talk
    t.cmd(b"MAIL FROM:<a@example.org>")
    t.cmd(b"RCPT TO:<u@example.test>")
    t.cmd(b"DATA")
    t.send(
        b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.test>\r\n"
    )
    assert t.reply() == (451, ["See https://cr.yp.to/docs/smtplf.html."])
    assert t.at_eof()
    t.close()
    assert s.wait() == 1
    assert queued(qmail_home) == []
    assert queue_leftovers(qmail_home) == []


def test_client_dropping_mid_data_queues_nothing(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd()
    t = s.talk
    t.cmd(b"MAIL FROM:<a@example.org>")
    t.cmd(b"RCPT TO:<u@example.test>")
    t.cmd(b"DATA")
    t.send(b"Subject: partial\r\n\r\n" + b"line\r\n" * 5000)
    t.close()
    assert s.wait() == 1
    assert queued(qmail_home) == []
    assert queue_leftovers(qmail_home) == []
    assert "in DATA" in s.log.read_text()


def test_timeout_when_client_never_speaks(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "timeoutsmtpd", ["1"])
    s = smtpd()
    start = time.monotonic()
    assert s.talk.reply() == (451, ["timeout (#4.4.2)"])
    assert 0.8 < time.monotonic() - start < 5
    assert s.talk.at_eof()
    assert s.wait() == 1


def test_client_that_never_reads_times_out(smtpd: Start, qmail_home: Path) -> None:
    # pipelined EHLOs whose replies the client never reads: qmail-smtpd's writes
    # fill the socket and must give up after timeoutsmtpd instead of hanging
    write_control(qmail_home, "timeoutsmtpd", ["1"])
    s = smtpd()
    sock = s.talk.sock
    sock.settimeout(5)
    try:
        sock.sendall(b"EHLO c\r\n" * 20000)
    except TimeoutError:
        pass  # qmail-smtpd stopped reading: the point of the test
    assert s.wait(timeout=15) == 1
    assert "end: write timeout" in s.log.read_text()


def test_timeout_on_pipes(qmail_home: Path) -> None:
    # without a socket (an inetd-like wrapper), the timeout is kept by poll()
    write_control(qmail_home, "timeoutsmtpd", ["1"])
    proc = subprocess.Popen(
        [str(BIN / "qmail-smtpd"), "--home", str(qmail_home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV},
    )
    assert proc.stdout is not None
    try:
        start = time.monotonic()
        out = proc.stdout.read()  # stdin stays open and silent: only the timeout ends this
        took = time.monotonic() - start
        code = proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert code == 1
    assert out.split(b"\r\n")[1] == b"451 timeout (#4.4.2)"
    assert 0.8 < took < 15


def test_timeout_in_data_queues_nothing(smtpd: Start, qmail_home: Path) -> None:
    write_control(qmail_home, "timeoutsmtpd", ["1"])
    s = smtpd()
    t = s.talk
    t.cmd(b"MAIL FROM:<a@example.org>")
    t.cmd(b"RCPT TO:<u@example.test>")
    t.cmd(b"DATA")
    t.send(b"half a message\r\n")
    assert t.reply()[0] == 451
    assert s.wait() == 1
    assert queue_leftovers(qmail_home) == []


def test_hop_limit_over_the_wire(smtpd: Start, qmail_home: Path) -> None:
    s = smtpd()
    body = b"Delivered-To: x\r\n" * 100 + b"\r\nloop\r\n"
    code, text = send_message(s, b"a@example.org", [b"u@example.test"], body)
    assert (code, text) == (554, "too many hops, this message is looping (#5.4.6)")
    assert queue_leftovers(qmail_home) == []


@pytest.mark.parametrize(
    "exit_code,reply",
    [
        (11, (554, "envelope address too long for qq (#5.1.3)")),
        (31, (554, "mail server permanently rejected message (#5.3.0)")),
        (53, (451, "qq write error or disk full (#4.3.0)")),
        (71, (451, "mail server temporarily rejected message (#4.3.0)")),
        (81, (451, "qq internal bug (#4.3.0)")),
        (25, (554, "qq permanent problem (#5.3.0)")),
        (99, (451, "qq temporary problem (#4.3.0)")),
    ],
)
def test_qmailqueue_exit_codes(
    smtpd: Start, tmp_path: Path, exit_code: int, reply: tuple[int, str]
) -> None:
    script = qq_script(tmp_path, exit_code)
    s = smtpd(QMAILQUEUE=str(script))
    assert send_message(s, b"a@example.org", [b"u@example.test"], b"hello\r\n") == reply
    # the program saw the whole message (Received line first) and the envelope
    msg = (tmp_path / "qq.msg").read_bytes()
    assert msg.startswith(b"Received: from client.example.org") and msg.endswith(b"\nhello\n")
    assert (tmp_path / "qq.env").read_bytes() == b"Fa@example.org\0Tu@example.test\0\0"
    # the session goes on after a refusal
    assert s.talk.cmd(b"NOOP")[0] == 250


def test_qmailqueue_success_and_unexecutable(smtpd: Start, tmp_path: Path) -> None:
    ok = qq_script(tmp_path, 0)
    s = smtpd(QMAILQUEUE=str(ok))
    code, text = send_message(s, b"a@example.org", [b"u@example.test"], b"x\r\n")
    assert code == 250
    # a separate qmail-queue program does not say which number it gave the message
    [accepted] = [line for line in s.log.read_text().splitlines() if "accepted" in line]
    assert accepted.endswith(" rcpts 1")
    s2 = smtpd(QMAILQUEUE=str(tmp_path / "missing"))
    assert send_message(s2, b"a@example.org", [b"u@example.test"], b"x\r\n") == (
        451,
        "unable to exec qq (#4.3.0)",
    )


# -- rejecting unknown local recipients --------------------------------------------------------


def make_users_cdb(home: Path, homedir: Path) -> None:
    rec = b"joe\0" + str(os.getuid()).encode() + b"\0" + str(os.getgid()).encode()
    rec += b"\0" + str(homedir).encode() + b"\0"
    cdb_write(
        home / "users" / "cdb",
        [
            (b"", b"-"),
            (b"!joe\0", rec + b"\0"),
            (b"!lists-", rec + b"-\0list-"),
        ],
    )


def test_local_recipient_lookup(qmail_home: Path, tmp_path: Path) -> None:
    joe = tmp_path / "joe"
    joe.mkdir()
    (joe / ".qmail-list-a").write_text("./Maildir/\n")
    make_users_cdb(qmail_home, joe)
    write_control(qmail_home, "virtualdomains", ["virt.example:virt", "remote.example:"])
    (qmail_home / "alias" / ".qmail-virt-sales").write_text("./Maildir/\n")
    lr = LocalRecipients(qmail_home)
    assert lr.exists("joe@example.test")  # plain user: no .qmail needed
    assert lr.exists("JOE@mx.example.test")
    assert lr.exists("lists-a@example.test")  # wildcard + .qmail-list-a
    assert not lr.exists("lists-b@example.test")
    assert lr.exists("postmaster@example.test")  # alias/.qmail-postmaster
    assert lr.exists("postmaster")  # no domain: envnoathost = me, a local domain
    assert not lr.exists("nobody@example.test")
    assert lr.exists("sales@virt.example")
    assert not lr.exists("nobody@virt.example")
    assert lr.exists("anyone@remote.example")  # remote: relay policy decides
    assert lr.exists("anyone@elsewhere.example")
    (qmail_home / "alias" / ".qmail-default").write_text("./Maildir/\n")
    assert LocalRecipients(qmail_home).exists("nobody@example.test")


def test_reject_unknown_switch(smtpd: Start, qmail_home: Path) -> None:
    no_mailbox = (550, "sorry, no mailbox here by that name (#5.1.1)")
    s = smtpd()
    s.talk.cmd(b"MAIL FROM:<a@example.org>")
    assert s.talk.cmd(b"RCPT TO:<nobody@example.test>")[0] == 250  # off by default
    s2 = smtpd(REJECTUNKNOWN="1")
    s2.talk.cmd(b"MAIL FROM:<a@example.org>")
    assert s2.talk.cmd(b"RCPT TO:<nobody@example.test>") == no_mailbox
    assert s2.talk.cmd(b"RCPT TO:<postmaster@example.test>")[0] == 250
    write_control(qmail_home, "rejectunknownrcpt", ["1"])
    s3 = smtpd()
    s3.talk.cmd(b"MAIL FROM:<a@example.org>")
    assert s3.talk.cmd(b"RCPT TO:<nobody@example.test>") == no_mailbox
    s4 = smtpd(REJECTUNKNOWN="0")  # tcprules can turn it off per client
    s4.talk.cmd(b"MAIL FROM:<a@example.org>")
    assert s4.talk.cmd(b"RCPT TO:<nobody@example.test>")[0] == 250


# -- pieces ------------------------------------------------------------------------------------


def test_received_line_format() -> None:
    env = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "192.0.2.2"}
    line = received_line(env, "evil\r\nX-Injected: yes", "SMTP", 0)
    assert line == (
        b"Received: from unknown (HELO evil??X-Injected:?yes) (192.0.2.1)\n"
        b"  by 192.0.2.2 with SMTP; 1 Jan 1970 00:00:00 -0000\n"
    )
    assert received_line({}, "", "SMTP", 0).startswith(
        b"Received: from unknown (HELO ) (unknown)\n  by unknown with SMTP;"
    )
    assert sanitize_received("[192.0.2.1] a_b\u00e9") == "[192.0.2.1]?a?b?"
    assert protocol_word(False, True, True, True) == "SMTP"
    assert protocol_word(True, False, False, False) == "ESMTP"
    assert protocol_word(True, True, True, False) == "ESMTPSA"
    assert protocol_word(True, True, False, True) == "UTF8SMTPS"


def test_console_script_on_stdin_stdout(qmail_home: Path) -> None:
    session = b"HELO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
    proc = subprocess.run(
        [str(BIN / "qmail-smtpd"), "--home", str(qmail_home)],
        input=session,
        capture_output=True,
        timeout=30,
        env={**os.environ, **ENV},
    )
    assert proc.returncode == 0, proc.stderr
    codes = [int(line[:3]) for line in proc.stdout.split(b"\r\n") if line]
    assert codes == [220, 250, 250, 250, 354, 250, 221]
    assert queued(qmail_home)[0][2].endswith(b"\nhi\n")
    bad = subprocess.run([str(BIN / "qmail-smtpd"), "--bogus"], capture_output=True, timeout=30)
    assert bad.returncode == 100


def test_handle_connection_under_the_warm_tcpserver(qmail_home: Path, tmp_path: Path) -> None:
    from pyqmail import smtpd, tcpserver

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log = tmp_path / "server.log"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the server child
        code = 111
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 2)
            code = tcpserver.serve(
                [("127.0.0.1", port)],
                lambda sock_fd, env: smtpd.handle_connection(qmail_home, sock_fd, env),
                limit=5,
            )
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with conn:
            conn.ehlo("warm.test")
            assert (
                conn.sendmail("a@example.org", ["u@example.test"], b"Subject: warm\r\n\r\nok\r\n")
                == {}
            )
        [(sender, rcpts, mess)] = queued(qmail_home)
        assert (sender, rcpts) == ("a@example.org", ["u@example.test"])
        assert b"(HELO warm.test) (127.0.0.1)\n  by 127.0.0.1 with ESMTP;" in mess
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
