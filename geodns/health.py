"""Health: checker verdicts + operator overrides -> effective SiteStates -> a new View.

The checker reports every probe result here. We keep the observed state of each target,
fold it into a per-site verdict, apply overrides, the partition guard and the stale
lease, and publish a new GeoState when anything an answer depends on changed. The store
is the record (transitions, overrides, audit); the DNS path only ever sees the View.

Every time-driven change (override expiry, stale lease) is a scheduled publish: `tick()`
runs at the next deadline; the query path never reads a clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checker import Checker, CheckEvent, ProbeResult, SiteVerdict, site_health
from .errors import StoreError
from .model import CheckSpec, Health, Override, Pool, Site, SiteState
from .store import OverrideRow, Store
from .view import GeoState, ViewHolder, next_version

log = logging.getLogger(__name__)

TargetKey = tuple[str, str | None]
# a check-history row per target at most this often, plus one at every change of result
CHECK_ROW_EVERY_S = 60.0


@dataclass(frozen=True)
class HealthPolicy:
    """Fail-safe settings (from [checks]); see config.ChecksConfig for each key."""

    partition_min_sites: int = 4
    partition_share: float = 0.5
    stale_intervals: int = 3
    all_down: str = "open"


@dataclass
class TargetInfo:
    """What the API shows about one probed target."""

    health: Health = Health.UNKNOWN
    since: float | None = None
    last_result: ProbeResult | None = None
    last_at: float | None = None
    last_row_at: float = 0.0
    last_ok: bool | None = None


@dataclass
class SiteInfo:
    site: str
    state: SiteState
    verdict: SiteVerdict
    targets: dict[str | None, TargetInfo] = field(default_factory=dict)
    override: OverrideRow | None = None
    last_verdict_at: float | None = None


def effective_states(
    sites: Mapping[str, Site],
    verdicts: Mapping[str, SiteVerdict],
    overrides: Mapping[str, OverrideRow],
    stale: Mapping[str, bool],
    now: float,
) -> dict[str, SiteState]:
    """The one function that decides what the DNS path sees for every site.

    Precedence: an unexpired override, then the observed verdict. Expired overrides
    are ignored here even before the store deletes them.
    """
    out: dict[str, SiteState] = {}
    for name in sites:
        v = verdicts.get(name)
        ov = overrides.get(name)
        override = Override.OBEY
        if ov is not None and (ov.expires_at is None or ov.expires_at > now):
            override = ov.state
        out[name] = SiteState(
            observed=v.observed if v else Health.UNKNOWN,
            override=override,
            address_down=v.address_down if v else frozenset(),
            stale=stale.get(name, False),
        )
    return out


class HealthManager:
    """Owns observed health and overrides for all sites; publishes GeoStates."""

    def __init__(
        self,
        holder: ViewHolder,
        sites: Mapping[str, Site],
        specs: Mapping[str, CheckSpec],
        store: Store | None,
        policy: HealthPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        run_checker: bool = True,
        max_concurrency: int = 256,
        follow: bool = False,
    ) -> None:
        self.holder = holder
        self.sites = dict(sites)
        self.specs = dict(specs)
        self.store = store
        self.policy = policy or HealthPolicy()
        self.clock = clock
        self.run_checker = run_checker
        # follow: take verdicts from the store (a standalone `geodns checker` writes them)
        self.follow = follow and store is not None
        self._tasks: list[asyncio.Task[None]] = []
        self.max_concurrency = max_concurrency
        self.targets: dict[TargetKey, TargetInfo] = {}
        self.overrides: dict[str, OverrideRow] = {}
        self.last_verdict_at: dict[str, float] = {}
        self.frozen = False  # partition guard tripped: observed DOWN flips are ignored
        self.frozen_reason = ""
        self._recent_down: dict[str, float] = {}  # site -> when it flipped DOWN
        self._before_down: dict[str, SiteState] = {}  # site -> state before that flip
        self._checker: Checker | None = None
        self._writes: asyncio.Queue[Callable[[], Any]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.changed = asyncio.Event()  # set on every publish (tests wait on it)
        self._pools: dict[str, Pool] | None = None  # set by a config reload
        self.checks_seen = 0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Restore persisted state (no flapping on restart), publish, start checking."""
        initial: dict[TargetKey, Health] = {}
        if self.store is not None:
            try:
                observed = await asyncio.to_thread(self.store.observed_states)
                self.overrides = await asyncio.to_thread(self.store.overrides)
            except StoreError as exc:
                log.error("health: store unreachable at start, starting UNKNOWN: %s", exc)
                observed = {}
            for site, rows in observed.items():
                for addr, row in rows.items():
                    key = (site, addr or None)
                    initial[key] = row.state
                    self.targets[key] = TargetInfo(health=row.state, since=row.since)
                    self.last_verdict_at[site] = max(
                        self.last_verdict_at.get(site, 0.0), row.updated_at
                    )
        self._writes = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop())
        self.publish()
        if self.run_checker:
            self._checker = Checker(
                self.sites,
                self.specs,
                self.on_event,
                initial=initial,
                max_concurrency=self.max_concurrency,
                wall_clock=self.clock,
            )
            await self._checker.start()
        if self.store is not None and self.run_checker:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if self.follow:
            self._tasks.append(asyncio.create_task(self._follow_loop()))

    def _period_s(self) -> float:
        """How often followers poll and checkers heartbeat: the shortest check interval."""
        intervals = [sp.interval_s for sp in self.specs.values() if sp.kind != "none"]
        return min([*intervals, 5.0])

    async def _heartbeat_loop(self) -> None:
        """A checker says it is alive (its verdicts are fresh) once per interval."""
        assert self.store is not None
        while True:
            info = {"checker": True, "frozen": self.frozen, "checks": self.checks_seen}
            await asyncio.to_thread(self.store.heartbeat, info)
            await asyncio.sleep(self._period_s())

    async def _follow_loop(self) -> None:
        """`serve --no-checker`: poll the store for the checker's verdicts and overrides."""
        assert self.store is not None
        node = self.store.node_id
        while True:
            try:
                observed = await asyncio.to_thread(self.store.observed_states, node)
                overrides = await asyncio.to_thread(self.store.overrides)
                nodes = await asyncio.to_thread(self.store.nodes)
            except StoreError as exc:
                log.warning("health: follower cannot read the store: %s", exc)
            else:
                seen = {n.node_id: n.last_seen for n in nodes}
                self.overrides = dict(overrides)
                for site, rows in observed.items():
                    for addr, row in rows.items():
                        info = self.targets.setdefault((site, addr or None), TargetInfo())
                        info.health, info.since = row.state, row.since
                    if node in seen:
                        self.last_verdict_at[site] = seen[node]
                self.publish()
            await asyncio.sleep(self._period_s())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._checker is not None:
            await self._checker.stop()
        if self._timer is not None:
            self._timer.cancel()
        if self._writes is not None and self._writer is not None:
            await self._writes.join()
            self._writer.cancel()

    def update_config(
        self,
        sites: Mapping[str, Site],
        specs: Mapping[str, CheckSpec],
        pools: Mapping[str, Pool] | None = None,
    ) -> None:
        """Config reload: new sites, checks and pools; targets still there keep state."""
        self.sites, self.specs = dict(sites), dict(specs)
        if pools is not None:
            self._pools = dict(pools)
        if self._checker is not None:
            self._checker.update(self.sites, self.specs)
        self.publish(force=True)

    # -- observations ----------------------------------------------------------------
    async def on_event(self, ev: CheckEvent) -> None:
        """One probe result from the checker."""
        self.checks_seen += 1
        key = (ev.site, ev.address)
        info = self.targets.setdefault(key, TargetInfo())
        now = ev.at
        info.last_result, info.last_at = ev.result, now
        self.last_verdict_at[ev.site] = now
        if ev.result.ok != info.last_ok or now - info.last_row_at >= CHECK_ROW_EVERY_S:
            # check history is thinned: every change of result, else one per minute
            info.last_ok, info.last_row_at = ev.result.ok, now
            self._enqueue(
                lambda: (
                    self.store
                    and self.store.record_check(
                        ev.site,
                        ev.address,
                        ev.result.ok,
                        ev.result.latency_ms,
                        ev.result.error,
                        now,
                    )
                )
            )
        if ev.transition is not None:
            old, new = ev.transition
            info.health, info.since = new, now
            reason = ev.result.error or ("check passed" if ev.result.ok else "check failed")
            log.warning(
                "health: site=%s address=%s %s -> %s (%s)",
                ev.site,
                ev.address or "-",
                old.value,
                new.value,
                reason,
            )
            self._enqueue(
                lambda: (
                    self.store
                    and self.store.record_transition(ev.site, ev.address, old, new, reason, now)
                )
            )
            if new is Health.DOWN:
                # what answers used before this flip, in case the guard trips
                self._before_down[ev.site] = self.holder.view.geo.states.get(ev.site, SiteState())
                self._partition_guard(ev.site, now)
            elif self.frozen:
                self._maybe_unfreeze(now)
        self.publish()

    def _checked_sites(self) -> list[str]:
        return [s for s in self.sites if self.specs.get(s, CheckSpec()).kind != "none"]

    def _interval(self, site: str) -> float:
        return self.specs.get(site, CheckSpec()).interval_s

    def _partition_guard(self, site: str, now: float) -> None:
        """Many sites flipping DOWN at once is more likely our own network failing."""
        self._recent_down[site] = now
        checked = self._checked_sites()
        if len(checked) < self.policy.partition_min_sites:
            return
        window = max(self._interval(s) for s in checked)
        for s, t in list(self._recent_down.items()):
            if now - t > window:  # keep only the current window: bounded memory
                del self._recent_down[s]
                if not self.frozen:
                    self._before_down.pop(s, None)
        recent = list(self._recent_down)
        if not self.frozen and len(recent) > self.policy.partition_share * len(checked):
            self.frozen = True
            self.frozen_reason = (
                f"{len(recent)} of {len(checked)} sites went DOWN within {window:g} s"
            )
            log.error(
                "health: PARTITION GUARD: %s; suspecting this checker's own network, "
                "freezing the last good states and not voting",
                self.frozen_reason,
            )

    def _maybe_unfreeze(self, now: float) -> None:
        checked = self._checked_sites()
        down = [s for s in checked if self._verdict(s).observed is Health.DOWN]
        if len(down) <= self.policy.partition_share * len(checked):
            self.frozen = False
            self._recent_down.clear()
            self._before_down.clear()
            log.warning("health: partition guard released: %d of %d DOWN", len(down), len(checked))

    def _verdict(self, site: str) -> SiteVerdict:
        states = {addr: t.health for (s, addr), t in self.targets.items() if s == site}
        return site_health(self.sites[site], states)

    # -- overrides -------------------------------------------------------------------
    async def set_override(
        self, site: str, state: Override, reason: str, who: str, expires_in_s: float | None
    ) -> OverrideRow:
        """Force a site UP/DOWN now (next answer), store it (audited), expire it later."""
        now = self.clock()
        expires_at = now + expires_in_s if expires_in_s else None
        if self.store is not None:
            row = await asyncio.to_thread(
                self.store.set_override, site, state, reason, who, expires_at
            )
        else:
            row = OverrideRow(site, state, reason, who, now, expires_at)
        self.overrides[site] = row
        log.warning("override: site=%s state=%s by=%s reason=%s", site, state.value, who, reason)
        self.publish()
        return row

    async def clear_override(self, site: str, who: str, reason: str) -> bool:
        """Back to obeying the checks."""
        existed = self.overrides.pop(site, None) is not None
        if self.store is not None:
            existed = (
                await asyncio.to_thread(self.store.clear_override, site, who, reason) or existed
            )
        log.warning("override cleared: site=%s by=%s", site, who)
        self.publish()
        return existed

    # -- publishing ------------------------------------------------------------------
    def compute(self, now: float) -> dict[str, SiteState]:
        """Effective SiteStates at `now` (pure over the manager's current data)."""
        verdicts: dict[str, SiteVerdict] = {}
        stale: dict[str, bool] = {}
        for site in self.sites:
            verdict = self._verdict(site)
            prev = self._before_down.get(site)
            if self.frozen and verdict.observed is Health.DOWN and prev is not None:
                # partition guard: the observation from before the burst of DOWN flips
                verdict = SiteVerdict(
                    prev.observed, prev.observed, prev.observed, prev.address_down
                )
            verdicts[site] = verdict
            spec = self.specs.get(site)
            if spec is not None and spec.kind != "none":
                seen = self.last_verdict_at.get(site)
                lease = self.policy.stale_intervals * spec.interval_s
                stale[site] = seen is not None and now - seen > lease
        return effective_states(self.sites, verdicts, self.overrides, stale, now)

    def publish(self, force: bool = False) -> None:
        """Recompute and publish a new GeoState if anything changed; reschedule timers."""
        now = self.clock()
        states = self.compute(now)
        geo = self.holder.view.geo
        pools = self._pools if self._pools is not None else geo.pools
        if force or states != dict(geo.states) or geo.sites != self.sites:
            changed = {n for n in states if geo.states.get(n) != states[n]}
            version = next_version()
            pool_versions = {
                name: version
                if force or changed & set(pool.members)
                else geo.pool_versions.get(name, 0)
                for name, pool in pools.items()
            }
            self.holder.publish_geo(GeoState(self.sites, pools, states, version, pool_versions))
            self.changed.set()
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        """Arm one timer for the next time-driven change (override expiry, stale lease)."""
        deadlines = [ov.expires_at for ov in self.overrides.values() if ov.expires_at]
        for site, seen in self.last_verdict_at.items():
            spec = self.specs.get(site)
            if spec is not None and spec.kind != "none":
                deadline = seen + self.policy.stale_intervals * spec.interval_s
                if deadline > now:
                    deadlines.append(deadline)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        future = [d for d in deadlines if d > now]
        if not future:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(min(future) - now + 0.001, self.tick)

    def tick(self) -> None:
        """A scheduled publish: expire overrides whose time has come."""
        now = self.clock()
        expired = [s for s, ov in self.overrides.items() if ov.expires_at and ov.expires_at <= now]
        for site in expired:
            del self.overrides[site]
            log.warning("override expired: site=%s", site)
        if expired:
            self._enqueue(lambda: self.store and self.store.expire_overrides(now))
        self.publish()

    # -- store writes, in order, off the event loop ------------------------------------
    def _enqueue(self, fn: Callable[[], Any]) -> None:
        if self.store is not None and self._writes is not None:
            self._writes.put_nowait(fn)

    async def _write_loop(self) -> None:
        assert self._writes is not None
        while True:
            fn = await self._writes.get()
            try:
                await asyncio.to_thread(fn)
            except Exception as exc:  # the store journals what matters; log the rest
                log.error("health: store write failed: %s", exc)
            finally:
                self._writes.task_done()

    # -- reading -----------------------------------------------------------------------
    def site_info(self, site: str) -> SiteInfo:
        """Everything the API shows about one site."""
        state = self.holder.view.geo.states.get(site, SiteState())
        targets = {addr: t for (s, addr), t in self.targets.items() if s == site}
        return SiteInfo(
            site,
            state,
            self._verdict(site),
            targets,
            self.overrides.get(site),
            self.last_verdict_at.get(site),
        )


WaitFn = Callable[[], Awaitable[None]]
