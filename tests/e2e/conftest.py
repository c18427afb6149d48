"""Fixtures of the end-to-end tests: a migrated metadata DB once, Airflow processes shared by batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_server
from tests.support import migrate_metadata_db

from .harness import Airflow, Batches, Result, batch_of


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``) the tests of one batch go to one worker."""
    for item in items:
        if batch := batch_of(item):
            item.add_marker(pytest.mark.xdist_group(name=batch))


@pytest.fixture(scope="session")
def metadata_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated Airflow metadata DB (SQLite), made once per session and copied per home."""
    return migrate_metadata_db(tmp_path_factory.mktemp("airflow_template"))


@pytest.fixture(scope="session")
def batches(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, metadata_template: Path
) -> Iterator[Batches]:
    batches = Batches(request.session.items, tmp_path_factory.mktemp("airflow_batches"), metadata_template)
    try:
        yield batches
    finally:
        batches.close()


@pytest.fixture
def dag_runs(request: pytest.FixtureRequest, backend: str, batches: Batches) -> Result:
    """This test's runs (its ``dag_runs`` mark), done in the Airflow process of its batch."""
    require_server(backend)
    return batches.result(request.node)


@pytest.fixture
def airflow(tmp_path: Path, metadata_template: Path) -> Airflow:
    """This test's own Airflow home (metadata DB, dags folder, airflow.cfg)."""
    return Airflow(tmp_path / "airflow_home", metadata_template)
