"""Two 10-task chains for the Airflow-overhead case: plain ``@task`` vs ``@exclusive_task``.

Every task passes a small dict to the next one. In the exclusive chain each output's only
consumer is the next task; the last task is bare (claims its input, returns plain XCom).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task

LENGTH = 10
START = pendulum.datetime(2026, 1, 1, tz="UTC")


def first():  # no return annotation: a `-> dict` would make plain @task split it (multiple_outputs)
    return {"n": 0, "rows": list(range(100))}


def step(value):
    return {"n": value["n"] + 1, "rows": value["rows"]}


@dag(dag_id="bench_chain_plain", schedule=None, start_date=START, catchup=False)
def plain_chain():
    value = task(first, task_id="t0")()
    for i in range(1, LENGTH):
        value = task(step, task_id=f"t{i}")(value)


@dag(dag_id="bench_chain_exclusive", schedule=None, start_date=START, catchup=False)
def exclusive_chain():
    value = exclusive_task(first, task_id="t0", consumers=["t1"])()
    for i in range(1, LENGTH):
        consumers = [f"t{i + 1}"] if i + 1 < LENGTH else None
        value = exclusive_task(step, task_id=f"t{i}", consumers=consumers)(value)


plain = plain_chain()
exclusive = exclusive_chain()
