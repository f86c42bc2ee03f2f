"""Zone edits via files: notice changes, reload one zone at a time, never break serving.

Sources of change: inotify through `watchfiles` (polling with mtime + size as a
fallback), SIGHUP and POST /v1/reload (both call `reload_all()`). A changed file is
re-read only once it has stopped changing for `debounce_s` (editors, rsync and
`git checkout` write in several steps), parsed off the event loop, and published with
one dict assignment: a query sees the old zone or the new one, never a mix. A broken
edit keeps the last good version serving and records the error (file:line) for
/v1/zones, /readyz and metrics. A deleted file removes its zone only after it has been
absent for `remove_grace_s` across two looks (a rename-in-place never drops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZoneError
from .model import Pool
from .view import Catalog
from .zones import (
    GEO_SUFFIX,
    ZONE_SUFFIX,
    Zone,
    name_to_wire,
    origin_from_path,
    parse_zone,
    zone_files,
)

log = logging.getLogger(__name__)


@dataclass
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
    """Content hash of a zone file and its geo overlay (what the zone is built from)."""
    h = hashlib.sha256(zone_path.read_bytes())
    geo = _geo_path(zone_path)
    if geo.exists():
        h.update(b"\0geo\0" + geo.read_bytes())
    return h.hexdigest()


def _geo_path(zone_path: Path) -> Path:
    return zone_path.with_name(zone_path.name[: -len(ZONE_SUFFIX)] + GEO_SUFFIX)


def _zone_path_for(path: Path) -> Path | None:
    """The zone file a changed path belongs to (the zone itself, or its overlay)."""
    if path.name.endswith(ZONE_SUFFIX):
        return path
    if path.name.endswith(GEO_SUFFIX):
        return path.with_name(path.name[: -len(GEO_SUFFIX)] + ZONE_SUFFIX)
    return None


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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
        self.signatures: dict[Path, tuple[int, int, int] | None] = {}
        self._locks: dict[Path, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()  # set after every reload that published something
        self.mode = "none"
        # extra checks on a parsed zone (policy tests); problems reject the edit
        self.validate = validate
        self._poll_sigs: dict[Path, object] = {}

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
            self.signatures[zone_path] = _signature(zone_path)
            st = self.status.setdefault(origin, ZoneStatus(origin, str(zone_path)))
            try:
                digest = await asyncio.to_thread(_digest, zone_path)
            except OSError:
                return  # vanished meanwhile; the next event handles it
            if digest == st.digest and st.error is None and key in self.catalog.zones:
                report.unchanged.append(origin)
                return
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
            published = self.catalog.zones[key]
            st.serial, st.loaded_at, st.records = zone.serial, zone.loaded_at, zone.records
            st.error = st.error_at = None
            st.digest = digest
            st.path = str(zone_path)
            st.version = published.version if published is not None else 0
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
            self.catalog.remove(key)
            self.status.pop(origin, None)
            self.signatures.pop(zone_path, None)
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
        """Start-up: load every zone file (in a thread); each zone serves once loaded.

        Every configured zone is registered first, so that a zone still loading (or
        rejected) answers SERVFAIL, never REFUSED.
        """
        report = ReloadReport()
        paths = zone_files(self.directory)
        for path in paths:
            self.catalog.zones.setdefault(name_to_wire(origin_from_path(path)).lower(), None)
        pools = self.pools()
        for path in paths:
            origin = origin_from_path(path)
            key = name_to_wire(origin).lower()
            st = self.status.setdefault(origin, ZoneStatus(origin, str(path)))
            self.signatures[path] = _signature(path)
            try:
                st.digest = _digest(path)
                zone = parse_zone(path, pools)
                self._validate(zone, path)
            except (ZoneError, OSError) as exc:
                problems = exc.problems if isinstance(exc, ZoneError) else [f"{path}: {exc}"]
                st.error, st.error_at = "\n".join(problems), time.time()
                report.failed[origin] = problems
                self.counters.failed += 1
                for p in problems:
                    log.error("zone %s rejected: %s", origin, p)
                continue
            self.catalog.set(key, zone)
            published = self.catalog.zones[key]
            st.serial, st.loaded_at, st.records = zone.serial, zone.loaded_at, zone.records
            st.version = published.version if published is not None else 0
            report.loaded.append(origin)
            self.counters.ok += 1
            log.info("zone %s loaded: serial=%d records=%d", origin, zone.serial, zone.records)
        return report

    def forget_digests(self, only_geo: bool = True) -> None:
        """Make the next reload re-parse zones (e.g. after pools changed in the config)."""
        for st in self.status.values():
            if not only_geo or _geo_path(Path(st.path)).exists():
                st.digest = ""

    def known_paths(self) -> set[Path]:
        return {Path(st.path) for st in self.status.values()}

    async def reload_all(self) -> ReloadReport:
        """SIGHUP / POST /v1/reload: look at every zone file (new, changed, removed)."""
        report = ReloadReport()
        paths = set(zone_files(self.directory)) | self.known_paths()
        await asyncio.gather(*(self.reload_file(p, report) for p in sorted(paths)))
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
        paths = set(await asyncio.to_thread(zone_files, self.directory)) | self.known_paths()
        for p in paths:
            if _signature(p) != self.signatures.get(p):
                self._spawn(self.reload_file(p))

    async def stop(self) -> None:
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
                step=20,
                recursive=True,
                watch_filter=lambda _c, p: p.endswith((ZONE_SUFFIX, GEO_SUFFIX)),
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
            paths = set(await asyncio.to_thread(zone_files, self.directory))
            for p in paths | self.known_paths():
                sig = _signature(p)
                geo = _signature(_geo_path(p))
                combined = (sig, geo)
                if combined != self._poll_sigs.get(p):
                    self._poll_sigs[p] = combined
                    self._spawn(self.reload_file(p))


def _serial_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic: a < b."""
    return a != b and ((a < b and b - a < 2**31) or (a > b and a - b > 2**31))
