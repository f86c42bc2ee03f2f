"""GeoIP: where a client address is, which special-purpose block it is in, how far apart.

The only module that imports maxminddb. `Locator.locate()` is on the query path; it is a
dict lookup on a cache hit and one `maxminddb` tree walk on a miss. Country and city tables
(`data/countries.csv`, `data/cities.csv`, derived from GeoNames by data/derive_countries.py)
fill in what a country-only database lacks and let an operator place a site by city name.
"""

from __future__ import annotations

import csv
import ipaddress
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maxminddb

from geodns.errors import GeoDNSError
from geodns.model import IPAddress, IPNetwork, Location

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius

# Cache granularity: a database network this short or shorter contains the whole /24 (/48)
# around the address, so every address of that /24 (/48) shares its answer.
_V4_BLOCK_BITS = 24
_V6_BLOCK_BITS = 48
_V6_KEY_TAG = 1 << 48  # keeps IPv6 block keys apart from IPv4 block keys (< 2**24)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class GeoIPError(GeoDNSError):
    """A GeoIP database or table cannot be read."""


@dataclass(frozen=True, slots=True)
class CountryInfo:
    """One country: ISO 3166 code, continent code, representative point, English name."""

    iso: str
    continent: str
    lat: float | None
    lon: float | None
    name: str


class CountryTable:
    """ISO country code -> CountryInfo (continent and a population-weighted point)."""

    def __init__(self, countries: Mapping[str, CountryInfo]) -> None:
        self._countries = {iso.upper(): info for iso, info in countries.items()}

    @classmethod
    def load(cls, path: str | Path = DATA_DIR / "countries.csv") -> CountryTable:
        """Read `iso,continent,lat,lon,name` rows; raise GeoIPError naming every bad line."""
        countries: dict[str, CountryInfo] = {}
        problems: list[str] = []
        for line, row in _read_csv(path, ("iso", "continent", "lat", "lon", "name")):
            try:
                lat, lon = _optional_float(row["lat"]), _optional_float(row["lon"])
            except ValueError as exc:
                problems.append(f"{path}:{line}: {exc}")
                continue
            iso = row["iso"].strip().upper()
            countries[iso] = CountryInfo(iso, row["continent"].strip(), lat, lon, row["name"])
        if problems:
            raise GeoIPError("\n".join(problems))
        return cls(countries)

    def get(self, iso: str) -> CountryInfo | None:
        """The country with this ISO 3166-1 alpha-2 code (any case), or None."""
        return self._countries.get(iso.upper())

    def __len__(self) -> int:
        return len(self._countries)

    def codes(self) -> list[str]:
        """Every country code with coordinates, sorted."""
        return sorted(c for c, info in self._countries.items() if info.lat is not None)


CityRow = tuple[str, str, float, float, int]  # name, country, lat, lon, population


class CityTable:
    """City name + country -> coordinates, for placing a site by "London, GB"."""

    def __init__(self, rows: Iterable[CityRow]) -> None:
        by_country: dict[str, list[tuple[str, float, float, int]]] = {}
        for name, country, lat, lon, population in rows:
            entry = (normalize_name(name), lat, lon, population)
            by_country.setdefault(country.strip().upper(), []).append(entry)
        # most populous first, so the first match is the one to take
        for entries in by_country.values():
            entries.sort(key=lambda e: -e[3])
        self._by_country = by_country

    @classmethod
    def load(cls, path: str | Path = DATA_DIR / "cities.csv") -> CityTable:
        """Read `name,country,lat,lon,population` rows; raise GeoIPError naming bad lines."""
        rows: list[CityRow] = []
        problems: list[str] = []
        for line, row in _read_csv(path, ("name", "country", "lat", "lon", "population")):
            try:
                lat, lon, population = float(row["lat"]), float(row["lon"]), int(row["population"])
            except ValueError as exc:
                problems.append(f"{path}:{line}: {exc}")
                continue
            rows.append((row["name"], row["country"], lat, lon, population))
        if problems:
            raise GeoIPError("\n".join(problems))
        return cls(rows)

    def find(self, city: str, country: str) -> tuple[float, float] | None:
        """(lat, lon) of the most populous matching city of `country`, or None.

        Names match ignoring case, accents and punctuation ("zurich" finds Zürich). With no
        exact match, a name that starts with the given words counts ("Frankfurt" finds
        "Frankfurt am Main"), since GeoNames uses the long official names.
        """
        wanted = normalize_name(city)
        rows = self._by_country.get(country.strip().upper(), [])
        if not wanted:
            return None
        match = next((e for e in rows if e[0] == wanted), None) or next(
            (e for e in rows if e[0].startswith(wanted + " ")), None
        )
        return None if match is None else (match[1], match[2])


