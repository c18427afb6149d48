"""Cross-DAG hand-off: the parent's output may be read by one task of the child DAG, once.

The parent passes the handle (not the data) in the child run's conf; the child reads it
with ``from_conf`` as an argument of an exclusive task.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag

from exclusive_xcom import Consumer, exclusive_task, from_conf

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False, tags=["exclusive_xcom"])
def exclusive_handoff_parent():
    @exclusive_task(consumers=[Consumer(dag_id="exclusive_handoff_child", task_id="ingest")])
    def export() -> dict:
        return {"batch": "2026-01-01", "rows": 3}

    TriggerDagRunOperator(
        task_id="trigger_child",
        trigger_dag_id="exclusive_handoff_child",
        conf={"batch": export()},
    )


@dag(schedule=None, start_date=START, catchup=False, tags=["exclusive_xcom"])
def exclusive_handoff_child():
    @exclusive_task
    def ingest(batch: dict) -> int:
        return batch["rows"]

    ingest(from_conf("batch"))


parent = exclusive_handoff_parent()
child = exclusive_handoff_child()
