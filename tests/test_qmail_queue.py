"""qmail-queue's protocol, exit codes and on-disk result, through the real program."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from _mta import bin_path, queue_files
from pyqmail import spare
from pyqmail.qq import InProcessQueue, QueueClient, qq_text, queue_message


def run_qq(home: Path, message: bytes, envelope: bytes, env: dict[str, str] | None = None) -> int:
    """Run the qmail-queue program with the message on fd 0 and the envelope on fd 1."""
    msg_r, msg_w = os.pipe()
    env_r, env_w = os.pipe()
    proc = subprocess.Popen(
        [bin_path("qmail-queue")],
        stdin=msg_r,
        stdout=env_r,
        env=dict(os.environ, QMAILHOME=str(home), **(env or {})),
    )
    os.close(msg_r)
    os.close(env_r)
    try:
        os.write(msg_w, message)
    finally:
        os.close(msg_w)
    try:
        os.write(env_w, envelope)
    except BrokenPipeError:
        pass
    finally:
        os.close(env_w)
    return proc.wait(30)


def todo_entries(home: Path) -> list[bytes]:
    todo = home / "queue" / "todo"
    return [(todo / n).read_bytes() for n in os.listdir(todo)]


def test_queues_message_with_received_line(qmail_home: Path) -> None:
    code = run_qq(qmail_home, b"Subject: x\n\nbody\n", b"Fjoe@a.test\0Tbob@example.test\0\0")
    assert code == 0
    (entry,) = todo_entries(qmail_home)
    uid = os.getuid()
    assert entry.startswith(b"u%d\0p" % uid)
    assert entry.endswith(b"\0Fjoe@a.test\0Tbob@example.test\0")
    (n,) = os.listdir(qmail_home / "queue" / "todo")
    mess = qmail_home / "queue" / "mess" / str(int(n) % 23) / n
    assert mess.stat().st_ino == int(n)  # the message number is the inode
    text = mess.read_bytes()
    assert text.startswith(b"Received: (qmail ")
    assert f"invoked by uid {uid}); ".encode() in text.split(b"\n", 1)[0]
    assert text.endswith(b"\nSubject: x\n\nbody\n")
    assert os.path.exists(qmail_home / "queue" / "intd" / n)  # left for qmail-clean


def test_zero_recipients_and_null_sender_are_accepted(qmail_home: Path) -> None:
    assert run_qq(qmail_home, b"x\n", b"F\0\0") == 0
    (entry,) = todo_entries(qmail_home)
    assert entry.endswith(b"\0F\0")


@pytest.mark.parametrize(
    ("envelope", "code"),
    [
        (b"Xjoe@a.test\0Tbob@b.test\0\0", 91),  # must start with F
        (b"Fjoe@a.test\0Zbob@b.test\0\0", 91),  # unknown record letter
        (b"Fjoe@a.test\0Tbob@b.test\0", 54),  # no terminating NUL: truncated envelope
        (b"", 54),
        (b"F" + b"a" * 1003 + b"\0\0", 11),  # address too long
    ],
)
def test_bad_envelopes_are_refused_and_nothing_is_queued(
    qmail_home: Path, envelope: bytes, code: int
) -> None:
    assert run_qq(qmail_home, b"Subject: x\n\nbody\n", envelope) == code
    assert todo_entries(qmail_home) == []


def test_read_errors_remove_the_half_message(qmail_home: Path) -> None:
    assert run_qq(qmail_home, b"partial", b"Fjoe@a.test\0Tb") == 54
    assert queue_files(qmail_home) == []


def test_missing_home_is_exit_61(tmp_path: Path) -> None:
    assert run_qq(tmp_path / "nowhere", b"x", b"F\0\0") == 61


def test_missing_queue_is_exit_62(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    assert run_qq(tmp_path / "home", b"x", b"F\0\0") == 62


def test_qq_client_texts_and_qmailqueue(
    qmail_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert qq_text(0) == ""
    assert qq_text(11) == "Denvelope address too long for qq (#5.1.3)"
    assert qq_text(31).startswith("D") and qq_text(71).startswith("Z")
    assert qq_text(35) == "Dqq permanent problem (#5.3.0)"
    assert qq_text(77) == "Zqq temporary problem (#4.3.0)"
    seen = tmp_path / "seen"
    filt = tmp_path / "filter.sh"
    filt.write_text(f"#!/bin/sh\ncat > {seen}.msg\ncat <&1 > {seen}.env\nexit 31\n")
    filt.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(filt))
    result = queue_message(qmail_home, b"Subject: f\n\n", "a@b.test", ["c@d.test"])
    assert result.code == 31 and result.permanent
    assert result.message == "mail server permanently rejected message (#5.3.0)"
    assert (tmp_path / "seen.msg").read_bytes() == b"Subject: f\n\n"
    assert todo_entries(qmail_home) == []


def test_qmailqueue_that_cannot_run(qmail_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMAILQUEUE", "/nonexistent/filter")
    result = queue_message(qmail_home, b"x", "a@b.test", ["c@d.test"])
    assert result.code == 120 and result.text == "Zunable to exec qq (#4.3.0)"


def test_streaming_client_abort_leaves_nothing(qmail_home: Path) -> None:
    client = QueueClient(qmail_home, invoked="from network")
    client.write(b"Subject: half\n\n" + b"x" * 200_000)
    client.abort()
    assert queue_files(qmail_home) == []


def test_invoked_phrase_from_caller(qmail_home: Path) -> None:
    assert queue_message(qmail_home, b"x\n", "", ["a@b.test"], invoked="from network").ok
    (mess,) = [p for p in (qmail_home / "queue" / "mess").rglob("*") if p.is_file()]
    assert b"invoked from network); " in mess.read_bytes().split(b"\n", 1)[0]


# -- the commit: both files' writes started together, fsync'd, then todo --------------


def _record_commit(
    monkeypatch: pytest.MonkeyPatch, fail_fsync_of: str | None = None
) -> list[tuple[str, int]]:
    """Record writeback starts, fsyncs and links as (call, inode), in the order they happen."""
    from pyqmail import qmail_queue

    events: list[tuple[str, int]] = []
    real_fsync, real_link, real_start = os.fsync, os.link, qmail_queue.start_writeback

    def start(fd: int) -> None:
        events.append(("writeback", os.fstat(fd).st_ino))
        real_start(fd)

    def fsync(fd: int) -> None:
        # the name the file was opened by (a new mess file's is its pid name)
        opened_as = os.readlink(f"/proc/self/fd/{fd}")
        if fail_fsync_of is not None and f"/{fail_fsync_of}/" in opened_as:
            events.append(("fsync failed", os.fstat(fd).st_ino))
            raise OSError(errno.EIO, "simulated disk error")
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    def link(src: str, dst: str) -> None:
        real_link(src, dst)
        kind = dst.split("/queue/", 1)[-1].split("/", 1)[0]  # mess, todo
        events.append(("link " + kind, os.stat(dst).st_ino))

    monkeypatch.setattr(qmail_queue, "start_writeback", start)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    return events


def test_commit_writes_both_files_then_fsyncs_them_then_links_todo(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyqmail import queue

    assert queue._sync_file_range is not None  # Linux: the head start is really taken here
    numbers: list[int] = []
    for round_ in range(2):  # a new mess file, then (with qmail-clean's help) a kept one
        monkeypatch.setattr(spare, "_pools", {})  # no pool listing remembered from before
        events = _record_commit(monkeypatch)
        job = InProcessQueue(qmail_home, "by test")
        job.write(b"Subject: order\n\n" + b"x" * 20_000 + b"\n")
        result = job.finish("joe@a.test", ["bob@example.test"])
        assert result.ok
        n = result.number
        intd = (qmail_home / "queue" / "intd" / str(n)).stat().st_ino
        todo = (qmail_home / "queue" / "todo").stat().st_ino
        order = [e for e in events if e[1] in (n, intd, todo) and e[0] != "link mess"]
        expected = [("writeback", n), ("writeback", intd), ("fsync", n)]
        if round_ == 0:  # a new name in mess/S: that directory is fsync'd too
            mess_dir = (qmail_home / "queue" / "mess" / str(n % 23)).stat().st_ino
            wanted = (n, intd, todo, mess_dir)
            order = [e for e in events if e[1] in wanted and e[0] != "link mess"]
            expected.append(("fsync", mess_dir))
        else:
            assert n == numbers[0]  # the kept mess file was written over, under its name
        numbers.append(n)
        assert order == [*expected, ("fsync", intd), ("link todo", intd), ("fsync", todo)]
        (entry,) = todo_entries(qmail_home)
        assert entry.endswith(b"\0Fjoe@a.test\0Tbob@example.test\0")
        monkeypatch.undo()
        # finished as qmail-send would finish it: the mess file stays, as a spare
        (qmail_home / "queue" / "todo" / str(n)).unlink()
        (qmail_home / "queue" / "intd" / str(n)).unlink()
        spare.pool(str(qmail_home / "queue"), "q").keep_in_place(
            str(qmail_home / "queue" / "mess" / str(n % 23) / str(n)), n
        )


@pytest.mark.parametrize("failing", ["intd", "mess"])
def test_commit_whose_fsync_fails_queues_nothing(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # a reused mess file is opened by its mess name; a new one by its pid name
    queue_message(qmail_home, b"x\n", "a@b.test", ["c@d.test"])  # leaves a spare to reuse
    (entry,) = os.listdir(qmail_home / "queue" / "todo")
    n = int(entry)
    for sub in ("todo", "intd"):
        (qmail_home / "queue" / sub / entry).unlink()
    spare.pool(str(qmail_home / "queue"), "q").keep_in_place(
        str(qmail_home / "queue" / "mess" / str(n % 23) / entry), n
    )
    monkeypatch.setattr(spare, "_pools", {})
    events = _record_commit(monkeypatch, fail_fsync_of=failing)
    job = InProcessQueue(qmail_home, "from network")
    job.write(b"Subject: lost disk\n\nbody\n")
    result = job.finish("joe@a.test", ["bob@example.test"])
    assert (result.code, result.text) == (53, "Zqq write error or disk full (#4.3.0)")
    assert [call for call, _ in events if call.startswith("fsync failed")] == ["fsync failed"]
    assert not [call for call, _ in events if call == "link todo"]
    assert todo_entries(qmail_home) == []
    monkeypatch.undo()
    assert queue_files(qmail_home) == []  # the message and its envelope are gone again


def test_start_writeback_is_only_a_hint(tmp_path: Path) -> None:
    from pyqmail.queue import start_writeback

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        start_writeback(fd)
    finally:
        os.close(fd)
    start_writeback(fd)  # a closed descriptor: nothing raised, the fsync would say it
    start_writeback(-1)
    assert (tmp_path / "f").read_bytes() == b"data"
