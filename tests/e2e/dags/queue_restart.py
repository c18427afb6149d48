"""A work queue drained while the test restarts the ledger's PostgreSQL server.

Under ``dag.test()`` the mapped workers run one after another, so the first drains the
whole pool in batches of 10; the test restarts (or crashes) the server in the middle of
that drain. The worker has no retries: it fails for good and must give back every item it
already claimed, so that the workers after it drain them all.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task

ITEMS = 20_000
WORKERS = 3


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_queue_restart():
    @exclusive_task(consumers=["work"], mode="items")
    def enqueue() -> list[int]:
        return list(range(ITEMS))

    @exclusive_task(batch_size=10, retries=0)
    def work(items: list[int], shard: int) -> int:
        print(f"shard {shard} got {len(items)} item(s)")
        return len(items)

    work.partial(items=enqueue()).expand(shard=list(range(WORKERS)))


dag_object = e2e_queue_restart()
