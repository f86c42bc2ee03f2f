"""Why a client gets the answer it gets: one geo decision, step by step.

`explain()` runs the server's own code on one question: the zone from
`view.catalog.find`, the geo name from `zone.geo`, the client address from
`handler.client_address` (ECS unless special-purpose, else the source), the location
from the locator, and `pick.decide` over the view's sites and health. Nothing is
re-implemented; the result is plain JSON-ready data. `geodns explain` (offline, from
the files) and `GET /v1/explain` (the live view of a running server) both call it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from . import geo
from .handler import QTYPE_NAMES, Decide, client_address
from .model import Decision, IPAddress, IPNetwork, Location, SiteState
from .view import GeoState, View
from .wire import ClientSubnet, _parse_qname
from .zones import AAAA, CNAME, A, Zone, is_subdomain, name_to_wire, wire_to_text

__all__ = ["ExplainError", "explain", "parse_qtype"]

_QTYPES = {name: code for code, name in QTYPE_NAMES.items()}
_UP = SiteState()


class ExplainError(ValueError):
    """A bad explain request; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Locator(Protocol):
    """What explain needs of geo.Locator (None: GeoIP unavailable)."""

    def locate(self, addr: IPAddress) -> Location: ...


def parse_qtype(text: str | int) -> int:
    """'A', 'aaaa', 'TYPE28' or 28 -> the type code; ExplainError when unknown."""
    if isinstance(text, int):
        return text
    upper = text.strip().upper()
    if upper in _QTYPES:
        return _QTYPES[upper]
    if upper.startswith("TYPE") and upper[4:].isdigit() and 0 < int(upper[4:]) < 65536:
        return int(upper[4:])
    raise ExplainError("type", f"unknown record type {text!r} (e.g. A, AAAA)")


def _type_text(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, f"TYPE{qtype}")


