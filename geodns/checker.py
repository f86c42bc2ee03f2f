"""Health checks: probes, up/down hysteresis, and the scheduler that runs them.

Three layers, each usable alone:

1. Probes (`probe_tcp`, `probe_http`, `probe_dns`, `run_probe`): one network
   attempt bounded by `CheckSpec.effective_timeout_s`, returning a `ProbeResult`. They
   never raise for a failed target: a failure is data.
2. `TargetState`: the pure hysteresis state machine (no I/O, no clock; `now` is passed
   in). `site_health()` folds per-address states into a site verdict.
3. `Checker`: one asyncio task per target, jittered start, fixed-rate schedule, a
   semaphore bounding concurrent probes, results handed to an `on_result` callback
   (the app records them in the store and republishes the view).

The checker knows nothing about the DNS server or the database: it only sees `Site`
and `CheckSpec` values and emits `CheckEvent`s.

Target keys are `(site name, address)`; the address is None for a site-level check
(one probe decides the whole site) and the probed address for `per_address` checks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from geodns import __version__
from geodns.errors import ConfigError
from geodns.model import CheckSpec, Health, Site

log = logging.getLogger(__name__)

USER_AGENT = f"geodns-healthcheck/{__version__}"
KINDS = frozenset({"tcp", "http", "https", "dns", "none"})
DEFAULT_PORTS = {"http": 80, "https": 443, "dns": 53}
# A site with no spec is not probed and counts as up, like kind = "none".
NO_CHECK = CheckSpec()

TargetKey = tuple[str, str | None]


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe: ok or not, how long it took, and why it failed."""

    ok: bool
    latency_ms: float
    error: str | None = None


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _describe(exc: BaseException) -> str:
    """A short, log-friendly reason for a failed probe."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _Closer(asyncio.Protocol):
    """A protocol that ignores everything: the TCP probe only needs the handshake."""


async def probe_tcp(address: str, port: int, timeout_s: float) -> ProbeResult:
    """Connect to (address, port) and close; ok when the handshake completes in time."""
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            # A bare Protocol instead of open_connection(): no StreamReader/Writer pair
            # per probe, which matters at thousands of targets (see module tests).
            transport, _ = await loop.create_connection(_Closer, address, port)
    except (OSError, TimeoutError) as exc:
        return ProbeResult(False, _elapsed_ms(started), _describe(exc))
    latency = _elapsed_ms(started)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Close with RST (SO_LINGER 0), as HAProxy does for its checks: an orderly
        # close leaves one TIME_WAIT socket here per probe for 60 s, and when many
        # targets share one address:port (a load balancer) 500 probes/s would run
        # out of the ~28,000 ephemeral ports towards it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()
    return ProbeResult(True, latency)


def open_http_session(limit: int = 256) -> aiohttp.ClientSession:
    """A client session configured for probing; call inside a running event loop."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        # A fresh connection per probe: a pooled keep-alive connection would hide a
        # target whose listener died (or a new backend behind the same address).
        force_close=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Each probe is bounded by asyncio.timeout; aiohttp's default 300 s total
        # would only mask a missing outer bound.
        timeout=aiohttp.ClientTimeout(total=None),
        headers={"User-Agent": USER_AGENT},
        # Probes must not share cookies between targets nor go through an
        # environment-configured proxy: either would test something else.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


def _url(scheme: str, address: str, port: int, path: str) -> str:
    host = address
    if ":" in address and not address.startswith("["):
        # RFC 3986 §3.2.2: an IPv6 literal goes in brackets; RFC 6874: a zone id's
        # "%" is written "%25" there.
        host = "[" + address.replace("%", "%25") + "]"
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{host}:{port}{path}"


