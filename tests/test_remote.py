"""qmail-remote against real peers on loopback: smtp-sink and a scripted SMTP server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from _remote_util import (
    BIN,
    Script,
    ScriptedPeer,
    SMTPSink,
    free_port,
    make_cert,
    run_remote,
    unstuff,
)
from pyqmail import tcpto
from pyqmail.rspawn import rspawn_report

MSG = b"From: a@example.test\nTo: b@other.test\nSubject: test\n\nhello\n"


def route(home: Path, *lines: str) -> None:
    (home / "control" / "smtproutes").write_text("".join(line + "\n" for line in lines))


def control(home: Path, name: str, value: str) -> None:
    (home / "control" / name).write_text(value + "\n")


def folded(reports: list[bytes]) -> bytes:
    """What qmail-rspawn would hand qmail-send for a one-recipient run."""
    return rspawn_report(0, b"".join(r + b"\0" for r in reports))


@pytest.fixture
def sink() -> SMTPSink:
    s = SMTPSink()
    yield s
    s.stop()


def test_smtp_sink_accepts(qmail_home: Path, sink: SMTPSink) -> None:
    route(qmail_home, f":127.0.0.1:{sink.port}")
    reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[0] == b"r"
    assert reports[1].startswith(b"K127.0.0.1 accepted message.\nRemote host said: 250")
    assert folded(reports).startswith(b"K127.0.0.1 accepted message.")


def test_one_transaction_for_many_recipients_pipelined(qmail_home: Path) -> None:
    with ScriptedPeer(Script(ehlo=["PIPELINING", "SIZE 100000"])) as peer:
        route(qmail_home, f"other.test:127.0.0.1:{peer.port}")
        rcpts = [f"u{i}@other.test" for i in range(3)]
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", *rcpts)
    assert reports == [b"r", b"r", b"r", reports[3]]
    assert reports[3].startswith(b"K127.0.0.1 accepted message.")
    assert len(peer.sessions) == 1
    s = peer.sessions[0]
    assert [c.split(b":")[0] for c in s.commands] == [
        b"EHLO mx.example.test",
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA",
        b"QUIT",
    ]
    assert s.commands[1] == b"MAIL FROM:<a@example.test> SIZE=%d" % len(MSG)
    # MAIL, the RCPTs and DATA travelled together
    assert any(b.count(b"RCPT TO") == 3 and b.endswith(b"DATA\r\n") for b in s.batches)
    assert unstuff(s.data[0]) == MSG.replace(b"\n", b"\r\n")


def test_helo_fallback_without_pipelining(qmail_home: Path) -> None:
    control(qmail_home, "helohost", "helo.example.test")
    with ScriptedPeer(Script(ehlo=None)) as peer:
        route(qmail_home, f"other.test:[127.0.0.1]:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "", "b@other.test", "c@other.test")
    assert reports[:2] == [b"r", b"r"]
    assert reports[2].startswith(b"K127.0.0.1 accepted")
    s = peer.sessions[0]
    assert s.commands[:3] == [b"EHLO helo.example.test", b"HELO helo.example.test", b"MAIL FROM:<>"]
    assert not any(b.count(b"RCPT") > 1 for b in s.batches)


def test_rcpt_4xx_5xx_and_mixed(qmail_home: Path) -> None:
    def rcpt(addr: bytes) -> bytes:
        if addr.startswith(b"<temp"):
            return b"450 try later"
        if addr.startswith(b"<gone"):
            return b"550-no such user\r\n550 really"
        return b"250 ok"

    control(qmail_home, "tlspolicy", ":none")
    with ScriptedPeer(Script(rcpt=rcpt)) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        temp = run_remote(qmail_home, MSG, "other.test", "a@example.test", "temp@other.test")
        gone = run_remote(qmail_home, MSG, "other.test", "a@example.test", "gone@other.test")
        mixed = run_remote(
            qmail_home, MSG, "other.test", "a@example.test", "gone@other.test", "ok@other.test"
        )
    assert temp == [
        b"s127.0.0.1 does not like recipient.\nRemote host said: 450 try later\n",
        b"DGiving up on 127.0.0.1.\n",
    ]
    assert folded(temp) == (
        b"Z127.0.0.1 does not like recipient.\nRemote host said: 450 try later\n"
        b"Giving up on 127.0.0.1.\n"
    )
    assert folded(gone) == (
        b"D127.0.0.1 does not like recipient.\nRemote host said: 550-no such user\n550 really\n"
        b"Giving up on 127.0.0.1.\n"
    )
    assert mixed[0].startswith(b"h127.0.0.1 does not like recipient.")
    assert mixed[1] == b"r"
    assert mixed[2].startswith(b"K127.0.0.1 accepted message.")
    # no recipient accepted: the message itself was never sent
    assert [len(s.data) for s in peer.sessions] == [0, 0, 1]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            Script(greeting=b"421 busy"),
            b"ZConnected to 127.0.0.1 but greeting failed.\nRemote host said: 421 busy\n",
        ),
        (
            Script(mail=b"553 go away"),
            b"DConnected to 127.0.0.1 but sender was rejected.\nRemote host said: 553 go away\n",
        ),
        (
            Script(mail=b"451 later", ehlo=[]),
            b"ZConnected to 127.0.0.1 but sender was rejected.\nRemote host said: 451 later\n",
        ),
        (
            Script(data=b"554 no data"),
            b"D127.0.0.1 failed on DATA command.\nRemote host said: 554 no data\n",
        ),
        (
            Script(dot=b"452 full"),
            b"Z127.0.0.1 failed after I sent the message.\nRemote host said: 452 full\n",
        ),
        (
            Script(dot=b"554 spam"),
            b"D127.0.0.1 failed after I sent the message.\nRemote host said: 554 spam\n",
        ),
    ],
)
def test_failures_have_qmail_texts(qmail_home: Path, script: Script, expected: bytes) -> None:
    with ScriptedPeer(script) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        control(qmail_home, "tlspolicy", ":none")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert folded(reports) == expected


def test_drop_mid_data_is_temporary_without_duplicate(qmail_home: Path) -> None:
    # larger than the loopback socket buffers, so the drop is seen while still sending
    big = MSG + (b"x" * 999 + b"\n") * 20000
    with ScriptedPeer(Script(drop_in_data=True)) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, big, "other.test", "a@example.test", "b@other.test")
    assert reports[0] == b"r"
    assert reports[1].startswith(b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n")
    assert folded(reports).startswith(b"Z")


def test_drop_after_dot_warns_of_duplicate(qmail_home: Path) -> None:
    with ScriptedPeer(Script(drop_after_dot=True)) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[1].startswith(
        b"ZConnected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n"
    )
    assert len(peer.sessions[0].data) == 1


def test_slow_peer_hits_timeoutremote(qmail_home: Path) -> None:
    control(qmail_home, "timeoutremote", "1")
    with ScriptedPeer(Script(greeting_delay=3)) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        start = time.monotonic()
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
        elapsed = time.monotonic() - start
    assert reports == [b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n"]
    assert elapsed < 2.9


def test_no_connection(qmail_home: Path) -> None:
    port = free_port()  # nobody listens there: refused
    route(qmail_home, f":127.0.0.1:{port}")
    reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports == [b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"]


def test_size_limit_refused_before_mail(qmail_home: Path) -> None:
    with ScriptedPeer(Script(ehlo=["SIZE 20"])) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[0].startswith(b"DConnected to 127.0.0.1 but the message is")
    assert b"(#5.3.4)" in reports[0]
    assert not any(c.startswith(b"MAIL") for c in peer.sessions[0].commands)


def test_smtputf8_needed_and_offered(qmail_home: Path) -> None:
    rcpt = "jürgen@other.test"
    with ScriptedPeer(Script(ehlo=["8BITMIME"])) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        refused = run_remote(qmail_home, MSG, "other.test", "a@example.test", rcpt)
    assert refused[0].startswith(b"DConnected to 127.0.0.1 but it does not support SMTPUTF8")
    assert b"(#5.6.7)" in refused[0]
    with ScriptedPeer(Script(ehlo=["8BITMIME", "SMTPUTF8"])) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        ok = run_remote(qmail_home, MSG, "other.test", "a@example.test", rcpt)
    assert ok[0] == b"r"
    cmds = peer.sessions[0].commands
    assert b"MAIL FROM:<a@example.test> BODY=8BITMIME SMTPUTF8" in cmds
    assert "RCPT TO:<jürgen@other.test>".encode() in cmds


def test_8bitmime_declared_for_8bit_body(qmail_home: Path) -> None:
    with ScriptedPeer(Script(ehlo=["8BITMIME"])) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        run_remote(qmail_home, MSG + "grüße\n".encode(), "other.test", "", "b@other.test")
        run_remote(qmail_home, MSG, "other.test", "", "b@other.test")
    assert peer.sessions[0].commands[1] == b"MAIL FROM:<> BODY=8BITMIME"
    assert peer.sessions[1].commands[1] == b"MAIL FROM:<>"


def test_data_transparency_smuggling_strings(qmail_home: Path) -> None:
    evil = (
        b"Subject: x\n\nstart\n.leading dot\nbare\rCR\r.\r\nafter-cr-dot\n.\nlf-dot"
        b"\n\n.\r\nMAIL FROM:<evil@x>\r\n\r\n.\nend\r\n"
    )
    with ScriptedPeer(Script()) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, evil, "other.test", "a@example.test", "b@other.test")
    assert reports[-1].startswith(b"K")
    s = peer.sessions[0]
    # exactly one message, and no command was smuggled after it
    assert len(s.data) == 1
    assert [c for c in s.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<a@example.test>"]
    payload = s.data[0]
    assert payload.replace(b"\r\n", b"").count(b"\r") == 0
    assert payload.replace(b"\r\n", b"").count(b"\n") == 0
    lines = unstuff(payload).split(b"\r\n")
    assert b".leading dot" in lines and b"." in lines and b"MAIL FROM:<evil@x>" in lines
    assert lines[-2:] == [b"end", b""]


def test_partial_final_line_is_permanent_and_not_sent(qmail_home: Path) -> None:
    with ScriptedPeer(Script()) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(
            qmail_home, b"Subject: x\n\nno newline", "other.test", "", "b@other.test"
        )
    assert reports == [b"DSMTP cannot transfer messages with partial final lines. (#5.6.2)\n"]
    assert peer.sessions == []


def test_address_with_line_break_never_reaches_the_wire(qmail_home: Path) -> None:
    with ScriptedPeer(Script()) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(
            qmail_home, MSG, "other.test", "", "x\r\nDATA@other.test", "ok@other.test"
        )
    assert reports[0].startswith(b"hSorry, this address holds a line break")
    assert reports[1] == b"r" and reports[2].startswith(b"K")
    assert not any(b"x\r" in b or b"x\n" in b for b in peer.sessions[0].batches)


def test_usage_and_control_errors(qmail_home: Path) -> None:
    import subprocess

    proc = subprocess.run(
        [str(BIN / "qmail-remote"), "other.test"], input=b"", capture_output=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout == b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n\0"
    control(qmail_home, "timeoutremote", "soon")
    reports = run_remote(qmail_home, MSG, "other.test", "", "b@other.test")
    assert reports[0].startswith(b"ZUnable to read control files. (#4.3.0)\n")


# -- STARTTLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert(tmp_path_factory.mktemp("tls"), "mx.other.test")


def test_starttls_opportunistic(qmail_home: Path, cert: Path) -> None:
    with ScriptedPeer(Script(certfile=str(cert))) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[0] == b"r"
    assert reports[1].startswith(b"K127.0.0.1 accepted message.")
    assert b"\nTLS: TLSv1." in reports[1] and b"certificate not verified" in reports[1]
    s = peer.sessions[0]
    assert s.tls and len(s.data) == 1
    # EHLO again after the handshake
    assert [c for c in s.commands if c.startswith(b"EHLO")] == [b"EHLO mx.example.test"] * 2


def test_starttls_verify_fails_and_defers(qmail_home: Path, cert: Path, tmp_path: Path) -> None:
    other_ca = make_cert(tmp_path, "someone.else")
    control(qmail_home, "tlspolicy", f"other.test:verify:{other_ca}:mx.other.test")
    with ScriptedPeer(Script(certfile=str(cert))) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[0].startswith(b"ZTLS unable to verify server 127.0.0.1:")
    assert b"(#4.7.5)" in reports[0]
    assert all(not s.data for s in peer.sessions)


def test_starttls_verify_succeeds_with_right_ca(qmail_home: Path, cert: Path) -> None:
    control(qmail_home, "tlspolicy", f"other.test:verify:{cert}:mx.other.test")
    with ScriptedPeer(Script(certfile=str(cert))) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[1].startswith(b"K")
    assert b"certificate verified for mx.other.test" in reports[1]


def test_required_tls_not_offered_defers(qmail_home: Path) -> None:
    control(qmail_home, "tlspolicy", ".test:encrypt")
    with ScriptedPeer(Script()) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports == [
        b"ZConnected to 127.0.0.1 but it does not offer STARTTLS, "
        b"which control/tlspolicy requires. (#4.7.4)\n"
    ]
    assert not any(c.startswith(b"MAIL") for c in peer.sessions[0].commands)


def test_starttls_response_injection_aborts(qmail_home: Path, cert: Path) -> None:
    with ScriptedPeer(Script(certfile=str(cert), inject_after_starttls=b"250 injected")) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[0].startswith(b"ZConnected to 127.0.0.1 but it sent data after its STARTTLS")
    assert all(not s.data for s in peer.sessions)


def test_tls_policy_none_never_starttls(qmail_home: Path, cert: Path) -> None:
    control(qmail_home, "tlspolicy", "other.test:none")
    with ScriptedPeer(Script(certfile=str(cert))) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "a@example.test", "b@other.test")
    assert reports[1].startswith(b"K") and b"TLS" not in reports[1]
    assert b"STARTTLS" not in peer.sessions[0].commands


# -- tcpto --------------------------------------------------------------------------


def test_tcpto_skips_dead_host_and_refusal_clears(qmail_home: Path) -> None:
    queue = qmail_home / "queue"
    t = tcpto.TCPTO(queue)
    now = time.time()
    t.record("127.0.0.1", True, now - 1000)
    t.record("127.0.0.1", True, now - 500)
    with ScriptedPeer(Script()) as peer:
        route(qmail_home, f":127.0.0.1:{peer.port}")
        reports = run_remote(qmail_home, MSG, "other.test", "", "b@other.test")
        assert reports == [b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"]
        assert peer.sessions == []
    # a refused connection is not a timeout: it clears the record once the block is over
    t2 = tcpto.TCPTO(queue)
    assert t2.dead("127.0.0.1", now + 6000) is False
    t2.record("127.0.0.1", False)
    assert tcpto.entries(queue) == []


def test_connect_timeout_is_remembered(qmail_home: Path) -> None:
    # a listener whose accept queue is full drops SYNs: a real connect timeout on loopback
    control(qmail_home, "timeoutconnect", "1")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.2)
        route(qmail_home, f":127.0.0.1:{port}")
        reports = run_remote(qmail_home, MSG, "other.test", "", "b@other.test")
    finally:
        for c in fillers:
            c.close()
        lsock.close()
    assert reports == [b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"]
    found = tcpto.entries(qmail_home / "queue")
    assert [(ip, count) for ip, count, _ in found] == [("127.0.0.1", 1)]
