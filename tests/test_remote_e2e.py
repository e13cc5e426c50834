"""Remote delivery through the whole MTA (`pyqmail run`): smarthost relay, bounces, deferrals."""

from __future__ import annotations

import time
from pathlib import Path

from _mta import MTA, maildir_count, only_message, queue_empty, wait_for
from _remote_util import Script, ScriptedPeer, SMTPSink
from pyqmail.init import HomeSettings, create_home
from pyqmail.qq import queue_message

POSTMASTER_MAILDIR = ("alias", "Maildir")


def route(home: Path, line: str) -> None:
    (home / "control" / "smtproutes").write_text(line + "\n")


def test_relay_5000_through_smarthost_to_smtp_sink(qmail_home: Path, tmp_path: Path) -> None:
    counts = tmp_path / "sink.out"
    sink = SMTPSink(extra=["-c"], stdout=counts)
    try:
        route(qmail_home, f":127.0.0.1:{sink.port}")
        body = b"Subject: load\n\n" + (b"x" * 76 + b"\n") * 64
        for i in range(5000):
            r = queue_message(qmail_home, body, "a@example.test", [f"u{i}@far.example"])
            assert r.ok, r.text
        with MTA(qmail_home):
            wait_for(lambda: queue_empty(qmail_home), 240, "the queue to empty")
    finally:
        sink.stop()
    # multilog rotates the log during the run: read every file of it
    logs = "".join(p.read_text(errors="replace") for p in (qmail_home / "log" / "send").iterdir())
    assert logs.count("success: 127.0.0.1_accepted_message") == 5000
    assert "deferral" not in logs and "failure" not in logs
    assert sink.messages(counts) == 5000


def test_permanent_rejection_bounces_with_remote_text(qmail_home: Path) -> None:
    with ScriptedPeer(Script(rcpt=lambda a: b"550 5.1.1 no such user here")) as peer:
        route(qmail_home, f"far.example:127.0.0.1:{peer.port}")
        r = queue_message(
            qmail_home,
            b"Subject: doomed\n\nbody\n",
            "postmaster@example.test",
            ["nobody@far.example"],
        )
        assert r.ok
        with MTA(qmail_home) as mta:
            maildir = qmail_home.joinpath(*POSTMASTER_MAILDIR)
            wait_for(lambda: maildir_count(maildir) == 1, 30, "the bounce")
            wait_for(lambda: queue_empty(qmail_home), 30, "the queue to empty")
            log = mta.log()
    bounce = only_message(maildir)
    text = bounce.get_payload()
    assert isinstance(text, str)
    assert "<nobody@far.example>:\n127.0.0.1 does not like recipient.\n" in text
    assert "Remote host said: 550 5.1.1 no such user here\nGiving up on 127.0.0.1.\n" in text
    assert "Subject: doomed" in text
    assert "failure: 127.0.0.1_does_not_like_recipient." in log


def test_temporary_failures_are_retried_not_bounced(qmail_home: Path) -> None:
    # one domain answers 4xx to RCPT, another drops the connection in the middle of DATA
    drop = ScriptedPeer(Script(drop_in_data=True))
    later = ScriptedPeer(Script(rcpt=lambda a: b"451 4.3.0 try again later"))
    try:
        (qmail_home / "control" / "smtproutes").write_text(
            f"later.example:127.0.0.1:{later.port}\ndrop.example:127.0.0.1:{drop.port}\n"
        )
        big = b"Subject: big\n\n" + (b"y" * 999 + b"\n") * 20000
        assert queue_message(
            qmail_home, b"Subject: t\n\nb\n", "postmaster@example.test", ["a@later.example"]
        ).ok
        assert queue_message(qmail_home, big, "postmaster@example.test", ["b@drop.example"]).ok
        with MTA(qmail_home) as mta:
            wait_for(lambda: mta.log().count("deferral:") >= 2, 30, "two deferrals")
            time.sleep(0.5)
            log = mta.log()
            assert not queue_empty(qmail_home)
    finally:
        drop.stop()
        later.stop()
    assert "deferral: 127.0.0.1_does_not_like_recipient./Remote_host_said:_451_4.3.0" in log
    assert "deferral: Connected_to_127.0.0.1_but_connection_died." in log
    assert "bounce msg" not in log
    assert maildir_count(qmail_home.joinpath(*POSTMASTER_MAILDIR)) == 0


def test_queuelifetime_expiry_bounces(qmail_home: Path, tmp_path: Path) -> None:
    # qmail-send's test clock (PYQMAIL_CLOCK_FILE) runs ahead so the retry comes past the lifetime
    clock = tmp_path / "clock"
    clock.write_text("0")
    (qmail_home / "control" / "queuelifetime").write_text("50\n")
    with ScriptedPeer(Script(greeting=b"421 4.3.2 busy")) as peer:
        route(qmail_home, f"far.example:127.0.0.1:{peer.port}")
        with MTA(qmail_home, env={"PYQMAIL_CLOCK_FILE": str(clock)}) as mta:
            r = queue_message(
                qmail_home, b"Subject: old\n\nb\n", "postmaster@example.test", ["c@far.example"]
            )
            assert r.ok
            mta.trigger()
            wait_for(lambda: "deferral: Connected_to_127.0.0.1" in mta.log(), 30, "a deferral")
            clock.write_text("401")
            mta.trigger()
            maildir = qmail_home.joinpath(*POSTMASTER_MAILDIR)
            wait_for(lambda: maildir_count(maildir) == 1, 30, "the bounce")
        assert len(peer.sessions) == 2
    text = only_message(maildir).get_payload()
    assert isinstance(text, str)
    assert "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 421 4.3.2 busy\n" in text
    assert "I'm not going to try again; this message has been in the queue too long." in text


def test_delivery_to_a_second_pyqmail_instance(qmail_home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    create_home(other, HomeSettings(me="mx.other.test", locals=["other.test"]))
    with MTA(other) as receiver:
        route(qmail_home, f"other.test:127.0.0.1:{receiver.smtp_port}")
        assert queue_message(
            qmail_home,
            b"Subject: across\n\nhello other\n",
            "postmaster@example.test",
            ["postmaster@other.test"],
        ).ok
        with MTA(qmail_home) as sender:
            maildir = other / "alias" / "Maildir"
            wait_for(lambda: maildir_count(maildir) == 1, 30, "mail at the other instance")
            wait_for(lambda: "success: 127.0.0.1_accepted_message" in sender.log(), 30, "success")
    got = only_message(maildir)
    assert got["Subject"] == "across"
    assert got.get_payload() == "hello other\n"
