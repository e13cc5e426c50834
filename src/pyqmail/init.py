"""Creating a qmail home: control/, queue/, alias/, users/, log/."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .control import write_control
from .queue import make_queue

ALIAS_FILES = {
    # root and mailer-daemon never read mail themselves: their mail goes to postmaster,
    # and postmaster's to the alias user's Maildir (qmail's INSTALL.alias convention)
    ".qmail-postmaster": "./Maildir/\n",
    ".qmail-mailer-daemon": "&postmaster\n",
    ".qmail-root": "&postmaster\n",
}


# Relaying is allowed from this machine only: local mail programs may submit over SMTP,
# strangers may only send to rcpthosts (qmail's usual tcp.smtp).
TCP_SMTP = """\
# Rules for the SMTP listener of `pyqmail run` (tcprules format). After editing run:
#   tcprules control/tcp.smtp.cdb control/tcp.smtp.tmp < control/tcp.smtp
127.0.0.1:allow,RELAYCLIENT=""
::1:allow,RELAYCLIENT=""
:allow
"""


class HomeExists(Exception):
    pass


@dataclass
class HomeSettings:
    me: str
    locals: list[str] = field(default_factory=list)
    rcpthosts: list[str] = field(default_factory=list)
    smtp: str | None = None
    pop3: str | None = None
    submission: str | None = None


def _maildir(path: Path) -> None:
    for sub in ("", "tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)


def create_home(home: Path, settings: HomeSettings, force: bool = False) -> list[Path]:
    """Make a working home; returns the paths created. Existing mail is never removed."""
    if (home / "control").exists() and not force:
        raise HomeExists(f"{home} already holds a qmail home (use --force to rewrite its controls)")
    made: list[Path] = []
    for sub, mode in (
        ("", 0o755),
        ("control", 0o755),
        ("alias", 0o2755),
        ("users", 0o755),
        ("log", 0o750),
    ):
        p = home / sub
        if not p.is_dir():
            p.mkdir(mode=mode, parents=True)
            made.append(p)
        os.chmod(p, mode)
    me = settings.me.lower()
    local_domains = settings.locals or [me]
    controls: dict[str, list[str]] = {
        "me": [me],
        "locals": local_domains,
        "rcpthosts": settings.rcpthosts or local_domains,
        "defaultdomain": [me.split(".", 1)[1] if "." in me else me],
        "plusdomain": [me.split(".", 1)[1] if "." in me else me],
        "defaultdelivery": ["./Maildir/"],
    }
    for key in ("smtp", "pop3", "submission"):
        value = getattr(settings, key)
        if value:
            controls[f"{key}listen"] = [value]
    for name, lines in controls.items():
        write_control(home, name, lines)
        made.append(home / "control" / name)
    alias = home / "alias"
    for name, text in ALIAS_FILES.items():
        p = alias / name
        if not p.exists():
            p.write_text(text)
            os.chmod(p, 0o644)
            made.append(p)
    if not (alias / "Maildir").exists():
        _maildir(alias / "Maildir")
        made.append(alias / "Maildir")
    rules = home / "control" / "tcp.smtp"
    if not rules.exists():
        from .tcprules import compile_rules

        rules.write_text(TCP_SMTP)
        compile_rules(
            TCP_SMTP.encode(), rules.with_name("tcp.smtp.cdb"), rules.with_name("tcp.smtp.tmp")
        )
        made += [rules, rules.with_name("tcp.smtp.cdb")]
    made += make_queue(home / "queue")
    return made
