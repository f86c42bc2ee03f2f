"""Health: failed sites leave the answers, come back, survive restarts; fail-safes.

Unit tests drive HealthManager with CheckEvents and an injected clock; integration tests
use real TCP targets on loopback that the test closes and reopens, and assert over the
wire (bounded polling of the DNS answer, never a fixed sleep).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.edns
import dns.message
import dns.query

from geodns.checker import CheckEvent, ProbeResult
from geodns.config import load_config
from geodns.health import HealthManager, HealthPolicy
from geodns.model import CheckSpec, Health, Override, Site
from geodns.store import Store
from geodns.view import Catalog, GeoState, View, ViewHolder
from tests.serverutil import TcpTarget, make_zone_dir, run_server, tcp_check, wait_for, write_config

SITES = {
    n: Site(n, (f"192.0.2.{i}",), (), 50.0 + i, float(i))
    for i, n in enumerate(["a", "b", "c", "d", "e"], start=1)
}
TCP = CheckSpec(kind="tcp", port=9, interval_s=10.0, down_thresh=1, up_thresh=1)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def manager(
    clock: Clock, store: Store | None = None, sites: dict[str, Site] | None = None, **policy: float
) -> HealthManager:
    sites = sites or SITES
    holder = ViewHolder(View(Catalog(), GeoState(sites, {}, {})))
    return HealthManager(
        holder,
        sites,
        dict.fromkeys(sites, TCP),
        store,
        HealthPolicy(**policy),  # type: ignore[arg-type]
        clock=clock,
        run_checker=False,
    )


def event(site: str, old: Health, new: Health, at: float, ok: bool | None = None) -> CheckEvent:
    ok = (new is Health.UP) if ok is None else ok
    return CheckEvent(
        site, None, ProbeResult(ok, 1.0, None if ok else "refused"), new, (old, new), at
    )


async def test_down_transition_is_published_and_recorded(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path}/s.db", "node1").open()
    m = manager(clock, store)
    await m.start()
    await m.on_event(event("a", Health.UNKNOWN, Health.DOWN, clock.t))
    states = m.holder.view.geo.states
    assert states["a"].observed is Health.DOWN and not states["a"].usable
    assert states["b"].usable
    await m.stop()
    rows, _ = store.list_transitions(site="a")
    assert [(r.old, r.new, r.node_id) for r in rows] == [(Health.UNKNOWN, Health.DOWN, "node1")]


async def test_partition_guard_freezes_last_good_states() -> None:
    clock = Clock()
    m = manager(clock, partition_min_sites=4, partition_share=0.5)
    await m.start()
    for s in SITES:
        await m.on_event(event(s, Health.UNKNOWN, Health.UP, clock.t))
    # three of five sites flip DOWN within one interval: the checker suspects itself
    for s in ("a", "b", "c"):
        clock.t += 1
        await m.on_event(event(s, Health.UP, Health.DOWN, clock.t))
    assert m.frozen
    states = m.holder.view.geo.states
    assert all(states[s].usable for s in SITES), "frozen at the last good states"
    assert states["c"].observed is Health.UP


async def test_partition_guard_does_not_apply_below_min_sites() -> None:
    clock = Clock()
    three = {n: SITES[n] for n in ("a", "b", "c")}
    m = manager(clock, sites=three, partition_min_sites=4)
    await m.start()
    for s in three:
        await m.on_event(event(s, Health.UP, Health.DOWN, clock.t))
    assert not m.frozen
    assert not any(st.usable for st in m.holder.view.geo.states.values())


async def test_stale_lease_flags_sites_without_fresh_verdicts() -> None:
    clock = Clock()
    m = manager(clock, stale_intervals=3)
    await m.start()
    await m.on_event(event("a", Health.UNKNOWN, Health.UP, clock.t))
    assert not m.holder.view.geo.states["a"].stale
    clock.t += 3 * TCP.interval_s + 1
    m.tick()  # the scheduled publish at the lease deadline
    st = m.holder.view.geo.states["a"]
    assert st.stale and st.observed is Health.UP  # default policy: keep last state, flag


async def test_override_expires_by_scheduled_publish(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path}/s.db", "node1", clock=clock).open()
    m = manager(clock, store)
    await m.start()
    await m.set_override("a", Override.DOWN, "maintenance", "ops", 60)
    assert m.holder.view.geo.states["a"].drained
    clock.t += 61
    m.tick()
    assert not m.holder.view.geo.states["a"].drained
    await m.stop()
    audit, _ = store.list_audit()
    assert [a.who for a in audit][:2] == ["expiry", "ops"]


async def test_store_unavailable_answers_keep_following_checks(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "s.db"
    store = Store(f"sqlite:///{db}", "node1", journal_dir=tmp_path / "journal").open()
    m = manager(clock, store)
    await m.start()
    store.close()
    db.unlink()
    db.mkdir()  # the database path is now a directory: every write fails
    await m.on_event(event("a", Health.UNKNOWN, Health.DOWN, clock.t))
    assert not m.holder.view.geo.states["a"].usable  # answers follow the check
    await m.stop()
    assert not store.healthy
    assert (tmp_path / "journal" / "journal.jsonl").read_text().count("transition") == 1


# -- over the wire, with real TCP targets ------------------------------------------------


ZONE = """\
$ORIGIN example.com.
$TTL 300
@ IN SOA ns1 host 1 7200 3600 1209600 60
@ IN NS ns1
ns1 IN A 192.0.2.53
www 60 IN A 192.0.2.80
"""
GEO = '[names.www]\npool = "web"\ntypes = ["A"]\n'


def config_body(uk: TcpTarget, fra: TcpTarget, interval: float = 0.05) -> str:
    check = f"interval_s = {interval}\ndown_thresh = 2\nup_thresh = 3\n"
    return f"""
