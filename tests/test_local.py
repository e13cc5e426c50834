"""qmail-local: the real program, delivering real messages into real files."""

from __future__ import annotations

import errno
import fcntl
import mailbox
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _local_util import (
    bin_path,
    give_to,
    make_maildir,
    open_dir,
    other_uid,
    queued,
    run_local,
    strip_received,
    write_qmail,
)
from pyqmail import local

MSG = b"From: joe@example.org\nTo: bob@example.test\nSubject: hello\n\nbody line\n"


@pytest.fixture(name="open_dir")
def open_dir_fixture() -> Iterator[Path]:
    with open_dir() as path:
        yield path


@pytest.fixture
def bob(tmp_path: Path) -> Path:
    home = tmp_path / "bob"
    home.mkdir(mode=0o755)
    make_maildir(home / "Maildir")
    return home


def one_maildir_file(maildir: Path) -> bytes:
    names = os.listdir(maildir / "new")
    assert len(names) == 1, names
    assert os.listdir(maildir / "tmp") == []
    return (maildir / "new" / names[0]).read_bytes()


# -- default delivery and Maildir -------------------------------------------------------


def test_plain_user_gets_defaultdelivery_maildir(qmail_home: Path, bob: Path) -> None:
    r = run_local(qmail_home, bob, "bob", MSG)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"did 1+0+0\n", b"")
    raw = one_maildir_file(bob / "Maildir")
    assert raw == b"Return-Path: <joe@example.org>\nDelivered-To: bob@example.test\n" + MSG
    box = mailbox.Maildir(bob / "Maildir", create=False)
    (m,) = list(box)
    assert m["Subject"] == "hello"
    assert m.get_payload() == "body line\n"
    name = os.listdir(bob / "Maildir" / "new")[0]
    assert re.fullmatch(r"\d+\.\d+\.[^/:]+", name), name
    assert os.stat(bob / "Maildir" / "new" / name).st_mode & 0o777 == 0o600


def test_empty_sender_and_quoted_return_path(qmail_home: Path, bob: Path) -> None:
    run_local(qmail_home, bob, "bob", MSG, sender="")
    assert one_maildir_file(bob / "Maildir").startswith(b"Return-Path: <>\n")
    make_maildir(bob / "M2")
    run_local(qmail_home, bob, "bob", MSG, sender="a b@x.org", defaultdelivery="./M2/")
    assert one_maildir_file(bob / "M2").startswith(b'Return-Path: <"a b"@x.org>\n')


def test_two_maildir_lines_make_two_distinct_files(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "./Maildir/\n./Maildir/\n")
    start = time.monotonic()
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 0 and r.stdout == b"did 2+0+0\n"
    assert time.monotonic() - start < 1.9  # no 2-second collision retry
    assert len(os.listdir(bob / "Maildir" / "new")) == 2


def _deliver_in_process(maildir: Path, message: bytes, tmp_path: Path) -> None:
    msg = tmp_path / "msg"
    msg.write_bytes(message)
    fd = os.open(msg, os.O_RDONLY)
    try:
        local.deliver_maildir(bytes(maildir), b"Return-Path: <a@b>\n", b"", fd)
    finally:
        os.close(fd)


