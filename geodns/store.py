"""Persistent state: check history, observed health, transitions, overrides, audit, nodes.

The only module that imports SQLAlchemy. One `Store` wraps one Engine and is safe to call
from a thread pool (the app calls it through `asyncio.to_thread`); every method runs one
short transaction.

SQLite (the default, `sqlite:///data/geodns.sqlite3`) runs in WAL mode with
`synchronous=FULL`, so a commit that returned survives kill -9 and power loss. The same
code serves `postgresql+psycopg://` URLs: SQLite specifics live only in the connect/begin
event hooks and in `_upsert`, which picks the dialect's ON CONFLICT construct.

Durability when the database is down or locked (issue 5): transitions, overrides, expiry
and audit writes are never lost. A write that fails with an availability error (connection
refused, database locked, disk I/O) is appended as one JSON line to
`<journal_dir>/journal.jsonl` (fsync'd), the store turns unhealthy, and the journal is
replayed, in order and each entry exactly once (the `applied_journal` table records entry
ids in the same transaction as the entry's rows), before the next operation that reaches
the database. Check results and heartbeats are not journaled: they are dropped and counted.
Reads raise `StoreError` while the database is unreachable or journaled writes are not yet
applied, so callers keep their last in-memory view instead of reading a view that lacks
acknowledged writes.

Several nameservers sharing one database (issue 10): every node records its own
observations (its votes) under its node id and heartbeats with the database's clock
(`nodes.seen_at`); `quorum_snapshot()` reads everything a quorum needs in one consistent
transaction and `save_quorum()` stores changed decisions in `quorum_states` under a lock
(an advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), so concurrent deciders
serialise. On PostgreSQL every state-changing commit also sends a NOTIFY on channel
`geodns`, delivered at commit; `listen()` wakes the other nodes with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from geodns.errors import StoreError
from geodns.model import Health, Override

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URL: Final = "sqlite:///data/geodns.sqlite3"
# check history retention: newest rows kept per (site, address, node) and maximum age;
# applied journal ids are forgotten after the same age
KEEP_CHECKS_PER_TARGET: Final = 1000
MAX_CHECK_AGE_S: Final = 7 * 24 * 3600.0
PRUNE_BATCH_ROWS: Final = 500
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
PG_CONNECT_TIMEOUT_S: Final = 5
JOURNAL_FILE: Final = "journal.jsonl"
REJECTED_FILE: Final = "journal.rejected.jsonl"
# pg_advisory_xact_lock key ("geodns" in ASCII) serialising migrations across nodes
_PG_MIGRATION_LOCK: Final = 0x67656F646E73
# ... and the one ("geodnsq") serialising quorum decisions
_PG_QUORUM_LOCK: Final = 0x67656F646E7371
# LISTEN/NOTIFY channel: payload "<what> <node id>", sent when a state-changing write commits
NOTIFY_CHANNEL: Final = "geodns"
LISTEN_RETRY_S: Final = 1.0
# how often the listener looks at its stop flag between notifications
LISTEN_POLL_S: Final = 0.2
# a LISTEN connection silent this long is pinged, so a dead one is noticed and replaced
LISTEN_PING_S: Final = 5.0
# node id under which quorum decisions appear in the transitions log
QUORUM_NODE: Final = "quorum"

# --------------------------------------------------------------------------- schema

_metadata = sa.MetaData()
# BIGINT on PostgreSQL; plain INTEGER on SQLite, where only INTEGER PRIMARY KEY is a rowid
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

schema_version = sa.Table(
    "schema_version",
    _metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

checks = sa.Table(
    "checks",
    _metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column("site", sa.String(255), nullable=False),
    sa.Column("address", sa.String(64), nullable=True),  # NULL: a site-level check
    sa.Column("node_id", sa.String(255), nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_checks_target", "site", "address", "node_id", "id"),
    sa.Index("ix_checks_at", "at"),
)

observations = sa.Table(
    "observations",
    _metadata,
    sa.Column("site", sa.String(255), primary_key=True),
    # '' for the site as a whole: primary-key columns cannot be NULL on PostgreSQL
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("since", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("last_latency_ms", sa.Double, nullable=True),
)

transitions = sa.Table(
    "transitions",
    _metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column("site", sa.String(255), nullable=False),
    sa.Column("address", sa.String(64), nullable=True),
    sa.Column("node_id", sa.String(255), nullable=False),
    sa.Column("old", sa.String(16), nullable=False),
    sa.Column("new", sa.String(16), nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_transitions_site", "site", "id"),
    # ids are page cursors: SQLite must never reuse the id of a deleted newest row
    sqlite_autoincrement=True,
)

overrides = sa.Table(
    "overrides",
    _metadata,
    sa.Column("site", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("who", sa.String(255), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
    # v3: a DOWN override takes effect gradually over ramp_s from created_at (a ramped
    # drain); an UP one ramps the site's traffic back in over ramp_s
    sa.Column("ramp_s", sa.Double, nullable=True),
)

audit_log = sa.Table(
    "audit",
    _metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("who", sa.String(255), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),  # JSON object
    sqlite_autoincrement=True,
)

nodes_table = sa.Table(
    "nodes",
    _metadata,
    sa.Column("node_id", sa.String(255), primary_key=True),
    sa.Column("last_seen", sa.Double, nullable=False),  # the node's clock
    sa.Column("info", sa.Text, nullable=False),  # JSON object
    # v2: the database's clock at the last heartbeat; quorum freshness is judged on it
    sa.Column("seen_at", sa.Double, nullable=True),
)

# v2: what the quorum of nodes decided per target ('' address: the site as a whole)
quorum_states = sa.Table(
    "quorum_states",
    _metadata,
    sa.Column("site", sa.String(255), primary_key=True),
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("decided_at", sa.Double, nullable=False),  # the database's clock
    sa.Column("decided_by", sa.String(255), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

applied_journal = sa.Table(
    "applied_journal",
    _metadata,
    sa.Column("entry_id", sa.String(36), primary_key=True),
    sa.Column("applied_at", sa.Double, nullable=False),
)

_V1_TABLES: Final = (
    checks,
    observations,
    transitions,
    audit_log,
    applied_journal,
)
# frozen v1 definitions of tables that changed later (the live ones above are newer)
_v1_metadata = sa.MetaData()
_V1_NODES: Final = sa.Table(
    "nodes",
    _v1_metadata,
    sa.Column("node_id", sa.String(255), primary_key=True),
    sa.Column("last_seen", sa.Double, nullable=False),
    sa.Column("info", sa.Text, nullable=False),
)
_V1_OVERRIDES: Final = sa.Table(
    "overrides",
    _v1_metadata,
    sa.Column("site", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("who", sa.String(255), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
)


# Migrations: why not Alembic. The schema is seven small tables; Alembic would add an
# alembic.ini, an env.py and a versions/ directory that must ship inside the package and
# find the URL at runtime. Instead `_MIGRATIONS[n - 1]` brings the schema from version
# n - 1 to n; `create_schema()` applies the missing ones in order inside one write
# transaction (DDL is transactional on SQLite and PostgreSQL), serialised by the write
# lock (SQLite) or an advisory lock (PostgreSQL), and records each in `schema_version`.
# Rule: a released migration is never edited. When a table changes, add a migration with
# the ALTER statements and freeze the older ones by spelling out the old table (as
# `_V1_NODES`). Should the schema grow, Alembic can take over by stamping the revision
# matching the last version.
def _migrate_1(conn: Connection) -> None:
    """v1: check history, observations, transitions, overrides, audit, nodes, journal ids."""
    _metadata.create_all(conn, tables=list(_V1_TABLES), checkfirst=True)
    _V1_NODES.create(conn, checkfirst=True)
    _V1_OVERRIDES.create(conn, checkfirst=True)


def _migrate_2(conn: Connection) -> None:
    """v2 (several nodes): nodes.seen_at on the database's clock; quorum_states."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("nodes")}
    if "seen_at" not in columns:
        kind = sa.Double().compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE nodes ADD COLUMN seen_at {kind}"))
    quorum_states.create(conn, checkfirst=True)


