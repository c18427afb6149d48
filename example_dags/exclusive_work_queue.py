"""A work queue inside one DAG run (mode="items"): mapped workers drain a shared pool.

Every element of the producer's list is its own ledger item. ``work`` takes its items as
an ``Iterator``: it claims a batch of 50 with SKIP LOCKED when it asks for the first item,
and the next batch (consuming the one it finished) when it runs past it, until none are
left; so each item is processed by exactly one worker, and a worker that dies costs at
most the batch it was on (its retry takes that batch back first). Under ``dag.test()``
tasks run one at a time, so the first worker drains the pool and the others get nothing;
under a real scheduler they share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["exclusive_xcom"])
def exclusive_work_queue():
    @exclusive_task(consumers=["work"], mode="items")
    def enqueue() -> list[dict]:
        return [{"order": i, "qty": i % 7} for i in range(250)]

    @exclusive_task(batch_size=50, retries=2, retry_delay=timedelta(seconds=10))
    def work(orders: Iterator[dict], shard: int) -> int:
        return sum(o["qty"] for o in orders)

    work.partial(orders=enqueue()).expand(shard=[0, 1, 2])


dag_object = exclusive_work_queue()

if __name__ == "__main__":
    dag_object.test()
