"""qmail-showctl: exact output for default, full, broken and odd configurations."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail import showctl

BIN = Path(sys.executable).parent / "qmail-showctl"


def run(home: Path | str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "QMAILHOME"}
    return subprocess.run(
        [str(BIN), "--home", str(home), *extra], capture_output=True, env=env, timeout=30
    )


def put(home: Path, name: str, data: bytes | str) -> Path:
    path = home / "control" / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def expected_ids() -> tuple[str, str]:
    """What the ids lines must say, worked out independently of showctl."""
    if os.getuid() != 0:
        uids = [os.getuid()] * 8
        gids = [os.getgid()] * 2
    else:
        users = ("alias", "qmaild", "qmaill", "root", "qmailp", "qmailq", "qmailr", "qmails")
        uids = []
        for u in users:
            try:
                uids.append(pwd.getpwnam(u).pw_uid)
            except KeyError:
                uids.append(0)
        gids = []
        for g in ("nofiles", "qmail"):
            try:
                gids.append(grp.getgrnam(g).gr_gid)
            except KeyError:
                gids.append(os.getgid())
    return ", ".join(map(str, uids)), ", ".join(map(str, gids))


def header(home: Path) -> str:
    uids, gids = expected_ids()
    return (
        f"qmail home directory: {home}.\n"
        "user-ext delimiter: -.\n"
        "paternalism (in decimal): 2.\n"
        "silent concurrency limit: 120.\n"
        "subdirectory split: 23.\n"
        f"user ids: {uids}.\n"
        f"group ids: {gids}.\n"
    )


def sections(out: str) -> dict[str, str]:
    """name -> text after `name: ` (several lines for lists), from the control part."""
    result: dict[str, str] = {}
    for block in out.split("\n\n")[1:]:
        name, _, text = block.partition(": ")
        result[name] = text.rstrip("\n")
    return result


def test_fresh_home_exact_output(qmail_home: Path) -> None:
    r = run(qmail_home)
    assert r.returncode == 0
    assert r.stderr == b""
    out = r.stdout.decode()
    end = "\nvirtualdomains: (Default.) No virtual domains.\n"
    qmail_part = out[: out.index(end) + len(end)]
    # what pyqmail's init adds beyond qmail's files is all described, nothing unknown
    extras = sections("\n" + out[len(qmail_part) :])
    assert "defaultdelivery" in extras
    assert set(extras) <= {doc.name for doc in showctl.PYQMAIL_CONTROLS}
    assert not any(text.startswith("Oops") for text in extras.values())
    assert qmail_part == header(qmail_home) + (
        "\n"
        "badmailfrom: (Default.) Any MAIL FROM is allowed.\n"
        "\n"
        "bouncefrom: (Default.) Bounce user name is MAILER-DAEMON.\n"
        "\n"
        "bouncehost: (Default.) Bounce host name is mx.example.test.\n"
        "\n"
        "concurrencylocal: (Default.) Local concurrency is 10.\n"
        "\n"
        "concurrencyremote: (Default.) Remote concurrency is 20.\n"
        "\n"
        "databytes: (Default.) SMTP DATA limit is 0 bytes.\n"
        "\n"
        "defaultdomain: Default domain name is example.test.\n"
        "\n"
        "defaulthost: (Default.) Default host name is mx.example.test.\n"
        "\n"
        "doublebouncehost: (Default.) 2B recipient host: mx.example.test.\n"
        "\n"
        "doublebounceto: (Default.) 2B recipient user: postmaster.\n"
        "\n"
        "envnoathost: (Default.) Presumed domain name is mx.example.test.\n"
        "\n"
        "helohost: (Default.) SMTP client HELO host name is mx.example.test.\n"
        "\n"
        "idhost: (Default.) Message-ID host name is mx.example.test.\n"
        "\n"
        "localiphost: (Default.) Local IP address becomes mx.example.test.\n"
        "\n"
        "locals: \n"
        "Messages for example.test are delivered locally.\n"
        "Messages for mx.example.test are delivered locally.\n"
        "\n"
        "me: My name is mx.example.test.\n"
        "\n"
        "percenthack: (Default.) The percent hack is not allowed.\n"
        "\n"
        "plusdomain: Plus domain name is example.test.\n"
        "\n"
        "qmqpservers: (Default.) No QMQP servers.\n"
        "\n"
        "queuelifetime: (Default.) Message lifetime in the queue is 604800 seconds.\n"
        "\n"
        "rcpthosts: \n"
        "SMTP clients may send messages to recipients at example.test.\n"
        "SMTP clients may send messages to recipients at mx.example.test.\n"
        "\n"
        "morercpthosts: (Default.) No effect.\n"
        "\n"
        "morercpthosts.cdb: (Default.) No effect.\n"
        "\n"
        "smtpgreeting: (Default.) SMTP greeting: 220 mx.example.test.\n"
        "\n"
        "smtproutes: (Default.) No artificial SMTP routes.\n"
        "\n"
        "timeoutconnect: (Default.) SMTP client connection timeout is 60 seconds.\n"
        "\n"
        "timeoutremote: (Default.) SMTP client data timeout is 1200 seconds.\n"
        "\n"
        "timeoutsmtpd: (Default.) SMTP server data timeout is 1200 seconds.\n"
        "\n"
        "virtualdomains: (Default.) No virtual domains.\n"
    )


def test_every_file_set(qmail_home: Path) -> None:
    values = {
        "badmailfrom": "spam@bad.test\n@worse.test\n",
        "bouncefrom": "bounces\n",
        "bouncehost": "b.example.test\n",
        "concurrencylocal": "5\n",
        "concurrencyremote": "60\n",
        "databytes": "1000000\n",
        "defaulthost": "dh.test\n",
        "doublebouncehost": "db.test\n",
        "doublebounceto": "admin\n",
        "envnoathost": "noat.test\n",
        "helohost": "helo.test\n",
        "idhost": "id.test\n",
        "localiphost": "[192.0.2.1]\n",
        "percenthack": "p1.test\np2.test\n",
        "qmqpservers": "192.0.2.7\n",
        "queuelifetime": "86400\n",
        "smtpgreeting": "mx.example.test ESMTP hello\n",
        "smtproutes": ":relay.test\nx.test:[192.0.2.9]:2525\n",
        "timeoutconnect": "5\n",
        "timeoutremote": "30\n",
        "timeoutsmtpd": "40\n",
        "virtualdomains": "virt.test:joe-virt\n",
    }
    for name, text in values.items():
        put(qmail_home, name, text)
    r = run(qmail_home)
    assert r.returncode == 0
    s = sections(r.stdout.decode())
    assert s["badmailfrom"] == (
        "\nspam@bad.test not accepted in MAIL FROM.\n@worse.test not accepted in MAIL FROM."
    )
    assert s["bouncefrom"] == "Bounce user name is bounces."
    assert s["bouncehost"] == "Bounce host name is b.example.test."
    assert s["concurrencylocal"] == "Local concurrency is 5."
    assert s["concurrencyremote"] == "Remote concurrency is 60."
    assert s["databytes"] == "SMTP DATA limit is 1000000 bytes."
    assert s["defaulthost"] == "Default host name is dh.test."
    assert s["doublebouncehost"] == "2B recipient host: db.test."
    assert s["doublebounceto"] == "2B recipient user: admin."
    assert s["envnoathost"] == "Presumed domain name is noat.test."
    assert s["helohost"] == "SMTP client HELO host name is helo.test."
    assert s["idhost"] == "Message-ID host name is id.test."
    assert s["localiphost"] == "Local IP address becomes [192.0.2.1]."
    assert s["percenthack"] == (
        "\nThe percent hack is allowed for user%host@p1.test."
        "\nThe percent hack is allowed for user%host@p2.test."
    )
    assert s["qmqpservers"] == "\nQMQP server: 192.0.2.7."
    assert s["queuelifetime"] == "Message lifetime in the queue is 86400 seconds."
    assert s["smtpgreeting"] == "SMTP greeting: 220 mx.example.test ESMTP hello."
    assert s["smtproutes"] == "\nSMTP route: :relay.test\nSMTP route: x.test:[192.0.2.9]:2525"
    assert s["timeoutconnect"] == "SMTP client connection timeout is 5 seconds."
    assert s["timeoutremote"] == "SMTP client data timeout is 30 seconds."
    assert s["timeoutsmtpd"] == "SMTP server data timeout is 40 seconds."
    assert s["virtualdomains"] == "\nVirtual domain: virt.test:joe-virt"
    assert "(Default.)" not in r.stdout.decode().split("morercpthosts")[0]


def test_without_me(qmail_home: Path) -> None:
    (qmail_home / "control" / "me").unlink()
    (qmail_home / "control" / "locals").unlink()
    r = run(qmail_home)
    assert r.returncode == 0
    s = sections(r.stdout.decode())
    assert s["me"] == "(Default.) My name is undefined! Uh-oh."
    assert s["locals"] == "(Default.) Messages for me are delivered locally."
    assert s["bouncehost"] == "(Default.) Bounce host name is bouncehost."
    assert s["helohost"] == "(Default.) SMTP client HELO host name is helohost."
    assert s["smtpgreeting"] == "(Default.) SMTP greeting: 220 smtpgreeting."
    assert s["localiphost"] == "(Default.) Local IP address becomes localiphost."
    assert s["bouncefrom"] == "(Default.) Bounce user name is MAILER-DAEMON."


def test_comments_are_not_entries(qmail_home: Path) -> None:
    put(qmail_home, "rcpthosts", "# relay for\n\nexample.test\n   \n")
    s = sections(run(qmail_home).stdout.decode())
    assert s["rcpthosts"] == "\nSMTP clients may send messages to recipients at example.test."


def test_unprintable_bytes_become_question_marks_per_byte(qmail_home: Path) -> None:
    put(qmail_home, "bouncefrom", "Mäiler\tDaemon\x7f\n")
    put(qmail_home, "badmailfrom", "é@x.test\n")
    s = sections(run(qmail_home).stdout.decode())
    assert s["bouncefrom"] == "Bounce user name is M??iler?Daemon?."
    assert s["badmailfrom"] == "\n??@x.test not accepted in MAIL FROM."


# -- morercpthosts ------------------------------------------------------------------------


def test_morercpthosts_without_rcpthosts(qmail_home: Path) -> None:
    (qmail_home / "control" / "rcpthosts").unlink()
    s = sections(run(qmail_home).stdout.decode())
    assert s["rcpthosts"] == "(Default.) SMTP clients may send messages to any recipient."
    assert s["morercpthosts"] == "(Default.) No rcpthosts; morercpthosts is irrelevant."
    put(qmail_home, "morercpthosts", "more.test\n")
    s = sections(run(qmail_home).stdout.decode())
    assert s["morercpthosts"] == "\nNo rcpthosts; doesn't matter that morercpthosts has more.test."


def test_morercpthosts_cdb_states(qmail_home: Path) -> None:
    ctl = qmail_home / "control"

    def state() -> str:
        return sections(run(qmail_home).stdout.decode())["morercpthosts.cdb"]

    assert state() == "(Default.) No effect."
    (ctl / "morercpthosts.cdb").write_bytes(b"\0" * 2048)
    assert state() == "Oops! morercpthosts.cdb exists but morercpthosts doesn't."
    (ctl / "morercpthosts.cdb").unlink()
    put(qmail_home, "morercpthosts", "more.test\n")
    assert state() == "Oops! morercpthosts exists but morercpthosts.cdb doesn't."
    newmrh = Path(sys.executable).parent / "qmail-newmrh"
    subprocess.run([str(newmrh), "--home", str(qmail_home)], check=True, timeout=30)
    assert state() == "Modified recently enough; hopefully up to date."
    later = (ctl / "morercpthosts.cdb").stat().st_mtime + 10
    os.utime(ctl / "morercpthosts", (later, later))
    assert state() == "Oops! morercpthosts.cdb is older than morercpthosts."
    s = sections(run(qmail_home).stdout.decode())
    assert s["morercpthosts"] == "\nSMTP clients may send messages to recipients at more.test."


# -- broken files -------------------------------------------------------------------------


def test_malformed_files_give_one_line_each_and_no_traceback(qmail_home: Path) -> None:
    ctl = qmail_home / "control"
    put(qmail_home, "concurrencylocal", "ten\n")
    put(qmail_home, "badmailfrom", b"a@b.test\nx\0y\n")
    put(qmail_home, "smtpgreeting", b"caf\xe9\n")
    put(qmail_home, "virtualdomains", "ok.test:ok\nnocolon.test\n")
    (ctl / "percenthack").mkdir()
    r = run(qmail_home)
    assert r.returncode == 0
    assert r.stderr == b""
    s = sections(r.stdout.decode())
    oops = "Oops! Trouble reading this file: "
    assert s["concurrencylocal"] == f"{oops}{ctl}/concurrencylocal line 1: not a number: 'ten'"
    assert s["badmailfrom"] == f"{oops}{ctl}/badmailfrom line 2: contains a NUL byte"
    assert s["smtpgreeting"] == f"{oops}{ctl}/smtpgreeting line 1: is not valid UTF-8"
    assert s["virtualdomains"] == (
        f"{oops}{ctl}/virtualdomains line 2: missing ':' in 'nocolon.test'"
    )
    assert s["percenthack"] == f"{oops}{ctl}/percenthack: is a directory, not a file"
    # everything else is still described
    assert s["timeoutsmtpd"] == "(Default.) SMTP server data timeout is 1200 seconds."
    for text in s.values():
        assert "\n" not in text or not text.startswith("Oops")


def test_broken_rcpthosts_does_not_claim_morercpthosts_irrelevant(qmail_home: Path) -> None:
    put(qmail_home, "rcpthosts", b"\0")
    s = sections(run(qmail_home).stdout.decode())
    assert s["rcpthosts"].startswith("Oops! Trouble reading this file: ")
    assert s["morercpthosts"] == "(Default.) No effect."


def test_broken_me_shows_error_and_literal_defaults(qmail_home: Path) -> None:
    put(qmail_home, "me", b"mx\xff\n")
    r = run(qmail_home)
    assert r.returncode == 0
    s = sections(r.stdout.decode())
    assert s["me"].startswith("Oops! Trouble reading this file: ")
    assert s["me"].endswith("/control/me line 1: is not valid UTF-8")
    assert s["bouncehost"] == "(Default.) Bounce host name is bouncehost."


# -- pyqmail's own and unknown files ------------------------------------------------------


def test_pyqmail_controls_are_described_and_unknown_files_listed_last(qmail_home: Path) -> None:
    for name in ("tcp.smtp", "tcp.smtp.cdb", "smtplisten", "concurrencyincoming"):
        (qmail_home / "control" / name).unlink(missing_ok=True)
    put(qmail_home, "zz-notes", "hello\n")
    put(qmail_home, "aa-old", "x\n")
    put(qmail_home, "nameservers", "127.0.0.1:5353\n::1\n")
    put(qmail_home, "smtplisten", "127.0.0.1:2525\n[::1]:2525\n")
    put(qmail_home, "rejectunknownrcpt", "1\n")
    put(qmail_home, "maxrcpt", "lots\n")
    put(qmail_home, "tlspolicy", "secure.test:verify:/etc/ca.pem:mx.secure.test\n")
    put(qmail_home, "tcp.smtp", '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    (qmail_home / "control" / "tcp.smtp.cdb").write_bytes(b"\0" * 2048)
    out = run(qmail_home).stdout.decode()
    tail = out.split("\nvirtualdomains: (Default.) No virtual domains.\n", 1)[1]
    ctl = qmail_home / "control"
    assert tail == (
        "\ndefaultdelivery: Delivery for users without a .qmail file: ./Maildir/.\n"
        "\nsmtplisten: \nSMTP listener: 127.0.0.1:2525.\nSMTP listener: [::1]:2525.\n"
        '\ntcp.smtp: \nSMTP client rule: 127.0.0.1:allow,RELAYCLIENT=""\nSMTP client rule: :allow\n'
        "\ntcp.smtp.cdb: Compiled tcprules for the SMTP listener.\n"
        "\nnameservers: \nDNS server queried: 127.0.0.1:5353.\nDNS server queried: ::1.\n"
        "\ntlspolicy: \nTLS policy: secure.test:verify:/etc/ca.pem:mx.secure.test\n"
        f"\nmaxrcpt: Oops! Trouble reading this file: {ctl}/maxrcpt line 1: not a number: 'lots'\n"
        "\nrejectunknownrcpt: Unknown local recipients rejected at RCPT time (0 = no): 1.\n"
        "\naa-old: I have no idea what this file does.\n"
        "\nzz-notes: I have no idea what this file does.\n"
    )


def test_stale_compiled_rules_are_pointed_out(qmail_home: Path) -> None:
    ctl = qmail_home / "control"
    put(qmail_home, "tcp.smtp", ":allow\n")
    (ctl / "tcp.smtp.cdb").write_bytes(b"\0" * 2048)
    later = (ctl / "tcp.smtp.cdb").stat().st_mtime + 10
    os.utime(ctl / "tcp.smtp", (later, later))
    s = sections(run(qmail_home).stdout.decode())
    assert s["tcp.smtp.cdb"] == "Oops! tcp.smtp.cdb is older than tcp.smtp."


def test_registry_names_are_not_qmail_names() -> None:
    names = [doc.name for doc in showctl.PYQMAIL_CONTROLS]
    assert len(names) == len(set(names))
    assert not set(names) & set(showctl.QMAIL_CONTROLS)
    assert {doc.kind for doc in showctl.PYQMAIL_CONTROLS} <= {"line", "int", "list", "file"}


# -- the ids lines and fatal exits --------------------------------------------------------


def test_ids_for_an_ordinary_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 1234)
    monkeypatch.setattr(os, "getgid", lambda: 99)
    assert showctl._ids() == ([1234] * 8, [99, 99])


def test_ids_for_root_use_existing_qmail_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = {"alias": 7790, "qmaild": 7791, "qmails": 7797}

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name == "root":
            return pwd.getpwuid(0)
        if name not in accounts:
            raise KeyError(name)
        return pwd.struct_passwd((name, "x", accounts[name], 2108, "", "/", "/bin/sh"))

    def getgrnam(name: str) -> grp.struct_group:
        if name != "qmail":
            raise KeyError(name)
        return grp.struct_group(("qmail", "x", 2108, []))

    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    assert showctl._ids() == ([7790, 7791, 0, 0, 0, 0, 0, 7797], [0, 2108])


def test_missing_home(tmp_path: Path) -> None:
    home = tmp_path / "absent"
    r = run(home)
    assert r.returncode == 111
    assert r.stdout.decode() == header(home) + f"Oops! Unable to chdir to {home}.\n"


def test_missing_control_directory(tmp_path: Path) -> None:
    r = run(tmp_path)
    assert r.returncode == 111
    assert r.stdout.decode().endswith(
        "group ids: " + expected_ids()[1] + ".\nOops! Unable to open control directory.\n"
    )


def test_home_from_environment(qmail_home: Path) -> None:
    r = subprocess.run([str(BIN)], capture_output=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout.decode().startswith(f"qmail home directory: {qmail_home}.\n")
