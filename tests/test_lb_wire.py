"""Load balancing in the running server: drains and slow starts along the ramp over the
wire, capacity spill-over from the answer counters, shuffled answers through the packet
cache, flap damping from the transition log, TTL under change, and explain.

The HealthManager's clock is injected (a plain number the test moves) and the scheduled
publishes are run by calling `tick()` on the server's loop, as the timer would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import pytest

from geodns import geo, pick
from geodns.cache import PacketCache
from geodns.checker import CheckEvent, ProbeResult
from geodns.config import load_config
from geodns.explain import explain, format_explain
from geodns.handler import Handler
from geodns.health import HealthManager, HealthPolicy
from geodns.model import CheckSpec, Health, Override, Pool, Site, SiteState, Transport
from geodns.store import Store
from geodns.view import Catalog, GeoState, View, ViewHolder
from geodns.zones import parse_zone
from tests.mmdb_util import city_record, write_test_mmdb
from tests.serverutil import Running, make_zone_dir, run_server, write_config

ZONE = """\
$ORIGIN example.com.
$TTL 3600
@       IN SOA  ns1 hostmaster 1 7200 3600 1209600 300
        IN NS   ns1
ns1     IN A    192.0.2.53
www     60 IN A    192.0.2.80
"""
GEO = '[names.www]\npool = "web"\ntypes = ["A"]\nttl_s = 60\n'
UK, FRA = "198.51.100.10", "198.51.100.20"
SITES = f"""
[rrl]
enabled = false            # every test query comes from 127.0.0.1

[checks]
ramp_s = 300
ramp_step_s = 30
ramp_start = 0.1

[sites.uk]
ipv4 = ["{UK}"]
lat = 51.5
lon = -0.13
capacity = CAPACITY

[sites.fra]
ipv4 = ["{FRA}"]
lat = 50.11
lon = 8.68

[pools.web]
members = ["uk", "fra"]
window_s = 60
ttl_under_change_s = 5
"""
PREFIXES = 600  # distinct client /24s per measurement (GB, 81.0.0.0/8)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextmanager
def lb_server(tmp: Path, capacity: float = 1.0) -> Iterator[tuple[Running, Clock]]:
    db = write_test_mmdb(tmp / "t.mmdb", [("81.0.0.0/8", city_record("GB", "EU", 51.5, -0.13))])
    make_zone_dir(tmp, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    body = f'[geoip]\ndatabase = "{db}"\nstate_dir = "{tmp / "state"}"\n' + SITES.replace(
        "CAPACITY", str(capacity)
    )
    config = load_config(write_config(tmp, body))
    config = replace(config, api=replace(config.api, listen=""))
    with run_server(config) as s:
        # from now on the health manager's time is the test's (started from the real
        # time, which stamped the first publish)
        clock = Clock(time.time())
        assert s.app.health is not None
        s.app.health.clock = clock
        yield s, clock


def on_loop(s: Running, fn: Callable[[], Any]) -> Any:
    """Run fn on the server's event loop (where the health manager lives)."""

    async def run() -> Any:
        return fn()

    return s.call(run())


def ask(s: Running, i: int) -> dns.message.Message:
    """www.example.com A for client prefix number i (81.x.y.0/24, GB)."""
    ecs = dns.edns.ECSOption(f"81.{i // 256}.{i % 256}.0", 24)
    q = dns.message.make_query("www.example.com", "A", use_edns=0, options=[ecs])
    return dns.query.udp(q, s.host, port=s.port, timeout=5)


def answer(s: Running, i: int) -> set[str]:
    return {rd.address for rr in ask(s, i).answer for rd in rr}


def measure(s: Running, n: int = PREFIXES) -> tuple[float, set[int], set[int]]:
    """uk's share of n client prefixes, and the ECS scopes and TTLs seen."""
    uk = 0
    scopes: set[int] = set()
    ttls: set[int] = set()
    for i in range(n):
        r = ask(s, i)
        addrs = {rd.address for rr in r.answer for rd in rr}
        uk += addrs == {UK}
        ttls.update(rr.ttl for rr in r.answer)
        scopes.update(o.scopelen for o in r.options if isinstance(o, dns.edns.ECSOption))
    return uk / n, scopes, ttls


