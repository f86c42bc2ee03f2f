"""Plain data shared by every layer: sites, pools, health, locations.

Only the standard library is imported here; every other module may import this one.
Names are absolute, lower-case, with a trailing dot. Units are in the field names.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# the "family" of a geo decision answered with a per-site CNAME (4 and 6 are A and AAAA)
CNAME_FAMILY = 0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_prefix(ip: IPAddress) -> bytes:
    """The client's /24 (IPv4) or /56 (IPv6), packed: what geo decisions are kept per
    (the weights' hash covers no more; pools with CIDR rules key by the address)."""
    return ip.packed[: 3 if ip.version == 4 else 7]


class Health(enum.Enum):
    """What the checks observed. UNKNOWN (no verdict yet) counts as UP for answering."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Override(enum.Enum):
    """What an operator forced. OBEY means: follow the checks."""

    OBEY = "obey"
    UP = "up"
    DOWN = "down"


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Site:
    """A place that serves traffic: its addresses and where it is."""

    name: str
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    lat: float = 0.0
    lon: float = 0.0
    weight: int = 1
    # maximum share of the pool's answers (0 < capacity <= 1); 1.0 = no cap
    capacity: float = 1.0
    # weight of individual addresses among the site's addresses (missing: 1)
    address_weights: tuple[tuple[str, int], ...] = ()
    # target of a per-site CNAME (absolute, e.g. "uk.cdn.example.net."), for geo names
    # answered with a CNAME instead of addresses
    cname: str | None = None

    def addresses(self, family: int) -> tuple[str, ...]:
        """The site's addresses of one family (4 or 6); family CNAME_FAMILY: its CNAME."""
        if family == CNAME_FAMILY:
            return (self.cname,) if self.cname else ()
        return self.ipv4 if family == 4 else self.ipv6

    def address_weight(self, address: str) -> int:
        """The weight of one of the site's addresses among its others (default 1)."""
        for a, w in self.address_weights:
            if a == address:
                return w
        return 1


@dataclass(frozen=True, slots=True)
class Rule:
    """A pool rule: clients matching `match` go to `sites`, in that order of preference.

    kind is "country" (ISO 3166 alpha-2, upper case), "continent" (two-letter code:
    AF AN AS EU NA OC SA) or "cidr" (an IPv4/IPv6 network in text form).
    """

    kind: str
    match: str
    sites: tuple[str, ...]
    # sites of equal preference, in order (a nested list in the config); empty: every
    # site of `sites` is its own rank
    groups: tuple[tuple[str, ...], ...] = ()

    def ranks(self) -> tuple[tuple[str, ...], ...]:
        """`sites` as groups of equally good sites, best first."""
        return self.groups or tuple((s,) for s in self.sites)


@dataclass(frozen=True, slots=True)
class Pool:
    """A set of sites a geo name is answered from, and how to choose among them.

    Rules are tried most specific first (cidr by prefix length, then country, then
    continent). With no matching rule, `fallback` decides: "nearest" (great-circle
    distance to the client) or "default" (the `default` list in order).

    Load balancing (see README "Load balancing"): sites of equal rank (a group in a rule
    or the default list, or nearest sites within `tie_km` of each other) share clients
    by Site.weight; `max_answers` caps the addresses per answer; `answer_order` says
    how a choice among equals is made: "sticky" (by a hash of the client's /24 or /56,
    the ECS scope covers it) or "shuffle" (rotating pre-rendered orderings).
    """

    name: str
    members: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    fallback: str = "nearest"
    default: tuple[str, ...] = ()
    default_groups: tuple[tuple[str, ...], ...] = ()
    tie_km: float = 0.0
    max_answers: int = 0  # 0: every address of the chosen sites
    answer_order: str = "sticky"  # sticky | shuffle
    window_s: float = 60.0  # capacity shares are measured over this window
    ttl_under_change_s: int = 0  # 0: answers keep the name's TTL while sites change
    # every member observed DOWN: "open" answers the nearest anyway (never a drained
    # site); "empty" answers NODATA (an explicit opt-in)
    all_down: str = "open"

    def default_ranks(self) -> tuple[tuple[str, ...], ...]:
        """The default list as groups of equally good sites, best first."""
        return self.default_groups or tuple((s,) for s in self.default)


@dataclass(frozen=True, slots=True)
class SiteState:
    """Health of one site as the DNS path sees it (immutable; part of a View)."""

    observed: Health = Health.UNKNOWN
    override: Override = Override.OBEY
    # per-address observed health, for address-level checks; missing = follows site
    address_down: frozenset[str] = frozenset()
    stale: bool = False
    # flap damping: held DOWN (until `damped_until`) for changing state too often;
    # addresses checked one by one can be held alone (they are in address_down too)
    damped: bool = False
    damped_until: float | None = None
    damped_addresses: frozenset[str] = frozenset()
    # slow start / ramped drain: the share (0..1) of the site's clients it answers now,
    # chosen by a hash of the client prefix; ramp_kind "up" (failback) or "down" (drain)
    ramp: float = 1.0
    ramp_kind: str = ""
    ramp_until: float | None = None
    # ramping, damped or changed state recently: its pools answer with a shorter TTL
    changing: bool = False

    @property
    def drained(self) -> bool:
        return self.override is Override.DOWN

    @property
    def usable(self) -> bool:
        """Effective health: override first, then flap damping, then observation
        (UNKNOWN counts as UP)."""
        if self.override is Override.DOWN:
            return False
        if self.override is Override.UP:
            return True
        if self.damped:
            return False
        return self.observed is not Health.DOWN


@dataclass(frozen=True, slots=True)
class PoolBalance:
    """Capacity spill-over of one pool, as the last window measured it (part of a View).

    `offered_share[site]`: the share of the pool's answers (on this node, over the
    window) for which the site was the first choice still standing when capacity was
    checked: the answers it got plus those it passed on. `spill[site]`: the fraction of
    its clients (by a hash of the client prefix) sent to the next site,
    1 - capacity / offered_share when positive.
    """

    spill: Mapping[str, float] = field(default_factory=dict)
    offered_share: Mapping[str, float] = field(default_factory=dict)
    answers: int = 0  # answers of the pool in the window the shares come from
    window_s: float = 0.0


@dataclass(slots=True, eq=False)
class Tally:
    """Answers of one kind sent and not yet added to the statistics.

    The fast path bumps `hits` on its rendered body's tally (and puts the tally on
    `handler.Stats.pending` the first time); `Stats.fold` adds hits x (query counter,
    sites, capacity keys) and resets it. (A packet-cache hit does the same on its
    CacheInfo.)"""

    stats_key: tuple[str, int, str]  # (qtype name, rcode, transport)
    sites: tuple[str, ...]
    offered: tuple[tuple[str, str], ...]  # Stats.pool_offered keys
    ecs: bool = False
    hits: int = 0


MAX_PENDING = 4096  # Stats folds when this many tallies are waiting


@dataclass(frozen=True, slots=True)
class Location:
    """Where a client is, according to the GeoIP database.

    `network` is the database network that contains the address (every address in it
    gets the same record), so its prefix length bounds the ECS scope.
    """

    network: IPNetwork
    country: str | None = None
    continent: str | None = None
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a geo decision: chosen sites, best first, and the ECS scope.

    `scope` is the prefix length (of the address family of the client address) over
    which every input of the decision is constant (RFC 7871 §7.2.1). `trace` holds
    human-readable steps for `geodns explain`.
    """

    sites: tuple[str, ...]
    scope: int
    trace: tuple[str, ...] = field(default=())
    rule: str | None = None
    # True: answer with the ordinary zone-file record (client unlocatable and no default
    # rule, or every member drained). False with no sites: NODATA.
    use_zone_record: bool = False
    # the addresses to answer with, in order (None: every usable address of `sites`)
    addresses: tuple[str, ...] | None = None
    # a hash of the client prefix chose (weights, ramp, capacity): scope covers it
    hashed: bool = False
    # answer_order "shuffle": the answer is one of `rotations` orderings (1: fixed)
    rotations: int = 1
    # sites passed over for this client: (site, "capacity" | "ramp" | "damped", detail)
    passed: tuple[tuple[str, str, str], ...] = ()
    # sites whose capacity share this answer counts toward (see PoolBalance); empty
    # when no candidate has a capacity below 1 (nothing to account)
    offered: tuple[str, ...] = ()
    # a member of the pool is changing (ramp, damping, recent flip): TTL at most this
    ttl_cap_s: int | None = None


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """How one site (or each of its addresses) is probed. See geodns.toml [checks]."""

    kind: str = "none"  # tcp | http | https | dns | none
    port: int | None = None  # default: 80 http, 443 https, 53 dns; required for tcp
    target: str | None = None  # probe this address instead of the answered ones
    per_address: bool = False  # probe every address; a failed one leaves alone
    interval_s: float = 10.0
    timeout_s: float | None = None  # default interval_s / 2, never above interval_s
    down_thresh: int = 3
    up_thresh: int = 5
    # http / https
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    expect_status: tuple[int, ...] = (200,)
    body_contains: str | None = None
    body_max_bytes: int = 65536
    verify_tls: bool = True
    # dns
    qname: str | None = None
    qtype: str = "A"
    expect_rcode: str = "NOERROR"

    @property
    def effective_timeout_s(self) -> float:
        t = self.timeout_s if self.timeout_s is not None else self.interval_s / 2
        return min(t, self.interval_s)
