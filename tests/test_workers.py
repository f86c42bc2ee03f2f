"""--workers N: worker processes with one checker and identical views; UDP shared by
the workers (leader/follower) or a SO_REUSEPORT socket each (`worker_udp_shared`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import pytest

from geodns import metrics
from geodns.app import App
from geodns.config import Config, load_config
from geodns.errors import ConfigError
from geodns.handler import Stats
from geodns.model import Health, Override, SiteState
from geodns.view import Catalog, GeoState, View, ViewHolder, next_version
from geodns.workers import WorkerPool, _Worker, flock_holders, queued_bytes
from tests.serverutil import REPO, run_server, wait_for, write_config

ZONE = (REPO / "zones" / "example.com.zone").read_text()
GEO = (REPO / "zones" / "example.com.geo.toml").read_text()
SITES = """
[sites.uk]
ipv4 = ["198.51.100.10"]
city = "London"
country = "GB"
[sites.fra]
ipv4 = ["198.51.100.20"]
city = "Frankfurt am Main"
country = "DE"
[pools.web]
members = ["uk", "fra"]
"""


def gb_query() -> dns.message.Message:
    """www.example.com A from a GB client network (ECS 212.58.224.0/24)."""
    return dns.message.make_query(
        "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("212.58.224.0", 24)]
    )


def addresses(r: dns.message.Message) -> set[str]:
    return {rd.address for rr in r.answer for rd in rr}


def gb(host: str, port: int) -> set[str]:
    return addresses(dns.query.udp(gb_query(), host, port=port, timeout=3))


def config_with_zones(tmp_path: Path, extra: str = "") -> Config:
    """The example zone with `www` steered between uk and fra, in tmp_path."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "example.com.zone").write_text(ZONE)
    (zones / "example.com.geo.toml").write_text(GEO)
    return load_config(write_config(tmp_path, SITES + extra))


REUSEPORT = "[server]\nworker_udp_shared = false\n"


def test_two_workers_answer_and_follow_one_health_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a SO_REUSEPORT socket per worker the kernel spreads sources over both."""
    cfg = config_with_zones(tmp_path, REUSEPORT)
    # as under `taskset -c 0`: the operator is told the two workers will share one CPU
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 1)
    caplog.set_level(logging.WARNING, logger="geodns.workers")
    with run_server(cfg, workers=2) as s:
        crowded = [r.getMessage() for r in caplog.records if r.name == "geodns.workers"]
        assert crowded == [
            "--workers 2 but this process may use 1 CPU(s): workers sharing a CPU add no "
            "throughput (and with worker_udp_shared = false they spend more CPU per query: "
            "two on one CPU ~1.1-1.3x, bench/README.md); --workers 1 is enough here"
        ]
        assert s.app.pool is not None and len(s.app.pool.workers) == 2
        assert s.app.dns is None or not s.app.dns.addresses  # the main process serves no DNS
        answers = [gb(s.host, s.port) for _ in range(200)]  # new source port per query
        assert all(a == {"198.51.100.10"} for a in answers)
        # one checker: the main process; a drain reaches every worker
        s.call(s.app.health.set_override("uk", Override.DOWN, "maintenance", "test", None))
        wait_for(lambda: all(gb(s.host, s.port) == {"198.51.100.20"} for _ in range(50)))
        # the workers' counters are summed in the main process
        wait_for(lambda: sum(s.app.stats.queries.values()) >= 250)
        per_worker = [
            sum(c for *_, c in w.last_stats.get("queries", [])) for w in s.app.pool.workers
        ]
        assert all(n > 0 for n in per_worker), per_worker


def test_a_burst_of_health_changes_reaches_every_worker_as_its_last_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The main process pushes health when it is published (no polling): drain, undrain
    and drain again within one coalescing window, and every worker ends on the last."""
    cfg = config_with_zones(tmp_path)
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 2)
    caplog.set_level(logging.WARNING, logger="geodns.workers")
    with run_server(cfg, workers=2) as s:
        assert s.app.pool is not None
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(20))
        # a CPU per worker: nothing to warn about
        assert not [
            r for r in caplog.records if "usable" in r.getMessage() or "CPU(s)" in r.getMessage()
        ]

        async def burst() -> None:
            health = s.app.health
            await health.set_override("uk", Override.DOWN, "one", "test", None)
            await health.clear_override("uk", "test", "two")
            await health.set_override("uk", Override.DOWN, "three", "test", None)

        s.call(burst())
        wait_for(lambda: all(gb(s.host, s.port) == {"198.51.100.20"} for _ in range(50)))
        # and back: the pool's listener is still subscribed after the burst
        s.call(s.app.health.clear_override("uk", "test", "four"))
        wait_for(lambda: all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(50)))
        # a state published from another thread than the server's loop reaches them too
        geo = s.app.holder.view.geo
        v = next_version()
        s.app.holder.publish_geo(
            replace(
                geo,
                states={**geo.states, "uk": SiteState(observed=Health.DOWN)},
                version=v,
                pool_versions={pool: v for pool in geo.pools},
            )
        )
        wait_for(lambda: all(gb(s.host, s.port) == {"198.51.100.20"} for _ in range(50)))
    # stopping unsubscribes the pool from the holder
    assert s.app.holder.geo_listeners == []


