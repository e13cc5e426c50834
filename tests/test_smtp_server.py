"""Unit tests of the pure SMTP core: commands, states, DATA, smuggling, limits, hooks."""

from __future__ import annotations

import pytest

from _smtp_util import Driver, split_replies
from pyqmail.smtp_server import (
    AuthRequested,
    AuthResponse,
    Close,
    DataChunk,
    Helo,
    MailFrom,
    MessageAborted,
    MessageComplete,
    ProtocolUsageError,
    RcptTo,
    Reply,
    ServerConfig,
    SMTPServer,
    State,
    parse_params,
    parse_path,
)

TXN = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"


def helo_session(**kw: object) -> Driver:
    d = Driver.make(**kw)
    d.send(b"HELO client.test\r\n")
    return d


# -- greeting, HELO, EHLO ----------------------------------------------------------------


def test_greeting_and_helo_are_qmails() -> None:
    d = Driver.make()
    assert d.srv.outgoing() == b"220 mx.example.test ESMTP\r\n"
    assert d.send(b"HELO client.test\r\n") == b"250 mx.example.test\r\n"
    assert d.srv.helo == "client.test"
    assert Helo("client.test", False) in d.events


def test_ehlo_lists_extensions() -> None:
    d = Driver.make(databytes=12345)
    d.srv.outgoing()
    out = d.send(b"EHLO client.test\r\n")
    assert out == (
        b"250-mx.example.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 12345\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
    )


def test_ehlo_without_optional_extensions() -> None:
    d = Driver.make(enhanced_status_codes=False, smtputf8=False)
    d.srv.outgoing()
    replies = split_replies(d.send(b"ehlo x\r\n"))
    assert replies == [(250, ["mx.example.test", "PIPELINING", "8BITMIME", "SIZE 0"])]
    # without ENHANCEDSTATUSCODES the replies stay qmail's even after EHLO
    assert d.send(b"RCPT TO:<x@y>\r\n") == b"503 MAIL first (#5.5.1)\r\n"


def test_helo_replies_have_no_enhanced_codes() -> None:
    d = helo_session()
    assert d.send(b"RCPT TO:<x@y>\r\n") == b"503 MAIL first (#5.5.1)\r\n"
    assert d.send(b"DATA\r\n") == b"503 MAIL first (#5.5.1)\r\n"
    assert d.send(b"MAIL FROM:<a@b>\r\n") == b"250 ok\r\n"
    assert d.send(b"DATA\r\n") == b"503 RCPT first (#5.5.1)\r\n"
    assert d.send(b"RSET\r\n") == b"250 flushed\r\n"
    assert d.send(b"NOOP\r\n") == b"250 ok\r\n"
    assert d.send(b"VRFY root\r\n") == b"252 send some mail, i'll try my best\r\n"
    assert d.send(b"HELP\r\n").startswith(b"214 ")
    assert d.send(b"EXPN list\r\n") == b"502 unimplemented (#5.5.1)\r\n"
    assert d.send(b"\r\n") == b"502 unimplemented (#5.5.1)\r\n"
    assert d.send(b"STARTTLS\r\n") == b"502 unimplemented (#5.5.1)\r\n"
    assert d.send(b"AUTH PLAIN\r\n") == b"502 unimplemented (#5.5.1)\r\n"
    assert d.send(b"BDAT 10 LAST\r\n") == b"502 unimplemented (#5.5.1)\r\n"


def test_ehlo_replies_carry_enhanced_codes() -> None:
    d = Driver.make()
    d.send(b"EHLO client.test\r\n")
    assert d.send(b"RCPT TO:<x@y>\r\n") == b"503 5.5.1 MAIL first (#5.5.1)\r\n"
    assert d.send(b"MAIL FROM:<a@b>\r\n") == b"250 2.1.0 ok\r\n"
    assert d.send(b"RCPT TO:<x@y>\r\n") == b"250 2.1.5 ok\r\n"
    assert d.send(b"VRFY x\r\n") == b"252 2.1.5 send some mail, i'll try my best\r\n"
    assert d.send(b"DATA\r\n") == b"354 go ahead\r\n"
    assert d.send(b".\r\n") == b"250 2.6.0 ok 1 qp 2\r\n"
    assert d.send(b"QUIT\r\n") == b"221 2.0.0 mx.example.test\r\n"


