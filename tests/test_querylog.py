"""`[server] query_log`: one log line per query on the geodns.query logger."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import dns.message
import dns.query
import pytest

from tests.serverutil import serve_files

ZONE = """\
$ORIGIN example.test.
@ 300 IN SOA ns1 host 1 7200 3600 1209600 60
@ 300 IN NS ns1
ns1 300 IN A 192.0.2.53
www 300 IN A 192.0.2.80
"""


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "geodns.query"]


def ask_raw(addr: tuple[str, int], wire: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(3)
        c.sendto(wire, addr)
        return c.recv(65535)


def test_every_query_is_logged_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="geodns.query")
    files = {"example.test.zone": ZONE}
    with serve_files(tmp_path, files, "[server]\nquery_log = true\n") as s:
        www = ask_raw(s.addr, dns.message.make_query("www.example.test", "A").to_wire())
        nx = ask_raw(s.addr, dns.message.make_query("nx.example.test", "AAAA").to_wire())
        dns.query.tcp(dns.message.make_query("example.test", "SOA"), s.host, port=s.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.sendto(b"\x00\x01\x80\x00" + bytes(8), s.addr)  # a response: dropped
        deadline = time.monotonic() + 5
        while len(lines(caplog)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # the dropped packet has no reply to wait for
    got = lines(caplog)
    assert len(got) == 4, got
    assert re.fullmatch(rf"udp 127\.0\.0\.1#\d+ www\.example\.test\. A NOERROR {len(www)}B", got[0])
    assert re.fullmatch(rf"udp \S+ nx\.example\.test\. AAAA NXDOMAIN {len(nx)}B", got[1])
    assert re.fullmatch(r"tcp \S+ example\.test\. SOA NOERROR \d+B", got[2]), got[2]
    assert re.fullmatch(r"udp \S+ - dropped", got[3]), got[3]


def test_queries_are_not_logged_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="geodns.query")
    with serve_files(tmp_path, {"example.test.zone": ZONE}) as s:
        dns.query.udp(dns.message.make_query("www.example.test", "A"), s.host, port=s.port)
    assert lines(caplog) == []
