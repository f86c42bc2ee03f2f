"""geodns.store against SQLite and against a real PostgreSQL.

PostgreSQL is the session server of tests/conftest.py (started from the Debian package),
or GEODNS_TEST_PG_URL when set, a SQLAlchemy URL (`postgresql+psycopg://user@host/db`)
of an existing one; each test gets a fresh schema in that database, dropped afterwards.
Tests that need SQLite's file locks to make the database unavailable run on SQLite only.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from geodns.errors import StoreError
from geodns.model import Health, Override
from geodns.store import (
    JOURNAL_FILE,
    REJECTED_FILE,
    SCHEMA_VERSION,
    CheckResult,
    Store,
)
from tests.conftest import postgres_available

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
DAY_S = 86400.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _backends() -> list[str]:
    return ["sqlite", "postgresql"] if postgres_available() else ["sqlite"]


def _pg_conninfo(url: str) -> str:
    """The libpq form of a SQLAlchemy psycopg URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(params=_backends())
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with an empty database behind it (SQLite file or PostgreSQL schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'geodns.sqlite3'}"
        return
    psycopg = pytest.importorskip("psycopg")
    base = request.getfixturevalue("pg_base_url")
    schema = f"geodns_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_conninfo(base), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(_pg_conninfo(base), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def raw_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run one query with the bare driver, bypassing the Store."""
    if url.startswith("sqlite:///"):
        lite = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return list(lite.execute(sql).fetchall())
        finally:
            lite.close()
    import psycopg

    # libpq reads the options=-csearch_path=... query parameter of the URL itself
    with psycopg.connect(_pg_conninfo(url)) as conn:
        return list(conn.execute(sql.encode()).fetchall())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_store(store_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., Store]]:
    """Open Stores on the test database; every one is closed at teardown."""
    opened: list[Store] = []

    def make(node_id: str = "node-a", **kwargs: Any) -> Store:
        kwargs.setdefault("journal_dir", tmp_path / "journal")
        kwargs.setdefault("clock", clock)
        store = Store(kwargs.pop("url", store_url), node_id, **kwargs)
        opened.append(store)
        return store.open()

    yield make
    for store in opened:
        store.close()


# --------------------------------------------------------------------------- schema


