"""Routing: MX lookups against a real DNS server on loopback, smtproutes, nameservers, self-MX."""

from __future__ import annotations

from pathlib import Path

import pytest

from _dns_server import DNSServer
from _remote_util import Script, ScriptedPeer, free_port, run_remote
from pyqmail import mx
from pyqmail.control import Control, ControlError

MSG = b"Subject: mx\n\nhello\n"

ZONE = {
    "two.test": [("MX", "10 mx1.two.test"), ("MX", "20 mx2.two.test")],
    "mx1.two.test": [("A", "127.0.0.1")],
    "mx2.two.test": [("AAAA", "::1")],
    "v6first.test": [("MX", "10 mx2.two.test"), ("MX", "20 mx1.two.test")],
    "plain.test": [("A", "127.0.0.1")],
    "alias.test": [("CNAME", "two.test")],
    "nullmx.test": [("MX", "0 .")],
    "me.test": [("MX", "10 mx1.two.test")],
    "backup.test": [("MX", "5 far.test"), ("MX", "10 mx1.two.test")],
    "far.test": [("AAAA", "::1")],
}


@pytest.fixture
def dns(qmail_home: Path) -> DNSServer:
    server = DNSServer(ZONE, failures={"broken.test": "SERVFAIL", "mxbroken.test": "SERVFAIL"})
    server.configure(qmail_home)
    yield server
    server.stop()


def mx_port(home: Path, port: int, *domains: str) -> None:
    """The `domain::port` extension: MX lookup as usual, but on a test port."""
    lines = "".join(f"{d}::{port}\n" for d in domains)
    (home / "control" / "smtproutes").write_text(lines)


def test_mx_preference_order(qmail_home: Path, dns: DNSServer) -> None:
    port = free_port()
    with ScriptedPeer(Script(), "127.0.0.1", port) as v4, ScriptedPeer(Script(), "::1", port) as v6:
        mx_port(qmail_home, port, "two.test", "v6first.test")
        first = run_remote(qmail_home, MSG, "two.test", "", "a@two.test")
        second = run_remote(qmail_home, MSG, "v6first.test", "", "a@v6first.test")
    assert first[-1].startswith(b"K127.0.0.1 accepted")
    assert second[-1].startswith(b"K::1 accepted")
    assert len(v4.sessions) == 1 and len(v6.sessions) == 1
    assert ("two.test", "MX") in dns.queries


def test_fallback_to_next_mx_when_refused(qmail_home: Path, dns: DNSServer) -> None:
    port = free_port()
    # far.test (pref 5, ::1) refuses; mx1 (pref 10, 127.0.0.1) accepts
    with ScriptedPeer(Script(), "127.0.0.1", port) as peer:
        mx_port(qmail_home, port, "backup.test")
        reports = run_remote(qmail_home, MSG, "backup.test", "", "a@backup.test")
    assert reports[-1].startswith(b"K127.0.0.1 accepted")
    assert len(peer.sessions) == 1


def test_implicit_mx_and_cname(qmail_home: Path, dns: DNSServer) -> None:
    port = free_port()
    with ScriptedPeer(Script(), "127.0.0.1", port) as peer:
        mx_port(qmail_home, port, "plain.test", "alias.test")
        implicit = run_remote(qmail_home, MSG, "plain.test", "", "a@plain.test")
        alias = run_remote(qmail_home, MSG, "alias.test", "", "a@alias.test")
    assert implicit[-1].startswith(b"K127.0.0.1")
    assert alias[-1].startswith(b"K127.0.0.1")
    # the RCPT domain goes out as given (notqmail behaviour, no CNAME rewriting)
    assert b"RCPT TO:<a@alias.test>" in peer.sessions[1].commands
    assert ("plain.test", "A") in dns.queries


def test_nxdomain_is_permanent(qmail_home: Path, dns: DNSServer) -> None:
    reports = run_remote(qmail_home, MSG, "nowhere.test", "", "a@nowhere.test")
    assert reports == [b"DSorry, I couldn't find any host named nowhere.test. (#5.1.2)\n"]


def test_servfail_is_temporary(qmail_home: Path, dns: DNSServer) -> None:
    reports = run_remote(qmail_home, MSG, "broken.test", "", "a@broken.test")
    assert reports == [b"ZSorry, I couldn't find any host by that name. (#4.1.2)\n"]


