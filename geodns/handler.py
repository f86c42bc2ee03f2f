"""handle(): request bytes (+ client address, transport) -> reply bytes, or None.

The whole query path in one place: decode -> checks (opcode, class, EDNS, cookies) ->
locate the client lazily -> resolve() -> encode with truncation. It is a plain function
of its inputs and the current View, so transports, worker processes and a packet cache
can wrap it without changing it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .cookies import CookieJar
from .fastpath import MISS, FastPath, Located
from .model import (
    CNAME_FAMILY,
    MAX_PENDING,
    Decision,
    IPAddress,
    IPNetwork,
    Location,
    Pool,
    SiteState,
    Tally,
    Transport,
    client_prefix,
)
from .resolver import Answer, resolve
from .rrl import COOKIE, COUNT_NAMES, Action, RateLimiter, response_kind
from .view import GeoState, ViewHolder
from .wire import (
    AA,
    BADCOOKIE,
    BADVERS,
    CD,
    CLASS_IN,
    FORMERR,
    NOERROR,
    NOTIMP,
    OP_NOTIFY,
    OP_QUERY,
    OPT_COOKIE,
    OPT_ECS,
    OPT_NSID,
    QR,
    RD,
    REFUSED,
    TC,
    BadQuery,
    ClientSubnet,
    Edns,
    Query,
    Writer,
    decode_query,
    encode_ecs,
    encode_opt,
    error_reply,
)
from .zones import AAAA, AXFR, CNAME, IXFR, OPT, A, GeoName, RRset, Zone, name_to_wire

log = logging.getLogger(__name__)

QTYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    43: "DS",
    255: "ANY",
    65: "HTTPS",
    257: "CAA",
}


class Stats:
    """Plain counters bumped on the query path; /metrics reads them at scrape time.

    A packet-cache hit only bumps `CacheInfo.hits` of the entry it served, a fast-path
    answer `Tally.hits` of its rendered body (each put on `pending` the first time):
    `fold()` adds those into the counters below.
    Every reader of `queries`, `answers_by_site`, `pool_offered` and `ecs_queries` goes
    through a property that folds first and returns a snapshot taken under the lock, so
    nothing reads a count that is behind or a dict that is changing."""

    def __init__(self) -> None:
        self._queries: dict[tuple[str, int, str], int] = {}
        self._answers_by_site: dict[str, int] = {}
        self._ecs_queries = 0  # the hot paths bump this one directly
        # capacity accounting: (pool, site) -> answers that offered the site (it
        # answered first, or passed the client on for capacity); (pool, "") -> the
        # pool's answers
        self._pool_offered: dict[tuple[str, str], int] = {}
        self.truncated = 0
        self.formerr = 0
        self.dropped = 0
        # UDP replies the kernel would not take (send buffer full, or the address refused)
        self.udp_send_dropped = 0
        # --workers N sharing UDP sockets: full batches after which a worker handed the
        # socket on (summed from the workers' reports)
        self.udp_handoffs = 0
        # a worker's report only: seconds its UDP batch in progress has taken so far
        self.udp_busy_s = 0.0
        # a worker's report only: datagrams taken from each shared UDP socket so far
        self.udp_received: list[int] = []
        # RRL decisions, indexed as rrl.COUNT_NAMES (pass, drop, slip, exempt, cookie);
        # the limiter's own list when there is one
        self.rrl: list[int] = [0] * len(COUNT_NAMES)
        # cache entries and fast-path bodies with answers not yet folded in (each at
        # most once)
        self.pending: list[CacheInfo | Tally] = []
        # held by `fold` (readers may run on another thread than the DNS path: the
        # Handler makes it its catalog's lock)
        self.lock: threading.RLock = threading.RLock()
        self._cache_hits = 0  # packet-cache hits folded in so far

    def tally(self, t: CacheInfo | Tally) -> None:
        """One answer sent, counted on its cache entry or rendered body (the hot paths'
        bookkeeping: one increment, and a list append the first time)."""
        n = t.hits
        t.hits = n + 1  # before a fold below, which must see this answer
        if not n:
            pending = self.pending
            pending.append(t)
            if len(pending) >= MAX_PENDING:
                # the list stays small even when nothing reads the statistics (no API,
                # no capacity windows)
                self.fold()

    def fold(self) -> None:
        """Add the per-entry and per-body counts of `tally` into the counters."""
        pending = self.pending
        if not pending:
            return
        with self.lock:
            self._fold(pending[:])
            pending.clear()

    def _fold(self, infos: list[CacheInfo | Tally]) -> None:
        queries, by_site, offered = self._queries, self._answers_by_site, self._pool_offered
        for info in infos:
            n = info.hits
            if not n:
                continue
            info.hits = 0
            if isinstance(info, CacheInfo):
                self._cache_hits += n
            queries[info.stats_key] = queries.get(info.stats_key, 0) + n
            if info.ecs:
                self._ecs_queries += n
            for site in info.sites:
                by_site[site] = by_site.get(site, 0) + n
            if info.sites:
                for k in info.offered:
                    offered[k] = offered.get(k, 0) + n

    @property
    def cache_hits(self) -> int:
        """Answers the packet cache served."""
        self.fold()
        return self._cache_hits

    @property
    def queries(self) -> dict[tuple[str, int, str], int]:
        with self.lock:
            self.fold()
            return dict(self._queries)  # a snapshot: the DNS path may go on counting

    @queries.setter
    def queries(self, value: dict[tuple[str, int, str], int]) -> None:
        self.fold()
        self._queries = value

    @property
    def answers_by_site(self) -> dict[str, int]:
        with self.lock:
            self.fold()
            return dict(self._answers_by_site)  # a snapshot: the DNS path may go on counting

    @answers_by_site.setter
    def answers_by_site(self, value: dict[str, int]) -> None:
        self.fold()
        self._answers_by_site = value

    @property
    def pool_offered(self) -> dict[tuple[str, str], int]:
        with self.lock:
            self.fold()
            return dict(self._pool_offered)  # a snapshot: the DNS path may go on counting

    @pool_offered.setter
    def pool_offered(self, value: dict[tuple[str, str], int]) -> None:
        self.fold()
        self._pool_offered = value

    @property
    def ecs_queries(self) -> int:
        self.fold()
        return self._ecs_queries

    @ecs_queries.setter
    def ecs_queries(self, value: int) -> None:
        self.fold()
        self._ecs_queries = value

    def count(self, qtype: int, rcode: int, transport: Transport) -> None:
        key = (QTYPE_NAMES.get(qtype, "OTHER"), rcode, transport.value)
        self._queries[key] = self._queries.get(key, 0) + 1

    def answered(
        self,
        key: tuple[str, int, str],
        sites: tuple[str, ...],
        offered: tuple[tuple[str, str], ...],
    ) -> None:
        """One answer sent by the full path: its query counter, the sites it answered
        with and the capacity windows it counts toward. (A packet-cache hit and a
        fast-path answer count on their entry or body instead: `fold`.)"""
        queries = self._queries
        queries[key] = queries.get(key, 0) + 1
        if sites:
            by_site = self._answers_by_site
            for site in sites:
                by_site[site] = by_site.get(site, 0) + 1
            if offered:
                pool_offered = self._pool_offered
                for k in offered:
                    pool_offered[k] = pool_offered.get(k, 0) + 1


@dataclass(slots=True)
class CacheInfo:
    """What a reply depended on, so a packet cache can tell when it is still valid."""

    zone_key: bytes | None  # origin of the zone that answered (None: REFUSED)
    # that zone snapshot (identity: a reload replaces it), held weakly: a cache entry
    # must not keep a replaced zone alive (the reaper frees it in slices, reload.py)
    zone: weakref.ref[Zone] | None
    catalog_generation: int  # zones added/removed since (changes longest-match)
    pools: tuple[tuple[str, int], ...]  # geo pools used, with their health version
    by_source: bool  # the client was located by the packet source, not ECS
    scope: int  # the decision's prefix length (source family bits when by_source)
    stats_key: tuple[str, int, str]
    sites: tuple[str, ...]
    ecs: bool
    geo_generation: int  # GeoIP database generation
    rrl_kind: bytes = b""  # RRL kind key (UDP): a cache hit is charged as the miss was
    offered: tuple[tuple[str, str], ...] = ()  # Stats.pool_offered keys to bump
    # shuffled answers: the reply is ordering `turn % rotations` (1: one ordering)
    rotations: int = 1
    turn: int = 0
    hits: int = 0  # packet-cache hits served with this, not yet in Stats (Stats.fold)


_UDP = Transport.UDP  # a module global: enum attribute lookups are slow on the hot path
# Stats.pool_offered keys one answer bumps
Offered = tuple[tuple[str, str], ...]

# Locate the client: (address, family width) -> Location (geo.Locator.locate)
Locate = Callable[[IPAddress], Location]
# The geo decision function (pick.decide)
Decide = Callable[..., Decision]


@dataclass
class Settings:
    """The handler's knobs, taken from [server] and [cookies]."""

    max_udp_payload: int = 1232
    nsid: bytes = b""
    max_cname_chain: int = 8
    max_additional_rrsets: int = 32
    cookies_require: bool = False
    # answer common queries from pre-rendered bytes (fastpath.py); False: always the
    # full path (the differential tests compare the two)
    fast_path: bool = True


