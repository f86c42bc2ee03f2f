"""Plain data shared by every layer: sites, pools, health, locations.

Only the standard library is imported here; every other module may import this one.
Names are absolute, lower-case, with a trailing dot. Units are in the field names.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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

    def addresses(self, family: int) -> tuple[str, ...]:
        """The site's addresses of one family (4 or 6)."""
        return self.ipv4 if family == 4 else self.ipv6


@dataclass(frozen=True, slots=True)
class Rule:
    """A pool rule: clients matching `match` go to `sites`, in that order of preference.

    kind is "country" (ISO 3166 alpha-2, upper case), "continent" (two-letter code:
    AF AN AS EU NA OC SA) or "cidr" (an IPv4/IPv6 network in text form).
    """

    kind: str
    match: str
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pool:
    """A set of sites a geo name is answered from, and how to choose among them.

    Rules are tried most specific first (cidr by prefix length, then country, then
    continent). With no matching rule, `fallback` decides: "nearest" (great-circle
    distance to the client) or "default" (the `default` list in order).
    """

    name: str
    members: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    fallback: str = "nearest"
    default: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SiteState:
    """Health of one site as the DNS path sees it (immutable; part of a View)."""

    observed: Health = Health.UNKNOWN
    override: Override = Override.OBEY
    # per-address observed health, for address-level checks; missing = follows site
    address_down: frozenset[str] = frozenset()
    stale: bool = False

    @property
    def drained(self) -> bool:
        return self.override is Override.DOWN

    @property
    def usable(self) -> bool:
        """Effective health: override first, then observation (UNKNOWN counts as UP)."""
        if self.override is Override.DOWN:
            return False
        if self.override is Override.UP:
            return True
        return self.observed is not Health.DOWN


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
