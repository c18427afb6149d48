"""The distributed tier's DAGs (tests/distributed): one per case, pinned to hosts by queue.

Every Celery worker host listens to its own queue (``EXX_QUEUE_<HOST>``, set by the
cluster harness on every host) and to the default queue; ``mallory`` listens to its own
only, and has a different ``secret_key``. Tasks return the FQDN of the host that ran
them, to be checked against ``task_instance.hostname``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context

from exclusive_xcom import exclusive_task

ALPHA = os.environ.get("EXX_QUEUE_ALPHA", "default")
BRAVO = os.environ.get("EXX_QUEUE_BRAVO", "default")
MALLORY = os.environ.get("EXX_QUEUE_MALLORY", "default")
ROWS = 2000  # about 100 kB of JSON: above the tier's offload threshold, so it goes through S3
ITEMS = int(os.environ.get("EXX_DIST_ITEMS", "5000"))
WORKERS = 4
CRASH_ITEMS = 400
START = pendulum.datetime(2026, 1, 1, tz="UTC")


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dag(schedule=None, start_date=START, catchup=False)
def dist_chain():
    """extract (alpha) -> transform (bravo) -> load (alpha): each hop crosses hosts, through S3."""

    @exclusive_task(consumers=["transform"], queue=ALPHA)
    def extract() -> dict:
        rows = [{"i": i, "text": f"row {i:05d} " * 4} for i in range(ROWS)]
        return {"rows": rows, "sha": digest(rows), "host": socket.getfqdn()}

    @exclusive_task(consumers=["load"], queue=BRAVO)
    def transform(raw: dict) -> dict:
        if digest(raw["rows"]) != raw["sha"]:
            raise ValueError("the rows do not match the producer's digest")
        rows = [{"i": r["i"], "len": len(r["text"]), "pad": "x" * 40} for r in raw["rows"]]
        return {"rows": rows, "sha": digest(rows), "received": raw["sha"], "host": socket.getfqdn()}

    @exclusive_task(queue=ALPHA)
    def load(clean: dict) -> dict:
        return {"n": len(clean["rows"]), "sha": digest(clean["rows"]), "sent": clean["sha"], "host": socket.getfqdn()}

    load(transform(extract()))


@dag(schedule=None, start_date=START, catchup=False, max_active_tasks=WORKERS + 1)
def dist_items():
    """5,000 items drained by 4 mapped workers on the default queue (both hosts serve it)."""

    @exclusive_task(consumers=["charge"], mode="items")
    def enqueue() -> list[int]:
        return list(range(ITEMS))

    @exclusive_task(batch_size=25, retries=1, retry_delay=timedelta(seconds=2))
    def charge(orders: Iterator[int], shard: int) -> dict:
        seen = []
        for order in orders:
            time.sleep(0.001)
            seen.append(order)
        return {"shard": shard, "orders": len(seen), "sum": sum(seen), "host": socket.getfqdn()}

    charge.partial(orders=enqueue()).expand(shard=list(range(WORKERS)))


@dag(schedule=None, start_date=START, catchup=False)
def dist_crash():
    """A slow drain on the default queue; the test SIGKILLs the host it runs on."""

    @exclusive_task(consumers=["drain"], mode="items", queue=BRAVO)
    def fill() -> list[int]:
        return list(range(CRASH_ITEMS))

    @exclusive_task(batch_size=20, retries=1, retry_delay=timedelta(seconds=1))
    def drain(orders: Iterator[int]) -> dict:
        context = get_current_context()
        ti = context["ti"]
        log = os.path.join(os.environ["AIRFLOW_HOME"], f"processed-{ti.run_id}.log")
        count = 0
        with open(log, "a") as out:  # the side effects, each line on its own host's disk
            for order in orders:
                time.sleep(0.02)
                out.write(f"{ti.try_number} {order} {socket.getfqdn()}\n")
                out.flush()
                count += 1
        return {"orders": count, "try": ti.try_number, "host": socket.getfqdn()}

    drain(fill())


@dag(schedule=None, start_date=START, catchup=False)
def dist_wrong_key():
    """produce (alpha) for one of peek (mallory, another secret_key) or take (bravo)."""

    @exclusive_task(consumers=["peek", "take"], mode="one", queue=ALPHA)
    def produce() -> dict:
        return {"secret": "only for a key holder", "host": socket.getfqdn()}

    @exclusive_task(queue=MALLORY)
    def peek(value: dict) -> str:
        return str(value["secret"])

    @exclusive_task(queue=BRAVO, trigger_rule="all_done")
    def take(value: dict) -> dict:
        return {"secret": value["secret"], "host": socket.getfqdn()}

    handed = produce()
    peek(handed) >> take(handed)


dist_chain()
dist_items()
dist_crash()
dist_wrong_key()
