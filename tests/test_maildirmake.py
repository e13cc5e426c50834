"""maildirmake: the program and the function behind it."""

from __future__ import annotations

import mailbox
import os
import stat
import subprocess
from pathlib import Path

import pytest

from _local_util import bin_path
from pyqmail.maildirmake import MaildirMakeError, make_maildir


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([bin_path("maildirmake"), *args], capture_output=True, timeout=30)


def test_makes_a_usable_private_maildir(tmp_path: Path) -> None:
    target = tmp_path / "Maildir"
    r = run(str(target))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(target / sub).st_mode) == 0o700
    assert sorted(os.listdir(target)) == ["cur", "new", "tmp"]
    box = mailbox.Maildir(target, create=False)
    box.add(b"Subject: x\n\nbody\n")
    assert len(box) == 1


def test_existing_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "M").mkdir()
    r = run(str(tmp_path / "M"))
    assert r.returncode == 111
    assert r.stderr == f"maildirmake: fatal: unable to mkdir {tmp_path}/M: File exists\n".encode()
    assert os.listdir(tmp_path / "M") == []


def test_missing_parent(tmp_path: Path) -> None:
    r = run(str(tmp_path / "no" / "M"))
    assert r.returncode == 111
    assert (
        r.stderr
        == (
            f"maildirmake: fatal: unable to mkdir {tmp_path}/no/M: No such file or directory\n"
        ).encode()
    )


def test_usage() -> None:
    r = run()
    assert (r.returncode, r.stderr) == (100, b"maildirmake: usage: maildirmake name\n")


def test_subdirectory_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "N"
    real_mkdir = os.mkdir

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        if Path(path) == target:  # something else takes the name `tmp` right away
            (target / "tmp").write_text("in the way")

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(MaildirMakeError) as exc:
        make_maildir(target)
    assert str(exc.value) == f"unable to mkdir {target}/tmp: File exists"
