"""The SMTP front door of a running MTA, end to end to the Maildir, with real clients."""

from __future__ import annotations

import mailbox
import os
import shutil
import smtplib
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from _mta import MTA, add_user, bin_path, free_port, maildir_count, queue_empty, wait_for
from pyqmail.tcprules import compile_rules

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def need(tool: str) -> None:
    if not Path(tool).exists() and shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package: see README)")


@pytest.fixture
def mta(qmail_home: Path) -> MTA:
    with MTA(qmail_home) as running:
        yield running


def test_smtplib_to_maildir(qmail_home: Path, mta: MTA) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
        code, text = s.ehlo("client.test")
        assert code == 250 and b"PIPELINING" in text and b"8BITMIME" in text
        s.sendmail(
            "joe@far.test",
            ["bob@example.test"],
            b"From: joe@far.test\r\nSubject: over smtp\r\n\r\nline one\r\n.dot line\r\n",
        )
    wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
    (m,) = list(mailbox.Maildir(bob / "Maildir", create=False))
    assert m["Subject"] == "over smtp"
    assert m["Return-Path"] == "<joe@far.test>"
    received = m.get_all("Received")
    assert received[0].startswith("(qmail ")  # qmail-queue's own line comes first
    assert "by mx.example.test with ESMTP" in received[1]
    assert m.get_payload() == "line one\n.dot line\n"
    # the SMTP log names the message by the number qmail-send's log uses for it
    smtpd_log = qmail_home / "log" / "smtpd" / "current"

    def accepted_lines() -> list[str]:
        return [line for line in smtpd_log.read_text().splitlines() if "message accepted" in line]

    wait_for(lambda: bool(accepted_lines()), what="the SMTP log line")
    [accepted] = accepted_lines()
    number = accepted.rsplit(" msg ", 1)[1]
    assert number.isdigit()
    wait_for(lambda: f"info msg {number}: bytes " in mta.log(), what="qmail-send's log line")
    assert f"new msg {number}\n" in mta.log()


def test_swaks_to_maildir_and_relay_refused_for_strangers(qmail_home: Path, mta: MTA) -> None:
    need("swaks")
    bob = add_user(qmail_home, "bob@example.test")
    ok = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{mta.smtp_port}",
            "--to",
            "bob@example.test",
            "--from",
            "joe@far.test",
            "--header",
            "Subject: via swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout
    wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
    # 127.0.0.2 is not this machine's relay address in tcp.smtp: no relaying for it
    relay = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{mta.smtp_port}",
            "--local-interface",
            "127.0.0.2",
            "--to",
            "x@elsewhere.test",
            "--from",
            "joe@far.test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert relay.returncode != 0
    assert "<** 553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts" in relay.stdout


def test_relay_allowed_from_this_machine_by_rules(qmail_home: Path, mta: MTA) -> None:
    with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("joe@example.test")
        code, _ = s.rcpt("someone@elsewhere.test")
        assert code == 250
        s.rset()


def test_smtp_source_1000_messages_20_sessions(qmail_home: Path, mta: MTA) -> None:
    need(SMTP_SOURCE)
    bob = add_user(qmail_home, "bob@example.test")
    r = subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            "20",
            "-m",
            "1000",
            "-l",
            "5000",
            "-f",
            "joe@far.test",
            "-t",
            "bob@example.test",
            f"127.0.0.1:{mta.smtp_port}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_count(bob / "Maildir") >= 1000, timeout=600, what="1000 deliveries")
    wait_for(lambda: queue_empty(qmail_home), timeout=60, what="queue to empty")
    time.sleep(0.5)
    box = mailbox.Maildir(bob / "Maildir", create=False)
    ids = Counter()
    for m in box:
        # smtp-source numbers each message it sends in its Message-Id
        ids[m["Message-Id"]] += 1
    assert len(box) == 1000
    assert len(ids) == 1000 and max(ids.values()) == 1, "a message was delivered twice"