def test_schema_created_once_and_reopen_is_idempotent(
    make_store: Callable[..., Store], store_url: str
) -> None:
    store = make_store()
    assert store.schema_version() == SCHEMA_VERSION
    assert store.create_schema() == SCHEMA_VERSION
    store.open()
    store.close()
    again = make_store()
    assert again.schema_version() == SCHEMA_VERSION
    versions = raw_rows(store_url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert again.healthy and again.ping()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "dir" / "geodns.sqlite3"
    store = Store(f"sqlite:///{db}", "n", journal_dir=tmp_path / "j").open()
    try:
        assert db.exists(), "the parent directory is created"
        assert raw_rows(f"sqlite:///{db}", "PRAGMA journal_mode") == [("wal",)]
    finally:
        store.close()


def test_default_journal_dir_sits_next_to_the_sqlite_file(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'data' / 'geodns.sqlite3'}", "n")
    assert store.journal_path == tmp_path / "data" / "journal" / JOURNAL_FILE
    store.close()


# --------------------------------------------------------------------------- health


def test_transitions_persist_across_reopen(make_store: Callable[..., Store]) -> None:
    store = make_store()
    first = store.record_transition("fra", None, Health.UNKNOWN, Health.UP, "5 ok", at=T0)
    second = store.record_transition("fra", "192.0.2.1", Health.UP, Health.DOWN, "refused", T0 + 1)
    third = store.record_transition("ams", None, Health.UNKNOWN, Health.DOWN, "timeout", T0 + 2)
    assert first is not None and second is not None and third is not None
    assert first < second < third
    store.close()

    reopened = make_store()
    rows, cursor = reopened.list_transitions()
    assert cursor is None
    assert [(r.id, r.site, r.address, r.old, r.new, r.at, r.reason) for r in rows] == [
        (third, "ams", None, Health.UNKNOWN, Health.DOWN, T0 + 2, "timeout"),
        (second, "fra", "192.0.2.1", Health.UP, Health.DOWN, T0 + 1, "refused"),
        (first, "fra", None, Health.UNKNOWN, Health.UP, T0, "5 ok"),
    ]
    assert {r.node_id for r in rows} == {"node-a"}
    observed = reopened.observed_states()
    assert {site: {a: o.state for a, o in by.items()} for site, by in observed.items()} == {
        "ams": {"": Health.DOWN},
        "fra": {"": Health.UP, "192.0.2.1": Health.DOWN},
    }
    assert observed["fra"]["192.0.2.1"].since == T0 + 1


def test_list_transitions_filters_by_site_and_pages(make_store: Callable[..., Store]) -> None:
    store = make_store()
    for i in range(7):
        store.record_transition("fra" if i % 2 else "ams", None, Health.UP, Health.DOWN, str(i))
    page, cursor = store.list_transitions(site="ams", limit=3)
    assert [r.reason for r in page] == ["6", "4", "2"]
    assert cursor == page[-1].id
    page, cursor = store.list_transitions(site="ams", limit=3, before_id=cursor)
    assert [r.reason for r in page] == ["0"]
    assert cursor is None


def test_checks_update_observation_and_read_back_newest_first(
    make_store: Callable[..., Store], clock: FakeClock
) -> None:
    store = make_store()
    store.record_transition("fra", "192.0.2.1", Health.UNKNOWN, Health.UP, "up", at=T0)
    assert store.record_check("fra", "192.0.2.1", False, None, "connection refused", T0 + 10)
    clock.now = T0 + 20
    assert store.record_check("fra", "192.0.2.1", True, 12.5, None)
    obs = store.observed_states()["fra"]["192.0.2.1"]
    assert (obs.state, obs.since, obs.updated_at) == (Health.UP, T0, T0 + 20)
    assert (obs.last_error, obs.last_latency_ms) == (None, 12.5)
    checks = store.last_checks("fra")
    assert [(c.at, c.ok, c.latency_ms, c.error) for c in checks] == [
        (T0 + 20, True, 12.5, None),
        (T0 + 10, False, None, "connection refused"),
    ]
    assert store.observed_states(node_id="someone-else") == {}


def test_heartbeats_list_every_node(make_store: Callable[..., Store], clock: FakeClock) -> None:
    a, b = make_store("node-a"), make_store("node-b")
    assert a.heartbeat({"version": "0.1.0"})
    clock.now = T0 + 5
    assert b.heartbeat({"version": "0.1.0", "zones": 3})
    assert a.heartbeat({"version": "0.1.1"})
    assert [(n.node_id, n.last_seen, n.info) for n in b.nodes()] == [
        ("node-a", T0 + 5, {"version": "0.1.1"}),
        ("node-b", T0 + 5, {"version": "0.1.0", "zones": 3}),
    ]


# --------------------------------------------------------------------------- overrides


def test_overrides_set_list_expire_and_audit(
    make_store: Callable[..., Store], clock: FakeClock
) -> None:
    store = make_store()
    fra = store.set_override("fra", Override.DOWN, "maintenance", "alice", expires_at=T0 + 60)
    assert (fra.state, fra.who, fra.created_at, fra.expires_at) == (
        Override.DOWN,
        "alice",
        T0,
        T0 + 60,
    )
    clock.now = T0 + 1
    store.set_override("ams", Override.UP, "pin", "bob", expires_at=None)
    assert store.overrides() == {
        "fra": fra,
        "ams": store.overrides()["ams"],
    }
    assert set(store.overrides(now=T0 + 60)) == {"ams"}, "expired overrides are never listed"

    clock.now = T0 + 61
    assert set(store.overrides()) == {"ams"}
    assert store.expire_overrides() == ["fra"]
    assert store.expire_overrides() == []
    assert store.clear_override("ams", "carol", "done") is True
    assert store.clear_override("ams", "carol", "again") is False
    assert store.overrides() == {}

    rows, cursor = store.list_audit()
    assert cursor is None
    assert [(r.at, r.who, r.action, r.target) for r in rows] == [
        (T0 + 61, "carol", "override.clear", "ams"),
        (T0 + 61, "carol", "override.clear", "ams"),
        (T0 + 61, "expiry", "override.expire", "fra"),
        (T0 + 1, "bob", "override.set", "ams"),
        (T0, "alice", "override.set", "fra"),
    ]
    assert rows[0].detail == {"existed": False, "previous": None, "reason": "again"}
    assert rows[1].detail == {"existed": True, "previous": "up", "reason": "done"}
    assert rows[2].detail["set_by"] == "alice"
    assert rows[4].detail == {
        "expires_at": T0 + 60,
        "previous": None,
        "reason": "maintenance",
        "state": "down",
    }


def test_set_override_replaces_the_previous_one(make_store: Callable[..., Store]) -> None:
    store = make_store()
    store.set_override("fra", Override.DOWN, "maintenance", "alice", None)
    store.set_override("fra", Override.UP, "pin", "bob", None)
    assert store.overrides()["fra"].state is Override.UP
    rows, _ = store.list_audit(limit=1)
    assert rows[0].detail["previous"] == "down"


@pytest.mark.parametrize(
    ("state", "expires_at"),
    [(Override.OBEY, None), (Override.DOWN, T0), (Override.UP, T0 - 1)],
    ids=["obey-is-not-an-override", "expires-now", "expires-in-the-past"],
)
def test_set_override_rejects(
    make_store: Callable[..., Store], state: Override, expires_at: float | None
) -> None:
    with pytest.raises(ValueError):
        make_store().set_override("fra", state, "r", "alice", expires_at)


# --------------------------------------------------------------------------- audit


def test_audit_pages_50_50_20_then_end(make_store: Callable[..., Store]) -> None:
    store = make_store()
    written = [store.audit("alice", "test.action", f"t{i}", {"i": i}) for i in range(120)]
    pages: list[int] = []
    seen: list[int] = []
    cursor: int | None = None
    while True:
        rows, cursor = store.list_audit(limit=50, before_id=cursor)
        pages.append(len(rows))
        seen += [r.detail["i"] for r in rows]
        if cursor is None:
            break
    assert pages == [50, 50, 20]
    assert seen == list(range(119, -1, -1)), "newest first, each row exactly once"
    ids = [i for i in written if i is not None]
    assert len(ids) == 120 and ids == sorted(ids)


@pytest.mark.parametrize("limit", [0, 1001], ids=["zero", "too-many"])
def test_list_audit_rejects_bad_limit(make_store: Callable[..., Store], limit: int) -> None:
    with pytest.raises(ValueError):
        make_store().list_audit(limit=limit)


# --------------------------------------------------------------------------- retention


def test_prune_keeps_newest_1000_per_target(make_store: Callable[..., Store]) -> None:
    store = make_store()
    assert store.keep_checks == 1000
    store.record_checks(
        CheckResult("fra", None, i % 3 != 0, 1.0, None, at=T0 + i) for i in range(1100)
    )
    store.record_checks(CheckResult("ams", "192.0.2.9", True, 1.0, None, T0) for _ in range(10))
    assert store.prune(now=T0 + 1100) == 100
    assert store.prune(now=T0 + 1100) == 0
    kept = store.last_checks("fra", limit=1000)
    assert len(kept) == 1000
    assert kept[0].at == T0 + 1099 and kept[-1].at == T0 + 100, "the newest rows survive"
    assert len(store.last_checks("ams")) == 10


def test_prune_removes_checks_older_than_seven_days(
    make_store: Callable[..., Store],
) -> None:
    store = make_store()
    assert store.max_check_age_s == 7 * DAY_S
    store.record_checks(CheckResult("fra", None, True, 1.0, None, at=T0 + i) for i in range(5))
    now = T0 + 7 * DAY_S + 2.5
    store.record_check("fra", None, True, 1.0, None, at=now)
    assert store.prune(now=now) == 3
    assert [c.at for c in store.last_checks("fra")] == [now, T0 + 4, T0 + 3]


# --------------------------------------------------------------------------- several nodes


def test_heartbeat_records_the_database_clock(
    make_store: Callable[..., Store], clock: FakeClock
) -> None:
    store = make_store("node-a")  # the node's own clock is years off (T0)
    before = time.time()
    assert store.heartbeat({"checker": True})
    (node,) = store.nodes()
    assert node.last_seen == T0
    assert node.seen_at is not None and before - 1 <= node.seen_at <= time.time() + 1
    assert abs(store.db_now() - time.time()) < 1


def test_quorum_snapshot_and_decisions(make_store: Callable[..., Store]) -> None:
    a, b = make_store("node-a"), make_store("node-b")
    a.record_transition("uk", None, Health.UNKNOWN, Health.DOWN, "refused")
    b.record_transition("uk", None, Health.UNKNOWN, Health.UP, "ok")
    b.record_transition("fra", "192.0.2.1", Health.UNKNOWN, Health.DOWN, "refused")
    a.heartbeat({"checker": True})
    a.set_override("fra", Override.DOWN, "drain", "alice", None)
    snap = b.quorum_snapshot()
    assert abs(snap.now - time.time()) < 1
    assert sorted((o.site, o.address, o.node_id, o.state) for o in snap.observations) == [
        ("fra", "192.0.2.1", "node-b", Health.DOWN),
        ("uk", "", "node-a", Health.DOWN),
        ("uk", "", "node-b", Health.UP),
    ]
    assert [n.node_id for n in snap.nodes] == ["node-a"]
    assert snap.decided == {} and set(snap.overrides) == {"fra"}

    seen: list[dict[tuple[str, str], Health]] = []

    def compute(s: Any) -> dict[tuple[str, str], tuple[Health, str]]:
        seen.append(dict(s.decided))
        return {("uk", ""): (Health.DOWN, "down by 2 of 2"), ("fra", "192.0.2.1"): (Health.UP, "")}

    _, changes = b.save_quorum(compute)
    assert len(changes) == 2 and seen == [{}]
    assert a.quorum_snapshot().decided == {
        ("uk", ""): Health.DOWN,
        ("fra", "192.0.2.1"): Health.UP,
    }
    rows, _ = a.list_transitions()
    quorum_rows = [(r.site, r.address, r.node_id, r.new) for r in rows if r.node_id == "quorum"]
    assert sorted(quorum_rows, key=str) == [
        ("fra", "192.0.2.1", "quorum", Health.UP),
        ("uk", None, "quorum", Health.DOWN),
    ]
    assert "decided by node-b" in rows[0].reason
    # deciding the same again writes nothing
    b.save_quorum(compute)
    assert len(a.list_transitions()[0]) == len(rows)


def test_retain_observations_drops_votes_on_targets_no_longer_checked(
    make_store: Callable[..., Store],
) -> None:
    a, b = make_store("node-a"), make_store("node-b")
    for site in ("uk", "fra", "old"):
        a.record_transition(site, None, Health.UNKNOWN, Health.UP, "ok")
    b.record_transition("old", None, Health.UNKNOWN, Health.UP, "ok")
    assert a.retain_observations([("uk", ""), ("fra", "")]) == 1
    assert set(a.observed_states()) == {"uk", "fra"}
    assert set(a.observed_states("node-b")) == {"old"}  # another node's votes stay


def test_v1_database_is_migrated_to_v2(
    make_store: Callable[..., Store], store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geodns.store as store_module

    monkeypatch.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    old = make_store("node-a")
    assert old.schema_version() == 1
    old.close()
    columns = "SELECT * FROM nodes"  # the v1 table: node_id, last_seen, info
    assert raw_rows(store_url, columns) == []
    monkeypatch.undo()
    new = make_store("node-a")
    assert new.schema_version() == SCHEMA_VERSION >= 2
    assert new.heartbeat({"checker": True})
    assert new.nodes()[0].seen_at is not None
    assert new.quorum_snapshot().decided == {}


def test_v2_database_is_migrated_to_v3_override_ramp(
    make_store: Callable[..., Store], store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geodns.store as store_module

    monkeypatch.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:2])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    old = make_store("node-a")
    assert old.schema_version() == 2
    old.close()
    # the v2 overrides table has no ramp_s; an override written there keeps working
    raw_rows(store_url, "SELECT site, state FROM overrides")
    monkeypatch.undo()
    new = make_store("node-a")
    assert new.schema_version() == SCHEMA_VERSION == 3
    new.set_override("fra", Override.DOWN, "drain", "alice", None, ramp_s=300.0)
    assert new.overrides()["fra"].ramp_s == 300.0
    new.set_override("uk", Override.DOWN, "drain", "alice", None)
    assert new.overrides()["uk"].ramp_s is None
    audit, _ = new.list_audit()
    assert any(a.detail.get("ramp_s") == 300.0 for a in audit)


def test_listen_wakes_on_commit_and_reconnect(make_store: Callable[..., Store]) -> None:
    a, b = make_store("node-a"), make_store("node-b")
    if not b.notifies:
        pytest.skip("LISTEN/NOTIFY is PostgreSQL only")
    got: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    listener = threading.Thread(target=b.listen, args=(got.put, stop), daemon=True)
    listener.start()
    try:
        assert got.get(timeout=10) == ""  # connected: callers re-read once
        a.set_override("fra", Override.DOWN, "drain", "alice", None)
        assert got.get(timeout=10) == "override node-a"
        a.record_transition("fra", None, Health.UP, Health.DOWN, "refused")
        assert got.get(timeout=10) == "transition node-a"
        a.heartbeat({})  # heartbeats and check history do not notify
        a.record_check("fra", None, True, 1.0, None)
        a.clear_override("fra", "alice", "done")
        assert got.get(timeout=10) == "override node-a"
    finally:
        stop.set()
        listener.join(10)
    assert not listener.is_alive()


# --------------------------------------------------------------------------- concurrency


def test_writes_from_a_thread_pool(make_store: Callable[..., Store]) -> None:
    store = make_store()

    def work(i: int) -> int | None:
        store.record_check(f"s{i % 4}", None, True, 1.0, None)
        return store.record_transition(f"s{i % 4}", None, Health.UP, Health.DOWN, str(i))

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(work, range(80)))
    assert None not in ids and len(set(ids)) == 80
    assert store.healthy and store.dropped_checks == 0