def test_view_holder_tells_listeners_of_each_new_geo_state() -> None:
    from geodns.view import GeoState

    holder = ViewHolder(View(Catalog(), GeoState({}, {}, {})))
    seen: list[GeoState] = []
    holder.geo_listeners.append(lambda: seen.append(holder.view.geo))
    first, second = GeoState({}, {}, {}, version=1), GeoState({}, {}, {}, version=2)
    holder.publish_geo(first)
    holder.publish_geo(second)
    # called after the swap, once per publish
    assert len(seen) == 2 and seen[0] is first and seen[1] is second


def test_usable_cpus_follows_the_affinity_mask_not_the_machine() -> None:
    """What `taskset -c 0 geodns serve --workers 2` sees: one CPU, whatever nproc says."""
    code = "from geodns.workers import usable_cpus; print(usable_cpus())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    assert out.stdout.strip() == "1"
    full = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert full.stdout.strip() == str(len(os.sched_getaffinity(0)))


def per_worker(pool: WorkerPool) -> list[int]:
    """Queries each worker has reported answering (once a second)."""
    return [sum(c for *_, c in w.last_stats.get("queries", [])) for w in pool.workers]


def gb_wire(qid: int) -> bytes:
    q = gb_query()
    q.id = qid
    return q.to_wire()