def test_drained_site_share_falls_to_zero_and_comes_back_along_the_ramp(
    tmp_path: Path,
) -> None:
    with lb_server(tmp_path) as (s, clock):
        h = s.app.health
        assert h is not None
        share, scopes, ttls = measure(s)
        assert share == 1.0 and scopes == {8} and ttls == {60}  # the geo network, no hash

        # a planned drain over 120 s (PUT override with ramp_s): 90 % at once, then steps
        row = s.call(h.set_override("uk", Override.DOWN, "maintenance", "ops", None, 120.0))
        expected = [(0.0, 0.9), (60.0, 0.45), (119.0, 0.9 / 4), (120.0, 0.0)]
        t0 = row.created_at  # the store's clock stamped the drain
        for elapsed, want in expected:
            clock.t = t0 + elapsed
            on_loop(s, h.tick)  # the scheduled publish of this ramp step
            share, scopes, ttls = measure(s)
            assert share == pytest.approx(want, abs=0.07), (elapsed, share)
            if 0 < want < 1:
                assert scopes == {24}  # the client-prefix hash decided: /24
                assert ttls == {5}  # ttl_under_change_s while uk ramps
        assert h.holder.view.geo.states["uk"].drained

        # undrain: slow start over [checks] ramp_s = 300, 10 % -> 100 %
        s.call(h.clear_override("uk", "ops", "done"))
        t1 = clock.t
        on_uk: list[set[int]] = []
        for elapsed, want in [(0.0, 0.1), (150.0, 0.55), (299.0, 0.91), (300.0, 1.0)]:
            clock.t = t1 + elapsed
            on_loop(s, h.tick)
            share, scopes, _ = measure(s)
            assert share == pytest.approx(want, abs=0.07), (elapsed, share)
            on_uk.append({i for i in range(100) if answer(s, i) == {UK}})
        # clients come back and stay back: each step's set contains the previous one
        assert all(a <= b for a, b in itertools.pairwise(on_uk))
        st = h.holder.view.geo.states["uk"]
        assert st.ramp == 1.0 and not st.ramp_kind
        assert scopes == {8}  # ramp over: no hashing, the geo network's scope again
        # still "changing" for settle_s after the flip: the short TTL, then the normal one
        clock.t = t1 + 300 + h.policy.settle_s
        on_loop(s, h.tick)
        assert measure(s, 20)[2] == {60}
        assert h.next_deadline() is None  # nothing left to schedule


def test_capacity_spills_to_the_next_site_over_the_wire(tmp_path: Path) -> None:
    with lb_server(tmp_path, capacity=0.5) as (s, clock):
        h = s.app.health
        assert h is not None and h.counters is not None  # wired to the answer counters
        on_loop(s, h.tick)  # the capacity window of pool web starts now
        share, _, _ = measure(s)
        assert share == 1.0  # every GB client prefers uk (capacity 0.5)
        clock.t += 60.0
        on_loop(s, h.tick)  # the window ends: offered share 100 % > 50 %
        bal = h.holder.view.geo.balance["web"]
        assert bal.offered_share["uk"] == pytest.approx(1.0)
        assert bal.spill["uk"] == pytest.approx(0.5)
        share, scopes, _ = measure(s)
        assert share == pytest.approx(0.5, abs=0.07)
        assert scopes == {24}
        # the next window measures the same demand (offered counts passed-on clients)
        clock.t += 60.0
        on_loop(s, h.tick)
        assert h.holder.view.geo.balance["web"].spill["uk"] == pytest.approx(0.5)
        # explain says why a client went to fra
        locator = geo.Locator(s.app.config.geoip.database, geo.CountryTable.load())
        spilled = next(i for i in range(100) if answer(s, i) == {FRA})
        ecs = f"81.{spilled // 256}.{spilled % 256}.0/24"
        out = explain(h.holder.view, locator, pick.decide, "127.0.0.1", "www.example.com", "A", ecs)
        assert out["chosen"][0]["site"] == "fra"
        assert out["balancing"][0]["site"] == "uk"
        assert out["balancing"][0]["reason"] == "capacity"
        assert "capacity 50%" in out["balancing"][0]["detail"]
        assert out["ecs_scope"] == 24
        uk = next(c for c in out["candidates"] if c["site"] == "uk")
        assert uk["spill"] == pytest.approx(0.5) and uk["offered_share"] == pytest.approx(1.0)
        text = format_explain(out)
        assert "passed:" in text and "spills 50%" in text


