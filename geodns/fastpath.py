"""The fast path: a query of the common shape answered from pre-rendered reply bytes.

Issue 9's "full path" without a packet cache. A query qualifies when its header says
QUERY with QD=1, AN=NS=0, AR<=1; its one additional record, if any, is an OPT (EDNS
version 0) carrying nothing or one ECS option (no COOKIE, no NSID); and its question
has been answered before in this zone snapshot. Everything else, and every case below
that the fast path does not cover, goes to the full path (`Handler._answer`), which is
the only place that decides what an answer is. The fast path only replays it:

- **Plans, per question.** After the full path answers a question (name, type, class;
  `learn`), the answer's sections are rendered to wire bytes once (`Handler._encode`
  with no size limit) and kept under the question's bytes with the name in lower case:
  the "body" (answer, authority and additional sections) plus counts and flags.
  Compression pointers in a body point into the question (offset 12 onwards) or into
  the body itself, and the question is echoed as sent, so the same body is right for
  every query with the same question in any mix of case (0x20). A question
  that reaches a geo name keeps one body per geo decision ("per site set"); anything
  more involved (a CNAME chain through geo names, per-site CNAMEs, shuffled answers,
  answers from the zone file's record when geo has no answer) is marked `slow`.
- **Names a zone does not have** get NXDOMAIN from one body per (zone, apex offset,
  qtype) instead of a plan per name, so a random-subdomain flood is replayed too
  (`_negative`, with the cases it leaves to the full path).
- **Geo.** The client is located by the ECS address, or by the packet source when the
  query has no usable ECS (RFC 7871 §7.1.2), exactly as `handler.client_address` does;
  a geo answer for a special-purpose ECS address (RFC 7871 §11.3) is left to the full
  path, which scopes it to the special block. The location
  is cached per ECS option / source address and GeoIP generation, and a body is looked
  up by (location, client prefix) per pool health state (`GeoState` identity), i.e. by
  everything the geo decision depends on.
- **The reply** is the query's ID, flags (RD and CD copied, RFC 1035 §4.1.1), the
  question exactly as sent (0x20 case kept), the body, and our OPT (RFC 6891 §6.1.2)
  with the ECS option echoed with our SCOPE (RFC 7871 §7.2.1). When it would not fit
  the UDP size limit the full path answers, so truncation (RFC 2181 §9) stays in one
  place.

What is kept is bounded (every table is emptied when full) and never outlives what it
was made from: a zone published or removed empties the plans (`Catalog.zone_changes`),
a new geo state empties a plan's bodies, a new GeoIP database the cached locations.
Statistics and response rate limiting are charged as the full path charges them.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import FormError
from .model import IPAddress, Location, Tally, client_prefix
from .rrl import COOKIE, Action, response_kind
from .view import GeoState
from .wire import _parse_opt, _parse_qname
from .zones import AAAA, ANY, CNAME, DS, OPT, A, GeoName, Zone

if TYPE_CHECKING:
    from .handler import CacheInfo, Handler
    from .resolver import Answer
    from .wire import Query

_COUNTS = struct.Struct("!HHHH")
_OPT_HEAD = struct.Struct("!BHHIH")  # root owner, TYPE, CLASS (payload), TTL, RDLENGTH

MAX_PLANS = 100_000  # questions with a plan; the table is emptied when full
MAX_BODIES = 4096  # distinct rendered geo answers per plan
MAX_CLIENTS = 65536  # cached OPT records and source addresses


class Miss(enum.Enum):
    """`FastPath.answer` did not answer: the full path must."""

    MISS = 0


MISS = Miss.MISS


@dataclass(slots=True, eq=False)
class _Client:
    """A client address as the geo decision sees it, with its cached location."""

    ip: IPAddress
    prefix: bytes  # packed /24 (IPv4) or /56 (IPv6): the decision memo's client key
    loc_id: int = 0  # FastPath.loc_ids of its location: equal locations, equal ids
    generation: int = -1  # the GeoIP generation the location was looked up in


@dataclass(slots=True, eq=False)
class _Opt:
    """One OPT record as sent by a client, validated, with what our reply's OPT is."""

    limit: int  # UDP reply size limit: min(client payload, ours) (RFC 6891 §6.2.5)
    ecs: bool  # the query has an ECS option: echo it
    zero_scope: bool  # SOURCE PREFIX-LENGTH 0: our SCOPE stays 0 (RFC 7871 §7.1.2)
    client: _Client | None  # the ECS address locates the client (None: the source)
    fixed: bytes  # our OPT RR header (payload, DO) without RDLENGTH
    head: bytes  # our options after a COOKIE: NSID, then ECS up to its SCOPE octet
    tail: bytes  # the ECS ADDRESS, after SCOPE
    cookie: bytes | None = None  # the query's COOKIE option data (RFC 7873 §4)
    special: bool = False  # the ECS address is special-purpose: no geo answer here
    by_scope: dict[int, bytes] = field(default_factory=dict)

    def options(self, scope: int) -> bytes:
        """Our options after a COOKIE, with this ECS SCOPE."""
        return self.head + bytes((scope,)) + self.tail if self.ecs else self.head

    def render(self, scope: int) -> bytes:
        """Our whole OPT RR for a query without a COOKIE."""
        out = self.by_scope.get(scope)
        if out is None:
            opts = self.options(scope)
            out = self.by_scope[scope] = self.fixed + len(opts).to_bytes(2, "big") + opts
        return out


