"""Multi-vantage health quorum: several nodes' verdicts -> one decision per target.

Pure functions, no I/O and no clock (the caller passes the database's `now`): the
health manager reads a snapshot from the shared store, calls `decide()`, stores the
decisions that changed and publishes them. Every node runs the same function on the same
snapshot, so they agree; the stored decision is what a node keeps when the quorum is
lost (and what a restarted node starts from).

The rule (issue 10), per target (a site, or one address of a per-address check):

- A vote is one node's current observed health of the target (UP, DOWN or UNKNOWN).
- It counts while fresh: the node heartbeated within the target's lease on the
  database's clock (`stale_intervals` x the check interval), it votes at all (it has a
  checker and its partition guard has not tripped) and it does not report the site as
  stale (no recent probe result of its own).
- UNKNOWN abstains (that node has no verdict yet).
- With at least `min_votes` fresh UP/DOWN votes the quorum decides: DOWN when a strict
  majority says DOWN, else UP (a tie keeps the site in the answers: one node with a
  broken uplink cannot take a site out for everyone).
- Below `min_votes`, the last decision is kept and the target is flagged `quorate=False`.

`degraded()` is the rule for a node cut off from the database: its own checks may bring
a target back UP but never take one DOWN alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .model import Health

# (site, address); '' is the site as a whole, as in the store's observations table
VoteKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Voter:
    """A node as the quorum sees it: when it last heartbeated and whether it votes."""

    node_id: str
    seen_at: float | None  # database clock of the last heartbeat; None: never
    voting: bool = True  # False: no checker, or its partition guard tripped
    stale_sites: frozenset[str] = frozenset()  # sites it has no recent verdict for

    def fresh(self, site: str, now: float, lease_s: float) -> bool:
        """True if this node's vote on `site` counts at `now` (database clock)."""
        return (
            self.voting
            and self.seen_at is not None
            and now - self.seen_at <= lease_s
            and site not in self.stale_sites
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """The quorum's decision for one target and the votes behind it."""

    state: Health  # the decision (the kept one when not quorate)
    quorate: bool  # False: fewer than min_votes fresh UP/DOWN votes; `state` is the last
    up: tuple[str, ...] = ()  # node ids of fresh UP votes
    down: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()  # fresh, but no verdict yet (abstains)
    stale: tuple[str, ...] = ()  # votes that do not count (lease expired, not voting)

    @property
    def votes(self) -> int:
        """Fresh votes that count (UP + DOWN)."""
        return len(self.up) + len(self.down)

    def describe(self) -> str:
        """'DOWN by 2 of 3 fresh votes (down: a, b; up: c)' for logs and the event log."""
        sides = (("down", self.down), ("up", self.up))
        detail = "; ".join(f"{name}: {', '.join(ids)}" for name, ids in sides if ids)
        if not self.quorate:
            return f"no quorum ({self.votes} fresh votes), keeping {self.state.value}" + (
                f" ({detail})" if detail else ""
            )
        winners = len(self.down) if self.state is Health.DOWN else len(self.up)
        return f"{self.state.value} by {winners} of {self.votes} fresh votes ({detail})"


@dataclass(frozen=True, slots=True)
class Decisions:
    """Every target's tally; `changed` lists the targets whose decision differs from last."""

    tallies: dict[VoteKey, Tally] = field(default_factory=dict)
    changed: tuple[VoteKey, ...] = ()

    def no_quorum_sites(self) -> set[str]:
        """Sites with a target whose last decision is kept for want of votes.

        A target without an earlier decision and without any fresh UP/DOWN vote is not
        counted: nothing is kept for it, it is simply not checked yet (a fresh start).
        """
        return {
            site
            for (site, _addr), t in self.tallies.items()
            if not t.quorate and (t.state is not Health.UNKNOWN or t.votes)
        }


def tally(
    votes: Iterable[tuple[str, Health]], min_votes: int, last: Health = Health.UNKNOWN
) -> Tally:
    """Decide one target from its fresh votes `(node_id, health)`; see the module rule."""
    up: list[str] = []
    down: list[str] = []
    unknown: list[str] = []
    for node, health in sorted(votes):
        if health is Health.UP:
            up.append(node)
        elif health is Health.DOWN:
            down.append(node)
        else:
            unknown.append(node)
    counted = len(up) + len(down)
    if counted < max(1, min_votes):
        return Tally(last, False, tuple(up), tuple(down), tuple(unknown))
    state = Health.DOWN if 2 * len(down) > counted else Health.UP
    return Tally(state, True, tuple(up), tuple(down), tuple(unknown))


def decide(
    observations: Iterable[tuple[str, str, str, Health]],
    voters: Mapping[str, Voter],
    now: float,
    lease_s: Mapping[str, float],
    min_votes: int,
    last: Mapping[VoteKey, Health],
    default_lease_s: float = 30.0,
) -> Decisions:
    """Tally every target seen in `observations` (site, address, node_id, health) or `last`.

    `now` and every `Voter.seen_at` are on the database's clock, so nodes with skewed
    clocks agree on freshness. `lease_s` maps a site to its lease (sites missing from
    it get `default_lease_s`). A vote from a node missing from `voters` never counts.
    """
    fresh: dict[VoteKey, list[tuple[str, Health]]] = {}
    stale: dict[VoteKey, list[str]] = {}
    for site, address, node, health in observations:
        key = (site, address)
        voter = voters.get(node)
        if voter is not None and voter.fresh(site, now, lease_s.get(site, default_lease_s)):
            fresh.setdefault(key, []).append((node, health))
        else:
            stale.setdefault(key, []).append(node)
    tallies: dict[VoteKey, Tally] = {}
    changed: list[VoteKey] = []
    for key in sorted({*fresh, *stale, *last}):
        previous = last.get(key, Health.UNKNOWN)
        t = tally(fresh.get(key, ()), min_votes, previous)
        if key in stale:
            t = Tally(t.state, t.quorate, t.up, t.down, t.unknown, tuple(sorted(stale[key])))
        tallies[key] = t
        if t.quorate and t.state is not previous:
            changed.append(key)
    return Decisions(tallies, tuple(changed))


def degraded(last: Health, local: Health) -> Health:
    """Cut off from the database: the local verdict may lift a DOWN, never impose one."""
    if last is Health.DOWN and local is Health.UP:
        return Health.UP
    return last
