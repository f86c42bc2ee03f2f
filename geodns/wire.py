"""DNS wire format for the query path: strict decoding of queries, encoding of replies.

Hand-written rather than dnslib: the server must decide FORMERR vs silence on exactly
the rules of RFC 1035 / 6891 / 7871 / 7873 (dnslib accepts or rejects differently), and
the query path must not build an object tree per packet (dnslib's parse + pack costs
~30 us, MEASUREMENTS.md). dnslib and dnspython serve as independent decoders in tests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from .errors import FormError
from .zones import COMPRESSIBLE, OPT, RRset

# header flag bits
QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010
# rcodes (RFC 1035 §4.1.1, RFC 6891 §9 for BADVERS, RFC 7873 §8 for BADCOOKIE)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, NOTAUTH = 0, 1, 2, 3, 4, 5, 9
BADVERS, BADCOOKIE = 16, 23
# opcodes
OP_QUERY, OP_NOTIFY, OP_UPDATE = 0, 4, 5
# EDNS option codes
OPT_NSID, OPT_ECS, OPT_COOKIE = 3, 8, 10
CLASS_IN, CLASS_CH = 1, 3
TSIG = 250

_HDR = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_QTAIL = struct.Struct("!HH")


@dataclass(slots=True)
class ClientSubnet:
    """The ECS option of a query (RFC 7871 §6), validated."""

    family: int
    source: int
    scope: int
    address: bytes  # exactly as sent (ceil(source/8) bytes)
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None for FAMILY 0


@dataclass(slots=True)
class Edns:
    """The OPT record of a query (RFC 6891 §6)."""

    payload: int
    version: int
    do: bool
    ecs: ClientSubnet | None = None
    cookie: bytes | None = None  # the whole COOKIE option data
    nsid: bool = False


@dataclass(slots=True)
class Query:
    """A decoded query: just what answering needs."""

    id: int
    flags: int
    opcode: int
    qname: bytes  # wire, as received (0x20 case kept)
    qtype: int
    qclass: int
    question: bytes  # raw question section for the echo
    edns: Edns | None
    qdcount: int = 1
    label_offsets: tuple[int, ...] = field(default=())

    @property
    def qname_lower(self) -> bytes:
        return self.qname.lower()


class BadQuery(FormError):
    """A query we can answer only with an error rcode (the header was readable)."""

    def __init__(
        self,
        msg: str,
        id_: int,
        flags: int,
        rcode: int,
        question: bytes = b"",
        edns: Edns | None = None,
    ) -> None:
        super().__init__(msg)
        self.id = id_
        self.flags = flags
        self.rcode = rcode
        self.question = question
        self.edns = edns


def _skip_name(data: bytes, pos: int) -> int:
    """Validate a (possibly compressed) name at pos; return the offset after it.

    Pointers must point strictly backwards (a forward pointer or a loop is malformed,
    RFC 1035 §4.1.4 only defines pointers to prior occurrences); names are at most
    255 octets (RFC 1035 §2.3.4).
    """
    end = -1
    total = 0
    limit = pos
    hops = 0
    n = len(data)
    while True:
        if pos >= n:
            raise FormError("name runs past the end of the message")
        c = data[pos]
        if c == 0:
            total += 1
            if total > 255:
                raise FormError("name longer than 255 octets")
            return pos + 1 if end < 0 else end
        kind = c & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise FormError("truncated compression pointer")
            target = ((c & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= limit:
                raise FormError("compression pointer does not point backwards")
            hops += 1
            if hops > 127:
                raise FormError("compression loop")
            limit = target
            pos = target
            continue
        if kind:
            raise FormError("unsupported label type (RFC 6891 §5)")
        total += c + 1
        if total > 255:
            raise FormError("name longer than 255 octets")
        pos += c + 1


def _parse_qname(data: bytes, pos: int) -> tuple[int, tuple[int, ...]]:
    """The question name: no compression possible (nothing before it but the header)."""
    offsets: list[int] = []
    start = pos
    n = len(data)
    while True:
        if pos >= n:
            raise FormError("question name runs past the end of the message")
        c = data[pos]
        if c == 0:
            if pos + 1 - start > 255:
                raise FormError("question name longer than 255 octets")
            return pos + 1, tuple(offsets)
        if c & 0xC0:
            raise FormError("compression or extended label in the question name")
        offsets.append(pos - start)
        pos += c + 1


def _parse_ecs(data: bytes) -> ClientSubnet:
    # RFC 7871 §6: FAMILY(2) SOURCE PREFIX-LENGTH(1) SCOPE PREFIX-LENGTH(1) ADDRESS(var)
    if len(data) < 4:
        raise FormError("ECS option shorter than 4 octets")
    family, source, scope = struct.unpack("!HBB", data[:4])
    addr = data[4:]
    if family == 0:
        # FAMILY 0 with SOURCE 0 and no address is how a stub opts out (RFC 7871 §7.1.2)
        if source != 0 or addr:
            raise FormError("ECS family 0 needs source 0 and no address")
        return ClientSubnet(0, 0, scope, b"", None)
    if family not in (1, 2):
        raise FormError(f"ECS: unknown address family {family}")
    width = 32 if family == 1 else 128
    if source > width:
        raise FormError(f"ECS: source prefix {source} longer than {width}")
    # RFC 7871 §6: ADDRESS MUST be truncated to the number of bits of SOURCE
    # PREFIX-LENGTH, padded to the end of the last octet; a longer address or
    # non-zero bits beyond the prefix are malformed.
    if len(addr) != (source + 7) // 8:
        raise FormError("ECS: address length does not match the source prefix")
    if source % 8 and addr[-1] & (0xFF >> (source % 8)):
        raise FormError("ECS: address has bits set beyond the source prefix")
    padded = addr + bytes(width // 8 - len(addr))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
        ipaddress.IPv4Address(padded) if family == 1 else ipaddress.IPv6Address(padded)
    )
    return ClientSubnet(family, source, scope, addr, ip)


def _parse_opt(data: bytes, pos: int, rdlen: int, cls: int, ttl: int) -> Edns:
    ext_rcode, version, flags = ttl >> 24, (ttl >> 16) & 0xFF, ttl & 0xFFFF
    del ext_rcode  # in queries it is meaningless
    # RFC 6891 §6.2.3: values below 512 MUST be treated as equal to 512.
    edns = Edns(payload=max(cls, 512), version=version, do=bool(flags & 0x8000))
    if version != 0:
        # RFC 6891 §6.1.3: a version we do not implement gets BADVERS; the options of
        # that version are not ours to interpret (BIND and Knot check it first, too).
        return edns
    end = pos + rdlen
    seen_ecs = False
    while pos < end:
        if pos + 4 > end:
            raise FormError("truncated EDNS option header")
        code, olen = struct.unpack_from("!HH", data, pos)
        pos += 4
        if pos + olen > end:
            raise FormError("EDNS option runs past the OPT record")
        value = data[pos : pos + olen]
        pos += olen
        if code == OPT_ECS:
            if seen_ecs:
                raise FormError("more than one ECS option")
            seen_ecs = True
            edns.ecs = _parse_ecs(value)
        elif code == OPT_COOKIE:
            # RFC 7873 §5.2.2: client cookie 8 octets, server cookie 8..32 octets
            if edns.cookie is not None:
                raise FormError("more than one COOKIE option")
            if not (olen == 8 or 16 <= olen <= 40):
                raise FormError("COOKIE option of a malformed length")
            edns.cookie = value
        elif code == OPT_NSID:
            edns.nsid = True
        # RFC 6891 §6.1.2: unknown options MUST be ignored (and are not echoed)
    return edns


def decode_query(data: bytes) -> Query | None:
    """Decode a query. None: stay silent. BadQuery: answer with its rcode."""
    if len(data) < 12:
        return None  # not even a header: nothing to copy, nothing to answer
    id_, flags, qd, an, ns, ar = _HDR.unpack_from(data)
    if flags & QR:
        return None  # never answer a response (RFC 1035 §4.1.1; avoids reflection loops)
    opcode = (flags >> 11) & 0xF
    question = b""
    pos = 12
    qname = b""
    qtype = qclass = 0
    offsets: tuple[int, ...] = ()
    edns: Edns | None = None
    opt_seen: Edns | None = None  # the one OPT's fixed fields, for a FORMERR's OPT
    try:
        if qd > 1:
            # RFC 9619 §4: a QDCOUNT > 1 is a FORMERR
            raise FormError("more than one question")
        if qd == 1:
            end, offsets = _parse_qname(data, 12)
            if end + 4 > len(data):
                raise FormError("truncated question")
            qtype, qclass = _QTAIL.unpack_from(data, end)
            qname = data[12:end]
            pos = end + 4
            question = data[12:pos]
        for _ in range(an + ns):
            pos = _skip_name(data, pos)
            if pos + 10 > len(data):
                raise FormError("truncated resource record")
            _, _, _, rdlen = _RR.unpack_from(data, pos)
            pos += 10 + rdlen
            if pos > len(data):
                raise FormError("RDATA runs past the end of the message")
        tsig = False
        for i in range(ar):
            name_start = pos
            pos = _skip_name(data, pos)
            if pos + 10 > len(data):
                raise FormError("truncated resource record")
            rtype, cls, ttl, rdlen = _RR.unpack_from(data, pos)
            pos += 10
            if pos + rdlen > len(data):
                raise FormError("RDATA runs past the end of the message")
            if rtype == OPT:
                if edns is not None:
                    # RFC 6891 §6.1.1: more than one OPT RR MUST get FORMERR
                    edns = opt_seen = None
                    raise FormError("more than one OPT record")
                if data[name_start] != 0:
                    raise FormError("OPT owner name is not the root (RFC 6891 §6.1.2)")
                # RFC 6891 §7: a request with an OPT RR gets one in its response, also
                # in a FORMERR about the content of its options or what follows it.
                opt_seen = Edns(max(cls, 512), (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
                edns = _parse_opt(data, pos, rdlen, cls, ttl)
            elif rtype == TSIG:
                if i != ar - 1:
                    raise FormError("TSIG is not the last record (RFC 8945 §5.1)")
                tsig = True
            pos += rdlen
        if pos != len(data):
            raise FormError("trailing data after the last record")
    except FormError as exc:
        q = question if pos > 12 else b""
        raise BadQuery(str(exc), id_, flags, FORMERR, q, opt_seen) from None
    if tsig:
        # We hold no TSIG keys: RFC 8945 §5.2.1 unknown key -> NOTAUTH.
        raise BadQuery("TSIG not supported", id_, flags, NOTAUTH, question, edns)
    # RFC 7873 §5.4: QDCOUNT 0 with a COOKIE is a cookie exchange; else FORMERR.
    if qd == 0 and opcode == OP_QUERY and (edns is None or edns.cookie is None):
        raise BadQuery("no question", id_, flags, FORMERR, b"", edns)  # OPT: RFC 6891 §7
    return Query(id_, flags, opcode, qname, qtype, qclass, question, edns, qd, offsets)


class Writer:
    """A reply under construction, with RFC 1035 §4.1.4 name compression."""

    __slots__ = ("buf", "comp", "counts", "limit")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray(12)
        self.comp: dict[bytes, int] = {}
        self.counts = [0, 0, 0, 0]
        self.limit = limit

    def question(self, question: bytes, qname_len: int) -> None:
        """Echo the question byte-exact; its name seeds the compression table."""
        self.buf += question
        self.counts[0] = 1 if question else 0
        if question:
            self._remember(question[:qname_len].lower(), 12)

    def _remember(self, lower: bytes, offset: int) -> None:
        i = 0
        while lower[i] and offset + i < 0x4000:
            self.comp.setdefault(lower[i:], offset + i)
            i += lower[i] + 1

    def name(self, wire: bytes) -> None:
        """Append a name, compressed against earlier names."""
        lower = wire.lower()
        comp = self.comp
        i = 0
        start = len(self.buf)
        while lower[i]:
            ptr = comp.get(lower[i:])
            if ptr is not None:
                self.buf += wire[:i]
                self.buf += struct.pack("!H", 0xC000 | ptr)
                break
            i += lower[i] + 1
        else:
            self.buf += wire
        j = 0
        while j < i and start + j < 0x4000:
            comp.setdefault(lower[j:], start + j)
            j += lower[j] + 1

    def rrset(self, owner: bytes, rr: RRset, ttl: int | None = None) -> int:
        """Append every RR of an RRset; return how many were written."""
        buf = self.buf
        head = struct.pack("!HHI", rr.rtype, CLASS_IN, rr.ttl if ttl is None else ttl)
        if rr.parts is not None and rr.rtype in COMPRESSIBLE:
            for prefix, names, suffix in rr.parts:
                self.name(owner)
                buf += head
                at = len(buf)
                buf += b"\0\0"
                buf += prefix
                for n in names:
                    self.name(n)
                buf += suffix
                struct.pack_into("!H", buf, at, len(buf) - at - 2)
        else:
            for rd in rr.rdata:
                self.name(owner)
                buf += head
                buf += struct.pack("!H", len(rd))
                buf += rd
        return len(rr.rdata)

    def mark(self) -> tuple[int, int]:
        return len(self.buf), len(self.comp)

    def rollback(self, mark: tuple[int, int]) -> None:
        size, _ = mark
        del self.buf[size:]
        self.comp = {k: v for k, v in self.comp.items() if v < size}

    def finish(self, id_: int, flags: int) -> bytes:
        _HDR.pack_into(self.buf, 0, id_, flags, *self.counts)
        return bytes(self.buf)


def encode_opt(payload: int, ext_rcode: int, do: bool, options: list[tuple[int, bytes]]) -> bytes:
    """An OPT RR (RFC 6891 §6.1.2): root owner, our payload size, version 0."""
    rdata = b"".join(struct.pack("!HH", c, len(v)) + v for c, v in options)
    ttl = (ext_rcode << 24) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", OPT, payload, ttl, len(rdata)) + rdata


def encode_ecs(ecs: ClientSubnet, scope: int) -> bytes:
    """RFC 7871 §7.2.1: echo FAMILY, SOURCE PREFIX-LENGTH and ADDRESS; set our SCOPE."""
    return struct.pack("!HBB", ecs.family, ecs.source, scope) + ecs.address


def error_reply(bad: BadQuery, opt: bytes | None) -> bytes:
    """Header copied (ID, opcode, RD, CD), QR set, the rcode, question if it parsed."""
    flags = QR | (bad.flags & (0x7800 | RD | CD)) | (bad.rcode & 0xF)
    qd = 1 if bad.question else 0
    ar = 1 if opt else 0
    return _HDR.pack(bad.id, flags, qd, 0, 0, ar) + bad.question + (opt or b"")
