#!/usr/bin/env python3
"""Where geodns's microseconds per query go (issue 9): the numbers behind bench/README.md.

    .venv/bin/python bench/profile.py            # in-process stages + live servers (~1 min)
    .venv/bin/python bench/profile.py --no-live  # only the in-process part
    .venv/bin/python bench/profile.py --workers-only  # only part 3 (~1.5 min)
    .venv/bin/python bench/profile.py --workers-only --rounds 5  # medians of 5 rounds

Two parts, both on the data bench/run.py builds (same zone, GeoIP database, query mix,
ECS 81.2.69.0/24, the exact bytes dnsperf sends):

1. In process, pinned to CPU 0, no sockets: the hit path (`PacketCache.handle`) and the
   full path (`Handler.handle`) timed per query over the mix, next to a bare dict lookup +
   ID splice and a few stages timed on their own; then cProfile's own-time per stage
   (decode, client address, locate, pick, resolve, encode, cache, RRL, glue) scaled to the
   unprofiled total (cProfile inflates small calls: read the split as approximate).
2. Live, on loopback like bench/run.py, at a fixed dnsperf rate: server CPU per query split
   into user and kernel time (/proc/PID/stat), and `perf record` of the server split by
   shared object (kernel, Python interpreter, uvloop, the GeoIP reader, libc) with the top
   symbols. Servers: an echo server (geodns's own DnsServer, its UDP receive thread
   answering one precomputed reply: the floor of kernel + interpreter), geodns (hit
   path), geodns --no-packet-cache (full path) and gdnsd.
3. One process vs two on the same CPU at that rate (what `--workers 2` costs where both
   workers share one CPU): CPU per query and wakeups per query for gdnsd with 1 and 2 UDP
   threads and as 1 and 2 processes, the echo server as 1 and 2 SO_REUSEPORT processes,
   geodns --workers 1 and 2 (shared UDP sockets, the default, and a SO_REUSEPORT socket
   per worker), and geodns at half the rate (what each of two workers sees).

Installs nothing; `perf` (Debian linux-perf) is optional: without it part 2 reports only
the /proc split.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_run() -> ModuleType:
    """bench/run.py as a module (this file's name shadows the stdlib `profile`, so the
    bench directory is taken off sys.path before cProfile is imported)."""
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load_run()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- part 1: in process -----------------------------------------------------------------


def offline_app(cfg: Path) -> Any:
    """The server's own objects (handler, packet cache), zones loaded, no sockets."""
    from geodns.app import App
    from geodns.config import load_config

    app = App(load_config(cfg), listen=[])
    app.reloader.initial_load()
    return app


def per_call_ns(fn: Callable[[], object], calls: int, rounds: int = 7) -> float:
    """Median over rounds of the CPU time per call of fn() (a closure running `calls`
    calls); thread CPU time, so other processes on the CPU do not inflate it."""
    times = []
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        fn()
        times.append((time.thread_time_ns() - t0) / calls)
    return statistics.median(times)


def mix_queries() -> list[bytes]:
    out = []
    for i, line in enumerate(run.MIX):
        name, qtype = line.split()
        out.append(run._query(name, {"A": 1, "SOA": 6}[qtype], run.DEFAULT_ECS, 0x1000 + i))
    return out


# cProfile own time -> stage. Builtins and generated dataclass code are charged to
# their callers (see _charge).
def stage(filename: str, func: str) -> str:
    name = Path(filename).name
    if name == "wire.py":
        if func.startswith(("decode", "_parse", "_skip")) or func in ("__init__", "__new__"):
            return "decode (wire.py)"
        return "encode (wire.py)"
    if name == "handler.py":
        if func == "_encode":
            return "encode (wire.py)"
        if func in ("client_address", "ecs_ip") or (func == "__init__"):
            return "client address"
        if func == "__call__":
            return "pick (pick.py + _Steer)"
        return "handler glue (handler.py)"
    if name == "ipaddress.py":
        return "client address"
    if name == "pick.py":
        return "pick (pick.py + _Steer)"
    if name in ("geo.py", "reader.py", "decoder.py") or "maxminddb" in filename:
        return "locate (geo.py, maxminddb)"
    if name == "resolver.py":
        return "resolve (resolver.py)"
    if name == "cache.py":
        return "packet cache (cache.py)"
    if name == "fastpath.py":
        return "fast path (fastpath.py)"
    if name == "udpbatch.py":
        return "UDP batches (udpbatch.py)"
    if name == "rrl.py":
        return "RRL (rrl.py)"
    if name in ("zones.py", "view.py", "model.py", "zonefast.py"):
        return "zone / view data"
    return f"other ({name})"


