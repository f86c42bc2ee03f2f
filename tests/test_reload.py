"""Zone edits under a running server: new data served, broken edits keep the old zone."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from geodns.config import load_config
from geodns.reload import Reaper
from geodns.store import AuditRow, Store
from geodns.zones import Zone, load_zone
from tests.serverutil import Running, make_zone_dir, run_process, run_server, wait_for, write_config

HEAD = """$ORIGIN r.test.
$TTL 300
@ IN SOA ns1 host {serial} 7200 3600 1209600 60
@ IN NS ns1
ns1 IN A 192.0.2.53
"""


def zone(serial: int, body: str = "") -> str:
    return HEAD.format(serial=serial) + body


def addresses(s: Running, name: str) -> set[str]:
    r = s.query(name, "A")
    return {rd.address for rr in r.answer for rd in rr}


def rcode(s: Running, name: str) -> str:
    return dns.rcode.to_text(s.query(name, "A").rcode())


CONFIG = """
[api]
listen = ""
[zones]
directory = "zones"
debounce_s = 0.05
remove_grace_s = 0.5
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    make_zone_dir(tmp_path, {"r.test.zone": zone(1, "www IN A 192.0.2.1\n")})
    path = write_config(tmp_path, "")
    path.write_text(CONFIG.replace('directory = "zones"', f'directory = "{tmp_path}/zones"'))
    with run_server(load_config(path)) as s:
        yield s


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_edit_in_place_is_served(server: Running, tmp_path: Path) -> None:
    assert addresses(server, "www.r.test") == {"192.0.2.1"}
    (tmp_path / "zones" / "r.test.zone").write_text(zone(2, "www IN A 192.0.2.2\n"))
    wait_for(lambda: addresses(server, "www.r.test") == {"192.0.2.2"})
    assert server.app.zone_status["r.test."].serial == 2


def test_replace_by_rename_is_served(server: Running, tmp_path: Path) -> None:
    write_atomic(tmp_path / "zones" / "r.test.zone", zone(2, "new IN A 192.0.2.3\n"))
    wait_for(lambda: addresses(server, "new.r.test") == {"192.0.2.3"})
    assert rcode(server, "www.r.test") == "NXDOMAIN"


BROKEN = [
    ("syntax", zone(2, "www IN A 300.0.0.1\n"), "r.test.zone:6"),
    ("bad-rdata", zone(2, "www IN MX ten mail\n"), "r.test.zone:6"),
    ("missing-soa", "$ORIGIN r.test.\n@ 300 IN NS ns1\n", "no SOA"),
    ("empty", "", "empty zone file"),
    ("truncated", zone(2, "www IN A 192.0.2.9\nmx IN MX 10 (\n"), "r.test.zone"),
    ("cname-and-other", zone(2, "www IN CNAME ns1\nwww IN A 192.0.2.9\n"), "CNAME at www"),
]


@pytest.mark.parametrize(
    ("text", "expect"), [(t, e) for _, t, e in BROKEN], ids=[i for i, _, _ in BROKEN]
)
def test_broken_edit_keeps_last_good_zone(
    server: Running, tmp_path: Path, text: str, expect: str
) -> None:
    path = tmp_path / "zones" / "r.test.zone"
    path.write_text(text)
    status = server.app.zone_status["r.test."]
    wait_for(lambda: status.error is not None)
    assert expect in status.error
    assert addresses(server, "www.r.test") == {"192.0.2.1"}  # the old version serves
    # fixing the file loads it again
    path.write_text(zone(3, "www IN A 192.0.2.4\n"))
    wait_for(lambda: addresses(server, "www.r.test") == {"192.0.2.4"})
    assert status.error is None


