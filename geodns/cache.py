"""The packet cache: a repeated question is answered with one dict lookup.

The key is the query's bytes after the ID: the question exactly as sent (so 0x20 case
needs no patching), the flags, and the whole OPT record (EDNS presence, version, DO,
payload size and the ECS option with the client's prefix). The reply is stored without
its ID and spliced behind the new ID. Queries with a COOKIE option are never cached
(server cookies are per client and per time). A UDP hit still goes through response
rate limiting (`Handler.rate_limit`, the kind key kept from the miss).

An entry remembers what its reply depended on and is checked on every hit, so a cached
answer is never served across a change:
  - the zone snapshot that answered (identity: a reload publishes a new object) and the
    catalog generation (zones added or removed change the longest match);
  - the health version of each geo pool the answer used (a health flip, override or its
    expiry publishes new versions for the pools of that site only, not one global
    generation);
  - the GeoIP database generation.
A geo answer decided on the packet source (no usable ECS) is kept per source /24
(IPv4) or /56 (IPv6), and only when the decision's scope is no longer than that, i.e.
the answer is the same for the whole network.

Shuffled answers (a pool's `answer_order = "shuffle"`) are one of a few orderings
(`CacheInfo.rotations`): the entry keeps one reply per ordering (and per source network
when located by the source) and serves them in turn, so a hit costs one more dict
lookup and the weights hold over consecutive answers. Answers with more orderings
than balance.MAX_ROTATIONS are not cached.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .balance import MAX_ROTATIONS
from .handler import CacheInfo, Handler
from .model import Transport

_UDP = Transport.UDP  # a module global: enum attribute lookups are slow on the hot path
SOURCE_PREFIX_V4 = 24
SOURCE_PREFIX_V6 = 56


@dataclass(slots=True)
class _Entry:
    epoch: int  # catalog.changes when last known valid
    info: CacheInfo
    tail: bytes | None  # reply[2:] when the reply is the same for every source and turn
    # (source network or "", rotation) -> (reply[2:], what it answered) for answers
    # located by the source and/or shuffled
    variants: dict[tuple[str, int], tuple[bytes, CacheInfo]] | None
    turn: int = 0  # the next rotation of a shuffled answer


def _source_key(host: str) -> tuple[str, int]:
    """The client's /24 (IPv4) or /56 (IPv6) as a string key, and its prefix length."""
    if ":" not in host:
        return host.rpartition(".")[0], SOURCE_PREFIX_V4
    addr = ipaddress.IPv6Address(host.split("%")[0])
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped).rpartition(".")[0], SOURCE_PREFIX_V4
    return addr.packed[:7].hex(), SOURCE_PREFIX_V6


