"""One-command demo: run the ETL example in a throwaway Airflow and show the claim ledger.

    python example_dags/demo.py [--dag exclusive_etl] [--keep]

No server needed. It makes a temporary ``AIRFLOW_HOME`` with a migrated SQLite metadata
DB and this folder as ``[core] dags_folder`` (``dag.test()`` needs both), runs the DAG
with ``dag.test()`` on the embedded SQLite ledger, then prints what Airflow's XCom table
holds (only signed handles) and what the ledger holds (every item, consumed once).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: A throwaway key for a throwaway home: without a key, nothing is produced.
DEMO_KEY = secrets.token_urlsafe(32)


def airflow_env(home: Path, dags_folder: Path = HERE) -> dict[str, str]:
    """Environment for an isolated Airflow: its own home, metadata DB and DAGs folder."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY": os.environ.get("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY") or DEMO_KEY,
    }


def run(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    started = time.monotonic()
    with log.open("a") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"{what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    print(f"  {what}: ok ({time.monotonic() - started:.1f} s)")


def show(title: str, db: Path, query: str) -> None:
    with sqlite3.connect(db) as conn:
        cur = conn.execute(query)
        columns = [c[0] for c in cur.description]
        rows = [[("-" if v is None else str(v)) for v in row] for row in cur.fetchall()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *rows]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def check_run_succeeded(db: Path, log: Path) -> None:
    with sqlite3.connect(db) as conn:
        states = [state for (state,) in conn.execute("SELECT state FROM dag_run")]
    if states != ["success"]:
        sys.exit(f"the DAG run ended {states}, not success; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dag", default="exclusive_etl", help="example DAG to run (file name without .py)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway AIRFLOW_HOME afterwards")
    args = parser.parse_args()
    dag_file = HERE / f"{args.dag}.py"
    if not dag_file.is_file():
        sys.exit(
            f"no example DAG {args.dag!r}; choose one of: {', '.join(p.stem for p in HERE.glob('exclusive_*.py'))}"
        )

    home = Path(tempfile.mkdtemp(prefix="exclusive_xcom_demo_"))
    env, log = airflow_env(home), home / "demo.log"
    print(f"throwaway AIRFLOW_HOME: {home} (log: {log})")
    try:
        run([sys.executable, "-m", "airflow", "db", "migrate"], env, log, "airflow db migrate")
        run([sys.executable, str(dag_file)], env, log, f"dag.test() of {args.dag}")
        show(
            "Task instances:",
            home / "airflow.db",
            "SELECT task_id, map_index, state FROM task_instance ORDER BY start_date",
        )
        check_run_succeeded(home / "airflow.db", log)
        show(
            "Airflow's xcom table (only handles under the reserved key; never the data):",
            home / "airflow.db",
            "SELECT task_id, key, length(value) AS bytes FROM xcom ORDER BY task_id",
        )
        show(
            "The claim ledger (exclusive_xcom.db): who produced what, who consumed it, when:",
            home / "exclusive_xcom.db",
            "SELECT id, task_id AS producer, mode, slot, seq, state, owner_task_id AS consumed_by, "
            "owner_try AS try, payload_size AS bytes, consumed_at FROM exclusive_xcom_item ORDER BY id",
        )
    finally:
        if args.keep:
            print(f"\nkept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
