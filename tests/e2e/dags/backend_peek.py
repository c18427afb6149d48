"""With ExclusiveXComBackend: who may read a handle, and claim_xcom() in classic operators.

``reader`` (decorated) and ``classic_reader`` (``claim_xcom``) are named consumers. ``peek``
pulls the reserved key in its body, ``peek_template`` in a templated field (rendered
before ``execute``, like a decorated task's arguments), ``impostor`` claims on behalf of
``classic_reader``; all three must fail. ``bystander`` is only ordered after the producer.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task
from exclusive_xcom.backend import ExclusiveXComBackend
from exclusive_xcom.handle import RESERVED_KEY


def _show(got: object) -> object:
    print(f"peek_template got {got!r}")
    return got


def _classic_reader() -> int:
    return len(ExclusiveXComBackend.claim_xcom("producer", "classic_reader")["password"])


def _impostor() -> object:
    return ExclusiveXComBackend.claim_xcom("producer", "classic_reader")


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_backend_peek():
    @exclusive_task(consumers=["reader", "classic_reader"])
    def producer() -> dict:
        return {"password": "hunter2-backend-secret"}

    @exclusive_task
    def reader(value: dict) -> int:
        return len(value["password"])

    @task(retries=0)
    def peek(ti=None) -> object:
        return ti.xcom_pull(task_ids="producer", key=RESERVED_KEY)

    @task
    def bystander() -> str:
        return "ran after producer"

    out = producer()
    reader(out)
    out >> [peek(), bystander()]
    out >> PythonOperator(task_id="classic_reader", python_callable=_classic_reader)
    out >> PythonOperator(task_id="impostor", python_callable=_impostor, retries=0)
    out >> PythonOperator(
        task_id="peek_template",
        python_callable=_show,
        op_kwargs={"got": "{{ ti.xcom_pull(task_ids='producer', key='" + RESERVED_KEY + "') }}"},
        retries=0,
    )


dag_object = e2e_backend_peek()
