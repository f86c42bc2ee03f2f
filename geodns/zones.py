"""RFC 1035 master files (+ geo overlays) -> immutable, library-independent Zone snapshots.

`parse_zone(path)` / `load_zone(path)` are the entry points. dnspython's zone-file
reader is the reference parser (it handles $ORIGIN, $TTL, $INCLUDE, parentheses, RFC 3597
`\\#` rdata, ...); the fast reader of zonefast.py reads the common shape of zone files
ten times faster and gives up (the whole file goes to dnspython) on anything else. Both
produce the same plain records with their file:line, from which `build_zone` checks and
builds our own compact form: per owner name (lower-case wire format) a dict rtype ->
RRset of pre-encoded rdata. No dnspython object survives loading, so the query path
never touches the library and memory stays small (about 600 bytes per record of a big
zone, 5 KB per small zone). Every problem found is reported as `file:line: what is
wrong`, all at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import os
import re
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tokenizer
import dns.zonefile

from .errors import ZoneError
from .model import Pool
from .zonefast import Fallback, Parts, Rec, read_fast

log = logging.getLogger(__name__)

# RR type numbers used by the query path (kept as ints: no library on the hot path)
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA = 1, 2, 5, 6, 12, 15, 16, 28
SRV, DNAME, OPT, DS = 33, 39, 41, 43
RRSIG, NSEC, DNSKEY, NSEC3, NSEC3PARAM = 46, 47, 48, 50, 51
ANY, AXFR, IXFR = 255, 252, 251
DNSSEC_TYPES = {
    RRSIG: "RRSIG",
    NSEC: "NSEC",
    DNSKEY: "DNSKEY",
    NSEC3: "NSEC3",
    NSEC3PARAM: "NSEC3PARAM",
}
# RFC 3597 §4: only the RFC 1035 types may have names in RDATA compressed.
COMPRESSIBLE = {NS, CNAME, SOA, PTR, MX}
# Types whose targets trigger additional-section processing (RFC 1034 §3.6.2, RFC 2782).
ADDITIONAL_TYPES = {NS, MX, SRV}

ZONE_SUFFIX = ".zone"
GEO_SUFFIX = ".geo.toml"


def _wire(name: dns.name.Name) -> bytes:
    """A dnspython name -> uncompressed wire bytes (case preserved)."""
    out = name.to_wire()
    assert out is not None  # to_wire() without a file returns the bytes
    return out


# An absolute name of letters, digits, '-' and '_' only: its wire form is simple to
# make, and its presentation form is itself (nothing to escape)
_PLAIN_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)+")


def name_to_wire(text: str) -> bytes:
    """Absolute presentation name -> uncompressed wire format (case preserved)."""
    if len(text) < 255 and _PLAIN_NAME.fullmatch(text):
        return b"".join(bytes((len(x),)) + x.encode() for x in text[:-1].split(".")) + b"\0"
    return _wire(dns.name.from_text(text))


def wire_to_text(wire: bytes) -> str:
    """Uncompressed wire name -> presentation form with trailing dot."""
    labels = []
    i = 0
    while wire[i]:
        n = wire[i]
        labels.append(wire[i + 1 : i + 1 + n])
        i += n + 1
    return dns.name.Name([*labels, b""]).to_text()


def parent_of(wire: bytes) -> bytes:
    """The wire name one label up (the root stays the root)."""
    return wire[wire[0] + 1 :] if wire[0] else wire


def is_subdomain(name: bytes, origin: bytes) -> bool:
    """True if lower-case wire `name` is `origin` or below it (label-aligned)."""
    if not name.endswith(origin):
        return False
    cut = len(name) - len(origin)
    i = 0
    while i < cut:
        i += name[i] + 1
    return i == cut


@dataclass(frozen=True, slots=True)
class RRset:
    """One RRset, pre-encoded. `owner` keeps the zone file's case."""

    owner: bytes
    rtype: int
    ttl: int
    rdata: tuple[bytes, ...]
    # for COMPRESSIBLE types: per rdata (prefix bytes, names, suffix bytes)
    parts: tuple[tuple[bytes, tuple[bytes, ...], bytes], ...] | None = None
    # lower-case wire targets: CNAME/DNAME target, NS/MX/SRV hosts for additional data
    targets: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class GeoName:
    """A geo-steered owner name: answered from a pool instead of the zone file."""

    owner: bytes
    pool: str
    types: frozenset[int]
    ttl_s: int = 60
    count: int = 1


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Zone:
    """An immutable snapshot of one loaded zone."""

    origin: bytes  # lower-case wire
    origin_text: str
    nodes: Mapping[bytes, Mapping[int, RRset]]  # empty non-terminals map to {}
    cuts: frozenset[bytes]  # delegation points below the apex
    dnames: frozenset[bytes]
    wildcards: bool
    soa: RRset
    serial: int
    neg_ttl: int  # RFC 2308 §3: min(SOA TTL, SOA MINIMUM)
    path: str
    records: int
    loaded_at: float
    version: int = 0
    digest: str = ""
    geo: Mapping[bytes, GeoName] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as plain tuples (worker processes, the zone cache): several times
        faster to load than the default, which sets every field of every RRset
        through Python code."""
        return _zone_from_state, (zone_state(self, tuple(node_tuples(self))),)


# Shared by every zone that has nothing there (an empty set costs 216 bytes); never mutated
_EMPTY_NODE: Mapping[int, RRset] = {}  # empty non-terminals
_NONE: frozenset[bytes] = frozenset()
_NO_GEO: Mapping[bytes, GeoName] = {}
_new = object.__new__
_SHARED_TYPES = frozenset({NS, MX, TXT, SRV, PTR})
# Interned rdata (see _make_rrset): bounded, so that unique values cannot grow it
# forever; values common to many zones are met early and stay shared.
SHARED_MAX = 100_000
_shared: dict[Any, Any] = {}
_set_owner, _set_rtype, _set_ttl, _set_rdata, _set_parts, _set_targets = (
    RRset.__dict__[f].__set__ for f in ("owner", "rtype", "ttl", "rdata", "parts", "targets")
)


def _make_rrset(
    owner: bytes,
    rtype: int,
    ttl: int,
    rdata: tuple[bytes, ...],
    parts: tuple[Parts, ...] | None,
    targets: tuple[bytes, ...],
) -> RRset:
    """RRset(...) without the frozen dataclass's __init__ (3x faster; zones have
    millions of them), sharing the rdata that many zones have alike."""
    if rtype in _SHARED_TYPES:
        # A hosting server's zones mostly name the same NS hosts, SPF strings, MX
        # services: one copy of each (10 % of the memory of 100,000 small zones).
        k = (rtype, rdata, parts, targets)
        got = _shared.get(k)
        if got is not None:
            _, rdata, parts, targets = got
        elif len(_shared) < SHARED_MAX:
            _shared[k] = k
    elif rtype == SOA and parts is not None and len(parts) == 1:
        names = parts[0][1]
        got_names = _shared.get(names)
        if got_names is None:
            if len(_shared) < SHARED_MAX:
                _shared[names] = names
        elif got_names is not names:
            parts = ((parts[0][0], got_names, parts[0][2]),)
    r = _new(RRset)
    _set_owner(r, owner)
    _set_rtype(r, rtype)
    _set_ttl(r, ttl)
    _set_rdata(r, rdata)
    _set_parts(r, parts)
    _set_targets(r, targets)
    return r


# An RRset as the tuple `_make_rrset(*t)` takes back (the pickled and cached form)
_plain = operator.attrgetter("owner", "rtype", "ttl", "rdata", "parts", "targets")


def node_tuples(zone: Zone) -> Iterator[tuple[bytes, tuple[tuple[Any, ...], ...]]]:
    """The zone's nodes as plain tuples (the pickled form: `Zone.__reduce__`, the
    zone cache's chunks)."""
    for key, n in zone.nodes.items():
        yield key, tuple(map(_plain, n.values()))


