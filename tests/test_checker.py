"""Health checker: hysteresis tables, probes against real loopback targets, scheduler.

Every network target listens on loopback with an OS-chosen port. Waits are bounded by
asyncio.wait_for on events fed by on_result, never by fixed sleeps.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import dns.message
import dns.rcode
import pytest
from aiohttp import web

from geodns import __version__
from geodns.checker import (
    Checker,
    CheckEvent,
    ProbeResult,
    SiteVerdict,
    Target,
    TargetState,
    _url,
    next_slot,
    open_http_session,
    plan_targets,
    probe_dns,
    probe_http,
    probe_tcp,
    run_probe,
    site_health,
)
from geodns.errors import ConfigError
from geodns.model import CheckSpec, Health, Site

UP, DOWN, UNKNOWN = Health.UP, Health.DOWN, Health.UNKNOWN
WAIT_S = 5.0  # generous cap on every wait: a pass takes milliseconds


# ------------------------------------------------------------------ hysteresis


# (initial, down_thresh, up_thresh, results as "+"/"-", health after each result)
HYSTERESIS = [
    ("unknown-one-success-is-up", UNKNOWN, 3, 5, "+", [UP]),
    ("unknown-down-after-down-thresh", UNKNOWN, 3, 5, "---", [UNKNOWN, UNKNOWN, DOWN]),
    ("unknown-failures-then-success-is-up", UNKNOWN, 3, 5, "--+", [UNKNOWN, UNKNOWN, UP]),
    ("up-stays-up-below-down-thresh", UP, 3, 5, "--+--", [UP] * 5),
    ("up-to-down-after-consecutive", UP, 3, 5, "+---", [UP, UP, UP, DOWN]),
    ("down-needs-up-thresh", DOWN, 2, 3, "+++", [DOWN, DOWN, UP]),
    ("down-streak-broken-restarts", DOWN, 2, 3, "++-+++", [DOWN] * 5 + [UP]),
    ("thresh-one-flips-each-time", UP, 1, 1, "-+-", [DOWN, UP, DOWN]),
    ("restart-persisted-down-does-not-flap", DOWN, 3, 5, "+", [DOWN]),
    ("full-cycle", UNKNOWN, 2, 2, "+--++", [UP, UP, DOWN, DOWN, UP]),
]


@pytest.mark.parametrize(
    ("initial", "down", "up", "results", "expected"),
    [case[1:] for case in HYSTERESIS],
    ids=[case[0] for case in HYSTERESIS],
)
def test_target_state_hysteresis(
    initial: Health, down: int, up: int, results: str, expected: list[Health]
) -> None:
    state = TargetState(down, up, initial)
    seen = []
    previous = initial
    for i, mark in enumerate(results):
        changed = state.observe(mark == "+", now=float(i))
        # observe() returns the new health exactly when it changed
        assert changed == (state.health if state.health is not previous else None)
        previous = state.health
        seen.append(state.health)
    assert seen == expected


def test_target_state_records_transition_time() -> None:
    state = TargetState(2, 2)
    state.observe(False, now=10.0)
    assert state.since is None and state.last_at == 10.0
    assert state.observe(False, now=20.0) is DOWN
    assert state.since == 20.0


@pytest.mark.parametrize(("down", "up"), [(0, 1), (1, 0)], ids=["down-zero", "up-zero"])
def test_target_state_rejects_zero_threshold(down: int, up: int) -> None:
    with pytest.raises(ValueError):
        TargetState(down, up)


# ------------------------------------------------------------------ site verdict

DUAL = Site("fra", ipv4=("192.0.2.1", "192.0.2.2"), ipv6=("2001:db8::1",))

VERDICTS = [
    ("site-level-decides-all", {None: DOWN}, SiteVerdict(DOWN, DOWN, DOWN)),
    ("nothing-known-yet", {}, SiteVerdict(UNKNOWN, UNKNOWN, UNKNOWN)),
    (
        "one-v4-down-family-still-up",
        {"192.0.2.1": UP, "192.0.2.2": DOWN, "2001:db8::1": UP},
        SiteVerdict(UP, UP, UP, frozenset({"192.0.2.2"})),
    ),
    (
        "all-v4-down-v6-up",
        {"192.0.2.1": DOWN, "192.0.2.2": DOWN, "2001:db8::1": UP},
        SiteVerdict(UP, DOWN, UP, frozenset({"192.0.2.1", "192.0.2.2"})),
    ),
    (
        "everything-down",
        {"192.0.2.1": DOWN, "192.0.2.2": DOWN, "2001:db8::1": DOWN},
        SiteVerdict(DOWN, DOWN, DOWN, frozenset({"192.0.2.1", "192.0.2.2", "2001:db8::1"})),
    ),
    (
        "down-and-unknown-is-unknown",
        {"192.0.2.1": DOWN, "192.0.2.2": UNKNOWN, "2001:db8::1": DOWN},
        SiteVerdict(UNKNOWN, UNKNOWN, DOWN, frozenset({"192.0.2.1", "2001:db8::1"})),
    ),
]


@pytest.mark.parametrize(
    ("states", "expected"), [c[1:] for c in VERDICTS], ids=[c[0] for c in VERDICTS]
)
def test_site_health(states: dict[str | None, Health], expected: SiteVerdict) -> None:
    assert site_health(DUAL, states) == expected


def test_site_health_family_without_addresses_does_not_count() -> None:
    v4_only = Site("ams", ipv4=("192.0.2.9",))
    verdict = site_health(v4_only, {"192.0.2.9": DOWN})
    assert verdict.observed is DOWN
    assert verdict.for_family(6) is UNKNOWN


# ------------------------------------------------------------------ planning


def test_plan_target_wins_over_per_address() -> None:
    site = Site("a", ipv4=("192.0.2.1", "192.0.2.2"))
    spec = CheckSpec(kind="tcp", port=80, target="198.51.100.7", per_address=True)
    assert plan_targets({"a": site}, {"a": spec}) == {
        ("a", None): Target("a", None, "198.51.100.7", spec)
    }


def test_plan_per_address_probes_every_address() -> None:
    spec = CheckSpec(kind="tcp", port=80, per_address=True)
    assert set(plan_targets({"fra": DUAL}, {"fra": spec})) == {
        ("fra", "192.0.2.1"),
        ("fra", "192.0.2.2"),
        ("fra", "2001:db8::1"),
    }


@pytest.mark.parametrize(
    ("site", "probed"),
    [
        (Site("s", ipv4=("192.0.2.1",), ipv6=("2001:db8::1",)), "192.0.2.1"),
        (Site("s", ipv6=("2001:db8::1",)), "2001:db8::1"),
    ],
    ids=["ipv4-preferred", "ipv6-when-no-ipv4"],
)
def test_plan_site_level_probes_first_address(site: Site, probed: str) -> None:
    targets = plan_targets({"s": site}, {"s": CheckSpec(kind="tcp", port=80)})
    assert targets[("s", None)].probe_address == probed


def test_plan_collects_every_problem() -> None:
    sites = {n: Site(n, ipv4=("192.0.2.1",)) for n in ("a", "b", "c")}
    sites["d"] = Site("d")
    specs = {
        "a": CheckSpec(kind="tcp"),
        "b": CheckSpec(kind="ftp", interval_s=0),
        "c": CheckSpec(kind="dns", qname="a..b.", qtype="NOPE", expect_rcode="MAYBE"),
        "d": CheckSpec(kind="tcp", port=1),
    }
    with pytest.raises(ConfigError) as err:
        plan_targets(sites, specs)
    assert err.value.problems == [
        "sites.a.check.port: required for a tcp check",
        "sites.b.check.kind: 'ftp' is not one of ['dns', 'http', 'https', 'none', 'tcp']",
        "sites.b.check.interval_s: must be > 0",
        "sites.c.check.qname: not a domain name: 'a..b.'",
        "sites.c.check.qtype: unknown type 'NOPE'",
        "sites.c.check.expect_rcode: unknown rcode 'MAYBE'",
        "sites.d: no address to probe; set check.target",
    ]


@pytest.mark.parametrize(
    ("scheduled", "now", "expected"),
    [(100.0, 100.3, 110.0), (100.0, 110.0, 110.0), (100.0, 125.0, 130.0), (100.0, 50.0, 110.0)],
    ids=["on-time", "exactly-due", "missed-slots-skipped", "clock-behind"],
)
def test_next_slot_keeps_phase(scheduled: float, now: float, expected: float) -> None:
    assert next_slot(scheduled, 10.0, now) == expected


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("192.0.2.1", "http://192.0.2.1:8080/health"),
        ("2001:db8::1", "http://[2001:db8::1]:8080/health"),
        ("fe80::1%eth0", "http://[fe80::1%25eth0]:8080/health"),
        ("example.net", "http://example.net:8080/health"),
    ],
    ids=["ipv4", "ipv6-bracketed", "ipv6-zone-id-escaped", "hostname"],
)
def test_url_brackets_ipv6(address: str, url: str) -> None:
    assert _url("http", address, 8080, "health") == url


# ------------------------------------------------------------------ loopback targets


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound then released, so connecting is refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class HTTPTarget:
    """An aiohttp server on loopback that records what it was sent."""

    port: int = 0
    requests: list[web.Request] = field(default_factory=list)
    status: int = 200
    body: str = "service healthy"
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append(request)
            if request.path == "/redirect":
                raise web.HTTPFound("/elsewhere")
            return web.Response(status=self.status, text=self.body)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def http_target() -> AsyncIterator[HTTPTarget]:
    target = HTTPTarget()
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def hung_target() -> AsyncIterator[int]:
    """A TCP server that accepts and then never answers."""
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    release.set()
    server.close()
    await server.wait_closed()


async def tcp_listener(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(close, host, port)


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    session = open_http_session()
    yield session
    await session.close()


# ------------------------------------------------------------------ tcp probe


async def test_tcp_probe_ok_against_listener() -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    try:
        result = await probe_tcp("127.0.0.1", port, timeout_s=2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok and result.error is None and result.latency_ms >= 0


async def test_tcp_probe_fails_against_closed_port() -> None:
    result = await probe_tcp("127.0.0.1", free_port(), timeout_s=2.0)
    assert not result.ok
    assert result.error


# ------------------------------------------------------------------ http probe


def http_spec(port: int, **kw: object) -> CheckSpec:
    return CheckSpec(kind="http", port=port, interval_s=4.0, timeout_s=2.0, **kw)  # type: ignore[arg-type]


async def test_http_probe_200_ok_sends_host_and_user_agent(
    http_target: HTTPTarget, http_session: aiohttp.ClientSession
) -> None:
    spec = http_spec(http_target.port, path="/health", host="www.example.com")
    result = await probe_http(http_session, spec, "127.0.0.1")
    assert result == ProbeResult(True, result.latency_ms, None)
    (request,) = http_target.requests
    assert request.path == "/health"
    assert request.headers["Host"] == "www.example.com"
    assert request.headers["User-Agent"] == f"geodns-healthcheck/{__version__}"


async def test_http_probe_503_fails(
    http_target: HTTPTarget, http_session: aiohttp.ClientSession
) -> None:
    http_target.status = 503
    result = await probe_http(http_session, http_spec(http_target.port), "127.0.0.1")
    assert not result.ok and result.error == "status 503"


async def test_http_probe_expect_status_list(
    http_target: HTTPTarget, http_session: aiohttp.ClientSession
) -> None:
    http_target.status = 204
    spec = http_spec(http_target.port, expect_status=(200, 204))
    assert (await probe_http(http_session, spec, "127.0.0.1")).ok


async def test_http_probe_does_not_follow_redirects(
    http_target: HTTPTarget, http_session: aiohttp.ClientSession
) -> None:
    spec = http_spec(http_target.port, path="/redirect")
    result = await probe_http(http_session, spec, "127.0.0.1")
    assert result.error == "status 302"
    assert [r.path for r in http_target.requests] == ["/redirect"]


@pytest.mark.parametrize(
    ("body", "max_bytes", "ok"),
    [
        ("status: healthy", 65536, True),
        ("status: degraded", 65536, False),
        ("x" * 5000 + "healthy", 65536, True),
        ("x" * 5000 + "healthy", 1000, False),
    ],
    ids=["contains", "lacks", "found-deep-in-body", "beyond-body-max-bytes"],
)
async def test_http_probe_body_contains(
    http_target: HTTPTarget,
    http_session: aiohttp.ClientSession,
    body: str,
    max_bytes: int,
    ok: bool,
) -> None:
    http_target.body = body
    spec = http_spec(http_target.port, body_contains="healthy", body_max_bytes=max_bytes)
    result = await probe_http(http_session, spec, "127.0.0.1")
    assert result.ok is ok
    if not ok:
        assert result.error is not None and "body lacks 'healthy'" in result.error


async def test_http_probe_times_out_against_silent_server(
    hung_target: int, http_session: aiohttp.ClientSession
) -> None:
    spec = CheckSpec(kind="http", port=hung_target, interval_s=1.0, timeout_s=0.2)
    started = time.monotonic()
    result = await probe_http(http_session, spec, "127.0.0.1")
    assert not result.ok and result.error == "timeout"
    assert time.monotonic() - started < 1.0


async def test_http_probe_connection_refused(http_session: aiohttp.ClientSession) -> None:
    result = await probe_http(http_session, http_spec(free_port()), "127.0.0.1")
    assert not result.ok and result.error


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=check.test"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=DNS:check.test"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("verify", [True, False], ids=["verify-rejects", "opt-out-accepts"])
async def test_https_probe_verifies_tls_by_default(
    self_signed: tuple[Path, Path], http_session: aiohttp.ClientSession, verify: bool
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    port = runner.addresses[0][1]
    try:
        spec = CheckSpec(
            kind="https", port=port, host="check.test", verify_tls=verify, timeout_s=2.0
        )
        result = await probe_http(http_session, spec, "127.0.0.1")
    finally:
        await runner.cleanup()
    # self-signed: untrusted unless verification is switched off
    assert result.ok is not verify
    if verify:
        assert result.error is not None and "certificate" in result.error.lower()


# ------------------------------------------------------------------ dns probe


class Responder(asyncio.DatagramProtocol):
    """Answers ok.* with NOERROR, fail.* with SERVFAIL, and ignores silent.*."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text()
        if name.startswith("silent."):
            return
        reply = dns.message.make_response(query)
        if name.startswith("fail."):
            reply.set_rcode(dns.rcode.SERVFAIL)
        self.transport.sendto(reply.to_wire(), addr)


