"""End to end through the real MTA: sendmail -> qmail-queue -> qmail-send -> qmail-local."""

from __future__ import annotations

import mailbox
import os
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


@pytest.fixture
def mta(qmail_home: Path) -> MTA:
    with MTA(qmail_home) as running:
        yield running


def test_maildir_round_trip(qmail_home: Path, mta: MTA) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    r = sendmail(qmail_home, ["-f", "joe@example.test", "bob@example.test"], msg("round trip"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="delivery to bob")
    m = only_message(bob / "Maildir")
    assert m["Subject"] == "round trip"
    assert m["Return-Path"] == "<joe@example.test>"
    assert m["Delivered-To"] == "bob@example.test"
    assert m.get_payload() == "hello\n"
    assert any(v.startswith("(qmail ") for v in m.get_all("Received", []))
    wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
    assert "delivery 1: success: did_1+0+0/" in mta.log()
    # a finished message's files become spares within a second (release_finished)
    wait_for(lambda: queue_files(qmail_home) == [], what="the message's files to go")


def test_mbox_program_and_forward(qmail_home: Path, mta: MTA) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    carol = add_user(qmail_home, "carol@example.test")
    out = bob / "prog.out"
    (bob / ".qmail-mix").write_text(
        "# comment lines are ignored\n"
        "./mbox\n"
        f'|cat > {out}; echo "$SENDER $RECIPIENT $EXT $LOCAL $HOST" >> {out}\n'
        "&carol@example.test\n"
    )
    os.chmod(bob / ".qmail-mix", 0o644)
    body = "From the start\n>From quoted\nend\n"
    r = sendmail(qmail_home, ["-f", "joe@example.test", "bob-mix@example.test"], msg("mixed", body))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: maildir_count(carol / "Maildir") == 1, what="forward to carol")
    wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
    box = mailbox.mbox(bob / "mbox", create=False)
    (m,) = list(box)
    assert m["Subject"] == "mixed"
    assert m.get_from().startswith("joe@example.test ")
    # mboxrd quoting as qmail-local writes it (Python's mailbox reads lines back as stored)
    assert m.get_payload() == ">From the start\n>>From quoted\nend\n"
    prog = out.read_text()
    assert "Subject: mixed" in prog
    assert "joe@example.test bob-mix@example.test mix bob-mix example.test" in prog
    fwd = only_message(carol / "Maildir")
    assert fwd.get_all("Delivered-To") == ["carol@example.test", "bob-mix@example.test"]


def test_extension_and_default_files(qmail_home: Path, mta: MTA) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    for name in ("lists", "archive"):
        (bob / name).mkdir()
        for sub in ("tmp", "new", "cur"):
            (bob / name / sub).mkdir()
    (bob / ".qmail-list-default").write_text("./lists/\n")
    (bob / ".qmail-default").write_text(f'|echo "$DEFAULT" >> {bob}/defaults.txt\n./archive/\n')
    for rcpt in (
        "bob-list-python@example.test",
        "bob-list-rust@example.test",
        "bob-anything@example.test",
    ):
        assert sendmail(qmail_home, ["-f", "joe@example.test", rcpt], msg(rcpt)).returncode == 0
    wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
    assert maildir_count(bob / "lists") == 2
    assert maildir_count(bob / "archive") == 1
    assert (bob / "defaults.txt").read_text() == "anything\n"
    assert maildir_count(bob / "Maildir") == 0


def test_virtual_domain_user_and_aliases(qmail_home: Path, mta: MTA) -> None:
    ann = add_user(qmail_home, "ann@virtual.test")
    assert (
        sendmail(
            qmail_home, ["-f", "joe@example.test", "ann@virtual.test"], msg("virtual")
        ).returncode
        == 0
    )
    assert (
        sendmail(
            qmail_home, ["-f", "joe@example.test", "Postmaster@example.test"], msg("to postmaster")
        ).returncode
        == 0
    )
    assert (
        sendmail(
            qmail_home, ["-f", "joe@example.test", "root@example.test"], msg("to root")
        ).returncode
        == 0
    )
    wait_for(lambda: queue_empty(qmail_home), what="queue to empty")
    m = only_message(ann / "Maildir")
    assert m["Subject"] == "virtual"
    assert m["Delivered-To"] == "virtual.test-ann@virtual.test"
    postmaster = mailbox.Maildir(qmail_home / "alias" / "Maildir", create=False)
    assert sorted(m["Subject"] for m in postmaster) == ["to postmaster", "to root"]
