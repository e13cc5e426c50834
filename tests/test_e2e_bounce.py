"""Bounces, double and triple bounces, deferrals on qmail's schedule, queuelifetime."""

from __future__ import annotations

import mailbox
import os
import re
import time
from pathlib import Path

import pytest

from _mta import (
    MTA,
    add_user,
    maildir_count,
    msg,
    only_message,
    queue_empty,
    queue_files,
    sendmail,
    wait_for,
)
from pyqmail.qq import queue_message

QSBMF_HEAD = (
    "Hi. This is the qmail-send program at mx.example.test.\n"
    "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n"
    "\n"
)


@pytest.fixture
def clock(tmp_path: Path) -> Path:
    path = tmp_path / "clock"
    path.write_text("0")
    return path


def advance(mta: MTA, clock: Path, seconds: float) -> None:
    clock.write_text(str(seconds))
    mta.trigger()


def deliveries_to(mta: MTA, recipient: str) -> int:
    return len(
        re.findall(rf"starting delivery \d+: msg \d+ to local {re.escape(recipient)}\n", mta.log())
    )


def test_unknown_user_bounce_has_exact_qsbmf_text(qmail_home: Path) -> None:
    joe = add_user(qmail_home, "joe@example.test")
    with MTA(qmail_home) as mta:
        r = sendmail(
            qmail_home, ["-f", "joe@example.test", "nosuch@example.test"], msg("lost", "the body\n")
        )
        assert r.returncode == 0, r.stderr
        wait_for(lambda: maildir_count(joe / "Maildir") == 1, what="the bounce")
        wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
        log = mta.log()
    bounce = only_message(joe / "Maildir")
    assert bounce["From"] == "MAILER-DAEMON@mx.example.test"
    assert bounce["To"] == "joe@example.test"
    assert bounce["Subject"] == "failure notice"
    assert bounce["Return-Path"] == "<>"
    body = bounce.get_payload()
    assert isinstance(body, str)
    assert body.startswith(
        QSBMF_HEAD + "<nosuch@example.test>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n"
        "--- Below this line is a copy of the message.\n"
        "\n"
        "Return-Path: <joe@example.test>\n"
        "Received: (qmail "
    )
    assert body.endswith("Subject: lost\n\nthe body\n")
    assert "delivery 1: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/" in log
    assert re.search(r"bounce msg \d+ qp \d+\n", log)
    assert queue_files(qmail_home) == []


def test_program_exit_100_bounces_with_its_output(qmail_home: Path) -> None:
    joe = add_user(qmail_home, "joe@example.test")
    bob = add_user(qmail_home, "bob@example.test")
    (bob / ".qmail-strict").write_text("|echo 'we do not take mail here'; exit 100\n")
    with MTA(qmail_home):
        assert (
            sendmail(
                qmail_home, ["-f", "joe@example.test", "bob-strict@example.test"], msg("strict")
            ).returncode
            == 0
        )
        wait_for(lambda: maildir_count(joe / "Maildir") == 1, what="the bounce")
    body = only_message(joe / "Maildir").get_payload()
    assert isinstance(body, str)
    assert "<bob-strict@example.test>:\nwe do not take mail here\n" in body


def test_bounce_to_null_sender_becomes_double_bounce(qmail_home: Path) -> None:
    with MTA(qmail_home) as mta:
        r = queue_message(qmail_home, msg("from nobody"), "", ["nosuch@example.test"])
        assert r.ok
        postmaster = qmail_home / "alias" / "Maildir"
        wait_for(lambda: maildir_count(postmaster) == 1, what="the double bounce")
        wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
        log = mta.log()
    double = only_message(postmaster)
    assert double["To"] == "postmaster@mx.example.test"
    body = double.get_payload()
    assert isinstance(body, str)
    assert body.startswith(
        "Hi. This is the qmail-send program at mx.example.test.\n"
        "I tried to deliver a bounce message to this address, but the bounce bounced!\n"
        "\n<nosuch@example.test>:\n"
    )
    assert "--- Below this line is the original bounce.\n\nReturn-Path: <>\n" in body
    assert "info msg" in log and "from <#@[]>" in log