[api]
listen = ""
[sites.uk]
ipv4 = ["198.51.100.10"]
city = "London"
country = "GB"
{tcp_check("uk", uk, check)}
[sites.fra]
ipv4 = ["198.51.100.20"]
city = "Frankfurt am Main"
country = "DE"
{tcp_check("fra", fra, check)}
[pools.web]
members = ["uk", "fra"]
"""


def gb_answer(host: str, port: int) -> set[str]:
    q = dns.message.make_query(
        "www.example.com",
        "A",
        use_edns=0,
        options=[dns.edns.ECSOption("212.58.224.0", 24)],
    )
    r = dns.query.udp(q, host, port=port, timeout=3)
    return {rd.address for rr in r.answer for rd in rr}


@contextmanager
def geo_server(tmp: Path, uk: TcpTarget, fra: TcpTarget) -> Iterator:  # type: ignore[type-arg]
    make_zone_dir(tmp, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    with run_server(load_config(write_config(tmp, config_body(uk, fra)))) as running:
        yield running


def test_failed_site_leaves_answers_and_comes_back(tmp_path: Path) -> None:
    uk, fra = TcpTarget(), TcpTarget()
    with geo_server(tmp_path, uk, fra) as s:
        wait_for(lambda: s.app.health.site_info("uk").state.observed is Health.UP)
        assert gb_answer(s.host, s.port) == {"198.51.100.10"}
        uk.down()
        wait_for(lambda: gb_answer(s.host, s.port) == {"198.51.100.20"})
        uk.up()
        wait_for(lambda: gb_answer(s.host, s.port) == {"198.51.100.10"})
        store = s.app.store
        wait_for(lambda: len(store.list_transitions(site="uk")[0]) >= 3)
        rows, _ = store.list_transitions(site="uk")
        assert [(r.old, r.new) for r in reversed(rows)] == [
            (Health.UNKNOWN, Health.UP),
            (Health.UP, Health.DOWN),
            (Health.DOWN, Health.UP),
        ]


def test_restart_with_persisted_down_state_keeps_site_out(tmp_path: Path) -> None:
    uk, fra = TcpTarget(), TcpTarget()
    with geo_server(tmp_path, uk, fra) as s:
        wait_for(lambda: s.app.health.site_info("uk").state.observed is Health.UP)
        uk.down()
        wait_for(lambda: gb_answer(s.host, s.port) == {"198.51.100.20"})
        wait_for(lambda: s.app.store.observed_states()["uk"][""].state is Health.DOWN)
    # a new process: the first answer already avoids uk (no flap through UNKNOWN/UP)
    cfg = load_config(tmp_path / "geodns.toml")
    with run_server(cfg) as s2:
        assert gb_answer(s2.host, s2.port) == {"198.51.100.20"}


def test_all_sites_down_answers_nearest(tmp_path: Path) -> None:
    uk, fra = TcpTarget(), TcpTarget()
    with geo_server(tmp_path, uk, fra) as s:
        wait_for(lambda: s.app.health.site_info("fra").state.observed is Health.UP)
        uk.down()
        fra.down()
        wait_for(lambda: not any(st.usable for st in s.app.holder.view.geo.states.values()))
        # fail open: the nearest site, regardless of observed health
        assert gb_answer(s.host, s.port) == {"198.51.100.10"}


def test_drained_site_is_never_answered_even_when_all_down(tmp_path: Path) -> None:
    uk, fra = TcpTarget(), TcpTarget()
    with geo_server(tmp_path, uk, fra) as s:
        wait_for(lambda: s.app.health.site_info("fra").state.observed is Health.UP)
        s.call(s.app.health.set_override("uk", Override.DOWN, "maintenance", "test", None))
        assert gb_answer(s.host, s.port) == {"198.51.100.20"}
        fra.down()
        wait_for(lambda: s.app.health.site_info("fra").state.observed is Health.DOWN)
        assert gb_answer(s.host, s.port) == {"198.51.100.20"}  # fail-open skips drained uk


def test_serve_no_checker_follows_a_standalone_checker(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.serverutil import REPO

    uk, fra = TcpTarget(), TcpTarget()
    make_zone_dir(tmp_path, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    cfg_path = write_config(tmp_path, config_body(uk, fra))
    checker = subprocess.Popen(
        [sys.executable, "-m", "geodns", "--config", str(cfg_path), "checker"],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        with run_server(load_config(cfg_path), run_checker=False) as s:
            assert s.app.health._checker is None  # this process probes nothing
            wait_for(lambda: s.app.health.site_info("uk").state.observed is Health.UP)
            assert gb_answer(s.host, s.port) == {"198.51.100.10"}
            uk.down()
            wait_for(lambda: gb_answer(s.host, s.port) == {"198.51.100.20"})
            uk.up()
            wait_for(lambda: gb_answer(s.host, s.port) == {"198.51.100.10"})
    finally:
        checker.terminate()
        assert checker.wait(10) == 0
