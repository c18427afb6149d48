"""Every example DAG runs to success under real Airflow, on every ledger backend.

Each test's runs are ``dag.test()`` runs in a real Airflow process (see :mod:`harness`),
against a fresh ledger database of its own; the test checks what Airflow recorded (run and
task states, the ``xcom`` table) and what the ledger holds (who consumed which item,
payloads cleared).
"""

from __future__ import annotations

import json

import pytest

from exclusive_xcom.handle import MARKER, RESERVED_KEY

from .harness import EXAMPLE_DAGS, Result

SUCCESS = "success"
CHILD = "exclusive_handoff_child"


def _assert_only_handles(result: Result, producers: list[str], secrets: list[str]) -> None:
    """The producers' XComs are one signed handle each, and no payload value is anywhere in XCom."""
    run = result.run
    for producer in producers:
        rows = run.xcoms(producer)
        assert [r["key"] for r in rows] == [RESERVED_KEY], f"{producer}: {rows}{result.tail()}"
        handle = rows[0]["value"]
        assert handle[MARKER] == 1 and handle["task_id"] == producer and handle["sig"], handle
        assert not {"payload", "value", "data"} & set(handle), handle
    everything = json.dumps(run.xcom)
    for secret in secrets:
        assert secret not in everything, f"payload field {secret!r} leaked into the xcom table: {run.xcom}"