def test_added_zone_is_served_and_removed_zone_refused_after_grace(
    server: Running, tmp_path: Path
) -> None:
    other = tmp_path / "zones" / "o.test.zone"
    other.write_text(zone(1, "www IN A 192.0.2.7\n").replace("r.test.", "o.test."))
    wait_for(lambda: addresses(server, "www.o.test") == {"192.0.2.7"})
    other.unlink()
    removed_at = time.monotonic()
    assert rcode(server, "www.o.test") == "NOERROR"  # still served within the grace
    wait_for(lambda: rcode(server, "www.o.test") == "REFUSED")
    assert time.monotonic() - removed_at >= 0.45


def test_rename_in_place_never_drops_the_zone(server: Running, tmp_path: Path) -> None:
    path = tmp_path / "zones" / "r.test.zone"
    aside = tmp_path / "r.test.zone.bak"
    os.rename(path, aside)
    time.sleep(0.1)  # the file is briefly absent, as with some editors
    os.rename(aside, path)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert rcode(server, "www.r.test") == "NOERROR"
        time.sleep(0.02)


def test_reload_api_function_reports_every_error(server: Running, tmp_path: Path) -> None:
    server.app.reloader.watch = False
    (tmp_path / "zones" / "bad.test.zone").write_text("$ORIGIN bad.test.\n@ 60 IN NS ns\n")
    report = server.call(server.app.reload())
    assert "bad.test." in report["failed"]
    assert any("no SOA" in p for p in report["failed"]["bad.test."])
    assert rcode(server, "www.bad.test") == "SERVFAIL"  # configured but not loadable


def test_config_reload_adds_a_site_and_rejects_broken_config(
    server: Running, tmp_path: Path
) -> None:
    cfg = tmp_path / "geodns.toml"
    good = cfg.read_text()
    cfg.write_text(good + '[sites.new]\nipv4 = ["192.0.2.77"]\nlat = 1.0\nlon = 2.0\n')
    report = server.call(server.app.reload())
    assert report["config_errors"] == []
    assert "new" in server.app.holder.view.geo.sites
    cfg.write_text(good + "[sites.bad]\nlattitude = 1\n")
    report = server.call(server.app.reload())
    assert any("sites.bad.lattitude: unknown key" in p for p in report["config_errors"])
    assert "new" in server.app.holder.view.geo.sites  # the running config stays
    cfg.write_text(good.replace("[api]", '[server]\nlisten = ["127.0.0.1:5999"]\n[api]'))
    report = server.call(server.app.reload())
    assert any("server.listen: cannot change while running" in p for p in report["config_errors"])


POOLS = """
[sites.a]
ipv4 = ["192.0.2.10"]
lat = 51.5
lon = -0.1
[sites.b]
ipv4 = ["192.0.2.20"]
lat = 52.5
lon = 13.4
[pools.web]
members = ["a"]
"""


def steered(s: Running) -> set[str]:
    """www.g.test's addresses for a public client network (loopback sources get the
    zone's own record)."""
    ecs = dns.edns.ECSOption("81.2.69.0", 24)
    r = s.query("www.g.test", "A", use_edns=0, options=[ecs])
    return {rd.address for rr in r.answer for rd in rr}


