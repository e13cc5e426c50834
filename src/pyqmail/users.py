"""Who owns a local address: users/assign, users/cdb (qmail-newu), qmail-getpw, mailbox users.

users/assign lines (terminated by a line starting with `.`):

    =local:user:uid:gid:homedir:dash:ext:     one address (case-insensitive)
    +prefix:user:uid:gid:homedir:dash:pre:    every address starting with prefix

qmail-newu compiles it into users/cdb, which qmail-lspawn consults before the
password database.  The mailbox-user functions at the end (add_user,
list_users, del_user, passwords) manage pyqmail's own users, whose homes live
under HOME/mailboxes/ and whose assign lines carry the full address in the
user field.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import hmac
import os
import pwd
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .cdb import CDB, cdb_build
from .constants import BREAK
from .control import Control, ControlError
from .home import resolve_home

# qmail-lspawn / qmail-getpw exit codes (qlx.h)
QLX_USAGE = 112
QLX_ROOT = 113
QLX_NFS = 115
QLX_NOALIAS = 116
QLX_CDB = 117
QLX_SYS = 118
QLX_NOMEM = 119

GETPW_USERLEN = 32  # qmail-getpw only tries account names shorter than this

_TEMP_STAT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in ("EINTR", "ENOMEM", "EIO", "ETIMEDOUT", "EAGAIN", "ESTALE", "ENFILE", "EMFILE")
    if hasattr(errno, n)
)


@dataclass(frozen=True)
class Assignment:
    """The six fields qmail-lspawn hands to qmail-local."""

    user: str
    uid: int
    gid: int
    homedir: str
    dash: str
    ext: str

    def fields(self) -> bytes:
        parts = [self.user, str(self.uid), str(self.gid), self.homedir, self.dash, self.ext]
        return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


# -- users/assign and qmail-newu ------------------------------------------------------


class NewuError(Exception):
    """A qmail-newu failure, worded as qmail-newu prints it after `qmail-newu: fatal: `."""


def assign_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The cdb records for an assign file, the wildcard-character record last."""
    records: list[tuple[bytes, bytes]] = []
    wildchars = bytearray()
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos : nl + 1]
        if line.startswith(b"."):
            break
        if nl < 0:
            # the file ended without its `.` line: it may have been cut short
            raise NewuError("bad format in users/assign")
        pos = nl + 1
        line = line[:-1]
        if b"\0" in line:
            raise NewuError("bad format in users/assign")
        colon = line.find(b":")
        if colon <= 0:
            raise NewuError("bad format in users/assign")
        name = line[1:colon].lower()
        if line[:1] == b"+":
            key = b"!" + name
            if colon >= 2 and line[colon - 1] not in wildchars:
                wildchars.append(line[colon - 1])
        else:
            key = b"!" + name + b"\0"
        fields = line[colon + 1 :].split(b":")
        if len(fields) < 7:
            raise NewuError("bad format in users/assign")
        records.append((key, b"\0".join(fields[:6])))
    records.append((b"", bytes(wildchars)))
    return records


def newu(home: Path) -> None:
    """Compile HOME/users/assign into HOME/users/cdb (tmp file, fsync, rename)."""
    users = Path(home) / "users"
    try:
        data = (users / "assign").read_bytes()
    except FileNotFoundError as e:
        raise NewuError(f"unable to open users/assign: {os.strerror(e.errno or 0)}") from None
    except OSError as e:
        raise NewuError(f"unable to read users/assign: {os.strerror(e.errno or 0)}") from None
    try:
        image = cdb_build(assign_records(data))
    except MemoryError:
        raise NewuError("out of memory") from None
    tmp = users / "cdb.tmp"
    old_umask = os.umask(0o033)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise NewuError(f"unable to open users/cdb.tmp: {os.strerror(e.errno or 0)}") from None
    finally:
        os.umask(old_umask)
    try:
        view = memoryview(image)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise NewuError(f"unable to write users/cdb.tmp: {os.strerror(e.errno or 0)}") from None
    try:
        os.close(fd)
    except OSError as e:
        raise NewuError(f"unable to write users/cdb.tmp: {os.strerror(e.errno or 0)}") from None
    try:
        os.rename(tmp, users / "cdb")
    except OSError as e:
        raise NewuError(
            f"unable to move users/cdb.tmp to users/cdb: {os.strerror(e.errno or 0)}"
        ) from None


