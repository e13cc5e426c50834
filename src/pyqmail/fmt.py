"""Byte-exact formats shared by qmail programs: dates, address quoting, log-safe text."""

from __future__ import annotations

import re
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def rfc822_date(t: float | None = None) -> str:
    """`26 Sep 1995 04:46:54 -0000` (UTC, day not padded, no weekday)."""
    tm = time.gmtime(time.time() if t is None else t)
    return (
        f"{tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} -0000"
    )


def qread_date(t: float) -> str:
    """qmail-qread's stamp: the RFC 822 form without the zone, then ` GMT`."""
    return rfc822_date(t)[: -len(" -0000")] + " GMT"


def ctime_stamp(t: float | None = None) -> str:
    """`Sat Jan 03 01:05:34 1996` (UTC, day zero-padded), as in From_ lines."""
    tm = time.gmtime(time.time() if t is None else t)
    return (
        f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:02d} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {tm.tm_year}"
    )


def msgid_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if t is None else t))


_ATOM_SPECIALS = set("!#$%&'*+-./=?^_`{|}~")


def _local_is_bare(local: str) -> bool:
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return all((c.isascii() and c.isalnum()) or c in _ATOM_SPECIALS for c in local)


def quote(local: str) -> str:
    """qmail's quote(): the local part bare if it is a dot-atom, else a quoted string."""
    if _local_is_bare(local):
        return local
    out = []
    for c in local:
        if c in '\r\n"\\':
            out.append("\\")
        out.append(c)
    return '"' + "".join(out) + '"'


def quote2(addr: str) -> str:
    """qmail's quote2(): quote the local part of `local@domain`, keep the domain."""
    if not addr:
        return ""
    at = addr.rfind("@")
    if at < 0:
        return quote(addr)
    return quote(addr[:at]) + addr[at:]


_LOG_UNSAFE = re.compile(r"[^!-$&-~]")  # anything but printable ASCII other than space and %


def _log_replacement(m: re.Match[str]) -> str:
    return "/" if m.group() == "\n" else "_"


def safe(text: str) -> str:
    """Log-safe text as qmail-send writes it: `\\n` -> `/`, controls, space, `%`, 8-bit -> `_`."""
    # nearly every logged address is already safe: one scan in C, no copy
    if _LOG_UNSAFE.search(text) is None:
        return text
    return _LOG_UNSAFE.sub(_log_replacement, text)


def printable(text: str, repl: str = "?") -> str:
    """Bytes outside 32..126 replaced, as qmail-showctl and qmail-qread print."""
    return "".join(c if 32 <= ord(c) <= 126 else repl for c in text)


def tai64n_label(t: float | None = None) -> str:
    """multilog's `@4000...` label for time t."""
    now = time.time() if t is None else t
    secs = int(now)
    nanos = int((now - secs) * 1_000_000) * 1000 + 500
    return f"@{0x400000000000000A + secs:016x}{nanos:08x}"
