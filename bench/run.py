#!/usr/bin/env python3
"""geodns next to gdnsd 3.8.1 on loopback, measured with dnsperf (issue 9).

Installs nothing. Needs `dnsperf` and `gdnsd` (Debian: `make deb-tools`, or
`apt-get install dnsperf gdnsd`) and the project venv with the dev extras (mmdb-writer
writes the GeoIP test database: `make install`). Run it from the venv:

    .venv/bin/python bench/run.py            # every row, ~6 minutes
    .venv/bin/python bench/run.py --quick    # 3 s runs, ~2 minutes
    .venv/bin/python bench/run.py --only gdnsd --only geodns --duration 20

What it does: builds into a temp dir one zone (example.com, `www` geo-steered among the
sites uk / fra / iad by distance) and one City-schema GeoIP database that BOTH servers
read; starts each server on a loopback port pinned to CPU 0 (dnsperf on CPU 1); checks
that both give the same geo answers; warms up; runs dnsperf closed-loop and at fixed
rates with ECS on every query; reads the server's CPU time (utime+stime of the process
and its children) from /proc before and after each run; stops everything it started by
PID (also on Ctrl-C); prints a Markdown table with the ratio to gdnsd for each row.

Rows (a row that needs a flag or config section the installed geodns lacks is skipped
with a note):
  gdnsd            gdnsd 3.8.1, geoip plugin in city-auto mode (the reference)
  geodns           `geodns serve`, RRL off (the packet-cache hit path: the mix repeats)
  geodns-rrl       the same with [rrl] on at its defaults (which exempt 127.0.0.0/8)
  geodns-rrl-counted  [rrl] on, nothing exempt, a rate never reached: what the
                   limiter's accounting costs per response
  geodns-full      `geodns serve --no-packet-cache`: every query through the fast path
                   (pre-rendered answers, geo decision per client network)
  geodns-nofast    --no-packet-cache and [server] fast_path = false: decode, resolve,
                   pick, encode each time
  geodns-asyncio   as geodns, with [server] udp_batch = false: asyncio's datagram
                   transport (one recvmsg/sendmsg and one callback per datagram)
  geodns-loop      as geodns, with [server] udp_thread = false: the batches read by the
                   event loop's reader instead of a receive thread
  geodns-workers1  `--workers 1`, closed loop and the first fixed rate
  geodns-workers2  `--workers 2` (the workers share each UDP socket, one receiving at a
                   time), closed loop and the first fixed rate; both workers share CPU 0
  geodns-workers2-reuseport  `--workers 2` with [server] worker_udp_shared = false: a
                   SO_REUSEPORT socket per worker
  gdnsd-flood, geodns-flood  the first fixed rate with half the queries for names
                   asked once (random subdomains, NXDOMAIN), the other half the mix:
                   what a random-subdomain flood costs, and its worst latency
  gdnsd-tcp, geodns-tcp  the mix over TCP (dnsperf -m tcp: --clients connections, each
                   with queries pipelined, RFC 7766 §6.2.1.1), closed loop and the first
                   fixed rate; gdnsd with its one TCP thread
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# One GeoIP test database for both servers: the ECS network of the mix plus one network
# per site, used by the answer check before the benchmark.
SITES = {  # name: (IPv4 address answered, latitude, longitude)
    "uk": ("198.51.100.10", 51.51, -0.13),
    "fra": ("198.51.100.20", 50.11, 8.68),
    "iad": ("198.51.100.30", 39.04, -77.49),
}
GEO_NETWORKS = [  # (network, country, continent, lat, lon, site expected)
    ("81.2.69.0/24", "GB", "EU", 51.5, -0.13, "uk"),  # London: the ECS of the mix
    ("81.169.145.0/24", "DE", "EU", 52.52, 13.40, "fra"),  # Berlin
    ("8.8.8.0/24", "US", "NA", 38.9, -77.0, "iad"),  # Washington
]
DEFAULT_ECS = "81.2.69.0/24"

ZONE_COMMON = """\
$ORIGIN example.com.
$TTL 300
@    IN SOA ns1.example.com. hostmaster.example.com. 2026112501 7200 3600 1209600 300
@    IN NS  ns1.example.com.
@    IN NS  ns2.example.com.
ns1  IN A   127.0.0.1
ns2  IN A   127.0.0.2
"""

# The query mix: 80 % geo `www` A, 10 % SOA, 10 % NXDOMAIN (dnsperf cycles the file).
MIX = (
    ["www.example.com A"] * 4
    + ["example.com SOA"]
    + ["www.example.com A"] * 4
    + ["nx1.example.com A"]
    + ["www.example.com A"] * 4
    + ["example.com SOA"]
    + ["www.example.com A"] * 4
    + ["nx2.example.com A"]
)

ROWS = [
    "gdnsd",
    "geodns",
    "geodns-rrl",
    "geodns-rrl-counted",
    "geodns-full",
    "geodns-nofast",
    "geodns-asyncio",
    "geodns-loop",
    "geodns-workers1",
    "geodns-workers2",
    "geodns-workers2-reuseport",
    "gdnsd-flood",
    "geodns-flood",
    "gdnsd-tcp",
    "geodns-tcp",
]
FLOOD = "-flood"  # rows on the flood mix (compared with gdnsd-flood)
TCP = "-tcp"  # rows over TCP (dnsperf -m tcp; compared with gdnsd-tcp)
FLOOD_LINES = 600_000  # dnsperf lines: no name asked twice within a 10 s run at 40k
CLOSED = 0  # rate 0 = closed loop
# rows that switch one [server] key off: config name -> the key
SWITCHES = {
    "nofast": "fast_path",
    "asyncio": "udp_batch",
    "loop": "udp_thread",
    "reuseport": "worker_udp_shared",
}


def flood_mix(lines: int) -> str:
    """dnsperf input: every other query for a name asked once (a random subdomain of
    example.com: NXDOMAIN), the others the mix; the same names in every run."""
    rnd = random.Random(9)
    out = []
    for i in range(lines):
        out.append(
            f"r{rnd.getrandbits(48):012x}.example.com A" if i % 2 else MIX[i // 2 % len(MIX)]
        )
    return "\n".join(out) + "\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes: started by us, stopped by PID ----------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids.extend(int(x) for x in (task / "children").read_text().split())
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _stat_fields(p) is None:
            continue
        out.append(p)
        todo.extend(_children(p))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime (all threads) of pid and its live descendants, in seconds."""
    ticks = 0
    for p in process_tree(pid):
        f = _stat_fields(p)
        if f is not None:
            ticks += int(f[11]) + int(f[12])  # fields 14, 15: utime, stime
    return ticks / CLK_TCK


