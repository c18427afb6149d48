"""Real databases for the tests: a fresh database per test on each server, no mocks.

Server URLs come from ``EXCLUSIVE_XCOM_TEST_POSTGRES_URL`` / ``EXCLUSIVE_XCOM_TEST_MYSQL_URL``
(defaults: the local services). A test that needs a server which is not reachable skips
with a one-line reason, except when ``CI`` is set: then it fails, so a green CI run means
the PostgreSQL and MariaDB tests really ran.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

SERVERS = {
    "postgres": os.environ.get("EXCLUSIVE_XCOM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("EXCLUSIVE_XCOM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ["sqlite", "postgres", "mysql"]
_reachable: dict[str, str | None] = {}


def server_problem(kind: str) -> str | None:
    """Why the server of ``kind`` cannot be used, or None if it answers (checked once)."""
    if kind not in _reachable:
        engine = sa.create_engine(SERVERS[kind], connect_args={"connect_timeout": 5}, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            _reachable[kind] = None
        except Exception as exc:  # any driver or network error means "not usable here"
            _reachable[kind] = f"{kind} server at {SERVERS[kind]} unreachable: {str(exc).splitlines()[0]}"
        finally:
            engine.dispose()
    return _reachable[kind]


def require_server(kind: str) -> None:
    if kind == "sqlite" or (problem := server_problem(kind)) is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this must not skip: {problem}")
    pytest.skip(problem)


def admin_engine(kind: str) -> sa.Engine:
    """An autocommit engine on ``kind``'s server, for databases and sessions of the tests."""
    return sa.create_engine(SERVERS[kind], isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


def server_sessions(conn: sa.Connection, kind: str, database: str) -> list[int]:
    """Server-side ids of every other session connected to ``database``."""
    if kind == "postgres":
        sql = "SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
    else:
        sql = "SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"
    return [row[0] for row in conn.execute(sa.text(sql), {"db": database})]


def kill_session(conn: sa.Connection, kind: str, session: int) -> bool:
    """Drop one server session (a fault injection); False if it had ended by itself."""
    try:
        if kind == "postgres":
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
        else:
            conn.execute(sa.text(f"KILL CONNECTION {int(session)}"))
        return True
    except sa.exc.DBAPIError as exc:  # MariaDB: "unknown thread id" when it is already gone
        if "unknown thread" not in str(exc).lower():
            raise
        return False


def create_database(kind: str, tmp_path: Path) -> str:
    """A new, empty database on ``kind``'s server (or an SQLite file) and its URL."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    require_server(kind)
    name = f"exx_{uuid.uuid4().hex[:16]}"
    engine = admin_engine(kind)
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return sa.make_url(SERVERS[kind]).set(database=name).render_as_string(hide_password=False)


def drop_database(kind: str, url: str) -> None:
    if kind == "sqlite":
        return
    from exclusive_xcom.ledger.engine import _engines

    for key in [k for k in _engines if k == url]:
        _engines.pop(key).dispose()
    name = sa.make_url(url).database
    engine = admin_engine(kind)
    with engine.connect() as conn:
        force = " WITH (FORCE)" if kind == "postgres" else ""
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))
    engine.dispose()


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The kind of ledger database; parametrizes a test over SQLite, PostgreSQL and MariaDB."""
    return request.param


@pytest.fixture
def ledger_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty ledger database of kind ``backend``, dropped afterwards."""
    url = create_database(backend, tmp_path)
    try:
        yield url
    finally:
        drop_database(backend, url)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by backend so ``-m postgres`` / ``-m mysql`` select them."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("backend") if callspec else None
        if kind in ("postgres", "mysql"):
            item.add_marker(getattr(pytest.mark, kind))


class FakeClock:
    """Epoch seconds that move only when a test says so (``Ledger(clock=...)``)."""

    def __init__(self, start: float = 1_700_000_000.25) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(ledger_url: str) -> Iterator[sa.Engine]:
    """An engine on this test's fresh ledger database, disposed afterwards."""
    from exclusive_xcom.ledger import create_engine

    engine = create_engine(ledger_url)
    try:
        yield engine
    finally:
        engine.dispose()
