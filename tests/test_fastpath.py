"""The fast path (pre-rendered answers, geodns/fastpath.py) against the full path.

Two handlers read the same View: one with the fast path (the default), one with
`Settings(fast_path=False)`. Every query of a corpus (every name of the test zone and
its geo names x types, EDNS sizes, DO, RD/CD, ECS variants, 0x20 case, UDP and TCP,
sources in several networks) must get byte-identical replies, including the TC
decision and the OPT record, the first time (learned), the second (replayed) and under
another ID; the statistics must come out the same. Then: nothing pre-rendered is
replayed across a zone reload, a zone added below, a health flip, an override expiry, a
GeoIP swap or a pool removed from the config.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dnslib
import pytest

from geodns import geo, pick
from geodns.config import load_config
from geodns.cookies import CookieJar
from geodns.handler import Handler, Settings
from geodns.model import Health, Override, SiteState, Transport
from geodns.rrl import RateLimiter
from geodns.view import Catalog, GeoState, View, ViewHolder, next_version
from geodns.zones import Zone, parse_zone
from tests.mmdb_util import city_record, write_test_mmdb
from tests.serverutil import write_config

UDP, TCP = Transport.UDP, Transport.TCP
ZONES = Path(__file__).parent / "zones"
GB, DE = city_record("GB", "EU", 51.5, -0.13), city_record("DE", "EU", 52.5, 13.4)
US = city_record("US", "NA", 38.9, -77.0)

GEO_ZONE = """
geo IN A 192.0.2.1
geo6 IN A 192.0.2.2
lb IN A 192.0.2.3
cap IN A 192.0.2.4
cidr IN A 192.0.2.5
shuf IN A 192.0.2.6
cdn IN CNAME fallback.elsewhere.invalid.
togeo IN CNAME geo
"""
GEO_OVERLAY = """
[names.geo]
pool = "web"
types = ["A", "AAAA"]
[names.geo6]
pool = "v4only"
types = ["A", "AAAA"]
[names.lb]
pool = "lb"
count = 1
[names.cap]
pool = "cap"
[names.cidr]
pool = "cidr"
[names.shuf]
pool = "shuf"
[names.cdn]
pool = "edge"
types = ["CNAME"]
"""
SITES = """
[sites.uk]
ipv4 = ["198.51.100.10", "198.51.100.11"]
ipv6 = ["2001:db8:10::10"]
city = "London"
country = "GB"
cname = "uk.cdn.elsewhere.invalid."
[sites.fra]
ipv4 = ["198.51.100.20"]
ipv6 = ["2001:db8:20::20"]
city = "Frankfurt am Main"
country = "DE"
cname = "fra.cdn.elsewhere.invalid."
capacity = 0.5
[sites.iad]
ipv4 = ["198.51.100.30"]
lat = 39.04
lon = -77.49
weight = 3
[pools.web]
members = ["uk", "fra", "iad"]
[pools.v4only]
members = ["iad"]
[pools.lb]
members = ["uk", "iad"]
fallback = "default"
default = [["uk", "iad"]]
max_answers = 1
[pools.cap]
members = ["fra", "uk"]
rules = [{ country = "DE", sites = ["fra", "uk"] }]
[pools.cidr]
members = ["uk", "fra"]
rules = [{ cidr = "127.0.1.0/25", sites = ["fra"] }, { cidr = "81.169.145.0/25", sites = ["uk"] }]
[pools.shuf]
members = ["uk", "iad"]
fallback = "default"
default = [["uk", "iad"]]
answer_order = "shuffle"
[pools.edge]
members = ["uk", "fra"]
"""


@dataclass
class World:
    fast: Handler
    full: Handler
    holder: ViewHolder
    tmp: Path
    config_pools: dict[str, object]


# one cookie secret and a fixed clock for both handlers: server cookies, and so whole
# replies, are a function of the query and its source
JAR = CookieJar(b"fastpath-secret!", clock=lambda: 1_750_000_000.0)


def _handler(holder: ViewHolder, locate: object, fast: bool, **kw: object) -> Handler:
    kw.setdefault("cookies", JAR)
    return Handler(
        holder,
        Settings(fast_path=fast, nsid=b"ns-test"),
        locate=locate,  # type: ignore[arg-type]
        decide=pick.decide,
        is_special=geo.is_special,
        special_block=geo.special_block,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    db = write_test_mmdb(
        tmp_path / "t.mmdb",
        [
            ("212.58.224.0/24", GB),
            ("31.0.0.0/16", GB),
            ("81.169.145.0/24", DE),
            ("8.8.8.0/24", US),
            ("127.0.1.0/24", GB),
            ("127.0.2.0/24", DE),
            ("2a00:1450::/32", DE),
        ],
    )
    config = load_config(write_config(tmp_path, SITES))
    zone_text = (ZONES / "example.test.zone").read_text() + GEO_ZONE
    (tmp_path / "example.test.zone").write_text(zone_text)
    (tmp_path / "example.test.geo.toml").write_text(GEO_OVERLAY)
    catalog = Catalog()
    zone = parse_zone(tmp_path / "example.test.zone", config.pools)
    catalog.set(zone.origin, zone)
    versions = {name: 1 for name in config.pools}
    holder = ViewHolder(View(catalog, GeoState(config.sites, config.pools, {}, 1, versions)))
    locator = geo.Locator(db, geo.CountryTable.load())
    return World(
        _handler(holder, locator.locate, True),
        _handler(holder, locator.locate, False),
        holder,
        tmp_path,
        dict(config.pools),
    )


def names() -> list[str]:
    zone = parse_zone(ZONES / "example.test.zone")
    out = []
    for key in zone.nodes:
        labels = []
        i = 0
        while key[i]:
            labels.append(key[i + 1 : i + 1 + key[i]].decode())
            i += key[i] + 1
        out.append(".".join(labels) + ".")
    extra = ["geo", "geo6", "lb", "cap", "cidr", "shuf", "cdn", "togeo", "nx", "x.wild", "a.dn"]
    # names the zone does not have (the NXDOMAIN bodies per apex offset), and absent names
    # where something else applies: under an existing name, under the names of the SOA's
    # RDATA (compression into the name), under a wildcard's parent, a cut, a DNAME
    extra += ["r1", "rr2", "deep.r3", "a.b.c.d.e.f", "x" * 63 + ".y", "x.www", "x.ns1"]
    extra += ["y.x.ns1", "z.hostmaster", "q.sub.wild", "w.x.wild", "x.child", "q.a.dn"]
    extra += ["q.dnout", "x.sibling", "x.cnamewild", "*.nx", "x.*.wild"]
    out += [f"{n}.example.test." for n in extra]
    return [*out, "www.example.org.", "example.test.", "nope.example.org."]


TYPES = ["A", "AAAA", "MX", "TXT", "NS", "SOA", "CNAME", "SRV", "ANY", "DS"]
ECS = [None, "212.58.224.0/24", "81.169.145.0/24", "8.8.8.0/24", "2a00:1450::/48",
       "81.169.145.0/32", "10.1.2.0/24", "0.0.0.0/0"]  # fmt: skip
SOURCES = ["127.0.1.5", "127.0.2.5", "127.0.1.200", "::ffff:127.0.2.9", "::1"]


def cookie_option(rng: random.Random, source: str) -> dns.edns.Option:
    """A client cookie alone, with a valid server cookie, or with a wrong one."""
    client = rng.randbytes(8)
    kind = rng.choice(["client", "valid", "old", "wrong"])
    if kind == "client":
        return dns.edns.GenericOption(10, client)
    ip = ipaddress.ip_address(source.split("%")[0]).packed
    now = 1_750_000_000 - (2000 if kind == "old" else 0)  # "old": valid, to be refreshed
    server = JAR.mint(client, ip, now) if kind != "wrong" else rng.randbytes(16)
    return dns.edns.GenericOption(10, client + server)


def make_query(name: str, rtype: str, rng: random.Random, source: str = "127.0.1.5") -> bytes:
    """One query with randomly chosen case, flags, EDNS size, DO, ECS, cookie, NSID."""
    wname = "".join(c.upper() if rng.random() < 0.5 else c for c in name)  # 0x20
    edns = rng.random() < 0.8
    options: list[dns.edns.Option] = []
    ecs = rng.choice(ECS) if edns else None
    if edns and rng.random() < 0.25:
        options.append(cookie_option(rng, source))
    if edns and rng.random() < 0.15:
        options.append(dns.edns.GenericOption(3, b""))  # NSID (RFC 5001)
    if ecs is not None:
        net = ipaddress.ip_network(ecs)
        options.append(dns.edns.ECSOption(str(net.network_address), net.prefixlen))
    rng.shuffle(options)
    q = dns.message.make_query(
        wname,
        rtype,
        use_edns=0 if edns else None,
        payload=rng.choice([512, 1232, 4096, 100]),
        want_dnssec=edns and rng.random() < 0.3,
        options=options,
    )
    q.flags = dns.flags.Flag(0)
    if rng.random() < 0.7:
        q.flags |= dns.flags.RD
    if rng.random() < 0.2:
        q.flags |= dns.flags.CD
    q.id = rng.randrange(65536)
    return q.to_wire()


def corpus(seed: int = 9) -> Iterator[tuple[bytes, str]]:
    """(query, the source address it is sent from)"""
    rng = random.Random(seed)
    for name, rtype in itertools.product(names(), TYPES):
        for _ in range(3):
            source = rng.choice(SOURCES)
            yield make_query(name, rtype, rng, source), source


def stats_of(h: Handler) -> tuple[object, ...]:
    s = h.stats
    return (s.queries, s.ecs_queries, s.answers_by_site, s.pool_offered, s.truncated, s.rrl)


def test_fast_path_replies_are_the_full_paths(world: World) -> None:
    rng = random.Random(1)
    n = 0
    for data, source in corpus():
        transport = UDP if rng.random() < 0.7 else TCP
        addr = (source, 5300)
        other = struct.pack("!H", rng.randrange(65536)) + data[2:]
        for q in (data, data, other):
            fast = world.fast.handle(q, addr, transport)
            assert fast == world.full.handle(q, addr, transport), (
                dnslib.DNSRecord.parse(q),
                addr,
                transport,
            )
            # and an independent decoder reads it: header, sections, OPT and options
            assert fast is not None
            decoded = dnslib.DNSRecord.parse(fast)
            assert decoded.header.id == struct.unpack("!H", q[:2])[0]
            assert decoded.q.qname == dnslib.DNSRecord.parse(q).q.qname
            n += 1
    assert world.fast.fast is not None
    # most of the corpus is replayed (the rest: ANY over UDP, CNAME geo, shuffled
    # pools, truncated replies, special ECS addresses, BADVERS, ...)
    assert world.fast.fast.hits > n * 0.4, (world.fast.fast.hits, n)
    assert stats_of(world.fast) == stats_of(world.full)


def test_packet_cache_misses_through_the_fast_path(world: World) -> None:
    """process() (a packet cache's miss) gives the same reply and what it depended on."""
    for data, source in corpus(3):
        addr = (source, 5300)
        for _ in range(2):
            fast_reply, fast_info = world.fast.process(data, addr, UDP)
            full_reply, full_info = world.full.process(data, addr, UDP)
            assert fast_reply == full_reply
            assert (fast_info is None) == (full_info is None)
            if fast_info is not None and full_info is not None:
                f, s = fast_info, full_info
                assert (f.zone_key, f.zone, f.catalog_generation, f.pools) == (
                    s.zone_key,
                    s.zone,
                    s.catalog_generation,
                    s.pools,
                )
                assert (f.by_source, f.scope, f.stats_key, f.sites, f.ecs) == (
                    s.by_source,
                    s.scope,
                    s.stats_key,
                    s.sites,
                    s.ecs,
                )
                assert (f.rrl_kind, f.offered, f.rotations) == (s.rrl_kind, s.offered, s.rotations)


def ask(
    h: Handler, name: str, rtype: str = "A", ecs: str | None = None, src: str = "127.0.0.1"
) -> dns.message.Message:
    options = []
    if ecs:
        net = ipaddress.ip_network(ecs)
        options.append(dns.edns.ECSOption(str(net.network_address), net.prefixlen))
    q = dns.message.make_query(name, rtype, use_edns=0, options=options)
    reply = h.handle(q.to_wire(), (src, 53), UDP)
    assert reply is not None
    return dns.message.from_wire(reply)


def addrs(m: dns.message.Message) -> set[str]:
    return {rd.to_text() for rr in m.answer for rd in rr}


def replayed(h: Handler) -> int:
    assert h.fast is not None
    return h.fast.hits


def test_the_common_queries_are_replayed(world: World) -> None:
    h = world.fast
    for _ in range(3):
        assert addrs(ask(h, "geo.example.test", ecs="212.58.224.0/24")) == {
            "198.51.100.10",
            "198.51.100.11",
        }
        assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {"198.51.100.20"}
        assert addrs(ask(h, "geo.example.test", src="127.0.2.7")) == {"198.51.100.20"}
        assert ask(h, "nx.example.test").rcode() == 3
        assert addrs(ask(h, "www.example.test")) == {"192.0.2.80", "192.0.2.81"}
    # round 1: the full path answers four (each question seen once), the NXDOMAIN is
    # replayed from the zone's negative body; round 2: the geo question is learned on
    # its first client and replayed for the other two, the other questions are learned,
    # the NXDOMAIN replayed; round 3: all five replayed
    assert replayed(h) == 1 + 3 + 5


def test_zone_reload_is_not_replayed_stale(world: World) -> None:
    h = world.fast
    for _ in range(3):  # seen, learned, replayed
        assert addrs(ask(h, "www.example.test")) == {"192.0.2.80", "192.0.2.81"}
    assert replayed(h) == 1
    path = world.tmp / "example.test.zone"
    path.write_text(path.read_text().replace("192.0.2.80", "192.0.2.180"))
    zone = parse_zone(path, world.config_pools)  # type: ignore[arg-type]
    world.holder.view.catalog.set(zone.origin, zone)
    assert addrs(ask(h, "www.example.test")) == {"192.0.2.180", "192.0.2.81"}
    assert addrs(ask(h, "www.example.test")) == {"192.0.2.180", "192.0.2.81"}
    assert replayed(h) == 2


def publish(world: World, origin: str, body: str) -> Zone:
    """Write `origin`'s zone file (body after $ORIGIN) and publish it."""
    path = world.tmp / f"{origin}.zone"
    path.write_text(f"$ORIGIN {origin}.\n{body}")
    zone = parse_zone(path)
    world.holder.view.catalog.set(zone.origin, zone)
    return zone


def test_zone_added_below_is_not_replayed_stale(world: World) -> None:
    h = world.fast
    for _ in range(2):
        assert ask(h, "x.sub.example.test").rcode() == 3
    zone = publish(
        world,
        "sub.example.test",
        "@ 60 IN SOA ns host 1 2 3 4 5\n@ 60 IN NS ns\nns 60 IN A 192.0.2.9\n"
        "x 60 IN A 192.0.2.99\n",
    )
    assert addrs(ask(h, "x.sub.example.test")) == {"192.0.2.99"}
    world.holder.view.catalog.remove(zone.origin)
    assert ask(h, "x.sub.example.test").rcode() == 3


def _publish_states(holder: ViewHolder, states: dict[str, SiteState]) -> None:
    g = holder.view.geo
    v = next_version()
    holder.publish_geo(replace(g, states=states, version=v, pool_versions={p: v for p in g.pools}))


def test_health_flip_is_not_replayed_stale(world: World) -> None:
    h = world.fast
    for _ in range(2):
        assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {"198.51.100.20"}
    _publish_states(world.holder, {"fra": SiteState(observed=Health.DOWN)})
    for _ in range(2):
        assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {
            "198.51.100.10",
            "198.51.100.11",
        }
    _publish_states(world.holder, {"fra": SiteState(observed=Health.UP)})
    assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {"198.51.100.20"}
    # a drained site: the override leaves the answer too
    _publish_states(world.holder, {"fra": SiteState(override=Override.DOWN)})
    assert "198.51.100.20" not in addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24"))


def test_override_expiry_is_not_replayed_stale(world: World) -> None:
    import asyncio

    from geodns.health import HealthManager

    h = world.fast
    now = [1000.0]
    sites = world.holder.view.geo.sites
    hm = HealthManager(world.holder, sites, {}, None, clock=lambda: now[0], run_checker=False)

    async def run() -> None:
        await hm.start()
        await hm.set_override("uk", Override.DOWN, "maintenance", "test", 60)
        for _ in range(2):
            assert addrs(ask(h, "geo.example.test", ecs="212.58.224.0/24")) == {"198.51.100.20"}
        now[0] += 61
        hm.tick()  # the scheduled publish at expiry
        assert addrs(ask(h, "geo.example.test", ecs="212.58.224.0/24")) == {
            "198.51.100.10",
            "198.51.100.11",
        }
        await hm.stop()

    asyncio.run(run())


def test_geoip_swap_is_not_replayed_stale(world: World) -> None:
    h = world.fast
    for _ in range(2):
        assert addrs(ask(h, "geo.example.test", ecs="212.58.224.0/24")) == {
            "198.51.100.10",
            "198.51.100.11",
        }
        assert addrs(ask(h, "geo.example.test", src="127.0.1.7")) == {
            "198.51.100.10",
            "198.51.100.11",
        }
    db2 = write_test_mmdb(world.tmp / "t2.mmdb", [("212.58.224.0/24", DE), ("127.0.1.0/24", DE)])
    h.locate = geo.Locator(db2, geo.CountryTable.load()).locate
    assert addrs(ask(h, "geo.example.test", ecs="212.58.224.0/24")) == {"198.51.100.20"}
    assert addrs(ask(h, "geo.example.test", src="127.0.1.7")) == {"198.51.100.20"}


def test_pool_removed_from_the_config_is_not_replayed(world: World) -> None:
    h = world.fast
    for _ in range(2):
        assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {"198.51.100.20"}
    g = world.holder.view.geo
    pools = {k: v for k, v in g.pools.items() if k != "web"}
    world.holder.publish_geo(replace(g, pools=pools, version=next_version()))
    # no pool: the zone file's record answers
    assert addrs(ask(h, "geo.example.test", ecs="81.169.145.0/24")) == {"192.0.2.1"}


def test_truncation_is_the_full_paths(world: World) -> None:
    """A reply over the UDP limit goes to the full path: TC, and the OPT kept."""
    for use_edns, payload in ((None, 512), (0, 512), (0, 1232)):
        q = dns.message.make_query("big.example.test", "TXT", use_edns=use_edns, payload=payload)
        data = q.to_wire()
        for _ in range(2):
            fast = world.fast.handle(data, ("127.0.0.1", 1), UDP)
            assert fast == world.full.handle(data, ("127.0.0.1", 1), UDP)
        assert fast is not None
        m = dns.message.from_wire(fast)
        assert bool(m.flags & dns.flags.TC) == (payload == 512)
        # over TCP the same question is replayed whole
        tcp = world.fast.handle(data, ("127.0.0.1", 1), TCP)
        assert tcp == world.full.handle(data, ("127.0.0.1", 1), TCP)
        assert tcp is not None and len(dns.message.from_wire(tcp).answer[0]) == 6


def test_malformed_opt_after_a_learned_question_is_formerr(world: World) -> None:
    """A question the fast path knows, with a broken OPT, still gets FORMERR + OPT."""
    good = dns.message.make_query("www.example.test", "A", use_edns=0).to_wire()
    world.fast.handle(good, ("127.0.0.1", 1), UDP)
    # address bits beyond the /24 prefix: malformed (RFC 7871 §6)
    bad_ecs = dns.edns.GenericOption(8, b"\x00\x01\x18\x00\x51\x45\x02\x01")
    ecs_bits = dns.message.make_query(
        "www.example.test", "A", use_edns=0, options=[bad_ecs]
    ).to_wire()
    trailing = good + b"\x00"
    two_opts = good[:11] + b"\x02" + good[12:] + good[-11:]
    for data in (ecs_bits, trailing, two_opts):
        for _ in range(2):
            fast = world.fast.handle(data, ("127.0.0.1", 1), UDP)
            assert fast == world.full.handle(data, ("127.0.0.1", 1), UDP)
            assert fast is not None and fast[3] & 0xF == 1  # FORMERR


def test_rrl_charges_replayed_answers(world: World) -> None:
    """Replayed answers are rate limited like the full path's: same drops and slips."""
    clock = [100.0]
    # a burst of 4: seen, learned, then two replayed before the limit bites
    limiters = [RateLimiter(responses_per_s=4, window_s=1, slip=2, exempt=()) for _ in range(2)]
    holder = world.holder
    locate = world.fast.locate
    fast = _handler(holder, locate, True, rrl=limiters[0], clock=lambda: clock[0])
    full = _handler(holder, locate, False, rrl=limiters[1], clock=lambda: clock[0])
    data = dns.message.make_query("www.example.test", "A", use_edns=0).to_wire()
    outcomes = []
    for _ in range(12):
        a = fast.handle(data, ("192.0.2.7", 1), UDP)
        b = full.handle(data, ("192.0.2.7", 1), UDP)
        assert a == b
        outcomes.append("drop" if a is None else "slip" if a[2] & 0x02 else "answer")
    assert outcomes.count("drop") > 0 and outcomes.count("slip") > 0
    assert replayed(fast) > 0
    assert stats_of(fast) == stats_of(full)


def test_cookies_are_minted_per_client_on_replayed_answers(world: World) -> None:
    """RFC 7873 §5.2: each client gets its own server cookie, also from the fast path;
    NSID (RFC 5001) comes along when asked."""
    h = world.fast
    client = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    q = dns.message.make_query(
        "www.example.test",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(10, client), dns.edns.GenericOption(3, b"")],
    ).to_wire()
    before = replayed(h)
    for source in ("192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2"):
        reply = h.handle(q, (source, 53), UDP)
        assert reply == world.full.handle(q, (source, 53), UDP)
        assert reply is not None
        m = dns.message.from_wire(reply)
        opts = {o.otype: o for o in m.options}
        server = opts[10].to_wire()[8:]  # type: ignore[union-attr]
        ip = ipaddress.ip_address(source).packed
        assert JAR.check(client, server, ip) == (True, False)
        assert opts[3].to_wire() == b"ns-test"  # type: ignore[union-attr]
    assert replayed(h) == before + 2  # the question was seen, then learned


