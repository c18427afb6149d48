"""Fixtures of the end-to-end tests: a migrated metadata DB once, an Airflow home per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Airflow, migrate_metadata_db


@pytest.fixture(scope="session")
def metadata_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated Airflow metadata DB (SQLite), made once per session and copied per test."""
    return migrate_metadata_db(tmp_path_factory.mktemp("airflow_template"))


@pytest.fixture
def airflow(tmp_path: Path, metadata_template: Path) -> Airflow:
    """This test's own Airflow home (metadata DB, dags folder, airflow.cfg)."""
    return Airflow(tmp_path / "airflow_home", metadata_template)
