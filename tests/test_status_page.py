"""The ops status page (`GET /` on the API): served from package data, and driven in a
real Chromium (Debian `chromium` + PyPI `playwright`) against a running server.

The server is real (tests/serverutil.run_server: DNS + API on loopback ports chosen by
the OS); sites uk and fra are health-checked against TCP listeners on loopback that the
tests close, iad has no check. DNS answers are asserted over the wire with dnspython and
ECS 212.58.224.0/24 (GB). Every browser test records the page's requests and fails if
any went to a host other than the API's. Waits are bounded, never fixed sleeps.

Set GEODNS_SCREENSHOT=docs/status-page.png to refresh the README's screenshot.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.edns
import dns.message
import dns.query
import pytest
from aiohttp.test_utils import TestClient, TestServer
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from geodns import ops
from geodns.answershare import AnswerWindow
from geodns.app import App
from geodns.config import load_config
from geodns.model import Health
from tests.serverutil import REPO, Running, TcpTarget, run_server, tcp_check, wait_for, write_config
from tests.test_ops import validate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "page-test-token-0123456789abcdef"
GB_ECS = "212.58.224.0/24"
UK = {"198.51.100.10", "198.51.100.11"}
FRA = {"198.51.100.20"}
# a loopback check can take tens of ms when both CPUs are busy (Chromium, pytest -n 2):
# 25 ms timeouts (half the interval) made uk flap DOWN under load
CHECK = "interval_s = 0.2\ntimeout_s = 0.2\ndown_thresh = 3\nup_thresh = 1\n"
PAGE_TIMEOUT_MS = 8000  # a state change: the check interval + one 2 s poll, with margin

expect.set_options(timeout=PAGE_TIMEOUT_MS)
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} missing: install Debian's chromium (make deb-tools)",
)


def config_body(uk: TcpTarget, fra: TcpTarget, iad: TcpTarget) -> str:
    # iad's target refuses connections, but 100 failures at 1 s take longer than any
    # test here: iad stays UNKNOWN (no verdict yet), which answers like UP
    return f"""