def test_null_mx_is_permanent(qmail_home: Path, dns: DNSServer) -> None:
    reports = run_remote(qmail_home, MSG, "nullmx.test", "", "a@nullmx.test")
    assert reports[0].startswith(b"DSorry, nullmx.test has a null MX record")


def test_mx_pointing_back_to_us(qmail_home: Path, dns: DNSServer) -> None:
    # port 25 on 127.0.0.1 is this machine's SMTP service: delivering there would loop
    reports = run_remote(qmail_home, MSG, "me.test", "", "a@me.test")
    assert reports == [
        b"DSorry. Although I'm listed as a best-preference MX or A for that host,\n"
        b"it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n"
    ]


def test_self_check_keeps_better_mx(qmail_home: Path, dns: DNSServer) -> None:
    ctl = Control(qmail_home)
    resolver = mx.make_resolver(qmail_home)
    targets, port = mx.targets_for(ctl, resolver, "backup.test", local_ips={"127.0.0.1"})
    assert port == 25
    assert targets == [mx.Target("::1", 5, "far.test")]


def test_smtproutes_lookup(qmail_home: Path) -> None:
    (qmail_home / "control" / "smtproutes").write_text(
        "# routes\n"
        "inside.af.mil:firewall.af.mil:26\n"
        ".af.mil:\n"
        ":heaven.af.mil\n"
        "lit.test:[192.0.2.7]\n"
        "mxport.test::2526\n"
        "Upper.Test:relay.test\n"
    )
    ctl = Control(qmail_home)
    assert mx.route_for(ctl, "inside.af.mil") == mx.Route("firewall.af.mil", 26)
    assert mx.route_for(ctl, "x.af.mil") == mx.Route(None, 25)
    assert mx.route_for(ctl, "elsewhere.example") == mx.Route("heaven.af.mil", 25)
    assert mx.route_for(ctl, "lit.test") == mx.Route("[192.0.2.7]", 25)
    assert mx.route_for(ctl, "mxport.test") == mx.Route(None, 2526)
    assert mx.route_for(ctl, "UPPER.test") == mx.Route("relay.test", 25)
    targets, port = mx.targets_for(ctl, None, "lit.test")
    assert (targets, port) == ([mx.Target("192.0.2.7", 0, "")], 25)
    (qmail_home / "control" / "smtproutes").write_text("bad.test:relay:port\n")
    with pytest.raises(ControlError):
        mx.route_for(Control(qmail_home), "bad.test")


def test_relay_by_name_uses_addresses_not_mx(qmail_home: Path, dns: DNSServer) -> None:
    port = free_port()
    with ScriptedPeer(Script(), "127.0.0.1", port) as peer:
        (qmail_home / "control" / "smtproutes").write_text(f":plain.test:{port}\n")
        reports = run_remote(qmail_home, MSG, "anything.example", "", "a@anything.example")
    assert reports[-1].startswith(b"K127.0.0.1")
    assert len(peer.sessions) == 1
    assert ("anything.example", "MX") not in dns.queries


def test_nameservers_control(qmail_home: Path) -> None:
    path = qmail_home / "control" / "nameservers"
    path.write_text("# local resolvers\n127.0.0.1\n127.0.0.53:5353\n[::1]:5300\n::1\n")
    assert mx.parse_nameservers(Control(qmail_home)) == [
        ("127.0.0.1", 53),
        ("127.0.0.53", 5353),
        ("::1", 5300),
        ("::1", 53),
    ]
    path.write_text("dns.example\n")
    with pytest.raises(ControlError):
        mx.parse_nameservers(Control(qmail_home))
    path.unlink()
    assert mx.parse_nameservers(Control(qmail_home)) is None


def test_equal_preferences_are_shuffled() -> None:
    records = [(10, "a"), (20, "c"), (10, "b")]
    assert mx._order_mx(records, lambda group: group.reverse()) == [(10, "b"), (10, "a"), (20, "c")]
    assert mx._order_mx(records, lambda group: None) == [(10, "a"), (10, "b"), (20, "c")]


def test_literals() -> None:
    assert mx.literal("[127.0.0.1]") == "127.0.0.1"
    assert mx.literal("192.0.2.1") == "192.0.2.1"
    assert mx.literal("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert mx.literal("example.org") is None
    assert "127.0.0.1" in mx.ipme() and "0.0.0.0" in mx.ipme()
