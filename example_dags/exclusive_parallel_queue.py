"""A parallel work queue (mode="items"): 5,000 orders charged by 4 mapped workers at once.

``enqueue`` returns one list; every order in it becomes its own ledger item. The four
``charge`` instances run at the same time under a real scheduler (LocalExecutor,
CeleryExecutor, ...): each claims batches of 25 with ``SELECT ... FOR UPDATE SKIP LOCKED``
until the pool is empty, so they never wait for one another and no order is charged twice.
Each instance then charges what it claimed and returns a summary (an ordinary XCom).

A worker claims its whole share before its function runs; the share depends on how the
workers' starts overlap, so one of them may well get more than the others (or, under
``dag.test()``, which runs one task at a time, the first one gets everything and the
rest receive ``[]``). ``EXCLUSIVE_PARALLEL_QUEUE_ORDERS`` sets the number of orders
(default 5,000).
"""

from __future__ import annotations

import os
import time

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

    @exclusive_task(batch_size=25)
    def charge(orders: list[dict], shard: int) -> dict:
        for _ in orders:
            time.sleep(SECONDS_PER_ORDER)
        return {"shard": shard, "orders": len(orders), "cents": sum(o["cents"] for o in orders)}

    charge.partial(orders=enqueue()).expand(shard=list(range(WORKERS)))


dag_object = exclusive_parallel_queue()

if __name__ == "__main__":
    dag_object.test()
