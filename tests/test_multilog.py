"""pyqmail.multilog: TAI64N lines, rotation without loss, crash recovery, the logger process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyqmail import multilog
from pyqmail.multilog import MAX_LINE, LogDir, LogDirError, label_time

STAMPED = re.compile(rb"@(4000[0-9a-f]{20}) (.*)\n")


def old_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if label_time(p.name) is not None)


def all_lines(d: Path) -> list[bytes]:
    """Every logged line, oldest file first, with the stamps checked and removed."""
    out = []
    for path in [*old_files(d), d / "current"]:
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), path
        for line in data.splitlines(keepends=True):
            m = STAMPED.fullmatch(line)
            assert m, line
            out.append(m.group(2))
    return out


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- LogDir in-process --------------------------------------------------------------------


def test_line_format_and_stamp(tmp_path: Path) -> None:
    d = tmp_path / "log"
    before = time.time()
    with LogDir(d) as log:
        log.write("status: local 0/10 remote 0/20")
        assert mode(d / "current") == 0o644  # being written
    after = time.time()
    data = (d / "current").read_bytes()
    m = STAMPED.fullmatch(data)
    assert m and m.group(2) == b"status: local 0/10 remote 0/20"
    t = label_time("@" + m.group(1).decode() + ".s")
    assert t is not None and before - 0.001 <= t <= after + 0.001
    assert mode(d / "current") == 0o744  # complete
    assert (d / "lock").exists()


def test_rotation_keeps_every_line_in_order(tmp_path: Path) -> None:
    d = tmp_path / "log"
    lines = [f"delivery {i}: success: did_1+0+0/".encode() for i in range(600)]
    with LogDir(d, max_size=4096, keep=100) as log:
        for line in lines:
            log.write(line)
    olds = old_files(d)
    assert len(olds) >= 5
    for path in olds:
        assert path.name.endswith(".s")
        assert mode(path) == 0o744
        # full once a line ends within 2000 bytes of the size: never past it
        size = path.stat().st_size
        assert 4096 - 2000 <= size < 4096 - 2000 + 70
    assert all_lines(d) == lines


def test_keep_limits_old_files_and_drops_the_oldest(tmp_path: Path) -> None:
    d = tmp_path / "log"
    lines = [f"line {i:05d} ".encode() + b"x" * 80 for i in range(400)]
    with LogDir(d, max_size=4096, keep=3) as log:
        for line in lines:
            log.write(line)
    olds = old_files(d)
    assert len(olds) == 3
    kept = all_lines(d)
    assert kept == lines[-len(kept) :]
    assert len(kept) < len(lines)


def test_rotate_on_demand_and_not_when_empty(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with LogDir(d) as log:
        log.rotate()
        assert old_files(d) == []
        log.write("one")
        log.rotate()
        assert [p.suffix for p in old_files(d)] == [".s"]
        assert (d / "current").read_bytes() == b""
        log.write("two")
    assert all_lines(d) == [b"one", b"two"]


def test_unfinished_current_becomes_u(tmp_path: Path) -> None:
    d = tmp_path / "log"
    d.mkdir()
    (d / "current").write_bytes(b"@400000006b0a294d114b40f4 before the crash\n")
    os.chmod(d / "current", 0o644)
    with LogDir(d) as log:
        log.write("after restart")
    (u,) = old_files(d)
    assert u.name.endswith(".u")
    assert u.read_bytes() == b"@400000006b0a294d114b40f4 before the crash\n"
    assert all_lines(d) == [b"before the crash", b"after restart"]


def test_complete_current_is_continued(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with LogDir(d) as log:
        log.write("first run")
    assert mode(d / "current") == 0o744
    with LogDir(d) as log:
        assert mode(d / "current") == 0o644
        log.write("second run")
    assert old_files(d) == []
    assert all_lines(d) == [b"first run", b"second run"]


def test_empty_unfinished_current_is_reused(tmp_path: Path) -> None:
    d = tmp_path / "log"
    d.mkdir()
    (d / "current").write_bytes(b"")
    with LogDir(d) as log:
        log.write("x")
    assert old_files(d) == []


def test_second_writer_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with LogDir(d) as log:
        with pytest.raises(LogDirError, match="already in use"):
            LogDir(d)
        log.write("still mine")
    with LogDir(d) as log:
        log.write("released")
    assert all_lines(d) == [b"still mine", b"released"]


def test_newlines_inside_a_write_and_empty_lines(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with LogDir(d) as log:
        log.write("a\nb\n")
        log.write(b"")
        log.write(b"c\xff\x00d")
    assert all_lines(d) == [b"a", b"b", b"", b"c\xff\x00d"]


def test_overlong_line_is_split_not_lost(tmp_path: Path) -> None:
    d = tmp_path / "log"
    long = b"y" * (MAX_LINE * 2 + 5)
    with LogDir(d, keep=50) as log:
        log.write(long)
    assert all_lines(d) == [b"y" * MAX_LINE, b"y" * MAX_LINE, b"y" * 5]


def test_names_stay_in_time_order_when_the_clock_steps_back(tmp_path: Path) -> None:
    d = tmp_path / "log"
    times: Iterator[float] = iter([1_700_000_000.0 - i for i in range(10_000)])
    with LogDir(d, max_size=4096, keep=2, clock=lambda: next(times)) as log:
        for i in range(200):
            log.write(f"{i:04d} " + "z" * 100)
    names = [p.name for p in old_files(d)]
    assert len(names) == 2
    kept = all_lines(d)
    # the two newest files survived, not whichever had the largest clock reading
    assert kept[-1].startswith(b"0199 ")
    assert [int(x[:4]) for x in kept] == list(range(200 - len(kept), 200))


def test_label_time_rejects_other_names() -> None:
    assert label_time("current") is None
    assert label_time("@400000006b0a294d114b40f4.s") is not None
    assert label_time("@40000000zzzzzzzz114b40f4.s") is None
    assert label_time("@400000006b0a294d114b40f4") is None


def test_invalid_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LogDir(tmp_path / "a", max_size=4095)
    with pytest.raises(ValueError):
        LogDir(tmp_path / "b", keep=0)


# -- the logger process -------------------------------------------------------------------


def start_logger(d: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyqmail.multilog", *args, str(d)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def logged(d: Path) -> list[bytes]:
    try:
        return all_lines(d)
    except FileNotFoundError:
        return []


def test_logger_process_until_eof(tmp_path: Path) -> None:
    d = tmp_path / "log"
    proc = start_logger(d, "-s", "4096", "-n", "1000")
    assert proc.stdin is not None
    lines = [f"new msg {i}".encode() for i in range(2000)]
    proc.stdin.write(b"".join(line + b"\n" for line in lines) + b"no newline at the end")
    proc.stdin.close()
    assert stop(proc) == 0
    assert proc.stderr is not None and proc.stderr.read() == b""
    assert all_lines(d) == [*lines, b"no newline at the end"]
    assert mode(d / "current") == 0o744


def fork_logger(
    d: Path, gather: float = multilog.GATHER, term_grace: float = multilog.TERM_GRACE
) -> tuple[int, int]:
    """How pyqmail run starts it: run() in a child forked from a warm process, reading
    a pipe; returns the child's pid and the pipe's write end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            os.close(w)
            code = multilog.run(r, d, gather=gather, term_grace=term_grace)
        finally:
            os._exit(code)
    os.close(r)
    return pid, w


