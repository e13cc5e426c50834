"""Running a real pyqmail MTA (`pyqmail run`) from tests."""

from __future__ import annotations

import mailbox
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    return str(BIN / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_listening(port: int) -> bool:
    """True once some TCP socket of this machine listens on `port` (from /proc/net)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header line
                for line in f:
                    fields = line.split()
                    # fields[1] is local address:port in hex, fields[3] the state (0A: LISTEN)
                    if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def maildir_count(path: Path) -> int:
    return sum(len(os.listdir(path / sub)) for sub in ("new", "cur") if (path / sub).is_dir())


def queue_empty(home: Path) -> bool:
    q = home / "queue"
    if os.listdir(q / "todo"):
        return False
    return not any(os.listdir(q / "info" / str(i)) for i in range(23))


def kept_spares(home: Path) -> set[str]:
    """Paths of finished mess files kept at their names as spares (a `m.N` pool name),
    and of the envelope files kept with them (intd/N, no longer in todo/)."""
    pool = home / "queue" / "spare" / "q"
    kept = set()
    for name in os.listdir(pool):
        if name.startswith("m."):
            n = int(name[2:])
            kept.add(str(home / "queue" / "mess" / str(n % 23) / str(n)))
            envelope = home / "queue" / "intd" / str(n)
            if not (home / "queue" / "todo" / str(n)).exists():
                kept.add(str(envelope))
    return kept


def queue_files(home: Path) -> list[str]:
    """Every file left in the queue, except the lock files and the spares."""
    q = home / "queue"
    kept = kept_spares(home)
    out = []
    for root, _dirs, files in os.walk(q):
        if Path(root) == q / "lock" or Path(root).is_relative_to(q / "spare"):
            continue
        out += [path for f in files if (path := os.path.join(root, f)) not in kept]
    return sorted(out)


def assert_spares_sane(home: Path) -> int:
    """Every spare is a file with one name, never a live queue file, or a finished mess
    file kept at its name whose number nothing in the queue uses; returns the count."""
    q = home / "queue"
    live = {os.stat(f).st_ino for f in queue_files(home)}
    count = 0
    for pool in ("q", "s"):
        for entry in os.scandir(q / "spare" / pool):
            st = entry.stat(follow_symlinks=False)
            if entry.name.startswith("m."):
                n = int(entry.name[2:])
                assert st.st_nlink == 2 and st.st_ino == n, (entry.path, st)
                assert os.path.samestat(st, os.stat(q / "mess" / str(n % 23) / str(n)))
                for user in (q / "todo" / str(n), q / "info" / str(n % 23) / str(n)):
                    assert not user.exists(), (entry.path, user)
                envelope = q / "intd" / str(n)  # kept with it, never still in todo/
                assert not envelope.exists() or envelope.stat().st_nlink == 1, entry.path
            else:
                assert st.st_nlink == 1, (entry.path, st)
            assert st.st_ino not in live, entry.path
            count += 1
    return count


class MTA:
    """`pyqmail run --home HOME` in a child process; stop() sends SIGTERM and waits."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        # .qmail program lines find pyqmail's helpers (preline, forward, ...) on PATH
        path = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env = dict(os.environ, PATH=path, **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.smtp_port = 0

    def start(self) -> MTA:
        listen = self.home / "control" / "smtplisten"
        if listen.exists():
            self.smtp_port = int(listen.read_text().split()[0].rsplit(":", 1)[1])
        else:
            # never the shared default port: tests run side by side
            self.smtp_port = free_port()
            listen.write_text(f"127.0.0.1:{self.smtp_port}\n")
        self.proc = subprocess.Popen(
            [bin_path("pyqmail"), "run", "--home", str(self.home)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started = time.time() - 1
        # a restart finds the previous run's lines in the log: wait for a fresh one
        wait_for(lambda: self.logged_since(started, "status: local"), 20, "qmail-send to start")
        # tcpserver starts beside qmail-send, not before it: a test's first connection
        # must not race its listen().  Asked of the kernel, so no session is logged for it
        port = self.smtp_port
        wait_for(lambda: port_listening(port), 20, f"the SMTP listener on port {port}")
        return self

    def log(self) -> str:
        try:
            return (self.home / "log" / "send" / "current").read_text(errors="replace")
        except OSError:
            return ""

    def logged_since(self, since: float, text: str) -> bool:
        """True once a log line stamped at or after `since` contains `text`."""
        for line in self.log().splitlines():
            if text in line and line.startswith("@") and len(line) > 25:
                stamp = int(line[1:17], 16) - 0x400000000000000A
                if stamp >= int(since):
                    return True
        return False

    def trigger(self) -> None:
        fd = os.open(self.home / "queue" / "lock" / "trigger", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)

    def kill9(self) -> None:
        """Kill the whole process group at once, as a crash or power cut would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        try:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError("pyqmail run did not stop on SIGTERM") from None
        finally:
            if proc.stdout:
                proc.stdout.close()
            try:  # anything left in the group (a stuck child) must not outlive the test
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code

    def __enter__(self) -> MTA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sendmail(
    home: Path, args: list[str], message: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = dict(os.environ, QMAILHOME=str(home), **(env or {}))
    return subprocess.run(
        [bin_path("sendmail"), *args],
        input=message,
        env=full_env,
        capture_output=True,
        timeout=60,
    )


def add_user(home: Path, address: str) -> Path:
    out = subprocess.run(
        [bin_path("pyqmail"), "user", "add", "--home", str(home), address],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    path = Path(out.stdout.strip())
    assert (path / "Maildir" / "new").is_dir()
    return path


def msg(subject: str, body: str = "hello\n", extra: str = "") -> bytes:
    return f"From: joe@example.test\nTo: someone\nSubject: {subject}\n{extra}\n{body}".encode()


def only_message(maildir: Path) -> mailbox.MaildirMessage:
    box = mailbox.Maildir(maildir, create=False)
    keys = box.keys()
    assert len(keys) == 1, f"expected one message in {maildir}, found {len(keys)}"
    return box[keys[0]]
