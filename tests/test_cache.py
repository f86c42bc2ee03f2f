"""The packet cache gives the same replies as the full path, and never serves an answer
across a change (zone reload, zone added, health flip, override expiry, GeoIP swap)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.message
import pytest

from geodns import geo, pick
from geodns.cache import PacketCache
from geodns.handler import Handler
from geodns.model import Health, Pool, Site, SiteState, Transport
from geodns.view import Catalog, GeoState, View, ViewHolder, next_version
from geodns.zones import parse_zone
from tests.mmdb_util import city_record, write_test_mmdb

UDP, TCP = Transport.UDP, Transport.TCP
ZONES = Path(__file__).parent / "zones"
SITES = {
    "uk": Site("uk", ("198.51.100.10",), ("2001:db8:10::10",), 51.5, -0.13),
    "fra": Site("fra", ("198.51.100.20",), ("2001:db8:20::20",), 50.1, 8.7),
}
POOL = Pool("web", ("uk", "fra"))
GB, DE = city_record("GB", "EU", 51.5, -0.13), city_record("DE", "EU", 52.5, 13.4)


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = write_test_mmdb(
        tmp_path / "t.mmdb",
        [
            ("212.58.224.0/24", GB),
            ("81.169.145.0/24", DE),
            ("127.0.1.0/24", GB),
            ("127.0.2.0/24", DE),
        ],
    )
    zone_text = (ZONES / "example.test.zone").read_text() + "geo IN A 192.0.2.1\n"
    (tmp_path / "example.test.zone").write_text(zone_text)
    (tmp_path / "example.test.geo.toml").write_text('[names.geo]\npool = "web"\n')
    catalog = Catalog()
    zone = parse_zone(tmp_path / "example.test.zone", {"web": POOL})
    catalog.set(zone.origin, zone)
    holder = ViewHolder(View(catalog, GeoState(SITES, {"web": POOL}, {}, 1, {"web": 1})))
    locator = geo.Locator(db, geo.CountryTable.load())
    handler = Handler(
        holder,
        locate=locator.locate,
        decide=pick.decide,
        is_special=geo.is_special,
        special_block=geo.special_block,
    )
    return handler, PacketCache(handler), tmp_path


def query(name: str, rtype: str = "A", ecs: str | None = None, **kw: object) -> bytes:
    options = []
    if ecs:
        net = ipaddress.ip_network(ecs)
        options.append(dns.edns.ECSOption(str(net.network_address), net.prefixlen))
    q = dns.message.make_query(
        name, rtype, use_edns=0 if options else kw.pop("use_edns", None), options=options, **kw
    )  # type: ignore[arg-type]
    return q.to_wire()


def addresses(reply: bytes | None) -> set[str]:
    assert reply is not None
    m = dns.message.from_wire(reply)
    return {rd.to_text() for rr in m.answer for rd in rr}


CORPUS = [
    ("www.example.test", "A", None, {}),
    ("WwW.ExAmPlE.TeSt", "AAAA", None, {}),
    ("nx.example.test", "A", None, {"use_edns": 0}),
    ("big.example.test", "TXT", None, {}),
    ("big.example.test", "TXT", None, {"use_edns": 0, "payload": 4096}),
    ("manymx.example.test", "MX", None, {}),
    ("host.child.example.test", "A", None, {"use_edns": 0, "want_dnssec": True}),
    ("example.test", "ANY", None, {}),
    ("geo.example.test", "A", "212.58.224.0/24", {}),
    ("geo.example.test", "AAAA", "81.169.145.0/24", {}),
    ("geo.example.test", "A", "10.1.2.0/24", {}),
    ("www.example.org", "A", None, {}),
]


@pytest.mark.parametrize("transport", [UDP, TCP], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("name", "rtype", "ecs", "kw"), CORPUS, ids=[f"{c[0]}/{c[1]}/{c[2]}" for c in CORPUS]
)
def test_cached_reply_equals_full_path(world, transport, name, rtype, ecs, kw) -> None:  # type: ignore[no-untyped-def]
    handler, cache, _ = world
    data = query(name, rtype, ecs, **dict(kw))
    addr = ("127.0.0.1", 5300)
    full = handler.handle(data, addr, transport)
    first = cache.handle(data, addr, transport)  # answered, remembered (admission)
    second = cache.handle(data, addr, transport)  # answered, cached
    again_data = b"\x12\x34" + data[2:]
    again = cache.handle(again_data, addr, transport)
    assert cache.hits == 1
    assert first == full and second == full
    assert again == b"\x12\x34" + full[2:]


def test_zone_reload_is_not_served_stale(world) -> None:  # type: ignore[no-untyped-def]
    handler, cache, tmp = world
    data = query("www.example.test")
    assert "192.0.2.80" in addresses(cache.handle(data, ("127.0.0.1", 1), UDP))
    path = tmp / "example.test.zone"
    path.write_text(path.read_text().replace("192.0.2.80", "192.0.2.180"))
    zone = parse_zone(path, {"web": POOL})
    handler.holder.view.catalog.set(zone.origin, zone)
    assert "192.0.2.180" in addresses(cache.handle(data, ("127.0.0.1", 1), UDP))


def test_zone_added_below_is_not_served_stale(world) -> None:  # type: ignore[no-untyped-def]
    handler, cache, tmp = world
    data = query("x.sub.example.test")
    assert dns.message.from_wire(cache.handle(data, ("127.0.0.1", 1), UDP)).rcode() == 3
    child = tmp / "sub.example.test.zone"
    child.write_text(
        "$ORIGIN sub.example.test.\n@ 60 IN SOA ns host 1 2 3 4 5\n"
        "@ 60 IN NS ns\nns 60 IN A 192.0.2.9\nx 60 IN A 192.0.2.99\n"
    )
    zone = parse_zone(child)
    handler.holder.view.catalog.set(zone.origin, zone)
    assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"192.0.2.99"}


def test_health_flip_is_not_served_stale(world) -> None:  # type: ignore[no-untyped-def]
    handler, cache, _ = world
    data = query("geo.example.test", ecs="212.58.224.0/24")
    assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.10"}
    g = handler.holder.view.geo
    v = next_version()
    handler.holder.publish_geo(
        replace(
            g, states={"uk": SiteState(observed=Health.DOWN)}, version=v, pool_versions={"web": v}
        )
    )
    assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.20"}


def test_geoip_swap_is_not_served_stale(world) -> None:  # type: ignore[no-untyped-def]
    handler, cache, tmp = world
    data = query("geo.example.test", ecs="212.58.224.0/24")
    assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.10"}
    db2 = write_test_mmdb(tmp / "t2.mmdb", [("212.58.224.0/24", DE)])
    handler.locate = geo.Locator(db2, geo.CountryTable.load()).locate
    assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.20"}


def test_answers_located_by_source_are_kept_per_source_network(world) -> None:  # type: ignore[no-untyped-def]
    handler, cache, _ = world
    data = query("geo.example.test")  # no ECS: located by the packet source
    assert addresses(cache.handle(data, ("127.0.1.4", 1), UDP)) == {"198.51.100.10"}  # admission
    assert addresses(cache.handle(data, ("127.0.1.5", 1), UDP)) == {"198.51.100.10"}
    assert addresses(cache.handle(data, ("127.0.2.5", 1), UDP)) == {"198.51.100.20"}
    assert addresses(cache.handle(data, ("127.0.1.9", 1), UDP)) == {"198.51.100.10"}
    assert addresses(cache.handle(data, ("127.0.2.9", 1), UDP)) == {"198.51.100.20"}
    assert cache.hits == 2
    assert handler.stats.answers_by_site == {"uk": 3, "fra": 2}


def test_queries_with_cookies_are_not_cached(world) -> None:  # type: ignore[no-untyped-def]
    _, cache, _ = world
    q = dns.message.make_query(
        "www.example.test", "A", use_edns=0, options=[dns.edns.GenericOption(10, b"\x01" * 8)]
    )
    data = q.to_wire()
    cache.handle(data, ("127.0.0.1", 1), UDP)
    cache.handle(data, ("127.0.0.1", 1), UDP)
    assert cache.hits == 0


def test_override_expiry_is_not_served_stale(world) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from geodns.health import HealthManager
    from geodns.model import Override

    handler, cache, _ = world
    now = [1000.0]
    hm = HealthManager(handler.holder, SITES, {}, None, clock=lambda: now[0], run_checker=False)
    data = query("geo.example.test", ecs="212.58.224.0/24")

    async def run() -> None:
        await hm.start()
        await hm.set_override("uk", Override.DOWN, "maintenance", "test", 60)
        assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.20"}
        assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.20"}
        now[0] += 61
        hm.tick()  # the scheduled publish at expiry
        assert addresses(cache.handle(data, ("127.0.0.1", 1), UDP)) == {"198.51.100.10"}
        await hm.stop()

    asyncio.run(run())


def test_hits_are_counted_on_the_entry_and_folded_when_statistics_are_read(world) -> None:  # type: ignore[no-untyped-def]
    """A hit bumps only its entry; every reader of the statistics sees the exact counts,
    whichever counter it reads first, and folding twice counts nothing twice."""
    handler, cache, _ = world
    stats = handler.stats
    geo_q = query("geo.example.test", ecs="212.58.224.0/24")  # ECS, a geo answer (uk)
    www = query("www.example.test")  # static, no ECS
    for _ in range(5):
        cache.handle(geo_q, ("127.0.0.1", 1), UDP)
        cache.handle(www, ("127.0.0.1", 1), UDP)
        cache.handle(www, ("127.0.0.1", 1), TCP)
    # 2 misses (the first is only remembered) + 3 hits each. What waits on entries
    # until something reads: the 9 cache hits, and the 2 second misses of www that the
    # fast path answered (its plan was learned from the UDP and TCP first misses)
    assert sum(info.hits for info in stats.pending) == 11
    assert stats.ecs_queries == 5  # read first: folds everything
    assert stats.pending == []
    assert stats.queries == {("A", 0, "udp"): 10, ("A", 0, "tcp"): 5}
    assert stats.answers_by_site == {"uk": 5}
    assert stats.pool_offered.get(("web", "uk"), 0) == stats.pool_offered.get(("web", ""), 0)
    assert cache.hits == 9
    stats.fold()  # nothing left: no double count
    assert stats.queries == {("A", 0, "udp"): 10, ("A", 0, "tcp"): 5}
    # hits after a fold are counted again
    cache.handle(www, ("127.0.0.1", 1), UDP)
    assert stats.queries[("A", 0, "udp")] == 11
    assert cache.hits == 10


def test_unread_hits_never_pile_up(world) -> None:  # type: ignore[no-untyped-def]
    """Nobody reads the statistics (no API, no capacity windows): the list of entries
    with unfolded hits is folded whenever it reaches its bound."""
    from geodns.model import MAX_PENDING

    handler, cache, _ = world
    stats = handler.stats
    names = [query(f"n{i}.example.test") for i in range(MAX_PENDING + 300)]
    for data in names:
        cache.handle(data, ("127.0.0.1", 1), UDP)  # miss: NXDOMAIN, remembered
        cache.handle(data, ("127.0.0.1", 1), UDP)  # miss: cached
    for data in names:
        cache.handle(data, ("127.0.0.1", 1), UDP)  # hit
        assert len(stats.pending) < MAX_PENDING
    assert stats.queries == {("A", 3, "udp"): 3 * len(names)}
    assert cache.hits == len(names)


def test_a_cache_entry_does_not_keep_a_replaced_zone_alive(world) -> None:  # type: ignore[no-untyped-def]
    """Cache entries and fast-path plans hold the zone weakly: once a reload replaces it,
    nothing keeps the old snapshot (so the reaper can free a big one in slices,
    reload.py)."""
    import weakref

    handler, cache, tmp = world
    catalog = handler.holder.view.catalog
    for name in ("www.example.test", "geo.example.test", "nx.example.test"):
        for transport in (UDP, TCP):
            cache.handle(query(name, ecs="212.58.224.0/24"), ("127.0.0.1", 1), transport)
            cache.handle(query(name, ecs="212.58.224.0/24"), ("127.0.0.1", 1), transport)
    assert cache.udp and cache.tcp
    old = weakref.ref(catalog.zones[b"\x07example\x04test\x00"])
    zone = parse_zone(tmp / "example.test.zone", {"web": POOL})
    catalog.set(zone.origin, zone)
    assert old() is None  # neither cache entries nor fast-path plans held it
    reply = cache.handle(query("www.example.test"), ("127.0.0.1", 1), UDP)
    assert "192.0.2.80" in addresses(reply)


def test_an_entry_whose_zone_is_gone_and_now_unloaded_is_not_served(world) -> None:  # type: ignore[no-untyped-def]
    """A zone replaced by a failed load (None in the catalog: SERVFAIL): the entry's dead
    reference must not pass for "the same zone" because both are None."""
    handler, cache, _ = world
    catalog = handler.holder.view.catalog
    data = query("www.example.test")
    assert "192.0.2.80" in addresses(cache.handle(data, ("127.0.0.1", 1), UDP))
    catalog.set(b"\x07example\x04test\x00", None)
    reply = cache.handle(data, ("127.0.0.1", 1), UDP)
    assert reply is not None and dns.message.from_wire(reply).rcode() == 2  # SERVFAIL


def test_a_question_is_cached_the_second_time_it_misses(world) -> None:  # type: ignore[no-untyped-def]
    """Admission: a flood of names asked once (random subdomains) leaves no entries, only
    a bounded set of question bytes; a name asked again is cached and hit after that."""
    _, cache, _ = world
    cache.max_entries = 100
    flood = [query(f"r{i}.example.test") for i in range(250)]
    for data in flood:
        assert dns.message.from_wire(cache.handle(data, ("127.0.0.1", 1), UDP)).rcode() == 3
    assert cache.udp == {} and 0 < len(cache.seen_udp) <= 100
    www = query("www.example.test")
    cache.handle(www, ("127.0.0.1", 1), UDP)
    assert cache.udp == {}
    cache.handle(www, ("127.0.0.1", 1), UDP)
    assert list(cache.udp) == [www[2:]] and www[2:] not in cache.seen_udp
    assert addresses(cache.handle(www, ("127.0.0.1", 1), UDP)) >= {"192.0.2.80"}
    assert cache.hits == 1
