"""Load balancing as pure policy: weights, capacity spill-over, ramps, flap damping.

Tables with an injected clock (times are plain numbers). The spread tests run
1,000,000 simulated client prefixes through `pick.spread`, the per-client part of
`pick.decide` (the same `_Walk`), and compare the shares with the declared weights and
capacities; `decide` itself is checked to agree with `spread` on a sample.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Mapping

import pytest

from geodns import balance
from geodns.balance import DampingPolicy, RampPolicy, ShareWindow
from geodns.model import (
    Decision,
    Health,
    IPAddress,
    Location,
    Override,
    Pool,
    PoolBalance,
    Rule,
    Site,
    SiteState,
)
from geodns.pick import decide, spread

N = 1_000_000
TOLERANCE = 0.01  # the "within 1 %", as an absolute share


def loc(network: str, country: str, continent: str, lat: float, lon: float) -> Location:
    return Location(ipaddress.ip_network(network), country, continent, lat, lon)


SITES: dict[str, Site] = {
    "uk": Site("uk", ("192.0.2.1", "192.0.2.11"), ("2001:db8:1::1",), lat=51.5, lon=-0.13),
    "fra": Site("fra", ("192.0.2.2",), ("2001:db8:2::1",), lat=50.11, lon=8.68),
    "iad": Site("iad", ("192.0.2.3",), (), lat=38.9, lon=-77.0),
}
# one pool, per-region failover order by rules (no duplicated pools, octoDNS #702)
REGIONAL = Pool(
    "web",
    ("uk", "fra", "iad"),
    (
        Rule("country", "GB", ("uk", "fra", "iad")),
        Rule("country", "DE", ("fra", "uk", "iad")),
    ),
)
GB = ("212.58.224.10", loc("212.58.0.0/16", "GB", "EU", 51.5, -0.13))
DE = ("5.9.1.1", loc("5.9.0.0/16", "DE", "EU", 52.52, 13.40))
US = ("8.8.8.8", loc("8.8.0.0/16", "US", "NA", 40.71, -74.01))
GB6 = ("2a00:1450::1", loc("2a00:1450::/32", "GB", "EU", 51.5, -0.13))


def run(
    client: tuple[str, Location | None],
    pool: Pool,
    sites: Mapping[str, Site] = SITES,
    states: Mapping[str, SiteState] | None = None,
    *,
    family: int = 4,
    count: int = 1,
    bal: PoolBalance | None = None,
    rotation: int = 0,
) -> Decision:
    address: IPAddress = ipaddress.ip_address(client[0])
    return decide(
        pool,
        sites,
        states or {},
        address,
        client[1],
        family,
        count,
        balance=bal,
        rotation=rotation,
    )


def keys(n: int = N, start: int = 0) -> range:
    """Hashing keys of n distinct IPv4 /24 prefixes (balance.client_key's form)."""
    return range(start << 1, (start + n) << 1, 2)


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


# -- weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [{"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 1, "c": 0, "d": 5}],
    ids=["1:2:3", "10:1:0:5"],
)
def test_million_prefixes_follow_weights(weights: dict[str, int]) -> None:
    sites = {n: Site(n, (f"192.0.2.{i}",), weight=w) for i, (n, w) in enumerate(weights.items())}
    pool = Pool("p", tuple(weights))
    answered, _ = spread(pool, sites, {}, [list(weights)], keys())
    got = shares(answered)
    total = sum(weights.values())
    for name, w in weights.items():
        assert got.get(name, 0.0) == pytest.approx(w / total, abs=TOLERANCE), (name, got)
    if "c" in weights and weights["c"] == 0:
        assert "c" not in answered  # weight 0: only when the others are unusable


