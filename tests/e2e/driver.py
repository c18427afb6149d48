"""Subprocess driver: import DAG files, run ``dag.test()`` for each requested run, report.

Run by :mod:`harness` with ``sys.executable driver.py <spec.json>`` inside a prepared
``AIRFLOW_HOME``. One process serves many runs (starting Airflow costs seconds, a run
costs a fraction of one): each run may carry ``env``, the environment its tasks read
while it goes on (its own ledger database, its own offload folder, a secret key), which
is put in place before the run and taken back after it. Settings Airflow reads once per
process (``[core] xcom_backend``, metrics) belong to the process's own environment.

It is not task code, so it reads the metadata DB directly to report what happened: run
states, every task instance and every XCom row of each run, and all DAG runs (including
those a ``TriggerDagRunOperator`` created); with ``"snapshot": true`` also every row of
the run's ledger right after it. A run that raises is reported with its traceback and
the next one goes on. The report is one JSON line after :data:`RESULT_MARKER`; each
run's log is framed by marker lines so a test can read it alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULT_MARKER = "E2E-RESULT "
RUN_START = "=== E2E RUN {} START ==="
RUN_END = "=== E2E RUN {} END ==="
LEDGER_URL = "AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def load_dags(files: list[str]) -> dict[str, Any]:
    from airflow.sdk import DAG

    dags: dict[str, Any] = {}
    for number, file in enumerate(files):
        spec = importlib.util.spec_from_file_location(f"e2e_dag_file_{number}", file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dags.update({v.dag_id: v for v in vars(module).values() if isinstance(v, DAG)})
    return dags


@contextmanager
def environment(changes: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` applied, as it was again afterwards."""
    before = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def triggered_conf(dag_id: str) -> dict[str, Any]:
    """The conf of the newest run of ``dag_id`` that was not started by ``dag.test()``."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc())).all()
        for run in runs:
            if run.triggered_by != DagRunTriggeredByType.TEST:
                return dict(run.conf or {})
    raise LookupError(f"no triggered run of {dag_id!r} in the metadata DB")


def describe_run(dag_id: str, run_id: str) -> dict[str, Any]:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).one()
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)).all()
        return {
            "dag_id": dag_id,
            "run_id": run_id,
            "state": str(run.state),
            "conf": _jsonable(run.conf),
            "tis": [
                {"task_id": t.task_id, "map_index": t.map_index, "state": str(t.state), "try_number": t.try_number}
                for t in sorted(tis, key=lambda t: (t.task_id, t.map_index))
            ],
            "xcom": [
                {
                    "task_id": x.task_id,
                    "map_index": x.map_index,
                    "key": x.key,
                    "raw": _jsonable(x.value),
                    "value": _jsonable(XComModel.deserialize_value(x)),
                }
                for x in sorted(xcoms, key=lambda x: (x.task_id, x.map_index, x.key))
            ],
        }


def ledger_snapshot() -> list[dict[str, Any]]:
    """Every row of the item table of the ledger now configured, in insertion order.

    A payload is reported by its length only: this report is printed, and tests check that
    no payload ever reaches the output."""
    import sqlalchemy as sa

    engine = sa.create_engine(os.environ[LEDGER_URL], poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM exclusive_xcom_item ORDER BY id")).mappings().all()
            return [_jsonable({**r, "payload": None if r["payload"] is None else len(r["payload"])}) for r in rows]
    finally:
        engine.dispose()


def all_dag_runs() -> list[dict[str, Any]]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return [
            {
                "dag_id": r.dag_id,
                "run_id": r.run_id,
                "state": str(r.state),
                "run_type": str(r.run_type),
                "triggered_by": str(r.triggered_by),
                "conf": _jsonable(r.conf),
            }
            for r in session.scalars(select(DagRun).order_by(DagRun.id)).all()
        ]


def run_one(dags: dict[str, Any], number: int, run: dict[str, Any]) -> dict[str, Any]:
    """``dag.test()`` of one requested run in its environment; what happened, or why it raised."""
    with environment(run.get("env", {})):
        try:
            conf = run.get("conf")
            if run.get("conf_from_triggered"):
                conf = triggered_conf(run["conf_from_triggered"])
            print(RUN_START.format(number), flush=True)
            try:
                dag_run = dags[run["dag_id"]].test(run_conf=conf)
            finally:
                print(RUN_END.format(number), flush=True)
            report = describe_run(dag_run.dag_id, dag_run.run_id)
            report["ledger"] = ledger_snapshot() if run.get("snapshot") else None
            report["error"] = None
            return report
        except Exception:
            return {"dag_id": run["dag_id"], "error": traceback.format_exc()}


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    report: dict[str, Any] = {"runs": [], "error": None}
    try:
        dags = load_dags(spec["files"])
        report["runs"] = [run_one(dags, number, run) for number, run in enumerate(spec["runs"])]
    except Exception:
        report["error"] = traceback.format_exc()
    report["dag_runs"] = all_dag_runs()
    print(RESULT_MARKER + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
