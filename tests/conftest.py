"""Shared fixtures: a real PostgreSQL server for the store and multi-node tests.

`pg_server` starts one PostgreSQL per test session (per xdist worker) from the Debian
`postgresql` package (see tests/pgutil.py) and stops it at the end. `pg_base_url` is
$GEODNS_TEST_PG_URL when set (an existing server), else that session server's URL.
Tests that need PostgreSQL are skipped only when neither is available.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pgutil import PgServer, find_bin_dir

PG_ENV = "GEODNS_TEST_PG_URL"


def postgres_available() -> bool:
    """True if the tests can reach or start a PostgreSQL server."""
    return bool(os.environ.get(PG_ENV)) or find_bin_dir() is not None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server started for this session (skips without the Debian package)."""
    pytest.importorskip("psycopg")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries missing: make deb-tools (Debian package postgresql)")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_base_url(request: pytest.FixtureRequest) -> str:
    """A SQLAlchemy URL of a PostgreSQL database the tests may create schemas in."""
    url = os.environ.get(PG_ENV)
    if url:
        return url
    server: PgServer = request.getfixturevalue("pg_server")
    return server.url