def test_one_plan_serves_every_0x20_variant(world: World) -> None:
    """Resolvers that randomize the case of each query (0x20) are replayed too: one
    plan per question in lower case, the question echoed exactly as sent."""
    h = world.fast
    rng = random.Random(5)
    before = replayed(h)
    for i in range(40):
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in "geo.example.test.")
        q = dns.message.make_query(
            name, "A", use_edns=0, options=[dns.edns.ECSOption("212.58.224.0", 24)]
        )
        q.id = i
        data = q.to_wire()
        reply = h.handle(data, ("127.0.1.5", 53), UDP)
        assert reply == world.full.handle(data, ("127.0.1.5", 53), UDP)
        assert reply is not None
        qlen = len(name) + 1 + 4
        assert reply[12 : 12 + qlen] == data[12 : 12 + qlen]  # the case as sent
    assert replayed(h) - before == 38  # all but the first two: seen, then learned
    assert h.fast is not None and len(h.fast.plans) == 1


def test_questions_asked_once_render_nothing(world: World) -> None:
    """A random-subdomain flood (every name new) never pays for rendering: a plan is
    made the second time a question is answered, and the tables stay bounded. Names
    the zone does not have are answered from one negative body per apex offset."""
    h = world.fast
    assert h.fast is not None
    for i in range(500):
        assert ask(h, f"r{i}.example.test").rcode() == 3
        assert ask(h, f"r{i}.example.test", "MX").rcode() == 3
    assert h.fast.plans == {}  # each question remembered once, nothing stored per name
    assert len(h.fast.seen) == 1000
    # r0-r9, r10-r99, r100-r499: three apex offsets, two types
    assert sorted(k[1:] for k in h.fast.negative) == [
        (3, 1),
        (3, 15),
        (4, 1),
        (4, 15),
        (5, 1),
        (5, 15),
    ]
    assert replayed(h) == 1000  # each body rendered for a stand-in name, then replayed
    m = ask(h, "r7.example.test")
    f = ask(world.full, "r7.example.test")
    assert (m.flags, m.rcode(), m.answer, m.authority) == (
        f.flags,
        f.rcode(),
        f.answer,
        f.authority,
    )
    assert m.flags & dns.flags.AA
    assert [rr.to_text() for rr in m.authority] == [
        "example.test. 300 IN SOA ns1.example.test. hostmaster.example.test. "
        "2026112501 7200 3600 1209600 300"
    ]
    # asked twice: the negative body is kept under the question too (one lookup)
    key = b"\x02r7\x07example\x04test\x00\x00\x01\x00\x01"
    assert list(h.fast.plans) == [key]
    assert h.fast.plans[key] is h.fast.negative[(b"\x07example\x04test\x00", 3, 1)]


