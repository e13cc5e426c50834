"""qmail-inject: prepare a locally written message and put it into the queue.

The work is split so it can be tested without processes: `inject_message()`
is a pure function from the raw message, the parsed command line, the
environment and the controls to the final message, envelope sender and
recipients; `run()` adds the I/O (stdin, controls, qmail-queue) and is
what both the `qmail-inject` console script and the sendmail wrapper call
in-process.

Deliberate differences from qmail 1.03, all for robustness of modern use:
* CRLF line ends in the input are turned into LF (qmail's queue format is
  LF-only; a CR left in place would go out on the wire as CR CR LF).
* Header recipients are put on the envelope, and listed in an added
  Mail-Followup-To, in header order (qmail's right-to-left parser reverses
  the addresses within each field).
* An empty address (`To: <>`, an empty argument) adds no recipient, and
  per-recipient VERP (`QMAILINJECT=r`) is not applied to an empty sender.
* `-f '<>'` means the empty sender and `-f '<addr>'` means `addr`, as every
  other sendmail-compatible injector reads them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .addr822 import (
    AT,
    COLON,
    LEFT,
    RIGHT,
    Kind,
    ParseError,
    Token,
    address_list,
    tokenize,
    unparse,
    unquote,
)
from .constants import EXIT_PERM, EXIT_TEMP
from .control import Control, ControlError
from .fmt import msgid_stamp, quote, quote2, rfc822_date
from .home import HOME_HELP, resolve_home

USAGE = "qmail-inject: usage: qmail-inject [ --home DIR ] [ -nNaAhH ] [ -f sender ] [ recip ... ]\n"

# recipient strategies, named after the option letters that choose them
RECIP_DEFAULT = "A"  # the arguments if there are any, else the header
RECIP_ARGS = "a"
RECIP_HEADER = "h"
RECIP_BOTH = "H"

_SENDER_FIELDS = frozenset(
    {
        "sender",
        "from",
        "reply-to",
        "return-receipt-to",
        "errors-to",
        "resent-sender",
        "resent-from",
        "resent-reply-to",
    }
)
_RESENT_MARKERS = frozenset(
    {
        "resent-sender",
        "resent-from",
        "resent-reply-to",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-date",
        "resent-message-id",
    }
)
# the fields qmail-inject recognises by name; any other name is passed through untouched
_KNOWN_FIELDS = frozenset(
    {
        "sender",
        "from",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "date",
        "message-id",
        "subject",
        "resent-sender",
        "resent-from",
        "resent-reply-to",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-date",
        "resent-message-id",
        "return-receipt-to",
        "errors-to",
        "apparently-to",
        "received",
        "return-path",
        "delivered-to",
        "content-length",
        "content-type",
        "content-transfer-encoding",
        "notice-requested-upon-delivery-to",
        "mail-followup-to",
    }
)
_DROPPED = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class InjectFatal(Exception):
    """A reason to stop: qmail-inject's exit code (100 permanent, 111 temporary) and text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class UsageError(Exception):
    pass


