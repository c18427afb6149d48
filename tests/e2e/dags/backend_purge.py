"""With ExclusiveXComBackend: a producer's retry makes Airflow purge the handle its first try pushed.

Try 1 writes its output and pushes the handle, then a post-execute check fails (after
``execute``, so the handle is already in XCom). At the start of try 2 the task runner
deletes the task instance's XComs, i.e. purges the handle. In ``e2e_backend_purge_lost``
try 2 fails for good: nothing of try 1 may stay in the ledger or in object storage. In
``e2e_backend_purge_replaced`` try 2 succeeds and the consumer gets try 2's value.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context

from exclusive_xcom import exclusive_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
PAD = "p" * 4000  # above the test's offload threshold: the payload becomes a blob


def _fail_first_try(context: Any, result: Any = None) -> None:
    if context["ti"].try_number == 1:
        raise RuntimeError("post-execute check fails on try 1, after the handle was pushed")


def _try_number() -> int:
    return get_current_context()["ti"].try_number


@dag(schedule=None, start_date=START, catchup=False)
def e2e_backend_purge_lost():
    @exclusive_task(consumers=["reader"], retries=1, retry_delay=timedelta(0), post_execute=_fail_first_try)
    def producer() -> dict:
        if _try_number() > 1:
            raise RuntimeError("try 2 fails for good")
        return {"try": 1, "pad": PAD}

    @exclusive_task
    def reader(value: dict) -> int:
        return value["try"]

    reader(producer())


@dag(schedule=None, start_date=START, catchup=False)
def e2e_backend_purge_replaced():
    @exclusive_task(consumers=["reader"], retries=1, retry_delay=timedelta(0), post_execute=_fail_first_try)
    def producer() -> dict:
        return {"try": _try_number(), "pad": PAD}

    @exclusive_task
    def reader(value: dict) -> int:
        return value["try"]

    reader(producer())


lost = e2e_backend_purge_lost()
replaced = e2e_backend_purge_replaced()
