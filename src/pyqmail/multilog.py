"""pyqmail's log writer: timestamped lines into an automatically rotated directory.

This is the part of daemontools' `multilog t DIR` that pyqmail needs, with
the same directory format, so tai64nlocal and qmailanalog-style tools read
it unchanged:

* every line is written to `DIR/current` prefixed with `@` + a TAI64N label +
  a space; the lines of one read share one write() and one label, and nothing
  sits in a buffer of ours.  After a read the pipe gathers lines for GATHER
  seconds (10 ms), so under load the logger wakes once per batch, not once per
  line, and a label is at most that much later than it would otherwise be;
* `current` is full when a line ends within 2000 bytes of `max_size`; it is
  then fsynced, made mode 0744 (the "complete" mark), renamed to
  `@<tai64n>.s` and a new `current` is started, so no line is ever split
  across files or lost: it is always written before a rotation happens;
* at most `keep` old files are kept (multilog's `n` counts `current` too, so
  `keep=9` equals multilog's default `n10`); the oldest go first;
* a non-empty `current` without the 0100 bit found at start was being
  written when its writer died: it becomes `@<tai64n>.u`; one with the bit is
  simply continued;
* `DIR/lock` is flock'ed so two writers never share a directory;
* a failing write (disk full) is retried after a pause rather than dropped:
  the writer slows down its feeding pipe instead of losing lines.

Differences from multilog: a single line longer than MAX_LINE bytes is
written as several lines (a writer without newlines must not exhaust
memory); no selection patterns, processors or status files.

`run(fd, dir)` is the logger process body: it reads lines from a pipe until
EOF, then marks `current` complete.  The logger must outlive its writers to
record their last words (qmail-send's `status: exiting`), and a stop often
signals a whole process group or cgroup at once, so: SIGINT and SIGHUP are
ignored; SIGTERM keeps reading until EOF for at most `term_grace` seconds,
then writes whatever the pipe already holds and exits.  SIGALRM forces a
rotation.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from .constants import EXIT_TEMP
from .fmt import tai64n_label
from .queue import fsync_dir

# multilog's own defaults (s99999 n10) keep about 1 MB, a few thousand deliveries;
# an MTA on today's disks should keep days of history, so: about 20 MB
DEFAULT_SIZE = 1_000_000
DEFAULT_KEEP = 20
MIN_SIZE = 4096
MAX_SIZE = 2147483647
# multilog ends a file early rather than let the next line push it past the size
SLACK = 2000
# after SIGTERM, how long the writers get to finish and close the pipe
TERM_GRACE = 5.0
# after a read, lines gather in the pipe this long before the next one: under load a
# wake-up per line (two per SMTP connection) cost more than writing the line did
GATHER = 0.01
MAX_LINE = 65536
_TAI_BASE = 0x400000000000000A


class LogDirError(Exception):
    """The directory cannot be used (already locked, not creatable)."""


def label_time(name: str) -> float | None:
    """The unix time encoded in an old log's name `@<24 hex>.s`, or None."""
    if len(name) != 27 or name[0] != "@" or name[25] != ".":
        return None
    try:
        secs = int(name[1:17], 16) - _TAI_BASE
        nanos = int(name[17:25], 16)
    except ValueError:
        return None
    return secs + nanos / 1e9