def test_shared_udp_one_worker_receives_until_a_burst_spills_to_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default: the workers share the UDP socket. One receives while it keeps up (the
    other is never woken); a backlog of full batches is split between both."""
    cfg = config_with_zones(tmp_path)
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 2)
    with run_server(cfg, workers=2) as s:
        pool = s.app.pool
        assert pool is not None
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(50))
        wait_for(lambda: sum(per_worker(pool)) >= 50)
        assert sorted(per_worker(pool)) == [0, 50]
        # the datagrams each took from the shared socket (the watchdog's progress count)
        wait_for(
            lambda: sorted(w.last_stats.get("udp_received") for w in pool.workers) == [[0], [50]]
        )
        # TCP: one listening socket, bound by the main process, accepted from by both
        for _ in range(10):
            r = dns.query.tcp(gb_query(), s.host, port=s.port, timeout=3)
            assert addresses(r) == {"198.51.100.10"}
        wait_for(lambda: sum(per_worker(pool)) >= 60)
        assert s.app.stats.udp_handoffs == 0
        base = per_worker(pool)

        def both_took_udp() -> bool:
            return all(n > b for n, b in zip(per_worker(pool), base, strict=True))

        # both workers stopped: 256 queries queue up in the shared socket; resumed, the
        # receiving worker's batches are full and after each it lets the other one
        # receive. Whether the other wakes before the first has answered its batch is
        # up to the scheduler (here 2 CPUs run the test too): bounded rounds until it did.
        for k in range(1, 21):
            burst_while_stopped(pool, s.host, s.port)
            # 8 full batches: 8 hand-overs; the counters reach the main process each second
            wait_for(lambda k=k: sum(per_worker(pool)) == 60 + 256 * k, what=f"answers {k}")
            wait_for(lambda k=k: s.app.stats.udp_handoffs >= 8 * k, what=f"hand-overs {k}")
            if both_took_udp():
                break
        assert both_took_udp(), (base, per_worker(pool))
        # the summed counter is on /metrics
        text = metrics.render(metrics.make_registry(s.app)).decode()
        line = next(x for x in text.splitlines() if x.startswith("geodns_udp_handoffs_total"))
        assert float(line.split()[1]) == s.app.stats.udp_handoffs >= 1


def burst_while_stopped(pool: WorkerPool, host: str, port: int, count: int = 256) -> None:
    """Stop every worker, queue `count` queries, resume them; every query is answered."""
    pids = [w.proc.pid for w in pool.workers if w.proc is not None]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: all(_stopped(pid) for pid in pids), what="workers stopped")
            for qid in range(count):
                client.sendto(gb_wire(qid), (host, port))
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        replies = [dns.message.from_wire(client.recv(4096)) for _ in range(count)]
    finally:
        client.close()
    assert sorted(r.id for r in replies) == list(range(count))
    for r in replies:
        assert addresses(r) == {"198.51.100.10"}


def _state(path: str) -> str:
    """The state letter of /proc/<pid>[/task/<tid>]/stat; "X" once it is gone."""
    try:
        with open(f"{path}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone between open and read
        return "X"


def _flocks(app: App) -> str:
    pool = app.pool
    assert pool is not None
    """The workers' pids and states, and the FLOCK lines of /proc/locks."""
    pids = [w.proc.pid for w in pool.workers if w.proc is not None]
    states = {pid: _state(f"/proc/{pid}") for pid in pids}
    with open("/proc/locks") as f:
        flocks = [line.strip() for line in f if "FLOCK" in line]
    threads = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{pid}/task"):
                with (
                    open(f"/proc/{pid}/task/{t}/comm") as c,
                    open(f"/proc/{pid}/task/{t}/wchan") as w,
                ):
                    threads[f"{pid}/{t}"] = f"{c.read().strip()}:{w.read()}"
                # the system call it sleeps in and, for a receive, what its fd is
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{t}/syscall") as f:
                    call = f.read().split()
                    threads[f"{pid}/{t}"] += f" syscall {call[:2]}"
                    if len(call) > 1 and call[1].startswith("0x"):
                        fd = int(call[1], 16)
                        with contextlib.suppress(OSError):
                            threads[f"{pid}/{t}"] += f" -> {os.readlink(f'/proc/{pid}/fd/{fd}')}"
    shared = [os.readlink(f"/proc/self/fd/{udp.fileno()}") for udp, _ in app.worker_sockets if udp]
    with open("/proc/net/udp") as f:
        udp_lines = [line.split() for line in f][1:]
    # local address, rx_queue, inode, drops of every UDP socket on the test's port
    ports = {f":{udp.getsockname()[1]:04X}" for udp, _ in app.worker_sockets if udp}
    udp_table = [
        (u[1], u[4], u[9], u[12]) for u in udp_lines if any(u[1].endswith(p) for p in ports)
    ]
    stats = [w.last_stats.get("queries") for w in pool.workers]
    return (
        f"workers {states}; /proc/locks: {flocks}; threads {threads}; "
        f"shared UDP {shared}; /proc/net/udp (addr, tx:rx queue, inode, drops) {udp_table}; "
        f"queries per worker {stats}"
    )