def cpu_busy(cpus: list[int]) -> float:
    """Busy seconds (all but idle and iowait) of these CPUs, from /proc/stat."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in vals[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / CLK_TCK


def wait_idle(args: argparse.Namespace) -> None:
    """Up to --wait-idle seconds for the benchmark's CPUs to be >= 85 % idle for 1 s."""
    cpus = sorted(cpu_list(args.server_cpu) | cpu_list(args.client_cpu))
    deadline = time.monotonic() + args.wait_idle
    while True:
        b0, t0 = cpu_busy(cpus), time.monotonic()
        time.sleep(1.0)
        busy = (cpu_busy(cpus) - b0) / (time.monotonic() - t0) / len(cpus)
        if busy <= 0.15 or time.monotonic() >= deadline:
            return
        log(f"waiting for idle CPUs ({busy:.0%} busy)")


def _children_cpu() -> float:
    """CPU seconds of our waited-for children (dnsperf runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _start_time(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[19] if f is not None else None  # field 22: starttime (tells a reused PID)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    known: dict[int, str | None] = field(default_factory=dict)  # pid -> start time

    @property
    def pid(self) -> int:
        return self.proc.pid

    def remember_tree(self) -> None:
        for p in process_tree(self.pid):
            self.known.setdefault(p, _start_time(p))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL; then any descendant we saw that is still there."""
        if self.alive():
            self.remember_tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit 10 s after SIGTERM, killing pid {self.pid}")
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in self.known.items():
            if pid != self.pid and started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Started:
    """Everything this script started, stopped in reverse order on the way out."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.clients: list[subprocess.Popen[bytes]] = []

    def stop_all(self) -> None:
        for c in self.clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        self.clients.clear()
        while self.servers:
            self.servers.pop().stop()


STARTED = Started()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- the test data: zone, GeoIP database, configs --------------------------------------


def ecs_hex(network: str) -> str:
    """dnsperf -E 8:<hex>: FAMILY, SOURCE PREFIX, SCOPE 0, the address's prefix octets."""
    net = ipaddress.ip_network(network)
    family = 1 if net.version == 4 else 2
    nbytes = (net.prefixlen + 7) // 8
    body = struct.pack("!HBB", family, net.prefixlen, 0) + net.network_address.packed[:nbytes]
    return body.hex()


