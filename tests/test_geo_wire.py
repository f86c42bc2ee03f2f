"""Geo answers over the wire (UDP and TCP): who gets which site, and the ECS scope.

A real server on loopback reads the small test GeoIP database of tests/mmdb_util.py; a
dnspython client sends EDNS Client Subnet options (RFC 7871). Every reply to an ECS
query must echo FAMILY, SOURCE PREFIX-LENGTH and ADDRESS (§7.2.1) and carry a SCOPE that
is the GeoIP network's prefix for steered answers, 0 for answers that do not depend on
the client. The last tests use the shipped database and the repository's own config.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dnslib
import maxminddb
import pytest

from geodns.config import Config, load_config
from geodns.model import Health, SiteState
from geodns.view import next_version
from tests.mmdb_util import DEFAULT_ENTRIES, city_record, write_default_test_mmdb, write_test_mmdb
from tests.serverutil import REPO, Running, make_zone_dir, run_server, write_config

ZONE = """\
$ORIGIN example.com.
$TTL 3600
@       IN SOA  ns1 hostmaster 1 7200 3600 1209600 300
        IN NS   ns1
        IN A    192.0.2.1
ns1     IN A    192.0.2.53
static  IN A    192.0.2.2
; geo names: the records below answer clients that cannot be located
www     60 IN A    192.0.2.80
www     60 IN AAAA 2001:db8::80
ruled   60 IN A    192.0.2.81
legacy  60 IN A    192.0.2.82
"""

GEO = """\
[names.www]
pool = "web"
types = ["A", "AAAA"]

[names.ruled]
pool = "ruled"
types = ["A", "AAAA"]

[names.legacy]
pool = "v4only"
types = ["A", "AAAA"]
"""

SITES = """
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
ipv4 = ["198.51.100.30"]     # IPv4 only
lat = 39.04
lon = -77.49

[sites.syd]
ipv4 = ["198.51.100.40"]
ipv6 = ["2001:db8:40::40"]
city = "Sydney"
country = "AU"

[pools.web]
members = ["uk", "fra", "iad", "syd"]

[pools.ruled]
members = ["uk", "fra", "iad", "syd"]
rules = [{ country = "DE", sites = ["uk", "fra"] }]

[pools.v4only]
members = ["iad"]
"""

UK = {"198.51.100.10", "198.51.100.11"}
FRA = {"198.51.100.20"}
IAD = {"198.51.100.30"}
SYD = {"198.51.100.40"}
UK6 = {"2001:db8:10::10"}
FRA6 = {"2001:db8:20::20"}
ZONE_A = {"192.0.2.80"}
ZONE_AAAA = {"2001:db8::80"}

GB_NET, DE_NET, US_NET, AU_NET = "212.58.224.0/24", "81.169.145.0/24", "8.8.8.0/24", "1.0.0.0/24"
DE_NET6, US_NET6 = "2a02:2e0::/32", "2001:4860::/32"


def geo_config(database: Path, state_dir: Path) -> str:
    return f'[geoip]\ndatabase = "{database}"\nstate_dir = "{state_dir}"\n' + SITES


def without_api(config: Config) -> Config:
    """No ops HTTP API: these tests only speak DNS (and need no fixed port)."""
    return replace(config, api=replace(config.api, listen=""))


@contextmanager
def geo_server(tmp: Path, database: Path) -> Iterator[Running]:
    """A server for ZONE + GEO with the sites above, reading `database`."""
    make_zone_dir(tmp, {"example.com.zone": ZONE, "example.com.geo.toml": GEO})
    config = load_config(write_config(tmp, geo_config(database, tmp / "state")))
    with run_server(without_api(config)) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("geo_wire")
    with geo_server(tmp, write_default_test_mmdb(tmp / "test.mmdb")) as running:
        yield running


@pytest.fixture(scope="module")
def located_source_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The test database plus 127.0.0.0/8 -> AU: the resolver's own address is locatable."""
    tmp = tmp_path_factory.mktemp("geo_wire_source")
    entries = [*DEFAULT_ENTRIES, ("127.0.0.0/8", city_record("AU", "OC", -33.87, 151.21))]
    with geo_server(tmp, write_test_mmdb(tmp / "source.mmdb", entries)) as running:
        yield running


def ecs(prefix: str) -> dns.edns.ECSOption:
    net = ipaddress.ip_network(prefix, strict=False)
    return dns.edns.ECSOption(str(net.network_address), net.prefixlen)