def test_decide_agrees_with_spread_and_sets_the_scope() -> None:
    # two sites in one city: equally good; 3:1 by weight, by a hash of the /24
    sites = {
        "lon-a": Site("lon-a", ("192.0.2.1",), ("2001:db8::1",), 51.5, -0.13, weight=3),
        "lon-b": Site("lon-b", ("192.0.2.2",), ("2001:db8::2",), 51.5, -0.13, weight=1),
    }
    pool = Pool("p", ("lon-a", "lon-b"))
    seen: dict[str, int] = {}
    for i in range(4000):
        client = ipaddress.IPv4Address((10 << 24) + (i << 8) + 7)
        location = loc("10.0.0.0/8", "GB", "EU", 51.5, -0.13)
        d = decide(pool, sites, {}, client, location, 4)
        answered, _ = spread(pool, sites, {}, [["lon-a", "lon-b"]], [balance.client_key(client)])
        assert d.sites == tuple(answered)
        assert d.hashed and d.scope == 24  # the /8 geo network, widened to the hash's /24
        seen[d.sites[0]] = seen.get(d.sites[0], 0) + 1
    assert seen["lon-a"] / 4000 == pytest.approx(0.75, abs=0.03)
    # the same /24 gets the same answer whatever the host part
    a = decide(pool, sites, {}, ipaddress.IPv4Address("10.1.2.3"), location, 4)
    b = decide(pool, sites, {}, ipaddress.IPv4Address("10.1.2.250"), location, 4)
    assert a.sites == b.sites
    # IPv6: the /56
    c = decide(pool, sites, {}, ipaddress.IPv6Address("2001:db8:0:1::1"), None, 6, 1)
    assert c.use_zone_record  # unlocatable, no default: the zone record, no hashing
    located6 = loc("2001:db8::/32", "GB", "EU", 51.5, -0.13)
    c = decide(pool, sites, {}, ipaddress.IPv6Address("2001:db8:0:1::1"), located6, 6)
    assert c.hashed and c.scope == 56


def test_no_choice_no_hash_scope_unchanged() -> None:
    # count covers every equal site: nothing to choose, the geo scope stays (/16)
    sites = {
        "lon-a": Site("lon-a", ("192.0.2.1",), (), 51.5, -0.13, weight=3),
        "lon-b": Site("lon-b", ("192.0.2.2",), (), 51.5, -0.13, weight=1),
    }
    d = run(GB, Pool("p", ("lon-a", "lon-b")), sites, count=2)
    assert d.sites == ("lon-a", "lon-b") and not d.hashed and d.scope == 16
    # a single nearest site: no hashing either
    d = run(GB, REGIONAL)
    assert d.sites == ("uk",) and not d.hashed and d.scope == 16


def test_rule_groups_and_tie_km_make_sites_equally_good() -> None:
    sites = {
        **SITES,
        "ams": Site("ams", ("192.0.2.4",), (), lat=52.37, lon=4.90),
    }
    grouped = Pool(
        "p",
        ("uk", "fra", "iad", "ams"),
        (Rule("country", "GB", ("uk", "ams", "iad"), (("uk", "ams"), ("iad",))),),
    )
    got: dict[str, int] = {}
    for i in range(2000):
        # distinct /24s
        client = (str(ipaddress.IPv4Address((212 << 24) + (58 << 16) + (i << 8))), GB[1])
        d = run(client, grouped, sites)
        got[d.sites[0]] = got.get(d.sites[0], 0) + 1
    assert set(got) == {"uk", "ams"}  # iad only after both
    # nearest with tie_km: uk (0 km) and ams (~360 km) equal within 400 km, fra not
    tied = Pool("p", ("uk", "fra", "ams"), tie_km=400.0)
    firsts = {
        run((str(ipaddress.IPv4Address(i << 8)), GB[1]), tied, sites).sites[0] for i in range(200)
    }
    assert firsts == {"uk", "ams"}


def test_sticky_assignment_stable_across_view_rebuilds() -> None:
    def build(extra: dict[str, Site] | None = None) -> tuple[Pool, dict[str, Site]]:
        # new objects each time, as a config reload makes them
        sites = {
            n: Site(n, (f"192.0.2.{i}",), (), 48.0, 2.0, weight=w)
            for i, (n, w) in enumerate([("a", 1), ("b", 2), ("c", 1)])
        }
        sites.update(extra or {})
        return Pool("p", tuple(sites)), sites

    location = loc("10.0.0.0/8", "FR", "EU", 48.0, 2.0)
    clients = [ipaddress.IPv4Address((10 << 24) + (i << 8)) for i in range(3000)]

    def answers(pool: Pool, sites: dict[str, Site]) -> list[str]:
        return [decide(pool, sites, {}, c, location, 4).sites[0] for c in clients]

    first = answers(*build())
    assert answers(*build()) == first  # rebuilt view: every client keeps its site
    # a fourth site joins: clients move only to it (rendezvous hashing), ~1/5 of them
    grown = answers(*build({"d": Site("d", ("192.0.2.9",), (), 48.0, 2.0, weight=1)}))
    moved = [(a, b) for a, b in zip(first, grown, strict=True) if a != b]
    assert all(b == "d" for _, b in moved)
    assert len(moved) / len(clients) == pytest.approx(1 / 5, abs=0.03)
    # b's weight doubles: clients move only to b
    pool, sites = build()
    sites["b"] = Site("b", ("192.0.2.1",), (), 48.0, 2.0, weight=4)
    heavier = answers(pool, sites)
    assert all(b == "b" for a, b in zip(first, heavier, strict=True) if a != b)


