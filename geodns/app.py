"""Composition root: config -> zones, GeoIP, view, handler, transports (and later API,
checker). `App` is what `geodns serve` runs and what integration tests start in-process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import time
from dataclasses import dataclass, field

from . import geo, pick
from .config import Config, parse_listen
from .cookies import CookieJar
from .errors import StoreError, ZoneError
from .handler import Handler, Settings, Stats
from .health import HealthManager, HealthPolicy
from .server import DnsServer, TcpLimits, bind_sockets
from .store import Store
from .view import Catalog, GeoState, View, ViewHolder, next_version
from .zones import Zone, name_to_wire, origin_from_path, parse_zone, zone_files

log = logging.getLogger(__name__)


@dataclass
class ZoneStatus:
    """What /v1/zones shows for one zone file."""

    origin: str
    path: str
    serial: int | None = None
    loaded_at: float | None = None
    error: str | None = None
    records: int = 0


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)


def load_zone_dir(config: Config, catalog: Catalog, status: dict[str, ZoneStatus]) -> LoadReport:
    """Load every zone file; a bad file keeps its last good version (or SERVFAIL)."""
    report = LoadReport()
    directory = config.resolve(config.zones.directory)
    for path in zone_files(directory):
        origin = origin_from_path(path)
        key = name_to_wire(origin).lower()
        st = status.setdefault(origin, ZoneStatus(origin, str(path)))
        if key not in catalog.zones:
            catalog.set(key, None)  # configured: SERVFAIL until loaded
        try:
            zone: Zone = parse_zone(path, config.pools)
        except ZoneError as exc:
            st.error = "\n".join(exc.problems)
            report.failed[origin] = exc.problems
            for p in exc.problems:
                log.error("zone %s rejected: %s", origin, p)
            continue
        catalog.set(key, zone)
        st.serial, st.loaded_at, st.error, st.records = (
            zone.serial,
            zone.loaded_at,
            None,
            zone.records,
        )
        report.loaded.append(origin)
        log.info("zone %s loaded: serial=%d records=%d", origin, zone.serial, zone.records)
    return report


class App:
    """One `geodns serve` process."""

    def __init__(
        self, config: Config, listen: list[str] | None = None, run_checker: bool = True
    ) -> None:
        self.config = config
        self.listen = listen or list(config.server.listen)
        self.catalog = Catalog()
        self.zone_status: dict[str, ZoneStatus] = {}
        self.stats = Stats()
        geo_state = GeoState(config.sites, config.pools, {}, next_version())
        self.holder = ViewHolder(View(self.catalog, geo_state))
        self.locator: geo.Locator | None = None
        self.geoip_error: str | None = None
        self.handler = self._make_handler()
        self.dns: DnsServer | None = None
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.ready = False
        self.store: Store | None = None
        self.health: HealthManager | None = None
        self.run_checker = run_checker

    def _make_handler(self) -> Handler:
        cfg = self.config
        secret = bytes.fromhex(cfg.cookies.secret) if cfg.cookies.secret else None
        old = cfg.cookies.previous_secret
        previous = bytes.fromhex(old) if old else None
        settings = Settings(
            max_udp_payload=cfg.server.max_udp_payload,
            nsid=cfg.server.nsid.encode(),
            max_cname_chain=cfg.server.max_cname_chain,
            cookies_require=cfg.cookies.require,
        )
        locate = None
        try:
            countries = geo.CountryTable.load(cfg.geoip.countries)
            self.locator = geo.Locator(cfg.geoip.database, countries, cfg.geoip.cache_size)
            locate = self.locator.locate
        except geo.GeoIPError as exc:
            # Serve anyway: geo names answer with their zone-file records; /readyz says so.
            self.geoip_error = str(exc)
            log.error("GeoIP unavailable, geo names answer from zone files: %s", exc)
        return Handler(
            self.holder,
            settings,
            locate=locate,
            decide=pick.decide,
            cookies=CookieJar(secret, previous),
            is_special=geo.is_special,
            special_block=geo.special_block,
            stats=self.stats,
        )

    async def start(self) -> None:
        """Bind, load zones, serve. Returns once every zone has been tried."""
        srv = self.config.server
        limits = TcpLimits(
            srv.tcp_idle_timeout_s,
            srv.tcp_query_timeout_s,
            srv.tcp_max_connections,
            srv.tcp_max_connections_per_client,
            srv.tcp_max_queries_per_connection,
        )
        sockets = []
        for addr in self.listen:
            host, port = parse_listen(addr)
            sockets.append(bind_sockets(host, port))
        _drop_privileges(srv.user)
        # Zones are registered before serving so that a zone still loading answers
        # SERVFAIL, never REFUSED.
        directory = self.config.resolve(self.config.zones.directory)
        for path in zone_files(directory):
            self.catalog.set(name_to_wire(origin_from_path(path)).lower(), None)
        self.store = self._open_store()
        self.health = HealthManager(
            self.holder,
            self.config.sites,
            self.config.site_checks,
            self.store,
            HealthPolicy(
                partition_min_sites=self.config.checks.partition_min_sites,
                partition_share=self.config.checks.partition_share,
                stale_intervals=self.config.checks.stale_intervals,
            ),
            run_checker=self.run_checker,
            max_concurrency=self.config.checks.max_concurrency,
            follow=not self.run_checker,
        )
        # persisted health and overrides are in the view before the first answer
        await self.health.start()
        self.dns = DnsServer(self.handler.handle, limits)
        await self.dns.start(sockets)
        report = await asyncio.to_thread(load_zone_dir, self.config, self.catalog, self.zone_status)
        self.ready = True
        log.info("ready: %d zones loaded, %d rejected", len(report.loaded), len(report.failed))

    def _open_store(self) -> Store | None:
        cfg = self.config
        url = cfg.store.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            # a relative SQLite path is relative to the config file, like every path
            url = "sqlite:///" + str(cfg.resolve(url[len("sqlite:///") :]))
        try:
            store = Store(url, cfg.node_id, journal_dir=cfg.resolve(cfg.store.journal_dir))
            store.open()
        except StoreError as exc:
            # Keep serving from memory; writes are journaled once the store exists.
            log.error("state store unavailable: %s", exc)
            return None
        return store

    @property
    def dns_addresses(self) -> list[tuple[str, int]]:
        return self.dns.addresses if self.dns else []

    async def stop(self) -> None:
        if self.dns is not None:
            await self.dns.stop()
        if self.health is not None:
            await self.health.stop()
        if self.store is not None:
            self.store.close()
        if self.locator is not None:
            self.locator.close()

    async def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop within 5 s (in-flight TCP finishes)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        log.info("shutting down")
        await asyncio.wait_for(self.stop(), 5)


async def run_checker_forever(config: Config) -> None:
    """`geodns checker`: probe every site and write verdicts to the shared store.

    `geodns serve --no-checker` instances with the same store follow these verdicts.
    """
    app = App(config, listen=[])
    store = app._open_store()
    if store is None:
        raise StoreError("the standalone checker needs a reachable [store] database_url")
    health = HealthManager(
        app.holder,
        config.sites,
        config.site_checks,
        store,
        HealthPolicy(
            partition_min_sites=config.checks.partition_min_sites,
            partition_share=config.checks.partition_share,
            stale_intervals=config.checks.stale_intervals,
        ),
        max_concurrency=config.checks.max_concurrency,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await health.start()
    log.info("checker: probing %d sites, writing to %s", len(config.sites), store.url)
    await stopping.wait()
    await health.stop()
    store.close()


def _drop_privileges(user: str) -> None:
    """Started as root with [server] user set: bind first (done), then become `user`."""
    if not user or os.getuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("dropped privileges to %s (uid %d)", user, pw.pw_uid)


def install_loop_policy() -> str:
    """Use uvloop when installed (it halves per-datagram loop overhead)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
