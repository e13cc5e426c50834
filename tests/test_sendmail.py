"""The sendmail wrapper as real callers use it: cron, PHP mail(), git send-email, scripts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import pyqmail
from _inject_util import BIN, clean_env, qq_script, queue_is_empty, queued, run
from pyqmail import sendmail
from pyqmail.constants import SPLIT

USAGE = b"sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"


def test_cron(qmail_home: Path) -> None:
    # how cron (Debian's cronie and vixie cron) mails a job's output
    raw = (
        b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@mx> run-parts /etc/cron.hourly\n"
        b"X-Cron-Env: <SHELL=/bin/sh>\n\noutput of the job\n"
    )
    args = ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"]
    proc = run("sendmail", args, qmail_home, raw)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.sender == "root@mx.example.test"
    assert q.recipients == ["root@mx.example.test"]
    msg = q.message
    assert msg["From"] == "root@mx.example.test (Cron Daemon)"
    assert msg["To"] == "root@mx.example.test"
    assert msg.get_payload() == "output of the job\n"


def test_cron_without_from_uses_the_f_address_and_the_F_name(qmail_home: Path) -> None:
    env = clean_env(qmail_home, NAME="Someone Else", MAILHOST="other.test")
    proc = run(
        "sendmail", ["-FCronDaemon", "-t", "-f", "root"], qmail_home, b"To: root\n\nx\n", env=env
    )
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.message["From"] == '"CronDaemon" <root@mx.example.test>'
    assert q.sender == "root@mx.example.test"


def test_php_mail(qmail_home: Path) -> None:
    # PHP's mail() pipes the whole message to `sendmail -t -i`, often with CRLF line ends
    raw = (
        b"To: customer@shop.test\r\nSubject: Your order\r\nFrom: shop@shop.test\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n"
        b"Thanks for your order.\r\n.\r\nBye\r\n"
    )
    env = clean_env(qmail_home, USER="www-data")
    proc = run("sendmail", ["-t", "-i"], qmail_home, raw, env=env)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.sender == "www-data@mx.example.test"
    assert q.recipients == ["customer@shop.test"]
    assert b"\r" not in q.raw
    assert q.raw.endswith(b"\n\nThanks for your order.\n.\nBye\n")
    assert q.message["From"] == "shop@shop.test"


def test_git_send_email(qmail_home: Path) -> None:
    # git send-email: a complete message, the recipients (To, Cc, Bcc) as arguments
    raw = (
        b"From: Dev Eloper <dev@example.test>\nTo: maintainer@proj.test\nCc: list@proj.test\n"
        b"Subject: [PATCH] fix it\nDate: Mon, 1 Jan 2024 10:00:00 +0100\n"
        b"Message-ID: <20240101.1-1-dev@example.test>\nMIME-Version: 1.0\n\n"
        b"---\n file | 1 +\n\ndiff --git a/file b/file\n+new line\n--\n2.43.0\n"
    )
    args = ["-i", "maintainer@proj.test", "list@proj.test", "hidden@proj.test"]
    proc = run("sendmail", args, qmail_home, raw)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.recipients == ["maintainer@proj.test", "list@proj.test", "hidden@proj.test"]
    assert q.sender == "alice@mx.example.test"
    # the header git wrote is kept as it was
    assert q.after_received == raw


def test_git_send_email_with_envelope_sender(qmail_home: Path) -> None:
    raw = b"From: Dev <dev@example.test>\nTo: m@proj.test\nSubject: s\n\nb\n"
    proc = run("sendmail", ["-f", "dev@example.test", "-i", "m@proj.test"], qmail_home, raw)
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert (q.sender, q.recipients) == ("dev@example.test", ["m@proj.test"])
    assert q.after_received.endswith(raw)


def test_plain_sender_and_recipient(qmail_home: Path) -> None:
    proc = run("sendmail", ["-f", "reports@app.test", "ops"], qmail_home, b"Subject: daily\n\nok\n")
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.sender == "reports@app.test"
    assert q.recipients == ["ops@mx.example.test"]
    # netqmail builds the default From from -f, not from the user running it
    assert q.message["From"] == "reports@app.test"
    assert q.message["Cc"] == "recipient list not shown: ;"


def test_glued_sender_and_null_sender(qmail_home: Path) -> None:
    assert run("sendmail", ["-fa@b.test", "x@y.test"], qmail_home, b"").returncode == 0
    assert run("sendmail", ["-f", "<>", "x@y.test"], qmail_home, b"").returncode == 0
    by_sender = {q.sender: q for q in queued(qmail_home)}
    assert sorted(by_sender) == ["", "a@b.test"]
    assert by_sender[""].message["From"] == "alice@mx.example.test"
    assert by_sender["a@b.test"].message["From"] == "a@b.test"


def test_t_adds_header_recipients_to_arguments(qmail_home: Path) -> None:
    proc = run("sendmail", ["-t", "extra@x.test"], qmail_home, b"To: a@x.test\nBcc: b@x.test\n\n")
    assert proc.returncode == 0
    [q] = queued(qmail_home)
    assert q.recipients == ["extra@x.test", "a@x.test", "b@x.test"]
    assert q.message["Bcc"] is None


def test_without_t_the_header_is_not_used(qmail_home: Path) -> None:
    proc = run("sendmail", [], qmail_home, b"To: a@x.test\n\nlost\n")
    assert proc.returncode == 0
    [q] = queued(qmail_home)
    assert q.recipients == []


def test_ignored_options(qmail_home: Path) -> None:
    args = ["-v", "-i", "-m", "-x", "-oi", "-odb", "-o", "em", "-e", "x", "-p", "smtp:h"]
    args += ["-B", "8BITMIME", "-bm", "-Ejunk", "-J", "-Ffull", "--", "r@x.test"]
    proc = run("sendmail", args, qmail_home, b"Subject: s\n\n")
    assert proc.returncode == 0, proc.stderr
    [q] = queued(qmail_home)
    assert q.recipients == ["r@x.test"]
    assert q.message["From"] == '"full" <alice@mx.example.test>'


@pytest.mark.parametrize("args", [["-q"], ["-bx"], ["-bi"], ["-f"], ["-t", "-z", "a@b.test"]])
def test_usage_errors(qmail_home: Path, args: list[str]) -> None:
    proc = run("sendmail", args, qmail_home, b"To: a@b.test\n\n")
    assert (proc.returncode, proc.stderr) == (100, USAGE)
    assert queue_is_empty(qmail_home)


def test_missing_home(tmp_path: Path) -> None:
    proc = run("sendmail", ["a@b.test"], tmp_path / "nowhere", b"x\n")
    assert proc.returncode == 111
    assert proc.stderr == b"sendmail: fatal: unable to switch to qmail home directory\n"


def test_inject_failures_pass_through(qmail_home: Path) -> None:
    proc = run("sendmail", ["-t"], qmail_home, b"To: (broken\n\n")
    assert proc.returncode == 100
    assert proc.stderr == b"qmail-inject: fatal: unable to parse this line:\nTo: (broken\n"
    assert queue_is_empty(qmail_home)


@pytest.mark.parametrize(("code", "exit_code"), [(0, 0), (31, 100), (71, 111)])
def test_qmailqueue(qmail_home: Path, tmp_path: Path, code: int, exit_code: int) -> None:
    env = clean_env(qmail_home, QMAILQUEUE=str(qq_script(tmp_path, code)))
    proc = run("sendmail", ["-f", "s@x.test", "r@x.test"], qmail_home, b"Subject: s\n\n", env=env)
    assert proc.returncode == exit_code
    envelope = (tmp_path / f"qq{code}.envelope").read_bytes()
    assert envelope == b"Fs@x.test\0Tr@x.test\0\0"


def test_newaliases_name(qmail_home: Path, tmp_path: Path) -> None:
    link = tmp_path / "newaliases"
    os.symlink(BIN / "sendmail", link)
    proc = run("sendmail", [], qmail_home, b"", argv0=str(link))
    assert proc.returncode == 100
    assert proc.stderr == b"sendmail: fatal: please use fastforward/newaliases instead\n"


def test_mailq_name_and_bp_run_qread(qmail_home: Path, tmp_path: Path) -> None:
    assert run("sendmail", ["bob@example.test"], qmail_home, b"Subject: s\n\n").returncode == 0
    [q] = queued(qmail_home)
    # what qmail-send's preprocessing would leave for qmail-qread to show
    split = str(q.number % SPLIT)
    (qmail_home / "queue" / "info" / split / str(q.number)).write_bytes(b"Fsender@x.test\0")
    (qmail_home / "queue" / "local" / split / str(q.number)).write_bytes(b"Tbob@example.test\0")
    link = tmp_path / "mailq"
    os.symlink(BIN / "sendmail", link)
    for argv0, args in ((str(link), []), (None, ["-bp"]), (None, ["-t", "-bp", "-x"])):
        proc = run("sendmail", args, qmail_home, b"", argv0=argv0)
        assert proc.returncode == 0, proc.stderr
        assert f"#{q.number}".encode() in proc.stdout
        assert b"<sender@x.test>" in proc.stdout
        assert b"bob@example.test" in proc.stdout
    assert len(queued(qmail_home)) == 1


def test_bs_speaks_smtp_on_stdin(qmail_home: Path) -> None:
    session = (
        b"HELO client\r\nMAIL FROM:<app@x.test>\r\nRCPT TO:<someone@far.away.test>\r\n"
        b"DATA\r\nSubject: via -bs\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    )
    proc = run("sendmail", ["-bs"], qmail_home, session)
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.decode().splitlines()
    assert replies[0].startswith("220 ")
    codes = [line[:3] for line in replies]
    assert codes == ["220", "250", "250", "250", "354", "250", "221"]
    [q] = queued(qmail_home)
    # -bs makes the session a relay client from localhost, so a remote recipient is accepted
    assert (q.sender, q.recipients) == ("app@x.test", ["someone@far.away.test"])
    assert b"(sendmail-bs@127.0.0.1)" in q.raw


def test_bs_without_smtpd_fails_cleanly(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyqmail.smtpd", None)  # makes the import fail
    monkeypatch.delattr(pyqmail, "smtpd", raising=False)
    for name in sendmail.SMTPD_ENV:
        # set then delete, so monkeypatch restores "absent" after sendmail sets them
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    assert sendmail.run("sendmail", ["-bs"]) == 111
    assert capfd.readouterr().err == "sendmail: fatal: unable to run qmail-smtpd\n"
    assert os.environ["TCPREMOTEINFO"] == "sendmail-bs"