def parse_ecs(text: str) -> ClientSubnet:
    """'212.58.224.0/24' -> the ECS option a resolver would send for that prefix."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ExplainError(
            "ecs", f"{text!r} is not a prefix like 212.58.224.0/24 ({exc})"
        ) from None
    # The wire carries only the prefix bits (RFC 7871 §6), so the address is the network.
    nbytes = (net.prefixlen + 7) // 8
    address = net.network_address.packed[:nbytes]
    family = 1 if net.version == 4 else 2
    ip = net.network_address if net.prefixlen else None
    return ClientSubnet(family, net.prefixlen, 0, address, ip)


def explain(
    view: View,
    locator: Locator | None,
    decide: Decide,
    client_ip: str,
    name: str,
    qtype: str | int = "A",
    ecs: str | None = None,
    *,
    is_special: Callable[[IPAddress], bool] | None = None,
    special_block: Callable[[IPAddress], IPNetwork | None] | None = None,
    all_down: str | None = None,  # default: the pool's own all_down
    max_chain: int = 8,
) -> dict[str, Any]:
    """The decision the server makes for `name`/`qtype` asked by `client_ip` (+ ECS).

    Raises ExplainError (a ValueError naming the field) for unusable input.
    """
    is_special = is_special or geo.is_special
    special_block = special_block or geo.special_block
    try:
        source = ipaddress.ip_address(client_ip.strip())
    except ValueError:
        raise ExplainError("ip", f"{client_ip!r} is not an IP address") from None
    code = parse_qtype(qtype)
    qname_text = name.strip()
    if not qname_text.endswith("."):
        qname_text += "."
    try:
        qname = name_to_wire(qname_text).lower()
    except Exception as exc:  # dnspython raises several types for bad names
        raise ExplainError("name", f"{name!r} is not a domain name ({exc})") from None
    subnet = parse_ecs(ecs) if ecs else None

    client, scope_override = client_address(str(source), subnet, is_special, special_block)
    if subnet is None:
        located_by = "source address (no ECS)"
    elif subnet.ip is None:
        located_by = "source address (ECS SOURCE /0: the resolver opted out)"
    elif scope_override is not None:
        located_by = f"source address (ECS {ecs} is special-purpose, RFC 7871 §11.3)"
    else:
        located_by = "ECS address"

    out: dict[str, Any] = {
        "query": {
            "name": wire_to_text(qname),
            "type": _type_text(code),
            "client": str(source),
            "ecs": str(ipaddress.ip_network(ecs.strip(), strict=False)) if ecs else None,
        },
        "client_address": str(client),
        "located_by": located_by,
        "zone": None,
        "cname_chain": [],
        "geo_name": None,
        "located_as": None,
        "candidates": [],
        "rule": None,
        "rules_considered": None,
        "chosen": [],
        "balancing": [],
        "ttl_cap_s": None,
        "outcome": "",
        "decision_scope": None,
        "ecs_scope": 0 if subnet is not None else None,
        "geo_version": view.geo.version,
        "trace": [],
    }

    _, offsets = _parse_qname(qname, 0)  # a valid name (name_to_wire): the decoder's offsets
    found, zone = view.catalog.find(qname, offsets, code)
    if not found:
        out["outcome"] = "REFUSED: not in any zone served here"
        return out
    if zone is None:
        out["outcome"] = "SERVFAIL: the zone is configured but not loaded"
        return out
    out["zone"] = zone.origin_text
    owner, chain = _follow_cnames(zone, qname, code, max_chain)
    out["cname_chain"] = [wire_to_text(n) for n in chain]
    geo_name = zone.geo.get(owner) if zone.geo else None
    if geo_name is None or code not in geo_name.types:
        what = "not a geo-steered name" if geo_name is None else "type not steered"
        out["outcome"] = f"static: {what}; the zone file answers (ECS scope /0)"
        if geo_name is not None:
            out["geo_name"] = _geo_name(geo_name)
        return out
    out["geo_name"] = _geo_name(geo_name)

    state = view.geo
    pool = state.pools.get(geo_name.pool)
    if pool is None:
        out["outcome"] = f"zone record: pool {geo_name.pool!r} is not configured"
        return out

    location = locator.locate(client) if locator is not None else None
    if location is not None:
        out["located_as"] = {
            "country": location.country,
            "continent": location.continent,
            "lat": location.lat,
            "lon": location.lon,
            "network": str(location.network),
        }
    family = 4 if code == A else 6
    # the live capacity balance, as the query path passes it (shuffled answers: the
    # first of their orderings)
    decision: Decision = decide(
        pool,
        state.sites,
        state.states,
        client,
        location,
        family,
        geo_name.count,
        pool.all_down if all_down is None else all_down,
        balance=state.balance.get(geo_name.pool),
    )
    out["trace"] = list(decision.trace)
    out["rule"] = decision.rule  # the preference tier the chosen sites came from
    out["rules_considered"] = next(
        (line[len("rule: ") :] for line in decision.trace if line.startswith("rule: ")), None
    )
    out["decision_scope"] = decision.scope
    out["candidates"] = _candidates(pool.members, state, location, family, decision, geo_name.pool)
    for site_name in decision.sites:
        addresses = _addresses(state, site_name, family)
        if decision.addresses is not None:  # weights / max_answers chose among them
            addresses = [a for a in decision.addresses if a in addresses]
        out["chosen"].append({"site": site_name, "addresses": addresses})
    # why this client did not get a site it would otherwise have got
    out["balancing"] = [
        {"site": site, "reason": reason, "detail": detail}
        for site, reason, detail in decision.passed
    ]
    out["ttl_cap_s"] = decision.ttl_cap_s
    answered = any(c["addresses"] for c in out["chosen"])
    if decision.sites and answered:
        out["outcome"] = "steered: " + ", ".join(decision.sites)
        if decision.passed:
            moved = "; ".join(f"{s} passed it on ({r})" for s, r, _ in decision.passed)
            out["outcome"] += f" ({moved})"
    elif decision.sites:
        out["outcome"] = "NODATA: every address of the chosen sites is checked down"
    elif decision.use_zone_record:
        out["outcome"] = "zone record: " + _zone_record(zone.nodes.get(owner, {}), code)
    else:
        out["outcome"] = "NODATA"
    if subnet is not None:
        # The query path's rule: the decision's scope, or the special block's when the
        # ECS address was special-purpose; /0 when the resolver opted out (RFC 7871
        # §7.1.2: SOURCE /0 means the answer must not be client-specific).
        scope = decision.scope if scope_override is None else scope_override
        out["ecs_scope"] = 0 if subnet.source == 0 else scope
    return out


def _follow_cnames(
    zone: Zone, qname: bytes, code: int, max_chain: int
) -> tuple[bytes, list[bytes]]:
    """The owner the question ends at after in-zone CNAMEs, as resolve() chases them
    (RFC 1034 §4.3.2 step 3a), and the targets passed on the way."""
    name, chain, seen = qname, [], {qname}
    for _ in range(max_chain):
        geo_name = zone.geo.get(name) if zone.geo else None
        node = zone.nodes.get(name)
        if (geo_name is not None and code in geo_name.types) or node is None:
            break
        cname = node.get(CNAME)
        if code in node or cname is None or not cname.targets:
            break
        target = cname.targets[0]
        if target in seen or not is_subdomain(target, zone.origin):
            break  # a loop, or out of the zone: the CNAME itself is the answer
        chain.append(target)
        seen.add(target)
        name = target
    return name, chain


def _geo_name(g: Any) -> dict[str, Any]:
    return {
        "owner": wire_to_text(g.owner),
        "pool": g.pool,
        "types": sorted(_type_text(t) for t in g.types),
        "ttl_s": g.ttl_s,
        "count": g.count,
    }


def _addresses(gs: GeoState, site_name: str, family: int) -> list[str]:
    """The addresses the answer carries for a site: those of the family not seen down."""
    site = gs.sites.get(site_name)
    if site is None:
        return []
    state = gs.states.get(site_name, _UP)
    return [a for a in site.addresses(family) if a not in state.address_down]


def _candidates(
    members: tuple[str, ...],
    gs: GeoState,
    location: Location | None,
    family: int,
    decision: Decision,
    pool_name: str = "",
) -> list[dict[str, Any]]:
    """Each pool member with its distance, the health decide() judged, and why
    (including flap damping, ramps and capacity)."""
    judged = _judged_health(decision.trace)
    pool_balance = gs.balance.get(pool_name)
    out: list[dict[str, Any]] = []
    for name in members:
        site = gs.sites.get(name)
        if site is None:
            continue
        state: SiteState = gs.states.get(name, _UP)
        distance = None
        if location is not None and location.lat is not None and location.lon is not None:
            distance = round(geo.distance_km(location.lat, location.lon, site.lat, site.lon), 1)
        has_family = bool(site.addresses(family))
        out.append(
            {
                "site": name,
                "distance_km": distance,
                "health": judged.get(name, "up" if state.usable else "down")
                if has_family
                else f"no IPv{family} address",
                "observed": state.observed.value,
                "override": state.override.value,
                "stale": state.stale,
                "addresses_down": sorted(state.address_down),
                "damped": state.damped,
                "damped_until": state.damped_until,
                "damped_addresses": sorted(state.damped_addresses),
                "ramp": state.ramp,
                "ramp_kind": state.ramp_kind or None,
                "weight": site.weight,
                "capacity": site.capacity,
                "offered_share": pool_balance.offered_share.get(name)
                if pool_balance is not None
                else None,
                "spill": pool_balance.spill.get(name, 0.0) if pool_balance is not None else 0.0,
                "chosen": name in decision.sites,
            }
        )
    out.sort(key=lambda c: (c["distance_km"] is None, c["distance_km"] or 0.0, c["site"]))
    return out


def _balance_marks(c: Mapping[str, Any]) -> str:
    """A candidate's load-balancing state for the text output ('' when none)."""
    marks = []
    if c.get("damped"):
        marks.append("damped (flapping)")
    if c.get("ramp_kind"):
        kind = "slow start" if c["ramp_kind"] == "up" else "ramped drain"
        marks.append(f"{kind} {c['ramp']:.0%}")
    if c.get("spill"):
        marks.append(
            f"capacity {c['capacity']:.0%}, offered {c['offered_share']:.0%}: "
            f"spills {c['spill']:.0%}"
        )
    return "".join(f" [{m}]" for m in marks)


