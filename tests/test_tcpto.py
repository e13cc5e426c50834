"""queue/lock/tcpto: qmail's record layout and rules, qmail-tcpto and qmail-tcpok."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from _remote_util import BIN
from pyqmail import tcpto


def test_layout_is_qmails(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    t = tcpto.TCPTO(queue)
    t.record("192.0.2.5", True, now=1_700_000_000)
    data = (queue / "lock" / "tcpto").read_bytes()
    assert len(data) == 1024
    assert data[:16] == bytes([192, 0, 2, 5, 1, 0, 0, 0]) + (1_700_000_000).to_bytes(
        4, "little"
    ) + (b"\0" * 4)


def test_two_timeouts_block_then_expire(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    t = tcpto.TCPTO(queue)
    now = 1_700_000_000.0
    t.record("192.0.2.5", True, now)
    assert not tcpto.TCPTO(queue).dead("192.0.2.5", now + 1)
    t.record("192.0.2.5", True, now + 60)  # within 120 s: not counted
    assert tcpto.entries(queue) == [("192.0.2.5", 1, int(now))]
    t.record("192.0.2.5", True, now + 200)
    assert tcpto.entries(queue) == [("192.0.2.5", 2, int(now + 200))]
    assert tcpto.TCPTO(queue).dead("192.0.2.5", now + 300)
    assert not tcpto.TCPTO(queue).dead("192.0.2.5", now + 200 + 5825)


def test_count_caps_at_ten_and_success_clears(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    t = tcpto.TCPTO(queue)
    for i in range(15):
        t.record("192.0.2.9", True, 1_000_000 + i * 200)
    assert tcpto.entries(queue)[0][1] == 10
    checker = tcpto.TCPTO(queue)
    checker.dead("192.0.2.9")
    checker.record("192.0.2.9", False)
    assert tcpto.entries(queue) == []


def test_success_without_record_writes_nothing(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    before = (queue / "lock" / "tcpto").stat().st_mtime_ns
    t = tcpto.TCPTO(queue)
    assert not t.dead("192.0.2.1")
    t.record("192.0.2.1", False)
    assert (queue / "lock" / "tcpto").stat().st_mtime_ns == before


def test_eviction_of_the_least_recent(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    t = tcpto.TCPTO(queue)
    for i in range(64):
        t.record(f"10.0.0.{i}", True, 2_000_000 + i)
    t.record("10.0.1.1", True, 3_000_000)
    ips = {ip for ip, _, _ in tcpto.entries(queue)}
    assert len(ips) == 64 and "10.0.0.0" not in ips and "10.0.1.1" in ips


def test_ipv6_kept_in_its_own_file(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    tcpto.TCPTO(queue).record("2001:db8::1", True, 1_700_000_000)
    assert (queue / "lock" / "tcpto").read_bytes() == b"\0" * 1024
    assert len((queue / "lock" / "tcpto6").read_bytes()) == 2048
    assert tcpto.entries(queue) == [("2001:db8::1", 1, 1_700_000_000)]


def test_programs(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    now = time.time()
    tcpto.TCPTO(queue).record("192.0.2.5", True, now - 30)
    out = subprocess.run(
        [str(BIN / "qmail-tcpto"), "--home", str(qmail_home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert out.stdout.startswith("192.0.2.5 timed out 3")
    assert out.stdout.endswith(" seconds ago; # recent timeouts: 1\n")
    ok = subprocess.run(
        [str(BIN / "qmail-tcpok"), "--home", str(qmail_home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    assert (queue / "lock" / "tcpto").read_bytes() == b"\0" * 1024
    missing = subprocess.run(
        [str(BIN / "qmail-tcpok"), "--home", str(qmail_home / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 111 and missing.stderr.startswith("qmail-tcpok: fatal:")
