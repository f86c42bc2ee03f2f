"""RFC 1035 master files (+ geo overlays) -> immutable, library-independent Zone snapshots.

`parse_zone(path)` is the one entry point. dnspython's zone-file reader is the reference
parser (it handles $ORIGIN, $TTL, $INCLUDE, parentheses, RFC 3597 `\\#` rdata, ...); we
collect its records with their file:line and build our own compact form: per owner name
(lower-case wire format) a dict rtype -> RRset of pre-encoded rdata. No dnspython object
survives loading, so the query path never touches the library and memory stays small.
Every problem found is reported as `file:line: what is wrong`, all at once.
"""

from __future__ import annotations

import logging
import os
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
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


def name_to_wire(text: str) -> bytes:
    """Absolute presentation name -> uncompressed wire format (case preserved)."""
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


@dataclass(frozen=True)
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


@dataclass
class _Record:
    name: dns.name.Name
    ttl: int
    rdata: dns.rdata.Rdata
    where: str


class _RecordError(Exception):
    """A syntax error inside one record, with the file:line the record started on."""


class _LineReader(dns.zonefile.Reader):
    """dnspython's reader, remembering the file:line each record started on."""

    def _rr_line(self) -> None:
        filename, line = self.tok.where()
        where = f"{filename}:{line}"
        self.txn.where = where  # type: ignore[attr-defined]
        try:
            super()._rr_line()
        except dns.exception.SyntaxError as exc:
            raise _RecordError(f"{where}: {exc or 'syntax error'}") from None