def test_run_in_a_forked_child(tmp_path: Path) -> None:
    """How pyqmail run uses it: fork from a warm process, read the log pipe on fd r."""
    d = tmp_path / "log"
    pid, w = fork_logger(d)
    try:
        for i in range(50):
            os.write(w, f"starting delivery {i}: msg 457 to local a@example.test\n".encode())
    finally:
        os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all_lines(d) == [
        f"starting delivery {i}: msg 457 to local a@example.test".encode() for i in range(50)
    ]


def labels(d: Path) -> list[bytes]:
    """The TAI64N label of every line in current."""
    out = []
    for line in (d / "current").read_bytes().splitlines(keepends=True):
        m = STAMPED.fullmatch(line)
        assert m, line
        out.append(m.group(1))
    return out


@pytest.mark.parametrize("gather", [0.5, 0.0])
def test_lines_written_soon_after_a_read_share_the_next_read(tmp_path: Path, gather: float) -> None:
    """After a read the logger lets the pipe fill for `gather` seconds: a busy writer's
    lines come out in one batch under one label, not one wake-up (and label) each."""
    d = tmp_path / "log"
    pid, w = fork_logger(d, gather=gather)
    try:
        os.write(w, b"first\n")
        wait_for(lambda: logged(d) == [b"first"], "the first line")
        os.write(w, b"second\n")
        time.sleep(0.05)
        os.write(w, b"third\n")
        wait_for(lambda: len(logged(d)) == 3, "all three lines")
    finally:
        os.close(w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all_lines(d) == [b"first", b"second", b"third"]
    first, second, third = labels(d)
    assert first != second
    # gathered: read together; not gathered: read as each arrived, 50 ms apart
    assert (second == third) == (gather > 0)


def test_alarm_forces_rotation(tmp_path: Path) -> None:
    d = tmp_path / "log"
    proc = start_logger(d)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"before alarm\n")
        proc.stdin.flush()
        wait_for(lambda: logged(d) == [b"before alarm"], "the first line")
        proc.send_signal(signal.SIGALRM)
        wait_for(lambda: len(old_files(d)) == 1, "a rotation")
        proc.stdin.write(b"after alarm\n")
        proc.stdin.close()
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (old,) = old_files(d)
    assert old.name.endswith(".s") and mode(old) == 0o744
    assert STAMPED.fullmatch(old.read_bytes())
    assert all_lines(d) == [b"before alarm", b"after alarm"]


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def test_term_keeps_logging_until_the_writers_close(tmp_path: Path) -> None:
    """A group-wide TERM reaches the logger first: qmail-send's last lines still land."""
    d = tmp_path / "log"
    proc = start_logger(d)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"ready\n")
        proc.stdin.flush()
        wait_for(lambda: logged(d) == [b"ready"], "the logger to run")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert proc.poll() is None
        proc.stdin.write(b"status: local 0/10 remote 0/20 exitasap\nstatus: exiting\n")
        started = time.monotonic()
        proc.stdin.close()
        assert stop(proc) == 0
        assert time.monotonic() - started < 3  # EOF ends it, not the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all_lines(d) == [
        b"ready",
        b"status: local 0/10 remote 0/20 exitasap",
        b"status: exiting",
    ]
    assert mode(d / "current") == 0o744


