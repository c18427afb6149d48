"""A consumer that also produces, whose finish commits but whose acknowledgement is lost.

``middle`` arms the test's proxy (``tests/proxy.py``, control port in ``LOST_ACK_PROXY``) on
its first try, so the COMMIT of its finish reaches the server and the reply does not. Its
retry must not run the function again: the sink gets what try 1 derived, exactly once.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import dag, get_current_context

from exclusive_xcom import claim, exclusive_task


def _arm_proxy() -> None:
    with socket.create_connection(("127.0.0.1", int(os.environ["LOST_ACK_PROXY"])), timeout=10) as conn:
        conn.sendall(b"arm\n")
        assert conn.recv(16).strip() == b"ok"


def _lost_ack_dag(mode: str):
    @dag(dag_id=f"e2e_lost_ack_{mode}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
    def lost_ack():
        @exclusive_task(consumers=["middle"], mode=mode)
        def produce():
            return [{"order": i} for i in range(5)] if mode == "items" else {"order": 7}

        # The proxy refuses connections for 1 s after the lost reply; the retry comes 3 s later.
        @exclusive_task(consumers=["sink"], retries=2, retry_delay=timedelta(seconds=3))
        def middle(value):
            try_number = get_current_context()["ti"].try_number
            print(f"middle ran in try {try_number}")
            if try_number == 1:
                _arm_proxy()  # the next COMMIT is this try's finish
            return [v["order"] * 10 for v in value] if mode == "items" else value["order"] * 10

        @exclusive_task
        def sink(derived):
            print(f"sink got {derived}")
            return derived

        sink(middle(produce()))

    return lost_ack()


e2e_lost_ack_each = _lost_ack_dag("each")
e2e_lost_ack_one = _lost_ack_dag("one")
e2e_lost_ack_items = _lost_ack_dag("items")


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def e2e_lost_ack_claim():
    """A classic operator's claim(): its retry cannot be spared, so it is told its input is done."""

    @exclusive_task(consumers=["middle"])
    def produce():
        return {"order": 7}

    def middle_body() -> int:
        value = claim("produce")
        if get_current_context()["ti"].try_number == 1:
            _arm_proxy()  # the next COMMIT is the finish in this task's post-execute hook
        return value["order"]

    middle = PythonOperator(task_id="middle", python_callable=middle_body, retries=1, retry_delay=timedelta(seconds=3))
    produce() >> middle


e2e_lost_ack_claim_dag = e2e_lost_ack_claim()
