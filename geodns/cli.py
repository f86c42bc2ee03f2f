"""The `geodns` command: serve, check, explain, and the ops subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    app = App(
        config,
        listen=args.listen or None,
        run_checker=not args.no_checker,
        packet_cache=False if args.no_packet_cache else None,
        workers=args.workers,
        worker_mode=args.command == "serve-worker",
    )
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
    from .checkcmd import STAMP, changed_files, check, write_stamp
    from .zones import zone_files

    config_problems: list[str] = []
    config: Config | None
    try:
        config = _load(args)
    except ConfigError as exc:
        config_problems.extend(exc.problems)
        config = None
    paths: list[Path] = []
    if args.paths:
        for p in args.paths:
            pp = Path(p)
            paths.extend(zone_files(pp) if pp.is_dir() else [pp])
    elif config is not None:
        directory = config.resolve(config.zones.directory)
        changed = changed_files(directory, config.resolve(STAMP)) if args.changed else None
        paths = changed if changed is not None else zone_files(directory)
    res = check(config, paths, config_problems)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in res.problems:
        print(p)
    if res.problems:
        print(f"{len(res.problems)} problem(s)", file=sys.stderr)
        return 1
    if config is not None:
        write_stamp(config)
    print(
        f"ok: config, {res.zones} zone file(s), {res.cases} policy test case(s)",
        file=sys.stderr,
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Which names and which countries get different answers between two trees."""
    from .checkcmd import diff

    config = _load(args)
    try:
        lines = diff(Path(args.old), Path(args.new), config)
    except ZoneError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    if not lines:
        print("no differences in answers", file=sys.stderr)
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


# -- ops API client: explain, sites, drain, undrain --------------------------------------


class _ApiFailure(Exception):
    """The API answered with an error (or could not be reached); str() says why."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90', '30s', '30m', '1h', '2d', '1h30m' -> seconds; ValueError otherwise."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    elif text and re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))
    else:
        raise ValueError(f"{text!r} is not a duration like 30m, 1h, 2d or 1h30m")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def _api_config(args: argparse.Namespace) -> Config | None:
    """The config, when the URL or token must come from it (else None)."""
    if args.api and (args.token or os.environ.get("GEODNS_TOKEN")):
        return None
    return _load(args)


def _api_base(args: argparse.Namespace, config: Config | None) -> str:
    if args.api:
        return str(args.api).rstrip("/")
    assert config is not None
    if not config.api.listen:
        raise _ApiFailure(f"{config.path}: [api] listen is empty; pass --api URL")
    from .config import parse_listen

    host, port = parse_listen(config.api.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    scheme = "https" if config.api.tls_cert else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def _api_token(args: argparse.Namespace, config: Config | None) -> str | None:
    """--token, else $GEODNS_TOKEN, else the server's generated token file if readable."""
    token = args.token or os.environ.get("GEODNS_TOKEN")
    if token or config is None:
        return token
    try:
        return config.resolve(config.api.token_file).read_text().strip() or None
    except OSError:
        return None