def test_max_answers_spread_addresses_by_weight() -> None:
    addrs = ("192.0.2.1", "192.0.2.2", "192.0.2.3")
    site = Site("s", addrs, (), address_weights=(("192.0.2.3", 2),))
    pool = Pool("p", ("s",), max_answers=1)
    location = loc("10.0.0.0/8", "FR", "EU", 48.0, 2.0)
    d = decide(pool, {"s": site}, {}, ipaddress.IPv4Address("10.0.0.1"), location, 4)
    assert d.addresses is not None and len(d.addresses) == 1 and d.hashed and d.scope == 24
    # the address choice over 200,000 prefixes: 1:1:2 (the decide path orders addresses
    # with balance.weighted_order under the "address" purpose)
    counts: dict[str, int] = {}
    for key in keys(200_000):
        first = balance.weighted_order(list(addrs), [1, 1, 2], key, "address")[0]
        counts[first] = counts.get(first, 0) + 1
    got = shares(counts)
    assert got["192.0.2.3"] == pytest.approx(0.5, abs=TOLERANCE)
    assert got["192.0.2.1"] == pytest.approx(0.25, abs=TOLERANCE)
    # max_answers 0: every address, configured order, no hashing
    d = decide(Pool("p", ("s",)), {"s": site}, {}, ipaddress.IPv4Address("10.0.0.1"), location, 4)
    assert d.addresses is None and not d.hashed


@pytest.mark.parametrize(
    ("weights", "rotations", "leaders"),
    [
        ([1, 1, 1], 3, ["a", "b", "c"]),
        ([3, 1], 4, ["a", "a", "a", "b"]),
        ([2, 0, 2], 2, ["a", "c"]),
        ([0, 0], 2, ["a", "b"]),
    ],
    ids=["round-robin", "3:1", "weight-0-never-leads", "all-zero-equal"],
)
def test_shuffle_rotations_are_exact(
    weights: list[int], rotations: int, leaders: list[str]
) -> None:
    names = ["a", "b", "c"][: len(weights)]
    assert balance.rotations_for(weights) == rotations
    got = [balance.rotation_order(names, weights, k)[0] for k in range(rotations)]
    assert sorted(got) == sorted(leaders)
    # the turn wraps: ordering k and k + rotations are the same
    assert balance.rotation_order(names, weights, 1) == balance.rotation_order(
        names, weights, 1 + rotations
    )


def test_shuffle_does_not_hash_the_client() -> None:
    sites = {
        "a": Site("a", ("192.0.2.1", "192.0.2.2"), (), 48.0, 2.0, weight=3),
        "b": Site("b", ("192.0.2.3",), (), 48.0, 2.0, weight=1),
    }
    pool = Pool("p", ("a", "b"), answer_order="shuffle")
    location = loc("10.0.0.0/8", "FR", "EU", 48.0, 2.0)
    client = ipaddress.IPv4Address("10.0.0.1")
    answers = [decide(pool, sites, {}, client, location, 4, rotation=r) for r in range(12)]
    assert {d.rotations for d in answers} == {4}  # lcm(4 for the sites, 2 for a's addresses)
    assert all(not d.hashed and d.scope == 8 for d in answers)
    assert [d.sites[0] for d in answers[:4]].count("a") == 3
    # a's two addresses rotate too (round-robin DNS)
    assert {d.addresses for d in answers if d.sites == ("a",)} == {
        ("192.0.2.1", "192.0.2.2"),
        ("192.0.2.2", "192.0.2.1"),
    }


# -- per-region failover order ---------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "down", "expected"),
    [
        (GB, (), "uk"),
        (GB, ("uk",), "fra"),
        (GB, ("uk", "fra"), "iad"),
        (DE, (), "fra"),
        (DE, ("fra",), "uk"),
        (DE, ("fra", "uk"), "iad"),
        (US, (), "iad"),
        (US, ("iad",), "uk"),  # no rule: nearest (London is nearer New York than Frankfurt)
    ],
    ids=["GB", "GB-uk-down", "GB-both-down", "DE", "DE-fra-down", "DE-both-down", "US", "US-down"],
)
def test_per_region_failover_order(
    client: tuple[str, Location], down: tuple[str, ...], expected: str
) -> None:
    states = {n: SiteState(Health.DOWN) for n in down}
    assert run(client, REGIONAL, states=states).sites == (expected,)


