"""Exclusive outputs inside task groups: names relative to the group, and mapped groups."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task_group

from exclusive_xcom import exclusive_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def e2e_group_relative():
    """The consumer is named by its id within the group: "load" is "grp.load"."""

    @task_group
    def grp():
        @exclusive_task(consumers=["load"])
        def produce() -> dict:
            return {"n": 5}

        @exclusive_task
        def load(value: dict) -> int:
            return value["n"]

        load(produce())

    grp()


@dag(schedule=None, start_date=START, catchup=False)
def e2e_group_mapped():
    """An exclusive chain in an .expand()-ed group: each group instance keeps its own output."""

    @task_group
    def per(x: int):
        @exclusive_task(consumers=["load"])
        def produce(x: int) -> dict:
            return {"n": x * 100}

        @exclusive_task
        def load(value: dict) -> int:
            return value["n"]

        load(produce(x))

    per.expand(x=[1, 2, 3])


e2e_group_relative_dag = e2e_group_relative()
e2e_group_mapped_dag = e2e_group_mapped()
