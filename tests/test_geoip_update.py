"""`geodns geoip update` against a local HTTP server, and a running server following it.

The HTTP server (aiohttp, 127.0.0.1, OS-chosen port) serves small test databases plain,
gzipped and as tar.gz, a 404, and garbage. A real DNS server then switches answers when
the database is replaced, without a restart: `App.reload_geoip()` is what the timer
(`[geoip] reload_interval_s`) and SIGHUP call.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import dns.edns
import pytest
from aiohttp import web

from geodns import geoip_update
from geodns.cli import main
from geodns.config import GeoipConfig, load_config
from geodns.errors import ConfigError
from geodns.geoip_update import UpdateError, active_database, default_urls, update
from tests.mmdb_util import DEFAULT_ENTRIES, Record, city_record, write_test_mmdb
from tests.serverutil import Running, make_zone_dir, run_server, write_config

GB = city_record("GB", "EU", 51.5, -0.13)
DE = city_record("DE", "EU", 52.52, 13.40)
AU = city_record("AU", "OC", -33.87, 151.21)
CLIENT = "45.0.0.0/24"  # public, not special-purpose; mapped differently by each database


def mmdb_bytes(tmp: Path, name: str, client_record: Record | None) -> bytes:
    """The default test database plus CLIENT -> `client_record`, as bytes."""
    entries = list(DEFAULT_ENTRIES)
    if client_record is not None:
        entries.append((CLIENT, client_record))
    return write_test_mmdb(tmp / name, entries).read_bytes()


def targz(name: str, data: bytes) -> bytes:
    """A .tar.gz with one file, laid out like MaxMind's GeoLite2 downloads."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, body in ((f"{name}/COPYRIGHT.txt", b"test\n"), (f"{name}/{name}.mmdb", data)):
            info = tarfile.TarInfo(member)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@dataclass
class FileServer:
    """What the local HTTP server serves: path -> (body, Content-Type); else 404."""

    port: int = 0
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def put(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.files[path] = (body, content_type)
        return self.url(path)


@pytest.fixture(scope="module")
def http() -> Iterator[FileServer]:
    served = FileServer()

    async def handle(request: web.Request) -> web.Response:
        served.requests.append(request.path)
        entry = served.files.get(request.path.lstrip("/"))
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(body=entry[0], content_type=entry[1])

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    served.port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("mmdb")
    return {
        "gb": mmdb_bytes(tmp, "gb.mmdb", GB),
        "de": mmdb_bytes(tmp, "de.mmdb", DE),
        "au": mmdb_bytes(tmp, "au.mmdb", AU),
        # opens, but places neither sample address
        "no-samples": write_test_mmdb(tmp / "few.mmdb", [("212.58.224.0/24", GB)]).read_bytes(),
    }


def geoip_config(tmp: Path) -> GeoipConfig:
    return GeoipConfig(database=str(tmp / "shipped.mmdb"), state_dir=str(tmp / "state"))


def leftovers(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if p.name != "current.mmdb")


# -- geoip update ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "pack", "unpacked"),
    [
        ("dbip-city-lite-2026-06.mmdb", "application/octet-stream", None, ""),
        ("dbip-city-lite-2026-06.mmdb.gz", "application/octet-stream", gzip.compress, "gzip"),
        ("GeoLite2-City_20260601.tar.gz", "application/gzip", "tar", "gzip+tar"),
        # MaxMind's permalink: the name says nothing, the Content-Type says gzip
        ("geoip/databases/GeoLite2-City/download", "application/gzip", "tar", "gzip+tar"),
    ],
    ids=["mmdb", "mmdb.gz", "tar.gz", "content-type-gzip"],
)
def test_update_installs_verified_database(
    http: FileServer,
    databases: dict[str, bytes],
    tmp_path: Path,
    path: str,
    content_type: str,
    pack: Callable[[bytes], bytes] | str | None,
    unpacked: str,
) -> None:
    data = databases["de"]
    body = targz("GeoLite2-City", data) if pack == "tar" else pack(data) if callable(pack) else data
    cfg = geoip_config(tmp_path)
    result = update(cfg, http.put(path, body, content_type))
    target = Path(cfg.state_dir) / "current.mmdb"
    assert result.path == target and target.read_bytes() == data
    assert (result.downloaded_bytes, result.database_bytes) == (len(body), len(data))
    assert result.unpacked == unpacked
    assert result.samples == (("8.8.8.8", "US"), ("2001:4860::1", "US"))
    assert result.database_type == "GeoIP2-City"
    assert not result.replaced
    assert target.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user
    assert leftovers(Path(cfg.state_dir)) == []
    assert not Path(cfg.database).exists()  # [geoip] database is never written
    assert active_database(cfg) == target


