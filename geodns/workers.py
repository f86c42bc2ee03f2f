"""--workers N: several DNS processes on the same addresses, one checker.

The main process runs the health checker, the store and the ops API, and loads the
zones (for /v1/zones and explain); it serves no DNS itself. Each worker is
`geodns serve-worker`: it loads and watches the same zone files itself and answers DNS.
The main process binds the sockets before it drops privileges (port 53 with `[server]
user`) and the workers inherit them. TCP: one listening socket per address, accepted
from by every worker. UDP (`[server] worker_udp_shared`, the default where udpbatch's
receive thread runs): one socket per address too, with a memfd whose flock says which
worker receives (leader/follower, udpbatch.BatchUdp): on a CPU the workers share, a
burst wakes one process, not each (bench/README.md, "`--workers 2` on one CPU"), and a
worker that dies drops its flock. Otherwise each worker binds its own SO_REUSEPORT UDP
socket and the kernel spreads queries by source address. Health
comes from the main process only: every published GeoState is written to each worker's
stdin as one JSON line (states and pool versions), so all workers answer from identical
views and nothing is checked twice. Workers write their query counters to stdout once
a second; the main process sums them for /metrics. A worker that dies is restarted, and
so is one that stops reporting for `[server] worker_stall_timeout_s` (killed first: a
stopped or hung worker may hold the shared UDP socket), and so is the worker holding a
shared UDP socket's flock while datagrams wait in that socket for as long and no
worker takes any (whatever keeps it from receiving: the kernel's receive queue and
/proc/locks say so, not the worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .handler import Stats
from .model import Health, Override, PoolBalance, SiteState
from .rrl import COUNT_NAMES
from .view import GeoState, ViewHolder

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0
# the sockets a worker inherits, per listen address in order: "udp_fd:tcp_fd:flock_fd"
# (udp_fd and flock_fd -1: the worker binds a SO_REUSEPORT UDP socket of its own)
SOCKETS_ENV = "GEODNS_SOCKETS"
COALESCE_S = 0.02  # health publishes closer together than this reach workers as one line


def encode_states(geo: GeoState) -> bytes:
    """One JSON line describing the effective health (and load balancing: damping,
    ramps, capacity spill) a worker must serve."""
    states = {
        name: {
            "observed": st.observed.value,
            "override": st.override.value,
            "address_down": sorted(st.address_down),
            "stale": st.stale,
            "damped": st.damped,
            "damped_until": st.damped_until,
            "damped_addresses": sorted(st.damped_addresses),
            "ramp": st.ramp,
            "ramp_kind": st.ramp_kind,
            "ramp_until": st.ramp_until,
            "changing": st.changing,
        }
        for name, st in geo.states.items()
    }
    balance = {
        pool: {
            "spill": dict(b.spill),
            "offered_share": dict(b.offered_share),
            "answers": b.answers,
            "window_s": b.window_s,
        }
        for pool, b in geo.balance.items()
    }
    msg = {
        "version": geo.version,
        "pool_versions": dict(geo.pool_versions),
        "states": states,
        "balance": balance,
    }
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def apply_states(holder: ViewHolder, line: bytes) -> None:
    """Worker side: publish the main process's health as this worker's GeoState."""
    msg = json.loads(line)
    states = {
        name: SiteState(
            observed=Health(s["observed"]),
            override=Override(s["override"]),
            address_down=frozenset(s["address_down"]),
            stale=bool(s["stale"]),
            damped=bool(s.get("damped", False)),
            damped_until=s.get("damped_until"),
            damped_addresses=frozenset(s.get("damped_addresses", ())),
            ramp=float(s.get("ramp", 1.0)),
            ramp_kind=str(s.get("ramp_kind", "")),
            ramp_until=s.get("ramp_until"),
            changing=bool(s.get("changing", False)),
        )
        for name, s in msg["states"].items()
    }
    balance = {
        pool: PoolBalance(
            {k: float(v) for k, v in b["spill"].items()},
            {k: float(v) for k, v in b["offered_share"].items()},
            int(b["answers"]),
            float(b["window_s"]),
        )
        for pool, b in msg.get("balance", {}).items()
    }
    geo = holder.view.geo
    holder.publish_geo(
        GeoState(geo.sites, geo.pools, states, int(msg["version"]), msg["pool_versions"], balance)
    )


def encode_stats(stats: Stats) -> bytes:
    msg = {
        "queries": [[*k, v] for k, v in stats.queries.items()],
        "answers_by_site": stats.answers_by_site,
        "ecs_queries": stats.ecs_queries,
        "truncated": stats.truncated,
        "formerr": stats.formerr,
        "dropped": stats.dropped,
        "udp_send_dropped": stats.udp_send_dropped,
        "udp_handoffs": stats.udp_handoffs,
        "udp_busy_s": round(stats.udp_busy_s, 3),
        "udp_received": stats.udp_received,
        "rrl": stats.rrl,
        "pool_offered": [[*k, v] for k, v in stats.pool_offered.items()],
    }
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def sum_stats(parts: list[dict[str, Any]], into: Stats) -> None:
    """Replace `into`'s counters with the sum of the workers' reports."""
    queries: dict[tuple[str, int, str], int] = {}
    by_site: dict[str, int] = {}
    totals = dict.fromkeys(
        ("ecs_queries", "truncated", "formerr", "dropped", "udp_send_dropped", "udp_handoffs"), 0
    )
    rrl = [0] * len(COUNT_NAMES)
    pool_offered: dict[tuple[str, str], int] = {}
    for p in parts:
        for qtype, rcode, transport, n in p["queries"]:
            key = (qtype, int(rcode), transport)
            queries[key] = queries.get(key, 0) + int(n)
        for site, n in p["answers_by_site"].items():
            by_site[site] = by_site.get(site, 0) + int(n)
        for k in totals:
            totals[k] += int(p.get(k, 0))
        for i, n in enumerate(p.get("rrl", ())[: len(rrl)]):
            rrl[i] += int(n)
        for pool, site, n in p.get("pool_offered", ()):
            pool_offered[(pool, site)] = pool_offered.get((pool, site), 0) + int(n)
    into.queries = queries
    into.pool_offered = pool_offered
    into.answers_by_site = by_site
    into.rrl = rrl
    for k, v in totals.items():
        setattr(into, k, v)


def share_sockets(
    pairs: list[tuple[socket.socket | None, socket.socket]],
) -> tuple[str, tuple[int, ...], list[tuple[int, socket.socket, int]]]:
    """Main side, for (UDP or None, TCP) per listen address: the SOCKETS_ENV value, the
    descriptors to pass, and (listen index, UDP socket, memfd) per shared UDP socket
    (the caller closes the memfds at the end). Each shared UDP socket gets a memfd whose
    flock marks the worker that receives."""
    parts = []
    fds: list[int] = []
    shared: list[tuple[int, socket.socket, int]] = []
    for index, (udp, tcp) in enumerate(pairs):
        if udp is None:
            parts.append(f"-1:{tcp.fileno()}:-1")
            fds.append(tcp.fileno())
            continue
        lock = os.memfd_create("geodns-udp-leader", os.MFD_CLOEXEC)
        parts.append(f"{udp.fileno()}:{tcp.fileno()}:{lock}")
        fds += [udp.fileno(), tcp.fileno(), lock]
        shared.append((index, udp, lock))
    return ",".join(parts), tuple(fds), shared


def attach_sockets(value: str) -> list[tuple[socket.socket | None, socket.socket, int]]:
    """Worker side: the inherited (UDP or None, TCP, flock descriptor or -1) per address.

    The flock descriptor is reopened through /proc: an inherited one shares its open file
    description, and so its flock, with the main process and every other worker."""
    out: list[tuple[socket.socket | None, socket.socket, int]] = []
    for part in value.split(","):
        udp_fd, tcp_fd, lock_fd = (int(x) for x in part.split(":"))
        tcp = socket.socket(fileno=tcp_fd)
        if udp_fd < 0:
            out.append((None, tcp, -1))
            continue
        own = os.open(f"/proc/self/fd/{lock_fd}", os.O_RDWR | os.O_CLOEXEC)
        os.close(lock_fd)
        out.append((socket.socket(fileno=udp_fd), tcp, own))
    return out


SO_MEMINFO = 55  # Linux 4.6+: the socket's memory counters, u32 each
_MEMINFO_SIZE = 9 * 4  # SK_MEMINFO_VARS; [0] is SK_MEMINFO_RMEM_ALLOC


def queued_bytes(sock: socket.socket) -> int:
    """Bytes of datagrams waiting in the socket's receive queue (SK_MEMINFO_RMEM_ALLOC,
    what /proc/net/udp calls rx_queue; an empty datagram counts too); 0 when the kernel
    cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO_SIZE)
    except OSError:
        return 0
    return int(struct.unpack_from("I", raw)[0]) if len(raw) >= 4 else 0


