"""Write small MaxMind DB files for tests and benchmarks (with PyPI mmdb-writer).

The City-schema files are read the same way by geodns and by gdnsd's geoip plugin, so one
generated database can drive both servers in a side-by-side benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

Record = dict[str, Any]


def city_record(country: str, continent: str, lat: float, lon: float) -> Record:
    """A record in MaxMind's City schema (GeoIP2-City, GeoLite2-City, DB-IP City Lite)."""
    return {
        "country": {"iso_code": country},
        "continent": {"code": continent},
        "location": {"latitude": lat, "longitude": lon},
    }


# The default test database. 203.0.113.0/24 (TEST-NET-3) has no record at all, so an
# address there is unlocatable; so is everything not listed.
DEFAULT_ENTRIES: list[tuple[str, Record]] = [
    ("212.58.224.0/24", city_record("GB", "EU", 51.5, -0.13)),  # London
    ("81.169.145.0/24", city_record("DE", "EU", 52.52, 13.40)),  # Berlin
    ("8.8.8.0/24", city_record("US", "NA", 38.9, -77.0)),  # Washington
    ("1.0.0.0/24", city_record("AU", "OC", -33.87, 151.21)),  # Sydney
    ("2a02:2e0::/32", city_record("DE", "EU", 52.52, 13.40)),
    ("2001:4860::/32", city_record("US", "NA", 38.9, -77.0)),
    ("2a00:1450::/32", city_record("GB", "EU", 51.5, -0.13)),
]


def write_test_mmdb(
    path: str | Path,
    entries: list[tuple[str, Record]],
    database_type: str = "GeoIP2-City",
) -> Path:
    """Write an IPv6 database (IPv4 networks in ::/96) mapping each CIDR to its record."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type)
    for cidr, record in entries:
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return Path(path)


def write_default_test_mmdb(path: str | Path) -> Path:
    """Write DEFAULT_ENTRIES as a City-schema database."""
    return write_test_mmdb(path, DEFAULT_ENTRIES)


def write_flat_test_mmdb(path: str | Path, entries: list[tuple[str, Record]]) -> Path:
    """Write a database in the flat ip-location-db schema: records like {"country_code": "GB"}."""
    return write_test_mmdb(path, entries, database_type="country")
