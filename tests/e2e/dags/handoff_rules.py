"""Cross-DAG hand-off rules: who may claim a handle passed in a triggered run's conf.

``handoff_parent`` makes one exclusive output for three named tasks of ``handoff_child``
and triggers the child with a conf of three handles: ``batch`` is the real handle,
``edited`` a copy whose ``run_id`` and ``task_id`` were changed (signature kept) and
``resigned`` a copy whose signature was edited (body kept). The copies are made by a
plain task that pulls the reserved XCom key, which only tells it where the data is.

In ``handoff_child`` the named consumer ``ingest`` reads ``batch``; ``sneak`` reads the
same handle but is not named (it runs first, so its refusal must not take the item); the
named consumers ``ingest_edited`` and ``ingest_resigned`` read the altered copies, so only
the signature can refuse them. ``handoff_outsider`` is a third DAG, not named anywhere,
whose task has the same task_id ``ingest`` as the real consumer.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from exclusive_xcom import Consumer, exclusive_task, from_conf
from exclusive_xcom.handle import RESERVED_KEY

START = pendulum.datetime(2026, 1, 1, tz="UTC")
CHILD = "handoff_child"


@dag(schedule=None, start_date=START, catchup=False)
def handoff_parent():
    @exclusive_task(
        consumers=[
            Consumer(dag_id=CHILD, task_id="ingest"),
            Consumer(dag_id=CHILD, task_id="ingest_edited"),
            Consumer(dag_id=CHILD, task_id="ingest_resigned"),
        ]
    )
    def export() -> dict:
        return {"rows": [10, 20, 12], "token": "handoff-e2e-token"}

    @task(multiple_outputs=True)
    def forge(ti=None) -> dict:
        handle = ti.xcom_pull(task_ids="export", key=RESERVED_KEY)
        sig = handle["sig"]
        return {
            "edited": {**handle, "run_id": "manual__someone_else", "task_id": "export_other"},
            "resigned": {**handle, "sig": sig[:-1] + ("0" if sig[-1] != "0" else "1")},
        }

    out = export()
    forged = forge()
    out >> forged
    TriggerDagRunOperator(
        task_id="trigger_child",
        trigger_dag_id=CHILD,
        conf={"batch": out, "edited": forged["edited"], "resigned": forged["resigned"]},
    )


@dag(schedule=None, start_date=START, catchup=False)
def handoff_child():
    @exclusive_task(retries=0)
    def sneak(batch: dict) -> int:  # reads the handle, but is not a named consumer
        return len(batch["rows"])

    @exclusive_task(trigger_rule="all_done")
    def ingest(batch: dict) -> int:
        return sum(batch["rows"])

    @exclusive_task(retries=0)
    def ingest_edited(batch: dict) -> int:
        return sum(batch["rows"])

    @exclusive_task(retries=0)
    def ingest_resigned(batch: dict) -> int:
        return sum(batch["rows"])

    sneak(from_conf("batch")) >> ingest(from_conf("batch"))
    ingest_edited(from_conf("edited"))
    ingest_resigned(from_conf("resigned"))


@dag(schedule=None, start_date=START, catchup=False)
def handoff_outsider():
    @exclusive_task(retries=0)
    def ingest(batch: dict) -> int:  # same task_id as the real consumer, other DAG
        return sum(batch["rows"])

    ingest(from_conf("batch"))


parent = handoff_parent()
child = handoff_child()
outsider = handoff_outsider()
