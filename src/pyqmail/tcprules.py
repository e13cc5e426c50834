"""tcprules: compile tcpserver access rules into a cdb, and look clients up in it.

The cdb is byte-for-byte the one ucspi-tcp's tcprules builds from the same text (same record
order, same hash-table layout), so either tool's output works with either server.

Record layout: key = the address text of the rule; data = a sequence of NUL-terminated items,
``D`` for deny and ``+NAME=value`` per environment variable.  An allow rule without variables
has empty data.

Extension over ucspi-tcp 0.88: an address may contain colons (IPv6 forms such as ``::1`` or
the prefix ``2001:db8:``); the instruction is then found at the first colon followed by
``allow`` or ``deny``.  For every line the real tool accepts this picks the same colon, so
accepted input compiles identically.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.cdb import CDB, cdb_build
from pyqmail.constants import EXIT_PERM, EXIT_TEMP


class RulesSyntaxError(ValueError):
    """A rules line tcprules refuses; ``line`` is the offending text without its newline."""

    def __init__(self, line: bytes) -> None:
        super().__init__(line.decode("utf-8", "replace"))
        self.line = line


@dataclass(frozen=True)
class Decision:
    """The outcome of a rules lookup: whether to serve, and the variables to set (even on deny)."""

    allow: bool = True
    env: dict[str, str] = field(default_factory=dict)
    key: str | None = None  # the matching rule's address, None when nothing matched


_DIGITS = frozenset(b"0123456789")


def _instruction_at(rest: bytes) -> bool:
    """True when ``rest`` (the text after a colon) starts with an instruction word."""
    for word in (b"allow", b"deny"):
        if rest.startswith(word) and (len(rest) == len(word) or rest[len(word)] == 0x2C):
            return True
    return False


_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


def _split_line(line: bytes) -> tuple[bytes, bytes] | None:
    """Split ``ADDRESS:INSTRUCTION...``; None for a line without a colon (ignored)."""
    first = line.find(b":")
    if first < 0:
        return None
    if not _instruction_at(line[first + 1 :]):
        # maybe an IPv6 address (optionally info@ first) whose own colons come before the
        # instruction; anything else is reported against the first colon, as ucspi does
        pos = line.find(b":", first + 1)
        while pos >= 0:
            address = line[:pos]
            bare = address[address.rfind(b"@") + 1 :]
            if not set(bare) <= _IPV6_CHARS:
                break
            if _instruction_at(line[pos + 1 :]):
                return address, line[pos + 1 :]
            pos = line.find(b":", pos + 1)
    return line[:first], line[first + 1 :]


def _parse_data(line: bytes, action: bytes) -> bytes:
    """Turn ``allow,A="x",B='y'`` into cdb data; raise on anything malformed."""
    if action.startswith(b"allow"):
        data = b""
        rest = action[5:]
    elif action.startswith(b"deny"):
        data = b"D\0"
        rest = action[4:]
    else:
        raise RulesSyntaxError(line)
    while rest:
        if rest[0] != 0x2C:
            raise RulesSyntaxError(line)
        # the name runs from after the comma to the first '=' (it may itself hold commas)
        eq = rest.find(b"=", 1)
        if eq < 0 or eq + 1 >= len(rest):
            raise RulesSyntaxError(line)
        name = rest[1:eq]
        quote = rest[eq + 1]
        close = rest.find(bytes([quote]), eq + 2)
        if close < 0:
            raise RulesSyntaxError(line)
        value = rest[eq + 2 : close]
        data += b"+" + name + b"=" + value + b"\0"
        rest = rest[close + 1 :]
    return data


def _expand_range(line: bytes, address: bytes) -> list[bytes]:
    """Expand one ``lo-hi`` octet range in a plain IPv4 rule (``1.2.3.4-9``, ``10.1-5.``)."""
    if b"=" in address or b"@" in address or b":" in address:
        return [address]
    dash = address.find(b"-")
    if dash < 0:
        return [address]
    start = dash
    while start > 0 and address[start - 1] in _DIGITS:
        start -= 1
    if start > 0 and address[start - 1] != 0x2E:
        raise RulesSyntaxError(line)
    end = dash + 1
    while end < len(address) and address[end] in _DIGITS:
        end += 1
    if end < len(address) and address[end] != 0x2E:
        raise RulesSyntaxError(line)
    lo = int(address[start:dash] or b"0")
    hi = min(int(address[dash + 1 : end] or b"0"), 255)
    head, tail = address[:start], address[end:]
    return [head + str(n).encode() + tail for n in range(lo, hi + 1)]


def parse_rules(text: bytes) -> list[tuple[bytes, bytes]]:
    """Parse rules text into cdb records, in file order; raise RulesSyntaxError on a bad line."""
    records: list[tuple[bytes, bytes]] = []
    for raw in text.split(b"\n"):
        line = raw.rstrip(b" \t")
        if not line or line.startswith(b"#"):
            continue
        parts = _split_line(line)
        if parts is None:
            continue
        address, action = parts
        data = _parse_data(line, action)
        for key in _expand_range(line, address):
            records.append((key, data))
    return records


def compile_rules(text: bytes, cdb_path: Path | str, tmp_path: Path | str) -> None:
    """Compile ``text`` into ``cdb_path`` through ``tmp_path`` (write, fsync, rename).

    A syntax error raises RulesSyntaxError before any file is touched, so the old cdb stays;
    an OSError leaves the old cdb too, and no temporary file behind.
    """
    problem = _install(cdb_build(parse_rules(text)), str(cdb_path), str(tmp_path))
    if problem is not None:
        raise OSError(problem)


def _install(data: bytes, cdb_path: str, tmp_path: str) -> str | None:
    """Write the cdb atomically; on failure return tcprules' message (without prefix)."""
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        return f"unable to create {tmp_path}: {_errtext(exc)}"
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(Path(tmp_path))
        return f"unable to write {tmp_path}: {_errtext(exc)}"
    os.close(fd)
    try:
        os.rename(tmp_path, cdb_path)
    except OSError as exc:
        _unlink_quietly(Path(tmp_path))
        return f"unable to move {tmp_path} to {cdb_path}: {_errtext(exc)}"
    return None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@functools.lru_cache(maxsize=4096)
