"""The ops HTTP API: every endpoint, every error, tokens, drains over the wire, metrics,
readiness, the OpenAPI description, and the CLI commands that talk to it.

Servers are real (tests/serverutil.run_server: DNS and API on OS-chosen loopback ports
in a thread); requests go over real sockets with http.client, DNS with dnspython.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import pytest
from aiohttp.test_utils import TestClient, TestServer

from geodns import cli, ops
from geodns.app import App
from geodns.config import load_config
from geodns.errors import ConfigError
from tests.serverutil import EXAMPLE_SITES, REPO, Running, run_server, write_config

TOKEN = "ops-secret-0123456789abcdef"
SITES = EXAMPLE_SITES
UK = {"198.51.100.10", "198.51.100.11"}
FRA = {"198.51.100.20"}
GB_ECS = "212.58.224.0/24"


# --------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0]


@dataclass
class Ops:
    """A running server plus an HTTP client for its API."""

    running: Running
    config_path: Path
    token: str

    @property
    def app(self) -> App:
        return self.running.app

    @property
    def base(self) -> str:
        host, port = self.app.api_addresses[0]
        return f"http://{host}:{port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        host, port = self.app.api_addresses[0]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        out = Reply(resp.status, resp.headers, resp.read())
        conn.close()
        return out

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def drain(self, site: str = "uk", **body: Any) -> Reply:
        return self.request(
            "PUT",
            f"/v1/sites/{site}/override",
            {"state": "down", "reason": "maintenance", **body},
            token=self.token,
        )

    def answer(self, ecs: str = GB_ECS, qtype: str = "A") -> set[str]:
        """The addresses www.example.com answers to a client in `ecs`, over UDP."""
        addr, _, plen = ecs.partition("/")
        option = dns.edns.ECSOption(addr, int(plen))
        reply = self.running.query("www.example.com.", qtype, use_edns=0, options=[option])
        return {rd.address for rrset in reply.answer for rd in rrset}


def example_files(tmp: Path, extra_zones: dict[str, str] | None = None) -> None:
    zones = tmp / "zones"
    zones.mkdir(exist_ok=True)
    for name in ("example.com.zone", "example.com.geo.toml"):
        shutil.copy(REPO / "zones" / name, zones / name)
    for name, text in (extra_zones or {}).items():
        (zones / name).write_text(text)


def api_section(tokens: bool = True, extra: str = "") -> str:
    text = '[api]\nlisten = "127.0.0.1:0"\n' + extra
    if tokens:
        text += f'[api.tokens]\nops = "{TOKEN}"\n'
    return text


@contextmanager
def ops_server(
    tmp: Path,
    *,
    tokens: bool = True,
    api_extra: str = "",
    extra: str = "",
    extra_zones: dict[str, str] | None = None,
) -> Iterator[Ops]:
    example_files(tmp, extra_zones)
    path = write_config(tmp, api_section(tokens, api_extra) + SITES + extra)
    config = load_config(path)
    with run_server(config) as running:
        token = TOKEN if tokens else (tmp / "state" / "api-token").read_text().strip()
        yield Ops(running, path, token)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Ops]:
    with ops_server(tmp_path) as s:
        yield s


def wait_for(pred: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll `pred` until it returns something truthy (bounded; never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def assert_problem(r: Reply, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status == status, r.body
    assert r.content_type == "application/problem+json"
    doc = r.json
    assert doc["type"] == "about:blank" and doc["status"] == status
    assert doc["title"] and doc["detail"]
    assert "Traceback" not in r.body.decode()
    if field is not None:
        assert doc.get("field") == field, doc
    return doc


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# --------------------------------------------------------------------------- reads


def test_healthz_and_readyz_when_all_is_well(srv: Ops) -> None:
    r = srv.get("/healthz")
    assert r.status == 200 and r.json["status"] == "ok"
    r = srv.get("/readyz")
    assert r.status == 200, r.body
    assert r.json["ready"] is True and r.json["not_ready"] == []


def test_sites_list_detail_and_pages(srv: Ops) -> None:
    r = srv.get("/v1/sites")
    assert r.status == 200
    page = r.json
    assert [s["name"] for s in page["items"]] == ["fra", "iad", "uk"]
    assert page["next"] is None
    uk = page["items"][2]
    assert uk["effective"] == "up" and uk["usable"] is True and uk["override"] is None
    assert uk["pools"] == ["web"]
    assert uk["addresses"]["ipv4"] == ["198.51.100.10", "198.51.100.11"]

    first = srv.get("/v1/sites?limit=2").json
    assert [s["name"] for s in first["items"]] == ["fra", "iad"] and first["next"] == "iad"
    second = srv.get(f"/v1/sites?limit=2&cursor={first['next']}").json
    assert [s["name"] for s in second["items"]] == ["uk"] and second["next"] is None

    detail = srv.get("/v1/sites/uk").json
    assert detail["name"] == "uk"
    assert detail["names"] == ["www.example.com."]  # geo names using the site's pools
    assert detail["transitions_error"] is None
    assert isinstance(detail["transitions"], list)


def test_site_detail_shows_checks_and_transitions(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    check = (
        f'[sites.uk.check]\nkind = "tcp"\ntarget = "127.0.0.1"\nport = {port}\n'
        "interval_s = 0.05\ndown_thresh = 1\nup_thresh = 1\n"
    )
    # the check table must follow [sites.uk]: splice it in before [sites.fra]
    body = api_section() + SITES.replace("[sites.fra]", check + "[sites.fra]")
    example_files(tmp_path)
    config = load_config(write_config(tmp_path, body))
    try:
        with run_server(config) as running:
            s = Ops(running, tmp_path / "geodns.toml", TOKEN)

            def checked() -> Any:
                d = s.get("/v1/sites/uk").json
                return d if d["targets"] and d["targets"][0]["last_check"] else None

            d = wait_for(checked)
            assert d, "no check result shown"
            assert d["check"]["kind"] == "tcp"
            target = d["targets"][0]
            assert target["last_check"]["ok"] is True
            assert target["last_check"]["latency_ms"] >= 0
            listener.close()  # the site goes down: a transition is recorded

            def went_down() -> Any:
                d = s.get("/v1/sites/uk").json
                # transitions are written to the store in the background, in order
                newest = d["transitions"][0]["new"] if d["transitions"] else None
                return d if d["observed"] == "down" and newest == "down" else None

            d = wait_for(went_down)
            assert d, "the site never went down"
            assert d["effective"] == "down"
            assert d["targets"][0]["last_check"]["ok"] is False
            assert d["targets"][0]["last_check"]["error"]
            assert [t["new"] for t in d["transitions"]] == ["down", "up"]
    finally:
        listener.close()


def test_zones_list(srv: Ops) -> None:
    r = srv.get("/v1/zones")
    assert r.status == 200
    (zone,) = r.json["items"]
    assert zone["origin"] == "example.com."
    assert zone["serial"] == 2026112501
    assert zone["file"].endswith("example.com.zone")
    assert zone["loaded_at"] and zone["records"] > 0
    assert zone["serving"] is True and zone["error"] is None
    assert r.json["next"] is None


def test_explain_endpoint(srv: Ops) -> None:
    r = srv.get(f"/v1/explain?ip=127.0.0.1&name=www.example.com&type=A&ecs={GB_ECS}")
    assert r.status == 200, r.body
    doc = r.json
    assert doc["outcome"] == "steered: uk"
    assert doc["located_as"]["country"] == "GB"
    assert doc["ecs_scope"] == 19
    assert_problem(srv.get("/v1/explain?name=www.example.com"), 400, "ip")
    assert_problem(srv.get("/v1/explain?ip=1.2.3.4&name=www.example.com&type=NOPE"), 400, "type")


# --------------------------------------------------------------------------- writes


def test_drain_leaves_dns_answers_at_once_and_undrain_brings_it_back(srv: Ops) -> None:
    assert srv.answer() == UK
    r = srv.drain("uk", reason="kernel upgrade")
    assert r.status == 200, r.body
    site = r.json
    assert site["effective"] == "drained" and site["usable"] is False
    assert site["override"]["who"] == "ops" and site["override"]["reason"] == "kernel upgrade"
    assert site["override"]["expires_at"] is None
    # the very next answer: no waiting for a timer or a TTL on our side
    assert srv.answer() == FRA
    assert srv.get("/v1/explain?ip=127.0.0.1&name=www.example.com&ecs=" + GB_ECS).json[
        "outcome"
    ] == ("steered: fra")

    r = srv.request("DELETE", "/v1/sites/uk/override", token=TOKEN)
    assert r.status == 200, r.body
    assert r.json["cleared"] is True and r.json["site"]["effective"] == "up"
    assert srv.answer() == UK
    # nothing to clear: still 200, says so
    r = srv.request("DELETE", "/v1/sites/uk/override", {"reason": "again"}, token=TOKEN)
    assert r.status == 200 and r.json["cleared"] is False


def test_force_up_override(srv: Ops) -> None:
    r = srv.request(
        "PUT", "/v1/sites/fra/override", {"state": "up", "reason": "checks are wrong"}, token=TOKEN
    )
    assert r.status == 200
    assert r.json["effective"] == "up" and r.json["override"]["state"] == "up"


def test_audit_rows_newest_first_with_pages(srv: Ops) -> None:
    assert srv.drain("uk", reason="one").status == 200
    assert srv.request("DELETE", "/v1/sites/uk/override", token=TOKEN).status == 200
    assert srv.drain("fra", reason="three").status == 200
    items = srv.get("/v1/audit").json["items"]
    assert [(i["action"], i["target"], i["who"]) for i in items] == [
        ("override.set", "fra", "ops"),
        ("override.clear", "uk", "ops"),
        ("override.set", "uk", "ops"),
    ]
    assert items[0]["detail"]["reason"] == "three"
    first = srv.get("/v1/audit?limit=2").json
    assert len(first["items"]) == 2 and first["next"]
    second = srv.get(f"/v1/audit?limit=2&cursor={first['next']}").json
    assert [i["id"] for i in second["items"]] == [items[2]["id"]] and second["next"] is None


def test_override_expires_by_itself_with_injected_clock(srv: Ops) -> None:
    health = srv.app.health
    assert health is not None
    now = [time.time()]
    health.clock = lambda: now[0]
    r = srv.drain("uk", reason="short", expires_in_s=60)
    assert r.status == 200
    assert r.json["override"]["expires_in_s"] == pytest.approx(60, abs=0.5)
    assert srv.answer() == FRA

    now[0] += 61

    async def tick() -> None:
        health.tick()  # what the scheduled timer does at the deadline

    srv.running.call(tick())
    assert srv.answer() == UK
    site = srv.get("/v1/sites/uk").json
    assert site["override"] is None and site["effective"] == "up"
    rows = wait_for(lambda: [i for i in srv.get("/v1/audit").json["items"] if i["who"] == "expiry"])
    assert rows and rows[0]["target"] == "uk"


def test_reload_endpoint_needs_a_token_and_is_audited(srv: Ops) -> None:
    assert_problem(srv.request("POST", "/v1/reload"), 401)
    r = srv.request("POST", "/v1/reload", token=TOKEN)
    assert r.status == 200, r.body
    assert r.json["ok"] is True and r.json["config_errors"] == []
    assert any(i["action"] == "reload" for i in srv.get("/v1/audit").json["items"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "raw", "field", "words"),
    [
        (None, b"{not json", "body", "invalid JSON"),
        (None, b"", "body", "JSON object"),
        ([1, 2], None, "body", "JSON object"),
        ({"state": "down"}, None, "reason", "required"),
        ({"state": "down", "reason": "x", "ramp_secs": 60}, None, "ramp_secs", "unknown field"),
        ({"state": "down", "reason": "x", "ramp_s": "5m"}, None, "ramp_s", "number"),
        ({"state": "down", "reason": "x", "ramp_s": -1}, None, "ramp_s", "number"),
        ({"state": "sideways", "reason": "x"}, None, "state", '"down" or "up"'),
        ({"state": 1, "reason": "x"}, None, "state", '"down" or "up"'),
        ({"state": "down", "reason": ""}, None, "reason", "non-empty"),
        ({"state": "down", "reason": 5}, None, "reason", "string"),
        ({"state": "down", "reason": "x", "expires_in_s": "1h"}, None, "expires_in_s", "number"),
        ({"state": "down", "reason": "x", "expires_in_s": True}, None, "expires_in_s", "number"),
        ({"state": "down", "reason": "x", "expires_in_s": -5}, None, "expires_in_s", "within"),
    ],
    ids=[
        "bad-json",
        "empty-body",
        "not-object",
        "no-reason",
        "unknown-field",
        "ramp-not-a-number",
        "ramp-negative",
        "bad-state",
        "state-type",
        "empty-reason",
        "reason-type",
        "expires-type",
        "expires-bool",
        "expires-negative",
    ],
)
def test_override_input_errors_name_the_field(
    srv: Ops, body: Any, raw: bytes | None, field: str, words: str
) -> None:
    r = srv.request("PUT", "/v1/sites/uk/override", body, raw=raw, token=TOKEN)
    doc = assert_problem(r, 400, field)
    assert words in doc["detail"]
    assert srv.get("/v1/sites/uk").json["override"] is None  # nothing changed


def test_unknown_site_is_404(srv: Ops) -> None:
    assert_problem(srv.get("/v1/sites/nowhere"), 404, "name")
    assert_problem(srv.drain("nowhere"), 404)
    assert_problem(srv.request("DELETE", "/v1/sites/nowhere/override", token=TOKEN), 404)


def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    with ops_server(tmp_path, api_extra="max_body_bytes = 256\n") as s:
        big = {"state": "down", "reason": "x" * 400}
        assert_problem(s.request("PUT", "/v1/sites/uk/override", big, token=TOKEN), 413)
        assert s.get("/v1/sites/uk").json["override"] is None


def test_wrong_method_is_405_with_allow(srv: Ops) -> None:
    r = srv.request("POST", "/v1/sites/uk/override", token=TOKEN)
    assert_problem(r, 405)
    assert set(r.headers["Allow"].split(",")) == {"PUT", "DELETE"}
    assert_problem(srv.request("DELETE", "/v1/sites"), 405)


def test_unknown_path_query_and_bad_paging(srv: Ops) -> None:
    assert_problem(srv.get("/v2/nothing"), 404)
    assert_problem(srv.get("/v1/sites?limt=5"), 400, "limt")
    assert_problem(srv.get("/v1/sites?limit=0"), 400, "limit")
    assert_problem(srv.get("/v1/zones?limit=x"), 400, "limit")
    assert_problem(srv.get("/v1/audit?cursor=abc"), 400, "cursor")


def test_internal_error_is_a_problem_without_a_trace(
    srv: Ops, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ops, "openapi_spec", broken)
    with caplog.at_level(logging.ERROR, logger="geodns.ops"):
        r = srv.get("/v1/openapi.json")
    doc = assert_problem(r, 500)
    assert "secret internals" not in r.body.decode() and "RuntimeError" not in doc["detail"]
    assert "secret internals" in caplog.text  # the log has it


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 401),
        ("Bearer wrong-secret-0123456789", 401),
        (f"Basic {TOKEN}", 401),
        ("Bearer ", 401),
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
    ],
    ids=["missing", "wrong", "basic", "empty", "right", "scheme-case"],
)
def test_writes_need_the_right_token(srv: Ops, header: str | None, expected: int) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = srv.request(
        "PUT",
        "/v1/sites/uk/override",
        {"state": "down", "reason": "token test"},
        headers=headers,
    )
    assert r.status == expected, r.body
    if expected == 401:
        assert_problem(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert srv.get("/v1/sites/uk").json["effective"] == "up"  # nothing changed
        assert srv.get("/v1/audit").json["items"] == []
        assert srv.answer() == UK
    else:
        assert srv.get("/v1/audit").json["items"][0]["who"] == "ops"


def test_generated_token_file_is_0600_reused_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with ops_server(tmp_path, tokens=False) as s:
        path = tmp_path / "state" / "api-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret = s.token
        assert len(secret) >= 32
        r = s.drain("uk")
        assert r.status == 200 and r.json["override"]["who"] == "admin"
        assert_problem(s.request("DELETE", "/v1/sites/uk/override"), 401)
    assert str(path) in caplog.text  # where it is, yes
    assert secret not in caplog.text  # what it is, never
    # a restart reads the same file: the token stays valid
    config = load_config(tmp_path / "geodns.toml")
    with run_server(config) as running:
        again = Ops(running, tmp_path / "geodns.toml", secret)
        assert again.request("DELETE", "/v1/sites/uk/override", token=secret).status == 200


def test_short_configured_token_is_refused() -> None:
    # by the config loader, so `geodns check` says it as `serve` does
    with pytest.raises(ConfigError, match=r"api\.tokens\.ops: must be at least 16"):
        load_config_text('[api]\nlisten = "127.0.0.1:0"\n[api.tokens]\nops = "short"\n')
    # and by the API for a config built in code
    cfg = load_config_text('[api]\nlisten = "127.0.0.1:0"\n')
    cfg = dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, tokens={"ops": "short"}))
    with pytest.raises(ConfigError, match=r"api\.tokens\.ops: must be at least 16"):
        ops.load_tokens(cfg)


def load_config_text(text: str) -> Any:
    import tempfile

    d = Path(tempfile.mkdtemp())
    return load_config(write_config(d, text))


async def test_reads_need_a_token_off_loopback(tmp_path: Path) -> None:
    """On a non-loopback address every read but /healthz needs a token (TestServer)."""
    example_files(tmp_path)
    config = load_config(write_config(tmp_path, '[api]\nlisten = ""\n' + SITES))
    app = App(config, listen=["127.0.0.1:0"])
    await app.start()
    try:
        web_app = ops.make_web_app(app, {"ops": TOKEN}, reads_need_token=True)
        async with TestClient(TestServer(web_app)) as client:
            r = await client.get("/v1/sites")
            assert r.status == 401
            assert r.content_type == "application/problem+json"
            assert (await client.get("/metrics")).status == 401
            assert (await client.get("/healthz")).status == 200
            r = await client.get("/v1/sites", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status == 200
            assert len((await r.json())["items"]) == 3
    finally:
        await app.stop()


@pytest.mark.parametrize(
    ("api", "ok", "words"),
    [
        ('listen = "0.0.0.0:0"', False, "must use TLS"),
        ('listen = "[::]:0"', False, "must use TLS"),
        ('listen = "0.0.0.0:0"\nallow_plaintext = true', True, ""),
        ('listen = "127.0.0.1:0"', True, ""),
        ('listen = "127.0.0.1:0"\ntls_cert = "x.pem"', False, "go together"),
        ('listen = "127.0.0.1:0"\ntls_cert = "x.pem"\ntls_key = "y.pem"', False, "cannot load"),
    ],
    ids=["any-v4", "any-v6", "plaintext-ok", "loopback", "cert-only", "missing-files"],
)
def test_listen_plan(api: str, ok: bool, words: str) -> None:
    cfg = load_config_text(f"[api]\n{api}\n")
    if ok:
        plan = ops.plan_listen(cfg)
        assert plan is not None
        assert plan.reads_need_token == (not plan.host.startswith("127."))
    else:
        with pytest.raises(ConfigError, match=words):
            ops.plan_listen(cfg)


def test_public_plaintext_api_refuses_to_start(tmp_path: Path) -> None:
    example_files(tmp_path)
    config = load_config(write_config(tmp_path, '[api]\nlisten = "0.0.0.0:0"\n' + SITES))
    with pytest.raises(ConfigError) as info, run_server(config):
        pass
    assert "not a loopback address" in str(info.value.problems)
    assert "tls_cert" in str(info.value.problems)


def test_api_off_when_listen_is_empty(tmp_path: Path) -> None:
    example_files(tmp_path)
    config = load_config(write_config(tmp_path, '[api]\nlisten = ""\n' + SITES))
    with run_server(config) as running:
        assert running.app.api_addresses == []
        assert running.app.api is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_api(tmp_path: Path) -> None:
    import ssl

    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    tls = 'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'
    with ops_server(tmp_path, api_extra=tls) as s:
        host, port = s.app.api_addresses[0]
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        # the CLI speaks TLS too, verifying against the given CA
        rc = cli.main(
            [
                *("--config", str(s.config_path), "sites", "--api", f"https://{host}:{port}"),
                *("--cacert", str(tmp_path / "cert.pem"), "--token", TOKEN),
            ]
        )
        assert rc == 0


# --------------------------------------------------------------------------- readiness


def test_readyz_503_lists_every_reason(tmp_path: Path) -> None:
    broken = "$ORIGIN broken.test.\n@ 3600 IN SOA ns1 host 1 2 3 4 5\n@ IN NS ns1\nbad line here\n"
    (tmp_path / "notadb").mkdir()
    extra = f"""
