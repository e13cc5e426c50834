"""Recycled queue files (pyqmail.spare): finished files become spares, new files take them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pyqmail import clean, spare
from pyqmail.constants import SPLIT
from pyqmail.qq import InProcessQueue, queue_message


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
    # kept whole: freeing its blocks is what recycling avoids
    assert (tmp_path / "pool" / "info.1").stat().st_size > 0

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
    # qmail-send has preprocessed it: qmail-clean removes todo and intd ...
    assert clean.handle(queue, f"todo/{n}".encode()) == b"+"
    assert not (queue / "todo" / str(n)).exists() and not (queue / "intd" / str(n)).exists()
    # ... and once delivered, the message itself
    assert clean.handle(queue, f"foop/{n}".encode()) == b"+"
    assert not (queue / "mess" / str(n % SPLIT) / str(n)).exists()
    assert sorted(os.listdir(queue / "spare" / "q")) == sorted([f"intd.{n}", f"mess.{n}"])

    # the next message is made of those two inodes, with fresh content
    second = InProcessQueue(qmail_home, "by test")
    second.write(b"Subject: two\n\nbody\n")
    assert second.finish("c@example.test", ["d@example.test"]).ok
    (m,) = [int(name) for name in os.listdir(queue / "todo")]
    assert {m, (queue / "intd" / str(m)).stat().st_ino} == {n, intd_ino}
    # a spare becomes mess/N/inode in one rename: no pid file, a single name
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