def test_flood_beyond_concurrency_limit(qmail_home: Path) -> None:
    (qmail_home / "control" / "concurrencyincoming").write_text("3\n")
    with MTA(qmail_home) as mta:
        held = []
        try:
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", mta.smtp_port), timeout=10)
                assert s.recv(512).startswith(b"220 ")
                held.append(s)
            extra = socket.create_connection(("127.0.0.1", mta.smtp_port), timeout=10)
            extra.settimeout(1.0)
            with pytest.raises(TimeoutError):
                extra.recv(512)  # waits in the backlog: no greeting while 3 are served
            held.pop().close()
            extra.settimeout(10)
            assert extra.recv(512).startswith(b"220 ")
            extra.close()
        finally:
            for s in held:
                s.close()


def _smtpd_pid(s: smtplib.SMTP) -> int:
    """The serving qmail-smtpd's pid, from the qp in its 250 reply (qmail-queue runs in it)."""
    code, text = s.data(b"Subject: probe\r\n\r\nprobe\r\n")
    assert code == 250, text
    return int(text.split()[-1])


def test_relay_rights_never_pass_to_the_next_client_of_a_worker(qmail_home: Path) -> None:
    # one connection at a time: both clients are served by the same long-lived qmail-smtpd
    (qmail_home / "control" / "concurrencyincoming").write_text("1\n")
    add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home) as mta:
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
            s.mail("joe@far.test")
            assert s.rcpt("x@elsewhere.test")[0] == 250  # tcp.smtp: RELAYCLIENT for us
            first = _smtpd_pid(s)
        with smtplib.SMTP(
            "127.0.0.1", mta.smtp_port, timeout=30, source_address=("127.0.0.2", 0)
        ) as s:
            s.mail("joe@far.test")
            assert s.rcpt("x@elsewhere.test")[0] == 553
            assert s.rcpt("bob@example.test")[0] == 250
            second = _smtpd_pid(s)
        assert second == first  # the same process did serve both


def _send_from(mta: MTA, source: str, subject: str) -> tuple[int, bytes]:
    """One message to bob from the client address `source`; the reply to its data."""
    with smtplib.SMTP(
        "127.0.0.1", mta.smtp_port, timeout=30, source_address=(source, 0)
    ) as s:
        s.mail("joe@far.test")
        s.rcpt("bob@example.test")
        return s.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_rules_qmailqueue_reaches_the_filter_with_the_connection_env_and_stops_there(
    qmail_home: Path, tmp_path: Path
) -> None:
    # a $QMAILQUEUE filter from tcp.smtp gets the connection's variables and the MTA's
    # own environment (PATH); the next client of the same worker gets neither
    seen = tmp_path / "seen-env"
    filt = tmp_path / "qq-filter"
    filt.write_text(f"#!/bin/sh\nenv > {seen}\ncat >/dev/null\nexit 71\n")
    filt.chmod(0o755)
    rules = (
        f'127.0.0.3:allow,QMAILQUEUE="{filt}",MARK="three"\n'
        '127.0.0.1:allow,RELAYCLIENT=""\n'
        ":allow\n"
    )
    compile_rules(
        rules.encode(),
        qmail_home / "control" / "tcp.smtp.cdb",
        qmail_home / "control" / "tcp.smtp.tmp",
    )
    (qmail_home / "control" / "concurrencyincoming").write_text("1\n")
    bob = add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home, env={"MTA_OWN": "kept"}) as mta:
        code, text = _send_from(mta, "127.0.0.3", "filtered")
        assert code == 451, text  # the filter's exit 71
        env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
        assert env["TCPREMOTEIP"] == "127.0.0.3"
        assert env["MARK"] == "three"
        assert env["MTA_OWN"] == "kept"
        assert "RELAYCLIENT" not in env
        seen.unlink()
        code, text = _send_from(mta, "127.0.0.2", "plain")
        assert code == 250, text
        assert not seen.exists()
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
        got = mailbox.Maildir(bob / "Maildir", create=False)
        assert [m["Subject"] for m in got] == ["plain"]