def test_update_replaces_atomically_and_reports(
    http: FileServer, databases: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = geoip_config(tmp_path)
    update(cfg, http.put("gb.mmdb", databases["gb"]))
    target = Path(cfg.state_dir) / "current.mmdb"
    before = target.stat().st_ino
    result = update(cfg, http.put("au.mmdb.gz", gzip.compress(databases["au"])))
    assert result.replaced and target.read_bytes() == databases["au"]
    assert target.stat().st_ino != before  # a new file renamed over the old: never rewritten
    lines = result.lines()
    assert lines[0].startswith(f"downloaded {http.url('au.mmdb.gz')} (") and "gzip" in lines[0]
    assert "8.8.8.8 -> US, 2001:4860::1 -> US" in lines[1]
    assert lines[2] == f"installed {target} (replacing the previous one)"


def test_update_from_local_path_and_file_url(databases: dict[str, bytes], tmp_path: Path) -> None:
    source = tmp_path / "GeoLite2-City.mmdb.gz"
    source.write_bytes(gzip.compress(databases["gb"]))
    cfg = geoip_config(tmp_path)
    assert update(cfg, str(source)).url == source.as_uri()
    assert update(cfg, source.as_uri()).replaced
    assert (Path(cfg.state_dir) / "current.mmdb").read_bytes() == databases["gb"]


def tar_without_mmdb() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("README.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    return buf.getvalue()


Body = Callable[[dict[str, bytes]], bytes | None]
# (path served, its body from the test databases (None: 404), words the error must contain)
BAD_DOWNLOADS: list[tuple[str, Body, str]] = [
    ("missing.mmdb.gz", lambda db: None, "HTTP 404 Not Found"),
    ("garbage.mmdb", lambda db: os.urandom(4096), "not a usable MaxMind DB file"),
    ("empty.mmdb", lambda db: b"", "not a usable MaxMind DB file"),
    ("page.mmdb.gz", lambda db: b"<html>rate limited</html>", "not gzip data"),
    ("truncated.mmdb.gz", lambda db: gzip.compress(db["de"])[:-100], "broken gzip data"),
    ("readme.tar.gz", lambda db: gzip.compress(tar_without_mmdb()), "exactly one .mmdb"),
    ("few.mmdb", lambda db: db["no-samples"], "has no country for 8.8.8.8"),
]


@pytest.mark.parametrize(
    ("path", "body", "error"), BAD_DOWNLOADS, ids=[b[0] for b in BAD_DOWNLOADS]
)
def test_failed_update_keeps_the_database_in_use(
    http: FileServer,
    databases: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    path: str,
    body: Body,
    error: str,
) -> None:
    data = body(databases)
    url = http.url(f"bad/{path}") if data is None else http.put(f"bad/{path}", data)
    state = tmp_path / "state"
    config = write_config(tmp_path, f'[geoip]\nstate_dir = "{state}"\n')
    state.mkdir()
    (state / "current.mmdb").write_bytes(databases["gb"])
    code = main(["--config", str(config), "geoip", "update", "--url", url])
    out, err = capsys.readouterr()
    assert code == 1
    assert "geoip update failed, the database in use is unchanged" in err
    assert error in err and url in err
    assert out == ""
    assert (state / "current.mmdb").read_bytes() == databases["gb"]
    assert leftovers(state) == []


def test_cli_prints_what_happened(
    http: FileServer,
    databases: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, f'[geoip]\nstate_dir = "{tmp_path / "state"}"\n')
    url = http.put("cli/dbip-city-lite-2026-06.mmdb.gz", gzip.compress(databases["de"]))
    assert main(["--config", str(config), "geoip", "update", "--url", url]) == 0
    out, err = capsys.readouterr()
    assert f"downloading {url}" in err
    lines = out.splitlines()
    assert lines[0].startswith(f"downloaded {url}")
    assert lines[1].startswith("verified: type GeoIP2-City, built ")
    assert lines[2] == f"installed {tmp_path / 'state' / 'current.mmdb'}"
    assert lines[3] == "a running server switches to it within 60 s or on SIGHUP, without a restart"


@pytest.mark.parametrize(
    ("today", "months"),
    [(date(2026, 6, 3), ["2026-06", "2026-05"]), (date(2026, 1, 31), ["2026-01", "2025-12"])],
    ids=["june", "january"],
)
def test_default_urls_are_this_and_last_month(today: date, months: list[str]) -> None:
    assert default_urls(today) == [
        f"https://download.db-ip.com/free/dbip-city-lite-{m}.mmdb.gz" for m in months
    ]


def test_default_download_falls_back_to_last_month(
    http: FileServer,
    databases: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pattern = http.url("dbip/dbip-city-lite-{year:04d}-{month:02d}.mmdb.gz")
    monkeypatch.setattr(geoip_update, "DBIP_CITY_LITE_URL", pattern)
    http.put("dbip/dbip-city-lite-2025-12.mmdb.gz", gzip.compress(databases["au"]))
    messages: list[str] = []
    result = update(geoip_config(tmp_path), today=date(2026, 1, 2), progress=messages.append)
    assert result.url.endswith("dbip-city-lite-2025-12.mmdb.gz")
    assert "/dbip/dbip-city-lite-2026-01.mmdb.gz" in http.requests
    assert any("HTTP 404" in m and "previous month" in m for m in messages)
    with pytest.raises(UpdateError, match="HTTP 404"):
        update(geoip_config(tmp_path), today=date(2027, 5, 2))


def test_reload_interval_is_validated(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path)).geoip.reload_interval_s == 60.0
    with pytest.raises(ConfigError, match=r"geoip\.reload_interval_s: must be >= 0"):
        load_config(write_config(tmp_path, "[geoip]\nreload_interval_s = -1\n"))


# -- a running server follows the database ----------------------------------------------

ZONE = """\
$ORIGIN example.com.
$TTL 3600
@    IN SOA ns1 hostmaster 1 7200 3600 1209600 300
     IN NS  ns1
ns1  IN A   192.0.2.53
www  60 IN A 192.0.2.80
"""
GEO = '[names.www]\npool = "web"\ntypes = ["A"]\n'
SITES = """
[sites.uk]
ipv4 = ["198.51.100.10"]
lat = 51.5
lon = -0.13

[sites.fra]
ipv4 = ["198.51.100.20"]
lat = 50.11
lon = 8.68

[sites.syd]
ipv4 = ["198.51.100.40"]
lat = -33.87
lon = 151.21

[pools.web]
members = ["uk", "fra", "syd"]
"""
SITE_OF = {"198.51.100.10": "uk", "198.51.100.20": "fra", "198.51.100.40": "syd"}


@contextmanager
def server_with(tmp: Path, database: bytes, reload_interval_s: float = 60.0) -> Iterator[Running]:
    (tmp / "shipped.mmdb").write_bytes(database)
    body = (
        f'[geoip]\ndatabase = "{tmp / "shipped.mmdb"}"\nstate_dir = "{tmp / "state"}"\n'
        f"reload_interval_s = {reload_interval_s}\n" + SITES
    )
    make_zone_dir(tmp, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    config = load_config(write_config(tmp, body))
    # DNS only: no ops API (it would need a port of its own)
    with run_server(replace(config, api=replace(config.api, listen=""))) as running:
        yield running


def site_for(running: Running, subnet: str = CLIENT) -> str:
    """Which site answers www for the ECS client `subnet` (or "zone" for the fallback)."""
    address, length = subnet.split("/")
    reply = running.query(
        "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption(address, int(length))]
    )
    addrs = {rd.address for rrset in reply.answer for rd in rrset}
    assert len(addrs) == 1
    return SITE_OF.get(addrs.pop(), "zone")


def test_running_server_switches_database_without_restart(
    http: FileServer, databases: dict[str, bytes], tmp_path: Path
) -> None:
    with server_with(tmp_path, databases["gb"]) as running:
        app = running.app
        cfg = app.config.geoip
        current = Path(cfg.state_dir) / "current.mmdb"
        assert site_for(running) == "uk"
        assert not app.reload_geoip()  # nothing changed
        # the first update creates state_dir/current.mmdb: the server switches files
        update(cfg, http.put("run/de.mmdb.gz", gzip.compress(databases["de"])))
        assert app.reload_geoip()
        assert site_for(running) == "fra"
        assert app.locator is not None and app.locator.path == current
        # the next one replaces it: the same path is reopened
        update(cfg, http.put("run/au.mmdb", databases["au"]))
        assert app.reload_geoip()
        assert site_for(running) == "syd"
        assert not app.reload_geoip()
        # a broken file copied over it by hand is refused, the loaded database stays
        broken = current.with_name("broken.tmp")
        broken.write_bytes(b"not a database")
        os.replace(broken, current)
        assert not app.reload_geoip()
        assert not app.reload_geoip()  # and logged once, not at every check
        assert site_for(running) == "syd"
        # removing it goes back to [geoip] database
        current.unlink()
        assert app.reload_geoip()
        assert site_for(running) == "uk"
        assert app.locator is not None and app.locator.path == Path(cfg.database)


def test_installed_database_takes_precedence_at_start(
    databases: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "current.mmdb").write_bytes(databases["de"])
    with server_with(tmp_path, databases["gb"]) as running:
        assert site_for(running) == "fra"
        assert site_for(running, "212.58.224.0/24") == "uk"


def test_broken_installed_database_at_start_falls_back(
    http: FileServer, databases: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "current.mmdb").write_bytes(b"\x00" * 64)
    with server_with(tmp_path, databases["gb"]) as running:
        assert running.app.geoip_error is None
        assert site_for(running) == "uk"  # from [geoip] database
        assert not running.app.reload_geoip()  # the broken file is not retried
        update(running.app.config.geoip, http.put("fallback/de.mmdb", databases["de"]))
        assert running.app.reload_geoip()
        assert site_for(running) == "fra"


def test_reload_timer_picks_up_an_update(
    http: FileServer, databases: dict[str, bytes], tmp_path: Path
) -> None:
    with server_with(tmp_path, databases["gb"], reload_interval_s=0.05) as running:
        assert site_for(running) == "uk"
        update(running.app.config.geoip, http.put("timer/au.mmdb", databases["au"]))
        deadline = time.monotonic() + 10
        while site_for(running) != "syd":
            assert time.monotonic() < deadline, "the timer did not reload the database"
            time.sleep(0.02)  # bounded polling for the timer's next tick


def test_sighup_reload_also_picks_up_an_update(
    http: FileServer, databases: dict[str, bytes], tmp_path: Path
) -> None:
    with server_with(tmp_path, databases["gb"], reload_interval_s=0) as running:
        assert running.app._geoip_task is None  # 0: no timer, only SIGHUP
        update(running.app.config.geoip, http.put("hup/de.mmdb", databases["de"]))
        assert site_for(running) == "uk"
        running.call(running.app.reload())  # what SIGHUP runs
        assert site_for(running) == "fra"
