"""Property-based fuzzing of the query path (issue 3, "Bad input").

Seeds are well-formed messages of many shapes built with dnspython (types, classes,
opcodes, EDNS options, ECS, cookies, NSID, TSIG, UPDATE, responses); hypothesis mutates
them (bit flips, insertions, deletions, truncation, lying counts, overwritten regions)
and also builds messages from random EDNS options and random label bytes.

Properties: `Handler.handle` never raises; it returns None or a reply that dnspython
parses, with QR=1, the query's ID and opcode, and over UDP no bigger than the client's
limit; a message with QR=1 is never answered. The live server takes the same abuse over
UDP and TCP, logs no handler failure, and still answers normal queries afterwards.

Deterministic (derandomize=True) and bounded: the whole module runs in a few seconds.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import dnslib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geodns import server as server_mod
from geodns.cache import PacketCache
from geodns.cookies import CookieJar
from geodns.handler import Handler, Settings
from geodns.model import Transport
from geodns.view import Catalog, GeoState, View, ViewHolder
from geodns.wire import BadQuery, decode_query
from geodns.zones import name_to_wire, parse_zone

from .serverutil import Running, serve_files

ZONE_PATH = Path(__file__).parent / "zones" / "example.test.zone"
CLIENT = ("192.0.2.7", 40000)
MAX_UDP = 1232

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------
# seeds


def _seeds() -> list[bytes]:
    out: list[bytes] = []
    names = [
        "www.example.test",
        "WwW.ExAmPlE.tEsT",
        "example.test",
        "big.example.test",
        "manymx.example.test",
        "host.child.example.test",
        "child.example.test",
        "alias.example.test",
        "loop1.example.test",
        "x.dn.example.test",
        "a.wild.example.test",
        "b.c.example.test",
        "nothere.example.test",
        "www.example.org",
        ".",
    ]
    types = ["A", "AAAA", "MX", "TXT", "NS", "SOA", "ANY", "SRV", "CAA", "DS", "PTR", "CNAME"]
    for i, name in enumerate(names):
        for j, rdtype in enumerate(types):
            if (i + j) % 3:  # a spread, not the full product
                continue
            out.append(dns.message.make_query(name, rdtype, use_edns=False).to_wire())
    option_sets: list[list[dns.edns.Option]] = [
        [],
        [dns.edns.ECSOption("192.0.2.0", 24)],
        [dns.edns.ECSOption("2001:db8::", 56)],
        [dns.edns.ECSOption("0.0.0.0", 0)],
        [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"clientck")],
        [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"clientck" + bytes(16))],
        [dns.edns.GenericOption(dns.edns.OptionType.NSID, b"")],
        [dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(40))],
        [dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"unknown")],
        [
            dns.edns.ECSOption("198.51.100.7", 32),
            dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"clientck"),
            dns.edns.GenericOption(dns.edns.OptionType.NSID, b""),
        ],
    ]
    for k, options in enumerate(option_sets):
        for payload, do in ((512, False), (1232, True), (4096, False), (100, True)):
            q = dns.message.make_query(
                names[k % len(names)],
                types[k % len(types)],
                use_edns=0,
                payload=payload,
                want_dnssec=do,
                options=options,
            )
            out.append(q.to_wire())
    badvers = dns.message.make_query("www.example.test", "A", use_edns=1)
    out.append(badvers.to_wire())
    # QDCOUNT 0 with a cookie (RFC 7873 §5.4)
    cookie_only = dns.message.Message()
    cookie_only.use_edns(
        0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"clientck")]
    )
    out.append(cookie_only.to_wire())
    # other classes and opcodes
    out.append(dns.message.make_query("version.bind", "TXT", "CH").to_wire())
    out.append(dns.message.make_query("example.test", "AXFR").to_wire())
    notify = dns.message.make_query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    out.append(notify.to_wire())
    update = dns.update.UpdateMessage("example.test")
    update.add("x", 300, "A", "192.0.2.1")
    update.delete("www")
    out.append(update.to_wire())
    signed = dns.message.make_query("www.example.test", "A")
    signed.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0c2VjcmV0"}))
    out.append(signed.to_wire())
    # a query carrying records in every section (compression pointers to mutate)
    q = dns.message.make_query("www.example.test", "A", use_edns=0)
    resp = dns.message.make_response(q)
    resp.answer.append(dns.rrset.from_text("www.example.test.", 60, "IN", "A", "192.0.2.80"))
    resp.authority.append(dns.rrset.from_text("example.test.", 60, "IN", "NS", "ns1.example.test."))
    resp.additional.append(dns.rrset.from_text("ns1.example.test.", 60, "IN", "A", "192.0.2.53"))
    wire = bytearray(resp.to_wire())
    out.append(bytes(wire))  # a response: must stay unanswered
    wire[2] &= 0x7F  # ... and the same records sent as a query
    out.append(bytes(wire))
    return out


SEEDS = _seeds()

# --------------------------------------------------------------------------------------
# strategies


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One random edit of `data`."""
    buf = bytearray(data)
    n = len(buf)
    kind = draw(
        st.sampled_from(
            ["flip", "insert", "delete", "truncate", "count", "overwrite", "append", "splice"]
        )
    )
    pos = draw(st.integers(0, max(n - 1, 0)))
    if kind == "flip" and n:
        buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "insert":
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete" and n:
        del buf[pos : pos + draw(st.integers(1, 8))]
    elif kind == "truncate":
        del buf[pos:]
    elif kind == "count" and n >= 12:
        which = draw(st.integers(0, 3))
        value = draw(st.one_of(st.integers(0, 4), st.integers(0, 0xFFFF)))
        struct.pack_into("!H", buf, 4 + 2 * which, value)
    elif kind == "overwrite" and n:
        chunk = draw(st.binary(min_size=1, max_size=6))
        buf[pos : pos + len(chunk)] = chunk
    elif kind == "append":
        buf += draw(st.binary(min_size=1, max_size=16))
    elif kind == "splice" and n:
        # copy a region elsewhere (duplicates names, records, pointers)
        start = draw(st.integers(0, n - 1))
        buf[pos:pos] = buf[start : start + draw(st.integers(1, 24))]
    return bytes(buf)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        data = draw(mutation(data))
    return data


