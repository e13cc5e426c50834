"""tcprules: syntax, cdb compatibility with ucspi-tcp's tcprules, and the lookup order."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tcp_util import BIN
from pyqmail.tcprules import Decision, RulesSyntaxError, compile_rules, lookup, parse_rules

pytestmark = pytest.mark.timeout(120)

REAL = Path("/usr/bin/tcprules")
OURS = BIN / "tcprules"
need_real = pytest.mark.skipif(
    not REAL.exists(), reason="ucspi-tcp's tcprules is the reference and is not installed"
)


def run_tcprules(tool: Path, directory: Path, text: bytes) -> tuple[int, bytes, bytes | None]:
    cdb = directory / f"{tool.parent.name}.cdb"
    tmp = directory / f"{tool.parent.name}.tmp"
    for p in (cdb, tmp):
        if p.exists():
            p.unlink()
    proc = subprocess.run(
        [str(tool), str(cdb), str(tmp)], input=text, capture_output=True, timeout=20
    )
    data = cdb.read_bytes() if cdb.exists() else None
    return proc.returncode, proc.stderr, data


SAMPLES = [
    b'127.:allow,RELAYCLIENT=""\n192.0.2.:allow,RELAYCLIENT=""\n198.51.100.9:deny\n:allow\n',
    b"# comment\n\nno colon here\n1.2.3.4:deny  \t\n",
    b"1.2.3.37-53:allow\n10.1-5.:deny\n1.2.3.250-300:allow\n1.2.3.9-4:allow\n1.2.3.-3:allow\n",
    b"1-3.2-3.:allow\n1.2.3.4-5.:allow\n1.2.3.04-05:allow\n1.2.3.1000-1002:allow\n",
    b"=host.example.com:allow\n=.example.com:deny\n=:allow\nu@1.2.3.4:deny\nu@=h.example:allow\n",
    b"x@1-2:allow\n1.2.3.4-6=:allow\n=a-b.example:allow\n 1.2.3.4 :allow\n",
    b'1.2.3.4:allow,X=/a"b/,Y=\'\',Z="a b"\n1.2.3.5:deny,X="1",X="2"\n',
    b'1.2.3.4:allow,X="abc",,Y="1"\n1.2.3.4:allow,=""\n1.2.3.4:deny\n',
    b"1.2.3.4:allow",  # no final newline
]

BAD = [
    b"x:bogus\n",
    b"1.2.3.4:Allow\n",
    b"1.2.3.4:allowx\n",
    b"1.2.3.4:allow,X=\n",
    b'1.2.3.4:allow,X=""Y\n',
    b'1.2.3.4:allow,X=="\n',
    b"1:allow,\n",
    b'1:allow,X="1"junk\n',
    b"1: allow\n",
    b"1.2.3.4-5-6:allow\n",
    b"1.2.3.a-c:allow\n",
    b"1.2.3.x4-5:allow\n",
    b"1.2.3.4-5x:allow\n",
    b"a:deny:allow\n",
    b"1.2.3.4:allow\r\n",
]


@need_real
@pytest.mark.parametrize("text", SAMPLES)
def test_cdb_is_byte_identical_to_ucspi(tmp_path: Path, text: bytes) -> None:
    real = run_tcprules(REAL, tmp_path, text)
    ours = run_tcprules(OURS, tmp_path, text)
    assert real[0] == 0
    assert ours == real


@need_real
@pytest.mark.parametrize("text", BAD)
def test_syntax_errors_match_ucspi(tmp_path: Path, text: bytes) -> None:
    cdb = tmp_path / "ours.cdb"
    cdb.write_bytes(b"old")
    code, err, _ = run_tcprules(REAL, tmp_path, b":allow\n" + text)
    assert code == 100
    ours = subprocess.run(
        [str(OURS), str(cdb), str(tmp_path / "ours.tmp")],
        input=b":allow\n" + text,
        capture_output=True,
        timeout=20,
    )
    assert ours.returncode == 100
    line = text.rstrip(b"\n").replace(b"\r", b"?")
    assert ours.stderr == b"tcprules: fatal: unable to parse this line: " + line + b"\n"
    assert err.startswith(b"tcprules: fatal: unable to parse this line: ")
    # nothing changed, nothing left behind
    assert cdb.read_bytes() == b"old"
    assert not (tmp_path / "ours.tmp").exists()


rule_address = st.one_of(
    st.just(b""),
    st.from_regex(rb"\A(\d{1,3}\.){0,3}\d{0,3}(-\d{0,3})?\.?\Z"),
    st.from_regex(rb"\A=[a-z.]{0,12}\Z"),
    st.from_regex(rb"\A[a-z]{1,4}@(\d{1,3}\.){3}\d{1,3}\Z"),
)
rule_env = st.lists(
    st.tuples(
        st.from_regex(rb"\A[A-Z_]{1,8}\Z"),
        st.sampled_from([b'"', b"'", b"/"]),
        st.from_regex(rb"\A[a-z 0-9=,:]{0,10}\Z"),
    ),
    max_size=3,
)
rule_line = st.builds(
    lambda addr, action, env: (
        addr
        + b":"
        + action
        + b"".join(b"," + name + q + value.replace(q, b"") + q for name, q, value in env)
    ),
    rule_address,
    st.sampled_from([b"allow", b"deny"]),
    rule_env,
)


@need_real
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(rule_line, max_size=8))
def test_random_rules_match_ucspi(tmp_path: Path, lines: list[bytes]) -> None:
    text = b"\n".join(lines) + b"\n"
    real = run_tcprules(REAL, tmp_path, text)
    ours_records = None
    try:
        ours_records = parse_rules(text)
    except RulesSyntaxError:
        pass
    if real[0] != 0:
        assert ours_records is None
        return
    assert ours_records is not None
    compile_rules(text, tmp_path / "x.cdb", tmp_path / "x.tmp")
    assert (tmp_path / "x.cdb").read_bytes() == real[2]


def test_usage_and_create_errors(tmp_path: Path) -> None:
    proc = subprocess.run([str(OURS), "only-one"], input=b"", capture_output=True, timeout=20)
    assert proc.returncode == 100
    assert proc.stderr == b"tcprules: usage: tcprules rules.cdb rules.tmp\n"
    proc = subprocess.run(
        [str(OURS), str(tmp_path / "r.cdb"), str(tmp_path / "nodir" / "r.tmp")],
        input=b":allow\n",
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == 111
    assert proc.stderr.startswith(b"tcprules: fatal: unable to create ")
    assert not (tmp_path / "r.cdb").exists()


def build(tmp_path: Path, text: bytes) -> Path:
    cdb = tmp_path / "rules.cdb"
    compile_rules(text, cdb, tmp_path / "rules.tmp")
    return cdb


def test_lookup_order(tmp_path: Path) -> None:
    cdb = build(
        tmp_path,
        b'joe@1.2.3.4:allow,K="info@ip"\n'
        b'joe@=h.example.com:allow,K="info@=host"\n'
        b'1.2.3.4:allow,K="ip"\n'
        b'=h.example.com:allow,K="=host"\n'
        b'1.2.3.:allow,K="1.2.3."\n'
        b'1.2.:allow,K="1.2."\n'
        b'=.example.com:allow,K="=.example.com"\n'
        b'=.com:allow,K="=.com"\n'
        b'=:allow,K="="\n'
        b':deny,K="default"\n',
    )

    def k(ip: str, host: str | None = None, info: str | None = None) -> str:
        return lookup(cdb, ip, host, info).env["K"]

    assert k("1.2.3.4", "h.example.com", "joe") == "info@ip"
    assert k("1.2.3.5", "h.example.com", "joe") == "info@=host"
    assert k("1.2.3.4", "h.example.com", "ann") == "ip"
    assert k("1.2.3.5", "h.example.com") == "=host"
    assert k("1.2.3.5", "x.example.com") == "1.2.3."
    assert k("1.2.9.9", "x.example.com") == "1.2."
    assert k("9.9.9.9", "x.example.com") == "=.example.com"
    assert k("9.9.9.9", "x.other.com") == "=.com"
    assert k("9.9.9.9", "x.org") == "="
    d = lookup(cdb, "9.9.9.9")
    assert d == Decision(False, {"K": "default"}, "")


def test_lookup_no_match_allows_and_first_duplicate_wins(tmp_path: Path) -> None:
    cdb = build(tmp_path, b'1.2.3.4:deny,A="1"\n1.2.3.4:allow,A="2"\n')
    assert lookup(cdb, "1.2.3.4") == Decision(False, {"A": "1"}, "1.2.3.4")
    assert lookup(cdb, "5.6.7.8") == Decision(True, {}, None)


def test_lookup_ipv6_and_mapped(tmp_path: Path) -> None:
    cdb = build(tmp_path, b'::1:allow,V="loop6"\n2001:db8:::deny\n127.:allow,V="v4"\n')
    assert lookup(cdb, "::1").env == {"V": "loop6"}
    assert lookup(cdb, "2001:db8::5").allow is False
    assert lookup(cdb, "2001:0db8:0::5").allow is False  # looked up in compact form
    assert lookup(cdb, "2001:db9::5").allow is True
    assert lookup(cdb, "::ffff:127.0.0.1").env == {"V": "v4"}


def test_values_with_arbitrary_bytes_survive(tmp_path: Path) -> None:
    cdb = build(tmp_path, b"1.2.3.4:allow,RBLSMTPD='-no mail: go away',Q=/\xff\x01/\n")
    env = lookup(cdb, "1.2.3.4").env
    assert env["RBLSMTPD"] == "-no mail: go away"
    assert os.fsencode(env["Q"]) == b"\xff\x01"
