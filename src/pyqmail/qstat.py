"""qmail-qstat: how many messages are in the queue, and how many await preprocessing.

qmail's version is a shell script counting files; this one counts the same
entries directly, so it stays cheap on a large queue and needs no find(1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .constants import EXIT_TEMP, SPLIT
from .home import HOME_HELP, resolve_home
from .spare import IN_PLACE


class QstatError(Exception):
    pass


def _count(directory: Path) -> int:
    try:
        with os.scandir(directory) as it:
            return sum(1 for _ in it)
    except OSError as e:
        raise QstatError(f"unable to read {directory}: {os.strerror(e.errno or 0)}") from None


def counts(home: Path) -> tuple[int, int]:
    """(messages in queue, messages not yet preprocessed)."""
    queue = home / "queue"
    messages = sum(_count(queue / "mess" / str(i)) for i in range(SPLIT))
    # finished mess files kept at their names for reuse are not messages
    messages -= _count_kept_spares(queue / "spare" / "q")
    return max(messages, 0), _count(queue / "todo")


def _count_kept_spares(pool: Path) -> int:
    try:
        with os.scandir(pool) as it:
            return sum(1 for entry in it if entry.name.startswith(IN_PLACE))
    except OSError:
        return 0  # no pool: nothing is kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmail-qstat", description="Summarize the state of the mail queue."
    )
    parser.add_argument("--home", help=HOME_HELP)
    args = parser.parse_args(argv)
    try:
        messages, todo = counts(resolve_home(args.home))
    except QstatError as e:
        sys.stderr.write(f"qmail-qstat: fatal: {e}\n")
        return EXIT_TEMP
    sys.stdout.write(
        f"messages in queue: {messages}\nmessages in queue but not yet preprocessed: {todo}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