def test_smtpdmaxuse_zero_forks_per_connection(qmail_home: Path) -> None:
    (qmail_home / "control" / "smtpdmaxuse").write_text("0\n")
    bob = add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home) as mta:
        pids = set()
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
                s.mail("joe@far.test")
                s.rcpt("bob@example.test")
                pids.add(_smtpd_pid(s))
        assert len(pids) == 3
        wait_for(lambda: maildir_count(bob / "Maildir") == 3, what="deliveries")


@pytest.mark.parametrize(
    ("control", "value"),
    [("smtpdmaxuse", "many"), ("smtpdquickworkers", "-3"), ("schedbatch", "yes")],
)
def test_bad_pool_control_stops_the_start_with_a_clear_error(
    qmail_home: Path, control: str, value: str
) -> None:
    (qmail_home / "control" / "smtplisten").write_text(f"127.0.0.1:{free_port()}\n")
    (qmail_home / "control" / control).write_text(f"{value}\n")
    r = subprocess.run(
        [bin_path("pyqmail"), "run", "--home", str(qmail_home)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 111
    assert f"control/{control} line 1: not a number: '{value}'" in r.stderr


def test_one_quick_worker_still_serves_a_client_next_to_a_silent_one(qmail_home: Path) -> None:
    # smtpdquickworkers 1: one worker serves quick clients; a client that stays silent holds
    # its worker, and the next client gets a new one once that session is no longer young
    (qmail_home / "control" / "smtpdquickworkers").write_text("1\n")
    bob = add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home) as mta:
        silent = socket.create_connection(("127.0.0.1", mta.smtp_port), timeout=10)
        try:
            assert silent.recv(512).startswith(b"220 ")
            start = time.monotonic()
            with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
                s.mail("joe@far.test")
                s.rcpt("bob@example.test")
                served_by = _smtpd_pid(s)
            assert time.monotonic() - start < 10
        finally:
            silent.close()
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
        assert mta.proc is not None
        assert served_by in _descendants(mta.proc.pid)


@pytest.mark.parametrize(("setting", "policy"), [(None, "SCHED_BATCH"), ("0", "SCHED_OTHER")])
def test_every_process_runs_under_the_batch_policy_unless_turned_off(
    qmail_home: Path, setting: str | None, policy: str
) -> None:
    expected = getattr(os, policy)
    ours = os.sched_getscheduler(0)
    if ours != os.SCHED_OTHER:
        expected = ours  # a supervisor started under another policy keeps it, switch or not
    if setting is not None:
        (qmail_home / "control" / "schedbatch").write_text(f"{setting}\n")
    bob = add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home) as mta:
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
            s.mail("joe@far.test")
            s.rcpt("bob@example.test")
            served_by = _smtpd_pid(s)
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
        assert mta.proc is not None
        family = _descendants(mta.proc.pid)
        names = {_comm(pid) for pid in family}
        assert {"qmail-send", "qmail-lspawn", "qmail-clean", "qmail-local"} <= names
        assert served_by in family
        policies = {_comm(pid): os.sched_getscheduler(pid) for pid in family + [mta.proc.pid]}
        assert set(policies.values()) == {expected}, policies


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_every_process_shows_the_qmail_program_it_is(qmail_home: Path) -> None:
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc")
    bob = add_user(qmail_home, "bob@example.test")
    with MTA(qmail_home) as mta:
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as s:
            s.sendmail("joe@far.test", ["bob@example.test"], b"Subject: names\r\n\r\nhi\r\n")
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery")
        assert mta.proc is not None
        want = {
            "qmail-send", "qmail-lspawn", "qmail-rspawn", "qmail-clean", "multilog send",
            "multilog smtpd", "tcpserver smtpd",
            "qmail-smtpd",  # the pool worker that served us, now waiting for the next client
            "qmail-local",  # the delivery worker, likewise
        }
        wait_for(
            lambda: want <= {_comm(p) for p in _descendants(mta.proc.pid)},  # type: ignore[union-attr]
            what=f"process names {sorted(want)}",
        )