[api]
listen = "127.0.0.1:0"
[api.tokens]
ops = "{TOKEN}"
[sites.uk]
ipv4 = ["198.51.100.10", "198.51.100.11"]
ipv6 = ["2001:db8:10::10"]
city = "London"
country = "GB"
{tcp_check("uk", uk, CHECK)}
[sites.fra]
ipv4 = ["198.51.100.20"]
ipv6 = ["2001:db8:20::20"]
city = "Frankfurt am Main"
country = "DE"
{tcp_check("fra", fra, CHECK)}
[sites.iad]
ipv4 = ["198.51.100.30"]
lat = 39.04
lon = -77.49
[sites.iad.check]
kind = "tcp"
target = "127.0.0.1"
port = {iad.port}
interval_s = 1.0
down_thresh = 100
[pools.web]
members = ["uk", "fra", "iad"]
"""


@dataclass
class Fleet:
    running: Running
    uk: TcpTarget
    fra: TcpTarget

    @property
    def app(self) -> App:
        return self.running.app

    @property
    def base(self) -> str:
        host, port = self.app.api_addresses[0]
        return f"http://{host}:{port}"

    def gb_answer(self) -> set[str]:
        """The addresses www.example.com answers to a GB client (ECS), over UDP."""
        addr, _, plen = GB_ECS.partition("/")
        q = dns.message.make_query(
            "www.example.com.", "A", use_edns=0, options=[dns.edns.ECSOption(addr, int(plen))]
        )
        reply = dns.query.udp(q, self.running.host, port=self.running.port, timeout=3)
        return {rd.address for rrset in reply.answer for rd in rrset}

    def observed(self, site: str) -> Health:
        return self.app.holder.view.geo.states[site].observed


@contextmanager
def fleet(tmp: Path) -> Iterator[Fleet]:
    zones = tmp / "zones"
    zones.mkdir()
    for name in ("example.com.zone", "example.com.geo.toml"):
        shutil.copy(REPO / "zones" / name, zones / name)
    uk, fra, iad = TcpTarget(), TcpTarget(), TcpTarget()
    iad.down()
    try:
        with run_server(load_config(write_config(tmp, config_body(uk, fra, iad)))) as running:
            f = Fleet(running, uk, fra)
            wait_for(lambda: f.observed("uk") is Health.UP and f.observed("fra") is Health.UP)
            yield f
    finally:
        uk.down()
        fra.down()


@dataclass
class Recorder:
    """Every URL the page asked for."""

    urls: list[str] = field(default_factory=list)

    def foreign(self, base: str) -> list[str]:
        origin = urlsplit(base)[:2]
        return [u for u in self.urls if urlsplit(u)[:2] != origin]


@pytest.fixture(scope="module")
def pw() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw: Playwright) -> Iterator[Browser]:
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path) as f:
        yield f


@contextmanager
def open_page(
    browser: Browser,
    base: str,
    width: int = 1280,
    height: int = 900,
    refused: tuple[str, ...] = (),
) -> Iterator[tuple[Page, Recorder]]:
    """The status page in a fresh context (own session storage).

    Afterwards: no request went to another host, no script error, and no HTTP error
    except on the paths in `refused` (requests a test makes fail on purpose).
    """
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    rec = Recorder()
    errors: list[str] = []

    def response(r: Any) -> None:
        if r.status >= 400 and not urlsplit(r.url).path.startswith(refused):
            errors.append(f"{r.status} {r.request.method} {r.url}")

    page.on("request", lambda r: rec.urls.append(r.url))
    page.on("response", response)
    page.on("pageerror", lambda e: errors.append(f"script error: {e}"))
    try:
        page.goto(base + "/")
        yield page, rec
        assert rec.urls, "the page made no requests at all"
        assert rec.foreign(base) == [], "the page asked hosts other than the API"
        assert errors == [], errors
    finally:
        context.close()


def row(page: Page, site: str) -> Any:
    return page.locator(f'#sites-table tbody tr[data-site="{site}"]')


def effective(page: Page, site: str) -> Any:
    return row(page, site).locator('td[data-label="Effective"]')


def marker(page: Page, site: str) -> Any:
    return page.locator(f'#markers g[data-site="{site}"]')


# --------------------------------------------------------------------------- browser


@needs_chromium
def test_map_and_table_show_each_site_state_and_share(browser: Browser, srv: Fleet) -> None:
    for _ in range(6):
        assert srv.gb_answer() <= UK
    with open_page(browser, srv.base) as (page, _):
        expect(effective(page, "uk")).to_have_text("UP")
        expect(effective(page, "fra")).to_have_text("UP")
        expect(effective(page, "iad")).to_have_text("UNKNOWN")  # no verdict yet
        expect(marker(page, "uk")).to_have_attribute("data-state", "up")
        expect(marker(page, "iad")).to_have_attribute("data-state", "unknown")
        # the state is text on the map too, and the share of answers is there
        expect(page.locator('#labels text[data-site="uk"]')).to_have_text("uk UP 100%")
        # CC BY 4.0: a page showing results from DB-IP's database links to db-ip.com
        expect(page.locator('footer a[href="https://db-ip.com"]')).to_have_text(
            "IP Geolocation by DB-IP"
        )
        expect(page.locator('#labels text[data-site="fra"]')).to_have_text("fra UP 0%")
        expect(page.locator('#share tr[data-site="uk"]')).to_contain_text("100%")
        expect(page.locator('#share tr[data-site="uk"] td.num')).to_have_text("6")
        # markers sit at the sites' coordinates (x = lon, y = -lat)
        box = page.locator('#markers g[data-site="iad"] .shape').evaluate(
            "e => { const b = e.getBBox(); return [b.x + b.width / 2, b.y + b.height / 2]; }"
        )
        assert box == pytest.approx([-77.49, -39.04], abs=0.5)
        # the rest of the table: observed, last check, pools, names served
        uk = row(page, "uk")
        expect(uk.locator('td[data-label="Observed"]')).to_have_text("UP")
        expect(uk.locator('td[data-label="Last check"]')).to_contain_text("ok")
        expect(uk.locator('td[data-label="Last check"]')).to_contain_text(" ms")
        expect(uk.locator('td[data-label="Pools"]')).to_have_text("web")
        expect(uk.locator('td[data-label="Names served"]')).to_contain_text("www.example.com.")
        expect(uk.locator('td[data-label="Override"]')).to_have_text("none")
        expect(row(page, "iad").locator('td[data-label="Last check"]')).to_contain_text("failed")
        # zones with their serial; the transitions list has the start-up verdicts
        zones = json.loads(http_get(srv.base, "/v1/zones")[2])["items"]
        serial = next(z["serial"] for z in zones if z["origin"] == "example.com.")
        zone = page.locator('#zones tr[data-zone="example.com."]')
        expect(zone.locator('td[data-label="Serial"]')).to_have_text(str(serial))
        expect(zone.locator('td[data-label="Last reload error"]')).to_have_text("none")
        expect(page.locator("#transitions tbody")).to_contain_text("UNKNOWN → UP")
        expect(page.locator("#summary")).to_have_text("3 sites: 2 UP, 1 UNKNOWN")


@needs_chromium
def test_stopping_a_health_target_turns_the_site_down_on_the_page(
    browser: Browser, srv: Fleet
) -> None:
    with open_page(browser, srv.base) as (page, rec):
        expect(effective(page, "uk")).to_have_text("UP")
        srv.uk.down()
        # the check interval (0.05 s x 2) plus one poll; no reload of the page
        expect(effective(page, "uk")).to_have_text("DOWN")
        expect(marker(page, "uk")).to_have_attribute("data-state", "down")
        expect(row(page, "uk").locator('td[data-label="Last check"]')).to_contain_text("failed")
        expect(page.locator("#transitions tbody tr").first).to_contain_text("UP → DOWN")
        assert srv.gb_answer() == FRA
        srv.uk.up()
        expect(effective(page, "uk")).to_have_text("UP")
        assert rec.urls.count(srv.base + "/") == 1, "the page reloaded itself"


@needs_chromium
def test_drain_from_the_page_moves_answers_and_is_audited(browser: Browser, srv: Fleet) -> None:
    assert srv.gb_answer() <= UK
    with open_page(browser, srv.base, refused=("/v1/sites/uk/override",)) as (page, _):
        drain = page.get_by_role("button", name="Drain uk", exact=True)
        expect(effective(page, "uk")).to_have_text("UP")
        # no token: the API refuses and the page shows its problem detail
        page.get_by_label("Reason").fill("rack maintenance")
        drain.click()
        result = page.locator("#action-result")
        expect(result).to_contain_text("Drain uk failed: 401 Unauthorized")
        expect(result).to_contain_text("this request needs a bearer token")
        expect(result).to_contain_text("no API token is set")
        assert srv.gb_answer() <= UK

        # with the token (typed in, kept in session storage, never shown back)
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-status")).to_contain_text("A token is set")
        expect(page.get_by_label("API token")).to_have_value("")
        assert page.evaluate("sessionStorage.getItem('geodns.token')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
        drain.focus()
        page.keyboard.press("Enter")  # keyboard works as well as the mouse
        expect(result).to_have_text("Drained uk: answers go to other sites now.")
        wait_for(lambda: srv.gb_answer() == FRA, 5)  # over the wire

        expect(effective(page, "uk")).to_have_text("DRAINED")
        expect(marker(page, "uk")).to_have_attribute("data-state", "drained")
        override = row(page, "uk").locator('td[data-label="Override"]')
        expect(override).to_contain_text("drained by ops")
        expect(override).to_contain_text("rack maintenance")
        audit = page.locator("#audit tbody tr").first
        expect(audit).to_contain_text("ops")
        expect(audit).to_contain_text("uk")
        expect(audit).to_contain_text("rack maintenance")
        assert TOKEN not in page.content()

        page.get_by_role("button", name="Undrain uk").click()
        expect(result).to_have_text("Undrained uk: it follows its health checks again.")
        wait_for(lambda: srv.gb_answer() <= UK, 5)
        expect(effective(page, "uk")).to_have_text("UP")

        # forgetting the token makes writes fail clearly again
        page.get_by_role("button", name="Forget token").click()
        assert page.evaluate("sessionStorage.getItem('geodns.token')") is None
        drain.click()
        expect(result).to_contain_text("401 Unauthorized")
        assert srv.gb_answer() <= UK


@needs_chromium
def test_drain_without_a_reason_shows_the_api_error(browser: Browser, srv: Fleet) -> None:
    with open_page(browser, srv.base, refused=("/v1/sites/fra/override",)) as (page, _):
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Use token").click()
        page.get_by_role("button", name="Drain fra", exact=True).click()
        expect(page.locator("#action-result")).to_contain_text(
            "Drain fra failed: 400 Bad Request — reason: must be a non-empty string"
        )
        assert srv.app.holder.view.geo.states["fra"].usable


@needs_chromium
def test_explain_box_shows_the_site_chosen_for_a_gb_address(browser: Browser, srv: Fleet) -> None:
    with open_page(browser, srv.base, refused=("/v1/explain",)) as (page, _):
        expect(page.get_by_label("Name")).to_have_value("www.example.com.")
        page.get_by_label("Client IP").fill("212.58.224.10")
        page.get_by_role("button", name="Explain", exact=True).click()
        out = page.locator("#explain-result")
        expect(out.locator("#explain-chosen")).to_have_text("uk (198.51.100.10, 198.51.100.11)")
        expect(out).to_contain_text("steered: uk")
        expect(out).to_contain_text("GB")
        expect(out.locator("ol.trace li").first).to_be_visible()
        # bad input: the API's problem detail, not a stack trace
        page.get_by_label("Client IP").fill("not-an-ip")
        page.get_by_role("button", name="Explain", exact=True).click()
        expect(out).to_contain_text("Explain failed: 400 Bad Request")
        expect(out).to_contain_text("is not an IP address")


SITES_URL = re.compile(r".*/v1/sites(/[a-z]+)?(\?.*)?$")


def marker_look(page: Page, site: str) -> tuple[str, str, str]:
    """(element, class, fill) of a site's map marker."""
    return tuple(  # type: ignore[return-value]
        marker(page, site).evaluate(
            "g => { const s = g.querySelector('.shape');"
            " return [s.tagName, s.getAttribute('class'), getComputedStyle(s).fill]; }"
        )
    )


