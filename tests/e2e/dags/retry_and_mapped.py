"""Claims across retries, and a mapped producer whose handles reach one consumer."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, get_current_context

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_retry():
    @exclusive_task(consumers=["flaky"])
    def make() -> dict:
        return {"x": 7}

    @exclusive_task(retries=2, retry_delay=timedelta(seconds=0))
    def flaky(value: dict) -> int:
        try_number = get_current_context()["ti"].try_number
        print(f"flaky try {try_number} got {value}")
        if try_number < 2:
            raise RuntimeError("first try fails on purpose")
        return value["x"]

    flaky(make())


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_mapped_producer():
    @exclusive_task(consumers=["gather"])
    def part(x: int) -> dict:
        return {"x": x * 10}

    @exclusive_task
    def gather(parts: list) -> int:
        return sum(p["x"] for p in parts)

    gather(part.expand(x=[1, 2, 3]))


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def e2e_queue_final_failure():
    @exclusive_task(consumers=["work"], mode="items")
    def enqueue() -> list[int]:
        return list(range(40))

    @exclusive_task(batch_size=10, retries=0)
    def work(items: list[int], shard: int) -> int:
        # dag.test() runs the shards one after the other, in no fixed order: the first to
        # get the items fails for good; the other must then get them all back.
        first = Path(os.environ["AIRFLOW_HOME"], f"first-{get_current_context()['run_id']}")
        print(f"shard {shard} claimed {len(items)} item(s)")
        if items and not first.exists():
            first.touch()
            raise RuntimeError(f"shard {shard} fails for good")
        return len(items)

    work.partial(items=enqueue()).expand(shard=[0, 1])


retry_dag = e2e_retry()
queue_dag = e2e_queue_final_failure()
mapped_dag = e2e_mapped_producer()
