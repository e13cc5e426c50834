"""qmail-lspawn: the real spawner program, driven through its command pipe."""

from __future__ import annotations

import mailbox
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _local_util import bin_path, give_to, make_maildir, open_dir, queued, write_qmail
from pyqmail.constants import SPAWN
from pyqmail.lspawn import _plainly_below, lspawn_report

UID = 4321  # the mailbox owner when the tests run as root
MSG = b"From: joe@example.org\nSubject: via lspawn\n\nhello\n"
ROOT = os.geteuid() == 0


class Spawner:
    """A running qmail-lspawn with its command and result pipes."""

    def __init__(self, home: Path, *args: str, argv: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv or [bin_path("qmail-lspawn"), "--home", str(home), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, QMAILHOME=str(home)),
        )
        assert self.proc.stdout is not None
        self.buf = b""
        assert self._read(1) == bytes([SPAWN])

    def _fill(self, deadline: float) -> None:
        """Read whatever qmail-lspawn has written next into self.buf."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        left = deadline - time.monotonic()
        assert left > 0, "qmail-lspawn did not answer in time"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            assert data, "qmail-lspawn closed its result pipe"
            self.buf += data

    def _read(self, n: int, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, slot: int, messid: str, sender: str, recipient: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(bytes([slot]) + f"{messid}\0{sender}\0{recipient}\0".encode())
        self.proc.stdin.flush()

    def result(self, timeout: float = 30) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf[1:]:
            self._fill(deadline)
        end = self.buf.index(b"\0", 1)
        slot, text = self.buf[0], self.buf[1:end]
        self.buf = self.buf[end + 1 :]
        return slot, text

    def deliver(self, recipient: str, sender: str = "joe@example.org") -> bytes:
        self.send(0, MESSID, sender, recipient)
        slot, text = self.result()
        assert slot == 0
        return text

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            code = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for f in (self.proc.stdout, self.proc.stderr):
                if f:
                    f.close()
        return code


MESSID = "0/23"


@pytest.fixture
def mess(qmail_home: Path) -> Path:
    path = qmail_home / "queue" / "mess" / "0" / "23"
    path.write_bytes(MSG)
    return path


@pytest.fixture
def spawner(qmail_home: Path, mess: Path) -> Iterator[Spawner]:
    sp = Spawner(qmail_home)
    try:
        yield sp
    finally:
        assert sp.close() == 0


@pytest.fixture
def world() -> Iterator[Path]:
    with open_dir() as path:
        yield path


def assign(home: Path, lines: list[str]) -> None:
    (home / "users" / "assign").write_text("".join(line + "\n" for line in lines) + ".\n")
    r = subprocess.run([bin_path("qmail-newu"), "--home", str(home)], capture_output=True)
    assert r.returncode == 0, r.stderr


def mailbox_user(home: Path, world: Path, name: str = "bob") -> Path:
    """A user with a home any uid can reach, owned by UID when we are root."""
    userhome = world / name
    userhome.mkdir(mode=0o755)
    make_maildir(userhome / "Maildir")
    uid = UID if ROOT else os.getuid()
    gid = UID if ROOT else os.getgid()
    give_to(userhome, uid if ROOT else None)
    assign(
        home,
        [
            f"={name}:{name}:{uid}:{gid}:{userhome}:::",
            f"+{name}-:{name}:{uid}:{gid}:{userhome}:-::",
        ],
    )
    return userhome


# -- the report rules (pure function) --------------------------------------------------


def exited(code: int) -> int:
    return code << 8


@pytest.mark.parametrize(
    ("status", "output", "want"),
    [
        (exited(0), b"did 1+0+0\n", b"Kdid 1+0+0\n"),
        (exited(111), b"Unable to chdir to maildir. (#4.2.1)\n", b"ZUnable to chdir to maildir. (#4.2.1)\n"),
        (exited(71), b"x", b"Zx"),
        (exited(74), b"x", b"Zx"),
        (exited(75), b"x", b"Zx"),
        (exited(100), b"Sorry.\n", b"DSorry.\n"),
        (exited(1), b"odd", b"Dodd"),
        (exited(101), b"", b"D"),
        (exited(112), b"ignored", b"ZInternal qmail-lspawn bug.\n"),
        (exited(113), b"", b"ZNot allowed to perform deliveries as root.\n"),
        (exited(115), b"", b"ZNFS failure in qmail-local.\n"),
        (exited(116), b"", b"ZUnable to find alias user!\n"),
        (exited(117), b"", b"ZTrouble reading users/cdb in qmail-lspawn.\n"),
        (exited(118), b"", b"ZTemporary failure in qmail-lspawn.\n"),
        (exited(119), b"", b"ZOut of memory in qmail-lspawn.\n"),
        (exited(120), b"", b"ZUnable to run qmail-local.\n"),
        (exited(121), b"", b"ZUnable to run qmail-getpw.\n"),
        (exited(126), b"", b"DUnable to run qmail-local.\n"),
        (9, b"partial", b"Zqmail-local crashed.\n"),  # killed by SIGKILL
        (exited(0), b"before\0after", b"Kbefore"),
    ],
)  # fmt: skip
def test_report_rules(status: int, output: bytes, want: bytes) -> None:
    assert lspawn_report(status, output) == want


def test_report_truncation() -> None:
    assert lspawn_report(exited(0), b"x" * 3000) == b"K" + b"x" * 3000
    long = lspawn_report(exited(100), b"y" * 3001)
    assert long == b"D" + b"y" * 2966 + b"\nError report too long, sorry.\n"


# -- real deliveries --------------------------------------------------------------------


def test_assigned_user_gets_mail_as_its_owner(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    assert spawner.deliver("bob@example.test") == b"Kdid 1+0+0\n"
    (m,) = list(mailbox.Maildir(bob / "Maildir", create=False))
    assert m["Delivered-To"] == "bob@example.test" and m["Subject"] == "via lspawn"
    (name,) = os.listdir(bob / "Maildir" / "new")
    st = os.stat(bob / "Maildir" / "new" / name)
    assert st.st_uid == (UID if ROOT else os.getuid())


def test_extension_through_wildcard_assignment(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    write_qmail(bob / ".qmail-news", '|printf "%s %s %s" "$USER" "$EXT" "$LOCAL" > ext.out\n')
    give_to(bob, UID if ROOT else None)
    assert spawner.deliver("Bob-News@example.test") == b"Kdid 0+0+1\n"
    assert (bob / "ext.out").read_text() == "bob News Bob-News"
    assert spawner.deliver("bob-other@example.test") == (
        b"DSorry, no mailbox here by that name. (#5.1.1)\n"
    )


def test_postmaster_goes_to_alias_and_unknown_bounces(spawner: Spawner, qmail_home: Path) -> None:
    assert spawner.deliver("Postmaster@example.test") == b"Kdid 1+0+0\n"
    (m,) = list(mailbox.Maildir(qmail_home / "alias" / "Maildir", create=False))
    assert m["Delivered-To"] == "Postmaster@example.test"
    assert spawner.deliver("nobody-here@example.test") == (
        b"DSorry, no mailbox here by that name. (#5.1.1)\n"
    )


def test_alias_forward_is_queued(spawner: Spawner, qmail_home: Path) -> None:
    # init's alias/.qmail-root says `&postmaster`
    text = spawner.deliver("root@example.test")
    assert text.startswith(b"Kdid 0+1+0\nqp "), text
    (q,) = queued(qmail_home)
    assert (q.sender, q.recipients) == ("joe@example.org", ["postmaster"])
    assert b"\nDelivered-To: root@example.test\n" + MSG in q.message


def test_user_forward_is_queued(qmail_home: Path, spawner: Spawner, world: Path) -> None:
    # as root the delivery runs as UID, which cannot write the root-owned queue:
    # qmail-lspawn queues the forward for it
    bob = mailbox_user(qmail_home, world)
    write_qmail(bob / ".qmail-fwd", "./Maildir/\n&carol@example.test\ndan@example.test\n")
    give_to(bob, UID if ROOT else None)
    text = spawner.deliver("bob-fwd@example.test")
    assert re.fullmatch(rb"Kdid 1\+2\+0\nqp \d+\n", text), text
    (q,) = queued(qmail_home)
    assert (q.sender, q.recipients) == (
        "joe@example.org",
        ["carol@example.test", "dan@example.test"],
    )
    assert q.message.endswith(b"\nDelivered-To: bob-fwd@example.test\n" + MSG)
    assert len(os.listdir(bob / "Maildir" / "new")) == 1


def test_user_forward_failure(
    qmail_home: Path, mess: Path, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = mailbox_user(qmail_home, world)
    write_qmail(bob / ".qmail-fwd", "&carol@example.test\n")
    give_to(bob, UID if ROOT else None)
    fake = tmp_path / "qq"
    fake.write_text("#!/bin/sh\ncat >/dev/null\nexit 31\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(fake))
    sp = Spawner(qmail_home)
    try:
        assert sp.deliver("bob-fwd@example.test") == (
            b"DUnable to forward message: mail server permanently rejected message (#5.3.0).\n"
        )
    finally:
        assert sp.close() == 0
    assert queued(qmail_home) == []


def test_trash_address(spawner: Spawner) -> None:
    assert spawner.deliver("@example.test") == b"K"


def test_broken_cdb_defers(spawner: Spawner, qmail_home: Path) -> None:
    (qmail_home / "users" / "cdb").write_bytes(b"not a cdb")
    assert spawner.deliver("bob@example.test") == b"ZTrouble reading users/cdb in qmail-lspawn.\n"


def test_long_program_output_is_truncated(spawner: Spawner, qmail_home: Path) -> None:
    write_qmail(qmail_home / "alias" / ".qmail-chatty", "|head -c 5000 /dev/zero | tr '\\0' x\n")
    text = spawner.deliver("chatty@example.test")
    assert text == b"K" + b"x" * 2966 + b"\nError report too long, sorry.\n"


def test_parallel_slots(qmail_home: Path, spawner: Spawner, world: Path) -> None:
    bob = mailbox_user(qmail_home, world)
    for slot in range(6):
        spawner.send(slot, MESSID, "joe@example.org", "bob@example.test")
    results = dict(spawner.result() for _ in range(6))
    assert results == {slot: b"Kdid 1+0+0\n" for slot in range(6)}
    assert len(os.listdir(bob / "Maildir" / "new")) == 6


def test_defaultdelivery_from_control_and_argument(
    qmail_home: Path, mess: Path, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    (qmail_home / "control" / "defaultdelivery").write_text("./Mailbox\n")
    sp = Spawner(qmail_home)
    try:
        assert sp.deliver("bob@example.test") == b"Kdid 1+0+0\n"
    finally:
        assert sp.close() == 0
    assert len(mailbox.mbox(bob / "Mailbox", create=False)) == 1
    sp = Spawner(qmail_home, "./Maildir/")
    try:
        assert sp.deliver("bob@example.test") == b"Kdid 1+0+0\n"
    finally:
        assert sp.close() == 0
    assert len(os.listdir(bob / "Maildir" / "new")) == 1


@pytest.mark.skipif(not ROOT, reason="only root can be asked to deliver as root")
def test_uid_zero_outside_pyqmail_homes_is_refused(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    home = world / "r"
    home.mkdir(mode=0o755)
    make_maildir(home / "Maildir")
    assign(qmail_home, [f"=r:root:0:0:{home}:::"])
    assert spawner.deliver("r@example.test") == b"ZNot allowed to perform deliveries as root.\n"
    assert os.listdir(home / "Maildir" / "new") == []


def test_missing_queue_is_a_clean_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [bin_path("qmail-lspawn"), "--home", str(tmp_path)],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 111
    assert r.stderr.startswith(b"qmail-lspawn: fatal: ")


# -- reused delivery workers (an install run by one ordinary user) ------------------------


def _maildir_pids(maildir: Path) -> list[str]:
    # qmail's unique names: TIME.PID[_SEQ].HOST; the pid is the delivering process
    return [name.split(".")[1].split("_")[0] for name in sorted(os.listdir(maildir / "new"))]


@pytest.mark.skipif(ROOT, reason="as root a user's delivery runs in a child that takes its uid")
def test_one_worker_makes_delivery_after_delivery(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    for _ in range(3):
        assert spawner.deliver("bob@example.test") == b"Kdid 1+0+0\n"
    pids = _maildir_pids(bob / "Maildir")
    assert len(pids) == 3 and len(set(pids)) == 1
    assert len(set(os.listdir(bob / "Maildir" / "new"))) == 3  # unique names all the same


def test_a_delivery_leaves_nothing_behind_for_the_next(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    write_qmail(bob / ".qmail-default", '|printf "%s" "${DEFAULT-unset}" > default.out\n')
    write_qmail(
        bob / ".qmail",
        '|printf "%s %s %s" "${DEFAULT-unset}" "${EXT-unset}" "$(umask)" > plain.out\n',
    )
    give_to(bob, UID if ROOT else None)
    assert spawner.deliver("bob-anything@example.test") == b"Kdid 0+0+1\n"
    assert (bob / "default.out").read_text() == "anything"
    # the next delivery (in the same worker, when workers are used) sees no DEFAULT and
    # an empty EXT, exactly as a freshly forked child would
    assert spawner.deliver("bob@example.test") == b"Kdid 0+0+1\n"
    assert (bob / "plain.out").read_text() == "unset  0077"


def test_a_killed_delivery_is_a_crash_and_the_next_one_works(
    qmail_home: Path, spawner: Spawner, world: Path
) -> None:
    bob = mailbox_user(qmail_home, world)
    # the program kills the process that runs the delivery (a forked child or a worker)
    write_qmail(bob / ".qmail-die", "|kill -9 $PPID; sleep 1\n")
    give_to(bob, UID if ROOT else None)
    assert spawner.deliver("bob-die@example.test") == b"Zqmail-local crashed.\n"
    assert spawner.deliver("bob@example.test") == b"Kdid 1+0+0\n"
    assert len(os.listdir(bob / "Maildir" / "new")) == 1


# a spawner whose workers retire after every delivery, with a delivery that only
# reports: each worker's last answer races qmail-send's next command
_RETIRING_SPAWNER = """
import os, sys
from pathlib import Path
from pyqmail import spawn
from pyqmail.lspawn import lspawn_report

