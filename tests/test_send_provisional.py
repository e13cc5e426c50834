"""qmail-send's provisional preprocessing: a message keeps its todo entry until it is
finished, or until it is deferred, fails, has one delivery done while others remain, or is
still queued at a stop; its info and channel files are fsync'd only then."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from _mta import MTA, add_user, maildir_count, msg, queue_empty, queue_files, sendmail, wait_for
from pyqmail.qq import queue_message
from pyqmail.send import COMMIT_BATCH

EXTRA = COMMIT_BATCH + 20

SLOW = (
    # started, then waits for the go-ahead (bounded: 20 s)
    "|touch {started}; i=0; while [ ! -f {go} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); "
    "done; cat >> {seen}\n"
)


def _lone_envelopes(home: Path) -> bool:
    """No envelope in intd/ is still linked into todo/ (qmail-clean keeps the files
    themselves, for the next message of their number: see pyqmail.spare)."""
    intd = home / "queue" / "intd"
    return all(os.stat(intd / name).st_nlink == 1 for name in os.listdir(intd))


def _names(home: Path, kind: str) -> list[str]:
    if kind in ("todo", "intd"):
        return os.listdir(home / "queue" / kind)
    return [name for d in (home / "queue" / kind).iterdir() for name in os.listdir(d)]


def _slow_user(home: Path, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    bob = add_user(home, "bob@example.test")
    started, go, seen = tmp_path / "started", tmp_path / "go", tmp_path / "seen"
    (bob / ".qmail-slow").write_text(SLOW.format(started=started, go=go, seen=seen))
    return bob, started, go, seen


def _send(home: Path, rcpts: list[str], subject: str, started: Path | None = None) -> None:
    """Queue a message; with started, wait until its slow delivery runs."""
    result = sendmail(home, ["-f", "joe@example.test", *rcpts], msg(subject))
    assert result.returncode == 0, result.stderr
    if started is not None:
        wait_for(started.exists, what="the slow delivery to start")


def test_a_message_in_its_first_pass_keeps_its_todo_entry_until_finished(
    qmail_home: Path, tmp_path: Path
) -> None:
    _bob, started, go, seen = _slow_user(qmail_home, tmp_path)
    with MTA(qmail_home) as mta:
        _send(qmail_home, ["bob-slow@example.test"], "first pass", started)
        (n,) = _names(qmail_home, "info")
        # preprocessed (info and local written) while the todo entry still stands
        assert _names(qmail_home, "todo") == [n] and _names(qmail_home, "local") == [n]
        go.touch()
        wait_for(lambda: queue_empty(qmail_home), what="the queue to empty")
        mta.stop()
        assert queue_files(qmail_home) == []
        assert seen.read_bytes().count(b"Subject: first pass") == 1
        assert f"end msg {n}" in mta.log()


def test_a_message_not_delivered_in_one_go_is_committed_at_its_first_success(
    qmail_home: Path, tmp_path: Path
) -> None:
    bob, started, go, seen = _slow_user(qmail_home, tmp_path)
    mta = MTA(qmail_home).start()
    try:
        _send(qmail_home, ["bob-slow@example.test", "bob@example.test"], "two", started)
        wait_for(lambda: maildir_count(bob / "Maildir") == 1, what="bob's copy")
        # bob's delivery is done while the other one runs: the message is made durable
        # and leaves todo, so a crash now cannot repeat bob's copy
        wait_for(lambda: _names(qmail_home, "todo") == [], what="the commit")
        (n,) = _names(qmail_home, "info")
        assert _names(qmail_home, "local") == [n]
        mta.kill9()
        go.touch()
        mta.start()
        wait_for(lambda: queue_empty(qmail_home), what="the queue to empty")
        mta.stop()
    finally:
        mta.stop()
    assert maildir_count(bob / "Maildir") == 1
    # the killed slow delivery never finished: it was made again, once
    assert seen.read_bytes().count(b"Subject: two") == 1


def test_a_deferral_commits_the_message_as_qmail_leaves_it(qmail_home: Path) -> None:
    bob = add_user(qmail_home, "bob@example.test")
    (bob / ".qmail-later").write_text("|echo 'not yet'; exit 111\n")
    with MTA(qmail_home) as mta:
        _send(qmail_home, ["bob-later@example.test", "bob@example.test"], "deferred")
        wait_for(lambda: "deferral: not_yet/" in mta.log(), what="the deferral")
        wait_for(lambda: _names(qmail_home, "todo") == [], what="the todo entry to go")
        (n,) = _names(qmail_home, "info")
        assert _names(qmail_home, "local") == [n] and _lone_envelopes(qmail_home)
        assert maildir_count(bob / "Maildir") == 1
    # the restart finds it as a deferred message, not a new one: only the deferred
    # recipient is tried again
    mta = MTA(qmail_home)
    starts = mta.log().count("status: local")
    with mta:
        # start() may return on the last run's lines: wait for this qmail-send
        wait_for(lambda: mta.log().count("status: local") > starts, what="the restart")
        assert mta.proc is not None
        mta.proc.send_signal(signal.SIGALRM)  # retry now
        wait_for(lambda: mta.log().count("deferral: not_yet/") == 2, what="the retry")
        assert mta.log().count(f"new msg {n}") == 1
    assert maildir_count(bob / "Maildir") == 1


def test_a_crash_during_the_first_pass_leaves_the_message_whole_in_todo(
    qmail_home: Path, tmp_path: Path
) -> None:
    _bob, started, go, seen = _slow_user(qmail_home, tmp_path)
    mta = MTA(qmail_home).start()
    try:
        _send(qmail_home, ["bob-slow@example.test"], "crash", started)
        mta.kill9()
        # nothing of it was made durable but its todo entry: it is preprocessed again
        assert len(_names(qmail_home, "todo")) == 1
        go.touch()
        mta.start()
        wait_for(lambda: queue_empty(qmail_home), what="the queue to empty")
        mta.stop()
    finally:
        mta.stop()
    assert seen.read_bytes().count(b"Subject: crash") == 1
    assert queue_files(qmail_home) == []


def test_a_stop_commits_what_is_still_provisional_and_nothing_is_delivered_twice(
    qmail_home: Path, tmp_path: Path
) -> None:
    bob, started, go, seen = _slow_user(qmail_home, tmp_path)
    # one delivery at a time: bob's waits behind the slow one when the stop comes
    (qmail_home / "control" / "concurrencylocal").write_text("1\n")
    mta = MTA(qmail_home).start()
    try:
        _send(qmail_home, ["bob-slow@example.test", "bob@example.test"], "stop", started)
        # and more waiting messages than qmail-send commits in one batch
        for i in range(EXTRA):
            queued = queue_message(
                qmail_home, msg(f"extra {i}"), "joe@example.test", ["bob@example.test"]
            )
            assert queued.ok, queued
        wait_for(lambda: len(_names(qmail_home, "info")) == 1 + EXTRA, what="preprocessing")
        assert maildir_count(bob / "Maildir") == 0
        assert len(_names(qmail_home, "todo")) == 1 + EXTRA
        assert mta.proc is not None
        mta.proc.terminate()  # pyqmail run passes it on; qmail-send waits for the slow one
        time.sleep(1.0)  # the TERM is in before the slow delivery ends and frees the slot
        go.touch()
        assert mta.stop() == 0
        # committed: no todo entry, info and the local files (with the done mark) remain
        assert _names(qmail_home, "todo") == [] and _lone_envelopes(qmail_home)
        assert len(_names(qmail_home, "info")) == 1 + EXTRA
        assert sorted(_names(qmail_home, "local")) == sorted(_names(qmail_home, "info"))
        assert seen.read_bytes().count(b"Subject: stop") == 1
        assert maildir_count(bob / "Maildir") == 0
        mta.start()
        wait_for(lambda: maildir_count(bob / "Maildir") == 1 + EXTRA, what="bob's deliveries")
        wait_for(lambda: queue_empty(qmail_home), what="the queue to empty")
        mta.stop()
    finally:
        mta.stop()
    # the slow recipient was marked done before the stop: not delivered again
    assert seen.read_bytes().count(b"Subject: stop") == 1
    assert maildir_count(bob / "Maildir") == 1 + EXTRA