OPTION_CODES = st.one_of(st.sampled_from([3, 8, 10, 12, 15, 65001]), st.integers(0, 0xFFFF))


@st.composite
def ecs_data(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([0, 1, 2, 3]))
    source = draw(st.integers(0, 140))
    scope = draw(st.integers(0, 2))
    addr = draw(st.binary(max_size=17))
    return struct.pack("!HBB", family, source, scope) + addr


@st.composite
def with_random_options(draw: st.DrawFn) -> bytes:
    """A question plus an OPT of random options (valid-looking and junk)."""
    options = draw(
        st.lists(
            st.one_of(
                st.tuples(OPTION_CODES, st.binary(max_size=48)),
                st.tuples(st.just(8), ecs_data()),
                st.tuples(st.just(10), st.binary(min_size=6, max_size=42)),
            ),
            max_size=4,
        )
    )
    rdata = b"".join(struct.pack("!HH", c, len(v)) + v for c, v in options)
    payload = draw(st.one_of(st.sampled_from([0, 511, 512, 1232, 65535]), st.integers(0, 0xFFFF)))
    version = draw(st.sampled_from([0, 0, 0, 1, 255]))
    flags = draw(st.sampled_from([0, 0x8000, 0xFFFF]))
    qd = dns.message.make_query(
        draw(st.sampled_from(["www.example.test", "big.example.test", "x.example.org"])),
        draw(st.sampled_from(["A", "AAAA", "TXT", "ANY", "MX"])),
        use_edns=False,
    ).to_wire()
    opt = b"\x00" + struct.pack("!HHIH", 41, payload, (version << 16) | flags, len(rdata)) + rdata
    head = bytearray(qd[:12])
    struct.pack_into("!H", head, 10, 1)
    return bytes(head) + qd[12:] + opt


@st.composite
def random_labels(draw: st.DrawFn) -> bytes:
    """A header with random flags and a question whose labels are arbitrary octets."""
    labels = draw(st.lists(st.binary(min_size=1, max_size=63), max_size=6))
    if draw(st.booleans()):
        labels += [b"example", b"test"]
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
    qtype = draw(
        st.one_of(st.sampled_from([1, 2, 6, 15, 16, 28, 41, 251, 252, 255]), st.integers(0, 0xFFFF))
    )
    qclass = draw(st.sampled_from([1, 1, 1, 3, 4, 254, 255, 0]))
    flags = draw(st.integers(0, 0xFFFF)) & ~0x8000  # a query
    id_ = draw(st.integers(0, 0xFFFF))
    return struct.pack("!HHHHHH", id_, flags, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, qclass)


ANY_INPUT = st.one_of(mutated(), with_random_options(), random_labels(), st.binary(max_size=64))

# --------------------------------------------------------------------------------------
# the properties


