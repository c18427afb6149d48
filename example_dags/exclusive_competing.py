"""Competing consumers (mode="one"): exactly one of the named tasks reads the value.

The others are skipped, not failed, and the run succeeds. Uses the provider-registered
spelling ``@task.exclusive``, which is the same decorator as ``@exclusive_task``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["exclusive_xcom"])
def exclusive_competing():
    @task.exclusive(consumers=["fast_path", "slow_path"], mode="one")
    def ticket() -> dict:
        return {"ticket": "T-1", "amount": 42}

    @task.exclusive
    def fast_path(t: dict) -> str:
        return f"fast handled {t['ticket']}"

    @task.exclusive
    def slow_path(t: dict) -> str:
        return f"slow handled {t['ticket']}"

    t = ticket()
    fast_path(t)
    slow_path(t)


dag_object = exclusive_competing()

if __name__ == "__main__":
    dag_object.test()