def add_nodes(
    nodes: dict[bytes, Mapping[int, RRset]],
    node_list: Iterable[tuple[bytes, tuple[tuple[Any, ...], ...]]],
) -> None:
    """Build nodes from `node_tuples` output into `nodes`."""
    make = _make_rrset
    for key, rrsets in node_list:
        nodes[key] = {t[1]: make(*t) for t in rrsets} if rrsets else _EMPTY_NODE


def zone_state(zone: Zone, nodes: Any) -> tuple[Any, ...]:
    """Everything `zone_from_state` needs, with `nodes` in place of the nodes."""
    return (
        zone.origin,
        zone.origin_text,
        nodes,
        tuple(zone.cuts),
        tuple(zone.dnames),
        zone.wildcards,
        _plain(zone.soa),
        zone.serial,
        zone.neg_ttl,
        zone.path,
        zone.records,
        zone.loaded_at,
        zone.version,
        zone.digest,
        dict(zone.geo),
        zone.warnings,
    )


def _zone_from_state(state: tuple[Any, ...]) -> Zone:
    nodes: dict[bytes, Mapping[int, RRset]] = {}
    add_nodes(nodes, state[2])
    return zone_from_state(state, nodes)


def zone_from_state(state: tuple[Any, ...], nodes: dict[bytes, Mapping[int, RRset]]) -> Zone:
    """The Zone of `zone_state` output whose nodes are already built (`add_nodes`)."""
    (origin, origin_text, _, cuts, dnames, wildcards, soa_t, serial, neg_ttl, path,
     records, loaded_at, version, digest, geo, warnings) = state  # fmt: skip
    make = _make_rrset
    soa = make(*soa_t)
    apex_soa = nodes.get(origin, _EMPTY_NODE).get(SOA)
    if apex_soa == soa:
        soa = apex_soa
    return Zone(
        origin, origin_text, nodes, frozenset(cuts) if cuts else _NONE,
        frozenset(dnames) if dnames else _NONE, wildcards, soa, serial, neg_ttl, path,
        records, loaded_at, version, digest, geo or _NO_GEO, warnings,
    )  # fmt: skip


