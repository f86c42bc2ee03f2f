"""Prometheus metrics, read at scrape time from the plain counters the server keeps.

The DNS path only bumps integers in `handler.Stats` (no labelled client call, no lock per
query); `Collector.collect()` turns them, the health manager's state, zone status and
the GeoIP metadata into metric families when /metrics is scraped. Every series has a
bounded label set: qtype is a fixed list plus OTHER, sites are configured, and zones are
counted in aggregate (100,000 zones must not mean 100,000 series).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from .model import Health, Override, SiteState
from .rrl import COUNT_NAMES

if TYPE_CHECKING:
    from .app import App

# Classic text format 0.0.4: every name here is a legacy metric name, and every
# Prometheus version parses it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["CONTENT_TYPE", "GeoDNSCollector", "make_registry", "render"]

RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    9: "NOTAUTH",
    16: "BADVERS",
    23: "BADCOOKIE",
}


class GeoDNSCollector(Collector):
    """Everything geodns exports, computed from the App's live objects per scrape."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield from self._dns()
        yield from self._health()
        yield from self._zones()
        yield from self._infra()

    # -- the query path ------------------------------------------------------------------
    def _dns(self) -> Iterator[Metric]:
        stats = self.app.stats
        queries = CounterMetricFamily(
            "geodns_dns_queries",
            "DNS replies sent, by question type (fixed set + OTHER), rcode and transport",
            labels=["qtype", "rcode", "transport"],
        )
        for (qtype, rcode, transport), n in sorted(dict(stats.queries).items()):
            queries.add_metric([qtype, RCODE_NAMES.get(rcode, str(rcode)), transport], n)
        yield queries
        answers = CounterMetricFamily(
            "geodns_dns_geo_answers",
            "Geo-steered answers, by site answered",
            labels=["site"],
        )
        for site, n in sorted(dict(stats.answers_by_site).items()):
            answers.add_metric([site], n)
        yield answers
        yield CounterMetricFamily(
            "geodns_dns_ecs_queries",
            "Queries carrying an EDNS Client Subnet option",
            stats.ecs_queries,
        )
        yield CounterMetricFamily(
            "geodns_dns_truncated", "Replies sent with TC=1 (did not fit)", stats.truncated
        )
        yield CounterMetricFamily(
            "geodns_dns_formerr", "Malformed queries answered FORMERR", stats.formerr
        )
        yield CounterMetricFamily(
            "geodns_dns_dropped", "Packets dropped without a reply (unparseable)", stats.dropped
        )
        yield CounterMetricFamily(
            "geodns_udp_send_dropped",
            "UDP replies the kernel would not take (send buffer full, address refused)",
            stats.udp_send_dropped,
        )
        yield CounterMetricFamily(
            "geodns_udp_handoffs",
            "--workers N sharing UDP: full batches of 32 after which a worker let another "
            "receive (load one worker did not keep up with alone)",
            stats.udp_handoffs,
        )
        rrl = CounterMetricFamily(
            "geodns_rrl_responses",
            "UDP responses by response rate limiting decision: pass (sent), drop (not "
            "sent), slip (sent truncated, TC=1), exempt (exempt network, sent), cookie "
            "(valid server cookie: not limited, sent)",
            labels=["action"],
        )
        for name, n in zip(COUNT_NAMES, stats.rrl, strict=False):
            rrl.add_metric([name], n)
        yield rrl

    # -- load balancing --------------------------------------------------------------------
    def _balance(self, sites: list[str], states: Mapping[str, SiteState]) -> Iterator[Metric]:
        """Flap damping, ramps and capacity spill-over as the DNS path sees them."""
        damped = GaugeMetricFamily(
            "geodns_site_damped", "1 if the site is held DOWN for flapping", labels=["site"]
        )
        ramp = GaugeMetricFamily(
            "geodns_site_ramp",
            "Share of its clients the site answers (below 1 during a slow start or a ramped drain)",
            labels=["site"],
        )
        for name in sites:
            st = states.get(name)
            if st is None:
                continue
            damped.add_metric([name], 1 if st.damped else 0)
            ramp.add_metric([name], st.ramp)
        spill = GaugeMetricFamily(
            "geodns_pool_spill",
            "Fraction of a site's clients a pool sends on for capacity (last window)",
            labels=["pool", "site"],
        )
        offered = GaugeMetricFamily(
            "geodns_pool_offered_share",
            "Site's offered share of a pool's answers on this node over the last window",
            labels=["pool", "site"],
        )
        for pool, b in sorted(self.app.holder.view.geo.balance.items()):
            for site, share in sorted(b.offered_share.items()):
                offered.add_metric([pool, site], share)
                spill.add_metric([pool, site], b.spill.get(site, 0.0))
        yield from (damped, ramp, spill, offered)

    # -- health ----------------------------------------------------------------------------
    def _health(self) -> Iterator[Metric]:
        app = self.app
        states = app.holder.view.geo.states
        sites = sorted(app.holder.view.geo.sites)
        usable = GaugeMetricFamily(
            "geodns_site_usable",
            "1 if the DNS path answers with the site (after overrides), else 0",
            labels=["site"],
        )
        observed = GaugeMetricFamily(
            "geodns_site_observed",
            "Observed health of the site, one series per state set to 1",
            labels=["site", "state"],
        )
        override = GaugeMetricFamily(
            "geodns_site_override",
            "Operator override of the site, one series per value set to 1",
            labels=["site", "override"],
        )
        stale = GaugeMetricFamily(
            "geodns_site_stale", "1 if the site has had no fresh check verdict", labels=["site"]
        )
        for name in sites:
            st = states.get(name)
            if st is None:
                continue
            usable.add_metric([name], 1 if st.usable else 0)
            for h in Health:
                observed.add_metric([name, h.value], 1 if st.observed is h else 0)
            for o in Override:
                override.add_metric([name, o.value], 1 if st.override is o else 0)
            stale.add_metric([name], 1 if st.stale else 0)
        yield from (usable, observed, override, stale)
        yield from self._balance(sites, states)

        health = app.health
        check_ok = GaugeMetricFamily(
            "geodns_check_success",
            "Result of the last probe of a target (1 ok, 0 failed); address '' = site check",
            labels=["site", "address"],
        )
        latency = GaugeMetricFamily(
            "geodns_check_latency_seconds",
            "Duration of the last probe of a target",
            labels=["site", "address"],
        )
        last_at = GaugeMetricFamily(
            "geodns_check_last_timestamp_seconds",
            "When the last probe of a target finished (Unix time)",
            labels=["site", "address"],
        )
        checks_total = 0
        frozen = 0
        if health is not None:
            checks_total = health.checks_seen
            frozen = 1 if health.frozen else 0
            for (site, address), info in sorted(
                health.targets.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            ):
                if info.last_result is None:
                    continue
                labels = [site, address or ""]
                check_ok.add_metric(labels, 1 if info.last_result.ok else 0)
                latency.add_metric(labels, info.last_result.latency_ms / 1000.0)
                if info.last_at is not None:
                    last_at.add_metric(labels, info.last_at)
        yield from (check_ok, latency, last_at)
        yield CounterMetricFamily(
            "geodns_checks", "Probe results received from the checker", checks_total
        )
        yield GaugeMetricFamily(
            "geodns_health_partition_frozen",
            "1 while the partition guard ignores DOWN verdicts (suspected own-network failure)",
            frozen,
        )
        yield GaugeMetricFamily(
            "geodns_view_geo_version",
            "Version of the published health/sites state (increases on every change)",
            app.holder.view.geo.version,
        )
        yield GaugeMetricFamily(
            "geodns_view_generation",
            "Views published since start",
            app.holder.generation,
        )

    # -- zones -----------------------------------------------------------------------------
    def _zones(self) -> Iterator[Metric]:
        app = self.app
        loaded = rejected = unloaded = 0
        for st in list(app.zone_status.values()):
            if st.error:
                rejected += 1
            elif st.loaded_at is not None:
                loaded += 1
            else:
                unloaded += 1
        zones = GaugeMetricFamily(
            "geodns_zones",
            "Zone files by state: loaded (serving), rejected (last edit refused; the last "
            "good version serves, if any), pending (not loaded yet)",
            labels=["state"],
        )
        zones.add_metric(["loaded"], loaded)
        zones.add_metric(["rejected"], rejected)
        zones.add_metric(["pending"], unloaded)
        yield zones
        reloads = CounterMetricFamily(
            "geodns_zone_reloads", "Zone reload attempts by result", labels=["result"]
        )
        counters = getattr(getattr(app, "reloader", None), "counters", None)
        if counters is not None:
            reloads.add_metric(["ok"], counters.ok)
            reloads.add_metric(["failed"], counters.failed)
            reloads.add_metric(["removed"], counters.removed)
        yield reloads

    # -- GeoIP, store, readiness -------------------------------------------------------------
    def _infra(self) -> Iterator[Metric]:
        app = self.app
        locator = app.locator
        yield GaugeMetricFamily(
            "geodns_geoip_up", "1 if a GeoIP database is open", 1 if locator is not None else 0
        )
        if locator is not None:
            build = GaugeMetricFamily(
                "geodns_geoip_build_timestamp_seconds",
                "When the GeoIP database in use was built (Unix time); alert when too old",
                labels=["database_type"],
            )
            build.add_metric([locator.database_type], locator.build_epoch)
            yield build
        store = app.store
        yield GaugeMetricFamily(
            "geodns_store_up",
            "1 if the state store is reachable and has no journaled writes waiting",
            1 if store is not None and store.healthy else 0,
        )
        if store is not None:
            yield GaugeMetricFamily(
                "geodns_store_journal_pending",
                "Writes journaled locally while the store was down, not yet applied",
                store.journal_pending,
            )
            yield CounterMetricFamily(
                "geodns_store_dropped_checks",
                "Check results dropped because the store was down",
                store.dropped_checks,
            )
        pool = app.pool
        if pool is not None:  # --workers N
            restarts = CounterMetricFamily(
                "geodns_worker_restarts",
                "Times each DNS worker process was restarted after it exited or was killed",
                labels=["worker"],
            )
            for w in pool.workers:
                restarts.add_metric([str(w.index)], w.restarts)
            yield restarts
            yield CounterMetricFamily(
                "geodns_worker_stalls",
                "DNS workers the watchdog killed (silent, stuck in a UDP batch, or holding a "
                "shared UDP socket without receiving; worker_stall_timeout_s)",
                pool.stalls,
            )
        yield GaugeMetricFamily("geodns_ready", "1 once every zone has been tried", int(app.ready))
        yield GaugeMetricFamily(
            "geodns_start_timestamp_seconds", "When this process started", app.started_at
        )


def make_registry(app: App) -> CollectorRegistry:
    """A registry of its own per App (tests start several), with process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GeoDNSCollector(app))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of every metric in `registry`."""
    return generate_latest(registry)
