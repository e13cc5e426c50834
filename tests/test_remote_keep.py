"""Kept SMTP connections: a delivery worker reuses its last connection for the next message."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from _remote_util import Script, ScriptedPeer
from pyqmail import remote
from pyqmail.remote import Report

MSG = b"From: a@example.test\nSubject: kept\n\nhello\n"


@pytest.fixture(autouse=True)
def _no_kept_connection_leaks() -> Iterator[None]:
    remote.close_kept()
    yield
    remote.close_kept()


def send(home: Path, host: str, rcpt: str, body: bytes = MSG) -> list[Report]:
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        return remote.deliver(home, host, "a@example.test", [rcpt], f.fileno(), keep=True)


def verbs(commands: list[bytes]) -> list[bytes]:
    return [c.split(b":")[0].split(b" ")[0] for c in commands]


def test_the_next_message_to_the_same_host_reuses_the_connection(qmail_home: Path) -> None:
    with ScriptedPeer(Script()) as peer:
        (qmail_home / "control" / "smtproutes").write_text(f"other.test:127.0.0.1:{peer.port}\n")
        first = send(qmail_home, "other.test", "b@other.test")
        second = send(qmail_home, "other.test", "c@other.test", MSG.replace(b"hello", b"again"))
        assert first[-1][0] == "K" and second[-1][0] == "K"
        # the report of a reused connection still names the TLS outcome of its start
        assert second[-1][1].endswith("TLS: not offered by the remote host; sent in clear text.\n")
        remote.close_kept()
    (s,) = peer.sessions
    assert verbs(s.commands) == [
        b"EHLO",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"QUIT",
    ]
    assert [b"again" in d for d in s.data] == [False, True]


def test_a_kept_tls_connection_stays_encrypted(qmail_home: Path, tmp_path: Path) -> None:
    from _remote_util import make_cert

    cert = make_cert(tmp_path, "mx.other.test")
    with ScriptedPeer(Script(certfile=str(cert))) as peer:
        (qmail_home / "control" / "smtproutes").write_text(f"other.test:127.0.0.1:{peer.port}\n")
        first = send(qmail_home, "other.test", "b@other.test")
        second = send(qmail_home, "other.test", "c@other.test")
        remote.close_kept()
    assert "TLS: TLSv1." in first[-1][1] and "TLS: TLSv1." in second[-1][1]
    (s,) = peer.sessions
    assert s.tls and len(s.data) == 2
    assert verbs(s.commands).count(b"STARTTLS") == 1


@pytest.mark.parametrize("parting", [b"", b"421 idle too long, closing"])
def test_a_connection_the_peer_ended_is_replaced_without_a_trace(
    qmail_home: Path, parting: bytes
) -> None:
    with ScriptedPeer(Script(hang_up_after_message=parting)) as peer:
        (qmail_home / "control" / "smtproutes").write_text(f"other.test:127.0.0.1:{peer.port}\n")
        first = send(qmail_home, "other.test", "b@other.test")
        second = send(qmail_home, "other.test", "c@other.test")
    assert first[-1][0] == "K"
    # no "connection died", no deferral: the message simply went over a new connection
    assert second[-1][0] == "K" and "died" not in second[-1][1]
    assert [len(s.data) for s in peer.sessions] == [1, 1]


def test_another_host_or_a_long_pause_ends_the_kept_connection(
    qmail_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ScriptedPeer(Script()) as a, ScriptedPeer(Script()) as b:
        (qmail_home / "control" / "smtproutes").write_text(
            f"a.test:127.0.0.1:{a.port}\nb.test:127.0.0.1:{b.port}\n"
        )
        send(qmail_home, "a.test", "x@a.test")
        send(qmail_home, "b.test", "x@b.test")  # a's connection is closed politely
        monkeypatch.setattr(remote, "KEEP_IDLE", 0.0)
        send(qmail_home, "b.test", "y@b.test")  # too old: a new connection
        remote.close_kept()
    assert [verbs(s.commands)[-1] for s in a.sessions] == [b"QUIT"]
    assert [len(s.data) for s in b.sessions] == [1, 1]
    assert all(verbs(s.commands)[-1] == b"QUIT" for s in b.sessions)


def test_a_failed_message_is_never_followed_on_the_same_connection(qmail_home: Path) -> None:
    with ScriptedPeer(Script(dot=b"554 rejected")) as peer:
        (qmail_home / "control" / "smtproutes").write_text(f"other.test:127.0.0.1:{peer.port}\n")
        first = send(qmail_home, "other.test", "b@other.test")
        second = send(qmail_home, "other.test", "c@other.test")
    assert first[-1][0] == "D" and second[-1][0] == "D"
    assert len(peer.sessions) == 2
    assert all(verbs(s.commands)[-1] == b"QUIT" for s in peer.sessions)