# -- health manager: damping from the shared log, ramps, schedule -------------------------

SITES5 = {n: Site(n, (f"192.0.2.{i}",), (), 50.0 + i, float(i)) for i, n in enumerate("abcde", 1)}
TCP = CheckSpec(kind="tcp", port=9, interval_s=10.0, down_thresh=1, up_thresh=1)
DAMPING = dict(flap_max=2, flap_window_s=600.0, flap_penalty_s=120.0, flap_penalty_max_s=900.0)


def manager(
    clock: Clock, store: Store | None, *, run_checker: bool = False, **kw: Any
) -> HealthManager:
    from geodns import balance

    policy = HealthPolicy(
        partition_min_sites=10,
        damping=balance.DampingPolicy(
            kw.pop("flap_max", 0),
            kw.pop("flap_window_s", 600.0),
            kw.pop("flap_penalty_s", 120.0),
            kw.pop("flap_penalty_max_s", 3600.0),
        ),
        ramp=balance.RampPolicy(kw.pop("ramp_s", 0.0), 30.0, 0.1),
        quorum="off",
    )
    pools = {"p": Pool("p", tuple(SITES5), ttl_under_change_s=5)}
    holder = ViewHolder(View(Catalog(), GeoState(SITES5, pools, {})))
    return HealthManager(
        holder,
        SITES5,
        dict.fromkeys(SITES5, TCP),
        store,
        policy,
        clock=clock,
        run_checker=run_checker,
        follow=kw.pop("follow", False),
    )


def event(site: str, old: Health, new: Health, at: float) -> CheckEvent:
    ok = new is Health.UP
    return CheckEvent(
        site, None, ProbeResult(ok, 1.0, None if ok else "refused"), new, (old, new), at
    )


async def flap(m: HealthManager, clock: Clock, site: str, times: int) -> None:
    state = Health.UP
    for _ in range(times):
        new = Health.DOWN if state is Health.UP else Health.UP
        clock.t += 10
        await m.on_event(event(site, state, new, clock.t))
        state = new


async def test_flapping_site_is_held_down_and_every_node_agrees(tmp_path: Path) -> None:
    clock = Clock()
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url, "node1", clock=clock).open()
    m = manager(clock, store, **DAMPING)
    await m.start()
    await m.on_event(event("a", Health.UNKNOWN, Health.UP, clock.t))  # not a flap
    await flap(m, clock, "a", 3)  # DOWN, UP, DOWN: 3 changes > K = 2
    clock.t += 10
    await m.on_event(event("a", Health.DOWN, Health.UP, clock.t))  # UP again: still held
    st = m.holder.view.geo.states["a"]
    assert st.observed is Health.UP and st.damped and not st.usable
    assert st.damped_until == pytest.approx(clock.t + 120)  # flapping on extends the hold
    assert st.changing  # the pool's answers use its TTL under change
    info = m.site_info("a")
    assert info.damping.held(clock.t) and info.damping.level == 1
    # precedence: an operator's UP override beats damping
    await m.set_override("a", Override.UP, "I know", "ops", None)
    assert m.holder.view.geo.states["a"].usable
    await m.clear_override("a", "ops", "back to obeying")
    assert not m.holder.view.geo.states["a"].usable
    await m.stop()

    # another node reading the same log (a follower of this checker) holds it the same
    follower = Store(url, "node2", clock=clock).open()
    other = manager(clock, follower, follow=False, **DAMPING)
    other.run_checker = False
    await other._load_flaps()
    assert other._damping_holds(clock.t) == m._damping_holds(clock.t)
    assert other._damping_holds(clock.t)  # non-empty: held

    # the hold ends by a scheduled publish; the site then ramps? (no ramp configured)
    until = m.holder.view.geo.states["a"].damped_until
    assert until is not None and m.next_deadline() is not None
    clock.t = until
    m.tick()
    st = m.holder.view.geo.states["a"]
    assert not st.damped and st.usable