[geoip]
database = "{tmp_path}/missing.mmdb"
"""
    example_files(tmp_path, {"broken.test.zone": broken})
    body = api_section() + SITES + extra
    path = write_config(tmp_path, body)
    # the store URL points at a directory: SQLite cannot open it
    text = path.read_text().replace("state.sqlite3", "notadb")
    path.write_text(text)
    with run_server(load_config(path)) as running:
        s = Ops(running, path, TOKEN)
        r = s.get("/readyz")
        doc = assert_problem(r, 503)
        reasons = "\n".join(doc["not_ready"])
        assert "zone broken.test.: rejected" in reasons
        assert "geoip: not open" in reasons
        assert "store: unreachable" in reasons
        assert "example.com" not in reasons  # the good zone is fine
        assert doc["ready"] is False
        zones = {z["origin"]: z for z in s.get("/v1/zones").json["items"]}
        assert zones["broken.test."]["error"] and zones["broken.test."]["serving"] is False
        assert zones["example.com."]["error"] is None
        # GET /v1/audit needs the store
        assert_problem(s.get("/v1/audit"), 503)


def test_readyz_503_while_checker_frozen(srv: Ops) -> None:
    health = srv.app.health
    assert health is not None
    health.frozen, health.frozen_reason = True, "3 of 4 sites went DOWN within 10 s"
    doc = assert_problem(srv.get("/readyz"), 503)
    assert doc["not_ready"] == [
        "checker: partition guard frozen: 3 of 4 sites went DOWN within 10 s"
    ]
    health.frozen = False
    assert srv.get("/readyz").status == 200


# --------------------------------------------------------------------------- metrics


def test_metrics_move_with_queries(srv: Ops) -> None:
    before = srv.get("/metrics")
    assert before.status == 200
    assert before.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    t0 = before.body.decode()
    for _ in range(3):
        assert srv.answer() == UK
    # FORMERR: an ECS source prefix longer than 32 bits (RFC 7871 §6)
    bad = dns.message.make_query(
        "www.example.com.",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(8, b"\x00\x01\x40\x00")],
    )
    dns.query.udp(bad, srv.running.host, port=srv.running.port, timeout=5)
    srv.running.query("example.com.", "MX", tcp=True)
    t1 = srv.get("/metrics").body.decode()

    def delta(name: str, **labels: str) -> float:
        return metric(t1, name, **labels) - metric(t0, name, **labels)

    labels = {"qtype": "A", "rcode": "NOERROR", "transport": "udp"}
    assert delta("geodns_dns_queries_total", **labels) == 3
    assert delta("geodns_dns_queries_total", qtype="MX", rcode="NOERROR", transport="tcp") == 1
    assert delta("geodns_dns_geo_answers_total", site="uk") == 3
    assert delta("geodns_dns_ecs_queries_total") == 3
    assert delta("geodns_dns_formerr_total") == 1
    assert metric(t1, "geodns_udp_send_dropped_total") == 0  # every reply went out
    assert metric(t1, "geodns_site_usable", site="uk") == 1
    assert metric(t1, "geodns_zones", state="loaded") == 1
    assert metric(t1, "geodns_geoip_up") == 1
    assert metric(t1, "geodns_geoip_build_timestamp_seconds") > 1.6e9
    assert metric(t1, "geodns_store_up") == 1
    assert metric(t1, "geodns_ready") == 1

    version = metric(t1, "geodns_view_geo_version")
    srv.drain("uk")
    t2 = srv.get("/metrics").body.decode()
    assert metric(t2, "geodns_site_usable", site="uk") == 0
    assert metric(t2, "geodns_site_override", site="uk", override="down") == 1
    assert metric(t2, "geodns_view_geo_version") > version
    assert srv.answer() == FRA
    t3 = srv.get("/metrics").body.decode()
    assert metric(t3, "geodns_dns_geo_answers_total", site="fra") == 1


def test_metrics_collector_has_no_per_zone_series(tmp_path: Path) -> None:
    zones = {
        f"z{i}.test.zone": f"$ORIGIN z{i}.test.\n@ 60 IN SOA ns1 host 1 2 3 4 5\n@ IN NS ns1\n"
        "ns1 IN A 192.0.2.1\n"
        for i in range(20)
    }
    with ops_server(tmp_path, extra_zones=zones) as s:
        text = s.get("/metrics").body.decode()
        assert metric(text, "geodns_zones", state="loaded") == 21
        assert "z7.test" not in text


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_matches_the_routes() -> None:
    app = object.__new__(App)  # routes do not depend on the App's state
    app.config = load_config_text('[api]\nlisten = ""\n')
    web_app = ops.make_web_app(app, {"ops": TOKEN})
    spec = ops.openapi_spec()
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert ops.routes_of(web_app) == documented


def test_openapi_served_and_responses_match_their_schemas(srv: Ops) -> None:
    spec = srv.get("/v1/openapi.json").json
    assert spec["openapi"].startswith("3.1")

    def check(path: str, method: str, r: Reply) -> None:
        op = spec["paths"][path][method]
        resp = op["responses"][str(r.status)]
        media = resp["content"][r.content_type]
        validate(r.json, media["schema"], spec)

    assert srv.drain("uk", expires_in_s=600).status == 200
    check("/v1/sites", "get", srv.get("/v1/sites"))
    check("/v1/sites/{name}", "get", srv.get("/v1/sites/uk"))
    check("/v1/sites/{name}", "get", srv.get("/v1/sites/nope"))
    check("/v1/zones", "get", srv.get("/v1/zones"))
    check("/v1/audit", "get", srv.get("/v1/audit"))
    check("/healthz", "get", srv.get("/healthz"))
    check("/readyz", "get", srv.get("/readyz"))
    check(
        "/v1/explain",
        "get",
        srv.get(f"/v1/explain?ip=127.0.0.1&name=www.example.com&ecs={GB_ECS}"),
    )
    check("/v1/explain", "get", srv.get("/v1/explain?ip=x&name=www.example.com"))
    check("/v1/sites/{name}/override", "put", srv.drain("fra"))
    check("/v1/sites/{name}/override", "put", srv.drain("fra", bogus=1))
    check("/v1/sites/{name}/override", "put", srv.request("PUT", "/v1/sites/fra/override"))
    check(
        "/v1/sites/{name}/override",
        "delete",
        srv.request("DELETE", "/v1/sites/uk/override", token=TOKEN),
    )
    check("/v1/reload", "post", srv.request("POST", "/v1/reload", token=TOKEN))
    # and the request schema rejects what the API rejects
    req = spec["components"]["schemas"]["OverrideRequest"]
    validate({"state": "down", "reason": "x", "expires_in_s": 60}, req, spec)
    validate({"state": "down", "reason": "x", "ramp_s": 300}, req, spec)
    with pytest.raises(AssertionError):
        validate({"state": "down", "reason": "x", "ramp_secs": 1}, req, spec)


def validate(value: Any, schema: dict[str, Any], spec: dict[str, Any], where: str = "$") -> None:
    """A small JSON Schema (2020-12 subset) check: the shapes the spec declares."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        validate(value, spec["components"]["schemas"][name], spec, where)
        return
    for sub in schema.get("allOf", []):
        validate(value, sub, spec, where)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                validate(value, sub, spec, where)
                break
            except AssertionError as exc:
                errors.append(str(exc))
        else:
            raise AssertionError(f"{where}: matches no alternative: {errors}")
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    types = schema.get("type")
    if types is not None:
        kinds = {
            "object": dict,
            "array": list,
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
            "null": type(None),
        }
        names = types if isinstance(types, list) else [types]
        ok = any(
            isinstance(value, kinds[n])
            and not (n in ("integer", "number") and value is True)
            and not (n in ("integer", "number") and value is False)
            for n in names
        )
        assert ok, f"{where}: {value!r} is not {names}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        for key, item in value.items():
            if key in props:
                validate(item, props[key], spec, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{where}: unexpected {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(item, schema["additionalProperties"], spec, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], spec, f"{where}[{i}]")


# --------------------------------------------------------------------------- CLI


def test_cli_drain_sites_undrain_explain(srv: Ops, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", str(srv.config_path)]
    api = ["--api", srv.base, "--token", TOKEN]
    assert cli.main([*base, "drain", "uk", "--reason", "maintenance", "--for", "1h", *api]) == 0
    out = capsys.readouterr().out
    assert "uk: drained" in out and "maintenance" in out and "in 1h)" in out
    assert srv.answer() == FRA

    assert cli.main([*base, "sites", *api]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "STATE" in lines["SITE"]
    assert "drained" in lines["uk"] and "by ops: maintenance" in lines["uk"]
    assert lines["fra"].split()[1] == "up"

    assert cli.main([*base, "explain", "127.0.0.1", "www.example.com", "--ecs", GB_ECS, *api]) == 0
    out = capsys.readouterr().out
    assert "steered: fra" in out and "drained" in out

    assert cli.main([*base, "undrain", "uk", "--reason", "done", *api]) == 0
    assert "uk: override cleared; now up" in capsys.readouterr().out
    assert srv.answer() == UK
    actions = [(i["action"], i["who"]) for i in srv.get("/v1/audit").json["items"]]
    assert actions == [("override.clear", "ops"), ("override.set", "ops")]


def test_cli_errors_exit_non_zero_with_the_detail(
    srv: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    def drain(*extra: str) -> int:
        cfg = ["--config", str(srv.config_path)]
        return cli.main([*cfg, "drain", *extra, "--reason", "x", "--api", srv.base])

    assert drain("nowhere", "--token", TOKEN) == 1
    assert "unknown site 'nowhere'" in capsys.readouterr().err
    assert drain("uk", "--token", "wrong-token") == 1
    assert "invalid bearer token (HTTP 401)" in capsys.readouterr().err
    assert drain("uk", "--for", "soon", "--token", TOKEN) == 1
    assert "--for:" in capsys.readouterr().err
    assert srv.get("/v1/sites/uk").json["effective"] == "up"


def test_cli_uses_env_token_and_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEODNS_TOKEN", raising=False)
    with ops_server(tmp_path, tokens=False) as s:
        # no --token: the server's generated token file (readable here) is used
        cfg = ["--config", str(s.config_path)]
        assert cli.main([*cfg, "drain", "uk", "--reason", "file", "--api", s.base]) == 0
        assert s.get("/v1/sites/uk").json["override"]["who"] == "admin"
        monkeypatch.setenv("GEODNS_TOKEN", s.token)
        assert cli.main(["undrain", "uk", "--api", s.base]) == 0
        monkeypatch.setenv("GEODNS_TOKEN", "not-the-token-at-all")
        assert cli.main(["undrain", "uk", "--api", s.base]) == 1
    assert "invalid bearer token" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1h30m", 5400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "-5m", "0", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_duration(text)


def test_token_name_compares_every_token() -> None:
    tokens = {"a": "a" * 20, "b": "b" * 20}
    assert ops.token_name(tokens, "Bearer " + "b" * 20) == "b"
    assert ops.token_name(tokens, "Bearer " + "c" * 20) is None
    assert ops.token_name(tokens, None) is None
    assert ops.token_name({}, "Bearer x") is None
