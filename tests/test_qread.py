"""qmail-qread: exact listing of hand-made and qmail-queue-made queue entries, and races."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyqmail import qread
from pyqmail.constants import SPLIT
from pyqmail.qq import queue_message

BIN = Path(sys.executable).parent / "qmail-qread"
BIRTH = 812090814  # 26 Sep 1995 04:46:54 UTC


def run(home: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN), "--home", str(home)], capture_output=True, timeout=30)


def put_message(
    queue: Path,
    n: int,
    sender: bytes,
    local: Sequence[bytes] = (),
    remote: Sequence[bytes] = (),
    size: int = 100,
    birth: float = BIRTH,
    bounce: bool = False,
) -> None:
    """Write a preprocessed message as qmail-send leaves it; records are `T..`/`D..`."""
    s = n % SPLIT
    (queue / "mess" / str(s) / str(n)).write_bytes(b"x" * size)
    info = queue / "info" / str(s) / str(n)
    info.write_bytes(b"F" + sender + b"\0")
    os.utime(info, (birth, birth))
    for channel, records in (("local", local), ("remote", remote)):
        if records:
            (queue / channel / str(s) / str(n)).write_bytes(b"".join(r + b"\0" for r in records))
    if bounce:
        (queue / "bounce" / str(n)).write_bytes(b"<a@x.test>:\nsorry\n\n")


def test_empty_queue(qmail_home: Path) -> None:
    r = run(qmail_home)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_exact_listing(qmail_home: Path) -> None:
    q = qmail_home / "queue"
    # 23 -> info/0, 457 -> info/20, 458 -> info/21: subdirectories are listed in order
    put_message(
        q,
        457,
        b"joe@example.com",
        local=[b"Tbob@example.test", b"Dcarol@example.test"],
        remote=[b"Dx@far.test", b"Ty@far.test"],
        size=1234,
    )
    put_message(q, 458, b"", remote=[b"Tjoe@example.com"], size=980, bounce=True)
    put_message(q, 23, b"a@b.test", local=[b"Ta@example.test"], size=5, birth=BIRTH + 86400 * 3)
    r = run(qmail_home)
    assert r.returncode == 0
    assert r.stderr == b""
    assert r.stdout.decode() == (
        "29 Sep 1995 04:46:54 GMT  #23  5  <a@b.test> \n"
        "\tlocal\ta@example.test\n"
        "26 Sep 1995 04:46:54 GMT  #457  1234  <joe@example.com> \n"
        "\tlocal\tbob@example.test\n"
        "  done\tlocal\tcarol@example.test\n"
        "  done\tremote\tx@far.test\n"
        "\tremote\ty@far.test\n"
        "26 Sep 1995 04:46:54 GMT  #458  980  <>  bouncing\n"
        "\tremote\tjoe@example.com\n"
    )


def test_all_done_message_has_only_its_summary(qmail_home: Path) -> None:
    put_message(qmail_home / "queue", 46, b"s@x.test", size=7, birth=BIRTH + 3600 * 5 + 1)
    assert run(qmail_home).stdout == b"26 Sep 1995 09:46:55 GMT  #46  7  <s@x.test> \n"


def test_unprintable_bytes_become_underscores(qmail_home: Path) -> None:
    put_message(
        qmail_home / "queue",
        1,
        b"j\xc3\xb6e\t@x.test",
        local=[b"Tb\x01b@example.test", b"Tok\x7f@example.test"],
        size=1,
    )
    assert run(qmail_home).stdout == (
        b"26 Sep 1995 04:46:54 GMT  #1  1  <j__e_@x.test> \n"
        b"\tlocal\tb_b@example.test\n"
        b"\tlocal\tok_@example.test\n"
    )


def test_odd_records_and_names_are_ignored(qmail_home: Path) -> None:
    q = qmail_home / "queue"
    put_message(q, 2, b"s@x.test", local=[b"Ta@x.test", b"Xweird", b""], size=3)
    # an unterminated last record is still being written: not shown
    with open(q / "local" / "2" / "2", "ab") as f:
        f.write(b"Tpartial@x.test")
    (q / "info" / "2" / "not-a-number").write_bytes(b"F\0")
    (q / "info" / "2" / ".hidden").write_bytes(b"F\0")
    assert run(qmail_home).stdout == (
        b"26 Sep 1995 04:46:54 GMT  #2  3  <s@x.test> \n\tlocal\ta@x.test\n"
    )


def test_message_made_by_qmail_queue(qmail_home: Path) -> None:
    """A real queued message, preprocessed by hand the way qmail-send does it."""
    result = queue_message(qmail_home, b"Subject: hi\n\nbody\n", "joe@example.com", ["x@y.test"])
    assert result.ok, result.text
    q = qmail_home / "queue"
    (n,) = (int(name) for name in os.listdir(q / "todo"))
    s = n % SPLIT
    size = (q / "mess" / str(s) / str(n)).stat().st_size
    assert size > len(b"Subject: hi\n\nbody\n")  # the Received line is counted
    # still in todo: not preprocessed, so qmail-qread does not list it yet
    assert run(qmail_home).stdout == b""
    (q / "info" / str(s) / str(n)).write_bytes(b"Fjoe@example.com\0")
    (q / "remote" / str(s) / str(n)).write_bytes(b"Tx@y.test\0")
    os.utime(q / "info" / str(s) / str(n), (BIRTH, BIRTH))
    (q / "todo" / str(n)).unlink()
    assert run(qmail_home).stdout.decode() == (
        f"26 Sep 1995 04:46:54 GMT  #{n}  {size}  <joe@example.com> \n\tremote\tx@y.test\n"
    )


# -- trouble ------------------------------------------------------------------------------


def test_missing_mess_file_is_a_warning_and_listing_goes_on(qmail_home: Path) -> None:
    q = qmail_home / "queue"
    put_message(q, 457, b"gone@x.test", local=[b"Ta@x.test"])
    put_message(q, 458, b"here@x.test", local=[b"Tb@x.test"], size=4)
    (q / "mess" / "20" / "457").unlink()
    r = run(qmail_home)
    assert r.returncode == 0
    assert r.stdout == (
        b"warning: trouble with #457: No such file or directory\n"
        b"26 Sep 1995 04:46:54 GMT  #458  4  <here@x.test> \n\tlocal\tb@x.test\n"
    )


def test_unreadable_info_and_channel_files(qmail_home: Path) -> None:
    q = qmail_home / "queue"
    (q / "info" / "3" / "3").mkdir()
    put_message(q, 4, b"s@x.test", remote=[b"Tr@far.test"], size=9)
    (q / "local" / "4" / "4").mkdir()
    r = run(qmail_home)
    assert r.returncode == 0
    assert r.stdout == (
        b"warning: trouble with #3: Is a directory\n"
        b"26 Sep 1995 04:46:54 GMT  #4  9  <s@x.test> \n"
        b"\tremote\tr@far.test\n"
        b"warning: trouble with #4: Is a directory\n"
    )


def test_files_vanishing_between_listing_and_reading(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qmail-send finishes messages while we read: deterministic version of the race."""
    q = qmail_home / "queue"
    put_message(q, 457, b"a@x.test", local=[b"Ta@x.test"])  # info vanishes
    put_message(q, 480, b"b@x.test", local=[b"Tb@x.test"])  # mess vanishes (480 % 23 = 20)
    put_message(q, 503, b"c@x.test", local=[b"Tc@x.test"], size=2)  # its local file vanishes
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        names = real_listdir(path)
        if path.endswith("/info/20"):
            (q / "info" / "20" / "457").unlink()
            (q / "mess" / "20" / "480").unlink()
            (q / "local" / "20" / "503").unlink()
        return sorted(names, key=int)

    monkeypatch.setattr(qread.os, "listdir", listdir)
    out = io.BytesIO()
    qread.qread(str(q), out)
    assert out.getvalue() == (
        b"warning: trouble with #457: No such file or directory\n"
        b"warning: trouble with #480: No such file or directory\n"
        b"26 Sep 1995 04:46:54 GMT  #503  2  <c@x.test> \n"
    )