def _thread_states(pid: int) -> list[str]:
    """The state letter of every thread of the process; [] once it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    return [_state(f"/proc/{pid}/task/{t}") for t in tasks]


def _dead(pid: int) -> bool:
    """Every thread of the process has exited. Not just the first one: after SIGKILL
    the thread-group leader shows Z at once while the others may still be running,
    and a receive thread woken in recvmmsg takes a datagram sent then on its way out
    (the query is lost: seen as a 3 s timeout in ~1 of 20 loaded runs)."""
    return all(st in ("Z", "X") for st in _thread_states(pid))


def _stopped(pid: int) -> bool:
    """Every thread of the process has stopped (SIGSTOP is delivered asynchronously: a
    receive thread may take a datagram or two before it stops)."""
    states = _thread_states(pid)
    return bool(states) and all(st in ("T", "t") for st in states)


def test_a_killed_worker_leaves_the_shared_udp_socket_to_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL each worker in turn (one of them is the receiving one): the kernel drops
    its flock, the other answers at once, before the dead one is restarted; the
    restarted one shares the socket again."""
    cfg = config_with_zones(tmp_path)
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 2)
    with run_server(cfg, workers=2) as s:
        pool = s.app.pool
        assert pool is not None
        for w in pool.workers:
            assert w.proc is not None
            old = w.proc.pid
            os.kill(old, signal.SIGKILL)
            wait_for(lambda old=old: _dead(old))
            try:
                assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(20))
            except dns.exception.Timeout as exc:
                # say who holds which flock and where each worker thread sleeps
                raise AssertionError(f"no answer after killing {old}: {_flocks(s.app)}") from exc
            wait_for(lambda w=w, old=old: w.proc is not None and w.proc.pid != old and w.serving)
        assert [w.restarts for w in pool.workers] == [1, 1]
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(20))
        text = metrics.render(metrics.make_registry(s.app)).decode()
        assert 'geodns_worker_restarts_total{worker="0"} 1.0' in text
        assert 'geodns_worker_restarts_total{worker="1"} 1.0' in text
        assert "geodns_worker_stalls_total 0.0" in text


def test_a_stopped_worker_holding_the_udp_socket_is_killed_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP the receiving worker: it keeps the flock and UDP goes unanswered, until
    it has sent nothing for worker_stall_timeout_s; then the main process kills it,
    the other worker answers, and the stopped one is restarted."""
    cfg = config_with_zones(tmp_path, "[server]\nworker_stall_timeout_s = 2\n")
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 2)
    caplog.set_level(logging.ERROR, logger="geodns.workers")
    with run_server(cfg, workers=2) as s:
        pool = s.app.pool
        assert pool is not None
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(10))
        wait_for(lambda: sum(per_worker(pool)) >= 10)
        leader = next(w for w, n in zip(pool.workers, per_worker(pool), strict=True) if n)
        assert leader.proc is not None
        stopped = leader.proc.pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            # SIGSTOP is delivered asynchronously: wait until it has taken effect
            wait_for(lambda: _stopped(stopped), what="the receiving worker stopped")
            with pytest.raises(dns.exception.Timeout):
                q = dns.message.make_query("example.com", "SOA")
                dns.query.udp(q, s.host, port=s.port, timeout=0.5)
            wait_for(lambda: _dead(stopped), timeout_s=10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(10))
        wait_for(lambda: leader.proc is not None and leader.proc.pid != stopped and leader.serving)
        assert pool.stalls == 1 and leader.restarts == 1
        text = metrics.render(metrics.make_registry(s.app)).decode()
        assert "geodns_worker_stalls_total 1.0" in text
        assert any(f"(pid {stopped}) sent nothing for" in r.getMessage() for r in caplog.records)


def test_worker_stall_timeout_below_two_seconds_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\nworker_stall_timeout_s = 0.5\n")
    with pytest.raises(ConfigError, match="worker_stall_timeout_s: must be >= 2"):
        load_config(path)
    assert load_config(write_config(tmp_path, "[server]\nworker_stall_timeout_s = 0\n"))
    for odd in ("nan", "inf"):  # TOML floats that would switch the watchdog off silently
        path = write_config(tmp_path, f"[server]\nworker_stall_timeout_s = {odd}\n")
        with pytest.raises(ConfigError, match="worker_stall_timeout_s: must be >= 2"):
            load_config(path)


def test_reuseport_workers_with_a_user_refuse_a_privileged_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a SO_REUSEPORT UDP socket per worker the workers bind after the main process
    dropped privileges: port 53 would fail in each of them, so the start refuses early
    and says why (the shared sockets, the default, are bound before the drop)."""
    cfg = config_with_zones(tmp_path, '[server]\nuser = "nobody"\nworker_udp_shared = false\n')
    monkeypatch.setattr("geodns.app.os.getuid", lambda: 0)
    app = App(cfg, workers=2)
    with pytest.raises(OSError, match=r"port 53: with \[server\] user and worker_udp_shared"):
        app._check_worker_bind(53)
    app._check_worker_bind(1053)