def _api_call(args: argparse.Namespace, method: str, path: str, body: object | None = None) -> Any:
    """One request to the ops API; the decoded JSON, or _ApiFailure with the detail."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    config = _api_config(args)
    url = _api_base(args, config) + path
    headers = {"Accept": "application/json"}
    token = _api_token(args, config)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
            detail = doc.get("detail") or doc.get("title")
        except (ValueError, AttributeError):
            detail = exc.reason
        raise _ApiFailure(f"{detail} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _ApiFailure(
            f"cannot reach the ops API at {url}: {reason} (is `geodns serve` running? "
            "use --api URL)"
        ) from None


def _when(text: str | None) -> str:
    return "-" if not text else text.replace("T", " ").split(".")[0] + "Z"


def _override_text(ov: Any) -> str:
    if not ov:
        return "-"
    text = f"{ov['state']} by {ov['who']}: {ov['reason']}"
    if ov.get("expires_in_s") is not None:
        text += f" (until {_when(ov['expires_at'])}, in {_human_s(ov['expires_in_s'])})"
    if ov.get("ramp_s"):
        text += f" (ramped over {_human_s(ov['ramp_s'])})"
    return text


def _human_s(seconds: float) -> str:
    """3600 -> '1h', 5400 -> '1h30m', 90061 -> '1d1h' (two units at most)."""
    left = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts[:2])


def cmd_sites(args: argparse.Namespace) -> int:
    """Print every site's state as a table (following the API's pages)."""
    from urllib.parse import quote

    rows = [("SITE", "STATE", "OBSERVED", "SINCE", "LAST CHECK", "OVERRIDE")]
    cursor: str | None = None
    while True:
        query = "?limit=1000" + (f"&cursor={quote(cursor)}" if cursor else "")
        page = _api_call(args, "GET", "/v1/sites" + query)
        for s in page["items"]:
            last = "-"
            checks = [t["last_check"] for t in s["targets"] if t.get("last_check")]
            if checks:
                failed = [c for c in checks if not c["ok"]]
                last = "failed: " + (failed[0]["error"] or "?") if failed else "ok"
            state = s["effective"] + (" (stale)" if s["stale"] else "")
            rows.append(
                (
                    s["name"],
                    state,
                    s["observed"],
                    _when(s["since"]),
                    last,
                    _override_text(s["override"]),
                )
            )
        cursor = page.get("next")
        if not cursor:
            break
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Force a site DOWN: answers move to other sites at once (audited)."""
    from urllib.parse import quote

    body: dict[str, object] = {"state": "down", "reason": args.reason}
    if args.duration:
        try:
            body["expires_in_s"] = parse_duration(args.duration)
        except ValueError as exc:
            raise _ApiFailure(f"--for: {exc}") from None
    if args.ramp:
        try:
            body["ramp_s"] = parse_duration(args.ramp)
        except ValueError as exc:
            raise _ApiFailure(f"--ramp: {exc}") from None
    site = _api_call(args, "PUT", f"/v1/sites/{quote(args.site, safe='')}/override", body)
    print(f"{site['name']}: {site['effective']} - {_override_text(site['override'])}")
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    """Clear a site's override: it follows its health checks again (audited)."""
    from urllib.parse import quote

    body = {"reason": args.reason} if args.reason else None
    out = _api_call(args, "DELETE", f"/v1/sites/{quote(args.site, safe='')}/override", body)
    site = out["site"]
    what = "override cleared" if out["cleared"] else "had no override"
    print(f"{site['name']}: {what}; now {site['effective']} (observed {site['observed']})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Why a client gets its answer: from the running server, or --offline from files."""
    from .explain import ExplainError, explain, format_explain

    if args.offline:
        from . import pick
        from .app import App

        config = _load(args)
        app = App(config, listen=[])  # constructed, not started: the server's own objects
        app.reloader.initial_load()
        try:
            result = explain(
                app.holder.view,
                app.locator,
                pick.decide,
                args.ip,
                args.name,
                args.type,
                args.ecs,
            )
        except ExplainError as exc:
            print(f"geodns: {exc}", file=sys.stderr)
            return 2
        finally:
            if app.locator is not None:
                app.locator.close()
        print(format_explain(result))
        print("  (offline: from the files; health unknown, every site counted up)")
        return 0
    from urllib.parse import urlencode

    params = {"ip": args.ip, "name": args.name, "type": args.type}
    if args.ecs:
        params["ecs"] = args.ecs
    print(format_explain(_api_call(args, "GET", "/v1/explain?" + urlencode(params))))
    return 0


def _api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", help="ops API URL (default: from [api] listen in the config)")
    p.add_argument(
        "--token", help="bearer token (default: $GEODNS_TOKEN, else the server's token_file)"
    )
    p.add_argument("--cacert", help="CA certificate (PEM) to verify the API's TLS certificate")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def _add_ops_commands(sub: Any) -> None:
    explain = sub.add_parser("explain", help="why a client gets the answer it gets")
    explain.add_argument("ip", help="the client (or resolver) address")
    explain.add_argument("name", help="the name asked, e.g. www.example.com")
    explain.add_argument("--type", default="A", help="record type (default A)")
    explain.add_argument("--ecs", help="client subnet sent by the resolver, e.g. 81.2.69.0/24")
    explain.add_argument(
        "--offline", action="store_true", help="decide from the files, not the running server"
    )
    _api_options(explain)
    explain.set_defaults(func=cmd_explain)
    sites = sub.add_parser("sites", help="every site's health and override")
    _api_options(sites)
    sites.set_defaults(func=cmd_sites)
    drain = sub.add_parser("drain", help="take a site out of DNS answers now (override DOWN)")
    drain.add_argument("site")
    drain.add_argument("--reason", required=True, help="why (written to the audit log)")
    drain.add_argument(
        "--for", dest="duration", help="end by itself after e.g. 30m, 1h, 2d (default: never)"
    )
    drain.add_argument(
        "--ramp",
        help="drain gradually over e.g. 10m: clients leave in steps (default: all at once)",
    )
    _api_options(drain)
    drain.set_defaults(func=cmd_drain)
    undrain = sub.add_parser("undrain", help="clear a site's override (obey checks again)")
    undrain.add_argument("site")
    undrain.add_argument("--reason", help="why (written to the audit log)")
    _api_options(undrain)
    undrain.set_defaults(func=cmd_undrain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geodns", description=__doc__)
    parser.add_argument("--config", help="config file (default: $GEODNS_CONFIG or ./geodns.toml)")
    # --config is accepted before or after the subcommand (`geodns serve --config X`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common, *kw.pop("parents", [])], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
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
    serve.add_argument(
        "--no-packet-cache", action="store_true", help="answer every query on the full path"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="DNS worker processes on the same addresses; default [server] workers",
    )
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("serve-worker", help=argparse.SUPPRESS)
    worker.add_argument("--listen", action="append")
    worker.add_argument("--no-packet-cache", action="store_true")
    worker.add_argument("--log-level")
    worker.set_defaults(func=cmd_serve, zones=None, no_checker=True, workers=1)
    checker = sub.add_parser("checker", help="run only the health checker (writes the store)")
    checker.add_argument("--log-level", help="debug | info | warning | error")
    checker.set_defaults(func=cmd_checker)
    check = sub.add_parser("check", help="validate config and zone files")
    check.add_argument("paths", nargs="*", help="zone files or directories")
    check.add_argument(
        "--changed",
        action="store_true",
        help="only zone files changed per git (or since the last successful check)",
    )
    check.set_defaults(func=cmd_check)
    diffp = sub.add_parser("diff", help="answers that differ between two zone trees")
    diffp.add_argument("old", help="old checkout or zones directory")
    diffp.add_argument("new", help="new checkout or zones directory")
    diffp.set_defaults(func=cmd_diff)
    geoip = sub.add_parser("geoip", help="GeoIP database commands")
    geoip_sub = geoip.add_subparsers(dest="geoip_command", required=True)
    geoip_update = geoip_sub.add_parser(
        "update",
        help="download a GeoIP database into [geoip] state_dir and switch to it",
        description="Download (default: DB-IP City Lite of this month), verify and "
        "atomically install state_dir/current.mmdb, which takes precedence over "
        "[geoip] database. The tracked data/ file is never written.",
        parents=[common],
    )
    geoip_update.add_argument(
        "--url", help="http(s):// or file:// URL or a local path; .mmdb, .mmdb.gz or .tar.gz"
    )
    geoip_update.set_defaults(func=cmd_geoip_update)
    _add_ops_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except _ApiFailure as exc:
        print(f"geodns: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 2
    except GeoDNSError as exc:
        print(f"geodns: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