class _RecordError(Exception):
    """A syntax error inside one record, with the file:line the record started on."""


class _LineReader(dns.zonefile.Reader):
    """dnspython's reader, remembering the file:line each record started on."""

    def _rr_line(self) -> None:
        filename, line = self.tok.where()
        self.txn.where = (filename, line)  # type: ignore[attr-defined]
        try:
            super()._rr_line()
        except dns.exception.SyntaxError as exc:
            raise _RecordError(f"{filename}:{line}: {exc or 'syntax error'}") from None


class _Collector:
    """The minimal transaction the reader needs: keep every record, in file order.

    dnspython's own Zone would merge records (and silently let a CNAME replace other
    data at a name), which hides exactly the mistakes we must report. Records are
    converted at once to the library-independent `Rec` the fast reader also produces.
    """

    def __init__(self, origin: dns.name.Name) -> None:
        self.origin = origin
        self.records: list[Rec] = []
        self.problems: list[str] = []
        self.where: tuple[str, int] = ("", 0)
        self.manager = self

    def origin_information(self) -> tuple[dns.name.Name, bool, dns.name.Name]:
        return (self.origin, False, self.origin)

    def check_put_rdataset(self, check: Any) -> None:
        pass

    def add(self, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> None:
        filename, line = self.where
        if rdata.rdclass != dns.rdataclass.IN:  # the reader rejects other classes first
            self.problems.append(f"{filename}:{line}: class {rdata.rdclass.name}: only IN")
            return
        wire, parts = _encode_rdata(rdata)
        canon = rdata.to_digestable()
        rec: Rec = (
            _wire(name),
            ttl,
            int(rdata.rdtype),
            wire,
            None if canon == wire else canon,
            parts,
            _targets(rdata),
            filename,
            line,
        )
        self.records.append(rec)

    def _set_origin(self, origin: dns.name.Name) -> None:
        pass

    def add_unicode(self, value: str) -> None:
        pass


_INCLUDE_RE = re.compile(r'^(\$INCLUDE[ \t]+)("[^"]*"|\S+)', re.IGNORECASE | re.MULTILINE)


def _absolute_includes(text: str, base: Path) -> str:
    """Make $INCLUDE paths relative to the including file's directory (as Knot does)."""

    def fix(m: re.Match[str]) -> str:
        raw = m.group(2).strip('"')
        p = Path(raw)
        if not p.is_absolute():
            p = base / p
        return f'{m.group(1)}"{p}"'

    return _INCLUDE_RE.sub(fix, text)


def origin_from_path(path: Path) -> str:
    """zones/example.com.zone -> 'example.com.' (zones/root.zone is not supported)."""
    return origin_from_name(path.name)


def origin_from_name(name: str) -> str:
    """'example.com.zone' (a file name) -> 'example.com.'"""
    if name.endswith(ZONE_SUFFIX):
        name = name[: -len(ZONE_SUFFIX)]
    return name.rstrip(".").lower() + "."


def _type_text(rtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))