class _FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.killed = False

    def kill(self) -> None:
        self.killed = True


def test_the_watchdog_kills_a_silent_worker_but_not_after_its_own_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an injected clock: a serving worker silent for worker_stall_timeout_s is
    killed (once), one that reports is not, and when the main process itself did not
    run for a while (its loop blocked: the workers' lines wait unread) nobody is."""
    now = [100.0]
    advance = [0.5]
    real_sleep = asyncio.sleep

    async def tick(_s: float) -> None:
        now[0] += advance[0]
        await real_sleep(0)

    monkeypatch.setattr("geodns.workers.asyncio.sleep", tick)
    holder, stats = ViewHolder(View(Catalog(), GeoState({}, {}, {}, 1))), Stats()
    pool = WorkerPool(
        Path("x.toml"), [], 2, holder, stats, stall_timeout_s=2.0, clock=lambda: now[0]
    )
    silent, talking = (_Worker(i, serving=True, last_report=100.0) for i in range(2))
    silent.proc, talking.proc = _FakeProc(11), _FakeProc(12)
    pool.workers = [silent, talking]

    async def run() -> None:
        task = asyncio.create_task(pool._kill_stalled())
        # the main process stalls 30 s: both look silent, neither is killed
        advance[0] = 30.0
        await real_sleep(0)
        await real_sleep(0)
        assert not silent.proc.killed and not talking.proc.killed
        advance[0] = 0.5
        for _ in range(8):  # 4 s in steps of 0.5 s; only `talking` reports
            talking.last_report = now[0]
            await real_sleep(0)
        task.cancel()

    asyncio.run(run())
    assert silent.proc.killed and not silent.serving
    assert not talking.proc.killed
    assert pool.stalls == 1

    # one that reports, but whose receive thread is 2.5 s into one batch
    talking.last_stats = {"udp_busy_s": 2.5}

    async def again() -> None:
        task = asyncio.create_task(pool._kill_stalled())
        for _ in range(2):
            talking.last_report = now[0]
            await real_sleep(0)
        task.cancel()

    asyncio.run(again())
    assert talking.proc.killed and pool.stalls == 2


def _waiting_on_fifo(pid: int) -> bool:
    """A thread of the process sleeps in open() of a FIFO no one writes yet."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for t in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{t}/wchan") as f:
            if f.read() == "wait_for_partner":
                return True
    return False


def test_a_restarted_worker_receives_only_once_its_zones_are_loaded(tmp_path: Path) -> None:
    """A worker restarted beside a serving one loads its zones before it joins the
    shared UDP socket: else, handed the socket by a full batch, it would answer
    SERVFAIL for every zone still loading. Its load is held deterministically: a new
    zone file is a FIFO nobody writes to yet (the running processes do not watch)."""
    cfg_path = tmp_path / "geodns.toml"
    config_with_zones(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace("[zones]\n", "[zones]\nwatch = false\n"))
    cfg = load_config(cfg_path)
    with run_server(cfg, workers=2) as s:
        pool = s.app.pool
        assert pool is not None
        assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(10))
        wait_for(lambda: sum(per_worker(pool)) >= 10)
        restarted = next(w for w, n in zip(pool.workers, per_worker(pool), strict=True) if not n)
        fifo = tmp_path / "zones" / "aaa.test.zone"  # loaded before example.com
        os.mkfifo(fifo)
        assert restarted.proc is not None
        old = restarted.proc.pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: restarted.proc is not None and restarted.proc.pid != old)
        assert restarted.proc is not None
        new = restarted.proc.pid
        wait_for(lambda: _waiting_on_fifo(new), what="the restarted worker loading its zones")
        # bursts of full batches: the serving worker hands over 8 times per burst; every
        # answer is the real one (burst_while_stopped checks), none a SERVFAIL
        for _ in range(3):
            burst_while_stopped(pool, s.host, s.port)
        assert not restarted.serving
        with open(fifo, "w") as f:
            f.write("$ORIGIN aaa.test.\n@ 300 IN SOA ns hm 1 7200 3600 1209600 300\n")
            f.write("@ 300 IN NS ns.example.com.\n")
        wait_for(lambda: restarted.serving, what="the restarted worker serving")
        burst_while_stopped(pool, s.host, s.port)


def test_a_worker_restarted_after_the_config_changed_keeps_the_shared_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config file now says udp_thread = false, but the main process handed out
    shared sockets: a restarted worker receives from them with the batch thread anyway
    (before, it refused them and exited, again and again)."""
    cfg = config_with_zones(tmp_path)
    monkeypatch.setattr("geodns.workers.usable_cpus", lambda: 2)
    with run_server(cfg, workers=2) as s:
        pool = s.app.pool
        assert pool is not None
        path = tmp_path / "geodns.toml"
        path.write_text(path.read_text() + "[server]\nudp_thread = false\nudp_batch = false\n")
        for w in pool.workers:
            assert w.proc is not None
            old = w.proc.pid
            os.kill(old, signal.SIGKILL)
            wait_for(lambda w=w, old=old: w.proc is not None and w.proc.pid != old and w.serving)
            assert all(gb(s.host, s.port) == {"198.51.100.10"} for _ in range(10))
        assert [w.restarts for w in pool.workers] == [1, 1]


class _ExitedProc:
    """A worker that has exited while something else still holds its stdout open."""

    pid = 4242
    returncode = -9

    def __init__(self) -> None:
        self.stdout = asyncio.StreamReader()  # no EOF ever comes

    async def wait(self) -> int:
        return self.returncode


def test_a_worker_is_restarted_when_it_exits_even_if_its_stdout_stays_open() -> None:
    """A child the worker left behind (a zone-cache compile) may keep the pipe open:
    the restart follows the process's exit, not the pipe's EOF."""
    holder = ViewHolder(View(Catalog(), GeoState({}, {}, {}, 1)))
    pool = WorkerPool(Path("x.toml"), [], 1, holder, Stats())
    respawned: list[int] = []

    async def spawn(w: _Worker) -> None:
        respawned.append(w.index)

    pool._spawn = spawn  # type: ignore[method-assign]
    w = pool.workers[0]

    async def run() -> None:
        w.proc = _ExitedProc()  # type: ignore[assignment]
        await asyncio.wait_for(pool._read(w), 5)

    asyncio.run(run())
    assert respawned == [0] and w.restarts == 1


def test_queued_bytes_follow_the_receive_queue_of_a_udp_socket() -> None:
    """SO_MEMINFO's receive allocation: > 0 while a datagram (an empty one too) waits,
    0 once it is taken."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        assert queued_bytes(rx) == 0
        for payload in (b"", b"query"):
            tx.sendto(payload, rx.getsockname())
            wait_for(lambda: queued_bytes(rx) > 0, what="the datagram queued")
            assert rx.recv(100) == payload
            assert queued_bytes(rx) == 0


def _flock_child(lock_fd: int) -> subprocess.Popen[bytes]:
    """A process that opens the memfd anew (as a worker does), takes its flock, says so
    on stdout and then sleeps: a flock holder that never receives."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open('/proc/{os.getpid()}/fd/{lock_fd}', os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "sys.stdout.write('held\\n'); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None
    return child


def test_flock_holders_names_the_process_holding_the_memfd_lock() -> None:
    lock = os.memfd_create("test-leader", os.MFD_CLOEXEC)
    try:
        assert flock_holders(lock) == set()
        holder = _flock_child(lock)
        waiter = None
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            waiter = _flock_child(lock)  # blocks in flock: listed with "->", not a holder
            wait_for(
                lambda: Path(f"/proc/{waiter.pid}/wchan").read_text() == "locks_lock_inode_wait"
            )
            assert flock_holders(lock) == {holder.pid}
            holder.kill()
            holder.wait()
            assert waiter.stdout is not None and waiter.stdout.readline() == b"held\n"
            assert flock_holders(lock) == {waiter.pid}
        finally:
            for child in (holder, waiter):
                if child is not None:
                    child.kill()
                    child.wait()
        assert flock_holders(lock) == set()
    finally:
        os.close(lock)


def test_the_watchdog_kills_the_flock_holder_that_leaves_datagrams_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real shared socket and flock, an injected clock: a datagram waits in the socket
    while the process holding the flock takes nothing. After stall_timeout_s of that,
    the holder (found in /proc/locks) is killed, not the other worker; before it, or
    while the workers report datagrams taken, or with the queue empty, nobody is."""
    caplog.set_level(logging.ERROR, logger="geodns.workers")
    lock = os.memfd_create("test-leader", os.MFD_CLOEXEC)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder = _flock_child(lock)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rx.bind(("127.0.0.1", 0))
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        view = ViewHolder(View(Catalog(), GeoState({}, {}, {}, 1)))
        pool = WorkerPool(
            Path("x.toml"),
            ["127.0.0.1:53"],
            2,
            view,
            Stats(),
            stall_timeout_s=10.0,
            shared_udp=[(0, rx, lock)],
        )
        first, second = (_Worker(i, serving=True) for i in range(2))
        first.proc, second.proc = other, holder  # type: ignore[assignment]
        pool.workers = [first, second]

        pool._kill_not_receiving(100.0)  # nothing waits
        pool._kill_not_receiving(115.0)
        assert holder.poll() is None
        tx.sendto(b"q", rx.getsockname())
        wait_for(lambda: queued_bytes(rx) > 0)
        # the workers report datagrams taken (from this socket): progress, no kill
        for t, n in ((116.0, 1), (121.0, 2), (127.0, 3)):
            second.last_stats = {"udp_received": [n]}
            pool._kill_not_receiving(t)
        assert holder.poll() is None
        # no progress from here: 9.5 s is not yet the timeout, 10 s is
        pool._kill_not_receiving(128.0)
        pool._kill_not_receiving(137.5)
        assert holder.poll() is None
        pool._kill_not_receiving(138.0)
        assert holder.wait(10) == -signal.SIGKILL
        assert other.poll() is None
        assert pool.stalls == 1 and not second.serving and first.serving
        assert any(
            f"(pid {holder.pid}) holds UDP socket 127.0.0.1:53 but took nothing" in r.getMessage()
            for r in caplog.records
        )
    finally:
        for child in (holder, other):
            child.kill()
            child.wait()
        rx.close()
        tx.close()
        os.close(lock)