def test_term_after_the_grace_period_still_writes_what_the_pipe_holds(
    tmp_path: Path,
) -> None:
    d = tmp_path / "log"
    pid, w = fork_logger(d, term_grace=0.0)
    try:
        os.write(w, b"ready\n")
        wait_for(lambda: logged(d) == [b"ready"], "the logger to run")
        # stopped, the logger cannot read ahead: these lines wait in the pipe
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: proc_state(pid) == "T", "the logger to stop")
        os.write(w, b"".join(b"queued %d\n" % i for i in range(300)) + b"half a line")
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
        # the write end stays open: only the grace period can end the logger
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("logger did not exit after its grace period")
    finally:
        os.close(w)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all_lines(d) == [b"ready", *(b"queued %d" % i for i in range(300)), b"half a line"]
    assert mode(d / "current") == 0o744


def test_interrupt_from_the_terminal_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "log"
    proc = start_logger(d)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"one\n")
        proc.stdin.flush()
        wait_for(lambda: logged(d) == [b"one"], "the first line")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGHUP)
        proc.stdin.write(b"status: exiting\n")
        proc.stdin.close()
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all_lines(d) == [b"one", b"status: exiting"]


def test_killed_logger_leaves_an_unfinished_file_that_is_recovered(tmp_path: Path) -> None:
    d = tmp_path / "log"
    proc = start_logger(d)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"last words\n")
        proc.stdin.flush()
        wait_for(lambda: logged(d) == [b"last words"], "the line")
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
    assert mode(d / "current") == 0o644
    again = start_logger(d)
    assert again.stdin is not None
    again.stdin.write(b"restarted\n")
    again.stdin.close()
    assert stop(again) == 0
    (u,) = old_files(d)
    assert u.name.endswith(".u")
    assert all_lines(d) == [b"last words", b"restarted"]


def test_locked_directory_exits_111(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with LogDir(d) as log:
        proc = start_logger(d)
        assert proc.stdin is not None
        proc.stdin.close()
        assert stop(proc) == 111
        assert proc.stderr is not None
        assert proc.stderr.read() == (
            f"multilog: fatal: unable to lock directory {d}: already in use\n".encode()
        )
        log.write("unharmed")
    assert all_lines(d) == [b"unharmed"]
