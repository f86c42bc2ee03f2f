"""Per-site CNAMEs: a geo name answered with the chosen site's CNAME (RFC 2181 §10.1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import pytest

from geodns.config import load_config
from geodns.errors import ZoneError
from geodns.model import Pool
from geodns.zones import parse_zone
from tests.serverutil import Running, make_zone_dir, run_server, write_config

ZONE = """\
$ORIGIN example.com.
$TTL 300
@ IN SOA ns1 host 1 7200 3600 1209600 60
@ IN NS ns1
ns1 IN A 192.0.2.53
cdn IN CNAME fallback.cdn.example.net.
local IN CNAME www
www IN A 192.0.2.80
uk-edge IN A 198.51.100.10
"""
GEO = """
[names.cdn]
pool = "edge"
types = ["CNAME"]
[names.local]
pool = "edge"
types = ["CNAME"]
"""
SITES = """
[sites.uk]
cname = "uk-edge.example.com."
city = "London"
country = "GB"
[sites.fra]
cname = "fra.cdn.example.net."
city = "Frankfurt am Main"
country = "DE"
[pools.edge]
members = ["uk", "fra"]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cname")
    make_zone_dir(tmp, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    with run_server(load_config(write_config(tmp, SITES))) as s:
        yield s


def ask(s: Running, name: str, rtype: str, ecs: str | None, tcp: bool = False):  # type: ignore[no-untyped-def]
    options = [dns.edns.ECSOption(ecs, 24)] if ecs else []
    q = dns.message.make_query(name, rtype, use_edns=0, options=options)
    if tcp:
        return dns.query.tcp(q, s.host, port=s.port, timeout=3)
    return dns.query.udp(q, s.host, port=s.port, timeout=3)


def lines(r) -> set[str]:  # type: ignore[no-untyped-def]
    return {line for rr in r.answer for line in rr.to_text().splitlines()}


CASES = [
    (
        "GB",
        "212.58.224.0",
        "A",
        {
            "cdn.example.com. 300 IN CNAME uk-edge.example.com.",
            "uk-edge.example.com. 300 IN A 198.51.100.10",
        },
        19,
    ),
    ("DE", "81.169.145.0", "A", {"cdn.example.com. 300 IN CNAME fra.cdn.example.net."}, 17),
    ("DE-AAAA", "81.169.145.0", "AAAA", {"cdn.example.com. 300 IN CNAME fra.cdn.example.net."}, 17),
    (
        "DE-CNAME",
        "81.169.145.0",
        "CNAME",
        {"cdn.example.com. 300 IN CNAME fra.cdn.example.net."},
        17,
    ),
    (
        "unlocatable",
        "10.1.2.0",
        "A",
        {"cdn.example.com. 300 IN CNAME fallback.cdn.example.net."},
        8,
    ),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("client", "rtype", "expect", "scope"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_per_site_cname(
    server: Running, tcp: bool, client: str, rtype: str, expect: set[str], scope: int
) -> None:
    r = ask(server, "cdn.example.com", rtype, client, tcp)
    # steered CNAMEs carry the geo name's ttl_s (60); the fallback the zone file's (300)
    ttl = 300 if client == "10.1.2.0" else 60
    assert lines(r) == {x.replace(" 300 IN CNAME", f" {ttl} IN CNAME") for x in expect}
    ecs = next(o for o in r.options if isinstance(o, dns.edns.ECSOption))
    assert ecs.scopelen == scope  # the GeoIP network (or the private block) of the client


def test_in_zone_target_is_chased(server: Running) -> None:
    r = ask(server, "local.example.com", "A", "212.58.224.0")
    assert {rr.rdtype for rr in r.answer} == {dns.rdatatype.CNAME, dns.rdatatype.A}


BAD = [
    (
        "apex",
        "@ IN A 192.0.2.1\n",
        '[names."@"]\npool = "edge"\ntypes = ["CNAME"]\n',
        "no CNAME at the zone apex",
    ),
    (
        "not-cname",
        "x IN A 192.0.2.1\n",
        '[names.x]\npool = "edge"\ntypes = ["CNAME"]\n',
        "only data there to be the fallback CNAME",
    ),
    (
        "mixed",
        "x IN CNAME y\n",
        '[names.x]\npool = "edge"\ntypes = ["CNAME", "A"]\n',
        "CNAME cannot be combined",
    ),
]


@pytest.mark.parametrize(("extra", "geo", "expect"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_cname_geo_names(tmp_path: Path, extra: str, geo: str, expect: str) -> None:
    head = "$ORIGIN t.test.\n@ 60 IN SOA ns h 1 2 3 4 5\n@ 60 IN NS ns\nns 60 IN A 192.0.2.9\n"
    (tmp_path / "t.test.zone").write_text(head + extra)
    (tmp_path / "t.test.geo.toml").write_text(geo)
    with pytest.raises(ZoneError) as err:
        parse_zone(tmp_path / "t.test.zone", {"edge": Pool("edge", ("uk",))})
    assert any(expect in p for p in err.value.problems), err.value.problems