class Handler:
    """The query path. Thread-compatible: reads the holder's current View per query."""

    def __init__(
        self,
        holder: ViewHolder,
        settings: Settings | None = None,
        locate: Locate | None = None,
        decide: Decide | None = None,
        cookies: CookieJar | None = None,
        is_special: Callable[[IPAddress], bool] | None = None,
        special_block: Callable[[IPAddress], ipaddress.IPv4Network | ipaddress.IPv6Network | None]
        | None = None,
        stats: Stats | None = None,
        rrl: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holder = holder
        self.settings = settings or Settings()
        self.geo_generation = 0
        self._locate = locate
        self.decide = decide
        self.cookies = cookies or CookieJar()
        self.is_special = is_special
        self.special_block = special_block
        self.stats = stats or Stats()
        self.stats.lock = holder.view.catalog.lock  # see Catalog.lock
        # answer_order "shuffle": the next rotation per pool (answers not from a cache)
        self.turns: dict[str, int] = {}
        self.rrl = rrl  # response rate limiting of UDP replies (None: off)
        self.clock = clock  # RRL's clock; tests inject one
        if rrl is not None:
            self.stats.rrl = rrl.counts
        self.fast = FastPath(self) if self.settings.fast_path else None

    @property
    def locate(self) -> Locate | None:
        return self._locate

    @locate.setter
    def locate(self, fn: Locate | None) -> None:
        """Swap the GeoIP lookup (a new database); cached answers made with it go stale."""
        catalog = self.holder.view.catalog
        with catalog.lock:
            self._locate = fn
            self.geo_generation += 1
            catalog.changes += 1

    # -- the entry point -------------------------------------------------------------
    def handle(self, data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        """Answer one DNS message, or None to stay silent (unparseable, or a response)."""
        fast = self.fast
        if fast is not None:
            done = fast.answer(data, addr, transport is _UDP, False)
            if done is not MISS:
                return done[0]
        try:
            q = decode_query(data)
        except BadQuery as bad:
            self.stats.formerr += bad.rcode == FORMERR
            self.stats.count(0, bad.rcode, transport)
            # RFC 6891 §7: an OPT (with DO copied) when the request had one
            edns = bad.edns
            opt = encode_opt(self.settings.max_udp_payload, 0, edns.do, []) if edns else None
            return error_reply(bad, opt)
        if q is None:
            self.stats.dropped += 1
            return None
        return self._answer(q, addr, transport)[0]

    def process(
        self, data: bytes, addr: tuple[str, int], transport: Transport, turn: int | None = None
    ) -> tuple[bytes | None, CacheInfo | None]:
        """Like handle(), plus what a packet cache needs to reuse the reply (or None).

        `turn`: which rotation shuffled answers take (the cache's own counter); None:
        the next of the handler's per-pool counter."""
        fast = self.fast
        if fast is not None:
            done = fast.answer(data, addr, transport is _UDP, True)
            if done is not MISS:
                return done
        try:
            q = decode_query(data)
        except BadQuery:
            return self.handle(data, addr, transport), None
        if q is None:
            self.stats.dropped += 1
            return None, None
        return self._answer(q, addr, transport, turn)

    # -- steps ----------------------------------------------------------------------
    def _answer(
        self, q: Query, addr: tuple[str, int], transport: Transport, turn: int | None = None
    ) -> tuple[bytes | None, CacheInfo | None]:
        edns = q.edns
        udp = transport is Transport.UDP
        limit = (
            65535
            if not udp
            else (min(edns.payload, self.settings.max_udp_payload) if edns else 512)
        )
        options: list[tuple[int, bytes]] = []
        cookie_ok = False
        if edns is not None:
            if edns.version > 0:
                # RFC 6891 §6.1.3: BADVERS, with an OPT of the highest version we do (0)
                return self._simple(q, BADVERS, edns, [], transport), None
            if edns.ecs is not None:
                self.stats._ecs_queries += 1
            if edns.cookie is not None:
                cookie_ok, cookie_opt = self._cookie(edns.cookie, addr)
                options.append((OPT_COOKIE, cookie_opt))
                if not cookie_ok and self.settings.cookies_require and udp:
                    # RFC 7873 §5.2.3: only an opt-in policy answers BADCOOKIE
                    return self._simple(q, BADCOOKIE, edns, options, transport), None
            if edns.nsid and self.settings.nsid:
                options.append((OPT_NSID, self.settings.nsid))  # RFC 5001 §2.3
        if q.opcode != OP_QUERY:
            # We are not a secondary and take no dynamic updates: NOTIFY from anyone is
            # REFUSED, UPDATE and unknown opcodes NOTIMP (RFC 1035 §4.1.1, RFC 2136 §3).
            # Checked before QDCOUNT 0: RFC 7873 §5.4 (cookie-only NOERROR) is about
            # QUERY only, and a NOERROR to an UPDATE would read as "update applied".
            rcode = REFUSED if q.opcode == OP_NOTIFY else NOTIMP
            return self._simple(q, rcode, edns, options, transport), None
        if q.qdcount == 0:
            # RFC 7873 §5.4: a query with only a COOKIE gets the cookie back, NOERROR.
            return self._simple(q, NOERROR, edns, options, transport), None
        if q.qtype == OPT:
            return self._simple(q, FORMERR, edns, options, transport), None
        if q.qclass != CLASS_IN:
            return self._simple(q, REFUSED, edns, options, transport), None
        if q.qtype in (AXFR, IXFR):
            # Zone transfer is not offered: geo answers cannot be transferred.
            return self._simple(q, REFUSED, edns, options, transport), None

        steer = _Steer(self, q, addr, turn) if self.decide is not None else None
        view = self.holder.view
        ans = resolve(
            view,
            q.qname,
            q.qname.lower(),
            q.label_offsets,
            q.qtype,
            udp,
            steer,
            self.settings.max_cname_chain,
        )
        rrl_kind = b""
        if self.rrl is not None and udp:
            # RRL charges the packet's source network (never ECS) for this kind of reply;
            # TCP is never limited, nor a client whose server cookie is valid.
            zone_origin = ans.zone.origin if ans.zone is not None else b""
            rrl_kind = response_kind(ans.rcode, ans.aa, q.qname.lower(), zone_origin)
            if not cookie_ok:
                act = self.rrl.check(addr[0], rrl_kind, self.clock())
                if act:
                    return (self._slip(q, options) if act is Action.SLIP else None), None
            else:
                self.rrl.counts[COOKIE] += 1
        offered: Offered = ()
        decision = ans.decision
        if decision is not None:
            last = steer.last if steer is not None else None
            if decision.offered and last is not None and last[1] is decision:
                # a pool with a capacity: account for its windows
                offered = _offered_keys(last[0], decision)
        if edns is not None and edns.ecs is not None:
            # RFC 7871 §7.2.1: echo FAMILY, SOURCE and ADDRESS; SCOPE is ours.
            scope = ans.scope if steer is not None and ans.decision is not None else 0
            if steer is not None and steer.scope_override is not None and ans.decision:
                scope = steer.scope_override
            if edns.ecs.source == 0:
                scope = 0  # RFC 7871 §7.1.2: the resolver opted out; scope stays 0
            options.append((OPT_ECS, encode_ecs(edns.ecs, scope)))
        reply = self._encode(q, ans, edns, options, limit)
        stats_key = (QTYPE_NAMES.get(q.qtype, "OTHER"), ans.rcode, transport.value)
        sites = decision.sites if decision is not None else ()
        self.stats.answered(stats_key, sites, offered)
        if self.fast is not None:
            self._learn(q, ans, steer, offered)
        if edns is not None and edns.cookie is not None:
            return reply, None  # a server cookie is per client and per time: not reusable
        info = CacheInfo(
            zone_key=ans.zone.origin if ans.zone is not None else None,
            zone=weakref.ref(ans.zone) if ans.zone is not None else None,
            catalog_generation=view.catalog.generation,
            pools=tuple(steer.pools_used.items()) if steer is not None else (),
            by_source=steer is not None and steer.used and steer.by_source,
            scope=ans.decision.scope if ans.decision is not None else 0,
            stats_key=stats_key,
            sites=sites,
            ecs=edns is not None and edns.ecs is not None,
            geo_generation=self.geo_generation,
            rrl_kind=rrl_kind,
            offered=offered,
            rotations=steer.rotations if steer is not None else 1,
            turn=(steer.turn or 0) if steer is not None else 0,
        )
        return reply, info

    def _learn(self, q: Query, ans: Answer, steer: _Steer | None, offered: Offered) -> None:
        """Hand the answer just made to the fast path, to replay for the same question."""
        assert self.fast is not None
        calls = steer.calls if steer is not None else 0
        located = None
        if (
            steer is not None
            and calls == 1
            and steer.located
            and steer.scope_override is None
            and steer.geo is not None
            and steer.state is not None
        ):
            located = Located(
                steer.geo, steer.state, steer.client, steer.location, steer.generation, offered
            )
        self.fast.learn(q, ans, calls, located)

    def rate_limit(self, data: bytes, addr: tuple[str, int], rrl_kind: bytes) -> bytes | None:
        """A packet cache hit's RRL check: None to send the cached reply as it is, else
        the reply to send instead (b"" to drop, or the slipped TC=1 reply)."""
        assert self.rrl is not None
        act = self.rrl.check(addr[0], rrl_kind, self.clock())
        if not act:
            return None
        if act is Action.DROP:
            return b""
        q = decode_query(data)  # the same bytes decoded on the miss: cannot fail
        assert q is not None
        nsid = q.edns is not None and q.edns.nsid and self.settings.nsid
        return self._slip(q, [(OPT_NSID, self.settings.nsid)] if nsid else [])

    def _slip(self, q: Query, options: list[tuple[int, bytes]]) -> bytes:
        """RRL's slipped reply: TC=1, the question, no records, OPT for EDNS queries, so
        a real client retries over TCP (and one with a cookie gets a fresh one)."""
        edns = q.edns
        if edns is not None and edns.ecs is not None:
            options = [*options, (OPT_ECS, encode_ecs(edns.ecs, 0))]  # RFC 7871 §7.2.1
        return self._simple(q, NOERROR, edns, options, Transport.UDP, TC)

    def _cookie(self, opt: bytes, addr: tuple[str, int]) -> tuple[bool, bytes]:
        client = opt[:8]
        ip = _PACKED_SOURCE.get(addr[0])
        if ip is None:
            if len(_PACKED_SOURCE) >= _MEMO_MAX:
                _PACKED_SOURCE.clear()
            ip = _PACKED_SOURCE[addr[0]] = ipaddress.ip_address(addr[0].split("%")[0]).packed
        if len(opt) > 8:
            valid, refresh = self.cookies.check(client, opt[8:], ip)
            if valid and not refresh:
                return True, opt
            if valid:
                return True, client + self.cookies.mint(client, ip)
        # RFC 7873 §5.2.3: a missing or bad server cookie gets a fresh one, normally.
        return False, client + self.cookies.mint(client, ip)

    def _simple(
        self,
        q: Query,
        rcode: int,
        edns: Edns | None,
        options: list[tuple[int, bytes]],
        transport: Transport,
        tc: int = 0,
    ) -> bytes:
        """A reply without records: header, question echoed, OPT for EDNS queries."""
        self.stats.count(q.qtype, rcode, transport)
        flags = QR | (q.flags & (0x7800 | RD | CD)) | (rcode & 0xF) | tc
        w = Writer(65535)
        w.question(q.question, len(q.qname))
        if edns is not None:
            w.buf += encode_opt(self.settings.max_udp_payload, rcode >> 4, edns.do, options)
            w.counts[3] = 1
        return w.finish(q.id, flags)

    def _encode(
        self,
        q: Query,
        ans: Answer,
        edns: Edns | None,
        options: list[tuple[int, bytes]],
        limit: int,
    ) -> bytes:
        """Sections -> bytes within `limit`, truncating as RFC 2181 §9 says."""
        opt = (
            encode_opt(self.settings.max_udp_payload, ans.rcode >> 4, edns.do, options)
            if edns is not None
            else b""
        )
        flags = QR | (q.flags & (0x7800 | RD | CD)) | (ans.rcode & 0xF)
        if ans.aa:
            flags |= AA
        # RFC 6891 §7: the OPT RR is always kept, so its room is reserved up front.
        w = Writer(limit - len(opt))
        w.question(q.question, len(q.qname))
        truncated = ans.tc
        if not truncated:
            for section, entries in ((1, ans.answer), (2, ans.authority), (3, ans.glue)):
                for owner, rr, ttl in entries:
                    w.counts[section] += w.rrset(owner, rr, ttl)
                if len(w.buf) > w.limit:
                    # RFC 2181 §9: TC only when required data (answer, authority, glue
                    # RFC 9471 §3) does not fit.
                    truncated = True
                    break
        if not truncated:
            for owner, rr, ttl in ans.additional[: self.settings.max_additional_rrsets]:
                mark = w.mark()
                n = w.rrset(owner, rr, ttl)
                if len(w.buf) > w.limit:
                    w.rollback(mark)  # optional data: drop the RRset, no TC
                else:
                    w.counts[3] += n
        if truncated:
            self.stats.truncated += 1
            flags |= TC
            w = Writer(limit)
            w.question(q.question, len(q.qname))
        if opt:
            w.buf += opt
            w.counts[3] += 1
        return w.finish(q.id, flags)


def ecs_ip(ecs: ClientSubnet | None) -> IPAddress | None:
    """The ECS address that locates the client, if the option carries a usable one."""
    if ecs is None or ecs.source == 0:
        return None
    return ecs.ip


def client_address(
    source: str,
    ecs: ClientSubnet | None,
    is_special: Callable[[IPAddress], bool] | None,
    special_block: Callable[[IPAddress], IPNetwork | None] | None,
) -> tuple[IPAddress, int | None]:
    """Which address locates the client, and the ECS scope a special ECS address forces.

    The ECS address when the query carries a usable one (SOURCE > 0), else the packet
    `source` (IPv4-mapped IPv6 taken as IPv4). Shared by the query path and `explain`.
    """
    usable = ecs is not None and ecs.ip is not None and ecs.source != 0
    if (
        usable
        and ecs is not None
        and ecs.ip is not None
        and not (is_special is not None and is_special(ecs.ip))
    ):
        return ecs.ip, None  # the usual case: the source address is not even parsed
    addr = ipaddress.ip_address(source.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if ecs is None or ecs.ip is None or ecs.source == 0:
        return addr, None
    if is_special is not None and is_special(ecs.ip):
        # RFC 7871 §11.3: ECS carrying a private or special-purpose address says
        # nothing about where the client is; use the packet source instead and
        # scope the answer to the whole special block.
        block = special_block(ecs.ip) if special_block else None
        return addr, min(block.prefixlen, ecs.source) if block else ecs.source
    return ecs.ip, None


class _Steer:
    """Per-query geo steering: locates the client once, then asks pick.decide."""

    __slots__ = (
        "addr",
        "by_source",
        "calls",
        "client",
        "ecs",
        "generation",
        "geo",
        "handler",
        "last",
        "located",
        "location",
        "pools_used",
        "rotations",
        "scope_override",
        "state",
        "turn",
        "used",
    )

    def __init__(
        self, handler: Handler, q: Query, addr: tuple[str, int], turn: int | None = None
    ) -> None:
        self.handler = handler
        # shuffled answers: the rotation this query takes (one for all its geo names)
        self.turn = turn
        self.rotations = 1
        self.last: tuple[str, Decision] | None = None  # (pool, decision) of the last call
        self.location: Location | None = None
        self.located = False
        # which address locates the client is worked out on the first geo name only:
        # most queries never reach one, and parsing addresses is not free
        self.addr = addr
        self.ecs = q.edns.ecs if q.edns is not None else None
        self.scope_override: int | None = None
        self.by_source = False
        self.used = False
        self.pools_used: dict[str, int] = {}
        # for the fast path: how many geo names were asked about, the last one, the geo
        # state and GeoIP generation the client was located in
        self.calls = 0
        self.geo: GeoName | None = None
        self.state: GeoState | None = None
        self.generation = 0

    def _decide(
        self,
        key: tuple[object, ...],
        pool: Pool,
        pool_name: str,
        family: int,
        count: int,
        rotation: int,
    ) -> Decision:
        """pick.decide, memoized under `key` (+ the rotation of a shuffled pool)."""
        memo_key = (*key, rotation) if rotation else key
        decision = _DECISIONS.get(memo_key)
        if decision is None:
            view = self.handler.holder.view.geo
            assert self.handler.decide is not None
            decision = self.handler.decide(
                pool,
                view.sites,
                view.states,
                self.client,
                self.location,
                family,
                count,
                pool.all_down,
                balance=view.balance.get(pool_name),
                rotation=rotation,
            )
            if len(_DECISIONS) >= _MEMO_MAX:
                _DECISIONS.clear()
            _DECISIONS[memo_key] = decision
        return decision

    def __call__(self, geo: GeoName, qtype: int) -> tuple[Decision, RRset | None] | None:
        h = self.handler
        view = h.holder.view.geo
        self.calls += 1
        self.geo = geo
        self.state = view
        pool = view.pools.get(geo.pool)
        if pool is None or h.decide is None:
            return None
        self.used = True
        self.pools_used[geo.pool] = view.pool_versions.get(geo.pool, 0)
        if not self.located:
            self.located = True
            self.client, self.scope_override = client_address(
                self.addr[0], self.ecs, h.is_special, h.special_block
            )
            # located by the packet source (no usable ECS): the reply depends on it
            self.by_source = self.client is not ecs_ip(self.ecs) or self.scope_override is not None
            self.generation = h.geo_generation
            self.location = h.locate(self.client) if h.locate is not None else None
        family = 4 if qtype == A else 6 if qtype == AAAA else CNAME_FAMILY
        count = 1 if family == CNAME_FAMILY else geo.count  # a CNAME RRset has one record
        client = self.client
        # Decisions are memoized per view, pool, location (the GeoIP network's record)
        # and client prefix: the full address only when the pool has CIDR rules.
        client_key: object = (
            client
            if pool.rules and any(r.kind == "cidr" for r in pool.rules)
            else client_prefix(client)
        )
        key = (
            view.version,
            id(view),
            geo.pool,
            self.location,
            client_key,
            family,
            count,
            pool.all_down,
            h.decide,
        )
        decision = self._decide(key, pool, geo.pool, family, count, 0)
        if decision.rotations > 1:
            # answer_order "shuffle": one of a few orderings, in turn (memoized each)
            if self.turn is None:
                self.turn = h.turns.get(geo.pool, 0)
                h.turns[geo.pool] = self.turn + 1
            self.rotations = math.lcm(self.rotations, decision.rotations)
            rotation = self.turn % decision.rotations
            if rotation:
                decision = self._decide(key, pool, geo.pool, family, count, rotation)
        self.last = (geo.pool, decision)
        if not decision.sites:
            if self.scope_override is not None and not any(
                view.sites[n].addresses(family) for n in pool.members if n in view.sites
            ):
                # RFC 7871 §7.4: no member has an address of this family, so the answer
                # is NODATA for every client alike: SCOPE 0, not the special block's.
                self.scope_override = 0
            return decision, None
        if family == CNAME_FAMILY:
            target = view.sites[decision.sites[0]].cname
            if target is None:
                return decision, None
            wire = _cname_wire(target)
            ttl = geo.ttl_s
            if decision.ttl_cap_s is not None and decision.ttl_cap_s < ttl:
                ttl = decision.ttl_cap_s
            rr = RRset(geo.owner, CNAME, ttl, (wire,), ((b"", (wire,), b""),), (wire.lower(),))
            return decision, rr
        addrs: list[bytes] = []
        if decision.addresses is not None:
            # weights or max_answers chose the addresses and their order
            for a in decision.addresses:
                packed = _PACKED.get(a)
                if packed is None:
                    packed = _PACKED[a] = ipaddress.ip_address(a).packed
                addrs.append(packed)
        else:
            for name in decision.sites:
                site = view.sites[name]
                state = view.states.get(name, _UP)
                for a in site.addresses(family):
                    if a not in state.address_down:
                        packed = _PACKED.get(a)
                        if packed is None:
                            packed = _PACKED[a] = ipaddress.ip_address(a).packed
                        addrs.append(packed)
        if not addrs:
            return decision, None
        rtype = A if family == 4 else AAAA
        ttl = geo.ttl_s
        if decision.ttl_cap_s is not None and decision.ttl_cap_s < ttl:
            ttl = decision.ttl_cap_s  # a site of the pool is changing: resolvers follow
        return decision, RRset(geo.owner, rtype, ttl, tuple(addrs))


def _cname_wire(target: str) -> bytes:
    """A configured CNAME target in wire format (cached: config names only)."""
    wire = _CNAME_WIRE.get(target)
    if wire is None:
        wire = _CNAME_WIRE[target] = name_to_wire(target)
    return wire


_CNAME_WIRE: dict[str, bytes] = {}


def _offered_keys(pool: str, decision: Decision) -> tuple[tuple[str, str], ...]:
    """The Stats.pool_offered keys one geo answer bumps (none without a site).

    Kept per decision object: memoized decisions come back for every query."""
    hit = _OFFERED.get(id(decision))
    if hit is not None and hit[0] is decision and hit[1] == pool:
        return hit[2]
    keys: tuple[tuple[str, str], ...] = ()
    if decision.sites and decision.offered:
        keys = ((pool, ""), *((pool, site) for site in decision.offered))
    if len(_OFFERED) >= _MEMO_MAX:
        _OFFERED.clear()
    _OFFERED[id(decision)] = (decision, pool, keys)
    return keys


_UP = SiteState()
# text address -> packed bytes (bounded by the configured addresses)
_PACKED: dict[str, bytes] = {}
# packet source address text -> packed (server cookies); emptied when full
_PACKED_SOURCE: dict[str, bytes] = {}
# memoized geo decisions (see _Steer.__call__); emptied when full
_DECISIONS: dict[tuple[object, ...], Decision] = {}
_MEMO_MAX = 65536
# decision id -> (decision, pool, its Stats.pool_offered keys); see _offered_keys
_OFFERED: dict[int, tuple[Decision, str, tuple[tuple[str, str], ...]]] = {}