@needs_chromium
def test_every_state_has_its_own_text_colour_and_shape(browser: Browser, srv: Fleet) -> None:
    """DRAINED and STALE too (the live /v1/sites answers edited in flight), then DOWN."""
    looks: dict[str, tuple[str, str, str]] = {}
    with open_page(browser, srv.base) as (page, _):
        expect(effective(page, "uk")).to_have_text("UP")
        looks["up"] = marker_look(page, "uk")

        def edit(route: Any) -> None:
            resp = route.fetch()
            doc = resp.json()
            for item in doc.get("items", [doc]):
                if item["name"] == "fra":
                    item["stale"] = True
                if item["name"] == "uk":
                    item["effective"], item["usable"] = "drained", False
            route.fulfill(response=resp, body=json.dumps(doc))

        page.route(SITES_URL, edit)
        expect(effective(page, "uk")).to_have_text("DRAINED")
        expect(effective(page, "fra")).to_have_text("STALE")
        expect(effective(page, "iad")).to_have_text("UNKNOWN")
        looks["drained"] = marker_look(page, "uk")
        looks["stale"] = marker_look(page, "fra")
        looks["unknown"] = marker_look(page, "iad")
        page.unroute(SITES_URL)
        srv.uk.down()
        expect(effective(page, "uk")).to_have_text("DOWN")
        looks["down"] = marker_look(page, "uk")
        expect(page.locator("#legend")).to_contain_text("UP")
        for state in ("DOWN", "UNKNOWN", "DRAINED", "STALE"):
            expect(page.locator("#legend")).to_contain_text(state)
    # five colours, and the shape tells them apart without colour as well
    assert len({fill for _, _, fill in looks.values()}) == 5, looks
    assert len({(tag, cls) for tag, cls, _ in looks.values()}) >= 4, looks
    assert looks["drained"][0] == "rect" and "ring" in looks["stale"][1]


