"""Several nameservers, one truth: geodns nodes sharing a real PostgreSQL (issue 10).

Every node is a full App (DNS + ops API + checker) in its own thread with its own event
loop, zone directory, journal and `[server] node_id`; all share one PostgreSQL database
started by the session fixture (tests/conftest.py, Debian `postgresql`), a fresh database
per test. Each node probes its own real TCP listeners on loopback, so a site can be
reachable from one node's point of view and not from another's. Every assertion is over
the wire (DNS answers, the ops API) or on the database rows; waits are bounded polls.

Propagation delays measured here are printed (`pytest -s`) as `propagation: ...`.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import psycopg
import pytest

from geodns import ops
from geodns.config import load_config
from geodns.model import Health
from tests.pgutil import PgServer, find_bin_dir
from tests.serverutil import Running, TcpTarget, make_zone_dir, run_server, tcp_check, wait_for
from tests.test_ops import validate

ZONE = """\
$ORIGIN example.com.
$TTL 300
@ IN SOA ns1 host 1 7200 3600 1209600 60
@ IN NS ns1
ns1 IN A 192.0.2.53
www 60 IN A 192.0.2.80
"""
# two answers: the answer set is the set of usable sites (nearest first)
GEO = '[names.www]\npool = "web"\ntypes = ["A"]\ncount = 2\n'
UK, FRA, ZONE_RECORD = "198.51.100.10", "198.51.100.20", "192.0.2.80"
BOTH, ONLY_FRA, ONLY_UK = {UK, FRA}, {FRA}, {UK}
INTERVAL_S = 0.1
STALE_INTERVALS = 5  # the vote lease: 0.5 s
# Propagation is measured and printed; the assertion only catches a broken path (a
# missed notification falls back to polling every INTERVAL_S): typical values are
# 10-40 ms, but other work on a small CI machine can stall any thread for a while.
PROPAGATION_BOUND_S = 2.0


def token(name: str) -> str:
    return f"ops-{name}-secret-0123456789abcdef"


@dataclass
class Node:
    """One running geodns node and the TCP listeners its checks probe."""

    name: str
    server: Running
    uk: TcpTarget
    fra: TcpTarget

    def answer(self) -> set[str]:
        """The GB client's answer set for www.example.com (UDP, ECS 212.58.224.0/24)."""
        return gb_answer(self.server.host, self.server.port)

    @property
    def health(self) -> Any:
        return self.server.app.health

    def local(self, site: str) -> Health:
        """This node's own checker's view of `site`."""
        return self.health.targets[(site, None)].health

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        host, port = self.server.app.api_addresses[0]
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://{host}:{port}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token(self.name)}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def gb_answer(host: str, port: int) -> set[str]:
    q = dns.message.make_query(
        "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("212.58.224.0", 24)]
    )
    r = dns.query.udp(q, host, port=port, timeout=2)
    assert r.rcode() == dns.rcode.NOERROR
    return {rd.address for rr in r.answer for rd in rr}


