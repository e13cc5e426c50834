"""Reading qmail control files with qmail's formats and defaults.

Every program reads its controls through this module.  qmail's rules (first
line only for line files, `#` comments and blank lines skipped in list files,
`key:value` maps where a later key wins) are kept; where qmail silently
ignores a broken file pyqmail refuses it with a ControlError naming the file
and line, because a silently ignored concurrency or route is worse than a
clear stop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .constants import SPAWN


class ControlError(Exception):
    """A control file that cannot be read or does not parse."""

    def __init__(self, path: Path | str, message: str, lineno: int | None = None) -> None:
        self.path = str(path)
        self.lineno = lineno
        self.message = message
        where = self.path if lineno is None else f"{self.path} line {lineno}"
        super().__init__(f"{where}: {message}")


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ControlError(path, "is a directory, not a file") from None
    except OSError as e:
        # only ENOENT means "absent" (qmail's rule); a non-directory control/ is broken
        raise ControlError(path, f"unable to read: {e.strerror}") from None
    if b"\0" in data:
        lineno = data[: data.index(b"\0")].count(b"\n") + 1
        raise ControlError(path, "contains a NUL byte", lineno)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise ControlError(path, "is not valid UTF-8", lineno) from None


class Control:
    """The control/ directory of one qmail home."""

    def __init__(self, home: Path | str) -> None:
        self.home = Path(home)
        self.dir = self.home / "control"
        self._me: str | None = None
        self._me_read = False

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    # -- the three qmail file kinds -------------------------------------------------

    def line(self, name: str) -> str | None:
        """A line file: the first line, right-trimmed of spaces and tabs; None if absent."""
        text = _read_text(self.path(name))
        if text is None:
            return None
        return text.split("\n", 1)[0].rstrip(" \t\r")

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        """An integer file: a decimal number on the first line."""
        value = self.line(name)
        if value is None:
            return default
        value = value.strip()
        if not value.isdigit() or not value.isascii():
            raise ControlError(self.path(name), f"not a number: {value!r}", 1)
        number = int(value)
        if number < minimum:
            raise ControlError(self.path(name), f"must be at least {minimum}", 1)
        return number

    def lines(self, name: str) -> list[tuple[int, str]] | None:
        """A list file as (line number, entry); comments and blank lines skipped."""
        text = _read_text(self.path(name))
        if text is None:
            return None
        entries = []
        for lineno, raw in enumerate(text.split("\n"), 1):
            entry = raw.rstrip(" \t\r")
            if not entry or entry.startswith("#"):
                continue
            entries.append((lineno, entry))
        return entries

    def list(self, name: str) -> list[str] | None:
        entries = self.lines(name)
        return None if entries is None else [e for _, e in entries]

    def mapping(self, name: str) -> dict[str, str]:
        """`key:value` lines, keys lowercased; a later key wins (as qmail's constmap)."""
        result: dict[str, str] = {}
        for lineno, entry in self.lines(name) or []:
            key, sep, value = entry.partition(":")
            if not sep:
                raise ControlError(self.path(name), f"missing ':' in {entry!r}", lineno)
            result[key.lower()] = value
        return result

    # -- defaults from me -----------------------------------------------------------

    @property
    def me(self) -> str | None:
        if not self._me_read:
            self._me = self.line("me") or None
            self._me_read = True
        return self._me

    def line_me(self, name: str, fallback: str) -> str:
        """A line file whose default is me, else a literal fallback (qmail's rule)."""
        value = self.line(name)
        if value is not None:
            return value
        return self.me if self.me is not None else fallback


@dataclass(frozen=True)
class SendControls:
    """What qmail-send reads at startup (locals and virtualdomains again on HUP)."""

    me: str
    locals: frozenset[str]
    percenthack: frozenset[str]
    virtualdomains: dict[str, str]
    envnoathost: str
    bouncefrom: str
    bouncehost: str
    doublebouncehost: str
    doublebounceto: str
    concurrencylocal: int
    concurrencyremote: int
    queuelifetime: int

    @classmethod
    def load(cls, home: Path | str) -> SendControls:
        c = Control(home)
        me = c.me
        locals_list = c.list("locals")
        if locals_list is None:
            if me is None:
                raise ControlError(c.path("me"), "missing, and there is no control/locals")
            locals_list = [me]
        dbhost = c.line_me("doublebouncehost", "doublebouncehost")
        dbto = c.line("doublebounceto")
        return cls(
            me=me or "me",
            locals=frozenset(d.lower() for d in locals_list),
            percenthack=frozenset(d.lower() for d in c.list("percenthack") or []),
            virtualdomains=c.mapping("virtualdomains"),
            envnoathost=c.line_me("envnoathost", "envnoathost"),
            bouncefrom=c.line("bouncefrom") or "MAILER-DAEMON",
            bouncehost=c.line_me("bouncehost", "bouncehost"),
            doublebouncehost=dbhost,
            doublebounceto=(dbto if dbto is not None else "postmaster"),
            concurrencylocal=min(c.integer("concurrencylocal", 10), SPAWN),
            concurrencyremote=min(c.integer("concurrencyremote", 20), SPAWN),
            queuelifetime=c.integer("queuelifetime", 604800),
        )


def domain_suffixes(domain: str) -> list[str]:
    """`a.b.c` -> [`.b.c`, `.c`]: the suffix keys qmail tries, longest first."""
    return [domain[i:] for i in range(1, len(domain)) if domain[i] == "."]


def write_control(home: Path | str, name: str, lines: list[str]) -> None:
    """Write a control file atomically (used by init and user management)."""
    path = Path(home) / "control" / name
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
