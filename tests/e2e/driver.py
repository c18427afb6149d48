"""Subprocess driver: import DAG files, run ``dag.test()`` for each requested run, report.

Run by :mod:`harness` with ``sys.executable driver.py <spec.json>`` inside a prepared
``AIRFLOW_HOME``. It is not task code, so it reads the metadata DB directly to report what
happened: run states, every task instance and every XCom row of each run, and all DAG runs
(including those a ``TriggerDagRunOperator`` created). The report is one JSON line after
:data:`RESULT_MARKER`; each run's log is framed by marker lines so a test can read it alone.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any

RESULT_MARKER = "E2E-RESULT "
RUN_START = "=== E2E RUN {} START ==="
RUN_END = "=== E2E RUN {} END ==="


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


def triggered_conf(dag_id: str) -> dict[str, Any]:
    """The conf of the newest run of ``dag_id`` that was not started by ``dag.test()``."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    with settings.Session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc())).all()
        for run in runs:
            if run.triggered_by != DagRunTriggeredByType.TEST:
                return dict(run.conf or {})
    raise LookupError(f"no triggered run of {dag_id!r} in the metadata DB")


def describe_run(dag_id: str, run_id: str) -> dict[str, Any]:
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    with settings.Session() as session:
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


def all_dag_runs() -> list[dict[str, Any]]:
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    with settings.Session() as session:
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


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    dags = load_dags(spec["files"])
    report: dict[str, Any] = {"runs": [], "error": None}
    try:
        for number, run in enumerate(spec["runs"]):
            conf = run.get("conf")
            if run.get("conf_from_triggered"):
                conf = triggered_conf(run["conf_from_triggered"])
            print(RUN_START.format(number), flush=True)
            try:
                dag_run = dags[run["dag_id"]].test(run_conf=conf)
            finally:
                print(RUN_END.format(number), flush=True)
            report["runs"].append(describe_run(dag_run.dag_id, dag_run.run_id))
    except Exception:
        report["error"] = traceback.format_exc()
    report["dag_runs"] = all_dag_runs()
    print(RESULT_MARKER + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
