"""qmail-newmrh: compiling morercpthosts, qmail's error texts, and never a half-written cdb."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pyqmail.cdb import CDB, cdb_hash
from pyqmail.newmrh import hosts

BIN = Path(sys.executable).parent / "qmail-newmrh"


def newmrh(home: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [str(BIN), "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=preexec,
    )


def test_compiles_lowercased_trimmed_hosts(qmail_home: Path) -> None:
    ctl = qmail_home / "control"
    (ctl / "morercpthosts").write_bytes(
        b"# more domains\nExample.ORG  \n\n.Sub.Example.NET\t\n  spaced.test\ncrlf.test\r\nlast.test"
    )
    r = newmrh(qmail_home, umask=0o077)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    cdb_path = ctl / "morercpthosts.cdb"
    assert cdb_path.stat().st_mode & 0o777 == 0o644  # qmail-smtpd must be able to read it
    assert not (ctl / "morercpthosts.tmp").exists()
    db = CDB.open(cdb_path)
    for key in (b"example.org", b".sub.example.net", b"  spaced.test", b"crlf.test", b"last.test"):
        assert db.get(key) == b"", key
    for key in (b"Example.ORG", b"example.org  ", b"# more domains", b"", b"spaced.test"):
        assert db.get(key) is None, key


def test_exact_cdb_image(qmail_home: Path) -> None:
    """Byte layout as cdbmake writes it: header, records in order, then hash tables."""
    (qmail_home / "control" / "morercpthosts").write_text("a.test\n")
    assert newmrh(qmail_home).returncode == 0
    data = (qmail_home / "control" / "morercpthosts.cdb").read_bytes()
    record = (6).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"a.test"
    assert data[2048 : 2048 + len(record)] == record
    h = cdb_hash(b"a.test")
    table_pos = int.from_bytes(data[(h & 255) * 8 : (h & 255) * 8 + 4], "little")
    slots = int.from_bytes(data[(h & 255) * 8 + 4 : (h & 255) * 8 + 8], "little")
    assert slots == 2
    slot = (h >> 8) % 2
    entry = data[table_pos + slot * 8 : table_pos + slot * 8 + 8]
    assert entry == h.to_bytes(4, "little") + (2048).to_bytes(4, "little")
    assert len(data) == 2048 + len(record) + 2 * 8


def test_replaces_an_older_table(qmail_home: Path) -> None:
    src = qmail_home / "control" / "morercpthosts"
    src.write_text("old.test\n")
    assert newmrh(qmail_home).returncode == 0
    src.write_text("new.test\n")
    assert newmrh(qmail_home).returncode == 0
    db = CDB.open(qmail_home / "control" / "morercpthosts.cdb")
    assert db.get(b"new.test") == b"" and db.get(b"old.test") is None


def test_empty_source_gives_an_empty_table(qmail_home: Path) -> None:
    (qmail_home / "control" / "morercpthosts").write_text("# none yet\n")
    assert newmrh(qmail_home).returncode == 0
    data = (qmail_home / "control" / "morercpthosts.cdb").read_bytes()
    assert len(data) == 2048
    assert CDB(data).get(b"x") is None


def test_missing_source(qmail_home: Path) -> None:
    r = newmrh(qmail_home)
    assert r.returncode == 111
    assert r.stdout == ""
    assert r.stderr == (
        "qmail-newmrh: fatal: unable to read control/morercpthosts: No such file or directory\n"
    )
    assert not (qmail_home / "control" / "morercpthosts.cdb").exists()


def test_unwritable_temporary_keeps_the_old_table(qmail_home: Path) -> None:
    ctl = qmail_home / "control"
    (ctl / "morercpthosts").write_text("old.test\n")
    assert newmrh(qmail_home).returncode == 0
    before = (ctl / "morercpthosts.cdb").read_bytes()
    (ctl / "morercpthosts").write_text("new.test\n")
    (ctl / "morercpthosts.tmp").mkdir()
    r = newmrh(qmail_home)
    assert r.returncode == 111
    assert r.stderr == (
        "qmail-newmrh: fatal: unable to write to control/morercpthosts.tmp: Is a directory\n"
    )
    assert (ctl / "morercpthosts.cdb").read_bytes() == before


def test_rename_failure(qmail_home: Path) -> None:
    ctl = qmail_home / "control"
    (ctl / "morercpthosts").write_text("x.test\n")
    (ctl / "morercpthosts.cdb").mkdir()
    (ctl / "morercpthosts.cdb" / "keep").write_text("")
    r = newmrh(qmail_home)
    assert r.returncode == 111
    assert r.stderr == (
        "qmail-newmrh: fatal: unable to move control/morercpthosts.tmp to "
        "control/morercpthosts.cdb: Is a directory\n"
    )


def test_home_from_environment(qmail_home: Path) -> None:
    (qmail_home / "control" / "morercpthosts").write_text("env.test\n")
    r = subprocess.run([str(BIN)], capture_output=True, timeout=30)
    assert r.returncode == 0
    assert CDB.open(qmail_home / "control" / "morercpthosts.cdb").get(b"env.test") == b""


def test_hosts_parsing() -> None:
    assert hosts(b"A.test\n#x\n\n \t\nb.TEST \t\n#\n") == [b"a.test", b"b.test"]
    # only ASCII is lowercased, as in qmail
    assert hosts("ÄÖ.test\n".encode()) == ["ÄÖ.test".encode()]
    assert hosts(b"") == []
