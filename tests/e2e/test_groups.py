"""Task groups: consumers named within the group; a mapped group's instances keep their own outputs."""

from __future__ import annotations

import pytest

from .harness import TEST_DAGS, Result

DAGS = [TEST_DAGS / "groups.py"]


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_group_relative"}])
def test_a_consumer_named_within_its_group(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert [x["value"] for x in run.xcoms("grp.load", "return_value")] == [5]
    (row,) = dag_runs.ledger_rows()
    assert (row["task_id"], row["slot"], row["state"], row["owner_task_id"]) == (
        "grp.produce",
        "e2e_group_relative/grp.load",
        "consumed",
        "grp.load",
    )


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_group_mapped"}])
def test_each_instance_of_a_mapped_group_consumes_its_own_output(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert run.returned("per.load") == {0: 100, 1: 200, 2: 300}
    rows = dag_runs.ledger_rows()
    assert sorted((r["map_index"], r["owner_map_index"], r["state"]) for r in rows) == [
        (0, 0, "consumed"),
        (1, 1, "consumed"),
        (2, 2, "consumed"),
    ]
