"""``ExclusiveXComBackend`` configured as Airflow's XCom backend, under real ``dag.test()`` runs.

``[core] xcom_backend`` is read once, when ``airflow.sdk`` is imported, so it is set in
the environment of the Airflow process: the tests share one process of profile
``xcom_backend``; the one that also wraps another backend has a process of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exclusive_xcom.handle import MARKER, RESERVED_KEY

from .harness import EXAMPLE_DAGS, TEST_DAGS, XCOM_BACKEND, Airflow, Result
from .test_errors import final_exception

SUCCESS = "success"
THRESHOLD = {"AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES": "1024"}
CHILD, CLASSIC_CHILD = "exclusive_handoff_child", "e2e_backend_handoff_child"
OTHERS = ["exclusive_fanout", "exclusive_competing", "exclusive_work_queue", "e2e_mapped_producer"]
OBJECT_STORAGE = "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.dag_runs(
    [EXAMPLE_DAGS / f"{name}.py" for name in ("exclusive_etl", "exclusive_handoff", *OTHERS[:3])]
    + [TEST_DAGS / "backend_handoff.py", TEST_DAGS / "retry_and_mapped.py"],
    [
        {"dag_id": "exclusive_etl"},
        {"dag_id": "exclusive_handoff_parent"},
        {"dag_id": CHILD, "conf_from_triggered": CHILD},
        {"dag_id": "e2e_backend_handoff_parent"},
        {"dag_id": CLASSIC_CHILD, "conf_from_triggered": CLASSIC_CHILD},
        *({"dag_id": dag_id} for dag_id in OTHERS),
    ],
    profile="xcom_backend",
)
def test_the_examples_still_succeed_with_the_backend(dag_runs: Result) -> None:
    """Consumers resolve their arguments (decorated, mapped, competing, from a mapped producer),
    and the parent's TriggerDagRunOperator forwards the handle to the child DAG."""
    child, classic_child, others, result = CHILD, CLASSIC_CHILD, OTHERS, dag_runs
    etl, parent, first, classic_parent, classic, *rest = result.runs

    assert etl.states() == {"extract": SUCCESS, "transform": SUCCESS, "load": SUCCESS}, result.tail()
    assert "loaded 5 rows, total 150" in etl.log
    assert parent.states() == {"export": SUCCESS, "trigger_child": SUCCESS}, result.tail()
    assert first.states() == {"ingest": SUCCESS}, result.tail()
    assert [x["value"] for x in first.xcoms("ingest", "return_value")] == [3]
    assert classic_parent.states() == {"export": SUCCESS, "trigger_child": SUCCESS}, result.tail()
    assert classic.states() == {"ingest_classic": SUCCESS}, result.tail()
    assert [x["value"] for x in classic.xcoms("ingest_classic", "return_value")] == [4]
    assert {r.dag_id: r.state for r in rest} == dict.fromkeys(others, SUCCESS), result.tail()

    owners = {
        (r["dag_id"], r["task_id"]): (r["state"], r["owner_dag_id"], r["owner_task_id"])
        for r in result.ledger_rows()
        if r["dag_id"] in ("exclusive_etl", "exclusive_handoff_parent", "e2e_backend_handoff_parent")
    }
    assert owners == {
        ("exclusive_etl", "extract"): ("consumed", "exclusive_etl", "transform"),
        ("exclusive_etl", "transform"): ("consumed", "exclusive_etl", "load"),
        ("exclusive_handoff_parent", "export"): ("consumed", child, "ingest"),
        ("e2e_backend_handoff_parent", "export"): ("consumed", classic_child, "ingest_classic"),
    }
    assert {r["state"] for r in result.ledger_rows()} == {"consumed"}


