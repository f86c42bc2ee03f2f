"""The View: everything the DNS path reads, published by writers with one assignment.

Zones live in one dict shared by every View, keyed by origin (lower-case wire): a zone
edit replaces one entry (a single, atomic dict assignment), so one zone's reload never
copies or invalidates the other 100,000. Everything geo (sites, pools, health) is an
immutable `GeoState`; a health change publishes a new one with a higher version.
The DNS path never reads a clock, the DB or a file: it reads `holder.view`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from .model import Pool, PoolBalance, Site, SiteState
from .zones import Zone

_versions = itertools.count(1)


def next_version() -> int:
    """A process-wide increasing number for zone and health versions."""
    return next(_versions)


@dataclass(frozen=True)
class GeoState:
    """Sites, pools and their effective health at one moment."""

    sites: Mapping[str, Site] = field(default_factory=dict)
    pools: Mapping[str, Pool] = field(default_factory=dict)
    states: Mapping[str, SiteState] = field(default_factory=dict)
    version: int = 0
    # pool name -> version of the last change that affects it (for cache keys)
    pool_versions: Mapping[str, int] = field(default_factory=dict)
    # pool name -> capacity spill-over measured over its last window (see balance.py)
    balance: Mapping[str, PoolBalance] = field(default_factory=dict)


class Catalog:
    """origin -> Zone (loaded) or None (configured but not loaded: SERVFAIL)."""

    def __init__(self) -> None:
        self.zones: dict[bytes, Zone | None] = {}
        # Held while anything the DNS path reads is changed (a zone published or
        # removed, a geo state, the GeoIP database) and while the DNS path answers
        # (a UDP batch on the receive thread, a TCP query on the event loop): with
        # `[server] udp_thread` those run on two threads, and each sees a whole change
        # or none of it. Re-entrant: a holder may publish.
        self.lock = threading.RLock()
        # bumped when a zone is added or removed (that changes which zone is the
        # longest match for some names); replacing a zone's snapshot does not bump it
        self.generation = 0
        # bumped by every publish of anything (zone, health, GeoIP): the packet cache's
        # fast path — an entry made at the current value needs no further checks
        self.changes = 0
        # bumped when any zone is published or removed (not by health or GeoIP): the
        # fast path's pre-rendered answers (fastpath.py) are dropped when it moves
        self.zone_changes = 0

    def set(self, origin: bytes, zone: Zone | None) -> None:
        """Publish one zone snapshot (or mark it unloaded); other zones are untouched."""
        if zone is not None and zone.version == 0:
            zone = replace(zone, version=next_version())
        with self.lock:
            if self.zones.get(origin) is None:
                # a new zone, or one that was SERVFAIL until now: answers cached without
                # it (REFUSED, SERVFAIL, a parent zone's) must not be reused
                self.generation += 1
            self.zones[origin] = zone
            self.zone_changes += 1
            self.changes += 1

    def remove(self, origin: bytes) -> None:
        """Forget a zone: its names are REFUSED afterwards."""
        with self.lock:
            if origin in self.zones:
                del self.zones[origin]
                self.generation += 1
                self.zone_changes += 1
                self.changes += 1

    def find(self, qname: bytes, offsets: tuple[int, ...], qtype: int) -> tuple[bool, Zone | None]:
        """Longest-suffix match in O(labels): (found, zone-or-None-if-unloaded).

        RFC 4035 §3.1.4.1: a DS query for the apex of a child zone we also serve is
        answered from the parent side, so it skips the child.
        """
        zones = self.zones
        found: tuple[bool, Zone | None] = (False, None)
        for i in (*offsets, len(qname) - 1):
            suffix = qname[i:]
            if suffix in zones:
                if qtype == 43 and i == 0 and not found[0]:
                    found = (True, zones[suffix])
                    continue
                return True, zones[suffix]
        return found


@dataclass(frozen=True)
class View:
    """One consistent snapshot for answering."""

    catalog: Catalog
    geo: GeoState


class ViewHolder:
    """Holds the current View; writers publish, readers read `holder.view`."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.generation = 0
        # called (in the publishing thread, after the swap) on every new geo state: how
        # --workers hears of health changes without polling (workers.py)
        self.geo_listeners: list[Callable[[], None]] = []

    def publish_geo(self, geo: GeoState) -> None:
        """Replace the geo state (sites, pools, health) in one assignment."""
        catalog = self.view.catalog
        with catalog.lock:
            self.generation += 1
            self.view = View(catalog, geo)
            catalog.changes += 1
        for listener in self.geo_listeners:
            listener()