# --------------------------------------------------------------------------- durability


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Store, Path]]:
    """A Store on a SQLite file with a 20 ms busy timeout, so a held lock fails fast."""
    db = tmp_path / "geodns.sqlite3"
    store = Store(
        f"sqlite:///{db}",
        "node-a",
        journal_dir=tmp_path / "journal",
        clock=clock,
        busy_timeout_ms=20,
    ).open()
    yield store, db
    store.close()


def _lock_exclusively(db: Path) -> sqlite3.Connection:
    """Hold SQLite's write lock from another connection, as a stuck writer would."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def _journal_ops(store: Store) -> list[str]:
    lines = store.journal_path.read_text().splitlines() if store.journal_path.exists() else []
    return [json.loads(line)["op"] for line in lines]


def test_locked_database_journals_writes_and_replays_them_once(
    sqlite_store: tuple[Store, Path], clock: FakeClock
) -> None:
    store, db = sqlite_store
    store.set_override("lon", Override.DOWN, "before", "alice", None)
    holder = _lock_exclusively(db)
    try:
        assert store.record_transition("fra", None, Health.UP, Health.DOWN, "refused") is None
        row = store.set_override("fra", Override.DOWN, "drain", "alice", expires_at=T0 + 30)
        assert row.state is Override.DOWN
        assert store.clear_override("lon", "bob", "back") is True
        assert store.audit("bob", "zone.reload", "example.com.", {"ok": True}) is None
        assert store.record_check("fra", None, False, None, "refused") is False
        assert not store.heartbeat({})
        assert not store.healthy
        assert store.last_error is not None and "locked" in store.last_error
        assert store.dropped_checks == 1
        assert store.journal_pending == 4
        assert _journal_ops(store) == ["transition", "set_override", "clear_override", "audit"]
        entry = json.loads(store.journal_path.read_text().splitlines()[1])
        assert entry["args"]["who"] == "alice" and entry["args"]["expires_at"] == T0 + 30
        with pytest.raises(StoreError, match="4 journaled writes"):
            store.overrides()
        with pytest.raises(StoreError):
            store.replay_journal()
        assert not store.ping()
    finally:
        holder.rollback()
        holder.close()

    saved_journal = store.journal_path.read_text()
    assert store.replay_journal() == 4
    assert store.healthy and store.last_error is None and store.journal_pending == 0
    assert store.journal_path.read_text() == ""
    assert store.replay_journal() == 0

    # a crash between the replay's commit and the journal's truncation replays nothing twice
    store.journal_path.write_text(saved_journal)
    restarted = Store(
        f"sqlite:///{db}", "node-a", journal_dir=store.journal_dir, clock=clock
    ).open()
    try:
        assert restarted.journal_pending == 0 and restarted.healthy
        transitions, _ = restarted.list_transitions()
        assert [(t.site, t.reason) for t in transitions] == [("fra", "refused")]
        assert set(restarted.overrides()) == {"fra"}
        audit, _ = restarted.list_audit()
        assert [(a.who, a.action, a.target) for a in audit] == [
            ("bob", "zone.reload", "example.com."),
            ("bob", "override.clear", "lon"),
            ("alice", "override.set", "fra"),
            ("alice", "override.set", "lon"),
        ]
        assert audit[1].detail["existed"] is True
        assert restarted.observed_states()["fra"][""].state is Health.DOWN
    finally:
        restarted.close()


def test_journal_is_replayed_by_the_next_operation(sqlite_store: tuple[Store, Path]) -> None:
    store, db = sqlite_store
    holder = _lock_exclusively(db)
    store.set_override("fra", Override.DOWN, "drain", "alice", None)
    store.set_override("fra", Override.UP, "pin", "bob", None)
    holder.rollback()
    holder.close()
    assert store.overrides()["fra"].who == "bob", "journaled writes apply in order"
    assert store.healthy and store.journal_pending == 0


def test_write_after_recovery_lands_after_journaled_ones(
    sqlite_store: tuple[Store, Path],
) -> None:
    store, db = sqlite_store
    holder = _lock_exclusively(db)
    store.audit("alice", "first", "x", {})
    holder.rollback()
    holder.close()
    second = store.audit("alice", "second", "x", {})
    rows, _ = store.list_audit()
    assert (rows[0].id, rows[0].action) == (second, "second")
    assert [r.action for r in rows] == ["second", "first"]


def test_journal_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "geodns.sqlite3"
    url = f"sqlite:///{db}"
    journal = tmp_path / "journal"
    first = Store(url, "node-a", journal_dir=journal, clock=clock, busy_timeout_ms=20).open()
    holder = _lock_exclusively(db)
    first.record_transition("fra", None, Health.UP, Health.DOWN, "refused")
    first.close()
    holder.rollback()
    holder.close()

    second = Store(url, "node-a", journal_dir=journal, clock=clock)
    try:
        assert second.journal_pending == 1 and not second.healthy
        second.open()
        assert second.healthy
        rows, _ = second.list_transitions()
        assert [r.reason for r in rows] == ["refused"]
    finally:
        second.close()


def test_unopenable_database_journals_until_it_comes_back(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "geodns.sqlite3"
    db.mkdir()  # a directory where the database file should be: every connect fails
    store = Store(f"sqlite:///{db}", "node-a", journal_dir=tmp_path / "journal", clock=clock)
    try:
        with pytest.raises(StoreError, match="unavailable"):
            store.open()
        assert not store.healthy
        assert store.set_override("fra", Override.DOWN, "drain", "alice", None).site == "fra"
        assert store.record_check("fra", None, True, 1.0, None) is False
        with pytest.raises(StoreError):
            store.list_audit()
        db.rmdir()
        assert store.ping(), "the schema is created, then the journal replayed"
        assert set(store.overrides()) == {"fra"}
        assert store.healthy and store.dropped_checks == 1
    finally:
        store.close()


def test_refused_postgresql_connection_is_an_outage_not_a_bug(
    tmp_path: Path, clock: FakeClock
) -> None:
    pytest.importorskip("psycopg")
    # nothing listens on port 1: connect() fails at once with "connection refused"
    url = "postgresql+psycopg://geodns:secret@127.0.0.1:1/geodns"
    store = Store(url, "node-a", journal_dir=tmp_path / "journal", clock=clock)
    try:
        assert "secret" not in store.url
        with pytest.raises(StoreError, match="unavailable") as raised:
            store.open()
        assert "secret" not in str(raised.value)
        assert store.record_transition("fra", None, Health.UP, Health.DOWN, "x") is None
        assert store.audit("alice", "a", "t", {}) is None
        assert _journal_ops(store) == ["transition", "audit"]
        assert not store.ping() and not store.healthy
    finally:
        store.close()


def test_write_whose_commit_answer_was_lost_is_not_applied_twice(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = uuid.UUID("00000000-0000-4000-8000-000000000001")
    monkeypatch.setattr("geodns.store.uuid.uuid4", lambda: fixed)
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    journal = tmp_path / "journal"
    store = Store(url, "n", journal_dir=journal, clock=clock).open()
    assert store.audit("alice", "x", "t", {}) is not None
    store.close()
    # as if COMMIT reached the database but its answer did not come back: journaled too
    entry = {
        "id": str(fixed),
        "op": "audit",
        "args": {"who": "alice", "action": "x", "target": "t", "detail": "{}", "at": T0},
    }
    journal.mkdir()
    (journal / JOURNAL_FILE).write_text(json.dumps(entry) + "\n")
    again = Store(url, "n", journal_dir=journal, clock=clock)
    try:
        assert again.journal_pending == 1
        assert again.replay_journal() == 0
        assert len(again.list_audit()[0]) == 1
    finally:
        again.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"], ids=["empty", "memory"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(StoreError, match="in-memory"):
        Store(url, "n")


def test_torn_journal_tail_is_cut_and_the_rest_applied(tmp_path: Path, clock: FakeClock) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    entry = {
        "id": str(uuid.uuid4()),
        "op": "audit",
        "args": {"who": "a", "action": "x", "target": "t", "detail": "{}", "at": T0},
    }
    (journal / JOURNAL_FILE).write_text(json.dumps(entry) + "\n" + '{"id": "torn", "op": "au')
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", "n", journal_dir=journal, clock=clock)
    try:
        assert store.journal_pending == 1
        store.open()
        rows, _ = store.list_audit()
        assert [(r.who, r.at) for r in rows] == [("a", T0)]
    finally:
        store.close()


def test_entry_that_can_never_apply_is_set_aside(tmp_path: Path, clock: FakeClock) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    bad = {"id": str(uuid.uuid4()), "op": "no-such-op", "args": {}}
    good = {
        "id": str(uuid.uuid4()),
        "op": "audit",
        "args": {"who": "a", "action": "x", "target": "t", "detail": "{}", "at": T0},
    }
    (journal / JOURNAL_FILE).write_text(json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", "n", journal_dir=journal, clock=clock)
    try:
        store.open()
        assert store.healthy
        assert len(store.list_audit()[0]) == 1
        assert "no-such-op" in (journal / REJECTED_FILE).read_text()
        assert (journal / JOURNAL_FILE).read_text() == ""
    finally:
        store.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from geodns.model import Health
    from geodns.store import Store

    store = Store(sys.argv[1], "victim", journal_dir=sys.argv[2]).open()
    i = 0
    while True:
        tid = store.record_transition("fra", None, Health.UP, Health.DOWN, f"r{i}")
        print(tid, flush=True)
        i += 1
    """
)


def test_committed_transitions_survive_kill_9(store_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, store_url, str(tmp_path / "journal")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    printed: list[int] = []
    try:
        assert child.stdout is not None
        while len(printed) < 40:
            line = child.stdout.readline()
            assert line, f"writer exited early with {child.poll()}"
            assert line.strip() != "None", "the writer journaled instead of committing"
            printed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    if store_url.startswith("sqlite:///"):
        assert raw_rows(store_url, "PRAGMA integrity_check") == [("ok",)]
    store = Store(store_url, "checker", journal_dir=tmp_path / "journal2").open()
    try:
        stored: set[int] = set()
        cursor: int | None = None
        while True:
            rows, cursor = store.list_transitions(site="fra", limit=1000, before_id=cursor)
            stored |= {r.id for r in rows}
            if cursor is None:
                break
        assert set(printed) <= stored
    finally:
        store.close()
