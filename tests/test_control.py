"""pyqmail.control: qmail's three control file kinds, me defaults, and refusal of broken files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyqmail.constants import SPAWN
from pyqmail.control import Control, ControlError, SendControls, domain_suffixes, write_control


def put(home: Path, name: str, data: bytes | str) -> Path:
    path = home / "control" / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A home with an empty control directory: every file absent."""
    (tmp_path / "control").mkdir()
    return tmp_path


# -- line files ---------------------------------------------------------------------------


def test_line_takes_first_line_only_and_strips_trailing_blanks(bare: Path) -> None:
    put(bare, "helohost", "  relay.example.test \t \nsecond line\n")
    assert Control(bare).line("helohost") == "  relay.example.test"


def test_line_without_final_newline(bare: Path) -> None:
    put(bare, "bouncefrom", "postmaster")
    assert Control(bare).line("bouncefrom") == "postmaster"


def test_line_strips_cr_of_a_crlf_file(bare: Path) -> None:
    put(bare, "me", "mx.example.test\r\n")
    assert Control(bare).line("me") == "mx.example.test"


def test_line_absent_is_none_and_empty_file_is_empty(bare: Path) -> None:
    c = Control(bare)
    assert c.line("helohost") is None
    put(bare, "helohost", "")
    assert c.line("helohost") == ""
    put(bare, "helohost", "\n\nlater\n")
    assert c.line("helohost") == ""


def test_exists_only_for_regular_files(bare: Path) -> None:
    c = Control(bare)
    assert not c.exists("locals")
    (bare / "control" / "locals").mkdir()
    assert not c.exists("locals")
    put(bare, "me", "x\n")
    assert c.exists("me")


# -- integer files ------------------------------------------------------------------------


def test_integer_value_and_default(bare: Path) -> None:
    c = Control(bare)
    assert c.integer("concurrencyremote", 20) == 20
    put(bare, "concurrencyremote", "55\n")
    assert c.integer("concurrencyremote", 20) == 55
    put(bare, "concurrencyremote", " 7 \t\n# not read\n")
    assert c.integer("concurrencyremote", 20) == 7


@pytest.mark.parametrize("text", ["abc\n", "-5\n", "12abc\n", "1.5\n", "\n", "\u0663\n", "0x10"])
def test_integer_not_a_number_is_refused_with_file_and_line(bare: Path, text: str) -> None:
    path = put(bare, "timeoutremote", text)
    with pytest.raises(ControlError) as info:
        Control(bare).integer("timeoutremote", 1200)
    assert info.value.path == str(path)
    assert info.value.lineno == 1
    assert str(info.value).startswith(f"{path} line 1: not a number")


def test_integer_minimum(bare: Path) -> None:
    path = put(bare, "concurrencyincoming", "0\n")
    c = Control(bare)
    assert c.integer("concurrencyincoming", 40) == 0
    with pytest.raises(ControlError) as info:
        c.integer("concurrencyincoming", 40, minimum=1)
    assert info.value.path == str(path) and info.value.lineno == 1
    assert "at least 1" in info.value.message


def test_integer_large_value_kept(bare: Path) -> None:
    put(bare, "databytes", "99999999999999999999\n")
    assert Control(bare).integer("databytes", 0) == 99999999999999999999


# -- list files ---------------------------------------------------------------------------


def test_lines_skip_blank_and_comment_lines_and_keep_line_numbers(bare: Path) -> None:
    put(bare, "rcpthosts", "# hosts\nexample.test  \n\n\t\n.sub.example.test\t\n  #kept\n")
    assert Control(bare).lines("rcpthosts") == [
        (2, "example.test"),
        (5, ".sub.example.test"),
        (6, "  #kept"),
    ]
    assert Control(bare).list("rcpthosts") == ["example.test", ".sub.example.test", "  #kept"]


def test_list_absent_is_none_but_empty_file_is_empty_list(bare: Path) -> None:
    c = Control(bare)
    assert c.list("badmailfrom") is None
    assert c.lines("badmailfrom") is None
    put(bare, "badmailfrom", "# nothing yet\n\n")
    assert c.list("badmailfrom") == []


def test_list_crlf_and_no_final_newline(bare: Path) -> None:
    put(bare, "locals", "a.test\r\nb.test")
    assert Control(bare).list("locals") == ["a.test", "b.test"]