@pytest.fixture
async def dns_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Responder, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


@pytest.mark.parametrize(
    ("qname", "expect", "ok", "error"),
    [
        ("ok.example.", "NOERROR", True, None),
        ("fail.example.", "NOERROR", False, "rcode SERVFAIL"),
        ("fail.example.", "SERVFAIL", True, None),
        ("silent.example.", "NOERROR", False, "timeout"),
    ],
    ids=["noerror-ok", "servfail-fails", "expected-servfail-ok", "no-reply-times-out"],
)
async def test_dns_probe(
    dns_port: int, qname: str, expect: str, ok: bool, error: str | None
) -> None:
    spec = CheckSpec(
        kind="dns", port=dns_port, qname=qname, expect_rcode=expect, interval_s=1, timeout_s=0.2
    )
    result = await probe_dns(spec, "127.0.0.1")
    assert (result.ok, result.error) == (ok, error)


async def test_none_probe_never_touches_network() -> None:
    assert await run_probe(CheckSpec(kind="none"), None, None) == ProbeResult(True, 0.0)


# ------------------------------------------------------------------ scheduler


class ZeroJitter(random.Random):
    """First runs at once: the tests then need no waiting for jitter."""

    def random(self) -> float:
        return 0.0


class Events:
    """Collects CheckEvents from on_result and waits for one that matches."""

    def __init__(self) -> None:
        self.all: list[CheckEvent] = []
        self._queue: asyncio.Queue[CheckEvent] = asyncio.Queue()

    def __call__(self, event: CheckEvent) -> None:
        self.all.append(event)
        self._queue.put_nowait(event)

    async def wait_for(self, match: Callable[[CheckEvent], bool]) -> CheckEvent:
        async def scan() -> CheckEvent:
            while True:
                event = await self._queue.get()
                if match(event):
                    return event

        return await asyncio.wait_for(scan(), WAIT_S)

    async def transition(self, site: str, new: Health, address: str | None = None) -> CheckEvent:
        return await self.wait_for(
            lambda e: (
                e.site == site
                and e.address == address
                and e.transition is not None
                and e.transition[1] is new
            )
        )


