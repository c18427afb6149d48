"""Bad input: tasks that are not named consumers call ``exclusive_xcom.claim()`` at run time.

One is a classic ``PythonOperator``, one a plain ``@task``; both are only ordered after the
producer (an allowed edge), so nothing refuses them at parse time. The named consumer
``reader`` must still get the value.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import dag, task

import exclusive_xcom
from exclusive_xcom import exclusive_task


def _snoop() -> object:
    return exclusive_xcom.claim("producer")


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_claim_intruder():
    @exclusive_task(consumers=["reader"])
    def producer() -> dict:
        return {"card": "4111-1111-1111-1111"}

    @exclusive_task
    def reader(value: dict) -> int:
        return len(value["card"])

    @task(retries=0)
    def snoop_plain() -> object:
        return exclusive_xcom.claim("producer")

    out = producer()
    reader(out)
    out >> PythonOperator(task_id="snoop_classic", python_callable=_snoop, retries=0)
    out >> snoop_plain()


dag_object = e2e_claim_intruder()