@dataclass(slots=True, eq=False)
class _Body:
    """The rendered sections of one answer and everything charged when it is sent."""

    body: bytes
    # header after the ID per (RD | CD) of the query: flags and counts, without and
    # with our OPT; indexed by (byte 2 & 0x01) | (byte 3 & 0x10)
    head: list[bytes]
    head_opt: list[bytes]
    scope: int  # ECS SCOPE PREFIX-LENGTH of the answer
    # answers sent over UDP / TCP, counted here and folded into Stats when read
    tally_udp: Tally
    tally_tcp: Tally
    rrl_kind: bytes
    pools: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True, eq=False)
class _Plan:
    """What one question gets from one zone snapshot."""

    # that snapshot, held weakly: a plan must not keep a replaced zone alive (the
    # reaper frees a big one in slices, reload.py)
    zone: weakref.ref[Zone]
    origin: bytes
    slow: bool = False  # the full path answers this question every time
    static: _Body | None = None  # the same reply for every client
    geo: GeoName | None = None  # else: one geo decision decides the body
    # the bodies per (id(location), client prefix or address) for `state`, `generation`
    state: GeoState | None = None
    generation: int = -1
    cidr: bool = False  # the pool has CIDR rules: decisions are per client address
    bodies: dict[tuple[int, object], _Body] = field(default_factory=dict)
    # (sites, addresses, TTL cap, scope, capacity keys) -> the body: clients with equal
    # decisions share one
    rendered: dict[tuple[object, ...], _Body] = field(default_factory=dict)


# an OPT record the fast path does not answer (malformed, cookies, NSID, ...)
_REJECT = _Opt(0, False, False, None, b"", b"", b"")


def _heads(flags: int, counts: tuple[int, int, int, int]) -> tuple[list[bytes], list[bytes]]:
    qd, an, ns, ar = counts
    head: list[bytes] = [b""] * 18
    head_opt: list[bytes] = [b""] * 18
    for idx in (0, 1, 16, 17):
        f = flags | (0x0100 if idx & 1 else 0) | (0x0010 if idx & 16 else 0)
        head[idx] = f.to_bytes(2, "big") + _COUNTS.pack(qd, an, ns, ar)
        head_opt[idx] = f.to_bytes(2, "big") + _COUNTS.pack(qd, an, ns, ar + 1)
    return head, head_opt


def _clear_above(qname: bytes, offsets: tuple[int, ...], apex: int, zone: Zone) -> bool:
    """For an absent name: no delegation point or DNAME between it and the apex (a
    DNAME at the apex counts), no wildcard at its closest encloser, and no name in the
    SOA's RDATA that the encoder could compress against the name above the apex."""
    cuts, dnames, nodes = zone.cuts, zone.dnames, zone.nodes
    closest = zone.origin
    for at in offsets:
        if 0 < at < apex:
            above = qname[at:]
            if above in cuts or above in dnames:
                return False
            if closest is zone.origin and above in nodes:
                closest = above  # the longest existing ancestor (RFC 4592 §3.3.1)
    if dnames and zone.origin in dnames:
        return False
    if zone.wildcards and b"\x01*" + closest in nodes:
        return False
    return not _soa_points_into(zone, qname, apex)


