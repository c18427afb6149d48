"""Two small DAGs for the UI tests: the same queue, one DAG every test user may see
(``ui_open``) and one that ``tests/ui/auth.py`` hides from one user (``ui_secret``)."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task


def queue(dag_id: str) -> Any:
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
    def pipeline() -> None:
        @exclusive_task(consumers=["work"], mode="items")
        def enqueue() -> list[dict[str, str]]:
            return [{"order": f"secret-order-{i}"} for i in range(6)]

        @exclusive_task(batch_size=4)
        def work(orders: list[dict[str, str]]) -> int:
            return len(orders)

        work(enqueue())

    return pipeline()


ui_open = queue("ui_open")
ui_secret = queue("ui_secret")