@pytest.mark.dag_runs([TEST_DAGS / "backend_peek.py"], [{"dag_id": "e2e_backend_peek"}], profile="xcom_backend")
def test_a_task_that_is_not_a_consumer_cannot_pull_the_handle(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.states() == {
        "producer": SUCCESS,
        "reader": SUCCESS,
        "classic_reader": SUCCESS,
        "bystander": SUCCESS,
        "peek": "failed",
        "peek_template": "failed",
        "impostor": "failed",
    }, result.tail()
    suffix = "[dag='e2e_backend_peek' run='{}' producer='producer' key='return_value' consumer='e2e_backend_peek/{}']"
    for peek in ("peek", "peek_template"):  # in the task body, and while rendering templates
        kind, message = final_exception(run.task_log(peek))
        assert kind == "exclusive_xcom.errors.NotAuthorizedError", (peek, kind, message)
        assert f"task {peek!r} of dag 'e2e_backend_peek' may not read the exclusive handle of 'producer'" in message
        assert "allowed: e2e_backend_peek/classic_reader, e2e_backend_peek/reader" in message
        assert suffix.format(run.run_id, peek) in message
    assert "peek_template got" not in run.log

    kind, message = final_exception(run.task_log("impostor"))
    assert kind == "exclusive_xcom.errors.NotAuthorizedError", (kind, message)
    assert "task 'impostor' of dag 'e2e_backend_peek' cannot claim on behalf of 'classic_reader'" in message
    assert suffix.format(run.run_id, "impostor") in message

    assert "hunter2-backend-secret" not in result.output
    assert [x["value"] for x in run.xcoms("classic_reader", "return_value")] == [22]
    rows = result.ledger_rows()
    assert sorted((r["owner_task_id"], r["state"]) for r in rows) == [
        ("classic_reader", "consumed"),
        ("reader", "consumed"),
    ]


@pytest.mark.dag_runs(
    [TEST_DAGS / "backend_purge.py"],
    [{"dag_id": "e2e_backend_purge_lost"}, {"dag_id": "e2e_backend_purge_replaced"}],
    env=THRESHOLD,
    profile="xcom_backend",
)
def test_a_retried_producer_purges_its_first_handle_with_its_items_and_blobs(dag_runs: Result) -> None:
    result = dag_runs
    lost, replaced = result.runs
    offload = result.workdir / "offload"

    assert lost.states() == {"producer": "failed", "reader": "upstream_failed"}, result.tail()
    assert [t["try_number"] for t in lost.tis if t["task_id"] == "producer"] == [2]
    assert "forgot producer generation 1 (its handle was purged)" in lost.log, result.tail()
    rows = result.ledger_rows()
    assert [r for r in rows if r["dag_id"] == "e2e_backend_purge_lost"] == [], "try 1's items went with its handle"

    assert replaced.states() == {"producer": SUCCESS, "reader": SUCCESS}, result.tail()
    assert "forgot producer generation 1 (its handle was purged)" in replaced.log, result.tail()
    assert [x["value"] for x in replaced.xcoms("reader", "return_value")] == [2]
    (row,) = [r for r in rows if r["dag_id"] == "e2e_backend_purge_replaced"]
    assert (row["generation"], row["state"], row["owner_task_id"]) == (2, "consumed", "reader")

    assert _files(offload) == [], "every blob is gone: try 1's purged, try 2's consumed"


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.dag_runs([TEST_DAGS / "backend_purge.py"], [{"dag_id": "e2e_backend_purge_lost"}], env=THRESHOLD)
def test_without_the_backend_the_first_try_items_stay_behind(dag_runs: Result) -> None:
    """The control of the test above: the deletion is the backend's doing."""
    result = dag_runs
    assert result.run.states() == {"producer": "failed", "reader": "upstream_failed"}, result.tail()
    (row,) = result.ledger_rows()
    assert (row["generation"], row["state"]) == (1, "ready") and row["payload_uri"]
    assert len(_files(result.workdir / "offload")) == 1


def test_it_composes_with_the_object_storage_backend(airflow: Airflow, ledger_url: str) -> None:
    xcom_dir = airflow.home / "xcom"
    result = airflow.test(
        [TEST_DAGS / "backend_compose.py"],
        [{"dag_id": "e2e_backend_compose"}],
        ledger_url,
        env={
            **XCOM_BACKEND,
            "AIRFLOW__EXCLUSIVE_XCOM__BASE_XCOM_BACKEND": OBJECT_STORAGE,
            "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH": f"file://{xcom_dir}",
            "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD": "0",
        },
    )
    run = result.run

    assert run.states() == {"numbers": SUCCESS, "total": SUCCESS, "secret": SUCCESS, "unwrap": SUCCESS}, result.tail()
    plain = [x for x in run.xcom if x["key"] != RESERVED_KEY]
    assert {(x["task_id"], x["key"]) for x in plain} == {
        ("numbers", "copy"),
        ("numbers", "return_value"),
        ("total", "return_value"),
        ("unwrap", "return_value"),
    }, run.xcom
    stored = {Path(x["raw"].removeprefix("file://")) for x in plain}
    assert all(isinstance(x["raw"], str) and x["raw"].startswith(f"file://{xcom_dir}/") for x in plain), plain
    assert set(_files(xcom_dir)) == stored, "one file per plain XCom; try 1's 'copy' was purged with its XCom"
    assert json.loads(next(p for p in stored if "/total/" in str(p)).read_text()) == sum(range(3000))

    (handle,) = run.xcoms("secret", RESERVED_KEY)
    assert isinstance(handle["raw"], dict) and handle["raw"][MARKER] == 1, "the handle stays inline"
    (row,) = result.ledger_rows()
    assert (row["task_id"], row["state"], row["owner_task_id"]) == ("secret", "consumed", "unwrap")
    assert "compose-secret-token" not in json.dumps(run.xcom)
    assert not any("compose-secret-token" in p.read_text() for p in stored)