def _migrate_3(conn: Connection) -> None:
    """v3 (load balancing): overrides.ramp_s, a ramped drain or failback."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("overrides")}
    if "ramp_s" not in columns:
        kind = sa.Double().compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE overrides ADD COLUMN ramp_s {kind}"))


_MIGRATIONS: Final[tuple[Callable[[Connection], None], ...]] = (
    _migrate_1,
    _migrate_2,
    _migrate_3,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One probe result to record; `at` None means the store's clock at recording time."""

    site: str
    address: str | None
    ok: bool
    latency_ms: float | None
    error: str | None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class CheckRow:
    """One probe result from the check history."""

    id: int
    site: str
    address: str | None
    node_id: str
    at: float
    ok: bool
    latency_ms: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ObservedRow:
    """Current observed health of a site ('' address) or one address, as seen by a node."""

    site: str
    address: str
    node_id: str
    state: Health
    since: float
    updated_at: float
    last_error: str | None
    last_latency_ms: float | None


@dataclass(frozen=True, slots=True)
class TransitionRow:
    """One observed health change."""

    id: int
    site: str
    address: str | None
    node_id: str
    old: Health
    new: Health
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class OverrideRow:
    """What an operator forced for a site, and until when (None: until cleared)."""

    site: str
    state: Override
    reason: str
    who: str
    created_at: float
    expires_at: float | None
    ramp_s: float | None = None  # gradual: a drain over ramp_s from created_at


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One audited operator (or expiry) action; `detail` is the decoded JSON object."""

    id: int
    at: float
    who: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A nameserver's last heartbeat: its own clock, and the database's (None before v2)."""

    node_id: str
    last_seen: float
    info: dict[str, Any]
    seen_at: float | None = None


@dataclass(frozen=True, slots=True)
class QuorumSnapshot:
    """Everything a quorum decision reads, from one transaction.

    `now` is the database's clock; `decided` the stored decision per (site, address),
    '' for the site as a whole; `observations` every node's votes.
    """

    now: float
    nodes: list[NodeRow]
    observations: list[ObservedRow]
    decided: dict[tuple[str, str], Health]
    overrides: dict[str, OverrideRow]


# --------------------------------------------------------------------------- helpers

_UNAVAILABLE_ERRORS: Final = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


def _is_unavailable(error: BaseException) -> bool:
    """True for errors that mean 'database unreachable, locked or failing', not 'bad SQL'."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, _UNAVAILABLE_ERRORS)


def _describe(error: BaseException) -> str:
    """A one-line description of a database error without the SQL statement."""
    orig = getattr(error, "orig", None)
    base = orig if isinstance(orig, BaseException) else error
    text = str(base).strip().splitlines()
    return f"{type(base).__name__}: {text[0] if text else ''}".rstrip(": ")


def _dump_json(value: dict[str, Any]) -> str:
    """Serialise an info/detail object; unknown types are written as their str()."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _load_json(text: str | None) -> dict[str, Any]:
    """Decode a stored JSON object ({} for NULL or a non-object)."""
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def _page(rows: list[T], limit: int, key: Callable[[T], int]) -> tuple[list[T], int | None]:
    """Cut a limit+1 fetch into (page, cursor of the next page or None at the end)."""
    if len(rows) > limit:
        page = rows[:limit]
        return page, key(page[-1])
    return rows, None


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    """The primary key of the row an INSERT just wrote."""
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise StoreError("the database did not report the inserted row id")
    return int(key[0])


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be within 1..1000, got {limit}")