# -- capacity spill-over ---------------------------------------------------------------


def simulate(
    bal: PoolBalance | None, gb: int = 600_000, de: int = 400_000
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """GB prefixes rank uk > fra > iad, DE prefixes fra > uk > iad (REGIONAL's rules):
    where they go, and the counters the handler would have kept."""
    answered: dict[str, int] = {}
    counters: dict[tuple[str, str], int] = {("web", ""): gb + de}
    for order, ks in ((["uk", "fra", "iad"], keys(gb)), (["fra", "uk", "iad"], keys(de, gb))):
        got, offered = spread(REGIONAL, SITES_CAPPED, {}, [[n] for n in order], ks, balance=bal)
        for n, c in got.items():
            answered[n] = answered.get(n, 0) + c
        for n, c in offered.items():
            counters[("web", n)] = counters.get(("web", n), 0) + c
    return answered, counters


SITES_CAPPED = {**SITES, "uk": Site("uk", ("192.0.2.1",), (), 51.5, -0.13, capacity=0.4)}


def test_million_prefixes_capacity_spills_to_next_nearest() -> None:
    window = ShareWindow()
    pools = {"web": REGIONAL}
    window.roll(0.0, {}, pools, SITES_CAPPED, {})  # the first window starts
    assert window.next_due(pools, SITES_CAPPED) == 60.0
    answered, counters = simulate(None)
    assert shares(answered)["uk"] == pytest.approx(0.6, abs=TOLERANCE)  # demand over cap
    bal = window.roll(60.0, counters, pools, SITES_CAPPED, {})["web"]
    assert bal.offered_share["uk"] == pytest.approx(0.6, abs=TOLERANCE)
    assert bal.spill["uk"] == pytest.approx(1 - 0.4 / 0.6, abs=TOLERANCE)
    assert "fra" not in bal.spill

    answered2, counters2 = simulate(bal)
    got = shares(answered2)
    assert got["uk"] == pytest.approx(0.4, abs=TOLERANCE)
    assert got["fra"] == pytest.approx(0.6, abs=TOLERANCE)  # the next nearest, not iad
    assert "iad" not in answered2
    # the next window sees the same demand (offered counts what uk passed on), so the
    # fraction holds: no bouncing back every other window
    total = {k: v + counters[k] for k, v in counters2.items()}
    again = window.roll(120.0, total, pools, SITES_CAPPED, {"web": bal})["web"]
    assert again.spill["uk"] == pytest.approx(bal.spill["uk"], abs=0.002)


def test_spill_goes_to_next_in_the_clients_own_order() -> None:
    bal = PoolBalance(spill={"uk": 0.999, "fra": 0.999}, offered_share={"uk": 0.9, "fra": 0.9})
    d = run(GB, REGIONAL, SITES_CAPPED, bal=bal)
    assert d.sites == ("fra",) or d.sites == ("iad",)
    assert d.passed[0][:2] == ("uk", "capacity") and d.hashed and d.scope == 24
    assert d.offered[0] == "uk"
    d = run(DE, REGIONAL, SITES_CAPPED, bal=bal)
    assert d.passed[0][:2] == ("fra", "capacity")
    # a site alone never spills: nowhere to go
    alone = Pool("solo", ("uk",))
    d = run(GB, alone, SITES_CAPPED, bal=PoolBalance(spill={"uk": 0.999}))
    assert d.sites == ("uk",) and not d.passed


@pytest.mark.parametrize(
    ("capacity", "offered", "fraction"),
    [(1.0, 0.9, 0.0), (0.4, 0.3, 0.0), (0.4, 0.4, 0.0), (0.4, 0.6, 1 / 3), (0.25, 1.0, 0.75)],
    ids=["no-cap", "under", "at", "over", "all"],
)
def test_spill_fraction(capacity: float, offered: float, fraction: float) -> None:
    assert balance.spill_fraction(capacity, offered) == pytest.approx(fraction)


def test_quiet_window_keeps_previous_fractions() -> None:
    window = ShareWindow()
    pools = {"web": REGIONAL}
    window.roll(0.0, {}, pools, SITES_CAPPED, {})
    prev = PoolBalance(spill={"uk": 0.3}, offered_share={"uk": 0.57}, answers=1000)
    quiet = {("web", ""): 10, ("web", "uk"): 10}
    bal = window.roll(60.0, quiet, pools, SITES_CAPPED, {"web": prev})["web"]
    assert bal.spill == {"uk": 0.3} and bal.answers == 10
    # a worker restart resets its counters: counted from zero, never negative
    window.roll(120.0, {("web", ""): 5, ("web", "uk"): 5}, pools, SITES_CAPPED, {"web": bal})
    uncapped = {"web": Pool("web", ("fra", "iad"))}
    assert window.roll(180.0, {}, uncapped, SITES, {}) == {}
    assert window.next_due(uncapped, SITES) is None


# -- slow start and ramped drains ------------------------------------------------------

RAMP = RampPolicy(ramp_s=300.0, step_s=30.0, start=0.1)


@pytest.mark.parametrize(
    ("elapsed_s", "up", "down"),
    [
        (0.0, 0.1, 0.9),
        (29.9, 0.1, 0.9),
        (30.0, 0.19, 0.81),
        (150.0, 0.55, 0.45),  # ramp / 2
        (299.0, 0.91, 0.09),
        (300.0, 1.0, 0.0),  # ramp: done
        (1e9, 1.0, 0.0),
    ],
    ids=["t0", "t0+", "step1", "half", "last-step", "end", "long-after"],
)
def test_ramp_fractions(elapsed_s: float, up: float, down: float) -> None:
    assert balance.ramp_fraction(elapsed_s, RAMP) == pytest.approx(up)
    assert balance.drain_fraction(elapsed_s, RAMP) == pytest.approx(down)


def test_ramp_steps_are_scheduled() -> None:
    assert balance.ramp_next_change(0.0, RAMP) == 30.0
    assert balance.ramp_next_change(149.0, RAMP) == 150.0
    assert balance.ramp_next_change(300.0, RAMP) is None
    off = RampPolicy()
    assert balance.ramp_fraction(0.0, off) == 1.0 and balance.drain_fraction(0.0, off) == 0.0
    assert balance.ramp_next_change(0.0, off) is None


@pytest.mark.parametrize("elapsed_s", [0.0, 150.0, 300.0], ids=["t0", "half", "end"])
def test_million_prefixes_follow_the_ramp(elapsed_s: float) -> None:
    fraction = balance.ramp_fraction(elapsed_s, RAMP)
    states = {"uk": SiteState(Health.UP, ramp=fraction, ramp_kind="up")}
    answered, _ = spread(REGIONAL, SITES, states, [["uk"], ["fra"], ["iad"]], keys())
    assert shares(answered)["uk"] == pytest.approx(fraction, abs=TOLERANCE)
    assert set(answered) <= {"uk", "fra"}  # the others go to the next site


def test_ramp_moves_clients_monotonically() -> None:
    # a client back on the ramping site stays there as the ramp grows (no bouncing),
    # and a draining site only ever loses clients
    clients = [(str(ipaddress.IPv4Address((212 << 24) + (i << 8))), GB[1]) for i in range(1500)]

    def on_uk(fraction: float) -> set[str]:
        states = {"uk": SiteState(Health.UP, ramp=fraction, ramp_kind="up")}
        return {c[0] for c in clients if run(c, REGIONAL, states=states).sites == ("uk",)}

    steps = [balance.ramp_fraction(t, RAMP) for t in range(0, 301, 30)]
    sets = [on_uk(f) for f in steps]
    for before, after in itertools.pairwise(sets):
        assert before <= after
    assert len(sets[-1]) == len(clients)


def test_ramp_trace_and_scope() -> None:
    states = {"uk": SiteState(Health.UP, ramp=0.0001, ramp_kind="up")}
    d = run(GB, REGIONAL, states=states)
    assert d.sites == ("fra",) and d.passed[0][:2] == ("uk", "ramp")
    assert d.hashed and d.scope == 24
    assert any(line.startswith("ramp: uk passes this client on (slow start") for line in d.trace)
    d = run(GB6, REGIONAL, states=states, family=6)
    assert d.scope == 56
    # the only usable site keeps everyone, ramp or not
    d = run(
        GB,
        REGIONAL,
        states={**states, "fra": SiteState(Health.DOWN), "iad": SiteState(Health.DOWN)},
    )
    assert d.sites == ("uk",) and not d.passed


# -- flap damping ----------------------------------------------------------------------

DAMP = DampingPolicy(
    max_flaps=2, window_s=600.0, penalty_s=120.0, penalty_max_s=900.0, decay_s=1800.0
)


def episode(t0: float, n: int = 3, gap: float = 10.0) -> list[float]:
    return [t0 + i * gap for i in range(n)]


@pytest.mark.parametrize(
    ("times", "now", "held_until", "level"),
    [
        (episode(0, 2), 20.0, None, 0),  # K = 2 changes: not more than K
        (episode(0, 3), 20.0, 140.0, 1),  # the third within the window: held 120 s
        (episode(0, 3), 140.0, None, 1),  # released, remembered
        # growth: each new episode while remembered doubles the hold
        (episode(0) + episode(1000), 1020.0, 1020.0 + 240.0, 2),
        (episode(0) + episode(1000) + episode(2000), 2020.0, 2020.0 + 480.0, 3),
        # capped at penalty_max_s
        (episode(0) + episode(1000) + episode(2000) + episode(3000), 3020.0, 3020.0 + 900.0, 4),
        # flapping on while held extends the hold at the same level
        (episode(0, 5, 30.0), 120.0, 120.0 + 120.0, 1),
        # decay: one level forgotten per 1800 quiet seconds after the hold ended
        (episode(0), 140.0 + 1800.0, None, 0),
        (episode(0) + episode(1000), 1260.0 + 1799.0, None, 2),
        (episode(0) + episode(1000), 1260.0 + 1800.0, None, 1),
        (episode(0) + episode(1000) + episode(1260.0 + 1800.0), 3080.0, 3080.0 + 240.0, 2),
        # spread out changes never add up to more than K per window
        ([0.0, 400.0, 800.0, 1200.0, 1600.0], 1600.0, None, 0),
    ],
    ids=[
        "K-not-exceeded",
        "held",
        "released",
        "second-episode-doubles",
        "third-quadruples",
        "capped",
        "flapping-while-held",
        "decayed",
        "not-yet-decayed",
        "one-level-decayed",
        "after-decay-grows-from-there",
        "slow-changes",
    ],
)
def test_flap_damping_growth_and_decay(
    times: list[float], now: float, held_until: float | None, level: int
) -> None:
    state = balance.damping(times, now, DAMP)
    assert state.held_until == (pytest.approx(held_until) if held_until is not None else None)
    assert state.level == level
    assert state.held(now) is (held_until is not None)


def test_damping_is_the_same_for_every_node() -> None:
    # the replay depends on the log only: order of reading does not matter
    times = episode(0) + episode(1000)
    assert balance.damping(times, 1100.0, DAMP) == balance.damping(times[::-1], 1100.0, DAMP)
    assert balance.damping(times, 1100.0, DampingPolicy()) == balance.DampState()  # off
    assert DAMP.horizon_s > DAMP.window_s + DAMP.penalty_max_s


def test_damped_site_is_held_down_and_shown() -> None:
    damped = SiteState(Health.UP, damped=True, damped_until=2000.0)
    d = run(GB, REGIONAL, states={"uk": damped})
    assert d.sites == ("fra",)
    assert "uk 0 km damped" in next(line for line in d.trace if line.startswith("candidates"))
    # precedence: override > damping > observed
    assert not damped.usable
    assert SiteState(Health.UP, Override.UP, damped=True).usable
    assert not SiteState(Health.UP, Override.DOWN, damped=False).usable
    # all candidates damped or down: fail open (damping is not an operator's drain)
    states = {n: damped for n in SITES}
    d = run(GB, REGIONAL, states=states)
    assert d.sites == ("uk",) and any(line.startswith("fail-open") for line in d.trace)


# -- TTL under change ------------------------------------------------------------------


def test_ttl_under_change() -> None:
    pool = Pool("web", REGIONAL.members, REGIONAL.rules, ttl_under_change_s=10)
    assert run(GB, pool).ttl_cap_s is None
    changing = {"iad": SiteState(Health.UP, changing=True)}
    d = run(GB, pool, states=changing)
    assert d.ttl_cap_s == 10  # any member of the pool changing: the pool's answers
    assert run(GB, REGIONAL, states=changing).ttl_cap_s is None  # not configured
