"""Zone edits via files: notice changes, reload one zone at a time, never break serving.

Sources of change: inotify through `watchfiles` (polling with mtime + size as a
fallback), SIGHUP and POST /v1/reload (both call `reload_all()`). A changed file is
re-read only once it has stopped changing for `debounce_s` (editors, rsync and
`git checkout` write in several steps), parsed off the event loop, and published with
one dict assignment: a query sees the old zone or the new one, never a mix. A broken
edit keeps the last good version serving and records the error (file:line) for
/v1/zones, /readyz and metrics. A deleted file removes its zone only after it has been
absent for `remove_grace_s` across two looks (a rename-in-place never drops it).

Nothing per change is O(zones): a change event names its file, the zone is re-read,
parsed and swapped alone (`Catalog.set` replaces one dict entry).

The initial load (`initial_load`) parses in worker processes when there are many zones
(a hosting server has 100,000): batches of paths go to a process pool, each worker
reads, hashes and parses its files (the fast reader in zonefast.py, else dnspython) and
sends compact pickled Zones back, and each zone is published as its batch arrives, so
loaded zones answer while the rest still SERVFAIL. Files larger than `BIG_ZONE_BYTES`
are parsed in this process instead (one copy of a million records, not two plus a
pipe). With a `ZoneCache`, unchanged big zones (>= `CACHE_MIN_BYTES`) are unpickled
instead of parsed; a spawned process writes the cache after a load or an edit.
Worker processes start through multiprocessing's forkserver/spawn, which re-imports the
main script of the process: a script that runs the server in-process must guard its
entry point with `if __name__ == "__main__":` (`python -m geodns` and the `geodns`
command need nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import hashlib
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ZoneError
from .model import Pool
from .policytests import TESTS_SUFFIX, tests_path_for
from .view import Catalog
from .zonecache import ZoneCache, cacheable
from .zones import (
    GEO_SUFFIX,
    ZONE_SUFFIX,
    Zone,
    load_zone,
    name_to_wire,
    origin_from_name,
    origin_from_path,
    parse_zone,
    zone_file_names,
    zone_files,
)

log = logging.getLogger(__name__)

# Initial load: below this many zones, processes cost more than they save
PARALLEL_MIN_ZONES = 200
# Files bigger than this are parsed in this process, not in a worker
BIG_ZONE_BYTES = 4 << 20
# Zone files at least this big go to the zone cache (smaller ones parse as fast)
CACHE_MIN_BYTES = 256 << 10
# A big zone edited at runtime is compiled into the cache this long after the edit
COMPILE_DELAY_S = 10.0
# Zone files per worker task: big enough to amortise the IPC, small enough that zones
# start answering early and both workers stay busy until the end
BATCH_ZONES = 64


@dataclass(slots=True)
class ZoneStatus:
    """What /v1/zones shows for one zone file."""

    origin: str
    path: str
    serial: int | None = None
    loaded_at: float | None = None
    error: str | None = None
    error_at: float | None = None
    records: int = 0
    digest: str = ""
    version: int = 0


@dataclass
class ReloadReport:
    """What one reload pass did (returned by POST /v1/reload)."""

    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


@dataclass
class ReloadCounters:
    ok: int = 0
    failed: int = 0
    removed: int = 0


def _digest(zone_path: Path) -> str:
    """Content hash of a zone file, its geo overlay and its policy tests: what the zone
    is built from and checked against (an edit of any of them is a new version)."""
    h = hashlib.sha256(zone_path.read_bytes())
    _hash_companion(h, str(zone_path), GEO_SUFFIX)
    _hash_companion(h, str(zone_path), TESTS_SUFFIX)
    return h.hexdigest()


def _hash_companion(h: Any, zone_path: str, suffix: str) -> bool:
    """Add a zone's companion file (geo overlay, policy tests) to its hash; False if it
    has none. Raises OSError if it exists but cannot be read."""
    try:
        with open(zone_path[: -len(ZONE_SUFFIX)] + suffix, "rb") as f:
            h.update(b"\0" + suffix.encode() + b"\0" + f.read())
    except FileNotFoundError:
        return False
    return True


def _geo_path(zone_path: Path) -> Path:
    return zone_path.with_name(zone_path.name[: -len(ZONE_SUFFIX)] + GEO_SUFFIX)


def _zone_path_for(path: Path) -> Path | None:
    """The zone file a changed path belongs to (the zone itself, its overlay or its
    policy tests)."""
    if path.name.endswith(ZONE_SUFFIX):
        return path
    for suffix in (GEO_SUFFIX, TESTS_SUFFIX):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ZONE_SUFFIX)
    return None


Signature = tuple[int, int, int]


def _signature(path: Path | str) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# What loading one file gives: path, signature before reading, content digest, the Zone
# or the problems, the zone-cache key (None when not cached), and whether the cache
# still lacks this zone (it was parsed, and not written: see load_file's `put`)
Loaded = tuple[str, Signature | None, str, Zone | None, list[str] | None, str | None, bool]


def load_file(
    path: str,
    pools: Mapping[str, Pool],
    cache: ZoneCache | None = None,
    big_bytes: int = 0,
    put: bool = True,
    cache_min_bytes: int = CACHE_MIN_BYTES,
) -> Loaded | None:
    """Read, hash and parse one zone file (in a worker process or this one), or take
    it from the zone cache; write the cache after a parse if `put`.

    None if `big_bytes` > 0 and the file is bigger: the caller parses it itself.
    """
    sig = _signature(path)
    if big_bytes and sig is not None and sig[1] > big_bytes:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        h = hashlib.sha256(data)
        has_geo = _hash_companion(h, path, GEO_SUFFIX)
        built_from = h.hexdigest()  # the cache key's: the tests file does not change a Zone
        _hash_companion(h, path, TESTS_SUFFIX)
    except OSError as exc:
        return (path, sig, "", None, [f"{path}: {exc}"], None, False)
    digest = h.hexdigest()
    key = None
    if cache is not None and len(data) >= cache_min_bytes and cacheable(data):
        key = cache.key(path, built_from, pools if has_geo else None)
        zone = cache.get(key)
        if zone is not None:
            return (path, sig, digest, replace(zone, loaded_at=time.time()), None, key, False)
    try:
        zone = load_zone(path, pools, data=data, has_geo=has_geo)
    except ZoneError as exc:
        return (path, sig, digest, None, exc.problems, None, False)
    if key is not None and cache is not None and put:
        cache.put(key, zone)
    return (path, sig, digest, zone, None, key, key is not None and not put)


def _load_batch(
    paths: list[str],
    pools: Mapping[str, Pool],
    cache_dir: str | None,
    big_bytes: int,
    cache_min_bytes: int,
) -> list[Loaded | str]:
    """Worker-process task: load_file() for each path; a path left as a str is too big
    to send back, the caller parses it."""
    cache = ZoneCache(cache_dir) if cache_dir else None
    out: list[Loaded | str] = []
    for p in paths:
        item = load_file(p, pools, cache, big_bytes, cache_min_bytes=cache_min_bytes)
        out.append(p if item is None else item)
    return out


def _compile_batch(
    paths: list[str], pools: Mapping[str, Pool], cache_dir: str, cache_min_bytes: int
) -> int:
    """Background-process task: parse zones and write them to the zone cache."""
    cache = ZoneCache(cache_dir)
    written = 0
    for p in paths:
        item = load_file(p, pools, cache, cache_min_bytes=cache_min_bytes)
        written += item is not None and item[3] is not None
    return written


def _freeze() -> None:
    """Move every object alive now out of the cyclic collector's sight (gc.freeze).

    Zones are long-lived and acyclic (freed by reference counting when replaced), and a
    hosting server holds millions of their objects: without this, every full collection
    walks all of them (10 s of the 100,000-zone load, then a pause of about a second
    every time the heap grows by a quarter). The price: cyclic garbage that exists at
    this instant is never collected; during a load there is little of it.
    """
    gc.freeze()


# A replaced zone of at least this many records is freed in slices by the reaper; a
# smaller one is freed at once (under ~10 ms).
RETIRE_MIN_RECORDS = 50_000
RETIRE_SLICE = 5_000  # names freed per slice: ~1 ms with the GIL held


class Reaper:
    """Frees replaced big zones a slice at a time, on a thread of its own.

    Dropping the last reference to a 1,000,000-record zone frees millions of objects in
    one C call that holds the GIL for ~0.24 s, so no thread answers a query meanwhile
    (the UDP receive thread included: the max round trip during a reload in
    bench/zones_scale.py). Here the zone's name table is emptied RETIRE_SLICE names at
    a time, and between slices any thread that waits for the GIL gets it.

    A zone is only taken apart when nothing but the reaper refers to it (its reference
    count, and its name table's, say so): an API call or a query that still reads the
    old snapshot never sees it shrink. Otherwise it is simply let go, and freed at once
    by whoever drops it last.
    """

    def __init__(self, wait_s: float = 30.0) -> None:
        # how long a retired zone may still be referred to elsewhere (a query or an API
        # call that was reading it finishes) before it is let go
        self.wait_s = wait_s
        self._queue: queue.SimpleQueue[Zone] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dismantled = 0  # zones freed in slices
        self.let_go = 0  # zones still referred to elsewhere: freed by their last holder
        self.idle = threading.Event()  # set when every retired zone has been dealt with
        self.idle.set()

    def retire(self, zone: Zone | None) -> None:
        """Take over a zone that was just replaced or removed (the caller drops its own
        references to it afterwards)."""
        if zone is None or zone.records < RETIRE_MIN_RECORDS:
            return
        with self._lock:
            self.idle.clear()
            self._queue.put(zone)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="geodns-reaper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                zone = self._queue.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None  # the next retire starts another
                        return
                continue
            started = time.monotonic()
            # sys.getrefcount counts `zone` here and its own argument: 2 means nobody
            # else refers to the zone any more
            while sys.getrefcount(zone) > 2 and time.monotonic() - started < self.wait_s:
                time.sleep(0.05)
            nodes = zone.nodes
            # and the name table: `nodes` here, the zone's field, the argument
            if (
                sys.getrefcount(zone) <= 2
                and sys.getrefcount(nodes) <= 3
                and isinstance(nodes, dict)
            ):
                t = time.monotonic()
                while nodes:
                    for _ in range(min(RETIRE_SLICE, len(nodes))):
                        nodes.popitem()
                    time.sleep(0)  # let a thread waiting for the GIL have it
                self.dismantled += 1
                log.info(
                    "reaper: zone=%s: the replaced version (%d records) freed in %.2f s",
                    zone.origin_text,
                    zone.records,
                    time.monotonic() - t,
                )
            else:
                self.let_go += 1
                log.info(
                    "reaper: zone=%s: the replaced version is still in use after %.0f s; "
                    "freed by its last user",
                    zone.origin_text,
                    self.wait_s,
                )
            del nodes, zone
            with self._lock:
                if self._queue.empty():
                    self.idle.set()


REAPER = Reaper()


def _pool_context() -> Any:
    """forkserver: workers fork from a clean single-threaded process (this one has an
    event loop, executor threads, sockets), with geodns already imported there."""
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["geodns.reload"])
        return ctx
    except ValueError:  # no forkserver on this platform
        return multiprocessing.get_context("spawn")


def _stop_forkserver() -> None:
    """The fork server idles for the life of the process once started; the next load
    (a restart) starts a new one. Private API: skipped where it does not exist."""
    import multiprocessing.forkserver as fs

    server = getattr(fs, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


class ZoneReloader:
    """Keeps the catalog in step with the zone directory, one zone at a time."""

    def __init__(
        self,
        directory: Path,
        catalog: Catalog,
        status: dict[str, ZoneStatus],
        pools: Callable[[], Mapping[str, Pool]],
        *,
        debounce_s: float = 0.2,
        remove_grace_s: float = 5.0,
        poll_interval_s: float = 2.0,
        watch: bool = True,
        validate: Callable[[Zone, Path], list[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_dir: Path | None = None,
        load_workers: int | None = None,
        cache_min_bytes: int = CACHE_MIN_BYTES,
    ) -> None:
        self.directory = directory
        self.catalog = catalog
        self.status = status
        self.pools = pools
        self.debounce_s = debounce_s
        self.remove_grace_s = remove_grace_s
        self.poll_interval_s = poll_interval_s
        self.watch = watch
        self.clock = clock
        self.counters = ReloadCounters()
        self.missing_since: dict[Path, float] = {}
        self.signatures: dict[str, Signature | None] = {}  # by path, as last read
        # origins to parse again at the next reload although their files did not change
        # (pools changed in the config); their digests stay, so an unchanged file is not
        # mistaken for a content change under the same serial
        self.reparse: set[str] = set()
        self._locks: dict[Path, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()  # set after every reload that published something
        self.mode = "none"
        # extra checks on a parsed zone (policy tests); problems reject the edit
        self.validate = validate
        self._poll_sigs: dict[Path, object] = {}
        self.cache = ZoneCache(cache_dir) if cache_dir is not None else None
        self.cache_min_bytes = cache_min_bytes
        self.compiling: threading.Thread | None = None  # see compile_later()
        self._compile_pending: set[str] = set()
        self._compile_lock = threading.Lock()
        self.load_workers = (os.cpu_count() or 1) if load_workers is None else load_workers
        # set once the initial load is over (reload_all waits for it)
        self.loaded = threading.Event()
        self._abort = False

    # -- one zone --------------------------------------------------------------------
    async def reload_file(self, zone_path: Path, report: ReloadReport | None = None) -> None:
        """Reload one zone file if its content changed; keep the old one on errors."""
        report = report or ReloadReport()
        lock = self._locks.setdefault(zone_path, asyncio.Lock())
        async with lock:
            origin = origin_from_path(zone_path)
            key = name_to_wire(origin).lower()
            if not zone_path.exists():
                await self._maybe_remove(zone_path, origin, key, report)
                return
            self.missing_since.pop(zone_path, None)
            # wait until the file stops changing (half-written files are not loaded)
            for _ in range(50):
                before = _signature(zone_path)
                await asyncio.sleep(self.debounce_s)
                if _signature(zone_path) == before:
                    break
            self.signatures[str(zone_path)] = _signature(zone_path)
            st = self.status.setdefault(origin, ZoneStatus(origin, str(zone_path)))
            try:
                digest = await asyncio.to_thread(_digest, zone_path)
            except OSError:
                return  # vanished meanwhile; the next event handles it
            same = digest == st.digest and st.error is None and key in self.catalog.zones
            if same and origin not in self.reparse:
                report.unchanged.append(origin)
                return
            self.reparse.discard(origin)
            old = self.catalog.zones.get(key)
            try:
                zone = await asyncio.to_thread(parse_zone, zone_path, self.pools())
                self._validate(zone, zone_path)
            except ZoneError as exc:
                st.error = "\n".join(exc.problems)
                st.error_at = time.time()
                st.digest = digest
                report.failed[origin] = exc.problems
                self.counters.failed += 1
                for p in exc.problems:
                    log.error(
                        "reload: zone=%s rejected, last good version keeps serving: %s", origin, p
                    )
                if key not in self.catalog.zones:
                    self.catalog.set(key, None)  # never loaded: SERVFAIL (not REFUSED)
                self.changed.set()
                return
            if old is not None and digest != st.digest and old.serial == zone.serial:
                log.warning(
                    "reload: zone=%s content changed but the SOA serial %d did not",
                    origin,
                    zone.serial,
                )
            elif old is not None and _serial_lt(zone.serial, old.serial):
                log.warning(
                    "reload: zone=%s SOA serial went backwards: %d -> %d",
                    origin,
                    old.serial,
                    zone.serial,
                )
            self.catalog.set(key, zone)
            REAPER.retire(old)  # a big old version is freed in slices, off this thread
            del old
            published = self.catalog.zones[key]
            st.serial, st.loaded_at, st.records = zone.serial, zone.loaded_at, zone.records
            st.error = st.error_at = None
            st.digest = digest
            st.path = str(zone_path)
            st.version = published.version if published is not None else 0
            sig = self.signatures.get(str(zone_path))
            if self.cache is not None and sig is not None and sig[1] >= self.cache_min_bytes:
                # the next start finds it compiled; an edit burst compiles once
                self.compile_later([str(zone_path)], delay_s=COMPILE_DELAY_S)
            report.loaded.append(origin)
            self.counters.ok += 1
            log.info(
                "reload: zone=%s serial=%d records=%d version=%d",
                origin,
                zone.serial,
                zone.records,
                st.version,
            )
            self.changed.set()

    def _validate(self, zone: Zone, path: Path) -> None:
        """Run the extra checks (policy tests); raise ZoneError to reject the zone."""
        if self.validate is not None:
            problems = self.validate(zone, path)
            if problems:
                raise ZoneError(str(path), problems)

    async def _maybe_remove(
        self, zone_path: Path, origin: str, key: bytes, report: ReloadReport
    ) -> None:
        now = self.clock()
        first = self.missing_since.setdefault(zone_path, now)
        if now - first < self.remove_grace_s:
            # look again after the grace period: a rename-in-place brings it back
            self._later(self.remove_grace_s - (now - first) + 0.01, zone_path)
            return
        self.missing_since.pop(zone_path, None)
        if key in self.catalog.zones:
            REAPER.retire(self.catalog.zones.get(key))
            self.catalog.remove(key)
            self.status.pop(origin, None)
            self.signatures.pop(str(zone_path), None)
            self._locks.pop(zone_path, None)
            self.counters.removed += 1
            report.removed.append(origin)
            log.warning("reload: zone=%s removed (file gone for %.1f s)", origin, now - first)
            self.changed.set()

    def _later(self, delay_s: float, zone_path: Path) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay_s, lambda: self._spawn(self.reload_file(zone_path)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- everything --------------------------------------------------------------------
    def initial_load(self) -> ReloadReport:
        """Start-up: load every zone file; each zone serves as soon as it is loaded.

        Every configured zone is registered first, so that a zone still loading (or
        rejected) answers SERVFAIL, never REFUSED. Runs in the caller's thread (the app
        calls it through asyncio.to_thread); parsing happens in worker processes when
        there are many zones. Returns when every zone has been tried.
        """
        report = ReloadReport()
        try:
            started = time.monotonic()
            paths = zone_file_names(self.directory)
            zones = self.catalog.zones
            for path in paths:
                zones.setdefault(name_to_wire(origin_from_name(os.path.basename(path))), None)
            pools = self.pools()
            quiet = len(paths) > 1000  # per-zone lines at debug level, progress at info
            used_keys: set[str] = set()
            to_compile: list[str] = []
            next_progress = started + 5.0
            for published, item in enumerate(self._load_all(paths, pools), 1):
                self._publish_loaded(item, report, quiet)
                if item[5] is not None:
                    used_keys.add(item[5])
                if item[6]:
                    to_compile.append(item[0])
                if published % 1000 == 0:
                    _freeze()
                if quiet and time.monotonic() > next_progress:
                    next_progress += 5.0
                    done = len(report.loaded) + len(report.failed)
                    log.info("initial load: %d of %d zones", done, len(paths))
            elapsed = time.monotonic() - started
            log.info(
                "initial load: %d zones loaded, %d rejected in %.1f s",
                len(report.loaded),
                len(report.failed),
                elapsed,
            )
            if self.cache is not None and not self._abort:
                cache = self.cache
                threading.Thread(
                    target=lambda: cache.prune(used_keys), name="zonecache-prune", daemon=True
                ).start()
                self.compile_later(to_compile)
        finally:
            self.loaded.set()
        _freeze()
        return report

    def _load_all(self, paths: list[str], pools: Mapping[str, Pool]) -> Iterator[Loaded]:
        """Load every path, yielding each result as soon as it is there."""
        if len(paths) < PARALLEL_MIN_ZONES or self.load_workers < 2:
            for p in paths:
                if self._abort:
                    return
                one = load_file(
                    p, pools, self.cache, put=False, cache_min_bytes=self.cache_min_bytes
                )
                assert one is not None
                yield one
            return
        cache_dir = str(self.cache.directory) if self.cache is not None else None
        local = cf.ThreadPoolExecutor(1, thread_name_prefix="zone-load")  # big files
        procs: cf.ProcessPoolExecutor | None = None
        try:
            procs = cf.ProcessPoolExecutor(self.load_workers, mp_context=_pool_context())
        except (OSError, ValueError, ImportError) as exc:
            log.warning("initial load: no worker processes (%s); loading in this one", exc)
        # finished tasks, in the order they finish (one queue: O(1) per batch)
        finished: queue.SimpleQueue[tuple[cf.Future[list[Loaded | str]], list[str]]]
        finished = queue.SimpleQueue()
        outstanding = 0

        def submit(executor: cf.Executor, batch: list[str], big_bytes: int) -> None:
            nonlocal outstanding
            if executor is local:  # in this process: never pickle a zone for the cache here
                fut = executor.submit(self._load_here, batch, pools)
            else:
                fut = executor.submit(
                    _load_batch, batch, pools, cache_dir, big_bytes, self.cache_min_bytes
                )
            fut.add_done_callback(lambda f: finished.put((f, batch)))
            outstanding += 1

        try:
            for i in range(0, len(paths), BATCH_ZONES):
                batch = paths[i : i + BATCH_ZONES]
                if procs is not None:
                    submit(procs, batch, BIG_ZONE_BYTES)
                else:
                    submit(local, batch, 0)
            while outstanding:
                fut, batch = finished.get()
                outstanding -= 1
                if self._abort:
                    return
                try:
                    results = fut.result()
                except Exception as exc:  # a worker died (OOM?): do it here instead
                    log.warning("initial load: worker failed (%r); loading here", exc)
                    submit(local, batch, 0)
                    continue
                for item in results:
                    if isinstance(item, str):  # too big to send back: parse it here
                        submit(local, [item], 0)
                    else:
                        yield item
        finally:
            if procs is not None:
                procs.shutdown(wait=True, cancel_futures=True)
                _stop_forkserver()
            local.shutdown(wait=True, cancel_futures=True)

    def _load_here(self, paths: list[str], pools: Mapping[str, Pool]) -> list[Loaded | str]:
        out: list[Loaded | str] = []
        for p in paths:
            item = load_file(p, pools, self.cache, put=False, cache_min_bytes=self.cache_min_bytes)
            assert item is not None
            out.append(item)
        return out

    def compile_later(self, paths: list[str], delay_s: float = 0.0) -> None:
        """Write these zones to the zone cache from a background process.

        Pickling a million-record zone holds the GIL for seconds: done in this process
        it would stop answering. The worker parses the file again and writes the result.
        One compiling thread at a time; requests made meanwhile (an edited big zone,
        edited again) join the next round, after `delay_s`.
        """
        if self.cache is None or not paths:
            return
        with self._compile_lock:
            self._compile_pending.update(paths)
            if self.compiling is not None and self.compiling.is_alive():
                return  # the running thread takes them on its next round
            self.compiling = threading.Thread(
                target=self._compile_rounds, args=(delay_s,), name="zonecache-compile", daemon=True
            )
            self.compiling.start()

    def _compile_rounds(self, delay_s: float) -> None:
        assert self.cache is not None
        cache_dir, min_bytes = str(self.cache.directory), self.cache_min_bytes
        while True:
            time.sleep(delay_s)
            with self._compile_lock:
                paths = sorted(self._compile_pending)
                self._compile_pending.clear()
                if not paths or self._abort:
                    self.compiling = None
                    return
            pools = dict(self.pools())
            try:
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                    n = ex.submit(_compile_batch, paths, pools, cache_dir, min_bytes).result()
                log.info("zonecache: %d zones compiled for the next start", n)
            except Exception as exc:  # the cache is an optimisation: never fatal
                log.warning("zonecache: compiling %d zones failed: %r", len(paths), exc)

    def _publish_loaded(self, item: Loaded, report: ReloadReport, quiet: bool = False) -> None:
        """Publish one initially loaded zone (or record why it was rejected)."""
        path_s, sig, digest, zone, problems, _, _ = item
        origin = origin_from_name(os.path.basename(path_s))
        st = self.status.setdefault(origin, ZoneStatus(origin, path_s))
        self.signatures[path_s] = sig
        st.digest = digest
        if zone is not None:
            try:
                self._validate(zone, Path(path_s))
            except ZoneError as exc:
                problems, zone = exc.problems, None
        if zone is None:
            problems = problems or [f"{path_s}: not loaded"]
            st.error, st.error_at = "\n".join(problems), time.time()
            report.failed[origin] = problems
            self.counters.failed += 1
            for p in problems:
                log.error("zone %s rejected: %s", origin, p)
            return
        for w in zone.warnings:
            log.warning("zone %s: %s", origin, w)
        key = zone.origin
        self.catalog.set(key, zone)
        published = self.catalog.zones[key]
        st.serial, st.loaded_at, st.records = zone.serial, zone.loaded_at, zone.records
        st.version = published.version if published is not None else 0
        report.loaded.append(origin)
        self.counters.ok += 1
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "zone %s loaded: serial=%d records=%d",
            origin,
            zone.serial,
            zone.records,
        )

    def reparse_next_reload(self, only_geo: bool = True) -> None:
        """Make the next reload re-parse zones (e.g. after pools changed in the config)."""
        for st in self.status.values():
            if not only_geo or _geo_path(Path(st.path)).exists():
                self.reparse.add(st.origin)

    def known_paths(self) -> set[Path]:
        return {Path(st.path) for st in self.status.values()}

    async def reload_all(self) -> ReloadReport:
        """SIGHUP / POST /v1/reload: look at every zone file (new, changed, removed)."""
        report = ReloadReport()
        if not self.loaded.is_set():  # the initial load is still publishing zones
            await asyncio.to_thread(self.loaded.wait)
        known = self.known_paths()

        def to_reload() -> list[Path]:
            """Paths whose content changed (one thread pass over 100,000 files, rather
            than a task, a debounce and a thread hop for each)."""
            out = []
            for p in sorted(set(zone_files(self.directory)) | known):
                origin = origin_from_path(p)
                st = self.status.get(origin)
                try:
                    same = (
                        st is not None
                        and origin not in self.reparse
                        and st.error is None
                        and name_to_wire(origin) in self.catalog.zones
                        and _digest(p) == st.digest
                    )
                except OSError:  # gone: reload_file() decides about removing it
                    same = False
                if same:
                    report.unchanged.append(origin)
                else:
                    out.append(p)
            return out

        changed = await asyncio.to_thread(to_reload)
        await asyncio.gather(*(self.reload_file(p, report) for p in changed))
        return report

    # -- watching ----------------------------------------------------------------------
    async def start(self) -> None:
        if not self.watch:
            return
        try:
            import watchfiles  # noqa: F401 - optional fast path
        except ImportError:
            self.mode = "poll"
            self._tasks.append(asyncio.create_task(self._poll_loop()))
        else:
            self.mode = "inotify"
            self._tasks.append(asyncio.create_task(self._watch_loop()))
            # let the task run up to its first await: the inotify watches exist then
            for _ in range(3):
                await asyncio.sleep(0)
        await self._catch_up()

    async def _catch_up(self) -> None:
        """Reload what changed between the initial load and the watcher starting."""
        known = [st.path for st in self.status.values()]

        def changed() -> list[Path]:  # O(zones) stats, once: off the event loop
            paths = set(zone_file_names(self.directory))
            paths.update(known)
            return [Path(p) for p in paths if _signature(p) != self.signatures.get(p)]

        for p in await asyncio.to_thread(changed):
            self._spawn(self.reload_file(p))

    async def stop(self) -> None:
        self._abort = True  # an initial load still running stops publishing
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch_loop(self) -> None:
        import watchfiles

        try:
            async for changes in watchfiles.awatch(
                self.directory,
                debounce=50,
                step=100,  # ms: how often the watch thread wakes (and takes the GIL) when idle
                recursive=True,
                watch_filter=lambda _c, p: p.endswith((ZONE_SUFFIX, GEO_SUFFIX, TESTS_SUFFIX)),
            ):
                zone_paths = {z for _c, p in changes if (z := _zone_path_for(Path(p)))}
                for zp in sorted(zone_paths):
                    self._spawn(self.reload_file(zp))
        except (OSError, RuntimeError) as exc:
            log.warning(
                "reload: inotify unavailable (%s), polling every %.1f s", exc, self.poll_interval_s
            )
            self.mode = "poll"
            await self._poll_loop()

    async def _poll_loop(self) -> None:
        """Fallback: compare mtime/size/inode of every zone file each interval."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            for p in await asyncio.to_thread(self._poll_changes):
                self._spawn(self.reload_file(p))

    def _poll_changes(self) -> list[Path]:
        """Zone files whose own, overlay's or tests file's mtime/size/inode changed (in a
        thread)."""
        out = []
        for p in set(zone_files(self.directory)) | self.known_paths():
            combined = (_signature(p), _signature(_geo_path(p)), _signature(tests_path_for(p)))
            if combined != self._poll_sigs.get(p):
                self._poll_sigs[p] = combined
                out.append(p)
        return out


def _serial_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic: a < b."""
    return a != b and ((a < b and b - a < 2**31) or (a > b and a - b > 2**31))
