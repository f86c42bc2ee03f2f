"""The fast zone-file reader against dnspython's: identical records, Zones and errors.

zonefast.read_fast() either returns exactly the records dnspython's reader gives (owner,
TTL, type, rdata, canonical form, compression parts, targets, file:line) or raises
Fallback; parse_zone(fast=True) and parse_zone(fast=False) must then build identical
Zones, or reject the file with identical `file:line` problems. Checked on the shipped
zones, the broken zones of test_zones.py, the benchmark generator's zones, and zone
files that hypothesis assembles from common and unusual pieces (deterministic, bounded).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.gen_zones import big_zone, small_zone, zone_origin
from geodns.errors import ZoneError
from geodns.model import Pool
from geodns.zonefast import Fallback, read_fast
from geodns.zones import Zone, load_zone, name_to_wire, read_records_full
from tests.test_zones import BROKEN

REPO = Path(__file__).resolve().parent.parent
POOLS = {"web": Pool("web", ("uk",))}
SHIPPED = sorted((REPO / "tests" / "zones").glob("*.zone")) + sorted(
    (REPO / "zones").glob("*.zone")
)


def fields(zone: Zone) -> dict[str, Any]:
    """Everything a Zone holds except when it was loaded."""
    return {
        f.name: getattr(zone, f.name) for f in dataclasses.fields(zone) if f.name != "loaded_at"
    }


def outcome(path: Path, fast: bool) -> tuple[str, Any]:
    try:
        return "zone", fields(load_zone(path, POOLS, fast=fast))
    except ZoneError as exc:
        return "error", exc.problems


def check_same(path: Path) -> bool:
    """Assert both readers agree on `path`; True if the fast reader handled it."""
    text = path.read_text()
    origin = path.name[: -len(".zone")].lower() + "."
    try:
        fast = read_fast(text, str(path), name_to_wire(origin))
    except Fallback:
        fast = None
    if fast is not None:
        full, problems = read_records_full(text, path, origin)
        assert fast == full
        assert problems == []
    assert outcome(path, True) == outcome(path, False)
    return fast is not None


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_zones_read_the_same(path: Path) -> None:
    check_same(path)


def test_shipped_zone_without_escapes_takes_the_fast_path(tmp_path: Path) -> None:
    """example.test.zone has escapes (full reader); the rest of it is the fast one's."""
    lines = (REPO / "tests" / "zones" / "example.test.zone").read_text().splitlines()
    kept = [line for line in lines if "\\" not in line and "TYPE65534" not in line]
    path = tmp_path / "example.test.zone"
    path.write_text("\n".join(kept) + "\n")
    check_same(path)