LINE = re.compile(
    rb"(\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT  #\d+  \d+  <[^>]*> ( bouncing)?"
    rb"|(  done)?\t(local|remote)\t\S+"
    rb"|warning: trouble with #\d+: No such file or directory)\n"
)


def test_race_with_a_busy_queue(qmail_home: Path) -> None:
    """Messages appear and disappear while qmail-qread runs; it never crashes."""
    q = qmail_home / "queue"
    stop = threading.Event()
    removed = 0

    def churn() -> None:
        # a rolling window of 100 live messages: each step adds one and finishes another
        nonlocal removed
        n = 1000
        while not stop.is_set():
            put_message(q, n, b"s@x.test", local=[b"Ta@x.test"], remote=[b"Db@y.test"])
            old = n - 100
            if old >= 1000:
                s = str(old % SPLIT)
                for kind in ("local", "mess", "info", "remote"):
                    (q / kind / s / str(old)).unlink()
                removed += 1
            n += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while removed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = removed
        outputs = [run(qmail_home) for _ in range(8)]
        during = removed - before
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert before > 0 and during > 0  # the queue really changed under qmail-qread
    for r in outputs:
        assert r.returncode == 0
        assert r.stderr == b""
        for line in r.stdout.splitlines(keepends=True):
            assert LINE.fullmatch(line), line


def test_missing_queue_is_fatal(qmail_home: Path) -> None:
    shutil.rmtree(qmail_home / "queue")
    r = run(qmail_home)
    assert r.returncode == 111
    assert r.stdout == b"fatal: unable to chdir: No such file or directory\n"


def test_queue_that_is_a_file_is_fatal(qmail_home: Path) -> None:
    shutil.rmtree(qmail_home / "queue")
    (qmail_home / "queue").write_text("")
    r = run(qmail_home)
    assert r.returncode == 111
    assert r.stdout == b"fatal: unable to chdir: Not a directory\n"


def test_missing_info_subdirectory_is_fatal(qmail_home: Path) -> None:
    put_message(qmail_home / "queue", 1, b"s@x.test", size=1)
    (qmail_home / "queue" / "info" / "5").rmdir()
    r = run(qmail_home)
    assert r.returncode == 111
    assert r.stdout == (
        b"26 Sep 1995 04:46:54 GMT  #1  1  <s@x.test> \n"
        b"fatal: unable to opendir info/5: No such file or directory\n"
    )


def test_closed_stdout_is_not_a_traceback(qmail_home: Path) -> None:
    for n in range(200):
        put_message(qmail_home / "queue", n, b"s@x.test" * 50, local=[b"Ta@x.test"] * 20)
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [str(BIN), "--home", str(qmail_home)], stdout=w, stderr=subprocess.PIPE, timeout=30
        )
    finally:
        os.close(w)
    assert proc.returncode == 111
    assert b"Traceback" not in proc.stderr
