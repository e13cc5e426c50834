"""qmail-newmrh: compile control/morercpthosts into control/morercpthosts.cdb.

Each line is lowercased (ASCII only, as qmail) and stripped of trailing
spaces, tabs, the newline and (as every pyqmail control reader) a CR; empty
lines and `#` lines are skipped.  The cdb is written to
control/morercpthosts.tmp, fsynced and renamed into place, so qmail-smtpd
sees either the old or the new table, never a half.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cdb import cdb_build
from .constants import EXIT_TEMP
from .home import HOME_HELP, resolve_home
from .queue import fsync_dir

FATAL = "qmail-newmrh: fatal: "
SOURCE = "control/morercpthosts"
TEMP = "control/morercpthosts.tmp"
TARGET = "control/morercpthosts.cdb"


class NewmrhError(Exception):
    pass


def hosts(data: bytes) -> list[bytes]:
    keys = []
    for raw in data.split(b"\n"):
        key = raw.lower().rstrip(b" \t\r")
        if key and not key.startswith(b"#"):
            keys.append(key)
    return keys


def _err(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def newmrh(home: Path) -> int:
    """Rebuild the cdb; returns the number of hosts, raises NewmrhError with qmail's text."""
    try:
        data = (home / SOURCE).read_bytes()
    except OSError as e:
        raise NewmrhError(f"unable to read {SOURCE}: {_err(e)}") from None
    keys = hosts(data)
    image = cdb_build((key, b"") for key in keys)
    try:
        fd = os.open(home / TEMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # umask must not make the table unreadable for qmail-smtpd
            os.fchmod(fd, 0o644)
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise NewmrhError(f"unable to write to {TEMP}: {_err(e)}") from None
    try:
        os.rename(home / TEMP, home / TARGET)
        fsync_dir(home / "control")
    except OSError as e:
        raise NewmrhError(f"unable to move {TEMP} to {TARGET}: {_err(e)}") from None
    return len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmail-newmrh",
        description="Compile control/morercpthosts into control/morercpthosts.cdb.",
    )
    parser.add_argument("--home", help=HOME_HELP)
    args = parser.parse_args(argv)
    try:
        newmrh(resolve_home(args.home))
    except NewmrhError as e:
        sys.stderr.write(f"{FATAL}{e}\n")
        return EXIT_TEMP
    return 0


if __name__ == "__main__":
    sys.exit(main())