def test_quit_closes_cleanly_and_ignores_the_rest() -> None:
    d = Driver.make()
    d.srv.outgoing()
    assert d.send(b"QUIT\r\nNOOP\r\n") == b"221 mx.example.test\r\n"
    assert d.closes() == [Close("quit", True)]
    assert d.srv.closed
    assert d.send(b"NOOP\r\n") == b""


def test_verbs_are_case_insensitive_and_tab_is_not_a_separator() -> None:
    d = helo_session()
    assert d.send(b"nOoP\r\n") == b"250 ok\r\n"
    assert d.send(b"NOOP\tx\r\n") == b"502 unimplemented (#5.5.1)\r\n"


def test_bare_lf_ends_a_command_line() -> None:
    d = helo_session()
    assert d.send(b"NOOP\nNOOP\r\n") == b"250 ok\r\n250 ok\r\n"


@pytest.mark.parametrize("line", [b"NOOP\0x\r\n", b"NOOP\rQUIT\r\n", b"NOOP\r\r\n"])
def test_nul_or_bare_cr_in_a_command_is_refused(line: bytes) -> None:
    d = helo_session()
    assert d.send(line) == b"500 command contains a NUL or a bare CR (#5.5.2)\r\n"
    assert not d.srv.closed
    assert d.send(b"NOOP\r\n") == b"250 ok\r\n"


# -- transactions ------------------------------------------------------------------------


def test_no_helo_needed_and_envelope_is_kept() -> None:
    d = Driver.make()
    d.srv.outgoing()
    d.send(TXN + b"hello\r\n.\r\n")
    assert d.messages == [b"hello\n"]
    assert d.envelopes == [("a@b.test", ("u@example.test",))]


def test_mail_restarts_the_transaction() -> None:
    d = helo_session()
    d.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n")
    assert d.send(b"MAIL FROM:<c@d>\r\n") == b"250 ok\r\n"
    assert d.srv.recipients == []
    assert d.send(b"DATA\r\n") == b"503 RCPT first (#5.5.1)\r\n"


def test_strict_mail_refuses_nested_mail() -> None:
    d = helo_session(strict_mail=True)
    d.send(b"MAIL FROM:<a@b>\r\n")
    assert d.send(b"MAIL FROM:<c@d>\r\n") == b"503 nested MAIL command (#5.5.1)\r\n"
    assert d.srv.sender == "a@b"


@pytest.mark.parametrize("cmd", [b"RSET", b"HELO again", b"EHLO again"])
def test_rset_and_helo_end_the_transaction(cmd: bytes) -> None:
    d = helo_session()
    d.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n")
    d.send(cmd + b"\r\n")
    assert d.srv.sender is None and d.srv.recipients == []
    assert split_replies(d.send(b"DATA\r\n"))[0][1][-1].endswith("MAIL first (#5.5.1)")


def test_rejected_rcpt_is_not_stored() -> None:
    d = helo_session()
    d.reject_rcpt = {"bad@example.test"}
    out = d.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<bad@example.test>\r\nDATA\r\n")
    assert out == b"250 ok\r\n553 not here (#5.7.1)\r\n503 RCPT first (#5.5.1)\r\n"


def test_decision_values_replace_addresses() -> None:
    srv = SMTPServer(ServerConfig(greeting="g"))
    srv.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n")
    ev = srv.next_event()
    assert isinstance(ev, MailFrom)
    srv.accept("rewritten@b")
    ev = srv.next_event()
    assert isinstance(ev, RcptTo)
    srv.accept("x@y@fixme")
    assert srv.sender == "rewritten@b" and srv.recipients == ["x@y@fixme"]


def test_unanswered_decision_is_a_usage_error() -> None:
    srv = SMTPServer(ServerConfig(greeting="g"))
    srv.feed(b"MAIL FROM:<a@b>\r\nNOOP\r\n")
    assert isinstance(srv.next_event(), MailFrom)
    assert isinstance(srv.waiting, MailFrom)
    with pytest.raises(ProtocolUsageError):
        srv.next_event()
    with pytest.raises(ProtocolUsageError):
        srv.auth_success("x")


