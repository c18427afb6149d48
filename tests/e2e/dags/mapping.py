"""Dynamic task mapping over exclusive outputs: every shape the README's section names."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_items():
    """One mapped instance per item; instance i claims item i."""

    @exclusive_task(consumers=["handle"], mode="items")
    def produce():
        return [{"order": i} for i in range(5)]

    @exclusive_task
    def handle(order: dict) -> int:
        print(f"handle got order {order['order']}")
        return order["order"] * 2

    handle.expand(order=produce())


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_empty():
    """No items, no instances: the mapped consumer is skipped, as for a plain @task."""

    @exclusive_task(consumers=["handle"], mode="items")
    def produce():
        return []

    @exclusive_task
    def handle(order: dict) -> int:
        return order["order"]

    handle.expand(order=produce())


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_mapped():
    """A mapped producer feeding a mapped consumer: instance i gets producer instance i's output."""

    @exclusive_task(consumers=["consume"])
    def produce(x: int) -> dict:
        return {"x": x * 10}

    @exclusive_task
    def consume(v: dict, factor: int) -> int:
        print(f"consume got {v}")
        return v["x"] * factor

    consume.partial(factor=2).expand(v=produce.expand(x=[1, 2, 3]))


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_zip():
    """A zip of two mapped exclusive outputs: instance i gets the pair (left i, right i)."""

    @exclusive_task(consumers=["pair"])
    def left(x: int) -> int:
        return x

    @exclusive_task(consumers=["pair"])
    def right(y: str) -> str:
        return y

    @exclusive_task
    def pair(both: tuple) -> str:
        return f"{both[0]}{both[1]}"

    pair.expand(both=left.expand(x=[1, 2]).zip(right.expand(y=["a", "b"])))


e2e_map_items_dag = e2e_map_items()
e2e_map_empty_dag = e2e_map_empty()
e2e_map_mapped_dag = e2e_map_mapped()
e2e_map_zip_dag = e2e_map_zip()


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_each():
    """Mode each: the mapped consumer gets one element per instance, another consumer the whole list."""

    @exclusive_task(consumers=["handle", "audit"])
    def produce() -> list[int]:
        return [10, 20, 30]

    @exclusive_task
    def handle(n: int) -> int:
        return n + 1

    @exclusive_task
    def audit(all_of_them: list[int]) -> int:
        return sum(all_of_them)

    out = produce()
    handle.expand(n=out)
    audit(out)


e2e_map_each_dag = e2e_map_each()


@dag(schedule=None, start_date=START, catchup=False)
def e2e_map_too_long():
    """More items than [core] max_map_length allows: the producer fails as a plain @task's would."""

    @exclusive_task(consumers=["handle"], mode="items")
    def produce():
        return list(range(5))

    @exclusive_task
    def handle(n: int) -> int:
        return n

    handle.expand(n=produce())


e2e_map_too_long_dag = e2e_map_too_long()
