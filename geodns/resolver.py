"""resolve(): the authoritative answer for one question, following RFC 1034 §4.3.2.

Pure: no I/O, no clock. Geo steering is a callback (`steer`) that the caller builds from
the client's address, so this module never sees GeoIP, sockets or health checks.

Steps (RFC 1034 §4.3.2, numbered as there):
  2. find the zone that is the nearest ancestor of QNAME (REFUSED when none);
  3. a. QNAME found: answer (CNAME: add it and restart at the target, in zone);
     b. a delegation above QNAME: referral (NS in AUTHORITY, glue in ADDITIONAL);
     c. not found: wildcard synthesis (RFC 4592), else NXDOMAIN (RFC 2308);
  6. additional-section processing for NS/MX/SRV targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .model import Decision
from .view import View
from .zones import (
    AAAA,
    ADDITIONAL_TYPES,
    ANY,
    CNAME,
    DNAME,
    DS,
    NS,
    A,
    GeoName,
    RRset,
    Zone,
    is_subdomain,
    parent_of,
)

NOERROR, SERVFAIL, NXDOMAIN, REFUSED, YXDOMAIN = 0, 2, 3, 5, 6

# One entry of a section: (owner wire name to write, the RRset, TTL override or None)
Entry = tuple[bytes, RRset, int | None]
# steer(geo name, qtype) -> the decision, or None when geo is not available at all
Steer = Callable[[GeoName, int], "tuple[Decision, RRset | None] | None"]


@dataclass(slots=True)
class Answer:
    """What to put in the reply, before encoding and truncation."""

    rcode: int = NOERROR
    aa: bool = True
    answer: list[Entry] = field(default_factory=list)
    authority: list[Entry] = field(default_factory=list)
    glue: list[Entry] = field(default_factory=list)  # required: TC if it does not fit
    additional: list[Entry] = field(default_factory=list)  # optional: dropped if too big
    scope: int = 0  # ECS SCOPE PREFIX-LENGTH (RFC 7871 §7.2.1): 0 = same for everyone
    tc: bool = False
    decision: Decision | None = None
    zone: Zone | None = None


def _soa_entry(zone: Zone) -> Entry:
    # RFC 2308 §3: the SOA's TTL in a negative answer is min(SOA TTL, SOA MINIMUM).
    return (zone.soa.owner, zone.soa, zone.neg_ttl)


def _find_cut(zone: Zone, name: bytes) -> tuple[bytes | None, bytes | None]:
    """The highest delegation point or DNAME owner on the path from the apex to name.

    Returns (cut, dname_owner); a cut may be `name` itself, a DNAME owner is strictly
    above name (RFC 6672 §2.3: DNAME redirects names below its owner only).
    """
    if not zone.cuts and not zone.dnames:
        return None, None
    origin = zone.origin
    if name != origin and origin in zone.dnames:
        # a DNAME at the apex (RFC 6672 §2.3 allows it) redirects every name below it
        return None, origin
    highest_cut = None
    highest_dname = None
    p = name
    while p != origin and len(p) > len(origin):
        if p in zone.cuts:
            highest_cut, highest_dname = p, None
        elif p != name and p in zone.dnames:
            highest_dname, highest_cut = p, None
        p = parent_of(p)
    return highest_cut, highest_dname


def _add_glue(zone: Zone, cut: bytes, ns: RRset, ans: Answer, seen: set[tuple[bytes, int]]) -> None:
    """In-domain glue is required (RFC 9471 §2), sibling glue optional."""
    for target in ns.targets:
        node = zone.nodes.get(target)
        if not node:
            continue
        required = is_subdomain(target, cut)
        for rt in (A, AAAA):
            rr = node.get(rt)
            if rr is not None and (target, rt) not in seen:
                seen.add((target, rt))
                (ans.glue if required else ans.additional).append((rr.owner, rr, None))


def _add_additional(zone: Zone, rr: RRset, ans: Answer, seen: set[tuple[bytes, int]]) -> None:
    """RFC 1034 §3.6.2 / RFC 2782: addresses of in-zone NS, MX and SRV targets."""
    for target in rr.targets:
        if not is_subdomain(target, zone.origin):
            continue
        node = zone.nodes.get(target)
        if not node:
            continue
        for rt in (A, AAAA):
            a = node.get(rt)
            if a is not None and (target, rt) not in seen:
                seen.add((target, rt))
                ans.additional.append((a.owner, a, None))


def _synth_cname(owner: bytes, dname: RRset, name: bytes, dname_owner: bytes) -> RRset | None:
    """RFC 6672 §2.2: replace the DNAME owner suffix of name by the DNAME target."""
    prefix = name[: len(name) - len(dname_owner)]
    target_rdata = dname.rdata[0]
    new = prefix + target_rdata
    if len(new) > 255:
        return None
    return RRset(owner, CNAME, dname.ttl, (new,), ((b"", (new,), b""),), (new.lower(),))


def resolve(
    view: View,
    qname: bytes,
    qname_lower: bytes,
    offsets: tuple[int, ...],
    qtype: int,
    udp: bool,
    steer: Steer | None,
    max_chain: int = 8,
) -> Answer:
    """Answer one IN-class question from the view (RFC 1034 §4.3.2)."""
    ans = Answer()
    # Step 2: the zone nearest to QNAME.
    found, zone = view.catalog.find(qname_lower, offsets, qtype)
    if not found:
        # Not ours: REFUSED, and no upward referral (RFC 8906 §3.1.4 expectations).
        ans.rcode, ans.aa = REFUSED, False
        return ans
    if zone is None:
        # Configured but not loaded: SERVFAIL, as BIND, Knot and NSD do.
        ans.rcode, ans.aa = SERVFAIL, False
        return ans
    ans.zone = zone
    seen: set[tuple[bytes, int]] = set()
    owner, name = qname, qname_lower
    visited: set[bytes] = set()
    for _link in range(max_chain + 1):
        visited.add(name)
        first = not ans.answer
        # Step 3b: a delegation (or DNAME) on the way down.
        cut, dname_owner = _find_cut(zone, name)
        if cut is not None and not (cut == name and qtype == DS):
            ns = zone.nodes[cut][NS]
            if first:
                ans.aa = False  # RFC 1034 §4.3.2 3b: the referral is not authoritative
            ans.authority.append((ns.owner, ns, None))
            _add_glue(zone, cut, ns, ans, seen)
            return ans
        if dname_owner is not None:
            dname = zone.nodes[dname_owner][DNAME]
            ans.answer.append((dname.owner, dname, None))
            cname = _synth_cname(owner, dname, name, dname_owner)
            if cname is None:
                ans.rcode = YXDOMAIN  # RFC 6672 §2.2: the result would be too long
                return ans
            ans.answer.append((owner, cname, None))
            if qtype == CNAME:
                return ans  # RFC 6672 §3.1: the synthesized CNAME is the answer
            target = cname.rdata[0]
            owner, name = target, target.lower()
            if name in visited or not is_subdomain(name, zone.origin):
                return ans
            continue
        node = zone.nodes.get(name)
        if node is None:
            # Step 3c: wildcard synthesis from the closest encloser (RFC 4592 §3.3.1).
            node = _wildcard(zone, name)
            if node is None:
                ans.rcode = NXDOMAIN
                ans.authority.append(_soa_entry(zone))
                return ans
        # Step 3a: the name exists (possibly through the wildcard).
        if qtype == ANY:
            if not node:
                ans.authority.append(_soa_entry(zone))
            elif udp:
                # RFC 8482 §4.1: ANY over UDP may get a minimal reply; we send TC so the
                # client can ask over TCP (as Knot with disable-any).
                ans.tc = True
            else:
                for rr in node.values():
                    ans.answer.append((owner, rr, None))
            return ans
        geo = zone.geo.get(name) if zone.geo else None
        if geo is not None and CNAME in geo.types and steer is not None and CNAME in node:
            # a per-site CNAME: whatever the type asked, the steered CNAME answers (and
            # is chased like the zone file's), unless the zone record must answer
            steered = steer(geo, CNAME)
            if steered is not None:
                decision, synth = steered
                ans.decision = decision
                ans.scope = max(ans.scope, decision.scope)
                if not decision.use_zone_record and synth is not None:
                    node = {**node, CNAME: synth}
        found_rr = node.get(qtype)
        if geo is not None and qtype in geo.types and qtype != CNAME and steer is not None:
            steered = steer(geo, qtype)
            if steered is not None:
                decision, synth = steered
                ans.decision = decision
                # a CNAME chain through several geo names: the longest scope holds
                ans.scope = max(ans.scope, decision.scope)
                if not decision.use_zone_record:
                    if synth is not None:
                        ans.answer.append((owner, synth, None))
                    elif first:
                        ans.authority.append(_soa_entry(zone))
                    return ans
        if found_rr is not None:
            ans.answer.append((owner, found_rr, None))
            if qtype in ADDITIONAL_TYPES:
                _add_additional(zone, found_rr, ans, seen)
            return ans
        cname = node.get(CNAME)
        if cname is not None:
            ans.answer.append((owner, cname, None))
            target_wire = cname.parts[0][1][0] if cname.parts else cname.rdata[0]
            owner, name = target_wire, cname.targets[0]
            # Chase only inside this zone; stop on loops (RFC 1034 §3.6.2).
            if name in visited or not is_subdomain(name, zone.origin):
                return ans
            continue
        # NODATA (RFC 2308 §2.2): SOA in AUTHORITY, also after a CNAME chain.
        ans.authority.append(_soa_entry(zone))
        return ans
    return ans  # chain longer than max_chain: what we have so far


def _wildcard(zone: Zone, name: bytes) -> Mapping[int, RRset] | None:
    """The wildcard node that synthesizes `name`, if any (RFC 4592 §3.3.1)."""
    if not zone.wildcards:
        return None
    p = name
    while p != zone.origin:
        p = parent_of(p)
        if p in zone.nodes:  # the closest encloser (empty non-terminals count)
            return zone.nodes.get(b"\x01*" + p)
    return None