def node_config(
    tmp: Path, name: str, db_url: str, uk: TcpTarget, fra: TcpTarget, min_votes: int, notify: bool
) -> Any:
    """A node's geodns.toml: its own id, zones, journal, API token and check targets."""
    d = tmp / name
    make_zone_dir(d, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    check = f"interval_s = {INTERVAL_S}\ndown_thresh = 2\nup_thresh = 2\n"
    (d / "geodns.toml").write_text(
        f"""
[server]
node_id = "{name}"
[zones]
directory = "zones"
[api]
listen = "127.0.0.1:0"
[api.tokens]
ops-{name} = "{token(name)}"
[store]
database_url = "{db_url}"
journal_dir = "journal"
notify = {str(notify).lower()}
[checks]
stale_intervals = {STALE_INTERVALS}
quorum_min_votes = {min_votes}
[sites.uk]
ipv4 = ["{UK}"]
city = "London"
country = "GB"
{tcp_check("uk", uk, check)}
[sites.fra]
ipv4 = ["{FRA}"]
city = "Frankfurt am Main"
country = "DE"
{tcp_check("fra", fra, check)}
[pools.web]
members = ["uk", "fra"]
"""
    )
    return load_config(d / "geodns.toml")


@dataclass
class Cluster:
    tmp: Path
    db_url: str
    stack: ExitStack
    nodes: dict[str, Node] = field(default_factory=dict)
    stopped: dict[str, ExitStack] = field(default_factory=dict)

    notify: bool = True

    def start(self, name: str, min_votes: int = 2) -> Node:
        uk, fra = TcpTarget(), TcpTarget()
        cfg = node_config(self.tmp, name, self.db_url, uk, fra, min_votes, self.notify)
        own = ExitStack()
        server = own.enter_context(run_server(cfg))
        self.stack.callback(own.close)
        self.stopped[name] = own
        node = Node(name, server, uk, fra)
        self.nodes[name] = node
        return node

    def stop(self, name: str) -> None:
        """Stop one node (its heartbeats stop; its votes stay in the database)."""
        self.stopped[name].close()
        del self.nodes[name]

    def answers(self) -> dict[str, set[str]]:
        return {name: n.answer() for name, n in self.nodes.items()}

    def all_answer(self, expected: set[str]) -> bool:
        return all(a == expected for a in self.answers().values())

    def settled(self, rounds: int = 3) -> None:
        """Wait until every node has re-read the shared state `rounds` more times."""
        marks = {name: n.health.syncs for name, n in self.nodes.items()}
        wait_for(
            lambda: all(n.health.syncs >= marks[k] + rounds for k, n in self.nodes.items()),
            what="every node re-reads the shared state",
        )

    def db(self, sql: str) -> list[tuple[Any, ...]]:
        conninfo = self.db_url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(conninfo) as conn:
            return list(conn.execute(sql.encode()).fetchall())


def time_until_all(
    cluster: Cluster, expected: set[str], t0: float, timeout_s: float = 10.0
) -> dict[str, float]:
    """Per node, seconds from t0 until its answer first equals `expected`."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(cluster.nodes) and time.monotonic() < deadline:
        for name, n in cluster.nodes.items():
            if name not in seen and n.answer() == expected:
                seen[name] = time.monotonic() - t0
        time.sleep(0.001)
    assert len(seen) == len(cluster.nodes), f"only {sorted(seen)} answer {expected}"
    return seen


def report(what: str, delays: dict[str, float]) -> None:
    text = ", ".join(f"{k}={v * 1000:.0f} ms" for k, v in sorted(delays.items()))
    print(f"\npropagation: {what}: {text}")


@contextmanager
def cluster_on(tmp: Path, db_url: str, notify: bool = True) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(tmp, db_url, stack, notify=notify)


@pytest.fixture
def db_url(pg_server: PgServer) -> str:
    """A fresh database per test (LISTEN/NOTIFY channels are per database)."""
    return pg_server.create_database(f"geodns_{uuid.uuid4().hex[:10]}")


# --------------------------------------------------------------------------- quorum


def test_quorum_of_three_nodes_decides_for_all(tmp_path: Path, db_url: str) -> None:
    with cluster_on(tmp_path, db_url) as c:
        a, b, _ = c.start("a"), c.start("b"), c.start("c")
        wait_for(
            lambda: all(n.health.decided.get(("uk", None)) is Health.UP for n in c.nodes.values()),
            what="the quorum decides uk UP",
        )
        assert c.all_answer(BOTH)

        # uk unreachable from a only: a votes DOWN, b and c UP -> uk stays for everyone
        a.uk.down()
        wait_for(lambda: a.local("uk") is Health.DOWN, what="a sees uk DOWN")
        wait_for(
            lambda: (
                ("uk", "", "a", "down")
                in c.db("SELECT site, address, node_id, state FROM observations")
            ),
            what="a's DOWN vote stored",
        )
        c.settled()
        assert c.all_answer(BOTH), "one node's broken view must not take uk out"
        tally = a.health.tallies[("uk", None)]
        assert (tally.state, tally.quorate, tally.down, tally.up) == (
            Health.UP,
            True,
            ("a",),
            ("b", "c"),
        )

        # unreachable from b too: 2 of 3 -> DOWN on every node, within one interval
        b.uk.down()
        t0 = wait_for(lambda: b.local("uk") is Health.DOWN, what="b sees uk DOWN")
        delays = time_until_all(c, ONLY_FRA, t0)
        report("quorum DOWN (b's vote flips -> all 3 nodes answer)", delays)
        assert max(delays.values()) < PROPAGATION_BOUND_S
        decided = c.db("SELECT site, state FROM quorum_states ORDER BY site")
        assert decided == [("fra", "up"), ("uk", "down")]
        rows = c.db("SELECT reason FROM transitions WHERE node_id = 'quorum' ORDER BY id")
        assert rows[-1][0].startswith("down by 2 of 3 fresh votes (down: a, b; up: c)")

        # a node (re)joining serves the quorum's decision from its first answer, although
        # every site is reachable from where it stands
        late = c.start("late")
        assert late.answer() == ONLY_FRA
        assert "late" not in late.health.tallies[("uk", None)].up  # no vote yet
        c.stop("late")

        # back: 2 of 3 UP again
        a.uk.up()
        b.uk.up()
        wait_for(lambda: c.all_answer(BOTH), what="uk back on every node")

        # a node that stops heartbeating drops out of the quorum after the lease
        c.stop("c")
        c.stop("b")
        wait_for(
            lambda: (
                not any(n["fresh"] for n in a.health.nodes_report()["nodes"] if n["node_id"] != "a")
            ),
            what="b and c out of the quorum",
        )
        status, nodes = a.api("GET", "/v1/nodes")
        assert status == 200
        validate_nodes(nodes)
        assert [(n["node_id"], n["fresh"]) for n in nodes["nodes"]] == [
            ("a", True),
            ("b", False),
            ("c", False),
            ("late", False),
        ]
        assert nodes["nodes"][0]["votes"] == {"uk": "up", "fra": "up"}
        # alone, a never acts on its own view: uk stays, flagged stale (no quorum)
        a.uk.down()
        wait_for(lambda: a.local("uk") is Health.DOWN, what="a sees uk DOWN again")
        c.settled()
        assert a.answer() == BOTH
        state = a.server.app.holder.view.geo.states["uk"]
        assert state.stale and state.observed is Health.UP
        status, ready = a.api("GET", "/readyz")
        assert status == 503 and "site uk: verdict stale" in " ".join(ready["not_ready"])


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("notify", [True, False], ids=["listen-notify", "polling"])
def test_override_through_one_node_applies_on_all(
    tmp_path: Path, db_url: str, notify: bool
) -> None:
    how = "NOTIFY" if notify else "polling"
    with cluster_on(tmp_path, db_url, notify) as c:
        a, b = c.start("a"), c.start("b")
        wait_for(lambda: c.all_answer(BOTH), what="both sites on both nodes")

        t0 = time.monotonic()
        status, _ = a.api("PUT", "/v1/sites/uk/override", {"state": "down", "reason": "maint"})
        assert status == 200
        delays = time_until_all(c, ONLY_FRA, t0)
        report(f"override set through a's API -> answers ({how})", delays)
        assert max(delays.values()) < PROPAGATION_BOUND_S

        t0 = time.monotonic()
        status, _ = b.api("DELETE", "/v1/sites/uk/override", {"reason": "done"})
        assert status == 200
        delays = time_until_all(c, BOTH, t0)
        report(f"override cleared through b's API -> answers ({how})", delays)
        audit = c.db("SELECT who, action, target FROM audit ORDER BY id")
        assert audit == [
            ("ops-a", "override.set", "uk"),
            ("ops-b", "override.clear", "uk"),
        ]


# --------------------------------------------------------------------------- outage


class QueryLoad:
    """Queries every node without pause from a thread; counts answers and failures."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for n in self.nodes:
                try:
                    if not n.answer():
                        self.failures.append(f"{n.name}: empty answer")
                except Exception as exc:
                    self.failures.append(f"{n.name}: {type(exc).__name__}: {exc}")
                self.sent += 1

    def __enter__(self) -> QueryLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL of this test's own: it is stopped and started under load."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries missing (make deb-tools)")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_database_outage_under_load(tmp_path: Path, own_pg: PgServer) -> None:
    db_url = own_pg.create_database("geodns")
    with cluster_on(tmp_path, db_url) as c:
        a, b = c.start("a"), c.start("b")
        wait_for(lambda: c.all_answer(BOTH), what="both sites on both nodes")
        a.uk.down()
        b.uk.down()
        wait_for(lambda: c.all_answer(ONLY_FRA), what="the quorum takes uk out")

        with QueryLoad([a, b]) as load:
            own_pg.stop()
            wait_for(
                lambda: all(not n.health.db_ok for n in (a, b)), what="both nodes notice the outage"
            )
            # degraded, visible in /readyz and /metrics; answers go on from the last view
            status, ready = a.api("GET", "/readyz")
            assert status == 503 and ready["checks"]["store"]["ok"] is False
            assert c.all_answer(ONLY_FRA)

            # local checks may bring a site back UP ...
            a.uk.up()
            wait_for(lambda: a.answer() == BOTH, what="a lifts uk on its own checks")
            assert b.answer() == ONLY_FRA
            # ... but never take one DOWN alone
            b.fra.down()
            wait_for(lambda: b.local("fra") is Health.DOWN, what="b sees fra DOWN")
            mark = b.health.checks_seen
            wait_for(lambda: b.health.checks_seen >= mark + 6, what="b probes on")
            assert b.answer() == ONLY_FRA
            assert b.server.app.holder.view.geo.states["fra"].stale

            # writes during the outage go to each node's journal
            status, _ = a.api("PUT", "/v1/sites/uk/override", {"state": "down", "reason": "a"})
            assert status == 200
            status, _ = b.api("PUT", "/v1/sites/fra/override", {"state": "down", "reason": "b"})
            assert status == 200
            assert a.server.app.store.audit("ops-a", "note", "outage", {"n": 1}) is None
            # (local transitions are journaled too: the votes of the outage)
            assert {"set_override", "audit", "transition"} <= journal_ops(a)
            assert {"set_override", "transition"} <= journal_ops(b)
            _, metrics_text = a_metrics(a)
            assert "geodns_store_up 0.0" in metrics_text

            b.uk.up()
            b.fra.up()
            wait_for(
                lambda: b.local("uk") is Health.UP and b.local("fra") is Health.UP,
                what="b sees every site UP",
            )

            # the database comes back: nodes rejoin by themselves, journals are replayed
            t0 = time.monotonic()
            own_pg.start()
            wait_for(
                lambda: all(
                    n.health.db_ok and n.server.app.store.journal_pending == 0 for n in (a, b)
                ),
                what="both nodes rejoin",
            )
            # both overrides (one per node) apply everywhere: every member drained ->
            # the zone-file record answers
            delays = time_until_all(c, {ZONE_RECORD}, t0)
            report("database back -> journaled overrides on every node", delays)
        assert load.failures == [], load.failures[:5]
        assert load.sent > 200
        print(f"\nquery load during the outage: {load.sent} queries, 0 failed")

        audit = c.db("SELECT who, action, target FROM audit ORDER BY id")
        assert sorted(audit) == [
            ("ops-a", "note", "outage"),
            ("ops-a", "override.set", "uk"),
            ("ops-b", "override.set", "fra"),
        ]
        overrides = c.db("SELECT site, state, who FROM overrides ORDER BY site")
        assert overrides == [("fra", "down", "ops-b"), ("uk", "down", "ops-a")]
        # every vote is UP again, so is the quorum
        wait_for(
            lambda: c.db("SELECT state FROM quorum_states WHERE site = 'uk'") == [("up",)],
            what="the quorum brings uk back",
        )


def validate_nodes(body: Any) -> None:
    """The /v1/nodes answer matches its OpenAPI schema."""
    spec = ops.openapi_spec()
    media = spec["paths"]["/v1/nodes"]["get"]["responses"]["200"]["content"]
    validate(body, media["application/json"]["schema"], spec)


def journal_ops(node: Node) -> set[str]:
    path = node.server.app.store.journal_path
    return {json.loads(line)["op"] for line in path.read_text().splitlines()}


def a_metrics(node: Node) -> tuple[int, str]:
    host, port = node.server.app.api_addresses[0]
    req = urllib.request.Request(
        f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {token(node.name)}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


# --------------------------------------------------------------------------- SQLite


def test_nodes_sharing_a_sqlite_file_switch_to_quorum(tmp_path: Path) -> None:
    """quorum = "auto": a lone SQLite node acts alone; a second checking node makes a quorum."""
    db_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with cluster_on(tmp_path, db_url) as c:
        a = c.start("a")
        wait_for(lambda: a.answer() == BOTH, what="a serves both sites")
        assert not a.health.shared  # single node on SQLite: nothing changes
        status, nodes = a.api("GET", "/v1/nodes")
        assert status == 200 and nodes["quorum"]["active"] is False
        assert [n["node_id"] for n in nodes["nodes"]] == ["a"]
        validate_nodes(nodes)
        b = c.start("b")
        wait_for(lambda: a.health.shared and b.health.shared, what="both see a peer")
        wait_for(
            lambda: all(n.health.decided.get(("uk", None)) is Health.UP for n in (a, b)),
            what="the quorum decides uk UP",
        )
        a.uk.down()
        wait_for(lambda: a.local("uk") is Health.DOWN, what="a sees uk DOWN")
        c.settled()
        assert c.all_answer(BOTH), "a alone cannot take uk out"
        b.uk.down()
        wait_for(lambda: c.all_answer(ONLY_FRA), what="both votes DOWN: uk out everywhere")
