"""Recycled queue files (pyqmail.spare): finished files become spares, new files take them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pyqmail import clean, spare
from pyqmail.constants import SPLIT
from pyqmail.qq import InProcessQueue, queue_message
from pyqmail.send import QmailSend


def _pool(tmp_path: Path) -> spare.SparePool:
    (tmp_path / "pool").mkdir()
    return spare.SparePool(str(tmp_path / "pool"))


def test_a_recycled_file_is_taken_back_under_a_new_name_and_overwritten(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    old = tmp_path / "info-1"
    old.write_bytes(b"Fsomeone.with.a.long.name@example.test\0")
    ino = old.stat().st_ino
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    assert pool.recycle(str(old), "info.1")
    assert not old.exists()
    (kept,) = os.listdir(tmp_path / "pool")
    assert kept.startswith("info.1.")
    # kept whole: freeing its blocks is what recycling avoids
    assert (tmp_path / "pool" / kept).stat().st_size > 0

    fresh = tmp_path / "info-2"
    fd = pool.take(str(fresh))
    assert fd is not None
    try:
        new = b"Fnew@example.test\0"
        os.write(fd, new)
        spare.finish(fd, len(new))
    finally:
        os.close(fd)
    st = fresh.stat()
    assert st.st_ino == ino  # the same inode, no allocation
    assert fresh.read_bytes() == b"Fnew@example.test\0"  # nothing of the old tail
    # times are a new file's: qmail-send's birth time and the 36 h cleanup read them
    assert st.st_mtime > time.time() - 60 and st.st_atime > time.time() - 60
    assert os.listdir(tmp_path / "pool") == []


def test_an_empty_or_missing_pool_means_plain_creation(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    assert pool.take(str(tmp_path / "x")) is None
    assert not (tmp_path / "x").exists()
    missing = spare.SparePool(str(tmp_path / "nowhere"))
    assert missing.take(str(tmp_path / "y")) is None
    victim = tmp_path / "done"
    victim.write_bytes(b"data")
    assert not missing.recycle(str(victim), "done.1")  # the caller unlinks it instead
    assert victim.read_bytes() == b"data"


def test_a_spare_that_is_not_clean_is_never_used(tmp_path: Path) -> None:
    # as a power cut may leave it on a filesystem without a journal: a spare name
    # that is a second name of a live message, or something that is not a file
    pool = _pool(tmp_path)
    live = tmp_path / "mess-live"
    live.write_bytes(b"a live message\n")
    os.link(live, tmp_path / "pool" / "mess.7")
    (tmp_path / "pool" / "mess.8").mkdir()
    target = tmp_path / "new-file"
    assert pool.take(str(target)) is None
    assert not target.exists()
    assert live.read_bytes() == b"a live message\n"
    # both are left where they are, untouched
    assert sorted(os.listdir(tmp_path / "pool")) == ["mess.7", "mess.8"]


def test_the_pool_stops_growing_at_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spare, "POOL_MAX", 3)
    pool = _pool(tmp_path)
    kept = 0
    for i in range(6):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        if pool.recycle(str(f), f"f.{i}"):
            kept += 1
        else:
            f.unlink()
    # the limit is checked every few hundred recycles, starting with the first
    assert kept == 6
    pool.recycles = 0
    f = tmp_path / "one-more"
    f.write_bytes(b"x")
    assert not pool.recycle(str(f), "more.1")


def test_queue_files_are_recycled_through_a_message_life(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    first = queue_message(
        qmail_home, b"Subject: one\n\nbody\n", "a@example.test", ["b@example.test"]
    )
    assert first.ok
    (n,) = [int(name) for name in os.listdir(queue / "todo")]
    intd_ino = (queue / "intd" / str(n)).stat().st_ino
    # qmail-send has preprocessed it: qmail-clean removes todo/n, and the envelope
    # file stays at intd/n with its one name left ...
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    assert not (queue / "todo" / str(n)).exists()
    assert (queue / "intd" / str(n)).stat().st_nlink == 1
    # ... and once delivered, the message itself: it stays at its mess name, marked
    # as a spare by a second name in the pool, and its envelope file with it
    mess_path = queue / "mess" / str(n % SPLIT) / str(n)
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert mess_path.stat().st_nlink == 2
    assert os.listdir(queue / "spare" / "q") == [f"m.{n}"]
    assert (queue / "intd" / str(n)).stat().st_ino == intd_ino
    assert os.path.samefile(mess_path, queue / "spare" / "q" / f"m.{n}")
    # asked again (after a restart), qmail-clean finds it a spare already
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert mess_path.stat().st_nlink == 2

    # the next message is made of those two inodes, with fresh content
    second = InProcessQueue(qmail_home, "by test")
    second.write(b"Subject: two\n\nbody\n")
    assert second.finish("c@example.test", ["d@example.test"]).ok
    (m,) = [int(name) for name in os.listdir(queue / "todo")]
    assert m == n and (queue / "intd" / str(m)).stat().st_ino == intd_ino
    # the mess file was written over under its own name: no pid file, a single name
    assert os.listdir(queue / "pid") == []
    assert (queue / "mess" / str(m % SPLIT) / str(m)).stat().st_nlink == 1
    mess = (queue / "mess" / str(m % SPLIT) / str(m)).read_bytes()
    assert mess.endswith(b"\nSubject: two\n\nbody\n") and b"one" not in mess
    assert (queue / "todo" / str(m)).read_bytes().endswith(b"\0Fc@example.test\0Td@example.test\0")
    assert os.listdir(queue / "spare" / "q") == []


def test_a_spare_renamed_under_a_taker_never_replaces_a_live_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two processes and a pool name that comes back: between this taker's lstat and
    # its rename, another process takes the spare to its mess file and qmail-clean
    # files a different finished file under the same pool name.  This taker must not
    # rename that other file over the live message (once, it lost one in ~2,000).
    pool = _pool(tmp_path)
    (tmp_path / "mess").mkdir()
    name = tmp_path / "pool" / "intd.7"
    name.write_bytes(b"old envelope")
    first_ino = name.stat().st_ino
    live = tmp_path / "mess" / str(first_ino)
    later = tmp_path / "later-intd"
    later.write_bytes(b"another finished envelope")
    real_lstat = os.lstat
    interleaved = []

    def lstat_then_other_process(path: str) -> os.stat_result:
        st = real_lstat(path)
        if not interleaved:
            interleaved.append(path)
            os.rename(name, live)  # the other taker wins this spare ...
            live.write_bytes(b"a live message")
            os.rename(later, name)  # ... and the name holds another file now
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_other_process)
    taken = pool.take_as(lambda ino: f"{tmp_path}/mess/{ino}")
    monkeypatch.undo()
    assert interleaved, "the pool was not read"
    assert taken is None
    assert live.read_bytes() == b"a live message"
    assert live.stat().st_ino == first_ino
    assert name.read_bytes() == b"another finished envelope"  # still a spare


def test_recycling_under_a_name_already_in_the_pool_keeps_both(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    waiting = tmp_path / "pool" / "intd.7"
    waiting.write_bytes(b"waiting spare")
    finished = tmp_path / "intd-7-again"
    finished.write_bytes(b"finished again")
    assert pool.recycle(str(finished), "intd.7")
    assert not finished.exists()
    assert waiting.read_bytes() == b"waiting spare"
    contents = sorted((tmp_path / "pool" / n).read_bytes() for n in os.listdir(tmp_path / "pool"))
    assert contents == [b"finished again", b"waiting spare"]


def test_a_recycle_never_replaces_a_spare_and_leaves_the_file_to_the_caller(
    tmp_path: Path,
) -> None:
    pool = _pool(tmp_path)
    pool._nonce = "abc123"
    pool.recycles = 1  # past the first recycle's count of the pool; this one is number 2
    taken = tmp_path / "pool" / f"info.3.{os.getpid()}.abc123.2"
    taken.write_bytes(b"a spare left by an earlier process with our pid")
    finished = tmp_path / "info-3"
    finished.write_bytes(b"finished")
    assert not pool.recycle(str(finished), "info.3")
    assert finished.read_bytes() == b"finished"
    assert taken.read_bytes() == b"a spare left by an earlier process with our pid"
    # the next count is free again
    assert pool.recycle(str(finished), "info.3")
    assert not finished.exists()
    assert len(os.listdir(tmp_path / "pool")) == 2


@pytest.mark.parametrize("with_renameat2", [True, False])
def test_rename_noreplace_refuses_an_existing_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_renameat2: bool
) -> None:
    if not with_renameat2:
        monkeypatch.setattr(spare, "_renameat2", None)  # the link-and-unlink way
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"existing")
    with pytest.raises(FileExistsError):
        spare.rename_noreplace(str(src), str(dst))
    assert src.read_bytes() == b"new" and dst.read_bytes() == b"existing"
    dst.unlink()
    spare.rename_noreplace(str(src), str(dst))
    assert not src.exists() and dst.read_bytes() == b"new" and dst.stat().st_nlink == 1
    with pytest.raises(FileNotFoundError):
        spare.rename_noreplace(str(src), str(tmp_path / "elsewhere"))


def _queued_one(queue: Path, text: bytes) -> int:
    """Queue one message (qmail-queue alone, no qmail-send); returns its number."""
    result = queue_message(queue.parent, text, "a@example.test", ["b@example.test"])
    assert result.ok
    (n,) = [int(name) for name in os.listdir(queue / "todo")]
    return n


def _kept_spare(queue: Path, text: bytes = b"an old finished message\n") -> int:
    """A finished message's mess file, kept at its name as qmail-clean keeps it."""
    n = _queued_one(queue, b"Subject: old\n\n" + text)
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert (queue / "spare" / "q" / f"m.{n}").exists()
    return n


