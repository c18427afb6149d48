"""Fan-out (mode="each"): every named consumer reads the value exactly once; nobody else can."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["exclusive_xcom"])
def exclusive_fanout():
    @exclusive_task(consumers=["audit", "report"], retries=1)
    def snapshot() -> dict:
        return {"accounts": 3, "balance": 1250.5}

    @exclusive_task
    def audit(s: dict) -> float:
        return s["balance"]

    @exclusive_task
    def report(s: dict) -> int:
        return s["accounts"]

    @task
    def bystander() -> str:  # ordered after snapshot, but receives no data: allowed
        return "ran after snapshot"

    s = snapshot()
    audit(s)
    report(s)
    s >> bystander()


dag_object = exclusive_fanout()

if __name__ == "__main__":
    dag_object.test()
