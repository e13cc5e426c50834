"""tcpserver's worker pool (max_use > 0): long-lived workers, one connection at a time each."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from _tcp_util import Client, library_server, wait_for
from pyqmail.tcprules import compile_rules

pytestmark = pytest.mark.timeout(60)


def _session(port: int, source: str | None = None) -> dict[str, object]:
    c = Client("127.0.0.1", port, source=source)
    g = c.greeting()
    c.send(b"quit\n")
    assert c.readline() == b"bye\n"
    c.close()
    return g


def test_a_worker_serves_up_to_max_use_connections(tmp_path: Path) -> None:
    with library_server(tmp_path, limit=2, options={"max_use": 3, "verbosity": 2}) as srv:
        pids = Counter()
        for i in range(1, 10):
            g = _session(srv.port)
            pids[g["pid"]] += 1
            # a worker reports itself free (or gone) before the next client comes, so
            # this sequence is served by as few workers as max_use allows
            assert wait_for(lambda i=i: srv.log_text().count("status: 0/2") >= i + 1)
        assert max(pids.values()) == 3  # reused...
        assert all(n <= 3 for n in pids.values())  # ...but never past max_use
        # three workers, or four if a client met the spare while its usual worker was on its
        # way back to waiting
        assert 3 <= len(pids) <= 4
        # a worker that reached max_use has exited and been reaped (a fresh one may wait)
        assert wait_for(lambda: not set(pids) & set(srv.children()))
        assert "served 3" in srv.log_text()


def test_the_server_side_closes_every_connection_when_its_session_ends(tmp_path: Path) -> None:
    # the first client makes the server fork a worker while holding that client's socket;
    # the worker must not keep a copy of it, or the client never sees the end of the
    # connection (and one client's process would hold another client's socket)
    with library_server(tmp_path, limit=2, options={"max_use": 10, "verbosity": 2}) as srv:
        pids: set[int] = set()
        for i in range(1, 4):
            c = Client("127.0.0.1", srv.port)
            pids.add(c.greeting()["pid"])
            c.send(b"quit\n")
            assert c.readline() == b"bye\n"
            assert c.readline(timeout=5) == b""  # EOF, not a timeout
            c.close()
            # the worker is free again before the next client, so that one reuses it
            assert wait_for(lambda i=i: srv.log_text().count("status: 0/2") >= i + 1)
        # a fresh worker's first client, then its later ones (or the spare's, if the
        # first one was not back to waiting yet)
        assert len(pids) <= 2


def test_no_client_variables_reach_the_next_client(tmp_path: Path) -> None:
    rules = tmp_path / "tcp.cdb"
    compile_rules(
        b'127.0.0.1:allow,RELAYCLIENT="",NOTE="trusted"\n:allow\n', rules, tmp_path / "tcp.tmp"
    )
    # one worker serves everybody, so the second client meets the first one's process
    with library_server(tmp_path, limit=1, rules=str(rules), options={"max_use": 10}) as srv:
        trusted = _session(srv.port)
        assert trusted["os_relay"] == ""
        plain = _session(srv.port, source="127.0.0.2")
        assert plain["pid"] == trusted["pid"]
        assert plain["os_relay"] is None
        env = plain["env"]
        assert isinstance(env, dict)
        assert "RELAYCLIENT" not in env and "NOTE" not in env
        assert env["TCPREMOTEIP"] == "127.0.0.2"


def test_a_worker_forgets_its_rules_decisions_when_the_rules_change(tmp_path: Path) -> None:
    rules = tmp_path / "tcp.cdb"
    compile_rules(b'127.0.0.1:allow,NOTE="first"\n', rules, tmp_path / "tcp.tmp")
    with library_server(tmp_path, limit=1, rules=str(rules), options={"max_use": 10}) as srv:
        first = _session(srv.port)
        again = _session(srv.port)
        assert again["pid"] == first["pid"]  # the same worker, remembering its decision
        assert isinstance(again["env"], dict) and again["env"]["NOTE"] == "first"
        compile_rules(b'127.0.0.1:deny\n:allow,NOTE="second"\n', rules, tmp_path / "tcp.tmp")
        changed = _session(srv.port, source="127.0.0.2")
        assert changed["pid"] == first["pid"]
        assert isinstance(changed["env"], dict) and changed["env"]["NOTE"] == "second"
        # the client it had a decision for is now refused: the connection just closes
        c = Client("127.0.0.1", srv.port)
        assert c.sock.recv(100) == b""
        c.close()


def test_pool_never_serves_more_than_the_limit(tmp_path: Path) -> None:
    active = tmp_path / "active"
    active.mkdir()
    limit = 3
    with library_server(
        tmp_path,
        limit=limit,
        active_dir=str(active),
        options={"backlog": 64, "max_use": 100},
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
        assert time.monotonic() - start >= 0.75
        assert 2 <= max(seen) <= limit
        # three workers did all the work, none was forked per connection
        assert len(srv.children()) == limit
    assert list(active.iterdir()) == []


def test_per_ip_limit_counts_clients_not_workers(tmp_path: Path) -> None:
    banner = "421 too many connections from your address\r\n"
    with library_server(
        tmp_path, per_ip=1, options={"over_limit_banner": banner, "max_use": 10}
    ) as srv:
        a = Client("127.0.0.1", srv.port)
        a.greeting()
        refused = Client("127.0.0.1", srv.port)
        assert refused.readline() == banner.encode().rstrip(b"\n") + b"\n"
        refused.close()
        a.send(b"quit\n")
        assert a.readline() == b"bye\n"
        a.close()
        # once the worker reports the client gone, the address may come back

        def served_again() -> bool:
            c = Client("127.0.0.1", srv.port)
            try:
                return c.readline().startswith(b"{")
            finally:
                c.close()

        assert wait_for(served_again)


def test_a_killed_worker_frees_its_slot(tmp_path: Path) -> None:
    with library_server(tmp_path, limit=1, per_ip=1, options={"max_use": 10}) as srv:
        victim = Client("127.0.0.1", srv.port)
        pid = victim.greeting()["pid"]
        os.kill(pid, signal.SIGKILL)
        assert victim.readline() == b""
        victim.close()
        # the slot and the address's count are both given back: a new worker serves
        after = Client("127.0.0.1", srv.port)
        g = after.greeting(timeout=5)
        assert g["pid"] != pid
        after.close()


def test_idle_workers_retire(tmp_path: Path) -> None:
    with library_server(tmp_path, options={"max_use": 10, "max_idle": 0.3}) as srv:
        _session(srv.port)
        assert wait_for(lambda: srv.children() == [], timeout=5)
        # and the server still serves after that
        assert _session(srv.port)["env"]


def test_sigterm_lets_the_busy_worker_finish(tmp_path: Path) -> None:
    options = {"max_use": 10, "stop_grace": 20, "verbosity": 2}
    with library_server(tmp_path, options=options) as srv:
        busy = Client("127.0.0.1", srv.port)
        busy_pid = busy.greeting()["pid"]
        idle_pid = _session(srv.port)["pid"]
        assert idle_pid != busy_pid
        # dispatched (2/40), then free again (1/40)
        assert wait_for(lambda: srv.log_text().rstrip().endswith("status: 1/40"))
        srv.proc.send_signal(signal.SIGTERM)
        # the idle worker exits at once; the busy one carries on with its client
        assert wait_for(lambda: idle_pid not in srv.children())
        assert busy_pid in srv.children()
        assert srv.proc.poll() is None
        busy.send(b"ping\n")
        assert busy.readline() == b"echo ping\n"
        busy.send(b"quit\n")
        assert busy.readline() == b"bye\n"
        busy.close()
        assert srv.proc.wait(10) == 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_pool_grows_to_the_limit_and_no_further(tmp_path: Path) -> None:
    # workers accept for themselves: the last idle one to take a client has the parent fork
    # another, so clients arriving together are all served at once up to the limit
    with library_server(tmp_path, limit=4, options={"max_use": 100, "backlog": 16}) as srv:
        clients = [Client("127.0.0.1", srv.port) for _ in range(4)]
        pids = {c.greeting(timeout=10)["pid"] for c in clients}
        assert len(pids) == 4
        waiting = Client("127.0.0.1", srv.port)
        with pytest.raises(TimeoutError):
            waiting.readline(timeout=0.5)  # in the listen queue: every worker is busy
        assert len(srv.children()) == 4
        clients[0].send(b"quit\n")
        assert clients[0].readline() == b"bye\n"
        assert waiting.greeting(timeout=5)["pid"] in pids  # the freed worker takes it
        for c in [*clients, waiting]:
            c.close()
        assert len(srv.children()) == 4


def test_per_ip_limit_holds_for_clients_arriving_together(tmp_path: Path) -> None:
    banner = "421 too many from you\r\n"
    options = {"over_limit_banner": banner, "max_use": 1000, "backlog": 64, "verbosity": 2}
    with library_server(tmp_path, limit=12, per_ip=2, options=options) as srv:

        def sessions_ended(n: int) -> bool:
            return srv.log_text().count(" served ") >= n

        # first grow the pool with clients from other addresses, so that many idle workers
        # race for the clients below
        warm = [Client("127.0.0.1", srv.port, source=f"127.0.0.{10 + i}") for i in range(11)]
        for c in warm:
            c.greeting(timeout=10)
        for c in warm:
            c.send(b"quit\n")
            assert c.readline() == b"bye\n"
            c.close()
        assert wait_for(lambda: sessions_ended(11))
        assert len(srv.children()) == 12
        for round_ in range(1, 6):
            burst = [Client("127.0.0.1", srv.port, source="127.0.0.2") for _ in range(8)]
            answers = [c.readline(timeout=10) for c in burst]
            served = [a for a in answers if a.startswith(b"{")]
            refused = [a for a in answers if not a.startswith(b"{")]
            assert len(served) == 2, answers
            assert refused == [banner.encode()] * 6
            for c in burst:
                c.close()
            # the two sessions are over, their workers free, before the next burst
            assert wait_for(lambda round_=round_: sessions_ended(11 + 2 * round_))


def test_a_killed_worker_is_replaced_while_the_others_are_busy(tmp_path: Path) -> None:
    with library_server(tmp_path, limit=2, options={"max_use": 10}) as srv:
        a = Client("127.0.0.1", srv.port)
        victim = a.greeting()["pid"]
        b = Client("127.0.0.1", srv.port)
        busy = b.greeting()["pid"]
        assert busy != victim
        os.kill(victim, signal.SIGKILL)
        assert a.readline() == b""
        a.close()
        # b still holds the other worker: a new one must take the next client
        c = Client("127.0.0.1", srv.port)
        assert c.greeting(timeout=5)["pid"] not in (victim, busy)
        for client in (b, c):
            client.send(b"quit\n")
            assert client.readline() == b"bye\n"
            client.close()


def test_an_idle_worker_stays_while_another_is_busy(tmp_path: Path) -> None:
    options = {"max_use": 10, "max_idle": 0.3}
    with library_server(tmp_path, limit=3, options=options) as srv:
        busy = Client("127.0.0.1", srv.port)
        busy_pid = busy.greeting()["pid"]
        assert wait_for(lambda: len(srv.children()) == 2)  # it was the last idle one
        spare = next(pid for pid in srv.children() if pid != busy_pid)
        time.sleep(1.0)  # several idle periods
        # the spare did not retire (to be replaced by a fresh fork), so it serves the next
        assert _session(srv.port)["pid"] == spare
        busy.send(b"quit\n")
        assert busy.readline() == b"bye\n"
        busy.close()
        # with nobody busy the whole pool retires
        assert wait_for(lambda: srv.children() == [], timeout=5)
        assert _session(srv.port)["env"]


def test_workers_leave_when_the_server_is_killed(tmp_path: Path) -> None:
    with library_server(tmp_path, limit=3, options={"max_use": 10}) as srv:
        busy = Client("127.0.0.1", srv.port)
        busy_pid = busy.greeting()["pid"]
        assert wait_for(lambda: len(srv.children()) == 2)
        workers = srv.children()
        srv.proc.kill()
        srv.proc.wait(5)
        # the idle worker sees its channel end and exits; the busy one finishes its client
        spare = next(pid for pid in workers if pid != busy_pid)
        assert wait_for(lambda: not _alive(spare))
        assert _alive(busy_pid)
        busy.send(b"ping\n")
        assert busy.readline() == b"echo ping\n"
        busy.send(b"quit\n")
        assert busy.readline() == b"bye\n"
        busy.close()
        assert wait_for(lambda: not _alive(busy_pid))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_failed_fork_is_retried_without_spinning(tmp_path: Path) -> None:
    options = {"max_use": 10, "max_idle": 0.3}
    with library_server(tmp_path, options=options, fail_forks=2) as srv:
        before = _cpu_seconds(srv.proc.pid)
        c = Client("127.0.0.1", srv.port)
        # the client waits in the listen queue while the parent retries, once a second
        assert c.greeting(timeout=10)["env"]
        c.close()
        assert srv.log_text().count("unable to fork") == 2
        # the waits were sleeps, not a loop polling the waiting connection; nor does the
        # parent spin once the pool has retired to nothing
        assert wait_for(lambda: srv.children() == [], timeout=5)
        time.sleep(1.0)
        assert _cpu_seconds(srv.proc.pid) - before < 0.5
        assert _session(srv.port)["env"]


def test_quick_clients_share_a_few_workers(tmp_path: Path) -> None:
    # quick_workers 2: while two workers are busy with young sessions, clients wait for them
    # in the listen queue rather than each getting a process of its own
    options = {"max_use": 1000, "backlog": 64, "quick_workers": 2, "slow_session": 3.0}
    with library_server(tmp_path, limit=20, options=options) as srv:
        clients = [Client("127.0.0.1", srv.port, timeout=20) for _ in range(12)]
        for c in clients:
            c.send(b"sleep 0.05\nquit\n")
        pids = set()
        for c in clients:
            pids.add(c.greeting()["pid"])
            assert c.readline() == b"echo sleep 0.05\n"
            assert c.readline() == b"bye\n"
            c.close()
        assert 1 <= len(pids) <= 2
        assert len(srv.children()) <= 2


def test_slow_clients_still_get_a_worker_each(tmp_path: Path) -> None:
    # a worker whose client has said nothing for slow_session no longer counts as quick:
    # clients that hold their sessions open all get a worker of their own, up to the limit
    options = {"max_use": 1000, "backlog": 64, "quick_workers": 2, "slow_session": 0.2}
    with library_server(tmp_path, limit=8, options=options) as srv:
        start = time.monotonic()
        clients = [Client("127.0.0.1", srv.port, timeout=10) for _ in range(7)]
        pids = {c.greeting()["pid"] for c in clients}
        assert len(pids) == 7
        # several waits of about slow_session, not of a session timeout
        assert time.monotonic() - start < 5
        assert len(srv.children()) >= 7
        # once they leave, a quick client is served by one of those workers, at once
        for c in clients:
            c.send(b"quit\n")
            assert c.readline() == b"bye\n"
            c.close()
        assert _session(srv.port)["pid"] in pids


def test_a_saturated_pool_still_grows_after_a_quiet_spell(tmp_path: Path) -> None:
    # the parent stops watching once a worker is idle; the next time every worker is held,
    # a waiting client must still get a new one
    options = {"max_use": 1000, "backlog": 64, "quick_workers": 1, "slow_session": 0.2}
    with library_server(tmp_path, limit=4, options=options) as srv:
        for _ in range(3):
            assert _session(srv.port)["pid"]
        time.sleep(1.5)  # past the parent's last look at an idle pool
        held = Client("127.0.0.1", srv.port, timeout=10)
        first = held.greeting()["pid"]
        other = Client("127.0.0.1", srv.port, timeout=10)
        assert other.greeting()["pid"] != first
        for c in (held, other):
            c.send(b"quit\n")
            assert c.readline() == b"bye\n"
            c.close()
