"""Health: checker verdicts + operator overrides -> effective SiteStates -> a new View.

The checker reports every probe result here. We keep the observed state of each target,
fold it into a per-site verdict, apply overrides, the partition guard and the stale
lease, and publish a new GeoState when anything an answer depends on changed. The store
is the record (transitions, overrides, audit); the DNS path only ever sees the View.

Every time-driven change (override expiry, stale lease, ramp step, damping release,
capacity window) is a scheduled publish: `tick()` runs at the next deadline; the query
path never reads a clock.

Load balancing (README "Load balancing"; the arithmetic is geodns.balance):
- flap damping: a target whose state changed more than `flap_max` times within
  `flap_window_s` is held DOWN for a penalty growing with repeated flapping, replayed
  from the transition log (this node's, or the quorum's in shared mode) so every node
  holds the same sites; precedence override > damping > observed health;
- slow start: a site that turns usable again (check, undrain, damping release) answers
  a growing share of its clients over `ramp_s`; a DOWN override with `ramp_s` drains
  the same way, down;
- "changing": ramping, damped, or its effective state flipped within `settle_s`: pools
  with `ttl_under_change_s` answer with that shorter TTL;
- capacity: every pool's window (`window_s`) of the handler's offered counters is rolled
  into spill fractions (balance.ShareWindow).

Several nodes sharing one store (issue 10, "shared mode"): each node's checker records
its own verdicts (its votes); what the DNS path sees comes from the quorum of every
node's fresh votes (`geodns.quorum`), stored in the database so all nodes serve the same
decision, and re-read every period and at each PostgreSQL NOTIFY. A node that cannot
reach the database keeps its last decisions, flagged stale; its own checks may bring a
target back UP there but never take one DOWN. Overrides come from the store too, so one
made through any node applies on all of them. Shared mode is `[checks] quorum`: "auto"
(default) turns it on for a database server (PostgreSQL) or when another checking node
heartbeats into the same SQLite file; a lone node on SQLite behaves exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import balance, quorum
from .checker import Checker, CheckEvent, ProbeResult, SiteVerdict, plan_targets, site_health
from .errors import ConfigError, StoreError
from .model import CheckSpec, Health, Override, Pool, PoolBalance, Site, SiteState
from .store import QUORUM_NODE, NodeRow, OverrideRow, QuorumSnapshot, Store
from .view import GeoState, ViewHolder, next_version

if TYPE_CHECKING:
    from .config import ChecksConfig

log = logging.getLogger(__name__)

TargetKey = tuple[str, str | None]
# a check-history row per target at most this often, plus one at every change of result
CHECK_ROW_EVERY_S = 60.0
# shared mode: a burst of notifications is folded into one re-read of the store
SYNC_COALESCE_S = 0.005
# heartbeat info lists at most this many sites this node has no fresh verdict for
MAX_STALE_SITES_REPORTED = 10000
QUORUM_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class HealthPolicy:
    """Fail-safe settings (from [checks]); see config.ChecksConfig for each key."""

    partition_min_sites: int = 4
    partition_share: float = 0.5
    stale_intervals: int = 3
    all_down: str = "open"
    quorum: str = "auto"  # auto | on | off
    quorum_min_votes: int = 2
    ramp: balance.RampPolicy = field(default_factory=balance.RampPolicy)
    damping: balance.DampingPolicy = field(default_factory=balance.DampingPolicy)
    settle_s: float = 300.0  # "recently changed state", for TTL under change

    @classmethod
    def from_config(cls, checks: ChecksConfig) -> HealthPolicy:
        """The policy of a [checks] section."""
        return cls(
            partition_min_sites=checks.partition_min_sites,
            partition_share=checks.partition_share,
            stale_intervals=checks.stale_intervals,
            quorum=checks.quorum,
            quorum_min_votes=checks.quorum_min_votes,
            ramp=balance.RampPolicy(checks.ramp_s, checks.ramp_step_s, checks.ramp_start),
            damping=balance.DampingPolicy(
                checks.flap_max,
                checks.flap_window_s,
                checks.flap_penalty_s,
                checks.flap_penalty_max_s,
                checks.flap_decay_s,
            ),
            settle_s=checks.settle_s,
        )


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
    # shared mode: the quorum's tally per target (address or None); empty otherwise
    votes: dict[str | None, quorum.Tally] = field(default_factory=dict)
    # flap damping of the site as a whole: held until, holds remembered, recent changes
    damping: balance.DampState = field(default_factory=balance.DampState)


def effective_states(
    sites: Mapping[str, Site],
    verdicts: Mapping[str, SiteVerdict],
    overrides: Mapping[str, OverrideRow],
    stale: Mapping[str, bool],
    now: float,
    holds: Mapping[TargetKey, float] | None = None,
    ramp: balance.RampPolicy | None = None,
) -> dict[str, SiteState]:
    """The one function that decides what the DNS path sees for every site.

    Precedence: an unexpired override, then flap damping (`holds`: target -> held DOWN
    until; a site's own target holds the site, an address's holds that address), then
    the observed verdict. Expired overrides are ignored here even before the store
    deletes them. A DOWN override with `ramp_s` is a ramped drain: until created_at +
    ramp_s the site still answers a shrinking share of its clients (`ramp` steps).
    """
    out: dict[str, SiteState] = {}
    holds = holds or {}
    for name in sites:
        v = verdicts.get(name)
        ov = overrides.get(name)
        override = Override.OBEY
        fraction, kind, until = 1.0, "", None
        if ov is not None and (ov.expires_at is None or ov.expires_at > now):
            override = ov.state
            if ov.state is Override.DOWN and ov.ramp_s and now < ov.created_at + ov.ramp_s:
                policy = _override_ramp(ov, ramp)
                override = Override.OBEY  # not drained yet: on its way down
                fraction = balance.drain_fraction(now - ov.created_at, policy)
                kind, until = "down", ov.created_at + ov.ramp_s
        address_down = v.address_down if v else frozenset()
        held_site = holds.get((name, None))
        held_addresses = frozenset(
            a for a in (*sites[name].ipv4, *sites[name].ipv6) if (name, a) in holds
        )
        out[name] = SiteState(
            observed=v.observed if v else Health.UNKNOWN,
            override=override,
            address_down=address_down | held_addresses,
            stale=stale.get(name, False),
            damped=held_site is not None,
            damped_until=held_site,
            damped_addresses=held_addresses,
            ramp=fraction,
            ramp_kind=kind,
            ramp_until=until,
        )
    return out


def _override_ramp(ov: OverrideRow, ramp: balance.RampPolicy | None) -> balance.RampPolicy:
    """The ramp of an override with ramp_s: its duration, the configured steps."""
    base = ramp or balance.RampPolicy()
    return balance.RampPolicy(ov.ramp_s or 0.0, base.step_s, base.start)


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
        notify: bool = True,
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
        self._writes: asyncio.Queue[tuple[Callable[[], Any], bool]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.changed = asyncio.Event()  # set on every publish (tests wait on it)
        self._pools: dict[str, Pool] | None = None  # set by a config reload
        self.checks_seen = 0
        # -- shared mode (several nodes, one store): see the module docstring
        if self.policy.quorum not in QUORUM_MODES:
            raise ConfigError([f"checks.quorum: {self.policy.quorum!r} (allowed: auto, on, off)"])
        self.notify = notify
        self.shared = False
        self.db_ok = True  # the last re-read of the shared state reached the store
        self.sync_error: str | None = None
        self.syncs = 0  # completed re-reads of the shared state
        self.last_sync_at: float | None = None  # this node's clock
        self.decided: dict[TargetKey, Health] = {}  # the quorum's decisions
        self.tallies: dict[TargetKey, quorum.Tally] = {}
        self.no_quorum: set[str] = set()
        self.snapshot: QuorumSnapshot | None = None  # the last one read
        self.probed_at: dict[str, float] = {}  # site -> this process's newest probe result
        self._override_gen = 0  # bumped by local override writes (see _sync_once)
        self._wake = asyncio.Event()
        self._listen_stop = threading.Event()
        self._listener: threading.Thread | None = None
        # -- load balancing (see the module docstring)
        self.flaps: dict[TargetKey, list[float]] = {}  # state-change times per target
        self._holds: dict[TargetKey, float] = {}  # damped targets -> held until
        self._usable: dict[str, bool] = {}  # per site, as last computed
        self._back_at: dict[str, tuple[float, balance.RampPolicy]] = {}  # slow starts
        self._changed_at: dict[str, float] = {}  # per site: last flip of usability
        self.share_window = balance.ShareWindow()
        self.balance: dict[str, PoolBalance] = {}
        # the DNS path's offered counters (handler.Stats.pool_offered), set by the app;
        # None: no capacity windows (a standalone checker answers no DNS)
        self.counters: Callable[[], Mapping[tuple[str, str], int]] | None = None

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
        if self.store is not None and self._quorum_wanted(self.store):
            # the quorum's decisions are in the view before the first answer
            await self._go_shared()
        else:
            await self._load_flaps()  # flapping is remembered across a restart
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

    def _lease_s(self, site: str) -> float:
        """How long a verdict on `site` stays fresh: stale_intervals x its interval."""
        spec = self.specs.get(site)
        interval = spec.interval_s if spec is not None else self._period_s()
        return self.policy.stale_intervals * interval

    def _heartbeat_info(self, now: float) -> dict[str, Any]:
        """What a checker's heartbeat says: alive, voting or not, which verdicts are old."""
        stale = [
            s
            for s in self._checked_sites()
            if now - self.probed_at.get(s, float("-inf")) > self._lease_s(s)
        ]
        return {
            "checker": True,
            "frozen": self.frozen,
            "checks": self.checks_seen,
            # a node whose partition guard tripped suspects its own network: no vote
            "votes": not self.frozen,
            # sites without a probe result of this process within their lease: votes
            # on them (persisted ones, after a restart) do not count yet
            "stale_sites": sorted(stale)[:MAX_STALE_SITES_REPORTED],
            "quorum": self.shared,
        }

    async def _heartbeat_loop(self) -> None:
        """A checker says it is alive (its verdicts are fresh) once per interval."""
        assert self.store is not None
        while True:
            info = self._heartbeat_info(self.clock())
            ok = await asyncio.to_thread(self.store.heartbeat, info)
            if ok and not self.shared and self.policy.quorum == "auto":
                await self._detect_peers()
            await asyncio.sleep(self._period_s())

    # -- shared mode -----------------------------------------------------------------
    def _quorum_wanted(self, store: Store) -> bool:
        """quorum = "on", or "auto" with a database server (several nodes can reach it)."""
        return self.policy.quorum == "on" or (self.policy.quorum == "auto" and store.shared)

    async def _detect_peers(self) -> None:
        """quorum = "auto" on SQLite: go shared once another checking node heartbeats here."""
        assert self.store is not None
        try:
            nodes = await asyncio.to_thread(self.store.nodes)
            now = await asyncio.to_thread(self.store.db_now)
        except StoreError:
            return
        me = self.store.node_id
        lease = self.policy.stale_intervals * self._period_s()
        peers = [
            n.node_id
            for n in nodes
            if n.node_id != me
            and n.info.get("checker")
            and n.seen_at is not None
            and now - n.seen_at <= lease
        ]
        if peers and not self.shared:
            log.warning(
                "health: other checking nodes share this store (%s): deciding by quorum",
                ", ".join(sorted(peers)),
            )
            await self._go_shared()
            self.publish()

    async def _go_shared(self) -> None:
        """Decide by quorum from now on: read the shared state, keep it fresh."""
        assert self.store is not None
        self.shared = True
        if self.run_checker:
            try:
                planned = plan_targets(self.sites, self.specs)
                keep = [(site, addr or "") for site, addr in planned]
                await asyncio.to_thread(self.store.retain_observations, keep)
            except (StoreError, ConfigError) as exc:
                log.warning("health: cannot drop votes on targets no longer checked: %s", exc)
        await self._sync_once()
        self._tasks.append(asyncio.create_task(self._sync_loop()))
        if self.notify and self.store.notifies:
            loop = asyncio.get_running_loop()
            store = self.store

            def wake(_payload: str) -> None:
                try:
                    loop.call_soon_threadsafe(self._wake.set)
                except RuntimeError:  # the loop is closed: we are stopping
                    self._listen_stop.set()

            self._listener = threading.Thread(
                target=store.listen,
                args=(wake, self._listen_stop),
                name=f"geodns-listen-{store.node_id}",
                daemon=True,
            )
            self._listener.start()

    async def _sync_loop(self) -> None:
        """Re-read the shared state every period, and at once when a NOTIFY wakes us."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._period_s())
                await asyncio.sleep(SYNC_COALESCE_S)  # fold a burst of notifications
            except TimeoutError:
                pass
            self._wake.clear()
            await self._sync_once()

    def _decide(self, snap: QuorumSnapshot) -> quorum.Decisions:
        """The quorum over a snapshot, for the sites of this node's config."""
        voters: dict[str, quorum.Voter] = {}
        for n in snap.nodes:
            info = n.info
            voting = bool(info.get("checker")) and bool(info.get("votes", True))
            stale = info.get("stale_sites") or ()
            voters[n.node_id] = quorum.Voter(
                n.node_id, n.seen_at, voting and not info.get("frozen"), frozenset(stale)
            )
        observations = [
            (o.site, o.address, o.node_id, o.state)
            for o in snap.observations
            if o.site in self.sites
        ]
        last = {key: state for key, state in snap.decided.items() if key[0] in self.sites}
        leases = {site: self._lease_s(site) for site in self.sites}
        return quorum.decide(
            observations,
            voters,
            snap.now,
            leases,
            self.policy.quorum_min_votes,
            last,
            default_lease_s=self.policy.stale_intervals * self._period_s(),
        )

    def _changes(self, snap: QuorumSnapshot) -> dict[tuple[str, str], tuple[Health, str]]:
        decisions = self._decide(snap)
        return {
            key: (decisions.tallies[key].state, decisions.tallies[key].describe())
            for key in decisions.changed
        }

    async def _sync_once(self) -> None:
        """Read votes, decisions and overrides; store changed decisions; publish."""
        assert self.store is not None
        gen = self._override_gen
        try:
            snap = await asyncio.to_thread(self.store.quorum_snapshot)
            decisions = self._decide(snap)
            if decisions.changed:
                snap, _ = await asyncio.to_thread(self.store.save_quorum, self._changes)
                decisions = self._decide(snap)
        except StoreError as exc:
            if self.db_ok:
                log.error(
                    "health: shared state unreachable, serving the last decisions (local "
                    "checks may bring sites back UP, never take them DOWN): %s",
                    exc,
                )
            self.db_ok, self.sync_error = False, str(exc)
            self.publish()
            return
        if not self.db_ok:
            log.warning("health: shared state reachable again; deciding by quorum")
        for key in decisions.changed:
            t = decisions.tallies[key]
            log.warning(
                "health: quorum: site=%s address=%s %s", key[0], key[1] or "-", t.describe()
            )
        self.db_ok, self.sync_error = True, None
        self.snapshot = snap
        self.tallies = {(s, a or None): t for (s, a), t in decisions.tallies.items()}
        self.decided = {key: t.state for key, t in self.tallies.items()}
        self.no_quorum = decisions.no_quorum_sites()
        if gen == self._override_gen:
            # else a local override write raced this read: the next sync brings it
            self.overrides = dict(snap.overrides)
        self.syncs += 1
        self.last_sync_at = self.clock()
        await self._load_flaps()
        self.publish()

    def nodes_report(self, snapshot: QuorumSnapshot | None = None) -> dict[str, Any]:
        """For /v1/nodes: the quorum settings and every node, last seen, fresh, votes.

        From `snapshot`, else the one the last re-read of the shared state took.
        """
        snap = snapshot or self.snapshot
        me = self.store.node_id if self.store is not None else None
        out: dict[str, Any] = {
            "node_id": me,
            "quorum": {
                "mode": self.policy.quorum,
                "active": self.shared,
                "min_votes": self.policy.quorum_min_votes,
                "store_reachable": self.db_ok,
                "error": self.sync_error,
                "last_sync_at": self.last_sync_at,
                "no_quorum_sites": sorted(self.no_quorum),
            },
            "nodes": [],
        }
        if snap is None:
            return out
        votes: dict[str, dict[str, str]] = {}
        for o in snap.observations:
            name = o.site if not o.address else f"{o.site}/{o.address}"
            votes.setdefault(o.node_id, {})[name] = o.state.value
        lease = self.policy.stale_intervals * self._period_s()
        for n in sorted(snap.nodes, key=lambda n: n.node_id):
            out["nodes"].append(_node_report(n, snap.now, lease, votes.get(n.node_id, {})))
        return out

    async def _follow_loop(self) -> None:
        """`serve --no-checker`: poll the store for the checker's verdicts and overrides."""
        assert self.store is not None
        node = self.store.node_id
        while True:
            if self.shared:
                return  # the sync loop took over
            if self.policy.quorum == "auto":
                await self._detect_peers()
                if self.shared:
                    return
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
                await self._load_flaps()
                self.publish()
            await asyncio.sleep(self._period_s())

    async def stop(self) -> None:
        self._listen_stop.set()
        for task in self._tasks:
            task.cancel()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 2.0)
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
        if self.shared and self.run_checker and self.store is not None:
            store = self.store
            keep = [(site, addr or "") for site, addr in plan_targets(self.sites, self.specs)]
            self._enqueue(lambda: store.retain_observations(keep))
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
        self.probed_at[ev.site] = now
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
        spec = self.specs.get(ev.site)
        if ev.transition is not None and (spec is None or spec.kind == "none"):
            # a site without a check is UP by definition: no log line, no transition row
            info.health, info.since = ev.transition[1], now
        elif ev.transition is not None:
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
                ),
                wake=True,  # shared mode: our vote changed, re-decide
            )
            if not self.shared and _is_flap(old, new):
                self._note_flap(key, now)
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
            if self.shared and self.store is not None:
                # withdraw our votes now, not at the next heartbeat
                store, info = self.store, self._heartbeat_info(now)
                self._enqueue(lambda: store.heartbeat(info), wake=True)

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
        self,
        site: str,
        state: Override,
        reason: str,
        who: str,
        expires_in_s: float | None,
        ramp_s: float | None = None,
    ) -> OverrideRow:
        """Force a site UP/DOWN now (next answer), store it (audited), expire it later.

        `ramp_s`: DOWN drains the site's clients over that time (a ramped drain), UP
        brings them back over it (slow start) instead of `[checks] ramp_s`."""
        now = self.clock()
        expires_at = now + expires_in_s if expires_in_s else None
        if self.store is not None:
            row = await asyncio.to_thread(
                self.store.set_override, site, state, reason, who, expires_at, ramp_s
            )
        else:
            row = OverrideRow(site, state, reason, who, now, expires_at, ramp_s or None)
        self._override_gen += 1
        self.overrides[site] = row
        log.warning("override: site=%s state=%s by=%s reason=%s", site, state.value, who, reason)
        self.publish()
        return row

    async def clear_override(self, site: str, who: str, reason: str) -> bool:
        """Back to obeying the checks."""
        existed = self.overrides.pop(site, None) is not None
        self._override_gen += 1
        if self.store is not None:
            existed = (
                await asyncio.to_thread(self.store.clear_override, site, who, reason) or existed
            )
        self._override_gen += 1
        log.warning("override cleared: site=%s by=%s", site, who)
        self.publish()
        return existed

    # -- publishing ------------------------------------------------------------------
    def compute(self, now: float) -> dict[str, SiteState]:
        """Effective SiteStates at `now` (pure over the manager's current data)."""
        if self.shared:
            return self._compute_shared(now)
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
        return effective_states(
            self.sites,
            verdicts,
            self.overrides,
            stale,
            now,
            self._damping_holds(now),
            self.policy.ramp,
        )

    def _compute_shared(self, now: float) -> dict[str, SiteState]:
        """Shared mode: the quorum's decisions; cut off from the store, the last ones,
        lifted (never lowered) by this node's own checks."""
        by_site: dict[str, dict[str | None, Health]] = {}
        for (site, addr), state in self.decided.items():
            by_site.setdefault(site, {})[addr] = state
        if not self.db_ok and self.run_checker:
            for (site, addr), t in self.targets.items():
                last = by_site.setdefault(site, {}).get(addr, Health.UNKNOWN)
                by_site[site][addr] = quorum.degraded(last, t.health)
        verdicts: dict[str, SiteVerdict] = {}
        stale: dict[str, bool] = {}
        for site in self.sites:
            verdicts[site] = site_health(self.sites[site], by_site.get(site, {}))
            spec = self.specs.get(site)
            if spec is not None and spec.kind != "none":
                stale[site] = not self.db_ok or site in self.no_quorum
        return effective_states(
            self.sites,
            verdicts,
            self.overrides,
            stale,
            now,
            self._damping_holds(now),
            self.policy.ramp,
        )

    def publish(self, force: bool = False) -> None:
        """Recompute and publish a new GeoState if anything changed; reschedule timers."""
        now = self.clock()
        states = self._ramped(now, self.compute(now))
        geo = self.holder.view.geo
        pools = self._pools if self._pools is not None else geo.pools
        if self.counters is not None:
            self.balance = self.share_window.roll(
                now, self.counters(), pools, self.sites, self.balance
            )
        if (
            force
            or states != dict(geo.states)
            or geo.sites != self.sites
            or self.balance != dict(geo.balance)
        ):
            changed = {n for n in states if geo.states.get(n) != states[n]}
            rebalanced = {
                name
                for name in set(self.balance) | set(geo.balance)
                if self.balance.get(name) != geo.balance.get(name)
            }
            version = next_version()
            pool_versions = {
                name: version
                if force or changed & set(pool.members) or name in rebalanced
                else geo.pool_versions.get(name, 0)
                for name, pool in pools.items()
            }
            self.holder.publish_geo(
                GeoState(self.sites, pools, states, version, pool_versions, dict(self.balance))
            )
            self.changed.set()
        self._schedule(now)

    # -- load balancing ----------------------------------------------------------------
    def _damping_holds(self, now: float) -> dict[TargetKey, float]:
        """Targets held DOWN for flapping at `now` -> until when (replayed from the log)."""
        policy = self.policy.damping
        holds: dict[TargetKey, float] = {}
        if policy.enabled:
            for key, times in self.flaps.items():
                held = balance.damping(times, now, policy).held_until
                if held is not None:
                    holds[key] = held
            for key in holds.keys() - self._holds.keys():
                log.warning(
                    "damping: site=%s address=%s flapping: held DOWN until %.0f",
                    key[0],
                    key[1] or "-",
                    holds[key],
                )
        self._holds = holds
        return holds

    def _note_flap(self, key: TargetKey, at: float) -> None:
        """This node's checker saw a state change (the log gets the same row)."""
        if not self.policy.damping.enabled:
            return
        horizon = at - self.policy.damping.horizon_s
        times = [t for t in self.flaps.get(key, ()) if t >= horizon]
        times.append(at)
        self.flaps[key] = times

    async def _load_flaps(self) -> None:
        """Re-read recent state changes from the transition log (the damping input).

        Shared mode: the quorum's decisions (every node reads the same rows, so every
        node holds the same targets); else this node's own checker's rows (a follower:
        every checker's)."""
        if self.store is None or not self.policy.damping.enabled:
            return
        store = self.store
        since = self.clock() - self.policy.damping.horizon_s
        try:
            rows = await asyncio.to_thread(_recent_transitions, store, since)
        except (StoreError, ValueError) as exc:
            log.warning("damping: cannot read the transition log: %s", exc)
            return
        flaps: dict[TargetKey, list[float]] = {}
        for r in rows:
            if self.shared:
                mine = r.node_id == QUORUM_NODE
            elif self.run_checker:
                mine = r.node_id == store.node_id
            else:
                mine = r.node_id != QUORUM_NODE
            if mine and _is_flap(r.old, r.new):
                flaps.setdefault((r.site, r.address), []).append(r.at)
        self.flaps = flaps

    def _ramp_for(self, site: str) -> balance.RampPolicy:
        """The slow start of a site coming back: an UP override's ramp_s, else the policy."""
        ov = self.overrides.get(site)
        if ov is not None and ov.state is Override.UP and ov.ramp_s:
            return _override_ramp(ov, self.policy.ramp)
        return self.policy.ramp

    def _ramped(self, now: float, states: dict[str, SiteState]) -> dict[str, SiteState]:
        """Slow starts and the "changing" flag on top of the effective states.

        A site that turns usable (it was not at the previous publish) answers a growing
        share of its clients from now on; one that turns unusable forgets its ramp.
        The first publish starts no ramp (a restart must not slow-start every site).
        """
        out: dict[str, SiteState] = {}
        settle = self.policy.settle_s
        for name, st in states.items():
            usable = st.usable
            was = self._usable.get(name)
            if was is not None and was != usable:
                self._changed_at[name] = now
                if usable and (policy := self._ramp_for(name)).enabled:
                    self._back_at[name] = (now, policy)
                    log.warning("slow start: site=%s back over %g s", name, policy.ramp_s)
                elif not usable:
                    self._back_at.pop(name, None)
            self._usable[name] = usable
            back = self._back_at.get(name)
            if back is not None and not st.ramp_kind:
                t0, policy = back
                fraction = balance.ramp_fraction(now - t0, policy)
                if fraction >= 1.0:
                    del self._back_at[name]
                else:
                    st = replace(st, ramp=fraction, ramp_kind="up", ramp_until=t0 + policy.ramp_s)
            changed_at = self._changed_at.get(name)
            if changed_at is not None and now - changed_at >= settle:
                del self._changed_at[name]
                changed_at = None
            if st.ramp < 1.0 or st.damped or st.damped_addresses or changed_at is not None:
                st = replace(st, changing=True)
            out[name] = st
        return out

    def _balance_deadlines(self, now: float) -> list[float]:
        """When ramps step, holds end, settling ends and capacity windows roll."""
        deadlines: list[float] = []
        for t0, policy in self._back_at.values():
            step = balance.ramp_next_change(now - t0, policy)
            if step is not None:
                deadlines.append(t0 + step)
        for ov in self.overrides.values():
            if ov.state is Override.DOWN and ov.ramp_s and now < ov.created_at + ov.ramp_s:
                policy = _override_ramp(ov, self.policy.ramp)
                step = balance.ramp_next_change(now - ov.created_at, policy)
                if step is not None:
                    deadlines.append(ov.created_at + step)
        deadlines.extend(self._holds.values())
        deadlines.extend(t + self.policy.settle_s for t in self._changed_at.values())
        if self.counters is not None:
            pools = self._pools if self._pools is not None else self.holder.view.geo.pools
            due = self.share_window.next_due(pools, self.sites)
            if due is not None:
                deadlines.append(due)
        return deadlines

    def next_deadline(self) -> float | None:
        """The next time-driven change (what the timer is armed for); None: none."""
        now = self.clock()
        future = [d for d in self._deadlines(now) if d > now]
        return min(future) if future else None

    def _deadlines(self, now: float) -> list[float]:
        deadlines = [ov.expires_at for ov in self.overrides.values() if ov.expires_at]
        for site, seen in self.last_verdict_at.items():
            spec = self.specs.get(site)
            if spec is not None and spec.kind != "none":
                deadline = seen + self.policy.stale_intervals * spec.interval_s
                if deadline > now:
                    deadlines.append(deadline)
        return deadlines + self._balance_deadlines(now)

    def _schedule(self, now: float) -> None:
        """Arm one timer for the next time-driven change (override expiry, stale lease,
        ramp step, damping release, settling, capacity window)."""
        deadlines = self._deadlines(now)
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
    def _enqueue(self, fn: Callable[[], Any], wake: bool = False) -> None:
        """Queue a store write; `wake`: in shared mode, re-decide once it is written."""
        if self.store is not None and self._writes is not None:
            self._writes.put_nowait((fn, wake))

    async def _write_loop(self) -> None:
        assert self._writes is not None
        while True:
            fn, wake = await self._writes.get()
            try:
                await asyncio.to_thread(fn)
            except Exception as exc:  # the store journals what matters; log the rest
                log.error("health: store write failed: %s", exc)
            finally:
                self._writes.task_done()
            if wake and self.shared:
                self._wake.set()

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
            {addr: t for (s, addr), t in self.tallies.items() if s == site},
            balance.damping(self.flaps.get((site, None), ()), self.clock(), self.policy.damping),
        )