def _charge(stats: dict[Any, Any]) -> dict[str, float]:
    """Own seconds per stage; a builtin's (or generated code's) own time goes to its
    callers in proportion to their calls."""
    out: dict[str, float] = defaultdict(float)

    def owner(key: tuple[str, int, str], depth: int = 0) -> list[tuple[str, float]]:
        filename, _, func = key
        if not (filename == "~" or filename.startswith("<")) or depth > 3:
            return [(stage(filename, func), 1.0)]
        callers = stats[key][4] if key in stats else {}
        total = sum(c[0] for c in callers.values()) or 1
        shares: list[tuple[str, float]] = []
        for ckey, c in callers.items():
            for st, w in owner(ckey, depth + 1):
                shares.append((st, w * c[0] / total))
        return shares or [(f"other ({func})", 1.0)]

    for key, (_cc, _nc, tt, _ct, _callers) in stats.items():
        for st, w in owner(key):
            out[st] += tt * w
    return out


def profile_split(fn: Callable[[], object], calls: int, total_ns: float) -> list[tuple[str, float]]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    st = pstats.Stats(prof)
    own = _charge(st.stats)  # type: ignore[attr-defined]
    own.pop("other (profile.py)", None)  # the timing loops themselves
    own.pop("other (~)", None)
    whole = sum(own.values()) or 1.0
    rows = sorted(own.items(), key=lambda kv: -kv[1])
    return [(k, v / whole * total_ns / 1000) for k, v in rows if v / whole >= 0.005]


