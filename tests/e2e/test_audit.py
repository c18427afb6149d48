"""Impersonation under real Airflow: nothing refuses it, ``exclusive-xcom audit`` finds it.

The audit command runs here, in the test's process, against the test's ledger and the
metadata DB the Airflow process recorded the runs in (``[database] sql_alchemy_conn``): the
task-instance ids and host names it compares are the ones the task runner really reported.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom.audit import task_instance
from exclusive_xcom.cli import main

from .dags.impersonation import FORGED_TI_ID
from .harness import TEST_DAGS, Result

SUCCESS, FAILED = "success", "failed"
RUNS = [{"dag_id": "e2e_impersonation"}, {"dag_id": "e2e_impersonation_clean"}]


def _read(result: Result, stmt: sa.Select[Any]) -> str:
    """One value from the metadata DB the runs were recorded in."""
    engine = sa.create_engine(result.metadata_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.execute(stmt).scalar_one())
    finally:
        engine.dispose()


def attacker_ti_id(result: Result, run_id: str) -> str:
    """The id Airflow gave the attacker's task instance."""
    ti = task_instance.c
    where = (ti.dag_id == "e2e_impersonation", ti.run_id == run_id, ti.task_id == "attacker")
    return _read(result, sa.select(ti.id).where(*where))


def host_of(result: Result, ti_id: str) -> str:
    """The host Airflow recorded for a task instance (here every task ran on the same one)."""
    return _read(result, sa.select(task_instance.c.hostname).where(task_instance.c.id == uuid.UUID(ti_id)))


def audit(result: Result, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``exclusive-xcom --url <the test's ledger> audit <args>``: status, stdout, stderr."""
    code = main(["--url", result.ledger_url, "audit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def metadata(dag_runs: Result, monkeypatch: pytest.MonkeyPatch) -> Result:
    """The runs, with ``[database] sql_alchemy_conn`` pointing at the metadata DB they were recorded in."""
    import airflow.configuration  # noqa: F401  -- started under the tests' own configuration first

    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", dag_runs.metadata_url)
    return dag_runs


@pytest.mark.dag_runs([TEST_DAGS / "impersonation.py"], RUNS)
def test_audit_reports_exactly_the_forged_claims_and_consumes_and_nothing_of_a_clean_run(
    metadata: Result, capsys: pytest.CaptureFixture[str]
) -> None:
    result = metadata
    attacked, clean = result.runs
    assert attacked.states() == {
        "extract": SUCCESS,
        "load": SUCCESS,
        "secret_a": SUCCESS,
        "secret_b": SUCCESS,
        "attacker": SUCCESS,  # nothing refused it
        "victim_a": FAILED,  # its input is gone
        "victim_b": FAILED,
    }, result.tail()
    assert "already consumed by e2e_impersonation/" in attacked.task_log("victim_a"), "recorded as victim_a's own"
    assert clean.state == SUCCESS, result.tail()
    rows = {(r["run_id"], r["task_id"]): r for r in result.ledger_rows()}
    assert len(rows) == 6 and all(r["state"] == "consumed" for r in rows.values())
    stolen_a, stolen_b = rows[attacked.run_id, "secret_a"], rows[attacked.run_id, "secret_b"]
    assert (stolen_a["owner_task_id"], stolen_b["owner_task_id"]) == ("victim_a", "victim_b"), (
        "the ledger names the victims"
    )

    code, out, err = audit(result, capsys, "--json")
    report = json.loads(out)
    assert code == 1 and not err
    found = [(f["item_id"], f["action"], f["ti_id"], f["problem"]) for f in report["findings"]]
    attacker = f"that task instance is e2e_impersonation/{attacked.run_id}/attacker try 1, not the owner"
    attacker_id = attacker_ti_id(result, attacked.run_id)
    unknown = "unknown task instance id: Airflow ran no try with it"
    assert found == sorted(  # by item, the claim before the consume
        [
            (stolen_a["id"], "claim", FORGED_TI_ID, unknown),
            (stolen_a["id"], "consume", FORGED_TI_ID, unknown),
            (stolen_b["id"], "claim", attacker_id, attacker),
            (stolen_b["id"], "consume", attacker_id, attacker),
        ]
    ), found
    assert report["checked"] == 12 and report["unrecorded"] == 0, "the clean claims' ids, tries and hosts all match"

    code, out, _ = audit(result, capsys, "--run-id", attacked.run_id)
    *lines, summary = out.splitlines()
    assert code == 1 and summary == "4 mismatch(es) in 6 claim(s) and consume(s) checked", out
    forged_a = [line for line in lines if line.startswith(f"item {stolen_a['id']}: ")]
    assert len(lines) == 4 and len(forged_a) == 2, out
    assert forged_a[0].startswith(
        f"item {stolen_a['id']}: claim as e2e_impersonation/{attacked.run_id}/victim_a try 1 at "
    )
    assert forged_a[1].endswith(f" by task instance {FORGED_TI_ID} on host {host_of(result, attacker_id)}: {unknown}")

    assert audit(result, capsys, "--dag-id", "e2e_impersonation_clean") == (
        0,
        "no mismatch in 6 claim(s) and consume(s) checked\n",
        "",
    )
