"""users/assign, qmail-newu, users/cdb lookups, qmail-getpw, and mailbox users."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from _local_util import bin_path
from pyqmail import users
from pyqmail.cdb import CDB
from pyqmail.users import (
    QLX_CDB,
    QLX_NOALIAS,
    Assignment,
    LookupFailure,
    UserError,
    add_user,
    check_password,
    del_user,
    list_users,
    lookup_cdb,
    set_password,
)

ASSIGN = (
    "=joe:joe:1001:1001:/home/joe:::\n"
    "+joe-:joe:1001:1001:/home/joe:-::\n"
    "+list-:lists:1002:1002:/home/lists:-:l-:\n"
    "+li:lists:1002:1002:/home/lists:-:short:\n"
    "=Mixed:mix:1003:1003:/home/mix:-:x:\n"
    "=dup:first:1004:1004:/home/first:::\n"
    "=dup:second:1005:1005:/home/second:::\n"
    "+:alias:1006:1006:/var/qmail/alias:-::\n"
    ".\n"
)


def newu(home: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [bin_path("qmail-newu"), "--home", str(home)], capture_output=True, timeout=30
    )


def write_assign(home: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    (home / "users" / "assign").write_bytes(data)


# -- qmail-newu -------------------------------------------------------------------------


def test_newu_builds_cdb_records(qmail_home: Path) -> None:
    write_assign(qmail_home, ASSIGN)
    r = newu(qmail_home)
    assert (r.returncode, r.stderr) == (0, b"")
    db = CDB.open(qmail_home / "users" / "cdb")
    assert db.get(b"!joe\0") == b"joe\x001001\x001001\x00/home/joe\x00\x00"
    assert db.get(b"!joe-") == b"joe\x001001\x001001\x00/home/joe\x00-\x00"
    assert db.get(b"!mixed\0") == b"mix\x001003\x001003\x00/home/mix\x00-\x00x"
    assert db.get(b"!dup\0") == b"first\x001004\x001004\x00/home/first\x00\x00"
    assert db.get(b"!") is not None
    # the set of wildcard last characters: `-` (joe-, list-) and `i` (li); `+:` adds none
    assert sorted(db.get(b"") or b"") == sorted(b"-i")
    assert not (qmail_home / "users" / "cdb.tmp").exists()
    assert stat.S_IMODE(os.stat(qmail_home / "users" / "cdb").st_mode) == 0o644


@pytest.mark.parametrize(
    "text",
    [
        "=joe:joe:1:1:/h:::\n",  # no `.` line
        "=joe:joe:1:1:/h::\n.\n",  # too few colons
        "joe\n.\n",  # no colon at all
        ":joe:1:1:/h:::\n.\n",  # empty key
        "=jo\0e:joe:1:1:/h:::\n.\n",
        "=joe:joe:1:1:/h:::",  # cut short
    ],
)
def test_newu_bad_format_keeps_old_cdb(qmail_home: Path, text: str) -> None:
    write_assign(qmail_home, "=old:old:1:1:/h:::\n.\n")
    assert newu(qmail_home).returncode == 0
    before = (qmail_home / "users" / "cdb").read_bytes()
    write_assign(qmail_home, text)
    r = newu(qmail_home)
    assert (r.returncode, r.stderr) == (111, b"qmail-newu: fatal: bad format in users/assign\n")
    assert (qmail_home / "users" / "cdb").read_bytes() == before


def test_newu_missing_assign(qmail_home: Path) -> None:
    r = newu(qmail_home)
    assert r.returncode == 111
    assert r.stderr == (
        b"qmail-newu: fatal: unable to open users/assign: No such file or directory\n"
    )


def test_newu_lines_after_dot_are_ignored(qmail_home: Path) -> None:
    write_assign(qmail_home, "=a:a:1:1:/a:::\n.\ngarbage without colons\n")
    assert newu(qmail_home).returncode == 0
    assert CDB.open(qmail_home / "users" / "cdb").get(b"!a\0") is not None


# -- lookups (qmail-lspawn's rules) -----------------------------------------------------


@pytest.fixture
def assigned(qmail_home: Path) -> Path:
    write_assign(qmail_home, ASSIGN)
    assert newu(qmail_home).returncode == 0
    return qmail_home


@pytest.mark.parametrize(
    ("local", "want"),
    [
        ("joe", Assignment("joe", 1001, 1001, "/home/joe", "", "")),
        ("JOE", Assignment("joe", 1001, 1001, "/home/joe", "", "")),
        # wildcard: the rest of the address, original case, is appended to ext
        ("joe-Work", Assignment("joe", 1001, 1001, "/home/joe", "-", "Work")),
        ("list-Python-Dev", Assignment("lists", 1002, 1002, "/home/lists", "-", "l-Python-Dev")),
        # `li` is a shorter prefix than `list-`, so it only wins when `list-` does not match
        ("listx", Assignment("lists", 1002, 1002, "/home/lists", "-", "shortstx")),
        ("mixed", Assignment("mix", 1003, 1003, "/home/mix", "-", "x")),
        ("dup", Assignment("first", 1004, 1004, "/home/first", "", "")),
        # the catch-all `+:` takes everything else, with the whole local part as ext
        ("Zed", Assignment("alias", 1006, 1006, "/var/qmail/alias", "-", "Zed")),
        ("joex", Assignment("alias", 1006, 1006, "/var/qmail/alias", "-", "joex")),
    ],
)
def test_lookup_rules(assigned: Path, local: str, want: Assignment) -> None:
    assert lookup_cdb(assigned, local) == want


def test_lookup_without_cdb_is_none(qmail_home: Path) -> None:
    assert lookup_cdb(qmail_home, "joe") is None


def test_lookup_without_catch_all_misses(qmail_home: Path) -> None:
    write_assign(qmail_home, "=joe:joe:1:1:/h:::\n.\n")
    assert newu(qmail_home).returncode == 0
    assert lookup_cdb(qmail_home, "joe-x") is None


@pytest.mark.parametrize("data", [b"garbage", b"\0" * 2048])
def test_broken_cdb_is_qlx_cdb(qmail_home: Path, data: bytes) -> None:
    # too short for a cdb; or a valid empty cdb that lacks the mandatory empty key
    (qmail_home / "users" / "cdb").write_bytes(data)
    with pytest.raises(LookupFailure) as exc:
        lookup_cdb(qmail_home, "joe")
    assert exc.value.code == QLX_CDB


# -- qmail-getpw ------------------------------------------------------------------------


def getpw_run(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [bin_path("qmail-getpw"), "--home", str(home), *args], capture_output=True, timeout=30
    )


def test_getpw_program_falls_back_to_alias(qmail_home: Path) -> None:
    r = getpw_run(qmail_home, "Nobody-Here")
    assert r.returncode == 0
    fields = r.stdout.split(b"\0")
    assert fields[-1] == b"" and len(fields) == 7
    try:
        pw = pwd.getpwnam("alias")
        assert fields[0] == b"alias" and fields[3] == pw.pw_dir.encode()
    except KeyError:
        st = os.stat(qmail_home / "alias")
        assert fields[:4] == [
            b"alias",
            str(st.st_uid).encode(),
            str(st.st_gid).encode(),
            str(qmail_home / "alias").encode(),
        ]
    assert fields[4:6] == [b"-", b"Nobody-Here"]


def test_getpw_program_usage_and_no_alias(tmp_path: Path) -> None:
    assert getpw_run(tmp_path).returncode == 100
    try:
        pwd.getpwnam("alias")
    except KeyError:
        r = getpw_run(tmp_path, "someone")
        assert (r.returncode, r.stdout) == (QLX_NOALIAS, b"")


def test_getpw_prefix_rules(
    tmp_path: Path, qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = os.getuid() or 4242
    joe_home = tmp_path / "joe"
    joe_home.mkdir()
    os.chown(joe_home, uid, -1)
    roothome = tmp_path / "root"
    roothome.mkdir()
    stranger = tmp_path / "stranger"  # owned by someone other than ann: not a mail user
    stranger.mkdir()
    os.chown(stranger, uid, -1)
    accounts = {
        "joe": pwd.struct_passwd(("joe", "x", uid, 77, "", str(joe_home), "/bin/sh")),
        "toor": pwd.struct_passwd(("toor", "x", 0, 0, "", str(roothome), "/bin/sh")),
        "ann": pwd.struct_passwd(("ann", "x", uid + 1, 77, "", str(stranger), "/bin/sh")),
        "a" * 31: pwd.struct_passwd(("a" * 31, "x", uid, 77, "", str(joe_home), "/bin/sh")),
        "b" * 32: pwd.struct_passwd(("b" * 32, "x", uid, 77, "", str(joe_home), "/bin/sh")),
    }

    def fake_getpwnam(name: str) -> pwd.struct_passwd:
        return accounts[name]

    monkeypatch.setattr(users.pwd, "getpwnam", fake_getpwnam)
    alias_uid = os.stat(qmail_home / "alias").st_uid
    joe = ("joe", uid, 77, str(joe_home))
    assert users.getpw("joe", qmail_home) == Assignment(*joe, "", "")
    assert users.getpw("Joe-A-b", qmail_home) == Assignment(*joe, "-", "A-b")
    assert users.getpw("joe-", qmail_home) == Assignment(*joe, "-", "")
    assert users.getpw("a" * 31 + "-x", qmail_home).user == "a" * 31
    for local in ("joex", "toor", "toor-x", "ann", "b" * 32, "b" * 32 + "-x"):
        got = users.getpw(local, qmail_home)
        assert got.user == "alias" and (got.dash, got.ext) == ("-", local), local
        assert got.uid == alias_uid


# -- mailbox users ----------------------------------------------------------------------


def owner() -> dict[str, int]:
    """An unprivileged owner for new mailboxes when the tests run as root."""
    return {"uid": 4321, "gid": 4321} if os.geteuid() == 0 else {}


def test_add_local_user(qmail_home: Path) -> None:
    path = add_user(qmail_home, "Bob@Example.TEST", "s3cret", **owner())
    assert path == qmail_home / "mailboxes" / "example.test" / "bob"
    for sub in ("", "Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        st = os.stat(path / sub)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == (4321 if os.geteuid() == 0 else os.getuid())
    assign = (qmail_home / "users" / "assign").read_text()
    uid = os.stat(path).st_uid
    gid = os.stat(path).st_gid
    assert assign == (
        f"=bob:bob@example.test:{uid}:{gid}:{path}:::\n"
        f"+bob-:bob@example.test:{uid}:{gid}:{path}:-::\n.\n"
    )
    assert lookup_cdb(qmail_home, "bob") == Assignment(
        "bob@example.test", uid, gid, str(path), "", ""
    )
    assert lookup_cdb(qmail_home, "bob-Lists") == Assignment(
        "bob@example.test", uid, gid, str(path), "-", "Lists"
    )
    assert list_users(qmail_home) == [("bob@example.test", path)]
    assert check_password(qmail_home, "bob@example.test", "s3cret")
    assert check_password(qmail_home, "BOB@example.test", "s3cret")
    assert not check_password(qmail_home, "bob@example.test", "S3cret")
    assert not check_password(qmail_home, "carol@example.test", "s3cret")
    pw = qmail_home / "users" / "passwords"
    assert stat.S_IMODE(os.stat(pw).st_mode) == 0o600
    text = pw.read_text()
    assert text.startswith("bob@example.test:scrypt$") and "s3cret" not in text
    # local domains are not virtual
    assert not (qmail_home / "control" / "virtualdomains").exists()


def test_add_virtual_user(qmail_home: Path) -> None:
    rcpthosts_before = (qmail_home / "control" / "rcpthosts").read_text()
    path = add_user(qmail_home, "ann@virtual.test", None, **owner())
    add_user(qmail_home, "ben@virtual.test", None, **owner())
    assert (qmail_home / "control" / "virtualdomains").read_text() == "virtual.test:virtual.test\n"
    assert (qmail_home / "control" / "rcpthosts").read_text() == rcpthosts_before + "virtual.test\n"
    found = lookup_cdb(qmail_home, "virtual.test-ann")
    assert found is not None and found.homedir == str(path) and found.ext == ""
    assert lookup_cdb(qmail_home, "ann") is None
    assert not (qmail_home / "users" / "passwords").exists()
    assert not check_password(qmail_home, "ann@virtual.test", "")
    assert [a for a, _ in list_users(qmail_home)] == ["ann@virtual.test", "ben@virtual.test"]


def test_add_user_in_domain_with_existing_prefix(qmail_home: Path) -> None:
    (qmail_home / "control" / "virtualdomains").write_text("# mine\nother.test:vo\n")
    add_user(qmail_home, "x@other.test", None, **owner())
    assert lookup_cdb(qmail_home, "vo-x") is not None
    assert (qmail_home / "control" / "virtualdomains").read_text() == "# mine\nother.test:vo\n"
    (qmail_home / "control" / "virtualdomains").write_text("remote.test:\n")
    with pytest.raises(UserError, match="empty prefix"):
        add_user(qmail_home, "x@remote.test", None, **owner())


@pytest.mark.parametrize(
    "address",
    ["", "bob", "@example.test", "bob@", "b:ob@example.test", "bob/x@example.test",
     ".bob@example.test", "bob.@example.test", "b..ob@example.test", "bob@exa_mple.test",
     "bob@-x.test", "bob@x..test", "b ob@example.test"],
)  # fmt: skip
def test_add_user_rejects_invalid_addresses(qmail_home: Path, address: str) -> None:
    with pytest.raises(UserError):
        add_user(qmail_home, address, None, **owner())
    assert not (qmail_home / "users" / "assign").exists()


def test_duplicates_refused(qmail_home: Path) -> None:
    add_user(qmail_home, "bob@example.test", None, **owner())
    with pytest.raises(UserError, match="already exists"):
        add_user(qmail_home, "BOB@example.test", None, **owner())
    # an address the admin assigned by hand is not taken over either
    write_assign(qmail_home, "=carol:carol:1:1:/home/carol:::\n.\n")
    with pytest.raises(UserError, match="already assigns"):
        add_user(qmail_home, "carol@example.test", None, **owner())


def test_del_user_keeps_mail_and_other_lines(qmail_home: Path) -> None:
    write_assign(qmail_home, "=carol:carol:1:1:/home/carol:::\n.\n")
    path = add_user(qmail_home, "bob@example.test", "pw", **owner())
    add_user(qmail_home, "dan@example.test", "pw2", **owner())
    (path / "Maildir" / "new" / "1.2.host").write_text("keep me")
    assert del_user(qmail_home, "Bob@example.test") == path
    assert (path / "Maildir" / "new" / "1.2.host").read_text() == "keep me"
    assign = (qmail_home / "users" / "assign").read_text()
    assert assign.startswith("=carol:carol:1:1:/home/carol:::\n=dan:")
    assert "bob" not in assign and assign.endswith("\n.\n")
    assert lookup_cdb(qmail_home, "bob") is None
    assert lookup_cdb(qmail_home, "carol") is not None
    assert not check_password(qmail_home, "bob@example.test", "pw")
    assert check_password(qmail_home, "dan@example.test", "pw2")
    assert [a for a, _ in list_users(qmail_home)] == ["dan@example.test"]
    with pytest.raises(UserError, match="no such user"):
        del_user(qmail_home, "bob@example.test")
    # adding again reuses the kept mailbox
    assert add_user(qmail_home, "bob@example.test", None, **owner()) == path
    assert (path / "Maildir" / "new" / "1.2.host").exists()


def test_set_password(qmail_home: Path) -> None:
    with pytest.raises(UserError):
        set_password(qmail_home, "bob@example.test", "x")
    add_user(qmail_home, "bob@example.test", "old", **owner())
    set_password(qmail_home, "bob@example.test", "new")
    assert check_password(qmail_home, "bob@example.test", "new")
    assert not check_password(qmail_home, "bob@example.test", "old")
    assert (qmail_home / "users" / "passwords").read_text().count("bob@example.test:") == 1


def test_broken_assign_is_not_touched(qmail_home: Path) -> None:
    # users/assign has no comment syntax: qmail-newu would refuse this file
    write_assign(qmail_home, "# comment\n.\n")
    with pytest.raises(UserError, match="bad format"):
        add_user(qmail_home, "bob@example.test", None, **owner())
    assert (qmail_home / "users" / "assign").read_text() == "# comment\n.\n"
    assert not (qmail_home / "mailboxes").exists()


def test_assign_without_terminator_is_not_touched(qmail_home: Path) -> None:
    write_assign(qmail_home, "=carol:carol:1:1:/home/carol:::\n")
    with pytest.raises(UserError, match="terminating"):
        add_user(qmail_home, "bob@example.test", None, **owner())
    assert (qmail_home / "users" / "assign").read_text() == "=carol:carol:1:1:/home/carol:::\n"


def test_concurrent_adds_lose_nothing(qmail_home: Path) -> None:
    code = (
        "import sys; from pyqmail.users import add_user; "
        "kw = {'uid': 4321, 'gid': 4321} if __import__('os').geteuid() == 0 else {}; "
        "[add_user(sys.argv[1], f'{sys.argv[2]}{i}@example.test', None, **kw) for i in range(8)]"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(qmail_home), prefix])
        for prefix in ("a", "b", "c")
    ]
    for p in procs:
        assert p.wait(60) == 0
    assert len(list_users(qmail_home)) == 24
    for prefix in "abc":
        for i in range(8):
            assert lookup_cdb(qmail_home, f"{prefix}{i}") is not None


# -- what long-lived delivery workers keep between messages ------------------------------


def test_users_cdb_is_read_again_once_replaced(qmail_home: Path) -> None:
    write_assign(qmail_home, ASSIGN)
    assert newu(qmail_home).returncode == 0
    first = lookup_cdb(qmail_home, "joe")
    assert first is not None and first.uid == 1001
    path = f"{qmail_home}/users/cdb"
    assert CDB.open_cached(path) is CDB.open_cached(path)  # unchanged: not read again
    # qmail-newu replaces the cdb by rename: the next lookup sees the new one
    write_assign(qmail_home, ASSIGN.replace("1001", "2001"))
    assert newu(qmail_home).returncode == 0
    again = lookup_cdb(qmail_home, "joe")
    assert again is not None and again.uid == 2001
    os.unlink(path)
    assert lookup_cdb(qmail_home, "joe") is None


def test_passwd_answers_and_misses_are_kept_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    me = pwd.getpwuid(os.getuid())

    def counting_getpwnam(name: str) -> pwd.struct_passwd:
        asked.append(name)
        if name == "known":
            return me
        raise KeyError(name)

    monkeypatch.setattr(users, "_pw_cache", {})
    monkeypatch.setattr(users.pwd, "getpwnam", counting_getpwnam)
    entry = users.PasswdEntry(me.pw_name, me.pw_uid, me.pw_gid, me.pw_dir)
    for _ in range(3):
        assert users.getpwnam_cached("known") == entry
        assert users.getpwnam_cached("nobody-here") is None
    assert asked == ["known", "nobody-here"]
    # a change of /etc/passwd drops everything at once
    monkeypatch.setattr(users, "_pw_stamp", (0, 0, 0, 0))
    assert users.getpwnam_cached("nobody-here") is None
    assert asked == ["known", "nobody-here", "nobody-here"]
    # and nothing is kept past its time
    monkeypatch.setattr(users, "_PW_TTL", 0.0)
    users.getpwnam_cached("known")
    users.getpwnam_cached("known")
    assert asked.count("known") == 3