async def test_slow_start_after_check_failback_steps_by_scheduled_publishes() -> None:
    clock = Clock()
    m = manager(clock, None, ramp_s=300.0)
    await m.start()
    await m.on_event(event("b", Health.UNKNOWN, Health.UP, clock.t))
    assert m.holder.view.geo.states["b"].ramp == 1.0  # coming up at start: no ramp
    await m.on_event(event("b", Health.UP, Health.DOWN, clock.t))
    clock.t += 100
    await m.on_event(event("b", Health.DOWN, Health.UP, clock.t))
    t0 = clock.t
    seen = []
    for elapsed in (0, 30, 150, 299, 300):
        clock.t = t0 + elapsed
        m.tick()
        st = m.holder.view.geo.states["b"]
        seen.append(round(st.ramp, 3))
        assert st.changing is (elapsed < 300)  # ramping, then settled (settle_s 300)
    assert seen == [0.1, 0.19, 0.55, 0.91, 1.0]
    assert m.holder.view.geo.states["b"].ramp_kind == ""
    # each ramp step moved the pool's version (the packet cache follows)
    assert m.holder.view.geo.pool_versions["p"] == m.holder.view.geo.version


# -- shuffled answers through the packet cache ---------------------------------------------


def test_shuffled_answers_rotate_through_the_packet_cache(tmp_path: Path) -> None:
    addrs = ("198.51.100.1", "198.51.100.2", "198.51.100.3")
    # capacity below 1: the pool's answers are counted for its capacity windows
    sites = {
        "s": Site("s", addrs, (), 51.5, -0.13, capacity=0.9, address_weights=(("198.51.100.3", 2),))
    }
    pool = Pool("web", ("s",), max_answers=1, answer_order="shuffle")
    db = write_test_mmdb(
        tmp_path / "t.mmdb", [("81.0.0.0/8", city_record("GB", "EU", 51.5, -0.13))]
    )
    (tmp_path / "example.com.zone").write_text(ZONE)
    (tmp_path / "example.com.geo.toml").write_text(GEO)
    catalog = Catalog()
    zone = parse_zone(tmp_path / "example.com.zone", {"web": pool})
    catalog.set(zone.origin, zone)
    holder = ViewHolder(View(catalog, GeoState(sites, {"web": pool}, {}, 1, {"web": 1})))
    locator = geo.Locator(db, geo.CountryTable.load())
    handler = Handler(
        holder,
        locate=locator.locate,
        decide=pick.decide,
        is_special=geo.is_special,
        special_block=geo.special_block,
    )
    cache = PacketCache(handler)
    ecs = dns.edns.ECSOption("81.1.2.0", 24)
    wire = dns.message.make_query("www.example.com", "A", use_edns=0, options=[ecs]).to_wire()
    got: list[str] = []
    for _ in range(40):
        reply = cache.handle(wire, ("127.0.0.1", 5353), Transport.UDP)
        assert reply is not None
        m = dns.message.from_wire(reply)
        got += [rd.address for rr in m.answer for rd in rr]
        scope = next(o.scopelen for o in m.options if isinstance(o, dns.edns.ECSOption))
        assert scope == 8  # shuffling does not depend on the client: no /24
    # one address per answer (max_answers 1), weighted 1:1:2 over each 4 answers
    assert len(got) == 40
    assert got.count("198.51.100.3") == 20
    assert got.count("198.51.100.1") == got.count("198.51.100.2") == 10
    # the first answer only admits the question; then four pre-rendered orderings,
    # then served in turn
    assert cache.hits == 40 - 5
    # the same question without the cache rotates too (the handler's own turn)
    plain = [
        dns.message.from_wire(handler.handle(wire, ("127.0.0.1", 5353), Transport.UDP) or b"")
        .answer[0][0]
        .address
        for _ in range(4)
    ]
    assert sorted(plain) == ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.3"]
    # answers were counted for the pool's capacity accounting, hits included
    assert handler.stats.pool_offered[("web", "")] == 44


# -- configuration ----------------------------------------------------------------------

LB_CONFIG = """
[checks]
ramp_s = 300
flap_max = 4
settle_s = 120

[sites.uk]
ipv4 = ["198.51.100.10", "198.51.100.11"]
lat = 51.5
lon = -0.13
weight = 3
capacity = 0.4
address_weights = { "198.51.100.11" = 2 }

[sites.ams]
ipv4 = ["198.51.100.15"]
lat = 52.37
lon = 4.9

[sites.fra]
ipv4 = ["198.51.100.20"]
lat = 50.11
lon = 8.68

[sites.iad]
ipv4 = ["198.51.100.30"]
lat = 39.04
lon = -77.49

[pools.web]
members = ["uk", "ams", "fra", "iad"]
rules = [
  { country = "GB", sites = [["uk", "ams"], "fra", "iad"] },
  { country = "DE", sites = ["fra", "uk", "iad"] },
]
tie_km = 50
max_answers = 1
answer_order = "shuffle"
window_s = 30
ttl_under_change_s = 10
"""