def _fsync_dir(path: Path) -> None:
    """Make a file creation/truncation in `path` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_row(r: sa.Row[Any]) -> CheckRow:
    return CheckRow(
        id=int(r.id),
        site=r.site,
        address=r.address,
        node_id=r.node_id,
        at=float(r.at),
        ok=bool(r.ok),
        latency_ms=r.latency_ms,
        error=r.error,
    )


def _observed_row(r: sa.Row[Any]) -> ObservedRow:
    return ObservedRow(
        site=r.site,
        address=r.address,
        node_id=r.node_id,
        state=Health(r.state),
        since=float(r.since),
        updated_at=float(r.updated_at),
        last_error=r.last_error,
        last_latency_ms=r.last_latency_ms,
    )


def _transition_row(r: sa.Row[Any]) -> TransitionRow:
    return TransitionRow(
        id=int(r.id),
        site=r.site,
        address=r.address,
        node_id=r.node_id,
        old=Health(r.old),
        new=Health(r.new),
        at=float(r.at),
        reason=r.reason,
    )


def _override_row(r: sa.Row[Any]) -> OverrideRow:
    return OverrideRow(
        site=r.site,
        state=Override(r.state),
        reason=r.reason,
        who=r.who,
        created_at=float(r.created_at),
        expires_at=None if r.expires_at is None else float(r.expires_at),
        ramp_s=None if r.ramp_s is None else float(r.ramp_s),
    )


def _audit_row(r: sa.Row[Any]) -> AuditRow:
    return AuditRow(
        id=int(r.id),
        at=float(r.at),
        who=r.who,
        action=r.action,
        target=r.target,
        detail=_load_json(r.detail),
    )


def _db_now(dialect: str) -> sa.ColumnElement[Any]:
    """The database server's clock as seconds since the epoch (an SQL expression)."""
    if dialect == "postgresql":
        # clock_timestamp(), not now(): the time of the statement, not of BEGIN
        return sa.extract("epoch", sa.func.clock_timestamp())
    if dialect == "sqlite":
        return (sa.func.julianday("now") - 2440587.5) * 86400.0
    return sa.func.current_timestamp()  # pragma: no cover - other backends untested


def _node_row(r: sa.Row[Any]) -> NodeRow:
    seen_at = getattr(r, "seen_at", None)
    return NodeRow(
        r.node_id,
        float(r.last_seen),
        _load_json(r.info),
        None if seen_at is None else float(seen_at),
    )