def _encode_rdata(rd: dns.rdata.Rdata) -> tuple[bytes, Parts | None]:
    wire = rd.to_wire()
    assert wire is not None
    rt = int(rd.rdtype)
    if rt in (NS, CNAME, PTR):
        return wire, (b"", (_wire(rd.target),), b"")  # type: ignore[attr-defined]
    if rt == MX:
        return wire, (wire[:2], (_wire(rd.exchange),), b"")  # type: ignore[attr-defined]
    if rt == SOA:
        m = _wire(rd.mname)  # type: ignore[attr-defined]
        r = _wire(rd.rname)  # type: ignore[attr-defined]
        return wire, (b"", (m, r), wire[len(m) + len(r) :])
    return wire, None


def _targets(rd: dns.rdata.Rdata) -> bytes | None:
    rt = int(rd.rdtype)
    if rt in (NS, CNAME, DNAME):
        return _wire(rd.target).lower()  # type: ignore[attr-defined]
    if rt == MX:
        return _wire(rd.exchange).lower()  # type: ignore[attr-defined]
    if rt == SRV:
        return _wire(rd.target).lower()  # type: ignore[attr-defined]
    return None


def read_text(path: Path, data: bytes | None = None) -> str:
    """A zone file's text; ZoneError(file) if unreadable, not UTF-8 or empty."""
    try:
        if data is None:
            data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZoneError(str(path), [f"{path}: cannot read: {exc}"]) from None
    if not text.strip():
        raise ZoneError(str(path), [f"{path}:1: empty zone file (no SOA)"])
    return text


def read_records_full(text: str, path: Path, origin: str) -> tuple[list[Rec], list[str]]:
    """Parse a master file with dnspython (the reference); ZoneError(file:line) on
    syntax errors. Returns the records and problems found outside the syntax."""
    text = _absolute_includes(text, path.parent)
    origin_name = dns.name.from_text(origin)
    collector = _Collector(origin_name)
    tok = dns.tokenizer.Tokenizer(text, str(path))
    reader = _LineReader(
        tok,
        dns.rdataclass.IN,
        collector,  # type: ignore[arg-type]
        allow_include=True,
    )
    # dnspython silently skips names outside the zone; we want to report them, so the
    # reader is told everything is in zone and build_zone() checks.
    reader.zone_origin = dns.name.root
    where = f"{collector.where[0]}:{collector.where[1]}" if collector.where[0] else str(path)
    try:
        reader.read()
    except _RecordError as exc:
        raise ZoneError(str(path), [str(exc)]) from None
    except dns.exception.SyntaxError as exc:
        msg = str(exc)
        if not msg.startswith(str(path)) and not re.match(r"^\S+:\d+: ", msg):
            where = f"{collector.where[0]}:{collector.where[1]}" if collector.where[0] else where
            msg = f"{where}: {msg}"
        raise ZoneError(str(path), [msg]) from None
    except (dns.exception.DNSException, OSError) as exc:  # OSError: a missing $INCLUDE
        where = f"{collector.where[0]}:{collector.where[1]}" if collector.where[0] else where
        raise ZoneError(str(path), [f"{where}: {exc}"]) from None
    return collector.records, collector.problems