def test_load_balancing_config_keys(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, LB_CONFIG))
    pool = cfg.pools["web"]
    gb = pool.rules[0]
    assert gb.sites == ("uk", "ams", "fra", "iad")
    assert gb.groups == (("uk", "ams"), ("fra",), ("iad",))
    assert pool.rules[1].groups == ()  # a flat list: every site its own rank
    assert (pool.tie_km, pool.max_answers, pool.answer_order) == (50.0, 1, "shuffle")
    assert (pool.window_s, pool.ttl_under_change_s) == (30.0, 10)
    uk = cfg.sites["uk"]
    assert (uk.weight, uk.capacity, uk.address_weight("198.51.100.11")) == (3, 0.4, 2)
    policy = HealthPolicy.from_config(cfg.checks)
    assert policy.ramp.ramp_s == 300 and policy.ramp.step_s == 30 and policy.ramp.start == 0.1
    assert policy.damping.max_flaps == 4 and policy.settle_s == 120


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (("max_answers = 1", "max_answers = -1"), "pools.web.max_answers: must be >= 0"),
        (('answer_order = "shuffle"', 'answer_order = "random"'), "allowed: sticky, shuffle"),
        (("window_s = 30", "window_s = 0"), "pools.web.window_s: must be > 0"),
        (("tie_km = 50", "tie_km = -1"), "pools.web.tie_km: must be >= 0"),
        (('"198.51.100.11" = 2', '"192.0.2.99" = 2'), "not an address of the site"),
        (("ramp_s = 300", "ramp_s = 300\nramp_start = 0"), "checks.ramp_start"),
        (("flap_max = 4", "flap_max = 4\nflap_window_s = 0"), "checks.flap_window_s"),
        (('[["uk", "ams"], "fra", "iad"]', '[[], "fra"]'), "an empty group"),
        (('[["uk", "ams"], "fra", "iad"]', '[["uk", "nyc"]]'), "'nyc' is not a member"),
    ],
    ids=[
        "max-answers",
        "answer-order",
        "window",
        "tie-km",
        "address-weight",
        "ramp-start",
        "flap-window",
        "empty-group",
        "group-member",
    ],
)
def test_load_balancing_config_errors(tmp_path: Path, edit: tuple[str, str], words: str) -> None:
    from geodns.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, LB_CONFIG.replace(*edit)))
    assert words in str(err.value)


# -- explain: why a client was held back ---------------------------------------------------


@pytest.mark.parametrize(
    ("uk_state", "chosen", "reason", "mark"),
    [
        (SiteState(Health.UP, damped=True, damped_until=2e9), "fra", None, "[damped (flapping)]"),
        (SiteState(Health.UP, ramp=1e-9, ramp_kind="up"), "fra", "ramp", "[slow start 0%]"),
        (SiteState(Health.UP, ramp=1e-9, ramp_kind="down"), "fra", "ramp", "[ramped drain 0%]"),
        (SiteState(Health.UP, ramp=0.999999, ramp_kind="up"), "uk", None, "[slow start 100%]"),
    ],
    ids=["damped", "slow-start", "ramped-drain", "kept-by-ramp"],
)
def test_explain_shows_damping_and_ramps(
    tmp_path: Path, uk_state: SiteState, chosen: str, reason: str | None, mark: str
) -> None:
    db = write_test_mmdb(
        tmp_path / "t.mmdb", [("81.0.0.0/8", city_record("GB", "EU", 51.5, -0.13))]
    )
    (tmp_path / "example.com.zone").write_text(ZONE)
    (tmp_path / "example.com.geo.toml").write_text(GEO)
    cfg = load_config(write_config(tmp_path, SITES.replace("CAPACITY", "1.0")))
    catalog = Catalog()
    zone = parse_zone(tmp_path / "example.com.zone", cfg.pools)
    catalog.set(zone.origin, zone)
    pool = replace(cfg.pools["web"], ttl_under_change_s=5)
    changing = replace(uk_state, changing=True)
    view = View(catalog, GeoState(cfg.sites, {"web": pool}, {"uk": changing}, 1))
    locator = geo.Locator(db, geo.CountryTable.load())
    out = explain(view, locator, pick.decide, "127.0.0.1", "www.example.com", "A", "81.1.2.0/24")
    assert out["chosen"][0]["site"] == chosen
    uk = next(c for c in out["candidates"] if c["site"] == "uk")
    assert uk["damped"] is uk_state.damped and uk["ramp"] == uk_state.ramp
    if uk_state.damped:
        assert uk["health"] == "damped"
    assert [b["reason"] for b in out["balancing"]] == ([reason] if reason else [])
    assert out["ttl_cap_s"] == 5
    text = format_explain(out)
    assert mark in text
    assert "TTL:" in text and "at most 5 s" in text
    if reason == "ramp":
        assert "passed:" in text and "uk: ramp:" in text
        assert out["ecs_scope"] == 24


