"""Differential test: geodns and Knot DNS serve the same zone file and must agree.

Knot DNS 3.2 (Debian package `knot`; `make deb-tools` installs it) is started once per
module on a free loopback port from a copy of tests/zones/example.test.zone (and a small
second zone, dnapex.test, with a DNAME at its apex); geodns is started once in-process
from another copy. For every owner name in the zone (plus
nonexistent names, names below the delegation and the DNAMEs, and 0x20-mixed case) x
every type, over UDP with EDNS (payload 1232) and without EDNS, and for a sample of names
over TCP, the replies must agree on:

- RCODE, the AA and TC flags, and whether an OPT record is present;
- the ANSWER section, as a set of RRsets (owner names compared case-insensitively, TTLs
  and rdata compared exactly);
- the AUTHORITY section on negative answers (NXDOMAIN, NODATA, also after a CNAME/DNAME)
  and on referrals (AA clear, NS in AUTHORITY), and the in-zone glue of referrals;
- beyond that (COMPARE_ALL_SECTIONS), AUTHORITY of positive answers and all ADDITIONAL;
- nothing but RCODE and flags when TC=1.

ANY is the one place where the servers are allowed to differ. Knot 3.x ignores the old
`disable-any` option (`knotc conf-check`: "option 'template.disable-any' is obsolete and
has no effect", so the config below leaves it out) and always gives the RFC 8482 minimal
answer (one RRset, over UDP and TCP), while geodns answers ANY over UDP with TC=1 and
empty sections (what Knot 2.x did with `disable-any: on`, allowed by RFC 8482 §4) and
with every RRset over TCP. For ANY the test checks that geodns's reply is one of those
two and that Knot's RRset is among geodns's over TCP; NXDOMAIN/NODATA/referrals for ANY
must match exactly.

A few things the RFCs demand that a comparison does not show (question echoed
byte-exact with 0x20 case, owner names of answers in the query's case, RD copied, RA
clear) are checked against geodns alone at the end.

Known geodns bugs are listed in KNOWN_BUGS (xfail, strict).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

from tests.serverutil import Running, serve_files

ZONE_FILE = Path(__file__).resolve().parent / "zones" / "example.test.zone"
ORIGIN = dns.name.from_text("example.test.")
# a second zone whose apex holds a DNAME (RFC 6672 §2.3): every name below it redirects
APEX_DNAME_ZONE = """$ORIGIN dnapex.test.
$TTL 300
@ IN SOA ns1.example.test. hostmaster.example.test. 1 7200 3600 1209600 300
@ IN NS ns1.example.test.
@ IN DNAME elsewhere.invalid.
"""
KNOTD = shutil.which("knotd") or next(
    (p for p in ("/usr/sbin/knotd", "/usr/local/sbin/knotd") if Path(p).exists()), None
)

TYPES = [
    "A",
    "AAAA",
    "NS",
    "SOA",
    "MX",
    "TXT",
    "CNAME",
    "SRV",
    "PTR",
    "NAPTR",
    "CAA",
    "DS",
    "DNAME",
    "TYPE65534",
    "ANY",
]

EXTRA_NAMES = [
    "nx.example.test",
    "nx.www.example.test",
    "x.y.wild.example.test",
    "deep.sub.wild.example.test",
    "foo.cnamewild.example.test",
    "host.child.example.test",
    "a.b.child.example.test",
    "q.dn.example.test",
    "a.q.dnout.example.test",
    "b.c.example.test",
    # below a DNAME at the apex of the other zone, and that apex itself
    "dnapex.test",
    "www.dnapex.test",
    "A.b.DnApEx.test",
    "c.example.test",
    # 0x20-mixed case: the answers must not depend on the case of the query
    "WwW.ExAmPlE.TeSt",
    "ChIlD.example.test",
    "ExAmPlE.TeSt",
    "AlIaS.example.test",
    "X.WiLd.example.test",
    "HoSt.ChIlD.example.test",
    "Q.dN.example.test",
    "NX.example.TEST",
]

# TCP: every type for a sample of names that exercise each kind of answer (apex, plain,
# CNAME chain, wildcard, ENT, delegation, DNAME, the big RRset that is TC over UDP and
# the MX set whose additional section overflows).
TCP_NAMES = [
    "example.test",
    "www.example.test",
    "chain1.example.test",
    "x.wild.example.test",
    "foo.cnamewild.example.test",
    "c.example.test",
    "child.example.test",
    "host.child.example.test",
    "sibling.example.test",
    "q.dn.example.test",
    "a.q.dnout.example.test",
    "big.example.test",
    "manymx.example.test",
    "nx.example.test",
    "WwW.ExAmPlE.TeSt",
]


def zone_names() -> list[str]:
    """Every owner name in the test zone (dnspython is the reference parser)."""
    zone = dns.zone.from_file(str(ZONE_FILE), origin=ORIGIN, relativize=False, check_origin=False)
    names = sorted(zone.nodes, key=lambda n: n.to_text())
    return [n.to_text(omit_final_dot=True) for n in names]


# Known geodns bugs found by this test: (lowercased name, type) -> what is wrong.
# (name, type) -> reason, for geodns bugs found here and not yet fixed (xfail, strict).
# Found and fixed: QTYPE=CNAME below a DNAME chased the synthesized CNAME (RFC 6672 §3.1).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def case(name: str, rdtype: str, transport: str) -> object:
    bug = KNOWN_BUGS.get((name.lower(), rdtype))
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(name, rdtype, transport, id=f"{name}/{rdtype}/{transport}", marks=marks)


def cases() -> list[object]:
    params: list[object] = []
    for name in [*zone_names(), *EXTRA_NAMES]:
        for rdtype in TYPES:
            for transport in ("udp-edns", "udp"):
                params.append(case(name, rdtype, transport))
    for name in TCP_NAMES:
        for rdtype in TYPES:
            params.append(case(name, rdtype, "tcp"))
    return params


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    host: str
    port: int

    def ask(self, q: dns.message.Message, transport: str) -> dns.message.Message:
        if transport == "tcp":
            return dns.query.tcp(q, self.host, port=self.port, timeout=5)
        return dns.query.udp(q, self.host, port=self.port, timeout=5)


def free_port() -> int:
    """A port that was free for both UDP and TCP a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", port))
    return port


