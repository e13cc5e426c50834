"""Where remote mail for a domain goes: smtproutes, MX/A/AAAA lookups, the self-MX check.

DNS goes through dnspython.  `control/nameservers` (one `IP` or `IP:PORT` per
line, `[IPv6]:PORT` for an IPv6 server with a port; `#` comments allowed)
names the servers to ask; when it is absent the system resolver
configuration (/etc/resolv.conf) is used.  Every pyqmail program that queries
DNS gets its resolver from `make_resolver(home)`.

`control/smtproutes` keeps qmail's format and lookup order (the host, then
each of its `.suffix`es longest first, then the empty key; case-insensitive;
a later duplicate line wins):

    domain:relay            relay (host name, IP or [IP]) on port 25, no MX lookup
    domain:relay:port       the same on another port
    domain:                 stop searching; normal MX lookup (exceptions to a default)
    :relay                  default route for every domain (smarthost)
    domain::port            pyqmail extension: normal MX lookup, but connect on `port`

A relay that is a host name uses its A and AAAA records.  MX hosts of equal
preference are tried in random order; each host's IPv4 addresses come before
its IPv6 ones.  A null MX (RFC 7505, exchange `.`) means the domain takes no
mail: a permanent failure.

Self-MX check (qmail's "prefme"): an address counts as this machine when it
is one of its interface addresses (or 0.0.0.0/::) and the port is one our
SMTP server listens on (25, plus the ports in `control/smtplisten`).  Only
targets with a lower MX preference than the best "this machine" entry are
used; if none remain, qmail's #5.4.6 permanent error follows.  Relays from
smtproutes skip the check, as in qmail.  Making the port part of the check is
a pyqmail refinement: another MTA on a different port of this machine (for
example a second instance on loopback) is not a mail loop.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .control import Control, ControlError, domain_suffixes
from .fmt import printable

DNS_TIMEOUT = 5.0  # per server try
DNS_LIFETIME = 30.0  # per lookup, all tries together

TEXT_SOFT = "Sorry, I couldn't find any host by that name. (#4.1.2)\n"
TEXT_NO_MX = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n"
TEXT_SELF = (
    "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
    "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n"
)


class RouteError(Exception):
    """No usable destination: `letter` is Z (temporary) or D (permanent), `text` qmail's words."""

    def __init__(self, letter: str, text: str) -> None:
        super().__init__(text)
        self.letter = letter
        self.text = text


@dataclass(frozen=True)
class Target:
    ip: str
    pref: int
    name: str  # the host name the address came from; "" for an address literal


@dataclass(frozen=True)
class Route:
    relay: str | None  # None: look up the domain's MX
    port: int


# -- smtproutes ---------------------------------------------------------------------


def parse_nameservers(ctl: Control) -> list[tuple[str, int]] | None:
    entries = ctl.lines("nameservers")
    if entries is None:
        return None
    result = []
    for lineno, entry in entries:
        entry = entry.strip()
        host, port = entry, 53
        if entry.startswith("["):
            close = entry.find("]")
            host, rest = entry[1:close], entry[close + 1 :]
            if close < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
                raise ControlError(ctl.path("nameservers"), f"bad server {entry!r}", lineno)
            port = int(rest[1:]) if rest else 53
        elif entry.count(":") == 1:
            host, _, p = entry.partition(":")
            if not p.isdigit():
                raise ControlError(ctl.path("nameservers"), f"bad port in {entry!r}", lineno)
            port = int(p)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ControlError(
                ctl.path("nameservers"), f"not an IP address: {host!r}", lineno
            ) from None
        if not 0 < port < 65536:
            raise ControlError(ctl.path("nameservers"), f"bad port in {entry!r}", lineno)
        result.append((host, port))
    if not result:
        raise ControlError(ctl.path("nameservers"), "lists no server")
    return result


def make_resolver(home: Path | str) -> dns.resolver.Resolver:
    """A resolver honouring control/nameservers (absent: the system's configuration)."""
    servers = parse_nameservers(Control(home))
    if servers is None:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.timeout = DNS_TIMEOUT
    resolver.lifetime = DNS_LIFETIME
    return resolver


def find_in_map(mapping: dict[str, str], host: str) -> str | None:
    """qmail's lookup order: the host, its `.suffix`es longest first, then the empty key."""
    host = host.lower()
    for key in (host, *domain_suffixes(host), ""):
        if key in mapping:
            return mapping[key]
    return None


def route_for(ctl: Control, host: str) -> Route:
    value = find_in_map(ctl.mapping("smtproutes"), host)
    if not value:
        return Route(None, 25)
    relay, sep, port_text = value.partition(":")
    port = 25
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ControlError(ctl.path("smtproutes"), f"bad port in {value!r}")
        port = int(port_text)
    return Route(relay or None, port)


# -- addresses of this machine ------------------------------------------------------


def _ipv4_local() -> set[str]:
    found: set[str] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return {"127.0.0.1"}
    for prev, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL":
            found.add(prev.split()[-1])
    return found or {"127.0.0.1"}


def _ipv6_local() -> set[str]:
    found: set[str] = set()
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return {"::1"}
    for line in lines:
        hexaddr = line.split()[0] if line.split() else ""
        if len(hexaddr) == 32:
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    return found


