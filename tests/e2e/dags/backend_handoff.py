"""With ExclusiveXComBackend: a hand-off read in the child by a classic operator via claim_xcom().

The parent's ``TriggerDagRunOperator`` reads the handle (allowed: it carries it to the
consumer's DAG); the child's ``PythonOperator`` claims the handle mapping from its conf.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, get_current_context

from exclusive_xcom import Consumer, exclusive_task
from exclusive_xcom.backend import ExclusiveXComBackend

START = pendulum.datetime(2026, 1, 1, tz="UTC")
CHILD = "e2e_backend_handoff_child"


@dag(schedule=None, start_date=START, catchup=False)
def e2e_backend_handoff_parent():
    @exclusive_task(consumers=[Consumer(dag_id=CHILD, task_id="ingest_classic")])
    def export() -> dict:
        return {"rows": 4}

    TriggerDagRunOperator(task_id="trigger_child", trigger_dag_id=CHILD, conf={"batch": export()})


def _ingest() -> int:
    conf = get_current_context()["dag_run"].conf
    assert conf is not None, "the child runs only when triggered with the parent's conf"
    handle = conf["batch"]
    return ExclusiveXComBackend.claim_xcom(handle, "ingest_classic", dag_id="e2e_backend_handoff_parent")["rows"]


@dag(dag_id=CHILD, schedule=None, start_date=START, catchup=False)
def e2e_backend_handoff_child():
    PythonOperator(task_id="ingest_classic", python_callable=_ingest)


parent = e2e_backend_handoff_parent()
child = e2e_backend_handoff_child()
