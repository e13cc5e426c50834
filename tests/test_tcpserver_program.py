"""tcpserver as a UCSPI program: exec'ing programs, options, exit codes, cdb interoperability."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from _tcp_util import BIN, Client, wait_for
from pyqmail.tcprules import compile_rules

pytestmark = pytest.mark.timeout(60)

OURS = BIN / "tcpserver"
REAL_SERVER = Path("/usr/bin/tcpserver")
REAL_RULES = Path("/usr/bin/tcprules")

SHOW_ENV = (
    'echo "ip=$TCPREMOTEIP proto=$PROTO lport=$TCPLOCALPORT lhost=${TCPLOCALHOST-unset} '
    'rhost=${TCPREMOTEHOST-unset} info=${TCPREMOTEINFO-unset} relay=${RELAYCLIENT-unset}"'
)


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def program(
    tmp_path: Path, args: list[str], server: Path = OURS, env: dict[str, str] | None = None
) -> Iterator[Running]:
    log = tmp_path / f"tcpserver-{len(list(tmp_path.iterdir()))}.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [str(server), "-1", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else b""
        assert line.strip().isdigit(), f"no port printed: {log.read_text()}"
        yield Running(proc, int(line), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def fetch(port: int, source: str | None = None) -> bytes:
    c = Client("127.0.0.1", port, source=source)
    out = b""
    while True:
        line = c.readline()
        if not line:
            break
        out += line
    c.close()
    return out


def test_execs_program_with_socket_on_0_and_1(tmp_path: Path) -> None:
    with program(tmp_path, ["-v", "127.0.0.1", "0", "/bin/sh", "-c", "echo $TCPREMOTEIP"]) as srv:
        assert fetch(srv.port) == b"127.0.0.1\n"
        assert wait_for(lambda: " status 0" in srv.log_text())
        # and reading works through fd 0
    with program(tmp_path, ["127.0.0.1", "0", "/bin/sh", "-c", "read x; echo got $x"]) as srv:
        c = Client("127.0.0.1", srv.port)
        c.send(b"hello\n")
        assert c.readline() == b"got hello\n"
        c.close()


def test_environment_of_the_program(tmp_path: Path) -> None:
    # stale UCSPI variables in the server's own environment never leak into a connection
    env = dict(os.environ, TCPREMOTEHOST="stale.example", TCPREMOTEINFO="stale")
    with program(
        tmp_path, ["-l", "mx.example.test", "127.0.0.1", "0", "/bin/sh", "-c", SHOW_ENV], env=env
    ) as srv:
        out = fetch(srv.port).decode()
    assert out == (
        f"ip=127.0.0.1 proto=TCP lport={srv.port} lhost=mx.example.test "
        "rhost=unset info=unset relay=unset\n"
    )


def test_banner_and_concurrency_limit(tmp_path: Path) -> None:
    args = [
        "-B",
        "220 hold on\r\n",
        "-c",
        "1",
        "127.0.0.1",
        "0",
        "/bin/sh",
        "-c",
        "read x; echo $x",
    ]
    with program(tmp_path, args) as srv:
        first = Client("127.0.0.1", srv.port)
        assert first.readline() == b"220 hold on\r\n"
        second = Client("127.0.0.1", srv.port)
        with pytest.raises(TimeoutError):
            second.readline(timeout=0.3)
        first.send(b"one\n")
        assert first.readline() == b"one\n"
        first.close()
        assert second.readline(timeout=5) == b"220 hold on\r\n"
        second.send(b"two\n")
        assert second.readline() == b"two\n"
        second.close()


def test_program_that_cannot_run(tmp_path: Path) -> None:
    with program(tmp_path, ["-v", "127.0.0.1", "0", str(tmp_path / "nonexistent")]) as srv:
        assert fetch(srv.port) == b""
        assert wait_for(lambda: "status 28416" in srv.log_text())  # exit 111
        assert "tcpserver: fatal: unable to run " in srv.log_text()


def test_usage_bind_and_port_errors(tmp_path: Path) -> None:
    proc = subprocess.run([str(OURS), "-c"], capture_output=True, timeout=20)
    assert proc.returncode == 100
    assert proc.stderr.startswith(b"tcpserver: usage: tcpserver")
    proc = subprocess.run([str(OURS), "127.0.0.1", "0"], capture_output=True, timeout=20)
    assert proc.returncode == 100
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(OURS), "127.0.0.1", str(port), "true"], capture_output=True, timeout=20
        )
    assert proc.returncode == 111
    assert b"tcpserver: fatal: unable to bind 127.0.0.1 port" in proc.stderr
    proc = subprocess.run(
        [str(OURS), "127.0.0.1", "no-such-service-name", "true"], capture_output=True, timeout=20
    )
    assert proc.returncode == 111
    assert (
        proc.stderr
        == b"tcpserver: fatal: unable to figure out port number for no-such-service-name\n"
    )


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    with program(tmp_path, ["127.0.0.1", "0", "true"]) as srv:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid/gid needs root")
def test_drops_privileges_after_bind(tmp_path: Path) -> None:
    args = ["-u", "65534", "-g", "65534", "127.0.0.1", "0", "/bin/sh", "-c", "id -u; id -g"]
    with program(tmp_path, args) as srv:
        assert fetch(srv.port) == b"65534\n65534\n"


@pytest.mark.skipif(not REAL_RULES.exists(), reason="needs ucspi-tcp's tcprules")
def test_our_server_reads_a_cdb_made_by_ucspi_tcprules(tmp_path: Path) -> None:
    cdb = tmp_path / "real.cdb"
    subprocess.run(
        [str(REAL_RULES), str(cdb), str(tmp_path / "real.tmp")],
        input=b'127.0.0.1:allow,RELAYCLIENT=""\n127.0.0.3:deny\n:allow\n',
        check=True,
        timeout=20,
    )
    with program(tmp_path, ["-x", str(cdb), "127.0.0.1", "0", "/bin/sh", "-c", SHOW_ENV]) as srv:
        assert fetch(srv.port).endswith(b" relay=\n")
        assert b"relay=unset" in fetch(srv.port, source="127.0.0.2")
        assert fetch(srv.port, source="127.0.0.3") == b""


@pytest.mark.skipif(not REAL_SERVER.exists(), reason="needs ucspi-tcp's tcpserver")
def test_ucspi_server_reads_a_cdb_made_by_us(tmp_path: Path) -> None:
    cdb = tmp_path / "ours.cdb"
    subprocess.run(
        [str(BIN / "tcprules"), str(cdb), str(tmp_path / "ours.tmp")],
        input=b"127.0.0.1:allow,RELAYCLIENT=\"\",NOTE='x y'\n127.0.0.3:deny\n:allow\n",
        check=True,
        timeout=20,
    )
    args = [
        "-R",
        "-H",
        "-l0",
        "-x",
        str(cdb),
        "127.0.0.1",
        "0",
        "/bin/sh",
        "-c",
        'echo "relay=${RELAYCLIENT-unset} note=${NOTE-unset}"',
    ]
    with program(tmp_path, args, server=REAL_SERVER) as srv:
        assert fetch(srv.port) == b"relay= note=x y\n"
        assert fetch(srv.port, source="127.0.0.2") == b"relay=unset note=unset\n"
        assert fetch(srv.port, source="127.0.0.3") == b""


def _fake_identd() -> tuple[socket.socket, threading.Thread] | None:
    try:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 113))
    except OSError:
        return None
    lsock.listen(5)
    lsock.settimeout(10)

    def answer() -> None:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            query = conn.recv(100).decode().strip()
            conn.sendall(f"{query} : USERID : UNIX : joe\r\n".encode())

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return lsock, thread


def test_ident_and_host_rules(tmp_path: Path) -> None:
    identd = _fake_identd()
    if identd is None:
        pytest.skip("port 113 on 127.0.0.1 cannot be bound here (not root, or in use)")
    lsock, thread = identd
    try:
        cdb = tmp_path / "r.cdb"
        compile_rules(b'joe@127.0.0.1:allow,RELAYCLIENT="ident"\n:allow\n', cdb, tmp_path / "r.tmp")
        args = ["-r", "-t", "5", "-x", str(cdb), "127.0.0.1", "0", "/bin/sh", "-c", SHOW_ENV]
        with program(tmp_path, args) as srv:
            out = fetch(srv.port).decode()
        assert "info=joe " in out
        assert "relay=ident" in out
    finally:
        lsock.close()
        thread.join(10)