def _soa_points_into(zone: Zone, qname: bytes, apex: int) -> bool:
    """True when a name in the SOA's RDATA ends in a part of qname longer than its apex,
    so the full path's encoder would point into the name's own labels."""
    parts = zone.soa.parts
    if not parts:
        return False
    targets = [n.lower() for n in parts[0][1]]
    at = 0
    while at < apex:
        if any(t.endswith(qname[at:]) for t in targets):
            return True
        at += qname[at] + 1
    return False


class FastPath:
    """Pre-rendered answers for a Handler; see the module docstring."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.catalog = handler.holder.view.catalog
        self.plans: dict[bytes, _Plan] = {}
        # NXDOMAIN per (zone origin, offset of the apex in the name, qtype): see _negative
        self.negative: dict[tuple[bytes, int, int], _Plan] = {}
        self.seen: set[bytes] = set()  # questions learned once (see _admit)
        self.stamp = self.catalog.zone_changes
        self.opts: dict[bytes, _Opt] = {}  # _REJECT: the full path answers
        self.sources: dict[str, _Client] = {}
        self.loc_ids: dict[Location, int] = {}
        self.next_loc_id = 0
        self.hits = 0

    # -- answering -------------------------------------------------------------------
    def answer(
        self, data: bytes, addr: tuple[str, int], udp: bool, want_info: bool
    ) -> tuple[bytes | None, CacheInfo | None] | Miss:
        """The reply (and, with want_info, what a packet cache needs), or MISS."""
        # RFC 1035 §4.1.1: QR=0, OPCODE=QUERY; QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT<=1
        if (
            len(data) < 17
            or data[2] & 0xF8
            or data[4:10] != b"\x00\x01\x00\x00\x00\x00"
            or data[10]
            or data[11] > 1
        ):
            return MISS
        # The question: a plan is kept under the bytes of a question that was validated
        # when it was learned, so the first zero octet after the header ends the name
        # when a plan matches (a name with a zero octet inside a label never matches
        # one; lower-casing changes no length octet, as those are below 64).
        end = data.find(0, 12) + 5
        if end < 17 or end > len(data):
            return MISS
        if self.catalog.zone_changes != self.stamp:
            self._forget()
        # plans are kept under the question with its name in lower case: a body does not
        # depend on the case of the question (names in it point at the question, which
        # is echoed as sent), so one plan serves every 0x20 variant
        plan = self.plans.get(data[12:end]) or self.plans.get(
            data[12 : end - 4].lower() + data[end - 4 : end]
        )
        if plan is None:
            plan = self._negative(data, end)  # a name the zone does not have
            if plan is None:
                return MISS
            # asked again: kept under the question too, one lookup next time (the
            # checks of _negative cost ~2 µs; what they depend on empties the plans)
            key = data[12 : end - 4].lower() + data[end - 4 : end]
            if self._admit(key):
                self._store(key, plan)
        elif plan.slow:
            return MISS
        h = self.handler
        opt: _Opt | None = None
        if data[11]:
            tail = data[end:]
            opt = self.opts.get(tail) or self._learn_opt(tail)
            if opt is _REJECT:
                return MISS
        elif len(data) != end:
            return MISS  # trailing data: the full path's FORMERR
        body = plan.static
        by_source = False
        if body is None:
            if opt is not None and opt.special:
                return MISS
            client = opt.client if opt is not None else None
            if client is None:
                by_source = True
                client = self.sources.get(addr[0]) or self._source(addr[0])
            if client.generation != h.geo_generation:
                self._locate(client)
            view = h.holder.view
            if (
                plan.state is not view.geo or plan.generation != h.geo_generation
            ) and not self._reset(plan, view.geo, h.geo_generation):
                return MISS
            body = plan.bodies.get((client.loc_id, client.ip if plan.cidr else client.prefix))
            if body is None:
                return MISS  # a decision not rendered yet: the full path learns it
        cookie_ok = False
        cookie: bytes | None = None  # our COOKIE option data
        if opt is None:
            reply = b"".join(
                (data[:2], body.head[(data[2] & 0x01) | (data[3] & 0x10)], data[12:end], body.body)
            )
            if udp and len(reply) > 512:
                return MISS  # RFC 1035 §4.2.1: the full path truncates
        else:
            scope = 0 if opt.zero_scope else body.scope
            if opt.cookie is None:
                optb = opt.render(scope)
            else:
                # RFC 7873 §5.2: a server cookie for this client, the options after it
                cookie_ok, cookie = h._cookie(opt.cookie, addr)
                if not cookie_ok and udp and h.settings.cookies_require:
                    return MISS  # RFC 7873 §5.2.3: BADCOOKIE, from the full path
                opts = b"\x00\x0a" + len(cookie).to_bytes(2, "big") + cookie + opt.options(scope)
                optb = opt.fixed + len(opts).to_bytes(2, "big") + opts
            reply = b"".join(
                (
                    data[:2],
                    body.head_opt[(data[2] & 0x01) | (data[3] & 0x10)],
                    data[12:end],
                    body.body,
                    optb,
                )
            )
            if udp and len(reply) > opt.limit:
                return MISS  # RFC 2181 §9, RFC 6891 §7: the full path truncates
        stats = h.stats
        if opt is not None and opt.ecs:
            stats._ecs_queries += 1
        if udp and h.rrl is not None:
            # RRL charges the packet's source network for this kind of reply, like the
            # full path (handler.py `_answer`); not a client with a valid server cookie
            if not cookie_ok:
                act = h.rrl.check(addr[0], body.rrl_kind, h.clock())
                if act:
                    return self._limited(data, act, cookie), None
            else:
                h.rrl.counts[COOKIE] += 1
        # counted on the body, folded into the statistics when they are read
        tally = body.tally_udp if udp else body.tally_tcp
        stats.tally(tally)
        self.hits += 1
        if not want_info or (opt is not None and opt.cookie is not None):
            return reply, None  # a server cookie is per client and per time: not reusable
        return reply, self._info(plan, body, by_source, opt, tally.stats_key, udp)

    def _limited(self, data: bytes, act: Action, cookie: bytes | None) -> bytes | None:
        if act is Action.DROP:
            return None
        from .wire import OPT_COOKIE, OPT_NSID, decode_query

        q = decode_query(data)  # the fast path's shape: cannot fail
        assert q is not None
        h = self.handler
        # the options of the full path's slipped reply: the cookie, NSID (ECS: _slip)
        options: list[tuple[int, bytes]] = []
        if cookie is not None:
            options.append((OPT_COOKIE, cookie))
        if q.edns is not None and q.edns.nsid and h.settings.nsid:
            options.append((OPT_NSID, h.settings.nsid))
        return h._slip(q, options)

    def _info(
        self,
        plan: _Plan,
        body: _Body,
        by_source: bool,
        opt: _Opt | None,
        stats_key: tuple[str, int, str],
        udp: bool,
    ) -> CacheInfo:
        from .handler import CacheInfo

        h = self.handler
        return CacheInfo(
            zone_key=plan.origin,
            zone=plan.zone,
            catalog_generation=self.catalog.generation,
            pools=body.pools,
            by_source=by_source and plan.geo is not None,
            scope=body.scope if plan.geo is not None else 0,
            stats_key=stats_key,
            sites=body.tally_udp.sites,
            ecs=opt is not None and opt.ecs,
            geo_generation=h.geo_generation,
            rrl_kind=body.rrl_kind if h.rrl is not None and udp else b"",
            offered=body.tally_udp.offered,
        )

    def _reset(self, plan: _Plan, state: GeoState, generation: int) -> bool:
        """A new geo state or GeoIP database: the plan's bodies start over."""
        assert plan.geo is not None
        pool = state.pools.get(plan.geo.pool)
        if pool is None:
            return False  # the zone names a pool the config no longer has
        plan.state = state
        plan.generation = generation
        plan.cidr = any(r.kind == "cidr" for r in pool.rules)
        plan.bodies = {}
        plan.rendered = {}
        return True

    def _locate(self, client: _Client) -> None:
        h = self.handler
        client.generation = h.geo_generation
        client.loc_id = self.loc_id(h.locate(client.ip) if h.locate is not None else None)

    def loc_id(self, location: Location | None) -> int:
        """A small number per distinct location value (never reused for another)."""
        if location is None:
            return 0
        n = self.loc_ids.get(location)
        if n is None:
            if len(self.loc_ids) >= MAX_CLIENTS:
                self.loc_ids.clear()  # ids go on counting: old keys just stop matching
            self.next_loc_id += 1
            n = self.loc_ids[location] = self.next_loc_id
        return n

    def _source(self, host: str) -> _Client:
        """The packet source as the client address (handler.client_address)."""
        ip: IPAddress = ipaddress.ip_address(host.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        client = _Client(ip, client_prefix(ip))
        if len(self.sources) >= MAX_CLIENTS:
            self.sources.clear()
        self.sources[host] = client
        return client

    def _learn_opt(self, tail: bytes) -> _Opt:
        """Validate one OPT record exactly as the full decoder does (_REJECT: not ours)."""
        opt = self._parse_opt(tail) or _REJECT
        if len(self.opts) >= MAX_CLIENTS:
            self.opts.clear()
        self.opts[tail] = opt
        return opt

    def _parse_opt(self, tail: bytes) -> _Opt | None:
        if len(tail) < 11:
            return None
        owner, rtype, cls, ttl, rdlen = _OPT_HEAD.unpack_from(tail)
        if owner != 0 or rtype != 41 or 11 + rdlen != len(tail):
            return None  # another record, or not exactly the rest of the message
        try:
            edns = _parse_opt(tail, 11, rdlen, cls, ttl)
        except FormError:
            return None
        if edns.version != 0:
            return None  # RFC 6891 §6.1.3: BADVERS, from the full path
        # unknown options are ignored by the full path too (RFC 6891 §6.1.2)
        h = self.handler
        h_payload = h.settings.max_udp_payload
        # RFC 6891 §6.1.3: our OPT: our payload size, version 0, DO copied
        fixed = _OPT_HEAD.pack(0, 41, h_payload, 0x8000 if edns.do else 0, 0)[:-2]
        # RFC 5001 §2.3: NSID when asked and configured, before ECS as the full path
        nsid = b""
        if edns.nsid and h.settings.nsid:
            nsid = struct.pack("!HH", 3, len(h.settings.nsid)) + h.settings.nsid
        limit = min(edns.payload, h_payload)
        ecs = edns.ecs
        if ecs is None:
            return _Opt(limit, False, False, None, fixed, nsid, b"", edns.cookie)
        client: _Client | None = None
        special = False
        if ecs.source != 0 and ecs.ip is not None:
            # RFC 7871 §11.3: a special-purpose address says nothing of where the client
            # is; geo answers for it are the full path's (scoped to the special block)
            special = h.is_special is not None and h.is_special(ecs.ip)
            ip = ecs.ip
            client = _Client(ip, client_prefix(ip))
        # RFC 7871 §7.2.1: FAMILY, SOURCE PREFIX-LENGTH and ADDRESS echoed
        head = nsid + struct.pack("!HHHB", 8, 4 + len(ecs.address), ecs.family, ecs.source)
        return _Opt(
            limit, True, ecs.source == 0, client, fixed, head, ecs.address, edns.cookie, special
        )

    # -- learning ---------------------------------------------------------------------
    def learn(self, q: Query, ans: Answer, geo_calls: int, located: Located | None) -> None:
        """Keep what the full path just answered for `q`, if the fast path can replay it.

        `geo_calls`: how many geo names the answer asked about; `located`: how the one
        geo decision was made, when the fast path can replay it for this client."""
        zone = ans.zone
        if zone is None or ans.tc or q.qtype == ANY or q.qdcount != 1:
            return
        catalog = self.catalog
        if catalog.zone_changes != self.stamp:
            self._forget()
        if catalog.zones.get(zone.origin) is not zone:
            return  # replaced while this query was answered
        qname = q.qname.lower()
        key = qname + q.question[len(q.qname) :]
        plan = self.plans.get(key)
        if plan is not None and plan.zone() is not zone:
            plan = None
        if plan is None and not self._admit(key):
            return  # asked once so far: a random-subdomain flood renders nothing
        ref = weakref.ref(zone)  # one per zone, shared (CPython reuses a plain weakref)
        if geo_calls == 0:
            # no geo name was reached: the same reply for everyone
            if plan is None:
                self._store(key, _Plan(ref, zone.origin, static=self._render(q, ans, ())))
            return
        geo = zone.geo.get(qname) if zone.geo else None
        if (
            geo is None
            or q.qtype not in (A, AAAA)
            or q.qtype not in geo.types
            or CNAME in geo.types
        ):
            # geo names reached through a CNAME, per-site CNAMEs: always the full path
            if plan is None:
                self._store(key, _Plan(ref, zone.origin, slow=True))
            return
        if plan is None or plan.geo is not geo:
            plan = _Plan(ref, zone.origin, geo=geo)
            self._store(key, plan)
        h = self.handler
        decision = ans.decision
        state = h.holder.view.geo
        if (
            located is None
            or geo_calls != 1
            or located.geo is not geo
            or located.state is not state
            or located.generation != h.geo_generation
            or decision is None
            or decision.rotations != 1
            or decision.use_zone_record
        ):
            return  # this client's answer is not one to replay
        if (plan.state is not state or plan.generation != h.geo_generation) and not self._reset(
            plan, state, h.geo_generation
        ):
            return
        # what the body depends on besides the plan's zone and geo state: clients with
        # equal decisions (most of them) share one body, rendered once
        rkey = (
            decision.sites,
            decision.addresses,
            decision.ttl_cap_s,
            decision.scope,
            located.offered,
        )
        body = plan.rendered.get(rkey)
        if body is None:
            version = state.pool_versions.get(geo.pool, 0)
            body = self._render(q, ans, ((geo.pool, version),), located.offered)
            if len(plan.rendered) >= MAX_BODIES:
                plan.rendered.clear()
            plan.rendered[rkey] = body
        client = located.client
        bkey = (
            self.loc_id(located.location),
            client if plan.cidr else client_prefix(client),
        )
        if len(plan.bodies) >= MAX_CLIENTS:
            plan.bodies.clear()
        plan.bodies[bkey] = body

    def _forget(self) -> None:
        """A zone was published or removed: every plan and NXDOMAIN body may be stale."""
        self.plans.clear()
        self.negative.clear()
        self.stamp = self.catalog.zone_changes

    def _negative(self, data: bytes, end: int) -> _Plan | None:
        """NXDOMAIN for a name a zone does not have, without a plan per name.

        A flood of random subdomains asks each name once, so no plan is ever learned for
        one, and each went through the full path (decode, resolve, encode). The reply
        does not depend on the name beyond where the zone's apex starts in it (RFC 2308
        §2.1: AA, NXDOMAIN, the zone's SOA in the authority section with the negative
        TTL), as long as compression cannot reach into the rest of the name: the body is
        rendered once per (zone, apex offset, qtype) by the full path's encoder for a
        stand-in name, and replayed for a name only when nothing else can apply to it:
        class IN, an ordinary type (not ANY, DS, OPT or a meta type), the
        longest-matching zone loaded, the name absent and not a geo name, no delegation
        or DNAME above it up to the apex (RFC 6672 §2.3), no wildcard at its closest
        encloser (RFC 4592 §3.3.1), and no name in the SOA's RDATA ending in a part of
        the name longer than the apex (the encoder would point there, RFC 1035 §4.1.4).
        Anything else is left to the full path."""
        if data[end - 2 : end] != b"\x00\x01":
            return None
        qtype = int.from_bytes(data[end - 4 : end - 2], "big")
        if qtype in (0, OPT, DS) or qtype >= 128:
            return None
        qname = data[12 : end - 4].lower()
        size = len(qname)
        try:
            stop, offsets = _parse_qname(qname, 0)  # the decoder's own checks
        except FormError:
            return None
        if stop != size:
            return None  # a zero octet inside a label: the full path says FORMERR
        found, zone = self.catalog.find(qname, offsets, qtype)
        if not found or zone is None:
            return None
        nodes = zone.nodes
        if qname in nodes or (zone.geo and qname in zone.geo):
            return None
        apex = size - len(zone.origin)
        if apex <= 0 or not _clear_above(qname, offsets, apex, zone):
            return None
        key = (zone.origin, apex, qtype)
        plan = self.negative.get(key)
        if plan is None or plan.zone() is not zone:
            plan = self._nxdomain(zone, apex, qtype)
            if len(self.negative) >= MAX_PLANS:
                self.negative.clear()
            self.negative[key] = plan
        return plan if plan.static is not None else None

    def _nxdomain(self, zone: Zone, apex: int, qtype: int) -> _Plan:
        """The NXDOMAIN plan for names whose apex starts at `apex`: the full path's
        reply for a stand-in name of labels of 0xff octets (a plan with no body when
        the full path says anything else, so it is not asked again)."""
        from .resolver import resolve
        from .wire import decode_query

        labels = b""
        left = apex
        while left:
            n = min(63, left - 1)
            if left - (n + 1) == 1:
                n -= 1  # a lone octet cannot be a label: leave two
            labels += bytes((n,)) + b"\xff" * n
            left -= n + 1
        qname = labels + zone.origin
        ref = weakref.ref(zone)
        wire = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname
        q = decode_query(wire + qtype.to_bytes(2, "big") + b"\x00\x01")
        if q is None or _soa_points_into(zone, qname, apex):
            return _Plan(ref, zone.origin)
        h = self.handler
        ans = resolve(
            h.holder.view,
            q.qname,
            q.qname.lower(),
            q.label_offsets,
            qtype,
            True,
            None,
            h.settings.max_cname_chain,
        )
        if ans.rcode != 3 or ans.zone is not zone or not ans.aa:
            return _Plan(ref, zone.origin)
        return _Plan(ref, zone.origin, static=self._render(q, ans, ()))

    def _admit(self, key: bytes) -> bool:
        """True the second time a question is learned (a doorkeeper, as in TinyLFU):
        rendering costs a few µs, and a question asked only once never pays it back."""
        if key in self.seen:
            return True
        if len(self.seen) >= MAX_PLANS:
            self.seen.clear()
        self.seen.add(key)
        return False

    def _store(self, key: bytes, plan: _Plan) -> None:
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        self.plans[key] = plan

    def _render(
        self,
        q: Query,
        ans: Answer,
        pools: tuple[tuple[str, int], ...],
        offered: tuple[tuple[str, str], ...] = (),
    ) -> _Body:
        """The answer's sections as bytes, as the full path writes them with no limit."""
        from .handler import QTYPE_NAMES

        h = self.handler
        reply = h._encode(q, ans, None, [], 65535)
        flags = int.from_bytes(reply[2:4], "big") & ~0x0110  # RD, CD: per query
        counts = _COUNTS.unpack_from(reply, 4)
        head, head_opt = _heads(flags, counts)
        assert ans.zone is not None
        name = QTYPE_NAMES.get(q.qtype, "OTHER")
        decision = ans.decision
        sites = decision.sites if decision is not None else ()
        return _Body(
            body=reply[12 + len(q.question) :],
            head=head,
            head_opt=head_opt,
            scope=ans.scope if decision is not None else 0,
            tally_udp=Tally((name, ans.rcode, "udp"), sites, offered),
            tally_tcp=Tally((name, ans.rcode, "tcp"), sites, offered),
            rrl_kind=response_kind(ans.rcode, ans.aa, q.qname.lower(), ans.zone.origin),
            pools=pools,
        )


@dataclass(slots=True)
class Located:
    """How the full path steered one query that made exactly one geo decision."""

    geo: GeoName
    state: GeoState
    client: IPAddress
    location: Location | None
    generation: int
    offered: tuple[tuple[str, str], ...]


__all__ = ["MISS", "FastPath", "Located", "Miss"]
