"""Dynamic task mapping over exclusive outputs, through dag.test() on every ledger database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .harness import TEST_DAGS, Result, Run

DAGS = [TEST_DAGS / "mapping.py"]
PAYLOAD_MARKERS = ('"order"', '"x":', "payload")


def _no_payload_in_xcom(run: Run) -> None:
    """The XCom table holds handles (and ordinary return values of plain outputs), never a payload."""
    for x in run.xcoms():
        if x["key"] == "return_value" and x["task_id"] in {"handle", "consume", "pair"}:
            continue  # the consumers' own, ordinary return values
        text = json.dumps(x["raw"])
        assert not any(m in text for m in PAYLOAD_MARKERS), x


def _consumed_once(rows: list[dict[str, Any]], producer: str) -> dict[int, int]:
    """producer item seq (or map index) -> the map index of the consumer instance that consumed it."""
    mine = [r for r in rows if r["task_id"] == producer]
    assert {r["state"] for r in mine} == {"consumed"}, mine
    return {r["seq"] if r["map_index"] < 0 else r["map_index"]: r["owner_map_index"] for r in mine}


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_items"}])
def test_a_consumer_expanded_over_an_items_output_gets_one_item_per_instance(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert {k: v for k, v in run.states().items() if k.startswith("handle")} == {
        f"handle[{i}]": "success" for i in range(5)
    }
    assert run.returned("handle") == {i: i * 2 for i in range(5)}
    assert _consumed_once(dag_runs.ledger_rows(), "produce") == {i: i for i in range(5)}
    (handles,) = [x["raw"] for x in run.xcoms("produce", "return_value")]
    assert [h["seq"] for h in handles] == list(range(5)), "one signed handle per item, no payload"
    _no_payload_in_xcom(run)


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_empty"}])
def test_an_empty_items_output_makes_no_instances(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert run.states() == {"produce": "success", "handle": "skipped"}, run.states()
    assert dag_runs.ledger_rows() == []


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_mapped"}])
def test_a_mapped_consumer_of_a_mapped_producer_pairs_instances(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert run.returned("consume") == {0: 20, 1: 40, 2: 60}
    assert _consumed_once(dag_runs.ledger_rows(), "produce") == {0: 0, 1: 1, 2: 2}
    _no_payload_in_xcom(run)


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_zip"}])
def test_a_zip_of_two_mapped_exclusive_outputs(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert run.returned("pair") == {0: "1a", 1: "2b"}
    rows = dag_runs.ledger_rows()
    assert _consumed_once(rows, "left") == {0: 0, 1: 1} and _consumed_once(rows, "right") == {0: 0, 1: 1}


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_each"}])
def test_a_consumer_mapped_over_a_mode_each_list_gets_one_element_per_instance(dag_runs: Result) -> None:
    """The mapped consumer's slot holds one row per element; the other consumer's the whole list."""
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    assert run.returned("handle") == {0: 11, 1: 21, 2: 31}
    assert [x["value"] for x in run.xcoms("audit", "return_value")] == [60]
    rows = dag_runs.ledger_rows()
    assert {(r["slot"].split("/")[-1], r["seq"], r["owner_map_index"]) for r in rows} == {
        ("audit", 0, -1),
        ("handle", 0, 0),
        ("handle", 1, 1),
        ("handle", 2, 2),
    }
    assert {r["state"] for r in rows} == {"consumed"}


@pytest.mark.dag_runs(DAGS, [{"dag_id": "e2e_map_too_long"}], env={"AIRFLOW__CORE__MAX_MAP_LENGTH": "3"})
def test_more_items_than_max_map_length_fail_the_producer_as_for_a_plain_task(dag_runs: Result) -> None:
    run = dag_runs.run
    assert run.state == "failed", dag_runs.tail()
    assert run.states() == {"produce": "failed", "handle": "upstream_failed"}, run.states()
    assert "pushed value is too large to map as a downstream's dependency" in run.log, dag_runs.tail()
