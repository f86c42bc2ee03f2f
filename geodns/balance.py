"""Load-balancing arithmetic: client-prefix hashes, weighted choice, ramps, capacity
shares and flap damping.

Pure: no I/O, no clock, no randomness; times are arguments. `pick.decide` uses the
per-client functions on the query path; `health.HealthManager` uses the time-driven
ones to compute what it publishes (ramp fractions, spill fractions, damping holds) and
when to publish next.

Every per-client choice hashes the client's prefix (/24 IPv4, /56 IPv6, so the ECS
scope of such an answer is at least that) with a salt made from a site or address name
and a purpose. The hash is SplitMix64's finalizer over the prefix xor the salt: the
same on every node and every run (no per-process seed), so a client keeps its site
across view rebuilds, restarts and nameservers.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from .model import Pool, PoolBalance, Site

__all__ = [
    "HASH_PREFIX_V4",
    "HASH_PREFIX_V6",
    "DampState",
    "DampingPolicy",
    "RampPolicy",
    "ShareWindow",
    "client_key",
    "damping",
    "drain_fraction",
    "mix64",
    "order_by_race",
    "ramp_fraction",
    "rotation_order",
    "rotations_for",
    "salt",
    "spill_fraction",
    "unit",
    "weighted_order",
]

# Clients are told apart by this prefix: one resolver's view of a /24 (or /56, the
# usual IPv6 end-site allocation) is one client, as in the packet cache.
HASH_PREFIX_V4 = 24
HASH_PREFIX_V6 = 56
_MASK64 = (1 << 64) - 1
_2_TO_MINUS_53 = 1.0 / (1 << 53)
# shuffled answers: at most this many pre-rendered orderings per answer
MAX_ROTATIONS = 64
# a capacity window with fewer answers than this keeps the previous spill fractions
MIN_WINDOW_ANSWERS = 50


def mix64(x: int) -> int:
    """SplitMix64's output function: a bijection on 64-bit integers, well mixed."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_SALTS: dict[tuple[str, str], int] = {}


def salt(name: str, purpose: str) -> int:
    """A stable 64-bit salt for (site or address name, purpose); cached."""
    key = (name, purpose)
    s = _SALTS.get(key)
    if s is None:
        digest = hashlib.blake2b(f"{purpose}\0{name}".encode(), digest_size=8).digest()
        s = int.from_bytes(digest, "big")
        if len(_SALTS) < 65536:
            _SALTS[key] = s
    return s


def client_key(client: IPv4Address | IPv6Address) -> int:
    """The client's hashing prefix as an integer (/24 IPv4, /56 IPv6; family bit 0)."""
    if client.version == 4:
        return (int(client) >> (32 - HASH_PREFIX_V4)) << 1
    return ((int(client) >> (128 - HASH_PREFIX_V6)) << 1) | 1


