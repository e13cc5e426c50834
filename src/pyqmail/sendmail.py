"""The sendmail compatibility wrapper: sendmail's options mapped onto qmail-inject.

qmail's wrapper execs qmail-inject; here qmail-inject runs in this same
process (`pyqmail.inject.run`), which saves a second interpreter start per
message.  `-bp` (and the name `mailq`) runs qmail-qread and `-bs` runs
qmail-smtpd on stdin/stdout, also in-process.

One deliberate difference from netqmail: with `-f`, netqmail clears the
personal-name variables so the default From matches the sender, which also
throws away a name given with `-F` (cron passes both).  Here an explicit
`-F` is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .constants import EXIT_PERM, EXIT_TEMP
from .home import resolve_home

USAGE = "sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"

# option letters that take a value, glued or as the next argument
_WITH_VALUE = frozenset("efpoBFb")
# accepted and ignored: sendmail knobs that mean nothing to qmail
_IGNORED = frozenset("vimx")

# what qmail-smtpd sees under `sendmail -bs` unless it runs under a real tcpserver
SMTPD_ENV = {
    "RELAYCLIENT": "",
    "DATABYTES": "0",
    "PROTO": "TCP",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALHOST": "localhost",
    "TCPREMOTEIP": "127.0.0.1",
    "TCPREMOTEHOST": "localhost",
    "TCPREMOTEINFO": "sendmail-bs",
}


class _Stop(Exception):
    """Leave with an exit code (the option parser hands over to qread or smtpd)."""

    def __init__(self, code: int) -> None:
        self.code = code


def _fatal(text: str, code: int) -> _Stop:
    _write_err(f"sendmail: fatal: {text}\n")
    return _Stop(code)


def _write_err(text: str) -> None:
    try:
        sys.stderr.flush()
        os.write(2, text.encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def _usage() -> _Stop:
    _write_err(USAGE)
    return _Stop(EXIT_PERM)


def _call_main(func: Callable[[], object], argv: list[str]) -> int:
    """Run another program's main() here, with its own argv, and return its exit code."""
    saved = sys.argv
    sys.argv = argv
    try:
        code = func()
        # some mains return their exit code instead of raising SystemExit
        return code if isinstance(code, int) else 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        _write_err(f"{e.code}\n")
        return 1
    finally:
        sys.argv = saved


def _mailq(home: Path) -> _Stop:
    try:
        from . import qread

        func = qread.main
    except (ImportError, AttributeError):
        return _fatal("unable to run qmail-qread", EXIT_TEMP)
    try:
        return _Stop(_call_main(func, ["qmail-qread", "--home", str(home)]))
    except Exception:
        return _fatal("unable to run qmail-qread", EXIT_TEMP)


def _smtpd(home: Path) -> _Stop:
    if "PROTO" not in os.environ:
        os.environ.update(SMTPD_ENV)
    try:
        from . import smtpd

        func = smtpd.main
    except (ImportError, AttributeError):
        return _fatal("unable to run qmail-smtpd", EXIT_TEMP)
    try:
        return _Stop(_call_main(func, ["qmail-smtpd", "--home", str(home)]))
    except Exception:
        return _fatal("unable to run qmail-smtpd", EXIT_TEMP)


def _sender_identity(sender: str, env: dict[str, str]) -> None:
    """netqmail's rule: the default From is built from the -f address."""
    for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
        env.pop(name, None)
    user, at, host = sender.rpartition("@")
    if at:
        env["QMAILHOST"] = host
        env["QMAILUSER"] = user
    else:
        env["QMAILUSER"] = sender


def run(argv0: str, argv: Sequence[str], home: Path | None = None) -> int:
    """sendmail with its arguments; argv0 decides `mailq` and `newaliases` behaviour."""
    args = list(argv)
    home_arg: str | None = None
    if args and args[0] == "--home" and len(args) >= 2:
        home_arg = args[1]
        args = args[2:]
    elif args and args[0].startswith("--home="):
        home_arg = args[0].split("=", 1)[1]
        args = args[1:]
    root = home if home is not None else resolve_home(home_arg)
    progname = os.path.basename(argv0)
    try:
        if not root.is_dir() or not os.access(root, os.X_OK):
            raise _fatal("unable to switch to qmail home directory", EXIT_TEMP)
        header_recipients = False
        sender: str | None = None
        name: str | None = None
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                i += 1
                break
            if not arg.startswith("-") or arg == "-":
                break
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                if letter in ("E", "J"):
                    break  # old NEWS-OS options: the rest of the word is their value
                if letter == "t":
                    header_recipients = True
                    continue
                if letter in _IGNORED:
                    continue
                if letter not in _WITH_VALUE:
                    raise _usage()
                if j < len(arg):
                    value = arg[j:]
                else:
                    i += 1
                    if i >= len(args):
                        raise _usage()
                    value = args[i]
                if letter == "f":
                    sender = value
                elif letter == "F":
                    name = value
                elif letter == "b":
                    if value[:1] == "p":
                        raise _mailq(root)
                    if value[:1] == "s":
                        raise _smtpd(root)
                    if value[:1] != "m":
                        raise _usage()
                # -e, -p, -o (-oi, -odb, -oem ...) and -B are accepted and ignored
                break
            i += 1
        recipients = args[i:]
        if progname == "mailq":
            raise _mailq(root)
        if progname == "newaliases":
            raise _fatal("please use fastforward/newaliases instead", EXIT_PERM)

        env = dict(os.environ)
        inject_args = ["-H" if header_recipients else "-a"]
        if sender is not None:
            inject_args += ["-f", sender]
            if sender not in ("", "<>"):
                _sender_identity(sender.removeprefix("<").removesuffix(">"), env)
        if name is not None:
            env["MAILNAME"] = name
            env.pop("QMAILNAME", None)
        inject_args.append("--")
        inject_args += recipients
        try:
            from .inject import run as inject_run
        except ImportError:
            raise _fatal("unable to run qmail-inject", EXIT_TEMP) from None
        return inject_run(inject_args, env=env, home=root)
    except _Stop as stop:
        return stop.code


def main(argv: list[str] | None = None) -> None:
    args = sys.argv if argv is None else argv
    try:
        code = run(args[0] if args else "sendmail", args[1:])
    except KeyboardInterrupt:
        code = EXIT_TEMP
    sys.exit(code)
