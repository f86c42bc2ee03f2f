"""Micro-benchmark: the cost of response rate limiting (geodns/rrl.py) on the hot path.

    .venv/bin/python bench/rrl_bench.py

Prints nanoseconds per call (the best of several rounds, so a busy machine's noise is
mostly filtered out): `RateLimiter.check` on each of its paths, then one UDP query
answered through `Handler.handle` (a packet cache miss) and through `PacketCache.handle`
(a hit), each with RRL off and on. Queries come from 192.0.2.0/24 at a rate that never
limits, so "on" measures the check, not the dropping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import dns.message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geodns.cache import PacketCache
from geodns.handler import Handler
from geodns.model import Transport
from geodns.rrl import RateLimiter, response_kind
from geodns.view import Catalog, GeoState, View, ViewHolder
from geodns.zones import name_to_wire, parse_zone

ZONE = Path(__file__).resolve().parent.parent / "tests" / "zones" / "example.test.zone"
ROUNDS = 25


def best_ns(fn: Callable[[], object], n: int = 20_000) -> float:
    """Nanoseconds per call of fn: the fastest of ROUNDS rounds of n calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e9)
    return best


def limiter_rows() -> list[tuple[str, float]]:
    kind = response_kind(0, True, name_to_wire("www.example.test."), b"")
    fast = RateLimiter(responses_per_s=1e9, window_s=1.0)  # never limits
    slow = RateLimiter(responses_per_s=1.0, window_s=1.0, slip=2, exempt=())
    slow.check("192.0.2.1", kind, 0.0)  # its only token: limited from now on
    packed = bytes([192, 0, 2, 1])
    empty = best_ns(lambda: None)
    return [
        ("empty call (loop overhead, subtracted below)", empty),
        ("check, IPv4 str, pass", best_ns(lambda: fast.check("192.0.2.1", kind, 1.0)) - empty),
        ("check, IPv4 packed, pass", best_ns(lambda: fast.check(packed, kind, 1.0)) - empty),
        (
            "check, IPv6 str, pass",
            best_ns(lambda: fast.check("2001:db8::1", kind, 1.0)) - empty,
        ),
        ("check, exempt (127.0.0.1)", best_ns(lambda: fast.check("127.0.0.1", kind, 1.0)) - empty),
        ("check, limited (drop/slip)", best_ns(lambda: slow.check("192.0.2.1", kind, 0.5)) - empty),
    ]


def handler(rrl: bool) -> Handler:
    catalog = Catalog()
    catalog.set(name_to_wire("example.test.").lower(), parse_zone(ZONE))
    limiter = RateLimiter(responses_per_s=1e9, window_s=1.0) if rrl else None
    return Handler(ViewHolder(View(catalog, GeoState())), rrl=limiter)


def query_rows() -> list[tuple[str, float]]:
    q = dns.message.make_query("www.example.test.", "A", use_edns=0).to_wire()
    addr = ("192.0.2.1", 5353)
    udp = Transport.UDP
    rows = []
    for rrl in (False, True):
        h = handler(rrl)
        rows.append((f"Handler.handle (miss), RRL {'on' if rrl else 'off'}", 0.0))
        rows[-1] = (rows[-1][0], best_ns(lambda h=h: h.handle(q, addr, udp), 2_000))
    for rrl in (False, True):
        c = PacketCache(handler(rrl))
        c.handle(q, addr, udp)
        label = f"PacketCache.handle (hit), RRL {'on' if rrl else 'off'}"
        rows.append((label, best_ns(lambda c=c: c.handle(q, addr, udp))))
    return rows


def main() -> None:
    print(f"python {sys.version.split()[0]}, best of {ROUNDS} rounds")
    for label, ns in limiter_rows() + query_rows():
        print(f"  {label:48s} {ns:8.0f} ns")


if __name__ == "__main__":
    main()