def _notify(conn: Connection, what: str, node_id: str) -> None:
    """PostgreSQL: tell listening nodes (at commit) that shared state changed."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_notify(:channel, :payload)"),
            {"channel": NOTIFY_CHANNEL, "payload": f"{what} {node_id}"},
        )


def _upsert(
    conn: Connection,
    table: sa.Table,
    values: dict[str, Any],
    keys: tuple[str, ...],
    update: tuple[str, ...],
) -> None:
    """Insert a row, or update columns `update` of the row with the same `keys`."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        pg_stmt = pg_dialect.insert(table).values(values)
        conn.execute(
            pg_stmt.on_conflict_do_update(
                index_elements=list(keys), set_={c: pg_stmt.excluded[c] for c in update}
            )
        )
    elif dialect == "sqlite":
        lite_stmt = sqlite_dialect.insert(table).values(values)
        conn.execute(
            lite_stmt.on_conflict_do_update(
                index_elements=list(keys), set_={c: lite_stmt.excluded[c] for c in update}
            )
        )
    else:  # other backends: correct for a single writer per key
        where = sa.and_(*(table.c[k] == values[k] for k in keys))
        changed = conn.execute(
            table.update().where(where).values({c: values[c] for c in update})
        ).rowcount
        if not changed:
            conn.execute(table.insert().values(values))


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL + synchronous=FULL + busy_timeout on every new connection; BEGIN IMMEDIATE for writes."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below): sqlite3's legacy implicit BEGIN would skip
        # SELECTs and DDL, breaking snapshot reads and transactional migrations.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cur.execute("PRAGMA journal_mode = WAL")
            # FULL: the WAL is fsync'd at every commit, so a returned commit survives a crash
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads then writes cannot wait for the write lock (it
        # fails with SQLITE_BUSY at once); IMMEDIATE takes the lock up front, honouring
        # busy_timeout. Reads keep plain BEGIN so they never wait for writers (WAL).
        write = conn.get_execution_options().get("geodns_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# --------------------------------------------------------------------------- store


class Store:
    """The state store: one Engine, short transactions, a local journal when the DB is down.

    Check history retention: the newest `keep_checks` rows (default 1000) per
    (site, address, node) and nothing older than `max_check_age_s` (default 7 days) survive
    `prune()`, which deletes in batches of `prune_batch` rows (default 500), one short
    transaction per batch. Transitions and audit rows are kept forever.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        journal_dir: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        keep_checks: int = KEEP_CHECKS_PER_TARGET,
        max_check_age_s: float = MAX_CHECK_AGE_S,
        prune_batch: int = PRUNE_BATCH_ROWS,
    ) -> None:
        try:
            parsed = sa.make_url(url)
        except exc.ArgumentError as e:
            raise StoreError(f"invalid state store URL {url!r}: {e}") from e
        self.node_id = node_id
        self.keep_checks = keep_checks
        self.max_check_age_s = max_check_age_s
        self.prune_batch = prune_batch
        self._clock = clock
        self._url = parsed
        self._display_url = parsed.render_as_string(hide_password=True)
        self._lock = threading.RLock()
        self._schema_ready = False
        self._degraded = False
        self._last_error: str | None = None
        self._dropped_checks = 0

        is_sqlite = parsed.get_backend_name() == "sqlite"
        db_file: Path | None = None
        database = parsed.database or ""
        if is_sqlite and database in ("", ":memory:"):
            # each pooled connection would see its own empty database
            raise StoreError("an in-memory SQLite store is not supported; use a file path")
        if is_sqlite and not database.startswith("file:"):
            db_file = Path(database)
            try:
                db_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {db_file.parent} for {url}: {e}") from e
        if journal_dir is None:
            journal_dir = db_file.parent / "journal" if db_file else Path("data/journal")
        self.journal_dir = Path(journal_dir)
        self.journal_path = self.journal_dir / JOURNAL_FILE

        # SQLite file databases get a QueuePool and check_same_thread=False by default
        kwargs: dict[str, Any] = {}
        if not is_sqlite:
            kwargs["pool_pre_ping"] = True  # notice connections dropped by a DB restart
            if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
                kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        try:
            self._engine = sa.create_engine(parsed, **kwargs)
        except (exc.ArgumentError, ImportError) as e:
            raise StoreError(f"cannot use state store {self._display_url}: {e}") from e
        if is_sqlite:
            _install_sqlite_hooks(self._engine, busy_timeout_ms)

        self._pending = self._scan_journal()
        if self._pending:
            self._degraded = True
            self._last_error = f"{self._pending} journaled writes not yet applied"

    # ----------------------------------------------------------------- status

    @property
    def healthy(self) -> bool:
        """False while the database is failing or journaled writes wait for replay."""
        return not self._degraded and self._pending == 0

    @property
    def last_error(self) -> str | None:
        """Why the store is unhealthy (None when healthy)."""
        return self._last_error

    @property
    def dropped_checks(self) -> int:
        """Check results dropped because the database was unavailable."""
        return self._dropped_checks

    @property
    def journal_pending(self) -> int:
        """Journaled writes not yet applied to the database."""
        return self._pending

    @property
    def url(self) -> str:
        """The database URL with the password masked."""
        return self._display_url

    @property
    def backend(self) -> str:
        """The SQLAlchemy backend name: 'sqlite', 'postgresql', ..."""
        return str(self._url.get_backend_name())

    @property
    def shared(self) -> bool:
        """True for a database server several nodes can share (anything but SQLite)."""
        return self.backend != "sqlite"

    @property
    def notifies(self) -> bool:
        """True if `listen()` can deliver change notifications (PostgreSQL)."""
        return self.backend == "postgresql"

    # ----------------------------------------------------------------- lifecycle

    def open(self) -> Store:
        """Create/migrate the schema and replay the journal; idempotent; StoreError if down."""
        self.create_schema()
        self.replay_journal()
        return self

    def create_schema(self) -> int:
        """Apply missing migrations (idempotent); returns the schema version."""
        with self._lock:
            try:
                version = self._migrate()
            except exc.SQLAlchemyError as e:
                raise self._read_error(e) from e
            self._mark_ok()
            return version

    def close(self) -> None:
        """Close every pooled connection; the journal stays on disk for the next open."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        return self._read(
            lambda c: int(c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar_one())
        )

    def ping(self) -> bool:
        """True if the database answers (replaying the journal first); never raises."""
        try:
            if self._pending and not self._try_replay():
                return False
            self._ensure_schema()
            with self._tx(write=False) as conn:
                conn.execute(sa.select(1)).scalar_one()
        except (exc.SQLAlchemyError, StoreError) as e:
            self._mark_failed(e)
            return False
        self._mark_ok()
        return True

    # ----------------------------------------------------------------- health

    def record_check(
        self,
        site: str,
        address: str | None,
        ok: bool,
        latency_ms: float | None,
        error: str | None,
        at: float | None = None,
    ) -> bool:
        """Append a probe result and refresh the observation; False if dropped (DB down)."""
        return self.record_checks([CheckResult(site, address, ok, latency_ms, error, at)]) == 1

    def record_checks(self, results: Iterable[CheckResult]) -> int:
        """Append probe results in one transaction (one fsync); returns how many were stored.

        When the database is unavailable the whole batch is dropped and counted in
        `dropped_checks`: history is not worth a journal entry, the next round refreshes it.
        """
        batch = list(results)
        if not batch:
            return 0
        rows = [
            {
                "site": r.site,
                "address": r.address,
                "node_id": self.node_id,
                "at": self._now(r.at),
                "ok": r.ok,
                "latency_ms": r.latency_ms,
                "error": r.error,
            }
            for r in batch
        ]
        # the observation keeps the latest result per target
        latest = {(row["site"], row["address"] or ""): row for row in rows}
        if self._pending and not self._try_replay():
            self._drop_checks(len(rows))
            return 0
        try:
            self._ensure_schema()
            with self._tx(write=True) as conn:
                conn.execute(checks.insert(), rows)
                for (site, address), row in latest.items():
                    _upsert(
                        conn,
                        observations,
                        {
                            "site": site,
                            "address": address,
                            "node_id": self.node_id,
                            "state": Health.UNKNOWN.value,
                            "since": row["at"],
                            "updated_at": row["at"],
                            "last_error": None if row["ok"] else row["error"],
                            "last_latency_ms": row["latency_ms"],
                        },
                        keys=("site", "address", "node_id"),
                        update=("updated_at", "last_error", "last_latency_ms"),
                    )
        except exc.SQLAlchemyError as e:
            if not _is_unavailable(e):
                raise StoreError(f"record_checks failed: {_describe(e)}") from e
            self._mark_failed(e)
            self._drop_checks(len(rows))
            return 0
        self._mark_ok()
        return len(rows)

    def record_transition(
        self,
        site: str,
        address: str | None,
        old: Health,
        new: Health,
        reason: str,
        at: float | None = None,
    ) -> int | None:
        """Log a health change and upsert the observation; the id, or None if journaled."""
        args = {
            "site": site,
            "address": address,
            "node_id": self.node_id,
            "old": old.value,
            "new": new.value,
            "reason": reason,
            "at": self._now(at),
        }
        applied, result = self._write("transition", args)
        return int(result) if applied else None

    def observed_states(self, node_id: str | None = None) -> dict[str, dict[str, ObservedRow]]:
        """Observations of one node (default: this one) as {site: {address or '': row}}."""
        node = node_id or self.node_id

        def read(conn: Connection) -> dict[str, dict[str, ObservedRow]]:
            out: dict[str, dict[str, ObservedRow]] = {}
            rows = conn.execute(
                sa.select(observations)
                .where(observations.c.node_id == node)
                .order_by(observations.c.site, observations.c.address)
            )
            for r in rows:
                out.setdefault(r.site, {})[r.address] = _observed_row(r)
            return out

        return self._read(read)

    def last_checks(self, site: str, limit: int = 20) -> list[CheckRow]:
        """The newest check results of a site (every address and node), newest first."""
        _check_limit(limit)
        return self._read(
            lambda c: [
                _check_row(r)
                for r in c.execute(
                    sa.select(checks)
                    .where(checks.c.site == site)
                    .order_by(checks.c.id.desc())
                    .limit(limit)
                )
            ]
        )

    def list_transitions(
        self, site: str | None = None, limit: int = 50, before_id: int | None = None
    ) -> tuple[list[TransitionRow], int | None]:
        """Transitions newest first; the cursor is the `before_id` of the next page."""
        _check_limit(limit)
        query = sa.select(transitions).order_by(transitions.c.id.desc()).limit(limit + 1)
        if site is not None:
            query = query.where(transitions.c.site == site)
        if before_id is not None:
            query = query.where(transitions.c.id < before_id)
        rows = self._read(lambda c: [_transition_row(r) for r in c.execute(query)])
        return _page(rows, limit, lambda r: r.id)

    # ----------------------------------------------------------------- overrides

    def set_override(
        self,
        site: str,
        state: Override,
        reason: str,
        who: str,
        expires_at: float | None,
        ramp_s: float | None = None,
    ) -> OverrideRow:
        """Force a site UP or DOWN (replacing any override) and audit it in one transaction.

        `ramp_s`: move the site's traffic gradually over that many seconds (see
        health.effective_states)."""
        if state is Override.OBEY:
            raise ValueError("an override is UP or DOWN; use clear_override() to obey checks")
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise ValueError(f"expires_at {expires_at} is not in the future (now {now})")
        row = OverrideRow(site, state, reason, who, now, expires_at, ramp_s or None)
        args = {
            "site": site,
            "state": state.value,
            "reason": reason,
            "who": who,
            "created_at": now,
            "expires_at": expires_at,
            "ramp_s": ramp_s or None,
        }
        self._write("set_override", args)
        return row

    def clear_override(self, site: str, who: str, reason: str) -> bool:
        """Remove a site's override (audited); True if one existed, or if journaled."""
        applied, result = self._write(
            "clear_override", {"site": site, "who": who, "reason": reason, "at": self._clock()}
        )
        return bool(result) if applied else True

    def overrides(self, now: float | None = None) -> dict[str, OverrideRow]:
        """Unexpired overrides by site."""
        now = self._now(now)
        query = sa.select(overrides).where(
            sa.or_(overrides.c.expires_at.is_(None), overrides.c.expires_at > now)
        )
        return self._read(lambda c: {r.site: _override_row(r) for r in c.execute(query)})

    def expire_overrides(self, now: float | None = None) -> list[str]:
        """Delete expired overrides, auditing each as who="expiry"; [] when journaled."""
        applied, result = self._write("expire_overrides", {"now": self._now(now)})
        return list(result) if applied else []

    # ----------------------------------------------------------------- audit

    def audit(self, who: str, action: str, target: str, detail: dict[str, Any]) -> int | None:
        """Append an audit row; its id, or None if journaled."""
        args = {
            "who": who,
            "action": action,
            "target": target,
            "detail": _dump_json(detail),
            "at": self._clock(),
        }
        applied, result = self._write("audit", args)
        return int(result) if applied else None

    def list_audit(
        self, limit: int = 50, before_id: int | None = None
    ) -> tuple[list[AuditRow], int | None]:
        """Audit rows newest first; the cursor is the `before_id` of the next page."""
        _check_limit(limit)
        query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit + 1)
        if before_id is not None:
            query = query.where(audit_log.c.id < before_id)
        rows = self._read(lambda c: [_audit_row(r) for r in c.execute(query)])
        return _page(rows, limit, lambda r: r.id)

    # ----------------------------------------------------------------- nodes

    def heartbeat(self, info: dict[str, Any]) -> bool:
        """Record that this node is alive (not journaled); False if the DB is down."""
        if self._pending and not self._try_replay():
            return False
        try:
            self._ensure_schema()
            with self._tx(write=True) as conn:
                _upsert(
                    conn,
                    nodes_table,
                    {
                        "node_id": self.node_id,
                        "last_seen": self._clock(),
                        "info": _dump_json(info),
                        "seen_at": _db_now(conn.dialect.name),
                    },
                    keys=("node_id",),
                    update=("last_seen", "info", "seen_at"),
                )
        except exc.SQLAlchemyError as e:
            if not _is_unavailable(e):
                raise StoreError(f"heartbeat failed: {_describe(e)}") from e
            self._mark_failed(e)
            return False
        self._mark_ok()
        return True

    def nodes(self) -> list[NodeRow]:
        """Every node's last heartbeat, by node id."""
        query = sa.select(nodes_table).order_by(nodes_table.c.node_id)
        return self._read(lambda c: [_node_row(r) for r in c.execute(query)])

    def db_now(self) -> float:
        """The database server's clock (seconds since the epoch)."""
        return self._read(
            lambda c: float(c.execute(sa.select(_db_now(c.dialect.name))).scalar_one())
        )

    # ----------------------------------------------------------------- quorum

    def quorum_snapshot(self) -> QuorumSnapshot:
        """Nodes, every node's observations, stored decisions, overrides: one transaction."""
        return self._read(self._snapshot, isolation="REPEATABLE READ")

    def _snapshot(self, conn: Connection) -> QuorumSnapshot:
        now = float(conn.execute(sa.select(_db_now(conn.dialect.name))).scalar_one())
        nodes = [_node_row(r) for r in conn.execute(sa.select(nodes_table))]
        observed = [_observed_row(r) for r in conn.execute(sa.select(observations))]
        decided = {
            (r.site, r.address): Health(r.state) for r in conn.execute(sa.select(quorum_states))
        }
        local_now = self._clock()
        active = conn.execute(
            sa.select(overrides).where(
                sa.or_(overrides.c.expires_at.is_(None), overrides.c.expires_at > local_now)
            )
        )
        return QuorumSnapshot(
            now, nodes, observed, decided, {r.site: _override_row(r) for r in active}
        )

    def save_quorum(
        self,
        compute: Callable[[QuorumSnapshot], dict[tuple[str, str], tuple[Health, str]]],
    ) -> tuple[QuorumSnapshot, dict[tuple[str, str], tuple[Health, str]]]:
        """Re-read the snapshot under the quorum lock, store what `compute` decides changed.

        `compute` returns {(site, address): (new state, why)} for decisions that differ
        from `snapshot.decided`; each is upserted into quorum_states and logged as a
        transition of node "quorum". Deciders on several nodes serialise on the lock, so
        each decides from the latest committed votes and decisions. Not journaled: a
        decision is derived data, recomputed when the database is back.
        """

        def run(conn: Connection) -> tuple[QuorumSnapshot, dict[tuple[str, str], Any]]:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_QUORUM_LOCK})
            snap = self._snapshot(conn)
            changes = compute(snap)
            for (site, address), (state, why) in sorted(changes.items()):
                old = snap.decided.get((site, address), Health.UNKNOWN)
                if old is state:
                    continue
                _upsert(
                    conn,
                    quorum_states,
                    {
                        "site": site,
                        "address": address,
                        "state": state.value,
                        "decided_at": snap.now,
                        "decided_by": self.node_id,
                        "detail": why,
                    },
                    keys=("site", "address"),
                    update=("state", "decided_at", "decided_by", "detail"),
                )
                conn.execute(
                    transitions.insert().values(
                        site=site,
                        address=address or None,
                        node_id=QUORUM_NODE,
                        old=old.value,
                        new=state.value,
                        at=snap.now,
                        reason=f"{why}; decided by {self.node_id}",
                    )
                )
            if changes:
                _notify(conn, "quorum", self.node_id)
            return snap, changes

        return self._read(run, write=True)

    def retain_observations(self, keep: Iterable[tuple[str, str]]) -> int:
        """Delete this node's observations (votes) of targets not in `keep`; how many.

        A node whose config no longer checks a target must stop voting on it.
        """
        wanted = set(keep)

        def run(conn: Connection) -> int:
            mine = conn.execute(
                sa.select(observations.c.site, observations.c.address).where(
                    observations.c.node_id == self.node_id
                )
            ).all()
            gone = 0
            for site, address in mine:
                if (site, address) not in wanted:
                    gone += conn.execute(
                        observations.delete().where(
                            observations.c.node_id == self.node_id,
                            observations.c.site == site,
                            observations.c.address == address,
                        )
                    ).rowcount
            return gone

        return self._read(run, write=True)

    def listen(
        self,
        on_notify: Callable[[str], None],
        stop: threading.Event,
        retry_s: float = LISTEN_RETRY_S,
    ) -> None:
        """Block until `stop` is set, calling on_notify(payload) for each NOTIFY (PostgreSQL).

        Reconnects by itself when the database goes away; after every (re)connect it
        calls on_notify("") once, since changes made meanwhile sent no notification.
        Returns at once for databases without notifications.
        """
        if not self.notifies:
            return
        import psycopg

        cargs, cparams = self._engine.dialect.create_connect_args(self._url)
        cparams.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        lost = False  # log the loss once, not at every retry
        while not stop.is_set():
            try:
                with psycopg.connect(*cargs, **cparams, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    log.info("store: listening for changes on %s", self._display_url)
                    lost = False
                    on_notify("")
                    silent_since = time.monotonic()
                    while not stop.is_set():
                        for n in conn.notifies(timeout=LISTEN_POLL_S):
                            on_notify(n.payload)
                            silent_since = time.monotonic()
                        if time.monotonic() - silent_since > LISTEN_PING_S:
                            conn.execute("SELECT 1")  # a dead connection raises here
                            silent_since = time.monotonic()
            except psycopg.Error as e:
                if not lost and not stop.is_set():
                    log.warning("store: change listener lost the database: %s", _describe(e))
                lost = True
                stop.wait(retry_s)

    # ----------------------------------------------------------------- retention

    def prune(self, now: float | None = None) -> int:
        """Apply check-history retention in batches; returns rows deleted. StoreError if down."""
        now = self._now(now)
        try:
            deleted = self._prune(now)
        except exc.SQLAlchemyError as e:
            raise self._read_error(e) from e
        self._mark_ok()
        return deleted

    def _prune(self, now: float) -> int:
        self._ensure_schema()
        deleted = 0
        cutoff = now - self.max_check_age_s
        deleted += self._delete_batches(checks, checks.c.at < cutoff)
        with self._tx(write=False) as conn:
            crowded = conn.execute(
                sa.select(checks.c.site, checks.c.address, checks.c.node_id)
                .group_by(checks.c.site, checks.c.address, checks.c.node_id)
                .having(sa.func.count() > self.keep_checks)
            ).all()
        for site, address, node in crowded:
            target = sa.and_(
                checks.c.site == site,
                checks.c.address.is_not_distinct_from(address),
                checks.c.node_id == node,
            )
            with self._tx(write=False) as conn:
                # id of the newest row that falls outside the keep window
                oldest_dropped = conn.execute(
                    sa.select(checks.c.id)
                    .where(target)
                    .order_by(checks.c.id.desc())
                    .offset(self.keep_checks)
                    .limit(1)
                ).scalar()
            if oldest_dropped is not None:
                deleted += self._delete_batches(
                    checks, sa.and_(target, checks.c.id <= oldest_dropped)
                )
        # journal ids matter only until the journal that held them is truncated
        with self._tx(write=True) as conn:
            conn.execute(applied_journal.delete().where(applied_journal.c.applied_at < cutoff))
        return deleted

    def _delete_batches(self, table: sa.Table, where: sa.ColumnElement[bool]) -> int:
        """Delete matching rows `prune_batch` at a time, one short transaction per batch."""
        deleted = 0
        while True:
            ids = sa.select(table.c.id).where(where).order_by(table.c.id).limit(self.prune_batch)
            with self._tx(write=True) as conn:
                n = conn.execute(table.delete().where(table.c.id.in_(ids))).rowcount
            deleted += n
            if n < self.prune_batch:
                return deleted

    # ----------------------------------------------------------------- journal

    def replay_journal(self) -> int:
        """Apply journaled writes in order, each exactly once; returns how many were applied."""
        with self._lock:
            try:
                applied = self._replay()
            except exc.SQLAlchemyError as e:
                raise self._read_error(e) from e
            self._mark_ok()
            return applied

    def _write(self, op: str, args: dict[str, Any]) -> tuple[bool, Any]:
        """Apply a durable write now, or journal it; returns (applied, result)."""
        with self._lock:
            # The entry id is recorded with the write itself, so a write whose COMMIT was
            # sent but whose answer was lost (journaled as failed) is not applied twice.
            entry_id = str(uuid.uuid4())
            # journaled writes are applied before newer ones, preserving order
            if self._pending and not self._try_replay():
                self._append_journal(entry_id, op, args)
                return False, None
            try:
                self._ensure_schema()
                with self._tx(write=True) as conn:
                    result = self._apply(conn, op, args)
                    self._mark_applied(conn, entry_id)
            except exc.SQLAlchemyError as e:
                if not _is_unavailable(e):
                    raise StoreError(f"{op} failed: {_describe(e)}") from e
                self._mark_failed(e)
                self._append_journal(entry_id, op, args)
                return False, None
            self._mark_ok()
            return True, result

    def _apply(self, conn: Connection, op: str, a: dict[str, Any]) -> Any:
        """Run one write operation inside the caller's transaction."""
        if op == "transition":
            tid = _inserted_id(
                conn.execute(
                    transitions.insert().values(
                        site=a["site"],
                        address=a["address"],
                        node_id=a["node_id"],
                        old=a["old"],
                        new=a["new"],
                        at=a["at"],
                        reason=a["reason"],
                    )
                )
            )
            _upsert(
                conn,
                observations,
                {
                    "site": a["site"],
                    "address": a["address"] or "",
                    "node_id": a["node_id"],
                    "state": a["new"],
                    "since": a["at"],
                    "updated_at": a["at"],
                    "last_error": None,
                    "last_latency_ms": None,
                },
                keys=("site", "address", "node_id"),
                update=("state", "since", "updated_at"),
            )
            _notify(conn, "transition", a["node_id"])
            return tid
        if op == "set_override":
            previous = conn.execute(
                sa.select(overrides).where(overrides.c.site == a["site"])
            ).first()
            # journal entries written before v3 carry no ramp_s
            _upsert(
                conn,
                overrides,
                {**a, "ramp_s": a.get("ramp_s")},
                keys=("site",),
                update=("state", "reason", "who", "created_at", "expires_at", "ramp_s"),
            )
            detail = {
                "state": a["state"],
                "reason": a["reason"],
                "expires_at": a["expires_at"],
                "previous": previous.state if previous else None,
            }
            if a.get("ramp_s"):
                detail["ramp_s"] = a["ramp_s"]
            self._insert_audit(conn, a["created_at"], a["who"], "override.set", a["site"], detail)
            _notify(conn, "override", self.node_id)
            return None
        if op == "clear_override":
            previous = conn.execute(
                sa.select(overrides).where(overrides.c.site == a["site"])
            ).first()
            if previous is not None:
                conn.execute(overrides.delete().where(overrides.c.site == a["site"]))
            detail = {
                "reason": a["reason"],
                "existed": previous is not None,
                "previous": previous.state if previous else None,
            }
            self._insert_audit(conn, a["at"], a["who"], "override.clear", a["site"], detail)
            _notify(conn, "override", self.node_id)
            return previous is not None
        if op == "expire_overrides":
            now = a["now"]
            expired = conn.execute(
                sa.select(overrides)
                .where(overrides.c.expires_at.is_not(None), overrides.c.expires_at <= now)
                .order_by(overrides.c.site)
            ).all()
            sites: list[str] = []
            for r in expired:
                # match expires_at too: another node may have just replaced this override
                gone = conn.execute(
                    overrides.delete().where(
                        overrides.c.site == r.site, overrides.c.expires_at == r.expires_at
                    )
                ).rowcount
                if gone:
                    detail = {
                        "state": r.state,
                        "reason": r.reason,
                        "set_by": r.who,
                        "expires_at": r.expires_at,
                    }
                    self._insert_audit(conn, now, "expiry", "override.expire", r.site, detail)
                    sites.append(r.site)
            if sites:
                _notify(conn, "override", self.node_id)
            return sites
        if op == "audit":
            return self._insert_audit_text(
                conn, a["at"], a["who"], a["action"], a["target"], a["detail"]
            )
        raise ValueError(f"unknown journal operation {op!r}")

    def _insert_audit(
        self,
        conn: Connection,
        at: float,
        who: str,
        action: str,
        target: str,
        detail: dict[str, Any],
    ) -> int:
        return self._insert_audit_text(conn, at, who, action, target, _dump_json(detail))

    @staticmethod
    def _insert_audit_text(
        conn: Connection, at: float, who: str, action: str, target: str, detail: str
    ) -> int:
        result = conn.execute(
            audit_log.insert().values(at=at, who=who, action=action, target=target, detail=detail)
        )
        return _inserted_id(result)

    def _mark_applied(self, conn: Connection, entry_id: str) -> None:
        """Record, in the write's own transaction, that this journal entry id is applied."""
        conn.execute(applied_journal.insert().values(entry_id=entry_id, applied_at=self._clock()))

    def _append_journal(self, entry_id: str, op: str, args: dict[str, Any]) -> None:
        """Append one entry durably (write + fsync), or raise StoreError: never lose silently."""
        entry = {"id": entry_id, "op": op, "args": args}
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            created = not self.journal_path.exists()
            with open(self.journal_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_dir(self.journal_dir)
        except OSError as e:
            raise StoreError(
                f"state store unavailable ({self._last_error}) and journal "
                f"{self.journal_path} not writable: {e}; {op} was NOT saved"
            ) from e
        self._pending += 1
        log.warning("store: journaled op=%s pending=%d", op, self._pending)

    def _read_journal(self) -> list[dict[str, Any]]:
        """Every complete journal entry, in order."""
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot read journal {self.journal_path}: {e}") from e
        entries: list[dict[str, Any]] = []
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            if not line.endswith("\n"):
                # torn final write: its caller never got an answer, so it was never acknowledged
                log.warning("store: ignoring torn journal line %s:%d", self.journal_path, number)
                break
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                log.error("store: unreadable journal line %s:%d", self.journal_path, number)
                self._reject(line.rstrip("\n"), "unreadable JSON")
                continue
            entries.append(entry)
        return entries

    def _scan_journal(self) -> int:
        """Count pending entries at start-up, cutting a torn tail so appends stay line-aligned."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise StoreError(f"cannot read journal {self.journal_path}: {e}") from e
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("store: cutting torn journal tail of %d bytes", len(data) - keep)
            with open(self.journal_path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
        return sum(1 for line in data.splitlines() if line.strip())

    def _replay(self) -> int:
        """Apply every journal entry not yet applied, then truncate; lock held by caller."""
        if not self._pending and not self.journal_path.exists():
            return 0
        entries = self._read_journal()
        if not entries:
            self._truncate_journal()
            return 0
        self._ensure_schema()
        applied = 0
        for entry in entries:
            entry_id = str(entry.get("id"))
            try:
                with self._tx(write=True) as conn:
                    done = conn.execute(
                        sa.select(applied_journal.c.entry_id).where(
                            applied_journal.c.entry_id == entry_id
                        )
                    ).first()
                    if done is not None:
                        continue
                    self._apply(conn, str(entry.get("op")), dict(entry.get("args") or {}))
                    self._mark_applied(conn, entry_id)
                applied += 1
            except exc.SQLAlchemyError as e:
                if _is_unavailable(e):
                    raise
                self._reject(json.dumps(entry, sort_keys=True), _describe(e))
            except (KeyError, TypeError, ValueError) as e:
                self._reject(json.dumps(entry, sort_keys=True), f"{type(e).__name__}: {e}")
        # only now, with every entry committed (or set aside), may the journal go
        self._truncate_journal()
        log.info("store: journal replayed applied=%d of %d", applied, len(entries))
        return applied

    def _reject(self, line: str, why: str) -> None:
        """Set aside a journal entry that can never apply, so it cannot block the rest."""
        log.error("store: rejected journal entry (%s): %s", why, line)
        try:
            with open(self.journal_dir / REJECTED_FILE, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.error("store: cannot write %s: %s", self.journal_dir / REJECTED_FILE, e)

    def _truncate_journal(self) -> None:
        try:
            with open(self.journal_path, "r+b") as f:
                f.truncate(0)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot truncate journal {self.journal_path}: {e}") from e
        self._pending = 0

    def _try_replay(self) -> bool:
        """Replay a pending journal; False (store marked unhealthy) if the DB is unavailable."""
        with self._lock:
            if not self._pending:
                return True
            try:
                self._replay()
            except exc.SQLAlchemyError as e:
                self._mark_failed(e)
                return False
            return True

    # ----------------------------------------------------------------- plumbing

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else float(at)

    @contextmanager
    def _tx(self, *, write: bool, isolation: str | None = None) -> Iterator[Connection]:
        """One short transaction (BEGIN IMMEDIATE on SQLite when `write`).

        `isolation` (e.g. "REPEATABLE READ") applies on PostgreSQL only: SQLite's
        transactions are serializable already.
        """
        with self._engine.connect() as conn:
            conn.execution_options(geodns_write=write)
            if isolation is not None and conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level=isolation)
            with conn.begin():
                yield conn

    def _migrate(self) -> int:
        """Apply missing migrations in one write transaction; returns the schema version."""
        with self._tx(write=True) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            current = int(current or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this geodns "
                    f"({SCHEMA_VERSION}); upgrade geodns"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[version - 1](conn)
                conn.execute(
                    schema_version.insert().values(version=version, applied_at=self._clock())
                )
                log.info("store: migrated schema to version %d", version)
        self._schema_ready = True
        return SCHEMA_VERSION

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self._lock:
                if not self._schema_ready:
                    self._migrate()

    def _read(
        self, fn: Callable[[Connection], T], *, write: bool = False, isolation: str | None = None
    ) -> T:
        """Run a transaction that needs the database current (every journaled write applied),
        or raise StoreError. `write`: a write of derived data that is not journaled."""
        if self._pending and not self._try_replay():
            raise StoreError(
                f"state store degraded: {self._pending} journaled writes not yet applied "
                f"({self._last_error})"
            )
        try:
            self._ensure_schema()
            with self._tx(write=write, isolation=isolation) as conn:
                result = fn(conn)
        except exc.SQLAlchemyError as e:
            raise self._read_error(e) from e
        self._mark_ok()
        return result

    def _read_error(self, e: exc.SQLAlchemyError) -> StoreError:
        if _is_unavailable(e):
            self._mark_failed(e)
            return StoreError(f"state store unavailable ({self._display_url}): {_describe(e)}")
        return StoreError(f"state store query failed ({self._display_url}): {_describe(e)}")

    def _drop_checks(self, count: int) -> None:
        with self._lock:
            self._dropped_checks += count

    def _mark_failed(self, e: BaseException) -> None:
        with self._lock:
            if not self._degraded:
                log.warning("store: degraded url=%s error=%s", self._display_url, _describe(e))
            self._degraded = True
            self._last_error = _describe(e)
            # the database may have been replaced (a fresh file): re-check the schema
            self._schema_ready = False

    def _mark_ok(self) -> None:
        with self._lock:
            if self._pending:
                return
            if self._degraded:
                log.info("store: recovered url=%s", self._display_url)
            self._degraded = False
            self._last_error = None
