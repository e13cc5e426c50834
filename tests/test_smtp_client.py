"""The sans-I/O SMTP client core: replies, DATA encoding, the dialogue, driven without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyqmail.smtp_client import (
    DONE,
    RECEIVE,
    SEND_MESSAGE,
    STARTTLS,
    DataEncoder,
    MessageInfo,
    ReplyParser,
    Send,
    SMTPClient,
    TLSInfo,
    TLSMode,
    encode_message,
    mangle,
    parse_ehlo,
)


def test_reply_parser_multiline_and_split_reads() -> None:
    p = ReplyParser()
    assert p.feed(b"250-mx.test hi\r\n250-PIPE") == []
    assert p.pending
    replies = p.feed(b"LINING\r\n250 SIZE 1000\r\n220 next")
    assert len(replies) == 1
    assert replies[0].code == 250
    assert replies[0].text == "250-mx.test hi\n250-PIPELINING\n250 SIZE 1000\n"
    assert parse_ehlo(replies[0]) == {"PIPELINING": "", "SIZE": "1000"}
    assert p.pending
    assert p.feed(b"\n")[0].code == 220


def test_malformed_reply_is_temporary_failure() -> None:
    assert ReplyParser().feed(b"hello there\r\n")[0].code == 451


def test_reply_text_capped_like_qmail() -> None:
    reply = ReplyParser().feed(b"550-" + b"x" * 6000 + b"\r\n550 end\r\n")[0]
    assert len(reply.text) == 5000 and reply.text.endswith("\n")


@given(st.binary(max_size=300))
def test_encoded_data_cannot_end_early(data: bytes) -> None:
    if data and data[-1:] not in (b"\n", b"\r"):
        data += b"\n"
    wire = encode_message(data)
    assert wire.endswith(b".\r\n")
    # no bare CR or LF anywhere
    assert wire.replace(b"\r\n", b"").count(b"\r") == 0
    assert wire.replace(b"\r\n", b"").count(b"\n") == 0
    # the only end-of-data marker is the final one
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    # undoing the stuffing gives the message with every line end as CRLF
    body = wire[:-3]
    lines = body.split(b"\r\n")
    unstuffed = b"\r\n".join(x[1:] if x.startswith(b".") else x for x in lines)
    assert unstuffed == data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_encoder_chunking_does_not_matter(data: bytes, cuts: list[int]) -> None:
    data += b"\n"
    points = sorted({min(c, len(data)) for c in cuts})
    enc = DataEncoder()
    out = b""
    prev = 0
    for p in [*points, len(data)]:
        out += enc.feed(data[prev:p])
        prev = p
    assert out + enc.finish() == encode_message(data)


def test_smuggling_sequences_are_stuffed() -> None:
    for seq in (b"\n.\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r"):
        wire = encode_message(b"a" + seq + b"MAIL FROM:<x@y>\r\n")
        assert (b"\r\n" + wire).count(b"\r\n.\r\n") == 1, seq
        assert wire.endswith(b"\r\nMAIL FROM:<x@y>\r\n.\r\n")


def test_partial_line_refused() -> None:
    enc = DataEncoder()
    enc.feed(b"abc")
    assert not enc.complete
    enc2 = DataEncoder()
    assert enc2.complete and enc2.finish() == b".\r\n"


def test_mangle_quotes_local_part() -> None:
    assert mangle("joe@example.org") == b"joe@example.org"
    assert mangle("two words@example.org") == b'"two words"@example.org'
    assert mangle("") == b""
    assert mangle("jürgen@example.org") == "jürgen@example.org".encode()


def drive(client: SMTPClient, server: list[bytes]) -> list[bytes]:
    """Run the client against canned server replies; returns what it sent."""
    sent: list[bytes] = []
    replies = list(server)
    for _ in range(100):
        action = client.next_action()
        if isinstance(action, Send):
            sent.append(action.data)
        elif action is RECEIVE:
            if replies:
                client.receive(replies.pop(0))
            else:
                client.connection_lost()
        elif action is SEND_MESSAGE:
            sent.append(b"<message>")
            client.message_sent()
        elif action is STARTTLS:
            client.tls_established(TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", None))
        elif action is DONE:
            return sent
    raise AssertionError("client did not finish")


def new_client(tls: TLSMode = TLSMode.NONE, rcpts: list[str] | None = None) -> SMTPClient:
    return SMTPClient(
        "192.0.2.1", "me.test", "a@me.test", rcpts or ["b@x.test"], MessageInfo(10, False), tls
    )


def test_pipelined_dialogue() -> None:
    c = new_client(rcpts=["b@x.test", "c@x.test"])
    sent = drive(
        c,
        [
            b"220 hi\r\n",
            b"250-x\r\n250 PIPELINING\r\n",
            b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n",
            b"250 queued\r\n",
        ],
    )
    assert sent == [
        b"EHLO me.test\r\n",
        b"MAIL FROM:<a@me.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n",
        b"<message>",
        b"QUIT\r\n",
    ]
    assert c.reports == [
        ("r", ""),
        ("h", "192.0.2.1 does not like recipient.\nRemote host said: 550 no\n"),
        ("K", "192.0.2.1 accepted message.\nRemote host said: 250 queued\n"),
    ]


def test_lost_before_reply_after_dot_is_possible_duplicate() -> None:
    c = new_client()
    drive(c, [b"220 hi\r\n", b"250 x\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"])
    assert c.reports[-1] == (
        "Z",
        "Connected to 192.0.2.1 but connection died. Possible duplicate! (#4.4.2)\n",
    )


def test_starttls_then_ehlo_again_and_outcome_reported() -> None:
    c = new_client(TLSMode.OPPORTUNISTIC)
    sent = drive(
        c,
        [
            b"220 hi\r\n",
            b"250-x\r\n250 STARTTLS\r\n",
            b"220 go\r\n",
            b"250 x\r\n",
            b"250 ok\r\n",
            b"250 ok\r\n",
            b"354 go\r\n",
            b"250 ok\r\n",
        ],
    )
    assert sent[:3] == [b"EHLO me.test\r\n", b"STARTTLS\r\n", b"EHLO me.test\r\n"]
    assert c.reports[-1][1].endswith(
        "TLS: TLSv1.3 TLS_AES_128_GCM_SHA256, certificate not verified.\n"
    )


def test_injected_bytes_after_starttls_reply_abort() -> None:
    c = new_client(TLSMode.OPPORTUNISTIC)
    sent = drive(c, [b"220 hi\r\n", b"250-x\r\n250 STARTTLS\r\n", b"220 go\r\n250 evil\r\n"])
    assert sent == [b"EHLO me.test\r\n", b"STARTTLS\r\n"]
    assert c.reports[-1][0] == "Z" and "possible attack" in c.reports[-1][1]


def test_verify_handshake_failure_defers() -> None:
    c = new_client(TLSMode.VERIFY)
    gen_replies = [b"220 hi\r\n", b"250-x\r\n250 STARTTLS\r\n", b"220 go\r\n"]
    for _ in range(10):
        action = c.next_action()
        if action is RECEIVE:
            c.receive(gen_replies.pop(0))
        elif action is STARTTLS:
            c.tls_failed("certificate verify failed")
        elif action is DONE:
            break
    assert c.reports == [
        ("Z", "TLS unable to verify server 192.0.2.1: certificate verify failed. (#4.7.5)\n")
    ]
    assert not c.retry_plaintext