async def _read_prefix(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """Up to max_bytes of the body: a check must not download a large page."""
    buf = bytearray()
    while len(buf) < max_bytes:
        chunk = await resp.content.read(max_bytes - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def probe_http(session: aiohttp.ClientSession, spec: CheckSpec, address: str) -> ProbeResult:
    """One HTTP(S) request to address; ok when status and body match the spec."""
    started = time.perf_counter()
    scheme = "https" if spec.kind == "https" else "http"
    port = spec.port or DEFAULT_PORTS[scheme]
    headers = {"Host": spec.host} if spec.host else None
    try:
        async with (
            asyncio.timeout(spec.effective_timeout_s),
            session.request(
                spec.method,
                _url(scheme, address, port, spec.path),
                headers=headers,
                # A redirect is an answer of the target; following it would probe
                # another server. List 301/302 in expect_status to accept it.
                allow_redirects=False,
                ssl=spec.verify_tls,
                # The URL names an address, so SNI and certificate name checks use the
                # configured virtual host instead (otherwise every https check against
                # an address would fail verification).
                server_hostname=spec.host if scheme == "https" and spec.host else None,
            ) as resp,
        ):
            if resp.status not in spec.expect_status:
                return ProbeResult(False, _elapsed_ms(started), f"status {resp.status}")
            if spec.body_contains is not None:
                body = await _read_prefix(resp, spec.body_max_bytes)
                if spec.body_contains.encode() not in body:
                    return ProbeResult(
                        False,
                        _elapsed_ms(started),
                        f"body lacks {spec.body_contains!r} in first {spec.body_max_bytes} bytes",
                    )
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        return ProbeResult(False, _elapsed_ms(started), _describe(exc))
    return ProbeResult(True, _elapsed_ms(started))


async def probe_dns(spec: CheckSpec, address: str) -> ProbeResult:
    """One UDP query to address; ok when the reply's rcode is spec.expect_rcode."""
    started = time.perf_counter()
    timeout_s = spec.effective_timeout_s
    try:
        # Inside the try: a bad qname or type (should config validation miss one)
        # fails this probe instead of crashing the target's loop.
        query = dns.message.make_query(spec.qname or ".", spec.qtype)
        expected = dns.rcode.from_text(spec.expect_rcode)
        async with asyncio.timeout(timeout_s):
            reply = await dns.asyncquery.udp(
                query, address, timeout=timeout_s, port=spec.port or DEFAULT_PORTS["dns"]
            )
    except (OSError, TimeoutError, dns.exception.DNSException) as exc:
        return ProbeResult(False, _elapsed_ms(started), _describe(exc))
    rcode = reply.rcode()
    if rcode != expected:
        return ProbeResult(False, _elapsed_ms(started), f"rcode {dns.rcode.to_text(rcode)}")
    return ProbeResult(True, _elapsed_ms(started))


async def run_probe(
    spec: CheckSpec, address: str | None, session: aiohttp.ClientSession | None
) -> ProbeResult:
    """Dispatch on spec.kind; kind "none" is ok without touching the network."""
    if spec.kind == "none":
        return ProbeResult(True, 0.0)
    if address is None:
        return ProbeResult(False, 0.0, "no address to probe")
    if spec.kind == "tcp":
        if spec.port is None:
            return ProbeResult(False, 0.0, "tcp check needs a port")
        return await probe_tcp(address, spec.port, spec.effective_timeout_s)
    if spec.kind in ("http", "https"):
        if session is None:
            return ProbeResult(False, 0.0, "no http session")
        return await probe_http(session, spec, address)
    if spec.kind == "dns":
        return await probe_dns(spec, address)
    return ProbeResult(False, 0.0, f"unknown check kind {spec.kind!r}")


# ------------------------------------------------------------------ state machine


class TargetState:
    """Up/down hysteresis for one target (pure: the caller passes `now`).

    - UNKNOWN -> UP after one success (as gdnsd starts: a fresh server must not wait
      up_thresh intervals before its sites count as up; UNKNOWN answers as UP anyway).
    - UNKNOWN or UP -> DOWN after down_thresh consecutive failures.
    - DOWN -> UP after up_thresh consecutive successes.

    `initial` is the persisted state from before a restart, so a restart does not flap:
    a site that was DOWN still needs up_thresh successes.
    """

    __slots__ = (
        "consecutive_fail",
        "consecutive_ok",
        "down_thresh",
        "health",
        "last_at",
        "since",
        "up_thresh",
    )

    def __init__(self, down_thresh: int, up_thresh: int, initial: Health = Health.UNKNOWN) -> None:
        if down_thresh < 1 or up_thresh < 1:
            raise ValueError("thresholds must be at least 1")
        self.down_thresh = down_thresh
        self.up_thresh = up_thresh
        self.health = initial
        self.consecutive_ok = 0
        self.consecutive_fail = 0
        self.since: float | None = None  # time of the last transition seen here
        self.last_at: float | None = None  # time of the last observation

    def observe(self, ok: bool, now: float) -> Health | None:
        """Record one probe result; return the new Health if this result changed it."""
        self.last_at = now
        if ok:
            self.consecutive_ok += 1
            self.consecutive_fail = 0
        else:
            self.consecutive_fail += 1
            self.consecutive_ok = 0
        new = self._next()
        if new is None:
            return None
        self.health = new
        self.since = now
        return new

    def _next(self) -> Health | None:
        if self.health is Health.UNKNOWN:
            if self.consecutive_ok >= 1:
                return Health.UP
            if self.consecutive_fail >= self.down_thresh:
                return Health.DOWN
        elif self.health is Health.UP:
            if self.consecutive_fail >= self.down_thresh:
                return Health.DOWN
        elif self.consecutive_ok >= self.up_thresh:
            return Health.UP
        return None


# ------------------------------------------------------------------- site verdict


@dataclass(frozen=True, slots=True)
class SiteVerdict:
    """A site's observed health, per family and overall, and its addresses seen down.

    `observed` and `address_down` map onto `model.SiteState`. With per-address checks
    a family is UP while one of its addresses is UP, DOWN when all are DOWN, else
    UNKNOWN; the server leaves out only the addresses in `address_down`.
    """

    observed: Health
    ipv4: Health
    ipv6: Health
    address_down: frozenset[str] = frozenset()

    def for_family(self, family: int) -> Health:
        """Observed health for family 4 or 6."""
        return self.ipv4 if family == 4 else self.ipv6


def _fold(healths: list[Health]) -> Health:
    if any(h is Health.UP for h in healths):
        return Health.UP
    if healths and all(h is Health.DOWN for h in healths):
        return Health.DOWN
    return Health.UNKNOWN


def site_health(site: Site, states: Mapping[str | None, Health]) -> SiteVerdict:
    """Fold a site's target states (keyed by address, None = site-level) into a verdict.

    A site-level state decides both families. Addresses without a state yet count as
    UNKNOWN; a family without addresses is UNKNOWN and does not weigh on `observed`.
    """
    if None in states:
        h = states[None]
        return SiteVerdict(observed=h, ipv4=h, ipv6=h)
    per_family = {
        family: [states.get(a, Health.UNKNOWN) for a in site.addresses(family)] for family in (4, 6)
    }
    v4, v6 = _fold(per_family[4]), _fold(per_family[6])
    present = [_fold(hs) for hs in per_family.values() if hs]
    down = frozenset(a for a, h in states.items() if a is not None and h is Health.DOWN)
    return SiteVerdict(observed=_fold(present), ipv4=v4, ipv6=v6, address_down=down)


# ---------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to probe: which site (and address, for per-address checks), how."""

    site: str
    address: str | None  # None: the probe decides the whole site
    probe_address: str | None  # where the probe goes; None for kind "none"
    spec: CheckSpec

    @property
    def key(self) -> TargetKey:
        return (self.site, self.address)


def spec_problems(site: str, spec: CheckSpec) -> list[str]:
    """Every reason why spec cannot be run, as `sites.<name>.check.<key>: what` lines."""
    where = f"sites.{site}.check"
    problems: list[str] = []
    if spec.kind not in KINDS:
        problems.append(f"{where}.kind: {spec.kind!r} is not one of {sorted(KINDS)}")
    if spec.kind == "tcp" and spec.port is None:
        problems.append(f"{where}.port: required for a tcp check")
    if not spec.interval_s > 0:
        problems.append(f"{where}.interval_s: must be > 0")
    if spec.timeout_s is not None and not spec.timeout_s > 0:
        problems.append(f"{where}.timeout_s: must be > 0")
    if spec.down_thresh < 1:
        problems.append(f"{where}.down_thresh: must be >= 1")
    if spec.up_thresh < 1:
        problems.append(f"{where}.up_thresh: must be >= 1")
    if spec.kind == "dns":
        try:
            dns.name.from_text(spec.qname or ".")
        except dns.exception.DNSException:
            problems.append(f"{where}.qname: not a domain name: {spec.qname!r}")
        try:
            dns.rdatatype.from_text(spec.qtype)
        except dns.exception.DNSException:
            problems.append(f"{where}.qtype: unknown type {spec.qtype!r}")
        try:
            dns.rcode.from_text(spec.expect_rcode)
        except dns.exception.DNSException:
            problems.append(f"{where}.expect_rcode: unknown rcode {spec.expect_rcode!r}")
    return problems


def plan_targets(
    sites: Mapping[str, Site], specs: Mapping[str, CheckSpec]
) -> dict[TargetKey, Target]:
    """The targets to probe; raises ConfigError listing every unusable spec.

    `spec.target` wins over `per_address` (one probe elsewhere decides the site). A
    site-level check without target probes the first IPv4 address, else the first IPv6.
    """
    targets: dict[TargetKey, Target] = {}
    problems: list[str] = []
    for name, site in sites.items():
        spec = specs.get(name, NO_CHECK)
        found = spec_problems(name, spec)
        if found:
            problems += found
            continue
        if spec.kind == "none":
            new = [Target(name, None, None, spec)]
        elif spec.target:
            new = [Target(name, None, spec.target, spec)]
        elif spec.per_address:
            new = [Target(name, a, a, spec) for a in (*site.ipv4, *site.ipv6)]
        else:
            first = (*site.ipv4, *site.ipv6)[:1]
            new = [Target(name, None, a, spec) for a in first]
        if not new:
            problems.append(f"sites.{name}: no address to probe; set check.target")
        for t in new:
            targets[t.key] = t
    if problems:
        raise ConfigError(problems)
    return targets


def next_slot(scheduled: float, interval_s: float, now: float) -> float:
    """The next run time after `scheduled`, in phase with it and not in the past.

    Runs are due every interval_s from the first scheduled time, so the schedule does
    not drift by the probe's duration; slots already missed (a stalled callback, an
    overloaded loop) are skipped instead of run back to back.
    """
    nxt = scheduled + interval_s
    if nxt < now:
        nxt += math.ceil((now - nxt) / interval_s) * interval_s
    return nxt


# --------------------------------------------------------------------- scheduler


@dataclass(frozen=True, slots=True)
class CheckEvent:
    """One probe result of one target, with the target's health after it."""

    site: str
    address: str | None  # None for a site-level check
    result: ProbeResult
    health: Health
    transition: tuple[Health, Health] | None  # (old, new) when this result changed it
    at: float  # wall-clock time (seconds since the epoch) of the result


OnResult = Callable[[CheckEvent], Awaitable[None] | None]


class _Running:
    """A target with its state and the task probing it."""

    __slots__ = ("state", "target", "task")

    def __init__(self, target: Target, state: TargetState) -> None:
        self.target = target
        self.state = state
        self.task: asyncio.Task[None] | None = None


class Checker:
    """Probes every target on its own schedule and reports each result to on_result.

    Each target is an independent task: a slow or dead target only costs its own
    timeout and one semaphore slot, never another target's schedule. Events of one
    target are delivered in order (its loop awaits on_result before probing again).
    on_result may be cancelled by stop() or by update() removing its target.
    """

    def __init__(
        self,
        sites: Mapping[str, Site],
        specs: Mapping[str, CheckSpec],
        on_result: OnResult,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_concurrency: int = 256,
        initial: Mapping[TargetKey, Health] | None = None,
    ) -> None:
        self._on_result = on_result
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._max_concurrency = max_concurrency
        self._sem = asyncio.Semaphore(max_concurrency)
        # Persisted states are used once, when their target is first created; a target
        # removed and re-added later starts afresh.
        self._initial: dict[TargetKey, Health] = dict(initial or {})
        self._sites: dict[str, Site] = {}
        self._running: dict[TargetKey, _Running] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self.update(sites, specs)

    # -- lifecycle

    async def start(self) -> None:
        """Open the HTTP session and start one task per target."""
        if self._started:
            return
        self._started = True
        self._session = open_http_session(self._max_concurrency)
        for run in self._running.values():
            self._launch(run)

    async def stop(self) -> None:
        """Cancel every target task, wait for them, and close the HTTP session."""
        self._started = False
        tasks = [r.task for r in self._running.values() if r.task is not None]
        tasks += self._retired
        for r in self._running.values():
            r.task = None
        self._retired.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def update(self, sites: Mapping[str, Site], specs: Mapping[str, CheckSpec]) -> None:
        """Replace the target set (config reload); unchanged targets keep their state.

        A target whose spec or probe address changed restarts its loop with its current
        health (counters reset). Raises ConfigError, changing nothing, on a bad spec.
        """
        planned = plan_targets(sites, specs)
        self._sites = dict(sites)
        for key in list(self._running):
            if key not in planned:
                self._retire(self._running.pop(key))
        for key, target in planned.items():
            old = self._running.get(key)
            if old is not None and old.target == target:
                continue
            if old is not None:
                self._retire(old)
                initial = old.state.health
            else:
                initial = self._initial.pop(key, Health.UNKNOWN)
            spec = target.spec
            run = _Running(target, TargetState(spec.down_thresh, spec.up_thresh, initial))
            self._running[key] = run
            if self._started:
                self._launch(run)

    # -- reading

    def states(self) -> dict[TargetKey, Health]:
        """Current health of every target, keyed by (site, address or None)."""
        return {key: run.state.health for key, run in self._running.items()}

    def verdicts(self) -> dict[str, SiteVerdict]:
        """site_health() of every checked site."""
        by_site: dict[str, dict[str | None, Health]] = {}
        for (site, address), run in self._running.items():
            by_site.setdefault(site, {})[address] = run.state.health
        return {name: site_health(self._sites[name], st) for name, st in by_site.items()}

    # -- internals

    def _launch(self, run: _Running) -> None:
        site, address = run.target.key
        run.task = asyncio.create_task(self._loop(run), name=f"check {site} {address or ''}")

    def _retire(self, run: _Running) -> None:
        if run.task is None:
            return
        run.task.cancel()
        # Kept until stop() awaits it, so cancellation finishes cleanly and no
        # "task was destroyed but it is pending" warning appears.
        self._retired.add(run.task)
        run.task.add_done_callback(self._retired.discard)
        run.task = None

    async def _loop(self, run: _Running) -> None:
        spec = run.target.spec
        if spec.kind == "none":
            # Nothing to probe: declare the target up once, whatever was persisted.
            await self._emit(run, ProbeResult(True, 0.0), force=Health.UP)
            return
        interval = spec.interval_s
        # Jitter the first run over one interval so thousands of targets configured
        # together do not probe in lockstep.
        scheduled = self._clock() + self._rng.random() * interval
        while True:
            delay = scheduled - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self._sem:
                try:
                    result = await run_probe(spec, run.target.probe_address, self._session)
                except Exception as exc:  # a probe bug must not end this target's loop
                    log.exception("check: site=%s probe crashed", run.target.site)
                    result = ProbeResult(False, 0.0, f"probe error: {exc!r}")
            # The callback runs outside the semaphore: a slow store delays only this
            # target's next probe, not other targets' probes.
            await self._emit(run, result)
            scheduled = next_slot(scheduled, interval, self._clock())

    async def _emit(self, run: _Running, result: ProbeResult, force: Health | None = None) -> None:
        state = run.state
        old = state.health
        if force is not None:
            new: Health | None = force if force is not old else None
            state.health = force
            state.last_at = self._clock()
            if new is not None:
                state.since = state.last_at
        else:
            new = state.observe(result.ok, self._clock())
        transition = None
        if new is not None:
            transition = (old, new)
            log.info(
                "check: site=%s address=%s %s -> %s (%s)",
                run.target.site,
                run.target.address,
                old.value,
                new.value,
                result.error or "ok",
            )
        event = CheckEvent(
            site=run.target.site,
            address=run.target.address,
            result=result,
            health=state.health,
            transition=transition,
            at=self._wall_clock(),
        )
        try:
            maybe = self._on_result(event)
            if inspect.isawaitable(maybe):
                await maybe
        except Exception:  # the callback's failure must not stop the checks
            log.exception("check: site=%s on_result failed", run.target.site)