def read_records(
    text: str, path: Path, origin: str, fast: bool = True
) -> tuple[list[Rec], list[str], bool]:
    """(records, problems, whether the fast reader did it): the fast reader when it
    vouches for the file, else dnspython's."""
    if fast:
        try:
            return read_fast(text, str(path), name_to_wire(origin)), [], True
        except Fallback as why:
            log.debug("zone %s: full parser (%s)", path, why)
    records, problems = read_records_full(text, path, origin)
    return records, problems, False


class _Acc:
    """An RRset of several records while the zone is being read."""

    __slots__ = ("canons", "first", "parts", "rdatas", "targets", "ttl")

    def __init__(self, first: Rec) -> None:
        self.first = first
        self.ttl = first[1]
        self.rdatas = [first[3]]
        self.canons = {first[4] or first[3]}
        self.parts = [first[5]] if first[5] is not None else []
        self.targets = [first[6]] if first[6] is not None else []

    def add(self, rec: Rec, warnings: list[str]) -> None:
        if rec[1] != self.ttl:
            warnings.append(
                f"{rec[7]}:{rec[8]}: TTL {rec[1]} differs from {self.ttl} of the same RRset "
                f"({_where(self.first)}); using the smaller (RFC 2181 §5.2)"
            )
        canon = rec[4] or rec[3]
        if canon in self.canons:
            warnings.append(f"{rec[7]}:{rec[8]}: duplicate record ignored")
            return
        self.canons.add(canon)
        self.ttl = min(self.ttl, rec[1])
        self.rdatas.append(rec[3])
        if rec[5] is not None:
            self.parts.append(rec[5])
        if rec[6] is not None:
            self.targets.append(rec[6])


def _where(v: Rec | _Acc) -> str:
    """file:line of the first record of an RRset being read."""
    rec = v.first if isinstance(v, _Acc) else v
    return f"{rec[7]}:{rec[8]}"


def _size(v: Rec | _Acc) -> int:
    return len(v.rdatas) if isinstance(v, _Acc) else 1


def _rrset(owner: bytes, rt: int, v: Rec | _Acc) -> RRset:
    if isinstance(v, _Acc):
        return _make_rrset(
            owner, rt, v.ttl, tuple(v.rdatas), tuple(v.parts) or None, tuple(v.targets)
        )
    parts, target = v[5], v[6]
    return _make_rrset(
        owner,
        rt,
        v[1],
        (v[3],),
        None if parts is None else (parts,),
        () if target is None else (target,),
    )