def write_mmdb(path: Path) -> None:
    sys.path.insert(0, str(REPO))
    try:
        from tests.mmdb_util import city_record, write_test_mmdb
    except ImportError as exc:
        sys.exit(
            f"cannot write the GeoIP test database ({exc}): run this with the project venv "
            "and its dev extras (`make install`, then `.venv/bin/python bench/run.py`)"
        )
    entries = [
        (net, city_record(cc, cont, lat, lon)) for net, cc, cont, lat, lon, _ in GEO_NETWORKS
    ]
    write_test_mmdb(path, entries)


def write_gdnsd(root: Path, port: int, mmdb: Path) -> Path:
    d = root / "gdnsd"
    (d / "zones").mkdir(parents=True)
    (d / "geoip").mkdir()
    shutil.copy(mmdb, d / "geoip" / "bench.mmdb")
    coords = ", ".join(f"{n} => [{lat}, {lon}]" for n, (_, lat, lon) in SITES.items())
    dcmap = ", ".join(f"{n} => {addr}" for n, (addr, _, _) in SITES.items())
    (d / "config").write_text(
        textwrap.dedent(
            f"""\
            options => {{
              listen => [ "127.0.0.1:{port}" ]
              run_dir => {d}/run
              state_dir => {d}/state
              udp_threads => 1   # one CPU: one UDP thread, like geodns's one loop
              tcp_threads => 1
            }}
            plugins => {{ geoip => {{
              maps => {{
                prod => {{
                  geoip2_db => bench.mmdb
                  datacenters => [{", ".join(SITES)}]
                  auto_dc_coords => {{ {coords} }}
                  auto_dc_limit => 3
                }}
              }}
              resources => {{
                prod_www => {{ map => prod, dcmap => {{ {dcmap} }} }}
              }}
            }}}}
            """
        )
    )
    (d / "zones" / "example.com").write_text(ZONE_COMMON + "www  60 DYNA geoip!prod_www\n")
    return d


def write_geodns(
    root: Path, name: str, mmdb: Path, rrl: dict[str, object] | None, server: str = ""
) -> Path:
    """A geodns config dir root/name; `rrl` None: no [rrl] section, else its keys;
    `server`: more [server] lines."""
    d = root / name
    (d / "zones").mkdir(parents=True)
    sites = "".join(
        f'[sites.{n}]\nipv4 = ["{addr}"]\nlat = {lat}\nlon = {lon}\n\n'
        for n, (addr, lat, lon) in SITES.items()
    )
    rrl_text = ""
    if rrl is not None:
        rrl_text = "[rrl]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in rrl.items()) + "\n"
    (d / "geodns.toml").write_text(
        textwrap.dedent(
            f"""\
            [server]
            listen = ["127.0.0.1:0"]   # --listen on the command line
            {server}
            [zones]
            directory = "zones"
            [api]
            listen = ""
            token_file = "state/api-token"
            [store]
            database_url = "sqlite:///{d}/state/geodns.sqlite3"
            journal_dir = "state/journal"
            [geoip]
            database = "{mmdb}"
            state_dir = "state/geoip"
            reload_interval_s = 0

            """
        )
        + rrl_text
        + sites
        + '[pools.web]\nmembers = ["uk", "fra", "iad"]\nfallback = "nearest"\n'
    )
    (d / "state").mkdir()
    (d / "zones" / "example.com.zone").write_text(ZONE_COMMON + "www  60 IN A 192.0.2.80\n")
    (d / "zones" / "example.com.geo.toml").write_text(
        '[names.www]\npool = "web"\ntypes = ["A"]\nttl_s = 60\ncount = 1\n'
    )
    return d / "geodns.toml"


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


# -- what the installed geodns can do --------------------------------------------------


@dataclass
class Features:
    no_packet_cache: bool
    workers: bool
    rrl: list[str] | None  # the keys of [rrl], None when geodns has no such section
    server: list[str] = field(default_factory=list)  # the keys of [server]

    def rrl_config(self, mode: str) -> dict[str, object] | None:
        """[rrl] keys for `off` (every row but the RRL ones), `default`, `counted`."""
        if self.rrl is None:
            return None
        on = "enabled" in self.rrl
        if mode == "off":
            return {"enabled": False} if on else {}
        if mode == "default":
            return {"enabled": True} if on else {}
        # counted: every response goes through the limiter's accounting, none is limited
        return {"enabled": True, "exempt": [], "responses_per_s": 1e9}

    @property
    def rrl_counted(self) -> bool:
        return self.rrl is not None and {"enabled", "exempt", "responses_per_s"} <= set(self.rrl)


