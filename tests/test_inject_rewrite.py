"""qmail-inject's header and address rewriting, through the pure inject_message() function."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.addr822 import Kind, ParseError, Token, address_list, tokenize, unparse, unquote
from pyqmail.control import write_control
from pyqmail.inject import (
    RECIP_ARGS,
    RECIP_BOTH,
    RECIP_DEFAULT,
    RECIP_HEADER,
    InjectArgs,
    InjectControls,
    InjectFatal,
    Injection,
    UsageError,
    inject_message,
    parse_args,
    print_form,
    split_header,
)

CONTROLS = InjectControls(
    defaultdomain="example.test",
    defaulthost="mx.example.test",
    plusdomain="berkeley.test",
    idhost="id.example.test",
)
NOW = calendar.timegm((1995, 9, 26, 4, 46, 54))
PID = 12345
DATE = "Date: 26 Sep 1995 04:46:54 -0000\n"
MSGID = "Message-ID: <19950926044654.12345.qmail@id.example.test>\n"
ENV = {"USER": "alice"}


def inject(
    raw: bytes | str,
    *argv: str,
    env: dict[str, str] | None = None,
    controls: InjectControls = CONTROLS,
) -> Injection:
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    return inject_message(
        data, parse_args(list(argv)), ENV if env is None else env, controls, now=NOW, pid=PID
    )


def header_of(result: Injection) -> str:
    head, _, _ = result.message.partition(b"\n\n")
    return head.decode("utf-8", "surrogateescape") + "\n"


def field(result: Injection, name: str) -> str:
    """The one field called `name` (continuations included), from the generated message."""
    found = [f for f in split_header(result.message)[0] if f.lower().startswith(name.lower() + ":")]
    assert len(found) == 1, found
    return found[0]


# -- addresses (§9.3) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "envelope"),
    [
        ("joe", "joe@mx.example.test"),
        ("djb@silverton", "djb@silverton.example.test"),
        ("eric@mammoth.cs+", "eric@mammoth.cs.berkeley.test"),
        ("eric@mammoth+", "eric@mammoth.berkeley.test"),
        ("joe@host.test.", "joe@host.test"),
        ("joe@", "joe@mx.example.test"),
        ("joe@[10.1.2.3]", "joe@[10.1.2.3]"),
        ("joe@[]", "joe@[]"),
        ("<@a.test,@b.test:user@host.test>", "user@host.test"),
        ("<@a.test:joe>", "joe@mx.example.test"),
        ('"joe smith"@host.test', "joe smith@host.test"),
        ("Joe.Q.Public@Host.Test", "Joe.Q.Public@Host.Test"),
    ],
)
def test_header_address_rewriting(written: str, envelope: str) -> None:
    result = inject(f"To: {written}\n\nbody\n")
    assert result.recipients == [envelope]


def test_empty_and_routed_to_nothing_addresses_add_no_recipient() -> None:
    result = inject("To: <>, <@route.test:>, x\n\n")
    assert result.recipients == ["x@mx.example.test"]
    assert field(result, "To") == "To: <>, <>, x@mx.example.test\n"


def test_plus_on_the_default_host() -> None:
    controls = InjectControls("example.test", "mammoth+", "berkeley.test", "id.example.test")
    assert inject("To: joe\n\n", controls=controls).recipients == ["joe@mammoth.berkeley.test"]


def test_literal_host_gets_no_default_domain() -> None:
    # a dotless literal is still a complete host
    assert inject("To: joe@[ipv6]\n\n").recipients == ["joe@[ipv6]"]


# -- field re-emission -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "written"),
    [
        ("To: joe, fred", "To: joe@mx.example.test, fred@mx.example.test\n"),
        # two words with nothing between them are two addresses
        ("To: djb fred", "To: djb@mx.example.test, fred@mx.example.test\n"),
        ("To: Dan Bernstein <djb>", "To: Dan Bernstein <djb@mx.example.test>\n"),
        ("To: John Q. Public <jqp@x.test>", "To: John Q.Public <jqp@x.test>\n"),
        ("To: joe@x.test (Joe (the) Bloggs)", "To: joe@x.test (Joe the Bloggs)\n"),
        ("To: (Joe) joe@x.test", "To: joe@x.test (Joe)\n"),
        ('To: "Smith, J" <j@x.test>', 'To: "Smith, J" <j@x.test>\n'),
        ('To: "a\\"b" <j@x.test>', 'To: "a\\"b" <j@x.test>\n'),
        ("TO :   joe  @  x . test", "TO: joe@x.test\n"),
        ("To: undisclosed-recipients:;", "To: undisclosed-recipients: ;\n"),
        (
            "To: list: a, b;, c",
            "To: list: a@mx.example.test, b@mx.example.test;, c@mx.example.test\n",
        ),
        ("To:", "To:\n"),
    ],
)
def test_field_reemission(given: str, written: str) -> None:
    assert field(inject(given + "\n\n"), "To") == written


def test_long_lists_fold_after_commas_at_80_columns() -> None:
    names = [f"person{i:02d}@example{i:02d}.test" for i in range(8)]
    result = inject("To: " + ", ".join(names) + "\n\n")
    text = field(result, "To")
    assert text == (
        "To: person00@example00.test, person01@example01.test, person02@example02.test,\n"
        "  person03@example03.test, person04@example04.test, person05@example05.test,\n"
        "  person06@example06.test, person07@example07.test\n"
    )
    assert max(len(line) for line in text.splitlines()) <= 80
    assert result.recipients == names


def test_folding_limit_is_exact() -> None:
    # a joined line is kept while it is at most 78 characters long (qmail counts the break too)
    fits = "To: " + "a" * 57 + "@x.test, b@y.test\n"
    assert len(fits) - 1 == 78
    assert field(inject(fits + "\n"), "To") == fits
    over = "To: " + "a" * 58 + "@x.test, b@y.test\n"
    assert field(inject(over + "\n"), "To") == "To: " + "a" * 58 + "@x.test,\n  b@y.test\n"


def test_folded_input_is_refolded() -> None:
    result = inject("To: a@x.test,\n\tb@y.test\nSubject: s\n\n")
    assert field(result, "To") == "To: a@x.test, b@y.test\n"
    assert result.recipients == ["a@x.test", "b@y.test"]


@pytest.mark.parametrize(
    "line",
    [
        "To: joe@x.test>, b",
        "To: joe@x.test>",
        "To: (unclosed comment",
        'To: "unclosed quote',
        "To: joe@[1.2.3.4",
        "To: ) stray",
        "To: a: b",  # a colon outside a group
        "To: g: a;;",
        "From: joe@x.test ]",
        "Return-Path: a>",
    ],
)
def test_unparseable_address_fields_are_fatal(line: str) -> None:
    with pytest.raises(InjectFatal) as info:
        inject(line + "\nSubject: x\n\nbody\n")
    assert info.value.code == 100
    assert info.value.text == "unable to parse this line:\n" + line + "\n"


def test_unknown_fields_are_not_parsed() -> None:
    result = inject("X-Weird: <<(unbalanced\nSubject:  two  spaces \n\n")
    assert "X-Weird: <<(unbalanced\nSubject:  two  spaces \n" in header_of(result)


# -- generated fields (§9.4) -------------------------------------------------------------------


def test_minimal_message_gets_date_msgid_from_and_cc() -> None:
    result = inject("Subject: hello\n\nbody\n")
    assert result.message == (
        DATE.encode()
        + MSGID.encode()
        + b"From: alice@mx.example.test\n"
        + b"Cc: recipient list not shown: ;\n"
        + b"Subject: hello\n"
        + b"\nbody\n"
    )
    assert result.sender == "alice@mx.example.test"
    assert result.recipients == []


def test_present_fields_are_kept_and_not_added() -> None:
    raw = (
        "Date: Tue, 1 Jan 2030 00:00:00 +0000\n"
        "Message-ID: <own@x.test>\n"
        "From: Bob <bob@x.test>\n"
        "Cc: carol@x.test\n"
        "Subject: s\n\nb\n"
    )
    result = inject(raw)
    assert header_of(result) == raw.split("\n\n")[0] + "\n"


def test_to_alone_suppresses_the_cc_line() -> None:
    assert "recipient list not shown" not in header_of(inject("To: x@y.test\n\n"))


def test_generated_fields_come_first_in_order() -> None:
    head = header_of(inject("Subject: s\nTo: x@y.test\n\n"))
    assert head.startswith(DATE + MSGID + "From: alice@mx.example.test\nSubject: s\n")


def test_bcc_is_removed_but_receives() -> None:
    result = inject("To: a@x.test\nBcc: hidden@x.test, other\nSubject: s\n\nb\n")
    assert "Bcc" not in header_of(result)
    assert "hidden" not in result.message.decode()
    assert result.recipients == ["a@x.test", "hidden@x.test", "other@mx.example.test"]


def test_apparently_to_receives_and_stays() -> None:
    result = inject("Apparently-To: a\n\n")
    assert field(result, "Apparently-To") == "Apparently-To: a@mx.example.test\n"
    assert result.recipients == ["a@mx.example.test"]
    # Apparently-To is neither To nor Cc
    assert "Cc: recipient list not shown: ;\n" in header_of(result)


def test_return_path_becomes_sender_and_is_removed() -> None:
    result = inject("Return-Path: <bounces@lists.test>\nTo: x@y.test\n\nb\n")
    assert result.sender == "bounces@lists.test"
    assert b"Return-Path" not in result.message


def test_return_path_is_rewritten() -> None:
    assert inject("Return-Path: bob\n\n").sender == "bob@mx.example.test"


def test_empty_return_path_means_null_sender() -> None:
    assert inject("Return-Path: <>\nTo: x@y.test\n\n").sender == ""


def test_content_length_is_removed() -> None:
    result = inject("Content-Length: 5\nContent-length:9\nSubject: s\n\n12345")
    assert b"ontent-" not in result.message.lower().replace(b"content-type", b"")
    assert result.message.endswith(b"\n\n12345\n")


def test_sender_fields_are_rewritten() -> None:
    raw = (
        "From: joe\nSender: sam@host\nReply-To: r@lists+\nErrors-To: e\n"
        "Return-Receipt-To: rr\nSubject: x\n\n"
    )
    head = header_of(inject(raw))
    assert "From: joe@mx.example.test\n" in head
    assert "Sender: sam@host.example.test\n" in head
    assert "Reply-To: r@lists.berkeley.test\n" in head
    assert "Errors-To: e@mx.example.test\n" in head
    assert "Return-Receipt-To: rr@mx.example.test\n" in head


def test_field_names_are_case_insensitive() -> None:
    result = inject("to: a\nCC: b\nbcc: c\nDATE: whenever\nmessage-id: <m@x>\n\n")
    head = header_of(result)
    assert result.recipients == ["a@mx.example.test", "b@mx.example.test", "c@mx.example.test"]
    assert "bcc" not in head.lower()
    assert not head.startswith("Date:")
    assert "Message-ID: <1995" not in head


# -- header boundaries ---------------------------------------------------------------------------


def test_mbox_from_line_becomes_a_field() -> None:
    result = inject("From joe@x.test Sat Jan  3 01:05:34 1996\nTo: a@b.test\n\nbody\n")
    assert "MBOX-Line: From joe@x.test Sat Jan  3 01:05:34 1996\nTo: a@b.test\n" in header_of(
        result
    )


def test_first_non_field_line_starts_the_body_after_a_blank_line() -> None:
    result = inject("To: a@b.test\nthis is not a header\nmore\n")
    assert result.message.endswith(b"To: a@b.test\n\nthis is not a header\nmore\n")


def test_field_name_with_space_or_8bit_ends_the_header() -> None:
    result = inject("To: a@b.test\nBad Name: x\n\nrest\n")
    assert result.message.endswith(b"To: a@b.test\n\nBad Name: x\n\nrest\n")
    result = inject("To: a@b.test\nN\u00e4me: x\n")
    assert result.message.endswith("To: a@b.test\n\nN\u00e4me: x\n".encode())


def test_header_without_body() -> None:
    result = inject("To: a@b.test\nSubject: no body")
    assert result.message.endswith(b"To: a@b.test\nSubject: no body\n")
    assert b"\n\n" not in result.message


def test_empty_input() -> None:
    result = inject(b"")
    assert (
        result.message
        == (
            DATE + MSGID + "From: alice@mx.example.test\nCc: recipient list not shown: ;\n"
        ).encode()
    )


def test_body_passes_through_and_gets_a_final_newline() -> None:
    body = b"line 1\n\nFrom the body\n.\n\x00\xff binary\nlast"
    result = inject(b"Subject: s\n\n" + body)
    assert result.message.endswith(b"\n\n" + body + b"\n")


def test_crlf_input_is_stored_with_lf() -> None:
    result = inject(b"To: a@b.test\r\nSubject: s\r\n\r\nline\r\nline2\r\n")
    assert b"\r" not in result.message
    assert result.message.endswith(b"To: a@b.test\nSubject: s\n\nline\nline2\n")
    assert result.recipients == ["a@b.test"]


def test_continuation_lines_stay_with_their_field() -> None:
    result = inject("Subject: one\n two\n\tthree\nX-A: b\n\n")
    assert "Subject: one\n two\n\tthree\nX-A: b\n" in header_of(result)


def test_eight_bit_and_utf8_headers() -> None:
    raw = (
        "From: J\u00f6rg M\u00fcller <joerg@x.test>\n"
        "To: =?utf-8?q?R=C3=A9mi?= <remi@y.test>, \u0161t\u011bp\u00e1n@z.test\n"
        "Subject: gr\u00fc\u00dfe \U0001f600\n\nk\u00f6rper\n"
    )
    result = inject(raw)
    head = header_of(result)
    # words with 8-bit bytes are written back as quoted strings, bytes unchanged
    assert 'From: "J\u00f6rg" "M\u00fcller" <joerg@x.test>\n' in head
    assert "To: =?utf-8?q?R=C3=A9mi?= <remi@y.test>, " in head
    assert "Subject: gr\u00fc\u00dfe \U0001f600\n" in head
    assert result.recipients == ["remi@y.test", "\u0161t\u011bp\u00e1n@z.test"]
    assert result.message.endswith("\n\nk\u00f6rper\n".encode())


def test_latin1_bytes_survive() -> None:
    result = inject(b"Subject: caf\xe9\nTo: \xe9@x.test\n\n\xe9\n")
    assert b"Subject: caf\xe9\n" in result.message
    assert b'To: "\xe9"@x.test\n' in result.message
    assert result.recipients == ["\udce9@x.test"]  # undecodable bytes as surrogates, as os does


# -- Resent- messages ---------------------------------------------------------------------------


def test_resent_message_gets_resent_fields_only() -> None:
    raw = "Resent-To: newguy\nTo: old@x.test\nFrom: orig@x.test\nSubject: fwd\n\nb\n"
    result = inject(raw)
    assert header_of(result) == (
        "Resent-" + DATE + "Resent-" + MSGID + "Resent-From: alice@mx.example.test\n"
        "Resent-To: newguy@mx.example.test\n"
        "To: old@x.test\nFrom: orig@x.test\nSubject: fwd\n"
    )
    # only the Resent- recipients get it
    assert result.recipients == ["newguy@mx.example.test"]


@pytest.mark.parametrize(
    "marker",
    [
        "Resent-Sender: s@x.test",
        "Resent-From: f@x.test",
        "Resent-Reply-To: r@x.test",
        "Resent-Date: whenever",
        "Resent-Message-ID: <m@x.test>",
    ],
)
def test_any_resent_field_makes_it_resent(marker: str) -> None:
    result = inject(f"{marker}\nTo: old@x.test\n\n")
    head = header_of(result)
    assert "Resent-Cc: recipient list not shown: ;\n" in head
    assert not head.startswith("Date:")
    assert result.recipients == []


def test_resent_bcc_receives_and_is_removed() -> None:
    result = inject("Resent-Cc: a\nResent-Bcc: b@x.test\n\n")
    assert "Resent-Bcc" not in header_of(result)
    assert "Resent-Cc: recipient list" not in header_of(result)
    assert result.recipients == ["a@mx.example.test", "b@x.test"]


# -- recipient strategies and -f (§9.1) ------------------------------------------------------------


HEADER = "To: t@x.test\nCc: c@x.test\nBcc: b@x.test\n\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), ["t@x.test", "c@x.test", "b@x.test"]),
        (("arg1", "arg2@y.test"), ["arg1@mx.example.test", "arg2@y.test"]),
        (("-a", "arg1"), ["arg1@mx.example.test"]),
        (("-a",), []),
        (("-h", "arg1"), ["t@x.test", "c@x.test", "b@x.test"]),
        (("-H", "arg1"), ["arg1@mx.example.test", "t@x.test", "c@x.test", "b@x.test"]),
        (("-H",), ["t@x.test", "c@x.test", "b@x.test"]),
        (("-h", "-A", "arg1"), ["arg1@mx.example.test"]),
    ],
)
def test_recipient_strategies(argv: tuple[str, ...], expected: list[str]) -> None:
    assert inject(HEADER, *argv).recipients == expected


def test_recipients_are_not_deduplicated() -> None:
    assert inject("To: a@x.test, a@x.test\n\n", "-H", "a@x.test").recipients == ["a@x.test"] * 3


def test_argument_is_one_address_not_a_list() -> None:
    result = inject("", "a, b", "joe smith@x.test", "-leading@x.test")
    assert result.recipients == ["a, b@mx.example.test", "joe smith@x.test", "-leading@x.test"]


def test_unparseable_argument() -> None:
    with pytest.raises(InjectFatal) as info:
        inject("", "ok@x.test", "joe@[1.2")
    assert (info.value.code, info.value.text) == (100, "unable to parse address: joe@[1.2")


def test_header_mode_ignores_unparseable_arguments() -> None:
    assert inject("To: a@x.test\n\n", "-h", "joe@[1.2").recipients == ["a@x.test"]


@pytest.mark.parametrize(
    ("value", "sender"),
    [
        ("bob@x.test", "bob@x.test"),
        ("bob", "bob@mx.example.test"),
        ("bob@silverton", "bob@silverton.example.test"),
        ("", ""),
        ("<>", ""),
        ("<bob@x.test>", "bob@x.test"),
        ("joe smith@x.test", "joe smith@x.test"),
        ("list-@x.test-@[]", "list-@x.test-@[]"),
    ],
)
def test_dash_f_sets_the_sender(value: str, sender: str) -> None:
    result = inject("Return-Path: <rp@x.test>\n\n", "-f", value)
    assert result.sender == sender
    assert b"Return-Path" not in result.message


def test_dash_f_is_not_verped() -> None:
    assert inject("", "-fbob@x.test", env={"QMAILINJECT": "r"}).sender == "bob@x.test"


def test_dash_f_parse_error() -> None:
    with pytest.raises(InjectFatal) as info:
        inject("", "-f", "bob@[x")
    assert info.value.code == 100
    assert info.value.text.startswith("unable to parse this line:\n")


def test_print_form_adds_return_path() -> None:
    result = inject("Subject: s\n\n", "-n", "-f", "joe smith@x.test")
    assert print_form(result).startswith(b'Return-Path: <"joe smith"@x.test>\n' + DATE.encode())


# -- environment (§9.2) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "from_line", "sender"),
    [
        ({}, "From: anonymous@mx.example.test\n", "anonymous@mx.example.test"),
        ({"LOGNAME": "l"}, "From: l@mx.example.test\n", "l@mx.example.test"),
        ({"LOGNAME": "l", "USER": "u"}, "From: u@mx.example.test\n", "u@mx.example.test"),
        ({"USER": "u", "MAILUSER": "m"}, "From: m@mx.example.test\n", "m@mx.example.test"),
        ({"MAILUSER": "m", "QMAILUSER": "q"}, "From: q@mx.example.test\n", "q@mx.example.test"),
        ({"USER": "u", "MAILHOST": "mh.test"}, "From: u@mh.test\n", "u@mh.test"),
        ({"USER": "u", "QMAILHOST": "qh", "MAILHOST": "mh"}, "From: u@qh.example.test\n", None),
        ({"USER": "u", "NAME": "N Ame"}, 'From: "N Ame" <u@mx.example.test>\n', None),
        ({"USER": "u", "NAME": "n", "MAILNAME": "m"}, 'From: "m" <u@mx.example.test>\n', None),
        ({"USER": "u", "MAILNAME": "m", "QMAILNAME": "q"}, 'From: "q" <u@mx.example.test>\n', None),
        (
            {"USER": "u", "QMAILNAME": 'Q "x" \\y'},
            'From: "Q \\"x\\" \\\\y" <u@mx.example.test>\n',
            None,
        ),
        ({"USER": "joe smith"}, 'From: "joe smith"@mx.example.test\n', "joe smith@mx.example.test"),
        ({"USER": "u", "QMAILSUSER": "su"}, "From: u@mx.example.test\n", "su@mx.example.test"),
        ({"USER": "u", "QMAILSHOST": "sh.test"}, "From: u@mx.example.test\n", "u@sh.test"),
        ({"USER": "u", "QMAILHOST": "h.test"}, "From: u@h.test\n", "u@h.test"),
    ],
)
def test_default_from_and_sender(env: dict[str, str], from_line: str, sender: str | None) -> None:
    result = inject("Subject: s\n\n", env=env)
    assert field(result, "From") == from_line
    if sender is not None:
        assert result.sender == sender


def test_long_default_from_is_folded_like_other_fields() -> None:
    # the name is one quoted word, so there is no comma to break at
    name = "N" * 90
    assert field(inject("", env={"USER": "u", "NAME": name}), "From") == (
        f'From: "{name}" <u@mx.example.test>\n'
    )


def test_controls_from_environment(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "control").mkdir(parents=True)
    write_control(home, "me", ["me.test"])
    write_control(home, "defaulthost", ["dh.test"])
    env = {
        "USER": "u",
        "QMAILDEFAULTDOMAIN": "dd.test",
        "QMAILPLUSDOMAIN": "pd.test",
        "QMAILIDHOST": "ih.test",
    }
    controls = InjectControls.load(home, env)
    assert controls == InjectControls("dd.test", "dh.test", "pd.test", "ih.test")
    result = inject("To: a, b@c, d@e+\n\n", env=env, controls=controls)
    assert result.recipients == ["a@dh.test", "b@c.dd.test", "d@e.pd.test"]
    assert f"Message-ID: <19950926044654.{PID}.qmail@ih.test>\n" in header_of(result)
    env["QMAILDEFAULTHOST"] = "envhost.test"
    assert InjectControls.load(home, env).defaulthost == "envhost.test"


def test_controls_default_to_me_then_literal_names(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "control").mkdir(parents=True)
    assert InjectControls.load(home, {}) == InjectControls(
        "defaultdomain", "defaulthost", "plusdomain", "idhost"
    )
    write_control(home, "me", ["me.test"])
    write_control(home, "idhost", [""])  # empty counts as absent
    assert InjectControls.load(home, {}) == InjectControls(
        "me.test", "me.test", "me.test", "me.test"
    )


def test_unreadable_control_is_a_temporary_error(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "control" / "defaulthost").mkdir(parents=True)
    with pytest.raises(InjectFatal) as info:
        InjectControls.load(home, {})
    assert info.value.code == 111
    assert "defaulthost" in info.value.text


# -- QMAILINJECT letters -----------------------------------------------------------------------


def test_flag_c_uses_comment_style() -> None:
    env = {"USER": "u", "NAME": "Joe (J) Doe", "QMAILINJECT": "c"}
    assert field(inject("", env=env), "From") == "From: u@mx.example.test (Joe \\(J\\) Doe)\n"


def test_flag_c_without_name() -> None:
    assert field(inject("", env={"USER": "u", "QMAILINJECT": "c"}), "From") == (
        "From: u@mx.example.test\n"
    )


def test_flag_s_deletes_return_path_without_using_it() -> None:
    result = inject(
        "Return-Path: <rp@x.test>\nTo: a@x.test\n\n", env={"USER": "u", "QMAILINJECT": "s"}
    )
    assert result.sender == "u@mx.example.test"
    assert b"Return-Path" not in result.message


def test_flag_s_ignores_unparseable_return_path() -> None:
    result = inject("Return-Path: <<<\n\n", env={"USER": "u", "QMAILINJECT": "s"})
    assert result.sender == "u@mx.example.test"


def test_flag_f_replaces_from() -> None:
    result = inject("From: forged@x.test\nTo: a@x.test\n\n", env={"USER": "u", "QMAILINJECT": "f"})
    head = header_of(result)
    assert "forged" not in head
    assert "From: u@mx.example.test\n" in head


def test_flag_i_replaces_message_id() -> None:
    result = inject("Message-ID: <old@x.test>\n\n", env={"USER": "u", "QMAILINJECT": "i"})
    head = header_of(result)
    assert "old@x.test" not in head
    assert MSGID in head


def test_flag_r_verps_the_default_sender() -> None:
    assert inject("", env={"USER": "u", "QMAILINJECT": "r"}).sender == "u-@mx.example.test-@[]"


def test_flag_r_verps_return_path() -> None:
    env = {"USER": "u", "QMAILINJECT": "r"}
    assert inject("Return-Path: <l@x.test>\n\n", env=env).sender == "l@x.test-@[]"
    assert inject("Return-Path: <>\n\n", env=env).sender == ""


def test_flag_m_makes_a_per_message_sender() -> None:
    result = inject("", env={"USER": "u", "QMAILINJECT": "m"})
    assert result.sender == f"u-{NOW}.{PID}@mx.example.test"
    both = inject("", env={"USER": "u", "QMAILINJECT": "mr", "QMAILSHOST": "s.test"})
    assert both.sender == f"u-{NOW}.{PID}-@s.test-@[]"


def test_unknown_letters_are_ignored() -> None:
    assert inject("", env={"USER": "u", "QMAILINJECT": "xyzZ"}).sender == "u@mx.example.test"


# -- Mail-Followup-To -----------------------------------------------------------------------------


def mft_controls(*addresses: str) -> InjectControls:
    return InjectControls(
        CONTROLS.defaultdomain,
        CONTROLS.defaulthost,
        CONTROLS.plusdomain,
        CONTROLS.idhost,
        frozenset(a.lower() for a in addresses),
    )


def test_mail_followup_to_added_for_a_list() -> None:
    result = inject(
        'To: List@Lists.test, bob\nCc: "q s"@x.test\nSubject: s\n\n',
        controls=mft_controls("list@lists.test"),
    )
    assert field(result, "Mail-Followup-To") == (
        'Mail-Followup-To: List@Lists.test,\n  bob@mx.example.test,\n  "q s"@x.test\n'
    )
    assert header_of(result).index("Mail-Followup-To") < header_of(result).index("To: List")


def test_mail_followup_to_not_added_without_a_list_or_when_present() -> None:
    controls = mft_controls("list@lists.test")
    assert b"Mail-Followup-To" not in inject("To: other@x.test\n\n", controls=controls).message
    own = inject("To: list@lists.test\nMail-Followup-To: me@x.test\n\n", controls=controls)
    assert header_of(own).count("Mail-Followup-To") == 1
    # Bcc does not count
    assert b"Mail-Followup" not in inject("Bcc: list@lists.test\n\n", controls=controls).message


def test_mft_file_is_read_with_list_syntax(tmp_path: Path) -> None:
    path = tmp_path / "lists"
    path.write_text("# lists\n\nList@Lists.test  \n")
    controls = InjectControls.load(tmp_path, {"QMAILMFTFILE": str(path)})
    assert controls.mft == frozenset({"list@lists.test"})
    missing = InjectControls.load(tmp_path, {"QMAILMFTFILE": str(tmp_path / "none")})
    assert missing.mft is None
    with pytest.raises(InjectFatal) as info:
        InjectControls.load(tmp_path, {"QMAILMFTFILE": str(tmp_path)})
    assert info.value.code == 111


# -- command line parsing ------------------------------------------------------------------------


def test_parse_args_getopt_rules() -> None:
    args = parse_args(["-nH", "-fbob", "--", "-x", "y"])
    assert args == InjectArgs(
        strategy=RECIP_BOTH, queue=False, sender="bob", recipients=["-x", "y"]
    )
    args = parse_args(["-a", "-f", "s", "-N", "r1", "-h"])
    assert args == InjectArgs(strategy=RECIP_ARGS, queue=True, sender="s", recipients=["r1", "-h"])
    assert parse_args(["-h"]).strategy == RECIP_HEADER
    assert parse_args([]).strategy == RECIP_DEFAULT
    assert parse_args(["-", "x"]).recipients == ["-", "x"]
    with pytest.raises(UsageError):
        parse_args(["-q"])
    with pytest.raises(UsageError):
        parse_args(["-f"])


# -- the token layer directly ----------------------------------------------------------------------


def test_tokenize_kinds_and_escapes() -> None:
    tokens = tokenize('a\\,b "q\\"t" [l\\]x] (c (n) d) <>@.,;:')
    assert tokens[:4] == [
        Token(Kind.QUOTE, "a,b"),  # an escaped special makes it a quoted string
        Token(Kind.QUOTE, 'q"t'),
        Token(Kind.LITERAL, "l]x"),
        Token(Kind.COMMENT, "c n d"),
    ]
    assert [t.kind.value for t in tokens[4:]] == ["<", ">", "@", ".", ",", ";", ":"]
    # an atom with characters atoms may not hold becomes a quoted string
    assert tokenize("a)b") == [Token(Kind.QUOTE, "a)b")]
    with pytest.raises(ParseError):
        tokenize("]")


def test_unparse_and_unquote_round_trip() -> None:
    tokens = tokenize('To: "a b" <x@[1.2.3.4]> (c)')
    out = address_list(tokens, lambda addr: addr)
    # qmail puts no space between `>` and a comment
    assert unparse(out) == 'To: "a b" <x@[1.2.3.4]>(c)\n'
    assert unquote(tokenize('"a b"@[1.2.3.4] (c)')) == "a b@[1.2.3.4]"
    assert unparse([]) == "\n"


# -- properties ----------------------------------------------------------------------------------

_HEADERISH = st.text(alphabet=st.sampled_from(list('ab.@<>,;:()[]"\\ \t\n\u00e9-+')), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_input_is_queued_or_refused_cleanly(raw: bytes) -> None:
    try:
        result = inject(raw, "-H")
    except InjectFatal as e:
        assert e.code == 100
        return
    assert result.message.endswith(b"\n") or result.message == b""
    assert all("\0" not in r for r in result.recipients)


@settings(max_examples=300, deadline=None)
@given(_HEADERISH, st.sampled_from(["To", "From", "Reply-To", "Bcc", "Return-Path"]))
def test_any_address_field_is_refused_or_rewritten_to_a_valid_field(value: str, name: str) -> None:
    try:
        once = inject(f"{name}: {value}\n\n", "-h")
    except InjectFatal as e:
        assert e.code == 100 and e.text.startswith("unable to parse this line:\n")
        return
    fields = split_header(once.message)[0]
    for text in fields:
        assert text.endswith("\n")
        # every line after a field's first is a continuation, so the header stays intact
        assert all(line[:1] in (" ", "\t") for line in text[:-1].split("\n")[1:])
    # and what came out can go in again
    inject(("".join(fields) + "\n").encode("latin-1"), "-h")


_WORD = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
_DOTTED = st.lists(_WORD, min_size=1, max_size=3).map(".".join)
_ADDRESS = st.one_of(
    st.tuples(_DOTTED, st.one_of(st.none(), _DOTTED)).map(
        lambda t: t[0] if t[1] is None else f"{t[0]}@{t[1]}"
    ),
    st.tuples(st.text('ab "(', min_size=1, max_size=6), _DOTTED).map(
        lambda t: '"{}"@{}'.format(t[0].replace("\\", "\\\\").replace('"', '\\"'), t[1])
    ),
)
_MAILBOX = st.one_of(
    _ADDRESS,
    st.tuples(st.lists(_WORD, min_size=1, max_size=3), _ADDRESS).map(
        lambda t: " ".join(t[0]) + f" <{t[1]}>"
    ),
    st.tuples(_ADDRESS, _WORD).map(lambda t: f"{t[0]} ({t[1]})"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MAILBOX, min_size=1, max_size=12))
def test_rewritten_address_lists_are_a_fixed_point(mailboxes: list[str]) -> None:
    once = inject("To: " + ", ".join(mailboxes) + "\n\n")
    assert len(once.recipients) == len(mailboxes)
    fields = split_header(once.message)[0]
    again = inject(("".join(fields) + "\n").encode("latin-1"))
    assert split_header(again.message)[0] == fields
    assert again.recipients == once.recipients


def test_dotless_host_equal_to_defaultdomain_is_kept() -> None:
    from pyqmail.addr822 import tokenize, unparse
    from pyqmail.inject import InjectControls, Rewriter

    rw = Rewriter(
        InjectControls(defaultdomain="vm", defaulthost="vm", plusdomain="vm", idhost="vm")
    )
    assert unparse(rw(tokenize("bob@vm"))).strip() == "bob@vm"
    assert unparse(rw(tokenize("bob"))).strip() == "bob@vm"
    assert unparse(rw(tokenize("bob@other"))).strip() == "bob@other.vm"
