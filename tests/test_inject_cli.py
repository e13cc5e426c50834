"""The qmail-inject program: real processes against a real queue."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from _inject_util import clean_env, qq_script, queue_is_empty, queued, run
from pyqmail import inject
from pyqmail.control import write_control

MESSAGE = b"To: bob@example.test, carol\nSubject: hello\n\nHello Bob.\n"


def test_queues_message_with_envelope_and_received_line(qmail_home: Path) -> None:
    proc = run("qmail-inject", [], qmail_home, MESSAGE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"" and proc.stderr == b""
    [q] = queued(qmail_home)
    assert q.sender == "alice@mx.example.test"
    assert q.recipients == ["bob@example.test", "carol@mx.example.test"]
    assert q.uid == os.getuid()
    assert re.match(
        rb"Received: \(qmail \d+ invoked by uid %d\); \d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000\n"
        % os.getuid(),
        q.raw,
    )
    msg = q.message
    assert msg["From"] == "alice@mx.example.test"
    assert msg["To"] == "bob@example.test, carol@mx.example.test"
    assert msg["Subject"] == "hello"
    assert re.fullmatch(r"\d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000", msg["Date"])
    assert re.fullmatch(r"<\d{14}\.\d+\.qmail@mx\.example\.test>", msg["Message-ID"])
    assert msg.get_payload() == "Hello Bob.\n"


def test_message_id_uses_idhost_and_the_injector_pid(qmail_home: Path) -> None:
    write_control(qmail_home, "idhost", ["ids.example.test"])
    run("qmail-inject", ["x@y.test"], qmail_home, b"")
    [q] = queued(qmail_home)
    msgid = q.message["Message-ID"]
    assert msgid.endswith(".qmail@ids.example.test>")
    # the pid in the Message-ID is qmail-inject's; qmail-queue (a forked child) has another
    assert int(msgid.split(".")[1]) != q.pid


def test_print_mode_queues_nothing(qmail_home: Path) -> None:
    proc = run("qmail-inject", ["-n", "-f", "sender@x.test"], qmail_home, MESSAGE)
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"Return-Path: <sender@x.test>\nDate: ")
    assert proc.stdout.endswith(
        b"To: bob@example.test, carol@mx.example.test\nSubject: hello\n\nHello Bob.\n"
    )
    assert queue_is_empty(qmail_home)


def test_print_mode_with_default_sender(qmail_home: Path) -> None:
    proc = run("qmail-inject", ["-n"], qmail_home, b"Subject: s\n\n")
    assert proc.stdout.startswith(b"Return-Path: <alice@mx.example.test>\n")


def test_dash_f_and_arguments(qmail_home: Path) -> None:
    proc = run(
        "qmail-inject", ["-f", "list-owner", "--", "dave", "-odd@x.test"], qmail_home, MESSAGE
    )
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.sender == "list-owner@mx.example.test"
    assert q.recipients == ["dave@mx.example.test", "-odd@x.test"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["-a", "arg@x.test"], ["arg@x.test"]),
        (["-h", "arg@x.test"], ["bob@example.test", "carol@mx.example.test"]),
        (["-H", "arg@x.test"], ["arg@x.test", "bob@example.test", "carol@mx.example.test"]),
    ],
)
def test_recipient_options(qmail_home: Path, flags: list[str], expected: list[str]) -> None:
    assert run("qmail-inject", flags, qmail_home, MESSAGE).returncode == 0
    assert queued(qmail_home)[0].recipients == expected


def test_environment_reaches_the_header(qmail_home: Path) -> None:
    env = clean_env(
        qmail_home, QMAILUSER="ann", QMAILNAME="Ann Example", QMAILHOST="ex.test", QMAILINJECT="i"
    )
    raw = b"Message-ID: <dropped@x.test>\nReturn-Path: <rp@x.test>\nBcc: b@x.test\n\nbody\n"
    proc = run("qmail-inject", [], qmail_home, raw, env=env)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    msg = q.message
    assert msg["From"] == '"Ann Example" <ann@ex.test>'
    assert "dropped" not in msg["Message-ID"]
    assert msg["Bcc"] is None and msg["Return-Path"] is None
    assert msg["Cc"] == "recipient list not shown: ;"
    assert (q.sender, q.recipients) == ("rp@x.test", ["b@x.test"])


def test_verp_flags(qmail_home: Path) -> None:
    env = clean_env(qmail_home, QMAILINJECT="r")
    assert run("qmail-inject", ["x@y.test"], qmail_home, b"", env=env).returncode == 0
    assert queued(qmail_home)[0].sender == "alice-@mx.example.test-@[]"


def test_mft_file_relative_to_the_working_directory(qmail_home: Path, tmp_path: Path) -> None:
    (tmp_path / "mft").write_text("list@lists.test\n")
    env = clean_env(qmail_home, QMAILMFTFILE="mft")
    raw = b"To: list@lists.test\nCc: me@x.test\n\n"
    proc = run("qmail-inject", [], qmail_home, raw, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.message["Mail-Followup-To"] == "list@lists.test,\n  me@x.test"


def test_eight_bit_message_is_queued_unchanged(qmail_home: Path) -> None:
    raw = "From: Zoë <zoe@x.test>\nTo: bob@x.test\nSubject: ünïcødé ✓\n\nbödy ✓\n".encode()
    proc = run("qmail-inject", [], qmail_home, raw)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert b'From: "Zo\xc3\xab" <zoe@x.test>\n' in q.raw
    assert "Subject: ünïcødé ✓\n\nbödy ✓\n".encode() in q.raw


def test_large_message(qmail_home: Path) -> None:
    body = b"".join(b"line %07d of a big message\n" % i for i in range(200_000))
    proc = run("qmail-inject", ["big@x.test"], qmail_home, b"Subject: big\n\n" + body)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.raw.endswith(b"Subject: big\n\n" + body)


# -- failures -----------------------------------------------------------------------------------


def test_malformed_header_is_permanent_and_queues_nothing(qmail_home: Path) -> None:
    raw = b"To: bob@example.test\nCc: (unclosed\nSubject: x\n\nbody\n"
    proc = run("qmail-inject", [], qmail_home, raw)
    assert proc.returncode == 100
    assert proc.stderr == b"qmail-inject: fatal: unable to parse this line:\nCc: (unclosed\n"
    assert queue_is_empty(qmail_home)


def test_unparseable_argument(qmail_home: Path) -> None:
    proc = run("qmail-inject", ["ok@x.test", "bad@[x"], qmail_home, MESSAGE)
    assert proc.returncode == 100
    assert proc.stderr == b"qmail-inject: fatal: unable to parse address: bad@[x\n"
    assert queue_is_empty(qmail_home)


def test_unknown_option_is_a_usage_error(qmail_home: Path) -> None:
    proc = run("qmail-inject", ["-x", "a@b.test"], qmail_home, MESSAGE)
    assert proc.returncode == 100
    assert proc.stderr.startswith(b"qmail-inject: usage: qmail-inject ")
    assert queue_is_empty(qmail_home)


def test_missing_home_is_temporary(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    proc = run("qmail-inject", ["a@b.test"], home, MESSAGE)
    assert proc.returncode == 111
    assert proc.stderr == (
        f"qmail-inject: fatal: unable to switch to qmail home directory {home}\n".encode()
    )
    assert not home.exists()


def test_home_option_overrides_environment(qmail_home: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "nowhere")
    proc = run("qmail-inject", ["--home", str(qmail_home), "a@b.test"], qmail_home, b"", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(queued(qmail_home)) == 1


def test_unreadable_control_is_temporary(qmail_home: Path) -> None:
    (qmail_home / "control" / "defaulthost").mkdir()
    proc = run("qmail-inject", ["a@b.test"], qmail_home, MESSAGE)
    assert proc.returncode == 111
    assert proc.stderr.startswith(b"qmail-inject: fatal: unable to read controls: ")
    assert queue_is_empty(qmail_home)


def test_broken_queue_is_temporary(qmail_home: Path) -> None:
    os.rename(qmail_home / "queue" / "todo", qmail_home / "queue" / "todo.away")
    proc = run("qmail-inject", ["a@b.test"], qmail_home, MESSAGE)
    assert proc.returncode == 111
    assert proc.stderr == b"qmail-inject: fatal: qq trouble creating files in queue (#4.3.0)\n"


@pytest.mark.parametrize(
    ("code", "exit_code", "text"),
    [
        (0, 0, b""),
        (11, 100, b"qmail-inject: fatal: envelope address too long for qq (#5.1.3)\n"),
        (31, 100, b"qmail-inject: fatal: mail server permanently rejected message (#5.3.0)\n"),
        (71, 111, b"qmail-inject: fatal: mail server temporarily rejected message (#4.3.0)\n"),
        (40, 100, b"qmail-inject: fatal: qq permanent problem (#5.3.0)\n"),
        (99, 111, b"qmail-inject: fatal: qq temporary problem (#4.3.0)\n"),
    ],
)
def test_qmailqueue_program(
    qmail_home: Path, tmp_path: Path, code: int, exit_code: int, text: bytes
) -> None:
    script = qq_script(tmp_path, code)
    env = clean_env(qmail_home, QMAILQUEUE=str(script))
    proc = run("qmail-inject", ["-f", "s@x.test", "r1@x.test", "r2"], qmail_home, MESSAGE, env=env)
    assert (proc.returncode, proc.stderr) == (exit_code, text)
    message = (tmp_path / f"qq{code}.message").read_bytes()
    assert message.endswith(
        b"To: bob@example.test, carol@mx.example.test\nSubject: hello\n\nHello Bob.\n"
    )
    assert b"Received:" not in message  # qmail-queue adds that, not qmail-inject
    envelope = (tmp_path / f"qq{code}.envelope").read_bytes()
    assert envelope == b"Fs@x.test\0Tr1@x.test\0Tr2@mx.example.test\0\0"
    # the queue program runs in the qmail home
    assert (tmp_path / f"qq{code}.cwd").read_text().strip() == str(qmail_home)
    assert queue_is_empty(qmail_home)


def test_relative_qmailqueue_is_relative_to_home(qmail_home: Path, tmp_path: Path) -> None:
    script = qq_script(tmp_path, 31)
    (qmail_home / "bin").mkdir()
    os.symlink(script, qmail_home / "bin" / "myqq")
    env = clean_env(qmail_home, QMAILQUEUE="bin/myqq")
    proc = run("qmail-inject", ["r@x.test"], qmail_home, MESSAGE, env=env)
    assert proc.returncode == 100
    assert (tmp_path / "qq31.envelope").exists()


def test_qmailqueue_that_cannot_run(qmail_home: Path, tmp_path: Path) -> None:
    env = clean_env(qmail_home, QMAILQUEUE=str(tmp_path / "missing"))
    proc = run("qmail-inject", ["r@x.test"], qmail_home, MESSAGE, env=env)
    assert proc.returncode == 111
    assert proc.stderr == b"qmail-inject: fatal: unable to exec qq (#4.3.0)\n"


def test_read_error_is_temporary(qmail_home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # in-process: Python will not even start with a directory as stdin, but reading one
    # fails with EISDIR, which stands in for an I/O error on the message
    fd = os.open(qmail_home, os.O_RDONLY)
    saved = os.dup(0)
    os.dup2(fd, 0)
    try:
        assert inject.run(["a@b.test"], home=qmail_home) == 111
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)
    assert capfd.readouterr().err == "qmail-inject: fatal: read error\n"
    assert queue_is_empty(qmail_home)


def test_help(qmail_home: Path) -> None:
    proc = run("qmail-inject", ["--help"], qmail_home)
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"usage: qmail-inject ")
    assert b"--home" in proc.stdout


def test_unexpected_failure_is_temporary_without_traceback(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(inject, "inject_message", broken)
    r, w = os.pipe()
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        assert inject.run(["a@b.test"], home=qmail_home) == 111
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)
    err = capfd.readouterr().err
    assert err == "qmail-inject: fatal: internal bug: RuntimeError: simulated\n"
    assert queue_is_empty(qmail_home)
