"""The GeoIP database's life cycle: which file is in use, `geodns geoip update`, reloads.

`[geoip] state_dir/current.mmdb`, when it exists, is the database in use; otherwise
`[geoip] database` (the shipped, git-tracked `data/dbip-country.mmdb` by default), which
an update never touches. `update()` downloads a database (DB-IP City Lite by default),
unpacks it, checks that it opens and places well-known addresses, and installs it as
`current.mmdb` atomically (temporary file, fsync, rename). A running server's
`GeoipWatcher.check()`, every `[geoip] reload_interval_s` and on SIGHUP, reopens a
replaced file or switches to a newly installed one, without a restart.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import ipaddress
import logging
import os
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Protocol

from . import __version__
from .config import GeoipConfig
from .errors import GeoDNSError
from .geo import CountryTable, GeoIPError, Locator

log = logging.getLogger(__name__)

CURRENT_NAME = "current.mmdb"
# DB-IP "IP to City Lite" (CC BY 4.0), MaxMind City schema, published monthly.
DBIP_CITY_LITE_URL = "https://download.db-ip.com/free/dbip-city-lite-{year:04d}-{month:02d}.mmdb.gz"
# A usable database must place these (Google Public DNS, IPv4 and IPv6) in a country.
SAMPLE_ADDRESSES = ("8.8.8.8", "2001:4860::1")
DOWNLOAD_TIMEOUT_S = 60.0
MAX_DOWNLOAD_BYTES = 1 << 30  # as transferred (DB-IP City Lite .gz: ~130 MB)
MAX_DATABASE_BYTES = 4 << 30  # unpacked
_CHUNK_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_TYPES = ("application/gzip", "application/x-gzip")


class UpdateError(GeoDNSError):
    """The update failed; the database in use is unchanged."""


def current_path(cfg: GeoipConfig) -> Path:
    """Where `geodns geoip update` installs the database: state_dir/current.mmdb."""
    return Path(cfg.state_dir) / CURRENT_NAME


def active_database(cfg: GeoipConfig) -> Path:
    """The database the server reads: state_dir/current.mmdb if present, else `database`."""
    current = current_path(cfg)
    return current if current.exists() else Path(cfg.database)


def default_urls(today: date) -> list[str]:
    """DB-IP City Lite for this month, then last month (published early in the month)."""
    last = date(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1)
    return [
        DBIP_CITY_LITE_URL.format(year=d.year, month=d.month)
        for d in (date(today.year, today.month, 1), last)
    ]


@dataclass(frozen=True)
class UpdateResult:
    """What `update()` did."""

    url: str
    path: Path
    downloaded_bytes: int
    database_bytes: int
    unpacked: str  # "" (a plain .mmdb), "gzip", "tar", "gzip+tar"
    database_type: str
    build_epoch: int
    samples: tuple[tuple[str, str], ...]  # (address, country code)
    replaced: bool

    def lines(self) -> list[str]:
        """A human-readable account, one line per step."""
        built = datetime.fromtimestamp(self.build_epoch, UTC).strftime("%Y-%m-%d")
        how = f", {self.unpacked}" if self.unpacked else ""
        return [
            f"downloaded {self.url} ({_size(self.downloaded_bytes)}{how})",
            f"verified: type {self.database_type}, built {built}, {_size(self.database_bytes)}; "
            + ", ".join(f"{addr} -> {country}" for addr, country in self.samples),
            f"installed {self.path}" + (" (replacing the previous one)" if self.replaced else ""),
        ]


def update(
    cfg: GeoipConfig,
    url: str | None = None,
    *,
    today: date | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> UpdateResult:
    """Download, verify and atomically install a database as state_dir/current.mmdb.

    `url` may be http(s)://, file:// or a local path; without it, DB-IP City Lite of
    this month (or last month, while this month's is not out). Plain, gzip (.gz) and
    tar (.tar.gz, one .mmdb inside, as MaxMind ships GeoLite2) are unpacked. Raises
    UpdateError; on any error the installed database and `[geoip] database` are
    untouched and no temporary file is left behind.
    """
    say = progress or (lambda _msg: None)
    state_dir = Path(cfg.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpdateError(f"{state_dir}: cannot create the state directory: {exc}") from exc
    urls = [_as_url(url)] if url else default_urls(today or datetime.now(UTC).date())
    try:
        return _fetch_and_install(urls, state_dir, timeout_s, say)
    except OSError as exc:  # the state directory: not writable, disk full, ...
        raise UpdateError(f"{state_dir}: {exc}") from None


def _fetch_and_install(
    urls: list[str], state_dir: Path, timeout_s: float, say: Callable[[str], None]
) -> UpdateResult:
    target = state_dir / CURRENT_NAME
    with _scratch(state_dir) as scratch:
        download = scratch(".download")
        for i, candidate in enumerate(urls):
            say(f"downloading {candidate}")
            try:
                size, content_type = _download(candidate, download, timeout_s)
                break
            except _NotFound as exc:
                if i + 1 == len(urls):
                    raise UpdateError(str(exc)) from None
                say(f"{exc}; trying the previous month")
        fetched = candidate
        database, unpacked = _unpack(fetched, download, content_type, scratch)
        say(f"verifying {_size(database.stat().st_size)}")
        db_type, build_epoch, samples = verify(database, fetched)
        replaced = target.exists()
        database_bytes = database.stat().st_size
        os.chmod(database, 0o644)  # the server may run as another user
        _fsync(database)
        os.replace(database, target)  # atomic: readers see the old or the new file
        _fsync(state_dir)
    log.info("geoip update: installed %s from %s type=%s", target, fetched, db_type)
    return UpdateResult(
        url=fetched,
        path=target,
        downloaded_bytes=size,
        database_bytes=database_bytes,
        unpacked=unpacked,
        database_type=db_type,
        build_epoch=build_epoch,
        samples=samples,
        replaced=replaced,
    )


def verify(path: Path, name: str | None = None) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    """Open `path` as the server would and look up SAMPLE_ADDRESSES.

    Returns (database type, build epoch, (address, country) per sample); raises
    UpdateError naming `name` (default: the path) when it does not open or a sample
    address has no country.
    """
    name = name or str(path)
    try:
        locator = Locator(path, CountryTable({}), cache_size=len(SAMPLE_ADDRESSES))
    except GeoIPError as exc:
        reason = exc.__cause__ or exc
        raise UpdateError(f"{name}: not a usable MaxMind DB file: {reason}") from None
    try:
        samples: list[tuple[str, str]] = []
        for text in SAMPLE_ADDRESSES:
            country = locator.locate(ipaddress.ip_address(text)).country
            if country is None:
                raise UpdateError(
                    f"{name}: {locator.database_type} database has no country for {text}: "
                    "not a usable GeoIP database (IPv4 and IPv6, with countries)"
                )
            samples.append((text, country))
        return locator.database_type, locator.build_epoch, tuple(samples)
    finally:
        locator.close()


class GeoipWatcher:
    """Keeps a server on the active database (see `active_database`).

    `open()` at start; `check()` later (timer, SIGHUP) reopens the file in use if it was
    replaced, or opens the other one when state_dir/current.mmdb appeared or went away.
    A file that does not open is logged once (per version of it) and the database in
    use keeps serving. `settings` is called each time, so a config reload that moves
    `database` or `state_dir` is followed.
    """

    def __init__(self, settings: Callable[[], GeoipConfig]) -> None:
        self._settings = settings
        self._countries: tuple[str, CountryTable] | None = None
        self._rejected: tuple[Path, tuple[int, int, int]] | None = None
        self._lock = threading.Lock()
        self.locator: Locator | None = None

    def open(self) -> Locator:
        """Open the active database; a current.mmdb that fails falls back to `database`.

        Raises GeoIPError when neither opens (or the country table is unreadable).
        """
        with self._lock:
            cfg = self._settings()
            countries = self._country_table(cfg)
            current = current_path(cfg)
            if current.exists():
                try:
                    self.locator = Locator(current, countries, cfg.cache_size)
                    return self.locator
                except GeoIPError as exc:
                    self._rejected = (current, _identity(current) or (0, 0, 0))
                    log.error("geoip: %s; using [geoip] database %s", exc, cfg.database)
            self.locator = Locator(cfg.database, countries, cfg.cache_size)
            return self.locator

    def check(self) -> Locator | None:
        """Follow a replaced or newly installed database: the new Locator, or None."""
        with self._lock:
            cfg = self._settings()
            wanted = active_database(cfg)
            old = self.locator
            if old is not None and old.path == wanted:
                return old if old.reopen_if_changed() else None
            identity = _identity(wanted)
            if identity is None or self._rejected == (wanted, identity):
                return None
            try:
                new = Locator(wanted, self._country_table(cfg), cfg.cache_size)
            except GeoIPError as exc:
                self._rejected = (wanted, identity)
                using = old.path if old is not None else "no database"
                log.error("geoip: cannot switch databases, keeping %s: %s", using, exc)
                return None
            self._rejected = None
            # The old Locator is not closed: a query in another thread may still be
            # using it; its reader is released with the last reference.
            self.locator = new
            log.info("geoip: now using %s type=%s", wanted, new.database_type)
            return new

    def _country_table(self, cfg: GeoipConfig) -> CountryTable:
        if self._countries is None or self._countries[0] != cfg.countries:
            self._countries = (cfg.countries, CountryTable.load(cfg.countries))
        return self._countries[1]


# -- helpers ---------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _NotFound(UpdateError):
    """HTTP 404 (or a missing file): the next candidate URL may exist."""


def _as_url(text: str) -> str:
    """A URL, or a local path made into a file:// URL."""
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https", "file"):
        return text
    if scheme and len(scheme) > 1:  # "c:" would be a drive letter, not a scheme
        raise UpdateError(f"{text}: unsupported URL scheme {scheme!r} (allowed: http, https, file)")
    return Path(text).resolve().as_uri()


def _download(url: str, dest: Path, timeout_s: float) -> tuple[int, str]:
    """Fetch `url` into `dest`: (bytes, Content-Type). Raises UpdateError / _NotFound."""
    request = urllib.request.Request(url, headers={"User-Agent": f"geodns/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
            with open(dest, "wb") as out:
                size = _copy(response, out, MAX_DOWNLOAD_BYTES, f"{url}: download")
    except urllib.error.HTTPError as exc:
        error = _NotFound if exc.code == 404 else UpdateError
        raise error(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        missing = isinstance(exc.reason, FileNotFoundError)
        error = _NotFound if missing else UpdateError
        raise error(f"{url}: cannot download: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeout, reset, short body
        raise UpdateError(f"{url}: download failed: {exc!r}") from None
    return size, content_type


def _unpack(
    url: str, download: Path, content_type: str, scratch: Callable[[str], Path]
) -> tuple[Path, str]:
    """The .mmdb inside a download (plain, gzip, tar, tar.gz): (file, how unpacked)."""
    name = urllib.parse.urlsplit(url).path.lower()
    with open(download, "rb") as f:
        magic = f.read(2)
    says_gzip = name.endswith((".gz", ".tgz")) or content_type in _GZIP_TYPES
    steps: list[str] = []
    current = download
    if says_gzip or (magic == _GZIP_MAGIC and not name.endswith(".mmdb")):
        if magic != _GZIP_MAGIC:
            raise UpdateError(f"{url}: not gzip data (starts with {magic.hex() or 'nothing'})")
        out = scratch(".gunzip")
        try:
            with gzip.open(download, "rb") as src, open(out, "wb") as dst:
                _copy(src, dst, MAX_DATABASE_BYTES, f"{url}: unpacked")
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise UpdateError(f"{url}: broken gzip data: {exc}") from None
        current = out
        steps.append("gzip")
    if _is_tar(current):
        current = _untar(url, current, scratch)
        steps.append("tar")
    return current, "+".join(steps)


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"  # POSIX tar header magic


def _untar(url: str, archive: Path, scratch: Callable[[str], Path]) -> Path:
    """The single .mmdb file of a tar archive (GeoLite2-City_YYYYMMDD/GeoLite2-City.mmdb)."""
    try:
        with tarfile.open(archive, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".mmdb")]
            if len(members) != 1:
                found = ", ".join(m.name for m in members) or "none"
                raise UpdateError(f"{url}: the archive must hold exactly one .mmdb ({found})")
            src = tar.extractfile(members[0])
            if src is None:
                raise UpdateError(f"{url}: cannot read {members[0].name} from the archive")
            out = scratch(".untar")
            with src, open(out, "wb") as dst:
                _copy(src, dst, MAX_DATABASE_BYTES, f"{url}: {members[0].name}")
    except tarfile.TarError as exc:
        raise UpdateError(f"{url}: broken tar archive: {exc}") from None
    return out


def _copy(src: _Readable, dst: IO[bytes], limit: int, what: str) -> int:
    total = 0
    while chunk := src.read(_CHUNK_BYTES):
        total += len(chunk)
        if total > limit:
            raise UpdateError(f"{what} is larger than {_size(limit)}; refusing it")
        dst.write(chunk)
    return total


@contextlib.contextmanager
def _scratch(directory: Path) -> Iterator[Callable[[str], Path]]:
    """Make temporary files in `directory` (same file system: rename is atomic); every
    one still there at the end is removed."""
    made: list[Path] = []

    def make(suffix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=".geoip-", suffix=suffix, dir=directory)
        os.close(fd)
        made.append(Path(name))
        return made[-1]

    try:
        yield make
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's (or directory's) data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, or None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _size(n: int) -> str:
    """A size for people: bytes, kB or MB."""
    if n < 10_000:
        return f"{n} bytes"
    return f"{n / 1e3:.0f} kB" if n < 10_000_000 else f"{n / 1e6:.0f} MB"


__all__ = [
    "DBIP_CITY_LITE_URL",
    "GeoipWatcher",
    "UpdateError",
    "UpdateResult",
    "active_database",
    "current_path",
    "default_urls",
    "update",
    "verify",
]
