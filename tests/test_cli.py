"""The pyqmail front command: init, user, run (default home, bad controls, missing home)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from _mta import MTA, bin_path, free_port, maildir_count, msg, sendmail, wait_for


def pyqmail(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_path("pyqmail"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        env=dict(os.environ, **(env or {})),
    )


def test_init_creates_a_home_and_refuses_to_overwrite(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r = pyqmail(
        "init",
        "--home",
        str(home),
        "--me",
        "Mail.Example.Test",
        "--local",
        "example.test",
        "--rcpthost",
        "example.test",
        "--rcpthost",
        ".example.test",
        "--smtp",
        "127.0.0.1:2599",
    )
    assert r.returncode == 0, r.stderr
    assert f"created qmail home {home}" in r.stdout
    assert (home / "control" / "me").read_text() == "mail.example.test\n"
    assert (home / "control" / "locals").read_text() == "example.test\n"
    assert (home / "control" / "rcpthosts").read_text() == "example.test\n.example.test\n"
    assert (home / "control" / "smtplisten").read_text() == "127.0.0.1:2599\n"
    for name in (".qmail-postmaster", ".qmail-mailer-daemon", ".qmail-root"):
        assert (home / "alias" / name).is_file()
    assert all((home / "queue" / d / "22").is_dir() for d in ("mess", "info", "local", "remote"))
    for d in ("users", "log", "queue/todo", "queue/intd", "queue/pid", "queue/bounce"):
        assert (home / d).is_dir()
    again = pyqmail("init", "--home", str(home), "--me", "other.test")
    assert again.returncode == 100
    assert "--force" in again.stderr
    assert (home / "control" / "me").read_text() == "mail.example.test\n"
    forced = pyqmail("init", "--home", str(home), "--me", "other.test", "--force")
    assert forced.returncode == 0
    assert (home / "control" / "me").read_text() == "other.test\n"


def test_user_add_list_del(qmail_home: Path) -> None:
    r = pyqmail("user", "add", "--home", str(qmail_home), "bob@example.test")
    assert r.returncode == 0, r.stderr
    bob = Path(r.stdout.strip())
    assert (bob / "Maildir" / "new").is_dir()
    dup = pyqmail("user", "add", "--home", str(qmail_home), "bob@example.test")
    assert dup.returncode == 100 and dup.stderr.startswith("pyqmail: ")
    bad = pyqmail("user", "add", "--home", str(qmail_home), "not an address")
    assert bad.returncode == 100 and "Traceback" not in bad.stderr
    pw = pyqmail(
        "user",
        "add",
        "--home",
        str(qmail_home),
        "ann@example.test",
        "--password-stdin",
        stdin="s3cret\n",
    )
    assert pw.returncode == 0, pw.stderr
    from pyqmail.users import check_password

    assert check_password(qmail_home, "ann@example.test", "s3cret")
    assert not check_password(qmail_home, "ann@example.test", "wrong")
    listed = pyqmail("user", "list", "--home", str(qmail_home))
    assert f"bob@example.test\t{bob}" in listed.stdout.splitlines()
    gone = pyqmail("user", "del", "--home", str(qmail_home), "bob@example.test")
    assert gone.returncode == 0 and str(bob) in gone.stdout
    assert "bob@example.test" not in pyqmail("user", "list", "--home", str(qmail_home)).stdout
    assert (bob / "Maildir").is_dir()  # mail is kept


def test_commands_on_a_missing_home_fail_clearly(tmp_path: Path) -> None:
    for args in (["run"], ["user", "list"]):
        r = pyqmail(*args, "--home", str(tmp_path / "none"))
        assert r.returncode != 0
        assert "is not a qmail home" in r.stderr
        assert "Traceback" not in r.stderr


def test_run_refuses_a_malformed_control_file(qmail_home: Path) -> None:
    (qmail_home / "control" / "smtplisten").write_text(f"127.0.0.1:{free_port()}\n")
    (qmail_home / "control" / "concurrencyincoming").write_text("lots\n")
    r = pyqmail("run", "--home", str(qmail_home))
    assert r.returncode == 111
    assert "control/concurrencyincoming line 1: not a number: 'lots'" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_refuses_bad_virtualdomains_before_starting_anything(qmail_home: Path) -> None:
    (qmail_home / "control" / "smtplisten").write_text(f"127.0.0.1:{free_port()}\n")
    (qmail_home / "control" / "virtualdomains").write_text("good.test:joe\nno colon here\n")
    r = pyqmail("run", "--home", str(qmail_home))
    assert r.returncode == 111
    assert "control/virtualdomains line 2: missing ':' in 'no colon here'" in r.stderr
    assert not (qmail_home / "log" / "send" / "current").exists()


def _stuck(session: int, home: Path) -> str:
    """What is left of a `pyqmail run` session that does not stop: its processes and logs."""
    lines = []
    for entry in sorted(os.listdir("/proc")):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            wchan = Path(f"/proc/{entry}/wchan").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:
            lines.append(f"pid {entry} ppid {fields[1]} state {fields[0]} {name} in {wchan}")
    for log in ("send", "smtpd"):
        current = home / "log" / log / "current"
        if current.exists():
            lines.append(f"log/{log}: {current.read_text(errors='replace')[-2000:]}")
    return "\n".join(lines)


def test_run_on_the_default_home_creates_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2525)) == 0:
            import pytest

            pytest.skip("something else listens on 127.0.0.1:2525, the default SMTP port")
    env = {"HOME": str(tmp_path), "QMAILHOME": ""}
    home = tmp_path / ".pyqmail"
    proc = subprocess.Popen(
        [bin_path("pyqmail"), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, **env),
        start_new_session=True,
    )
    try:
        wait_for(lambda: (home / "log" / "send" / "current").exists(), what="the default home")
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"pyqmail run did not stop on SIGTERM:\n{_stuck(proc.pid, home)}"
            ) from exc
    finally:
        if proc.poll() is None:  # never leave a server behind, even when the test fails
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out
    assert f"created a new qmail home at {home}" in out
    assert "pyqmail running: home" in out
    assert (home / "control" / "me").is_file()
    assert "status: exiting" in (home / "log" / "send" / "current").read_text()


def test_sigterm_with_mail_in_flight_loses_nothing(qmail_home: Path) -> None:
    from _mta import add_user

    bob = add_user(qmail_home, "bob@example.test")
    (bob / ".qmail-slow").write_text("|sleep 1\n./Maildir/\n")
    mta = MTA(qmail_home).start()
    try:
        for i in range(3):
            assert sendmail(qmail_home, ["bob-slow@example.test"], msg(f"slow {i}")).returncode == 0
        wait_for(lambda: "starting delivery" in mta.log(), what="a delivery to start")
    finally:
        assert mta.stop() == 0
    log = mta.log()
    assert log.rstrip().endswith("status: exiting")
    # whatever was in flight finished; the rest is delivered after a restart
    with MTA(qmail_home):
        wait_for(lambda: maildir_count(bob / "Maildir") == 3, what="all three delivered")