# -- key:value files ----------------------------------------------------------------------


def test_mapping_lowercases_keys_keeps_values_and_later_wins(bare: Path) -> None:
    put(
        bare,
        "virtualdomains",
        "Example.COM:Joe-Ex\n# c\nother.test:a:b\nexample.com:second\n:alias-catchall\n",
    )
    assert Control(bare).mapping("virtualdomains") == {
        "example.com": "second",
        "other.test": "a:b",
        "": "alias-catchall",
    }


def test_mapping_absent_is_empty(bare: Path) -> None:
    assert Control(bare).mapping("virtualdomains") == {}


def test_mapping_line_without_colon_names_file_and_line(bare: Path) -> None:
    path = put(bare, "smtproutes", "a.test:relay.test\n\n# x\nbroken\n")
    with pytest.raises(ControlError) as info:
        Control(bare).mapping("smtproutes")
    assert info.value.path == str(path)
    assert info.value.lineno == 4
    assert str(info.value) == f"{path} line 4: missing ':' in 'broken'"


# -- malformed files ----------------------------------------------------------------------


def test_nul_byte_reports_its_line(bare: Path) -> None:
    path = put(bare, "locals", b"a.test\nb.test\nc\0.test\n")
    c = Control(bare)
    for read in (c.list, c.line, c.lines):
        with pytest.raises(ControlError) as info:
            read("locals")
        assert info.value.path == str(path)
        assert info.value.lineno == 3
        assert "NUL" in info.value.message


def test_invalid_utf8_reports_its_line(bare: Path) -> None:
    path = put(bare, "badmailfrom", b"ok@example.test\n\nbad\xff@example.test\n")
    with pytest.raises(ControlError) as info:
        Control(bare).list("badmailfrom")
    assert (info.value.path, info.value.lineno) == (str(path), 3)
    assert str(info.value) == f"{path} line 3: is not valid UTF-8"


def test_utf8_is_accepted(bare: Path) -> None:
    put(bare, "smtpgreeting", "mx.example.test Grüße\n")
    assert Control(bare).line("smtpgreeting") == "mx.example.test Grüße"


def test_directory_instead_of_file(bare: Path) -> None:
    path = bare / "control" / "rcpthosts"
    path.mkdir()
    with pytest.raises(ControlError) as info:
        Control(bare).list("rcpthosts")
    assert info.value.path == str(path)
    assert info.value.lineno is None
    assert str(info.value) == f"{path}: is a directory, not a file"


def test_control_that_is_not_a_directory_is_an_error_not_absent(tmp_path: Path) -> None:
    # qmail treats every read error except ENOENT as fatal: a broken home must not
    # silently mean "all defaults"
    (tmp_path / "control").write_text("oops\n")
    with pytest.raises(ControlError) as info:
        Control(tmp_path).line("me")
    assert info.value.path == str(tmp_path / "control" / "me")
    assert "Not a directory" in info.value.message


def test_missing_control_directory_means_absent_files(tmp_path: Path) -> None:
    c = Control(tmp_path / "nowhere")
    assert c.line("me") is None
    assert c.list("locals") is None
    assert c.integer("databytes", 0) == 0


def test_unreadable_file_is_an_error(bare: Path) -> None:
    # a socket cannot be opened even by root (ENXIO): a read error that is not ENOENT
    path = bare / "control" / "locals"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        with pytest.raises(ControlError) as info:
            Control(bare).list("locals")
    assert info.value.path == str(path)
    assert info.value.message.startswith("unable to read: ")


# -- me defaults --------------------------------------------------------------------------


def test_me_and_line_me(bare: Path) -> None:
    c = Control(bare)
    assert c.me is None
    assert c.line_me("bouncehost", "bouncehost") == "bouncehost"
    put(bare, "me", "mx.example.test\n")
    c = Control(bare)
    assert c.me == "mx.example.test"
    assert c.line_me("bouncehost", "bouncehost") == "mx.example.test"
    put(bare, "bouncehost", "bounces.example.test\n")
    assert c.line_me("bouncehost", "bouncehost") == "bounces.example.test"
    # an empty file is a value of its own, as in qmail
    put(bare, "bouncehost", "\n")
    assert c.line_me("bouncehost", "bouncehost") == ""


