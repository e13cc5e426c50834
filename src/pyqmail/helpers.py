"""Small programs for `|` lines of .qmail files: preline, bouncesaying, condredirect,
forward, except.

They run with the message on fd 0 and qmail-local's environment (SENDER,
NEWSENDER, DTLINE, RPLINE, UFLINE, QMAILHOME); what they print on stderr becomes
part of the delivery report.  Exit codes follow qmail-local's rules: 0 and 99
success, 100 bounce, 111 try again later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import NoReturn

from .home import resolve_home
from .local import is_temp_errno, read_chunks


def _die(code: int, text: str) -> NoReturn:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass
    sys.exit(code)


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno is not None else str(e)


def _run(prog: str, args: list[str], stdin: int | None = None) -> int:
    """Run a program found through $PATH and wait; returns its exit code, -1 if it crashed.

    A program that cannot be started counts as exiting 111 (temporary errno) or 100,
    as a forked child that fails execvp would.
    """
    try:
        proc = subprocess.Popen(args, stdin=stdin, close_fds=False, restore_signals=True)
    except OSError as e:
        if e.filename is None:
            _die(111, f"{prog}: fatal: unable to fork: {_strerror(e)}")
        return 111 if is_temp_errno(e.errno) else 100
    code = proc.wait()
    return -1 if code < 0 else code


def _queue(prog: str, sender: str, recipients: list[str], dtline: str) -> int:
    """Queue DTLINE + the rest of fd 0; returns the qmail-queue pid or exits with the qq text."""
    from .qq import QueueClient

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        client = QueueClient(resolve_home(None))
    except OSError as e:
        _die(111, f"{prog}: fatal: unable to fork: {_strerror(e)}")
    client.write(dtline.encode("utf-8", "surrogateescape"))
    try:
        for chunk in read_chunks(0):
            client.write(chunk)
    except OSError as e:
        client.abort()
        _die(111, f"{prog}: fatal: unable to read message: {_strerror(e)}")
    result = client.finish(sender, recipients)
    if not result.ok:
        _die(100 if result.permanent else 111, f"{prog}: fatal: {result.message}")
    return result.qp


# -- preline --------------------------------------------------------------------------

PRELINE_USAGE = "preline: usage: preline cmd [ arg ... ]"


def preline_main(argv: list[str] | None = None) -> None:
    """Feed UFLINE + RPLINE + DTLINE + message to a command (for mbox-style MDAs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    ufline, rpline, dtline = env.get("UFLINE"), env.get("RPLINE"), env.get("DTLINE")
    if ufline is None or rpline is None or dtline is None:
        _die(100, PRELINE_USAGE)
    want = {"f": True, "r": True, "d": True}
    while args and args[0].startswith("-") and args[0] != "-":
        opt = args.pop(0)
        if opt == "--":
            break
        for letter in opt[1:]:
            if letter in "frd":
                want[letter] = False
            elif letter in "FRD":
                want[letter.lower()] = True
            else:
                _die(100, PRELINE_USAGE)
    if not args:
        _die(100, PRELINE_USAGE)
    head = (
        (ufline if want["f"] else "")
        + (rpline if want["r"] else "")
        + (dtline if want["d"] else "")
    ).encode("utf-8", "surrogateescape")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, restore_signals=True)
    except OSError as e:
        if e.filename is None:
            _die(111, f"preline: fatal: unable to fork: {_strerror(e)}")
        code = 111 if is_temp_errno(e.errno) else 100
        _die(code, f"preline: fatal: unable to run {args[0]}: {_strerror(e)}")
    assert proc.stdin is not None
    failure = _feed(proc.stdin.fileno(), head)
    try:
        proc.stdin.close()
    except OSError:
        pass
    code = proc.wait()
    if failure:
        _die(111, f"preline: fatal: unable to read input: {failure}")
    if code < 0:
        _die(111, "preline: fatal: child crashed")
    sys.exit(code)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _feed(out: int, head: bytes) -> str:
    """Write head + fd 0 into `out`; returns a read error text, or "" when all went well.

    A command that stops reading early is not an error here: its exit code decides.
    """
    try:
        _write_all(out, head)
    except OSError:
        return ""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError as e:
            return _strerror(e)
        if not chunk:
            return ""
        try:
            _write_all(out, chunk)
        except OSError:
            return ""


# -- bouncesaying / except / condredirect / forward -----------------------------------


def bouncesaying_main(argv: list[str] | None = None) -> None:
    """Bounce with a fixed text, or only when a program exits 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _die(100, "bouncesaying: usage: bouncesaying error [ program [ arg ... ] ]")
    if len(args) > 1:
        code = _run("bouncesaying", args[1:])
        if code < 0:
            _die(111, "bouncesaying: fatal: child crashed")
        if code == 111:
            _die(111, "bouncesaying: fatal: temporary child error")
        if code != 0:
            sys.exit(0)
    _die(100, args[0])


def except_main(argv: list[str] | None = None) -> None:
    """Invert a program's verdict: success bounces, failure (other than 111) succeeds."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _die(100, "except: usage: except program [ arg ... ]")
    code = _run("except", args)
    if code < 0:
        _die(111, "except: fatal: child crashed")
    if code == 0:
        sys.exit(100)
    if code == 111:
        sys.exit(111)
    sys.exit(0)


def condredirect_main(argv: list[str] | None = None) -> None:
    """Forward to newaddress and stop the .qmail file (exit 99) when a program exits 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        _die(100, "condredirect: usage: condredirect newaddress program [ arg ... ]")
    code = _run("condredirect", args[1:])
    if code < 0:
        _die(111, "condredirect: fatal: child crashed")
    if code == 111:
        _die(111, "condredirect: fatal: temporary child error")
    if code != 0:
        sys.exit(0)
    try:
        os.lseek(0, 0, os.SEEK_SET)
    except OSError as e:
        _die(111, f"condredirect: fatal: unable to rewind: {_strerror(e)}")
    sender = os.environ.get("SENDER")
    if sender is None:
        _die(100, "condredirect: fatal: SENDER not set")
    dtline = os.environ.get("DTLINE")
    if dtline is None:
        _die(100, "condredirect: fatal: DTLINE not set")
    qp = _queue("condredirect", sender, [args[0]], dtline)
    _die(99, f"condredirect: qp {qp}")


def forward_main(argv: list[str] | None = None) -> None:
    """Forward the message to the given addresses, from $NEWSENDER."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _die(100, "forward: usage: forward address [ address ... ]")
    sender = os.environ.get("NEWSENDER")
    if sender is None:
        _die(100, "forward: fatal: NEWSENDER not set")
    dtline = os.environ.get("DTLINE")
    if dtline is None:
        _die(100, "forward: fatal: DTLINE not set")
    qp = _queue("forward", sender, args, dtline)
    _die(0, f"forward: qp {qp}")
