"""Property tests of the SMTP core: arbitrary input never breaks its promises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _smtp_util import Driver, reference_decode, split_replies
from pyqmail.smtp_server import Close, DataStart, MessageComplete

TOKENS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"MAIL FROM:<a@b> SIZE=5\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\0",
    b"Received: x\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
]

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TXN = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"

# half of the streams open a transaction first, so DATA handling is reached often
streams = st.builds(
    lambda prefix, rest: [prefix, *rest],
    st.sampled_from([b"", TXN]),
    st.lists(
        st.one_of(st.sampled_from(TOKENS), st.sampled_from(TOKENS), st.binary(max_size=12)),
        max_size=40,
    ),
)


def no_bare_cr_or_lf(data: bytes) -> bool:
    for i, b in enumerate(data):
        if b == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            return False
        if b == 0x0D and (i + 1 >= len(data) or data[i + 1] != 0x0A):
            return False
    return True


def check_run(d: Driver, chunks: list[bytes]) -> None:
    out = bytearray(d.srv.outgoing())
    closed_at: int | None = None
    for chunk in chunks:
        got = d.send(chunk)
        if closed_at is not None:
            assert got == b"", "output after the session was closed"
        out += got
        if d.srv.closed and closed_at is None:
            closed_at = len(out)
    d.srv.eof()
    d.pump()
    out += d.srv.outgoing()
    replies = split_replies(bytes(out))  # every reply is well framed
    codes = [c for c, _ in replies]
    starts = [e for e in d.events if isinstance(e, DataStart)]
    # 354 only ever answers an accepted DATA, which needs a sender and a recipient
    assert codes.count(354) == len(starts)
    for ev in starts:
        assert ev.recipients
    # a message completes only at CRLF.CRLF (or a lone dot line right after 354),
    # its data never held a bare CR or LF, and it is stored exactly as decoded
    completes = [e for e in d.events if isinstance(e, MessageComplete)]
    assert len(completes) == len(d.messages) == len(d.complete_at)
    for (start, end), message in zip(d.complete_at, d.messages, strict=True):
        seg = bytes(d.fed[start:end])
        assert seg == b".\r\n" or seg.endswith(b"\r\n.\r\n"), seg
        assert no_bare_cr_or_lf(seg)
        assert message == reference_decode(seg)
    # the session always ends in exactly one Close once input ends
    closes = [e for e in d.events if isinstance(e, Close)]
    assert len(closes) == 1
    if closes[0].clean:
        assert codes[-1] == 221


@SETTINGS
@given(streams)
def test_arbitrary_input_keeps_the_invariants(tokens: list[bytes]) -> None:
    check_run(Driver.make(), tokens)


@SETTINGS
@given(streams, st.data())
def test_rechunking_does_not_change_the_outcome(tokens: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = Driver.make()
    check_run(whole, [stream])
    split = Driver.make()
    check_run(split, pieces)
    assert whole.messages == split.messages
    assert whole.envelopes == split.envelopes
    assert [type(e) for e in whole.events if not hasattr(e, "data")] == [
        type(e) for e in split.events if not hasattr(e, "data")
    ]


@SETTINGS
@given(
    st.lists(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=30,
    )
)
def test_any_clean_body_round_trips(lines: list[bytes]) -> None:
    d = Driver.make(text_line_max=0)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    out = d.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + wire + b".\r\n")
    assert out.endswith(b"250 ok 1 qp 2\r\n")
    assert d.messages == [b"".join(line + b"\n" for line in lines)]


# a small model of qmail-smtpd's command replies, compared with the core's
COMMANDS = st.sampled_from(
    ["HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "JUNK", "QUIT", "BODY"]
)


def model_run(commands: list[str]) -> tuple[bytes, list[int]]:
    wire = bytearray()
    expected: list[int] = []
    sender = False
    rcpts = 0
    for cmd in commands:
        if cmd == "HELO":
            wire += b"HELO c\r\n"
            expected.append(250)
            sender, rcpts = False, 0
        elif cmd == "MAIL":
            wire += b"MAIL FROM:<a@b>\r\n"
            expected.append(250)
            sender, rcpts = True, 0
        elif cmd == "RCPT":
            wire += b"RCPT TO:<c@d>\r\n"
            if sender:
                expected.append(250)
                rcpts += 1
            else:
                expected.append(503)
        elif cmd == "DATA":
            wire += b"DATA\r\n"
            if sender and rcpts:
                wire += b"Subject: m\r\n\r\n.body\r\n.\r\n"
                expected += [354, 250]
                sender, rcpts = False, 0
            else:
                expected.append(503)
        elif cmd == "RSET":
            wire += b"RSET\r\n"
            expected.append(250)
            sender, rcpts = False, 0
        elif cmd == "NOOP":
            wire += b"NOOP\r\n"
            expected.append(250)
        elif cmd == "VRFY":
            wire += b"VRFY x\r\n"
            expected.append(252)
        elif cmd == "JUNK":
            wire += b"TURN\r\n"
            expected.append(502)
        elif cmd == "BODY":
            wire += b"Subject: not a command\r\n"
            expected.append(502)
        elif cmd == "QUIT":
            wire += b"QUIT\r\n"
            expected.append(221)
            break
    return bytes(wire), expected


@SETTINGS
@given(st.lists(COMMANDS, max_size=40), st.booleans())
def test_replies_match_the_state_model(commands: list[str], bytewise: bool) -> None:
    wire, expected = model_run(commands)
    d = Driver.make()
    d.srv.outgoing()
    out = d.send_bytewise(wire) if bytewise else d.send(wire)
    assert [c for c, _ in split_replies(out)] == expected