def ask(
    running: Running,
    name: str,
    qtype: str = "A",
    subnet: str | dns.edns.Option | None = None,
    tcp: bool = False,
) -> tuple[set[str], dns.edns.ECSOption | None, dns.message.Message]:
    """(answer addresses, the reply's ECS option, the reply) for one query."""
    options: list[dns.edns.Option] = []
    if isinstance(subnet, str):
        options.append(ecs(subnet))
    elif subnet is not None:
        options.append(subnet)
    reply = running.query(f"{name}.example.com", qtype, tcp=tcp, use_edns=0, options=options)
    addrs = {rd.address for rrset in reply.answer for rd in rrset}
    found = [o for o in reply.options if o.otype == dns.edns.OptionType.ECS]
    assert len(found) <= 1
    option = found[0] if found else None
    assert option is None or isinstance(option, dns.edns.ECSOption)
    return addrs, option, reply


def assert_echo(sent: str, option: dns.edns.ECSOption | None, scope: int) -> None:
    """RFC 7871 §7.2.1: FAMILY, SOURCE PREFIX-LENGTH and ADDRESS echoed; SCOPE is ours."""
    assert option is not None, "no ECS option in the reply to an ECS query"
    want = ecs(sent)
    assert (option.family, option.srclen, option.address) == (
        want.family,
        want.srclen,
        want.address,
    )
    assert option.scopelen == scope


TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])

# (name, qtype, ECS prefix, expected addresses, expected SCOPE)
STEERED = [
    ("www", "A", GB_NET, UK, 24),
    ("www", "A", DE_NET, FRA, 24),
    ("www", "A", US_NET, IAD, 24),
    ("www", "A", AU_NET, SYD, 24),
    # a longer SOURCE than the database network: the SCOPE is the network's /24
    ("www", "A", "212.58.224.77/32", UK, 24),
    ("www", "AAAA", GB_NET, UK6, 24),
    ("www", "AAAA", DE_NET6, FRA6, 32),
    ("www", "A", DE_NET6, FRA, 32),
    # iad has no IPv6: AAAA goes to the nearest member that has it (London < Frankfurt)
    ("www", "AAAA", US_NET, UK6, 24),
    ("www", "AAAA", US_NET6, UK6, 32),
    # unlocatable: not in the database, whose empty network around it is 9.0.0.0/8
    ("www", "A", "9.9.9.0/24", ZONE_A, 8),
    ("www", "AAAA", "9.9.9.0/24", ZONE_AAAA, 8),
    # TEST-NET-3 is special-purpose: located by the packet source (127.0.0.1, not in the
    # database either), SCOPE covering the block
    ("www", "A", "203.0.113.0/24", ZONE_A, 24),
    # RFC 7871 §10: a private ECS address is ignored, the source is used (unlocatable
    # here), and the SCOPE covers the private block: 10.0.0.0/8, fc00::/7
    ("www", "A", "10.1.2.0/24", ZONE_A, 8),
    ("www", "AAAA", "fd00:1:2::/48", ZONE_AAAA, 7),
    # a country rule overrides nearest, other countries still go to the nearest
    ("ruled", "A", DE_NET, UK, 24),
    ("ruled", "AAAA", DE_NET6, UK6, 32),
    ("ruled", "A", GB_NET, UK, 24),
    ("ruled", "A", US_NET, IAD, 24),
    ("ruled", "A", AU_NET, SYD, 24),
    ("legacy", "A", GB_NET, IAD, 24),
]
STEERED_IDS = [f"{n}-{t}-{p}" for n, t, p, _, _ in STEERED]


@TRANSPORTS
@pytest.mark.parametrize(("name", "qtype", "subnet", "expected", "scope"), STEERED, ids=STEERED_IDS)
def test_steered_answer_and_scope(
    server: Running, tcp: bool, name: str, qtype: str, subnet: str, expected: set[str], scope: int
) -> None:
    addrs, option, reply = ask(server, name, qtype, subnet, tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert addrs == expected
    assert_echo(subnet, option, scope)
    assert all(rrset.ttl == 60 for rrset in reply.answer)


CLIENTS = [GB_NET, DE_NET, US_NET, AU_NET, DE_NET6, US_NET6, "9.9.9.0/24", "10.1.2.0/24"]


@TRANSPORTS
@pytest.mark.parametrize("subnet", CLIENTS)
def test_pool_without_ipv6_is_nodata_with_scope_zero_for_every_client(
    server: Running, tcp: bool, subnet: str
) -> None:
    # RFC 7871 §7.4: never NODATA for some networks and an answer for others
    _, option, reply = ask(server, "legacy", "AAAA", subnet, tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    assert_echo(subnet, option, 0)


# (name, qtype, rcode, answer): answers that do not depend on the client
STATIC = [
    ("static", "A", dns.rcode.NOERROR, {"192.0.2.2"}),
    ("nothere", "A", dns.rcode.NXDOMAIN, set()),
    ("static", "AAAA", dns.rcode.NOERROR, set()),
    ("www", "MX", dns.rcode.NOERROR, set()),  # a geo name, but not a steered type
]


@TRANSPORTS
@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "expected"), STATIC, ids=["A", "NXDOMAIN", "NODATA", "geo-name-MX"]
)
def test_static_answers_have_scope_zero(
    server: Running, tcp: bool, name: str, qtype: str, rcode: int, expected: set[str]
) -> None:
    addrs, option, reply = ask(server, name, qtype, GB_NET, tcp)
    assert reply.rcode() == rcode
    assert addrs == expected
    assert_echo(GB_NET, option, 0)  # RFC 7871 §7.2.1: SCOPE 0, same for every client