def deliver(msg_fd, sender, recipient):
    os.write(1, b"delivered to " + recipient.encode())
    return 0

sys.exit(spawn.serve(deliver, lspawn_report, Path(sys.argv[1]), max_use=1))
"""


def test_a_retiring_worker_is_never_given_another_delivery(qmail_home: Path, mess: Path) -> None:
    sp = Spawner(
        qmail_home,
        argv=[sys.executable, "-c", _RETIRING_SPAWNER, str(qmail_home / "queue")],
    )
    try:
        slots = 4
        total = 120
        answers: list[bytes] = []
        for slot in range(slots):
            sp.send(slot, MESSID, "joe@example.org", f"r{slot}@example.test")
        sent = slots
        while len(answers) < total:
            slot, text = sp.result()
            answers.append(text)
            if sent < total:
                # the next command goes out at once, while the worker that answered exits
                sp.send(slot, MESSID, "joe@example.org", f"r{sent}@example.test")
                sent += 1
        crashed = [a for a in answers if not a.startswith(b"K")]
        assert crashed == []
        assert len({a for a in answers}) == total  # each recipient answered once
    finally:
        assert sp.close() == 0


# -- the root-managed home check's short cut -----------------------------------------------


def test_plainly_below_takes_only_paths_that_are_their_own_realpath(tmp_path: Path) -> None:
    top = os.path.realpath(tmp_path)
    (tmp_path / "alias").mkdir()
    (tmp_path / "mailboxes" / "bob").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "mailboxes" / "eve").symlink_to(tmp_path / "elsewhere")
    found = _plainly_below(top, f"{top}/mailboxes/bob")
    assert found is not None
    path, st = found
    assert path == os.path.realpath(path)
    assert (st.st_ino, st.st_dev) == (os.stat(path).st_ino, os.stat(path).st_dev)
    assert _plainly_below(top, f"{top}/alias") is not None
    # a symlink anywhere below top, a dot component, or a path outside top: realpath decides
    assert _plainly_below(top, f"{top}/mailboxes/eve") is None
    assert _plainly_below(top, f"{top}/mailboxes/../alias") is None
    assert _plainly_below(top, f"{top}/./alias") is None
    assert _plainly_below(top, f"{top}//alias") is None
    assert _plainly_below(top, f"{top}-other/alias") is None
    assert _plainly_below(top, top) is None
    with pytest.raises(FileNotFoundError):
        _plainly_below(top, f"{top}/missing")
