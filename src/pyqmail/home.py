"""Where a pyqmail installation lives: --home, else $QMAILHOME, else a default."""

from __future__ import annotations

import os
from pathlib import Path

ROOT_HOME = Path("/var/qmail")

HOME_HELP = (
    "qmail home directory (default: $QMAILHOME, else /var/qmail when run as root, else ~/.pyqmail)"
)


def user_default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".pyqmail"


def default_home() -> Path:
    env = os.environ.get("QMAILHOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return ROOT_HOME
    return user_default_home()


def resolve_home(arg: str | os.PathLike[str] | None = None) -> Path:
    """The home a program should use; always absolute so children can chdir freely."""
    path = Path(arg) if arg else default_home()
    return path.absolute()
