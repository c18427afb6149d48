"""A work queue read batch by batch: ``Iterator[T]`` arguments, acknowledged as the function goes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context

from exclusive_xcom import exclusive_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def e2e_stream():
    @exclusive_task(consumers=["work"], mode="items")
    def enqueue() -> list[int]:
        return list(range(50))

    @exclusive_task(batch_size=10, retries=1, retry_delay=timedelta(seconds=0))
    def work(orders: Iterator[int]) -> int:
        try_number = get_current_context()["ti"].try_number
        done = 0
        for order in orders:
            print(f"try {try_number} processed order {order}")
            done += 1
            if try_number == 1 and done == 25:
                raise RuntimeError("the first try dies in the middle of its third batch")
        return done

    work(enqueue())


e2e_stream_dag = e2e_stream()
