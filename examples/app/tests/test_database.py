"""A round trip through the PostgreSQL service the pipeline's test stage starts beside the tests
(DATABASE_URL names it: `db` on the run's network)."""
import os

import psycopg
import pytest


@pytest.fixture
def db():
    with psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=10) as conn:
        yield conn


def test_insert_and_read_back(db):
    db.execute("CREATE TEMP TABLE visits (path text NOT NULL)")
    db.execute("INSERT INTO visits VALUES (%s), (%s)", ("/", "/healthz"))
    rows = db.execute("SELECT path FROM visits ORDER BY path").fetchall()
    assert rows == [("/",), ("/healthz",)]


def test_server_is_postgresql_15(db):
    version = db.execute("SHOW server_version").fetchone()[0]
    assert version.startswith("15")
