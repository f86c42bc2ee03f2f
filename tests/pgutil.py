"""A real PostgreSQL server for tests: initdb into a temp dir, loopback port, stopped after.

initdb and postgres refuse to run as root, and CI runs as root: the server then runs as
an unprivileged user (`geodns-pgtest`, created here without a home or login shell if it
is missing). As any other user the server runs as that user. Binaries come from the
Debian `postgresql` package (`make deb-tools`); `find_bin_dir()` is None without it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PG_USER = "geodns-pgtest"


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with initdb, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> dict[str, Any]:
    """subprocess kwargs that drop to the unprivileged user when we are root."""
    if os.getuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "-M", "-s", "/bin/false", PG_USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(PG_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


class PgServer:
    """One PostgreSQL cluster in its own temp dir, on 127.0.0.1:<port>, trust auth."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="geodns-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as = _run_as()
        if self._as:
            os.chown(self.dir, self._as["user"], self._as["group"])
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `postgres` database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            env=self._env,
            cwd=self.dir,
            **self._as,
        )

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        opts = (
            f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "start")
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        """Stop (fast: roll back open transactions, close every connection)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url_for(name)

    def close(self) -> None:
        """Stop if running (by pg_ctl, else by the postmaster's PID) and remove the dir."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), 9)
        shutil.rmtree(self.dir, ignore_errors=True)
