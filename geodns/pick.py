"""The geo policy: which sites answer a client, and over which prefix that holds.

Pure: no I/O, no clock, no randomness; everything the decision depends on is an
argument. `decide()` is called per query (its result is cached by the caller per
client prefix at `Decision.scope`), so the pool's rules are parsed once, by
`compile_pool()`, and reused while the same Pool object is in the published view.

Order of preference, most specific first:

1. a `cidr` rule (longest prefix containing the client), then `country`, then
   `continent` (from the GeoIP location): the rule's sites, in the rule's order;
2. if none of the rule's sites is usable, or no rule matches, the pool's `fallback`:
   "nearest" (great-circle distance from the client's location, ties by site name)
   or "default" (the pool's `default` list in order);
3. if the default list has no usable site either, the other members (nearest first
   when the client is located, else in pool order): a healthy site beats a dead one.

A client without coordinates cannot be ranked by distance: with fallback "nearest"
it gets the `default` list if there is one, else the zone file's own record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from .model import Decision, IPNetwork, Location, Override, Pool, Rule, Site, SiteState

__all__ = ["CompiledPool", "compile_pool", "decide"]

# Mean Earth radius (IUGG), the usual constant for haversine distances.
_EARTH_RADIUS_KM = 6371.0088

_HEALTHY = SiteState()


@dataclass(frozen=True, slots=True)
class CompiledPool:
    """A Pool with its rules pre-parsed for fast per-query matching.

    `cidr4` / `cidr6` hold (network, rule) per family, longest prefix first (on equal
    networks the first rule in the configuration wins); `by_country` and
    `by_continent` map a code to the first rule naming it.
    """

    pool: Pool
    cidr4: tuple[tuple[IPv4Network, Rule], ...]
    cidr6: tuple[tuple[IPv6Network, Rule], ...]
    by_country: Mapping[str, Rule]
    by_continent: Mapping[str, Rule]


def compile_pool(pool: Pool) -> CompiledPool:
    """Parse a pool's rules once (raises ValueError on a malformed cidr rule)."""
    cidr4: list[tuple[IPv4Network, Rule]] = []
    cidr6: list[tuple[IPv6Network, Rule]] = []
    by_country: dict[str, Rule] = {}
    by_continent: dict[str, Rule] = {}
    for configured in pool.rules:
        # A site named twice in one rule would be answered twice; keep the first.
        sites = tuple(dict.fromkeys(configured.sites))
        rule = Rule(configured.kind, configured.match, sites)
        if rule.kind == "cidr":
            net = ip_network(rule.match, strict=False)
            if isinstance(net, IPv4Network):
                cidr4.append((net, rule))
            else:
                cidr6.append((net, rule))
        elif rule.kind == "country":
            by_country.setdefault(rule.match.upper(), rule)
        elif rule.kind == "continent":
            by_continent.setdefault(rule.match.upper(), rule)
        else:
            raise ValueError(f"pool {pool.name}: unknown rule kind {rule.kind!r}")
    # sorted() is stable: among equal prefix lengths the configuration order stays.
    cidr4.sort(key=lambda nr: -nr[0].prefixlen)
    cidr6.sort(key=lambda nr: -nr[0].prefixlen)
    return CompiledPool(pool, tuple(cidr4), tuple(cidr6), by_country, by_continent)


# Identity cache: views publish the same Pool object until the configuration changes,
# so `id()` plus an `is` check avoids hashing the whole rule list on every query.
# Bounded by clearing; a race between threads only costs a recompile.
_COMPILED: dict[int, CompiledPool] = {}
_COMPILED_MAX = 4096


def _compiled(pool: Pool | CompiledPool) -> CompiledPool:
    if isinstance(pool, CompiledPool):
        return pool
    hit = _COMPILED.get(id(pool))
    if hit is not None and hit.pool is pool:
        return hit
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    compiled = compile_pool(pool)
    _COMPILED[id(pool)] = compiled
    return compiled


