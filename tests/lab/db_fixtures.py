"""A fresh, empty PostgreSQL database per test (or per test module) on the lab's own cluster,
so that tests never see each other's rows.

- `lab_database_url` (session): the lab's RUNNER_DATABASE_URL (`runner lab env`), once it has
  answered a login; skips with the reason when the lab's PostgreSQL is not up. It does not bring
  the lab up itself: scripts/test does, and so does the `lab` fixture of the lab tests.
- `pg_url` (function) and `pg_module_url` (module): the URL of a new database
  `runner_test_<pid>_<random>` made through the lab's role (it has CREATEDB), dropped afterwards
  with `DROP DATABASE ... WITH (FORCE)`, which ends connections a test left open.

Databases of a test session that was killed before its teardown are dropped by the next session:
their names carry the pid of the session that made them, and only those whose process is gone
are dropped (several sessions share the one lab).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from runner_lab import layout

PREFIX = "runner_test_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+$")


def _psycopg():
    # Imported here, not at the top: conftest loads this module for every test session, and a
    # Python without psycopg should fail only the tests that use a database.
    import psycopg

    return psycopg


def database_url_of(url: str, name: str) -> str:
    """The same server and login as `url`, database `name`."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """Create an empty database next to `url`'s (as `url`'s role), yield its URL, drop it."""
    pg = _psycopg()
    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    with pg.connect(url, autocommit=True) as conn:
        conn.execute(pg.sql.SQL("CREATE DATABASE {}").format(pg.sql.Identifier(name)))
    try:
        yield database_url_of(url, name)
    finally:
        with pg.connect(url, autocommit=True) as conn:
            conn.execute(pg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(pg.sql.Identifier(name)))


def _drop_orphans(url: str) -> None:
    """Drop the test databases of sessions whose process is gone (killed before teardown)."""
    pg = _psycopg()
    with pg.connect(url, autocommit=True) as conn:
        names = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{PREFIX}%",))]
        for name in names:
            m = _NAME.match(name)
            if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
                conn.execute(pg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(pg.sql.Identifier(name)))


@pytest.fixture(scope="session")
def lab_database_url() -> str:
    """The lab's database URL (role `runner`, database `runner`), checked by a login."""
    state = layout.state_dir()
    pw_file = layout.postgres_password_file(state)
    try:
        password = pw_file.read_text().strip()
    except OSError as exc:
        pytest.skip(f"the lab's PostgreSQL is not up (no password file {pw_file}: "
                    f"{exc.strerror}): run `runner lab up`")
    url = layout.database_url(password)
    pg = _psycopg()
    try:
        with pg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except pg.Error as exc:
        pytest.skip(f"the lab's PostgreSQL at {layout.masked_database_url()} does not accept "
                    f"its role's login ({str(exc).strip().splitlines()[-1]}): run `runner lab up`")
    _drop_orphans(url)
    return url


@pytest.fixture(scope="module")
def pg_module_url(lab_database_url) -> Iterator[str]:
    """An empty database shared by the tests of one module, dropped after the last of them."""
    with fresh_database(lab_database_url) as url:
        yield url


@pytest.fixture
def pg_url(lab_database_url) -> Iterator[str]:
    """An empty database of this test's own, dropped after it."""
    with fresh_database(lab_database_url) as url:
        yield url
