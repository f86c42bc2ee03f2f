"""geodns.geo: locating addresses in both database schemas, caching, reload, tables."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from geodns.geo import (
    DATA_DIR,
    CityTable,
    CountryTable,
    GeoIPError,
    Locator,
    distance_km,
    is_special,
    special_block,
)
from tests.mmdb_util import (
    Record,
    city_record,
    write_default_test_mmdb,
    write_flat_test_mmdb,
    write_test_mmdb,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.fixture(scope="module")
def countries() -> CountryTable:
    return CountryTable.load()


@pytest.fixture(scope="module")
def cities() -> CityTable:
    return CityTable.load()


@pytest.fixture
def city_db(tmp_path: Path, countries: CountryTable) -> Locator:
    return Locator(write_default_test_mmdb(tmp_path / "city.mmdb"), countries)


FLAT_ENTRIES: list[tuple[str, Record]] = [
    ("212.58.224.0/24", {"country_code": "GB"}),
    ("8.8.8.0/24", {"country_code": "US", "latitude": 37.75, "longitude": -97.82}),
    ("1.0.0.0/24", {"country_code": "AU", "continent_code": "OC"}),
    ("2a02:2e0::/32", {"country_code": "de"}),
    ("5.0.0.0/16", {"registered_country": {"iso_code": "FR"}}),  # City schema fallback
    ("6.0.0.0/16", {"country_code": "ZZ"}),  # "unknown" in some databases
]


@pytest.fixture
def flat_db(tmp_path: Path, countries: CountryTable) -> Locator:
    return Locator(write_flat_test_mmdb(tmp_path / "flat.mmdb", FLAT_ENTRIES), countries)


@pytest.mark.parametrize(
    ("addr", "network", "country", "continent", "lat", "lon"),
    [
        ("212.58.224.1", "212.58.224.0/24", "GB", "EU", 51.5, -0.13),
        ("81.169.145.200", "81.169.145.0/24", "DE", "EU", 52.52, 13.40),
        ("8.8.8.8", "8.8.8.0/24", "US", "NA", 38.9, -77.0),
        ("1.0.0.1", "1.0.0.0/24", "AU", "OC", -33.87, 151.21),
        ("2a02:2e0:3fe::1", "2a02:2e0::/32", "DE", "EU", 52.52, 13.40),
        ("2001:4860:4860::8888", "2001:4860::/32", "US", "NA", 38.9, -77.0),
        ("2a00:1450:4001::1", "2a00:1450::/32", "GB", "EU", 51.5, -0.13),
        ("::ffff:212.58.224.1", "::ffff:212.58.224.0/120", "GB", "EU", 51.5, -0.13),
    ],
    ids=["gb-v4", "de-v4", "us-v4", "au-v4", "de-v6", "us-v6", "gb-v6", "gb-v4-mapped"],
)
def test_locate_city_schema(
    city_db: Locator,
    addr: str,
    network: str,
    country: str,
    continent: str,
    lat: float,
    lon: float,
) -> None:
    loc = city_db.locate(ip(addr))
    assert (loc.network, loc.country, loc.continent) == (net(network), country, continent)
    assert (loc.lat, loc.lon) == pytest.approx((lat, lon))


@pytest.mark.parametrize(
    ("addr", "country", "continent", "point"),
    [
        # continent and point from data/countries.csv
        ("212.58.224.1", "GB", "EU", "table"),
        # the database's own coordinates win over the table's
        ("8.8.8.8", "US", "NA", (37.75, -97.82)),
        ("1.0.0.1", "AU", "OC", "table"),
        ("2a02:2e0::1", "DE", "EU", "table"),
        ("5.0.1.1", "FR", "EU", "table"),
        ("6.0.1.1", None, None, None),
    ],
    ids=["country-only", "own-coordinates", "own-continent", "v6-lowercase", "registered", "zz"],
)
def test_locate_flat_schema(
    flat_db: Locator,
    countries: CountryTable,
    addr: str,
    country: str | None,
    continent: str | None,
    point: object,
) -> None:
    loc = flat_db.locate(ip(addr))
    assert (loc.country, loc.continent) == (country, continent)
    if point == "table":
        info = countries.get(country or "")
        assert info is not None
        assert (loc.lat, loc.lon) == (info.lat, info.lon)
    elif point is None:
        assert (loc.lat, loc.lon) == (None, None)
    else:
        assert (loc.lat, loc.lon) == pytest.approx(point)


@pytest.mark.parametrize(
    "addr",
    ["203.0.113.7", "9.9.9.9", "10.1.2.3", "2a03:2880::1", "::1", "::ffff:203.0.113.7"],
    ids=["no-record", "not-listed", "private", "v6-not-listed", "v6-loopback", "v4-mapped"],
)
def test_unlocatable_has_network_and_nothing_else(city_db: Locator, addr: str) -> None:
    loc = city_db.locate(ip(addr))
    assert ip(addr) in loc.network
    assert loc.network.version == ip(addr).version
    assert (loc.country, loc.continent, loc.lat, loc.lon) == (None, None, None, None)


@pytest.mark.parametrize(
    ("cidr", "addr"),
    [
        ("100.20.0.0/14", "100.21.2.3"),
        ("100.30.40.0/24", "100.30.40.99"),
        ("100.40.50.64/27", "100.40.50.70"),
        ("100.50.60.70/32", "100.50.60.70"),
        ("2a05:100::/29", "2a05:103::1"),
        ("2a05:200:1:2::/64", "2a05:200:1:2::99"),
        ("2a05:300::1/128", "2a05:300::1"),
    ],
    ids=["v4-14", "v4-24", "v4-27", "v4-32", "v6-29", "v6-64", "v6-128"],
)
def test_network_is_the_database_network(
    tmp_path: Path, countries: CountryTable, cidr: str, addr: str
) -> None:
    # IPv4 prefix lengths are IPv4 ones (/14), not their place in the IPv6 tree (/110)
    path = write_test_mmdb(tmp_path / "n.mmdb", [(cidr, city_record("NL", "EU", 52.37, 4.9))])
    loc = Locator(path, countries).locate(ip(addr))
    assert loc.network == net(cidr)
    assert loc.country == "NL"


CACHE_ENTRIES: list[tuple[str, Record]] = [
    ("5.5.5.0/28", {"country_code": "FR"}),
    ("5.5.5.16/28", {"country_code": "IT"}),
    ("5.6.0.0/16", {"country_code": "ES"}),
    ("2a01:1::/64", {"country_code": "FR"}),
    ("2a01:1:0:1::/64", {"country_code": "IT"}),
    ("2a01:2::/32", {"country_code": "ES"}),
]


@pytest.mark.parametrize("cache_size", [65536, 1], ids=["default", "evicting"])
def test_cache_keeps_networks_apart(
    tmp_path: Path, countries: CountryTable, cache_size: int
) -> None:
    path = write_flat_test_mmdb(tmp_path / "c.mmdb", CACHE_ENTRIES)
    locator = Locator(path, countries, cache_size=cache_size)
    expected = [
        ("5.5.5.1", "FR", "5.5.5.0/28"),
        ("5.5.5.17", "IT", "5.5.5.16/28"),  # same /24, other network: not a cache hit
        ("5.5.5.2", "FR", "5.5.5.0/28"),
        ("5.5.5.100", None, "5.5.5.64/26"),
        ("5.6.7.8", "ES", "5.6.0.0/16"),
        ("5.6.7.9", "ES", "5.6.0.0/16"),  # same /24 as the last one: a cache hit
        ("2a01:1::5", "FR", "2a01:1::/64"),
        ("2a01:1:0:1::5", "IT", "2a01:1:0:1::/64"),  # same /48, other network
        ("2a01:2:3::1", "ES", "2a01:2::/32"),
        ("2a01:2:3::2", "ES", "2a01:2::/32"),
    ]
    for _ in range(2):  # second round answers from the cache (or after evictions)
        got = [
            (a, locator.locate(ip(a)).country, str(locator.locate(ip(a)).network))
            for a, *_ in expected
        ]
        assert got == expected


def test_cache_shares_answer_within_short_network(flat_db: Locator) -> None:
    first = flat_db.locate(ip("212.58.224.1"))
    assert flat_db.locate(ip("212.58.224.200")) is first
    assert flat_db.locate(ip("8.8.8.8")) is not first


def _replace(path: Path, content: bytes | list[tuple[str, Record]]) -> None:
    """Write a new file next to `path` and rename it over `path`, as deployments do."""
    tmp = path.with_suffix(".tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        write_test_mmdb(tmp, content)
    os.replace(tmp, path)


def test_reopen_if_changed_swaps_database(tmp_path: Path, countries: CountryTable) -> None:
    path = write_test_mmdb(tmp_path / "db.mmdb", [("7.0.0.0/8", city_record("GB", "EU", 51.5, 0))])
    locator = Locator(path, countries)
    assert locator.locate(ip("7.1.1.1")).country == "GB"
    assert locator.reopen_if_changed() is False

    _replace(path, [("7.0.0.0/8", city_record("FR", "EU", 48.86, 2.35))])
    assert locator.reopen_if_changed() is True
    assert locator.locate(ip("7.1.1.1")).country == "FR"  # cache emptied
    assert locator.reopen_if_changed() is False


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_reopen_keeps_old_database_when_new_one_is_broken(
    tmp_path: Path, countries: CountryTable, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_test_mmdb(tmp_path / "db.mmdb", [("7.0.0.0/8", city_record("GB", "EU", 51.5, 0))])
    good = path.read_bytes()
    locator = Locator(path, countries)
    broken = {
        "garbage": b"not a maxmind db" * 100,
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }

    _replace(path, broken[damage])
    with caplog.at_level(logging.ERROR, logger="geodns.geo"):
        assert locator.reopen_if_changed() is False
        assert locator.reopen_if_changed() is False  # the same bad file is reported once
    assert len(caplog.records) == 1
    assert locator.locate(ip("7.1.1.1")).country == "GB"

    _replace(path, [("7.0.0.0/8", city_record("DE", "EU", 52.52, 13.4))])
    assert locator.reopen_if_changed() is True
    assert locator.locate(ip("7.1.1.1")).country == "DE"


def test_reopen_survives_missing_file(tmp_path: Path, countries: CountryTable) -> None:
    locator = Locator(write_default_test_mmdb(tmp_path / "db.mmdb"), countries)
    os.unlink(locator.path)
    assert locator.reopen_if_changed() is False
    assert locator.locate(ip("8.8.8.8")).country == "US"


def test_open_failure_is_a_geoip_error(tmp_path: Path, countries: CountryTable) -> None:
    with pytest.raises(GeoIPError, match=r"missing\.mmdb"):
        Locator(tmp_path / "missing.mmdb", countries)


def test_ipv6_address_in_ipv4_only_database(tmp_path: Path, countries: CountryTable) -> None:
    writer = MMDBWriter(ip_version=4, database_type="country")
    writer.insert_network(IPSet(["7.0.0.0/8"]), {"country_code": "GB"})
    writer.to_db_file(str(tmp_path / "v4.mmdb"))
    locator = Locator(tmp_path / "v4.mmdb", countries)
    assert locator.locate(ip("7.1.1.1")).network == net("7.0.0.0/8")
    assert locator.locate(ip("2a02:2e0::1")).network == net("::/0")


@pytest.mark.parametrize(
    ("addr", "country", "continent"),
    [
        ("8.8.8.8", "US", "NA"),
        ("212.58.224.1", "GB", "EU"),
        ("81.169.145.1", "DE", "EU"),
        ("2a02:2e0:3fe::1", "DE", "EU"),
    ],
    ids=["google-dns", "bbc", "strato", "strato-v6"],
)
def test_shipped_database(countries: CountryTable, addr: str, country: str, continent: str) -> None:
    locator = Locator(DATA_DIR / "dbip-country.mmdb", countries)
    loc = locator.locate(ip(addr))
    assert (loc.country, loc.continent) == (country, continent)
    assert loc.lat is not None and loc.lon is not None
    assert ip(addr) in loc.network
    assert locator.build_epoch > 1_600_000_000
    locator.close()


def test_country_table(countries: CountryTable) -> None:
    gb = countries.get("gb")
    assert gb is not None and gb.continent == "EU" and gb.name == "United Kingdom"
    assert gb.lat is not None and gb.lon is not None
    assert 49.9 <= gb.lat <= 60.9 and -8.2 <= gb.lon <= 1.8  # inside Great Britain
    assert countries.get("XX") is None
    assert len(countries) >= 240


@pytest.mark.parametrize(
    ("city", "country", "lat", "lon"),
    [
        ("London", "GB", 51.51, -0.13),
        ("london", "gb", 51.51, -0.13),
        ("London", "CA", 42.98, -81.23),
        ("Frankfurt am Main", "DE", 50.12, 8.68),
        ("Frankfurt", "DE", 50.12, 8.68),
        ("Zurich", "CH", 47.37, 8.55),
        ("São Paulo", "BR", -23.55, -46.64),
        ("Sao Paulo", "BR", -23.55, -46.64),
    ],
    ids=[
        "london",
        "case",
        "london-ontario",
        "frankfurt-full",
        "frankfurt-short",
        "accents",
        "sao-paulo",
        "sao-paulo-ascii",
    ],
)
def test_city_table_finds(
    cities: CityTable, city: str, country: str, lat: float, lon: float
) -> None:
    assert cities.find(city, country) == pytest.approx((lat, lon), abs=0.01)


@pytest.mark.parametrize(
    ("city", "country"),
    [("Atlantis", "GR"), ("London", "XX"), ("", "GB"), ("Frank", "DE")],
    ids=["unknown-city", "unknown-country", "empty", "partial-word"],
)
def test_city_table_misses(cities: CityTable, city: str, country: str) -> None:
    assert cities.find(city, country) is None


@pytest.mark.parametrize(
    ("addr", "block"),
    [
        ("10.1.2.3", "10.0.0.0/8"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("172.20.0.1", "172.16.0.0/12"),
        ("100.64.1.1", "100.64.0.0/10"),
        ("127.0.0.1", "127.0.0.0/8"),
        ("169.254.1.1", "169.254.0.0/16"),
        ("0.0.0.0", "0.0.0.0/8"),
        ("192.0.2.1", "192.0.2.0/24"),
        ("224.0.0.251", "224.0.0.0/4"),
        ("255.255.255.255", "240.0.0.0/4"),
        ("fe80::1", "fe80::/10"),
        ("fc00::1", "fc00::/7"),
        ("fd12:3456::1", "fc00::/7"),
        ("::1", "::1/128"),
        ("::", "::/128"),
        ("2001:db8::1", "2001:db8::/32"),
        ("ff02::1", "ff00::/8"),
        ("::ffff:10.1.2.3", "::ffff:10.0.0.0/104"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("100.128.0.1", None),
        ("2001:4860::1", None),
        ("2a02:2e0::1", None),
        ("::ffff:8.8.8.8", None),
    ],
    ids=lambda v: str(v),
)
def test_special_blocks(addr: str, block: str | None) -> None:
    assert special_block(ip(addr)) == (None if block is None else net(block))
    assert is_special(ip(addr)) is (block is not None)


@pytest.mark.parametrize(
    ("a", "b", "km", "tolerance"),
    [
        ((51.5074, -0.1278), (50.1109, 8.6821), 637.0, 10.0),  # London - Frankfurt
        ((51.5, -0.13), (51.5, -0.13), 0.0, 1e-9),
        ((0.0, 0.0), (0.0, 180.0), 20015.1, 1.0),  # half the circumference
        ((10.0, 179.5), (10.0, -179.5), 109.5, 1.0),  # across the antimeridian
    ],
    ids=["london-frankfurt", "same-point", "antipodes", "antimeridian"],
)
def test_distance_km(
    a: tuple[float, float], b: tuple[float, float], km: float, tolerance: float
) -> None:
    assert distance_km(*a, *b) == pytest.approx(km, abs=tolerance)
