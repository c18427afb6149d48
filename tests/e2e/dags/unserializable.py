"""Bad input: an exclusive task returns a value that Airflow's serde cannot serialize."""

from __future__ import annotations

import threading

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_unserializable():
    @exclusive_task(consumers=["reader"], retries=0)
    def producer() -> object:
        return threading.Lock()

    @exclusive_task
    def reader(value: object) -> None:
        print(value)

    reader(producer())


dag_object = e2e_unserializable()
