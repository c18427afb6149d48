"""Streaming consumers (``Iterator[T]``): batches are consumed as the function asks for the next."""

from __future__ import annotations

import re

import pytest

from .harness import TEST_DAGS, Result


@pytest.mark.dag_runs([TEST_DAGS / "stream.py"], [{"dag_id": "e2e_stream"}])
def test_a_crash_mid_stream_redoes_at_most_one_batch(dag_runs: Result) -> None:
    """Try 1 acknowledges two batches of 10, dies 5 items into the third; try 2 takes that batch
    back first and goes on: 5 items redone, every item consumed once."""
    run = dag_runs.run
    assert run.state == "success", dag_runs.tail()
    processed = [(int(t), int(o)) for t, o in re.findall(r"try (\d) processed order (\d+)", run.log)]
    first = [o for t, o in processed if t == 1]
    second = [o for t, o in processed if t == 2]
    assert first == list(range(25)), first
    assert second == list(range(20, 50)), second
    redone = sorted(set(first) & set(second))
    assert redone == list(range(20, 25)), "at most the batch the crashed try was working on is redone"
    rows = {r["seq"]: r for r in dag_runs.ledger_rows() if r["task_id"] == "enqueue"}
    assert {r["state"] for r in rows.values()} == {"consumed"}
    assert {s for s, r in rows.items() if r["owner_try"] == 1} == set(range(20)), "two batches acknowledged by try 1"
    assert {s for s, r in rows.items() if r["owner_try"] == 2} == set(range(20, 50))
    assert [x["value"] for x in run.xcoms("work", "return_value")] == [30]
    assert "work try 2 in " in run.log and ": 10 taken back from its try 1" in run.log, (
        "the log says where items came from"
    )
