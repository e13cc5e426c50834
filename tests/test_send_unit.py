"""qmail-send's pure rules: rewriting, VERP, retry schedule, bounce paragraphs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyqmail.control import SendControls
from pyqmail.send import (
    LOCAL,
    REMOTE,
    QmailSend,
    bounce_paragraph,
    next_retry,
    rewrite_recipient,
    strip_virtual,
    verp_sender,
)


@pytest.fixture
def ctl(qmail_home: Path) -> SendControls:
    c = qmail_home / "control"
    (c / "percenthack").write_text("example.test\n")
    (c / "virtualdomains").write_text(
        "# virtual users\nvirt.test:joe-v\nbob@one.test:bobby\n.sub.test:subby\nnot.virt.test:\n"
    )
    return SendControls.load(qmail_home)


def test_locals_are_local_case_insensitively(ctl: SendControls) -> None:
    assert rewrite_recipient(ctl, "Bob@Example.TEST") == (LOCAL, "Bob@Example.TEST")
    assert rewrite_recipient(ctl, "bob@elsewhere.test") == (REMOTE, "bob@elsewhere.test")


def test_envnoathost_completes_bare_names(ctl: SendControls) -> None:
    assert rewrite_recipient(ctl, "bob") == (LOCAL, "bob@mx.example.test")


def test_percent_hack_repeats_while_domain_listed(ctl: SendControls) -> None:
    assert rewrite_recipient(ctl, "a%b%example.test@example.test") == (REMOTE, "a@b")
    assert rewrite_recipient(ctl, "a%far.test@example.test") == (REMOTE, "a@far.test")


def test_virtualdomains_key_order(ctl: SendControls) -> None:
    assert rewrite_recipient(ctl, "info@virt.test") == (LOCAL, "joe-v-info@virt.test")
    # the whole address beats the domain
    assert rewrite_recipient(ctl, "bob@one.test") == (LOCAL, "bobby-bob@one.test")
    assert rewrite_recipient(ctl, "x@a.b.sub.test") == (LOCAL, "subby-x@a.b.sub.test")
    # an empty prepend is an explicit exception: remote
    assert rewrite_recipient(ctl, "x@not.virt.test") == (REMOTE, "x@not.virt.test")


def test_strip_virtual_for_bounce_text(ctl: SendControls) -> None:
    assert strip_virtual(ctl, "joe-v-info@virt.test") == "info@virt.test"
    assert strip_virtual(ctl, "bob@example.test") == "bob@example.test"


def test_verp_expansion() -> None:
    assert (
        verp_sender("list-owner-@example.org-@[]", "joe@a.net")
        == "list-owner-joe=a.net@example.org"
    )
    assert verp_sender("plain@example.org", "joe@a.net") == "plain@example.org"
    assert verp_sender("", "joe@a.net") == ""


@pytest.mark.parametrize(
    ("channel", "ages"),
    [(LOCAL, [0, 100, 400, 900, 1600, 2500]), (REMOTE, [0, 400, 1600, 3600, 6400, 10000])],
)
def test_retry_schedule_matches_qmail(channel: int, ages: list[int]) -> None:
    birth = 1_000_000.0
    for this_age, following in zip(ages, ages[1:], strict=False):
        assert next_retry(birth, birth + this_age, channel) == birth + following


def test_retry_with_birth_in_future_uses_zero_age() -> None:
    assert next_retry(2000.0, 1000.0, LOCAL) == 2100.0


def test_bounce_paragraph_neutralises_blank_lines() -> None:
    text = bounce_paragraph("bob@example.test", "first\n\nsecond")
    assert text == "<bob@example.test>:\nfirst\n/second\n\n"
    assert bounce_paragraph("a\nb@x", "") == "<a_b@x>:\n\n"


def test_todo_scan_takes_each_entry_once_until_it_is_let_go(qmail_home: Path) -> None:
    from pyqmail.send import QmailSend

    fds = [os.pipe() for _ in range(4)]
    try:
        send = QmailSend(
            qmail_home, fds[0][1], (fds[1][0], fds[1][1]), (fds[2][0], fds[2][1]), fds[3]
        )
        todo = qmail_home / "queue" / "todo"
        for name in ("5", "17", "0123", "x1"):
            (todo / name).write_bytes(b"")
        send.scan_todo()
        # names qmail never writes (leading zeros, not a number) are not messages
        assert send.todo == [5, 17]
        send.scan_todo()
        assert send.todo == [5, 17]  # still waiting: not taken twice
        # preprocessing fails (no mess file): the entries are let go and found again
        send.todo = []
        send.preprocess_batch([5, 17])
        assert send.provisional == {}
        send.scan_todo()
        assert send.todo == [5, 17]
    finally:
        for r, w in fds:
            os.close(r)
            os.close(w)


def _send_on_pipes(home: Path, fds: list[tuple[int, int]], now: list[float]) -> QmailSend:
    """A QmailSend whose log, spawners and qmail-clean are pipes, on a clock set by now[0]."""
    from pyqmail.send import QmailSend

    return QmailSend(
        home,
        fds[0][1],
        (fds[1][0], fds[1][1]),
        (fds[2][0], fds[2][1]),
        fds[3],
        clock=lambda: now[0],
    )


def test_triggers_close_together_share_one_todo_scan(qmail_home: Path) -> None:
    from pyqmail.send import TODO_SCAN_GAP

    now = [1000.0]
    fds = [os.pipe() for _ in range(4)]
    send = _send_on_pipes(qmail_home, fds, now)
    send.wake_r = fds[0][0]  # nothing arrives there
    send.open_trigger()
    trigger = os.open(qmail_home / "queue" / "lock" / "trigger", os.O_WRONLY | os.O_NONBLOCK)

    def pull_trigger_at(t: float) -> float:
        now[0] = t
        send.todo_scan_at = t + 1500  # as after a scan
        os.write(trigger, b"\0")
        send.wait(0)
        return send.todo_scan_at

    try:
        # after a quiet spell the scan is due at once
        send.todo_scanned_at = 1000.0
        assert pull_trigger_at(1000.5) == 1000.5
        # soon after a scan it waits for the end of the gap, so later triggers join it
        send.todo_scanned_at = 1000.5
        assert pull_trigger_at(1000.502) == pytest.approx(1000.5 + TODO_SCAN_GAP)
        # and the loop wakes up for it then, without qmail's extra second of sleep
        send.cleanup_at = 5000.0
        assert send.timeout(1000.502) == pytest.approx(TODO_SCAN_GAP - 0.002)
        # a clock that stepped back never puts the scan off by more than the gap
        send.todo_scanned_at = 5000.0
        assert pull_trigger_at(1001.0) == pytest.approx(1001.0 + TODO_SCAN_GAP)
    finally:
        os.close(trigger)
        for fd in (send.trigger_fd, send.trigger_keep):
            os.close(fd)
        for r, w in fds:
            os.close(r)
            os.close(w)


def test_a_finished_messages_files_are_reused_only_once_their_removal_is_durable(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyqmail import send as send_module
    from pyqmail.constants import SLEEP_SYSFAIL, SPLIT
    from pyqmail.send import FINISHED_HOLD

    now = [1000.0]
    fds = [os.pipe() for _ in range(4)]
    send = _send_on_pipes(qmail_home, fds, now)
    events: list[str] = []
    monkeypatch.setattr(send, "clean_later", lambda command: events.append(f"clean {command}"))
    outcome = [False]

    def recording_sync(target: int | str) -> bool:
        events.append(f"fsync {target}")
        return outcome[0]

    monkeypatch.setattr(send_module, "_sync_one", recording_sync)
    queue = qmail_home / "queue"
    n = 4711
    info_dir = queue / "info" / str(n % SPLIT)
    (info_dir / str(n)).write_bytes(b"Fa@example.test\0")
    try:
        assert send.message_done(n)
        # its info file is in the pool, but neither it nor the mess file may be reused yet
        assert not (info_dir / str(n)).exists()
        assert events == []
        assert send.spares.take(str(queue / "info" / "0" / "99")) is None
        assert send.release_at == 1000.0 + FINISHED_HOLD
        send.cleanup_at = send.todo_scan_at = 5000.0
        assert send.timeout(1000.0) <= FINISHED_HOLD + 1.5  # the loop wakes up for it
        # the fsync fails: everything stays held and is tried again later
        now[0] = 1000.0 + FINISHED_HOLD
        assert not send.release_finished()
        assert events == [f"fsync {info_dir}"]
        assert send.release_at == now[0] + SLEEP_SYSFAIL
        assert send.spares.take(str(queue / "info" / "0" / "99")) is None
        # once the directory is on disk, foop/N goes to qmail-clean and the spare is free
        events.clear()
        outcome[0] = True
        assert send.release_finished()
        assert events == [f"fsync {info_dir}", f"clean foop/{n}"]
        assert send.release_at is None
        send.spares.empty_until[False] = 0.0  # it looked a moment ago and found none
        fd = send.spares.take(str(queue / "info" / "0" / "99"))
        assert fd is not None
        os.close(fd)
    finally:
        send.syncer.shutdown()
        for r, w in fds:
            os.close(r)
            os.close(w)


def test_leftovers_of_a_number_are_unlinked_unless_this_process_finished_it(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash may leave a number's info, channel and bounce files behind, so preprocessing
    unlinks them; after a message this process finished there are none, and message
    numbers come back all the time (mess files are reused), so then it does not look."""
    from pyqmail.queue import rel

    now = [1000.0]
    fds = [os.pipe() for _ in range(4)]
    send = _send_on_pipes(qmail_home, fds, now)
    send.reread()
    queue = qmail_home / "queue"
    n = 4712

    def queue_file(kind: str) -> Path:
        return queue / rel(kind, n)

    def new_message(recipient: str) -> None:
        queue_file("mess").write_bytes(b"Subject: hi\n\nhello\n")
        queue_file("todo").write_bytes(f"u0\0p1\0Fa@example.test\0T{recipient}\0".encode())

    unlinked: list[str] = []
    real_unlink = os.unlink

    def recording_unlink(path: str | os.PathLike[str], *args: object, **kw: object) -> None:
        unlinked.append(os.fspath(path))
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", recording_unlink)
    try:
        # a crash's leftovers: all four go, and the channel file is the new message's
        new_message("alice@example.test")
        for kind in ("local", "remote", "info", "bounce"):
            queue_file(kind).write_bytes(b"from before the crash")
        p = send.prepare(n)
        assert p is not None
        for fd in p.fds.values():
            os.close(fd)
        assert not queue_file("remote").exists() and not queue_file("bounce").exists()
        assert queue_file("local").read_bytes() == b"Talice@example.test\0"
        assert sorted(unlinked) == sorted(
            str(queue_file(k)) for k in ("local", "remote", "info", "bounce")
        )
        # delivered and finished here
        queue_file("local").unlink()
        queue_file("todo").unlink()
        assert send.message_done(n)
        assert not queue_file("info").exists()
        # the number comes back with a new message: nothing of it to unlink
        unlinked.clear()
        new_message("bob@example.test")
        p = send.prepare(n)
        assert p is not None
        for fd in p.fds.values():
            os.close(fd)
        assert unlinked == []
        assert queue_file("local").read_bytes() == b"Tbob@example.test\0"
        assert queue_file("info").read_bytes() == b"Fa@example.test\0"
        # but only once: preprocessed again (its todo entry could not go), it looks again
        assert send.prepare(n) is not None
        assert len(unlinked) == 4
    finally:
        send.syncer.shutdown()
        for r, w in fds:
            os.close(r)
            os.close(w)


