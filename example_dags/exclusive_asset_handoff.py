"""Hand-off through an asset: the producer's run triggers the consumer DAG, data read once.

``export`` lists the asset in ``outlets=``; its asset event carries the signed handle in
``extra``, never the data. ``exclusive_asset_consumer`` is scheduled on the asset and reads
the outputs of the events that triggered its run with ``from_asset`` (a list: Airflow may
fold several events into one run). ``exclusive_asset_bystander`` is scheduled on the same
asset but is not a named consumer: its ``peek`` sees only the handle, and its ``snoop``
fails with ``NotAuthorizedError``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task

from exclusive_xcom import Consumer, exclusive_task, from_asset

START = pendulum.datetime(2026, 1, 1, tz="UTC")
ORDERS = Asset("exclusive_xcom_orders")


@dag(schedule=None, start_date=START, catchup=False, tags=["exclusive_xcom"])
def exclusive_asset_producer():
    @exclusive_task(consumers=[Consumer(dag_id="exclusive_asset_consumer", task_id="ingest")], outlets=[ORDERS])
    def export() -> dict:
        return {"batch": "2026-01-01", "orders": [101, 102, 103]}

    export()


@dag(schedule=[ORDERS], start_date=START, catchup=False, tags=["exclusive_xcom"])
def exclusive_asset_consumer():
    @exclusive_task
    def ingest(batches: list[dict]) -> int:
        return sum(len(b["orders"]) for b in batches)

    ingest(from_asset(ORDERS))


@dag(schedule=[ORDERS], start_date=START, catchup=False, tags=["exclusive_xcom"])
def exclusive_asset_bystander():
    @task
    def peek() -> list[dict]:
        """What any DAG on the asset can see: the event's extra, a handle without data."""
        events = get_current_context()["triggering_asset_events"][ORDERS]
        return [dict(e.extra) for e in events]

    @exclusive_task
    def snoop(batches: list[dict]) -> int:  # not a named consumer: NotAuthorizedError
        return len(batches)

    peek()
    snoop(from_asset(ORDERS))


producer = exclusive_asset_producer()
consumer = exclusive_asset_consumer()
bystander = exclusive_asset_bystander()

if __name__ == "__main__":
    producer.test()
