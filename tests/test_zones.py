"""Zone loading: every problem reported as file:line, a bad zone rejected whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from geodns.errors import ZoneError
from geodns.model import Pool
from geodns.zones import AAAA, CNAME, MX, NS, SOA, TXT, A, name_to_wire, parse_zone

HEAD = """$ORIGIN t.test.
$TTL 300
@ IN SOA ns1 host 1 7200 3600 1209600 60
@ IN NS ns1
ns1 IN A 192.0.2.1
"""


def write(tmp_path: Path, body: str, name: str = "t.test.zone") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


BROKEN = [
    ("syntax", HEAD + "www IN A 300.1.1.1\n", r"t.test.zone:6: "),
    ("bad-type", HEAD + "www IN NOTATYPE foo\n", r"t.test.zone:6: "),
    (
        "missing-soa",
        "$ORIGIN t.test.\n@ 300 IN NS ns1\nns1 300 IN A 192.0.2.1\n",
        "no SOA record at the zone apex",
    ),
    ("two-soa", HEAD + "@ IN SOA ns2 host 2 7200 3600 1209600 60\n", "more than one SOA"),
    (
        "soa-not-apex",
        HEAD + "sub IN SOA ns1 host 1 7200 3600 1209600 60\n",
        "t.test.zone:6: SOA record at sub.t.test., which is not the apex",
    ),
    (
        "no-ns",
        "$ORIGIN t.test.\n@ 300 IN SOA ns1 host 1 2 3 4 5\n",
        "no NS records at the zone apex",
    ),
    (
        "cname-and-other",
        HEAD + "www IN CNAME ns1\nwww IN A 192.0.2.2\n",
        "t.test.zone:6: CNAME at www.t.test. beside other data (A)",
    ),
    ("two-cnames", HEAD + "www IN CNAME ns1\nwww IN CNAME ns2\n", "more than one CNAME"),
    (
        "occluded",
        HEAD + 'child IN NS ns.child\nns.child IN A 192.0.2.9\nx.child IN TXT "hidden"\n',
        "t.test.zone:8: TXT at x.child.t.test. is occluded by the delegation at child.t.test.",
    ),
    (
        "out-of-zone",
        HEAD + "www.other.test. IN A 192.0.2.2\n",
        "t.test.zone:6: www.other.test. is outside the zone t.test.",
    ),
    (
        "dnssec-rrsig",
        HEAD + "www IN RRSIG A 13 3 300 20300101000000 20200101000000 1 t.test. AAAA\n",
        "DNSSEC-signed zones are not supported",
    ),
    ("dnssec-dnskey", HEAD + "@ IN DNSKEY 257 3 13 AAAA\n", "DNSKEY record"),
    (
        "ds-not-at-cut",
        HEAD + "www IN DS 1 13 2 " + "00" * 32 + "\n",
        "DS at www.t.test., which is not a delegation",
    ),
    ("empty", "", "t.test.zone:1: empty zone file"),
    ("truncated", HEAD + "www IN A 192.0.2.2\nmx IN MX 10 (\n", "t.test.zone:"),
    ("missing-include", HEAD + "$INCLUDE nothere.inc\n", "nothere.inc"),
    (
        "dname-apex-occludes",
        HEAD + "@ IN DNAME example.net.\nwww IN A 192.0.2.2\n",
        "t.test.zone:7: www.t.test. is occluded by the DNAME at the apex (RFC 6672 §2.4)",
    ),
]


@pytest.mark.parametrize(
    ("body", "expect"), [(b, e) for _, b, e in BROKEN], ids=[i for i, _, _ in BROKEN]
)
def test_broken_zone_is_rejected_with_file_and_line(tmp_path: Path, body: str, expect: str) -> None:
    with pytest.raises(ZoneError) as err:
        parse_zone(write(tmp_path, body))
    assert any(expect in p for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    body = HEAD + "www IN CNAME ns1\nwww IN A 192.0.2.2\nwww.other.test. IN A 192.0.2.3\n"
    with pytest.raises(ZoneError) as err:
        parse_zone(write(tmp_path, body))
    assert len(err.value.problems) == 2
    assert all(p.startswith(str(tmp_path)) for p in err.value.problems)


def test_rfc1035_syntax_features(tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "hosts.inc").write_text("host1 IN A 192.0.2.11\n")
    body = """$ORIGIN t.test.
$TTL 1h
@   IN SOA ns1 host (
        2024010101 ; serial
        7200 3600 1209600
        60 )
    IN NS ns1          ; owner inherited from the previous line
ns1 IN A 192.0.2.1
$INCLUDE inc/hosts.inc sub.t.test.
txt IN TXT "a b" "c\\"d"
srv._tcp 120 IN SRV 1 2 3 ns1
caa IN CAA 0 issue "ca.example"
naptr IN NAPTR 10 20 "S" "SIP+D2U" "" _sip._udp
ptr IN PTR ns1.t.test.
unk IN TYPE65534 \\# 3 010203
ds-less IN AAAA 2001:db8::1
after 30 IN A 192.0.2.2
"""
    z = parse_zone(write(tmp_path, body))
    assert z.origin_text == "t.test."
    assert z.serial == 2024010101
    assert z.neg_ttl == 60  # RFC 2308 §3: min(SOA TTL 3600, MINIMUM 60)
    node = z.nodes[name_to_wire("host1.sub.t.test.")]  # $INCLUDE with its own origin
    assert node[A].rdata == (bytes([192, 0, 2, 11]),)
    assert z.nodes[name_to_wire("unk.t.test.")][65534].rdata == (b"\x01\x02\x03",)
    assert z.nodes[name_to_wire("srv._tcp.t.test.")][33].ttl == 120
    assert z.nodes[name_to_wire("txt.t.test.")][TXT].rdata == (b'\x03a b\x03c"d',)
    # the zone file's case is kept for owners; lookups are by lower case
    assert name_to_wire("_tcp.t.test.") in z.nodes  # empty non-terminal
    assert {NS, SOA} <= set(z.nodes[z.origin])
    assert AAAA in z.nodes[name_to_wire("ds-less.t.test.")]
    assert MX not in z.nodes[z.origin] and CNAME not in z.nodes[z.origin]


def test_geo_overlay_errors_name_file_and_key(tmp_path: Path) -> None:
    zone = write(tmp_path, HEAD + "www IN A 192.0.2.80\n")
    (tmp_path / "t.test.geo.toml").write_text(
        '[names.www]\npool = "nope"\n[names.www2]\npool = "web"\n'
        '[names.api]\npool = "web"\nttl = 5\n'
    )
    pools = {"web": Pool("web", ("uk",))}
    with pytest.raises(ZoneError) as err:
        parse_zone(zone, pools)
    text = "\n".join(err.value.problems)
    assert "t.test.geo.toml: names.www.pool: unknown pool 'nope'" in text
    assert "names.api.ttl: unknown key" in text


def test_geo_name_needs_a_fallback_record(tmp_path: Path) -> None:
    zone = write(tmp_path, HEAD)
    (tmp_path / "t.test.geo.toml").write_text('[names.www]\npool = "web"\n')
    with pytest.raises(ZoneError) as err:
        parse_zone(zone, {"web": Pool("web", ("uk",))})
    assert "no record in the zone file" in err.value.problems[0]
