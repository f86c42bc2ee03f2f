"""Policy tests: `zones/<origin>.tests.toml` says where clients must be sent.

    [[case]]
    client = "212.58.224.1"        # or: country = "DE" (the country's representative point)
    name = "www"                   # relative to the zone, or absolute with a trailing dot
    type = "A"                     # A (default) or AAAA
    down = ["uk"]                  # sites to treat as observed DOWN for this case
    drained = []                   # sites to treat as drained (override DOWN)
    expect_site = "fra"            # or expect_sites = ["fra", "uk"], or expect = "zone"

Cases run through the production decision code (`pick.decide` on the view's sites,
pools and health, the client located by the server's locator), so `geodns check` and
the server's reload refuse an edit that would send clients somewhere unexpected before
it reaches a client. Cases located by IP depend on the GeoIP database: when a database
update makes them fail, the server reports it loudly instead of blocking (see
`run_cases(..., ip_cases_block=False)`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name

from .errors import ZoneError
from .model import Decision, Health, IPAddress, Location, Override, SiteState
from .view import GeoState
from .zones import AAAA, A, Zone, read_toml

TESTS_SUFFIX = ".tests.toml"
_KEYS = {
    "client",
    "country",
    "name",
    "type",
    "down",
    "drained",
    "expect_site",
    "expect_sites",
    "expect",
}


@dataclass(frozen=True)
class PolicyCase:
    where: str  # "file: case[i]"
    name: bytes  # lower-case wire owner
    name_text: str
    qtype: int
    client: IPAddress | None = None
    country: str | None = None
    down: tuple[str, ...] = ()
    drained: tuple[str, ...] = ()
    expect_sites: tuple[str, ...] | None = None  # expect_site is a 1-tuple
    expect_zone_record: bool = False


@dataclass(frozen=True)
class CaseResult:
    case: PolicyCase
    ok: bool
    message: str
    by_ip: bool


def tests_path_for(zone_path: Path) -> Path:
    """zones/example.com.zone -> zones/example.com.tests.toml"""
    return zone_path.with_name(zone_path.name[: -len(".zone")] + TESTS_SUFFIX)


def load_cases(path: Path, origin: str) -> list[PolicyCase]:
    """Parse a tests file; raise ZoneError listing every problem."""
    raw = read_toml(path)
    problems: list[str] = []
    for key in raw:
        if key != "case":
            problems.append(f"{path}: {key}: unknown key (allowed: case)")
    cases: list[PolicyCase] = []
    origin_name = dns.name.from_text(origin)
    raw_cases = raw.get("case", [])
    if not isinstance(raw_cases, list):
        raise ZoneError(str(path), [f"{path}: case: must be [[case]] tables"])
    for i, c in enumerate(raw_cases):
        where = f"{path}: case[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in c:
            if key not in _KEYS:
                problems.append(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(_KEYS))})")
        try:
            owner = dns.name.from_text(str(c.get("name", "@")), origin=origin_name)
            if str(c.get("name")) == "@":
                owner = origin_name
        except dns.exception.DNSException as exc:
            problems.append(f"{where}.name: {exc}")
            continue
        qtype_text = str(c.get("type", "A")).upper()
        if qtype_text not in ("A", "AAAA"):
            problems.append(f"{where}.type: {qtype_text!r} (allowed: A, AAAA)")
            continue
        client = None
        if "client" in c:
            try:
                client = ipaddress.ip_address(str(c["client"]))
            except ValueError as exc:
                problems.append(f"{where}.client: {exc}")
                continue
        country = str(c["country"]).upper() if "country" in c else None
        if (client is None) == (country is None):
            problems.append(f"{where}: give exactly one of client or country")
            continue
        expect_sites: tuple[str, ...] | None = None
        expect_zone = False
        if "expect_site" in c:
            expect_sites = (str(c["expect_site"]),)
        elif "expect_sites" in c and isinstance(c["expect_sites"], list):
            expect_sites = tuple(str(x) for x in c["expect_sites"])
        elif c.get("expect") == "zone":
            expect_zone = True
        else:
            problems.append(f'{where}: needs expect_site, expect_sites or expect = "zone"')
            continue
        wire = owner.to_wire()
        assert wire is not None
        cases.append(
            PolicyCase(
                where=where,
                name=wire.lower(),
                name_text=owner.to_text(),
                qtype=A if qtype_text == "A" else AAAA,
                client=client,
                country=country,
                down=tuple(str(x) for x in c.get("down", [])),
                drained=tuple(str(x) for x in c.get("drained", [])),
                expect_sites=expect_sites,
                expect_zone_record=expect_zone,
            )
        )
    if problems:
        raise ZoneError(str(path), problems)
    return cases


CountryPoint = Callable[[str], Location | None]
Decide = Callable[..., Decision]


def run_cases(
    zone: Zone,
    cases: list[PolicyCase],
    geo: GeoState,
    decide: Decide,
    locate: Callable[[IPAddress], Location] | None,
    country_point: CountryPoint,
    all_down: str | None = None,  # default: the pool's own all_down
) -> list[CaseResult]:
    """Run every case with the production decision function."""
    results: list[CaseResult] = []
    for case in cases:
        g = zone.geo.get(case.name)
        by_ip = case.client is not None
        if g is None:
            results.append(CaseResult(case, False, f"{case.name_text} is not geo-steered", by_ip))
            continue
        pool = geo.pools.get(g.pool)
        if pool is None:
            results.append(CaseResult(case, False, f"pool {g.pool!r} is not defined", by_ip))
            continue
        unknown = [s for s in (*case.down, *case.drained) if s not in geo.sites]
        if unknown:
            results.append(CaseResult(case, False, f"unknown site(s) {unknown}", by_ip))
            continue
        states: dict[str, SiteState] = dict(geo.states)
        for s in case.down:
            states[s] = SiteState(observed=Health.DOWN)
        for s in case.drained:
            states[s] = SiteState(override=Override.DOWN)
        if case.client is not None:
            if locate is None:
                results.append(CaseResult(case, True, "skipped: no GeoIP database", by_ip))
                continue
            client: IPAddress = case.client
            location: Location | None = locate(client)
        else:
            assert case.country is not None
            location = country_point(case.country)
            if location is None:
                results.append(CaseResult(case, False, f"unknown country {case.country}", by_ip))
                continue
            client = ipaddress.IPv4Address(0)
        family = 4 if case.qtype == A else 6
        mode = pool.all_down if all_down is None else all_down
        d = decide(pool, geo.sites, states, client, location, family, g.count, mode)
        if case.expect_zone_record:
            ok = d.use_zone_record
            got = "the zone record" if ok else (", ".join(d.sites) or "NODATA")
            want = "the zone record"
        else:
            assert case.expect_sites is not None
            ok = d.sites[: len(case.expect_sites)] == case.expect_sites
            got = ", ".join(d.sites) or ("the zone record" if d.use_zone_record else "NODATA")
            want = ", ".join(case.expect_sites)
        msg = "ok" if ok else f"expected {want}, got {got} ({d.rule or 'no rule'})"
        results.append(CaseResult(case, ok, msg, by_ip))
    return results


def failures(results: list[CaseResult], ip_cases_block: bool = True) -> list[str]:
    """`file: case[i]: message` for every failed case that should block the edit."""
    return [
        f"{r.case.where}: {r.case.name_text} {'AAAA' if r.case.qtype == AAAA else 'A'}: {r.message}"
        for r in results
        if not r.ok and (ip_cases_block or not r.by_ip)
    ]


def country_locations(
    table_get: Callable[[str], object | None],
) -> CountryPoint:
    """A country code -> its representative Location, from geo.CountryTable.get."""

    def point(code: str) -> Location | None:
        info = table_get(code)
        if info is None:
            return None
        lat = getattr(info, "lat", None)
        lon = getattr(info, "lon", None)
        return Location(
            network=ipaddress.ip_network("0.0.0.0/0"),
            country=code,
            continent=getattr(info, "continent", None),
            lat=lat,
            lon=lon,
        )

    return point


def make_validator(
    geo_state: Callable[[], GeoState],
    decide: Decide,
    locate: Callable[[], Callable[[IPAddress], Location] | None],
    country_point: CountryPoint,
) -> Callable[[Zone, Path], list[str]]:
    """The reload hook: a zone edit whose policy tests fail is rejected (last good serves).

    Cases run against the configured sites with every site healthy (plus each case's
    own `down`/`drained`), so live health never blocks an unrelated edit.
    """

    def validate(zone: Zone, path: Path) -> list[str]:
        tests = tests_path_for(path)
        if not tests.exists():
            return []
        try:
            cases = load_cases(tests, zone.origin_text)
        except ZoneError as exc:
            return exc.problems
        g = geo_state()
        healthy = GeoState(g.sites, g.pools, {})
        return failures(run_cases(zone, cases, healthy, decide, locate(), country_point))

    return validate
