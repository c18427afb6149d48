"""A streamed work queue under the real scheduler: late starters, worker counts, a SIGKILL.

``conf``: ``workers`` (mapped ``charge`` instances), ``late`` (seconds the last instance
waits before it asks for its first order: a worker that starts late on purpose), ``kill``
(the shard whose first try SIGKILLs itself 5 orders into its second batch). Every charged
order is appended to ``<AIRFLOW_HOME>/charged-<run_id>.log`` as ``shard try order``, the
side effect whose repetitions the test counts.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from exclusive_xcom import exclusive_task

ORDERS = 5000
BATCH = 25
SECONDS_PER_ORDER = 0.002


def _charge(orders: Iterable[int], shard: int) -> int:
    context = get_current_context()
    conf, ti = context["dag_run"].conf or {}, context["ti"]
    if shard == int(conf.get("workers", 4)) - 1:
        time.sleep(float(conf.get("late", 0)))
    log = Path(os.environ["AIRFLOW_HOME"], f"charged-{context['run_id']}.log")
    done = 0
    with log.open("a") as out:
        for order in orders:
            time.sleep(SECONDS_PER_ORDER)
            out.write(f"{shard} {ti.try_number} {order}\n")
            out.flush()
            done += 1
            if shard == conf.get("kill") and ti.try_number == 1 and done == BATCH + 5:
                os.kill(os.getpid(), signal.SIGKILL)
    return done


def _queue(dag_id: str, streamed: bool) -> None:
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), max_active_tasks=8)
    def queue() -> None:
        @exclusive_task(consumers=["charge"], mode="items")
        def enqueue() -> list[int]:
            return list(range(ORDERS))

        @task
        def shards() -> list[int]:
            return list(range(int((get_current_context()["dag_run"].conf or {}).get("workers", 4))))

        retry: dict[str, Any] = {"batch_size": BATCH, "retries": 1, "retry_delay": timedelta(seconds=1)}

        @exclusive_task(task_id="charge", **retry)
        def stream(orders: Iterator[int], shard: int) -> int:  # claims batch by batch
            return _charge(orders, shard)

        @exclusive_task(task_id="charge", **retry)
        def claim_all(orders: list[int], shard: int) -> int:  # claims its whole share first
            return _charge(orders, shard)

        (stream if streamed else claim_all).partial(orders=enqueue()).expand(shard=shards())

    queue()


_queue("queue_spread", streamed=True)
_queue("queue_spread_list", streamed=False)  # the form that claims up front, for comparison