async def test_shared_mode_damping_follows_the_quorums_log_on_every_node(
    tmp_path: Path,
) -> None:
    # several nameservers: the quorum's decisions are logged as transitions of node
    # "quorum"; each node replays those (not its own votes) and holds the same target
    from geodns.store import QUORUM_NODE

    clock = Clock()
    url = f"sqlite:///{tmp_path}/s.db"
    log_writer = Store(url, QUORUM_NODE, clock=clock).open()
    votes = Store(url, "node1", clock=clock).open()
    for i, (old, new) in enumerate([(Health.UP, Health.DOWN), (Health.DOWN, Health.UP)] * 2):
        log_writer.record_transition("c", None, old, new, "quorum", clock.t + 10 * i)
    for i in range(6):  # a node's own flapping votes do not count in shared mode
        votes.record_transition("d", None, Health.UP, Health.DOWN, "vote", clock.t + i)
    clock.t += 40
    nodes = []
    for name in ("node1", "node2"):
        m = manager(clock, Store(url, name, clock=clock).open(), **DAMPING)
        m.shared = True
        await m._load_flaps()
        nodes.append(m._damping_holds(clock.t))
    assert nodes[0] == nodes[1] == {("c", None): pytest.approx(clock.t - 10 + 120)}


def test_cli_and_api_ramped_drain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from geodns import cli
    from tests.test_ops import TOKEN, ops_server

    with ops_server(tmp_path) as srv:
        api = ["--api", srv.base, "--token", TOKEN]
        base = ["--config", str(srv.config_path)]
        assert cli.main([*base, "drain", "uk", "--reason", "move", "--ramp", "10m", *api]) == 0
        assert "(ramped over 10m)" in capsys.readouterr().out
        site = srv.get("/v1/sites/uk").json
        assert site["override"]["ramp_s"] == 600
        assert site["effective"] == "up" and site["changing"]  # on its way down
        assert site["ramp"]["kind"] == "down" and site["ramp"]["share"] == pytest.approx(0.9)
        assert site["damping"] == {
            "damped": False,
            "until": None,
            "addresses": [],
            "level": 0,
            "recent_changes": 0,
        }
        audit = srv.get("/v1/audit").json["items"][0]
        assert audit["action"] == "override.set" and audit["detail"]["ramp_s"] == 600
        metrics = srv.get("/metrics").body.decode()
        assert 'geodns_site_ramp{site="uk"} 0.9' in metrics
        assert 'geodns_site_damped{site="uk"} 0.0' in metrics


def test_workers_receive_damping_ramps_and_balance() -> None:
    from geodns.model import PoolBalance
    from geodns.workers import apply_states, encode_states

    states = {
        "uk": SiteState(
            Health.UP,
            damped=True,
            damped_until=123.0,
            damped_addresses=frozenset({"192.0.2.1"}),
            address_down=frozenset({"192.0.2.1"}),
            ramp=0.55,
            ramp_kind="up",
            ramp_until=456.0,
            changing=True,
        ),
        "fra": SiteState(Health.DOWN, Override.UP),
    }
    bal = {"web": PoolBalance({"uk": 0.25}, {"uk": 0.8, "fra": 0.2}, 1000, 60.0)}
    main = GeoState(SITES5, {}, states, 7, {"web": 7}, bal)
    worker = ViewHolder(View(Catalog(), GeoState(SITES5, {}, {})))
    apply_states(worker, encode_states(main))
    got = worker.view.geo
    assert dict(got.states) == states
    assert dict(got.balance) == bal
    assert got.version == 7