def test_a_pool_change_reparses_geo_zones_without_a_false_serial_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pools changed in geodns.toml: zones with a geo overlay are parsed again (they now
    use the new pool), the others are not, and no unchanged file is reported as
    "content changed but the SOA serial did not"."""
    caplog.set_level(logging.INFO)
    make_zone_dir(
        tmp_path,
        {
            "g.test.zone": zone(1).replace("r.test.", "g.test.") + "www IN A 192.0.2.1\n",
            "g.test.geo.toml": '[names.www]\npool = "web"\n',
            "r.test.zone": zone(1, "www IN A 192.0.2.1\n"),
        },
    )
    path = write_config(tmp_path, '[api]\nlisten = ""\n' + POOLS)

    with run_server(load_config(path)) as s:
        assert steered(s) == {"192.0.2.10"}
        path.write_text(path.read_text().replace('members = ["a"]', 'members = ["b"]'))
        caplog.clear()
        report = s.call(s.app.reload())
        assert report["config_errors"] == []
        assert report["loaded"] == ["g.test."]
        assert "r.test." in report["unchanged"]
        assert steered(s) == {"192.0.2.20"}
        assert not [r for r in caplog.records if "did not" in r.getMessage()]
        summary = "reload: config read; zones: 1 loaded, 0 failed, 0 removed, 1 unchanged"
        assert summary in [r.getMessage() for r in caplog.records]
        # the next reload with nothing changed parses nothing again
        report = s.call(s.app.reload())
        assert report["loaded"] == []
        assert sorted(report["unchanged"]) == ["g.test.", "r.test."]
        # and a real content change under the same serial is still reported
        zones = tmp_path / "zones"
        (zones / "r.test.zone").write_text(zone(1, "www IN A 192.0.2.9\n"))
        caplog.clear()
        report = s.call(s.app.reload())
        assert report["loaded"] == ["r.test."]
        msgs = [r.getMessage() for r in caplog.records]
        assert any("content changed but the SOA serial 1 did not" in m for m in msgs), msgs


def test_sighup_reloads(tmp_path: Path) -> None:
    make_zone_dir(tmp_path, {"r.test.zone": zone(1, "www IN A 192.0.2.1\n")})
    path = write_config(tmp_path, '[api]\nlisten = ""\n')
    text = path.read_text().replace("[zones]", "[zones]\nwatch = false")
    path.write_text(text)
    with run_process(path) as p:
        (tmp_path / "zones" / "r.test.zone").write_text(zone(2, "www IN A 192.0.2.5\n"))
        p.proc.send_signal(signal.SIGHUP)

        def answer() -> set[str]:
            q = dns.message.make_query("www.r.test", "A")
            r = dns.query.udp(q, p.host, port=p.port, timeout=2)
            return {rd.address for rr in r.answer for rd in rr}

        wait_for(lambda: answer() == {"192.0.2.5"})

        # and it is audited as POST /v1/reload is, under the signal's name
        def audited() -> list[AuditRow]:
            store = Store(f"sqlite:///{tmp_path}/state.sqlite3", "reader").open()
            try:
                return [r for r in store.list_audit()[0] if r.action == "reload"]
            finally:
                store.close()

        wait_for(lambda: bool(audited()))
        (row,) = audited()
        assert (row.who, row.target) == ("SIGHUP", "config")
        assert row.detail["loaded"] == ["r.test."]


def test_no_failed_query_during_reloads_of_a_large_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And each replaced version is freed by the reaper in slices: nothing (packet cache,
    fast path) keeps it alive once queries have moved to the new version."""
    reaper = Reaper(wait_s=20)
    monkeypatch.setattr("geodns.reload.REAPER", reaper)
    monkeypatch.setattr("geodns.reload.RETIRE_MIN_RECORDS", 10_000)
    monkeypatch.setattr("geodns.reload.RETIRE_SLICE", 1_000)
    n = 20_000
    body = "".join(f"h{i} IN A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n" for i in range(n))
    make_zone_dir(tmp_path, {"r.test.zone": zone(1, "www IN A 192.0.2.1\n" + body)})
    path = write_config(tmp_path, '[api]\nlisten = ""\n')
    path.write_text(path.read_text().replace("[zones]", "[zones]\ndebounce_s = 0.05"))
    failures: list[str] = []
    answered = 0
    stop = threading.Event()
    with run_server(load_config(path)) as s:

        def loop() -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    r = s.query("www.r.test", "A")
                    if r.rcode() != 0 or not r.answer:
                        failures.append(dns.rcode.to_text(r.rcode()))
                    answered += 1
                except Exception as exc:  # a timeout is a dropped query
                    failures.append(repr(exc))

        t = threading.Thread(target=loop)
        t.start()
        try:
            for serial in (2, 3, 4):
                write_atomic(
                    tmp_path / "zones" / "r.test.zone", zone(serial, "www IN A 192.0.2.1\n" + body)
                )
                wait_for(
                    lambda serial=serial: s.app.zone_status["r.test."].serial == serial,  # type: ignore[misc]
                    timeout_s=60,
                )
            # the query loop's next answers come from the new version, so the fast path
            # lets go of the old one's plans and the reaper may take it apart
            assert reaper.idle.wait(30)
        finally:
            stop.set()
            t.join()
    assert failures == []
    assert answered > 0
    assert (reaper.dismantled, reaper.let_go) == (3, 0)


