"""preline, bouncesaying, condredirect, forward, except: as programs and from .qmail lines."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from _local_util import BIN, bin_path, make_maildir, queued, run_local, strip_received, write_qmail

MSG = b"Subject: helper\n\nFrom here\nbody\n"
ENV = {
    "UFLINE": "From joe@example.org Sat Jan 03 01:05:34 1996\n",
    "RPLINE": "Return-Path: <joe@example.org>\n",
    "DTLINE": "Delivered-To: bob@example.test\n",
    "SENDER": "joe@example.org",
    "NEWSENDER": "bob-owner@example.test",
}


def run(
    prog: str,
    args: list[str],
    env: dict[str, str] | None = None,
    message: bytes = MSG,
    drop: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run a helper with the message on a seekable fd 0, as qmail-local would."""
    full = {k: v for k, v in os.environ.items() if k not in ENV}
    full.update({k: v for k, v in ENV.items() if k not in drop})
    full["PATH"] = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    full.update(env or {})
    with tempfile.TemporaryFile() as f:
        f.write(message)
        f.seek(0)
        return subprocess.run(
            [bin_path(prog), *args], stdin=f, capture_output=True, env=full, timeout=60
        )


# -- preline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "head"),
    [
        ([], ENV["UFLINE"] + ENV["RPLINE"] + ENV["DTLINE"]),
        (["-f"], ENV["RPLINE"] + ENV["DTLINE"]),
        (["-r", "-d"], ENV["UFLINE"]),
        (["-frd"], ""),
        (["-fF"], ENV["UFLINE"] + ENV["RPLINE"] + ENV["DTLINE"]),
        (["-dD", "--"], ENV["UFLINE"] + ENV["RPLINE"] + ENV["DTLINE"]),
    ],
)
def test_preline_feeds_the_envelope_lines(flags: list[str], head: str) -> None:
    r = run("preline", [*flags, "cat"])
    assert (r.returncode, r.stderr) == (0, b"")
    assert r.stdout == head.encode() + MSG


def test_preline_passes_exit_code_and_survives_early_exit() -> None:
    big = b"Subject: big\n\n" + b"x" * 1_000_000 + b"\n"
    r = run("preline", ["sh", "-c", "head -c 10 >/dev/null; exit 42"], message=big)
    assert (r.returncode, r.stderr) == (42, b"")


def test_preline_errors() -> None:
    usage = b"preline: usage: preline cmd [ arg ... ]\n"
    assert run("preline", []).stderr == usage
    r = run("preline", ["cat"], drop=("UFLINE",))
    assert (r.returncode, r.stderr) == (100, usage)
    r = run("preline", ["-x", "cat"])
    assert (r.returncode, r.stderr) == (100, usage)
    r = run("preline", ["/nonexistent/prog"])
    assert r.returncode == 100
    assert r.stderr == (
        b"preline: fatal: unable to run /nonexistent/prog: No such file or directory\n"
    )
    r = run("preline", ["sh", "-c", "kill -9 $$"])
    assert (r.returncode, r.stderr) == (111, b"preline: fatal: child crashed\n")


# -- bouncesaying and except ------------------------------------------------------------


def test_bouncesaying() -> None:
    r = run("bouncesaying", ["This address is closed."])
    assert (r.returncode, r.stderr) == (100, b"This address is closed.\n")
    r = run("bouncesaying", ["No.", "true"])
    assert (r.returncode, r.stderr) == (100, b"No.\n")
    r = run("bouncesaying", ["No.", "false"])
    assert (r.returncode, r.stderr) == (0, b"")
    r = run("bouncesaying", ["No.", "sh", "-c", "exit 111"])
    assert (r.returncode, r.stderr) == (111, b"bouncesaying: fatal: temporary child error\n")
    r = run("bouncesaying", ["No.", "sh", "-c", "kill -9 $$"])
    assert (r.returncode, r.stderr) == (111, b"bouncesaying: fatal: child crashed\n")
    # a program that cannot run counts as exit 100: not 0, so the mail is not bounced
    assert run("bouncesaying", ["No.", "/nonexistent"]).returncode == 0
    r = run("bouncesaying", [])
    assert r.returncode == 100
    assert r.stderr == b"bouncesaying: usage: bouncesaying error [ program [ arg ... ] ]\n"


def test_bouncesaying_program_reads_the_message() -> None:
    r = run("bouncesaying", ["spam", "grep", "-q", "^From here"])
    assert (r.returncode, r.stderr) == (100, b"spam\n")


@pytest.mark.parametrize(
    ("program", "want"),
    [(["true"], 100), (["false"], 0), (["sh", "-c", "exit 111"], 111), (["sh", "-c", "exit 5"], 0)],
)
def test_except(program: list[str], want: int) -> None:
    assert run("except", program).returncode == want