FAST = {"interval_s": 0.05, "down_thresh": 2, "up_thresh": 2}


@pytest.fixture
async def make_checker() -> AsyncIterator[Callable[..., Awaitable[Checker]]]:
    started: list[Checker] = []

    async def make(*args: object, **kw: object) -> Checker:
        kw.setdefault("rng", ZeroJitter())
        checker = Checker(*args, **kw)  # type: ignore[arg-type]
        await checker.start()
        started.append(checker)
        return checker

    yield make
    for checker in started:
        await checker.stop()


async def test_checker_http_up_down_up(
    http_target: HTTPTarget, make_checker: Callable[..., Awaitable[Checker]]
) -> None:
    events = Events()
    site = Site("web", ipv4=("127.0.0.1",))
    spec = CheckSpec(kind="http", port=http_target.port, **FAST)  # type: ignore[arg-type]
    checker = await make_checker({"web": site}, {"web": spec}, events)

    up = await events.transition("web", UP)
    assert up.transition == (UNKNOWN, UP) and up.result.ok

    await http_target.stop()
    down = await events.transition("web", DOWN)
    assert down.transition == (UP, DOWN) and not down.result.ok
    assert checker.states() == {("web", None): DOWN}

    await http_target.start()  # same port: the fixture remembers it
    again = await events.transition("web", UP)
    assert again.transition == (DOWN, UP)
    # per target, events arrive in order: UP, then failures, then DOWN, ... then UP
    mine = [e.transition for e in events.all if e.transition]
    assert mine == [(UNKNOWN, UP), (UP, DOWN), (DOWN, UP)]
    assert checker.verdicts()["web"].observed is UP