def build_zone(
    records: Iterable[Rec],
    origin: str,
    path: str,
    geo: Mapping[bytes, GeoName] | None = None,
    problems: list[str] | None = None,
) -> Zone:
    """Check records (collecting every problem) and build the immutable Zone.

    A list of records is emptied on the way (the records live on in the nodes until
    their RRsets replace them).
    """
    problems = list(problems or ())
    warnings: list[str] = []
    if _PLAIN_NAME.fullmatch(origin) and len(origin) < 255:
        origin_wire, origin_text = name_to_wire(origin).lower(), origin.lower()
    else:
        origin_name = dns.name.from_text(origin)
        origin_wire, origin_text = _wire(origin_name).lower(), origin_name.to_text().lower()
    # owner (lower-case) -> rtype -> the first record, or _Acc for several; turned into
    # RRsets in place once every check passed (one dict per node, built once)
    nodes: dict[bytes, dict[int, Any]] = {}
    owners: dict[bytes, bytes] = {}  # the first spelling, only where it is not lower-case
    count = 0
    for rec in records:
        count += 1
        rt = rec[2]
        if rt in DNSSEC_TYPES:
            problems.append(
                f"{rec[7]}:{rec[8]}: {DNSSEC_TYPES[rt]} record: DNSSEC-signed zones are not "
                "supported yet (DS at delegations is fine)"
            )
            continue
        owner = rec[0]
        key = owner.lower()
        node = nodes.get(key)
        if node is None:
            if not is_subdomain(key, origin_wire):
                problems.append(
                    f"{rec[7]}:{rec[8]}: {wire_to_text(owner)} is outside the zone {origin}"
                )
                continue
            if key == owner:
                key = owner  # one bytes object for both
            else:
                owners[key] = owner
            node = nodes[key] = {}
        cur = node.get(rt)
        if cur is None:
            node[rt] = rec
        else:
            if not isinstance(cur, _Acc):
                cur = node[rt] = _Acc(cur)
            cur.add(rec, warnings)
    if isinstance(records, list):
        # the nodes hold what is needed; each record is freed as its RRset replaces it
        # (a million-record zone peaks ~150 MB lower)
        records.clear()

    apex = nodes.get(origin_wire, {})
    if SOA not in apex:
        problems.append(f"{path}:1: no SOA record at the zone apex {origin}")
    elif _size(apex[SOA]) > 1:
        problems.append(f"{_where(apex[SOA])}: more than one SOA record at the apex")
    if NS not in apex:
        problems.append(f"{path}:1: no NS records at the zone apex {origin}")
    cuts = {k for k, t in nodes.items() if NS in t and k != origin_wire}
    dnames = {k for k, t in nodes.items() if DNAME in t}
    for key, types in nodes.items():
        if SOA in types and key != origin_wire:
            problems.append(
                f"{_where(types[SOA])}: SOA record at {wire_to_text(key)}, which is not the apex"
            )
        if CNAME in types and (len(types) > 1 or _size(types[CNAME]) > 1):
            text = wire_to_text(key)
            if _size(types[CNAME]) > 1:
                problems.append(f"{_where(types[CNAME])}: more than one CNAME at {text}")
            others = sorted(_type_text(t) for t in types if t != CNAME)
            if others:
                problems.append(
                    f"{_where(types[CNAME])}: CNAME at {text} beside other data "
                    f"({', '.join(others)}) (RFC 1034 §3.6.2, RFC 2181 §10.1)"
                )
        if DNAME in types and _size(types[DNAME]) > 1:
            problems.append(f"{_where(types[DNAME])}: more than one DNAME at {wire_to_text(key)}")
        if cuts or dnames:
            # Data at or below a zone cut belongs to the child (RFC 1034 §4.2.1); only
            # DS at the cut and address glue at or below it are the parent's to hold.
            parent = key
            while parent != origin_wire and parent:
                above = parent_of(parent)
                if parent in cuts:
                    allowed = {NS, DS, A, AAAA} if parent == key else {A, AAAA}
                    for t, v in types.items():
                        if t not in allowed:
                            problems.append(
                                f"{_where(v)}: {_type_text(t)} at {wire_to_text(key)} is "
                                f"occluded by the delegation at {wire_to_text(parent)}"
                            )
                    break
                if parent != key and parent in dnames:
                    where = _where(next(iter(types.values())))
                    problems.append(
                        f"{where}: {wire_to_text(key)} is occluded by the DNAME at "
                        f"{wire_to_text(parent)} (RFC 6672 §2.4)"
                    )
                    break
                parent = above
            else:
                if key != origin_wire and origin_wire in dnames:
                    where = _where(next(iter(types.values())))
                    problems.append(
                        f"{where}: {wire_to_text(key)} is occluded by the DNAME at the "
                        f"apex (RFC 6672 §2.4)"
                    )
        if DS in types and key not in cuts:
            problems.append(
                f"{_where(types[DS])}: DS at {wire_to_text(key)}, which is not a delegation point"
            )
    if problems:
        raise ZoneError(path, problems)

    for key, node in nodes.items():
        owner = owners.get(key, key)
        for rt, v in node.items():
            node[rt] = _rrset(owner, rt, v)
    # Empty non-terminals exist (RFC 4592 §2.2.2): NODATA, not NXDOMAIN.
    final: dict[bytes, Mapping[int, RRset]] = nodes  # type: ignore[assignment]
    for key in list(nodes):
        p = key
        while p != origin_wire:
            p = parent_of(p)
            if p in final:
                break
            final[p] = _EMPTY_NODE
    soa = final[origin_wire][SOA]
    soa_wire = soa.rdata[0]
    serial = int.from_bytes(soa_wire[-20:-16], "big")
    minimum = int.from_bytes(soa_wire[-4:], "big")
    geo = dict(geo) if geo else _NO_GEO
    _check_geo(geo, final, frozenset(cuts), origin_wire, path)
    return Zone(
        origin=origin_wire,
        origin_text=origin_text,
        nodes=final,
        cuts=frozenset(cuts) if cuts else _NONE,
        dnames=frozenset(dnames) if dnames else _NONE,
        wildcards=any(k.startswith(b"\x01*") for k in final),
        soa=soa,
        serial=serial,
        neg_ttl=min(soa.ttl, minimum),
        path=path,
        records=count,
        loaded_at=time.time(),
        geo=geo,
        warnings=tuple(warnings),
    )