def unit(key: int, salt_: int) -> float:
    """A number in (0, 1), uniform over keys, fixed for (key, salt): mix64(key ^ salt)."""
    # mix64 inlined: this runs for every site a client's answer depends on
    z = ((key ^ salt_) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (((z ^ (z >> 31)) >> 11) + 0.5) * _2_TO_MINUS_53


def weighted_order(
    names: Sequence[str], weights: Sequence[int], key: int, purpose: str
) -> list[str]:
    """`names` ordered for one client by weighted rendezvous hashing.

    Each name draws an exponential race time -ln(u)/weight from the client's hash; the
    fastest leads. A name leads for weight/sum(weights) of all clients, and a change of
    one name's weight (or a name added or removed) moves clients to or from that name
    only. Weight 0 comes last, in the given order; all zero counts as all equal.
    """
    return order_by_race(names, weights, [salt(n, purpose) for n in names], key)


def order_by_race(
    names: Sequence[str], weights: Sequence[int], salts: Sequence[int], key: int
) -> list[str]:
    """weighted_order() with the salts computed beforehand (one per name)."""
    if not any(w > 0 for w in weights):
        weights = [1] * len(names)
    log = math.log
    races = []
    for i, w in enumerate(weights):
        races.append((-log(unit(key, salts[i])) / w if w > 0 else math.inf, i))
    races.sort()
    return [names[i] for _, i in races]


def rotations_for(weights: Sequence[int]) -> int:
    """How many orderings make a weighted rotation exact: sum(weights) / gcd, capped."""
    positive = [w for w in weights if w > 0] or [1] * len(weights)
    if len(positive) <= 1:
        return 1
    g = math.gcd(*positive)
    return min(sum(positive) // g, MAX_ROTATIONS)


def rotation_order(names: Sequence[str], weights: Sequence[int], turn: int) -> list[str]:
    """Ordering number `turn` (mod rotations_for(weights)) of a weighted rotation.

    Over the rotations each name leads in proportion to its weight (exactly, up to
    MAX_ROTATIONS orderings); the others follow in the configured order, cyclically
    after the leader. Weight 0 never leads and comes last.
    """
    if not any(w > 0 for w in weights):
        weights = [1] * len(names)
    live = [(n, w) for n, w in zip(names, weights, strict=True) if w > 0]
    dead = [n for n, w in zip(names, weights, strict=True) if w <= 0]
    if len(live) <= 1:
        return [n for n, _ in live] + dead
    r = rotations_for([w for _, w in live])
    total = sum(w for _, w in live)
    # stratified: the midpoint of slot k of r falls in one name's share of the total
    point = ((turn % r) + 0.5) / r * total
    lead, acc = 0, 0.0
    for i, (_, w) in enumerate(live):
        acc += w
        if point < acc:
            lead = i
            break
    order = [n for n, _ in live]
    return order[lead:] + order[:lead] + dead


# -- ramps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RampPolicy:
    """Slow start: a site coming back gets `start`, then equal steps to 1 over ramp_s."""

    ramp_s: float = 0.0  # 0: no ramp, back at once
    step_s: float = 30.0
    start: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.ramp_s > 0


def _steps(ramp_s: float, step_s: float) -> int:
    return max(1, math.ceil(ramp_s / max(step_s, 1e-9) - 1e-9))


def ramp_fraction(elapsed_s: float, policy: RampPolicy) -> float:
    """The share of its clients a site answers `elapsed_s` after it came back.

    start at 0, then start + (1 - start) * k / n at the k-th of n steps, 1 from ramp_s
    on (e.g. 300 s in 30 s steps from 0.1: 0.1, 0.19, ..., 0.55 at 150 s, 1 at 300 s).
    """
    if not policy.enabled or elapsed_s >= policy.ramp_s:
        return 1.0
    n = _steps(policy.ramp_s, policy.step_s)
    k = min(n, max(0, math.floor(elapsed_s / policy.step_s + 1e-9)))
    return policy.start + (1.0 - policy.start) * k / n


def drain_fraction(elapsed_s: float, policy: RampPolicy) -> float:
    """A ramped drain, the mirror of a slow start: 1 - start at once, 0 from ramp_s on."""
    if not policy.enabled or elapsed_s >= policy.ramp_s:
        return 0.0
    return 1.0 - ramp_fraction(elapsed_s, policy)


def ramp_next_change(elapsed_s: float, policy: RampPolicy) -> float | None:
    """Seconds from the ramp's start to its next step (None: the ramp is over)."""
    if not policy.enabled or elapsed_s >= policy.ramp_s:
        return None
    k = max(0, math.floor(elapsed_s / policy.step_s + 1e-9))
    return min(policy.ramp_s, (k + 1) * policy.step_s)


# -- capacity ------------------------------------------------------------------------


def spill_fraction(capacity: float, offered_share: float) -> float:
    """The fraction of a site's clients to send on so it answers at most `capacity`."""
    if capacity >= 1.0 or offered_share <= capacity or offered_share <= 0:
        return 0.0
    return 1.0 - capacity / offered_share


# counter keys: (pool, site) = answers that offered the site; (pool, "") = the pool's
# answers with at least one site
CounterKey = tuple[str, str]


@dataclass
class ShareWindow:
    """Capacity shares per pool, measured over consecutive windows of `pool.window_s`.

    The handler keeps cumulative counters; `roll()` is called by scheduled publishes
    and, for each pool whose window has ended, turns the counters' increase over the
    window into offered shares and spill fractions. A counter that went backwards (a
    worker restarted) counts from zero. Pools without a capacity-capped member are not
    tracked.
    """

    _started: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)

    def next_due(self, pools: Mapping[str, Pool], sites: Mapping[str, Site]) -> float | None:
        """When the earliest window of a tracked pool ends (None: nothing tracked)."""
        due = [
            t0 + pools[name].window_s
            for name, (t0, _) in self._started.items()
            if name in pools and _capped(pools[name], sites)
        ]
        return min(due) if due else None

    def roll(
        self,
        now: float,
        counters: Mapping[CounterKey, int],
        pools: Mapping[str, Pool],
        sites: Mapping[str, Site],
        previous: Mapping[str, PoolBalance],
    ) -> dict[str, PoolBalance]:
        """The balance of every capped pool at `now`; windows that ended are restarted."""
        out: dict[str, PoolBalance] = {}
        for name, pool in pools.items():
            if not _capped(pool, sites):
                self._started.pop(name, None)
                continue
            members = [m for m in pool.members if m in sites]
            current = {m: counters.get((name, m), 0) for m in members}
            current[""] = counters.get((name, ""), 0)
            started = self._started.get(name)
            before = previous.get(name, PoolBalance())
            if started is None:
                self._started[name] = (now, current)
                out[name] = before
                continue
            t0, base = started
            if now < t0 + pool.window_s:
                out[name] = before
                continue
            delta = {
                k: v - base.get(k, 0) if v >= base.get(k, 0) else v for k, v in current.items()
            }
            total = delta[""]
            self._started[name] = (now, current)
            if total < MIN_WINDOW_ANSWERS:
                out[name] = PoolBalance(before.spill, before.offered_share, total, now - t0)
                continue
            shares = {m: delta[m] / total for m in members}
            spill = {
                m: f for m in members if (f := spill_fraction(sites[m].capacity, shares[m])) > 0
            }
            out[name] = PoolBalance(spill, shares, total, now - t0)
        return out


def _capped(pool: Pool, sites: Mapping[str, Site]) -> bool:
    return any(m in sites and sites[m].capacity < 1.0 for m in pool.members)


# -- flap damping --------------------------------------------------------------------


@dataclass(frozen=True)
class DampingPolicy:
    """BGP-style flap damping (see README "Load balancing"); max_flaps 0 = off."""

    max_flaps: int = 0  # more state changes than this within window_s: held DOWN
    window_s: float = 600.0
    penalty_s: float = 120.0  # the first hold; each new one within decay doubles it
    penalty_max_s: float = 3600.0
    decay_s: float = 1800.0  # each quiet decay_s after a hold forgets one doubling

    @property
    def enabled(self) -> bool:
        return self.max_flaps > 0

    def penalty(self, level: int) -> float:
        """How long hold number `level` (1, 2, ...) lasts."""
        return min(self.penalty_max_s, self.penalty_s * 2.0 ** max(0, min(level, 40) - 1))

    @property
    def horizon_s(self) -> float:
        """How far back transitions can matter (older ones are forgotten by decay)."""
        levels = 1 + math.ceil(math.log2(max(1.0, self.penalty_max_s / max(self.penalty_s, 1))))
        return self.window_s + self.penalty_max_s + self.decay_s * (levels + 1)


@dataclass(frozen=True)
class DampState:
    """Damping of one site at one moment."""

    held_until: float | None = None  # held DOWN until then (None: not held)
    level: int = 0  # holds remembered: the next one lasts penalty(level + 1)
    flaps: int = 0  # state changes within the window ending now

    def held(self, now: float) -> bool:
        return self.held_until is not None and now < self.held_until


def _decayed(level: int, since: float, at: float, decay_s: float) -> int:
    if level <= 0 or decay_s <= 0 or at <= since:
        return level
    return max(0, level - math.floor((at - since) / decay_s))


def damping(times: Iterable[float], now: float, policy: DampingPolicy) -> DampState:
    """Replay a site's state-change times up to `now`: is it held DOWN, until when?

    At each change, if more than `max_flaps` changes fall within the `window_s` ending
    there: a site not held is held for penalty(level) from that change, level being one
    more than the holds it remembers; a site already held is held on for its current
    penalty from that change. Each `decay_s` after a hold ends forgets one level. Every
    node replays the same shared transition log, so every node holds the same sites
    for the same time.
    """
    if not policy.enabled:
        return DampState()
    window: deque[float] = deque()
    level = 0
    held_until = -math.inf
    for t in sorted(t for t in times if t <= now):
        window.append(t)
        while window[0] <= t - policy.window_s:
            window.popleft()
        if len(window) <= policy.max_flaps:
            continue
        if t >= held_until:
            level = _decayed(level, held_until, t, policy.decay_s) + 1
        held_until = max(held_until, t + policy.penalty(level))
    while window and window[0] <= now - policy.window_s:
        window.popleft()
    if now < held_until:
        return DampState(held_until, level, len(window))
    return DampState(None, _decayed(level, held_until, now, policy.decay_s), len(window))
