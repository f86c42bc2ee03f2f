"""Compiled zones on disk, keyed by content: a restart does not parse unchanged zones.

Only big zones are worth it: with the fast reader a small zone parses about as fast as
its cache file is opened and read (90 vs 75 us, and writing one costs 160 us), while a
million-record zone unpickles in ~1.5 s instead of parsing in ~10 s. The reloader
therefore caches files of at least `CACHE_MIN_BYTES`, and writes them from a separate
process (pickling a million records holds the GIL for seconds).

One file per zone, `<dir>/<key[:2]>/<key>`, holding the pickled Zone (its compact
`__reduce__` form). The key is a SHA-256 over everything the Zone is built from: the
zone file's path and content hash (which covers the geo overlay too, not the policy
tests: they check a Zone, they do not change it), the pool names when there is an
overlay (they decide whether it is valid), and the source of the modules that build
zones, so a code change never serves a stale compilation.
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

from . import zonefast, zones
from .zones import Zone, gc_paused

log = logging.getLogger(__name__)


def _code_hash() -> bytes:
    h = hashlib.sha256(b"geodns zonecache 1\0")
    for module in (zones, zonefast):
        path = module.__file__
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
            data = self._file(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        try:
            with gc_paused(keep=True):
                zone = pickle.loads(data)
        except Exception as exc:  # a truncated or foreign file: parse again
            log.debug("zonecache: %s unusable: %s", key, exc)
            self.misses += 1
            return None
        if not isinstance(zone, Zone):
            self.misses += 1
            return None
        self.hits += 1
        return zone

    def put(self, key: str, zone: Zone) -> None:
        """Store a Zone (atomically: readers see the old file, the new one or none)."""
        target = self._file(key)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = target.with_name(f".{key}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f, gc_paused():
                pickle.dump(zone, f, protocol=pickle.HIGHEST_PROTOCOL)
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
