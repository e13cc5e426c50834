"""tcpserver: the library API (forked Python handler) over real loopback sockets."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest

from _tcp_util import Client, ipv6_loopback_works, library_server, wait_for
from pyqmail.tcprules import compile_rules

pytestmark = pytest.mark.timeout(60)


def test_env_and_echo_ipv4(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"verbosity": 2}) as srv:
        c = Client("127.0.0.1", srv.port)
        g = c.greeting()
        env = g["env"]
        local_port = c.sock.getsockname()[1]
        assert env["PROTO"] == "TCP"
        assert env["TCPREMOTEIP"] == "127.0.0.1"
        assert env["TCPREMOTEPORT"] == str(local_port)
        assert env["TCPLOCALIP"] == "127.0.0.1"
        assert env["TCPLOCALPORT"] == str(srv.port)
        # no lookups were asked for, so the names and ident are absent, not empty
        for name in ("TCPREMOTEHOST", "TCPREMOTEINFO", "TCPLOCALHOST"):
            assert name not in env
        c.send(b"hello\r\n")
        assert c.readline() == b"echo hello\r\n"
        c.send(b"quit\n")
        assert c.readline() == b"bye\n"
        assert c.readline() == b""
        c.close()
        pid = g["pid"]
        assert wait_for(lambda: f"end {pid} status 0" in srv.log_text())
        log = srv.log_text()
        assert f"tcpserver: pid {pid} from 127.0.0.1\n" in log
        assert f"tcpserver: ok {pid} :127.0.0.1:{srv.port} :127.0.0.1::{local_port}\n" in log
        assert "tcpserver: status: 0/40" in log


def test_exit_status_is_logged_as_wait_status(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"verbosity": 2}) as srv:
        c = Client("127.0.0.1", srv.port)
        pid = c.greeting()["pid"]
        c.send(b"exit 1\n")
        assert c.readline() == b""
        # a raw wait status, as ucspi's tcpserver logs it: exit 1 is 256
        assert wait_for(lambda: f"end {pid} status 256" in srv.log_text())
        c.close()


# max_use 0: a child forked per connection; 5: pool workers handed the connection
@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback in this environment")
@pytest.mark.parametrize("max_use", [0, 5])
def test_ipv4_and_ipv6_listeners_together(tmp_path: Path, max_use: int) -> None:
    with library_server(
        tmp_path, addresses=[["127.0.0.1", 0], ["::1", 0]], options={"max_use": max_use}
    ) as srv:
        (ip4, port4), (ip6, port6) = srv.bound
        assert (ip4, ip6) == ("127.0.0.1", "::1")
        c4 = Client("127.0.0.1", port4)
        assert c4.greeting()["env"]["PROTO"] == "TCP"
        c6 = Client("::1", port6)
        env6 = c6.greeting()["env"]
        assert env6["PROTO"] == "TCP6"
        assert env6["TCPREMOTEIP"] == "::1"
        assert env6["TCP6REMOTEIP"] == "::1"
        assert env6["TCPLOCALIP"] == "::1"
        assert env6["TCPREMOTEPORT"] == str(c6.sock.getsockname()[1])
        c4.close()
        c6.close()


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback in this environment")
@pytest.mark.parametrize("max_use", [0, 5])
def test_dual_stack_listener_shows_ipv4_clients_as_ipv4(tmp_path: Path, max_use: int) -> None:
    with library_server(tmp_path, addresses=[["::", 0]], options={"max_use": max_use}) as srv:
        c = Client("127.0.0.1", srv.port)
        env = c.greeting()["env"]
        assert env["TCPREMOTEIP"] == "127.0.0.1"
        assert env["TCPLOCALIP"] == "127.0.0.1"
        assert env["PROTO"] == "TCP"
        c.close()


def test_local_name_and_remote_host_lookup(tmp_path: Path) -> None:
    try:
        expected = socket.gethostbyaddr("127.0.0.1")[0].lower()
    except OSError:
        expected = None
    options = {"local_name": "mx.example.test", "remote_host": True}
    with library_server(tmp_path, options=options) as srv:
        c = Client("127.0.0.1", srv.port)
        env = c.greeting()["env"]
        assert env["TCPLOCALHOST"] == "mx.example.test"
        assert env.get("TCPREMOTEHOST") == expected
        c.close()


def test_banner_is_sent_first(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"banner": "hi there\n"}) as srv:
        c = Client("127.0.0.1", srv.port)
        assert c.readline() == b"hi there\n"
        assert c.greeting()["env"]["TCPREMOTEIP"] == "127.0.0.1"
        c.close()


def test_concurrency_limit_holds_under_flood(tmp_path: Path) -> None:
    active = tmp_path / "active"
    active.mkdir()
    limit = 3
    clients_n = 24
    with library_server(
        tmp_path, limit=limit, active_dir=str(active), options={"backlog": 64}
    ) as srv:
        clients = [Client("127.0.0.1", srv.port) for _ in range(clients_n)]
        # exactly `limit` are served at once; the rest wait in the kernel's queue
        served = [c for c in clients if _greets_within(c, 0.3)]
        assert len(served) == limit
        assert len(srv.children()) == limit
        for c in served:
            c.send(b"quit\n")
            assert c.readline() == b"bye\n"
            c.close()
        # the waiting ones are served as slots free up
        for c in clients:
            if c not in served:
                assert _greets_within(c, 5)
                c.close()
    assert list(active.iterdir()) == []


def test_flood_never_exceeds_limit(tmp_path: Path) -> None:
    active = tmp_path / "active"
    active.mkdir()
    limit = 3
    with library_server(
        tmp_path, limit=limit, active_dir=str(active), options={"backlog": 64}
    ) as srv:
        start = time.monotonic()
        clients = [Client("127.0.0.1", srv.port) for _ in range(24)]
        for c in clients:
            c.send(b"sleep 0.1\nquit\n")
        seen = []
        for c in clients:
            seen.append(c.greeting(timeout=20)["active"])
            assert c.readline(timeout=20) == b"echo sleep 0.1\n"
            assert c.readline(timeout=20) == b"bye\n"
            c.close()
        # 24 sessions of 0.1 s each, 3 at a time, cannot finish in under 0.8 s
        assert time.monotonic() - start >= 0.75
        assert max(seen) <= limit
        assert max(seen) >= 2  # they did run side by side
    assert list(active.iterdir()) == []


def _greets_within(c: Client, seconds: float) -> bool:
    try:
        c.greeting(timeout=seconds)
    except TimeoutError:
        return False
    c.sock.settimeout(5)
    return True


def test_per_ip_limit_rejects_politely(tmp_path: Path) -> None:
    banner = "421 too many connections from your address\r\n"
    with library_server(
        tmp_path, per_ip=2, options={"over_limit_banner": banner, "verbosity": 2}
    ) as srv:
        a = Client("127.0.0.1", srv.port)
        b = Client("127.0.0.1", srv.port)
        a.greeting()
        b.greeting()
        third = Client("127.0.0.1", srv.port)
        assert third.readline() == banner.encode().rstrip(b"\n") + b"\n"
        assert third.readline() == b""
        third.close()
        # another client address is not affected
        other = Client("127.0.0.1", srv.port, source="127.0.0.2")
        assert other.greeting()["env"]["TCPREMOTEIP"] == "127.0.0.2"
        other.close()
        # once one of the first two leaves, the address may connect again
        a.send(b"quit\n")
        assert a.readline() == b"bye\n"
        a.close()
        pid_a_gone = wait_for(lambda: len(srv.children()) == 1)
        assert pid_a_gone
        again = Client("127.0.0.1", srv.port)
        assert again.greeting()["env"]["TCPREMOTEIP"] == "127.0.0.1"
        again.close()
        b.close()
        assert "per-ip limit 127.0.0.1 2/2" in srv.log_text()


def test_rules_deny_allow_and_env(tmp_path: Path) -> None:
    rules = tmp_path / "tcp.cdb"
    compile_rules(
        b'127.0.0.3:deny\n127.0.0.1:allow,RELAYCLIENT="",NOTE="trusted"\n:allow\n',
        rules,
        tmp_path / "tcp.tmp",
    )
    with library_server(tmp_path, rules=str(rules), options={"verbosity": 2}) as srv:
        trusted = Client("127.0.0.1", srv.port)
        g = trusted.greeting()
        assert g["env"]["RELAYCLIENT"] == ""
        assert g["env"]["NOTE"] == "trusted"
        # the child's os.environ carries the rule's variables too, for code that reads it
        assert g["os_relay"] == ""
        trusted.close()

        plain = Client("127.0.0.1", srv.port, source="127.0.0.2")
        g = plain.greeting()
        assert "RELAYCLIENT" not in g["env"]
        assert g["os_relay"] is None
        plain.close()

        denied = Client("127.0.0.1", srv.port, source="127.0.0.3")
        assert denied.readline() == b""  # closed with no bytes sent
        denied.close()
        assert wait_for(
            lambda: re.search(r"deny \d+ :127.0.0.1:\d+ :127.0.0.3::\d+", srv.log_text())
        )
        assert wait_for(lambda: "status 25600" in srv.log_text())  # exit 100


def test_rules_reload_without_restart(tmp_path: Path) -> None:
    rules = tmp_path / "tcp.cdb"
    tmp = tmp_path / "tcp.tmp"
    compile_rules(b':allow,STAGE="one"\n', rules, tmp)
    with library_server(tmp_path, rules=str(rules)) as srv:
        c = Client("127.0.0.1", srv.port)
        assert c.greeting()["env"]["STAGE"] == "one"
        c.close()
        compile_rules(b'127.:allow,STAGE="two"\n:allow,STAGE="one"\n', rules, tmp)
        c = Client("127.0.0.1", srv.port)
        assert c.greeting()["env"]["STAGE"] == "two"
        c.close()
        compile_rules(b"127.0.0.1:deny\n:allow\n", rules, tmp)
        c = Client("127.0.0.1", srv.port)
        assert c.readline() == b""
        c.close()


def test_missing_rules_drop_unless_X(tmp_path: Path) -> None:
    missing = tmp_path / "absent.cdb"
    with library_server(tmp_path, rules=str(missing)) as srv:
        c = Client("127.0.0.1", srv.port)
        assert c.readline() == b""
        c.close()
        assert wait_for(lambda: "dropping connection, unable to read" in srv.log_text())
    with library_server(tmp_path, rules=str(missing), options={"rules_missing_ok": True}) as srv:
        c = Client("127.0.0.1", srv.port)
        assert c.greeting()["env"]["TCPREMOTEIP"] == "127.0.0.1"
        c.close()


def test_children_are_reaped(tmp_path: Path) -> None:
    with library_server(tmp_path) as srv:
        for _ in range(10):
            c = Client("127.0.0.1", srv.port)
            c.greeting()
            c.send(b"quit\n")
            c.readline()
            c.close()
        # no zombies stay behind once the sessions are over
        assert wait_for(lambda: srv.children() == [])


def test_sigterm_stops_accepting_and_waits_for_children(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"stop_grace": 20}) as srv:
        busy = Client("127.0.0.1", srv.port)
        busy.greeting()
        srv.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # a connection that reached the backlog just as the listener
                # closed is reset, not refused: ask again
                return False
            return False

        assert wait_for(refused)
        # the session in progress carries on and finishes normally
        assert srv.proc.poll() is None
        busy.send(b"ping\n")
        assert busy.readline() == b"echo ping\n"
        busy.send(b"quit\n")
        assert busy.readline() == b"bye\n"
        busy.close()
        assert srv.proc.wait(10) == 0


def test_sigterm_grace_is_bounded(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"stop_grace": 0.5}) as srv:
        stuck = Client("127.0.0.1", srv.port)
        stuck.greeting()
        child = srv.children()
        assert len(child) == 1
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert time.monotonic() - start < 8
        # the stuck child was told to stop: its connection is closed
        assert stuck.readline(timeout=5) == b""
        stuck.close()


def test_sighup_does_not_stop_the_server(tmp_path: Path) -> None:
    with library_server(tmp_path) as srv:
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert srv.proc.poll() is None
        c = Client("127.0.0.1", srv.port)
        assert c.greeting()["env"]["PROTO"] == "TCP"
        c.close()


def test_sockets_never_land_on_fds_0_to_2(tmp_path: Path) -> None:
    # started with fd 0 closed, the server must not hand out fd 0 as a connection: handlers
    # dup2 pipes onto 0 and 1 when they start qmail-queue
    with library_server(tmp_path, close_stdin=True) as srv:
        c = Client("127.0.0.1", srv.port)
        g = c.greeting()
        assert g["fd"] > 2
        assert g["std_open"] is True
        c.close()
