"""explain(): the server's own decision for one question, step by step.

Built from the shipped example (geodns.toml sites uk/fra/iad, zones/example.com.*, the
shipped DB-IP country database), so the expectations are the README's: GB -> uk,
DE -> fra, US -> iad.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from geodns import cli, geo, pick
from geodns.config import Config, load_config
from geodns.explain import ExplainError, explain, format_explain, parse_ecs, parse_qtype
from geodns.model import Health, Override, SiteState
from geodns.reload import ZoneReloader
from geodns.view import Catalog, GeoState, View, next_version
from tests.serverutil import EXAMPLE_SITES, REPO, write_config

SITES = EXAMPLE_SITES


def example_dir(tmp: Path, extra: str = "") -> Path:
    """tmp/geodns.toml + tmp/zones/example.com.{zone,geo.toml} like the shipped example."""
    zones = tmp / "zones"
    zones.mkdir(exist_ok=True)
    for name in ("example.com.zone", "example.com.geo.toml"):
        shutil.copy(REPO / "zones" / name, zones / name)
    return write_config(tmp, '[api]\nlisten = ""\n' + SITES + extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Catalog, geo.Locator]:
    tmp = tmp_path_factory.mktemp("explain")
    config = load_config(example_dir(tmp))
    catalog = Catalog()
    ZoneReloader(
        config.resolve(config.zones.directory), catalog, {}, lambda: config.pools, watch=False
    ).initial_load()
    locator = geo.Locator(config.geoip.database, geo.CountryTable.load(config.geoip.countries))
    return config, catalog, locator


def view_of(
    world: tuple[Config, Catalog, geo.Locator], states: dict[str, SiteState] | None = None
) -> View:
    config, catalog, _ = world
    return View(catalog, GeoState(config.sites, config.pools, states or {}, next_version()))


@pytest.mark.parametrize(
    ("client", "qtype", "ecs", "site", "scope", "located_by"),
    [
        ("212.58.224.1", "A", None, "uk", None, "source address"),
        ("127.0.0.1", "A", "212.58.224.0/24", "uk", 19, "ECS address"),
        ("127.0.0.1", "A", "81.169.145.0/24", "fra", 17, "ECS address"),
        ("127.0.0.1", "A", "8.8.8.0/24", "iad", None, "ECS address"),
        # iad has no IPv6: a US client asking AAAA goes to the nearest site with IPv6
        ("127.0.0.1", "AAAA", "8.8.8.0/24", "uk", None, "ECS address"),
        # RFC 7871 §11.3: a private ECS address locates by the source (GB) instead
        ("212.58.224.1", "A", "10.1.0.0/16", "uk", 8, "special-purpose"),
    ],
    ids=["gb-source", "gb-ecs", "de-ecs", "us-ecs", "us-aaaa-no-v6", "private-ecs"],
)
def test_steered_answers(
    world: tuple[Config, Catalog, geo.Locator],
    client: str,
    qtype: str,
    ecs: str | None,
    site: str,
    scope: int | None,
    located_by: str,
) -> None:
    r = explain(view_of(world), world[2], pick.decide, client, "www.example.com", qtype, ecs)
    assert r["outcome"] == f"steered: {site}"
    assert [c["site"] for c in r["chosen"]] == [site]
    assert located_by in r["located_by"]
    assert r["zone"] == "example.com."
    assert r["geo_name"]["pool"] == "web"
    if scope is not None:
        assert r["ecs_scope"] == scope
    if ecs is None:
        assert r["ecs_scope"] is None  # no ECS in the question, none in the answer
    # every member is a candidate, nearest first, with the health decide() judged
    assert {c["site"] for c in r["candidates"]} == {"uk", "fra", "iad"}
    distances = [c["distance_km"] for c in r["candidates"]]
    assert distances == sorted(distances)
    assert r["trace"][0].startswith("located:")


def test_cname_to_a_geo_name_is_followed(world: tuple[Config, Catalog, geo.Locator]) -> None:
    # zones/example.com.zone: api CNAME www, and www is steered
    r = explain(view_of(world), world[2], pick.decide, "212.58.224.1", "api.example.com")
    assert r["cname_chain"] == ["www.example.com."]
    assert r["geo_name"]["owner"] == "www.example.com."
    assert r["outcome"] == "steered: uk"
    assert "CNAME to:" in format_explain(r)


def test_located_as_names_country_continent_point_and_network(
    world: tuple[Config, Catalog, geo.Locator],
) -> None:
    r = explain(view_of(world), world[2], pick.decide, "212.58.224.1", "www.example.com")
    loc = r["located_as"]
    assert (loc["country"], loc["continent"]) == ("GB", "EU")
    assert loc["network"] == "212.58.224.0/19"
    assert loc["lat"] is not None and loc["lon"] is not None
    assert r["chosen"] == [{"site": "uk", "addresses": ["198.51.100.10", "198.51.100.11"]}]
    assert r["rule"] == "nearest" and r["rules_considered"] == "none matches"


def test_drained_site_is_shown_and_skipped(world: tuple[Config, Catalog, geo.Locator]) -> None:
    states = {"uk": SiteState(Health.UP, Override.DOWN)}
    r = explain(view_of(world, states), world[2], pick.decide, "212.58.224.1", "www.example.com")
    assert r["outcome"] == "steered: fra"
    uk = next(c for c in r["candidates"] if c["site"] == "uk")
    assert (uk["health"], uk["override"], uk["chosen"]) == ("drained", "down", False)


def test_observed_down_site_is_shown_down(world: tuple[Config, Catalog, geo.Locator]) -> None:
    states = {"uk": SiteState(Health.DOWN)}
    r = explain(view_of(world, states), world[2], pick.decide, "212.58.224.1", "www.example.com")
    uk = next(c for c in r["candidates"] if c["site"] == "uk")
    assert (uk["health"], uk["observed"]) == ("down", "down")
    assert r["outcome"] == "steered: fra"


def test_address_checked_down_is_left_out(world: tuple[Config, Catalog, geo.Locator]) -> None:
    states = {"uk": SiteState(Health.UP, address_down=frozenset({"198.51.100.10"}))}
    r = explain(view_of(world, states), world[2], pick.decide, "212.58.224.1", "www.example.com")
    assert r["chosen"] == [{"site": "uk", "addresses": ["198.51.100.11"]}]


def test_all_drained_answers_zone_record(world: tuple[Config, Catalog, geo.Locator]) -> None:
    states = {n: SiteState(Health.UP, Override.DOWN) for n in ("uk", "fra", "iad")}
    r = explain(view_of(world, states), world[2], pick.decide, "212.58.224.1", "www.example.com")
    assert r["outcome"] == "zone record: 192.0.2.80"
    assert r["chosen"] == []


def test_unlocatable_client_answers_zone_record(
    world: tuple[Config, Catalog, geo.Locator],
) -> None:
    r = explain(view_of(world), None, pick.decide, "212.58.224.1", "www.example.com")
    assert r["located_as"] is None
    assert r["outcome"] == "zone record: 192.0.2.80"


def test_ecs_source_zero_uses_source_and_scope_zero(
    world: tuple[Config, Catalog, geo.Locator],
) -> None:
    r = explain(
        view_of(world), world[2], pick.decide, "81.169.145.1", "www.example.com", "A", "0.0.0.0/0"
    )
    assert "opted out" in r["located_by"]
    assert r["outcome"] == "steered: fra"
    assert r["ecs_scope"] == 0  # RFC 7871 §7.1.2


@pytest.mark.parametrize(
    ("name", "qtype", "outcome"),
    [
        ("example.com", "MX", "static: not a geo-steered name"),
        ("www.example.com", "TXT", "static: type not steered"),
        ("www.example.org", "A", "REFUSED"),
    ],
    ids=["static-name", "static-type", "not-ours"],
)
def test_not_steered(
    world: tuple[Config, Catalog, geo.Locator], name: str, qtype: str, outcome: str
) -> None:
    r = explain(view_of(world), world[2], pick.decide, "212.58.224.1", name, qtype)
    assert r["outcome"].startswith(outcome)
    assert r["chosen"] == [] and r["candidates"] == []


def test_unloaded_zone_is_servfail(world: tuple[Config, Catalog, geo.Locator]) -> None:
    catalog = Catalog()
    catalog.set(b"\x07example\x03com\x00", None)
    view = View(catalog, view_of(world).geo)
    r = explain(view, world[2], pick.decide, "212.58.224.1", "www.example.com")
    assert r["outcome"].startswith("SERVFAIL")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"client_ip": "not-an-ip"}, "ip"),
        ({"qtype": "BOGUS"}, "type"),
        ({"ecs": "300.1.2.0/24"}, "ecs"),
        ({"name": "a..b"}, "name"),
    ],
    ids=["ip", "type", "ecs", "name"],
)
def test_bad_input_names_the_field(
    world: tuple[Config, Catalog, geo.Locator], kwargs: dict[str, str], field: str
) -> None:
    args = {"client_ip": "8.8.8.8", "name": "www.example.com", "qtype": "A", "ecs": None}
    args.update(kwargs)
    with pytest.raises(ExplainError) as info:
        explain(view_of(world), world[2], pick.decide, **args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_parse_helpers() -> None:
    assert parse_qtype("aaaa") == 28 and parse_qtype("TYPE65") == 65 and parse_qtype(1) == 1
    sub = parse_ecs("212.58.224.7/24")
    assert (sub.family, sub.source, sub.address, str(sub.ip)) == (
        1,
        24,
        bytes([212, 58, 224]),
        "212.58.224.0",
    )
    assert parse_ecs("2001:db8::/32").family == 2


def test_format_explain_is_readable(world: tuple[Config, Catalog, geo.Locator]) -> None:
    r = explain(
        view_of(world),
        world[2],
        pick.decide,
        "127.0.0.1",
        "www.example.com",
        "A",
        "212.58.224.0/24",
    )
    text = format_explain(r)
    assert "located as:  GB EU" in text
    assert "212.58.224.0/19" in text
    assert "<- chosen" in text
    assert "ECS scope:   /19" in text
    assert "steered: uk" in text


def test_cli_explain_offline_gb_goes_to_uk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = example_dir(tmp_path)
    rc = cli.main(["--config", str(cfg), "explain", "212.58.224.1", "www.example.com", "--offline"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "steered: uk" in out and "GB EU" in out


def test_cli_explain_offline_bad_ip_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = example_dir(tmp_path)
    rc = cli.main(["--config", str(cfg), "explain", "nope", "www.example.com", "--offline"])
    assert rc != 0
    assert "ip: 'nope' is not an IP address" in capsys.readouterr().err