@pytest.mark.dag_runs([EXAMPLE_DAGS / "exclusive_etl.py"], [{"dag_id": "exclusive_etl"}])
def test_etl_hands_each_stage_to_the_next_once_and_keeps_payloads_out_of_xcom(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.state == SUCCESS, result.tail()
    assert run.states() == {"extract": SUCCESS, "transform": SUCCESS, "load": SUCCESS}, result.tail()
    _assert_only_handles(result, ["extract", "transform"], secrets=['"rows"', '"amount"', '"total"'])
    assert [x["value"] for x in run.xcoms("load", "return_value")] == [5]  # bare form: an ordinary XCom
    assert "loaded 5 rows, total 150" in run.log

    rows = result.ledger_rows()
    assert {(r["task_id"], r["slot"]) for r in rows} == {
        ("extract", "exclusive_etl/transform"),
        ("transform", "exclusive_etl/load"),
    }
    for row in rows:
        consumer = row["slot"].split("/")[1]
        assert row["state"] == "consumed", row
        assert (row["owner_dag_id"], row["owner_run_id"], row["owner_task_id"]) == (
            "exclusive_etl",
            run.run_id,
            consumer,
        )
        assert row["run_id"] == run.run_id and row["owner_try"] == 1
        assert row["payload"] is None and row["payload_uri"] is None, "a consumed payload must be cleared"
        assert row["consumed_at"] is not None and row["lease_expires_at"] is None


@pytest.mark.dag_runs([EXAMPLE_DAGS / "exclusive_competing.py"], [{"dag_id": "exclusive_competing"}])
def test_competing_consumers_one_wins_the_other_is_skipped_and_the_run_succeeds(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run
    states = run.states()

    assert run.state == SUCCESS, result.tail()
    assert states["ticket"] == SUCCESS, result.tail()
    consumers = {"fast_path": states["fast_path"], "slow_path": states["slow_path"]}
    assert sorted(consumers.values()) == ["skipped", SUCCESS], f"{consumers}{result.tail()}"
    (winner,) = [t for t, s in consumers.items() if s == SUCCESS]
    (loser,) = [t for t, s in consumers.items() if s == "skipped"]
    prefix = f"exclusive_competing/{run.run_id}"
    assert f"{prefix}/{loser} try 1 skipped: 'ticket' went to {prefix}/{winner} try 1" in run.log, (
        "the loser's log names the task instance that won" + result.tail()
    )
    _assert_only_handles(result, ["ticket"], secrets=['"amount"'])

    (row,) = result.ledger_rows()
    assert row["mode"] == "one" and row["slot"] == "*"
    assert row["state"] == "consumed" and row["owner_task_id"] == winner and row["payload"] is None


@pytest.mark.dag_runs([EXAMPLE_DAGS / "exclusive_fanout.py"], [{"dag_id": "exclusive_fanout"}])
def test_fanout_gives_each_consumer_its_own_copy_and_allows_a_plain_ordering_edge(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.state == SUCCESS, result.tail()
    assert run.states() == {"snapshot": SUCCESS, "audit": SUCCESS, "report": SUCCESS, "bystander": SUCCESS}, (
        result.tail()
    )
    assert [x["value"] for x in run.xcoms("audit", "return_value")] == [1250.5]
    assert [x["value"] for x in run.xcoms("report", "return_value")] == [3]
    assert [x["value"] for x in run.xcoms("bystander", "return_value")] == ["ran after snapshot"]
    _assert_only_handles(result, ["snapshot"], secrets=['"accounts"', '"balance"'])

    rows = result.ledger_rows()
    assert sorted((r["slot"], r["state"], r["owner_task_id"]) for r in rows) == [
        ("exclusive_fanout/audit", "consumed", "audit"),
        ("exclusive_fanout/report", "consumed", "report"),
    ]
    assert all(r["payload"] is None for r in rows)


@pytest.mark.dag_runs([EXAMPLE_DAGS / "exclusive_work_queue.py"], [{"dag_id": "exclusive_work_queue"}])
def test_work_queue_mapped_workers_consume_all_items_exactly_once(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.state == SUCCESS, result.tail()
    assert run.states() == {"enqueue": SUCCESS, "work[0]": SUCCESS, "work[1]": SUCCESS, "work[2]": SUCCESS}, (
        result.tail()
    )
    sums = [x["value"] for x in run.xcoms("work", "return_value")]
    assert len(sums) == 3 and sum(sums) == sum(i % 7 for i in range(250)), sums
    _assert_only_handles(result, ["enqueue"], secrets=['"order"', '"qty"'])

    rows = result.ledger_rows()
    assert len(rows) == 250
    assert sorted(r["seq"] for r in rows) == list(range(250)), "one ledger item per element"
    assert {r["state"] for r in rows} == {"consumed"}
    assert {(r["owner_task_id"], r["owner_run_id"]) for r in rows} == {("work", run.run_id)}
    assert {r["owner_map_index"] for r in rows} <= {0, 1, 2}
    assert all(r["payload"] is None for r in rows)


@pytest.mark.dag_runs(
    [EXAMPLE_DAGS / "exclusive_handoff.py"],
    [
        {"dag_id": "exclusive_handoff_parent"},
        {"dag_id": CHILD, "conf_from_triggered": CHILD},  # the conf TriggerDagRunOperator passed
        {"dag_id": CHILD, "conf_from_triggered": CHILD},  # the same conf again: a replay
    ],
)
def test_handoff_to_another_dag_is_read_once_and_a_replay_is_refused(dag_runs: Result) -> None:
    child, result = CHILD, dag_runs
    parent, first, replay = result.runs

    assert parent.state == SUCCESS, result.tail()
    assert parent.states() == {"export": SUCCESS, "trigger_child": SUCCESS}, result.tail()
    (triggered,) = [r for r in result.dag_runs if r["dag_id"] == child and r["run_type"] == "operator_triggered"]
    handle = triggered["conf"]["batch"]
    assert handle[MARKER] == 1 and (handle["dag_id"], handle["run_id"], handle["task_id"]) == (
        "exclusive_handoff_parent",
        parent.run_id,
        "export",
    )
    assert "rows" not in json.dumps(triggered["conf"]), "the conf carries the handle, not the data"
    assert first.conf == replay.conf == triggered["conf"]

    assert first.state == SUCCESS, result.tail()
    assert first.states() == {"ingest": SUCCESS}, result.tail()
    assert [x["value"] for x in first.xcoms("ingest", "return_value")] == [3]
    (row,) = result.ledger_rows()
    assert row["state"] == "consumed" and row["payload"] is None
    assert (row["owner_dag_id"], row["owner_run_id"], row["owner_task_id"]) == (child, first.run_id, "ingest")

    assert replay.state == "failed", result.tail()
    assert replay.states() == {"ingest": "failed"}, result.tail()
    assert "AlreadyConsumedError" in replay.log, replay.log[-4000:]
    expected = (
        f"[dag='exclusive_handoff_parent' run='{parent.run_id}' producer='export' key='return_value' "
        f"consumer='{child}/ingest']"
    )
    assert expected in replay.log, replay.log[-4000:]
    assert f"already consumed by {child}/{first.run_id}/ingest" in replay.log
    assert "; this try holds no items [dag=" in replay.log, "the error says what the failed try holds"
    assert result.ledger_rows() == [row], "the refused replay changed nothing"