def decide(
    pool: Pool | CompiledPool,
    sites: Mapping[str, Site],
    states: Mapping[str, SiteState],
    client: IPv4Address | IPv6Address,
    location: Location | None,
    family: int,
    count: int = 1,
    all_down: str = "open",
) -> Decision:
    """Choose up to `count` sites of `pool` for `client` and an A (4) / AAAA (6) record.

    Health: a site is usable when `states[name].usable` (override first, then
    observation) and, if its addresses are checked one by one, at least one address
    of `family` is not observed down. Fail-open: when no candidate is usable but some
    are down only by observation (not drained by an operator), the checks are
    ignored and the best non-drained sites are answered (a check that fails
    everywhere at once is more likely broken than the whole fleet);
    `all_down="empty"` answers NODATA instead. When every candidate is drained the
    zone file's record answers (`use_zone_record=True`).

    `Decision.scope` is a prefix length of the client's address family over which
    every input of this decision is constant (see `_scope`).
    """
    compiled = _compiled(pool)
    members = compiled.pool.members
    width = 32 if client.version == 4 else 128
    trace: list[str] = [_located_line(client, location)]

    # Candidates: members with addresses of the asked family.
    candidates = [n for n in members if n in sites and sites[n].addresses(family)]
    if not candidates:
        # RFC 7871 §7.4: several implementations cannot mix positive and negative
        # answers for one name and type across networks. Here the answer is NODATA
        # for every client (it depends on configuration only), so scope /0.
        trace.append(f"candidates: no member has IPv{family} addresses -> NODATA")
        trace.append("scope: /0")
        return Decision((), 0, tuple(trace), rule=None)

    scope, scope_why = _scope(compiled, client, location, width)
    health = {n: _health(sites[n], states.get(n, _HEALTHY), family) for n in candidates}
    origin = _coordinates(location)
    distance_km = (
        {n: _distance_km(origin[0], origin[1], sites[n].lat, sites[n].lon) for n in candidates}
        if origin is not None
        else None
    )
    trace.append(
        "candidates: " + "; ".join(_candidate(n, health[n], distance_km) for n in candidates)
    )

    tiers, rule_line = _tiers(compiled, client, location, candidates, distance_km)
    trace.append(rule_line)

    sites_out: tuple[str, ...] = ()
    label: str | None = None
    use_zone_record = False
    for tier_label, order in tiers:
        if tier_label == _ZONE_RECORD:
            trace.append("unlocatable and no default list: zone record")
            use_zone_record = True
            break
        usable = [n for n in order if health[n] == "up"]
        if usable:
            sites_out, label = _take(usable, count), tier_label
            break
        if order:
            trace.append(f"{tier_label}: no usable site among {', '.join(order)}")

    if not sites_out and not use_zone_record:
        ranked = list(dict.fromkeys(n for tl, order in tiers if tl != _ZONE_RECORD for n in order))
        undrained = [n for n in ranked if health[n] != "drained"]
        if not undrained:
            trace.append("all candidates drained: zone record")
            use_zone_record = True
        elif all_down == "empty":
            trace.append("all candidates observed DOWN and all_down=empty: NODATA")
        else:
            trace.append("fail-open: all candidates observed DOWN, ignoring checks")
            sites_out = _take(undrained, count)
            label = next(tl for tl, order in tiers if sites_out[0] in order)

    if sites_out:
        trace.append("chosen: " + ", ".join(sites_out))
    trace.append(f"scope: /{scope}{scope_why}")
    return Decision(sites_out, scope, tuple(trace), label, use_zone_record)


# A pseudo-tier: "answer with the zone file's record" (unlocatable client, no default).
_ZONE_RECORD = "zone record"


def _tiers(
    compiled: CompiledPool,
    client: IPv4Address | IPv6Address,
    location: Location | None,
    candidates: Sequence[str],
    distance_km: Mapping[str, float] | None,
) -> tuple[list[tuple[str, list[str]]], str]:
    """The preference lists to try in order, each (label, sites), and the rule trace."""
    pool = compiled.pool
    in_family = set(candidates)
    tiers: list[tuple[str, list[str]]] = []

    label, rule = _match_rule(compiled, client, location)
    if rule is not None:
        rule_line = f"rule: {label} -> {', '.join(rule.sites)}"
        tiers.append((label, [n for n in rule.sites if n in in_family]))
    else:
        rule_line = "rule: none matches"

    nearest = (
        sorted(candidates, key=lambda n: (distance_km[n], n)) if distance_km is not None else None
    )
    default = [n for n in dict.fromkeys(pool.default) if n in in_family]
    if pool.fallback == "nearest" and nearest is not None:
        tiers.append(("nearest", nearest))
    elif pool.default:
        tiers.append(("default", default))
        # The default list exhausted: any other member, nearest first when located.
        in_default = set(default)
        rest = [n for n in (nearest or candidates) if n not in in_default]
        if rest:
            tiers.append(("members", rest))
    else:
        tiers.append((_ZONE_RECORD, []))
    return tiers, rule_line