def _is_flap(old: Health, new: Health) -> bool:
    """A state change that counts for damping (a first UP after UNKNOWN does not)."""
    return old is not new and not (old is Health.UNKNOWN and new is Health.UP)


def _recent_transitions(store: Store, since: float) -> list[Any]:
    """Transitions newer than `since`, newest first, read page by page."""
    out: list[Any] = []
    before: int | None = None
    while True:
        rows, before = store.list_transitions(None, 1000, before)
        for r in rows:
            if r.at < since:
                return out
            out.append(r)
        if before is None:
            return out


def _node_report(n: NodeRow, now: float, lease_s: float, votes: dict[str, str]) -> dict[str, Any]:
    """One node for /v1/nodes; ages on the database's clock."""
    age = None if n.seen_at is None else round(now - n.seen_at, 3)
    voting = bool(n.info.get("checker")) and bool(n.info.get("votes", True))
    return {
        "node_id": n.node_id,
        "last_seen": n.last_seen,
        "age_s": age,
        "fresh": age is not None and age <= lease_s,
        "voting": voting and not n.info.get("frozen"),
        "frozen": bool(n.info.get("frozen")),
        "stale_sites": list(n.info.get("stale_sites") or ()),
        "votes": votes,
    }


WaitFn = Callable[[], Awaitable[None]]
