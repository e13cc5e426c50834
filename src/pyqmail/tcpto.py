"""Memory of hosts whose SMTP port timed out (qmail's queue/lock/tcpto), qmail-tcpto, qmail-tcpok.

`queue/lock/tcpto` keeps qmail's exact layout, 1024 bytes = 64 records of 16:
bytes 0-3 the IPv4 address (network order), byte 4 the count of recent
timeouts (0 = free record, at most 10), bytes 8-11 the time of the last
timeout (unix seconds, little-endian), the rest zero.

IPv6 addresses do not fit in that record, so pyqmail keeps them in a sibling
file `queue/lock/tcpto6` with the same rules: 64 records of 32 bytes, bytes
0-15 the address, byte 16 the count, bytes 24-27 the time (little-endian).

A host with at least two recent timeouts is skipped for about an hour
((60 + pid % 32) * 64 seconds, so that parallel deliveries do not all retry at
the same moment); a successful connection or a non-timeout error (refused,
unreachable) clears its count; a repeated timeout within 120 s is not counted.
All access holds an exclusive lock on the file.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import sys
import time
from pathlib import Path

from .home import HOME_HELP, resolve_home

RECORDS = 64
MAX_COUNT = 10
REPEAT_WINDOW = 120


class _Layout:
    def __init__(self, name: str, addr_len: int, rec_len: int, count_at: int, when_at: int):
        self.name = name
        self.addr_len = addr_len
        self.rec_len = rec_len
        self.count_at = count_at
        self.when_at = when_at

    @property
    def size(self) -> int:
        return self.rec_len * RECORDS


V4 = _Layout("tcpto", 4, 16, 4, 8)
V6 = _Layout("tcpto6", 16, 32, 16, 24)


def _layout(ip: str) -> tuple[_Layout, bytes]:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (V4 if addr.version == 4 else V6), addr.packed


def _when(rec: bytes | bytearray, lay: _Layout) -> int:
    return int.from_bytes(rec[lay.when_at : lay.when_at + 4], "little")


def _block_window() -> int:
    return (60 + (os.getpid() & 31)) << 6


class TCPTO:
    """The tcpto view of one qmail-remote run (remembers which records existed)."""

    def __init__(self, queue_dir: Path | str) -> None:
        self.lock_dir = Path(queue_dir) / "lock"
        self._was_there: set[str] = set()

    def _path(self, lay: _Layout) -> Path:
        return self.lock_dir / lay.name

    def _open(self, lay: _Layout, create: bool) -> int | None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self._path(lay), flags, 0o644)
        except OSError:
            return None  # no tcpto memory is not a reason to stop delivering
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if create and os.fstat(fd).st_size < lay.size:
                os.ftruncate(fd, lay.size)  # a new tcpto6 gets its full size at once
        except OSError:
            os.close(fd)
            return None
        return fd

    def _read(self, fd: int, lay: _Layout) -> bytearray:
        data = bytearray(os.pread(fd, lay.size, 0))
        data += b"\0" * (lay.size - len(data))
        return data

    def dead(self, ip: str, now: float | None = None) -> bool:
        """Whether to skip `ip` because it timed out repeatedly and recently."""
        lay, packed = _layout(ip)
        fd = self._open(lay, create=False)
        if fd is None:
            return False
        try:
            data = self._read(fd, lay)
        finally:
            os.close(fd)
        t = int(time.time() if now is None else now)
        for i in range(RECORDS):
            rec = data[i * lay.rec_len : (i + 1) * lay.rec_len]
            if rec[lay.count_at] and rec[: lay.addr_len] == packed:
                self._was_there.add(ip)
                return rec[lay.count_at] >= 2 and t - _when(rec, lay) < _block_window()
        return False

    def record(self, ip: str, timed_out: bool, now: float | None = None) -> None:
        """After a connection attempt: count a timeout, or forget earlier ones."""
        if not timed_out and ip not in self._was_there:
            return
        lay, packed = _layout(ip)
        fd = self._open(lay, create=timed_out)
        if fd is None:
            return
        try:
            data = self._read(fd, lay)
            t = int(time.time() if now is None else now)
            free = -1
            oldest, oldest_key = -1, 0
            for i in range(RECORDS):
                off = i * lay.rec_len
                rec = data[off : off + lay.rec_len]
                count = rec[lay.count_at]
                if count and rec[: lay.addr_len] == packed:
                    if not timed_out:
                        rec[lay.count_at] = 0
                    else:
                        if t - _when(rec, lay) < REPEAT_WINDOW:
                            return
                        rec[lay.count_at] = min(count + 1, MAX_COUNT)
                        rec[lay.when_at : lay.when_at + 4] = (t & 0xFFFFFFFF).to_bytes(4, "little")
                    os.pwrite(fd, bytes(rec), off)
                    return
                if not count:
                    if free < 0:
                        free = i
                    continue
                key = _when(rec, lay) + (count << 10)
                if oldest < 0 or key < oldest_key:
                    oldest, oldest_key = i, key
            if not timed_out:
                return
            slot = free if free >= 0 else oldest
            rec = bytearray(lay.rec_len)
            rec[: lay.addr_len] = packed
            rec[lay.count_at] = 1
            rec[lay.when_at : lay.when_at + 4] = (t & 0xFFFFFFFF).to_bytes(4, "little")
            os.pwrite(fd, bytes(rec), slot * lay.rec_len)
        finally:
            os.close(fd)


def zero(queue_dir: Path | str) -> None:
    """Forget every remembered timeout (qmail-rspawn at startup, qmail-tcpok)."""
    lock = Path(queue_dir) / "lock"
    for lay in (V4, V6):
        path = lock / lay.name
        if lay is V6 and not path.exists():
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, b"\0" * lay.size, 0)
            os.ftruncate(fd, lay.size)
        finally:
            os.close(fd)


def entries(queue_dir: Path | str) -> list[tuple[str, int, int]]:
    """(ip, recent timeouts, time of the last one) for every used record, IPv4 first."""
    lock = Path(queue_dir) / "lock"
    result: list[tuple[str, int, int]] = []
    for lay in (V4, V6):
        path = lock / lay.name
        if lay is V6 and not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            data = os.pread(fd, lay.size, 0)
        finally:
            os.close(fd)
        for i in range(len(data) // lay.rec_len):
            rec = data[i * lay.rec_len : (i + 1) * lay.rec_len]
            if rec[lay.count_at]:
                ip = str(ipaddress.ip_address(rec[: lay.addr_len]))
                result.append((ip, rec[lay.count_at], _when(rec, lay)))
    return result


def _parse(prog: str, argv: list[str] | None) -> Path:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--home", help=HOME_HELP)
    return resolve_home(parser.parse_args(argv).home)


def tcpto_main(argv: list[str] | None = None) -> int:
    """qmail-tcpto: print the remembered timeouts."""
    home = _parse("qmail-tcpto", argv)
    if not (home / "queue" / "lock" / "tcpto").exists():
        print("fatal: unable to open tcpto: file does not exist", file=sys.stderr)
        return 111
    try:
        found = entries(home / "queue")
    except OSError as e:
        print(f"fatal: unable to read tcpto: {e.strerror}", file=sys.stderr)
        return 111
    now = int(time.time())
    out = "".join(
        f"{ip} timed out {now - when} seconds ago; # recent timeouts: {count}\n"
        for ip, count, when in found
    )
    sys.stdout.write(out)
    return 0


def tcpok_main(argv: list[str] | None = None) -> int:
    """qmail-tcpok: forget every remembered timeout, silently."""
    home = _parse("qmail-tcpok", argv)
    path = home / "queue" / "lock" / "tcpto"
    if not path.parent.is_dir():
        print(f"qmail-tcpok: fatal: unable to open {path}: no such directory", file=sys.stderr)
        return 111
    try:
        zero(home / "queue")
    except OSError as e:
        print(f"qmail-tcpok: fatal: unable to write {path}: {e.strerror}", file=sys.stderr)
        return 111
    return 0
