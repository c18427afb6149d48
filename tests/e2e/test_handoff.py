"""Cross-DAG hand-off under real Airflow: only the named task of the child DAG may claim.

The parent passes the handle in ``TriggerDagRunOperator(conf=...)`` (see
``dags/handoff_rules.py``). A task of the child DAG that is not named, and a task of a
third DAG, get :class:`NotAuthorizedError`; a named consumer that receives an altered
handle gets :class:`PayloadError` ("signature mismatch"); none of them takes the item,
and the real consumer still reads it, once. The replay of a consumed conf is covered by
``test_examples.py::test_handoff_to_another_dag_is_read_once_and_a_replay_is_refused``.

Four DAG runs; the driver reads the ledger right after the two runs of the third DAG, so the
test sees it as it was between the runs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from exclusive_xcom.handle import RESERVED_KEY

from .harness import TEST_DAGS, Result, Run
from .test_errors import final_exception

PARENT, CHILD, OUTSIDER = "handoff_parent", "handoff_child", "handoff_outsider"
DAG_FILE = TEST_DAGS / "handoff_rules.py"
SLOTS = [f"{CHILD}/ingest", f"{CHILD}/ingest_edited", f"{CHILD}/ingest_resigned"]
TOKEN = "handoff-e2e-token"  # a payload field: it must reach nobody but the named consumer
NOT_AUTHORIZED = "exclusive_xcom.errors.NotAuthorizedError"
PAYLOAD_ERROR = "exclusive_xcom.errors.PayloadError"


def suffix(handle: dict[str, Any], consumer: str) -> str:
    """The ``[dag=… run=… producer=… key=… consumer=…]`` part of an error about ``handle``."""
    return (
        f"[dag={handle['dag_id']!r} run={handle['run_id']!r} producer={handle['task_id']!r} "
        f"key={handle['key']!r} consumer={consumer!r}]"
    )


def assert_not_authorized(run: Run, task_id: str, handle: dict[str, Any], result: Result) -> None:
    kind, message = final_exception(run.task_log(task_id))
    assert kind == NOT_AUTHORIZED, (run.dag_id, task_id, kind, message, result.tail())
    assert f"task {task_id!r} of dag {run.dag_id!r} is not a named consumer of this output" in message, message
    assert f"(allowed: {', '.join(SLOTS)})" in message, message
    assert suffix(handle, f"{run.dag_id}/{task_id}") in message, message


@pytest.mark.dag_runs(
    [DAG_FILE],
    [
        {"dag_id": PARENT},  # produces and triggers the child
        {"dag_id": OUTSIDER, "conf_from_triggered": CHILD, "snapshot": True},  # a third DAG tries first
        {"dag_id": CHILD, "conf_from_triggered": CHILD},
        {"dag_id": OUTSIDER, "conf_from_triggered": CHILD, "snapshot": True},  # again, after the consumption
    ],
)
def test_only_the_named_child_task_claims_the_handle_passed_in_conf(dag_runs: Result) -> None:
    result = dag_runs
    parent, outsider, child, late_outsider = result.runs

    assert parent.state == "success", result.tail()
    assert parent.states() == {"export": "success", "forge": "success", "trigger_child": "success"}, (
        f"{parent.states()}{result.tail()}"
    )
    (handle,) = [x["value"] for x in parent.xcoms("export", RESERVED_KEY)]
    (triggered,) = [r for r in result.dag_runs if r["dag_id"] == CHILD and r["run_type"] == "operator_triggered"]
    conf = triggered["conf"]
    assert conf["batch"] == handle, "the child's conf carries the producer's handle as it is"
    assert (handle["dag_id"], handle["run_id"], handle["task_id"]) == (PARENT, parent.run_id, "export")
    assert sorted(handle["consumers"]) == SLOTS
    edited, resigned = conf["edited"], conf["resigned"]
    assert {k for k in handle if edited[k] != handle[k]} == {"run_id", "task_id"}, edited
    assert {k for k in handle if resigned[k] != handle[k]} == {"sig"}, resigned
    assert outsider.conf == conf

    # Case 2: a DAG that is not named, with a task of the consumer's very task_id, is refused.
    assert outsider.state == "failed", result.tail()
    assert outsider.states() == {"ingest": "failed"}, result.tail()
    assert_not_authorized(outsider, "ingest", handle, result)
    assert outsider.xcom == []

    before = outsider.ledger
    assert before is not None
    assert [r["slot"] for r in before] == SLOTS, before
    for row in before:  # the refusal took nothing: every slot is still claimable
        assert (row["state"], row["owner_dag_id"], row["owner_task_id"]) == ("ready", None, None), row
        assert row["claimed_at"] is None and row["lease_expires_at"] is None and row["payload"] is not None, row

    assert child.conf == late_outsider.conf == conf
    assert child.state == "failed", result.tail()
    assert child.states() == {
        "sneak": "failed",
        "ingest": "success",
        "ingest_edited": "failed",
        "ingest_resigned": "failed",
    }, f"{child.states()}{result.tail()}"

    # Case 1: the child's other task reading the same conf key is refused; it ran first, and
    # the named consumer still got the data (once: see the ledger below).
    assert_not_authorized(child, "sneak", handle, result)
    assert [x["value"] for x in child.xcoms("ingest", "return_value")] == [42], result.tail()

    # A non-consumer is refused as such even when the item is already consumed.
    assert late_outsider.state == "failed", result.tail()
    assert_not_authorized(late_outsider, "ingest", handle, result)
    assert "AlreadyConsumedError" not in late_outsider.log

    after = late_outsider.ledger
    assert after is not None
    assert [r["slot"] for r in after] == SLOTS, after
    consumed = after[0]
    assert consumed["slot"] == f"{CHILD}/ingest" and consumed["state"] == "consumed", consumed
    assert (consumed["owner_dag_id"], consumed["owner_run_id"], consumed["owner_task_id"], consumed["owner_try"]) == (
        CHILD,
        child.run_id,
        "ingest",
        1,
    )
    assert consumed["payload"] is None and consumed["consumed_at"] is not None

    # Case 3: the named consumers given an altered handle consumed nothing: their slots are
    # exactly as the producer wrote them.
    assert after[1:] == before[1:], "an altered handle changed the ledger"
    for task_id in ("ingest_edited", "ingest_resigned"):
        kind, message = final_exception(child.task_log(task_id))
        assert kind == PAYLOAD_ERROR, (task_id, kind, message, result.tail())
        assert "exclusive_xcom handle signature mismatch: the handle was forged or altered" in message, message
        assert not child.xcoms(task_id), child.xcoms(task_id)
    assert TOKEN not in result.output, "the payload reached a log"
    assert TOKEN not in json.dumps([r.xcom for r in result.runs]), "the payload reached the xcom table"

    # Every message names DAG, run, producer, key and consumer (for an altered handle: what
    # the handle claims, and the task that presented it).
    for task_id, altered in (("ingest_edited", edited), ("ingest_resigned", resigned)):
        _, message = final_exception(child.task_log(task_id))
        assert suffix(altered, f"{CHILD}/{task_id}") in message, message
