"""`geodns check` and `geodns diff`: validate edits before they go live.

`check` loads the config, the health-check plan and every zone file (with its geo
overlay and policy tests) exactly as the server does, and prints every problem as
`file:line: message`. `--changed` limits the zone files to those changed according to
git (or, outside a repository, to files newer than the last successful check).

`diff OLD NEW` compares two zone directories (e.g. two git checkouts) and prints which
names change records and which countries would be sent to different sites.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import geo, pick
from .config import Config
from .errors import ConfigError, GeoDNSError, ZoneError
from .geoip_update import active_database
from .model import Pool, Site, SiteState
from .policytests import country_locations, failures, load_cases, run_cases, tests_path_for
from .view import GeoState
from .zones import GEO_SUFFIX, ZONE_SUFFIX, A, Zone, parse_zone, wire_to_text, zone_files

STAMP = "state/check.stamp"


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    zones: int = 0
    cases: int = 0


def _locator(config: Config) -> tuple[geo.Locator | None, geo.CountryTable | None, str | None]:
    try:
        countries = geo.CountryTable.load(config.geoip.countries)
        return geo.Locator(active_database(config.geoip), countries), countries, None
    except geo.GeoIPError as exc:
        return None, None, str(exc)


def changed_files(directory: Path, stamp: Path) -> list[Path] | None:
    """Zone files changed since HEAD (git) or since the last successful check (mtime)."""
    try:
        top = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        out = subprocess.run(
            [
                "git",
                "-C",
                top,
                "status",
                "--porcelain",
                "--untracked-files=all",
                "--",
                str(directory.resolve()),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        if not stamp.exists():
            return None  # no reference point: check everything
        since = stamp.stat().st_mtime
        return [p for p in zone_files(directory) if p.stat().st_mtime > since]
    paths: set[Path] = set()
    for line in out.splitlines():
        name = line[3:].split(" -> ")[-1].strip('"')
        p = Path(top) / name
        if name.endswith(GEO_SUFFIX):
            p = p.with_name(p.name[: -len(GEO_SUFFIX)] + ZONE_SUFFIX)
        elif name.endswith(".tests.toml"):
            p = p.with_name(p.name[: -len(".tests.toml")] + ZONE_SUFFIX)
        if p.name.endswith(ZONE_SUFFIX) and p.exists():
            paths.add(p)
    return sorted(paths)


def check(config: Config | None, paths: Iterable[Path], config_problems: list[str]) -> CheckResult:
    """Everything the server would reject, collected."""
    res = CheckResult(problems=list(config_problems))
    pools: Mapping[str, Pool] = config.pools if config is not None else {}
    locator = countries = None
    if config is not None:
        from .checker import plan_targets  # the checker's own validation of [sites.*.check]

        try:
            plan_targets(config.sites, config.site_checks)
        except ConfigError as exc:
            res.problems.extend(f"{config.path}: {p}" for p in exc.problems)
        locator, countries, err = _locator(config)
        if err:
            res.warnings.append(f"GeoIP unavailable, IP-based policy tests skipped: {err}")
    for path in paths:
        if not path.name.endswith(ZONE_SUFFIX):
            continue
        res.zones += 1
        try:
            zone = parse_zone(path, pools)
        except ZoneError as exc:
            res.problems.extend(exc.problems)
            continue
        tests = tests_path_for(path)
        if tests.exists() and config is not None:
            try:
                cases = load_cases(tests, zone.origin_text)
            except ZoneError as exc:
                res.problems.extend(exc.problems)
                continue
            res.cases += len(cases)
            state = GeoState(config.sites, config.pools, {})
            point = country_locations(countries.get if countries else (lambda _c: None))
            results = run_cases(
                zone, cases, state, pick.decide, locator.locate if locator else None, point
            )
            res.problems.extend(failures(results))
    return res


def write_stamp(config: Config) -> None:
    stamp = config.resolve(STAMP)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{time.time()}\n")


# -- diff ----------------------------------------------------------------------------------


def _load_dir(directory: Path, pools: Mapping[str, Pool]) -> dict[str, Zone]:
    zones: dict[str, Zone] = {}
    problems: list[str] = []
    for path in zone_files(directory):
        try:
            z = parse_zone(path, pools)
        except ZoneError as exc:
            problems.extend(exc.problems)
            continue
        zones[z.origin_text] = z
    if problems:
        raise ZoneError(str(directory), problems)
    return zones


def _records(zone: Zone) -> dict[tuple[str, int], tuple[int, frozenset[bytes]]]:
    return {
        (wire_to_text(name), rtype): (rr.ttl, frozenset(rr.rdata))
        for name, node in zone.nodes.items()
        for rtype, rr in node.items()
    }


def _type_name(rtype: int) -> str:
    import dns.rdatatype

    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))


def _regions(
    zone: Zone,
    sites: Mapping[str, Site],
    pools: Mapping[str, Pool],
    countries: geo.CountryTable,
) -> dict[tuple[str, str, str], str]:
    """(name, type, country) -> decided sites, for every geo name and every country."""
    out: dict[tuple[str, str, str], str] = {}
    point = country_locations(countries.get)
    states: dict[str, SiteState] = {}
    for key, g in zone.geo.items():
        pool = pools.get(g.pool)
        if pool is None:
            continue
        for rtype in sorted(g.types):
            family = 4 if rtype == A else 6
            for code in countries.codes():
                loc = point(code)
                d = pick.decide(pool, sites, states, ipaddress.IPv4Address(0), loc, family, g.count)
                label = ", ".join(d.sites) or ("zone record" if d.use_zone_record else "NODATA")
                out[(wire_to_text(key), "A" if rtype == A else "AAAA", code)] = label
    return out


def diff(old_dir: Path, new_dir: Path, config: Config) -> list[str]:
    """Human-readable differences between two zone directories."""
    old_cfg = _dir_config(old_dir, config)
    new_cfg = _dir_config(new_dir, config)
    old = _load_dir(_zones_of(old_dir), old_cfg.pools)
    new = _load_dir(_zones_of(new_dir), new_cfg.pools)
    countries = geo.CountryTable.load(config.geoip.countries)
    lines: list[str] = []
    for origin in sorted(set(old) | set(new)):
        if origin not in new:
            lines.append(f"- zone {origin} removed")
            continue
        if origin not in old:
            lines.append(f"+ zone {origin} added")
            continue
        a, b = _records(old[origin]), _records(new[origin])
        for key in sorted(set(a) | set(b), key=lambda k: (k[0], k[1])):
            name, rtype = key
            if a.get(key) != b.get(key):
                verb = "added" if key not in a else "removed" if key not in b else "changed"
                lines.append(f"~ {name} {_type_name(rtype)}: {verb}")
        ra = _regions(old[origin], old_cfg.sites, old_cfg.pools, countries)
        rb = _regions(new[origin], new_cfg.sites, new_cfg.pools, countries)
        moved: dict[tuple[str, str, str, str], list[str]] = {}
        for region in sorted(set(ra) | set(rb)):
            before, after = ra.get(region, "not steered"), rb.get(region, "not steered")
            if before != after:
                moved.setdefault((region[0], region[1], before, after), []).append(region[2])
        for (gname, gtype, before, after), codes in sorted(moved.items()):
            lines.append(
                f"> {gname} {gtype}: {before} -> {after} for {len(codes)} countries: "
                f"{' '.join(codes[:20])}{' ...' if len(codes) > 20 else ''}"
            )
    return lines


def _zones_of(directory: Path) -> Path:
    """A checkout's zones/ directory, or the directory itself."""
    return directory / "zones" if (directory / "zones").is_dir() else directory


def _dir_config(directory: Path, default: Config) -> Config:
    """The checkout's own geodns.toml (sites/pools may differ), else the current one."""
    from .config import load_config

    path = directory / "geodns.toml"
    if path.exists():
        try:
            return load_config(path)
        except ConfigError as exc:
            raise GeoDNSError("\n".join(exc.problems)) from None
    return default