def test_recipient_cap_gives_452() -> None:
    d = helo_session(max_recipients=3)
    d.send(b"MAIL FROM:<a@b>\r\n")
    codes = d.codes(b"".join(b"RCPT TO:<u%d@x>\r\n" % i for i in range(5)))
    assert codes == [250, 250, 250, 452, 452]
    assert len(d.srv.recipients) == 3


def test_default_recipient_cap_is_100() -> None:
    d = helo_session()
    d.send(b"MAIL FROM:<a@b>\r\n")
    codes = d.codes(b"".join(b"RCPT TO:<u%d@x>\r\n" % i for i in range(101)))
    assert codes.count(250) == 100 and codes[-1] == 452


# -- addresses and parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    "arg,address,rest",
    [
        (b"FROM:<a@b>", b"a@b", b""),
        (b"FROM:<>", b"", b""),
        (b"FROM: <a@b> SIZE=10", b"a@b", b" SIZE=10"),
        (b"FROM:a@b SIZE=10", b"a@b", b"SIZE=10"),
        (b"FROM:   a@b", b"a@b", b""),
        (b"", b"", b""),
        (b"xyz<a@b>", b"a@b", b""),
        (b"TO:<@relay.test,@other.test:u@c.test>", b"u@c.test", b""),
        (b'TO:<"a b"@c>', b"a b@c", b""),
        (b'TO:<"x@y"@z>', b"x@y@z", b""),
        (b'TO:<"a>b"@c>', b"a>b@c", b""),
        (b"TO:<a\\>b@c>", b"a>b@c", b""),
        (b"TO:<a@b", b"a@b", b""),
    ],
)
def test_parse_path(arg: bytes, address: bytes, rest: bytes) -> None:
    assert parse_path(arg) == (address, rest)


def test_parse_params() -> None:
    assert parse_params(b" SIZE=10  body=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    assert parse_params(b"=x") is None
    assert parse_params(b"A\x01=1") is None


def test_overlong_address_is_a_syntax_error() -> None:
    d = helo_session()
    assert d.send(b"MAIL FROM:<" + b"a" * 901 + b">\r\n") == b"555 syntax error (#5.5.4)\r\n"
    assert d.srv.sender is None
    assert d.send(b"MAIL FROM:<" + b"a" * 900 + b">\r\n") == b"250 ok\r\n"
    assert d.send(b"RCPT TO:<" + b"b" * 901 + b">\r\n") == b"555 syntax error (#5.5.4)\r\n"


def test_mail_parameters() -> None:
    d = helo_session(databytes=1000)
    assert d.send(b"MAIL FROM:<a@b> SIZE=1001\r\n") == (
        b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    )
    assert d.send(b"MAIL FROM:<a@b> SIZE=abc\r\n") == b"501 bad SIZE parameter (#5.5.4)\r\n"
    assert d.send(b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n") == (
        b"501 bad BODY parameter (#5.5.4)\r\n"
    )
    assert d.send(b"MAIL FROM:<a@b> RET=HDRS\r\n") == b"555 unsupported MAIL parameter (#5.5.4)\r\n"
    assert d.srv.sender is None
    out = d.send(b"MAIL FROM:<a@b> SIZE=1000 BODY=7bit AUTH=<>\r\n")
    assert out == b"250 ok\r\n"
    assert d.send(b"RCPT TO:<x@y> NOTIFY=NEVER\r\n") == (
        b"555 unsupported RCPT parameter (#5.5.4)\r\n"
    )


def test_smtputf8_addresses() -> None:
    d = helo_session()
    u = "jös@exämple.test".encode()
    assert d.send(b"MAIL FROM:<" + u + b">\r\n").startswith(b"553 ")
    assert d.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<" + u + b">\r\n") == (
        b"250 ok\r\n553 sorry, non-ASCII address without SMTPUTF8 (#5.6.7)\r\n"
    )
    assert d.send(b"MAIL FROM:<" + u + b"> SMTPUTF8\r\nRCPT TO:<" + u + b">\r\n") == (
        b"250 ok\r\n250 ok\r\n"
    )
    assert d.srv.smtputf8
    assert d.srv.sender == "jös@exämple.test"
    assert d.send(b"MAIL FROM:<a@b> SMTPUTF8=yes\r\n").startswith(b"501 ")