def detect_features(root: Path, mmdb: Path) -> Features:
    """Flags from `geodns serve --help`; [rrl] if `geodns check` accepts the section."""
    out = subprocess.run(
        [sys.executable, "-m", "geodns", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rrl = None
    probe = write_geodns(root, "probe", mmdb, {})  # an empty [rrl] section
    check = [sys.executable, "-m", "geodns", "--config", str(probe), "check"]
    if subprocess.run(check, capture_output=True, check=False).returncode == 0:
        try:
            from geodns import config as gconfig  # only to read the section's key names

            cls = getattr(gconfig, "_SECTIONS", {}).get("rrl")
            rrl = list(getattr(cls, "__dataclass_fields__", {}))
        except Exception:
            rrl = []
    server: list[str] = []
    try:
        from geodns import config as gconfig

        cls = getattr(gconfig, "_SECTIONS", {}).get("server")
        server = list(getattr(cls, "__dataclass_fields__", {}))
    except Exception:
        pass
    return Features("--no-packet-cache" in out, "--workers" in out, rrl, server)


# -- DNS over UDP, enough for readiness and the answer check ---------------------------


def _query(qname: str, qtype: int, ecs: str | None, qid: int) -> bytes:
    """The bytes dnsperf 2.10 sends for `-E 8:<ecs>`: RD, EDNS payload 4096, DO clear."""
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    for label in qname.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack("!HH", qtype, 1)
    opt = b""
    if ecs:
        body = bytes.fromhex(ecs_hex(ecs))
        opt = struct.pack("!HH", 8, len(body)) + body
    return q + b"\0" + struct.pack("!HHIH", 41, 4096, 0, len(opt)) + opt


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        n = msg[i]
        if n >= 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += n + 1


def ask(port: int, qname: str, qtype: int, ecs: str | None = None) -> tuple[int, list[str]]:
    """(rcode, IPv4 addresses in the answer section); raises OSError on no answer."""
    qid = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(_query(qname, qtype, ecs, qid), ("127.0.0.1", port))
        msg = s.recv(4096)
    (rid, flags, qd, an) = struct.unpack("!HHHH", msg[:8])
    if rid != qid:
        raise OSError("reply ID mismatch")
    i = 12
    for _ in range(qd):
        i = _skip_name(msg, i) + 4
    addrs = []
    for _ in range(an):
        i = _skip_name(msg, i)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[i : i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(msg[i : i + 4]))
        i += rdlen
    return flags & 0xF, addrs


def wait_ready(server: Server, timeout: float = 30) -> None:
    """Until 10 queries in a row (each from a new source port) are answered.

    New source ports spread the queries over SO_REUSEPORT sockets, so with --workers
    every worker is likely serving before the benchmark starts.
    """
    deadline = time.monotonic() + timeout
    ok = 0
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited at start; see {server.log_path}:\n{_tail(server)}"
            )
        try:
            ok = ok + 1 if ask(server.port, "example.com", 6)[0] == 0 else 0
        except OSError:
            ok = 0
        if ok >= 10:
            return
        time.sleep(0.05 if ok else 0.1)
    raise RuntimeError(f"{server.name} not answering after {timeout} s; see {server.log_path}")


def _tail(server: Server) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(server.log_path.read_text().splitlines()[-15:])
    return ""


def check_answers(server: Server) -> list[str]:
    """Both servers must steer alike: one answer per GeoIP network, SOA, NXDOMAIN."""
    problems = []
    for net, _cc, _cont, _lat, _lon, site in GEO_NETWORKS:
        want = SITES[site][0]
        rcode, addrs = ask(server.port, "www.example.com", 1, net)
        if rcode != 0 or addrs != [want]:
            problems.append(f"www A ECS {net}: rcode {rcode} {addrs}, want [{want}] ({site})")
    rcode, _ = ask(server.port, "example.com", 6, DEFAULT_ECS)
    if rcode != 0:
        problems.append(f"SOA: rcode {rcode}")
    rcode, _ = ask(server.port, "nx1.example.com", 1, DEFAULT_ECS)
    if rcode != 3:
        problems.append(f"nx1 A: rcode {rcode}, want NXDOMAIN")
    return problems


# -- running the servers and dnsperf ---------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def cpu_list(text: str) -> set[int]:
    """taskset's CPU list syntax: '0', '0,2', '0-3'."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus is not None else []


def start_server(name: str, argv: list[str], port: int, logdir: Path, cpu: str | None) -> Server:
    log_path = logdir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            pin(cpu) + argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop it by PID
        )
    server = Server(name, proc, port, log_path)
    STARTED.servers.append(server)
    wait_ready(server)
    server.remember_tree()
    return server


@dataclass
class Run:
    row: str
    rate: int  # 0: closed loop
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost: int = 0
    cpu_us: float = 0.0
    cpu_share: float = 0.0  # server CPU seconds / wall seconds
    others: float = 0.0  # CPU share of everything else on the two CPUs (noise)
    lat_mean_ms: float = 0.0
    lat_max_ms: float = 0.0
    rcodes: str = ""
    note: str = ""


_NUM = r"([0-9.]+)"


def dnsperf(
    server: Server,
    queries: Path,
    ecs: str,
    duration: float,
    rate: int,
    args: argparse.Namespace,
    tcp: bool = False,
) -> Run:
    argv = [
        *pin(args.client_cpu),
        args.dnsperf,
        "-s",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-d",
        str(queries),
        "-l",
        f"{duration:g}",
        "-c",
        str(args.clients),
        "-T",
        str(args.threads),
        "-q",
        str(args.outstanding),
        "-t",
        "2",
        "-E",
        f"8:{ecs_hex(ecs)}",
    ]
    if rate:
        argv += ["-Q", str(rate)]
    if tcp:
        argv += ["-m", "tcp"]
    server.remember_tree()
    cpus = sorted(
        cpu_list(args.server_cpu) | cpu_list(args.client_cpu) if args.server_cpu is not None else []
    )
    busy0, kids0 = cpu_busy(cpus), _children_cpu()
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    STARTED.clients.append(proc)
    out, _ = proc.communicate()
    STARTED.clients.remove(proc)
    wall, cpu1 = time.monotonic() - t0, cpu_seconds(server.pid)
    busy1, kids1 = cpu_busy(cpus), _children_cpu()
    text = out.decode(errors="replace")
    run = Run(server.name, rate)

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    if proc.returncode != 0 or grab(r"Queries sent:\s+(\d+)") is None:
        raise RuntimeError(f"dnsperf failed ({proc.returncode}):\n{text}")
    run.sent = int(grab(r"Queries sent:\s+(\d+)") or 0)
    run.completed = int(grab(r"Queries completed:\s+(\d+)") or 0)
    run.lost = int(grab(r"Queries lost:\s+(\d+)") or 0)
    run.qps = float(grab(r"Queries per second:\s+" + _NUM) or 0)
    lat = re.search(r"Average Latency \(s\):\s+" + _NUM + r".*max " + _NUM, text)
    if lat:
        run.lat_mean_ms, run.lat_max_ms = float(lat.group(1)) * 1e3, float(lat.group(2)) * 1e3
    run.rcodes = (grab(r"Response codes:\s+(.*)") or "").strip()
    cpu = cpu1 - cpu0
    run.cpu_us = cpu / run.completed * 1e6 if run.completed else 0.0
    run.cpu_share = cpu / wall if wall else 0.0
    if cpus and wall:
        run.others = max(0.0, (busy1 - busy0) - cpu - (kids1 - kids0)) / wall
    return run


# -- the benchmark ---------------------------------------------------------------------


@dataclass
class Plan:
    row: str
    argv: list[str]
    rates: list[int]
    what: str
    skip: str = ""


def plans(args: argparse.Namespace, feat: Features, cfgs: dict[str, Path]) -> list[Plan]:
    def geodns(cfg: str, *flags: str) -> list[str]:
        return [sys.executable, "-m", "geodns", "--config", str(cfgs.get(cfg, "")), "serve", *flags]

    all_rates = [CLOSED, *args.rates]
    out = [
        Plan("gdnsd", [], all_rates, "gdnsd 3.8.1, geoip plugin (city-auto), 1 UDP thread"),
        Plan("geodns", geodns("base"), all_rates, "geodns serve (packet-cache hit path), RRL off"),
        Plan("geodns-rrl", geodns("rrl"), all_rates, "[rrl] on at its defaults"),
        Plan("geodns-rrl-counted", geodns("rrl-counted"), [CLOSED, args.rates[0]], ""),
        Plan("geodns-full", geodns("base", "--no-packet-cache"), all_rates, "--no-packet-cache"),
    ]
    for row, cfg, flags, what in (
        ("geodns-nofast", "nofast", ["--no-packet-cache"], "--no-packet-cache, fast_path off"),
        ("geodns-asyncio", "asyncio", [], "[server] udp_batch = false"),
        ("geodns-loop", "loop", [], "[server] udp_thread = false"),
    ):
        plan = Plan(row, geodns(cfg, *flags), all_rates, what)
        if cfg not in cfgs:
            plan.skip = f"geodns has no [server] {SWITCHES[cfg]}"
        out.append(plan)
    out[3].what = "[rrl] on, exempt = [], responses_per_s = 1e9: accounting, never limiting"
    if feat.rrl is None:
        out[2].skip = out[3].skip = "geodns has no [rrl] config section yet"
    elif not feat.rrl_counted:
        out[3].skip = "[rrl] has no enabled / exempt / responses_per_s keys"
    if not feat.no_packet_cache:
        out[4].skip = "`geodns serve` has no --no-packet-cache flag yet"
    out.append(Plan("gdnsd-flood", [], [args.rates[0]], "gdnsd, the flood mix"))
    out.append(Plan("geodns-flood", geodns("base"), [args.rates[0]], "geodns, the flood mix"))
    tcp_rates = [CLOSED, args.rates[0]]
    out.append(Plan("gdnsd-tcp", [], tcp_rates, "gdnsd, the mix over TCP (1 TCP thread)"))
    out.append(Plan("geodns-tcp", geodns("base"), tcp_rates, "geodns, the mix over TCP"))
    for row, cfg, n, what in (
        ("geodns-workers1", "base", 1, "--workers 1"),
        ("geodns-workers2", "base", 2, "--workers 2 (shared UDP sockets), both on the server CPU"),
        ("geodns-workers2-reuseport", "reuseport", 2, "--workers 2, a SO_REUSEPORT socket each"),
    ):
        w = Plan(row, geodns(cfg, "--workers", str(n)), [CLOSED, args.rates[0]], what)
        if not feat.workers:
            w.skip = "`geodns serve` has no --workers flag yet"
        elif cfg not in cfgs:
            w.skip = f"geodns has no [server] {SWITCHES[cfg]}"
        out.append(w)
    return [p for p in out if not args.only or p.row in args.only]


def run_plan(
    plan: Plan, args: argparse.Namespace, root: Path, queries: Path, gdnsd_dir: Path
) -> tuple[list[Run], list[str]]:
    notes: list[str] = []
    port = free_port()
    if plan.row.startswith("gdnsd"):
        argv = [args.gdnsd, "-c", str(gdnsd_dir), "start"]
        (gdnsd_dir / "config").write_text(
            re.sub(r'"127\.0\.0\.1:\d+"', f'"127.0.0.1:{port}"', (gdnsd_dir / "config").read_text())
        )
    else:
        argv = [*plan.argv, "--listen", f"127.0.0.1:{port}", "--log-level", "info"]
    log(f"{plan.row}: starting: {plan.what}")
    server = start_server(plan.row, argv, port, root, args.server_cpu)
    runs: list[Run] = []
    try:
        if not plan.row.startswith("gdnsd"):
            with contextlib.suppress(OSError):
                m = re.search(r"event loop: (\w+)", server.log_path.read_text())
                if m:
                    notes.append(f"{plan.row}: event loop {m.group(1)}")
        problems = check_answers(server)
        for p in problems:
            notes.append(f"{plan.row}: WRONG ANSWER {p}")
        log(f"{plan.row}: answers {'DIFFER: ' + '; '.join(problems) if problems else 'ok'}")
        # warm-up, not counted; a flood row warms up on the plain mix, so that its
        # measured run (dnsperf starts at the top of the file) asks each name once
        warm = queries.with_name("queries.txt") if plan.row.endswith(FLOOD) else queries
        tcp = plan.row.endswith(TCP)
        dnsperf(server, warm, args.ecs, args.warmup, CLOSED, args, tcp)
        for rate in plan.rates:
            if args.wait_idle:
                wait_idle(args)
            run = dnsperf(server, queries, args.ecs, args.duration, rate, args, tcp)
            log(
                f"{plan.row} {'closed' if not rate else f'-Q {rate}'}: {run.qps:,.0f} QPS, "
                f"{run.cpu_us:.1f} us CPU/query, lost {run.lost}, {run.rcodes}"
            )
            runs.append(run)
            if not server.alive():
                raise RuntimeError(f"{plan.row} died during the run:\n{_tail(server)}")
    finally:
        server.stop()
        STARTED.servers.remove(server)
    return runs, notes


def least_disturbed(runs: list[Run]) -> list[Run]:
    """Per (row, rate), in first-seen order, the run with the least other load."""
    best: dict[tuple[str, int], Run] = {}
    for r in runs:
        key = (r.row, r.rate)
        if key not in best or r.others < best[key].others:
            best[key] = r
    return list(best.values())


def table(runs: list[Run]) -> str:
    def kind(row: str) -> str:  # what a row is compared with: gdnsd on the same mix and transport
        return FLOOD if row.endswith(FLOOD) else TCP if row.endswith(TCP) else ""

    ref = {(kind(r.row), r.rate): r for r in runs if r.row.startswith("gdnsd")}
    lines = [
        "| row | load | QPS | CPU µs/query | server CPU | mean ms | max ms | lost | vs gdnsd "
        "| other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        g = ref.get((kind(r.row), r.rate))
        if g is None:
            ratio = "–"
        elif r.rate == CLOSED:
            ratio = f"{r.qps / g.qps:.2f}x QPS" if g.qps else "–"
        else:
            ratio = f"{r.cpu_us / g.cpu_us:.2f}x CPU" if g.cpu_us else "–"
        load = "closed loop" if r.rate == CLOSED else f"-Q {r.rate}"
        lines.append(
            f"| {r.row} | {load} | {r.qps:,.0f} | {r.cpu_us:.1f} | {r.cpu_share:.0%} | "
            f"{r.lat_mean_ms:.3f} | {r.lat_max_ms:.2f} | {r.lost} | {ratio} "
            f"| {r.others:.0%} |"
        )
    return "\n".join(lines)


def git_head() -> str:
    """`git describe` of the geodns checkout measured ("" outside a git checkout)."""
    return subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def _version(argv: list[str]) -> str:
    with contextlib.suppress(OSError):
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
        m = re.search(r"[Vv]ersion ([0-9][^\s,]*)", p.stdout + p.stderr)
        if m:
            return m.group(1)
    return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def find_tools(args: argparse.Namespace) -> None:
    missing = []
    args.dnsperf = shutil.which("dnsperf")
    args.gdnsd = shutil.which("gdnsd") or shutil.which("gdnsd", path="/usr/sbin:/usr/local/sbin")
    needs_gdnsd = not args.only or any(r.startswith("gdnsd") for r in args.only)
    if args.dnsperf is None:
        missing.append("dnsperf")
    if args.gdnsd is None and needs_gdnsd:
        missing.append("gdnsd")
    if shutil.which("taskset") is None:
        missing.append("util-linux (taskset)")
    if missing:
        sys.exit(
            f"missing: {', '.join(missing)}. This script installs nothing; get them with "
            "`make deb-tools` (Debian packages) or `sudo apt-get install dnsperf gdnsd`."
        )
    try:
        import geodns  # noqa: F401
    except ImportError:
        sys.exit("geodns is not importable: run with the project venv (.venv/bin/python)")


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="geodns-bench-"))
    try:
        yield root
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    p.add_argument("--only", action="append", choices=ROWS, help="run only this row (repeatable)")
    p.add_argument("--duration", type=float, help="seconds per dnsperf run (default 10)")
    p.add_argument("--rates", default="40000,2000", help="fixed rates, QPS (default 40000,2000)")
    p.add_argument("--clients", type=int, default=8, help="dnsperf -c (default 8)")
    p.add_argument(
        "--outstanding", type=int, default=100, help="dnsperf -q, in flight (default 100)"
    )
    p.add_argument("--ecs", default=DEFAULT_ECS, help=f"ECS on every query (default {DEFAULT_ECS})")
    p.add_argument("--server-cpu", default="0", help="CPU list for the server (default 0)")
    p.add_argument("--client-cpu", default="1", help="CPU list for dnsperf (default 1)")
    p.add_argument("--threads", type=int, default=1, help="dnsperf -T (default 1)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every row N times, interleaved, and report the least disturbed run\n"
        "(for a shared machine; e.g. --repeat 3 --duration 5)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each run wait up to S seconds for the two CPUs to be >= 85 %% idle",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = 1.0 if args.quick else 2.0
    args.rates = [int(x) for x in args.rates.split(",") if x]
    if not args.rates:
        p.error("--rates needs at least one rate")
    if args.only and "gdnsd" not in args.only:
        log("note: without the gdnsd row there is no ratio to gdnsd")
    find_tools(args)
    cpus = os.sched_getaffinity(0)
    try:
        mine, theirs = cpu_list(args.server_cpu), cpu_list(args.client_cpu)
    except ValueError:
        p.error("--server-cpu / --client-cpu: a CPU list like 0, 0,1 or 0-3")
    if not (mine | theirs) <= cpus or mine & theirs:
        log(f"warning: CPUs {sorted(cpus)} available; not pinning (server and dnsperf share)")
        args.server_cpu = args.client_cpu = None
        args.wait_idle = 0
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"warning: load average {load1:.2f}: other work on these CPUs skews the numbers")
    signal.signal(signal.SIGTERM, _on_sigterm)

    started = dt.datetime.now().astimezone()
    runs: list[Run] = []
    notes: list[str] = []
    try:
        with workdir(args.keep) as root:
            mmdb = root / "bench.mmdb"
            write_mmdb(mmdb)
            feat = detect_features(root, mmdb)
            cfgs = {
                "base": write_geodns(root, "geodns", mmdb, feat.rrl_config("off")),
                "rrl": write_geodns(root, "geodns-rrl", mmdb, feat.rrl_config("default")),
                "rrl-counted": write_geodns(
                    root, "geodns-rrl-counted", mmdb, feat.rrl_config("counted")
                ),
            }
            off = feat.rrl_config("off")
            for cfg, key in SWITCHES.items():
                if key in feat.server:
                    cfgs[cfg] = write_geodns(root, f"geodns-{cfg}", mmdb, off, f"{key} = false")
            gdnsd_dir = write_gdnsd(root, 0, mmdb)
            queries = root / "queries.txt"
            queries.write_text("\n".join(MIX) + "\n")
            flood = root / "flood.txt"
            flood.write_text(flood_mix(FLOOD_LINES))
            todo = plans(args, feat, cfgs)
            for plan in todo:
                if plan.skip:
                    notes.append(f"{plan.row}: skipped, {plan.skip}")
                    log(f"{plan.row}: skipped ({plan.skip})")
            todo = [plan for plan in todo if not plan.skip]
            every: list[Run] = []
            for rnd in range(args.repeat):
                if args.repeat > 1:
                    log(f"-- round {rnd + 1} of {args.repeat}")
                for plan in todo:
                    try:
                        mix = flood if plan.row.endswith(FLOOD) else queries
                        got, extra = run_plan(plan, args, root, mix, gdnsd_dir)
                    except RuntimeError as exc:
                        notes.append(f"{plan.row}: FAILED, {str(exc).splitlines()[0]}")
                        log(f"{plan.row}: FAILED: {exc}")
                        continue
                    every.extend(got)
                    notes.extend(n for n in extra if n not in notes)
            runs = least_disturbed(every)
            if args.repeat > 1:
                notes.append(
                    f"each row ran {args.repeat} times (rounds interleaved); the table shows "
                    "the run with the least other load on the two CPUs"
                )
    except KeyboardInterrupt:
        log("interrupted: stopping what was started")
        return 130
    finally:
        STARTED.stop_all()

    head = git_head()
    print(
        f"geodns {head or '?'} vs gdnsd, {started:%Y-%m-%d %H:%M %Z}: "
        f"{os.cpu_count()} vCPU {_cpu_model()}, "
        f"Python {platform.python_version()}, gdnsd "
        f"{_version([args.gdnsd, '-c', '/nonexistent', 'x']) if args.gdnsd else '-'}, "
        f"dnsperf {_version([args.dnsperf, '-h'])}; server on CPU {args.server_cpu}, dnsperf "
        f"on CPU {args.client_cpu}; {args.duration:g} s runs, dnsperf -c {args.clients} "
        f"-q {args.outstanding}, ECS {args.ecs} on every query; mix 80 % www A (geo), "
        f"10 % SOA, 10 % NXDOMAIN; load average at start {load1:.2f}.\n"
    )
    print(table(runs))
    noisy = [r for r in runs if r.others > 0.2]
    if noisy:
        worst = max(r.others for r in noisy)
        notes.append(
            f"NOISY: other processes used up to {worst:.0%} of the two CPUs during "
            f"{len(noisy)} run(s) (column 'other load', out of 200 %); rerun on an idle machine"
        )
    if notes:
        print()
        for n in notes:
            print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