KNOT_CONF = """\
server:
    rundir: {tmp}/run
    listen: 127.0.0.1@{port}
log:
  - target: stderr
    any: info
database:
    storage: {tmp}/db
template:
  - id: default
    storage: {tmp}/zones
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: on
zone:
  - domain: example.test
  - domain: dnapex.test
"""


def _knot_ready(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    waiting = ["example.test.", "dnapex.test."]
    while waiting and time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        q = dns.message.make_query(waiting[0], "SOA")
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
            continue
        if r.rcode() == dns.rcode.NOERROR and r.answer:
            waiting.pop(0)
            continue
        time.sleep(0.05)  # started, zone not loaded yet (SERVFAIL)
    return not waiting


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if KNOTD is None:
        pytest.skip("knotd not installed: `make deb-tools` installs Debian's knot package")
    tmp = tmp_path_factory.mktemp("knot")
    for sub in ("run", "db", "zones"):
        (tmp / sub).mkdir()
    shutil.copy(ZONE_FILE, tmp / "zones" / "example.test.zone")
    (tmp / "zones" / "dnapex.test.zone").write_text(APEX_DNAME_ZONE)
    log = tmp / "knotd.log"
    for _attempt in range(5):
        port = free_port()
        conf = tmp / "knot.conf"
        conf.write_text(KNOT_CONF.format(tmp=tmp, port=port))
        with open(log, "wb") as out:
            proc = subprocess.Popen([KNOTD, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        if _knot_ready(port, proc, time.monotonic() + 10):
            break
        _stop(proc)
    else:
        pytest.fail(f"knotd did not start; its log:\n{log.read_text(errors='replace')}")
    try:
        yield Server("127.0.0.1", port)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM to this PID only
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def geodns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("geodns")
    files = {"example.test.zone": ZONE_FILE.read_text(), "dnapex.test.zone": APEX_DNAME_ZONE}
    with serve_files(tmp, files) as running:
        yield running


@pytest.fixture(scope="module")
def servers(knot: Server, geodns: Running) -> tuple[Server, Server]:
    return knot, Server(geodns.host, geodns.port)


# --------------------------------------------------------------------------- comparison


def make_query(name: str, rdtype: str, transport: str) -> dns.message.Message:
    edns = transport != "udp"
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, payload=1232)
    q.flags &= ~dns.flags.RD
    return q


RRsetKey = tuple[str, int, int]


def rrsets(section: list[dns.rrset.RRset]) -> dict[RRsetKey, tuple[int, frozenset[bytes]]]:
    """A section as {(lowercased owner, class, type): (ttl, {canonical rdata})}.

    RRs of one RRset that arrive as separate dnspython RRsets are merged; RRs of one
    RRset with different TTLs fail the test (RFC 2181 §5.2).
    """
    out: dict[RRsetKey, tuple[int, frozenset[bytes]]] = {}
    for rrset in section:
        key = (rrset.name.to_text().lower(), rrset.rdclass, rrset.rdtype)
        rdata = frozenset(rd.to_digestable(ORIGIN) for rd in rrset)
        if key in out:
            ttl, old = out[key]
            assert ttl == rrset.ttl, f"{key}: RRs with different TTLs in one RRset"
            rdata = old | rdata
        out[key] = (rrset.ttl, rdata)
    return out


def show(section: list[dns.rrset.RRset]) -> str:
    return "\n".join(rrset.to_text() for rrset in section) or "(empty)"


def describe(r: dns.message.Message) -> str:
    return (
        f"rcode={dns.rcode.to_text(r.rcode())} flags={dns.flags.to_text(r.flags)} "
        f"edns={r.edns}\n;; ANSWER\n{show(r.answer)}\n;; AUTHORITY\n{show(r.authority)}"
        f"\n;; ADDITIONAL\n{show(r.additional)}"
    )


def is_referral(r: dns.message.Message) -> bool:
    return not (r.flags & dns.flags.AA) and any(rs.rdtype == dns.rdatatype.NS for rs in r.authority)


def glue(r: dns.message.Message) -> dict[RRsetKey, tuple[int, frozenset[bytes]]]:
    """Address records in ADDITIONAL for the in-zone NS targets of a referral.

    In-domain glue (below the cut) and sibling glue (elsewhere in the zone): RFC 9471.
    """
    cut = next(rs for rs in r.authority if rs.rdtype == dns.rdatatype.NS)
    targets = {rd.target for rd in cut if rd.target.is_subdomain(ORIGIN)}
    wanted = [
        rs
        for rs in r.additional
        if rs.name in targets and rs.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
    ]
    return rrsets(wanted)


FLAGS = dns.flags.AA | dns.flags.TC
# Beyond what the issue requires (ANSWER; AUTHORITY on negative answers and referrals;
# glue), the two servers also agree on AUTHORITY for positive answers and on the whole
# ADDITIONAL section (MX/SRV/NS target addresses, and which of them are dropped when 512
# bytes overflow). RFC 2181 §9 lets a server leave out additional data, so a deliberate
# policy difference may switch this off; an accidental one should not.
COMPARE_ALL_SECTIONS = True


def compare(name: str, rdtype: str, knot: dns.message.Message, ours: dns.message.Message) -> None:
    ctx = f"{name} {rdtype}\n--- knot:\n{describe(knot)}\n--- geodns:\n{describe(ours)}"
    assert ours.rcode() == knot.rcode(), f"RCODE differs: {ctx}"
    assert ours.flags & FLAGS == knot.flags & FLAGS, f"AA/TC differ: {ctx}"
    assert (ours.edns >= 0) == (knot.edns >= 0), f"OPT presence differs: {ctx}"
    if knot.flags & dns.flags.TC:
        return
    assert rrsets(ours.answer) == rrsets(knot.answer), f"ANSWER differs: {ctx}"
    qtype = dns.rdatatype.from_text(rdtype)
    positive = any(rs.rdtype == qtype for rs in knot.answer)
    if knot.rcode() == dns.rcode.NXDOMAIN or not positive or is_referral(knot):
        assert rrsets(ours.authority) == rrsets(knot.authority), f"AUTHORITY differs: {ctx}"
    if is_referral(knot):
        assert glue(ours) == glue(knot), f"referral glue differs: {ctx}"
    if COMPARE_ALL_SECTIONS:
        assert rrsets(ours.authority) == rrsets(knot.authority), f"AUTHORITY differs: {ctx}"
        assert rrsets(ours.additional) == rrsets(knot.additional), f"ADDITIONAL differs: {ctx}"


def compare_any(
    name: str, transport: str, knot: dns.message.Message, ours: dns.message.Message
) -> None:
    """RFC 8482: Knot gives one RRset, geodns TC=1 over UDP and everything over TCP."""
    ctx = f"{name} ANY\n--- knot:\n{describe(knot)}\n--- geodns:\n{describe(ours)}"
    assert ours.rcode() == knot.rcode(), f"RCODE differs: {ctx}"
    assert (ours.edns >= 0) == (knot.edns >= 0), f"OPT presence differs: {ctx}"
    if knot.flags & dns.flags.TC:  # Knot's one RRset did not fit either
        assert ours.flags & FLAGS == knot.flags & FLAGS, f"AA/TC differ: {ctx}"
        return
    ours_tc = bool(ours.flags & dns.flags.TC)
    if ours_tc:
        # the geodns ANY policy: UDP only, empty sections, authoritative data exists
        assert transport != "tcp", f"TC over TCP: {ctx}"
        assert knot.flags & dns.flags.AA and knot.answer, f"TC for a non-ANY answer: {ctx}"
        assert ours.flags & dns.flags.AA, ctx
        assert not (ours.answer or ours.authority or ours.additional), ctx
        return
    assert ours.flags & dns.flags.AA == knot.flags & dns.flags.AA, f"AA differs: {ctx}"
    knot_ans, our_ans = rrsets(knot.answer), rrsets(ours.answer)
    if transport == "tcp" and knot.flags & dns.flags.AA:
        # full answer over TCP: Knot's minimal RRset must be one of ours, same data
        for key, value in knot_ans.items():
            assert our_ans.get(key) == value, f"ANY: knot's {key} missing in geodns: {ctx}"
        assert bool(our_ans) == bool(knot_ans), ctx
    else:
        assert our_ans == knot_ans, f"ANSWER differs: {ctx}"
    if not knot_ans or not (knot.flags & dns.flags.AA):
        assert rrsets(ours.authority) == rrsets(knot.authority), f"AUTHORITY differs: {ctx}"


@pytest.mark.parametrize(("name", "rdtype", "transport"), cases())
def test_same_answer_as_knot(
    servers: tuple[Server, Server], name: str, rdtype: str, transport: str
) -> None:
    knot, ours = servers
    q = make_query(name, rdtype, transport)
    knot_reply = knot.ask(q, transport)
    our_reply = ours.ask(q, transport)
    if rdtype == "ANY":
        compare_any(name, transport, knot_reply, our_reply)
    else:
        compare(name, rdtype, knot_reply, our_reply)


@pytest.fixture(scope="module")
def no_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """geodns without the packet cache: a repeated question comes from the fast path."""
    tmp = tmp_path_factory.mktemp("geodns-fast")
    files = {"example.test.zone": ZONE_FILE.read_text(), "dnapex.test.zone": APEX_DNAME_ZONE}
    with serve_files(tmp, files, "[server]\npacket_cache = false\n") as running:
        yield running


def raw_ask(srv: Running, wire: bytes, transport: str) -> bytes:
    """The reply's bytes as they came (UDP datagram, or one TCP message)."""
    if transport != "tcp":
        return raw_exchange(srv, wire)
    with socket.create_connection(srv.addr, timeout=5) as s:
        s.sendall(len(wire).to_bytes(2, "big") + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = s.recv(65535)
            assert chunk, "connection closed before the reply"
            buf += chunk
        return buf[2:]


def test_fast_path_same_answers_as_knot(knot: Server, no_cache: Running) -> None:
    """Every case above asked three times of a server without a packet cache: the full
    path answers the first two (and learns the question), the third reply is replayed
    from pre-rendered bytes (geodns/fastpath.py) and must match Knot's just the same."""
    fast = no_cache.app.handler.fast
    assert fast is not None
    before = fast.hits
    checked = 0
    for param in cases():
        name, rdtype, transport = param.values  # type: ignore[attr-defined]
        if (name.lower(), rdtype) in KNOWN_BUGS:
            continue
        q = make_query(name, rdtype, transport)
        knot_reply = knot.ask(q, transport)
        # raw bytes: dnspython's to_wire() shuffles the records of an RRset; the first
        # asking is answered by the full path, the second renders the answer (the fast
        # path's doorkeeper), the third is replayed when the fast path covers it
        first = raw_ask(no_cache, q.to_wire(), transport)
        raw_ask(no_cache, q.to_wire(), transport)
        again_raw = raw_ask(no_cache, q.to_wire(), transport)
        assert again_raw == first, (name, rdtype, transport)
        again = dns.message.from_wire(again_raw)
        if rdtype == "ANY":
            compare_any(name, transport, knot_reply, again)
        else:
            compare(name, rdtype, knot_reply, again)
        checked += 1
    # most third askings came from the fast path (not: ANY, truncated replies); the
    # later transports of a question are replayed from their first asking
    assert fast.hits - before > checked * 0.9, (fast.hits - before, checked)


# --------------------------------------------------------------------------- RFC checks


def raw_exchange(srv: Running, wire: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(wire, srv.addr)
        return s.recv(65535)


MIXED = [
    ("WwW.ExAmPlE.TeSt.", "A"),
    ("x.Y.WiLd.ExAmPlE.tEsT.", "A"),  # wildcard synthesis
    ("FoO.CnAmEwIlD.example.TEST.", "A"),  # CNAME wildcard, then the chased target
    ("ChAiN1.eXaMpLe.TeSt.", "A"),  # CNAME chain
    ("q.Dn.ExAmPlE.tEsT.", "A"),  # DNAME + synthesized CNAME
    ("nX.ExAmPlE.TeSt.", "A"),  # NXDOMAIN
    ("HoSt.ChIlD.ExAmPlE.TeSt.", "A"),  # referral
]


@pytest.mark.parametrize(("qname", "rdtype"), MIXED, ids=[f"{n}/{t}" for n, t in MIXED])
def test_question_echoed_byte_exact(geodns: Running, qname: str, rdtype: str) -> None:
    """RFC 1035 §4.1.1/§7.3: the question comes back exactly as sent (0x20 clients rely on it)."""
    q = dns.message.make_query(qname, rdtype, use_edns=0, payload=1232)
    wire = q.to_wire()
    question = wire[12 : 12 + len(dns.name.from_text(qname).to_wire() or b"") + 4]
    reply = raw_exchange(geodns, wire)
    assert reply[:2] == wire[:2], "ID not copied"
    assert reply[4:6] == b"\x00\x01", "QDCOUNT must be 1"
    assert reply[12 : 12 + len(question)] == question, (
        f"question not echoed byte-exact: sent {question!r}, got {reply[12 : 12 + len(question)]!r}"
    )


@pytest.mark.parametrize(("qname", "rdtype"), MIXED[:5], ids=[f"{n}/{t}" for n, t in MIXED[:5]])
def test_answer_owner_takes_query_case(geodns: Running, qname: str, rdtype: str) -> None:
    """The first answer RRset is owned by QNAME, spelled as the client spelled it.

    RFC 4592 §2.1.1 / RFC 6672 §3.1 synthesize records owned by QNAME; the case of a
    name in a reply that answers the question is the question's (RFC 1034 §3.1, RFC 4343).
    """
    r = geodns.query(qname, rdtype, use_edns=0, payload=1232)
    assert r.answer, r.to_text()
    owners = [rs.name for rs in r.answer]
    sent = dns.name.from_text(qname)
    at_qname = [n for n in owners if n == sent]  # case-insensitive equality
    assert at_qname, r.to_text()
    for n in at_qname:
        assert n.to_wire() == sent.to_wire(), f"owner {n} does not carry the query's case {sent}"
    assert r.question[0].name.to_wire() == sent.to_wire()


def test_rd_copied_ra_clear(geodns: Running) -> None:
    for rd in (True, False):
        q = dns.message.make_query("www.example.test.", "A")
        if not rd:
            q.flags &= ~dns.flags.RD
        r = dns.query.udp(q, geodns.host, port=geodns.port, timeout=5)
        assert bool(r.flags & dns.flags.RD) == rd
        assert not r.flags & dns.flags.RA
        assert r.flags & dns.flags.AA