def _judged_health(trace: tuple[str, ...]) -> Mapping[str, str]:
    """site -> 'up' / 'down' / 'drained' as decide() reported it on its candidates line."""
    for line in trace:
        if line.startswith("candidates: ") and "->" not in line:
            judged: dict[str, str] = {}
            for part in line[len("candidates: ") :].split("; "):
                words = part.split()
                if len(words) >= 2:
                    judged[words[0]] = words[-1]
            return judged
    return {}


def _zone_record(node: Mapping[int, Any], code: int) -> str:
    rrset = node.get(code)
    if rrset is None:
        return "(none: NODATA)"
    if code in (A, AAAA):
        return ", ".join(str(ipaddress.ip_address(rd)) for rd in rrset.rdata)
    return f"{len(rrset.rdata)} {_type_text(code)} record(s)"


def format_explain(result: Mapping[str, Any]) -> str:
    """The explain() result as text for a terminal (what `geodns explain` prints)."""
    q = result["query"]
    lines = [
        f"{q['name']} {q['type']} asked by {q['client']}"
        + (f" with ECS {q['ecs']}" if q.get("ecs") else "")
    ]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label + ':':<12} {text}")

    row("located by", f"{result['located_by']}: {result['client_address']}")
    loc = result.get("located_as")
    if loc:
        point = "no coordinates" if loc["lat"] is None else f"{loc['lat']:.4f} {loc['lon']:.4f}"
        row(
            "located as",
            f"{loc['country'] or '??'} {loc['continent'] or '??'}, {point}"
            f" (DB network {loc['network']})",
        )
    elif result.get("geo_name"):
        row("located as", "not in the GeoIP database")
    row("zone", result.get("zone") or "-")
    if result.get("cname_chain"):
        row("CNAME to", " -> ".join(result["cname_chain"]))
    g = result.get("geo_name")
    if g:
        row(
            "geo name",
            f"{g['owner']} {'/'.join(g['types'])} pool {g['pool']}, "
            f"ttl {g['ttl_s']} s, {g['count']} site(s)",
        )
    if result.get("rules_considered") is not None:
        row("rules", f"{result['rules_considered']}; answered from: {result['rule'] or '-'}")
    if result.get("candidates"):
        lines.append("  candidates:")
        width = max(len(c["site"]) for c in result["candidates"])
        for c in result["candidates"]:
            dist = "-" if c["distance_km"] is None else f"{c['distance_km']:.0f} km"
            mark = "  <- chosen" if c["chosen"] else ""
            lines.append(
                f"    {c['site']:<{width}}  {dist:>9}  {c['health']:<8} observed "
                f"{c['observed']:<7} override {c['override']}"
                + (" stale" if c["stale"] else "")
                + _balance_marks(c)
                + mark
            )
    for b in result.get("balancing", []):
        row("passed", f"{b['site']}: {b['reason']}: {b['detail']}")
    for c in result.get("chosen", []):
        row("chosen", f"{c['site']} ({', '.join(c['addresses']) or 'no usable address'})")
    if result.get("ttl_cap_s") is not None:
        row("TTL", f"at most {result['ttl_cap_s']} s (a site of the pool is changing)")
    if result.get("ecs_scope") is not None:
        row("ECS scope", f"/{result['ecs_scope']}")
    row("outcome", result["outcome"])
    return "\n".join(lines)
