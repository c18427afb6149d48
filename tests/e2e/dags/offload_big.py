"""A payload above the offload threshold, handed to one consumer through object storage."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
MARKER = "plaintext-marker-"


@dag(schedule=None, start_date=START, catchup=False)
def offload_big():
    @exclusive_task(consumers=["measure"])
    def build() -> dict:
        return {"rows": [f"{MARKER}{i:07d}" for i in range(150_000)]}  # ~3.5 MB of JSON

    @exclusive_task
    def measure(big: dict) -> int:
        assert all(r.startswith(MARKER) for r in big["rows"])
        return len(big["rows"])

    measure(build())


dag_object = offload_big()
