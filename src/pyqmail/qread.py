"""qmail-qread: list the messages in the queue with their recipients.

Output matches qmail-qread: per message a summary line

    26 Sep 1995 04:46:54 GMT  #457  1234  <joe@example.com>

(the line ends with a space after `>`; date = birth of the message, i.e. the info file's mtime; size of the mess
file; ` bouncing` appended when a bounce is accumulating), then one line per
recipient, local ones first, `  done` in front of recipients already handled.

qmail-send keeps working while this runs, so any file may disappear between
listing a directory and opening it; such a message gets a one-line warning
and the listing continues.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import BinaryIO

from .constants import EXIT_TEMP, SPLIT
from .fmt import printable, qread_date
from .home import HOME_HELP, resolve_home

CHANNELS = ("local", "remote")


class QreadFatal(Exception):
    pass


def _visible(data: bytes) -> bytes:
    return printable(data.decode("latin-1"), "_").encode("latin-1")


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _records(data: bytes) -> list[bytes]:
    """NUL-terminated records; an unterminated tail is a record still being written."""
    return data.split(b"\0")[:-1]


def _read(path: str) -> tuple[bytes, os.stat_result]:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks), os.fstat(fd)
    finally:
        os.close(fd)


def describe(queue: str, n: int) -> bytes:
    """The lines for message n; raises OSError when its info or mess file is unusable."""
    split = n % SPLIT
    info, st = _read(f"{queue}/info/{split}/{n}")
    sender = info.split(b"\0", 1)[0]
    if sender.startswith(b"F"):
        sender = sender[1:]
    size = os.stat(f"{queue}/mess/{split}/{n}").st_size
    bouncing = os.path.exists(f"{queue}/bounce/{n}")
    summary = f"{qread_date(st.st_mtime)}  #{n}  {size}  <".encode() + sender + b"> "
    if bouncing:
        summary += b" bouncing"
    return _visible(summary) + b"\n"


def recipients(queue: str, n: int) -> tuple[bytes, OSError | None]:
    """Recipient lines of message n, and the first error met on a channel file."""
    out = []
    trouble: OSError | None = None
    for channel in CHANNELS:
        try:
            data, _ = _read(f"{queue}/{channel}/{n % SPLIT}/{n}")
        except OSError as e:
            # a missing channel file is normal: no recipients there, or all done
            if e.errno != errno.ENOENT and trouble is None:
                trouble = e
            continue
        for record in _records(data):
            if record.startswith(b"D"):
                prefix = b"  done\t"
            elif record.startswith(b"T"):
                prefix = b"\t"
            else:
                continue
            out.append(prefix + channel.encode() + b"\t" + _visible(record[1:]) + b"\n")
    return b"".join(out), trouble


def qread(queue: str, out: BinaryIO) -> None:
    """Write the listing of `queue` to out; raises QreadFatal when the queue cannot be read."""
    try:
        mode = os.stat(queue).st_mode
    except OSError as e:
        raise QreadFatal(f"unable to chdir: {_strerror(e)}") from None
    if not stat.S_ISDIR(mode):
        raise QreadFatal(f"unable to chdir: {os.strerror(errno.ENOTDIR)}")
    for split in range(SPLIT):
        sub = f"info/{split}"
        try:
            names = os.listdir(f"{queue}/{sub}")
        except OSError as e:
            raise QreadFatal(f"unable to opendir {sub}: {_strerror(e)}") from None
        for name in names:
            if not (name.isascii() and name.isdigit()):
                continue
            n = int(name)
            try:
                summary = describe(queue, n)
            except OSError as e:
                out.write(f"warning: trouble with #{n}: {_strerror(e)}\n".encode())
                continue
            lines, trouble = recipients(queue, n)
            out.write(summary + lines)
            if trouble is not None:
                out.write(f"warning: trouble with #{n}: {_strerror(trouble)}\n".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmail-qread", description="List the messages in the queue and their recipients."
    )
    parser.add_argument("--home", help=HOME_HELP)
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    code = 0
    try:
        try:
            qread(str(resolve_home(args.home) / "queue"), out)
        except QreadFatal as e:
            out.write(f"fatal: {e}\n".encode())
            code = EXIT_TEMP
        out.flush()
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: nothing left to tell anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_TEMP
    return code


if __name__ == "__main__":
    sys.exit(main())