class LogDir:
    """An open, locked log directory; `write()` appends one timestamped line."""

    def __init__(
        self,
        path: Path | str,
        max_size: int = DEFAULT_SIZE,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
        pause: float = 5.0,
    ) -> None:
        if not MIN_SIZE <= max_size <= MAX_SIZE:
            raise ValueError(f"max_size must be between {MIN_SIZE} and {MAX_SIZE}")
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = Path(path)
        self.max_size = max_size
        self.keep = keep
        self.clock = clock
        self.pause = pause
        self.size = 0
        self._fd = -1
        try:
            self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._lock = os.open(self.path / "lock", os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise LogDirError(
                f"unable to open {self.path}/lock: {os.strerror(e.errno or 0)}"
            ) from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock)
            raise LogDirError(f"unable to lock directory {self.path}: already in use") from e
        try:
            self._last = max(filter(None, map(label_time, os.listdir(self.path))), default=0.0)
            self._recover()
            self._open_current()
        except OSError as e:
            os.close(self._lock)
            raise LogDirError(f"unable to start {self.path}/current: {e.strerror}") from e

    # -- start and rotation -----------------------------------------------------------

    @property
    def current(self) -> Path:
        return self.path / "current"

    def _recover(self) -> None:
        try:
            st = os.stat(self.current)
        except FileNotFoundError:
            return
        if st.st_mode & 0o100 or st.st_size == 0:
            return
        os.rename(self.current, self._old_name("u"))
        fsync_dir(self.path)
        self._purge()

    def _open_current(self) -> None:
        created = not self.current.exists()
        self._fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # 0644 = "being written"; the x bit is only set once the file is complete
        os.fchmod(self._fd, 0o644)
        self.size = os.fstat(self._fd).st_size
        if created:
            fsync_dir(self.path)

    def _old_name(self, code: str) -> Path:
        # names must sort in time order for _purge, even if the clock steps back
        t = max(self.clock(), self._last + 1e-6)
        while True:
            path = self.path / f"{tai64n_label(t)}.{code}"
            if not path.exists():
                self._last = t
                return path
            t += 1e-6

    def _purge(self) -> None:
        olds = sorted(n for n in os.listdir(self.path) if label_time(n) is not None)
        while len(olds) > self.keep:
            try:
                os.unlink(self.path / olds.pop(0))
            except FileNotFoundError:
                pass

    def _complete(self) -> None:
        self._retry(lambda: os.fsync(self._fd), "unable to fsync current")
        os.fchmod(self._fd, 0o744)
        os.close(self._fd)
        self._fd = -1

    def rotate(self) -> None:
        """Close `current` as `@<now>.s` and start a new one (nothing happens if it is empty)."""
        if self.size == 0:
            return
        self._complete()
        old = self._old_name("s")
        self._retry(lambda: os.rename(self.current, old), "unable to move current")
        self._retry(lambda: fsync_dir(self.path), "unable to fsync directory")
        self._retry(self._open_current, "unable to create current")
        try:
            self._purge()
        except OSError as e:
            self._warn(f"unable to remove old logs: {e.strerror}")

    # -- writing ----------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        try:
            sys.stderr.write(f"multilog: warning: {self.path}: {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _retry(self, action: Callable[[], object], what: str) -> None:
        """Keep trying: multilog pauses on disk trouble rather than drop log lines."""
        while True:
            try:
                action()
                return
            except OSError as e:
                self._warn(f"{what}: {e.strerror}; pausing")
                time.sleep(self.pause)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                self._warn(f"unable to write to current: {e.strerror}; pausing")
                time.sleep(self.pause)
                continue
            view = view[n:]
            self.size += n

    def write(self, line: bytes | str) -> None:
        """Append a line (its own newline optional); embedded newlines start new lines."""
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogateescape")
        if line.endswith(b"\n"):
            line = line[:-1]
        for piece in line.split(b"\n"):
            for start in range(0, max(len(piece), 1), MAX_LINE):
                stamp = tai64n_label(self.clock()).encode()
                self._append(stamp + b" " + piece[start : start + MAX_LINE] + b"\n")
                if self.size >= self.max_size - SLACK:
                    self.rotate()

    def write_lines(self, lines: list[bytes]) -> None:
        """Append whole lines (no newlines inside, none over MAX_LINE) with one write.

        The lines arrived together, so they share one timestamp; a batch that would
        cross the rotation size goes line by line, so rotation happens where it should.
        """
        if not lines:
            return
        stamp = tai64n_label(self.clock()).encode() + b" "
        batch = b"".join(stamp + line + b"\n" for line in lines)
        if self.size + len(batch) >= self.max_size - SLACK:
            for line in lines:
                self.write(line)
            return
        self._append(batch)

    def close(self) -> None:
        """fsync `current`, mark it complete (0744) and release the directory."""
        if self._fd >= 0:
            self._complete()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> LogDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Flags:
    def __init__(self) -> None:
        self.term = False
        self.alarm = False

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.term = True

    def on_alarm(self, signum: int, frame: FrameType | None) -> None:
        self.alarm = True


def _feed(log: LogDir, pending: bytearray, data: bytes) -> None:
    pending += data
    end = pending.rfind(b"\n")
    if end >= 0:
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        if all(len(line) < MAX_LINE for line in lines):
            log.write_lines(lines)
        else:
            for line in lines:
                log.write(line)
    while len(pending) >= MAX_LINE:
        log.write(bytes(pending[:MAX_LINE]))
        del pending[:MAX_LINE]


def _drain(fd: int) -> bytes:
    """Whatever the pipe already holds, without waiting for more (bounded: a writer
    that never pauses must not keep us from exiting)."""
    os.set_blocking(fd, False)
    chunks = []
    for _ in range(256):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def run(
    fd: int,
    directory: Path | str,
    max_size: int = DEFAULT_SIZE,
    keep: int = DEFAULT_KEEP,
    term_grace: float = TERM_GRACE,
    gather: float = GATHER,
) -> int:
    """Log every line read from fd into directory until EOF; returns an exit code.

    After each read the pipe is left to fill for `gather` seconds, so a busy writer's
    lines are read, stamped and written in batches; that makes a line's stamp at most
    `gather` seconds later than it would otherwise be.
    """
    try:
        log = LogDir(directory, max_size=max_size, keep=keep)
    except LogDirError as e:
        sys.stderr.write(f"multilog: fatal: {e}\n")
        return EXIT_TEMP
    flags = _Flags()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_term = signal.signal(signal.SIGTERM, flags.on_term)
    old_alarm = signal.signal(signal.SIGALRM, flags.on_alarm)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pending = bytearray()
    deadline: float | None = None
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd, wake_r], [], [], timeout)
            if wake_r in readable:
                os.read(wake_r, 512)
            if flags.alarm:
                flags.alarm = False
                log.rotate()
            if flags.term and deadline is None:
                deadline = time.monotonic() + term_grace
            if deadline is not None and time.monotonic() >= deadline:
                _feed(log, pending, _drain(fd))
                break
            if fd in readable:
                try:
                    data = os.read(fd, 65536)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    raise
                if not data:
                    break
                _feed(log, pending, data)
                if gather > 0 and deadline is None:
                    time.sleep(gather)
        if pending:
            log.write(bytes(pending))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGHUP, old_hup)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyqmail.multilog",
        description="Write timestamped lines from standard input into a rotated log directory.",
    )
    parser.add_argument("-s", "--size", type=int, default=DEFAULT_SIZE, help="max current size")
    parser.add_argument("-n", "--keep", type=int, default=DEFAULT_KEEP, help="old files kept")
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    if not MIN_SIZE <= args.size <= MAX_SIZE or args.keep < 1:
        parser.error(f"size must be {MIN_SIZE}..{MAX_SIZE} and keep at least 1")
    return run(0, args.dir, max_size=args.size, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