# Header text is handled as str holding one code point per original byte
# (latin-1), so any 8-bit header survives untouched; envelope addresses and
# messages for the terminal are converted to the usual UTF-8/surrogateescape str.
def _inner(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _outer(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


# -- command line ---------------------------------------------------------------------


@dataclass
class InjectArgs:
    strategy: str = RECIP_DEFAULT
    queue: bool = True  # -N (default) queues, -n prints
    sender: str | None = None  # the -f value as given
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> InjectArgs:
    """qmail-inject's options, with getopt's rules: clustered letters, options before arguments."""
    args = InjectArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in "aAhH":
                args.strategy = letter
            elif letter == "n":
                args.queue = False
            elif letter == "N":
                args.queue = True
            elif letter == "f":
                if j < len(arg):
                    args.sender = arg[j:]
                else:
                    i += 1
                    if i >= len(argv):
                        raise UsageError("option -f needs a sender")
                    args.sender = argv[i]
                break
            else:
                raise UsageError(f"unknown option -{letter}")
        i += 1
    args.recipients = list(argv[i:])
    return args


# -- controls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InjectControls:
    defaultdomain: str
    defaulthost: str
    plusdomain: str
    idhost: str
    mft: frozenset[str] | None = None  # QMAILMFTFILE's addresses, lowercased

    @classmethod
    def load(cls, home: Path | str, env: Mapping[str, str]) -> InjectControls:
        """Read the four controls (environment overrides first) and QMAILMFTFILE."""
        control = Control(home)

        def pick(name: str, variable: str) -> str:
            if variable in env:
                return env[variable]
            value = control.line(name)
            # an empty file would make every rewritten address end in a bare `.` or `@`
            if value:
                return value
            return control.me or name

        try:
            values = {
                "defaultdomain": pick("defaultdomain", "QMAILDEFAULTDOMAIN"),
                "defaulthost": pick("defaulthost", "QMAILDEFAULTHOST"),
                "plusdomain": pick("plusdomain", "QMAILPLUSDOMAIN"),
                "idhost": pick("idhost", "QMAILIDHOST"),
            }
        except ControlError as e:
            raise InjectFatal(EXIT_TEMP, f"unable to read controls: {e}") from None
        return cls(mft=_read_mft(env.get("QMAILMFTFILE")), **values)


def _read_mft(path: str | None) -> frozenset[str] | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InjectFatal(EXIT_TEMP, f"read error: {path}: {e.strerror}") from None
    entries = set()
    for raw in data.decode("latin-1").split("\n"):
        entry = raw.rstrip(" \t\r")
        if entry and not entry.startswith("#"):
            entries.add(_ascii_lower(entry))
    return frozenset(entries)


# -- header fields ----------------------------------------------------------------------


def _field_name(text: str) -> str | None:
    colon = text.find(":")
    if colon < 0:
        return None
    return text[:colon].rstrip(" \t")


def field_valid(text: str) -> bool:
    """A header field: a non-empty name of printable non-space ASCII, then a colon."""
    name = _field_name(text)
    return name is not None and name != "" and all(32 < ord(c) < 127 for c in name)


def field_type(text: str) -> str | None:
    """The lowercased name of a field qmail-inject knows, else None."""
    name = _field_name(text)
    if name is None:
        return None
    low = _ascii_lower(name)
    return low if low in _KNOWN_FIELDS else None


def _with_newline(body: bytes) -> bytes:
    if body and not body.endswith(b"\n"):
        return body + b"\n"
    return body


def split_header(raw: bytes) -> tuple[list[str], bytes]:
    """The header's fields (continuations joined, each ending in a newline) and the rest.

    The header ends at an empty line, which stays at the start of the rest,
    or at the first line that is not a header field, in which case an empty
    line is put before it.  A line starting `From ` is kept as an
    `MBOX-Line:` field.  A header cut short by the end of input has no rest.
    """
    fields: list[str] = []
    current: list[str] | None = None
    pos = 0
    n = len(raw)
    while pos < n:
        end = raw.find(b"\n", pos)
        nxt = n if end < 0 else end + 1
        line = raw[pos:nxt].decode("latin-1")
        if end < 0:
            line += "\n"
        if current is not None:
            if line[0] in " \t":
                current.append(line)
                pos = nxt
                continue
            fields.append("".join(current))
            current = None
        if line == "\n":
            return fields, _with_newline(raw[pos:])
        if line.startswith("From "):
            current = ["MBOX-Line: ", line]
        elif field_valid(line):
            current = [line]
        else:
            return fields, b"\n" + _with_newline(raw[pos:])
        pos = nxt
    if current is not None:
        fields.append("".join(current))
    return fields, b""


# -- address rewriting --------------------------------------------------------------------


def _parse_or_die(text: str) -> list[Token]:
    try:
        return tokenize(text)
    except ParseError:
        raise InjectFatal(EXIT_PERM, "unable to parse this line:\n" + _outer(text)) from None


class Rewriter:
    """qmail-inject's address rewriting with one set of controls (§9.3)."""

    def __init__(self, controls: InjectControls) -> None:
        self.host = _parse_or_die("@" + _inner(controls.defaulthost))
        self.domain = _parse_or_die("." + _inner(controls.defaultdomain))
        self.domain_name = controls.defaultdomain.lower()
        self.plus = _parse_or_die("." + _inner(controls.plusdomain))

    def __call__(self, addr: list[Token]) -> list[Token]:
        if not addr:
            return addr  # <> stays empty
        if (
            len(addr) >= 2
            and addr[-2].kind is Kind.AT
            and addr[-1].kind is Kind.LITERAL
            and not addr[-1].text
        ):
            return addr  # x@[] is a VERP template for qmail-send, not an address
        a = list(addr)
        if a[0].kind is Kind.AT:
            # a source route: everything up to its colon goes; no colon leaves nothing
            for idx, tok in enumerate(a):
                if tok.kind is Kind.COLON:
                    a = a[idx + 1 :]
                    break
            else:
                a = []
        if a and a[-1].kind is Kind.DOT:
            a.pop()
        if a and a[-1].kind is Kind.AT:
            a.pop()
        if not a:
            return a
        if not any(tok.kind is Kind.AT for tok in a):
            a += self.host
        last = a[-1]
        if last.kind is Kind.ATOM and last.text.endswith("+"):
            a[-1] = Token(Kind.ATOM, last.text[:-1])
            a += self.plus
        for tok in reversed(a):
            if tok.kind is Kind.AT:
                break
            if tok.kind is Kind.DOT or tok.kind is Kind.LITERAL:
                return a
        # a machine whose own name has no dot (me = `vm`, so defaultdomain = `vm` too):
        # `bob@vm` must stay `bob@vm`, never become `bob@vm.vm`
        if a[-1].kind is Kind.ATOM and a[-1].text.lower() == self.domain_name:
            return a
        return a + self.domain

    def field(self, text: str, found: list[str]) -> str:
        """Rewrite every address of one header field; their envelope forms go to `found`."""
        collected: list[str] = []

        def one(addr: list[Token]) -> list[Token]:
            new = self(addr)
            collected.append(unquote(new))
            return new

        try:
            tokens = address_list(tokenize(text), one)
        except ParseError:
            raise InjectFatal(EXIT_PERM, "unable to parse this line:\n" + _outer(text)) from None
        found.extend(reversed(collected))  # the parser works right to left
        return unparse(tokens)


# -- the message ------------------------------------------------------------------------


class Injection(NamedTuple):
    message: bytes  # what goes to qmail-queue
    sender: str
    recipients: list[str]


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if name in env:
            return _inner(env[name])
    return None


@dataclass
class _Identity:
    """Who the message is from when the header or -f does not say (§9.2)."""

    user: str
    host: str | None
    name: str | None
    suser: str
    shost: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> _Identity:
        user = _first(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
        if user is None:
            user = "anonymous"
        host = _first(env, "QMAILHOST", "MAILHOST")
        shost = _first(env, "QMAILSHOST")
        suser = _first(env, "QMAILSUSER")
        return cls(
            user=user,
            host=host,
            name=_first(env, "QMAILNAME", "MAILNAME", "NAME"),
            suser=user if suser is None else suser,
            shost=host if shost is None else shost,
        )


def _reparsed(tokens: list[Token], rewrite: Rewriter, found: list[str]) -> str:
    # qmail builds these fields as text and then treats them like any header field
    return rewrite.field(unparse(tokens), found)


def default_from(ident: _Identity, comment_style: bool, rewrite: Rewriter) -> str:
    tokens = [Token(Kind.ATOM, "From"), COLON]
    named = ident.name is not None and not comment_style
    if named:
        tokens += [Token(Kind.QUOTE, ident.name or ""), LEFT]
    user_kind = Kind.ATOM if quote(ident.user) == ident.user else Kind.QUOTE
    tokens.append(Token(user_kind, ident.user))
    if ident.host is not None:
        tokens += [AT, Token(Kind.ATOM, ident.host)]
    if named:
        tokens.append(RIGHT)
    if ident.name is not None and comment_style:
        tokens.append(Token(Kind.COMMENT, ident.name))
    return _reparsed(tokens, rewrite, [])


def default_sender(
    ident: _Identity,
    verp_message: bool,
    verp_recipient: bool,
    now: int,
    pid: int,
    rewrite: Rewriter,
) -> str:
    user = ident.suser
    if verp_message:
        user += f"-{now}.{pid}"
    if verp_recipient:
        user += "-"
    tokens = [Token(Kind.ATOM, "Return-Path"), COLON, Token(Kind.QUOTE, user)]
    if ident.shost is not None:
        tokens += [AT, Token(Kind.ATOM, ident.shost)]
    found: list[str] = []
    _reparsed(tokens, rewrite, found)
    return found[0] if found else ""


def _sender_option(value: str, rewrite: Rewriter) -> str:
    text = _inner(value)
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    quoted = quote2(text)
    return unquote(rewrite(_parse_or_die(quoted)))


def inject_message(
    raw: bytes,
    args: InjectArgs,
    env: Mapping[str, str],
    controls: InjectControls,
    *,
    now: float | None = None,
    pid: int | None = None,
) -> Injection:
    """Rewrite a message as qmail-inject does; raises InjectFatal for a refused message."""
    start = int(time.time() if now is None else now)
    proc = os.getpid() if pid is None else pid
    flags = env.get("QMAILINJECT", "")
    comment_style = "c" in flags
    drop_return_path = "s" in flags
    drop_from = "f" in flags
    drop_msgid = "i" in flags
    verp_recipient = "r" in flags
    verp_message = "m" in flags

    rewrite = Rewriter(controls)
    ident = _Identity.from_env(env)

    sender: str | None = None
    if args.sender is not None:
        sender = _sender_option(args.sender, rewrite)

    strategy = args.strategy
    if strategy == RECIP_DEFAULT:
        strategy = RECIP_ARGS if args.recipients else RECIP_HEADER
    arg_recipients: list[str] = []
    if strategy != RECIP_HEADER:
        for arg in args.recipients:
            try:
                tokens = tokenize(quote2(_inner(arg)))
            except ParseError:
                raise InjectFatal(EXIT_PERM, f"unable to parse address: {arg}") from None
            address = unquote(rewrite(tokens))
            if address:
                arg_recipients.append(address)
    use_header = strategy != RECIP_ARGS

    raw = raw.replace(b"\r\n", b"\n")
    fields, body = split_header(raw)

    seen: set[str] = set()
    saved: list[str] = []
    header_rcpts: list[str] = []  # To, Cc, Bcc, Apparently-To
    resent_rcpts: list[str] = []
    tocc: list[str] = []
    return_paths: list[str] = []
    for text in fields:
        kind = field_type(text)
        if (
            (drop_from and kind == "from")
            or (drop_msgid and kind == "message-id")
            or (drop_return_path and kind == "return-path")
        ):
            continue
        if kind is not None:
            seen.add(kind)
        elif not field_valid(text):
            raise InjectFatal(EXIT_PERM, "invalid header field: " + _outer(text))
        if kind in ("to", "cc"):
            found: list[str] = []
            text = rewrite.field(text, found)
            header_rcpts += found
            tocc += found
        elif kind in ("bcc", "apparently-to"):
            text = rewrite.field(text, header_rcpts)
        elif kind in ("resent-to", "resent-cc", "resent-bcc"):
            text = rewrite.field(text, resent_rcpts)
        elif kind == "return-path":
            rewrite.field(text, return_paths)
        elif kind in _SENDER_FIELDS:
            text = rewrite.field(text, [])
        if kind in _DROPPED:
            continue
        saved.append(text)

    if sender is None:
        if return_paths:
            sender = return_paths[0]
            if verp_recipient and sender:
                sender += "-@[]"
        else:
            sender = default_sender(ident, verp_message, verp_recipient, start, proc, rewrite)
            if verp_recipient and sender:
                sender += "-@[]"

    resent = bool(seen & _RESENT_MARKERS)
    date = f"Date: {rfc822_date(start)}\n"
    msgid = f"Message-ID: <{msgid_stamp(start)}.{proc}.qmail@{_inner(controls.idhost)}>\n"
    added: list[str] = []
    if resent:
        if "resent-date" not in seen:
            added.append("Resent-" + date)
        if "resent-message-id" not in seen:
            added.append("Resent-" + msgid)
        if "resent-from" not in seen:
            added.append("Resent-" + default_from(ident, comment_style, rewrite))
        if "resent-to" not in seen and "resent-cc" not in seen:
            added.append("Resent-Cc: recipient list not shown: ;\n")
    else:
        if "date" not in seen:
            added.append(date)
        if "message-id" not in seen:
            added.append(msgid)
        if "from" not in seen:
            added.append(default_from(ident, comment_style, rewrite))
        if "to" not in seen and "cc" not in seen:
            added.append("Cc: recipient list not shown: ;\n")
        if (
            controls.mft is not None
            and "mail-followup-to" not in seen
            and any(_ascii_lower(a) in controls.mft for a in tocc if a)
        ):
            listed = ",\n  ".join(quote2(a) for a in tocc if a)
            added.append(f"Mail-Followup-To: {listed}\n")

    recipients = list(arg_recipients)
    if use_header:
        recipients += [r for r in (resent_rcpts if resent else header_rcpts) if r]
    message = "".join(added + saved).encode("latin-1") + body
    return Injection(message, _outer(sender), [_outer(r) for r in recipients])


def print_form(injection: Injection) -> bytes:
    """What -n prints: the message with the envelope sender as a Return-Path line first."""
    line = "Return-Path: <" + quote2(injection.sender) + ">\n"
    return line.encode("utf-8", "surrogateescape") + injection.message


# -- the program ------------------------------------------------------------------------


def _stderr(text: str) -> None:
    try:
        sys.stderr.flush()
        _write_all(2, text.encode("utf-8", "surrogateescape"))
    except OSError:
        pass  # nowhere left to complain to; the exit code still tells


def _say(text: str) -> None:
    _stderr("qmail-inject: fatal: " + text + ("" if text.endswith("\n") else "\n"))


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except MemoryError:
        raise InjectFatal(EXIT_TEMP, "out of memory") from None
    except OSError:
        raise InjectFatal(EXIT_TEMP, "read error") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, home: Path | None = None) -> int:
    """qmail-inject with its arguments (no program name); returns the exit code."""
    environ: Mapping[str, str] = os.environ if env is None else env
    rest = list(argv)
    home_arg: str | None = None
    while rest and rest[0].startswith("--") and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--help":
            sys.stdout.write(USAGE[len("qmail-inject: ") :] + f"  --home DIR  {HOME_HELP}\n")
            sys.stdout.flush()
            return 0
        if opt == "--home" and rest:
            home_arg = rest.pop(0)
        elif opt.startswith("--home="):
            home_arg = opt.split("=", 1)[1]
        else:
            _stderr(USAGE)
            return EXIT_PERM
    try:
        args = parse_args(rest)
    except UsageError:
        _stderr(USAGE)
        return EXIT_PERM
    root = home if home is not None else resolve_home(home_arg)
    try:
        if not root.is_dir():
            raise InjectFatal(EXIT_TEMP, f"unable to switch to qmail home directory {root}")
        controls = InjectControls.load(root, environ)
        raw = _read_all(0)
        result = inject_message(raw, args, environ, controls)
    except InjectFatal as e:
        _say(e.text)
        return e.code
    except MemoryError:
        _say("out of memory")
        return EXIT_TEMP
    except Exception as e:
        # a bug must not lose the message silently or show a traceback: the caller retries
        _say(f"internal bug: {type(e).__name__}: {e}")
        return EXIT_TEMP
    if not args.queue:
        try:
            _write_all(1, print_form(result))
        except OSError:
            _say("unable to write output")
            return EXIT_TEMP
        return 0
    from .qq import queue_message

    try:
        verdict = queue_message(root, result.message, result.sender, result.recipients)
    except OSError:
        _say("unable to run qmail-queue")
        return EXIT_TEMP
    if verdict.ok:
        return 0
    _say(verdict.message)
    return EXIT_PERM if verdict.permanent else EXIT_TEMP


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        code = EXIT_TEMP  # interrupted before qmail-queue committed anything it reported
    sys.exit(code)