@pytest.fixture(scope="module")
def handler() -> Handler:
    catalog = Catalog()
    catalog.set(name_to_wire("example.test.").lower(), parse_zone(ZONE_PATH))
    # a fixed clock: server cookies, and so whole replies, are a function of the input
    jar = CookieJar(b"fuzz-secret-0123", clock=lambda: 1_750_000_000.0)
    return Handler(ViewHolder(View(catalog, GeoState())), Settings(nsid=b"ns1-fuzz"), cookies=jar)


@pytest.fixture(scope="module")
def cached(handler: Handler) -> PacketCache:
    return PacketCache(handler)


def udp_limit(data: bytes) -> int:
    """The most a UDP reply to `data` may carry: 512, or the EDNS payload capped at ours."""
    try:
        q = decode_query(data)
    except BadQuery:
        return 512
    if q is None or q.edns is None:
        return 512
    return max(512, min(q.edns.payload, MAX_UDP))


def check_reply(data: bytes, reply: bytes | None, transport: Transport) -> None:
    """What any reply (or silence) to `data` must look like."""
    if len(data) < 12 or data[2] & 0x80:
        assert reply is None, "answered a response or a headerless packet"
        return
    if reply is None:
        return
    assert reply[2] & 0x80, "QR not set"
    assert reply[:2] == data[:2], "ID not copied"
    assert (reply[2] ^ data[2]) & 0x78 == 0, "opcode not copied"
    if transport is Transport.UDP:
        assert len(reply) <= udp_limit(data)
    assert independent_parse(reply) in (-1, 0)  # we only ever speak EDNS version 0


def independent_parse(reply: bytes) -> int:
    """Parse the whole reply with dnspython; return its EDNS version (-1: no OPT).

    The opcode is read as QUERY (it was checked by the caller): dnspython applies RFC 2136
    rules to an UPDATE's zone section, which an echoed junk question need not follow.
    dnspython also refuses an ECS option of FAMILY 0, which the server accepts with
    SOURCE 0 (as BIND does) and echoes (RFC 7871 §7.2.1): such replies go to dnslib.
    """
    as_query = reply[:2] + bytes([reply[2] & 0x87]) + reply[3:]
    try:
        return dns.message.from_wire(as_query).edns
    except dns.exception.FormError:
        rec = dnslib.DNSRecord.parse(reply)
        opts = [rr for rr in rec.ar if rr.rtype == 41]
        assert len(opts) == 1
        assert any(o.code == 8 and o.data[:2] == b"\0\0" for o in opts[0].rdata), (
            "a reply dnspython cannot parse"
        )
        return (opts[0].ttl >> 16) & 0xFF


@settings(FUZZ, max_examples=3000)
@given(data=ANY_INPUT, tcp=st.booleans())
def test_handler_never_raises(handler: Handler, data: bytes, tcp: bool) -> None:
    transport = Transport.TCP if tcp else Transport.UDP
    check_reply(data, handler.handle(data, CLIENT, transport), transport)


@settings(FUZZ, max_examples=400)
@given(data=ANY_INPUT)
def test_response_never_answered(handler: Handler, data: bytes) -> None:
    if len(data) < 12:
        data = data + bytes(12 - len(data))
    response = data[:2] + bytes([data[2] | 0x80]) + data[3:]
    assert handler.handle(response, CLIENT, Transport.UDP) is None
    assert handler.handle(response, CLIENT, Transport.TCP) is None


@pytest.fixture(scope="module")
def full_path(handler: Handler) -> Handler:
    """The same view and cookie secret, without the fast path (pre-rendered answers)."""
    return Handler(
        handler.holder,
        Settings(nsid=b"ns1-fuzz", fast_path=False),
        cookies=handler.cookies,
    )


@settings(FUZZ, max_examples=1500)
@given(data=ANY_INPUT, tcp=st.booleans(), new_id=st.integers(0, 0xFFFF))
def test_fast_path_gives_the_full_paths_replies(
    handler: Handler, full_path: Handler, data: bytes, tcp: bool, new_id: int
) -> None:
    """Whatever the input, the fast path's reply is the full path's, byte for byte:
    the first time (learned), again (replayed) and under another ID. The handler is
    shared by all examples, so questions learned from one input meet other inputs'
    headers and OPT records (and malformed ones)."""
    transport = Transport.TCP if tcp else Transport.UDP
    for q in (data, data, struct.pack("!H", new_id) + data[2:] if len(data) >= 2 else data):
        assert handler.handle(q, CLIENT, transport) == full_path.handle(q, CLIENT, transport)