async def test_checker_per_address_only_failing_address_down(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    first = await tcp_listener("127.0.1.1")
    port = first.sockets[0].getsockname()[1]
    second = await tcp_listener("127.0.1.2", port)
    events = Events()
    site = Site("pair", ipv4=("127.0.1.1", "127.0.1.2"))
    spec = CheckSpec(kind="tcp", port=port, per_address=True, **FAST)  # type: ignore[arg-type]
    try:
        checker = await make_checker({"pair": site}, {"pair": spec}, events)
        await events.transition("pair", UP, "127.0.1.1")
        await events.transition("pair", UP, "127.0.1.2")

        second.close()
        await second.wait_closed()
        await events.transition("pair", DOWN, "127.0.1.2")
        verdict = checker.verdicts()["pair"]
        assert verdict.address_down == frozenset({"127.0.1.2"})
        assert verdict.for_family(4) is UP and verdict.observed is UP
        assert checker.states()[("pair", "127.0.1.1")] is UP
    finally:
        first.close()
        await first.wait_closed()


async def test_slow_target_does_not_delay_others(
    hung_target: int, make_checker: Callable[..., Awaitable[Checker]]
) -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    events = Events()
    sites = {n: Site(n, ipv4=("127.0.0.1",)) for n in ("slow", "fast")}
    specs = {
        # each slow probe hangs for its whole 2 s timeout
        "slow": CheckSpec(kind="http", port=hung_target, interval_s=4.0, timeout_s=2.0),
        "fast": CheckSpec(kind="tcp", port=port, **FAST),  # type: ignore[arg-type]
    }
    try:
        await make_checker(sites, specs, events)
        for _ in range(5):
            await events.wait_for(lambda e: e.site == "fast")
        assert [e for e in events.all if e.site == "slow"] == []
    finally:
        server.close()
        await server.wait_closed()


async def test_update_adds_and_removes_targets(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    events = Events()
    spec = CheckSpec(kind="tcp", port=port, **FAST)  # type: ignore[arg-type]
    a, b = Site("a", ipv4=("127.0.0.1",)), Site("b", ipv4=("127.0.0.1",))
    try:
        checker = await make_checker({"a": a}, {"a": spec}, events)
        await events.transition("a", UP)

        checker.update({"b": b}, {"b": spec})
        assert set(checker.states()) == {("b", None)}
        seen_a = len([e for e in events.all if e.site == "a"])
        await events.transition("b", UP)
        for _ in range(3):
            await events.wait_for(lambda e: e.site == "b")
        # the removed target's task is cancelled at once: nothing more from it
        assert len([e for e in events.all if e.site == "a"]) == seen_a

        # a bad reload changes nothing
        with pytest.raises(ConfigError):
            checker.update({"b": b}, {"b": CheckSpec(kind="tcp")})
        assert set(checker.states()) == {("b", None)}
    finally:
        server.close()
        await server.wait_closed()


async def test_update_keeps_unchanged_target_state(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    events = Events()
    spec = CheckSpec(kind="tcp", port=port, **FAST)  # type: ignore[arg-type]
    site = Site("a", ipv4=("127.0.0.1",))
    try:
        checker = await make_checker({"a": site}, {"a": spec}, events)
        await events.transition("a", UP)
        # a reload with a changed interval restarts the loop but keeps the health
        checker.update({"a": site}, {"a": CheckSpec(kind="tcp", port=port, interval_s=0.06)})
        event = await events.wait_for(lambda e: e.site == "a")
        assert event.health is UP and event.transition is None
    finally:
        server.close()
        await server.wait_closed()


async def test_initial_persisted_down_needs_up_thresh(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    events = Events()
    spec = CheckSpec(kind="tcp", port=port, **FAST)  # type: ignore[arg-type]
    try:
        await make_checker(
            {"a": Site("a", ipv4=("127.0.0.1",))},
            {"a": spec},
            events,
            initial={("a", None): DOWN},
        )
        up = await events.transition("a", UP)
        assert up.transition == (DOWN, UP)
        assert [(e.health, e.transition) for e in events.all] == [
            (DOWN, None),
            (UP, (DOWN, UP)),
        ]
    finally:
        server.close()
        await server.wait_closed()


async def test_kind_none_is_up_without_probing(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    events = Events()
    wall = iter([1234.5])
    checker = await make_checker(
        {"static": Site("static", ipv4=("192.0.2.1",))},
        {},  # no spec: not probed, counted up
        events,
        wall_clock=lambda: next(wall),
        initial={("static", None): DOWN},
    )
    event = await events.transition("static", UP)
    assert event == CheckEvent("static", None, ProbeResult(True, 0.0), UP, (DOWN, UP), 1234.5)
    assert checker.states() == {("static", None): UP}


async def test_failing_async_callback_does_not_stop_checks(
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    server = await tcp_listener()
    port = server.sockets[0].getsockname()[1]
    calls = 0
    enough = asyncio.Event()

    async def flaky(event: CheckEvent) -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            enough.set()
        raise RuntimeError("store unavailable")

    spec = CheckSpec(kind="tcp", port=port, **FAST)  # type: ignore[arg-type]
    try:
        await make_checker({"a": Site("a", ipv4=("127.0.0.1",))}, {"a": spec}, flaky)
        await asyncio.wait_for(enough.wait(), WAIT_S)
    finally:
        server.close()
        await server.wait_closed()


async def test_stop_is_clean_and_idempotent() -> None:
    events = Events()
    spec = CheckSpec(kind="tcp", port=free_port(), interval_s=0.05)
    checker = Checker({"a": Site("a", ipv4=("127.0.0.1",))}, {"a": spec}, events, rng=ZeroJitter())
    await checker.start()
    await events.wait_for(lambda e: e.site == "a")
    await checker.stop()
    await checker.stop()
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("check ")] == []