# -- pipelining ----------------------------------------------------------------------------


def test_pipelined_batch_gets_all_replies_in_order() -> None:
    d = Driver.make()
    d.srv.outgoing()
    batch = (
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n"
        b"Subject: s\r\n\r\nbody\r\n.\r\nMAIL FROM:<c@d>\r\nRCPT TO:<q@y>\r\nRSET\r\nQUIT\r\n"
    )
    replies = split_replies(d.send(batch))
    assert [c for c, _ in replies] == [250, 250, 250, 250, 354, 250, 250, 250, 250, 221]
    assert d.messages == [b"Subject: s\n\nbody\n"]
    assert d.envelopes == [("a@b", ("x@y", "z@y"))]


def test_processing_stops_at_a_decision() -> None:
    srv = SMTPServer(ServerConfig(greeting="g"))
    srv.outgoing()
    srv.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nNOOP\r\n")
    assert isinstance(srv.next_event(), MailFrom)
    assert srv.buffered == len(b"RCPT TO:<x@y>\r\nNOOP\r\n")
    assert srv.outgoing() == b""
    srv.respond(Reply.of(451, "try later (#4.3.0)"))
    assert srv.next_event() is None  # RCPT now has no MAIL, NOOP needs no decision
    assert srv.outgoing() == b"451 try later (#4.3.0)\r\n503 MAIL first (#5.5.1)\r\n250 ok\r\n"


def test_bytewise_and_whole_feeding_agree() -> None:
    session = TXN + b"a\r\n..b\r\n.\r\n\r\nc\r\n.\r\nQUIT\r\n"
    whole = Driver.make()
    out_whole = whole.send(session)
    single = Driver.make()
    out_single = single.send_bytewise(session)
    assert out_whole == out_single
    assert whole.messages == single.messages == [b"a\n.b\n"]


# -- DATA ------------------------------------------------------------------------------------


def test_data_unstuffing_and_line_ends() -> None:
    d = helo_session()
    d.send(TXN)
    out = d.send(b"..leading\r\n...two\r\n.x\r\nplain\r\n\r\n.\r\n")
    assert out == b"250 ok 1 qp 2\r\n"
    assert d.messages == [b".leading\n..two\nx\nplain\n\n"]


def test_body_runs_stop_at_dot_lines_in_the_same_read() -> None:
    # after the header, runs of plain lines are taken whole; each run must end
    # where a line starts with a dot, whether stuffed, the end of data or smuggled
    body = b"".join(b"%d plain line\r\n" % i for i in range(50))
    d = helo_session()
    d.send(TXN)
    out = d.send(b"H: v\r\n\r\n" + body + b"..stuffed\r\n" + body + b".\r\nNOOP\r\n")
    assert out == b"250 ok 1 qp 2\r\n250 ok\r\n"
    plain = body.replace(b"\r\n", b"\n")
    assert d.messages == [b"H: v\n\n" + plain + b".stuffed\n" + plain]
    d2 = helo_session()
    d2.send(TXN)
    out = d2.send(b"H: v\r\n\r\n" + body + b"x\n.\r\n" + body + b".\r\n")
    assert out.startswith(b"451 ")  # the bare LF before the dot is refused, not an end
    assert d2.messages == []


def test_empty_message_right_after_354() -> None:
    d = helo_session()
    d.send(TXN)
    d.send(b".\r\n")
    assert d.messages == [b""]


def test_nul_bytes_are_data() -> None:
    d = helo_session()
    d.send(TXN)
    d.send(b"a\0b\r\n\0\r\n.\r\n")
    assert d.messages == [b"a\0b\n\0\n"]


def test_dot_in_the_middle_of_a_line_is_data() -> None:
    d = helo_session()
    d.send(TXN)
    d.send(b"x.\r\n.y.\r\n a\r\n. \r\n.\r\n")
    assert d.messages == [b"x.\ny.\n a\n \n"]


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\n..\n",
    b"\r\r\n.\r\n",
]


