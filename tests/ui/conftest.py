"""The UI tier's API server: one per test module (starting it costs most of the tier's time)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ui.server import UIServer, ui_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    with ui_server(tmp_path_factory.mktemp("ui") / "airflow_home") as running:
        yield running
