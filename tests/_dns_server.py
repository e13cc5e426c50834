"""A small authoritative DNS server on loopback for tests, built on dnslib.

The test gives it records by name, e.g.

    dns = DNSServer({
        "example.org": [("MX", "10 mx1.example.org"), ("MX", "20 mx2.example.org")],
        "mx1.example.org": [("A", "127.0.0.1"), ("AAAA", "::1")],
        "alias.example.org": [("CNAME", "example.org")],
    }, failures={"broken.example.org": "SERVFAIL"})

and points a home at it with `dns.configure(home)` (writes control/nameservers).
Unknown names get NXDOMAIN; known names without the asked type get an empty
answer (NODATA); CNAMEs are followed inside the zone.  It answers over UDP in
a thread of the test process and is stopped by `stop()` (or the context manager).
"""

from __future__ import annotations

import select
import socket
import threading
from pathlib import Path
from types import TracebackType

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, A, DNSRecord

Records = dict[str, list[tuple[str, str]]]


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DNSServer:
    def __init__(self, records: Records | None = None, failures: dict[str, str] | None = None):
        self.records: Records = {_key(k): v for k, v in (records or {}).items()}
        self.failures = {_key(k): v for k, v in (failures or {}).items()}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def configure(self, home: Path) -> None:
        (home / "control" / "nameservers").write_text(f"127.0.0.1:{self.port}\n")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> DNSServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                continue
            try:
                answer = self.answer(DNSRecord.parse(data))
            except Exception:  # a garbled query is not the test's concern
                continue
            self.sock.sendto(answer.pack(), addr)

    def answer(self, request: DNSRecord) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        self.queries.append((_key(qname), qtype))
        name = _key(qname)
        for _ in range(10):
            failure = self.failures.get(name)
            if failure is not None:
                reply.header.rcode = getattr(RCODE, failure)
                return reply
            if name not in self.records:
                if not reply.rr:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            entries = self.records[name]
            cnames = [v for t, v in entries if t == "CNAME"]
            if cnames and qtype != "CNAME":
                reply.add_answer(RR(name + ".", QTYPE.CNAME, rdata=CNAME(cnames[0] + "."), ttl=60))
                name = _key(cnames[0])
                continue
            for rtype, value in entries:
                if rtype != qtype:
                    continue
                if rtype == "A":
                    rdata: object = A(value)
                elif rtype == "AAAA":
                    rdata = AAAA(value)
                elif rtype == "MX":
                    pref, exchange = value.split()
                    rdata = MX(exchange if exchange == "." else exchange + ".", int(pref))
                else:
                    continue
                reply.add_answer(RR(name + ".", getattr(QTYPE, rtype), rdata=rdata, ttl=60))
            return reply
        return reply