def ipme() -> set[str]:
    """This machine's interface addresses, plus the wildcard addresses (as netqmail)."""
    return _ipv4_local() | _ipv6_local() | {"0.0.0.0", "::"}


def listen_ports(ctl: Control) -> set[int]:
    ports = {25}
    entries = ctl.list("smtplisten")
    if entries is None:
        if os.geteuid() != 0:
            ports.add(2525)  # pyqmail run's unprivileged default
        return ports
    for entry in entries:
        _, _, port = entry.rpartition(":")
        if port.isdigit():
            ports.add(int(port))
    return ports


def _normal(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


# -- DNS ----------------------------------------------------------------------------


def literal(host: str) -> str | None:
    """The address in `1.2.3.4`, `[1.2.3.4]`, `[IPv6:2001:db8::1]` or `[2001:db8::1]`."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    elif host == text and ":" in text:
        return None  # a bare IPv6 address is not a host name qmail would pass
    try:
        return _normal(text)
    except ValueError:
        return None


def _qname(host: str) -> dns.name.Name:
    try:
        return dns.name.from_text(host.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise RouteError(
            "D", f"Sorry, I couldn't find any host named {_shown(host)}. (#5.1.2)\n"
        ) from None


def _shown(host: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 else "?" for c in host)


_HARD = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def _query(resolver: Any, name: dns.name.Name, rdtype: str) -> list[Any]:
    """The records of one type; raises the dnspython exception on failure."""
    answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=True)
    return list(answer)


def addresses(resolver: Any, host: str) -> tuple[list[str], bool, bool]:
    """(IPv4 then IPv6 addresses of host, soft failure seen, name does not exist)."""
    ips: list[str] = []
    soft = False
    name = _qname(host)
    nxdomain = False
    for rdtype in ("A", "AAAA"):
        try:
            ips += [_normal(rr.address) for rr in _query(resolver, name, rdtype)]
        except dns.resolver.NXDOMAIN:
            nxdomain = True
            break  # the other type cannot exist either
        except dns.resolver.NoAnswer:
            continue
        except dns.exception.DNSException:
            soft = True
    return ips, soft, nxdomain


Shuffle = Callable[[list[Any]], None]


def _order_mx(records: list[tuple[int, str]], shuffle: Shuffle) -> list[tuple[int, str]]:
    """Lowest preference first; random order among equal preferences."""
    result: list[tuple[int, str]] = []
    for pref in sorted({p for p, _ in records}):
        group = [r for r in records if r[0] == pref]
        shuffle(group)
        result += group
    return result


def mx_targets(resolver: Any, host: str, shuffle: Shuffle | None = None) -> list[Target]:
    """The address list for a domain by its MX records (or its own addresses, implicit MX)."""
    shuffle = shuffle or random.SystemRandom().shuffle
    lit = literal(host)
    if lit is not None:
        return [Target(lit, 0, "")]
    name = _qname(host)
    try:
        records = [
            (rr.preference, rr.exchange.to_text(omit_final_dot=True))
            for rr in _query(resolver, name, "MX")
        ]
    except _HARD:
        records = []
    except dns.exception.DNSException:
        raise RouteError("Z", TEXT_SOFT) from None
    if not records:
        return implicit_targets(resolver, host)
    if any(exchange in ("", ".") for _, exchange in records):
        raise RouteError(
            "D", f"Sorry, {_shown(host)} has a null MX record: it accepts no mail. (#5.1.10)\n"
        )
    targets: list[Target] = []
    soft = False
    for pref, exchange in _order_mx(records, shuffle):
        lit = literal(exchange)
        if lit is not None:
            targets.append(Target(lit, pref, ""))
            continue
        try:
            ips, failed, _ = addresses(resolver, exchange)
        except RouteError:
            continue
        soft = soft or failed
        targets += [Target(ip, pref, exchange) for ip in ips]
    if not targets:
        raise RouteError("Z", TEXT_SOFT) if soft else RouteError("D", TEXT_NO_MX)
    return targets


def implicit_targets(resolver: Any, host: str, pref: int = 0) -> list[Target]:
    """A host used as its own mail exchanger (no MX records, or an smtproutes relay)."""
    lit = literal(host)
    if lit is not None:
        return [Target(lit, pref, "")]
    ips, soft, _ = addresses(resolver, host)
    if ips:
        return [Target(ip, pref, host.rstrip(".")) for ip in ips]
    if soft:
        raise RouteError("Z", TEXT_SOFT)
    raise RouteError(
        "D", f"Sorry, I couldn't find any host named {printable(_shown(host))}. (#5.1.2)\n"
    )


def targets_for(
    ctl: Control,
    resolver: Any,
    host: str,
    shuffle: Shuffle | None = None,
    local_ips: set[str] | None = None,
) -> tuple[list[Target], int]:
    """Candidates to try in order, and the port, for mail to `host` (qmail-remote's argv[1])."""
    route = route_for(ctl, host)
    if route.relay is not None:
        return implicit_targets(resolver, route.relay), route.port
    targets = mx_targets(resolver, host, shuffle)
    mine = local_ips if local_ips is not None else ipme()
    if route.port in listen_ports(ctl):
        prefme = min((t.pref for t in targets if t.ip in mine), default=None)
        if prefme is not None:
            targets = [t for t in targets if t.pref < prefme]
            if not targets:
                raise RouteError("D", TEXT_SELF)
    return targets, route.port