def part_inprocess(args: argparse.Namespace, cfgs: dict[str, Path]) -> list[str]:
    from geodns.model import Transport
    from geodns.wire import decode_query

    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, run.cpu_list(args.cpu))
    udp = Transport.UDP
    addr = ("127.0.0.1", 40000)
    queries = mix_queries()
    n = len(queries)
    reps = args.reps
    calls = n * reps
    app = offline_app(cfgs["base"])
    cache, handler = app.cache, app.handler
    if cache is None:
        raise SystemExit("the packet cache is off in the bench config")
    for q in queries:
        cache.handle(q, addr, udp)  # fill: every later call is a hit

    def hits() -> None:
        for _ in range(reps):
            for q in queries:
                cache.handle(q, addr, udp)

    def full() -> None:
        for _ in range(reps):
            for q in queries:
                handler.handle(q, addr, udp)

    def no_fast() -> None:
        # the full path without pre-rendered answers (Settings.fast_path = false): what
        # a question costs the first time, and what the fast path does not cover
        fast, handler.fast = handler.fast, None
        try:
            full()
        finally:
            handler.fast = fast

    floor_dict = {q[2:]: handler.handle(q, addr, udp)[2:] for q in queries}

    def floor() -> None:
        d = floor_dict
        for _ in range(reps):
            for q in queries:
                _ = q[:2] + d[q[2:]]

    def decode() -> None:
        for _ in range(reps):
            for q in queries:
                decode_query(q)

    ecs_ip = ipaddress.ip_network(run.DEFAULT_ECS).network_address
    locate = app.locator.locate if app.locator is not None else None

    def locate_loop() -> None:
        assert locate is not None
        for _ in range(calls):
            locate(ecs_ip)

    def parse_addr() -> None:
        for _ in range(calls):
            ipaddress.ip_address("127.0.0.1")

    proto = None
    with contextlib.suppress(Exception):  # the transport layer as it is today
        from types import SimpleNamespace

        from geodns.server import UdpProtocol

        proto = UdpProtocol(cache.handle)
        proto.transport = SimpleNamespace(sendto={}.setdefault)  # type: ignore[assignment]

    def datagrams() -> None:
        assert proto is not None
        received = proto.datagram_received
        for _ in range(reps):
            for q in queries:
                received(q, addr)

    timings = {
        "hit": per_call_ns(hits, calls),
        "full": per_call_ns(full, calls),
        "no_fast": per_call_ns(no_fast, calls),
        "floor": per_call_ns(floor, calls),
        "decode": per_call_ns(decode, calls),
        "ip_address": per_call_ns(parse_addr, calls),
    }
    if locate is not None:
        timings["locate"] = per_call_ns(locate_loop, calls)
    rrl_hit = None
    if "rrl-counted" in cfgs:
        app_rrl = offline_app(cfgs["rrl-counted"])
        if app_rrl.cache is not None and getattr(app_rrl.handler, "rrl", None) is not None:
            c2 = app_rrl.cache
            for q in queries:
                c2.handle(q, addr, udp)

            def hits_rrl() -> None:
                for _ in range(reps):
                    for q in queries:
                        c2.handle(q, addr, udp)

            rrl_hit = per_call_ns(hits_rrl, calls)
    lines = [
        f"In process, CPU {args.cpu}, {calls:,} queries of the mix per round, median of 7 "
        "rounds, thread CPU time:",
        "",
        "| measured alone | µs/query |",
        "|---|---:|",
        f"| hit path: `PacketCache.handle` | {timings['hit'] / 1000:.2f} |",
        f"| floor: dict lookup of `data[2:]` + ID splice | {timings['floor'] / 1000:.2f} |",
        f"| full path: `Handler.handle` (fast path: pre-rendered answers) | "
        f"{timings['full'] / 1000:.2f} |",
        f"| full path with the fast path off (decode, resolve, pick, encode) | "
        f"{timings['no_fast'] / 1000:.2f} |",
        f"| `wire.decode_query` (alone) | {timings['decode'] / 1000:.2f} |",
        f"| `ipaddress.ip_address(str)` (alone) | {timings['ip_address'] / 1000:.2f} |",
    ]
    if proto is not None:
        timings["datagram"] = per_call_ns(datagrams, calls)
        lines.append(
            "| `UdpProtocol.datagram_received` → hit path → `sendto` (a C stub) | "
            f"{timings['datagram'] / 1000:.2f} |"
        )
    if "locate" in timings:
        lines.append(
            f"| `Locator.locate` (alone, cached network) | {timings['locate'] / 1000:.2f} |"
        )
    if rrl_hit is not None:
        lines.append(
            f"| hit path with RRL counting every reply (nothing exempt) | {rrl_hit / 1000:.2f} |"
        )
    for title, fn, total in (
        ("hit path (`PacketCache.handle`)", hits, timings["hit"]),
        ("full path (`Handler.handle`)", full, timings["full"]),
        ("full path with the fast path off", no_fast, timings["no_fast"]),
    ):
        split = profile_split(fn, calls, total)
        lines += ["", f"cProfile own time of the {title}, scaled to {total / 1000:.2f} µs:", ""]
        lines += ["| stage | µs/query |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in split]
    if args.pstats:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(full)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    if app.locator is not None:
        app.locator.close()
    return lines


# -- part 2: live servers ----------------------------------------------------------------

ECHO = """
import asyncio, os, sys, threading
from geodns.app import install_loop_policy
from geodns.server import DnsServer, bind_sockets
port, tail = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
procs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
def handle(data, addr, transport):
    return data[:2] + tail
async def main():
    server = DnsServer(handle, lock=threading.RLock())  # a receive thread, as geodns
    await server.start([bind_sockets("127.0.0.1", port, reuse_port=procs > 1)])
    await asyncio.Event().wait()
for _ in range(procs - 1):  # N processes on one port, as --workers N (SO_REUSEPORT)
    if os.fork() == 0:
        break
install_loop_policy()
asyncio.run(main())
"""


def _stat_split(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds of pid and its descendants."""
    u = s = 0
    for p in run.process_tree(pid):
        f = run._stat_fields(p)
        if f is not None:
            u, s = u + int(f[11]), s + int(f[12])
    return u / run.CLK_TCK, s / run.CLK_TCK


def _dso_group(dso: str) -> str:
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("loop.cpython") or "uvloop" in dso:
        return "uvloop"
    if "maxminddb" in dso or dso.startswith("extension.cpython"):
        return "maxminddb"
    if dso.startswith(("libpython", "python")):
        return "Python interpreter"
    if dso.startswith(("libc", "ld-linux")):
        return "libc"
    if dso.startswith("[unknown"):
        return "unknown"
    return dso


SYSCALLS = [
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "epoll_wait",
    "epoll_pwait",
]


def syscall_events() -> list[str]:
    """perf events counting the server's syscalls (those this kernel has)."""
    base = Path("/sys/kernel/tracing/events/syscalls")
    return [f"syscalls:sys_enter_{n}" for n in SYSCALLS if (base / f"sys_enter_{n}").exists()]


def parse_perf_stat(text: str) -> dict[str, int]:
    """`perf stat -x,` output -> {syscall name: count}."""
    counts = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].isdigit():
            counts[parts[2].split("sys_enter_")[-1].split(":")[-1]] = int(parts[0])
    return counts


REPORT = ["perf", "report", "--stdio", "--no-children", "-g", "none", "-i"]


def perf_report(data: Path) -> tuple[dict[str, float], list[tuple[float, str, str]]]:
    """(share per DSO group, top symbols) from `perf report`."""
    out = subprocess.run(
        [*REPORT, str(data), "--sort", "dso,sym", "--percent-limit", "0.3"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    groups: dict[str, float] = defaultdict(float)
    syms: list[tuple[float, str, str]] = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+\[[k.]\]\s+(.*)", line)
        if m:
            pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
            groups[_dso_group(dso)] += pct
            syms.append((pct, dso, sym))
    whole = subprocess.run(
        [*REPORT, str(data), "--sort", "dso"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    groups = defaultdict(float)
    for line in whole.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)", line)
        if m:
            groups[_dso_group(m.group(2))] += float(m.group(1))
    return dict(groups), syms


@dataclass
class Live:
    """What the live parts share: dnsperf's settings, gdnsd, the query file and the
    tail of a geodns reply to `www` (the echo server's answer)."""

    ns: argparse.Namespace
    gdnsd: str | None
    queries: Path
    tail: bytes


def live_setup(args: argparse.Namespace, root: Path, cfgs: dict[str, Path]) -> Live | None:
    """None without dnsperf."""
    ns = argparse.Namespace(
        dnsperf=shutil.which("dnsperf"),
        clients=8,
        outstanding=100,
        threads=1,
        wait_idle=args.wait_idle,
        server_cpu=args.cpu,
        client_cpu=args.client_cpu,
    )
    if ns.dnsperf is None:
        return None
    gdnsd = shutil.which("gdnsd") or shutil.which("gdnsd", path="/usr/sbin:/usr/local/sbin")
    queries = root / "queries.txt"
    queries.write_text("\n".join(run.MIX) + "\n")
    from geodns.model import Transport

    app = offline_app(cfgs["base"])
    www = run._query("www.example.com", 1, run.DEFAULT_ECS, 0)
    tail = app.handler.handle(www, ("127.0.0.1", 1), Transport.UDP)
    if app.locator is not None:
        app.locator.close()
    return Live(ns, gdnsd, queries, tail)


def part_live(args: argparse.Namespace, root: Path, cfgs: dict[str, Path]) -> list[str]:
    live = live_setup(args, root, cfgs)
    if live is None:
        return ["(live part skipped: no dnsperf; `make deb-tools`)"]
    ns, gdnsd, queries, tail = live.ns, live.gdnsd, live.queries, live.tail
    have_perf = shutil.which("perf") is not None
    py = sys.executable
    servers: list[tuple[str, list[str], int]] = [
        (
            "echo (DnsServer, receive thread, one fixed reply)",
            [py, "-c", ECHO, "PORT", tail[2:].hex()],
            0,
        ),
        ("geodns hit path", [py, "-m", "geodns", "--config", str(cfgs["base"]), "serve"], 0),
        (
            "geodns full path (--no-packet-cache)",
            [py, "-m", "geodns", "--config", str(cfgs["base"]), "serve", "--no-packet-cache"],
            args.full_rate,
        ),
    ]
    if "rrl" in cfgs:
        rrl = [py, "-m", "geodns", "--config", str(cfgs["rrl"]), "serve"]
        servers.insert(2, ("geodns hit path, [rrl] at its defaults", rrl, 0))
    if gdnsd is not None:
        servers.append(("gdnsd 3.8.1", [gdnsd, "-c", "GDNSD_DIR", "start"], 0))
    mmdb = root / "bench.mmdb"
    rows = [
        f"Live, server on CPU {args.cpu}, dnsperf on CPU {args.client_cpu}, ECS on, the mix, "
        f"{args.duration:g} s per server, CPU split from a run without perf"
        + (
            ", `perf record -F 2999` of the server (perf on the dnsperf CPU):" if have_perf else ":"
        ),
        "",
        "| server | rate | CPU µs/query | user | kernel | perf: kernel | Python | uvloop "
        "| maxminddb | libc | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tops: list[str] = []
    calls = ["", "System calls per answered query (perf stat, tracepoints):", ""]
    calls += ["| server | per query |", "|---|---|"]
    for i, (name, argv, rate) in enumerate(servers):
        rate = rate or args.rate
        port = run.free_port()
        argv = [a.replace("PORT", str(port)) for a in argv]
        if argv[0] == gdnsd:
            d = run.write_gdnsd(root / f"gd{port}", port, mmdb)
            argv = [gdnsd, "-c", str(d), "start"]
        elif "geodns" in argv:
            argv += ["--listen", f"127.0.0.1:{port}"]
        log(f"live: {name} at {rate} QPS")
        try:
            server = run.start_server(f"live{i}", argv, port, root, args.cpu)
        except RuntimeError as exc:
            rows.append(f"| {name} | failed to start: {str(exc).splitlines()[0]} |")
            continue
        try:
            run.dnsperf(server, queries, run.DEFAULT_ECS, 1.0, run.CLOSED, ns)  # warm-up
            # first a clean run (no perf attached: tracing inflates kernel time) ...
            if args.wait_idle:
                run.wait_idle(ns)
            u0, s0 = _stat_split(server.pid)
            res = run.dnsperf(server, queries, run.DEFAULT_ECS, args.duration, rate, ns)
            u1, s1 = _stat_split(server.pid)
            # ... then one under perf record + perf stat for the shares and syscalls
            perf = counter = None
            sys_counts: dict[str, int] = {}
            data = root / f"perf-{port}.data"
            if have_perf:
                if args.wait_idle:
                    run.wait_idle(ns)
                record = ["perf", "record", "-q", "-F", "2999", "-g", "-o", str(data)]
                perf = subprocess.Popen(
                    [*run.pin(args.client_cpu), *record, "-p", str(server.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                run.STARTED.clients.append(perf)
                events = syscall_events()
                if events:
                    stat = ["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(server.pid)]
                    counter = subprocess.Popen(
                        [*run.pin(args.client_cpu), *stat],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    run.STARTED.clients.append(counter)
                time.sleep(0.3)
                traced = run.dnsperf(server, queries, run.DEFAULT_ECS, args.duration, rate, ns)
                perf.send_signal(2)
                perf.wait(30)
                run.STARTED.clients.remove(perf)
                if counter is not None:
                    counter.send_signal(2)
                    _, err = counter.communicate(timeout=30)
                    run.STARTED.clients.remove(counter)
                    sys_counts = {
                        n: c * res.completed // max(1, traced.completed)
                        for n, c in parse_perf_stat(err).items()
                    }
        finally:
            server.stop()
            run.STARTED.servers.remove(server)
        k = res.completed / 1e6 or 1
        cells = [
            name,
            f"{res.qps:,.0f}",
            f"{res.cpu_us:.1f}",
            f"{(u1 - u0) / k:.1f}",
            f"{(s1 - s0) / k:.1f}",
        ]
        if perf is not None and data.exists():
            groups, syms = perf_report(data)
            known = ["kernel", "Python interpreter", "uvloop", "maxminddb", "libc"]
            cells += [f"{groups.get(g, 0):.0f} %" for g in known]
            cells.append(f"{sum(v for g, v in groups.items() if g not in known):.0f} %")
            tops.append(f"\nTop symbols, {name} (% of the server's samples):\n")
            tops += [f"    {pct:5.1f}%  {dso:<28} {sym[:70]}" for pct, dso, sym in syms[:14]]
        else:
            cells += ["–"] * 6
        rows.append("| " + " | ".join(cells) + " |")
        if sys_counts and res.completed:
            per = ", ".join(
                f"{n} {c / res.completed:.2f}"
                for n, c in sys_counts.items()
                if c >= res.completed / 100
            )
            calls.append(f"| {name} | {per} |")
    return rows + (calls if len(calls) > 5 else []) + tops


def _wakeups(pids: list[int]) -> int:
    """Voluntary context switches of every thread of pids: one per sleep (wakeup)."""
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            n += int(line.split()[1])
    return n


def part_workers(args: argparse.Namespace, root: Path, cfgs: dict[str, Path]) -> list[str]:
    """One process vs two on the same CPU, for geodns --workers and two references: the
    echo server (no DNS work) as 1 and 2 SO_REUSEPORT processes, gdnsd with 1 and 2 UDP
    threads and as 1 and 2 processes; and one geodns process at half the rate (what
    each of two workers sees)."""
    live = live_setup(args, root, cfgs)
    if live is None:
        return ["(workers part skipped: no dnsperf; `make deb-tools`)"]
    ns, gdnsd, queries, tail = live.ns, live.gdnsd, live.queries, live.tail
    py, rate = sys.executable, args.rate
    geodns = [py, "-m", "geodns", "--config", str(cfgs["base"]), "serve", "--workers"]
    pairs: list[tuple[str, list[str], list[str]]] = [
        ("echo, 1 vs 2 processes", [py, "-c", ECHO, "PORT", tail[2:].hex(), "1"], ["2"]),
        ("geodns --workers 1 vs 2", [*geodns, "1"], ["2"]),
    ]
    if "reuseport" in cfgs:
        # the same with a SO_REUSEPORT socket per worker instead of shared ones
        reuse = [py, "-m", "geodns", "--config", str(cfgs["reuseport"]), "serve", "--workers"]
        pairs.append(("geodns --workers 1 vs 2, reuseport", [*reuse, "1"], ["2"]))
    if gdnsd is not None:
        pairs.insert(0, ("gdnsd, 1 vs 2 UDP threads", [gdnsd, "THREADS1"], ["THREADS2"]))
        pairs.insert(1, ("gdnsd, 1 vs 2 processes", [gdnsd, "PROCS1"], ["PROCS2"]))
    rows = [
        f"One process vs two on CPU {args.cpu} (dnsperf on CPU {args.client_cpu}) at "
        f"{rate:,} QPS, {args.duration:g} s each; wakeups = voluntary context switches of "
        "all the server's threads per answered query:",
        "",
        "| server | 1: CPU µs/query | wakeups/query | 2: CPU µs/query | wakeups/query | 2 vs 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    half = ""
    mmdb = root / "bench.mmdb"

    def measure(name: str, argv: list[str], at: int) -> tuple[float, float]:
        port = run.free_port()
        if argv[0] == gdnsd and argv[1].startswith("PROCS"):
            # k gdnsd daemons (own run/state dirs) on one port: gdnsd sets SO_REUSEPORT
            daemons = []
            for k in range(int(argv[1][-1])):
                d = run.write_gdnsd(root / f"gp{port}-{k}", port, mmdb)
                daemons.append(f"{shlex.quote(gdnsd)} -c {shlex.quote(str(d))} start")
            argv = ["sh", "-c", " & ".join(daemons) + " & wait"]
        elif argv[0] == gdnsd:
            d = run.write_gdnsd(root / f"gw{port}", port, mmdb)
            conf = d / "config"
            conf.write_text(
                conf.read_text().replace("udp_threads => 1", f"udp_threads => {argv[1][-1]}")
            )
            argv = [gdnsd, "-c", str(d), "start"]
        elif "geodns" in argv:
            argv = [*argv, "--listen", f"127.0.0.1:{port}"]
        else:
            argv = [a.replace("PORT", str(port)) for a in argv]
        log(f"workers: {name} at {at} QPS")
        server = run.start_server(f"wk{port}", argv, port, root, args.cpu)
        try:
            run.dnsperf(server, queries, run.DEFAULT_ECS, 1.0, run.CLOSED, ns)  # warm-up
            if args.wait_idle:
                run.wait_idle(ns)
            server.remember_tree()
            pids = run.process_tree(server.pid)
            w0 = _wakeups(pids)
            res = run.dnsperf(server, queries, run.DEFAULT_ECS, args.duration, at, ns)
            w1 = _wakeups(pids)
        finally:
            server.stop()
            run.STARTED.servers.remove(server)
        return res.cpu_us, (w1 - w0) / max(1, res.completed)

    # rounds interleave the pairs, so a slow half hour of this VM lands on every server;
    # each round's "2 vs 1" pairs measurements taken a minute apart
    got: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {}
    failed: dict[str, str] = {}
    for rnd in range(args.rounds):
        for name, argv, second in pairs:
            if name in failed:
                continue
            try:
                one = measure(name + " (1)", argv, rate)
                two = measure(name + " (2)", [*argv[:-1], *second], rate)
                if argv[0] != gdnsd and "geodns" in argv and rnd == 0 and not half:
                    h = measure(name + " (1, half rate)", argv, rate // 2)
                    half = (
                        f"\ngeodns --workers 1 at {rate // 2:,} QPS (the rate each of two "
                        f"workers serves): {h[0]:.1f} µs/query, {h[1]:.2f} wakeups/query."
                    )
            except RuntimeError as exc:
                failed[name] = str(exc).splitlines()[0]
                continue
            got.setdefault(name, []).append((one, two))
    med = statistics.median
    for name, _, _ in pairs:
        if name in failed:
            rows.append(f"| {name} | failed: {failed[name]} |")
            continue
        runs = got.get(name, [])
        if not runs:
            continue
        ratios = sorted(t[0] / o[0] for o, t in runs)
        spread = f" ({ratios[0]:.2f}–{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        rows.append(
            f"| {name} | {med(o[0] for o, _ in runs):.1f} | {med(o[1] for o, _ in runs):.2f} "
            f"| {med(t[0] for _, t in runs):.1f} | {med(t[1] for _, t in runs):.2f} "
            f"| {med(ratios):.2f}x{spread} |"
        )
    if args.rounds > 1:
        rows.append(
            f"\nMedians over {args.rounds} interleaved rounds; 2 vs 1 is the median of each "
            "round's ratio, with its range."
        )
    return rows + ([half] if half else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--no-live", action="store_true", help="only the in-process part")
    p.add_argument("--workers-only", action="store_true", help="only the 1-vs-2 processes part")
    p.add_argument(
        "--rounds", type=int, default=1, help="part 3: interleaved rounds (medians, ranges)"
    )
    p.add_argument("--reps", type=int, default=2500, help="passes over the 20-query mix")
    p.add_argument("--rate", type=int, default=40000, help="dnsperf -Q for the live part")
    p.add_argument(
        "--full-rate", type=int, default=40000, help="-Q for the full path (--no-packet-cache)"
    )
    p.add_argument("--duration", type=float, default=6.0, help="seconds per live run")
    p.add_argument("--cpu", default="0", help="server CPU list (default 0)")
    p.add_argument("--client-cpu", default="1", help="dnsperf CPU list (default 1)")
    p.add_argument("--wait-idle", type=float, default=0, help="as in run.py (seconds)")
    p.add_argument("--pstats", action="store_true", help="also print cProfile's top functions")
    args = p.parse_args()
    try:
        import geodns  # noqa: F401
    except ImportError:
        sys.exit("run with the project venv: .venv/bin/python bench/profile.py")
    head = run.git_head()
    root = Path(tempfile.mkdtemp(prefix="geodns-profile-"))
    out: list[str] = []
    try:
        mmdb = root / "bench.mmdb"
        run.write_mmdb(mmdb)
        feat = run.detect_features(root, mmdb)
        cfgs = {"base": run.write_geodns(root, "geodns", mmdb, feat.rrl_config("off"))}
        if feat.rrl is not None:
            cfgs["rrl"] = run.write_geodns(root, "geodns-rrl", mmdb, feat.rrl_config("default"))
        if feat.rrl_counted:
            cfgs["rrl-counted"] = run.write_geodns(
                root, "geodns-rrl-counted", mmdb, feat.rrl_config("counted")
            )
        if "worker_udp_shared" in feat.server:
            cfgs["reuseport"] = run.write_geodns(
                root, "geodns-reuseport", mmdb, feat.rrl_config("off"), "worker_udp_shared = false"
            )
        out.append(
            f"geodns {head}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"load average {os.getloadavg()[0]:.2f}\n"
        )
        if not args.workers_only:
            out += part_inprocess(args, cfgs)
        if not args.no_live and not args.workers_only:
            out += ["", *part_live(args, root, cfgs)]
        if not args.no_live:
            out += ["", *part_workers(args, root, cfgs)]
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        run.STARTED.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