def _match_rule(
    compiled: CompiledPool, client: IPv4Address | IPv6Address, location: Location | None
) -> tuple[str, Rule | None]:
    """The most specific matching rule: cidr (longest prefix) > country > continent."""
    cidrs = compiled.cidr4 if client.version == 4 else compiled.cidr6
    for net, cidr_rule in cidrs:  # longest prefix first
        if client in net:
            return f"cidr {net}", cidr_rule
    if location is None:
        return "", None
    country = (location.country or "").upper()
    if country and (rule := compiled.by_country.get(country)) is not None:
        return f"country {country}", rule
    continent = (location.continent or "").upper()
    if continent and (rule := compiled.by_continent.get(continent)) is not None:
        return f"continent {continent}", rule
    return "", None


def _scope(
    compiled: CompiledPool,
    client: IPv4Address | IPv6Address,
    location: Location | None,
    width: int,
) -> tuple[int, str]:
    """The ECS scope prefix length for this client, and a note on what set it.

    RFC 7871 §7.2.1: the SCOPE PREFIX-LENGTH "indicates the network for which the
    answer is intended"; a resolver caches the answer for client/scope and serves it
    to every address inside. So every input of the decision must be constant over
    client/scope, and answers for different prefixes must not overlap:

    - the location is constant over the GeoIP network that holds the client;
    - a cidr rule either contains client/scope or is disjoint from it. RFC 7871
      §7.2.1 lets a server with a longer prefix configured inside a shorter one
      "deaggregate the shorter prefix response into multiple longer prefix
      responses": that is what lengthening the scope does.

    Health is deliberately not an input: the scope is the same whichever sites are up.
    """
    if (
        location is not None
        and location.network.version == client.version
        and client in location.network
    ):
        scope = location.network.prefixlen
        why = " (geo network)"
    else:
        scope = width
        why = " (no geo network for the client)"
    cidrs: Sequence[tuple[IPNetwork, Rule]] = (
        compiled.cidr4 if client.version == 4 else compiled.cidr6
    )
    bits = int(client)
    for net, _rule in cidrs:
        if bits & int(net.netmask) == int(net.network_address):
            # The rule contains the client: client/scope must lie inside the rule.
            need = net.prefixlen
        else:
            # Disjoint from the client: client/scope must stop before the rule, so the
            # scope must exceed the bits the client shares with the rule's network.
            # As the client is outside, that is < net.prefixlen <= width.
            common = width - (bits ^ int(net.network_address)).bit_length()
            need = common + 1
        if need > scope:
            scope, why = need, f" (cidr rule {net})"
    return min(scope, width), why


def _take(order: Sequence[str], count: int) -> tuple[str, ...]:
    """The first `count` sites of a preference list.

    The one place that picks among equally acceptable sites: weights and capacity
    (Site.weight / Site.capacity, with an rng passed in) plug in here.
    """
    return tuple(order[: max(count, 1)])


def _health(site: Site, state: SiteState, family: int) -> str:
    """'up', 'down' (observed) or 'drained' (operator override DOWN) for one family."""
    if state.drained:
        return "drained"
    if not state.usable:
        return "down"
    if (
        state.address_down
        and state.override is not Override.UP
        and all(a in state.address_down for a in site.addresses(family))
    ):
        # Every address of this family failed its own check: as good as down.
        return "down"
    return "up"


def _coordinates(location: Location | None) -> tuple[float, float] | None:
    if location is None or location.lat is None or location.lon is None:
        return None
    return location.lat, location.lon


def _distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance by the haversine formula, in km."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def _located_line(client: IPv4Address | IPv6Address, location: Location | None) -> str:
    if location is None:
        return f"located: {client} not in the GeoIP database"
    return (
        f"located: country={location.country} continent={location.continent} "
        f"lat={location.lat} lon={location.lon} network={location.network}"
    )


def _candidate(name: str, health: str, distance_km: Mapping[str, float] | None) -> str:
    if distance_km is None:
        return f"{name} {health}"
    return f"{name} {distance_km[name]:.0f} km {health}"