class _Collector:
    """The minimal transaction the reader needs: keep every record, in file order.

    dnspython's own Zone would merge records (and silently let a CNAME replace other
    data at a name), which hides exactly the mistakes we must report.
    """

    def __init__(self, origin: dns.name.Name) -> None:
        self.origin = origin
        self.records: list[_Record] = []
        self.where = ""
        self.manager = self

    def origin_information(self) -> tuple[dns.name.Name, bool, dns.name.Name]:
        return (self.origin, False, self.origin)

    def check_put_rdataset(self, check: Any) -> None:
        pass

    def add(self, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> None:
        self.records.append(_Record(name, ttl, rdata, self.where))

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
    name = path.name[: -len(ZONE_SUFFIX)] if path.name.endswith(ZONE_SUFFIX) else path.name
    return name.rstrip(".").lower() + "."


Parts = tuple[bytes, tuple[bytes, ...], bytes]


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


def read_records(path: Path, origin: str) -> list[_Record]:
    """Parse a master file with dnspython; raise ZoneError(file:line) on syntax errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZoneError(str(path), [f"{path}: cannot read: {exc}"]) from None
    if not text.strip():
        raise ZoneError(str(path), [f"{path}:1: empty zone file (no SOA)"])
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
    try:
        reader.read()
    except _RecordError as exc:
        raise ZoneError(str(path), [str(exc)]) from None
    except dns.exception.SyntaxError as exc:
        msg = str(exc)
        if not msg.startswith(str(path)) and not re.match(r"^\S+:\d+: ", msg):
            msg = f"{collector.where or path}: {msg}"
        raise ZoneError(str(path), [msg]) from None
    except dns.exception.DNSException as exc:
        raise ZoneError(str(path), [f"{collector.where or path}: {exc}"]) from None
    except OSError as exc:  # a missing $INCLUDE file
        raise ZoneError(str(path), [f"{collector.where or path}: {exc}"]) from None
    return collector.records


def build_zone(
    records: Iterable[_Record], origin: str, path: str, geo: Mapping[bytes, GeoName] | None = None
) -> Zone:
    """Check records (collecting every problem) and build the immutable Zone."""
    problems: list[str] = []
    warnings: list[str] = []
    origin_name = dns.name.from_text(origin)
    origin_wire = _wire(origin_name).lower()
    # owner -> rtype -> (ttl, [rdata], first where)
    by_owner: dict[bytes, dict[int, tuple[int, list[dns.rdata.Rdata], str]]] = {}
    owners: dict[bytes, bytes] = {}
    count = 0
    for rec in records:
        count += 1
        rt = int(rec.rdata.rdtype)
        if rec.rdata.rdclass != dns.rdataclass.IN:
            problems.append(f"{rec.where}: class {rec.rdata.rdclass.name}: only IN is served")
            continue
        if rt in DNSSEC_TYPES:
            problems.append(
                f"{rec.where}: {DNSSEC_TYPES[rt]} record: DNSSEC-signed zones are not "
                "supported yet (DS at delegations is fine)"
            )
            continue
        if not rec.name.is_subdomain(origin_name):
            problems.append(f"{rec.where}: {rec.name} is outside the zone {origin}")
            continue
        wire = _wire(rec.name)
        key = wire.lower()
        owners.setdefault(key, wire)
        types = by_owner.setdefault(key, {})
        if rt in types:
            ttl, rds, where = types[rt]
            if rec.ttl != ttl:
                warnings.append(
                    f"{rec.where}: TTL {rec.ttl} differs from {ttl} of the same RRset "
                    f"({where}); using the smaller (RFC 2181 §5.2)"
                )
            if rec.rdata in rds:
                warnings.append(f"{rec.where}: duplicate record ignored")
                continue
            types[rt] = (min(ttl, rec.ttl), [*rds, rec.rdata], where)
        else:
            types[rt] = (rec.ttl, [rec.rdata], rec.where)

    apex = by_owner.get(origin_wire, {})
    if SOA not in apex:
        problems.append(f"{path}:1: no SOA record at the zone apex {origin}")
    elif len(apex[SOA][1]) > 1:
        problems.append(f"{apex[SOA][2]}: more than one SOA record at the apex")
    if NS not in apex:
        problems.append(f"{path}:1: no NS records at the zone apex {origin}")
    cuts = {k for k, t in by_owner.items() if NS in t and k != origin_wire}
    dnames = {k for k, t in by_owner.items() if DNAME in t}
    for key, types in by_owner.items():
        text = wire_to_text(key)
        if SOA in types and key != origin_wire:
            problems.append(f"{types[SOA][2]}: SOA record at {text}, which is not the apex")
        if CNAME in types:
            if len(types[CNAME][1]) > 1:
                problems.append(f"{types[CNAME][2]}: more than one CNAME at {text}")
            others = sorted(_type_text(t) for t in types if t != CNAME)
            if others:
                problems.append(
                    f"{types[CNAME][2]}: CNAME at {text} beside other data "
                    f"({', '.join(others)}) (RFC 1034 §3.6.2, RFC 2181 §10.1)"
                )
        if DNAME in types and len(types[DNAME][1]) > 1:
            problems.append(f"{types[DNAME][2]}: more than one DNAME at {text}")
        # Data at or below a zone cut belongs to the child (RFC 1034 §4.2.1); only
        # DS at the cut and address glue at or below it are the parent's to hold.
        parent = key
        while parent != origin_wire and parent:
            above = parent_of(parent)
            at_cut = parent in cuts
            if at_cut:
                allowed = {NS, DS, A, AAAA} if parent == key else {A, AAAA}
                for t, (_, _, where) in types.items():
                    if t not in allowed:
                        problems.append(
                            f"{where}: {_type_text(t)} at {text} is occluded by "
                            f"the delegation at {wire_to_text(parent)}"
                        )
                break
            if parent != key and parent in dnames:
                where = next(iter(types.values()))[2]
                problems.append(
                    f"{where}: {text} is occluded by the DNAME at {wire_to_text(parent)} "
                    "(RFC 6672 §2.4)"
                )
                break
            parent = above
        if DS in types and key not in cuts:
            problems.append(f"{types[DS][2]}: DS at {text}, which is not a delegation point")
    if problems:
        raise ZoneError(path, problems)

    nodes: dict[bytes, dict[int, RRset]] = {}
    for key, types in by_owner.items():
        owner = owners[key]
        node: dict[int, RRset] = {}
        for rt, (ttl, rds, _) in types.items():
            datas: list[bytes] = []
            parts: list[Parts] = []
            targets: list[bytes] = []
            for rd in rds:
                w, part = _encode_rdata(rd)
                datas.append(w)
                if part is not None:
                    parts.append(part)
                target = _targets(rd)
                if target is not None:
                    targets.append(target)
            node[rt] = RRset(
                owner, rt, ttl, tuple(datas), tuple(parts) if parts else None, tuple(targets)
            )
        nodes[key] = node
    # Empty non-terminals exist (RFC 4592 §2.2.2): NODATA, not NXDOMAIN.
    for key in list(by_owner):
        p = key
        while p != origin_wire:
            p = parent_of(p)
            if p in nodes:
                break
            nodes[p] = {}
    soa = nodes[origin_wire][SOA]
    soa_wire = soa.rdata[0]
    serial = int.from_bytes(soa_wire[-20:-16], "big")
    minimum = int.from_bytes(soa_wire[-4:], "big")
    geo = dict(geo or {})
    _check_geo(geo, nodes, cuts, origin_wire, path)
    return Zone(
        origin=origin_wire,
        origin_text=origin_name.to_text().lower(),
        nodes=nodes,
        cuts=frozenset(cuts),
        dnames=frozenset(dnames),
        wildcards=any(k.startswith(b"\x01*") for k in nodes),
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
    for key in geo:
        text = wire_to_text(key)
        node = nodes.get(key)
        if not node:
            problems.append(
                f"{geo_path}: names.{text}: no record in the zone file; a geo name keeps an "
                "ordinary A/AAAA record there as the fallback answer"
            )
            continue
        if CNAME in node:
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


def parse_geo(path: Path, origin: str, pools: Mapping[str, Pool]) -> dict[bytes, GeoName]:
    """Read zones/<origin>.geo.toml: `[names."www"] pool = "web"` tables."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ZoneError(str(path), [f"{path}: {exc}"]) from None
    except OSError as exc:
        raise ZoneError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
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
            if t not in ("A", "AAAA"):
                problems.append(f"{where}.types: {t!r} (allowed: A, AAAA)")
            else:
                types.add(A if t == "A" else AAAA)
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


def parse_zone(path: str | Path, pools: Mapping[str, Pool] | None = None) -> Zone:
    """Load one zone file (and its .geo.toml overlay if present) into a Zone.

    Raises ZoneError listing every problem as `file:line: message`.
    """
    p = Path(path)
    origin = origin_from_path(p)
    records = read_records(p, origin)
    geo_path = p.with_name(p.name[: -len(ZONE_SUFFIX)] + GEO_SUFFIX)
    geo = parse_geo(geo_path, origin, pools or {}) if geo_path.exists() else None
    zone = build_zone(records, origin, str(p), geo)
    for w in zone.warnings:
        log.warning("zone %s: %s", origin, w)
    return zone


def zone_files(directory: str | Path) -> list[Path]:
    """Every *.zone file under `directory` (sub-directories included), sorted."""
    out = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            if f.endswith(ZONE_SUFFIX):
                out.append(Path(root) / f)
    return sorted(out)