def test_triple_bounce_is_discarded(qmail_home: Path) -> None:
    (qmail_home / "control" / "doublebounceto").write_text("nosuchmaster\n")
    with MTA(qmail_home) as mta:
        assert queue_message(qmail_home, msg("x"), "", ["nosuch@example.test"]).ok
        wait_for(lambda: "triple bounce: discarding bounce/" in mta.log(), what="triple bounce")
        wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
    assert maildir_count(qmail_home / "alias" / "Maildir") == 0
    assert queue_files(qmail_home) == []


def test_deferral_follows_qmails_retry_schedule(qmail_home: Path, clock: Path) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    flag = bob / "open-now"
    (bob / ".qmail-later").write_text(
        f"|test -f {flag} || {{ echo 'not yet'; exit 111; }}\n./Maildir/\n"
    )
    with MTA(qmail_home, env={"PYQMAIL_CLOCK_FILE": str(clock)}) as mta:
        assert (
            sendmail(
                qmail_home, ["-f", "joe@example.test", "bob-later@example.test"], msg("later")
            ).returncode
            == 0
        )
        rcpt = "bob-later@example.test"
        wait_for(lambda: "deferral: not_yet/" in mta.log(), what="first deferral")
        assert deliveries_to(mta, rcpt) == 1
        # local retries happen at ages 100, 400, 900 s: nothing before 100 s
        advance(mta, clock, 60)
        time.sleep(1.0)
        assert deliveries_to(mta, rcpt) == 1
        advance(mta, clock, 101)
        wait_for(lambda: deliveries_to(mta, rcpt) == 2, what="retry at 100 s")
        advance(mta, clock, 300)
        time.sleep(1.0)
        assert deliveries_to(mta, rcpt) == 2
        flag.write_text("")
        advance(mta, clock, 401)
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery at 400 s")
        assert deliveries_to(mta, rcpt) == 3
        wait_for(lambda: queue_empty(qmail_home), what="queue to empty")


def test_schedule_survives_restart(qmail_home: Path, clock: Path) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    (bob / ".qmail-later").write_text("|echo 'not yet'; exit 111\n")
    env = {"PYQMAIL_CLOCK_FILE": str(clock)}
    with MTA(qmail_home, env=env) as mta:
        assert (
            sendmail(
                qmail_home, ["-f", "joe@example.test", "bob-later@example.test"], msg("later")
            ).returncode
            == 0
        )
        wait_for(lambda: "deferral: not_yet/" in mta.log(), what="first deferral")
    (local_file,) = [p for p in (qmail_home / "queue" / "local").rglob("*") if p.is_file()]
    info_file = qmail_home / "queue" / "info" / local_file.parent.name / local_file.name
    # qmail-send stored the next attempt (birth + 100 s) as the file's mtime
    assert abs(local_file.stat().st_mtime - (info_file.stat().st_mtime + 100)) <= 2
    with MTA(qmail_home, env=env) as mta:
        time.sleep(1.0)
        assert "starting delivery" not in mta.log().split("status: exiting")[-1]
        advance(mta, clock, 102)
        wait_for(lambda: mta.log().count("deferral: not_yet/") == 2, what="retry after restart")


def test_queuelifetime_turns_deferral_into_bounce(qmail_home: Path, clock: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions, so a read-only Maildir is writable for it")
    joe = add_user(qmail_home, "joe@example.test")
    bob = add_user(qmail_home, "bob@example.test")
    for sub in ("tmp", "new"):
        os.chmod(bob / "Maildir" / sub, 0o500)
    (qmail_home / "control" / "queuelifetime").write_text("50\n")
    try:
        with MTA(qmail_home, env={"PYQMAIL_CLOCK_FILE": str(clock)}) as mta:
            assert (
                sendmail(
                    qmail_home, ["-f", "joe@example.test", "bob@example.test"], msg("stuck")
                ).returncode
                == 0
            )
            wait_for(
                lambda: "deferral: Temporary_error_on_maildir_delivery" in mta.log(),
                what="deferral on the unwritable Maildir",
            )
            advance(mta, clock, 101)
            wait_for(lambda: maildir_count(joe / "Maildir") == 1, what="the bounce")
    finally:
        for sub in ("tmp", "new"):
            os.chmod(bob / "Maildir" / sub, 0o700)
    body = only_message(joe / "Maildir").get_payload()
    assert isinstance(body, str)
    assert (
        "<bob@example.test>:\nTemporary error on maildir delivery. (#4.3.0)\n"
        "I'm not going to try again; this message has been in the queue too long.\n\n"
    ) in body
    assert list(mailbox.Maildir(bob / "Maildir", create=False).keys()) == []
