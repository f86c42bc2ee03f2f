"""Start a real geodns server for tests: in a thread (own event loop) or as a process.

Tests talk to it over real sockets on loopback ports chosen by the OS.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import dns.message
import dns.query

from geodns.app import App
from geodns.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

# The sites and pool of the shipped geodns.toml (uk and fra with IPv6, iad IPv4 only).
EXAMPLE_SITES = """
[sites.uk]
ipv4 = ["198.51.100.10", "198.51.100.11"]
ipv6 = ["2001:db8:10::10"]
city = "London"
country = "GB"
[sites.fra]
ipv4 = ["198.51.100.20"]
ipv6 = ["2001:db8:20::20"]
city = "Frankfurt am Main"
country = "DE"
[sites.iad]
ipv4 = ["198.51.100.30"]
lat = 39.04
lon = -77.49
[pools.web]
members = ["uk", "fra", "iad"]
"""


def write_config(directory: Path, body: str = "", zones: str = "zones") -> Path:
    """Write a geodns.toml into `directory`; `body` is extra TOML (sites, pools, ...)."""
    path = directory / "geodns.toml"
    text = textwrap.dedent(
        f"""
        [zones]
        directory = "{zones}"
        [store]
        database_url = "sqlite:///{directory}/state.sqlite3"
        journal_dir = "{directory}/journal"
        """
    )
    body = textwrap.dedent(body)
    if "[api]" not in body:
        # tests never take the default 127.0.0.1:8053: an OS-chosen port instead
        text += '[api]\nlisten = "127.0.0.1:0"\n'
    path.write_text(text + body)
    return path


@dataclass
class Running:
    app: App
    host: str
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    def query(
        self, qname: str, qtype: str = "A", tcp: bool = False, **kw: object
    ) -> dns.message.Message:
        """Send one query (dnspython message kwargs: use_edns, payload, options, ...)."""
        q = dns.message.make_query(qname, qtype, **kw)  # type: ignore[arg-type]
        q.flags &= ~dns.flags.RD
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=5)
        return dns.query.udp(q, self.host, port=self.port, timeout=5)

    def call(self, coro):  # type: ignore[no-untyped-def]
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@contextmanager
def run_server(
    config: Config,
    listen: list[str] | None = None,
    run_checker: bool = True,
    workers: int | None = None,
) -> Iterator[Running]:
    """Serve `config` on 127.0.0.1 (port 0) in a background thread until the block ends."""
    loop = asyncio.new_event_loop()
    app_box: list[App] = []
    started = threading.Event()
    error: list[BaseException] = []

    async def main() -> None:
        app = App(
            config, listen=listen or ["127.0.0.1:0"], run_checker=run_checker, workers=workers
        )
        app_box.append(app)
        try:
            await app.start()
        except BaseException as exc:
            error.append(exc)
            started.set()
            return
        started.set()
        await app.stopping.wait()
        await app.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60), "server did not start"
    if error:
        raise error[0]
    app = app_box[0]
    host, port = app.dns_addresses[0]
    try:
        yield Running(app, host, port, loop)
    finally:
        loop.call_soon_threadsafe(app.stopping.set)
        thread.join(10)
        loop.close()


def make_zone_dir(directory: Path, files: dict[str, str]) -> Path:
    """Write zone files (name -> text) into directory/zones."""
    zones = directory / "zones"
    zones.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (zones / name).write_text(textwrap.dedent(text).lstrip())
    return zones


@contextmanager
def serve_files(
    tmp: Path, files: dict[str, str], config_body: str = "", listen: list[str] | None = None
) -> Iterator[Running]:
    """Zone files + config into tmp, then a running server for them."""
    make_zone_dir(tmp, files)
    cfg = load_config(write_config(tmp, config_body))
    with run_server(cfg, listen) as running:
        yield running


def _drain(stream: IO[str]) -> None:
    with open(os.devnull, "w") as sink:
        shutil.copyfileobj(stream, sink)


@dataclass
class Proc:
    proc: subprocess.Popen[str]
    host: str
    port: int


@contextmanager
def run_process(config_path: Path, extra: list[str] | None = None) -> Iterator[Proc]:
    """`python -m geodns serve` as a child process on an OS-chosen port."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "geodns",
        "--config",
        str(config_path),
        "serve",
        "--listen",
        "127.0.0.1:0",
        *(extra or []),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    port = 0
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            m = re.search(r"serving DNS on 127\.0\.0\.1 port (\d+)", line)
            if m:
                port = int(m.group(1))
            if " ready: " in line:
                break
        assert port, "server did not report its port"
        # keep draining stderr so the child never blocks on a full pipe
        stderr = proc.stderr
        threading.Thread(target=lambda: _drain(stderr), daemon=True).start()
        yield Proc(proc, "127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class TcpTarget:
    """A TCP listener on loopback that a test can take down and bring back.

    It accepts and closes every connection (in a thread), so that checks every 50 ms
    never fill the listen backlog however long a test runs.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.port = 0
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.05)
        self.port = s.getsockname()[1]
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while self.sock is s:
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def down(self) -> None:
        s, self.sock = self.sock, None
        if s is not None:
            s.close()


def tcp_check(site: str, target: TcpTarget, settings: str = "") -> str:
    """A [sites.NAME.check] table that probes a loopback TcpTarget (+ extra settings)."""
    return (
        f'[sites.{site}.check]\nkind = "tcp"\ntarget = "127.0.0.1"\n'
        f"port = {target.port}\n{settings}"
    )


def wait_for(pred: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> float:
    """Poll until pred() holds (bounded; never a fixed sleep); returns when it first held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"not reached in {timeout_s} s: {what or pred}")