@needs_chromium
def test_damping_and_ramps_are_shown(browser: Browser, srv: Fleet) -> None:
    """Load balancing states from /v1/sites (edited in flight) appear in the table."""
    with open_page(browser, srv.base) as (page, _):
        expect(effective(page, "uk")).to_have_text("UP")

        def edit(route: Any) -> None:
            resp = route.fetch()
            doc = resp.json()
            for item in doc.get("items", [doc]):
                if item["name"] == "uk":
                    item["damping"] = {
                        "damped": True,
                        "until": "2099-01-01T00:00:00Z",
                        "addresses": [],
                        "level": 2,
                        "recent_changes": 5,
                    }
                if item["name"] == "fra":
                    item["ramp"] = {"kind": "up", "share": 0.55, "until": "2099-01-01T00:00:00Z"}
            route.fulfill(response=resp, body=json.dumps(doc))

        page.route(SITES_URL, edit)
        observed = 'td[data-label="Observed"]'
        expect(row(page, "uk").locator(observed)).to_contain_text("held DOWN (flapping)")
        expect(row(page, "fra").locator(observed)).to_contain_text("slow start: 55% of its clients")
        page.unroute(SITES_URL)


@needs_chromium
def test_narrow_window_reflows_without_sideways_scrolling(browser: Browser, srv: Fleet) -> None:
    with open_page(browser, srv.base, width=380, height=800) as (page, _):
        expect(effective(page, "uk")).to_have_text("UP")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        # the table became labelled cards: each cell says what it is
        label = effective(page, "uk").evaluate("td => getComputedStyle(td, '::before').content")
        assert label == '"Effective"'
        out = os.environ.get("GEODNS_SCREENSHOT_NARROW")
        if out:
            page.screenshot(path=out, full_page=True)


