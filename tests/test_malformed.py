"""Bad input, EDNS0, opcodes and truncation: one named test per case (issue 3).

Every wire case runs three ways: through `Handler.handle` directly, over UDP and over
TCP against a real server on loopback. "Silence" over UDP is observed without a fixed
wait: a valid probe query follows the bad packet on the same socket, and the first
datagram that comes back must be the probe's answer. Over TCP, silence means the server
closes the connection without writing anything.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dnslib
import pytest

from geodns.handler import Handler, Settings
from geodns.model import Transport
from geodns.view import Catalog, GeoState, View, ViewHolder
from geodns.zones import name_to_wire, parse_zone

from .serverutil import Running, make_zone_dir, serve_files

ZONE = (Path(__file__).parent / "zones" / "example.test.zone").read_text()

# A delegation whose in-domain glue (RFC 9471: required) cannot fit in 512 octets,
# while the NS RRset alone does: the referral must come back with TC=1 over UDP.
_NS_NAMES = [f"ns{i:02d}.a-rather-long-label-for-glue-tests.sub" for i in range(1, 9)]
GLUE_ZONE = "\n".join(
    [
        "$ORIGIN glue.test.",
        "$TTL 3600",
        "@ IN SOA ns1 hostmaster 1 7200 3600 1209600 300",
        "@ IN NS ns1",
        "ns1 IN A 192.0.2.1",
        *(f"sub IN NS {n}" for n in _NS_NAMES),
        *(f"{n} IN A 192.0.2.{i}" for i, n in enumerate(_NS_NAMES, 10)),
        *(f"{n} IN AAAA 2001:db8::{i}" for i, n in enumerate(_NS_NAMES, 10)),
        "",
    ]
)
ZONES = {"example.test.zone": ZONE, "glue.test.zone": GLUE_ZONE}
NSID = b"ns1-test"
NO_API = '[api]\nlisten = ""\n'  # several servers run side by side: DNS only

OPT, TXT = 41, 16
ECS, COOKIE, NSID_CODE = 8, 10, 3
CLIENT = ("192.0.2.7", 40000)

# --------------------------------------------------------------------------------------
# fixtures: a handler over the test zones, and real servers (with and without NSID)


def build_handler(zone_dir: Path, nsid: bytes = b"") -> Handler:
    """A Handler over the zone files, built the way geodns/app.py builds one."""
    catalog = Catalog()
    for path in sorted(zone_dir.glob("*.zone")):
        origin = path.name.removesuffix(".zone") + "."
        catalog.set(name_to_wire(origin).lower(), parse_zone(path))
    return Handler(ViewHolder(View(catalog, GeoState())), Settings(nsid=nsid))


@pytest.fixture(scope="module")
def zone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zone_dir(tmp_path_factory.mktemp("zones"), ZONES)


@pytest.fixture(scope="module")
def handler(zone_dir: Path) -> Handler:
    return build_handler(zone_dir, NSID)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("srv")
    with serve_files(tmp, ZONES, f'[server]\nnsid = "{NSID.decode()}"\n' + NO_API) as running:
        yield running


@pytest.fixture(scope="module")
def server_no_nsid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve_files(tmp_path_factory.mktemp("srv2"), ZONES, NO_API) as running:
        yield running


# --------------------------------------------------------------------------------------
# packet construction


def header(
    id_: int = 0x1234, flags: int = 0, qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", id_, flags, qd, an, ns, ar)


def wname(text: str) -> bytes:
    """Presentation -> wire, without validation (so over-long names can be built)."""
    labels = [lab.encode() for lab in text.strip(".").split(".") if lab]
    return b"".join(bytes([len(lab)]) + lab for lab in labels) + b"\x00"


def question(name: str = "www.example.test", qtype: int = 1, qclass: int = 1) -> bytes:
    return wname(name) + struct.pack("!HH", qtype, qclass)


def opt_rr(
    options: Sequence[tuple[int, bytes]] = (),
    payload: int = 1232,
    version: int = 0,
    do: bool = False,
    owner: bytes = b"\x00",
    ext_rcode: int = 0,
) -> bytes:
    rdata = b"".join(struct.pack("!HH", c, len(v)) + v for c, v in options)
    ttl = (ext_rcode << 24) | (version << 16) | (0x8000 if do else 0)
    return owner + struct.pack("!HHIH", OPT, payload, ttl, len(rdata)) + rdata


def query(
    name: str = "www.example.test",
    qtype: int = 1,
    qclass: int = 1,
    id_: int = 0x1234,
    flags: int = 0x0100,
    opt: bytes | None = None,
) -> bytes:
    """A well-formed query (RD set by default), optionally with an OPT record."""
    ar = 1 if opt is not None else 0
    return header(id_, flags, qd=1, ar=ar) + question(name, qtype, qclass) + (opt or b"")


def ecs(family: int, source: int, address: bytes, scope: int = 0) -> tuple[int, bytes]:
    return ECS, struct.pack("!HBB", family, source, scope) + address


def a_rr(owner: bytes) -> bytes:
    return owner + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([192, 0, 2, 1])


# --------------------------------------------------------------------------------------
# the three ways of asking


def ask_udp(addr: tuple[str, int], packet: bytes, timeout: float = 5.0) -> bytes | None:
    """Send `packet`, then a probe; None when the probe's answer comes back first."""
    probe_id = 0xBEEF if packet[:2] != b"\xbe\xef" else 0xCAFE
    probe = query(id_=probe_id)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(addr)
        s.send(packet)
        s.send(probe)
        first = s.recv(65535)
        if first[:2] == probe[:2]:
            return None
        probe_reply = s.recv(65535)  # the probe is answered too: the server lives
        assert probe_reply[:2] == probe[:2]
        return first


def recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def ask_tcp(addr: tuple[str, int], packet: bytes, timeout: float = 5.0) -> bytes | None:
    """One framed message; None when the server closes the connection instead."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(struct.pack("!H", len(packet)) + packet)
        head = recv_exact(s, 2)
        if head is None:
            return None
        return recv_exact(s, struct.unpack("!H", head)[0])


VIAS = ["handler", "udp", "tcp"]


@pytest.fixture
def ask(request: pytest.FixtureRequest, handler: Handler) -> Callable[[bytes], bytes | None]:
    """ask(packet) -> reply bytes or None (silence), via the parametrized `via`."""
    via = request.node.callspec.params["via"]
    if via == "handler":
        tr = Transport.UDP
        return lambda packet: handler.handle(packet, CLIENT, tr)
    running: Running = request.getfixturevalue("server")
    if via == "udp":
        return lambda packet: ask_udp(running.addr, packet)
    return lambda packet: ask_tcp(running.addr, packet)


# --------------------------------------------------------------------------------------
# checks


def parse(reply: bytes | None) -> dns.message.Message:
    assert reply is not None, "expected an answer, got silence"
    return dns.message.from_wire(reply)


def hdr_of(reply: bytes) -> tuple[int, int, int, int, int, int]:
    return struct.unpack("!HHHHHH", reply[:12])


def options_of(m: dns.message.Message) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for o in m.options:
        assert o.otype not in out, f"option {o.otype} twice"
        wire = o.to_wire()
        assert wire is not None
        out[int(o.otype)] = wire
    return out


def check_silent(reply: bytes | None, packet: bytes) -> None:
    assert reply is None


def expect_rcode(
    rcode: int, echo_question: bool | None = None, opt: bool | None = None
) -> Callable[[bytes | None, bytes], None]:
    """The reply has `rcode`, QR=1, the query's ID, opcode and RD; no records; and,
    when `opt` says so, an OPT record (version 0) or none."""

    def check(reply: bytes | None, packet: bytes) -> None:
        assert reply is not None, "expected an answer, got silence"
        id_, flags, qd, an, ns, _ar = hdr_of(reply)
        qflags = struct.unpack("!H", packet[2:4])[0]
        assert id_ == struct.unpack("!H", packet[:2])[0], "ID not copied"
        assert flags & 0x8000, "QR not set"
        assert flags & 0x7800 == qflags & 0x7800, "opcode not copied"
        assert flags & 0x0100 == qflags & 0x0100, "RD not copied"
        assert not flags & 0x0080, "RA set"
        m = parse(reply)
        assert m.rcode() == rcode, dns.rcode.to_text(m.rcode())
        assert an == ns == 0
        if echo_question is not None:
            assert qd == (1 if echo_question else 0)
        if qd:
            name = m.question[0].name.to_wire()
            assert name is not None
            qlen = len(name) + 4
            assert reply[12 : 12 + qlen] == packet[12 : 12 + qlen], "question not byte-exact"
        if opt is not None:
            assert (m.opt is not None) == opt, "OPT expected" if opt else "unexpected OPT"
            assert m.edns == (0 if opt else -1)

    return check


FORMERR = expect_rcode(dns.rcode.FORMERR)
# no OPT in reply to a query without one (RFC 6891 §7)
FORMERR_NO_OPT = expect_rcode(dns.rcode.FORMERR, opt=False)
# RFC 6891 §7: "If an OPT record is present in a received request, compliant responders
# MUST include an OPT record in their respective responses": also in a FORMERR about the
# content of its options (RFC 7871 §7.1.1 / RFC 7873 §5.2.2 make those FORMERR)
FORMERR_OPT = expect_rcode(dns.rcode.FORMERR, opt=True)
BADVERS = expect_rcode(dns.rcode.BADVERS, echo_question=True, opt=True)


def expect_cookie_only(client: bytes) -> Callable[[bytes | None, bytes], None]:
    """RFC 7873 §5.4: NOERROR, the client cookie echoed, a fresh server cookie."""

    def check(reply: bytes | None, packet: bytes) -> None:
        expect_rcode(dns.rcode.NOERROR, echo_question=False)(reply, packet)
        cookie = options_of(parse(reply))[COOKIE]
        assert cookie[:8] == client
        assert 16 <= len(cookie) <= 40  # client (8) + server (8..32), RFC 7873 §4
        assert len(cookie) == 24  # an RFC 9018 server cookie is 16 octets

    return check


def _answered(reply: bytes | None, packet: bytes) -> None:
    m = parse(reply)
    assert m.rcode() == dns.rcode.NOERROR
    assert m.id == struct.unpack("!H", packet[:2])[0]
    assert len(m.answer) == 1


def _ecs_family_0_echoed(reply: bytes | None, packet: bytes) -> None:
    # dnspython refuses ECS FAMILY 0, so this reply is read with dnslib
    assert reply is not None
    rec = dnslib.DNSRecord.parse(reply)
    assert rec.header.id == struct.unpack("!H", packet[:2])[0]
    assert rec.header.rcode == dns.rcode.NOERROR
    assert len(rec.rr) == 2  # www.example.test A
    (opt,) = [rr for rr in rec.ar if rr.rtype == OPT]
    assert [(o.code, o.data) for o in opt.rdata] == [(ECS, bytes(4))]


@dataclass
class Case:
    id: str
    packet: bytes
    check: Callable[[bytes | None, bytes], None]


def _forward_pointer() -> bytes:
    base = header(qd=1, ar=1) + question()
    at = len(base)
    # the owner points 2 octets ahead, at the record's own TYPE field
    return base + a_rr(struct.pack("!H", 0xC000 | (at + 2)))


def _self_loop() -> bytes:
    base = header(qd=1, ar=1) + question()
    at = len(base)
    return base + a_rr(struct.pack("!H", 0xC000 | at))


def _mutual_loop() -> bytes:
    # two additional records whose owners point at each other
    base = header(qd=1, ar=2) + question()
    first = len(base)
    second = first + len(a_rr(b"\xc0\x00"))
    rr1 = a_rr(struct.pack("!H", 0xC000 | second))
    rr2 = a_rr(struct.pack("!H", 0xC000 | first))
    return base + rr1 + rr2


def _long_via_pointer() -> bytes:
    # a 249-octet question name, then an owner of 64 octets + a pointer to it: 313 > 255
    labels = ".".join(["a" * 61] * 4)  # 4 * 62 + 1 = 249 octets
    base = header(qd=1, ar=1) + question(labels)
    owner = b"\x3f" + b"b" * 63 + struct.pack("!H", 0xC000 | 12)
    return base + a_rr(owner)


def _name_of(octets: int) -> str:
    """A name of exactly `octets` wire octets (labels of up to 63)."""
    labels = []
    left = octets - 1  # the root label
    while left > 0:
        n = min(63, left - 1)
        assert n > 0, "cannot split into labels"
        labels.append("x" * n)
        left -= n + 1
    return ".".join(labels)


_ECS_V4_24 = ecs(1, 24, b"\xc0\x00\x02")
ECS_BAD: dict[str, list[tuple[int, bytes]]] = {
    "ecs-family-3": [ecs(3, 24, b"\xc0\x00\x02")],
    "ecs-v4-source-33": [ecs(1, 33, b"\xc0\x00\x02\x00\x00")],
    "ecs-v6-source-129": [ecs(2, 129, bytes(17))],
    "ecs-address-longer-than-prefix": [ecs(1, 16, b"\xc0\x00\x02")],
    "ecs-address-shorter-than-prefix": [ecs(1, 24, b"\xc0\x00")],
    "ecs-bits-beyond-prefix": [ecs(1, 23, b"\xc0\x00\x03")],
    "ecs-family-0-nonzero-source": [ecs(0, 8, b"\x0a")],
    "ecs-shorter-than-4-octets": [(ECS, b"\x00\x01\x18")],
    "ecs-twice": [_ECS_V4_24, _ECS_V4_24],
}


COOKIE_BAD_LENGTHS = [0, 1, 7, 9, 15, 41, 48]

SILENT_CASES = [
    Case("empty-packet", b"", check_silent),
    Case("short-1-byte", b"\x12", check_silent),
    Case("short-11-bytes", query()[:11], check_silent),
    Case("qr-set-query", query(flags=0x8100), check_silent),
    Case(
        "qr-set-response-with-answer",
        header(flags=0x8400, qd=1, an=1) + question() + a_rr(b"\xc0\x0c"),
        check_silent,
    ),
    Case("qr-set-malformed", header(flags=0x8000, qd=3), check_silent),
]

FORMERR_CASES = [
    Case("qdcount-1-no-question", header(qd=1), expect_rcode(1, echo_question=False, opt=False)),
    Case(
        "qdcount-1-truncated-qtype",
        header(qd=1) + wname("www.example.test") + b"\x00",
        FORMERR_NO_OPT,
    ),
    Case("ancount-5-nothing", header(qd=1, an=5) + question(), expect_rcode(1, True, opt=False)),
    Case("nscount-2-nothing", header(qd=1, ns=2) + question(), FORMERR_NO_OPT),
    Case("arcount-3-one-opt", header(qd=1, ar=3) + question() + opt_rr(), FORMERR_OPT),
    Case("rdata-past-end", header(qd=1, ar=1) + question() + a_rr(b"\x00")[:-2], FORMERR_NO_OPT),
    Case(
        "compression-pointer-in-question",
        header(qd=1) + b"\x03www" + struct.pack("!H", 0xC000 | 12) + b"\x00\x01\x00\x01",
        FORMERR_NO_OPT,
    ),
    Case("forward-pointer-in-additional", _forward_pointer(), FORMERR_NO_OPT),
    Case("pointer-loop-self-in-additional", _self_loop(), FORMERR_NO_OPT),
    Case("pointer-loop-mutual-in-additional", _mutual_loop(), FORMERR_NO_OPT),
    Case(
        "truncated-pointer-in-additional", header(qd=1, ar=1) + question() + b"\xc0", FORMERR_NO_OPT
    ),
    Case("question-name-256-octets", query(_name_of(256)), FORMERR_NO_OPT),
    Case("name-over-255-via-pointer", _long_via_pointer(), FORMERR_NO_OPT),
    Case("question-name-runs-past-end", header(qd=1) + b"\x3fabc", FORMERR_NO_OPT),
    Case(
        "label-type-0x40-in-question",
        header(qd=1) + b"\x41" + b"x" * 8 + b"\0\0\1\0\1",
        FORMERR_NO_OPT,
    ),
    Case(
        "label-type-0x80-in-question",
        header(qd=1) + b"\x81" + b"x" * 8 + b"\0\0\1\0\1",
        FORMERR_NO_OPT,
    ),
    Case(
        "label-type-0x40-in-additional",
        header(qd=1, ar=1) + question() + a_rr(b"\x41\x01x\x00"),
        FORMERR_NO_OPT,
    ),
    Case(
        "label-type-0x80-in-additional",
        header(qd=1, ar=1) + question() + a_rr(b"\x81\x01x\x00"),
        FORMERR_NO_OPT,
    ),
    Case("qdcount-2", header(qd=2) + question() * 2, expect_rcode(1, False, opt=False)),
    Case("qdcount-2-with-edns", header(qd=2, ar=1) + question() * 2 + opt_rr(), FORMERR),
    Case("qdcount-0-no-edns", header(), expect_rcode(1, False, opt=False)),
    Case("qdcount-0-edns-without-cookie", header(ar=1) + opt_rr(), FORMERR_OPT),
    Case("trailing-garbage-after-question", query() + b"\x00\x00junk", FORMERR_NO_OPT),
    Case("trailing-garbage-after-opt", query(opt=opt_rr()) + b"\x01", FORMERR_OPT),
    Case("two-opt-records", header(qd=1, ar=2) + question() + opt_rr() + opt_rr(), FORMERR_NO_OPT),
    Case("opt-owner-not-root", query(opt=opt_rr(owner=wname("example.test"))), FORMERR),
    Case("opt-option-runs-past-rdata", query(opt=opt_rr([(65001, b"abcd")])[:-1]), FORMERR),
    Case(
        "opt-option-header-truncated",
        header(qd=1, ar=1)
        + question()
        + b"\x00"
        + struct.pack("!HHIH", OPT, 1232, 0, 2)
        + b"\0\x0a",
        FORMERR_OPT,
    ),
    *(Case(k, query(opt=opt_rr(options)), FORMERR_OPT) for k, options in ECS_BAD.items()),
    *(
        Case(
            f"cookie-length-{n}",
            query(opt=opt_rr([(COOKIE, bytes(range(1, n + 1)))])),
            FORMERR_OPT,
        )
        for n in COOKIE_BAD_LENGTHS
    ),
    Case(
        "cookie-twice",
        query(opt=opt_rr([(COOKIE, b"c" * 8), (COOKIE, b"c" * 8)])),
        FORMERR_OPT,
    ),
    # RFC 6891 §6.1.3: an unknown version gets BADVERS; its options are not interpreted
    *(
        Case(f"badvers-with-{k}", query(opt=opt_rr(options, version=1)), BADVERS)
        for k, options in {
            "malformed-ecs": [ecs(3, 24, b"\xc0\x00\x02")],
            "malformed-cookie": [(COOKIE, b"1234567")],
            "two-ecs": [_ECS_V4_24, _ECS_V4_24],
        }.items()
    ),
]


GOOD_EDGE_CASES = [
    Case(
        "qdcount-0-with-client-cookie",
        header(ar=1) + opt_rr([(COOKIE, b"clientck")]),
        expect_cookie_only(b"clientck"),
    ),
    Case(
        "qdcount-0-with-bad-server-cookie",
        header(ar=1) + opt_rr([(COOKIE, b"clientck" + bytes(16))]),
        expect_cookie_only(b"clientck"),
    ),
    # compression in a record after the question is fine when it points backwards
    Case(
        "backward-pointer-in-additional-ok",
        header(qd=1, ar=1) + question() + a_rr(b"\x03foo\xc0\x0c"),
        _answered,
    ),
    # FAMILY 0 with SOURCE 0 and no address: accepted (as BIND does) and echoed
    Case(
        "ecs-family-0-source-0-accepted",
        query(opt=opt_rr([ecs(0, 0, b"")])),
        _ecs_family_0_echoed,
    ),
    # a 255-octet name is legal (and out of zone: REFUSED, not FORMERR)
    Case("question-name-255-octets", query(_name_of(255)), expect_rcode(dns.rcode.REFUSED, True)),
    *(
        Case(
            f"cookie-length-{n}-accepted",
            query(opt=opt_rr([(COOKIE, bytes(range(1, n + 1)))])),
            _answered,
        )
        for n in (8, 16, 40)
    ),
]


ALL_CASES = SILENT_CASES + FORMERR_CASES + GOOD_EDGE_CASES


def test_case_ids_unique() -> None:
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input(case: Case, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    case.check(ask(case.packet), case.packet)


# --------------------------------------------------------------------------------------
# opcodes, classes, types, names outside every zone


OPCODE_CASES = [
    ("notify", 4, dns.rcode.REFUSED),
    ("update", 5, dns.rcode.NOTIMP),
    ("iquery", 1, dns.rcode.NOTIMP),
    ("status", 2, dns.rcode.NOTIMP),
    ("opcode-3", 3, dns.rcode.NOTIMP),
    ("dso-6", 6, dns.rcode.NOTIMP),
    ("opcode-15", 15, dns.rcode.NOTIMP),
]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("opcode", "rcode"), [c[1:] for c in OPCODE_CASES], ids=[c[0] for c in OPCODE_CASES]
)
def test_opcode(opcode: int, rcode: int, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    packet = query("example.test", 6, flags=opcode << 11)
    expect_rcode(rcode, True)(ask(packet), packet)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("opcode", "rcode"), [c[1:] for c in OPCODE_CASES], ids=[c[0] for c in OPCODE_CASES]
)
def test_opcode_without_question(
    opcode: int, rcode: int, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    """NOTIFY/UPDATE/other opcodes with QDCOUNT 0 get their opcode's rcode, never NOERROR
    (for an UPDATE that would read as "applied"): RFC 7873 §5.4's cookie-only NOERROR is
    for QUERY. With a COOKIE, the cookie is still returned."""
    bare = header(flags=opcode << 11)
    with_cookie = header(flags=opcode << 11, ar=1) + opt_rr([(COOKIE, b"clientck")])
    for packet in (bare, with_cookie):
        reply = ask(packet)
        expect_rcode(rcode, echo_question=False)(reply, packet)
    assert options_of(parse(ask(with_cookie)))[COOKIE][:8] == b"clientck"


CLASS_CASES = [
    ("ch-txt-version-bind", "version.bind", 16, 3),
    ("hs", "www.example.test", 1, 4),
    ("class-none", "www.example.test", 1, 254),
    ("class-any", "www.example.test", 1, 255),
    ("ch-for-our-zone", "www.example.test", 1, 3),
]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("name", "qtype", "qclass"), [c[1:] for c in CLASS_CASES], ids=[c[0] for c in CLASS_CASES]
)
def test_non_in_class_refused(
    name: str, qtype: int, qclass: int, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    packet = query(name, qtype, qclass)
    expect_rcode(dns.rcode.REFUSED, True)(ask(packet), packet)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("qtype", [252, 251], ids=["axfr", "ixfr"])
def test_zone_transfer_refused(qtype: int, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    packet = query("example.test", qtype)
    expect_rcode(dns.rcode.REFUSED, True)(ask(packet), packet)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("name", ["www.example.org", "test", ".", "example.tes", "xexample.test"])
def test_outside_every_zone_refused(
    name: str, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    """REFUSED with no upward referral: ANSWER, AUTHORITY and ADDITIONAL empty, AA clear."""
    packet = query(name, 2 if name in (".", "test") else 1)
    reply = ask(packet)
    expect_rcode(dns.rcode.REFUSED, True)(reply, packet)
    assert reply is not None
    _, flags, _, an, ns, ar = hdr_of(reply)
    assert (an, ns, ar) == (0, 0, 0)
    assert not flags & 0x0400


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("rd", [True, False], ids=["rd", "no-rd"])
def test_header_flags(rd: bool, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    """RD copied, RA clear, AA on authoritative answers (incl. NXDOMAIN), not on referrals."""
    for name, qtype, aa in (
        ("www.example.test", 1, True),
        ("nothere.example.test", 1, True),
        ("www.example.test", 16, True),
        ("host.child.example.test", 1, False),
    ):
        packet = query(name, qtype, flags=0x0100 if rd else 0, id_=0x4242)
        m = parse(ask(packet))
        assert m.id == 0x4242
        assert bool(m.flags & dns.flags.RD) == rd
        assert not m.flags & dns.flags.RA
        assert bool(m.flags & dns.flags.AA) == aa, name


# --------------------------------------------------------------------------------------
# EDNS0 (RFC 6891)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("version", [1, 2, 255])
def test_badvers(version: int, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    """RFC 6891 §6.1.3: BADVERS = extended rcode 1 in the OPT, OPT version 0."""
    packet = query(opt=opt_rr(version=version))
    reply = ask(packet)
    assert reply is not None
    _, flags, qd, an, ns, ar = hdr_of(reply)
    assert flags & 0xF == 0  # the low 4 bits of 16
    assert (qd, an, ns, ar) == (1, 0, 0, 1)
    m = parse(reply)
    assert m.rcode() == dns.rcode.BADVERS
    assert m.edns == 0
    assert (m.ednsflags >> 24) & 0xFF == 1


@pytest.mark.parametrize("via", VIAS)
def test_unknown_option_ignored(via: str, ask: Callable[[bytes], bytes | None]) -> None:
    packet = query(opt=opt_rr([(65001, b"whatever"), (15, b"\x00\x00"), (65535, b"")]))
    m = parse(ask(packet))
    assert m.rcode() == dns.rcode.NOERROR
    assert len(m.answer) == 1
    assert options_of(m) == {}


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("do", [True, False], ids=["do", "no-do"])
def test_do_bit_copied(do: bool, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    for name in ("www.example.test", "nothere.example.test", "www.example.org"):
        m = parse(ask(query(name, opt=opt_rr(do=do))))
        assert bool(m.ednsflags & dns.flags.DO) == do


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("do", [True, False], ids=["do", "no-do"])
def test_do_bit_copied_in_error_replies(
    do: bool, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    """The OPT of a FORMERR, BADVERS or NOTIMP reply copies DO too."""
    for packet in (
        query(opt=opt_rr([ecs(3, 24, b"\xc0\x00\x02")], do=do)),  # FORMERR
        header(ar=1) + opt_rr(do=do),  # FORMERR: no question, no cookie
        query(opt=opt_rr(version=1, do=do)),  # BADVERS
        query("example.test", 6, flags=5 << 11, opt=opt_rr(do=do)),  # NOTIMP
    ):
        m = parse(ask(packet))
        assert m.edns == 0
        assert bool(m.ednsflags & dns.flags.DO) == do


@pytest.mark.parametrize("via", ["handler", "udp"])
@pytest.mark.parametrize("payload", [0, 1, 100, 200])
def test_small_payload_treated_as_512(
    payload: int, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    """RFC 6891 §6.2.5: a payload below 512 is 512: same reply as with 512."""
    small = ask(query("manymx.example.test", 15, opt=opt_rr(payload=payload)))
    full = ask(query("manymx.example.test", 15, opt=opt_rr(payload=512)))
    assert small is not None and full is not None
    m = parse(small)
    assert not m.flags & dns.flags.TC
    assert len(m.answer[0]) == 4
    assert len(small) > 250  # more than a literal small payload would allow
    assert small == full


REPLY_KINDS = [
    ("answer", query("www.example.test", 1)),
    ("nxdomain", query("nothere.example.test", 1)),
    ("nodata", query("www.example.test", 15)),
    ("referral", query("host.child.example.test", 1)),
    ("refused", query("www.example.org", 1)),
    ("notimp", query("example.test", 6, flags=5 << 11)),
    ("ch-refused", query("version.bind", 16, 3)),
    ("axfr", query("example.test", 252)),
    ("truncated", query("big.example.test", TXT)),
    ("any", query("www.example.test", 255)),
    ("additional", query("manymx.example.test", 15)),
]


def _with_opt(packet: bytes, opt: bytes) -> bytes:
    id_, flags, qd, an, ns, ar = hdr_of(packet)
    return header(id_, flags, qd, an, ns, ar + 1) + packet[12:] + opt


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("packet", [k[1] for k in REPLY_KINDS], ids=[k[0] for k in REPLY_KINDS])
def test_no_opt_without_edns(packet: bytes, via: str, ask: Callable[[bytes], bytes | None]) -> None:
    m = parse(ask(packet))
    assert m.edns == -1
    assert m.opt is None


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("packet", [k[1] for k in REPLY_KINDS], ids=[k[0] for k in REPLY_KINDS])
@pytest.mark.parametrize("payload", [512, 1232, 4096])
def test_one_opt_with_edns(
    packet: bytes, payload: int, via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    reply = ask(_with_opt(packet, opt_rr(payload=payload)))
    assert reply is not None
    m = parse(reply)  # dnspython rejects a second OPT (BadEDNS) and an OPT outside ADDITIONAL
    assert m.edns == 0
    opt_records = [rrset for rrset in m.additional if rrset.rdtype == OPT]
    assert not opt_records
    assert m.opt is not None and m.opt.name == dns.name.root
    assert m.payload <= 1232


def test_opt_rr_raw_count(handler: Handler) -> None:
    """Counted on the wire (independently of dnspython): one RR of type 41."""
    for _, packet in REPLY_KINDS:
        reply = handler.handle(_with_opt(packet, opt_rr()), CLIENT, Transport.UDP)
        assert reply is not None
        rec = dnslib.DNSRecord.parse(reply)
        assert sum(1 for rr in rec.ar if rr.rtype == OPT) == 1


@pytest.mark.parametrize("via", VIAS)
def test_nsid_when_configured(via: str, ask: Callable[[bytes], bytes | None]) -> None:
    m = parse(ask(query(opt=opt_rr([(NSID_CODE, b"")]))))
    assert options_of(m).get(NSID_CODE) == NSID
    # RFC 5001 §2.3: only to clients that asked
    m = parse(ask(query(opt=opt_rr())))
    assert NSID_CODE not in options_of(m)


@pytest.mark.parametrize("via", VIAS)
def test_nsid_absent_when_not_configured(
    via: str, zone_dir: Path, request: pytest.FixtureRequest
) -> None:
    packet = query(opt=opt_rr([(NSID_CODE, b"")]))
    if via == "handler":
        reply = build_handler(zone_dir).handle(packet, CLIENT, Transport.UDP)
    else:
        running: Running = request.getfixturevalue("server_no_nsid")
        reply = (ask_udp if via == "udp" else ask_tcp)(running.addr, packet)
    m = parse(reply)
    assert m.rcode() == dns.rcode.NOERROR
    assert NSID_CODE not in options_of(m)


ECS_GOOD = [
    ("v4-24", ecs(1, 24, b"\xc0\x00\x02")),
    ("v4-32", ecs(1, 32, b"\xc6\x33\x64\x07")),
    ("v4-23", ecs(1, 23, b"\xc0\x00\x02")),
    ("v6-56", ecs(2, 56, b"\x20\x01\x0d\xb8\x00\x01\x02")),
    ("v6-128", ecs(2, 128, b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01")),
    ("v4-source-0", ecs(1, 0, b"")),
    ("v6-source-0", ecs(2, 0, b"")),
]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("option", [e[1] for e in ECS_GOOD], ids=[e[0] for e in ECS_GOOD])
def test_ecs_echoed_with_scope_0(
    option: tuple[int, bytes], via: str, ask: Callable[[bytes], bytes | None]
) -> None:
    """RFC 7871 §7.2.1: FAMILY, SOURCE and ADDRESS echoed; SCOPE 0 for a static name."""
    for name, qtype in (("www.example.test", 1), ("nothere.example.test", 1)):
        m = parse(ask(query(name, qtype, opt=opt_rr([option]))))
        assert m.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
        got = options_of(m)[ECS]
        sent = option[1]
        assert got[:3] == sent[:3]  # family, source
        assert got[3] == 0  # scope
        assert got[4:] == sent[4:]  # address, byte-exact


# --------------------------------------------------------------------------------------
# truncation (RFC 2181 §9, RFC 6891 §7, RFC 9471)


def _udp(running: Running, q: dns.message.Message) -> dns.message.Message:
    return dns.query.udp(q, running.host, port=running.port, timeout=5, ignore_trailing=False)


def _tcp(running: Running, q: dns.message.Message) -> dns.message.Message:
    return dns.query.tcp(q, running.host, port=running.port, timeout=5)


def _mq(name: str, rdtype: str, **kw: object) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]


Exchange = Callable[[dns.message.Message, bool], dns.message.Message]


@pytest.fixture(params=["handler", "wire"])
def exchange(request: pytest.FixtureRequest, handler: Handler) -> Exchange:
    """exchange(query, tcp) -> reply: through the handler or over real sockets."""
    if request.param == "handler":

        def via_handler(q: dns.message.Message, tcp: bool) -> dns.message.Message:
            wire = q.to_wire()
            tr = Transport.TCP if tcp else Transport.UDP
            reply = handler.handle(wire, CLIENT, tr)
            assert reply is not None
            if not tcp:
                limit = min(q.payload, 1232) if q.edns >= 0 else 512
                assert len(reply) <= max(512, limit)
            return dns.message.from_wire(reply)

        return via_handler
    running: Running = request.getfixturevalue("server")

    def via_wire(q: dns.message.Message, tcp: bool) -> dns.message.Message:
        return _tcp(running, q) if tcp else _udp(running, q)

    return via_wire


def test_big_txt_truncated_without_edns(exchange: Exchange) -> None:
    m = exchange(_mq("big.example.test", "TXT", use_edns=False), False)
    assert m.flags & dns.flags.TC
    assert m.edns == -1
    assert m.rcode() == dns.rcode.NOERROR


def test_big_txt_truncated_with_edns_512_keeps_opt(exchange: Exchange) -> None:
    m = exchange(_mq("big.example.test", "TXT", use_edns=0, payload=512), False)
    assert m.flags & dns.flags.TC
    assert m.edns == 0  # RFC 6891 §7: the OPT is kept in a truncated reply


def test_big_txt_fits_with_edns_1232(exchange: Exchange) -> None:
    m = exchange(_mq("big.example.test", "TXT", use_edns=0, payload=1232), False)
    assert not m.flags & dns.flags.TC
    assert len(m.answer[0]) == 6


@pytest.mark.parametrize("use_edns", [False, 0], ids=["no-edns", "edns"])
def test_big_txt_full_over_tcp(exchange: Exchange, use_edns: int | bool) -> None:
    m = exchange(_mq("big.example.test", "TXT", use_edns=use_edns, payload=512), True)
    assert not m.flags & dns.flags.TC
    assert m.flags & dns.flags.AA
    assert len(m.answer) == 1 and len(m.answer[0]) == 6


def test_manymx_drops_additional_without_tc(exchange: Exchange) -> None:
    """RFC 2181 §9: optional additional data that does not fit is dropped, no TC."""
    udp = exchange(_mq("manymx.example.test", "MX", use_edns=False), False)
    tcp = exchange(_mq("manymx.example.test", "MX", use_edns=False), True)
    assert not udp.flags & dns.flags.TC
    assert len(udp.answer) == 1 and len(udp.answer[0]) == 4
    assert udp.answer == tcp.answer
    assert len(udp.additional) < len(tcp.additional)  # something was dropped...
    assert len(udp.additional) > 0  # ...but not everything
    full = {(r.name, r.rdtype): r for r in tcp.additional}
    assert len(full) == 8  # A and AAAA of mx1..mx4
    for rrset in udp.additional:  # what is there is whole RRsets
        assert rrset == full[(rrset.name, rrset.rdtype)]


def test_referral_glue_present_when_it_fits(exchange: Exchange) -> None:
    m = exchange(_mq("host.child.example.test", "A", use_edns=False), False)
    assert not m.flags & dns.flags.TC
    assert not m.flags & dns.flags.AA
    assert m.rcode() == dns.rcode.NOERROR
    assert not m.answer
    assert {str(r.name) for r in m.authority} == {"child.example.test."}
    glue = {(str(r.name), dns.rdatatype.to_text(r.rdtype)) for r in m.additional}
    assert glue == {("ns1.child.example.test.", "A"), ("ns1.child.example.test.", "AAAA")}


def test_referral_glue_not_fitting_sets_tc(exchange: Exchange) -> None:
    """RFC 9471 §3: in-domain glue that does not fit in 512 octets -> TC=1."""
    m = exchange(_mq("host.sub.glue.test", "A", use_edns=False), False)
    assert m.flags & dns.flags.TC
    tcp = exchange(_mq("host.sub.glue.test", "A", use_edns=False), True)
    assert not tcp.flags & dns.flags.TC
    assert len(tcp.authority[0]) == len(_NS_NAMES)
    assert sum(len(r) for r in tcp.additional) == 2 * len(_NS_NAMES)
    # the NS RRset alone fits in 512: it really is the glue that overflows
    assert len(tcp.to_wire(max_size=65535)) > 512
    edns = exchange(_mq("host.sub.glue.test", "A", use_edns=0, payload=1232), False)
    assert not edns.flags & dns.flags.TC
    assert sum(len(r) for r in edns.additional) == 2 * len(_NS_NAMES)


@pytest.mark.parametrize("use_edns", [False, 0], ids=["no-edns", "edns"])
def test_any_over_udp_truncated(exchange: Exchange, use_edns: int | bool) -> None:
    m = exchange(_mq("www.example.test", "ANY", use_edns=use_edns), False)
    assert m.flags & dns.flags.TC
    assert m.edns == (0 if use_edns is not False else -1)


def test_any_over_tcp_full(exchange: Exchange) -> None:
    m = exchange(_mq("www.example.test", "ANY", use_edns=False), True)
    assert not m.flags & dns.flags.TC
    assert m.flags & dns.flags.AA
    types = {dns.rdatatype.to_text(r.rdtype) for r in m.answer}
    assert types == {"A", "AAAA"}
    apex = exchange(_mq("example.test", "ANY", use_edns=False), True)
    assert {dns.rdatatype.to_text(r.rdtype) for r in apex.answer} >= {
        "SOA",
        "NS",
        "MX",
        "TXT",
        "A",
        "AAAA",
        "CAA",
    }
