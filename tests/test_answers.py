"""Answers over the wire for the RFC 1034 §4.3.2 cases, written as expected zone text."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.serverutil import Running, serve_files

ZONE = (Path(__file__).parent / "zones" / "example.test.zone").read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("answers")
    with serve_files(tmp, {"example.test.zone": ZONE}) as running:
        yield running


def section_text(rrsets: list) -> set[str]:  # type: ignore[type-arg]
    return {line.lower() for rr in rrsets for line in rr.to_text().splitlines()}


# (qname, qtype, rcode, aa, answer lines, authority types)
CASES = [
    (
        "www.example.test",
        "A",
        "NOERROR",
        True,
        {"www.example.test. 3600 in a 192.0.2.80", "www.example.test. 3600 in a 192.0.2.81"},
        set(),
    ),
    ("www.example.test", "MX", "NOERROR", True, set(), {"SOA"}),  # NODATA
    ("nx.example.test", "A", "NXDOMAIN", True, set(), {"SOA"}),
    ("c.example.test", "A", "NOERROR", True, set(), {"SOA"}),  # empty non-terminal
    ("b.c.example.test", "TXT", "NOERROR", True, set(), {"SOA"}),
    (
        "alias.example.test",
        "A",
        "NOERROR",
        True,
        {
            "alias.example.test. 3600 in cname www.example.test.",
            "www.example.test. 3600 in a 192.0.2.80",
            "www.example.test. 3600 in a 192.0.2.81",
        },
        set(),
    ),
    (
        "alias.example.test",
        "CNAME",
        "NOERROR",
        True,
        {"alias.example.test. 3600 in cname www.example.test."},
        set(),
    ),
    (
        "chain1.example.test",
        "AAAA",
        "NOERROR",
        True,
        {
            "chain1.example.test. 3600 in cname chain2.example.test.",
            "chain2.example.test. 3600 in cname www.example.test.",
            "www.example.test. 3600 in aaaa 2001:db8::80",
        },
        set(),
    ),
    (
        "dangling.example.test",
        "A",
        "NXDOMAIN",
        True,  # RFC 6604: rcode of the last link
        {"dangling.example.test. 3600 in cname nothere.example.test."},
        {"SOA"},
    ),
    (
        "nodata-cname.example.test",
        "MX",
        "NOERROR",
        True,
        {"nodata-cname.example.test. 3600 in cname mail.example.test."},
        {"SOA"},
    ),
    (
        "outside.example.test",
        "A",
        "NOERROR",
        True,
        {"outside.example.test. 3600 in cname www.elsewhere.invalid."},
        set(),
    ),
    (
        "anything.wild.example.test",
        "A",
        "NOERROR",
        True,
        {"anything.wild.example.test. 3600 in a 192.0.2.99"},
        set(),
    ),
    (
        "x.y.wild.example.test",
        "TXT",
        "NOERROR",
        True,
        {'x.y.wild.example.test. 3600 in txt "wild"'},
        set(),
    ),
    ("anything.wild.example.test", "MX", "NOERROR", True, set(), {"SOA"}),  # wildcard NODATA
    ("sub.wild.example.test", "A", "NOERROR", True, set(), {"SOA"}),  # existing name blocks *
    ("deep.sub.wild.example.test", "A", "NXDOMAIN", True, set(), {"SOA"}),  # RFC 4592 §2.2.1
    (
        "foo.cnamewild.example.test",
        "A",
        "NOERROR",
        True,
        {
            "foo.cnamewild.example.test. 3600 in cname www.example.test.",
            "www.example.test. 3600 in a 192.0.2.80",
            "www.example.test. 3600 in a 192.0.2.81",
        },
        set(),
    ),
    ("host.child.example.test", "A", "NOERROR", False, set(), {"NS"}),  # referral
    ("child.example.test", "NS", "NOERROR", False, set(), {"NS"}),
    (
        "child.example.test",
        "DS",
        "NOERROR",
        True,  # RFC 4035 §3.1.4.1: parent side
        {
            "child.example.test. 3600 in ds 12345 13 2 "
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        },
        set(),
    ),
    ("sibling.example.test", "DS", "NOERROR", True, set(), {"SOA"}),
    (
        "q.dn.example.test",
        "A",
        "NXDOMAIN",
        True,  # the synthesized target does not exist
        {
            "dn.example.test. 3600 in dname www.example.test.",
            "q.dn.example.test. 3600 in cname q.www.example.test.",
        },
        {"SOA"},
    ),
    (
        "q.dnout.example.test",
        "A",
        "NOERROR",
        True,
        {
            "dnout.example.test. 3600 in dname elsewhere.invalid.",
            "q.dnout.example.test. 3600 in cname q.elsewhere.invalid.",
        },
        set(),
    ),
    (
        "unknown.example.test",
        "TYPE65534",
        "NOERROR",
        True,
        {"unknown.example.test. 3600 in type65534 \\# 4 0a000001"},
        set(),
    ),
    ("www.example.org", "A", "REFUSED", False, set(), set()),
    (
        "loop1.example.test",
        "A",
        "NOERROR",
        True,
        {
            "loop1.example.test. 3600 in cname loop2.example.test.",
            "loop2.example.test. 3600 in cname loop1.example.test.",
        },
        set(),
    ),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("qname", "qtype", "rcode", "aa", "answer", "authority"),
    CASES,
    ids=[f"{c[0]}/{c[1]}" for c in CASES],
)
def test_answer(
    server: Running,
    tcp: bool,
    qname: str,
    qtype: str,
    rcode: str,
    aa: bool,
    answer: set[str],
    authority: set[str],
) -> None:
    r = server.query(qname, qtype, tcp=tcp, use_edns=0)
    assert dns.rcode.to_text(r.rcode()) == rcode
    assert bool(r.flags & dns.flags.AA) == aa
    assert not r.flags & dns.flags.RA and not r.flags & dns.flags.TC
    assert section_text(r.answer) == answer
    assert {dns.rdatatype.to_text(rr.rdtype) for rr in r.authority} == authority


def test_negative_answer_soa_ttl_is_min_of_ttl_and_minimum(server: Running) -> None:
    r = server.query("nx.example.test", "A")
    (soa,) = r.authority
    assert soa.ttl == 300  # RFC 2308 §3: min(3600, MINIMUM 300)


def test_referral_has_in_domain_glue_and_no_out_of_zone_glue(server: Running) -> None:
    r = server.query("host.child.example.test", "A", use_edns=0)
    (ns,) = r.authority
    assert {str(x.target) for x in ns} == {"ns1.child.example.test.", "ns.elsewhere.invalid."}
    glue = section_text([rr for rr in r.additional if rr.rdtype != dns.rdatatype.OPT])
    assert glue == {
        "ns1.child.example.test. 3600 in a 192.0.2.200",
        "ns1.child.example.test. 3600 in aaaa 2001:db8::200",
    }


def test_mx_answer_carries_target_addresses(server: Running) -> None:
    r = server.query("example.test", "MX", use_edns=0)
    extra = section_text([rr for rr in r.additional if rr.rdtype != dns.rdatatype.OPT])
    assert extra == {"mail.example.test. 3600 in a 192.0.2.25"}


def test_0x20_case_is_echoed_in_question_and_answer_owner(server: Running) -> None:
    q = dns.message.make_query("WwW.ExAmPlE.TeSt", "A")
    wire = q.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(wire, server.addr)
        reply = s.recv(4096)
    qlen = len(b"\x03WwW\x07ExAmPlE\x04TeSt\x00") + 4
    assert reply[12 : 12 + qlen] == wire[12 : 12 + qlen]
    r = dns.message.from_wire(reply)
    assert r.answer[0].name.to_text() == "WwW.ExAmPlE.TeSt."
    assert r.answer[0].name.labels[0] == b"WwW"


def test_rd_copied_ra_clear(server: Running) -> None:
    q = dns.message.make_query("www.example.test", "A")
    q.flags |= dns.flags.RD
    r = dns.query.udp(q, server.host, port=server.port, timeout=5)
    assert r.flags & dns.flags.RD and not r.flags & dns.flags.RA


def test_unloaded_zone_answers_servfail(tmp_path: Path) -> None:
    broken = "$ORIGIN broken.test.\n@ 300 IN SOA ns1 host 1 2 3 4 5\n"  # no NS: rejected
    with serve_files(tmp_path, {"example.test.zone": ZONE, "broken.test.zone": broken}) as s:
        r = s.query("www.broken.test", "A")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert s.query("www.example.test", "A").rcode() == dns.rcode.NOERROR
        assert s.app.zone_status["broken.test."].error
