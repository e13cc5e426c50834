"""qmail-showctl: describe the installation's compile-time values and every control file.

The output follows qmail-showctl line for line, so an administrator (or a
script) used to qmail reads it the same way.  Two deliberate differences:

* a control file that pyqmail's programs would refuse (a malformed number, a
  NUL byte, invalid UTF-8, a directory where a file belongs) is reported on
  one line naming the file and the line, because that is what the refusing
  program will complain about;
* pyqmail's own control files are explained instead of being listed as
  unknown.  They are described in `PYQMAIL_CONTROLS`, the one place other
  parts of pyqmail add to when they start reading a new file.

In pyqmail's embedded mode every program runs as the invoking user, so the
"user ids" and "group ids" lines show the ids that would be used: as root
the qmail accounts' ids where those accounts exist, otherwise the caller's.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .constants import BREAK, PATRN, SPAWN, SPLIT
from .control import Control, ControlError
from .fmt import printable
from .home import HOME_HELP, resolve_home

# conf-users / conf-groups order, as qmail-showctl prints them
USERS = ("alias", "qmaild", "qmaill", "root", "qmailp", "qmailq", "qmailr", "qmails")
GROUPS = ("nofiles", "qmail")


@dataclass(frozen=True)
class ControlDoc:
    """How one of pyqmail's own control files is shown (only when present, after qmail's).

    kind "line": `<pre><first line><post>.`; "int": the same for a number, checked
    as the reading program checks it; "list": one `<pre><entry><post>` line per
    entry; "file": just `<pre><post>` (a binary file such as a cdb), or a warning
    when the file it is compiled from (`source`) is newer.
    """

    name: str
    kind: str
    pre: str
    post: str = ""
    source: str | None = None


PYQMAIL_CONTROLS: tuple[ControlDoc, ...] = (
    # qmail-lspawn / qmail-local
    ControlDoc("defaultdelivery", "line", "Delivery for users without a .qmail file: ", "."),
    # pyqmail run
    ControlDoc("smtplisten", "list", "SMTP listener: ", "."),
    ControlDoc("submissionlisten", "list", "Submission listener: ", "."),
    ControlDoc("pop3listen", "list", "POP3 listener: ", "."),
    ControlDoc("concurrencyincoming", "int", "Incoming SMTP concurrency is "),
    ControlDoc(
        "concurrencyperip", "int", "Incoming SMTP connections per client address (0 = any): "
    ),
    ControlDoc(
        "smtpdmaxuse", "int", "Connections one qmail-smtpd process serves (0 = a fork each): "
    ),
    ControlDoc(
        "smtpdquickworkers",
        "int",
        "qmail-smtpd workers serving quick clients before more are forked (0 = no such limit): ",
    ),
    ControlDoc(
        "schedbatch",
        "int",
        "Run every process under Linux's SCHED_BATCH policy (0 = the ordinary policy): ",
    ),
    ControlDoc("tcp.smtp", "list", "SMTP client rule: "),
    ControlDoc(
        "tcp.smtp.cdb", "file", "Compiled tcprules for the SMTP listener.", source="tcp.smtp"
    ),
    # qmail-remote and every DNS user
    ControlDoc("nameservers", "list", "DNS server queried: ", "."),
    ControlDoc("tlspolicy", "list", "TLS policy: "),
    # qmail-smtpd
    ControlDoc("maxrcpt", "int", "SMTP recipients per message limit is "),
    ControlDoc("datalinemax", "int", "SMTP DATA line length limit is ", " bytes"),
    ControlDoc(
        "rejectunknownrcpt", "int", "Unknown local recipients rejected at RCPT time (0 = no): "
    ),
)

# every file qmail-showctl itself describes, in its fixed order
QMAIL_CONTROLS = (
    "badmailfrom",
    "bouncefrom",
    "bouncehost",
    "concurrencylocal",
    "concurrencyremote",
    "databytes",
    "defaultdomain",
    "defaulthost",
    "doublebouncehost",
    "doublebounceto",
    "envnoathost",
    "helohost",
    "idhost",
    "localiphost",
    "locals",
    "me",
    "percenthack",
    "plusdomain",
    "qmqpservers",
    "queuelifetime",
    "rcpthosts",
    "morercpthosts",
    "morercpthosts.cdb",
    "smtpgreeting",
    "smtproutes",
    "timeoutconnect",
    "timeoutremote",
    "timeoutsmtpd",
    "virtualdomains",
)


def safeput(text: str) -> str:
    """Every byte outside 32..126 of the file's bytes becomes `?` (per byte, not per character)."""
    return printable(text.encode("utf-8", "surrogateescape").decode("latin-1"), "?")


