"""With ExclusiveXComBackend over the common-io object-storage backend (threshold 0).

Plain XComs are offloaded by the wrapped backend (a file each); ``numbers`` pushes an
extra XCom and fails its first try, so try 2's start purges that file through the
wrapped backend. The exclusive handle stays inline and its consumer still claims it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_backend_compose():
    @task(retries=1, retry_delay=timedelta(0))
    def numbers() -> list[int]:
        ti = get_current_context()["ti"]
        values = list(range(3000))
        ti.xcom_push("copy", values)
        if ti.try_number == 1:
            raise RuntimeError("first try fails after pushing 'copy'")
        return values

    @task
    def total(values: list[int]) -> int:
        return sum(values)

    @exclusive_task(consumers=["unwrap"])
    def secret() -> dict:
        return {"token": "compose-secret-token"}

    @exclusive_task
    def unwrap(value: dict) -> int:
        return len(value["token"])

    total(numbers())
    unwrap(secret())


dag_object = e2e_backend_compose()
