"""Bad input: a task that is not a named consumer takes the exclusive output as an argument.

Importing this file must fail (NotAuthorizedError at DAG parse time).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_intruder():
    @exclusive_task(consumers=["reader"])
    def producer() -> dict:
        return {"secret": 1}

    @exclusive_task
    def reader(value: dict) -> None:
        pass

    @task
    def intruder(value: dict) -> None:  # not in consumers=, yet wired to read the output
        print(value)

    out = producer()
    reader(out)
    intruder(out)


dag_object = e2e_intruder()