def test_except_errors() -> None:
    r = run("except", [])
    assert (r.returncode, r.stderr) == (100, b"except: usage: except program [ arg ... ]\n")
    r = run("except", ["sh", "-c", "kill -9 $$"])
    assert (r.returncode, r.stderr) == (111, b"except: fatal: child crashed\n")


# -- condredirect and forward -----------------------------------------------------------


def test_condredirect_redirects_when_program_succeeds(qmail_home: Path) -> None:
    r = run("condredirect", ["carol@example.test", "grep", "-q", "^Subject: helper"])
    assert r.returncode == 99
    m = re.fullmatch(rb"condredirect: qp (\d+)\n", r.stderr)
    assert m, r.stderr
    (q,) = queued(qmail_home)
    assert (q.sender, q.recipients) == ("joe@example.org", ["carol@example.test"])
    # the whole message, although the program already read it
    assert strip_received(q.message) == ENV["DTLINE"].encode() + MSG


def test_condredirect_passes_when_program_fails(qmail_home: Path) -> None:
    assert run("condredirect", ["carol@example.test", "false"]).returncode == 0
    r = run("condredirect", ["carol@example.test", "sh", "-c", "exit 111"])
    assert (r.returncode, r.stderr) == (111, b"condredirect: fatal: temporary child error\n")
    assert queued(qmail_home) == []


def test_condredirect_errors(qmail_home: Path) -> None:
    r = run("condredirect", ["carol@example.test"])
    assert r.returncode == 100
    assert r.stderr == b"condredirect: usage: condredirect newaddress program [ arg ... ]\n"
    r = run("condredirect", ["carol@example.test", "true"], drop=("SENDER",))
    assert (r.returncode, r.stderr) == (100, b"condredirect: fatal: SENDER not set\n")
    r = run("condredirect", ["carol@example.test", "true"], drop=("DTLINE",))
    assert (r.returncode, r.stderr) == (100, b"condredirect: fatal: DTLINE not set\n")
    assert queued(qmail_home) == []


def test_forward(qmail_home: Path) -> None:
    r = run("forward", ["a@example.net", "b@example.net"])
    assert r.returncode == 0
    assert re.fullmatch(rb"forward: qp \d+\n", r.stderr), r.stderr
    (q,) = queued(qmail_home)
    assert (q.sender, q.recipients) == (
        "bob-owner@example.test",
        ["a@example.net", "b@example.net"],
    )
    assert strip_received(q.message) == ENV["DTLINE"].encode() + MSG


def test_forward_errors(qmail_home: Path, tmp_path: Path) -> None:
    r = run("forward", [])
    assert (r.returncode, r.stderr) == (100, b"forward: usage: forward address [ address ... ]\n")
    r = run("forward", ["a@example.net"], drop=("NEWSENDER",))
    assert (r.returncode, r.stderr) == (100, b"forward: fatal: NEWSENDER not set\n")
    fake = tmp_path / "qq"
    fake.write_text("#!/bin/sh\ncat >/dev/null\nexit 31\n")
    fake.chmod(0o755)
    r = run("forward", ["a@example.net"], env={"QMAILQUEUE": str(fake)})
    assert r.returncode == 100
    assert r.stderr == b"forward: fatal: mail server permanently rejected message (#5.3.0)\n"
    assert queued(qmail_home) == []


# -- from a .qmail file, through qmail-local --------------------------------------------


def test_helpers_in_qmail_lines(qmail_home: Path, tmp_path: Path) -> None:
    bob = tmp_path / "bob"
    bob.mkdir(mode=0o755)
    make_maildir(bob / "Maildir")
    write_qmail(
        bob / ".qmail",
        "|preline -f cat > seen\n"
        "|condredirect carol@example.test grep -q '^Subject: redirect me'\n"
        "|bouncesaying 'Go away.' grep -q '^Subject: bounce me'\n"
        "./Maildir/\n",
    )
    r = run_local(qmail_home, bob, "bob", b"Subject: plain\n\nhi\n", sender="joe@example.org")
    assert (r.returncode, r.stdout) == (0, b"did 1+0+3\n")
    assert (bob / "seen").read_bytes() == (
        b"Return-Path: <joe@example.org>\nDelivered-To: bob@example.test\nSubject: plain\n\nhi\n"
    )
    r = run_local(qmail_home, bob, "bob", b"Subject: redirect me\n\nhi\n")
    assert r.returncode == 0
    assert r.stdout == b"did 0+0+2\n"
    assert re.fullmatch(rb"condredirect: qp \d+\n", r.stderr), r.stderr
    (q,) = queued(qmail_home)
    assert q.recipients == ["carol@example.test"]
    r = run_local(qmail_home, bob, "bob", b"Subject: bounce me\n\nhi\n")
    assert (r.returncode, r.stderr) == (100, b"Go away.\n")
    assert len(os.listdir(bob / "Maildir" / "new")) == 1
