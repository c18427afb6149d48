"""A work queue with one unreadable item: the drain fails in a later batch, for good.

``spoil`` overwrites the stored payload of item 35 (as a bad disk or a bad hand might)
before the two shards run. Whichever shard runs first claims batches 0-9 .. 30-39 and
fails decoding the last; having no retry, it must give back all 40 items it holds, so the
second shard meets the same 40 (and the same unreadable item) instead of an empty pool.
"""

from __future__ import annotations

import os

import pendulum
import sqlalchemy as sa
from airflow.sdk import dag, get_current_context, task

from exclusive_xcom import exclusive_task

SPOILED_SEQ = 35


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_queue_spoiled():
    @exclusive_task(consumers=["work"], mode="items")
    def enqueue() -> list[int]:
        return list(range(40))

    @task
    def spoil() -> None:
        engine = sa.create_engine(os.environ["AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN"], poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE exclusive_xcom_item SET payload = :junk "
                        "WHERE dag_id = 'e2e_queue_spoiled' AND run_id = :run AND seq = :seq"
                    ),
                    {"junk": b"\x00 not a payload", "run": get_current_context()["run_id"], "seq": SPOILED_SEQ},
                )
        finally:
            engine.dispose()

    @exclusive_task(batch_size=10, retries=0)
    def work(items: list[int], shard: int) -> int:
        return len(items)

    queue = enqueue()
    spoiled = spoil()
    queue >> spoiled >> work.partial(items=queue).expand(shard=[0, 1])


spoiled_dag = e2e_queue_spoiled()