def _home_from_argv(args: list[str], usage: str) -> tuple[Path, list[str]]:
    if len(args) >= 2 and args[0] == "--home":
        return resolve_home(args[1]), args[2:]
    if args and args[0].startswith("--home="):
        return resolve_home(args[0].split("=", 1)[1]), args[1:]
    if args and args[0] in ("-h", "--help"):
        sys.stderr.write(usage)
        sys.exit(100)
    return resolve_home(None), args


def newu_main(argv: list[str] | None = None) -> None:
    home, _ = _home_from_argv(
        list(sys.argv[1:] if argv is None else argv),
        "usage: qmail-newu [--home DIR]\n  compiles HOME/users/assign into HOME/users/cdb\n",
    )
    try:
        if not home.is_dir():
            raise NewuError(f"unable to chdir to {home}: {os.strerror(errno.ENOENT)}")
        newu(home)
    except NewuError as e:
        sys.stderr.write(f"qmail-newu: fatal: {e}\n")
        sys.exit(111)
    sys.exit(0)


# -- lookups --------------------------------------------------------------------------


class LookupFailure(Exception):
    """A lookup that must end the delivery attempt with a qmail-lspawn exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _parse_fields(data: bytes) -> Assignment:
    parts = data.split(b"\0")
    if len(parts) < 6:
        raise LookupFailure(QLX_CDB)
    text = [p.decode("utf-8", "surrogateescape") for p in parts[:6]]
    try:
        uid, gid = int(text[1]), int(text[2])
    except ValueError:
        raise LookupFailure(QLX_CDB) from None
    return Assignment(text[0], uid, gid, text[3], text[4], text[5])


def lookup_cdb(home: Path, local: str) -> Assignment | None:
    """users/cdb lookup with qmail-lspawn's rules; None when no entry (or no cdb) applies.

    Raises LookupFailure(QLX_CDB) when the cdb exists but is unusable.
    """
    try:
        db = CDB.open_cached(f"{home}/users/cdb")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise LookupFailure(QLX_CDB) from None
    try:
        wildchars = db.get(b"")
        if wildchars is None:
            raise LookupFailure(QLX_CDB)
        raw_local = local.encode("utf-8", "surrogateescape")
        lower = b"!" + raw_local.lower()
        found = db.get(lower + b"\0")
        if found is not None:
            return _parse_fields(found)
        for i in range(len(lower), 0, -1):
            if i != 1 and lower[i - 1] not in wildchars:
                continue
            found = db.get(lower[:i])
            if found is not None:
                a = _parse_fields(found)
                rest = raw_local[i - 1 :].decode("utf-8", "surrogateescape")
                return Assignment(a.user, a.uid, a.gid, a.homedir, a.dash, a.ext + rest)
    except Exception as e:
        if isinstance(e, LookupFailure):
            raise
        raise LookupFailure(QLX_CDB) from None  # a truncated or corrupt cdb
    return None


# Long-lived delivery workers look up the same few names (postmaster, alias...) for
# every message, and a miss walks every passwd source in nsswitch.conf (systemd's
# among them).  Answers, misses included, are kept for a few seconds, and all are
# dropped at once when /etc/passwd changes, so a user added there is seen at once
# and one added elsewhere (LDAP, systemd) within _PW_TTL, as nscd would do.
_PW_TTL = 5.0
_PW_CACHE_MAX = 1024


class PasswdEntry(NamedTuple):
    """What mail delivery needs of a passwd entry (named as pwd.struct_passwd's fields)."""

    pw_name: str
    pw_uid: int
    pw_gid: int
    pw_dir: str


_pw_cache: dict[str, tuple[float, PasswdEntry | None]] = {}
_pw_stamp: tuple[int, ...] | None = None


def getpwnam_cached(name: str) -> PasswdEntry | None:
    """pwd.getpwnam(name), None for no such user; OSError as getpwnam raises it."""
    global _pw_stamp
    try:
        st = os.stat("/etc/passwd")
        stamp: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        stamp = None
    if stamp != _pw_stamp or stamp is None:
        _pw_cache.clear()
        _pw_stamp = stamp
    now = time.monotonic()
    hit = _pw_cache.get(name)
    if hit is not None and now < hit[0]:
        return hit[1]
    try:
        found = pwd.getpwnam(name)
        pw: PasswdEntry | None = PasswdEntry(
            found.pw_name, found.pw_uid, found.pw_gid, found.pw_dir
        )
    except KeyError:
        pw = None
    if len(_pw_cache) >= _PW_CACHE_MAX:
        _pw_cache.clear()
    _pw_cache[name] = (now + _PW_TTL, pw)
    return pw


def _owned_home(pw: PasswdEntry) -> bool:
    try:
        st = os.stat(pw.pw_dir)
    except OSError as e:
        if e.errno in _TEMP_STAT_ERRNOS:
            raise LookupFailure(QLX_NFS) from None
        return False
    return st.st_uid == pw.pw_uid


def alias_assignment(home: Path | None, local: str, as_root: bool) -> Assignment:
    """The catch-all owner: passwd `alias` (as root), else HOME/alias and its owner (or us)."""
    if as_root:
        pw = getpwnam_cached("alias")
        if pw is not None:
            return Assignment(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", local)
    if home is None:
        raise LookupFailure(QLX_NOALIAS)
    # a plain string: this runs for every delivery to the alias user
    alias = os.path.join(home, "alias")
    try:
        st = os.stat(alias)
    except OSError as e:
        if e.errno in _TEMP_STAT_ERRNOS:
            raise LookupFailure(QLX_NFS) from None
        raise LookupFailure(QLX_NOALIAS) from None
    if as_root:
        uid, gid = st.st_uid, st.st_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    return Assignment("alias", uid, gid, alias, "-", local)


def getpw(local: str, home: Path | None = None) -> Assignment:
    """qmail-getpw's rules: the longest account name that `local` starts with, else alias."""
    raw = local.encode("utf-8", "surrogateescape")
    brk = BREAK.encode()
    for i in range(len(raw), 0, -1):
        if i >= GETPW_USERLEN:
            continue
        if i < len(raw) and raw[i : i + 1] != brk:
            continue
        name = raw[:i].lower().decode("utf-8", "surrogateescape")
        try:
            pw = getpwnam_cached(name)
        except OSError as e:
            if e.errno == errno.ETXTBSY:
                raise LookupFailure(QLX_SYS) from None
            continue
        if pw is None:
            continue
        if pw.pw_uid == 0 or not _owned_home(pw):
            continue
        if i == len(raw):
            return Assignment(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
        ext = raw[i + 1 :].decode("utf-8", "surrogateescape")
        return Assignment(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, BREAK, ext)
    return alias_assignment(home, local, as_root=True)


def getpw_main(argv: list[str] | None = None) -> None:
    home, args = _home_from_argv(
        list(sys.argv[1:] if argv is None else argv),
        "usage: qmail-getpw [--home DIR] local\n"
        "  prints user, uid, gid, home, dash and ext (NUL-terminated) for an address\n",
    )
    if not args:
        sys.exit(100)
    try:
        a = getpw(args[0], home)
    except LookupFailure as e:
        sys.exit(e.code)
    sys.stdout.buffer.write(a.fields())
    sys.stdout.flush()
    sys.exit(0)


def resolve_local(home: Path, local: str, as_root: bool | None = None) -> Assignment:
    """Who gets mail for `local`: users/cdb, then (root only) passwd, then the alias user."""
    if as_root is None:
        as_root = os.geteuid() == 0
    found = lookup_cdb(home, local)
    if found is not None:
        return found
    if as_root:
        return getpw(local, home)
    return alias_assignment(home, local, as_root=False)


# -- mailbox users (pyqmail user add/list/del) ---------------------------------------


class UserError(Exception):
    """A user-management request that cannot be done; the text is for the admin."""


_LOCAL_RE = re.compile(r"[a-z0-9](?:[a-z0-9_+=-]|\.(?!\.))*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1


def split_address(address: str) -> tuple[str, str]:
    """Validate and lowercase `local@domain` for a mailbox user."""
    addr = address.strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise UserError(f"invalid address {address!r}: expected local@domain")
    if len(local) > 64 or not _LOCAL_RE.fullmatch(local) or local.endswith("."):
        raise UserError(
            f"invalid local part {local!r}: use letters, digits and . _ + = - "
            "(starting with a letter or digit)"
        )
    labels = domain.split(".")
    if len(domain) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise UserError(f"invalid domain {domain!r}")
    return local, domain


def _users_dir(home: Path) -> Path:
    return Path(home) / "users"


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One user-management change at a time (two `user add` runs must not lose a line)."""
    users = _users_dir(home)
    users.mkdir(mode=0o755, exist_ok=True)
    fd = os.open(users / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_assign(home: Path) -> tuple[list[bytes], bytes]:
    """(assignment lines, terminator line and anything after it) of users/assign."""
    path = _users_dir(home) / "assign"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], b".\n"
    lines: list[bytes] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        if line.startswith(b"."):
            return lines, data[pos:]
        lines.append(line if line.endswith(b"\n") else line + b"\n")
        pos = end
    raise UserError(f"{path} has no terminating '.' line; fix it before adding users")


def _check_assign(lines: list[bytes], tail: bytes) -> bytes:
    data = b"".join(lines) + tail
    try:
        assign_records(data)
    except NewuError as e:
        raise UserError(f"users/assign: {e}") from None
    return data


def _store_assign(home: Path, lines: list[bytes], tail: bytes) -> None:
    data = _check_assign(lines, tail)
    _write_atomic(_users_dir(home) / "assign", data, 0o644)
    try:
        newu(home)
    except NewuError as e:
        raise UserError(f"qmail-newu: {e}") from None


def _line_fields(line: bytes) -> list[str]:
    return line.rstrip(b"\n").decode("utf-8", "surrogateescape").split(":")


def _managed(lines: list[bytes], address: str) -> list[int]:
    """Indexes of the assign lines that belong to mailbox user `address`."""
    return [
        i
        for i, line in enumerate(lines)
        if line[:1] in (b"=", b"+")
        and len(fields := _line_fields(line)) >= 7
        and fields[1] == address
    ]


def _append_control_line(home: Path, name: str, line: str) -> None:
    path = Path(home) / "control" / name
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    _write_atomic(path, old + line.encode() + b"\n", 0o644)


def _assign_key(home: Path, local: str, domain: str) -> str:
    """The local part qmail-lspawn will see for local@domain; adds a virtual domain if needed."""
    ctl = Control(home)
    try:
        locals_ = {d.lower() for d in (ctl.list("locals") or ([ctl.me] if ctl.me else []))}
        virtual = ctl.mapping("virtualdomains")
        rcpthosts = {d.lower() for d in ctl.list("rcpthosts") or []}
    except ControlError as e:
        raise UserError(str(e)) from None
    if domain in locals_:
        return local
    prefix = virtual.get(domain)
    if prefix is None:
        _append_control_line(home, "virtualdomains", f"{domain}:{domain}")
        prefix = domain
    elif not prefix:
        raise UserError(
            f"{domain} is listed in control/virtualdomains with an empty prefix "
            "(mail for it is sent elsewhere); remove that line first"
        )
    if domain not in rcpthosts:
        _append_control_line(home, "rcpthosts", domain)
    return f"{prefix}-{local}"


def _make_dir(path: Path, mode: int, uid: int, gid: int) -> None:
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a directory") from None
    os.chmod(path, mode)
    if (os.stat(path).st_uid, os.stat(path).st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def add_user(
    home: Path,
    address: str,
    password: str | None = None,
    *,
    uid: int | None = None,
    gid: int | None = None,
) -> Path:
    """Create mailbox user `address` (home, Maildir, assign lines, cdb); returns its home."""
    home = Path(home)
    local, domain = split_address(address)
    address = f"{local}@{domain}"
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    with _locked(home):
        lines, tail = _read_assign(home)
        _check_assign(lines, tail)  # before anything is created
        if _managed(lines, address):
            raise UserError(f"{address} already exists")
        key = _assign_key(home, local, domain)
        exact = f"={key}:".encode()
        if any(line.lower().startswith(exact) for line in lines):
            raise UserError(f"users/assign already assigns {key!r}")
        mailboxes = home / "mailboxes"
        if not mailboxes.is_dir():
            mailboxes.mkdir(mode=0o755)
        _make_dir(mailboxes / domain, 0o755, os.getuid(), os.getgid())
        userhome = mailboxes / domain / local
        _make_dir(userhome, 0o700, uid, gid)
        maildir = userhome / "Maildir"
        _make_dir(maildir, 0o700, uid, gid)
        for sub in ("tmp", "new", "cur"):
            _make_dir(maildir / sub, 0o700, uid, gid)
        lines.append(f"={key}:{address}:{uid}:{gid}:{userhome}:::\n".encode())
        # extension addresses (local-anything) go to the user's .qmail-anything files
        lines.append(f"+{key}{BREAK}:{address}:{uid}:{gid}:{userhome}:{BREAK}::\n".encode())
        _store_assign(home, lines, tail)
        if password is not None:
            _set_password_locked(home, address, password)
    return userhome


def list_users(home: Path) -> list[tuple[str, Path]]:
    """Mailbox users as (address, home directory), sorted by address."""
    lines, _ = _read_assign(Path(home))
    users: dict[str, Path] = {}
    for line in lines:
        if line[:1] != b"=":
            continue
        fields = _line_fields(line)
        if len(fields) >= 7 and "@" in fields[1]:
            users[fields[1]] = Path(fields[4])
    return sorted(users.items())


def del_user(home: Path, address: str) -> Path:
    """Remove a mailbox user's assign lines and password; returns the (kept) home directory."""
    home = Path(home)
    local, domain = split_address(address)
    address = f"{local}@{domain}"
    with _locked(home):
        lines, tail = _read_assign(home)
        found = _managed(lines, address)
        if not found:
            raise UserError(f"no such user: {address}")
        userhome = Path(_line_fields(lines[found[0]])[4])
        kept = [line for i, line in enumerate(lines) if i not in found]
        _store_assign(home, kept, tail)
        _remove_password_locked(home, address)
    return userhome


# -- passwords ------------------------------------------------------------------------


def _password_path(home: Path) -> Path:
    return _users_dir(home) / "passwords"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def _read_passwords(home: Path) -> list[tuple[str, str]]:
    path = _password_path(home)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        addr, sep, stored = line.partition(":")
        if sep:
            entries.append((addr, stored))
    return entries


def _store_passwords(home: Path, entries: list[tuple[str, str]]) -> None:
    data = "".join(f"{a}:{s}\n" for a, s in entries).encode()
    _write_atomic(_password_path(home), data, 0o600)


def _set_password_locked(home: Path, address: str, password: str) -> None:
    entries = [(a, s) for a, s in _read_passwords(home) if a != address]
    entries.append((address, hash_password(password)))
    _store_passwords(home, entries)


def _remove_password_locked(home: Path, address: str) -> None:
    entries = _read_passwords(home)
    kept = [(a, s) for a, s in entries if a != address]
    if len(kept) != len(entries):
        _store_passwords(home, kept)


def set_password(home: Path, address: str, password: str) -> None:
    """Set (or replace) the password of an existing mailbox user."""
    home = Path(home)
    local, domain = split_address(address)
    address = f"{local}@{domain}"
    with _locked(home):
        lines, _ = _read_assign(home)
        if not _managed(lines, address):
            raise UserError(f"no such user: {address}")
        _set_password_locked(home, address, password)


def check_password(home: Path, address: str, password: str) -> bool:
    """True if `password` is the stored password of mailbox user `address`."""
    addr = address.strip().lower()
    for a, stored in _read_passwords(Path(home)):
        if a == addr:
            return verify_password(stored, password)
    return False