@pytest.mark.parametrize("marker", SMUGGLING)
def test_smuggling_variants_never_end_data(marker: bytes) -> None:
    d = helo_session()
    d.send(TXN + b"Subject: first\r\n\r\nbody")
    out = d.send(marker + b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\n")
    assert out == b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
    assert d.messages == []
    assert not any(isinstance(e, MessageComplete) for e in d.events)
    assert sum(isinstance(e, MailFrom) for e in d.events) == 1  # the forged MAIL never ran
    assert d.srv.closed and d.closes()[0].clean is False
    assert d.send(b"QUIT\r\n") == b""


@pytest.mark.parametrize("marker", SMUGGLING)
def test_smuggling_variants_split_across_reads(marker: bytes) -> None:
    d = helo_session()
    d.send(TXN + b"body")
    out = d.send_bytewise(marker + b"NOOP\r\n.\r\n")
    assert out == b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
    assert d.messages == [] and d.srv.closed


def test_bare_lf_right_after_354() -> None:
    d = helo_session()
    d.send(TXN)
    assert d.send(b".\n").startswith(b"451 ")
    assert d.srv.closed


def test_enhanced_code_on_smtplf_reply() -> None:
    d = Driver.make()
    d.send(b"EHLO x\r\n" + TXN)
    assert d.send(b"a\nb\r\n.\r\n") == b"451 4.6.0 See https://cr.yp.to/docs/smtplf.html.\r\n"


def test_text_line_limit() -> None:
    d = helo_session()
    d.send(TXN)
    ok = b"x" * 998 + b"\r\n"  # 1000 bytes with CRLF: the RFC's limit
    assert d.send(ok + b".\r\n") == b"250 ok 1 qp 2\r\n"
    assert d.messages == [b"x" * 998 + b"\n"]
    d.send(TXN)
    out = d.send(b"y" * 999 + b"\r\nmore\r\n.\r\nNOOP\r\n")
    assert out == (b"554 message contains a line longer than 1000 bytes (#5.6.0)\r\n250 ok\r\n")
    assert len(d.messages) == 1
    assert any(isinstance(e, MessageAborted) for e in d.events)
    # a stuffing dot does not count towards the limit
    d.send(TXN)
    assert d.send(b"." + b"z" * 998 + b"\r\n.\r\n") == b"250 ok 1 qp 2\r\n"


def test_text_line_limit_can_be_turned_off() -> None:
    d = helo_session(text_line_max=0)
    d.send(TXN)
    big = b"q" * 200_000
    assert d.send(big + b"\r\n.\r\n") == b"250 ok 1 qp 2\r\n"
    assert d.messages == [big + b"\n"]


def test_long_data_line_is_streamed_not_buffered() -> None:
    d = helo_session(text_line_max=0)
    d.send(TXN)
    for _ in range(100):
        d.send(b"w" * 10_000)
        assert d.srv.buffered <= 2
    d.send(b"\r\n.\r\n")
    assert d.messages == [b"w" * 1_000_000 + b"\n"]


def test_databytes_refuses_after_the_dot_and_stops_streaming() -> None:
    d = helo_session(databytes=100)
    d.send(TXN)
    chunks: list[bytes] = []
    out = d.send(b"0123456789\r\n" * 20 + b".\r\n")
    chunks = [e.data for e in d.events if isinstance(e, DataChunk)]
    assert out == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    assert sum(len(c) for c in chunks) <= 100
    assert d.messages == []
    # the session goes on
    d.send(TXN)
    assert d.send(b"small\r\n.\r\n") == b"250 ok 1 qp 2\r\n"


def test_databytes_counts_stored_bytes() -> None:
    d = helo_session(databytes=6)
    d.send(TXN)
    assert d.send(b"..ab\r\nc\r\n.\r\n") == b"250 ok 1 qp 2\r\n"  # ".ab\nc\n" = 6 bytes
    d.send(TXN)
    assert d.send(b"..abc\r\nc\r\n.\r\n").startswith(b"552 ")


def hops_message(n: int, name: bytes = b"Received") -> bytes:
    return b"".join(name + b": from x%d\r\n" % i for i in range(n)) + b"\r\nbody\r\n.\r\n"


def test_hop_limit() -> None:
    d = helo_session()
    d.send(TXN)
    assert d.send(hops_message(99)) == b"250 ok 1 qp 2\r\n"
    d.send(TXN)
    assert d.send(hops_message(100)) == b"554 too many hops, this message is looping (#5.4.6)\r\n"
    d.send(TXN)
    assert d.send(hops_message(100, b"DELIVERED-TO")).startswith(b"554 too many hops")
    # Received lines in the body do not count
    d.send(TXN)
    body = b"Subject: x\r\n\r\n" + b"Received: y\r\n" * 150 + b".\r\n"
    assert d.send(body) == b"250 ok 1 qp 2\r\n"


def test_huge_header_block_costs_no_memory() -> None:
    d = helo_session()
    d.send(TXN)
    line = b"X-Flood: " + b"f" * 80 + b"\r\n"
    for _ in range(2000):
        d.send(line * 50)
        assert d.srv.buffered < 100
    assert d.send(b"\r\nbody\r\n.\r\n") == b"250 ok 1 qp 2\r\n"
    assert len(d.messages[0]) == 100_000 * (len(line) - 1) + len(b"\nbody\n")


# -- limits on command lines -------------------------------------------------------------


def test_overlong_command_line_is_refused_and_discarded() -> None:
    d = helo_session()
    assert d.send(b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n") == (
        b"500 line too long (#5.5.2)\r\n250 ok\r\n"
    )


def test_endless_command_line_is_never_buffered() -> None:
    d = helo_session()
    for _ in range(1000):
        assert d.send(b"y" * 10_000) == b""
        assert d.srv.buffered < 2048
    assert d.send(b"\r\nNOOP\r\n") == b"500 line too long (#5.5.2)\r\n250 ok\r\n"


def test_command_line_at_the_limit_is_accepted() -> None:
    d = helo_session(command_line_max=20)
    assert d.send(b"NOOP " + b"a" * 13 + b"\r\n") == b"250 ok\r\n"  # 20 bytes
    assert d.send(b"NOOP " + b"a" * 14 + b"\r\n") == b"500 line too long (#5.5.2)\r\n"


# -- end of input ------------------------------------------------------------------------


def test_eof_in_data_closes_without_a_message() -> None:
    d = helo_session()
    d.send(TXN + b"partial\r\n")
    d.srv.eof()
    d.pump()
    assert d.messages == []
    assert d.closes() == [Close("client closed the connection in DATA", False)]


def test_eof_processes_what_was_buffered_first() -> None:
    d = helo_session()
    d.srv.feed(b"NOOP\r\n")
    d.srv.eof()
    d.pump()
    assert d.srv.outgoing() == b"250 ok\r\n"
    assert d.srv.closed


# -- STARTTLS and AUTH hooks -------------------------------------------------------------


def test_starttls_flow() -> None:
    d = Driver.make(starttls=True)
    out = split_replies(d.send(b"EHLO c\r\n"))
    assert "STARTTLS" in out[-1][1]
    assert d.send(b"STARTTLS now\r\n") == (
        b"501 5.5.4 Syntax error (no parameters allowed) (#5.5.4)\r\n"
    )
    d.send(b"MAIL FROM:<a@b>\r\n")
    assert d.send(b"STARTTLS\r\n") == b"220 ready for tls\r\n"
    assert d.srv.state is State.TLS_WAIT
    assert d.srv.next_event() is None
    d.srv.tls_started()
    assert d.srv.helo is None and d.srv.sender is None and d.srv.tls_active
    out = split_replies(d.send(b"EHLO c\r\n"))
    assert "STARTTLS" not in out[-1][1]
    assert d.send(b"STARTTLS\r\n") == b"503 5.5.1 TLS already active (#5.5.1)\r\n"


def test_starttls_with_pipelined_plaintext_closes() -> None:
    d = Driver.make(starttls=True)
    d.send(b"EHLO c\r\n")
    out = d.send(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n")
    assert out == b""  # no 220: the injected command is never read as if it came over TLS
    assert d.srv.closed
    assert not any(isinstance(e, MailFrom) for e in d.events)


def test_plaintext_while_waiting_for_tls_closes() -> None:
    d = Driver.make(starttls=True)
    d.send(b"EHLO c\r\nSTARTTLS\r\n")
    d.send(b"RSET\r\n")
    assert d.srv.closed
    with pytest.raises(ProtocolUsageError):
        d.srv.tls_started()


def test_starttls_refused_by_io_layer() -> None:
    srv = SMTPServer(ServerConfig(greeting="g", starttls=True))
    srv.outgoing()
    srv.feed(b"STARTTLS\r\n")
    srv.next_event()
    srv.respond(Reply.of(454, "TLS not available (#4.3.0)"))
    assert srv.state is State.COMMAND
    assert srv.outgoing() == b"454 TLS not available (#4.3.0)\r\n"


def test_auth_needs_tls_unless_allowed() -> None:
    d = Driver.make(auth_mechanisms=("PLAIN", "LOGIN"))
    out = split_replies(d.send(b"EHLO c\r\n"))
    assert not any(line.startswith("AUTH") for line in out[-1][1])
    assert d.send(b"AUTH PLAIN\r\n").startswith(b"538 ")


def test_auth_exchange_hooks() -> None:
    d = Driver.make(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True, auth_required=True)
    ehlo = split_replies(d.send(b"EHLO c\r\n"))
    assert "AUTH PLAIN LOGIN" in ehlo[-1][1]
    assert d.send(b"MAIL FROM:<a@b>\r\n") == b"530 5.7.0 authentication required (#5.7.0)\r\n"
    assert d.send(b"AUTH CRAM-MD5\r\n") == b"504 5.5.4 auth type unimplemented (#5.5.4)\r\n"
    assert d.send(b"AUTH login\r\n") == b"334 \r\n"
    assert d.srv.state is State.AUTH
    assert d.send(b"*\r\n") == b"501 5.0.0 auth exchange canceled (#5.0.0)\r\n"
    assert d.send(b"AUTH LOGIN\r\ndXNlcg==\r\n") == b"334 \r\n235 2.7.0 ok, go ahead (#2.7.0)\r\n"
    assert d.srv.authenticated == "user"
    assert [type(e) for e in d.events if isinstance(e, (AuthRequested, AuthResponse))] == [
        AuthRequested,
        AuthRequested,
        AuthResponse,
    ]
    assert d.send(b"AUTH PLAIN\r\n") == b"503 5.5.1 you're already authenticated (#5.5.1)\r\n"
    assert d.send(b"MAIL FROM:<a@b>\r\n") == b"250 2.1.0 ok\r\n"


def test_auth_response_line_limit() -> None:
    d = Driver.make(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    d.send(b"EHLO c\r\nAUTH PLAIN\r\n")
    assert d.send(b"A" * 12000 + b"\r\n").endswith(b"235 2.7.0 ok, go ahead (#2.7.0)\r\n")
    d2 = Driver.make(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    d2.send(b"EHLO c\r\nAUTH PLAIN\r\n")
    assert d2.send(b"A" * 13000 + b"\r\nNOOP\r\n") == (
        b"500 5.5.2 line too long (#5.5.2)\r\n250 2.0.0 ok\r\n"
    )


# -- replies ---------------------------------------------------------------------------


def test_reply_rendering() -> None:
    r = Reply(250, ("first", "second"), "2.0.0")
    assert r.render(False) == b"250-first\r\n250 second\r\n"
    assert r.render(True) == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"
    assert Reply.of(451, "qq write error or disk full (#4.3.0)").render(True) == (
        b"451 4.3.0 qq write error or disk full (#4.3.0)\r\n"
    )
    assert Reply.of(554, "no suffix").render(True) == b"554 5.0.0 no suffix\r\n"
    assert Reply.of(354, "go ahead").render(True) == b"354 go ahead\r\n"
    # a suffix whose class disagrees with the code is not trusted
    assert Reply.of(451, "odd (#5.1.1)").render(True) == b"451 4.0.0 odd (#5.1.1)\r\n"