def normalize_ip(ip: str) -> str:
    """The text tcpserver uses for an address: IPv4 dotted, IPv6 compact, v4-mapped as IPv4.

    Cached: a connection asks about two addresses several times, clients come back, and
    ipaddress's parsing cost more than the rest of accepting a connection.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def candidate_keys(ip: str, host: str | None = None, info: str | None = None) -> list[bytes]:
    """Rule keys in tcpserver's lookup order; the first one present in the cdb decides."""
    bip = ip.encode("ascii", "replace")
    bhost = os.fsencode(host) if host is not None else None
    binfo = os.fsencode(info) if info is not None else None
    keys: list[bytes] = []
    if binfo is not None:
        keys.append(binfo + b"@" + bip)
        if bhost is not None:
            keys.append(binfo + b"@=" + bhost)
    keys.append(bip)
    if bhost is not None:
        keys.append(b"=" + bhost)
    # IPv4 prefixes end in '.', IPv6 prefixes (textual, of the compact form) in ':'
    sep = 0x3A if b":" in bip else 0x2E
    for n in range(len(bip) - 1, 0, -1):
        if bip[n - 1] == sep:
            keys.append(bip[:n])
    if bhost is not None:
        for n in range(len(bhost)):
            if bhost[n] == 0x2E:
                keys.append(b"=" + bhost[n:])
        keys.append(b"=")
    keys.append(b"")
    return keys


def decode_data(data: bytes) -> tuple[bool, dict[str, str]]:
    """Read a record's items the way tcpserver does: D denies, +NAME=value sets a variable."""
    allow = True
    env: dict[str, str] = {}
    # an item counts only once its NUL arrives; a truncated tail is ignored, as in tcpserver
    for item in data.split(b"\0")[:-1]:
        if item.startswith(b"D"):
            allow = False
        elif item.startswith(b"+"):
            name, sep, value = item[1:].partition(b"=")
            if sep:
                env[os.fsdecode(name)] = os.fsdecode(value)
    return allow, env


def lookup(
    rules_cdb: CDB | Path | str, ip: str, host: str | None = None, info: str | None = None
) -> Decision:
    """Find the rule for a client as tcpserver does; no matching rule means allow, no variables.

    ``rules_cdb`` is an open CDB (the fast path for a server) or a path to read.
    """
    db = rules_cdb if isinstance(rules_cdb, CDB) else CDB.open(rules_cdb)
    for key in candidate_keys(normalize_ip(ip), host, info):
        data = db.get(key)
        if data is not None:
            allow, env = decode_data(data)
            return Decision(allow, env, key.decode("utf-8", "surrogateescape"))
    return Decision()


def _warn(text: str) -> None:
    os.write(2, text.encode("utf-8", "surrogateescape") + b"\n")


def _printable(line: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in line)


def _errtext(exc: OSError) -> str:
    return (exc.strerror or errno.errorcode.get(exc.errno or 0, "error")).lower()


def main(argv: list[str] | None = None) -> int:
    """The tcprules program: ``tcprules rules.cdb rules.tmp < rules.txt``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        _warn("tcprules: usage: tcprules rules.cdb rules.tmp")
        return EXIT_PERM
    cdb_path, tmp_path = args[0], args[1]
    try:
        text = sys.stdin.buffer.read()
    except OSError as exc:
        _warn(f"tcprules: fatal: unable to read input: {_errtext(exc)}")
        return EXIT_TEMP
    try:
        records = parse_rules(text)
    except RulesSyntaxError as exc:
        _warn(f"tcprules: fatal: unable to parse this line: {_printable(exc.line)}")
        return EXIT_PERM
    problem = _install(cdb_build(records), cdb_path, tmp_path)
    if problem is not None:
        _warn(f"tcprules: fatal: {problem}")
        return EXIT_TEMP
    return 0


if __name__ == "__main__":
    sys.exit(main())
