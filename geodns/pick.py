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

Within that order, sites of equal rank (a nested list in a rule or the default list,
or nearest sites within the pool's `tie_km` of each other) share clients by weight,
and ramps and capacity move a hashed share of a site's clients to the next site (the
next tier when the tier has no other): see `_Walk`.

A client without coordinates cannot be ranked by distance: with fallback "nearest"
it gets the `default` list if there is one, else the zone file's own record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from . import balance as balance_mod
from .balance import HASH_PREFIX_V4, HASH_PREFIX_V6
from .model import (
    Decision,
    IPNetwork,
    Location,
    Override,
    Pool,
    PoolBalance,
    Rule,
    Site,
    SiteState,
)

__all__ = ["CompiledPool", "compile_pool", "decide", "spread"]

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
        groups: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for g in configured.groups:
            fresh = tuple(n for n in dict.fromkeys(g) if n not in seen)
            seen.update(fresh)
            if fresh:
                groups.append(fresh)
        rule = Rule(configured.kind, configured.match, sites, tuple(groups))
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
    *,
    balance: PoolBalance | None = None,
    rotation: int = 0,
) -> Decision:
    """Choose up to `count` sites of `pool` for `client` and an A (4) / AAAA (6) record.

    Health: a site is usable when `states[name].usable` (override first, then flap
    damping, then observation) and, if its addresses are checked one by one, at least
    one address of `family` is not observed down. Fail-open: when no candidate is
    usable but some are down only by observation or damping (not drained by an
    operator), the checks are ignored and the best non-drained sites are answered (a
    check that fails everywhere at once is more likely broken than the whole fleet);
    `all_down="empty"` answers NODATA instead. When every candidate is drained the
    zone file's record answers (`use_zone_record=True`).

    Balancing (see `_Walk`): among equally good sites the pool's weights decide; a site
    ramping (`SiteState.ramp` < 1) keeps only that share of its clients, and a site over
    its capacity (`balance.spill`) passes that fraction on; the clients moved are chosen
    by a hash of the client prefix, so each client always gets the same answer for the
    same view. With `answer_order = "shuffle"`, choices among equals take ordering
    `rotation` of `Decision.rotations`.

    `Decision.scope` is a prefix length of the client's address family over which
    every input of this decision is constant (see `_scope`); when a client-prefix hash
    decided, at least /24 (IPv4) or /56 (IPv6).
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

    walk = _Walk(
        compiled.pool,
        sites,
        states,
        balance_mod.client_key(client),
        count,
        balance,
        rotation,
        trace,
    )
    sites_out: tuple[str, ...] = ()
    label: str | None = None
    use_zone_record = False
    # usable sites some tier can answer with: the last of them never passes a client on
    reachable = {
        n
        for tl, groups in tiers
        if tl != _ZONE_RECORD
        for g in groups
        for n in g
        if health[n] == "up"
    }
    for tier_label, groups in tiers:
        if tier_label == _ZONE_RECORD:
            trace.append("unlocatable and no default list: zone record")
            use_zone_record = True
            break
        usable = [[n for n in g if n in reachable] for g in groups]
        usable = [g for g in usable if g]
        if not usable:
            flat = [n for g in groups for n in g]
            if flat:
                trace.append(f"{tier_label}: no usable site among {', '.join(flat)}")
            continue
        if tier_label in ("nearest", "members") and distance_km is not None:
            usable = _tie_groups([n for g in usable for n in g], distance_km, compiled.pool.tie_km)
        kept = walk.tier(tier_label, usable, reachable)
        if kept:
            sites_out, label = kept, tier_label
            break
    if not sites_out and not use_zone_record and walk.first is not None:
        # Every usable site passed this client on (ramp or capacity) with nowhere left
        # to go: the first of them answers after all.
        sites_out, label = (walk.first[1],), walk.first[0]
        walk.offered = [walk.first[1]]
        trace.append(f"nowhere to move the client: {walk.first[1]} answers")

    if not sites_out and not use_zone_record:
        ranked = list(
            dict.fromkeys(
                n for tl, groups in tiers if tl != _ZONE_RECORD for g in groups for n in g
            )
        )
        undrained = [n for n in ranked if health[n] != "drained"]
        if not undrained:
            trace.append("all candidates drained: zone record")
            use_zone_record = True
        elif all_down == "empty":
            trace.append("all candidates observed DOWN and all_down=empty: NODATA")
        else:
            trace.append("fail-open: all candidates observed DOWN, ignoring checks")
            sites_out = tuple(undrained[: max(count, 1)])
            label = next(tl for tl, groups in tiers if any(sites_out[0] in g for g in groups))

    addresses: tuple[str, ...] | None = None
    if sites_out:
        trace.append("chosen: " + ", ".join(sites_out))
        addresses = walk.addresses(sites_out, family)
    if walk.hashed:
        need = HASH_PREFIX_V4 if client.version == 4 else HASH_PREFIX_V6
        if need > scope:
            scope, scope_why = need, f" (client prefix hash: /{need})"
    ttl_cap = _ttl_cap(compiled.pool, states, candidates)
    if ttl_cap is not None:
        trace.append(f"ttl: at most {ttl_cap} s while a member changes state")
    trace.append(f"scope: /{scope}{scope_why}")
    return Decision(
        sites_out,
        scope,
        tuple(trace),
        label,
        use_zone_record,
        addresses=addresses,
        hashed=walk.hashed,
        rotations=walk.rotations,
        passed=tuple(walk.passed),
        # capacity accounting only where a member has a capacity to keep
        offered=tuple(walk.offered)
        if sites_out and any(sites[n].capacity < 1.0 for n in candidates)
        else (),
        ttl_cap_s=ttl_cap,
    )


# A pseudo-tier: "answer with the zone file's record" (unlocatable client, no default).
_ZONE_RECORD = "zone record"


class _Walk:
    """One client's way down the preference tiers: weights, ramps, capacity spill-over.

    For each tier (best first) the usable sites come in groups of equal rank. Within a
    group of several, the order is by weight: a weighted rendezvous hash of the client
    prefix ("sticky") or a rotating weighted ordering ("shuffle"); when every usable
    site of the tier will be answered anyway, the configured order stays. Then each
    site in turn: a ramping site keeps the client only if the client's hash falls in
    its ramp share; the first site answering must also keep the client under its
    capacity spill fraction. A passed-over client goes to the next site, then the next
    tier. The last usable site is never passed over (nowhere to go).

    `key` is the client's hashing prefix (`balance.client_key`); `trace` None skips
    the explanations (simulations).
    """

    def __init__(
        self,
        pool: Pool,
        sites: Mapping[str, Site],
        states: Mapping[str, SiteState],
        key: int,
        count: int,
        balance: PoolBalance | None,
        rotation: int,
        trace: list[str] | None,
    ) -> None:
        self.pool = pool
        self.sites = sites
        self.states = states
        self.key = key
        self.count = max(count, 1)
        self.spill: Mapping[str, float] = balance.spill if balance is not None else {}
        self.shares: Mapping[str, float] = balance.offered_share if balance is not None else {}
        self.shuffle = pool.answer_order == "shuffle"
        self.rotation = rotation
        self.trace = trace
        self.hashed = False
        self.rotations = 1
        self.passed: list[tuple[str, str, str]] = []
        self.offered: list[str] = []
        self.visited: set[str] = set()
        self.first: tuple[str, str] | None = None  # (tier, site) first usable seen
        self._prep: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}

    def reset(self, key: int) -> None:
        """Start again for another client (simulations reuse one walk)."""
        self.key = key
        self.hashed = False
        self.rotations = 1
        self.passed = []
        self.offered = []
        self.visited = set()
        self.first = None

    def _order_sites(self, group: list[str]) -> list[str]:
        """A group of equally good sites in weighted order for this client."""
        if self.shuffle or self.trace is not None:
            return self._order(group, [self.sites[n].weight for n in group], "site", "among")
        # the simulation path: same ordering, weights and salts looked up once
        prep = self._prep.get(tuple(group))
        if prep is None:
            weights = [self.sites[n].weight for n in group]
            salts = [balance_mod.salt(n, "site") for n in group]
            prep = self._prep[tuple(group)] = (weights, salts)
        self.hashed = True
        return balance_mod.order_by_race(group, prep[0], prep[1], self.key)

    def _order(self, names: list[str], weights: list[int], purpose: str, what: str) -> list[str]:
        """A group of equals in weighted order for this client (or this rotation)."""
        if self.shuffle:
            r = balance_mod.rotations_for(weights)
            self.rotations = math.lcm(self.rotations, r)
            order = balance_mod.rotation_order(names, weights, self.rotation)
            how = f"rotation {self.rotation % r} of {r}"
        else:
            self.hashed = True
            order = balance_mod.weighted_order(names, weights, self.key, purpose)
            how = "client prefix hash"
        if self.trace is not None:
            listed = ", ".join(f"{n} ({w})" for n, w in zip(names, weights, strict=True))
            self.trace.append(f"weights: {what} {listed} -> {', '.join(order)} by {how}")
        return order

    def tier(self, label: str, groups: list[list[str]], reachable: set[str]) -> tuple[str, ...]:
        """The sites this tier answers the client with (empty: all passed it on)."""
        visited = self.visited  # a subset of `reachable`
        if visited:
            groups = [left for g in groups if (left := [n for n in g if n not in visited])]
        ranked: list[str] = []
        if self.count < sum(map(len, groups)):
            for g in groups:
                ranked += self._order_sites(g) if len(g) > 1 else g
        else:
            for g in groups:
                ranked += g
        kept: list[str] = []
        trace = self.trace
        for n in ranked:
            if len(kept) >= self.count:
                break
            visited.add(n)
            if self.first is None:
                self.first = (label, n)
            last = not kept and len(visited) >= len(reachable)
            state = self.states.get(n, _HEALTHY)
            if state.ramp < 1.0 and not last:
                self.hashed = True
                u = balance_mod.unit(self.key, balance_mod.salt(n, "ramp"))
                if u >= state.ramp:
                    self.passed.append((n, "ramp", _ramp_why(state, u)))
                    if trace is not None:
                        trace.append(f"ramp: {n} passes this client on ({_ramp_why(state, u)})")
                    continue
                if trace is not None:
                    trace.append(f"ramp: {n} keeps this client ({_ramp_why(state, u)})")
            spill = self.spill.get(n, 0.0)
            if not kept and spill > 0.0 and not last:
                self.hashed = True
                u = balance_mod.unit(self.key, balance_mod.salt(n, "capacity"))
                if u < spill:
                    self.offered.append(n)
                    why = self._capacity_why(n, spill, u)
                    self.passed.append((n, "capacity", why))
                    if trace is not None:
                        trace.append(f"capacity: {n} passes this client on ({why})")
                    continue
                if trace is not None:
                    why = self._capacity_why(n, spill, u)
                    trace.append(f"capacity: {n} keeps this client ({why})")
            if not kept:
                self.offered.append(n)
            kept.append(n)
        return tuple(kept)

    def _capacity_why(self, site: str, spill: float, u: float) -> str:
        share = self.shares.get(site, 0.0)
        cap = self.sites[site].capacity
        return (
            f"capacity {cap:.0%}, offered {share:.1%} of the pool's answers: "
            f"{spill:.1%} of its clients move on, client hash {u:.3f}"
        )

    def addresses(self, chosen: tuple[str, ...], family: int) -> tuple[str, ...] | None:
        """The answer's addresses in order, or None for every usable one as configured.

        Each chosen site's usable addresses, best site first; with `max_answers` set and
        more addresses than that, each site's addresses are put in weighted order (by
        the client hash, or rotated) and the list is cut to max_answers. "shuffle"
        rotates the addresses of each site even when all are answered.
        """
        per_site: list[list[str]] = []
        for n in chosen:
            state = self.states.get(n, _HEALTHY)
            configured = self.sites[n].addresses(family)
            per_site.append([a for a in configured if a not in state.address_down])
        total = sum(len(a) for a in per_site)
        cap = self.pool.max_answers
        cut = 0 < cap < total
        if not cut and not (self.shuffle and any(len(a) > 1 for a in per_site)):
            return None
        out: list[str] = []
        for n, usable in zip(chosen, per_site, strict=True):
            if len(usable) > 1:
                weights = [self.sites[n].address_weight(a) for a in usable]
                usable = self._order(usable, weights, "address", f"addresses of {n}:")
            out.extend(usable)
        if cut:
            out = out[:cap]
            if self.trace is not None:
                self.trace.append(f"max_answers {cap}: " + ", ".join(out))
        return tuple(out)


def _ramp_why(state: SiteState, u: float) -> str:
    kind = "ramped drain" if state.ramp_kind == "down" else "slow start"
    return f"{kind}: answers {state.ramp:.0%} of its clients, client hash {u:.3f}"


def spread(
    pool: Pool,
    sites: Mapping[str, Site],
    states: Mapping[str, SiteState],
    groups: Sequence[Sequence[str]],
    keys: Iterable[int],
    *,
    count: int = 1,
    balance: PoolBalance | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Where clients go within one tier of usable site groups: (answered, offered).

    The per-client part of decide() (weights, ramps, capacity; no tracing) for many
    hashing keys (`balance.client_key`) at once: for simulations and capacity planning.
    `answered[site]` counts clients whose first answered site it is, `offered[site]`
    those counted toward its capacity share (see PoolBalance).
    """
    tier = [list(g) for g in groups]
    reachable = {n for g in tier for n in g}
    answered: dict[str, int] = {}
    offered: dict[str, int] = {}
    walk = _Walk(pool, sites, states, 0, count, balance, 0, None)
    for key in keys:
        walk.reset(key)
        kept = walk.tier("simulated", tier, reachable)
        answered[kept[0]] = answered.get(kept[0], 0) + 1
        for n in walk.offered:
            offered[n] = offered.get(n, 0) + 1
    return answered, offered


