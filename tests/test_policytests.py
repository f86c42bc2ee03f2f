"""Policy tests (zones/<origin>.tests.toml) run with the production decision code."""

from __future__ import annotations

from pathlib import Path

import pytest

from geodns import geo, pick
from geodns.config import load_config
from geodns.errors import ZoneError
from geodns.policytests import country_locations, failures, load_cases, run_cases
from geodns.view import GeoState
from geodns.zones import parse_zone

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    cfg = load_config(REPO / "geodns.toml")
    zone = parse_zone(REPO / "zones" / "example.com.zone", cfg.pools)
    countries = geo.CountryTable.load()
    locator = geo.Locator(REPO / "data" / "dbip-country.mmdb", countries)
    state = GeoState(cfg.sites, cfg.pools, {})
    return zone, state, locator, country_locations(countries.get)


def run(world, tmp_path: Path, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    zone, state, locator, point = world
    path = tmp_path / "example.com.tests.toml"
    path.write_text(text)
    cases = load_cases(path, "example.com.")
    return failures(run_cases(zone, cases, state, pick.decide, locator.locate, point))


def test_passing_cases(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = """
[[case]]
client = "212.58.224.1"
name = "www"
expect_site = "uk"
[[case]]
country = "DE"
name = "www"
expect_site = "fra"
[[case]]
client = "212.58.224.1"
name = "www"
down = ["uk"]
expect_site = "fra"
[[case]]
country = "US"
name = "www"
type = "AAAA"
expect_site = "uk"
[[case]]
client = "212.58.224.1"
name = "www"
drained = ["uk", "fra", "iad"]
expect = "zone"
"""
    assert run(world, tmp_path, text) == []


def test_failing_case_names_file_case_and_what_happened(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = '[[case]]\ncountry = "DE"\nname = "www"\nexpect_site = "uk"\n'
    problems = run(world, tmp_path, text)
    assert len(problems) == 1
    assert (
        "example.com.tests.toml: case[0]: www.example.com. A: expected uk, got fra" in (problems[0])
    )


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[[case]]\nname = "www"\nexpect_site = "uk"\n', "give exactly one of client or country"),
        ('[[case]]\ncountry = "DE"\nname = "www"\n', "needs expect_site"),
        ('[[case]]\ncountry = "DE"\nname = "www"\nexpect_site = "uk"\nsite = 1\n', "unknown key"),
        ('[[case]]\nclient = "nope"\nname = "www"\nexpect_site = "uk"\n', "case[0].client"),
        ('[[case]]\ncountry = "DE"\ntype = "MX"\nexpect_site = "uk"\n', "case[0].type"),
    ],
    ids=["no-client", "no-expectation", "unknown-key", "bad-ip", "bad-type"],
)
def test_bad_tests_file(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "example.com.tests.toml"
    path.write_text(text)
    with pytest.raises(ZoneError) as err:
        load_cases(path, "example.com.")
    assert any(expect in p for p in err.value.problems), err.value.problems


def test_ip_cases_do_not_block_when_asked(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    zone, state, locator, point = world
    path = tmp_path / "t.tests.toml"
    path.write_text('[[case]]\nclient = "212.58.224.1"\nname = "www"\nexpect_site = "fra"\n')
    results = run_cases(
        zone, load_cases(path, "example.com."), state, pick.decide, locator.locate, point
    )
    assert failures(results, ip_cases_block=True)
    assert failures(results, ip_cases_block=False) == []


def test_server_refuses_an_edit_whose_policy_tests_fail(tmp_path: Path) -> None:
    import time

    import dns.edns
    import dns.message
    import dns.query

    from tests.serverutil import make_zone_dir, run_server, write_config

    zone = (REPO / "zones" / "example.com.zone").read_text()
    make_zone_dir(
        tmp_path,
        {
            "example.com.zone": zone,
            "example.com.geo.toml": '[names.www]\npool = "web"\n',
            "example.com.tests.toml": '[[case]]\ncountry = "DE"\nname = "www"\n'
            'expect_site = "fra"\n',
        },
    )
    body = """
[sites.uk]
ipv4 = ["198.51.100.10"]
city = "London"
country = "GB"
[sites.fra]
ipv4 = ["198.51.100.20"]
city = "Frankfurt am Main"
country = "DE"
[sites.iad]
ipv4 = ["198.51.100.30"]
lat = 39.04
lon = -77.49
[pools.web]
members = ["uk", "fra", "iad"]
[pools.us]
members = ["iad"]
"""
    cfg = write_config(tmp_path, body)
    cfg.write_text(cfg.read_text().replace("[zones]", "[zones]\ndebounce_s = 0.05"))

    def de() -> set[str]:
        q = dns.message.make_query(
            "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("81.169.145.0", 24)]
        )
        r = dns.query.udp(q, "127.0.0.1", port=s.port, timeout=3)
        return {rd.address for rr in r.answer for rd in rr}

    with run_server(load_config(cfg)) as s:
        assert de() == {"198.51.100.20"}
        (tmp_path / "zones" / "example.com.geo.toml").write_text('[names.www]\npool = "us"\n')
        status = s.app.zone_status["example.com."]
        deadline = time.monotonic() + 10
        while status.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status.error is not None
        assert "case[0]: www.example.com. A: expected fra, got iad" in status.error
        assert de() == {"198.51.100.20"}  # the last good version keeps serving

        def wait(cond):  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + 10
            while not cond() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert cond()

        # fixing the tests file alone (the zone's files untouched) lets the held-back
        # edit in: the watcher sees *.tests.toml too
        tests = tmp_path / "zones" / "example.com.tests.toml"
        tests.write_text('[[case]]\ncountry = "DE"\nname = "www"\nexpect_site = "iad"\n')
        wait(lambda: status.error is None)
        assert de() == {"198.51.100.30"}
        # a tests file the serving zone fails is reported at once, the zone keeps serving
        tests.write_text('[[case]]\ncountry = "DE"\nname = "www"\nexpect_site = "uk"\n')
        wait(lambda: status.error is not None)
        assert "expected uk, got iad" in (status.error or "")
        assert de() == {"198.51.100.30"}
        # and so is a tests file that does not parse
        tests.write_text("[[case]]\ncountry = \n")
        wait(lambda: "expected uk" not in (status.error or ""))
        assert status.error is not None and "example.com.tests.toml" in status.error
        assert de() == {"198.51.100.30"}


def test_geoip_update_breaking_ip_cases_is_reported_not_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.mmdb_util import city_record, write_test_mmdb
    from tests.serverutil import make_zone_dir, run_server, write_config

    gb = city_record("GB", "EU", 51.5, -0.13)
    de = city_record("DE", "EU", 52.5, 13.4)
    db = write_test_mmdb(tmp_path / "a.mmdb", [("45.0.0.0/24", gb)])
    zone = (REPO / "zones" / "example.com.zone").read_text()
    make_zone_dir(
        tmp_path,
        {
            "example.com.zone": zone,
            "example.com.geo.toml": '[names.www]\npool = "web"\n',
            "example.com.tests.toml": '[[case]]\nclient = "45.0.0.1"\nname = "www"\n'
            'expect_site = "uk"\n',
        },
    )
    body = f"""
[geoip]
database = "{db}"
[sites.uk]
ipv4 = ["198.51.100.10"]
city = "London"
country = "GB"
[sites.fra]
ipv4 = ["198.51.100.20"]
city = "Frankfurt am Main"
country = "DE"
[pools.web]
members = ["uk", "fra"]
"""
    with run_server(load_config(write_config(tmp_path, body))) as s:
        assert s.app.zone_status["example.com."].error is None
        assert s.app._policy_report() == []
        write_test_mmdb(tmp_path / "b.mmdb", [("45.0.0.0/24", de)])
        s.app.handler.locate = geo.Locator(tmp_path / "b.mmdb", geo.CountryTable.load()).locate
        problems = s.app._policy_report()
        assert len(problems) == 1 and "expected uk, got fra" in problems[0]
        assert "breaks a policy test" in caplog.text
        assert s.app.zone_status["example.com."].error is None  # still serving, not blocked
