"""Composition root: config -> zones, GeoIP, view, handler, transports (and later API,
checker). `App` is what `geodns serve` runs and what integration tests start in-process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import geo, ops, pick, udpbatch
from .cache import PacketCache
from .config import Config, load_config, parse_listen
from .cookies import CookieJar
from .errors import ConfigError, StoreError
from .geoip_update import GeoipWatcher
from .handler import Handler, Settings, Stats
from .health import HealthManager, HealthPolicy
from .policytests import country_locations, make_validator
from .reload import ZoneReloader, ZoneStatus
from .rrl import FD_ENV, SharedTable
from .rrl import from_config as rrl_from_config
from .server import DnsServer, HandleFn, TcpLimits, bind_sockets, bind_udp, logging_handler
from .store import Store
from .view import Catalog, GeoState, View, ViewHolder, next_version
from .workers import (
    SOCKETS_ENV,
    WorkerPool,
    attach_sockets,
    share_sockets,
    worker_stats_loop,
    worker_stdin_loop,
)
from .zones import name_to_wire

log = logging.getLogger(__name__)

# --workers N: the main process hands its workers one cookie secret (a server cookie
# minted by one worker must be valid at the next) when [cookies] secret is empty.
COOKIE_ENV = "GEODNS_COOKIE_SECRET"


class App:
    """One `geodns serve` process."""

    api: ops.ApiServer | None = None  # the ops HTTP API; None when [api] listen = ""

    def __init__(
        self,
        config: Config,
        listen: list[str] | None = None,
        run_checker: bool = True,
        packet_cache: bool | None = None,
        workers: int | None = None,
        worker_mode: bool = False,
    ) -> None:
        self.config = config
        self.listen = list(config.server.listen) if listen is None else listen
        # --workers N: this process checks and serves the API; N children serve DNS
        self.workers = config.server.workers if workers is None else workers
        self.worker_mode = worker_mode
        self.pool: WorkerPool | None = None
        # --workers N: the (UDP or None, TCP) sockets this process binds and its workers
        # inherit (it never reads them)
        self.worker_sockets: list[tuple[socket.socket | None, socket.socket]] = []
        self._flock_files: list[int] = []  # their memfds (workers.share_sockets)
        self.catalog = Catalog()
        self.zone_status: dict[str, ZoneStatus] = {}
        self.stats = Stats()
        geo_state = GeoState(config.sites, config.pools, {}, next_version())
        self.holder = ViewHolder(View(self.catalog, geo_state))
        self.locator: geo.Locator | None = None
        self.geoip_error: str | None = None
        self.handler = self._make_handler()
        use_cache = config.server.packet_cache if packet_cache is None else packet_cache
        self.cache = (
            PacketCache(self.handler, config.server.packet_cache_size) if use_cache else None
        )
        self.dns: DnsServer | None = None
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.ready = False
        self.store: Store | None = None
        self.health: HealthManager | None = None
        self.run_checker = run_checker
        zc = config.zones
        self.reloader = ZoneReloader(
            config.resolve(zc.directory),
            self.catalog,
            self.zone_status,
            lambda: self.config.pools,
            debounce_s=zc.debounce_s,
            remove_grace_s=zc.remove_grace_s,
            poll_interval_s=zc.poll_interval_s,
            watch=zc.watch,
            cache_dir=config.resolve(config.zones.cache_dir),  # compiled zones: fast restarts
            validate=make_validator(
                lambda: self.holder.view.geo,
                pick.decide,
                lambda: self.handler.locate,
                country_locations(self._countries().get),
            ),
        )
        self.config_error: list[str] | None = None
        self._geoip_task: asyncio.Task[None] | None = None

    def _dns_server(self, limits: TcpLimits, shared_udp: bool = False) -> DnsServer:
        """The DNS listeners' query function: packet cache, else the handler; logged per
        query with `[server] query_log`. `shared_udp`: a worker handed shared UDP
        sockets receives with the batch thread whatever the config file says now (it
        may have been edited since the main process chose)."""
        handle: HandleFn = self.cache.handle if self.cache else self.handler.handle
        if self.config.server.query_log:
            handle = logging_handler(handle)

        def send_dropped(n: int) -> None:
            self.stats.udp_send_dropped += n

        server = self.config.server
        return DnsServer(
            handle,
            limits,
            udp_batch=server.udp_batch or shared_udp,
            on_send_dropped=send_dropped,
            lock=self.catalog.lock if server.udp_thread or shared_udp else None,
        )

    def _make_handler(self) -> Handler:
        cfg = self.config
        secret = bytes.fromhex(cfg.cookies.secret) if cfg.cookies.secret else None
        if secret is None and self.worker_mode and os.environ.get(COOKIE_ENV):
            secret = bytes.fromhex(os.environ[COOKIE_ENV])
        self.cookie_secret = secret or os.urandom(16)
        # RRL: with --workers N one table in shared memory (a memfd the workers map), so
        # the limit is per host, not per worker; see geodns/rrl.py.
        table = None
        if cfg.rrl.enabled and self.worker_mode and os.environ.get(FD_ENV):
            table = SharedTable.attach(int(os.environ[FD_ENV]))
        elif cfg.rrl.enabled and self.workers > 1 and not self.worker_mode:
            table = SharedTable.create(cfg.rrl.table_size)
        self.rrl_table = table
        old = cfg.cookies.previous_secret
        previous = bytes.fromhex(old) if old else None
        settings = Settings(
            max_udp_payload=cfg.server.max_udp_payload,
            nsid=cfg.server.nsid.encode(),
            max_cname_chain=cfg.server.max_cname_chain,
            max_additional_rrsets=cfg.server.max_additional_rrsets,
            cookies_require=cfg.cookies.require,
            fast_path=cfg.server.fast_path,
        )
        locate = None
        # state_dir/current.mmdb (from `geodns geoip update`) if present, else [geoip]
        # database; reload_geoip() follows later replacements.
        self.geoip = GeoipWatcher(lambda: self.config.geoip)
        try:
            self.locator = self.geoip.open()
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
            cookies=CookieJar(self.cookie_secret, previous),
            is_special=geo.is_special,
            special_block=geo.special_block,
            stats=self.stats,
            rrl=rrl_from_config(cfg.rrl, table),
        )

    def _countries(self) -> geo.CountryTable:
        try:
            return geo.CountryTable.load(self.config.geoip.countries)
        except geo.GeoIPError:
            return geo.CountryTable({})

    async def start(self) -> None:
        """Bind, load zones, serve. Returns once every zone has been tried."""
        # [api] is checked before anything binds: e.g. plain HTTP on a public address
        # refuses to start (ConfigError) rather than expose the API.
        api_plan = ops.plan_listen(self.config)
        api_tokens = ops.load_tokens(self.config) if api_plan is not None else {}
        srv = self.config.server
        limits = TcpLimits(
            srv.tcp_idle_timeout_s,
            srv.tcp_query_timeout_s,
            srv.tcp_max_connections,
            srv.tcp_max_connections_per_client,
            srv.tcp_max_queries_per_connection,
        )
        if self.worker_mode:
            api_plan = None  # the main process serves the API
        # (UDP, TCP) per address; UDP None: bound by _start_worker (see there)
        sockets: list[tuple[socket.socket | None, socket.socket]] = []
        late_udp: dict[int, tuple[str, int]] = {}
        worker_listen: list[str] = []
        passed = os.environ.get(SOCKETS_ENV) if self.worker_mode else None
        inherited = attach_sockets(passed) if passed else []
        if inherited and len(inherited) != len(self.listen):
            raise ValueError(f"{SOCKETS_ENV}: {len(inherited)} entries, {len(self.listen)} listen")
        leaders: dict[int, int] = {}
        for i, addr in enumerate(self.listen):
            host, port = parse_listen(addr)
            if self.workers > 1 and not self.worker_mode:
                # this process binds (before dropping privileges: port 53 with [server]
                # user) and the workers inherit; it serves no DNS itself
                shared = self._share_udp()
                if not shared:
                    self._check_worker_bind(port)
                udp, tcp = bind_sockets(host, port, udp_reuse_port=not shared)
                if not shared:
                    udp.close()  # it only chose the port: each worker binds its own
                self.worker_sockets.append((udp if shared else None, tcp))
                worker_listen.append(_listen_text(host, tcp.getsockname()[1]))
                continue
            if inherited:
                udp_in, tcp, leader = inherited[i]
                if udp_in is not None:
                    leaders[udp_in.fileno()] = leader
                else:
                    # a SO_REUSEPORT socket of its own, bound once the zones are in
                    # (_start_worker): bound now, its share of the sources would wait
                    late_udp[i] = (host, port)
                sockets.append((udp_in, tcp))
                continue
            sockets.append(bind_sockets(host, port, reuse_port=self.worker_mode))
        if api_plan is not None:
            self.api = ops.ApiServer(self, api_plan, api_tokens)
            try:
                await self.api.start()  # before dropping privileges: the port may be < 1024
            except OSError:
                _close_all(sockets)
                raise
        _drop_privileges(srv.user)
        if self.worker_mode:
            await self._start_worker(sockets, limits, leaders, late_udp)
            return
        self.store = self._open_store()
        self.health = HealthManager(
            self.holder,
            self.config.sites,
            self.config.site_checks,
            self.store,
            HealthPolicy.from_config(self.config.checks),
            run_checker=self.run_checker,
            max_concurrency=self.config.checks.max_concurrency,
            follow=not self.run_checker,
            notify=self.config.store.notify,
        )
        # capacity windows: the answers each site was offered, per pool (summed over
        # the workers when there are some)
        self.health.counters = lambda: self.stats.pool_offered
        # persisted health and overrides are in the view before the first answer
        await self.health.start()
        self.dns = self._dns_server(limits)
        # this process serves DNS itself: it bound every UDP socket above
        await self.dns.start([(udp, tcp) for udp, tcp in sockets if udp is not None])
        report = await asyncio.to_thread(self.reloader.initial_load)
        await self.reloader.start()
        if worker_listen:
            extra = [] if self.cache else ["--no-packet-cache"]
            env = {COOKIE_ENV: self.cookie_secret.hex()}
            fds: tuple[int, ...] = ()
            if self.rrl_table is not None and self.rrl_table.fd is not None:
                env[FD_ENV] = str(self.rrl_table.fd)
                fds = (self.rrl_table.fd,)
            env[SOCKETS_ENV], passed_fds, shared_udp = share_sockets(self.worker_sockets)
            self._flock_files = [lock for _, _, lock in shared_udp]
            fds += passed_fds
            self.pool = WorkerPool(
                self.config.path,
                worker_listen,
                self.workers,
                self.holder,
                self.stats,
                extra,
                env=env,
                pass_fds=fds,
                stall_timeout_s=self.config.server.worker_stall_timeout_s,
                shared_udp=shared_udp,
            )
            await self.pool.start()
            self.worker_addresses = [parse_listen(a) for a in worker_listen]
        if self.config.geoip.reload_interval_s > 0:
            self._geoip_task = asyncio.create_task(
                self._reload_geoip_every(self.config.geoip.reload_interval_s)
            )
        self.ready = True
        log.info("ready: %d zones loaded, %d rejected", len(report.loaded), len(report.failed))

    def _refresh_worker_stats(self) -> None:
        """What a worker's report takes from its DNS server (worker_stats_loop)."""
        if self.dns is not None:
            self.stats.udp_handoffs = self.dns.udp_handoffs()
            self.stats.udp_busy_s = self.dns.udp_busy_s()
            self.stats.udp_received = self.dns.udp_received()

    def _check_worker_bind(self, port: int) -> None:
        """Workers with a SO_REUSEPORT UDP socket each bind it themselves, after this
        process has dropped privileges: a port below 1024 would fail in every worker."""
        if self.config.server.user and os.getuid() == 0 and 0 < port < 1024:
            raise OSError(
                f"port {port}: with [server] user and worker_udp_shared = false the workers "
                "bind UDP after dropping privileges; use the shared sockets (the default)"
            )

    def _share_udp(self) -> bool:
        """Whether --workers share each UDP socket (see workers.py)."""
        srv = self.config.server
        return srv.worker_udp_shared and srv.udp_batch and srv.udp_thread and udpbatch.available()

    async def _start_worker(
        self,
        sockets: list[tuple[socket.socket | None, socket.socket]],
        limits: TcpLimits,
        leaders: dict[int, int],
        late_udp: dict[int, tuple[str, int]],
    ) -> None:
        """`serve-worker`: DNS only; health from the main process over stdin."""
        _keep_stdout_to_self()
        self._worker_tasks = [
            asyncio.create_task(worker_stdin_loop(self.holder, self.stopping.set)),
            asyncio.create_task(worker_stats_loop(self.stats, self._refresh_worker_stats)),
        ]
        # zones first, then DNS: a worker restarted while the others serve must not
        # receive (and answer SERVFAIL) before it has its zones
        await asyncio.to_thread(self.reloader.initial_load)
        bound = [
            (udp if udp is not None else bind_udp(*late_udp[i], reuse_port=True), tcp)
            for i, (udp, tcp) in enumerate(sockets)
        ]
        self.dns = self._dns_server(limits, shared_udp=bool(leaders))
        await self.dns.start(bound, leaders)
        await self.reloader.start()
        self.ready = True
        sys.stdout.buffer.write(b'{"ready": true}\n')
        sys.stdout.buffer.flush()

    def _open_store(self) -> Store | None:
        cfg = self.config
        url = cfg.store.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            # a relative SQLite path is relative to the config file, like every path
            url = "sqlite:///" + str(cfg.resolve(url[len("sqlite:///") :]))
        try:
            store = Store(url, cfg.node_id, journal_dir=cfg.resolve(cfg.store.journal_dir))
        except (StoreError, OSError) as exc:  # a malformed URL or unusable path
            log.error("state store unusable: %s", exc)
            return None
        try:
            store.open()
        except StoreError as exc:
            # Keep serving from memory; writes go to the journal and are replayed when
            # the database is back (the periodic ping notices).
            log.error("state store unreachable, journaling writes: %s", exc)
        return store

    @property
    def dns_addresses(self) -> list[tuple[str, int]]:
        if self.pool is not None:
            return list(self.worker_addresses)
        return self.dns.addresses if self.dns else []

    @property
    def api_addresses(self) -> list[tuple[str, int]]:
        """Where the ops API listens ([] when it is off)."""
        return self.api.addresses if self.api else []

    async def reload(self, who: str | None = None) -> dict[str, object]:
        """SIGHUP / POST /v1/reload: re-read geodns.toml, then every zone file.

        A broken config keeps the running one (and says why); settings that cannot
        change without a restart (listen addresses) are named in the error. With `who`
        (the API token's name, or "SIGHUP"), what happened is written to the audit log.
        """
        problems: list[str] = []
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            problems = exc.problems
        else:
            if new.server.listen != self.config.server.listen:
                problems.append(
                    f"{new.path}: server.listen: cannot change while running; "
                    "the old addresses stay until a restart"
                )
                new = replace(new, server=replace(new.server, listen=self.config.server.listen))
            pools_changed = new.pools != self.config.pools
            self.config = new
            self._reload_cookies()
            if self.health is not None:
                # load-balancing settings of [checks] apply at once; quorum ones at restart
                fresh = HealthPolicy.from_config(new.checks)
                self.health.policy = replace(
                    self.health.policy,
                    ramp=fresh.ramp,
                    damping=fresh.damping,
                    settle_s=fresh.settle_s,
                )
                self.health.update_config(new.sites, new.site_checks, new.pools)
            if pools_changed:
                self.reloader.reparse_next_reload(only_geo=True)
        self.config_error = problems or None
        for p in problems:
            log.error("reload: config rejected, the running one stays: %s", p)
        report = await self.reloader.reload_all()
        await asyncio.to_thread(self.reload_geoip)
        log.info(
            "reload: config %s; zones: %d loaded, %d failed, %d removed, %d unchanged",
            "rejected" if problems else "read",
            len(report.loaded),
            len(report.failed),
            len(report.removed),
            len(report.unchanged),
        )
        result: dict[str, object] = {
            "config_errors": problems,
            "loaded": report.loaded,
            "unchanged": report.unchanged,
            "failed": report.failed,
            "removed": report.removed,
        }
        if who is not None and self.store is not None:
            summary = {k: v for k, v in result.items() if v}
            try:
                await asyncio.to_thread(self.store.audit, who, "reload", "config", summary)
            except StoreError as exc:
                log.error("reload: audit failed: %s", exc)
        return result

    def _reload_cookies(self) -> None:
        """[cookies] from a reloaded config: a secret rotation (secret = new,
        previous_secret = old, for the overlap period) takes effect without a restart.
        With --workers, workers read [cookies] when they (re)start."""
        c = self.config.cookies
        if c.secret:
            self.cookie_secret = bytes.fromhex(c.secret)
        previous = bytes.fromhex(c.previous_secret) if c.previous_secret else None
        self.handler.cookies = CookieJar(self.cookie_secret, previous)
        self.handler.settings.cookies_require = c.require

    def reload_geoip(self) -> bool:
        """Reopen a replaced GeoIP database or switch to a newly installed one.

        True if answers now come from a new database. Safe from any thread: the handler
        reads `locate` per query, and replacing it is one assignment.
        """
        locator = self.geoip.check()
        if locator is None:
            return False
        self.locator, self.geoip_error = locator, None
        self.handler.locate = locator.locate
        self._policy_report()
        return True

    def _policy_report(self) -> list[str]:
        """After a GeoIP update: rerun every zone's policy tests and say loudly what now
        fails. Not blocking (the zones are unchanged); the next edit of such a zone is
        refused until its tests pass again."""
        failed: list[str] = []
        validate = self.reloader.validate
        if validate is None:
            return failed
        for st in list(self.zone_status.values()):
            zone = self.catalog.zones.get(name_to_wire(st.origin).lower())
            if zone is not None:
                failed += validate(zone, Path(st.path))
        for problem in failed:
            log.error("geoip: the new database breaks a policy test: %s", problem)
        return failed

    async def _reload_geoip_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload_geoip)  # opening a file: off the loop

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        _close_all(self.worker_sockets)
        for fd in self._flock_files:
            os.close(fd)
        self._flock_files = []
        for task in getattr(self, "_worker_tasks", []):
            task.cancel()
        if self.api is not None:
            await self.api.stop()
        if self._geoip_task is not None:
            self._geoip_task.cancel()
        await self.reloader.stop()
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
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(who="SIGHUP"))
        )
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
        HealthPolicy.from_config(config.checks),
        max_concurrency=config.checks.max_concurrency,
        notify=config.store.notify,
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


def _close_all(pairs: list[tuple[socket.socket | None, socket.socket]]) -> None:
    for pair in pairs:
        for sock in pair:
            if sock is not None:
                sock.close()


def _keep_stdout_to_self() -> None:
    """A worker's stdout is its channel to the main process. Children it starts
    (zone-load and zone-cache processes) must not hold the channel: they get /dev/null
    as stdout, and this process writes to a descriptor of its own that no child
    inherits."""
    channel = os.dup(1)  # not inheritable (PEP 446)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = os.fdopen(channel, "w", encoding="utf-8")


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
