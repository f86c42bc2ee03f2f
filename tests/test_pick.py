"""geodns.pick: the pure geo policy (sites + ECS scope), as tables."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geodns.model import (
    Decision,
    Health,
    IPAddress,
    Location,
    Override,
    Pool,
    Rule,
    Site,
    SiteState,
)
from geodns.pick import _distance_km, compile_pool, decide

SITES: dict[str, Site] = {
    "uk": Site("uk", ("192.0.2.1",), ("2001:db8:1::1",), lat=51.5, lon=-0.13),
    "fra": Site("fra", ("192.0.2.2",), ("2001:db8:2::1",), lat=50.11, lon=8.68),
    "iad": Site("iad", ("192.0.2.3",), (), lat=38.9, lon=-77.0),
    "syd": Site("syd", ("192.0.2.4",), (), lat=-33.87, lon=151.21),
}
POOL = Pool("web", ("uk", "fra", "iad", "syd"))

UP = SiteState(Health.UP)
DOWN = SiteState(Health.DOWN)
DRAINED = SiteState(Health.UP, Override.DOWN)


def loc(
    network: str,
    country: str | None = None,
    continent: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
) -> Location:
    return Location(ipaddress.ip_network(network), country, continent, lat, lon)


# client address, its GeoIP location
GB = ("212.58.224.10", loc("212.58.224.0/24", "GB", "EU", 51.5, -0.13))
DE = ("5.9.1.1", loc("5.9.0.0/16", "DE", "EU", 52.52, 13.40))  # Berlin
US = ("8.8.8.8", loc("8.8.8.0/24", "US", "NA", 40.71, -74.01))  # New York
AU = ("1.130.0.1", loc("1.128.0.0/11", "AU", "OC", -37.81, 144.96))  # Melbourne
GB6 = ("2a00:1450::1", loc("2a00:1450::/32", "GB", "EU", 51.5, -0.13))
US6 = ("2600:1f18::1", loc("2600:1f18::/36", "US", "NA", 40.71, -74.01))


def run(
    client: tuple[str, Location | None],
    *,
    pool: Pool = POOL,
    sites: Mapping[str, Site] = SITES,
    states: Mapping[str, SiteState] | None = None,
    family: int = 4,
    count: int = 1,
    all_down: str = "open",
) -> Decision:
    address: IPAddress = ipaddress.ip_address(client[0])
    return decide(pool, sites, states or {}, address, client[1], family, count, all_down)


def test_distance_km_known_pairs() -> None:
    assert _distance_km(51.5, -0.13, 50.11, 8.68) == pytest.approx(638, abs=5)
    assert _distance_km(51.5, -0.13, 40.71, -74.01) == pytest.approx(5570, abs=15)
    assert _distance_km(10.0, 20.0, 10.0, 20.0) == 0.0
    assert _distance_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(20015.1, abs=1)


@pytest.mark.parametrize(
    ("client", "family", "expected"),
    [
        (GB, 4, ("uk",)),
        (DE, 4, ("fra",)),
        (US, 4, ("iad",)),
        (AU, 4, ("syd",)),
        # iad and syd have no IPv6: the nearest member that has one answers AAAA
        (US, 6, ("uk",)),
        (AU, 6, ("fra",)),
        (GB6, 6, ("uk",)),
        (US6, 4, ("iad",)),
    ],
    ids=["GB-uk", "DE-fra", "US-iad", "AU-syd", "US-AAAA-uk", "AU-AAAA-fra", "GB6", "US6-A"],
)
def test_nearest_site(client: tuple[str, Location], family: int, expected: tuple[str]) -> None:
    d = run(client, family=family)
    assert d.sites == expected
    assert d.rule == "nearest"
    assert not d.use_zone_record


def test_distance_tie_broken_by_name() -> None:
    sites = {
        "west": Site("west", ("192.0.2.1",), lat=0.0, lon=-10.0),
        "east": Site("east", ("192.0.2.2",), lat=0.0, lon=10.0),
    }
    client = ("198.51.100.1", loc("198.51.100.0/24", "GH", "AF", 0.0, 0.0))
    for members in (("west", "east"), ("east", "west")):
        d = run(client, pool=Pool("p", members), sites=sites, count=2)
        assert d.sites == ("east", "west")


@pytest.mark.parametrize(
    ("client", "states", "expected"),
    [
        (GB, {"uk": DOWN}, ("fra",)),
        (GB, {"uk": DRAINED}, ("fra",)),
        (GB, {"uk": DOWN, "fra": DOWN}, ("iad",)),
        (DE, {"fra": SiteState(Health.DOWN, Override.UP)}, ("fra",)),
        (GB, {"uk": SiteState(Health.UNKNOWN)}, ("uk",)),
        (US, {"iad": DOWN, "uk": DRAINED}, ("fra",)),
    ],
    ids=[
        "uk-down-GB-fra",
        "uk-drained-GB-fra",
        "uk-fra-down-GB-iad",
        "forced-up-beats-check",
        "unknown-counts-as-up",
        "US-skips-down-and-drained",
    ],
)
def test_health(
    client: tuple[str, Location], states: dict[str, SiteState], expected: tuple[str]
) -> None:
    assert run(client, states=states).sites == expected


def test_all_sites_down_answers_nearest() -> None:
    states = dict.fromkeys(SITES, DOWN)
    d = run(GB, states=states)
    assert d.sites == ("uk",)
    assert not d.use_zone_record
    assert "fail-open: all candidates observed DOWN, ignoring checks" in d.trace


def test_all_sites_down_with_all_down_empty_answers_nodata() -> None:
    d = run(GB, states=dict.fromkeys(SITES, DOWN), all_down="empty")
    assert d.sites == ()
    assert not d.use_zone_record


@pytest.mark.parametrize("all_down", ["open", "empty"])
def test_all_sites_drained_answers_zone_record(all_down: str) -> None:
    d = run(GB, states=dict.fromkeys(SITES, DRAINED), all_down=all_down)
    assert d.sites == ()
    assert d.use_zone_record


def test_fail_open_never_answers_a_drained_site() -> None:
    states = {"uk": DRAINED, "fra": DOWN, "iad": DOWN, "syd": DOWN}
    d = run(GB, states=states, count=2)
    assert d.sites == ("fra", "iad")
    assert any(line.startswith("fail-open") for line in d.trace)


def test_address_level_checks_count_per_family() -> None:
    # every IPv4 address of uk failed its own check; its IPv6 address did not
    states = {"uk": SiteState(Health.UP, address_down=frozenset({"192.0.2.1"}))}
    assert run(GB, states=states, family=4).sites == ("fra",)
    assert run(GB, states=states, family=6).sites == ("uk",)


@pytest.mark.parametrize(
    "client",
    [GB, US, AU, GB6, ("192.0.2.200", None)],
    ids=["GB", "US", "AU", "GB6", "unlocatable"],
)
@pytest.mark.parametrize(
    "states",
    [{}, dict.fromkeys(SITES, DOWN), dict.fromkeys(SITES, DRAINED)],
    ids=["up", "down", "drained"],
)
def test_pool_without_family_is_nodata_for_everyone(
    client: tuple[str, Location | None], states: dict[str, SiteState]
) -> None:
    # RFC 7871 §7.4: never NODATA for some networks and an answer for others.
    pool = Pool("v4only", ("iad", "syd"))
    d = run(client, pool=pool, states=states, family=6)
    assert (d.sites, d.scope, d.use_zone_record) == ((), 0, False)


@pytest.mark.parametrize(
    ("client", "pool", "expected_sites", "expected_zone", "expected_rule"),
    [
        (("192.0.2.200", None), POOL, (), True, None),
        (("192.0.2.200", loc("192.0.2.0/24", "GB", "EU")), POOL, (), True, None),
        (
            ("192.0.2.200", None),
            Pool("p", POOL.members, default=("fra", "uk")),
            ("fra",),
            False,
            "default",
        ),
        (
            GB,
            Pool("p", POOL.members, fallback="default", default=("iad",)),
            ("iad",),
            False,
            "default",
        ),
        # a country rule needs no coordinates
        (
            ("192.0.2.200", loc("192.0.2.0/24", "GB", "EU")),
            Pool("p", POOL.members, (Rule("country", "GB", ("fra",)),)),
            ("fra",),
            False,
            "country GB",
        ),
    ],
    ids=["no-location", "no-coordinates", "default-list", "fallback-default", "country-rule"],
)
def test_unlocatable_client(
    client: tuple[str, Location | None],
    pool: Pool,
    expected_sites: tuple[str, ...],
    expected_zone: bool,
    expected_rule: str | None,
) -> None:
    d = run(client, pool=pool)
    assert d.sites == expected_sites
    assert d.use_zone_record is expected_zone
    assert d.rule == expected_rule


def test_unlocatable_client_gets_zone_record_even_when_all_down() -> None:
    d = run(("192.0.2.200", None), states=dict.fromkeys(SITES, DOWN))
    assert d.use_zone_record
    assert d.sites == ()


def test_default_list_exhausted_spills_to_other_members() -> None:
    pool = Pool("p", POOL.members, fallback="default", default=("iad",))
    d = run(GB, pool=pool, states={"iad": DOWN})
    assert d.sites == ("uk",)  # nearest of the others
    assert d.rule == "members"
    # unlocated: the others in pool order
    d = run(("192.0.2.200", None), pool=pool, states={"iad": DOWN})
    assert d.sites == ("uk",)


RULES = (
    Rule("cidr", "10.0.0.0/8", ("iad",)),
    Rule("cidr", "10.1.0.0/16", ("syd",)),
    Rule("cidr", "212.58.0.0/16", ("syd",)),
    Rule("cidr", "2001:db8::/32", ("syd",)),
    Rule("country", "GB", ("fra", "uk")),
    Rule("country", "DE", ("syd", "iad")),
    Rule("continent", "NA", ("syd",)),
    Rule("continent", "EU", ("iad",)),
)


@pytest.mark.parametrize(
    ("rules", "client", "expected_sites", "expected_rule"),
    [
        ((RULES[4],), GB, ("fra",), "country GB"),
        ((RULES[7],), GB, ("iad",), "continent EU"),
        ((RULES[4], RULES[7]), GB, ("fra",), "country GB"),
        ((RULES[7], RULES[4]), GB, ("fra",), "country GB"),
        (
            (RULES[4], RULES[7]),
            ("81.0.0.1", loc("81.0.0.0/16", "FR", "EU", 48.86, 2.35)),
            ("iad",),
            "continent EU",
        ),
        (RULES[2:], GB, ("syd",), "cidr 212.58.0.0/16"),
        ((RULES[6],), US, ("syd",), "continent NA"),
        ((Rule("country", "gb", ("fra",)),), GB, ("fra",), "country GB"),
        # a cidr rule of the other family never matches
        ((RULES[3],), GB, ("uk",), "nearest"),
        (
            (RULES[3],),
            ("2001:db8::5", loc("2001:db8::/48", "GB", "EU", 51.5, -0.13)),
            ("syd",),
            "cidr 2001:db8::/32",
        ),
        ((RULES[4],), DE, ("fra",), "nearest"),
    ],
    ids=[
        "country-beats-nearest",
        "continent",
        "country-beats-continent",
        "country-beats-continent-any-order",
        "continent-when-no-country-rule",
        "cidr-beats-country",
        "continent-NA",
        "country-code-case",
        "v6-rule-ignored-for-v4",
        "v6-rule",
        "no-rule-matches",
    ],
)
def test_rules(
    rules: tuple[Rule, ...],
    client: tuple[str, Location],
    expected_sites: tuple[str],
    expected_rule: str,
) -> None:
    family = 6 if ":" in client[0] else 4
    sites = dict(SITES)
    sites["syd"] = Site("syd", ("192.0.2.4",), ("2001:db8:4::1",), lat=-33.87, lon=151.21)
    d = run(client, pool=Pool("p", POOL.members, rules), sites=sites, family=family)
    assert d.sites == expected_sites
    assert d.rule == expected_rule


def test_rule_sites_down_fall_back_to_nearest() -> None:
    pool = Pool("p", POOL.members, (RULES[4],))
    d = run(GB, pool=pool, states={"fra": DOWN})
    assert d.sites == ("uk",)
    assert d.rule == "country GB"
    d = run(GB, pool=pool, states={"fra": DOWN, "uk": DOWN})
    assert d.sites == ("iad",)
    assert d.rule == "nearest"


def test_rule_without_family_falls_back() -> None:
    # the DE rule names only IPv4-only sites: AAAA goes to the nearest with IPv6
    pool = Pool("p", POOL.members, (RULES[5],))
    assert run(DE, pool=pool, family=4).sites == ("syd",)
    d = run(DE, pool=pool, family=6)
    assert (d.sites, d.rule) == (("fra",), "nearest")


def test_fail_open_keeps_rule_order() -> None:
    pool = Pool("p", POOL.members, (RULES[4],))
    d = run(GB, pool=pool, states=dict.fromkeys(SITES, DOWN))
    assert d.sites == ("fra",)
    assert d.rule == "country GB"


OVERLAP = Pool(
    "p",
    POOL.members,
    (Rule("cidr", "10.0.0.0/8", ("iad",)), Rule("cidr", "10.1.0.0/16", ("syd",))),
)


@pytest.mark.parametrize(
    ("client", "geo_network", "expected_sites", "expected_scope"),
    [
        ("10.1.2.3", "10.0.0.0/8", ("syd",), 16),
        ("10.1.2.3", "10.1.2.0/24", ("syd",), 24),
        # 10.0/16 would cover 10.1/16: /16 is the shortest that keeps it apart
        ("10.0.0.1", "10.0.0.0/8", ("iad",), 16),
        # 10.2.0.0/15 (10.2-10.3) is already disjoint from 10.1/16
        ("10.2.0.1", "10.0.0.0/8", ("iad",), 15),
        ("10.128.0.1", "10.0.0.0/8", ("iad",), 9),
        # a geo network wider than the rule: the rule's prefix is the unit
        ("10.1.2.3", "8.0.0.0/6", ("syd",), 16),
        # outside both rules, in a geo network that covers 10/8
        ("11.0.0.1", "8.0.0.0/6", ("iad",), 8),
        ("9.0.0.1", "8.0.0.0/6", ("iad",), 7),
        # a geo network that does not hold the client bounds nothing
        ("12.0.0.1", "8.0.0.0/6", ("iad",), 32),
    ],
)
def test_overlapping_cidr_rules_and_scope(
    client: str, geo_network: str, expected_sites: tuple[str], expected_scope: int
) -> None:
    d = run((client, loc(geo_network, "US", "NA", 40.71, -74.01)), pool=OVERLAP)
    assert d.sites == expected_sites
    assert d.scope == expected_scope


@pytest.mark.parametrize(
    ("client", "family", "expected_scope"),
    [
        (GB, 4, 24),
        (AU, 4, 11),
        (GB6, 6, 32),
        (US6, 6, 36),
        (("192.0.2.200", None), 4, 32),
        (("2001:db8::1", None), 6, 128),
        # a location of the other family says nothing about this prefix
        (("2001:db8::1", loc("192.0.2.0/24", "GB", "EU", 51.5, -0.13)), 6, 128),
    ],
    ids=["GB", "AU", "GB6", "US6", "v4-unlocatable", "v6-unlocatable", "other-family-location"],
)
def test_scope_is_geo_network(
    client: tuple[str, Location | None], family: int, expected_scope: int
) -> None:
    assert run(client, family=family).scope == expected_scope


def test_scope_does_not_depend_on_health() -> None:
    for states in ({}, {"uk": DOWN}, dict.fromkeys(SITES, DOWN), dict.fromkeys(SITES, DRAINED)):
        assert run(GB, states=states).scope == 24


@pytest.mark.parametrize(
    ("client", "family", "count", "pool", "expected"),
    [
        (GB, 4, 2, POOL, ("uk", "fra")),
        (GB, 4, 3, POOL, ("uk", "fra", "iad")),
        (GB, 4, 9, POOL, ("uk", "fra", "iad", "syd")),
        (US, 6, 2, POOL, ("uk", "fra")),
        (US, 6, 3, POOL, ("uk", "fra")),
        (
            GB,
            4,
            2,
            Pool("p", POOL.members, (Rule("country", "GB", ("syd", "iad", "syd")),)),
            ("syd", "iad"),
        ),
        (GB, 4, 3, Pool("p", POOL.members, (Rule("country", "GB", ("syd",)),)), ("syd",)),
    ],
    ids=[
        "two",
        "three",
        "more-than-members",
        "AAAA-two",
        "AAAA-only-two-have-v6",
        "rule-order",
        "rule-limits",
    ],
)
def test_count(
    client: tuple[str, Location], family: int, count: int, pool: Pool, expected: tuple[str, ...]
) -> None:
    d = run(client, pool=pool, family=family, count=count)
    assert d.sites == expected
    assert len(set(d.sites)) == len(d.sites)


def test_count_skips_down_sites() -> None:
    assert run(GB, states={"fra": DOWN}, count=2).sites == ("uk", "iad")


def test_deterministic_and_compiled_pool_is_equivalent() -> None:
    pool = Pool("p", POOL.members, RULES)
    compiled = compile_pool(pool)
    for client in (GB, DE, US, AU):
        first = run(client, pool=pool, count=2)
        assert all(run(client, pool=pool, count=2) == first for _ in range(3))
        assert run(client, pool=dataclasses.replace(pool), count=2) == first  # equal, not same
        address = ipaddress.ip_address(client[0])
        assert decide(compiled, SITES, {}, address, client[1], 4, 2) == first


def test_trace_explains_the_decision() -> None:
    pool = Pool("p", POOL.members, (RULES[4],))
    d = run(GB, pool=pool, states={"iad": DOWN})
    assert d.trace[0] == (
        "located: country=GB continent=EU lat=51.5 lon=-0.13 network=212.58.224.0/24"
    )
    assert d.trace[1].startswith("candidates: uk 0 km up; fra 638 km up; iad ")
    assert "iad 5" in d.trace[1] and " km down;" in d.trace[1]
    assert "rule: country GB -> fra, uk" in d.trace
    assert "chosen: fra" in d.trace
    assert d.trace[-1] == "scope: /24 (geo network)"


def test_compile_pool_rejects_bad_rules() -> None:
    with pytest.raises(ValueError):
        compile_pool(Pool("p", ("uk",), (Rule("asn", "AS1", ("uk",)),)))
    with pytest.raises(ValueError):
        compile_pool(Pool("p", ("uk",), (Rule("cidr", "10.0.0.300/8", ("uk",)),)))


# --- property: the answered prefix is homogeneous -------------------------------------

_PROPERTY_SITES = tuple(SITES)


@st.composite
def _cidr_rules(draw: st.DrawFn) -> tuple[Rule, ...]:
    # networks clustered in 10.0.0.0/8 so that they nest and overlap often
    n = draw(st.integers(0, 6))
    rules = []
    for _ in range(n):
        plen = draw(st.integers(4, 32))
        addr = (10 << 24) | draw(st.integers(0, 2**24 - 1))
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        rules.append(Rule("cidr", str(net), (draw(st.sampled_from(_PROPERTY_SITES)),)))
    return tuple(rules)


_clients = st.one_of(
    st.integers(10 << 24, (11 << 24) - 1),  # inside the rules' region
    st.integers(0, 2**32 - 1),
).map(ipaddress.IPv4Address)


@settings(max_examples=300, deadline=None)
@given(
    rules=_cidr_rules(),
    client=_clients,
    geo_plen=st.one_of(st.none(), st.integers(0, 32)),
    offsets=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
)
def test_scope_prefix_is_homogeneous(
    rules: tuple[Rule, ...],
    client: ipaddress.IPv4Address,
    geo_plen: int | None,
    offsets: list[int],
) -> None:
    pool = Pool("p", POOL.members, rules)
    if geo_plen is None:
        location = None
    else:
        geo = ipaddress.IPv4Network((int(client), geo_plen), strict=False)
        location = Location(geo, "US", "NA", 40.71, -74.01)
    d = decide(pool, SITES, {}, client, location, 4)
    assert 0 <= d.scope <= 32
    if location is not None:
        assert d.scope >= location.network.prefixlen
    answered = ipaddress.IPv4Network((int(client), d.scope), strict=False)

    # RFC 7871 §7.2.1: client/scope lies wholly inside or wholly outside every rule
    for rule in rules:
        net = ipaddress.IPv4Network(rule.match)
        assert answered.subnet_of(net) or not answered.overlaps(net), (rule, answered)

    # every address of client/scope is decided the same way, with the same scope
    size = answered.num_addresses
    base = int(answered.network_address)
    samples = [base, base + size - 1, *(base + o % size for o in offsets)]
    for value in samples:
        other = ipaddress.IPv4Address(value)
        d2 = decide(pool, SITES, {}, other, location, 4)
        assert (d2.sites, d2.rule, d2.scope) == (d.sites, d.rule, d.scope), other
