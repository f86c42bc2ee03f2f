"""The `geodns` command: serve, check, explain, and the ops subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError, GeoDNSError, ZoneError

log = logging.getLogger("geodns")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import App, install_loop_policy

    config = _load(args)
    _setup_logging(args.log_level or config.server.log_level)
    if args.zones:
        from dataclasses import replace

        zones_dir = str(Path(args.zones).resolve())
        config = replace(config, zones=replace(config.zones, directory=zones_dir))
    loop_name = install_loop_policy()
    log.info("geodns starting (event loop: %s)", loop_name)
    app = App(config, listen=args.listen or None, run_checker=not args.no_checker)
    try:
        asyncio.run(app.run_forever())
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


def cmd_checker(args: argparse.Namespace) -> int:
    from .app import install_loop_policy, run_checker_forever

    config = _load(args)
    _setup_logging(args.log_level or config.server.log_level)
    install_loop_policy()
    asyncio.run(run_checker_forever(config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and zone files exactly as the server loads them."""
    from .zones import ZONE_SUFFIX, parse_zone, zone_files

    problems: list[str] = []
    try:
        config = _load(args)
    except ConfigError as exc:
        problems.extend(exc.problems)
        config = None
    paths: list[Path] = []
    if args.paths:
        for p in args.paths:
            pp = Path(p)
            paths.extend(zone_files(pp) if pp.is_dir() else [pp])
    elif config is not None:
        paths = zone_files(config.resolve(config.zones.directory))
    pools = config.pools if config is not None else {}
    for path in paths:
        if not path.name.endswith(ZONE_SUFFIX):
            continue
        try:
            parse_zone(path, pools)
        except ZoneError as exc:
            problems.extend(exc.problems)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: config and {len(paths)} zone file(s)", file=sys.stderr)
    return 0


def cmd_geoip_update(args: argparse.Namespace) -> int:
    """Download, verify and install a GeoIP database into [geoip] state_dir."""
    from .geoip_update import UpdateError, update

    config = _load(args)
    try:
        result = update(
            config.geoip, args.url, progress=lambda msg: print(msg, file=sys.stderr, flush=True)
        )
    except UpdateError as exc:
        print(f"geoip update failed, the database in use is unchanged: {exc}", file=sys.stderr)
        return 1
    for line in result.lines():
        print(line)
    interval = config.geoip.reload_interval_s
    when = f"within {interval:g} s or on SIGHUP" if interval > 0 else "on SIGHUP"
    print(f"a running server switches to it {when}, without a restart")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geodns", description=__doc__)
    parser.add_argument("--config", help="config file (default: $GEODNS_CONFIG or ./geodns.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve DNS (and the ops API)")
    serve.add_argument(
        "--listen", action="append", help="ADDR:PORT or [V6]:PORT; repeat for several"
    )
    serve.add_argument("--zones", help="zone directory (overrides [zones] directory)")
    serve.add_argument("--log-level", help="debug | info | warning | error")
    serve.add_argument(
        "--no-checker",
        action="store_true",
        help="do not probe: follow the verdicts a `geodns checker` writes to the store",
    )
    serve.set_defaults(func=cmd_serve)
    checker = sub.add_parser("checker", help="run only the health checker (writes the store)")
    checker.add_argument("--log-level", help="debug | info | warning | error")
    checker.set_defaults(func=cmd_checker)
    check = sub.add_parser("check", help="validate config and zone files")
    check.add_argument("paths", nargs="*", help="zone files or directories")
    check.set_defaults(func=cmd_check)
    geoip = sub.add_parser("geoip", help="GeoIP database commands")
    geoip_sub = geoip.add_subparsers(dest="geoip_command", required=True)
    geoip_update = geoip_sub.add_parser(
        "update",
        help="download a GeoIP database into [geoip] state_dir and switch to it",
        description="Download (default: DB-IP City Lite of this month), verify and "
        "atomically install state_dir/current.mmdb, which takes precedence over "
        "[geoip] database. The tracked data/ file is never written.",
    )
    geoip_update.add_argument(
        "--url", help="http(s):// or file:// URL or a local path; .mmdb, .mmdb.gz or .tar.gz"
    )
    geoip_update.set_defaults(func=cmd_geoip_update)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 2
    except GeoDNSError as exc:
        print(f"geodns: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