# Letters NFKD does not decompose into a base letter plus accents.
_FOLD = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "ı": "i"})


def normalize_name(name: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a place name."""
    text = unicodedata.normalize("NFKD", name.casefold().translate(_FOLD))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.sub(r"[^0-9a-z]+", " ", text).strip()


@dataclass(slots=True)
class _Generation:
    """One open database and the cache of its answers; replaced as a whole on reload."""

    reader: maxminddb.Reader
    signature: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    blocks: dict[int, Location] = field(default_factory=dict)
    addrs: dict[IPAddress, Location] = field(default_factory=dict)


class Locator:
    """Client address -> Location, from a MaxMind DB file (City or flat country schema).

    Cache: an answer whose database network is /24 or shorter (IPv6: /48) is stored once
    for its whole /24 (/48), keyed by the address's top 24 (48) bits; a longer network is
    stored per address. Each of the two maps holds at most `cache_size` entries and is
    emptied when full: refilling costs one tree walk per entry, and unlike an LRU it needs
    no bookkeeping on the hit path.
    """

    def __init__(self, path: str | Path, countries: CountryTable, cache_size: int = 65536) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._path = Path(path)
        self._countries = countries
        self._cache_size = cache_size
        try:
            self._gen = _open_generation(self._path)
        except Exception as exc:  # maxminddb raises several unrelated exception types
            raise GeoIPError(f"{self._path}: cannot open GeoIP database: {exc}") from exc
        self._rejected: tuple[int, int, int, int] | None = None

    @property
    def path(self) -> Path:
        """The database file this locator reads (and watches)."""
        return self._path

    @property
    def database_type(self) -> str:
        """The database's own type name, e.g. "GeoIP2-City" or "country"."""
        return str(self._gen.reader.metadata().database_type)

    @property
    def build_epoch(self) -> int:
        """When the database was built, in seconds since the Unix epoch."""
        return int(self._gen.reader.metadata().build_epoch)

    def locate(self, addr: IPAddress) -> Location:
        """Where `addr` is; `network` is the database network holding it (always set)."""
        gen = self._gen  # one read: a concurrent reload cannot mix two databases
        if isinstance(addr, ipaddress.IPv4Address):
            key, block_bits = int(addr) >> (32 - _V4_BLOCK_BITS), _V4_BLOCK_BITS
        else:
            mapped = addr.ipv4_mapped
            if mapped is not None:
                return _as_mapped(self.locate(mapped))
            key, block_bits = _V6_KEY_TAG | (int(addr) >> (128 - _V6_BLOCK_BITS)), _V6_BLOCK_BITS
        found = gen.blocks.get(key) or gen.addrs.get(addr)
        if found is not None:
            return found
        loc = self._lookup(gen.reader, addr)
        if loc.network.prefixlen <= block_bits:
            _store(gen.blocks, key, loc, self._cache_size)
        else:
            _store(gen.addrs, addr, loc, self._cache_size)
        return loc

    def reopen_if_changed(self) -> bool:
        """Load the file again if it changed on disk; True if a new database is now in use.

        A file that fails to open or to answer one lookup is logged once and ignored: the
        old database keeps serving until a good file appears.
        """
        try:
            signature = _signature(self._path)
        except OSError as exc:
            log.warning("geoip: cannot stat %s: %s; keeping the loaded database", self._path, exc)
            return False
        if signature in (self._gen.signature, self._rejected):
            return False
        try:
            gen = _open_generation(self._path)
        except Exception as exc:  # whatever is wrong with the file, keep serving
            self._rejected = signature
            log.error("geoip: reload of %s failed, keeping the old database: %s", self._path, exc)
            return False
        # The old reader is not closed: a locate() running in another thread may still use
        # it; it is closed when the last reference goes.
        self._gen = gen
        self._rejected = None
        log.info("geoip: loaded %s type=%s build_epoch=%d", self._path, *_describe(gen))
        return True

    def close(self) -> None:
        """Release the database file."""
        self._gen.reader.close()

    def _lookup(self, reader: maxminddb.Reader, addr: IPAddress) -> Location:
        """One tree walk, turned into a Location (cache miss path)."""
        try:
            record, prefix_len = reader.get_with_prefix_len(addr)
        except ValueError:
            # IPv6 address in an IPv4-only database: it says nothing about any IPv6 address
            return Location(network=ipaddress.IPv6Network("::/0"))
        # maxminddb gives IPv4 prefix lengths for IPv4 addresses even in an IPv6 database
        # (it starts the walk at the ::/96 node); clamp in case a database is odd
        prefix_len = max(0, min(prefix_len, addr.max_prefixlen))
        network: IPNetwork
        if isinstance(addr, ipaddress.IPv4Address):
            network = ipaddress.IPv4Network((addr, prefix_len), strict=False)
        else:
            network = ipaddress.IPv6Network((addr, prefix_len), strict=False)
        return self._location(network, record)

    def _location(self, network: IPNetwork, record: object) -> Location:
        """Read either schema; fill a missing continent or point from the country table."""
        if not isinstance(record, dict):
            return Location(network=network)
        country = (
            _country_code(_nested(record, "country", "iso_code"))
            or _country_code(_nested(record, "registered_country", "iso_code"))
            or _country_code(record.get("country_code"))
        )
        continent = (
            _continent_code(_nested(record, "continent", "code"))
            or _continent_code(record.get("continent_code"))
            or _continent_code(record.get("continent"))
        )
        lat, lon = _point(
            _nested(record, "location", "latitude"), _nested(record, "location", "longitude")
        )
        if lat is None:
            lat, lon = _point(record.get("latitude"), record.get("longitude"))
        info = self._countries.get(country) if country else None
        if info is not None:
            continent = continent or info.continent or None
            if lat is None:
                lat, lon = info.lat, info.lon
        return Location(network=network, country=country, continent=continent, lat=lat, lon=lon)


def _open_generation(path: Path) -> _Generation:
    """Open and check a database: metadata readable and one lookup answered."""
    signature = _signature(path)
    reader = maxminddb.open_database(str(path), maxminddb.MODE_AUTO)
    try:
        reader.get("1.1.1.1")  # walks the tree and decodes data: catches truncated files
    except Exception:
        reader.close()
        raise
    return _Generation(reader=reader, signature=signature)


def _signature(path: Path) -> tuple[int, int, int, int]:
    """What identifies one version of a file: device, inode, size, mtime."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _describe(gen: _Generation) -> tuple[str, int]:
    meta = gen.reader.metadata()
    return str(meta.database_type), int(meta.build_epoch)


def _store(cache: dict[Any, Location], key: Any, loc: Location, limit: int) -> None:
    if len(cache) >= limit:
        cache.clear()
    cache[key] = loc


def _as_mapped(loc: Location) -> Location:
    """An IPv4 answer restated for the IPv4-mapped IPv6 address (::ffff:a.b.c.d)."""
    net = loc.network
    mapped = ipaddress.IPv6Network(
        (int(_IPV4_MAPPED.network_address) | int(net.network_address), 96 + net.prefixlen)
    )
    return Location(mapped, loc.country, loc.continent, loc.lat, loc.lon)


def _nested(record: dict[str, Any], outer: str, inner: str) -> Any:
    value = record.get(outer)
    return value.get(inner) if isinstance(value, dict) else None


def _country_code(value: Any) -> str | None:
    # "ZZ" is the user-assigned code several databases use for "unknown"
    if isinstance(value, str) and len(value) == 2 and value.isalpha() and value.upper() != "ZZ":
        return value.upper()
    return None


def _continent_code(value: Any) -> str | None:
    if isinstance(value, str) and value.upper() in {"AF", "AN", "AS", "EU", "NA", "OC", "SA"}:
        return value.upper()
    return None


def _point(lat: Any, lon: Any) -> tuple[float | None, float | None]:
    """Both coordinates if both are numbers in range, else neither."""
    numbers = isinstance(lat, int | float) and isinstance(lon, int | float)
    if numbers and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0:
        return float(lat), float(lon)
    return None, None


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _read_csv(path: str | Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header naming at least `columns`, with line numbers."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise GeoIPError(f"{path}:1: missing columns {', '.join(missing)}")
            return [(reader.line_num, row) for row in reader]
    except OSError as exc:
        raise GeoIPError(f"{path}: {exc}") from exc


# Special-purpose blocks (IANA IPv4/IPv6 Special-Purpose Address Registries, RFC 6890 and
# later): every block whose "Globally Reachable" is False or N/A, plus multicast and the
# reserved 240/4. An ECS address in one of them says nothing about where the client is.
#
# RFC 7871 §10: "if an Authoritative Nameserver on the publicly routed Internet receives a
# query that specifies an ADDRESS in [RFC1918] or [RFC4193] private address space, it
# SHOULD ignore ADDRESS and look up its answer based on the address of the Recursive
# Resolver. In the response it SHOULD set SCOPE PREFIX-LENGTH to cover all of the relevant
# private space." §11.3: "They SHOULD at least treat unroutable addresses, such as some of
# the address blocks defined in [RFC6890], as equivalent to the Recursive Resolver's own
# identity."
#
# An explicit table rather than `ipaddress.is_global`: the stdlib's table changes between
# patch releases (3.11.7 calls all of 2001::/23 private and 100.64.0.0/10 neither private
# nor global, and does not know 3fff::/20), and special_block() needs the block anyway.
# 192.0.0.0/24 and 2001::/23 are taken whole although a few anycast service addresses in
# them are globally reachable: those are servers, never a client's subnet.
_SPECIAL_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private use, RFC 1918
    "100.64.0.0/10",  # shared address space (carrier-grade NAT), RFC 6598
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link local
    "172.16.0.0/12",  # private use, RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation, TEST-NET-1
    "192.88.99.0/24",  # deprecated 6to4 relay anycast, RFC 7526
    "192.168.0.0/16",  # private use, RFC 1918
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation, TEST-NET-2
    "203.0.113.0/24",  # documentation, TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255 limited broadcast
)
_SPECIAL_V6 = (
    "::/128",  # unspecified
    "::1/128",  # loopback
    "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation, RFC 8215
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments (Teredo, benchmarking, ORCHID, ...)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation, RFC 9637
    "5f00::/16",  # segment routing SIDs, RFC 9602
    "fc00::/7",  # unique local, RFC 4193
    "fe80::/10",  # link local
    "fec0::/10",  # deprecated site local, RFC 3879
    "ff00::/8",  # multicast
)


def _block_table(blocks: tuple[str, ...]) -> tuple[tuple[int, int, IPNetwork], ...]:
    nets = [ipaddress.ip_network(b) for b in blocks]
    return tuple((int(n.network_address), int(n.netmask), n) for n in nets)


_SPECIAL = {4: _block_table(_SPECIAL_V4), 6: _block_table(_SPECIAL_V6)}


def special_block(addr: IPAddress) -> IPNetwork | None:
    """The special-purpose block holding `addr` (10.0.0.0/8, fc00::/7, ...), or None.

    An IPv4-mapped address (::ffff:10.1.2.3) is judged by its IPv4 address and gets the
    mapped block (::ffff:10.0.0.0/104).
    """
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        block = special_block(addr.ipv4_mapped)
        if block is None:
            return None
        start = int(_IPV4_MAPPED.network_address) | int(block.network_address)
        return ipaddress.IPv6Network((start, 96 + block.prefixlen))
    value = int(addr)
    for start, mask, network in _SPECIAL[addr.version]:
        if value & mask == start:
            return network
    return None


def is_special(addr: IPAddress) -> bool:
    """True if `addr` is not globally reachable (private, loopback, documentation, ...)."""
    return special_block(addr) is not None


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two points in degrees (haversine, mean Earth radius)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlmb = phi2 - phi1, math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
