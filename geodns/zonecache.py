"""Compiled zones on disk, keyed by content: a restart does not parse unchanged zones.

Only big zones are worth it: with the fast reader a small zone parses about as fast as
its cache file is opened and read (90 vs 75 us, and writing one costs 160 us), while a
million-record zone loads from it in ~2 s instead of parsing in ~5.5 s. The reloader
therefore caches files of at least `CACHE_MIN_BYTES`, and writes them from a separate
process (pickling a million records holds the GIL for seconds).

One file per zone, `<dir>/<key[:2]>/<key>`: a stream of pickles, first the Zone's
header (everything but its nodes, and how many nodes follow), then its nodes as plain
tuples, `CHUNK` nodes per pickle. Loading builds the nodes one chunk at a time, so the
tuples of one chunk are all that exists besides the Zone being built. With one pickle
of the whole Zone, a server warm-started with a 1,000,000-record zone was at 892 MiB
RSS (1,036 MiB peak) and held the GIL for ~0.45 s in one `pickle.loads`; with chunks it
is at 683 MiB (708 MiB peak), less than after parsing the file (bench/zones_scale.py).

The key is a SHA-256 over everything the Zone is built from: the zone file's path and
content hash (which covers the geo overlay too, not the policy tests: they check a
Zone, they do not change it), the pool names when there is an overlay (they decide
whether it is valid), and the source of the modules that build zones and of this one
(the file format), so a code change never serves a stale compilation.
Zones using `$INCLUDE` are not cached (their content is in other files too).

The directory holds pickles, so it must be as private as the rest of the state
directory: it is created 0700, and a file that fails to load is ignored and rewritten.
Nothing here is required for serving; every error degrades to "parse the file".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from . import zonefast, zones
from .zones import Zone, add_nodes, gc_paused, node_tuples, zone_from_state, zone_state

log = logging.getLogger(__name__)


MAGIC = "geodns zone cache 2"
CHUNK = 20_000  # nodes per pickle


def _code_hash() -> bytes:
    h = hashlib.sha256(MAGIC.encode() + b"\0")
    for path in (zones.__file__, zonefast.__file__, __file__):  # this file: the format
        if path:
            with contextlib.suppress(OSError):
                h.update(Path(path).read_bytes())
    return h.digest()


_CODE = _code_hash()


def cacheable(data: bytes) -> bool:
    """False for files whose Zone depends on other files ($INCLUDE)."""
    return b"$include" not in data.lower()


class ZoneCache:
    """Pickled Zones under `directory`, keyed by `key()`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def key(self, path: str, digest: str, pools: Iterable[str] | None) -> str:
        """The cache key of a zone file: path, content digest, pool names, code."""
        h = hashlib.sha256(_CODE)
        h.update(path.encode("utf-8", "surrogateescape") + b"\0" + digest.encode())
        if pools is not None:
            h.update(b"\0pools\0" + "\0".join(sorted(pools)).encode())
        return h.hexdigest()

    def _file(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def get(self, key: str) -> Zone | None:
        """The cached Zone, or None (absent, unreadable or from another version)."""
        try:
            f = open(self._file(key), "rb")  # noqa: SIM115 (closed below, also on errors)
        except OSError:
            self.misses += 1
            return None
        try:
            with f:
                zone = self._load(f)
        except Exception as exc:  # a truncated or foreign file: parse again
            log.debug("zonecache: %s unusable: %s", key, exc)
            zone = None
        if zone is None:
            self.misses += 1
            return None
        self.hits += 1
        return zone

    @staticmethod
    def _load(f: IO[bytes]) -> Zone | None:
        header = pickle.load(f)
        if not (isinstance(header, tuple) and len(header) == 2 and header[0] == MAGIC):
            return None
        state = header[1]
        count = state[2]
        nodes: dict[bytes, Any] = {}
        # an incomplete file raises inside the block, so nothing is frozen (gc_paused)
        with gc_paused(keep=True):
            while len(nodes) < count:
                chunk = pickle.load(f)  # EOFError when the file was cut short
                if not chunk:
                    raise ValueError("an empty chunk")
                add_nodes(nodes, chunk)
            if len(nodes) != count:
                raise ValueError(f"{len(nodes)} nodes, the header says {count}")
            return zone_from_state(state, nodes)

    def put(self, key: str, zone: Zone) -> None:
        """Store a Zone (atomically: readers see the old file, the new one or none)."""
        target = self._file(key)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = target.with_name(f".{key}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f, gc_paused():
                proto = pickle.HIGHEST_PROTOCOL
                pickle.dump((MAGIC, zone_state(zone, len(zone.nodes))), f, protocol=proto)
                chunk: list[Any] = []
                for item in node_tuples(zone):
                    chunk.append(item)
                    if len(chunk) >= CHUNK:
                        pickle.dump(chunk, f, protocol=proto)
                        chunk = []
                if chunk:
                    pickle.dump(chunk, f, protocol=proto)
            os.replace(tmp, target)
        except OSError as exc:
            log.debug("zonecache: cannot write %s: %s", target, exc)

    def prune(self, keep: set[str]) -> int:
        """Delete cached zones whose key is not in `keep`; return how many."""
        removed = 0
        try:
            shards = list(os.scandir(self.directory))
        except OSError:
            return 0
        for shard in shards:
            if not shard.is_dir():
                continue
            with contextlib.suppress(OSError):
                for entry in os.scandir(shard.path):
                    if entry.name not in keep:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                            removed += 1
        return removed
