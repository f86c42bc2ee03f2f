"""Server settings from one TOML file, `geodns.toml` (--config PATH or $GEODNS_CONFIG).

Every key is declared below, with its default and meaning, in one dataclass per section.
Unknown keys, wrong types and out-of-range values are collected and reported together as
`FILE: key.path: what is wrong (allowed: ...)`. Relative paths are relative to the
directory of the config file.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import dns.exception
import dns.name

from .errors import ConfigError
from .model import CheckSpec, Pool, Rule, Site

DEFAULT_CONFIG = "geodns.toml"


def _doc(text: str, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"doc": text})


def _unknown(where: str, key: str, allowed: Iterable[str]) -> str:
    return f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})"


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = _doc(
        "addresses to serve DNS on, UDP and TCP: 'ADDR:PORT' or '[V6ADDR]:PORT'",
        ("127.0.0.1:1053",),
    )
    nsid: str = _doc("NSID (RFC 5001) returned to clients that ask; empty = off", "")
    max_udp_payload: int = _doc(
        "largest UDP reply we send to EDNS clients (DNS flag day 2020 value)", 1232
    )
    tcp_idle_timeout_s: float = _doc("close a TCP connection idle this long (RFC 7766)", 10.0)
    tcp_query_timeout_s: float = _doc(
        "close a TCP connection whose message takes longer than this to arrive", 30.0
    )
    tcp_max_connections: int = _doc("concurrent TCP connections, all clients", 1000)
    tcp_max_connections_per_client: int = _doc(
        "concurrent TCP connections from one client address", 100
    )
    tcp_max_queries_per_connection: int = _doc(
        "queries on one TCP connection before it is closed; 0 = unlimited", 0
    )
    max_cname_chain: int = _doc("in-zone CNAME links followed for one query", 8)
    max_additional_rrsets: int = _doc(
        "optional additional-section RRsets (addresses of MX/SRV/NS targets, sibling "
        "glue) written into one reply: caps the work one query causes; required glue "
        "is never capped (RFC 9471)",
        32,
    )
    user: str = _doc("when started as root: bind, then run as this user; empty = stay", "")
    log_level: str = _doc("debug | info | warning | error", "info")
    query_log: bool = _doc(
        "log every query on the geodns.query logger (INFO): transport, client, question, "
        "rcode, size; costly, for debugging",
        False,
    )
    node_id: str = _doc("this node's name in the store and votes; default: the hostname", "")
    packet_cache: bool = _doc("answer repeated questions from a cache of reply bytes", True)
    fast_path: bool = _doc(
        "replay answers pre-rendered to wire bytes for questions answered before "
        "(geodns/fastpath.py); false: decode, resolve, pick and encode every query that "
        "the packet cache misses",
        True,
    )
    udp_batch: bool = _doc(
        "Linux: receive and send UDP in batches (recvmmsg/sendmmsg, geodns/udpbatch.py); "
        "false: one datagram per event-loop callback (asyncio's transport)",
        True,
    )
    udp_thread: bool = _doc(
        "with udp_batch: a receive thread per UDP socket blocks in recvmmsg and answers "
        "each batch holding the catalog's lock (cheaper wakeups: bench/README.md); "
        "false: the event loop's reader",
        True,
    )
    packet_cache_size: int = _doc(
        "cached replies per transport (a question is cached the second time it misses); "
        "a full cache is emptied",
        100000,
    )
    workers: int = _doc(
        "DNS worker processes on sockets the main process binds; 1 = this process serves "
        "DNS itself",
        1,
    )
    worker_stall_timeout_s: float = _doc(
        "with workers > 1: a worker that sends the main process nothing (it reports its "
        "counters every second) for this long, or that holds a shared UDP socket while "
        "datagrams wait in it this long and no worker takes any, is killed and "
        "restarted; 0 = never",
        10.0,
    )
    worker_udp_shared: bool = _doc(
        "with workers > 1 (and udp_batch, udp_thread on Linux): the workers share each "
        "UDP socket and one receives at a time, handing on after a full batch of 32, so "
        "a worker wakes only when the others cannot keep up (bench/README.md); false: "
        "a SO_REUSEPORT socket per worker, the kernel spreads queries by source",
        True,
    )


@dataclass(frozen=True)
class ZonesConfig:
    directory: str = _doc("directory holding <origin>.zone and <origin>.geo.toml files", "zones")
    watch: bool = _doc("reload changed files by themselves (inotify, else polling)", True)
    debounce_s: float = _doc("a changed file must be still this long before it is read", 0.2)
    remove_grace_s: float = _doc("a deleted zone file must stay gone this long to unload", 5.0)
    poll_interval_s: float = _doc("how often to look for changes when inotify is missing", 2.0)
    cache_dir: str = _doc(
        "compiled copies of big zone files (>= 256 KB), so a restart need not parse them",
        "state/zonecache",
    )


@dataclass(frozen=True)
class ApiConfig:
    listen: str = _doc("ops HTTP API address 'ADDR:PORT'; empty = no API", "127.0.0.1:8053")
    tokens: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "named bearer tokens for writes: name = secret"}
    )
    token_file: str = _doc("generated token (0600) when [api.tokens] is empty", "state/api-token")
    tls_cert: str = _doc("PEM certificate for HTTPS", "")
    tls_key: str = _doc("PEM private key for HTTPS", "")
    allow_plaintext: bool = _doc("serve plain HTTP on a non-loopback address", False)
    max_body_bytes: int = _doc("largest request body accepted", 65536)


@dataclass(frozen=True)
class StoreConfig:
    database_url: str = _doc(
        "SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
        "sqlite:///data/geodns.sqlite3",
    )
    journal_dir: str = _doc("local journal for writes made while the DB is down", "state/journal")
    notify: bool = _doc(
        "PostgreSQL: LISTEN/NOTIFY so other nodes see quorum decisions and overrides at "
        "once (else within one check interval, at most 5 s, by polling); off behind a "
        "transaction-pooling proxy that cannot LISTEN",
        True,
    )


@dataclass(frozen=True)
class GeoipConfig:
    database: str = _doc("MaxMind-format database (City or flat country schema)", "")
    countries: str = _doc("country table: iso,continent,lat,lon,name", "")
    cities: str = _doc("city table for placing sites by city + country", "")
    cache_size: int = _doc("cached lookups (per network)", 65536)
    state_dir: str = _doc(
        "where `geodns geoip update` installs downloaded databases (git-ignored); "
        "state_dir/current.mmdb, when it exists, is used instead of `database`, at start "
        "and from the next reload check on",
        "state/geoip",
    )
    reload_interval_s: float = _doc(
        "seconds between checks for a replaced GeoIP database (the file in use, or a new "
        "state_dir/current.mmdb), reopened without a restart; SIGHUP checks at once; 0 = "
        "only on SIGHUP",
        60.0,
    )


@dataclass(frozen=True)
class ChecksConfig:
    interval_s: float = _doc("seconds between probes of one target", 10.0)
    timeout_s: float | None = _doc("probe timeout; default interval_s / 2", None)
    down_thresh: int = _doc("consecutive failures before a target is DOWN", 3)
    up_thresh: int = _doc("consecutive successes before a DOWN target is UP again", 5)
    max_concurrency: int = _doc("probes in flight at once", 256)
    partition_min_sites: int = _doc("partition guard applies from this many sites", 4)
    partition_share: float = _doc("share of sites flipping DOWN at once that is suspect", 0.5)
    stale_intervals: int = _doc("no verdict for this many intervals = stale", 3)
    quorum: str = _doc(
        "several nodes vote on each site: 'auto' (on when [store] is a database server "
        "such as PostgreSQL, or once another checking node heartbeats into the same SQLite "
        "file), 'on', or 'off' (each node acts on its own checks alone)",
        "auto",
    )
    quorum_min_votes: int = _doc(
        "fresh UP/DOWN votes needed to decide a site (DOWN needs a majority of them); "
        "below it the last decision is kept and flagged stale",
        2,
    )
    # -- load balancing (README "Load balancing")
    ramp_s: float = _doc(
        "slow start: a site back in service (UP again, undrained, released from damping) "
        "gets its clients back in steps over this many seconds, chosen by client-prefix "
        "hash; 0 = all at once (300 is a good start)",
        0.0,
    )
    ramp_step_s: float = _doc("slow start and ramped drains move clients every this often", 30.0)
    ramp_start: float = _doc(
        "share of its clients a site gets back at once (a ramped drain takes this away "
        "at once); then equal steps to 100 %",
        0.1,
    )
    flap_max: int = _doc(
        "flap damping: a site (or a checked address) changing state more than this many "
        "times within flap_window_s is held DOWN; 0 = off (4 is a good start)",
        0,
    )
    flap_window_s: float = _doc("flap damping: the window state changes are counted in", 600.0)
    flap_penalty_s: float = _doc(
        "flap damping: the first hold; each further hold while earlier ones are "
        "remembered lasts twice as long",
        120.0,
    )
    flap_penalty_max_s: float = _doc("flap damping: the longest hold", 3600.0)
    flap_decay_s: float = _doc(
        "flap damping: each this many quiet seconds after a hold forget one doubling", 1800.0
    )
    settle_s: float = _doc(
        "a site whose state changed counts as changing this long (pools with "
        "ttl_under_change_s answer with that TTL meanwhile, as while it ramps or is damped)",
        300.0,
    )


@dataclass(frozen=True)
class CookiesConfig:
    secret: str = _doc(
        "hex secret (16 bytes) for server cookies, shared by all nodes; empty = random",
        "",
    )
    previous_secret: str = _doc("previous secret, still accepted during rotation", "")
    require: bool = _doc(
        "answer BADCOOKIE to UDP queries that carry a client cookie without a valid server "
        "cookie (a query with no COOKIE option is answered as usual: RFC 7873 §5.2.1)",
        False,
    )


@dataclass(frozen=True)
class RrlConfig:
    """Response rate limiting (geodns/rrl.py), on by default.

    Why on, and why 200/s: NSD ships RRL on at 200 responses/s per /24; BIND and Knot
    ship it off, which leaves a fresh install usable as a reflector until an operator
    reads the manual. An authoritative server's real clients are resolvers that cache
    for the TTL, so one resolver network asks us for one name far less than 200 times a
    second; a limited client still gets 200 full answers/s plus a TC=1 reply for every
    `slip`-th limited one, and a resolver then retries over TCP, which is never limited.
    Resolvers sending a valid DNS cookie are not limited at all. Large ECS-enabled
    resolver farms that ask for one geo name per client subnet can exceed the rate:
    put their networks in `exempt` or raise the rate.
    """

    enabled: bool = _doc("rate-limit UDP responses per client network and kind", True)
    responses_per_s: float = _doc(
        "responses per second one client network gets for one kind (an answer for a "
        "name, NXDOMAIN or referrals for a zone, errors) before it is limited",
        200.0,
    )
    window_s: float = _doc(
        "burst and memory, in seconds: a bucket holds responses_per_s * window_s "
        "responses, and a network is unlimited again window_s after its flood ends",
        2.0,
    )
    slip: int = _doc(
        "every slip-th limited response goes out truncated (TC=1, no records) so real "
        "clients retry over TCP; 1 = all, 0 = drop all",
        2,
    )
    ipv4_prefix: int = _doc("IPv4 source addresses are grouped into networks of this length", 24)
    ipv6_prefix: int = _doc("IPv6 source addresses are grouped into networks of this length", 56)
    exempt: tuple[str, ...] = _doc(
        "networks never limited (CIDR); the packet's source address is matched, never ECS",
        ("127.0.0.0/8", "::1/128"),
    )
    table_size: int = _doc(
        "buckets in the fixed table (16 bytes each, shared by all workers); when full, "
        "idle buckets are reused first and limited ones never",
        262144,
    )


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    zones: ZonesConfig
    api: ApiConfig
    store: StoreConfig
    geoip: GeoipConfig
    checks: ChecksConfig
    cookies: CookiesConfig
    sites: dict[str, Site]
    pools: dict[str, Pool]
    site_checks: dict[str, CheckSpec]
    rrl: RrlConfig = field(default_factory=RrlConfig)

    def resolve(self, p: str) -> Path:
        """A path from the config, made absolute relative to the config file's directory."""
        path = Path(p)
        return path if path.is_absolute() else (self.path.parent / path)

    @property
    def node_id(self) -> str:
        return self.server.node_id or socket.gethostname()


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "zones": ZonesConfig,
    "api": ApiConfig,
    "store": StoreConfig,
    "geoip": GeoipConfig,
    "checks": ChecksConfig,
    "cookies": CookiesConfig,
    "rrl": RrlConfig,
}
_REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "none")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where, problems)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: must be a list of {_type_name(inner)}")
            return ()
        return tuple(_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: must be a table")
            return {}
        return {k: _coerce(v, inner, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: must be a number, not {value!r}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: must be an integer, not {value!r}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: must be true or false, not {value!r}")
            return False
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: must be a string, not {value!r}")
            return ""
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module


def _build(cls: Any, table: Any, where: str, problems: list[str]) -> Any:
    """Make dataclass `cls` from a TOML table, rejecting unknown keys."""
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        table = {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name in hints}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            allowed = ", ".join(sorted(known))
            problems.append(f"{where}.{key}: unknown key (allowed: {allowed})")
            continue
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}", problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        problems.append(f"{where}: {exc}")
        return None


def _split_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:53' or '[::1]:53' -> (host, port); raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError("expected [ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected ADDR:PORT (IPv6 as [ADDR]:PORT)")
    ipaddress.ip_address(host)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    return host, port


def parse_listen(text: str) -> tuple[str, int]:
    """Parse one listen address, raising ValueError with a readable message."""
    try:
        return _split_hostport(text)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


# [sites.NAME] keys
SITE_KEYS_DOC: dict[str, str] = {
    "ipv4": "list of IPv4 addresses answered for the site",
    "ipv6": "list of IPv6 addresses answered for the site",
    "lat": "latitude (with lon), -90..90",
    "lon": "longitude (with lat), -180..180",
    "city": "city name from the city table (with country), instead of lat/lon",
    "country": "ISO 3166 alpha-2 code of the city",
    "weight": "share among equally good sites of a pool, >= 0 (default 1; 0 = only when "
    "the others are unusable)",
    "capacity": "most of a pool's answers the site takes, 0 < capacity <= 1 (default 1): "
    "above it, a hashed share of its clients goes to the next site",
    "address_weights": "table address = weight: share among the site's own addresses "
    "when max_answers cuts them (default 1 each)",
    "check": "the health check table [sites.NAME.check]",
    "cname": "absolute CNAME target answered for this site by geo names of type CNAME "
    "(e.g. 'uk.cdn.example.net.')",
}
# [pools.NAME] keys
POOL_KEYS_DOC: dict[str, str] = {
    "members": "the sites of the pool",
    "rules": "list of {country|continent|cidr = ..., sites = [...]}; a nested list in "
    "sites is a group of equally good sites, e.g. [['uk', 'ams'], 'fra']",
    "fallback": "'nearest' (great-circle distance) or 'default' (the default list)",
    "default": "ordered site list (nested lists are groups of equal sites)",
    "tie_km": "nearest: sites within this many km of each other are equally good and "
    "share clients by weight (default 0: only exact ties)",
    "max_answers": "most addresses in one answer, 0 = all of the chosen sites' (default)",
    "answer_order": "how a choice among equals is made: 'sticky' (default: by a hash of "
    "the client's /24 or /56, the ECS scope covers it) or 'shuffle' (rotating weighted "
    "orderings, per answer)",
    "window_s": "capacity shares are measured over windows of this many seconds (60)",
    "all_down": "every member observed DOWN: 'open' (default) answers the nearest anyway, "
    "never a drained one; 'empty' answers NODATA",
    "ttl_under_change_s": "while a member ramps, is damped or changed state within "
    "[checks] settle_s, answers use at most this TTL; 0 = off (default)",
}
_SITE_KEYS = set(SITE_KEYS_DOC)
_POOL_KEYS = set(POOL_KEYS_DOC)
_RULE_KINDS = ("cidr", "country", "continent")
_RULE_KEYS = "cidr, country, continent, sites"
_CONTINENTS = {"AF", "AN", "AS", "EU", "NA", "OC", "SA"}


def _city_coordinates(city: str, country: str, cities_path: Path) -> tuple[float, float] | None:
    from .geo import CityTable  # geo owns the city table; imported lazily (optional data)

    return CityTable.load(cities_path).find(city, country)


def _parse_site(
    name: str, table: Any, where: str, cities: Path, checks: ChecksConfig, problems: list[str]
) -> tuple[Site | None, CheckSpec | None]:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None, None
    for key in table:
        if key not in _SITE_KEYS:
            problems.append(_unknown(where, key, _SITE_KEYS))
    v4 = _coerce(table.get("ipv4", []), tuple[str, ...], f"{where}.ipv4", problems)
    v6 = _coerce(table.get("ipv6", []), tuple[str, ...], f"{where}.ipv6", problems)
    for i, a in enumerate(v4):
        try:
            ipaddress.IPv4Address(a)
        except ValueError:
            problems.append(f"{where}.ipv4[{i}]: {a!r} is not an IPv4 address")
    for i, a in enumerate(v6):
        try:
            ipaddress.IPv6Address(a)
        except ValueError:
            problems.append(f"{where}.ipv6[{i}]: {a!r} is not an IPv6 address")
    cname = table.get("cname")
    if cname is not None:
        if not isinstance(cname, str) or not cname.endswith(".") or ".." in cname:
            problems.append(f"{where}.cname: {cname!r} must be an absolute name ending in '.'")
            cname = None
        else:
            try:
                dns.name.from_text(cname)
            except dns.exception.DNSException as exc:
                problems.append(f"{where}.cname: {exc}")
                cname = None
    if not v4 and not v6 and not cname:
        problems.append(f"{where}: needs at least one address in ipv4 or ipv6 (or a cname)")
    lat = lon = 0.0
    if "lat" in table or "lon" in table:
        lat = _coerce(table.get("lat"), float, f"{where}.lat", problems)
        lon = _coerce(table.get("lon"), float, f"{where}.lon", problems)
        if not -90 <= lat <= 90:
            problems.append(f"{where}.lat: must be within -90..90, not {lat}")
        if not -180 <= lon <= 180:
            problems.append(f"{where}.lon: must be within -180..180, not {lon}")
        if "city" in table:
            problems.append(f"{where}: give lat/lon or city + country, not both")
    elif "city" in table:
        city = _coerce(table.get("city"), str, f"{where}.city", problems)
        country = _coerce(table.get("country", ""), str, f"{where}.country", problems)
        if not country:
            problems.append(f"{where}.country: required with city (ISO code, e.g. 'GB')")
        else:
            found = _city_coordinates(city, country, cities)
            if found is None:
                problems.append(
                    f"{where}.city: {city!r}, {country!r} is not in the city table {cities}"
                )
            else:
                lat, lon = found
    else:
        problems.append(f"{where}: needs a location: lat + lon, or city + country")
    weight = _coerce(table.get("weight", 1), int, f"{where}.weight", problems)
    if weight < 0:
        problems.append(f"{where}.weight: must be >= 0")
    capacity = _coerce(table.get("capacity", 1.0), float, f"{where}.capacity", problems)
    if not 0 < capacity <= 1:
        problems.append(f"{where}.capacity: must be within (0, 1], a share of the pool")
    raw_weights = _coerce(
        table.get("address_weights", {}), dict[str, int], f"{where}.address_weights", problems
    )
    address_weights: list[tuple[str, int]] = []
    for addr, w in raw_weights.items():
        if addr not in (*v4, *v6):
            problems.append(f"{where}.address_weights.{addr}: not an address of the site")
        elif w < 0:
            problems.append(f"{where}.address_weights.{addr}: must be >= 0")
        else:
            address_weights.append((addr, w))
    spec = None
    if "check" in table:
        defaults = {
            "interval_s": checks.interval_s,
            "timeout_s": checks.timeout_s,
            "down_thresh": checks.down_thresh,
            "up_thresh": checks.up_thresh,
        }
        raw = table["check"]
        merged = {**defaults, **raw} if isinstance(raw, dict) else raw
        spec = _build(CheckSpec, merged, f"{where}.check", problems)
        if spec is not None:
            if spec.kind not in ("tcp", "http", "https", "dns", "none"):
                problems.append(
                    f"{where}.check.kind: {spec.kind!r} (allowed: tcp, http, https, dns, none)"
                )
            if spec.kind == "tcp" and spec.port is None:
                problems.append(f"{where}.check.port: required for a tcp check")
            if spec.kind == "dns" and not spec.qname:
                problems.append(f"{where}.check.qname: required for a dns check")
            if spec.interval_s <= 0:
                problems.append(f"{where}.check.interval_s: must be > 0")
            if spec.down_thresh < 1 or spec.up_thresh < 1:
                problems.append(f"{where}.check: down_thresh and up_thresh must be >= 1")
    site = Site(name, v4, v6, lat, lon, weight, capacity, tuple(address_weights), cname)
    return site, spec


def _site_groups(
    value: Any, where: str, problems: list[str]
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """A site list whose entries are names or lists of equally good names:
    (flat order, groups); groups is empty when no entry is a list."""
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of site names (a nested list: equal sites)")
        return (), ()
    groups: list[tuple[str, ...]] = []
    nested = False
    for i, entry in enumerate(value):
        if isinstance(entry, list):
            nested = True
            group = _coerce(entry, tuple[str, ...], f"{where}[{i}]", problems)
            if not group:
                problems.append(f"{where}[{i}]: an empty group")
            groups.append(group)
        else:
            groups.append((_coerce(entry, str, f"{where}[{i}]", problems),))
    flat = tuple(n for g in groups for n in g)
    return flat, tuple(groups) if nested else ()


def _parse_pool(name: str, table: Any, where: str, sites: set[str], problems: list[str]) -> Pool:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return Pool(name, ())
    for key in table:
        if key not in _POOL_KEYS:
            problems.append(_unknown(where, key, _POOL_KEYS))
    members = _coerce(table.get("members", []), tuple[str, ...], f"{where}.members", problems)
    if not members:
        problems.append(f"{where}.members: a pool needs at least one site")
    for m in members:
        if m not in sites:
            problems.append(f"{where}.members: unknown site {m!r} (defined: {sorted(sites)})")
    fallback = _coerce(table.get("fallback", "nearest"), str, f"{where}.fallback", problems)
    if fallback not in ("nearest", "default"):
        problems.append(f"{where}.fallback: {fallback!r} (allowed: nearest, default)")
    default, default_groups = _site_groups(table.get("default", []), f"{where}.default", problems)
    if fallback == "default" and not default:
        problems.append(f"{where}.default: required when fallback = 'default'")
    for s in default:
        if s not in members:
            problems.append(f"{where}.default: {s!r} is not a member of the pool")
    rules: list[Rule] = []
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        problems.append(f"{where}.rules: must be a list of tables")
        raw_rules = []
    for i, r in enumerate(raw_rules):
        rw = f"{where}.rules[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{rw}: must be a table like {{country = 'GB', sites = ['uk']}}")
            continue
        kinds = [k for k in _RULE_KINDS if k in r]
        for key in r:
            if key not in (*_RULE_KINDS, "sites"):
                problems.append(f"{rw}.{key}: unknown key (allowed: {_RULE_KEYS})")
        if len(kinds) != 1:
            problems.append(f"{rw}: needs exactly one of cidr, country, continent")
            continue
        kind = kinds[0]
        match = _coerce(r[kind], str, f"{rw}.{kind}", problems)
        if kind == "cidr":
            try:
                match = str(ipaddress.ip_network(match, strict=True))
            except ValueError as exc:
                problems.append(f"{rw}.cidr: {exc}")
        elif kind == "country":
            match = match.upper()
            if len(match) != 2 or not match.isalpha():
                problems.append(f"{rw}.country: {match!r} is not an ISO 3166 alpha-2 code")
        else:
            match = match.upper()
            if match not in _CONTINENTS:
                problems.append(f"{rw}.continent: {match!r} (allowed: {sorted(_CONTINENTS)})")
        rule_sites, groups = _site_groups(r.get("sites", []), f"{rw}.sites", problems)
        if not rule_sites:
            problems.append(f"{rw}.sites: a rule needs at least one site")
        for s in rule_sites:
            if s not in members:
                problems.append(f"{rw}.sites: {s!r} is not a member of the pool")
        rules.append(Rule(kind, match, rule_sites, groups))
    tie_km = _coerce(table.get("tie_km", 0.0), float, f"{where}.tie_km", problems)
    if tie_km < 0:
        problems.append(f"{where}.tie_km: must be >= 0")
    max_answers = _coerce(table.get("max_answers", 0), int, f"{where}.max_answers", problems)
    if max_answers < 0:
        problems.append(f"{where}.max_answers: must be >= 0 (0 = every address)")
    order = _coerce(table.get("answer_order", "sticky"), str, f"{where}.answer_order", problems)
    if order not in ("sticky", "shuffle"):
        problems.append(f"{where}.answer_order: {order!r} (allowed: sticky, shuffle)")
    window_s = _coerce(table.get("window_s", 60.0), float, f"{where}.window_s", problems)
    if window_s <= 0:
        problems.append(f"{where}.window_s: must be > 0")
    ttl_change = _coerce(
        table.get("ttl_under_change_s", 0), int, f"{where}.ttl_under_change_s", problems
    )
    if ttl_change < 0:
        problems.append(f"{where}.ttl_under_change_s: must be >= 0 (0 = off)")
    all_down = _coerce(table.get("all_down", "open"), str, f"{where}.all_down", problems)
    if all_down not in ("open", "empty"):
        problems.append(f"{where}.all_down: {all_down!r} (allowed: open, empty)")
    return Pool(
        name,
        members,
        tuple(rules),
        fallback,
        default,
        default_groups,
        tie_km,
        max_answers,
        order,
        window_s,
        ttl_change,
        all_down,
    )


def _check_rrl(rrl: RrlConfig, where: str) -> list[str]:
    problems: list[str] = []
    if rrl.responses_per_s <= 0:
        problems.append(f"{where}: rrl.responses_per_s: must be > 0")
    if rrl.window_s <= 0:
        problems.append(f"{where}: rrl.window_s: must be > 0")
    elif rrl.responses_per_s * rrl.window_s < 1:
        problems.append(f"{where}: rrl: responses_per_s * window_s must be >= 1 (the burst)")
    if not 0 <= rrl.slip <= 10:
        problems.append(f"{where}: rrl.slip: must be within 0..10 (0 = never slip)")
    if not 1 <= rrl.ipv4_prefix <= 32:
        problems.append(f"{where}: rrl.ipv4_prefix: must be within 1..32")
    if not 1 <= rrl.ipv6_prefix <= 128:
        problems.append(f"{where}: rrl.ipv6_prefix: must be within 1..128")
    for i, text in enumerate(rrl.exempt):
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            problems.append(f"{where}: rrl.exempt[{i}]: {exc}")
    if not 2 <= rrl.table_size <= 1 << 26:
        problems.append(f"{where}: rrl.table_size: must be within 2..67108864")
    return problems


MIN_TOKEN_CHARS = 16


def token_problems(api: ApiConfig, where: str) -> list[str]:
    """[api.tokens] secrets too short to be a bearer token (load_config and the API)."""
    return [
        f"{where}: api.tokens.{name}: must be at least {MIN_TOKEN_CHARS} characters"
        for name, secret in api.tokens.items()
        if len(secret) < MIN_TOKEN_CHARS
    ]


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the config file; raise ConfigError listing every problem.

    With no path: $GEODNS_CONFIG, else ./geodns.toml; a missing default file means all
    defaults (a missing explicit file is an error).
    """
    explicit = path is not None or "GEODNS_CONFIG" in os.environ
    cfg_path = Path(path or os.environ.get("GEODNS_CONFIG") or DEFAULT_CONFIG).resolve()
    problems: list[str] = []
    raw: dict[str, Any] = {}
    try:
        with open(cfg_path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError([f"{cfg_path}: no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{cfg_path}: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{cfg_path}: {exc.strerror}"]) from None

    where = str(cfg_path)
    allowed = [*_SECTIONS, "sites", "pools"]
    for key in raw:
        if key not in allowed:
            problems.append(f"{where}: {key}: unknown section (allowed: {', '.join(allowed)})")
    sections = {
        name: _build(cls, raw.get(name, {}), f"{where}: {name}", problems)
        for name, cls in _SECTIONS.items()
    }
    server: ServerConfig = sections["server"] or ServerConfig()
    for i, addr in enumerate(server.listen):
        try:
            parse_listen(addr)
        except ValueError as exc:
            problems.append(f"{where}: server.listen[{i}]: {exc}")
    if server.max_udp_payload < 512 or server.max_udp_payload > 65535:
        problems.append(f"{where}: server.max_udp_payload: must be within 512..65535")
    if server.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"{where}: server.log_level: {server.log_level!r}")
    if len(server.nsid.encode()) > 255:
        problems.append(f"{where}: server.nsid: at most 255 bytes")
    cookies: CookiesConfig = sections["cookies"] or CookiesConfig()
    for key in ("secret", "previous_secret"):
        value = getattr(cookies, key)
        if value:
            try:
                if len(bytes.fromhex(value)) != 16:
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: cookies.{key}: must be 32 hex digits (16 bytes)")
    problems += token_problems(sections["api"] or ApiConfig(), where)
    if server.max_additional_rrsets < 0:
        problems.append(f"{where}: server.max_additional_rrsets: must be >= 0")
    if not math.isfinite(server.worker_stall_timeout_s) or (
        server.worker_stall_timeout_s != 0 and server.worker_stall_timeout_s < 2
    ):
        # workers report once a second: less would kill healthy ones
        problems.append(f"{where}: server.worker_stall_timeout_s: must be >= 2 (or 0 = off)")
    rrl: RrlConfig = sections["rrl"] or RrlConfig()
    problems += _check_rrl(rrl, where)

    geoip: GeoipConfig = sections["geoip"] or GeoipConfig()
    checks: ChecksConfig = sections["checks"] or ChecksConfig()
    if checks.quorum not in ("auto", "on", "off"):
        problems.append(f"{where}: checks.quorum: {checks.quorum!r} (allowed: auto, on, off)")
    if checks.quorum_min_votes < 1:
        problems.append(f"{where}: checks.quorum_min_votes: must be >= 1")
    for key in ("ramp_s", "flap_max", "settle_s"):
        if getattr(checks, key) < 0:
            problems.append(f"{where}: checks.{key}: must be >= 0 (0 = off)")
    for key in ("ramp_step_s", "flap_window_s", "flap_penalty_s", "flap_decay_s"):
        if getattr(checks, key) <= 0:
            problems.append(f"{where}: checks.{key}: must be > 0")
    if checks.flap_penalty_max_s < checks.flap_penalty_s:
        problems.append(f"{where}: checks.flap_penalty_max_s: must be >= flap_penalty_s")
    if not 0 < checks.ramp_start <= 1:
        problems.append(f"{where}: checks.ramp_start: must be within (0, 1]")
    base = cfg_path.parent

    def rel(p: str, default: Path) -> str:
        if not p:
            return str(default)
        return str(Path(p) if Path(p).is_absolute() else base / p)

    geoip = GeoipConfig(
        database=rel(geoip.database, _REPO_DATA / "dbip-country.mmdb"),
        countries=rel(geoip.countries, _REPO_DATA / "countries.csv"),
        cities=rel(geoip.cities, _REPO_DATA / "cities.csv"),
        cache_size=geoip.cache_size,
        state_dir=rel(geoip.state_dir, base / "state/geoip"),
        reload_interval_s=geoip.reload_interval_s,
    )
    if geoip.reload_interval_s < 0:
        problems.append(f"{where}: geoip.reload_interval_s: must be >= 0 (0 = only on SIGHUP)")

    sites: dict[str, Site] = {}
    site_checks: dict[str, CheckSpec] = {}
    raw_sites = raw.get("sites", {})
    if not isinstance(raw_sites, dict):
        problems.append(f"{where}: sites: must be tables [sites.NAME]")
        raw_sites = {}
    for name, table in raw_sites.items():
        site, spec = _parse_site(
            name, table, f"{where}: sites.{name}", Path(geoip.cities), checks, problems
        )
        if site is not None:
            sites[name] = site
        if spec is not None:
            site_checks[name] = spec
    pools: dict[str, Pool] = {}
    raw_pools = raw.get("pools", {})
    if not isinstance(raw_pools, dict):
        problems.append(f"{where}: pools: must be tables [pools.NAME]")
        raw_pools = {}
    for name, table in raw_pools.items():
        pools[name] = _parse_pool(name, table, f"{where}: pools.{name}", set(sites), problems)

    if problems:
        raise ConfigError(problems)
    return Config(
        path=cfg_path,
        server=server,
        zones=sections["zones"],
        api=sections["api"],
        store=sections["store"],
        geoip=geoip,
        checks=checks,
        cookies=cookies,
        rrl=rrl,
        sites=sites,
        pools=pools,
        site_checks=site_checks,
    )
