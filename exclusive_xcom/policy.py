"""A cluster policy, registered through the ``airflow.policy`` entry point: when a DAG file
has been parsed and its DAG is complete, every consumer an exclusive producer names must
exist. Airflow turns the error into the DAG's import error, so a misspelt consumer is
reported when the DAG is parsed, not when the producer first runs."""

from __future__ import annotations

from typing import Any

from airflow.policies import hookimpl


@hookimpl
def task_policy(task: Any) -> None:
    from exclusive_xcom.decorator import check_consumers  # the decorator imports airflow.sdk

    check_consumers(task)