def test_seeds_are_replayed_by_the_fast_path(handler: Handler, full_path: Handler) -> None:
    """The seeds asked twice: the second time most come from the fast path, unchanged."""
    fast = Handler(handler.holder, Settings(nsid=b"ns1-fuzz"), cookies=handler.cookies)
    assert fast.fast is not None
    for seed in SEEDS:
        for _ in range(2):
            for transport in (Transport.UDP, Transport.TCP):
                assert fast.handle(seed, CLIENT, transport) == full_path.handle(
                    seed, CLIENT, transport
                )
    assert fast.fast.hits >= len(SEEDS) // 2, (fast.fast.hits, len(SEEDS))


@settings(FUZZ, max_examples=1000)
@given(data=ANY_INPUT, tcp=st.booleans(), new_id=st.integers(0, 0xFFFF))
def test_packet_cache_gives_the_handlers_replies(
    handler: Handler, cached: PacketCache, data: bytes, tcp: bool, new_id: int
) -> None:
    """The packet cache in front of the handler changes nothing on the wire: the same
    reply for the same bytes (hit or miss), and a hit under another ID is the fresh
    answer to that ID. The cache is shared by all examples, so hits and near-collisions
    between different inputs happen too."""
    transport = Transport.TCP if tcp else Transport.UDP
    assert cached.handle(data, CLIENT, transport) == handler.handle(data, CLIENT, transport)
    if len(data) >= 2:
        other = struct.pack("!H", new_id) + data[2:]
        reply = cached.handle(other, CLIENT, transport)
        assert reply == handler.handle(other, CLIENT, transport)
        check_reply(other, reply, transport)


def test_seeds_are_answered(handler: Handler) -> None:
    """The unmutated seeds exercise the real paths: every query among them is answered."""
    answered = 0
    for seed in SEEDS:
        reply = handler.handle(seed, CLIENT, Transport.UDP)
        check_reply(seed, reply, Transport.UDP)
        answered += reply is not None
    assert answered == sum(1 for s in SEEDS if not s[2] & 0x80)


# --------------------------------------------------------------------------------------
# the live server


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, _Collect]]:
    collect = _Collect()
    logger = logging.getLogger(server_mod.__name__)
    logger.addHandler(collect)
    suppressed = server_mod._errors.suppressed
    files = {"example.test.zone": ZONE_PATH.read_text()}
    try:
        no_api = '[api]\nlisten = ""\n'
        with serve_files(tmp_path_factory.mktemp("fuzz"), files, no_api) as running:
            yield running, collect
            # after the abuse: normal questions still get normal answers
            for tcp in (False, True):
                m = running.query("www.example.test", "A", tcp=tcp)
                assert m.rcode() == dns.rcode.NOERROR and len(m.answer[0]) == 2
        assert not collect.records, [r.getMessage() for r in collect.records]
        assert server_mod._errors.suppressed == suppressed, "handler failures were logged"
    finally:
        logger.removeHandler(collect)


@settings(FUZZ, max_examples=500)
@given(data=ANY_INPUT)
def test_live_udp_survives(live: tuple[Running, _Collect], data: bytes) -> None:
    running, _ = live
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(running.addr)
        s.send(data)
        # a probe behind it: whatever the fuzz packet got, the server is still there
        probe = dns.message.make_query("www.example.test", "A", use_edns=False)
        probe.id = 0xBEEF if data[:2] != b"\xbe\xef" else 0xCAFE
        s.send(probe.to_wire())
        while True:
            reply = s.recv(65535)
            if reply[:2] == struct.pack("!H", probe.id):
                break
            check_reply(data, reply, Transport.UDP)


def _framed_stream(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


@st.composite
def tcp_streams(draw: st.DrawFn) -> bytes:
    """One to three framed messages, then (sometimes) mutations of the framing itself."""
    messages = draw(st.lists(ANY_INPUT, min_size=1, max_size=3))
    stream = _framed_stream(messages)
    for _ in range(draw(st.integers(0, 2))):
        stream = draw(mutation(stream))
    return stream


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65535)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


@settings(FUZZ, max_examples=300)
@given(stream=tcp_streams())
def test_live_tcp_survives(live: tuple[Running, _Collect], stream: bytes) -> None:
    running, _ = live
    with socket.create_connection(running.addr, timeout=5) as s:
        s.sendall(stream)
        s.shutdown(socket.SHUT_WR)  # the server answers what it can, then closes
        replies = _recv_all(s)
    pos = 0
    while pos + 2 <= len(replies):
        (size,) = struct.unpack_from("!H", replies, pos)
        reply = replies[pos + 2 : pos + 2 + size]
        assert len(reply) == size, "a reply was cut short"
        assert reply[2] & 0x80
        independent_parse(reply)
        pos += 2 + size
    assert pos == len(replies)