def test_clients_with_the_same_decision_share_one_rendered_answer(world: World) -> None:
    """200 resolver networks that all get the same site: one body, 200 small entries."""
    h = world.fast
    assert h.fast is not None
    nets = [f"31.0.{i}.0/24" for i in range(200)]  # one GeoIP network, 200 /24s
    for _ in range(3):
        for net in nets:
            got = addrs(ask(h, "geo.example.test", ecs=net))
            assert got == {"198.51.100.10", "198.51.100.11"}
    (plan,) = h.fast.plans.values()
    assert len(plan.rendered) == 1
    assert len(plan.bodies) == 200
    assert len(set(map(id, plan.bodies.values()))) == 1
    assert replayed(h) >= 200 * 2 - 1


def test_answers_are_tallied_on_their_bodies_and_never_pile_up(world: World) -> None:
    """A replayed answer bumps its body's tally; nobody reads the statistics here, yet
    the list of tallies waiting to be folded stays under its bound, and the counts come
    out exact, the same as the full path's."""
    from geodns.model import MAX_PENDING

    fast, full = world.fast, world.full
    assert fast.fast is not None
    names = [f"n{i}.example.test" for i in range(MAX_PENDING + 200)]  # NXDOMAIN each
    for _ in range(3):  # the second ask renders, the third is replayed
        for name in names:
            data = dns.message.make_query(name, "A").to_wire()
            a = fast.handle(data, ("127.0.1.5", 5300), UDP)
            b = full.handle(data, ("127.0.1.5", 5300), UDP)
            assert a == b
            assert len(fast.stats.pending) < MAX_PENDING
    assert fast.fast.hits >= len(names)
    assert fast.stats.queries == {("A", 3, "udp"): 3 * len(names)}
    assert stats_of(fast) == stats_of(full)


def test_a_dname_at_the_apex_is_never_answered_nxdomain(world: World) -> None:
    """RFC 6672 §2.3: a DNAME at a zone's apex redirects every name below it, so an
    absent name there is the full path's answer (the DNAME), not the negative body."""
    zone = publish(
        world,
        "dnapex.test",
        "$TTL 300\n@ IN SOA ns1.example.test. h.example.test. 1 2 3 4 5\n"
        "@ IN NS ns1.example.test.\n@ IN DNAME example.test.\n",
    )
    for name in ("r1.dnapex.test", "www.dnapex.test", "a.b.dnapex.test"):
        for _ in range(2):
            m = ask(world.fast, name)
            f = ask(world.full, name)
            assert (m.rcode(), m.answer, m.authority) == (f.rcode(), f.answer, f.authority)
            assert m.rcode() != 3 and any(rr.rdtype == dns.rdatatype.DNAME for rr in m.answer)
    assert world.fast.fast is not None
    assert not any(k[0] == zone.origin for k in world.fast.fast.negative)