def _big_zone(records: int) -> Zone:
    body = "".join(f"h{i} IN A 10.0.{i >> 8 & 255}.{i & 255}\n" for i in range(records))
    return load_zone_text(zone(1, body))


def load_zone_text(text: str) -> Zone:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.test.zone"
        p.write_text(text)
        return load_zone(p)


def test_reaper_takes_apart_a_zone_nobody_else_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("geodns.reload.RETIRE_MIN_RECORDS", 100)
    monkeypatch.setattr("geodns.reload.RETIRE_SLICE", 7)
    reaper = Reaper(wait_s=5)
    z = _big_zone(300)
    gone = weakref.ref(z)
    reaper.retire(z)
    del z
    assert reaper.idle.wait(10)
    assert (reaper.dismantled, reaper.let_go) == (1, 0)
    assert gone() is None


def test_reaper_never_shrinks_a_zone_someone_still_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """An old snapshot still in use (an API call, a query) is left whole and let go."""
    monkeypatch.setattr("geodns.reload.RETIRE_MIN_RECORDS", 100)
    reaper = Reaper(wait_s=0.2)
    z = _big_zone(300)
    names = len(z.nodes)
    reaper.retire(z)
    assert reaper.idle.wait(10)
    assert (reaper.dismantled, reaper.let_go) == (0, 1)
    assert len(z.nodes) == names and z.nodes[b"\x04h299\x01r\x04test\x00"]


def test_reaper_leaves_small_zones_to_reference_counting() -> None:
    reaper = Reaper(wait_s=0.2)
    z = load_zone_text(zone(1, "www IN A 192.0.2.1\n"))
    reaper.retire(z)
    reaper.retire(None)
    assert reaper.idle.is_set() and reaper._thread is None


def test_polling_fallback_sees_zone_overlay_and_tests_edits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without watchfiles (or inotify) the reloader polls: an edit of the zone file, of
    its geo overlay and of its policy tests file is each picked up."""
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # import fails: poll mode
    make_zone_dir(
        tmp_path,
        {
            "g.test.zone": zone(1).replace("r.test.", "g.test.") + "www IN A 192.0.2.1\n",
            "g.test.geo.toml": '[names.www]\npool = "web"\n',
        },
    )
    path = write_config(
        tmp_path, '[api]\nlisten = ""\n' + POOLS + '[pools.other]\nmembers = ["b"]\n'
    )
    path.write_text(
        path.read_text().replace("[zones]", "[zones]\npoll_interval_s = 0.05\ndebounce_s = 0.02")
    )

    zones = tmp_path / "zones"
    with run_server(load_config(path)) as s:
        assert s.app.reloader.mode == "poll"
        assert steered(s) == {"192.0.2.10"}
        (zones / "g.test.geo.toml").write_text('[names.www]\npool = "other"\n')
        wait_for(lambda: steered(s) == {"192.0.2.20"})
        status = s.app.zone_status["g.test."]
        (zones / "g.test.tests.toml").write_text(
            '[[case]]\ncountry = "GB"\nname = "www"\nexpect_site = "a"\n'
        )
        wait_for(lambda: status.error is not None)
        assert "expected a, got b" in (status.error or "")
        (zones / "g.test.tests.toml").unlink()
        wait_for(lambda: status.error is None)
        (zones / "g.test.zone").write_text(
            zone(2).replace("r.test.", "g.test.") + "www IN A 192.0.2.1\nnew IN A 192.0.2.7\n"
        )
        wait_for(lambda: addresses(s, "new.g.test") == {"192.0.2.7"})
