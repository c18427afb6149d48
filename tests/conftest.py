"""Tiers, databases and the fixtures every tier shares; real databases, no mocks.

Every test is marked with its tier (``unit``, ``integration``, ``e2e``, ``scheduler``,
``distributed``: the folder it lives in) and, when it is parametrized over ``backend``, with its database
(``sqlite``, ``postgres``, ``mysql``), so ``-m`` selects any slice; ``pyproject.toml`` sets
the fast default selection. A test that needs a server which is not reachable skips with a
one-line reason, except when ``CI`` is set: then it fails, so a green CI run means the
PostgreSQL and MariaDB tests really ran.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import BACKENDS, SERVERS, PrivatePostgres, create_database, drop_database, server_problem

#: The demo's process harness (``example_dags/_processes.py``, ``_celery_cluster.py``) serves the
#: scheduler and distributed tiers too; it imports no test code, so it lives beside the demo.
EXAMPLES = str(Path(__file__).resolve().parents[1] / "example_dags")
if EXAMPLES not in sys.path:
    sys.path.append(EXAMPLES)

TIERS = ("unit", "integration", "e2e", "scheduler", "distributed", "ui")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (its folder) and the database it is parametrized over."""
    root = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(root).parts[0]
        assert tier in TIERS, f"{item.nodeid}: tests live in one of the tier folders {TIERS}"
        item.add_marker(getattr(pytest.mark, tier))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        kind = params.get("backend", params.get("kind"))  # "kind": the database a driver-level case is about
        if kind in BACKENDS:
            item.add_marker(getattr(pytest.mark, kind))


def require_server(kind: str) -> None:
    """Skip (fail under CI) unless the server of ``kind`` answers; SQLite needs none."""
    if kind != "sqlite":
        require(server_problem(kind))


def require(problem: str | None) -> None:
    """Skip the test if something it needs is missing (``problem`` says what); under CI, where
    everything must be there, fail instead: a CI run never passes by skipping."""
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this must not skip: {problem}")
    pytest.skip(problem)


def new_ledger_database(kind: str, tmp_path: Path) -> str:
    """A new, empty database of ``kind`` (an SQLite file under ``tmp_path``) and its URL."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    require_server(kind)
    return create_database(SERVERS[kind])


def drop_ledger_database(url: str) -> None:
    """Drop what :func:`new_ledger_database` made (an SQLite file goes with its folder)."""
    kind = {"postgresql": "postgres", "mysql": "mysql"}.get(sa.make_url(url).get_backend_name())
    if kind:
        drop_database(url, SERVERS[kind])


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The kind of ledger database; parametrizes a test over SQLite, PostgreSQL and MariaDB."""
    return str(request.param)


@pytest.fixture
def ledger_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty ledger database of kind ``backend``, dropped afterwards."""
    url = new_ledger_database(backend, tmp_path)
    try:
        yield url
    finally:
        drop_ledger_database(url)


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


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own (never the shared server), removed afterwards."""
    with PrivatePostgres() as server:
        yield server