def _oops(e: ControlError) -> str:
    return f"Oops! Trouble reading this file: {safeput(str(e))}\n"


def _ids() -> tuple[list[int], list[int]]:
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        return [uid] * len(USERS), [gid] * len(GROUPS)
    uids = []
    for name in USERS:
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            uids.append(uid)
    gids = []
    for name in GROUPS:
        try:
            gids.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            gids.append(gid)
    return uids, gids


def header(home: Path) -> str:
    uids, gids = _ids()
    return (
        f"qmail home directory: {safeput(str(home))}.\n"
        f"user-ext delimiter: {BREAK}.\n"
        f"paternalism (in decimal): {PATRN}.\n"
        f"silent concurrency limit: {SPAWN}.\n"
        f"subdirectory split: {SPLIT}.\n"
        f"user ids: {', '.join(map(str, uids))}.\n"
        f"group ids: {', '.join(map(str, gids))}.\n"
    )


class _Show:
    """Renders the control section; keeps qmail's per-kind wording in one place."""

    def __init__(self, control: Control) -> None:
        self.c = control
        self.out: list[str] = []
        try:
            self.me = control.me
        except ControlError:
            self.me = None

    def head(self, name: str) -> None:
        self.out.append(f"\n{name}: ")

    def lst(
        self,
        name: str,
        default: str,
        pre: str,
        post: str,
        check: Callable[[], object] | None = None,
    ) -> int:
        """1 if the list has content, 0 if absent, -1 if it cannot be used."""
        self.head(name)
        try:
            entries = self.c.lines(name)
            if check is not None:
                check()
        except ControlError as e:
            self.out.append(_oops(e))
            return -1
        if entries is None:
            self.out.append(f"(Default.) {default}\n")
            return 0
        self.out.append("\n")
        for _, entry in entries:
            self.out.append(f"{pre}{safeput(entry)}{post}\n")
        return 1

    def string(self, name: str, flag_me: bool, default: str, pre: str) -> None:
        self.head(name)
        try:
            value = self.c.line(name)
        except ControlError as e:
            self.out.append(_oops(e))
            return
        if value is None:
            self.out.append("(Default.) ")
            value = self.me if flag_me and self.me is not None else default
        self.out.append(f"{pre}{safeput(value)}.\n")

    def integer(self, name: str, default: int, pre: str, post: str) -> None:
        self.head(name)
        try:
            absent = self.c.line(name) is None
            value = self.c.integer(name, default)
        except ControlError as e:
            self.out.append(_oops(e))
            return
        prefix = "(Default.) " if absent else ""
        self.out.append(f"{prefix}{pre}{value}{post}.\n")

    def morercpthosts_cdb(self) -> None:
        self.head("morercpthosts.cdb")
        try:
            src = self.c.path("morercpthosts").stat()
        except OSError:
            src = None
        try:
            cdb = self.c.path("morercpthosts.cdb").stat()
        except OSError:
            cdb = None
        if src is None and cdb is None:
            text = "(Default.) No effect."
        elif src is None:
            text = "Oops! morercpthosts.cdb exists but morercpthosts doesn't."
        elif cdb is None:
            text = "Oops! morercpthosts exists but morercpthosts.cdb doesn't."
        elif src.st_mtime_ns > cdb.st_mtime_ns:
            text = "Oops! morercpthosts.cdb is older than morercpthosts."
        else:
            text = "Modified recently enough; hopefully up to date."
        self.out.append(text + "\n")

    def _newer(self, source: str, compiled: str) -> bool:
        try:
            return self.c.path(source).stat().st_mtime_ns > self.c.path(compiled).stat().st_mtime_ns
        except OSError:
            return False

    def extra(self, doc: ControlDoc) -> None:
        self.head(doc.name)
        try:
            if doc.kind == "list":
                entries = self.c.lines(doc.name) or []
                self.out.append("\n")
                for _, entry in entries:
                    self.out.append(f"{doc.pre}{safeput(entry)}{doc.post}\n")
            elif doc.kind == "int":
                self.out.append(f"{doc.pre}{self.c.integer(doc.name, 0)}{doc.post}.\n")
            elif doc.kind == "line":
                value = self.c.line(doc.name) or ""
                self.out.append(f"{doc.pre}{safeput(value)}{doc.post}\n")
            elif doc.source is not None and self._newer(doc.source, doc.name):
                self.out.append(f"Oops! {doc.name} is older than {doc.source}.\n")
            else:
                self.out.append(f"{doc.pre}{doc.post}\n")
        except ControlError as e:
            self.out.append(_oops(e))

    def qmail_files(self) -> None:
        s = self
        s.lst("badmailfrom", "Any MAIL FROM is allowed.", "", " not accepted in MAIL FROM.")
        s.string("bouncefrom", False, "MAILER-DAEMON", "Bounce user name is ")
        s.string("bouncehost", True, "bouncehost", "Bounce host name is ")
        s.integer("concurrencylocal", 10, "Local concurrency is ", "")
        s.integer("concurrencyremote", 20, "Remote concurrency is ", "")
        s.integer("databytes", 0, "SMTP DATA limit is ", " bytes")
        s.string("defaultdomain", True, "defaultdomain", "Default domain name is ")
        s.string("defaulthost", True, "defaulthost", "Default host name is ")
        s.string("doublebouncehost", True, "doublebouncehost", "2B recipient host: ")
        s.string("doublebounceto", False, "postmaster", "2B recipient user: ")
        s.string("envnoathost", True, "envnoathost", "Presumed domain name is ")
        s.string("helohost", True, "helohost", "SMTP client HELO host name is ")
        s.string("idhost", True, "idhost", "Message-ID host name is ")
        s.string("localiphost", True, "localiphost", "Local IP address becomes ")
        s.lst(
            "locals",
            "Messages for me are delivered locally.",
            "Messages for ",
            " are delivered locally.",
        )
        s.string("me", False, "undefined! Uh-oh", "My name is ")
        s.lst(
            "percenthack",
            "The percent hack is not allowed.",
            "The percent hack is allowed for user%host@",
            ".",
        )
        s.string("plusdomain", True, "plusdomain", "Plus domain name is ")
        s.lst("qmqpservers", "No QMQP servers.", "QMQP server: ", ".")
        s.integer("queuelifetime", 604800, "Message lifetime in the queue is ", " seconds")
        allowed = "SMTP clients may send messages to recipients at "
        # as in qmail, an unreadable rcpthosts counts as present: smtpd would refuse to run,
        # so "morercpthosts is irrelevant" would be misleading
        if s.lst("rcpthosts", "SMTP clients may send messages to any recipient.", allowed, "."):
            s.lst("morercpthosts", "No effect.", allowed, ".")
        else:
            s.lst(
                "morercpthosts",
                "No rcpthosts; morercpthosts is irrelevant.",
                "No rcpthosts; doesn't matter that morercpthosts has ",
                ".",
            )
        s.morercpthosts_cdb()
        s.string("smtpgreeting", True, "smtpgreeting", "SMTP greeting: 220 ")
        s.lst("smtproutes", "No artificial SMTP routes.", "SMTP route: ", "")
        s.integer("timeoutconnect", 60, "SMTP client connection timeout is ", " seconds")
        s.integer("timeoutremote", 1200, "SMTP client data timeout is ", " seconds")
        s.integer("timeoutsmtpd", 1200, "SMTP server data timeout is ", " seconds")
        # qmail-send parses virtualdomains as key:prepend; show its refusal here too
        s.lst(
            "virtualdomains",
            "No virtual domains.",
            "Virtual domain: ",
            "",
            check=lambda: self.c.mapping("virtualdomains"),
        )


def show(home: Path) -> tuple[str, int]:
    """The whole report and the exit code (111 when home or control/ cannot be read)."""
    out = header(home)
    if not home.is_dir():
        return out + f"Oops! Unable to chdir to {safeput(str(home))}.\n", 111
    control = Control(home)
    try:
        names = os.listdir(control.dir)
    except OSError:
        return out + "Oops! Unable to open control directory.\n", 111
    s = _Show(control)
    s.qmail_files()
    known = {doc.name: doc for doc in PYQMAIL_CONTROLS}
    for doc in PYQMAIL_CONTROLS:
        if doc.name in names:
            s.extra(doc)
    for name in sorted(names):
        if name in QMAIL_CONTROLS or name in known:
            continue
        s.out.append(f"\n{safeput(name)}: I have no idea what this file does.\n")
    return out + "".join(s.out), 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmail-showctl", description="Describe this qmail installation's configuration."
    )
    parser.add_argument("--home", help=HOME_HELP)
    args = parser.parse_args(argv)
    text, code = show(resolve_home(args.home))
    out = sys.stdout.buffer
    out.write(text.encode("latin-1", "replace"))
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