def _tie_groups(
    ordered: Sequence[str], distance_km: Mapping[str, float], tie_km: float
) -> list[list[str]]:
    """Nearest-first sites grouped as equally good: within tie_km of the group's first."""
    groups: list[list[str]] = []
    for n in ordered:
        if groups and distance_km[n] - distance_km[groups[-1][0]] <= tie_km:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _ttl_cap(pool: Pool, states: Mapping[str, SiteState], candidates: Sequence[str]) -> int | None:
    """The pool's TTL under change when one of its sites is changing, else None."""
    if pool.ttl_under_change_s <= 0:
        return None
    if any(states.get(n, _HEALTHY).changing for n in pool.members):
        return pool.ttl_under_change_s
    return None


def _tiers(
    compiled: CompiledPool,
    client: IPv4Address | IPv6Address,
    location: Location | None,
    candidates: Sequence[str],
    distance_km: Mapping[str, float] | None,
) -> tuple[list[tuple[str, list[list[str]]]], str]:
    """The preference tiers to try in order, each (label, groups of equally good
    sites), and the rule trace. Nearest and member tiers are regrouped by tie_km
    over their usable sites by the caller."""
    pool = compiled.pool
    in_family = set(candidates)
    tiers: list[tuple[str, list[list[str]]]] = []

    def present(ranks: Sequence[Sequence[str]]) -> list[list[str]]:
        groups = [[n for n in g if n in in_family] for g in ranks]
        return [g for g in groups if g]

    label, rule = _match_rule(compiled, client, location)
    if rule is not None:
        shown = " > ".join("=".join(g) for g in rule.ranks())
        rule_line = (
            f"rule: {label} -> {shown}"
            if rule.groups
            else f"rule: {label} -> {', '.join(rule.sites)}"
        )
        tiers.append((label, present(rule.ranks())))
    else:
        rule_line = "rule: none matches"

    nearest = (
        sorted(candidates, key=lambda n: (distance_km[n], n)) if distance_km is not None else None
    )
    if pool.fallback == "nearest" and nearest is not None:
        tiers.append(("nearest", [[n] for n in nearest]))
    elif pool.default:
        default = present(pool.default_ranks())
        tiers.append(("default", default))
        # The default list exhausted: any other member, nearest first when located.
        in_default = {n for g in default for n in g}
        rest = [n for n in (nearest or candidates) if n not in in_default]
        if rest:
            tiers.append(("members", [[n] for n in rest]))
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


def _health(site: Site, state: SiteState, family: int) -> str:
    """'up', 'down' (observed), 'damped' (held DOWN for flapping) or 'drained'
    (operator override DOWN) for one family."""
    if state.drained:
        return "drained"
    if not state.usable:
        return "damped" if state.damped and state.override is Override.OBEY else "down"
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
