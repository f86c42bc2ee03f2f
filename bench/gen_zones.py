"""Write N small customer zones (~10 records each), optionally sharded, plus geo overlays.

    python bench/gen_zones.py OUT_DIR --zones 100000 [--shard] [--geo 50]
    python bench/gen_zones.py OUT_DIR --big 1000000      # one zone of 1,000,000 records

Small zones are named `<10 hex digits>.example.` (deterministic: the i-th zone has the
same name on every run); with --shard they go to OUT_DIR/<c1>/<c2>/<origin>.zone, as a
hosting provider shards by the first letters of the origin. The first --geo zones get a
`<origin>.geo.toml` steering `www` with pool "web" (the config must define that pool;
bench/zones_scale.py writes one). Imported by tests/test_zone_scale.py.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

SMALL = """$ORIGIN {origin}
$TTL 3600
@       IN SOA  ns1.hoster.test. hostmaster.hoster.test. ( {serial} 7200 3600 1209600 300 )
@       IN NS   ns1.hoster.test.
@       IN NS   ns2.hoster.test.
@       IN A    {a}
@       IN AAAA 2001:db8:{i4:x}::1
www     IN A    {a}
www     IN AAAA 2001:db8:{i4:x}::1
mail    IN A    {a2}
@       IN MX   10 mail
@       IN TXT  "v=spf1 mx -all"
ftp     IN CNAME www
"""

GEO = """[names.www]
pool = "web"
"""


def zone_origin(i: int) -> str:
    """The i-th generated zone's origin (no trailing dot is added by the caller)."""
    return hashlib.sha1(str(i).encode()).hexdigest()[:10] + ".example."


def zone_path(out: Path, origin: str, shard: bool) -> Path:
    if shard:
        return out / origin[0] / origin[1] / f"{origin}zone"
    return out / f"{origin}zone"


def small_zone(i: int, serial: int = 1) -> str:
    """Zone text for the i-th zone (11 records)."""
    a = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    a2 = f"10.{(i >> 16 & 255) | 128}.{i >> 8 & 255}.{i & 255}"
    return SMALL.format(origin=zone_origin(i), serial=serial, a=a, a2=a2, i4=i & 0xFFFF)


def write_small_zones(out: Path, n: int, shard: bool = False, geo: int = 0) -> list[Path]:
    """Write n zones (and `geo` overlays) under out; return the zone paths in order."""
    paths = []
    made: set[Path] = set()
    for i in range(n):
        origin = zone_origin(i)
        path = zone_path(out, origin, shard)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_text(small_zone(i))
        if i < geo:
            path.with_name(f"{origin}geo.toml").write_text(GEO)
        paths.append(path)
    return paths


def big_zone(n: int, origin: str = "big.test.", serial: int = 1) -> str:
    """One zone of about n records: mostly A, some AAAA, TXT, MX, CNAME."""
    lines = [
        f"$ORIGIN {origin}",
        "$TTL 300",
        f"@ IN SOA ns1 hostmaster ( {serial} 7200 3600 1209600 300 )",
        "@ IN NS ns1",
        "@ IN NS ns2",
        "ns1 IN A 192.0.2.1",
        "ns2 IN A 192.0.2.2",
        "www IN A 192.0.2.80",
    ]
    for i in range(n - len(lines) + 2):
        k = i % 10
        a = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if k < 6:
            lines.append(f"h{i} IN A {a}")
        elif k == 6:
            lines.append(f"h{i} 600 IN AAAA 2001:db8::{i & 0xFFFF:x}:{i >> 16:x}")
        elif k == 7:
            lines.append(f'h{i} IN TXT "host {i}" "rack {i % 97}"')
        elif k == 8:
            lines.append(f"h{i} IN MX 10 h{i - 1}")
        else:
            lines.append(f"h{i} IN CNAME h{i - 2}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="zone directory to write into")
    ap.add_argument("--zones", type=int, default=0, help="number of small zones")
    ap.add_argument("--shard", action="store_true", help="OUT/<c1>/<c2>/<origin>.zone")
    ap.add_argument("--geo", type=int, default=0, help="overlays for the first N zones")
    ap.add_argument("--big", type=int, default=0, help="also write big.test.zone of N records")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.zones:
        write_small_zones(args.out, args.zones, args.shard, args.geo)
    if args.big:
        (args.out / "big.test.zone").write_text(big_zone(args.big))
    print(f"wrote {args.zones} small zones{' + big.test.' if args.big else ''} to {args.out}")


if __name__ == "__main__":
    main()