@needs_chromium
def test_screenshot(browser: Browser, srv: Fleet, tmp_path: Path) -> None:
    """A picture of a fleet with some history (GEODNS_SCREENSHOT=path keeps it)."""
    for _ in range(40):
        srv.gb_answer()
    with open_page(browser, srv.base, width=1280, height=900) as (page, _):
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Use token").click()
        page.get_by_label("Reason").fill("kernel upgrade, ticket OPS-1234")
        page.get_by_role("button", name="Drain fra", exact=True).click()
        expect(effective(page, "fra")).to_have_text("DRAINED")
        srv.uk.down()
        expect(effective(page, "uk")).to_have_text("DOWN")
        for _ in range(20):
            srv.gb_answer()
        expect(page.locator('#share tr[data-site="iad"] td.num')).to_have_text("20")
        page.get_by_label("Client IP").fill("212.58.224.10")
        page.get_by_role("button", name="Explain", exact=True).click()
        expect(page.locator("#explain-chosen")).to_contain_text("iad")
        out = Path(os.environ.get("GEODNS_SCREENSHOT") or tmp_path / "status-page.png")
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10_000


# --------------------------------------------------------------------------- HTTP


def http_get(base: str, path: str) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def test_page_and_assets_are_served_from_package_data(srv: Fleet) -> None:
    status, headers, body = http_get(srv.base, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<script src="static/app.js"' in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    for name, kind in (
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("land.svg", "image/svg+xml"),
    ):
        status, headers, body = http_get(srv.base, f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind), name
        assert body == (REPO / "geodns" / "static" / name).read_bytes()
    # no external references anywhere in the assets (the page works air-gapped); the one
    # URL besides the SVG namespace is the licence's attribution link, which loads nothing
    for path in (REPO / "geodns" / "static").iterdir():
        text = path.read_text()
        urls = re.findall(r"(?:https?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s\"'<>)]*", text, re.I)
        text = text.replace('<a href="https://db-ip.com">', "")
        assert "db-ip.com" not in text, path.name  # only in that anchor
        assert set(urls) <= {"http://www.w3.org/2000/svg", "https://db-ip.com"}, (path.name, urls)


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/..%2Fops.py", "/static/.hidden.js", "/static/x.py"]
)
def test_unknown_static_files_are_problem_404s(srv: Fleet, path: str) -> None:
    status, headers, body = http_get(srv.base, path)
    assert status == 404
    assert headers["content-type"].startswith("application/problem+json")
    assert b"Traceback" not in body and b"import" not in body


