"""The ops HTTP API (aiohttp): health, readiness, sites and overrides, audit, zones,
explain, metrics and its own OpenAPI description.

Served by `geodns serve` on `[api] listen` (default 127.0.0.1:8053; "" = off), beside DNS
on the same event loop: handlers read the published View and the App's plain counters and
call the HealthManager for writes, which stores, audits and publishes a new View at once.

Security: every write needs `Authorization: Bearer <secret>`; secrets are named in
`[api.tokens]`, or one is generated at first start into `token_file` (mode 0600, never
logged) and named "admin"; the audit log's "who" is the token's name. Reads are open on a
loopback address; on any other address reads need a token too (except /healthz, a
liveness probe that reveals nothing) and the API serves TLS unless `allow_plaintext`.

Errors are RFC 9457 problem details (`application/problem+json`), never a stack trace.
Every list endpoint returns `{"items": [...], "next": cursor-or-null}`.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import secrets
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import metrics, pick
from .answershare import AnswerWindow
from .config import Config, parse_listen, token_problems
from .errors import ConfigError, StoreError
from .explain import ExplainError, explain
from .model import Health, Override, SiteState
from .zones import name_to_wire, wire_to_text

if TYPE_CHECKING:
    from .app import App
    from .health import TargetInfo
    from .store import OverrideRow

log = logging.getLogger(__name__)

API_VERSION = "1"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
TRANSITIONS_SHOWN = 20
NAMES_SHOWN = 1000
MAX_REASON_CHARS = 1000
MAX_EXPIRES_IN_S = 366 * 86400.0
GENERATED_TOKEN_NAME = "admin"
PROBLEM_JSON = "application/problem+json"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
# liveness probes and the status page's files never need a token (the page asks for
# one and sends it with its own API calls)
_OPEN_PATHS = frozenset({"/healthz", "/"})
_OPEN_PREFIX = "/static/"
# the status page (geodns/static, package data): same-origin only, nothing inline
_STATIC = importlib.resources.files("geodns") / "static"
_STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as a problem document; `field` names the offending input."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem(
    status: int,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """An RFC 9457 problem response (type about:blank: the title is the HTTP phrase)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if field is not None:
        body["field"] = field
    body.update(extra or {})
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def _http_detail(exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {exc.method} is not allowed here (allowed: {allowed})"
    if isinstance(exc, web.HTTPNotFound):
        return "no such endpoint; see /v1/openapi.json"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return "request body too large"
    return exc.reason


@web.middleware
async def _problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes a problem document; unexpected ones are logged, not shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        return problem(
            exc.status, exc.detail, field=exc.field, headers=exc.headers, extra=exc.extra
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return problem(exc.status, _http_detail(exc), headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("api: %s %s failed", request.method, request.path)
        return problem(500, "internal error; the server log has the details")


# --------------------------------------------------------------------------- tokens


def load_tokens(config: Config) -> dict[str, str]:
    """Named write tokens: `[api.tokens]`, else the token file (generated if missing).

    The generated secret is written with mode 0600 (created that way, never widened)
    and is never logged; only the file's path is.
    """
    tokens = {name: secret for name, secret in config.api.tokens.items()}
    problems = token_problems(config.api, str(config.path))  # a Config built in code
    if problems:
        raise ConfigError(problems)
    if tokens:
        return tokens
    path = config.resolve(config.api.token_file)
    return {GENERATED_TOKEN_NAME: read_or_create_token_file(path)}


def read_or_create_token_file(path: Path) -> str:
    """The secret in `path`; created (0600, parent 0700) with a fresh secret if absent."""
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the API token file: {exc.strerror}"]) from None
    if secret:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("api: token file %s is readable by others (mode %o); chmod 600", path, mode)
        return secret
    secret = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            path.unlink()  # an empty file: replace it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot create the API token file: {exc.strerror}"]) from None
    log.warning("api: generated a write token (name %r) in %s", GENERATED_TOKEN_NAME, path)
    return secret


def token_name(tokens: Mapping[str, str], header: str | None) -> str | None:
    """The name of the token in an `Authorization: Bearer ...` header, or None.

    Compares against every token with hmac.compare_digest so the time taken does not
    tell which token (or how much of one) matched.
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    offered = value.strip().encode()
    found: str | None = None
    for name, secret in tokens.items():
        if hmac.compare_digest(offered, secret.encode()):
            found = name
    return found


# --------------------------------------------------------------------------- listening


@dataclass(frozen=True)
class ListenPlan:
    """Where and how the API listens, decided (and checked) before anything binds."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    reads_need_token: bool

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"


def plan_listen(config: Config) -> ListenPlan | None:
    """Check `[api]` and build the listen plan; None when the API is off.

    Raises ConfigError with the fix when a non-loopback address would serve plain HTTP.
    """
    api = config.api
    if not api.listen:
        return None
    where = f"{config.path}: api"
    try:
        host, port = parse_listen(api.listen)
    except ValueError as exc:
        raise ConfigError([f"{where}.listen: {exc}"]) from None
    loopback = ipaddress.ip_address(host).is_loopback
    if bool(api.tls_cert) != bool(api.tls_key):
        raise ConfigError([f"{where}: tls_cert and tls_key go together; set both or neither"])
    context = None
    if api.tls_cert:
        cert, key = config.resolve(api.tls_cert), config.resolve(api.tls_key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [f"{where}.tls_cert/tls_key: cannot load {cert} / {key}: {exc}"]
            ) from None
    elif not loopback and not api.allow_plaintext:
        raise ConfigError(
            [
                f"{where}.listen: {api.listen} is not a loopback address, so the ops API "
                "must use TLS: set api.tls_cert and api.tls_key (PEM files), or set "
                "api.allow_plaintext = true to serve plain HTTP on purpose"
            ]
        )
    return ListenPlan(host, port, context, reads_need_token=not loopback)


class ApiServer:
    """The API's aiohttp runner, started and stopped by App."""

    def __init__(self, app: App, plan: ListenPlan, tokens: Mapping[str, str]) -> None:
        self.plan = plan
        self.web = make_web_app(app, tokens, reads_need_token=plan.reads_need_token)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        runner = web.AppRunner(self.web, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(
            runner, self.plan.host, self.plan.port, ssl_context=self.plan.ssl_context
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"ops API cannot listen on {self.plan.host}:{self.plan.port}: {exc}"
            ) from exc
        self._runner = runner
        self._sampler = asyncio.create_task(self.web[API_KEY].answers.run())
        for host, port in self.addresses:
            log.info("serving the ops API on %s://%s:%d", self.plan.scheme, host, port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._runner is None:
            return []
        return [(a[0], a[1]) for a in self._runner.addresses]

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --------------------------------------------------------------------------- helpers


def _ts(t: float | None) -> str | None:
    """Unix time -> RFC 3339 UTC text (None stays None)."""
    if t is None:
        return None
    text = datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _query(request: web.Request, allowed: Iterable[str]) -> dict[str, str]:
    """Query parameters, rejecting unknown (e.g. misspelt) ones by name."""
    allowed = set(allowed)
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, f"unknown query parameter {key!r} (allowed: {names})", field=key)
        if key in out:
            raise ApiError(400, f"query parameter {key!r} given twice", field=key)
        out[key] = value
    return out


def _limit(params: Mapping[str, str]) -> int:
    text = params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit: must be an integer within 1..{MAX_LIMIT}", field="limit")
    return value


def _page_by_name(items: list[tuple[str, Any]], params: Mapping[str, str]) -> dict[str, Any]:
    """Keyset pagination over (name, item) sorted by name; the cursor is the last name."""
    limit = _limit(params)
    cursor = params.get("cursor")
    if cursor is not None:
        items = [(k, v) for k, v in items if k > cursor]
    page = items[:limit]
    more = len(items) > limit
    return {"items": [v for _, v in page], "next": page[-1][0] if more and page else None}


async def _read_json(request: web.Request, max_bytes: int) -> Any:
    """The request body as JSON (None when empty); 413 over the limit, 400 if not JSON."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {max_bytes}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes") from None
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "request body: not UTF-8 text", field="body") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"request body: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            field="body",
        ) from None


def _check_fields(body: Any, allowed: Mapping[str, str], required: Iterable[str]) -> dict[str, Any]:
    """A JSON object with only `allowed` keys (name -> description) and all `required`."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body: must be a JSON object", field="body")
    for key in body:
        if key not in allowed:
            names = ", ".join(sorted(allowed))
            raise ApiError(400, f"{key}: unknown field (allowed: {names})", field=key)
    for key in required:
        if key not in body:
            raise ApiError(400, f"{key}: required ({allowed[key]})", field=key)
    return body


def _reason(body: Mapping[str, Any], default: str | None = None) -> str:
    value = body.get("reason", default)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "reason: must be a non-empty string", field="reason")
    if len(value) > MAX_REASON_CHARS:
        raise ApiError(400, f"reason: at most {MAX_REASON_CHARS} characters", field="reason")
    return value.strip()


# --------------------------------------------------------------------------- the API


class Api:
    """Request handlers over one App. Pure readers of its state, except the writes."""

    def __init__(self, app: App, tokens: Mapping[str, str], reads_need_token: bool) -> None:
        self.app = app
        self.tokens = dict(tokens)
        self.reads_need_token = reads_need_token
        self.registry = metrics.make_registry(app)
        self.max_body = app.config.api.max_body_bytes
        # each site's share of answers lately, sampled from the plain counters
        self.answers = AnswerWindow(lambda: app.stats.answers_by_site)

    # -- auth ----------------------------------------------------------------------
    @web.middleware
    async def auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Writes need a token; reads too when not on loopback (except /healthz)."""
        info = request.match_info
        if info.http_exception is not None:
            raise info.http_exception  # unknown path (404) or method (405): nothing to guard
        who = token_name(self.tokens, request.headers.get("Authorization"))
        needed = request.method not in _READS or (
            self.reads_need_token
            and request.path not in _OPEN_PATHS
            and not request.path.startswith(_OPEN_PREFIX)
        )
        if needed and who is None:
            offered = "Authorization" in request.headers
            raise ApiError(
                401,
                "invalid bearer token"
                if offered
                else "this request needs a bearer token "
                "(Authorization: Bearer <secret>; see [api] tokens / token_file)",
                headers={"WWW-Authenticate": 'Bearer realm="geodns"'},
            )
        return await handler(request)

    def _who(self, request: web.Request) -> str:
        """The name of the (already checked) token of a write request."""
        who = token_name(self.tokens, request.headers.get("Authorization"))
        if who is None:  # the auth middleware lets no write through without one
            raise ApiError(401, "invalid bearer token")
        return who

    # -- liveness and readiness ------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        _query(request, ())
        return _json({"status": "ok", "uptime_s": round(time.time() - self.app.started_at, 3)})

    def not_ready(self) -> tuple[list[str], dict[str, Any]]:
        """What keeps the server from being ready, each item a sentence; and the checks."""
        app = self.app
        problems: list[str] = []
        if not app.ready:
            problems.append("startup: zones are still loading")
        zones_bad = 0
        for origin, st in sorted(app.zone_status.items()):
            if st.error:
                zones_bad += 1
                first = st.error.splitlines()[0] if st.error else ""
                kept = "the last good version serves" if st.loaded_at else "SERVFAIL"
                problems.append(f"zone {origin}: rejected ({kept}): {first}")
            elif st.loaded_at is None and app.ready:
                zones_bad += 1
                problems.append(f"zone {origin}: not loaded")
        config_error = getattr(app, "config_error", None)
        if config_error:
            problems.append(f"config: last reload rejected: {config_error[0]}")
        if app.geoip_error:
            problems.append(f"geoip: not open: {app.geoip_error}")
        store = app.store
        if store is None:
            problems.append("store: not configured or unusable (state kept in memory only)")
        elif not store.healthy:
            problems.append(f"store: unreachable: {store.last_error or 'unknown error'}")
        health = app.health
        stale: list[str] = []
        if health is None:
            problems.append("health: not started")
        else:
            if health.frozen:
                problems.append(f"checker: partition guard frozen: {health.frozen_reason}")
            stale = sorted(n for n, s in app.holder.view.geo.states.items() if s.stale)
            for name in stale:
                problems.append(f"checker: site {name}: verdict stale (no recent checks)")
        checks = {
            "zones": {"total": len(app.zone_status), "not_ready": zones_bad},
            "geoip": {"ok": app.geoip_error is None},
            "store": {
                "ok": store is not None and store.healthy,
                "error": None if store is None else store.last_error,
                "journal_pending": 0 if store is None else store.journal_pending,
            },
            "checker": {
                "frozen": bool(health and health.frozen),
                "stale_sites": stale,
            },
        }
        return problems, checks

    async def readyz(self, request: web.Request) -> web.Response:
        _query(request, ())
        problems, checks = self.not_ready()
        if not problems:
            return _json({"ready": True, "not_ready": [], "checks": checks})
        return problem(
            503,
            "; ".join(problems),
            extra={"ready": False, "not_ready": problems, "checks": checks},
        )

    # -- sites -------------------------------------------------------------------------
    def _known_site(self, name: str) -> None:
        if name not in self.app.holder.view.geo.sites:
            raise ApiError(404, f"unknown site {name!r}; GET /v1/sites lists them", field="name")

    def _pools_of(self, name: str) -> list[str]:
        pools = self.app.holder.view.geo.pools
        return sorted(p for p, pool in pools.items() if name in pool.members)

    def _names_using(self, pools: Iterable[str]) -> tuple[list[str], bool]:
        """Geo-steered names (every zone) answered from any of `pools`; capped."""
        wanted = set(pools)
        names: list[str] = []
        if not wanted:
            return names, False
        for zone in list(self.app.catalog.zones.values()):
            if zone is None or not zone.geo:
                continue
            for geo_name in zone.geo.values():
                if geo_name.pool in wanted:
                    names.append(wire_to_text(geo_name.owner))
                    if len(names) > NAMES_SHOWN:
                        return sorted(names[:NAMES_SHOWN]), True
        return sorted(names), False

    def _targets_by_site(self, names: Iterable[str]) -> dict[str, dict[str | None, TargetInfo]]:
        """The health manager's probed targets of `names`, grouped in one pass."""
        wanted = set(names)
        out: dict[str, dict[str | None, TargetInfo]] = {n: {} for n in wanted}
        health = self.app.health
        if health is not None:
            for (site, address), info in list(health.targets.items()):
                if site in wanted:
                    out[site][address] = info
        return out

    def _site_json(
        self, name: str, targets_of: Mapping[str | None, TargetInfo] | None = None
    ) -> dict[str, Any]:
        """What an operator wants to know about one site, from memory (no store reads)."""
        app = self.app
        geo = app.holder.view.geo
        site = geo.sites[name]
        state = geo.states.get(name, SiteState())
        health = app.health
        if targets_of is None:
            targets_of = self._targets_by_site([name])[name]
        now = health.clock() if health is not None else time.time()
        override = health.overrides.get(name) if health is not None else None
        if override is not None and override.expires_at is not None and override.expires_at <= now:
            override = None  # expired: the view already ignores it; the next tick removes it
        targets = []
        since: float | None = None
        last_check_at: float | None = None
        if targets_of:
            for address, t in sorted(targets_of.items(), key=lambda kv: kv[0] or ""):
                targets.append(_target_json(address, t))
                if t.since is not None:
                    since = t.since if since is None else max(since, t.since)
                if t.last_at is not None:
                    last_check_at = (
                        t.last_at if last_check_at is None else max(last_check_at, t.last_at)
                    )
        spec = app.config.site_checks.get(name)
        effective = "drained" if state.drained else "up" if state.usable else "down"
        damping = health.site_info(name).damping if health is not None else None
        return {
            "name": name,
            "addresses": {"ipv4": list(site.ipv4), "ipv6": list(site.ipv6)},
            "location": {"lat": site.lat, "lon": site.lon},
            "weight": site.weight,
            "capacity": site.capacity,
            "observed": state.observed.value,
            "effective": effective,
            "usable": state.usable,
            "stale": state.stale,
            "since": _ts(since),
            "last_check_at": _ts(last_check_at),
            "addresses_down": sorted(state.address_down),
            "override": _override_json(override, now),
            # load balancing: held DOWN for flapping (override > damping > observed),
            # slow start / ramped drain, and the short TTL while it changes
            "damping": {
                "damped": state.damped,
                "until": _ts(state.damped_until),
                "addresses": sorted(state.damped_addresses),
                "level": damping.level if damping is not None else 0,
                "recent_changes": damping.flaps if damping is not None else 0,
            },
            "ramp": None
            if not state.ramp_kind
            else {
                "kind": state.ramp_kind,
                "share": state.ramp,
                "until": _ts(state.ramp_until),
            },
            "changing": state.changing,
            "check": None
            if spec is None
            else {
                "kind": spec.kind,
                "interval_s": spec.interval_s,
                "per_address": spec.per_address,
            },
            "targets": targets,
            "pools": self._pools_of(name),
        }

    async def _site_detail(self, name: str) -> dict[str, Any]:
        out = self._site_json(name)
        out["names"], out["names_truncated"] = self._names_using(out["pools"])
        out["transitions"], out["transitions_error"] = [], None
        store = self.app.store
        if store is not None:
            try:
                rows, _ = await asyncio.to_thread(store.list_transitions, name, TRANSITIONS_SHOWN)
            except StoreError as exc:
                out["transitions_error"] = f"store unreachable: {exc}"
            else:
                out["transitions"] = [
                    {
                        "id": r.id,
                        "at": _ts(r.at),
                        "address": r.address,
                        "node": r.node_id,
                        "old": r.old.value,
                        "new": r.new.value,
                        "reason": r.reason,
                    }
                    for r in rows
                ]
        return out

    async def list_sites(self, request: web.Request) -> web.Response:
        params = _query(request, ("limit", "cursor"))
        names = sorted(self.app.holder.view.geo.sites)
        limit = _limit(params)
        cursor = params.get("cursor")
        if cursor is not None:
            names = [n for n in names if n > cursor]
        page = names[:limit]
        nxt = page[-1] if len(names) > limit and page else None
        grouped = self._targets_by_site(page)
        items = [self._site_json(n, grouped[n]) for n in page]
        return _json({"items": items, "next": nxt})

    async def get_site(self, request: web.Request) -> web.Response:
        _query(request, ())
        name = request.match_info["name"]
        self._known_site(name)
        return _json(await self._site_detail(name))

    def _health(self) -> Any:
        if self.app.health is None:
            raise ApiError(503, "the health manager is not running yet; retry shortly")
        return self.app.health

    async def put_override(self, request: web.Request) -> web.Response:
        _query(request, ())
        name = request.match_info["name"]
        self._known_site(name)
        body = _check_fields(
            await _read_json(request, self.max_body),
            {
                "state": '"down" (drain) or "up" (force in)',
                "reason": "why, for the audit log",
                "expires_in_s": "seconds until the override ends by itself; omit for never",
                "ramp_s": "move the site's clients gradually over this many seconds: a "
                "down override drains them in steps, an up one brings them back in steps",
            },
            ("state", "reason"),
        )
        state_text = body["state"]
        if state_text not in ("down", "up"):
            raise ApiError(400, 'state: must be "down" or "up"', field="state")
        reason = _reason(body)
        expires = body.get("expires_in_s")
        if expires is not None:
            if isinstance(expires, bool) or not isinstance(expires, int | float):
                raise ApiError(
                    400, "expires_in_s: must be a number of seconds", field="expires_in_s"
                )
            if not 0 < expires <= MAX_EXPIRES_IN_S:
                raise ApiError(
                    400,
                    f"expires_in_s: must be within 0 < s <= {MAX_EXPIRES_IN_S:.0f} (366 days)",
                    field="expires_in_s",
                )
        ramp_s = body.get("ramp_s")
        if ramp_s is not None and (
            isinstance(ramp_s, bool)
            or not isinstance(ramp_s, int | float)
            or not 0 <= ramp_s <= MAX_EXPIRES_IN_S
        ):
            raise ApiError(400, "ramp_s: must be a number of seconds, 0 or more", field="ramp_s")
        health = self._health()
        who = self._who(request)
        try:
            await health.set_override(
                name, Override(state_text), reason, who, expires, float(ramp_s or 0) or None
            )
        except ValueError as exc:
            raise ApiError(400, f"expires_in_s: {exc}", field="expires_in_s") from None
        except StoreError as exc:
            raise ApiError(503, f"state store: {exc}") from None
        return _json(await self._site_detail(name))

    async def delete_override(self, request: web.Request) -> web.Response:
        _query(request, ())
        name = request.match_info["name"]
        self._known_site(name)
        body = await _read_json(request, self.max_body)
        reason = "override cleared"
        if body is not None:
            body = _check_fields(body, {"reason": "why, for the audit log"}, ())
            reason = _reason(body, reason)
        health = self._health()
        try:
            cleared = await health.clear_override(name, self._who(request), reason)
        except StoreError as exc:
            raise ApiError(503, f"state store: {exc}") from None
        return _json({"cleared": bool(cleared), "site": await self._site_detail(name)})

    # -- audit, zones ---------------------------------------------------------------------
    async def list_audit(self, request: web.Request) -> web.Response:
        params = _query(request, ("limit", "cursor"))
        limit = _limit(params)
        before: int | None = None
        if "cursor" in params:
            try:
                before = int(params["cursor"])
            except ValueError:
                before = 0
            if before < 1:
                raise ApiError(400, "cursor: must be a cursor from a previous page", field="cursor")
        store = self.app.store
        if store is None:
            raise ApiError(503, "no state store: the audit log is unavailable")
        try:
            rows, nxt = await asyncio.to_thread(store.list_audit, limit, before)
        except StoreError as exc:
            raise ApiError(503, f"state store unreachable: {exc}") from None
        items = [
            {
                "id": r.id,
                "at": _ts(r.at),
                "who": r.who,
                "action": r.action,
                "target": r.target,
                "detail": r.detail,
            }
            for r in rows
        ]
        return _json({"items": items, "next": None if nxt is None else str(nxt)})

    async def list_zones(self, request: web.Request) -> web.Response:
        params = _query(request, ("limit", "cursor"))
        app = self.app
        # 100,000 zones: sort the names only, and build rows for one page (+1 to know
        # whether there is a next one), never for the whole catalogue
        names = sorted(app.zone_status)
        cursor = params.get("cursor")
        start = bisect.bisect_right(names, cursor) if cursor is not None else 0
        rows: list[tuple[str, Any]] = []
        for origin in names[start : start + _limit(params) + 1]:
            st = app.zone_status[origin]
            key = name_to_wire(origin).lower()
            served = app.catalog.zones.get(key)
            rows.append(
                (
                    origin,
                    {
                        "origin": origin,
                        "file": st.path,
                        "serial": st.serial,
                        "loaded_at": _ts(st.loaded_at),
                        "records": st.records,
                        "serving": served is not None,
                        "version": served.version if served is not None else None,
                        "error": st.error,
                        "error_at": _ts(getattr(st, "error_at", None)),
                    },
                )
            )
        return _json(_page_by_name(rows, {k: v for k, v in params.items() if k != "cursor"}))

    async def list_nodes(self, request: web.Request) -> web.Response:
        """Nodes sharing the store: last heartbeat, fresh or not, their votes; the quorum."""
        _query(request, ())
        health = self._health()
        snapshot = None
        if not health.shared:  # a lone node keeps no snapshot: read one now
            store = self.app.store
            if store is None:
                raise ApiError(503, "no state store: nodes are unknown")
            try:
                snapshot = await asyncio.to_thread(store.quorum_snapshot)
            except StoreError as exc:
                raise ApiError(503, f"state store unreachable: {exc}") from None
        out = health.nodes_report(snapshot)
        out["quorum"]["last_sync_at"] = _ts(out["quorum"]["last_sync_at"])
        for node in out["nodes"]:
            node["last_seen"] = _ts(node["last_seen"])
        return _json(out)

    async def reload(self, request: web.Request) -> web.Response:
        _query(request, ())
        if await _read_json(request, self.max_body) is not None:
            raise ApiError(400, "request body: must be empty", field="body")
        result = await self.app.reload(who=self._who(request))
        ok = not result.get("config_errors") and not result.get("failed")
        return _json({"ok": ok, **result})

    # -- explain, metrics, spec -------------------------------------------------------------
    async def explain(self, request: web.Request) -> web.Response:
        params = _query(request, ("ip", "name", "type", "ecs"))
        for key in ("ip", "name"):
            if not params.get(key):
                raise ApiError(400, f"{key}: required query parameter", field=key)
        app = self.app
        try:
            result = explain(
                app.holder.view,
                app.locator,
                pick.decide,
                params["ip"],
                params["name"],
                params.get("type", "A"),
                params.get("ecs") or None,
                max_chain=app.config.server.max_cname_chain,
            )
        except ExplainError as exc:
            raise ApiError(400, str(exc), field=exc.field) from None
        return _json(result)

    async def metrics(self, request: web.Request) -> web.Response:
        _query(request, ())
        body = metrics.render(self.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = metrics.CONTENT_TYPE
        return resp

    async def openapi(self, request: web.Request) -> web.Response:
        _query(request, ())
        return _json(openapi_spec())

    # -- the status page --------------------------------------------------------------
    async def stats(self, request: web.Request) -> web.Response:
        """Each site's share of geo answers over the last few minutes."""
        _query(request, ())
        return _json(self.answers.share(self.app.holder.view.geo.sites))

    async def index(self, request: web.Request) -> web.Response:
        _query(request, ())
        return _static_file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return _static_file(request.match_info["file"])


def _static_file(name: str) -> web.Response:
    """One file of geodns/static (no subfolders, known types only), with page headers."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    kind = _STATIC_TYPES.get(suffix)
    if kind is None or name.startswith(".") or "/" in name or "\\" in name:
        raise ApiError(404, f"no such file: static/{name}")
    try:
        data = (_STATIC / name).read_bytes()
    except OSError:
        raise ApiError(404, f"no such file: static/{name}") from None
    return web.Response(body=data, content_type=kind, charset="utf-8", headers=_PAGE_HEADERS)


API_KEY = web.AppKey("api", Api)


def make_web_app(
    app: App, tokens: Mapping[str, str], *, reads_need_token: bool = False
) -> web.Application:
    """The aiohttp application over `app` (also what tests mount in a TestServer)."""
    api = Api(app, tokens, reads_need_token)
    # the limit is enforced by _read_json with a clear message; aiohttp's is a backstop
    web_app = web.Application(middlewares=[_problems, api.auth], client_max_size=api.max_body + 1)
    r = web_app.router
    for method, path, handler in (
        ("GET", "/healthz", api.healthz),
        ("GET", "/readyz", api.readyz),
        ("GET", "/metrics", api.metrics),
        ("GET", "/v1/openapi.json", api.openapi),
        ("GET", "/v1/sites", api.list_sites),
        ("GET", "/v1/sites/{name}", api.get_site),
        ("PUT", "/v1/sites/{name}/override", api.put_override),
        ("DELETE", "/v1/sites/{name}/override", api.delete_override),
        ("GET", "/v1/audit", api.list_audit),
        ("GET", "/v1/zones", api.list_zones),
        ("GET", "/v1/nodes", api.list_nodes),
        ("POST", "/v1/reload", api.reload),
        ("GET", "/v1/explain", api.explain),
        ("GET", "/v1/stats", api.stats),
        ("GET", "/", api.index),
        ("GET", "/static/{file}", api.static),
    ):
        r.add_route(method, path, handler)
    web_app[API_KEY] = api
    return web_app


def _target_json(address: str | None, t: TargetInfo) -> dict[str, Any]:
    last = t.last_result
    return {
        "address": address,
        "health": t.health.value,
        "since": _ts(t.since),
        "last_check": None
        if last is None
        else {
            "at": _ts(t.last_at),
            "ok": last.ok,
            "latency_ms": round(last.latency_ms, 3),
            "error": last.error,
        },
    }


def _override_json(row: OverrideRow | None, now: float) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "state": row.state.value,
        "reason": row.reason,
        "who": row.who,
        "created_at": _ts(row.created_at),
        "expires_at": _ts(row.expires_at),
        "expires_in_s": None if row.expires_at is None else round(row.expires_at - now, 3),
        "ramp_s": row.ramp_s,
    }


# --------------------------------------------------------------------------- OpenAPI


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_STRS = {"type": "array", "items": _STR}


def _obj(props: dict[str, Any], required: Iterable[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": sorted(props if required is None else required),
        **kw,
    }


def _page(item: str) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": _ref(item)}, "next": _STR_OR_NULL})


_SCHEMAS: dict[str, Any] = {
    "Problem": _obj(
        {
            "type": _STR,
            "title": _STR,
            "status": {"type": "integer"},
            "detail": _STR,
            "field": {"type": "string", "description": "the offending input, when one is"},
        },
        required=("type", "title", "status", "detail"),
    ),
    "Health": _obj({"status": {"const": "ok"}, "uptime_s": {"type": "number"}}),
    "Ready": _obj(
        {
            "ready": {"type": "boolean"},
            "not_ready": _STRS,
            "checks": {"type": "object"},
        }
    ),
    "NotReady": {
        "allOf": [
            _ref("Problem"),
            _obj({"ready": {"const": False}, "not_ready": _STRS, "checks": {"type": "object"}}),
        ]
    },
    "Override": _obj(
        {
            "state": {"enum": ["up", "down"]},
            "reason": _STR,
            "who": _STR,
            "created_at": _TIME,
            "expires_at": _TIME,
            "expires_in_s": {"type": ["number", "null"]},
            "ramp_s": {"type": ["number", "null"]},
        }
    ),
    "OverrideRequest": _obj(
        {
            "state": {"enum": ["up", "down"], "description": "down drains the site"},
            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS},
            "expires_in_s": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "maximum": MAX_EXPIRES_IN_S,
            },
            "ramp_s": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": MAX_EXPIRES_IN_S,
                "description": "move the site's clients in steps over this time",
            },
        },
        required=("state", "reason"),
        additionalProperties=False,
    ),
    "ClearRequest": _obj(
        {"reason": {"type": "string", "minLength": 1}}, required=(), additionalProperties=False
    ),
    "Target": _obj(
        {
            "address": _STR_OR_NULL,
            "health": {"enum": [h.value for h in Health]},
            "since": _TIME,
            "last_check": _nullable(
                _obj(
                    {
                        "at": _TIME,
                        "ok": {"type": "boolean"},
                        "latency_ms": {"type": "number"},
                        "error": _STR_OR_NULL,
                    }
                )
            ),
        }
    ),
    "Site": _obj(
        {
            "name": _STR,
            "addresses": _obj({"ipv4": _STRS, "ipv6": _STRS}),
            "location": _obj({"lat": {"type": "number"}, "lon": {"type": "number"}}),
            "weight": {"type": "integer"},
            "capacity": {"type": "number"},
            "observed": {"enum": [h.value for h in Health]},
            "effective": {"enum": ["up", "down", "drained"]},
            "usable": {"type": "boolean"},
            "stale": {"type": "boolean"},
            "since": _TIME,
            "last_check_at": _TIME,
            "addresses_down": _STRS,
            "override": _nullable(_ref("Override")),
            "damping": _obj(
                {
                    "damped": {"type": "boolean", "description": "held DOWN for flapping"},
                    "until": _TIME,
                    "addresses": _STRS,
                    "level": {"type": "integer", "description": "holds remembered"},
                    "recent_changes": {"type": "integer"},
                }
            ),
            "ramp": _nullable(
                _obj(
                    {
                        "kind": {"enum": ["up", "down"]},
                        "share": {"type": "number"},
                        "until": _TIME,
                    }
                )
            ),
            "changing": {"type": "boolean"},
            "check": _nullable(
                _obj(
                    {
                        "kind": _STR,
                        "interval_s": {"type": "number"},
                        "per_address": {"type": "boolean"},
                    }
                )
            ),
            "targets": {"type": "array", "items": _ref("Target")},
            "pools": _STRS,
        }
    ),
    "SiteDetail": {
        "allOf": [
            _ref("Site"),
            _obj(
                {
                    "names": _STRS,
                    "names_truncated": {"type": "boolean"},
                    "transitions": {"type": "array", "items": _ref("Transition")},
                    "transitions_error": _STR_OR_NULL,
                }
            ),
        ]
    },
    "Transition": _obj(
        {
            "id": {"type": "integer"},
            "at": _TIME,
            "address": _STR_OR_NULL,
            "node": _STR,
            "old": _STR,
            "new": _STR,
            "reason": _STR,
        }
    ),
    "Cleared": _obj({"cleared": {"type": "boolean"}, "site": _ref("SiteDetail")}),
    "AuditEntry": _obj(
        {
            "id": {"type": "integer"},
            "at": _TIME,
            "who": _STR,
            "action": _STR,
            "target": _STR,
            "detail": {"type": "object"},
        }
    ),
    "Zone": _obj(
        {
            "origin": _STR,
            "file": _STR,
            "serial": {"type": ["integer", "null"]},
            "loaded_at": _TIME,
            "records": {"type": "integer"},
            "serving": {"type": "boolean"},
            "version": {"type": ["integer", "null"]},
            "error": _STR_OR_NULL,
            "error_at": _TIME,
        }
    ),
    "Nodes": _obj(
        {
            "node_id": _STR_OR_NULL,
            "quorum": _obj(
                {
                    "mode": {"enum": ["auto", "on", "off"]},
                    "active": {"type": "boolean", "description": "deciding by quorum now"},
                    "min_votes": {"type": "integer"},
                    "store_reachable": {"type": "boolean"},
                    "error": _STR_OR_NULL,
                    "last_sync_at": _TIME,
                    "no_quorum_sites": _STRS,
                }
            ),
            "nodes": {"type": "array", "items": _ref("Node")},
        }
    ),
    "Node": _obj(
        {
            "node_id": _STR,
            "last_seen": _TIME,
            "age_s": {
                "type": ["number", "null"],
                "description": "seconds since its last heartbeat, on the database's clock",
            },
            "fresh": {"type": "boolean", "description": "heartbeat within the lease"},
            "voting": {"type": "boolean"},
            "frozen": {"type": "boolean"},
            "stale_sites": _STRS,
            "votes": {
                "type": "object",
                "description": "site (or site/address) -> its observed health",
                "additionalProperties": {"enum": ["unknown", "up", "down"]},
            },
        }
    ),
    "ReloadResult": _obj(
        {
            "ok": {"type": "boolean"},
            "config_errors": _STRS,
            "loaded": _STRS,
            "unchanged": _STRS,
            "failed": {"type": "object", "additionalProperties": _STRS},
            "removed": _STRS,
        }
    ),
    "AnswerShare": _obj(
        {
            "window_s": {"type": "number", "description": "the window asked of the sampler"},
            "span_s": {"type": "number", "description": "seconds the counts cover"},
            "total": {"type": "integer"},
            "sites": {
                "type": "array",
                "items": _obj(
                    {
                        "site": _STR,
                        "answers": {"type": "integer"},
                        "share": {"type": ["number", "null"], "description": "0..1"},
                    }
                ),
            },
        }
    ),
    "Explain": _obj(
        {
            "query": _obj({"name": _STR, "type": _STR, "client": _STR, "ecs": _STR_OR_NULL}),
            "client_address": _STR,
            "located_by": _STR,
            "zone": _STR_OR_NULL,
            "cname_chain": _STRS,
            "geo_name": {"type": ["object", "null"]},
            "located_as": _nullable(
                _obj(
                    {
                        "country": _STR_OR_NULL,
                        "continent": _STR_OR_NULL,
                        "lat": {"type": ["number", "null"]},
                        "lon": {"type": ["number", "null"]},
                        "network": _STR,
                    }
                )
            ),
            "candidates": {
                "type": "array",
                "items": _obj(
                    {
                        "site": _STR,
                        "distance_km": {"type": ["number", "null"]},
                        "health": _STR,
                        "observed": _STR,
                        "override": _STR,
                        "stale": {"type": "boolean"},
                        "addresses_down": _STRS,
                        "damped": {"type": "boolean"},
                        "damped_until": {"type": ["number", "null"]},
                        "damped_addresses": _STRS,
                        "ramp": {"type": "number"},
                        "ramp_kind": {"enum": ["up", "down", None]},
                        "weight": {"type": "integer"},
                        "capacity": {"type": "number"},
                        "offered_share": {"type": ["number", "null"]},
                        "spill": {"type": "number"},
                        "chosen": {"type": "boolean"},
                    }
                ),
            },
            "rule": _STR_OR_NULL,
            "rules_considered": _STR_OR_NULL,
            "chosen": {
                "type": "array",
                "items": _obj({"site": _STR, "addresses": _STRS}),
            },
            "balancing": {
                "type": "array",
                "description": "sites that passed this client on: capacity or ramp, and why",
                "items": _obj(
                    {"site": _STR, "reason": {"enum": ["capacity", "ramp"]}, "detail": _STR}
                ),
            },
            "ttl_cap_s": {
                "type": ["integer", "null"],
                "description": "the pool's TTL under change, while a member is changing",
            },
            "outcome": _STR,
            "decision_scope": {"type": ["integer", "null"]},
            "ecs_scope": {"type": ["integer", "null"]},
            "geo_version": {"type": "integer"},
            "trace": _STRS,
        }
    ),
}

_PROBLEM = {"application/problem+json": {"schema": _ref("Problem")}}


def _resp(description: str, schema: str | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": _ref(schema)}}
    out.update(kw)
    return out


def _errors(*codes: int) -> dict[str, Any]:
    texts = {
        400: "invalid input; `field` names it",
        401: "missing or invalid bearer token",
        404: "unknown site",
        413: "request body over [api] max_body_bytes",
        503: "the state store (or health manager) is unavailable",
    }
    return {str(c): {"description": texts[c], "content": _PROBLEM} for c in codes}


_PAGING = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "`next` of the previous page",
    },
]
_SITE_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_READ_SECURITY: list[dict[str, list[str]]] = [{}, {"bearer": []}]
_WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 description of exactly the routes make_web_app registers."""
    read = {"security": _READ_SECURITY}
    write = {"security": _WRITE_SECURITY}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers (never needs a token)",
                "security": [{}],
                "responses": {"200": _resp("alive", "Health")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: zones loaded, GeoIP open, store reachable, checker fresh",
                **read,
                "responses": {
                    "200": _resp("ready", "Ready"),
                    "503": {
                        "description": "not ready; `not_ready` lists every reason",
                        "content": {"application/problem+json": {"schema": _ref("NotReady")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                **read,
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                **read,
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/sites": {
            "get": {
                "summary": "Every site, sorted by name (cursor: the last name of a page)",
                **read,
                "parameters": _PAGING,
                "responses": {
                    "200": _resp("a page of sites", None)
                    | {"content": {"application/json": {"schema": _page("Site")}}},
                    **_errors(400, 401),
                },
            }
        },
        "/v1/sites/{name}": {
            "get": {
                "summary": "One site: health, override, checks, transitions, pools, names",
                **read,
                "parameters": [_SITE_NAME],
                "responses": {"200": _resp("the site", "SiteDetail"), **_errors(401, 404)},
            }
        },
        "/v1/sites/{name}/override": {
            "put": {
                "summary": "Force a site down (drain) or up; takes effect in the next answer",
                **write,
                "parameters": [_SITE_NAME],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("OverrideRequest")}},
                },
                "responses": {
                    "200": _resp("override stored, audited and published", "SiteDetail"),
                    **_errors(400, 401, 404, 413, 503),
                },
            },
            "delete": {
                "summary": "Clear the override: obey the health checks again",
                **write,
                "parameters": [_SITE_NAME],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("ClearRequest")}},
                },
                "responses": {
                    "200": _resp("cleared (or there was none)", "Cleared"),
                    **_errors(400, 401, 404, 413, 503),
                },
            },
        },
        "/v1/audit": {
            "get": {
                "summary": "The audit log, newest first (cursor: an entry id)",
                **read,
                "parameters": _PAGING,
                "responses": {
                    "200": {
                        "description": "a page of audit entries",
                        "content": {"application/json": {"schema": _page("AuditEntry")}},
                    },
                    **_errors(400, 401, 503),
                },
            }
        },
        "/v1/zones": {
            "get": {
                "summary": "Zone files, sorted by origin (cursor: the last origin of a page)",
                **read,
                "parameters": _PAGING,
                "responses": {
                    "200": {
                        "description": "a page of zones",
                        "content": {"application/json": {"schema": _page("Zone")}},
                    },
                    **_errors(400, 401),
                },
            }
        },
        "/v1/nodes": {
            "get": {
                "summary": "Nodes sharing the state store: last seen, fresh, votes; the quorum",
                **read,
                "responses": {
                    "200": _resp("the nodes and the quorum settings", "Nodes"),
                    **_errors(400, 401, 503),
                },
            }
        },
        "/v1/reload": {
            "post": {
                "summary": "Re-read geodns.toml and every zone file (like SIGHUP); audited",
                **write,
                "responses": {
                    "200": _resp("what was reloaded", "ReloadResult"),
                    **_errors(400, 401),
                },
            }
        },
        "/v1/explain": {
            "get": {
                "summary": "Why a client gets its answer, from the live view",
                **read,
                "parameters": [
                    {"name": "ip", "in": "query", "required": True, "schema": _STR},
                    {"name": "name", "in": "query", "required": True, "schema": _STR},
                    {"name": "type", "in": "query", "schema": {"type": "string", "default": "A"}},
                    {
                        "name": "ecs",
                        "in": "query",
                        "schema": _STR,
                        "description": "client subnet, e.g. 212.58.224.0/24",
                    },
                ],
                "responses": {"200": _resp("the decision", "Explain"), **_errors(400, 401)},
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "Each site's share of geo answers over the last few minutes",
                **read,
                "responses": {
                    "200": _resp("answers by site since the oldest sample", "AnswerShare"),
                    **_errors(400, 401),
                },
            }
        },
        "/": {
            "get": {
                "summary": "The status page (HTML; never needs a token, asks for one)",
                "security": [{}],
                "responses": {
                    "200": {"description": "the page", "content": {"text/html": {}}},
                    **_errors(400),
                },
            }
        },
        "/static/{file}": {
            "get": {
                "summary": "The status page's script, style sheet and map",
                "security": [{}],
                "parameters": [{"name": "file", "in": "path", "required": True, "schema": _STR}],
                "responses": {
                    "200": {"description": "the file"},
                    "404": {"description": "no such file", "content": _PROBLEM},
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "geodns ops API",
            "version": API_VERSION,
            "description": (
                "Writes need `Authorization: Bearer <token>`. Reads are open on a loopback "
                "listen address and need a token elsewhere (except /healthz). Errors are "
                "application/problem+json. Lists return {items, next}; pass next as cursor."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def routes_of(web_app: web.Application) -> set[tuple[str, str]]:
    """(path, method) of every registered route (for the OpenAPI comparison)."""
    out: set[tuple[str, str]] = set()
    for route in web_app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method != "HEAD":
            out.add((path, route.method.lower()))
    return out


__all__ = [
    "ApiError",
    "ApiServer",
    "ListenPlan",
    "load_tokens",
    "make_web_app",
    "openapi_spec",
    "plan_listen",
    "problem",
    "routes_of",
    "token_name",
]
