"""Resource limits (issue 11): every limit is a config key with a documented default,
and the cap on additional-section work holds."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from geodns.config import RrlConfig, ServerConfig, load_config
from geodns.errors import ConfigError
from geodns.handler import Handler, Settings
from geodns.model import Transport
from geodns.view import Catalog, GeoState, View, ViewHolder
from geodns.zones import name_to_wire, parse_zone

from .serverutil import write_config

# one MX with 40 in-zone targets, each with an A and an AAAA: 80 optional RRsets
MANY = "\n".join(
    [
        "$ORIGIN many.test.",
        "$TTL 300",
        "@ IN SOA ns1 hostmaster 1 7200 3600 1209600 300",
        "@ IN NS ns1",
        "ns1 IN A 192.0.2.1",
        *(f"@ IN MX {i} mx{i}" for i in range(40)),
        *(f"mx{i} IN A 192.0.2.{i + 10}" for i in range(40)),
        *(f"mx{i} IN AAAA 2001:db8::{i + 10:x}" for i in range(40)),
        "",
    ]
)

LIMITS = {
    # key: (default, documented in ServerConfig / RrlConfig)
    "tcp_max_connections": 1000,
    "tcp_max_connections_per_client": 100,
    "tcp_max_queries_per_connection": 0,
    "tcp_idle_timeout_s": 10.0,
    "tcp_query_timeout_s": 30.0,
    "max_udp_payload": 1232,
    "max_cname_chain": 8,
    "max_additional_rrsets": 32,
}


@pytest.mark.parametrize(("key", "default"), LIMITS.items(), ids=LIMITS.keys())
def test_each_limit_is_a_documented_server_key(key: str, default: object) -> None:
    f = {f.name: f for f in fields(ServerConfig)}[key]
    assert f.default == default
    assert f.metadata["doc"]


def test_every_rrl_key_is_documented() -> None:
    for f in fields(RrlConfig):
        assert f.metadata["doc"], f.name


def handler(tmp_path: Path, cap: int) -> Handler:
    path = tmp_path / "many.test.zone"
    path.write_text(MANY)
    catalog = Catalog()
    catalog.set(name_to_wire("many.test."), parse_zone(path))
    return Handler(ViewHolder(View(catalog, GeoState())), Settings(max_additional_rrsets=cap))


@pytest.mark.parametrize("cap", [0, 1, 5, 32], ids=lambda n: f"cap-{n}")
def test_additional_section_is_capped(tmp_path: Path, cap: int) -> None:
    q = dns.message.make_query("many.test.", "MX", use_edns=0)
    reply = handler(tmp_path, cap).handle(q.to_wire(), ("192.0.2.9", 53), Transport.TCP)
    assert reply is not None
    r = dns.message.from_wire(reply)
    assert r.rcode() == dns.rcode.NOERROR
    assert len(r.answer[0]) == 40  # the answer itself is never capped
    assert len(r.additional) == cap  # RRsets (dnspython keeps the OPT apart)


def test_max_additional_rrsets_from_config(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "[server]\nmax_additional_rrsets = 4\n"))
    assert cfg.server.max_additional_rrsets == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(write_config(bad, "[server]\nmax_additional_rrsets = -1\n"))
    assert any("server.max_additional_rrsets: must be >= 0" in p for p in err.value.problems)