def test_empty_me_counts_as_absent(bare: Path) -> None:
    put(bare, "me", "\n")
    c = Control(bare)
    assert c.me is None
    assert c.line_me("envnoathost", "envnoathost") == "envnoathost"


def test_me_is_read_once(bare: Path) -> None:
    put(bare, "me", "first.test\n")
    c = Control(bare)
    assert c.me == "first.test"
    put(bare, "me", "second.test\n")
    assert c.me == "first.test"
    assert Control(bare).me == "second.test"


def test_broken_me_raises(bare: Path) -> None:
    put(bare, "me", b"mx\0\n")
    with pytest.raises(ControlError):
        _ = Control(bare).me


# -- SendControls -------------------------------------------------------------------------


def test_send_controls_of_a_fresh_home(qmail_home: Path) -> None:
    s = SendControls.load(qmail_home)
    assert s.me == "mx.example.test"
    assert s.locals == frozenset({"example.test", "mx.example.test"})
    assert s.percenthack == frozenset()
    assert s.virtualdomains == {}
    assert s.envnoathost == "mx.example.test"
    assert s.bouncefrom == "MAILER-DAEMON"
    assert s.bouncehost == "mx.example.test"
    assert s.doublebouncehost == "mx.example.test"
    assert s.doublebounceto == "postmaster"
    assert (s.concurrencylocal, s.concurrencyremote) == (10, 20)
    assert s.queuelifetime == 604800


def test_send_controls_without_me(bare: Path) -> None:
    put(bare, "locals", "Example.TEST\n")
    s = SendControls.load(bare)
    assert s.locals == frozenset({"example.test"})
    assert s.envnoathost == "envnoathost"
    assert s.bouncehost == "bouncehost"
    assert s.doublebouncehost == "doublebouncehost"


def test_send_controls_locals_default_to_me(bare: Path) -> None:
    put(bare, "me", "Solo.Example.TEST\n")
    assert SendControls.load(bare).locals == frozenset({"solo.example.test"})


def test_send_controls_refuse_without_me_and_locals(bare: Path) -> None:
    with pytest.raises(ControlError) as info:
        SendControls.load(bare)
    assert info.value.path == str(bare / "control" / "me")


def test_send_controls_values(bare: Path) -> None:
    put(bare, "me", "mx.example.test\n")
    put(bare, "concurrencylocal", "500\n")
    put(bare, "concurrencyremote", "3\n")
    put(bare, "queuelifetime", "3600\n")
    put(bare, "doublebounceto", "\n")
    put(bare, "bouncefrom", "bounces\n")
    put(bare, "percenthack", "Old.Example.TEST\n")
    put(bare, "virtualdomains", "virt.test:joe-virt\n")
    s = SendControls.load(bare)
    assert s.concurrencylocal == SPAWN
    assert s.concurrencyremote == 3
    assert s.queuelifetime == 3600
    assert s.doublebounceto == ""
    assert s.bouncefrom == "bounces"
    assert s.percenthack == frozenset({"old.example.test"})
    assert s.virtualdomains == {"virt.test": "joe-virt"}


def test_send_controls_bad_number_names_the_file(qmail_home: Path) -> None:
    path = put(qmail_home, "queuelifetime", "1 week\n")
    with pytest.raises(ControlError) as info:
        SendControls.load(qmail_home)
    assert (info.value.path, info.value.lineno) == (str(path), 1)


# -- helpers ------------------------------------------------------------------------------


def test_domain_suffixes() -> None:
    assert domain_suffixes("a.b.example.test") == [".b.example.test", ".example.test", ".test"]
    assert domain_suffixes("localhost") == []
    assert domain_suffixes("") == []


def test_write_control_replaces_atomically(bare: Path) -> None:
    write_control(bare, "locals", ["a.test", "b.test"])
    assert (bare / "control" / "locals").read_text() == "a.test\nb.test\n"
    write_control(bare, "locals", ["c.test"])
    assert Control(bare).list("locals") == ["c.test"]
    write_control(bare, "locals", [])
    assert Control(bare).list("locals") == []
    assert sorted(os.listdir(bare / "control")) == ["locals"]
