"""Claim rules that need a real Airflow: retries keep claims; mapped producers fan in."""

from __future__ import annotations

import pytest

from tests.proxy import LostAckProxy

from .harness import TEST_DAGS, Airflow, Result, ledger_rows

DAGS = TEST_DAGS / "retry_and_mapped.py"


@pytest.mark.dag_runs([DAGS], [{"dag_id": "e2e_retry"}])
def test_a_failed_try_keeps_its_claim_and_the_retry_consumes_it(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run
    assert run.state == "success", result.tail()
    assert "flaky try 1 got {'x': 7}" in run.log and "flaky try 2 got {'x': 7}" in run.log, result.tail()
    assert "keeps 1 claim(s) for its retry" in run.log
    (flaky,) = [t for t in run.tis if t["task_id"] == "flaky"]
    assert flaky["try_number"] == 2, flaky
    (row,) = result.ledger_rows()
    assert (row["state"], row["owner_task_id"], row["owner_try"]) == ("consumed", "flaky", 2)


@pytest.mark.dag_runs([DAGS], [{"dag_id": "e2e_mapped_producer"}])
def test_a_mapped_producer_hands_every_instance_to_its_consumer(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run
    assert run.state == "success", result.tail()
    assert run.states() == {"part[0]": "success", "part[1]": "success", "part[2]": "success", "gather": "success"}
    rows = result.ledger_rows()
    assert sorted(r["map_index"] for r in rows) == [0, 1, 2]
    assert {(r["state"], r["owner_task_id"]) for r in rows} == {("consumed", "gather")}


@pytest.mark.dag_runs([DAGS], [{"dag_id": "e2e_queue_final_failure"}])
def test_items_of_a_worker_that_fails_for_good_return_to_the_pool(dag_runs: Result) -> None:
    """The first shard to run drains everything and fails with no retry left: its claims are
    released, and the other shard gets all of them."""
    result = dag_runs
    run = result.run
    states = run.states()
    assert sorted(states.values()) == ["failed", "success", "success"] and states["enqueue"] == "success", result.tail()
    (winner,) = [int(t[5]) for t, s in states.items() if t.startswith("work[") and s == "success"]
    assert f"shard {1 - winner} claimed 40 item(s)" in run.log, result.tail()
    assert f"shard {winner} claimed 40 item(s)" in run.log, result.tail()
    assert "failed for good; released 40 claim(s)" in run.log
    rows = result.ledger_rows()
    assert len(rows) == 40
    assert {(r["state"], r["owner_task_id"], r["owner_map_index"]) for r in rows} == {("consumed", "work", winner)}


@pytest.mark.dag_runs([TEST_DAGS / "queue_spoiled.py"], [{"dag_id": "e2e_queue_spoiled"}])
def test_a_worker_that_fails_for_good_in_a_later_batch_releases_every_batch(dag_runs: Result) -> None:
    """Item 35 cannot be read: each shard holds 40 items when its fourth batch fails, and has
    no retry; the first must release them all for the second to meet them, then so must it."""
    result = dag_runs
    run = result.run
    assert run.states() == {"enqueue": "success", "spoil": "success", "work[0]": "failed", "work[1]": "failed"}, (
        result.tail()
    )
    assert run.log.count("failed for good; released 40 claim(s)") == 2, result.tail()
    says = (
        "the stored payload is not encrypted (or is corrupted), and [exclusive_xcom] allow_plaintext is not set: "
        "run `exclusive-xcom rotate-key` to encrypt stored payloads, or set allow_plaintext = True; "
        "this try holds 40 items (ids 1..40): its retry takes them back first; if it fails for good, they are released"
    )
    assert run.log.count(says) >= 2, "each shard's error says what it holds" + result.tail()
    rows = result.ledger_rows()
    assert len(rows) == 40
    held = [(r["seq"], r["owner_task_id"], r["owner_map_index"]) for r in rows if r["state"] != "ready"]
    assert held == [], f"a try that failed for good still holds {len(held)} item(s): {held[:5]}"


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_retry_after_a_lost_commit_acknowledgement_does_not_run_again(
    backend: str, airflow: Airflow, ledger_url: str
) -> None:
    """For real, through Airflow's retries: ``middle``'s finish (consume its input, write its
    output) commits on the server, a proxy throws the reply away and the server stays away
    for its re-check; try 1 fails. Try 2 succeeds without running the function, publishing
    what try 1 wrote, and the sink gets it: every input consumed once, nothing held."""
    with LostAckProxy(ledger_url, outage=1.0) as proxy:
        result = airflow.test(
            [TEST_DAGS / "lost_ack.py"],
            [{"dag_id": f"e2e_lost_ack_{mode}"} for mode in ("each", "one", "items", "claim")],
            proxy.url(ledger_url),
            env={"LOST_ACK_PROXY": str(proxy.control_port)},
        )
    *runs, classic = result.runs
    expected = {"each": 70, "one": 70, "items": [0, 10, 20, 30, 40]}
    for run, (mode, derived) in zip(runs, expected.items(), strict=True):
        assert run.state == "success", f"{mode}: {result.tail()}"
        middle = run.task_log("middle")
        assert "middle ran in try 1" in run.log and "middle ran in try 2" not in run.log, f"{mode}: {result.tail()}"
        assert "whether this finish committed is unknown" in run.log, f"{mode}: the acknowledgement was not lost"
        assert (
            "try 1 of this task instance already consumed these inputs (its finish committed, then that try "
            "failed, e.g. its acknowledgement was lost); the function is not run again: this try publishes "
            "the output that try wrote (generation 1)"
        ) in run.log, f"{mode}: {middle}"
        assert [t["try_number"] for t in run.tis if t["task_id"] == "middle"] == [2]
        assert [x["value"] for x in run.xcoms("sink", "return_value")] == [derived], mode
        rows = [r for r in ledger_rows(ledger_url) if r["run_id"] == run.run_id]
        assert {(r["task_id"], r["state"], r["owner_task_id"], r["owner_try"]) for r in rows} == {
            ("produce", "consumed", "middle", 1),
            ("middle", "consumed", "sink", 1),
        }, mode
        assert len(rows) == (5 if mode == "items" else 1) + 1, f"{mode}: {rows}"
    # A classic operator's claim(): the operator is already running when it learns its input
    # is done, so it fails with what happened instead of running on nothing.
    assert classic.states() == {"produce": "success", "middle": "failed"}, result.tail()
    assert "whether this finish committed is unknown" in classic.log, result.tail()
    assert (
        "AlreadyConsumedError: try 1 of this task instance already consumed these inputs (its finish committed, "
        "then that try failed, e.g. its acknowledgement was lost); it cannot be claimed again"
    ) in classic.log, result.tail()