def _check_geo(
    geo: Mapping[bytes, GeoName],
    nodes: Mapping[bytes, Mapping[int, RRset]],
    cuts: frozenset[bytes] | set[bytes],
    origin: bytes,
    path: str,
) -> None:
    problems = []
    geo_path = path[: -len(ZONE_SUFFIX)] + GEO_SUFFIX if path.endswith(ZONE_SUFFIX) else path
    for key, g in geo.items():
        text = wire_to_text(key)
        node = nodes.get(key)
        if not node:
            problems.append(
                f"{geo_path}: names.{text}: no record in the zone file; a geo name keeps an "
                "ordinary record there as the fallback answer"
            )
            continue
        if CNAME in g.types:
            # RFC 2181 §10.1: per-site CNAMEs only where the zone file's only data is the
            # fallback CNAME, and never at the apex (which has SOA and NS)
            if key == origin:
                problems.append(f"{geo_path}: names.{text}: no CNAME at the zone apex")
            elif set(node) != {CNAME}:
                problems.append(
                    f'{geo_path}: names.{text}: types = ["CNAME"] needs the zone file\'s '
                    "only data there to be the fallback CNAME"
                )
        elif CNAME in node:
            problems.append(f"{geo_path}: names.{text}: the zone file has a CNAME there")
        p = key
        while p != origin:
            if p in cuts:
                problems.append(f"{geo_path}: names.{text}: at or below the delegation {p!r}")
                break
            p = parent_of(p)
    if problems:
        raise ZoneError(geo_path, problems)


_GEO_KEYS = {"pool", "types", "ttl_s", "count"}