def test_a_claimed_spare_needs_no_fsync_of_its_mess_directory(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyqmail import qmail_queue

    queue = qmail_home / "queue"
    synced: list[str] = []
    from pyqmail.queue import fsync_dir as real_fsync_dir

    def recording_fsync_dir(path: str) -> None:
        synced.append(os.path.relpath(path, queue))
        real_fsync_dir(path)

    monkeypatch.setattr(qmail_queue, "fsync_dir", recording_fsync_dir)
    # no spare yet: a new file, linked into mess/, whose directory must be fsync'd
    def in_process(text: bytes, sender: str, recipient: str) -> None:
        job = InProcessQueue(qmail_home, "by test")
        job.write(text)
        assert job.finish(sender, [recipient]).ok

    in_process(b"Subject: one\n\nbody\n", "a@example.test", "b@example.test")
    (n,) = [int(name) for name in os.listdir(queue / "todo")]
    assert synced == [f"mess/{n % SPLIT}", "todo"]
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    synced.clear()
    spare._pools.clear()  # this process found the pool empty a moment ago: look again
    # its file kept at its name: only todo/ changes durably
    in_process(b"Subject: two\n\nbody\n", "c@example.test", "d@example.test")
    assert os.listdir(queue / "todo") == [str(n)]
    assert synced == ["todo"]
    assert not (queue / "spare" / "q" / f"m.{n}").exists()


@pytest.mark.parametrize("leftover", ["todo", "info"])
def test_a_kept_spare_whose_number_is_still_in_the_queue_is_never_written_over(
    qmail_home: Path, leftover: str
) -> None:
    # After a power cut, a finished message's last unlinks may come back undone while
    # the pool's second name was written: qmail-send would then deliver that number's
    # envelope or info with whatever text the mess file holds.  Such a spare stays.
    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    mess_path = queue / "mess" / str(n % SPLIT) / str(n)
    before = mess_path.read_bytes()
    back = queue / leftover / (f"{n % SPLIT}/{n}" if leftover == "info" else str(n))
    back.write_bytes(b"u0\0p1\0Fa@example.test\0Tb@example.test\0")
    pool = spare.SparePool(str(queue / "spare" / "q"))
    assert pool.take_in_place(str(queue)) is None
    assert mess_path.read_bytes() == before
    assert (queue / "spare" / "q" / f"m.{n}").exists()
    back.unlink()
    pool.empty_until[True] = 0.0
    taken = pool.take_in_place(str(queue))
    assert taken is not None and taken[1] == str(mess_path)
    os.close(taken[0])
    assert mess_path.stat().st_nlink == 1


def test_a_kept_spare_claimed_by_another_process_first_is_left_to_it(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    marker = queue / "spare" / "q" / f"m.{n}"
    pool = spare.SparePool(str(queue / "spare" / "q"))
    real_utime = os.utime

    def utime_then_other_process(fd: int) -> None:
        real_utime(fd)
        os.unlink(marker)  # the other process's claim lands first

    monkeypatch.setattr(os, "utime", utime_then_other_process)
    assert pool.take_in_place(str(queue)) is None
    monkeypatch.undo()
    mess_path = queue / "mess" / str(n % SPLIT) / str(n)
    assert mess_path.read_bytes().endswith(b"an old finished message\n")  # untouched by us


def test_a_kept_spare_whose_mess_name_is_gone_is_dropped(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    (queue / "mess" / str(n % SPLIT) / str(n)).unlink()
    pool = spare.SparePool(str(queue / "spare" / "q"))
    assert pool.take_in_place(str(queue)) is None
    assert not (queue / "spare" / "q" / f"m.{n}").exists()


def _aged_cleanup(
    queue: Path, n: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[QmailSend, list[str]]:
    """Make mess file n 40 hours old and run qmail-send's cleanup pass over the queue;
    returns that qmail-send and the qmail-clean commands it asked for (a list that
    later calls of its cleanup() add to)."""
    mess_path = queue / "mess" / str(n % SPLIT) / str(n)
    long_ago = time.time() - 40 * 3600
    os.utime(mess_path, (long_ago, long_ago))
    asked: list[str] = []
    send = QmailSend.__new__(QmailSend)
    send.queue = queue
    send.queue_dir = str(queue)
    monkeypatch.setattr(send, "clean_later", asked.append)
    send.cleanup(time.time())
    return send, asked


def test_kept_spares_are_neither_counted_nor_cleaned_up_as_messages(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyqmail import qstat

    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    assert qstat.counts(qmail_home) == (0, 0)
    send, asked = _aged_cleanup(queue, n, monkeypatch)
    assert asked == []
    # its envelope file is kept with it (or a power cut undid a claim whose injection
    # died with its envelope written): still a spare, for the next message of its number
    intd = queue / "intd" / str(n)
    assert intd.exists() and intd.stat().st_nlink == 1
    intd.write_bytes(b"u0\0p1\0Fa@example.test\0")
    send.cleanup(time.time())
    assert asked == []
    # a claimed spare whose injection died (one name left) is an old stray as in qmail
    os.unlink(queue / "spare" / "q" / f"m.{n}")
    send.cleanup(time.time())
    assert asked == [f"foop/{n}"]


def _killed_injection_stray(queue: Path) -> tuple[Path, Path, int]:
    """What a qmail-queue killed between linking its pid/ file to mess/N and unlinking it
    leaves: a message file with two names and no spare marker.  (pid name, mess, N)"""
    pidfn = queue / "pid" / "4242.1.1"
    pidfn.write_bytes(b"Received: (qmail 4242 invoked by uid 0); killed half way\n")
    n = pidfn.stat().st_ino
    mess_path = queue / "mess" / str(n % SPLIT) / str(n)
    os.link(pidfn, mess_path)
    return pidfn, mess_path, n


def test_an_old_stray_with_a_leftover_pid_name_is_cleaned_up(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stray, not a kept spare
    queue = qmail_home / "queue"
    pidfn, mess_path, n = _killed_injection_stray(queue)
    _, asked = _aged_cleanup(queue, n, monkeypatch)
    assert asked == [f"foop/{n}"]
    # qmail-clean keeps it at its name, but it is not reused while the pid/ name is there
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    pool = spare.SparePool(str(queue / "spare" / "q"))
    assert pool.take_in_place(str(queue)) is None
    assert mess_path.stat().st_nlink == 3
    # the pid/ sweep takes the stale name, and the file is an ordinary kept spare again
    clean.sweep_pids(queue, now=time.time() + 40 * 3600)
    assert not pidfn.exists()
    taken = pool.take_in_place(str(queue))
    assert taken is not None and taken[1] == str(mess_path)
    os.close(taken[0])


def test_a_stray_with_a_pid_name_never_becomes_a_pooled_spare(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = qmail_home / "queue"
    pidfn, mess_path, n = _killed_injection_stray(queue)
    # qmail-clean cannot keep it at its name: it is removed, not moved into the pool
    monkeypatch.setattr(spare.SparePool, "keep_in_place", lambda self, path, n: False)
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert not mess_path.exists()
    pooled = [e for e in os.scandir(queue / "spare" / "q") if e.inode() == n]
    assert pooled == []
    assert pidfn.stat().st_nlink == 1  # the sweep frees the inode in its time


def _next_message(qmail_home: Path, subject: str, recipient: str) -> int:
    job = InProcessQueue(qmail_home, "by test")
    job.write(f"Subject: {subject}\n\nbody\n".encode())
    result = job.finish("c@example.test", [recipient])
    assert result.ok, result
    return result.number


def test_a_kept_envelope_file_is_written_over_in_place_and_cut_to_length(
    qmail_home: Path,
) -> None:
    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    intd = queue / "intd" / str(n)
    # a long old envelope, and a spare in the pool that an envelope used to be made of
    intd.write_bytes(b"u0\0p1\0F" + b"~" * 900 + b"@example.test\0Tb@example.test\0")
    ino = intd.stat().st_ino
    other = queue / "spare" / "q" / "intd.9"
    other.write_bytes(b"another finished envelope")
    spare._pools.clear()
    assert _next_message(qmail_home, "two", "d@example.test") == n
    # the same file under the same name: no rename into intd/, the pool spare unused
    assert intd.stat().st_ino == ino and intd.stat().st_nlink == 2
    assert other.read_bytes() == b"another finished envelope"
    envelope = (queue / "todo" / str(n)).read_bytes()
    assert envelope.endswith(b"\0Fc@example.test\0Td@example.test\0")
    assert b"~" not in envelope  # nothing of the old, longer envelope is left


def test_an_envelope_file_with_a_second_name_is_never_written_over(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    n = _kept_spare(queue)
    intd = queue / "intd" / str(n)
    # linked elsewhere, as a live envelope is linked into todo/: not this message's
    live = b"u0\0p1\0Fa@example.test\0Tlive@example.test\0"
    intd.write_bytes(live)
    os.link(intd, queue / "pid" / "elsewhere")
    spare._pools.clear()
    job = InProcessQueue(qmail_home, "by test")
    job.write(b"Subject: two\n\nbody\n")
    result = job.finish("c@example.test", ["d@example.test"])
    assert not result.ok and result.code == 65  # qmail-queue's "trouble making intd"
    assert (queue / "pid" / "elsewhere").read_bytes() == live
    assert os.listdir(queue / "todo") == []


def test_a_finished_message_not_kept_takes_its_envelope_file_away(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    n = _queued_one(queue, b"Subject: one\n\nbody\n")
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    assert (queue / "intd" / str(n)).exists()
    (queue / "spare" / "q").rmdir()  # no pool: nothing can be kept
    spare._pools.clear()
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert not (queue / "intd" / str(n)).exists()
    assert not (queue / "mess" / str(n % SPLIT) / str(n)).exists()


def test_qmail_clean_makes_todo_removals_durable_before_a_spare_can_be_claimed(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = qmail_home / "queue"
    n = _queued_one(queue, b"Subject: one\n\nbody\n")
    events: list[str] = []
    fail = [True]

    def recording_fsync_dir(path: str) -> None:
        events.append(f"fsync {os.path.relpath(path, queue)}")
        if fail[0]:
            raise OSError(5, "simulated")

    real_link = os.link

    def recording_link(src: str, dst: str, **kw: object) -> None:
        events.append(f"link {os.path.relpath(dst, queue)}")
        real_link(src, dst)

    monkeypatch.setattr(clean, "fsync_dir", recording_fsync_dir)
    monkeypatch.setattr(os, "link", recording_link)
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    # the todo/ fsync fails: nothing is made reusable, qmail-send hears of it
    assert clean.handle(queue, f"foop/{n}".encode()) == b"!"
    assert events == ["fsync todo"]
    assert not (queue / "spare" / "q" / f"m.{n}").exists()
    events.clear()
    fail[0] = False
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert events == ["fsync todo", f"link spare/q/m.{n}"]
    # nothing unlinked in todo/ since: the next one needs no fsync
    events.clear()
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert events == [f"link spare/q/m.{n}"]


def test_a_pool_held_for_publication_gives_out_nothing_recycled_before_it(
    tmp_path: Path,
) -> None:
    pool = _pool(tmp_path)
    pool.hold_recycled = True
    done = tmp_path / "info-1"
    done.write_bytes(b"finished")
    assert pool.recycle(str(done), "info.1")
    assert pool.take(str(tmp_path / "new")) is None
    pool.publish()
    pool.empty_until[False] = 0.0
    fd = pool.take(str(tmp_path / "new"))
    assert fd is not None
    os.close(fd)
