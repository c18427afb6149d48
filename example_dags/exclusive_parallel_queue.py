"""A parallel work queue (mode="items"): 5,000 orders charged by 4 mapped workers at once.

``enqueue`` returns one list; every order in it becomes its own ledger item. The four
``charge`` instances run at the same time under a real scheduler (LocalExecutor,
CeleryExecutor, ...). Each takes its orders as an ``Iterator``: it claims a batch of 25
with ``SELECT ... FOR UPDATE SKIP LOCKED`` when it needs the next order, and consumes the
batch it has charged when it moves on, until the pool is empty; so the workers never wait
for one another, share the pool with whoever is running, no order is charged twice, and a
worker that dies costs at most its current batch (its retry takes it back first). Each
returns a summary (an ordinary XCom). Under ``dag.test()``, which runs one task at a time,
the first worker charges everything. ``EXCLUSIVE_PARALLEL_QUEUE_ORDERS`` sets the number of
orders (default 5,000).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task

ORDERS = int(os.environ.get("EXCLUSIVE_PARALLEL_QUEUE_ORDERS", "5000"))
WORKERS = 4
SECONDS_PER_ORDER = 0.001  # stands in for the call to the payment provider


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=WORKERS + 1,
    tags=["exclusive_xcom"],
)
def exclusive_parallel_queue():
    @exclusive_task(consumers=["charge"], mode="items")
    def enqueue() -> list[dict]:
        return [{"order": i, "cents": 100 + i % 900} for i in range(ORDERS)]

    @exclusive_task(batch_size=25, retries=2, retry_delay=timedelta(seconds=10))
    def charge(orders: Iterator[dict], shard: int) -> dict:
        count = cents = 0
        for order in orders:
            time.sleep(SECONDS_PER_ORDER)
            count, cents = count + 1, cents + order["cents"]
        return {"shard": shard, "orders": count, "cents": cents}

    charge.partial(orders=enqueue()).expand(shard=list(range(WORKERS)))


dag_object = exclusive_parallel_queue()

if __name__ == "__main__":
    dag_object.test()