@TRANSPORTS
def test_no_ecs_in_reply_when_query_had_none(server: Running, tcp: bool) -> None:
    addrs, option, _ = ask(server, "www", "A", None, tcp)
    assert option is None
    assert addrs == ZONE_A  # the source, 127.0.0.1, is not in the database
    plain = server.query("www.example.com", "A", tcp=tcp)  # no EDNS at all
    assert plain.edns < 0 and not plain.options


@TRANSPORTS
def test_source_prefix_zero_answers_for_the_source_with_scope_zero(
    server: Running, located_source_server: Running, tcp: bool
) -> None:
    # RFC 7871 §7.1.2: SOURCE 0 means the resolver opted out; answer as without ECS
    for subnet in ("0.0.0.0/0", "::/0"):
        addrs, option, _ = ask(server, "www", "A", subnet, tcp)
        assert addrs == ZONE_A  # 127.0.0.1 is unlocatable
        assert_echo(subnet, option, 0)
        # never the address in the option: 0.0.0.0 must not be located
        addrs, option, _ = ask(located_source_server, "www", "A", subnet, tcp)
        assert addrs == SYD  # 127.0.0.1 is in AU in this database
        assert_echo(subnet, option, 0)


def exchange(running: Running, wire: bytes, tcp: bool) -> bytes:
    """Send raw query bytes and return the raw reply (for what dnspython cannot parse)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(running.addr)
        if not tcp:
            s.send(wire)
            return s.recv(65535)
        s.sendall(struct.pack("!H", len(wire)) + wire)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = s.recv(65535)
            assert chunk, "connection closed before the reply"
            data += chunk
        return data[2:]


@TRANSPORTS
def test_family_zero_source_zero_is_echoed(located_source_server: Running, tcp: bool) -> None:
    # RFC 7871 §7.1.2: FAMILY 0 with SOURCE 0 and no ADDRESS is a valid opt-out
    # (dnspython cannot read FAMILY 0, so dnslib decodes the reply)
    option = dns.edns.GenericOption(dns.edns.OptionType.ECS, b"\x00\x00\x00\x00")
    query = dns.message.make_query("www.example.com", "A", use_edns=0, options=[option])
    reply = dnslib.DNSRecord.parse(exchange(located_source_server, query.to_wire(), tcp))
    assert reply.header.rcode == dns.rcode.NOERROR
    assert {str(rr.rdata) for rr in reply.rr} == SYD
    (opt,) = reply.ar
    assert [(o.code, o.data) for o in opt.rdata] == [(8, b"\x00\x00\x00\x00")]


@TRANSPORTS
def test_private_ecs_is_located_by_the_packet_source(
    located_source_server: Running, tcp: bool
) -> None:
    addrs, option, _ = ask(located_source_server, "www", "A", "10.1.2.0/24", tcp)
    assert addrs == SYD  # 127.0.0.1 -> AU, not the 10/8 of the option
    assert_echo("10.1.2.0/24", option, 8)
    addrs, option, _ = ask(located_source_server, "www", "A", "192.168.7.0/24", tcp)
    assert addrs == SYD
    assert_echo("192.168.7.0/24", option, 16)
    addrs, option, _ = ask(located_source_server, "www", "A", None, tcp)
    assert addrs == SYD and option is None


@contextmanager
def site_states(running: Running, states: dict[str, SiteState]) -> Iterator[None]:
    """Publish these health states on the server's loop; restore the old ones after.

    Every pool gets a new health version, as the health manager would publish, so that
    nothing decided on the old states is reused.
    """
    holder = running.app.holder
    before = holder.view.geo

    async def publish(new_states: Mapping[str, SiteState]) -> None:
        versions = {pool: next_version() for pool in before.pools}
        holder.publish_geo(
            replace(before, states=new_states, version=next_version(), pool_versions=versions)
        )

    running.call(publish(states))
    try:
        yield
    finally:
        running.call(publish(before.states))


DOWN = SiteState(observed=Health.DOWN)


@TRANSPORTS
def test_site_down_moves_clients_to_the_next_nearest(server: Running, tcp: bool) -> None:
    with site_states(server, {"uk": DOWN}):
        addrs, option, _ = ask(server, "www", "A", GB_NET, tcp)
        assert addrs == FRA
        assert_echo(GB_NET, option, 24)  # health is not an input of the scope
        addrs, _, _ = ask(server, "www", "AAAA", US_NET, tcp)
        assert addrs == FRA6  # uk was the nearest with IPv6
        addrs, _, _ = ask(server, "www", "A", DE_NET, tcp)
        assert addrs == FRA  # unaffected
    addrs, _, _ = ask(server, "www", "A", GB_NET, tcp)
    assert addrs == UK


@TRANSPORTS
def test_all_sites_down_answers_nearest(server: Running, tcp: bool) -> None:
    # fail open: a check failing everywhere at once is more likely broken than the fleet
    with site_states(server, dict.fromkeys(("uk", "fra", "iad", "syd"), DOWN)):
        for subnet, expected in ((GB_NET, UK), (DE_NET, FRA), (US_NET, IAD), (AU_NET, SYD)):
            addrs, option, _ = ask(server, "www", "A", subnet, tcp)
            assert addrs == expected
            assert_echo(subnet, option, 24)


# -- the shipped database with the repository's own config and zones -------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    tmp = tmp_path_factory.mktemp("shipped")
    config = load_config(REPO / "geodns.toml")
    database = REPO / "data" / "dbip-country.mmdb"
    assert Path(config.geoip.database) == database
    # State (SQLite, journal, downloaded GeoIP) in tmp, no ops API: nothing touches the
    # repository, and a state/geoip/current.mmdb there cannot replace the shipped file.
    config = replace(
        without_api(config),
        store=replace(
            config.store,
            database_url=f"sqlite:///{tmp}/state.sqlite3",
            journal_dir=str(tmp / "journal"),
        ),
        geoip=replace(config.geoip, state_dir=str(tmp / "geoip")),
    )
    with run_server(config) as running:
        yield running, database


# (ECS prefix, the example's site addresses): geodns.toml's uk, fra, iad
SHIPPED = [
    ("212.58.224.0/24", {"198.51.100.10", "198.51.100.11"}),
    ("81.169.145.0/24", {"198.51.100.20"}),
    ("8.8.8.0/24", {"198.51.100.30"}),
]


@TRANSPORTS
@pytest.mark.parametrize(("subnet", "expected"), SHIPPED, ids=["GB-uk", "DE-fra", "US-iad"])
def test_shipped_database_steers_the_example_zone(
    shipped: tuple[Running, Path], tcp: bool, subnet: str, expected: set[str]
) -> None:
    running, database = shipped
    addrs, option, reply = ask(running, "www", "A", subnet, tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert addrs == expected
    # SCOPE: the database network holding the client, read here with maxminddb itself
    with maxminddb.open_database(str(database)) as reader:
        _, prefix_len = reader.get_with_prefix_len(subnet.split("/")[0])
    assert 0 < prefix_len <= 24
    assert_echo(subnet, option, prefix_len)


def test_pool_all_down_empty_answers_nodata(tmp_path: Path) -> None:
    """`[pools.X] all_down = "empty"`: every member observed DOWN -> NODATA (opt-in)."""
    (tmp_path / "zones").mkdir()
    for name in ("example.com.zone", "example.com.geo.toml"):
        (tmp_path / "zones" / name).write_text((REPO / "zones" / name).read_text())
    body = (
        '[sites.uk]\nipv4 = ["198.51.100.10"]\ncity = "London"\ncountry = "GB"\n'
        '[sites.fra]\nipv4 = ["198.51.100.20"]\ncity = "Frankfurt am Main"\ncountry = "DE"\n'
        '[pools.web]\nmembers = ["uk", "fra"]\nall_down = "empty"\n'
    )
    with run_server(load_config(write_config(tmp_path, body))) as s:
        g = s.app.holder.view.geo
        v = next_version()
        down = {n: SiteState(observed=Health.DOWN) for n in ("uk", "fra")}

        async def publish() -> None:
            s.app.holder.publish_geo(replace(g, states=down, version=v, pool_versions={"web": v}))

        s.call(publish())
        q = dns.message.make_query(
            "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("212.58.224.0", 24)]
        )
        r = dns.query.udp(q, s.host, port=s.port, timeout=3)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer
        assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