def test_maildir_name_taken_in_new_gets_another_name(
    bob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_tmpfile_ok", True)
    maildir = bob / "Maildir"
    (maildir / "new" / "taken").write_bytes(b"someone else's message\n")
    names = iter(["taken", "fresh"])
    monkeypatch.setattr(local, "_maildir_name", lambda: next(names))
    _deliver_in_process(maildir, MSG, tmp_path)
    assert (maildir / "new" / "taken").read_bytes() == b"someone else's message\n"
    assert (maildir / "new" / "fresh").read_bytes() == b"Return-Path: <a@b>\n" + MSG
    assert os.listdir(maildir / "tmp") == []


def test_maildir_without_unnamed_files_falls_back_to_tmp(
    bob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    tmp_names: list[str] = []

    def no_tmpfile(path: str, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not here")
        if str(path).startswith("tmp/"):
            tmp_names.append(str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_tmpfile_ok", True)
    monkeypatch.setattr(os, "open", no_tmpfile)
    maildir = bob / "Maildir"
    for _ in range(2):
        _deliver_in_process(maildir, MSG, tmp_path)
    assert local._tmpfile_ok is False  # asked once, then tmp/ straight away
    assert len(tmp_names) == 2
    box = mailbox.Maildir(maildir, create=False)
    assert [m["Subject"] for m in box] == ["hello", "hello"]
    assert os.listdir(maildir / "tmp") == []


def test_maildir_without_new_is_temporary_and_keeps_unnamed_files(
    bob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_tmpfile_ok", True)
    maildir = bob / "Maildir"
    os.rmdir(maildir / "new")
    with pytest.raises(local.Die) as died:
        _deliver_in_process(maildir, MSG, tmp_path)
    assert died.value.code == 111
    assert died.value.text == "Temporary error on maildir delivery. (#4.3.0)"
    assert os.listdir(maildir / "tmp") == []
    # one broken maildir must not switch this process to the slower way for everyone
    assert local._tmpfile_ok is True


def test_file_deliveries_leave_the_environment_alone(
    qmail_home: Path, bob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only programs and forwards need qmail-local's variables; a reused worker then
    # has nothing to undo after a delivery to a file
    monkeypatch.chdir(tmp_path)
    write_qmail(bob / ".qmail", "./Maildir/\n./mbox\n")
    before = dict(os.environ)
    msg = tmp_path / "msg"
    msg.write_bytes(MSG)
    fd = os.open(msg, os.O_RDONLY)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        code = local.qmail_local(
            qmail_home, "bob", str(bob), "bob", "", "", "example.test", "joe@example.org",
            "./Maildir/", msg_fd=fd,
        )
    finally:
        os.close(fd)
        os.umask(umask)
    assert code == 0
    assert dict(os.environ) == before
    assert len(os.listdir(bob / "Maildir" / "new")) == 1
    assert (bob / "mbox").read_bytes().count(b"Subject: hello") == 1


def test_missing_maildir_is_temporary(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "./nosuch/\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 111
    assert r.stderr == b"Unable to chdir to maildir. (#4.2.1)\n"


def test_unwritable_maildir_is_temporary_and_leaves_nothing(
    qmail_home: Path, open_dir: Path
) -> None:
    uid = other_uid()
    home = open_dir / "bob"
    home.mkdir(mode=0o755)
    make_maildir(home / "Maildir")
    give_to(home, uid)
    os.chmod(home / "Maildir" / "tmp", 0o500)
    r = run_local(qmail_home, home, "bob", MSG, uid=uid, tmp=open_dir)
    assert r.returncode == 111
    assert r.stderr == b"Temporary error on maildir delivery. (#4.3.0)\n"
    assert os.listdir(home / "Maildir" / "new") == []


def test_unwritable_mbox_is_temporary(qmail_home: Path, open_dir: Path) -> None:
    uid = other_uid()
    home = open_dir / "bob"
    home.mkdir(mode=0o755)
    (home / "mail").mkdir(mode=0o755)
    write_qmail(home / ".qmail", "./mail/mbox\n")
    give_to(home, uid)
    os.chmod(home / "mail", 0o555)
    r = run_local(qmail_home, home, "bob", MSG, uid=uid, tmp=open_dir)
    assert r.returncode == 111
    assert r.stderr == b"Unable to open ./mail/mbox: Permission denied. (#4.2.1)\n"


# -- mbox -------------------------------------------------------------------------------


def test_mbox_record_and_from_quoting_round_trip(qmail_home: Path, bob: Path) -> None:
    body = b"From the top\n>From quoted\nnot From here\nlast line without newline"
    message = b"Subject: quoting\n\n" + body
    write_qmail(bob / ".qmail", "./mbox\n")
    for _ in range(2):
        r = run_local(qmail_home, bob, "bob", message, sender="joe@example.org")
        assert (r.returncode, r.stdout) == (0, b"did 1+0+0\n")
    raw = (bob / "mbox").read_bytes()
    record = (
        b"Return-Path: <joe@example.org>\nDelivered-To: bob@example.test\nSubject: quoting\n\n"
        b">From the top\n>>From quoted\nnot From here\nlast line without newline\n\n"
    )
    first, rest = raw.split(b"\n", 1)
    assert re.fullmatch(rb"From joe@example.org \w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}", first)
    assert rest.startswith(record)
    assert raw.count(record) == 2
    box = mailbox.mbox(bob / "mbox", create=False)
    msgs = list(box)
    assert len(msgs) == 2
    # Python's mbox reader leaves the quoting in place; removing one `>` from every
    # `>...From ` line (the mboxrd rule) gives back the original body
    payload = msgs[0].get_payload()
    assert payload.startswith(">From the top\n>>From quoted\n")
    assert re.sub(r"(?m)^>(>*From )", r"\1", payload) == body.decode() + "\n"
    assert os.stat(bob / "mbox").st_mode & 0o777 == 0o600


def test_mbox_ufline_for_bounce_and_odd_sender(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "./mbox\n")
    run_local(qmail_home, bob, "bob", MSG, sender="")
    run_local(qmail_home, bob, "bob", MSG, sender="a b\tc@x")
    lines = [x for x in (bob / "mbox").read_bytes().split(b"\n") if x.startswith(b"From ")]
    assert lines[0].startswith(b"From MAILER-DAEMON ")
    assert lines[1].startswith(b"From a-b-c@x ")


def test_locked_mbox_times_out(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "./mbox\n")
    (bob / "mbox").write_bytes(b"")
    holder = open(bob / "mbox", "rb+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    msgfile = bob.parent / "msg"
    msgfile.write_bytes(MSG)
    # the same code with a 1 s limit instead of 30 s, so the test stays fast
    code = (
        "import sys, pyqmail.local as l; l.MBOX_LOCK_TIMEOUT = 1; "
        f"sys.exit(l.qmail_local({str(qmail_home)!r}, 'bob', {str(bob)!r}, 'bob', '', '', "
        "'example.test', 'joe@example.org', './Maildir/'))"
    )
    try:
        with open(msgfile, "rb") as fin:
            r = subprocess.run(
                [sys.executable, "-c", code], stdin=fin, capture_output=True, timeout=30
            )
    finally:
        holder.close()
    assert r.returncode == 111
    assert r.stderr == b"File has been locked for 30 seconds straight. (#4.3.0)\n"
    assert (bob / "mbox").read_bytes() == b""


# -- programs ---------------------------------------------------------------------------


def test_program_sees_environment_and_raw_message(qmail_home: Path, bob: Path) -> None:
    names = (
        "SENDER NEWSENDER RECIPIENT USER HOME HOST HOST2 HOST3 HOST4 LOCAL EXT EXT2 EXT3 EXT4 "
        "DEFAULT DTLINE RPLINE UFLINE QMAILHOME"
    ).split()
    script = "; ".join(f'printf "%s=%s|" {n} "${{{n}-unset}}" >> env.out' for n in names)
    write_qmail(bob / ".qmail-a-b-c", f"|cat > stdin.out; {script}\n")
    r = run_local(
        qmail_home,
        bob,
        "Bob-A-b-C",
        MSG,
        dash="-",
        ext="A-b-C",
        domain="mx.Example.test",
        sender="joe@example.org",
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, b"did 0+0+1\n", b"")
    assert (bob / "stdin.out").read_bytes() == MSG
    env = dict(item.split("=", 1) for item in (bob / "env.out").read_text().split("|") if item)
    assert env["SENDER"] == env["NEWSENDER"] == "joe@example.org"
    assert env["RECIPIENT"] == "Bob-A-b-C@mx.Example.test"
    assert env["USER"] == "bob" and env["HOME"] == str(bob)
    assert env["HOST"] == "mx.Example.test"
    assert (env["HOST2"], env["HOST3"], env["HOST4"]) == ("mx.Example", "mx", "mx")
    assert env["LOCAL"] == "Bob-A-b-C"
    assert (env["EXT"], env["EXT2"], env["EXT3"], env["EXT4"]) == ("A-b-C", "b-C", "C", "")
    assert env["DEFAULT"] == "unset"
    assert env["DTLINE"] == "Delivered-To: Bob-A-b-C@mx.Example.test\n"
    assert env["RPLINE"] == "Return-Path: <joe@example.org>\n"
    assert re.fullmatch(r"From joe@example.org \w{3} \w{3} \d\d [\d:]{8} \d{4}\n", env["UFLINE"])
    assert env["QMAILHOME"] == str(qmail_home)


@pytest.mark.parametrize(
    ("code", "want"),
    [(100, 100), (64, 100), (65, 100), (70, 100), (76, 100), (77, 100), (78, 100), (112, 100)]
    + [(111, 111), (1, 111), (2, 111), (75, 111), (101, 111)],
)
def test_program_exit_codes(qmail_home: Path, bob: Path, code: int, want: int) -> None:
    write_qmail(bob / ".qmail", f"|echo program says hi; exit {code}\n./Maildir/\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == want
    # the program's output is the report; qmail-local adds nothing of its own
    assert r.stdout == b"program says hi\n" and r.stderr == b""
    assert os.listdir(bob / "Maildir" / "new") == []


def test_program_exit_99_skips_following_lines_but_forwards(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "&carol@example.test\n|exit 99\n./Maildir/\n&dave@example.test\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 0
    assert re.fullmatch(rb"did 0\+1\+1\nqp \d+\n", r.stdout), r.stdout
    assert os.listdir(bob / "Maildir" / "new") == []
    (q,) = queued(qmail_home)
    assert q.recipients == ["carol@example.test"]


def test_crashing_program(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "|kill -9 $$\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert (r.returncode, r.stderr) == (111, b"Aack, child crashed. (#4.3.0)\n")


def test_program_output_comes_before_summary(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "|echo one\n|echo two >&2\n./Maildir/\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 0
    assert r.stdout == b"one\ndid 1+0+2\n" and r.stderr == b"two\n"


def test_later_failure_stops_everything_including_forwards(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "&carol@example.test\n./Maildir/\n|exit 100\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 100
    assert queued(qmail_home) == []


# -- forwarding -------------------------------------------------------------------------


def test_forwards_are_queued_once_with_dtline(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "&carol@example.test\ndave@example.net   \n# not me\n")
    r = run_local(qmail_home, bob, "bob", MSG, sender="joe@example.org")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(rb"did 0\+2\+0\nqp (\d+)\n", r.stdout)
    assert m, r.stdout
    (q,) = queued(qmail_home)
    assert q.sender == "joe@example.org"
    assert q.recipients == ["carol@example.test", "dave@example.net"]
    assert strip_received(q.message) == b"Delivered-To: bob@example.test\n" + MSG
    assert f"(qmail {m.group(1).decode()} invoked by uid {os.getuid()})".encode() in q.message


@pytest.mark.parametrize(
    ("files", "sender", "want"),
    [
        ([], "joe@example.org", "joe@example.org"),
        ([".qmail-list-owner"], "joe@example.org", "bob-list-owner@example.test"),
        (
            [".qmail-list-owner", ".qmail-list-owner-default"],
            "joe@example.org",
            "bob-list-owner-@example.test-@[]",
        ),
        ([".qmail-list-owner"], "", ""),
        ([".qmail-list-owner"], "#@[]", "#@[]"),
    ],
)
def test_newsender_from_owner_files(
    qmail_home: Path, bob: Path, files: list[str], sender: str, want: str
) -> None:
    write_qmail(bob / ".qmail-list", "&a@example.net\n")
    for name in files:
        write_qmail(bob / name, "./Maildir/\n")
    r = run_local(qmail_home, bob, "bob-list", MSG, dash="-", ext="list", sender=sender)
    assert r.returncode == 0, r.stderr
    (q,) = queued(qmail_home)
    assert q.sender == want


def test_forward_failure_reports_qq_text(qmail_home: Path, bob: Path, tmp_path: Path) -> None:
    write_qmail(bob / ".qmail", "&carol@example.test\n")
    for code, want_exit, text in (
        (
            31,
            100,
            b"Unable to forward message: mail server permanently rejected message (#5.3.0).\n",
        ),
        (53, 111, b"Unable to forward message: qq write error or disk full (#4.3.0).\n"),
    ):
        fake = tmp_path / f"qq{code}"
        fake.write_text(f"#!/bin/sh\ncat >/dev/null\nexit {code}\n")
        fake.chmod(0o755)
        r = run_local(qmail_home, bob, "bob", MSG, env={"QMAILQUEUE": str(fake)})
        assert (r.returncode, r.stderr) == (want_exit, text)
        assert r.stdout == b""


# -- finding the .qmail file ------------------------------------------------------------


def test_extension_default_files_and_DEFAULT(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail-list-default", '|printf "list:%s" "$DEFAULT" > out\n')
    write_qmail(bob / ".qmail-default", '|printf "any:%s" "$DEFAULT" > out\n')
    write_qmail(bob / ".qmail-x:y", '|printf "dots:%s" "${DEFAULT-unset}" > out\n')
    cases = [
        ("List-Python-Dev", "list:Python-Dev"),
        ("list-", "list:"),
        ("other", "any:other"),
        ("X.Y", "dots:unset"),
    ]
    for ext, want in cases:
        r = run_local(qmail_home, bob, f"bob-{ext}", MSG, dash="-", ext=ext)
        assert r.returncode == 0, (ext, r.stderr)
        assert (bob / "out").read_text() == want


def test_no_file_for_extension_bounces(qmail_home: Path, bob: Path) -> None:
    r = run_local(qmail_home, bob, "bob-nope", MSG, dash="-", ext="nope")
    assert (r.returncode, r.stderr) == (100, b"Sorry, no mailbox here by that name. (#5.1.1)\n")


def test_directory_named_like_qmail_file_counts_as_absent(qmail_home: Path, bob: Path) -> None:
    (bob / ".qmail-dir").mkdir()
    write_qmail(bob / ".qmail-default", "./Maildir/\n")
    r = run_local(qmail_home, bob, "bob-dir", MSG, dash="-", ext="dir")
    assert r.returncode == 0 and r.stdout == b"did 1+0+0\n"


def test_empty_qmail_file_means_defaultdelivery(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "", mode=0o744)  # x bit ignored for an empty file
    r = run_local(qmail_home, bob, "bob", MSG, defaultdelivery="./mbox")
    assert r.returncode == 0 and r.stdout == b"did 1+0+0\n"
    assert len(mailbox.mbox(bob / "mbox", create=False)) == 1


def test_exact_default_file_sets_DEFAULT_to_its_tail(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail-default", '|printf "%s" "$DEFAULT" > out\n')
    r = run_local(qmail_home, bob, "bob-Default", MSG, dash="-", ext="Default")
    assert r.returncode == 0
    assert (bob / "out").read_text() == "Default"


# -- loop detection ---------------------------------------------------------------------


def test_delivered_to_loop(qmail_home: Path, bob: Path) -> None:
    looping = b"Received: x\nDelivered-To: bob@example.test\nSubject: s\n\nbody\n"
    r = run_local(qmail_home, bob, "bob", looping)
    assert r.returncode == 100
    assert r.stderr == b"This message is looping: it already has my Delivered-To line. (#5.4.6)\n"
    assert os.listdir(bob / "Maildir" / "new") == []


@pytest.mark.parametrize(
    "message",
    [
        b"Delivered-To: Bob@example.test\n\nbody\n",  # case differs
        b"Delivered-To: bob@example.test.org\n\n",
        b"Subject: s\n\nDelivered-To: bob@example.test\n",  # in the body
    ],
)
def test_not_a_loop(qmail_home: Path, bob: Path, message: bytes) -> None:
    assert run_local(qmail_home, bob, "bob", message).returncode == 0


def test_print_mode_skips_loop_check_and_lists_instructions(qmail_home: Path, bob: Path) -> None:
    write_qmail(
        bob / ".qmail",
        "# comment\n./Maildir/\n/var/mail/bob\n|preline procmail\n&a@b.example\nc@d.example\n",
    )
    looping = b"Delivered-To: bob@example.test\n\nx\n"
    r = run_local(qmail_home, bob, "bob", looping, options=["-n"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        b"maildir ./Maildir/\nmbox /var/mail/bob\nprogram preline procmail\n"
        b"forward a@b.example\nforward c@d.example\ndid 2+2+1\n"
    )
    assert os.listdir(bob / "Maildir" / "new") == []
    assert queued(qmail_home) == []


# -- safety checks ----------------------------------------------------------------------


def test_writable_qmail_file_refused(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "./Maildir/\n", mode=0o646)
    r = run_local(qmail_home, bob, "bob", MSG)
    assert (r.returncode, r.stderr) == (111, b"Uh-oh: .qmail file is writable. (#4.7.0)\n")


def test_writable_home_refused(qmail_home: Path, bob: Path) -> None:
    os.chmod(bob, 0o757)
    r = run_local(qmail_home, bob, "bob", MSG)
    assert (r.returncode, r.stderr) == (111, b"Uh-oh: home directory is writable. (#4.7.0)\n")


def test_sticky_home_defers_but_print_mode_warns(qmail_home: Path, bob: Path) -> None:
    os.chmod(bob, 0o1755)
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 111
    assert r.stderr == b"Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n"
    r = run_local(qmail_home, bob, "bob", MSG, options=["-n"])
    assert (r.returncode, r.stderr) == (0, b"Warning: home directory is sticky.\n")


def test_missing_home(qmail_home: Path, tmp_path: Path) -> None:
    r = run_local(qmail_home, tmp_path / "gone", "bob", MSG)
    assert r.returncode == 111
    assert (
        r.stderr
        == f"Unable to switch to {tmp_path}/gone: No such file or directory. (#4.3.0)\n".encode()
    )


def test_blank_first_line(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "\n./Maildir/\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert (r.returncode, r.stderr) == (
        111,
        b"Uh-oh: first line of .qmail file is blank. (#4.2.1)\n",
    )
    # blank lines further down are fine, and so are spaces after an instruction
    write_qmail(bob / ".qmail", "./Maildir/ \t\n\n")
    assert run_local(qmail_home, bob, "bob", MSG).stdout == b"did 1+0+0\n"


def test_unknown_plus_line_ignored_and_plus_list_forward_only(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "+whatever\n./Maildir/\n")
    assert run_local(qmail_home, bob, "bob", MSG).stdout == b"did 1+0+0\n"
    write_qmail(bob / ".qmail", "+list\n./Maildir/\n")
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 111
    assert r.stderr == b"Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"


def test_x_bit_means_forward_only(qmail_home: Path, bob: Path) -> None:
    write_qmail(bob / ".qmail", "|true\n", mode=0o744)
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 111
    assert r.stderr == b"Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n"
    write_qmail(bob / ".qmail", "&carol@example.test\n", mode=0o744)
    r = run_local(qmail_home, bob, "bob", MSG)
    assert r.returncode == 0 and r.stdout.startswith(b"did 0+1+0\nqp ")


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [[], ["bob"], ["bob", "relative/home", "bob", "", "", "d", "s", "./Maildir/"], ["-x"]],
)
def test_usage_errors(args: list[str]) -> None:
    r = subprocess.run([bin_path("qmail-local"), *args], capture_output=True, timeout=30)
    assert r.returncode == 100
    assert r.stderr == (
        b"qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender "
        b"aliasempty\n"
    )
