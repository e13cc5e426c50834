"""maildirmake: create a new, empty maildir (the directory and its tmp/, new/, cur/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = "maildirmake: usage: maildirmake name"
FATAL = "maildirmake: fatal: "


class MaildirMakeError(Exception):
    """What went wrong, already in maildirmake's words."""


def make_maildir(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Create `path` and its three subdirectories; an existing `path` is an error."""
    top = Path(path)
    try:
        os.mkdir(top, mode)
    except OSError as e:
        raise MaildirMakeError(f"unable to mkdir {top}: {os.strerror(e.errno or 0)}") from None
    for sub in ("tmp", "new", "cur"):
        try:
            os.mkdir(top / sub, mode)
        except OSError as e:
            raise MaildirMakeError(
                f"unable to mkdir {top}/{sub}: {os.strerror(e.errno or 0)}"
            ) from None
    return top


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    os.umask(0o077)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE.split(": ", 1)[-1] + "\n  makes the maildir `name` with tmp/, new/ and cur/")
        sys.exit(0)
    if not args or not args[0]:
        sys.stderr.write(USAGE + "\n")
        sys.exit(100)
    try:
        make_maildir(args[0])
    except MaildirMakeError as e:
        sys.stderr.write(FATAL + str(e) + "\n")
        sys.exit(111)
    sys.exit(0)