def flock_holders(fd: int, locks: str = "/proc/locks") -> set[int]:
    """The pids holding a flock on the file `fd` is open on (any open file description
    of it: each worker opens the memfd anew), from the kernel's lock table."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    try:
        with open(locks) as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 00:01:954214 0 EOF"; a waiter's line
                # has "->" after the number
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    holders.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return holders


def _received(report: dict[str, Any], index: int) -> int:
    """Datagrams a worker's report says it took from shared socket `index` (0 if none)."""
    counts = report.get("udp_received", ())
    return int(counts[index]) if index < len(counts) else 0


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity mask, which `taskset`,
    systemd's CPUAffinity= and cgroup cpusets narrow (not the machine's CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def crowding(workers: int, cpus: int) -> str | None:
    """The operator's warning when workers outnumber the usable CPUs, else None."""
    if workers <= cpus:
        return None
    return (
        f"--workers {workers} but this process may use {cpus} CPU(s): workers sharing a "
        f"CPU add no throughput (and with worker_udp_shared = false they spend more CPU "
        f"per query: two on one CPU ~1.1-1.3x, bench/README.md); --workers {cpus} is "
        f"enough here"
    )


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    restarts: int = 0
    serving: bool = False  # this process said it is ready
    last_report: float = 0.0  # clock() when it last wrote a line