def read_toml(path: Path) -> dict[str, Any]:
    """A zone's TOML companion file (geo overlay, policy tests); ZoneError if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ZoneError(str(path), [f"{path}: {exc}"]) from None
    except OSError as exc:
        raise ZoneError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
    return raw


def parse_geo(path: Path, origin: str, pools: Mapping[str, Pool]) -> dict[bytes, GeoName]:
    """Read zones/<origin>.geo.toml: `[names."www"] pool = "web"` tables."""
    raw = read_toml(path)
    problems: list[str] = []
    out: dict[bytes, GeoName] = {}
    for key in raw:
        if key != "names":
            problems.append(f"{path}: {key}: unknown key (allowed: names)")
    names = raw.get("names", {})
    if not isinstance(names, dict):
        names = {}
        problems.append(f'{path}: names: must be tables [names."www"]')
    origin_name = dns.name.from_text(origin)
    for owner, table in names.items():
        where = f"{path}: names.{owner}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        for k in table:
            if k not in _GEO_KEYS:
                allowed = ", ".join(sorted(_GEO_KEYS))
                problems.append(f"{where}.{k}: unknown key (allowed: {allowed})")
        try:
            name = origin_name if owner == "@" else dns.name.from_text(owner, origin=origin_name)
        except dns.exception.DNSException as exc:
            problems.append(f"{where}: bad owner name: {exc}")
            continue
        if not name.is_subdomain(origin_name):
            problems.append(f"{where}: {name} is outside the zone {origin}")
            continue
        pool = table.get("pool")
        if not isinstance(pool, str) or pool not in pools:
            problems.append(f"{where}.pool: unknown pool {pool!r} (defined: {sorted(pools)})")
            continue
        types_raw = table.get("types", ["A", "AAAA"])
        types: set[int] = set()
        if not isinstance(types_raw, list):
            problems.append(f'{where}.types: must be a list like ["A", "AAAA"]')
            types_raw = []
        for t in types_raw:
            if t not in ("A", "AAAA", "CNAME"):
                problems.append(f"{where}.types: {t!r} (allowed: A, AAAA, or CNAME alone)")
            else:
                types.add({"A": A, "AAAA": AAAA, "CNAME": CNAME}[t])
        if CNAME in types and len(types) > 1:
            # RFC 2181 §10.1: a CNAME owner has no other data; per-site CNAMEs stand alone
            problems.append(f"{where}.types: CNAME cannot be combined with A or AAAA")
        ttl = table.get("ttl_s", 60)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
            problems.append(f"{where}.ttl_s: must be an integer number of seconds")
            ttl = 60
        count = table.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            problems.append(f"{where}.count: must be an integer >= 1")
            count = 1
        owner_key = _wire(name).lower()
        out[owner_key] = GeoName(owner_key, pool, frozenset(types), ttl, count)
    if problems:
        raise ZoneError(str(path), problems)
    return out


def load_zone(
    path: str | Path,
    pools: Mapping[str, Pool] | None = None,
    *,
    data: bytes | None = None,
    fast: bool = True,
    has_geo: bool | None = None,
) -> Zone:
    """Load one zone file (and its .geo.toml overlay if present) into a Zone.

    `data` is the file's content when the caller has read it already (and `has_geo`
    whether it found an overlay, saving a look). Warnings are
    returned in `Zone.warnings`, not logged (this also runs in worker processes).
    Raises ZoneError listing every problem as `file:line: message`.
    """
    p = Path(path)
    origin = origin_from_path(p)
    text = read_text(p, data)
    big = len(text) > BIG_TEXT
    with gc_paused(keep=True) if big else contextlib.nullcontext():
        records, problems, _ = read_records(text, p, origin, fast)
        del text
        geo = None
        if has_geo is not False:
            geo_path = p.with_name(p.name[: -len(ZONE_SUFFIX)] + GEO_SUFFIX)
            if has_geo or geo_path.exists():
                geo = parse_geo(geo_path, origin, pools or {})
        return build_zone(records, origin, str(p), geo, problems)


# Above this many characters a zone is built with the cyclic GC paused
BIG_TEXT = 1 << 20


@contextlib.contextmanager
def gc_paused(keep: bool = False) -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of objects are created.

    A zone is acyclic (reference counting frees it), but building one allocates an
    object per record and RRset, and every full collection on the way walks the whole
    growing heap: a third of the time of a million-record zone, and 85 % of unpickling
    one. Process-wide while it lasts (other threads' cycles wait for the next pass).

    keep=True: what the block built lives on (a zone). When the block ends without an
    exception, gc.freeze() moves it out of the collector's sight before the collector
    is back. Otherwise the next collections walk all of it: after a 1,000,000-record
    zone, a generation-1 pass of 0.86 s and a full one of 0.88 s, each holding the GIL,
    so the UDP receive thread answered nothing for ~1 s during a reload
    (bench/zones_scale.py). Everything else alive at that instant is frozen too: what
    of it later ends up as cyclic garbage (a finished task in a reference cycle, say)
    is never collected, as with the initial load's freeze. One freeze per big build or
    cache load, so what that can hold is bounded by how often big zones change.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
        if keep:
            gc.freeze()
    finally:
        if was:
            gc.enable()


def parse_zone(
    path: str | Path, pools: Mapping[str, Pool] | None = None, *, fast: bool = True
) -> Zone:
    """Load one zone file (and its .geo.toml overlay if present) into a Zone; log its
    warnings. Raises ZoneError listing every problem as `file:line: message`.
    """
    zone = load_zone(path, pools, fast=fast)
    for w in zone.warnings:
        log.warning("zone %s: %s", zone.origin_text, w)
    return zone


def zone_file_names(directory: str | Path) -> list[str]:
    """Every *.zone file under `directory` (sub-directories included), sorted."""
    out = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            if f.endswith(ZONE_SUFFIX):
                out.append(os.path.join(root, f))
    out.sort()
    return out


def zone_files(directory: str | Path) -> list[Path]:
    """Every *.zone file under `directory` (sub-directories included), sorted."""
    return [Path(p) for p in zone_file_names(directory)]
