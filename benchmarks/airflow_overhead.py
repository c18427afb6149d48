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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.db import fresh_database
from benchmarks.runner import median
from benchmarks.settings import Settings

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "airflow_driver.py"
DAG_FILE = HERE / "dags" / "chain.py"
DAG_IDS = ["bench_chain_plain", "bench_chain_exclusive"]
MARKER = "BENCH-RESULT "
TIMEOUT = 600


def airflow_env(home: Path, ledger_url: str | None) -> dict[str, str]:
    """An isolated Airflow: nothing inherited from the caller's AIRFLOW_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH=f"file://{home / 'offload'}",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    if ledger_url is not None:
        env["AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN"] = ledger_url
    return env


def _migrated_template(root: Path) -> Path:
    home = root / "template"
    (home / "dags").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home, None),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if proc.returncode:
        raise RuntimeError(f"airflow db migrate failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return home / "airflow.db"


def _run_chain(root: Path, template: Path, ledger: str, ledger_url: str | None, rounds: int) -> list[dict[str, Any]]:
    home = root / ledger
    (home / "dags").mkdir(parents=True)
    shutil.copyfile(template, home / "airflow.db")
    dag_file = home / "dags" / DAG_FILE.name
    shutil.copyfile(DAG_FILE, dag_file)
    spec = home / "spec.json"
    spec.write_text(json.dumps({"dag_file": str(dag_file), "dag_ids": DAG_IDS, "rounds": rounds}))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec)],
        env=airflow_env(home, ledger_url),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
    )
    (home / "output.log").write_text(proc.stdout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARKER)), None)
    report = json.loads(line[len(MARKER) :]) if line else {"error": f"no report (exit {proc.returncode})"}
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
        template = _migrated_template(root)
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