class PacketCache:
    """Wraps a Handler; `handle` has the same signature and the same replies."""

    def __init__(self, handler: Handler, max_entries: int = 100_000) -> None:
        self.handler = handler
        self.catalog = handler.holder.view.catalog  # shared by every View
        self.max_entries = max_entries
        self.udp: dict[bytes, _Entry] = {}
        self.tcp: dict[bytes, _Entry] = {}
        # questions answered once and not cached yet, per transport (see `_admit`):
        # plain bytes, so the cyclic collector walks a set, not an entry per question
        self.seen_udp: set[bytes] = set()
        self.seen_tcp: set[bytes] = set()
        self.misses = 0
        self.stats = handler.stats

    @property
    def hits(self) -> int:
        """Answers served from the cache (counted per entry, folded when read)."""
        return self.stats.cache_hits

    def _valid(self, info: CacheInfo) -> bool:
        h = self.handler
        view = h.holder.view
        catalog = view.catalog
        if catalog.generation != info.catalog_generation:
            return False
        if info.zone_key is not None:
            # the zone that answered, if it is still alive, must still be the published
            # one (a dead reference is never valid: None is also "unloaded" in the catalog)
            zone = info.zone() if info.zone is not None else None
            if zone is None or catalog.zones.get(info.zone_key) is not zone:
                return False
        if info.pools:
            versions = view.geo.pool_versions
            for pool, version in info.pools:
                if versions.get(pool, 0) != version:
                    return False
            if info.geo_generation != h.geo_generation:
                return False
        return True

    def handle(self, data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        """Answer from the cache when the entry is still valid, else through the handler."""
        cache = self.udp if transport is _UDP else self.tcp
        key = data[2:]
        entry = cache.get(key)
        changes = self.catalog.changes
        turn: int | None = None
        if entry is not None and (entry.epoch == changes or self._revalidate(entry, changes)):
            tail = entry.tail
            hit_info = entry.info
            if tail is None and entry.variants is not None:
                source = _source_key(addr[0])[0] if hit_info.by_source else ""
                rotation = 0
                if hit_info.rotations > 1:
                    turn = entry.turn
                    entry.turn = turn + 1
                    rotation = turn % hit_info.rotations
                hit = entry.variants.get((source, rotation))
                if hit is not None:
                    tail, hit_info = hit
            if tail is not None:
                if entry.info.rrl_kind:
                    # RRL: a hit is charged like the miss that made it (UDP only)
                    limited = self.handler.rate_limit(data, addr, entry.info.rrl_kind)
                    if limited is not None:
                        return limited or None
                # counted on the entry, folded into the statistics when they are read
                self.stats.tally(hit_info)
                return data[:2] + tail
        self.misses += 1
        reply, info = self.handler.process(data, addr, transport, turn)
        if reply is None or info is None or len(data) < 12:
            return reply
        if entry is None and not self._admit(key, transport is _UDP):
            return reply
        if len(cache) >= self.max_entries:
            cache.clear()  # simple and bounded; a full cache refills in one pass
        if not info.by_source and info.rotations == 1:
            cache[key] = _Entry(changes, info, reply[2:], None)
            return reply
        if info.rotations > MAX_ROTATIONS:
            return reply  # too many orderings to keep: not cached
        source = ""
        if info.by_source:
            source, width = _source_key(addr[0])
            if info.scope > width:
                return reply  # the answer differs inside the client's /24 (/56): not cached
        if (
            entry is None
            or entry.variants is None
            or not self._valid(entry.info)
            or not self._same(entry.info, info)
        ):
            # the turn goes on from the one this reply took
            entry = _Entry(changes, info, None, {}, info.turn + 1)
            cache[key] = entry
        assert entry.variants is not None
        entry.variants[(source, info.turn % info.rotations)] = (reply[2:], info)
        return reply

    def _admit(self, key: bytes, udp: bool) -> bool:
        """True the second time a question misses (a doorkeeper, as in TinyLFU).

        A flood of names asked once (random subdomains) would otherwise fill the cache
        with entries never hit again, empty it when full, and leave hundreds of thousands
        of entry objects for the cyclic collector: full collections of 20-38 ms each,
        every second or two, with the GIL held (bench/README.md)."""
        seen = self.seen_udp if udp else self.seen_tcp
        if key in seen:
            seen.discard(key)
            return True
        if len(seen) >= self.max_entries:
            seen.clear()
        seen.add(key)
        return False

    def _revalidate(self, entry: _Entry, changes: int) -> bool:
        """Something was published since the entry was checked: check what it used."""
        if self._valid(entry.info):
            entry.epoch = changes
            return True
        return False

    def _same(self, a: CacheInfo, b: CacheInfo) -> bool:
        """Two answers made from the same data (so one entry can hold both sources)."""
        return (
            (a.zone() if a.zone else None) is (b.zone() if b.zone else None)
            and a.catalog_generation == b.catalog_generation
            and a.pools == b.pools
            and a.geo_generation == b.geo_generation
            and a.by_source == b.by_source
            and a.rotations == b.rotations
        )

    def clear(self) -> None:
        self.udp.clear()
        self.tcp.clear()
        self.seen_udp.clear()
        self.seen_tcp.clear()
