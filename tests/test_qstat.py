"""qmail-qstat: message counts from a real queue filled by qmail-queue."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pyqmail.qq import queue_message

BIN = Path(sys.executable).parent / "qmail-qstat"


def qstat(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "--home", str(home)], capture_output=True, text=True, timeout=30
    )


def test_empty_queue(qmail_home: Path) -> None:
    r = qstat(qmail_home)
    assert r.returncode == 0
    assert r.stdout == ("messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n")


def test_counts_follow_the_queue(qmail_home: Path) -> None:
    for i in range(3):
        result = queue_message(qmail_home, b"Subject: t\n\nbody\n", f"s{i}@x.test", ["a@x.test"])
        assert result.ok, result.text
    r = qstat(qmail_home)
    assert r.returncode == 0
    assert r.stdout == ("messages in queue: 3\nmessages in queue but not yet preprocessed: 3\n")
    # what qmail-send's preprocessing leaves: mess stays, todo goes
    todo = qmail_home / "queue" / "todo"
    for name in os.listdir(todo)[:2]:
        (todo / name).unlink()
    assert qstat(qmail_home).stdout == (
        "messages in queue: 3\nmessages in queue but not yet preprocessed: 1\n"
    )


def test_home_from_environment(qmail_home: Path) -> None:
    queue_message(qmail_home, b"\n", "", ["a@x.test"])
    r = subprocess.run([str(BIN)], capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("messages in queue: 1\n")


def test_missing_queue_is_a_temporary_failure(qmail_home: Path) -> None:
    shutil.rmtree(qmail_home / "queue" / "mess")
    r = qstat(qmail_home)
    assert r.returncode == 111
    assert r.stdout == ""
    assert r.stderr == (
        f"qmail-qstat: fatal: unable to read {qmail_home}/queue/mess/0: No such file or directory\n"
    )
