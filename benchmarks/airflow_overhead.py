"""Case 4: what ``@exclusive_task`` adds to a real Airflow run, vs plain ``@task``.

A 10-task chain (:mod:`benchmarks.dags.chain`) is run with ``dag.test()`` in a subprocess
with its own ``AIRFLOW_HOME`` (a migrated SQLite metadata DB, made once per benchmark run
and copied), once with the ledger on the embedded SQLite and once on a fresh PostgreSQL
database. Inside each subprocess the plain and the exclusive DAG alternate, a warm-up
round first; what counts is the median time of the ``dag.test()`` call itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.db import fresh_database
from benchmarks.runner import median
from benchmarks.settings import Settings
from tests.support import airflow_env, migrate_metadata_db, new_airflow_home

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "airflow_driver.py"
DAG_FILE = HERE / "dags" / "chain.py"
DAG_IDS = ["bench_chain_plain", "bench_chain_exclusive"]
MARKER = "BENCH-RESULT "
TIMEOUT = 600
PYTHONPATH = os.pathsep.join(p for p in [str(HERE.parent), os.environ.get("PYTHONPATH", "")] if p)


def _run_chain(root: Path, template: Path, ledger: str, ledger_url: str | None, rounds: int) -> list[dict[str, Any]]:
    home = new_airflow_home(root / ledger, template, [DAG_FILE])
    dag_file = home / "dags" / DAG_FILE.name
    spec = home / "spec.json"
    spec.write_text(json.dumps({"dag_file": str(dag_file), "dag_ids": DAG_IDS, "rounds": rounds}))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec)],
        env=airflow_env(home, ledger_url=ledger_url, PYTHONPATH=PYTHONPATH),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
    )
    (home / "output.log").write_text(proc.stdout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARKER)), None)
    report: dict[str, Any] = (
        json.loads(line[len(MARKER) :]) if line else {"error": f"no report (exit {proc.returncode})"}
    )
    if report.get("error"):
        raise RuntimeError(f"dag.test() failed:\n{report['error']}\n{proc.stdout[-3000:]}")
    failed = [r for r in report["runs"] if "success" not in r["state"]]
    if failed:
        raise RuntimeError(f"runs did not succeed: {failed}\n{proc.stdout[-3000:]}")
    return report["runs"]


def run(settings: Settings) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_airflow_") as tmp:
        root = Path(tmp)
        template = migrate_metadata_db(root / "template")
        for ledger in settings.airflow_ledgers:
            if ledger == "sqlite":
                runs = _run_chain(root, template, ledger, None, settings.airflow_repeats)
            else:
                with fresh_database(settings.pg_url) as url:
                    runs = _run_chain(root, template, ledger, url, settings.airflow_repeats)
            timed = [r for r in runs if r["round"] > 0]  # round 0 is the warm-up
            medians = {}
            for dag_id in DAG_IDS:
                seconds = [r["seconds"] for r in timed if r["dag_id"] == dag_id]
                medians[dag_id] = median(seconds)
                rows.append(
                    {
                        "ledger": ledger,
                        "dag": dag_id.removeprefix("bench_chain_"),
                        "runs": len(seconds),
                        "median_s": round(medians[dag_id], 3),
                        "min_s": round(min(seconds), 3),
                        "max_s": round(max(seconds), 3),
                        "warmup_s": round(next(r["seconds"] for r in runs if r["dag_id"] == dag_id), 3),
                    }
                )
            paired = [  # each round ran both DAGs back to back: their ratio cancels slow drifts
                next(r["seconds"] for r in timed if r["round"] == n and r["dag_id"] == DAG_IDS[1])
                / next(r["seconds"] for r in timed if r["round"] == n and r["dag_id"] == DAG_IDS[0])
                for n in sorted({r["round"] for r in timed})
            ]
            summary[ledger] = {
                "exclusive_vs_plain": round(medians[DAG_IDS[1]] / medians[DAG_IDS[0]], 3),
                "median_paired_ratio": round(median(paired), 3),
            }
    return {"rows": rows, "summary": summary}