def test_stats_counts_answers_by_site(srv: Fleet) -> None:
    for _ in range(3):
        assert srv.gb_answer() <= UK
    status, _, body = http_get(srv.base, "/v1/stats")
    doc = json.loads(body)
    assert status == 200
    by_site = {s["site"]: s for s in doc["sites"]}
    assert set(by_site) == {"uk", "fra", "iad"}
    assert by_site["uk"]["answers"] == 3 and by_site["uk"]["share"] == 1.0
    assert by_site["fra"]["answers"] == 0 and by_site["fra"]["share"] == 0.0
    assert doc["total"] == 3 and doc["window_s"] == 300.0
    assert 0 <= doc["span_s"] < 300
    spec = json.loads(http_get(srv.base, "/v1/openapi.json")[2])
    media = spec["paths"]["/v1/stats"]["get"]["responses"]["200"]["content"]
    validate(doc, media["application/json"]["schema"], spec)


def test_page_needs_no_token_where_reads_do() -> None:
    """On a non-loopback API reads need a token, but the page and its files do not."""
    app = object.__new__(App)
    app.config = load_config_text('[api]\nlisten = ""\n')
    web_app = ops.make_web_app(app, {"ops": TOKEN}, reads_need_token=True)

    async def statuses() -> dict[str, int]:
        async with TestClient(TestServer(web_app)) as client:
            paths = ("/", "/static/app.js", "/static/land.svg", "/v1/stats")
            return {p: (await client.get(p)).status for p in paths}

    # its own thread and loop: playwright's sync API may hold this thread's loop
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(asyncio.run, statuses()).result(30)
    assert got == {"/": 200, "/static/app.js": 200, "/static/land.svg": 200, "/v1/stats": 401}


def load_config_text(text: str) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "geodns.toml"
        path.write_text(text)
        return load_config(path)


def test_answer_window_slides_and_survives_counter_resets() -> None:
    counts = {"uk": 0, "fra": 0}
    now = [0.0]
    w = AnswerWindow(lambda: counts, window_s=60.0, step_s=5.0, clock=lambda: now[0])
    w.sample()
    counts.update(uk=30, fra=10)
    doc = w.share(["uk", "fra", "iad"])
    assert doc["total"] == 40 and doc["span_s"] == 0.0
    assert [(s["site"], s["answers"], s["share"]) for s in doc["sites"]] == [
        ("fra", 10, 0.25),
        ("iad", 0, 0.0),
        ("uk", 30, 0.75),
    ]
    for t in range(5, 61, 5):  # a minute of samples, no new answers after t=0
        now[0] = float(t)
        w.sample()
    now[0] = 62.0
    counts.update(uk=31)
    doc = w.share(["uk", "fra"])
    # the window starts at the t=5 sample: the 40 early answers have left it
    assert doc["total"] == 1 and doc["span_s"] == 57.0
    counts.update(uk=2, fra=10)  # a worker restarted: its part of the sum began again
    assert {s["site"]: s["answers"] for s in w.share(["uk", "fra"])["sites"]} == {
        "uk": 2,
        "fra": 0,
    }
    empty = AnswerWindow(dict, clock=lambda: 0.0).share(["uk"])
    assert empty["total"] == 0 and empty["sites"] == [{"site": "uk", "answers": 0, "share": None}]
