"""geodns.quorum: several nodes' votes -> one decision per target (pure, no I/O).

Tables first: how fresh votes are counted (`tally`), which votes are fresh (`Voter`),
a whole snapshot (`decide`), and the rule for a node cut off from the database
(`degraded`).
"""

from __future__ import annotations

import pytest

from geodns.model import Health
from geodns.quorum import Decisions, Tally, Voter, decide, degraded, tally

UP, DOWN, UNKNOWN = Health.UP, Health.DOWN, Health.UNKNOWN
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("votes", "min_votes", "last", "state", "quorate"),
    [
        # one node with a broken uplink cannot take a site out for everyone
        ([DOWN, UP, UP], 2, UP, UP, True),
        ([DOWN, DOWN, UP], 2, UP, DOWN, True),
        ([DOWN, DOWN, DOWN], 2, UP, DOWN, True),
        # a tie keeps the site in the answers
        ([DOWN, UP], 2, UP, UP, True),
        ([DOWN, UP], 2, DOWN, UP, True),
        ([DOWN, DOWN], 2, UP, DOWN, True),
        ([DOWN, DOWN, UP, UP], 2, DOWN, UP, True),
        # below min_votes the last decision is kept: no node acts on its view alone
        ([DOWN], 2, UP, UP, False),
        ([UP], 2, DOWN, DOWN, False),
        ([], 2, DOWN, DOWN, False),
        ([], 2, UNKNOWN, UNKNOWN, False),
        # UNKNOWN (no verdict yet) abstains
        ([DOWN, UNKNOWN, UNKNOWN], 2, UP, UP, False),
        ([DOWN, DOWN, UNKNOWN], 2, UP, DOWN, True),
        # quorum_min_votes = 1: a single node decides (what a lone node does anyway)
        ([DOWN], 1, UP, DOWN, True),
        ([UP], 1, DOWN, UP, True),
        ([DOWN, DOWN, UP], 3, UP, DOWN, True),
        ([DOWN, DOWN], 3, UP, UP, False),
    ],
    ids=lambda v: "-".join(h.value for h in v) if isinstance(v, list) else str(v),
)
def test_tally(
    votes: list[Health], min_votes: int, last: Health, state: Health, quorate: bool
) -> None:
    t = tally([(f"n{i}", v) for i, v in enumerate(votes)], min_votes, last)
    assert (t.state, t.quorate) == (state, quorate)


def test_tally_names_the_voters_and_describes_itself() -> None:
    t = tally([("c", UP), ("a", DOWN), ("b", DOWN), ("d", UNKNOWN)], 2)
    assert (t.down, t.up, t.unknown, t.votes) == (("a", "b"), ("c",), ("d",), 3)
    assert t.describe() == "down by 2 of 3 fresh votes (down: a, b; up: c)"
    lone = tally([("a", DOWN)], 2, UP)
    assert lone.describe() == "no quorum (1 fresh votes), keeping up (down: a)"


@pytest.mark.parametrize(
    ("voter", "site", "age_s", "fresh"),
    [
        (Voter("a", NOW), "uk", 0.0, True),
        (Voter("a", NOW), "uk", 30.0, True),  # the lease is inclusive
        (Voter("a", NOW), "uk", 30.1, False),  # heartbeat older than the lease
        (Voter("a", None), "uk", 0.0, False),  # never heartbeated (pre-v2 row)
        (Voter("a", NOW, voting=False), "uk", 0.0, False),  # partition guard tripped
        (Voter("a", NOW, stale_sites=frozenset({"uk"})), "uk", 0.0, False),
        (Voter("a", NOW, stale_sites=frozenset({"uk"})), "fra", 0.0, True),
    ],
    ids=["now", "at-lease", "past-lease", "never", "not-voting", "stale-site", "other-site"],
)
def test_voter_freshness(voter: Voter, site: str, age_s: float, fresh: bool) -> None:
    assert voter.fresh(site, NOW + age_s, 30.0) is fresh


def voters(*names: str, age_s: float = 1.0) -> dict[str, Voter]:
    return {n: Voter(n, NOW - age_s) for n in names}


def test_decide_counts_only_fresh_votes_on_the_database_clock() -> None:
    obs = [
        ("uk", "", "a", DOWN),
        ("uk", "", "b", DOWN),
        ("uk", "", "c", UP),
        ("fra", "", "a", UP),
        ("fra", "", "b", UP),
    ]
    nodes = {**voters("a", "c"), "b": Voter("b", NOW - 100.0)}  # b stopped heartbeating
    d = decide(obs, nodes, NOW, {"uk": 30.0, "fra": 30.0}, 2, {("uk", ""): UP})
    uk = d.tallies[("uk", "")]
    # without b: a DOWN, c UP -> a tie -> UP, the last decision stands
    assert (uk.state, uk.quorate, uk.stale) == (UP, True, ("b",))
    fra = d.tallies[("fra", "")]
    assert (fra.state, fra.quorate) == (UNKNOWN, False)  # only a is fresh
    assert d.changed == ()
    assert d.no_quorum_sites() == {"fra"}


def test_decide_reports_changes_against_the_stored_decisions() -> None:
    obs = [("uk", "", "a", DOWN), ("uk", "", "b", DOWN), ("fra", "", "a", UP)]
    obs += [("fra", "", "b", UP), ("de", "10.0.0.1", "a", DOWN), ("de", "10.0.0.1", "b", DOWN)]
    last = {("uk", ""): UP, ("fra", ""): UP, ("gone", ""): DOWN}
    d = decide(obs, voters("a", "b"), NOW, {}, 2, last, default_lease_s=30.0)
    assert d.changed == (("de", "10.0.0.1"), ("uk", ""))
    assert d.tallies[("de", "10.0.0.1")].state is DOWN
    # a stored decision nobody votes on any more is kept, not quorate
    assert d.tallies[("gone", "")] == Tally(DOWN, False)
    assert d.no_quorum_sites() == {"gone"}


def test_decide_ignores_nodes_it_does_not_know() -> None:
    obs = [("uk", "", "a", DOWN), ("uk", "", "ghost", DOWN)]
    d = decide(obs, voters("a"), NOW, {"uk": 30.0}, 1, {})
    assert d.tallies[("uk", "")].stale == ("ghost",)
    assert d.tallies[("uk", "")].state is DOWN  # min_votes 1: a alone decides


def test_fresh_start_without_verdicts_is_not_flagged() -> None:
    d = decide([("uk", "", "a", UNKNOWN)], voters("a", "b"), NOW, {}, 2, {})
    assert d.no_quorum_sites() == set()
    assert isinstance(d, Decisions)


@pytest.mark.parametrize(
    ("last", "local", "served"),
    [
        (DOWN, UP, UP),  # local checks may bring a site back UP
        (UP, DOWN, UP),  # ... but never take one DOWN alone
        (UNKNOWN, DOWN, UNKNOWN),
        (DOWN, DOWN, DOWN),
        (DOWN, UNKNOWN, DOWN),
        (UP, UP, UP),
    ],
    ids=lambda h: h.value,
)
def test_degraded_lifts_never_lowers(last: Health, local: Health, served: Health) -> None:
    assert degraded(last, local) is served