def test_a_finished_messages_todo_removal_is_not_waited_for(qmail_home: Path) -> None:
    """qmail-send asks qmail-clean to remove a finished provisional message's todo entry
    and goes on; the message is finished when the answer comes (retried if it failed)."""
    import signal

    from pyqmail.constants import SLEEP_SYSFAIL
    from pyqmail.queue import rel
    from pyqmail.send import QmailSend

    now = [1000.0]
    log_r, log_w = os.pipe()
    spawn_pipes = [os.pipe() for _ in range(3)]  # the third: wake-ups, none come
    cmd_r, cmd_w = os.pipe()  # what qmail-send asks qmail-clean
    reply_r, reply_w = os.pipe()  # qmail-clean's answers, written by this test
    os.set_blocking(log_r, False)
    os.set_blocking(cmd_r, False)
    send = QmailSend(
        qmail_home,
        log_w,
        spawn_pipes[0],
        spawn_pipes[1],
        (cmd_w, reply_r),
        clock=lambda: now[0],
    )
    send.reread()
    send.wake_r = spawn_pipes[2][0]
    for ch in send.channels:
        ch.concurrency = 0  # no deliveries here: the test says which are done
    send.todo_scan_at = send.cleanup_at = send.provisional_check_at = 5000.0
    queue = qmail_home / "queue"

    class Blocked(Exception):
        """Not an OSError, which qmail-send would take for a lost qmail-clean."""

    def blocked(signum: int, frame: object) -> None:
        raise Blocked("qmail-send waited for qmail-clean")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        numbers = [4713, 4714]
        for n in numbers:
            (queue / rel("mess", n)).write_bytes(b"Subject: hi\n\nhello\n")
            (queue / rel("todo", n)).write_bytes(b"u0\0p1\0Fa@example.test\0Tbob@example.test\0")
        send.scan_todo()
        assert send.todo == numbers
        send.preprocess_batch(send.todo)
        send.todo = []
        assert sorted(send.provisional) == numbers
        for n in numbers:  # delivered: the local channel file is gone
            (queue / rel("local", n)).unlink()
            assert send.message_done(n)
        assert send.finishing == numbers
        send.step(now[0])
        # asked, not waited for: both are still provisional, with their todo entries held
        assert os.read(cmd_r, 4096) == b"".join(b"todo/%d\0" % n for n in numbers)
        assert sorted(send.provisional) == numbers and send.todo_held >= {str(n) for n in numbers}
        # asked once: another look at them while qmail-clean works adds nothing
        for n in numbers:
            assert send.message_done(n)
        assert send.finishing == [] and not send.to_commit
        send.step(now[0])
        with pytest.raises(BlockingIOError):
            os.read(cmd_r, 4096)
        # the first removal worked, the second did not
        os.write(reply_w, b"+-")
        send.wait(0)
        assert send.timeout(now[0]) == 0.0
        send.step(now[0])
        send.flush_log()
        log = os.read(log_r, 65536).decode()
        assert "end msg 4713" in log and "end msg 4714" not in log
        assert "qmail-clean unable to clean up todo/4714" in log
        assert 4713 not in send.provisional and not (queue / rel("info", 4713)).exists()
        # the second stays provisional, its files in place, and is tried again later
        assert 4714 in send.provisional and (queue / rel("info", 4714)).exists()
        assert (now[0] + SLEEP_SYSFAIL, 4714) in send.done_checks
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        send.syncer.shutdown()
        for fd in (log_r, log_w, cmd_r, cmd_w, reply_r, reply_w):
            os.close(fd)
        for r, w in spawn_pipes:
            os.close(r)
            os.close(w)