@pytest.mark.parametrize("body", [b for _, b, _ in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken_zones_are_rejected_the_same(tmp_path: Path, body: str) -> None:
    path = tmp_path / "t.test.zone"
    path.write_text(body)
    kind, _ = outcome(path, True)
    assert kind == "error"
    check_same(path)


def test_generated_zones_take_the_fast_path(tmp_path: Path) -> None:
    for i in (7, 123456):
        path = tmp_path / f"{zone_origin(i)}zone"
        path.write_text(small_zone(i))
        assert check_same(path)
    path = tmp_path / "b.test.zone"
    path.write_text(big_zone(2000, "b.test."))
    assert check_same(path)


# -- zone files assembled by hypothesis ------------------------------------------------

ORIGIN = "f.test."
LONG = "x" * 63
# (clean choices, unusual or wrong ones); a file's `noise` decides how often the second
# list is used: never, now and then, often
OWNERS = (
    ["@", "www", "WWW", "a.b", "*.w", "sub", "_sip._tcp", "-x", "f.test.", "Mail.F.TEST.",
     LONG, "x.y.z", "in", "300"],
    ["out.other.", LONG + "y", "a..b", "\\065bc", '"q"', "é", "$x"],
)  # fmt: skip
NAMES = (
    ["@", "ns1", "NS1", "ns1.f.test.", "mail", "www.other.", ".", LONG,
     ".".join([LONG] * 3)],
    ["a..", LONG + "z", ".".join([LONG] * 4), '"ns1"', "x\\.y"],
)  # fmt: skip
TTLS = (["", "", "", "300", "0", "1h", "1H30m", "2w", "4294967295", "01"], ["4294967296", "1x"])
CLASSES = (["", "", "IN", "in"], ["CH", "CLASS1"])
IPV4 = (["192.0.2.1", "10.0.0.255", "0.0.0.0"], ["1.2.3", "01.2.3.4", "256.1.1.1", "1.2.3.4 x"])
IPV6 = (
    ["::1", "2001:db8::1", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::ffff:1.2.3.4", "::",
     "1:2:3:4:5:6::7", "ABCD::ef", "::1:2:3:4:5:6:7", "0001:0:0::"],
    ["1::2::3", "fe80::1%eth0", "12345::", ":1::", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7"],
)  # fmt: skip
TXTS = (
    ['"hello world"', '"a;b"', '""', "plain", '"(paren)"', '"x" "y"', '"' + "t" * 255 + '"',
     "v=spf1 -all"],
    ['"' + "t" * 256 + '"', 'a"b"', '"a""b"', '"a"b', '"unterminated'],
)  # fmt: skip
NUMS = (["0", "10", "65535", "010"], ["65536", "x"])
SOA_TIMES = (["1 7200 3600 1209600 60", "2 1h 30m 1w 5M"], ["x 1 2 3 4", "4294967296 1 2 3 4",
                                                          "1 2 3 4"])  # fmt: skip
TYPES = (
    ["A", "a", "AAAA", "NS", "CNAME", "PTR", "MX", "MX", "TXT", "TXT", "SRV"],
    ["SOA", "CAA 0 issue \"ca.example\"", "TYPE65534 \\# 1 00", "NOTATYPE x", "DNAME d.other.",
     "DS 1 13 2 " + "00" * 32, "HINFO a b", "ANY 1", ""],
)  # fmt: skip
OTHER_LINES = (
    ["", "; comment", "   ", "$TTL 300", "$TTL 1h", "$ttl 60", "$ORIGIN sub", "$ORIGIN f.test.",
     "$origin Sub.F.Test.", "$ORIGIN @", "( )"],
    ["$TTL bad", "$GENERATE 1-3 h$ A 10.0.0.$", "$INCLUDE nothere.inc", "$TTL", ")", "(",
     " $TTL 5", "$ORIGIN a b"],
)  # fmt: skip
COMMENTS = ([" ; comment", ";c", ' ; "quoted" comment', "\t", " ;("], ["\r"])


def pick(draw: st.DrawFn, choices: tuple[list[str], list[str]], noise: int) -> str:
    clean, unusual = choices
    if noise and draw(st.integers(0, 99)) < (4 if noise == 1 else 30):
        return draw(st.sampled_from(unusual))
    return draw(st.sampled_from(clean))


@st.composite
def rdata(draw: st.DrawFn, noise: int) -> str:
    kind = pick(draw, TYPES, noise)
    name = pick(draw, NAMES, noise)
    num = pick(draw, NUMS, noise)
    if kind in ("A", "a"):
        return f"{kind} {pick(draw, IPV4, noise)}"
    if kind == "AAAA":
        return f"AAAA {pick(draw, IPV6, noise)}"
    if kind in ("NS", "CNAME", "PTR"):
        return f"{kind} {name}"
    if kind == "MX":
        return f"MX {num} {name}"
    if kind == "TXT":
        n = draw(st.integers(1 if not noise else 0, 3))
        return "TXT " + " ".join(pick(draw, TXTS, noise) for _ in range(n))
    if kind == "SRV":
        return f"SRV {num} 1 {num} {name}"
    if kind == "SOA":
        times = pick(draw, SOA_TIMES, noise)
        if draw(st.booleans()):
            return f"SOA ns1 host ( {times} )"
        return f"SOA {name} host.f.test. {times}"
    return kind


@st.composite
def record(draw: st.DrawFn, noise: int) -> str:
    owner = draw(st.sampled_from([" ", "\t"])) if draw(st.booleans()) else ""
    if not owner:
        owner = pick(draw, OWNERS, noise)
    ttl, cls = pick(draw, TTLS, noise), pick(draw, CLASSES, noise)
    middle = [ttl, cls] if draw(st.booleans()) else [cls, ttl]
    data = draw(rdata(noise))
    if draw(st.integers(0, 5)) == 0 and " " in data:  # parentheses across lines
        t, rest = data.split(" ", 1)
        data = f"{t} (\n  {rest} ; wrapped\n )"
    elif draw(st.integers(0, 9)) == 0 and " " in data:
        t, rest = data.split(" ", 1)
        data = f"{t} ( {rest} )"
    sep = draw(st.sampled_from([" ", "\t", "  "]))
    line = sep.join(x for x in [owner.strip(" \t"), *middle, data] if x)
    if owner in (" ", "\t"):
        line = owner + line
    if draw(st.integers(0, 4)) == 0:
        line += pick(draw, COMMENTS, noise)
    return line


@st.composite
def zone_text(draw: st.DrawFn) -> str:
    noise = draw(st.sampled_from([0, 0, 1, 2]))
    head = draw(st.sampled_from(HEADERS))
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 3)):
            lines.append(draw(record(noise)))
        else:
            lines.append(pick(draw, OTHER_LINES, noise))
    return head + "\n".join(lines) + "\n"


HEADERS = [
    "$TTL 300\n@ IN SOA ns1 host 1 7200 3600 1209600 60\n@ IN NS ns1\nns1 IN A 192.0.2.1\n",
    "@ 3600 IN SOA ns1 host ( 1 2 3 4 5 )\n  IN NS ns1\nns1 A 192.0.2.1\n",
    "@ IN SOA ns1 host 1 2 3 4 60\n@ NS ns1.f.test.\n",
    "",
]


@settings(
    max_examples=500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=zone_text(), crlf=st.integers(0, 29))
def test_random_zone_files_read_the_same(tmp_path: Path, text: str, crlf: int) -> None:
    if crlf == 0:
        text = text.replace("\n", "\r\n")
    path = tmp_path / f"{ORIGIN}zone"
    path.write_text(text)
    check_same(path)


# -- big files are scanned and split a slice at a time ----------------------------------
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.text(alphabet=st.sampled_from(["a", " ", "\n", "\t", ";", "\\", "é", "\x01", "("])),
    st.integers(1, 9),
)
def test_slices_give_the_same_lines_and_verdict_as_one_pass(text: str, slice_: int) -> None:
    import geodns.zonefast as zf

    old = zf.SLICE
    zf.SLICE = slice_
    try:
        assert zf._split_lines(text) == text.split("\n")
        assert zf._unusual(text) == bool(zf._UNUSUAL.search(text))
    finally:
        zf.SLICE = old


def test_a_big_zone_is_read_the_same_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.test.zone"
    path.write_text(big_zone(3000))
    whole = load_zone(path)
    monkeypatch.setattr("geodns.zonefast.SLICE", 101)
    assert fields(load_zone(path)) == fields(whole)


def test_a_big_zone_is_frozen_out_of_the_collectors_sight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a big build leaves is moved out of the cyclic collector's sight (gc.freeze):
    the next collections do not walk it (0.9 s each with the GIL held for 1M records).
    A broken big file freezes nothing: what it built is garbage."""
    import gc

    monkeypatch.setattr("geodns.zones.BIG_TEXT", 1000)
    path = tmp_path / "big.test.zone"
    path.write_text(big_zone(2000))
    before = gc.get_freeze_count()
    z = load_zone(path)
    assert gc.get_freeze_count() - before >= z.records
    assert gc.isenabled()
    path.write_text(big_zone(2000) + "bad IN A 300.1.2.3\n")
    before = gc.get_freeze_count()
    with pytest.raises(ZoneError):
        load_zone(path)
    assert gc.get_freeze_count() <= before  # frozen objects may die; none were added
    assert gc.isenabled()
