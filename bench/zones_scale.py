"""Zone-scale benchmark: many small zones, and one zone of a million records.

    python bench/zones_scale.py                      # 100,000 zones + 1,000,000 records
    python bench/zones_scale.py --zones 20000 --big 200000 --out bench/out/zs

Runs `python -m geodns serve` (this checkout) on loopback ports it picks, and stops
everything it started by PID. For N small zones (bench/gen_zones.py, sharded in
sub-directories, with a few geo overlays):

- cold start: seconds until the first zone answers, until the last zone answers and
  until /readyz says 200, with RSS (from /proc) of the server when ready; then a warm
  start (compiled zone cache) the same way;
- one zone edited among N: seconds from the atomic rename to the new answer (median and
  max over --edits edits), while a query loop against other zones counts answers and
  failures (QPS of that loop, which is one Python client: a floor, not the ceiling);
- RSS after those edits and after --reloads more reloads of one zone (no growth).

For the big zone: seconds to load and RSS, then a reload (new serial) under a query
loop: reload time and failed queries (must be 0). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from gen_zones import big_zone, small_zone, write_small_zones, zone_origin, zone_path  # noqa: E402

CONFIG = """
[server]
log_level = "info"
[zones]
directory = "{zones}"
debounce_s = 0.05
[api]
listen = "127.0.0.1:{api_port}"
[store]
database_url = "sqlite:///{tmp}/state.sqlite3"
journal_dir = "{tmp}/journal"
[geoip]
database = "{repo}/data/dbip-country.mmdb"
[sites.a]
ipv4 = ["198.51.100.10"]
lat = 51.5
lon = -0.1
[sites.b]
ipv4 = ["198.51.100.20"]
lat = 40.7
lon = -74.0
[pools.web]
members = ["a", "b"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of one process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children_rss_mib(pid: int) -> float:
    """RSS of the process's descendants (zone-load workers while they run)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                total += rss_mib(int(entry)) + children_rss_mib(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return total


class Server:
    """`python -m geodns serve` in a child process; stderr goes to a log file."""

    def __init__(self, tmp: Path, zones: Path) -> None:
        self.api_port = free_port()
        self.config = tmp / "geodns.toml"
        self.config.write_text(
            CONFIG.format(zones=zones, api_port=self.api_port, tmp=tmp, repo=REPO)
        )
        self.log = tmp / "server.log"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> float:
        """Start; return the monotonic time it was started at (once the DNS port is known)."""
        cmd = [sys.executable, "-m", "geodns", "--config", str(self.config), "serve"]
        cmd += ["--listen", "127.0.0.1:0"]
        started = time.monotonic()
        if self.log.exists():  # the log of an earlier start stays, numbered
            n = len(list(self.tmp.glob("server.*.log"))) + 1
            self.log.rename(self.tmp / f"server.{n}.log")
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stderr=log, stdout=log, cwd=REPO)
        deadline = started + 60
        while time.monotonic() < deadline:
            m = re.search(rb"serving DNS on 127\.0\.0\.1 port (\d+)", self.log.read_bytes())
            if m:
                self.port = int(m.group(1))
                return started
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.01)
        raise RuntimeError("server did not report its DNS port")

    def query(self, name: str, qtype: str = "A", timeout: float = 2.0) -> dns.message.Message:
        q = dns.message.make_query(name, qtype)
        return dns.query.udp(q, "127.0.0.1", port=self.port, timeout=timeout)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/readyz", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def readyz(self) -> dict[str, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/readyz", timeout=5):
                return {"ready": True}
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read() or b"{}"))
        except (urllib.error.URLError, OSError) as exc:
            return {"error": str(exc)}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _load_line(log: Path) -> str:
    """The server's own account: 'N zones loaded, M rejected in X s'."""
    m = re.findall(r"initial load: (\d+ zones loaded, \d+ rejected in [\d.]+ s)", log.read_text())
    return m[-1] if m else "?"


def answer(srv: Server, name: str) -> tuple[str, set[str]]:
    r = srv.query(name)
    return dns.rcode.to_text(r.rcode()), {rd.to_text() for rr in r.answer for rd in rr}


def wait_for(pred: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> float:
    """Monotonic time at which pred() first held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return time.monotonic()
        except Exception:
            pass
        time.sleep(step_s)
    raise TimeoutError("condition not reached")


def start_and_wait(srv: Server, first: str, last: str, timeout_s: float) -> dict[str, float | str]:
    """Start the server; time the first zone answering, the last one, /readyz."""
    t0 = srv.start()
    t_first = wait_for(lambda: answer(srv, first)[0] == "NOERROR", timeout_s)
    # while loading: the last zone is configured but not loaded yet -> SERVFAIL
    early = answer(srv, last)[0]
    t_last = wait_for(lambda: answer(srv, last)[0] == "NOERROR", timeout_s, 0.05)
    t_ready = wait_for(srv.ready, timeout_s, 0.5)  # /readyz is O(zones): not too often
    assert srv.proc is not None
    return {
        "first_s": t_first - t0,
        "last_s": t_last - t0,
        "ready_s": t_ready - t0,
        "early_rcode": early,
        "rss_mib": rss_mib(srv.proc.pid),
        "children_mib": children_rss_mib(srv.proc.pid),  # load workers are gone by then
        "load_log": _load_line(srv.log),
    }


class QueryLoop(threading.Thread):
    """Queries random names of `origins` one after the other; counts failures and keeps
    each answered query's round trip (this client's own time included)."""

    def __init__(self, srv: Server, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.srv, self.names = srv, names
        self.stop_event = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self.elapsed = 0.0
        self.times: list[float] = []

    def run(self) -> None:
        rnd = random.Random(1)
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            name = rnd.choice(self.names)
            try:
                t = time.monotonic()
                rcode, addrs = answer(self.srv, name)
                self.times.append(time.monotonic() - t)
                if rcode != "NOERROR" or not addrs:
                    self.failures.append(f"{name}: {rcode}")
                self.answered += 1
            except Exception as exc:  # a timeout is a lost query
                self.failures.append(f"{name}: {exc!r}")
        self.elapsed = time.monotonic() - t0

    def finish(self) -> tuple[float, int, int]:
        self.stop_event.set()
        self.join()
        return self.answered / max(self.elapsed, 1e-9), self.answered, len(self.failures)

    def latency(self) -> str:
        """Median, 99th percentile and max round trip, in ms."""
        if not self.times:
            return "no answers"
        ts = sorted(self.times)
        p99 = ts[min(len(ts) - 1, int(len(ts) * 0.99))]
        return (
            f"round trip median {ts[len(ts) // 2] * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"max {ts[-1] * 1e3:.1f} ms"
        )


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def small_zones(args: argparse.Namespace, out: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    n = args.zones
    zones = out / "small" / "zones"
    if zones.exists():
        shutil.rmtree(zones.parent)
    zones.mkdir(parents=True)
    t = time.monotonic()
    write_small_zones(zones, n, shard=True, geo=min(50, n))
    print(f"wrote {n} zones in {time.monotonic() - t:.1f} s", file=sys.stderr)
    # first and last in load order (sorted paths; zones/<c1>/<c2>/<origin>.zone)
    order = sorted(str(zone_path(zones, zone_origin(i), True)) for i in range(n))
    first = "www." + Path(order[0]).name[: -len("zone")]
    last = "www." + Path(order[-1]).name[: -len("zone")]
    srv = Server(out / "small", zones)
    try:
        cold = start_and_wait(srv, first, last, 600)
    finally:
        srv.stop()
    rows.append((f"{n:,} zones: cold start, first zone answers", f"{cold['first_s']:.1f} s"))
    rows.append((f"{n:,} zones: cold start, last zone answers", f"{cold['last_s']:.1f} s"))
    rows.append((f"{n:,} zones: cold start, /readyz 200", f"{cold['ready_s']:.1f} s"))
    rows.append((f"{n:,} zones: cold start, server log", str(cold["load_log"])))
    rows.append((f"{n:,} zones: last zone while loading", str(cold["early_rcode"])))
    rss = float(cold["rss_mib"])
    records = n * 11
    extra = (rss - args.baseline_mib) * 2**20
    rows.append(
        (
            f"{n:,} zones: RSS when ready",
            f"{rss:.0f} MiB (+{cold['children_mib']:.0f} MiB in child processes); above the "
            f"1-zone server: {extra / n:,.0f} B/zone, {extra / records:,.0f} B/record",
        )
    )
    srv = Server(out / "small", zones)
    try:
        warm = start_and_wait(srv, first, last, 600)
        rows.append(
            (f"{n:,} zones: warm start (zone cache), last zone answers", f"{warm['last_s']:.1f} s")
        )
        rows.append((f"{n:,} zones: warm start, /readyz 200", f"{warm['ready_s']:.1f} s"))
        rows += api_costs(srv, n)
        rows += edits(args, srv, zones, n)
    finally:
        srv.stop()
    return rows


def api_costs(srv: Server, n: int) -> list[tuple[str, str]]:
    """What one /readyz and one /v1/zones page cost with n zones (ops API, O(zones)?)."""
    rows = []
    for path in ("/readyz", "/v1/zones?limit=100"):
        best = float("inf")
        for _ in range(3):
            t = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{srv.api_port}{path}", timeout=30):
                    pass
            except urllib.error.HTTPError:
                pass
            best = min(best, time.monotonic() - t)
        rows.append((f"GET {path} with {n:,} zones", f"{best * 1000:.0f} ms"))
    token = (srv.tmp / "state" / "api-token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.api_port}/v1/reload",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=600) as r:
        body = json.loads(r.read())
    took = time.monotonic() - t
    rows.append(
        (
            f"POST /v1/reload (what SIGHUP does) with {n:,} zones, none changed",
            f"{took:.1f} s ({len(body.get('unchanged', []))} unchanged)",
        )
    )
    return rows


def edits(args: argparse.Namespace, srv: Server, zones: Path, n: int) -> list[tuple[str, str]]:
    rows = []
    rnd = random.Random(7)
    edited = rnd.sample(range(n), args.edits)
    others = [f"www.{zone_origin(i)}" for i in rnd.sample(range(n), min(n, 2000))]
    loop = QueryLoop(srv, [o for o in others if o not in {f"www.{zone_origin(i)}" for i in edited}])
    loop.start()
    latencies = []
    for serial, i in enumerate(edited, 2):
        origin = zone_origin(i)
        path = zone_path(zones, origin, True)
        text = small_zone(i, serial).replace("www     IN A    ", "www     IN A    192.0.2.9\n;")
        t = time.monotonic()
        write_atomic(path, text)
        done = wait_for(lambda o=origin: "192.0.2.9" in answer(srv, f"www.{o}")[1], 10, 0.002)
        latencies.append(done - t)
    qps, answered, failed = loop.finish()
    assert srv.proc is not None
    rows.append(
        (
            f"edit one zone among {n:,}: change visible",
            f"median {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms ({len(latencies)} edits)",
        )
    )
    rows.append(
        (
            "query loop on other zones during the edits",
            f"{qps:,.0f} QPS (one Python client), {answered:,} answered, {failed} failed",
        )
    )
    rss_before = rss_mib(srv.proc.pid)
    origin = zone_origin(edited[0])
    path = zone_path(zones, origin, True)
    t = time.monotonic()
    for serial in range(100, 100 + args.reloads):
        write_atomic(path, small_zone(edited[0], serial))
        wait_for(lambda s=serial, o=origin: _serial(srv, o) == s, 10, 0.002)
    took = time.monotonic() - t
    rss_after = rss_mib(srv.proc.pid)
    rows.append(
        (
            f"{args.reloads} reloads of one zone",
            f"{took / args.reloads * 1000:.0f} ms each; RSS {rss_before:.0f} -> "
            f"{rss_after:.0f} MiB",
        )
    )
    return rows


def _serial(srv: Server, origin: str) -> int:
    r = srv.query(origin, "SOA")
    return int(r.answer[0][0].serial) if r.answer else -1


def reload_under_dnsperf(
    rate: int, srv: Server, path: Path, n: int, took: float
) -> list[tuple[str, str]]:
    """One more reload of the big zone while dnsperf asks for its names at `rate` QPS
    (on the last CPU this process may use): lost queries, answer codes, latency."""
    label = f"{n:,}-record zone: reload under dnsperf -Q {rate:,}"
    dnsperf = shutil.which("dnsperf")
    if dnsperf is None:
        return [(label, "skipped: no dnsperf (`make deb-tools`)")]
    qfile = path.parent.parent / "dnsperf-queries.txt"
    step = max(1, n // 5000)
    qfile.write_text("".join(f"h{i}.big.test. A\n" for i in range(0, n - 10, step)))
    text3 = big_zone(n, serial=3)
    seconds = int(took * 2) + 6  # the reload well inside the run, whatever this host's speed
    cmd = [dnsperf, "-s", "127.0.0.1", "-p", str(srv.port), "-d", str(qfile)]
    cmd += ["-l", str(seconds), "-Q", str(rate), "-c", "8", "-t", "2"]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1 and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpus[-1]), *cmd]
    perf = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2.0)
        t = time.monotonic()
        write_atomic(path, text3)
        wait_for(lambda: _serial(srv, "big.test.") == 3, 600, 0.05)
        took3 = time.monotonic() - t
        report, _ = perf.communicate(timeout=seconds + 60)
    finally:
        if perf.poll() is None:
            perf.kill()
            perf.wait()

    def grab(pattern: str) -> str:
        m = re.search(pattern, report)
        if m is None:
            raise RuntimeError(f"dnsperf output without {pattern!r}:\n{report[-2000:]}")
        return m.group(1)

    sent, lost = int(grab(r"Queries sent:\s+(\d+)")), grab(r"Queries lost:\s+(\d+)")
    codes = grab(r"Response codes:\s+(.*)").strip()
    mean = float(grab(r"Average Latency \(s\):\s+([\d.]+)"))
    worst = float(grab(r"Average Latency \(s\):.*max ([\d.]+)\)"))
    return [
        (
            label,
            f"reload {took3:.1f} s inside {seconds} s of load: {sent:,} sent, {lost} lost, "
            f"{codes}; latency mean {mean * 1e3:.1f} ms, max {worst * 1e3:.0f} ms",
        )
    ]


def big(args: argparse.Namespace, out: Path) -> list[tuple[str, str]]:
    n = args.big
    rows: list[tuple[str, str]] = []
    zones = out / "big" / "zones"
    if zones.exists():
        shutil.rmtree(zones.parent)
    zones.mkdir(parents=True)
    path = zones / "big.test.zone"
    path.write_text(big_zone(n))
    size_mb = path.stat().st_size / 1e6
    srv = Server(out / "big", zones)
    try:
        t0 = srv.start()
        t_ready = wait_for(srv.ready, 600, 0.05)
        assert srv.proc is not None
        rss = rss_mib(srv.proc.pid)
        peak = _peak_mib(srv.proc.pid)
        per_record = (rss - args.baseline_mib) * 2**20 / n
        rows.append(
            (
                f"{n:,}-record zone ({size_mb:.0f} MB): load, /readyz 200",
                f"{t_ready - t0:.1f} s",
            )
        )
        rows.append(
            (
                f"{n:,}-record zone: RSS when ready (peak)",
                f"{rss:.0f} MiB ({peak:.0f} MiB peak); above the 1-zone server: "
                f"{per_record:,.0f} B/record",
            )
        )
        names = [f"h{i}.big.test." for i in range(0, n - 10, 10)][:5000]
        names.append("www.big.test.")
        # made before the query loop starts: building 28 MB of text holds this process's
        # GIL for ~0.1 s, which the loop would count as the server's
        text2 = big_zone(n, serial=2)
        loop = QueryLoop(srv, names)
        loop.start()
        time.sleep(1.0)
        t = time.monotonic()
        write_atomic(path, text2)
        wait_for(lambda: _serial(srv, "big.test.") == 2, 600, 0.05)
        took = time.monotonic() - t
        time.sleep(0.5)
        qps, answered, failed = loop.finish()
        rows.append((f"{n:,}-record zone: reload (new serial) under queries", f"{took:.1f} s"))
        rows.append(
            (
                "queries during that reload",
                f"{answered:,} answered ({qps:,.0f} QPS), {failed} failed; {loop.latency()}",
            )
        )
        rows.append(
            (f"{n:,}-record zone: RSS after the reload", f"{rss_mib(srv.proc.pid):.0f} MiB")
        )
        if args.load:
            rows += reload_under_dnsperf(args.load, srv, path, n, took)
        # the zone cache is written by a background process after the load and the reload
        wait_for(lambda: srv.log.read_text().count("zones compiled for the next") >= 2, 300, 0.5)
    finally:
        srv.stop()
    srv = Server(out / "big", zones)
    try:
        t0 = srv.start()
        t_ready = wait_for(srv.ready, 600, 0.05)
        assert srv.proc is not None
        rows.append(
            (
                f"{n:,}-record zone: warm start (zone cache), /readyz 200",
                f"{t_ready - t0:.1f} s, RSS {rss_mib(srv.proc.pid):.0f} MiB "
                f"({_peak_mib(srv.proc.pid):.0f} MiB peak)",
            )
        )
    finally:
        srv.stop()
    return rows


def baseline(out: Path) -> float:
    """RSS of a server with one small zone: the interpreter, libraries, API, store."""
    zones = out / "one" / "zones"
    zones.mkdir(parents=True, exist_ok=True)
    write_small_zones(zones, 1)
    srv = Server(out / "one", zones)
    try:
        srv.start()
        wait_for(srv.ready, 60, 0.05)
        time.sleep(0.5)
        assert srv.proc is not None
        return rss_mib(srv.proc.pid)
    finally:
        srv.stop()


def _peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zones", type=int, default=100_000, help="small zones (0: skip)")
    ap.add_argument("--big", type=int, default=1_000_000, help="records of the big zone (0: skip)")
    ap.add_argument("--edits", type=int, default=20, help="single-zone edits to time")
    ap.add_argument("--reloads", type=int, default=200, help="reloads of one zone (memory)")
    ap.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--load", type=int, default=20_000, help="dnsperf -Q during a second big reload (0: skip)"
    )
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="geodns-zs-"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    try:
        args.baseline_mib = baseline(out)
        rows.append(("server with 1 zone: RSS (baseline)", f"{args.baseline_mib:.0f} MiB"))
        if args.zones:
            rows += small_zones(args, out)
        if args.big:
            rows += big(args, out)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
