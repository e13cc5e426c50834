"""`pyqmail`: the front command (init, user, run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .control import ControlError
from .home import HOME_HELP, default_home, resolve_home, user_default_home
from .init import HomeExists, HomeSettings, create_home


def _fail(message: str, code: int = 111) -> int:
    print(f"pyqmail: {message}", file=sys.stderr)
    return code


def cmd_init(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    settings = HomeSettings(
        me=args.me,
        locals=args.local or [],
        rcpthosts=args.rcpthost or [],
        smtp=args.smtp,
        pop3=args.pop3,
        submission=args.submission,
    )
    try:
        made = create_home(home, settings, force=args.force)
    except HomeExists as e:
        return _fail(str(e), 100)
    except OSError as e:
        return _fail(f"unable to create {home}: {e.strerror or e}")
    print(f"created qmail home {home}")
    for path in made:
        print(f"  {path}")
    return 0


def _ensure_default_home(home: Path) -> int:
    """`pyqmail run` with no home: make the per-user default one, saying where it is."""
    from .run import default_me

    me = default_me()
    settings = HomeSettings(me=me, locals=list(dict.fromkeys([me, "localhost"])))
    create_home(home, settings)
    print(f"pyqmail: created a new qmail home at {home} for host {me}")
    print(
        f"  local domains: {', '.join(settings.locals)}; mail for postmaster goes to {home}/alias/Maildir/"
    )
    print(f"  add a mailbox:  pyqmail user add you@{me}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    home = resolve_home(args.home)
    if not (home / "control").is_dir():
        if args.home is None and home in (default_home().absolute(), user_default_home()):
            _ensure_default_home(home)
        else:
            return _fail(
                f"{home} is not a qmail home (create it with: pyqmail init --home {home} --me HOST)"
            )
    try:
        return run(home)
    except ControlError as e:
        return _fail(str(e))


def cmd_user(args: argparse.Namespace) -> int:
    from . import users

    home = resolve_home(args.home)
    if not (home / "control").is_dir():
        return _fail(f"{home} is not a qmail home (create it with: pyqmail init --me HOST)")
    try:
        if args.action == "add":
            password = None
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
                if not password:
                    return _fail("empty password on standard input", 100)
            path = users.add_user(home, args.address, password)
            print(path)
        elif args.action == "list":
            for address, path in users.list_users(home):
                print(f"{address}\t{path}")
        elif args.action == "del":
            kept = users.del_user(home, args.address)
            print(f"removed {args.address}; its mail stays in {kept}")
    except users.UserError as e:
        return _fail(str(e), 100)
    except ControlError as e:
        return _fail(str(e))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyqmail",
        description="pyqmail: a qmail-compatible mail transfer agent.",
        epilog=f"Home directory: {HOME_HELP}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a qmail home (control/, queue/, alias/, users/, log/)")
    p.add_argument("--home", help=HOME_HELP)
    p.add_argument("--me", required=True, help="this host's fully qualified name (control/me)")
    p.add_argument(
        "--local",
        action="append",
        metavar="DOMAIN",
        help="a domain delivered locally (control/locals; default: the --me name)",
    )
    p.add_argument(
        "--rcpthost",
        action="append",
        metavar="DOMAIN",
        help="a domain accepted over SMTP (control/rcpthosts; default: the locals)",
    )
    p.add_argument(
        "--smtp",
        metavar="ADDR:PORT",
        help="SMTP listen address (default 127.0.0.1:2525, as root 0.0.0.0:25 and [::]:25)",
    )
    p.add_argument("--pop3", metavar="ADDR:PORT", help="POP3 listen address (control/pop3listen)")
    p.add_argument(
        "--submission",
        metavar="ADDR:PORT",
        help="submission listen address (control/submissionlisten)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rewrite the controls of an existing home (mail and queue are kept)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run the MTA in the foreground (SIGTERM/Ctrl-C stops it)")
    p.add_argument("--home", help=HOME_HELP + "; created on first run if it is the default")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("user", help="manage mailbox users (users/assign)")
    usub = p.add_subparsers(dest="action", required=True)
    a = usub.add_parser("add", help="create a mailbox user; prints its home directory")
    a.add_argument("--home", help=HOME_HELP)
    a.add_argument("address")
    a.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the user's password (for POP3/AUTH) from the first line of stdin",
    )
    a.set_defaults(func=cmd_user)
    a = usub.add_parser("list", help="list mailbox users and their home directories")
    a.add_argument("--home", help=HOME_HELP)
    a.set_defaults(func=cmd_user)
    a = usub.add_parser("del", help="remove a mailbox user (its mail is kept on disk)")
    a.add_argument("--home", help=HOME_HELP)
    a.add_argument("address")
    a.set_defaults(func=cmd_user)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.exit(code)
