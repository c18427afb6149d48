"""Bad input: a plain task pulls the reserved XCom key of an exclusive output directly."""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_xcom_peek():
    @exclusive_task(consumers=["reader"])
    def producer() -> dict:
        return {"password": "hunter2-e2e-secret"}

    @exclusive_task
    def reader(value: dict) -> int:
        return len(value["password"])

    @task
    def peek(ti=None) -> object:
        got = ti.xcom_pull(task_ids="producer", key="__exclusive__handle")
        print("peek got: " + json.dumps(got, sort_keys=True))
        return got

    out = producer()
    reader(out)
    out >> peek()


dag_object = e2e_xcom_peek()