class WorkerPool:
    """Starts, feeds and supervises the DNS worker processes."""

    def __init__(
        self,
        config_path: Path,
        listen: list[str],
        count: int,
        holder: ViewHolder,
        stats: Stats,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        stall_timeout_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        shared_udp: list[tuple[int, socket.socket, int]] | None = None,
    ) -> None:
        self.config_path = config_path
        self.listen = listen
        self.count = count
        self.holder = holder
        self.stats = stats
        self.extra_args = extra_args or []
        # added to each worker's environment, and descriptors it inherits (the shared
        # RRL table's memfd, named in the environment)
        self.env = env or {}
        self.pass_fds = pass_fds
        # a serving worker silent this long is killed and restarted (0 = never)
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        self.stalls = 0  # workers killed for it
        # (listen index, socket, flock descriptor) of each UDP socket the workers share:
        # the watchdog also kills a flock holder that leaves datagrams waiting
        self.shared_udp = shared_udp or []
        self._waiting_since: dict[int, float] = {}  # listen index -> first seen waiting
        self._received: dict[int, tuple[tuple[int, int], ...]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.workers = [_Worker(i) for i in range(count)]
        self.ready = asyncio.Event()
        self._ready_count = 0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._last_geo: GeoState | None = None
        self._geo_changed = asyncio.Event()
        self._on_geo: Callable[[], None] = lambda: None  # the holder listener, once started
        self.on_ready: Callable[[], None] | None = None

    def _cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "geodns", "--config", str(self.config_path), "serve-worker"]
        for addr in self.listen:
            cmd += ["--listen", addr]
        return cmd + self.extra_args

    async def start(self) -> None:
        """Spawn every worker and wait until each one serves."""
        warning = crowding(self.count, usable_cpus())
        if warning is not None:
            log.warning("%s", warning)
        for w in self.workers:
            await self._spawn(w)
        await asyncio.wait_for(self.ready.wait(), 120)
        loop = asyncio.get_running_loop()

        def changed() -> None:
            # publish_geo may run on another thread: an asyncio.Event is set on its loop
            loop.call_soon_threadsafe(self._geo_changed.set)

        self._on_geo = changed
        self.holder.geo_listeners.append(changed)
        self._watch = asyncio.create_task(self._follow_health())
        if self.stall_timeout_s > 0:
            self._watchdog = asyncio.create_task(self._kill_stalled())

    async def _spawn(self, w: _Worker) -> None:
        w.serving = False
        w.proc = await asyncio.create_subprocess_exec(
            *self._cmd(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env},
            pass_fds=self.pass_fds,
        )
        w.reader = asyncio.create_task(self._read(w))
        self._send(w, encode_states(self.holder.view.geo))
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _send(self, w: _Worker, line: bytes) -> None:
        if w.proc is not None and w.proc.stdin is not None and w.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                w.proc.stdin.write(line)

    async def _read(self, w: _Worker) -> None:
        assert w.proc is not None and w.proc.stdout is not None
        counted = False
        # the end is the process's exit, not EOF: a child it left behind (e.g. a zone
        # cache compile) may hold its stdout open
        exited = asyncio.ensure_future(w.proc.wait())
        while True:
            reading = asyncio.ensure_future(w.proc.stdout.readline())
            await asyncio.wait((reading, exited), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                break
            line = reading.result()
            if not line:
                break
            w.last_report = self.clock()
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready") and not counted:
                counted = True
                w.serving = True
                self._ready_count += 1
                if self._ready_count >= self.count:
                    self.ready.set()
                continue
            w.last_stats = msg
            sum_stats([x.last_stats for x in self.workers if x.last_stats], self.stats)
        await exited
        if not self._stopping:
            w.restarts += 1
            log.error("worker %d exited with %s; restarting", w.index, w.proc.returncode)
            await asyncio.sleep(min(5.0, 0.2 * w.restarts))
            if not self._stopping:  # stop() may have begun during the back-off
                await self._spawn(w)

    async def _kill_stalled(self) -> None:
        """Kill a serving worker that has written nothing (its once-a-second counters)
        for stall_timeout_s: its event loop is stuck, or it was stopped. With shared UDP
        sockets it may hold the receive flock, and then nobody answers UDP until it is
        gone; _read restarts it."""
        step = min(1.0, self.stall_timeout_s / 4)
        last = self.clock()
        while True:
            await asyncio.sleep(step)
            now = self.clock()
            if now - last > 2 * step:
                # this process was not running either (its loop blocked, the host
                # paused): the workers' lines may be waiting unread; start again
                for w in self.workers:
                    w.last_report = max(w.last_report, now)
                self._waiting_since.clear()
            last = now
            self._kill_not_receiving(now)
            for w in self.workers:
                proc = w.proc
                if proc is None or proc.returncode is not None or not w.serving:
                    continue
                silent = now - w.last_report
                # its receive thread stuck in one batch, while its event loop reports:
                # with shared sockets no worker answers UDP meanwhile
                busy = float(w.last_stats.get("udp_busy_s", 0.0))
                if silent >= self.stall_timeout_s or busy >= self.stall_timeout_s:
                    log.error(
                        "worker %d (pid %d) sent nothing for %.1f s, or is %.1f s into "
                        "one UDP batch: killing it",
                        w.index,
                        proc.pid,
                        silent,
                        busy,
                    )
                    self._kill(w, proc)

    def _kill_not_receiving(self, now: float) -> None:
        """Per shared UDP socket: datagrams have been waiting in it at every look for
        stall_timeout_s and no worker reported taking one from it meanwhile, so the
        worker holding its flock does not receive (stuck before recvmmsg, or receiving
        from something else): kill that worker; _read restarts it and the flock passes
        on. Judged from the kernel (the receive queue, /proc/locks) and the workers'
        counters, not from what the holder says about itself."""
        for index, sock, lock_fd in self.shared_udp:
            taken = tuple(
                (w.proc.pid if w.proc is not None else 0, _received(w.last_stats, index))
                for w in self.workers
            )
            moved = taken != self._received.get(index)
            self._received[index] = taken
            if moved or queued_bytes(sock) == 0:
                self._waiting_since.pop(index, None)
                continue
            since = self._waiting_since.setdefault(index, now)
            if now - since < self.stall_timeout_s:
                continue
            del self._waiting_since[index]
            holders = flock_holders(lock_fd)
            for w in self.workers:
                proc = w.proc
                if proc is None or proc.returncode is not None or proc.pid not in holders:
                    continue
                log.error(
                    "worker %d (pid %d) holds UDP socket %s but took nothing from it for "
                    "%.1f s while datagrams waited: killing it",
                    w.index,
                    proc.pid,
                    self.listen[index],
                    now - since,
                )
                self._kill(w, proc)

    def _kill(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        """The watchdog's kill: counted; _read restarts the worker once it has exited."""
        w.serving = False
        self.stalls += 1
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def _follow_health(self) -> None:
        """Push every newly published GeoState to all workers.

        Woken by the holder's listener, not by polling (an idle server does not wake
        up); a burst of publishes within COALESCE_S goes out as its last state."""
        while True:
            geo = self.holder.view.geo
            if geo is not self._last_geo:
                self._last_geo = geo
                line = encode_states(geo)
                for w in self.workers:
                    self._send(w, line)
                await asyncio.sleep(COALESCE_S)
            await self._geo_changed.wait()
            self._geo_changed.clear()

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(ValueError):
            self.holder.geo_listeners.remove(self._on_geo)
        if self._watch is not None:
            self._watch.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.terminate()
        for w in self.workers:
            if w.proc is not None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 6)
                except TimeoutError:
                    w.proc.kill()
            if w.reader is not None:
                w.reader.cancel()


async def worker_stdin_loop(holder: ViewHolder, on_eof: Callable[[], None]) -> None:
    """Worker side: read health lines from the main process until it goes away."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            on_eof()  # the main process is gone: stop serving
            return
        try:
            apply_states(holder, line)
        except (ValueError, KeyError) as exc:
            log.error("worker: bad health message from the main process: %s", exc)


async def worker_stats_loop(stats: Stats, refresh: Callable[[], None] = lambda: None) -> None:
    """Worker side: report counters to the main process once a second (`refresh` first
    copies in what is counted elsewhere)."""
    out = sys.stdout.buffer
    while True:
        refresh()
        out.write(encode_stats(stats))
        out.flush()
        await asyncio.sleep(STATS_INTERVAL_S)
