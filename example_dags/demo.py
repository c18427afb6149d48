"""One-command demo: run an example DAG in a throwaway Airflow and show the claim ledger.

    python example_dags/demo.py [--dag exclusive_etl] [--keep]

No server needed. It makes a temporary ``AIRFLOW_HOME`` with a migrated SQLite metadata
DB and this folder as ``[core] dags_folder`` (``dag.test()`` needs both), runs the example
with ``dag.test()`` on the embedded SQLite ledger, then prints what Airflow's XCom table
holds (an exclusive output leaves only a signed handle there) and what the ledger holds
(who consumed each item, once; a large ledger as counts and its first rows).

``dag.test()`` runs one DAG run and starts no other, so each example is run as its
scenario below says: the cross-DAG hand-off runs the child DAG with the conf the parent's
trigger gave it, and the maintenance DAG runs after the ETL example, to have something
to purge. The asset hand-off cannot run here (see :data:`CANNOT_RUN`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: A throwaway key for a throwaway home: without a key, nothing is produced.
DEMO_KEY = secrets.token_urlsafe(32)
DESCRIPTION = "Run an example DAG of exclusive_xcom in a throwaway Airflow and show its XComs and claim ledger."
HANDLE_KEY = "__exclusive__handle"  # exclusive_xcom.handle.RESERVED_KEY; this script imports no Airflow
ROWS = 20  # a table longer than this is cut, saying how many rows it left out
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"


@dataclass(frozen=True)
class Run:
    """One ``dag.test()`` run of a DAG of an example file."""

    file: str
    dag_id: str
    conf: dict[str, Any] | None = None
    #: Run with the conf of the run a task of another DAG triggered (nothing here starts that run).
    conf_of_triggered: bool = False


def _alone(name: str, dag_id: str | None = None) -> list[Run]:
    return [Run(f"{name}.py", dag_id or name)]


#: ``--dag`` choice -> the runs it makes, in order.
SCENARIOS: dict[str, list[Run]] = {
    "exclusive_etl": _alone("exclusive_etl"),
    "exclusive_competing": _alone("exclusive_competing"),
    "exclusive_fanout": _alone("exclusive_fanout"),
    "exclusive_work_queue": _alone("exclusive_work_queue"),
    "exclusive_parallel_queue": _alone("exclusive_parallel_queue"),
    "exclusive_handoff": [
        Run("exclusive_handoff.py", "exclusive_handoff_parent"),
        Run("exclusive_handoff.py", "exclusive_handoff_child", conf_of_triggered=True),
    ],
    "exclusive_maintenance": [
        *_alone("exclusive_etl"),
        Run("exclusive_maintenance.py", "exclusive_xcom_maintenance", {"older_than": "0s"}),
    ],
}
#: Examples this demo cannot run, and why.
CANNOT_RUN = {
    "exclusive_asset_handoff": (
        "its consumer DAG is started by an asset event, which dag.test() cannot do; "
        "tests/scheduler runs it under a real scheduler"
    ),
}


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


# -- inside the throwaway Airflow --------------------------------------------------------------


def run_scenario(spec: str) -> None:
    """Each run of a scenario (``spec``: JSON of its :class:`Run` list), in order, by ``dag.test()``."""
    for step in (Run(**r) for r in json.loads(spec)):
        conf = _conf_of_triggered(step.dag_id) if step.conf_of_triggered else step.conf
        _dag(HERE / step.file, step.dag_id).test(run_conf=conf)


def _dag(file: Path, dag_id: str) -> Any:
    """The DAG ``dag_id`` of an example file, imported as a module (its ``__main__`` part does not run)."""
    from airflow.sdk import DAG

    spec = importlib.util.spec_from_file_location(f"demo_{file.stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id)


def _conf_of_triggered(dag_id: str) -> Any:
    """The conf a task of another DAG gave its run of ``dag_id`` (a run only a scheduler would start)."""
    with sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db") as conn:
        row = conn.execute(
            "SELECT conf FROM dag_run WHERE dag_id = ? AND lower(triggered_by) != 'test' ORDER BY id DESC", (dag_id,)
        ).fetchone()
    if row is None:
        sys.exit(f"no run of {dag_id} was triggered")
    return json.loads(row[0])


# -- what the demo shows -----------------------------------------------------------------------


def table(title: str, db: Path, query: str, total: int | None = None) -> None:
    """Print ``query``'s rows; of a ``total`` above :data:`ROWS`, only the first ones."""
    with sqlite3.connect(db) as conn:
        cur = conn.execute(f"{query} LIMIT {ROWS}")
        columns = [c[0] for c in cur.description]
        show(title, columns, cur.fetchall(), total)


def show(title: str, columns: list[str], values: Any, total: int | None = None) -> None:
    """Print rows under ``title`` as a table; ``total``: how many there are in all."""
    rows = [["-" if v is None else str(v) for v in row] for row in values]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *rows]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("  (none)")
    if total is not None and total > len(rows):
        print(f"  ... and {total - len(rows):,} more")


def count(db: Path, what: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {what}").fetchone()[0])


def show_runs(db: Path, log: Path) -> None:
    """The DAG runs; exits unless every run the demo started succeeded."""
    table("DAG runs:", db, "SELECT dag_id, run_id, lower(triggered_by) AS triggered_by, state FROM dag_run ORDER BY id")
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT dag_id, lower(triggered_by), state FROM dag_run ORDER BY id").fetchall()
    if not runs or any(state != "success" for _, by, state in runs if by == "test"):
        sys.exit(f"a DAG run did not succeed; see {log}")
    for dag_id, by, state in runs:
        if by != "test":
            print(f"\n  {dag_id}'s {state} run was triggered by another DAG's task; no scheduler runs it here,")
            print(f"  so the demo ran {dag_id} with dag.test() and that run's conf.")


def show_xcoms(db: Path) -> None:
    # Only rows under the reserved key are handles; return_value rows are ordinary XComs
    # (a bare consumer's result, a plain task's, a trigger's run id), stored as JSON text.
    table(
        "Airflow's xcom table: an exclusive output leaves only a signed handle here; the rest are ordinary XComs:",
        db,
        f"SELECT dag_id, task_id, map_index, key, length(value) AS bytes, "
        f"CASE WHEN key = '{HANDLE_KEY}' THEN 'handle (names an output in the ledger, carries no data)' "
        f"ELSE 'ordinary XCom: ' || substr(value, 1, 60) END AS holds "
        f"FROM xcom ORDER BY dag_id, task_id, map_index, key",
        count(db, "xcom"),
    )


def show_ledger(db: Path) -> None:
    total = count(db, "exclusive_xcom_item")
    title = "The claim ledger (exclusive_xcom.db): who produced what, who consumed it, when"
    if total > ROWS:
        table(
            f"{title}: {total:,} items; by DAG, producer and state:",
            db,
            "SELECT dag_id, task_id AS producer, state, count(*) AS items FROM exclusive_xcom_item "
            "GROUP BY dag_id, task_id, state ORDER BY dag_id, task_id, state",
            count(db, "(SELECT 1 FROM exclusive_xcom_item GROUP BY dag_id, task_id, state)"),
        )
        title = f"The first {ROWS} of them"
    # A consumed item's payload is deleted (unless keep_consumed_payloads): no size then.
    table(
        f"{title}; bytes: the payload it stores, '-' once deleted:",
        db,
        "SELECT id, dag_id, task_id AS producer, mode, slot, seq, state, owner_task_id AS consumed_by, "
        "owner_try AS try, CASE WHEN payload IS NULL AND payload_uri IS NULL THEN NULL ELSE payload_size END "
        "AS bytes, consumed_at FROM exclusive_xcom_item ORDER BY id",
        total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument(
        "--dag",
        default=None,
        metavar="NAME",
        help=f"example to run: {', '.join(SCENARIOS)} (default: exclusive_etl; with --executor celery, "
        "exclusive_etl then exclusive_parallel_queue)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the throwaway AIRFLOW_HOME afterwards")
    parser.add_argument(
        "--executor",
        choices=["dag-test", "celery"],
        default="dag-test",
        help="dag-test (default): dag.test() on SQLite, no server needed; celery: a CeleryExecutor Airflow with "
        "two worker hosts (network namespaces; needs root, PostgreSQL and Redis) and payloads on a local S3",
    )
    parser.add_argument("--postgres-url", default=PG_URL, help="celery: the server for the metadata DB and ledger")
    parser.add_argument("--redis-url", default=REDIS_URL, help="celery: the Celery broker's server")
    parser.add_argument(
        "--offload-threshold", type=int, default=1024, help="celery: payloads above this many bytes go to S3"
    )
    parser.add_argument("--run-scenario", help=argparse.SUPPRESS)  # inside the throwaway Airflow
    args = parser.parse_args()
    if args.run_scenario:
        run_scenario(args.run_scenario)
    elif args.dag is None and args.executor == "dag-test":
        demo("exclusive_etl", args.keep)
    elif args.dag is None:
        celery_demo(None, args.keep, args.postgres_url, args.redis_url, args.offload_threshold)
    elif args.dag in CANNOT_RUN:
        parser.error(f"{args.dag} cannot run in this demo: {CANNOT_RUN[args.dag]}")
    elif args.dag not in SCENARIOS:
        parser.error(f"no example {args.dag!r}; choose one of: {', '.join(SCENARIOS)}")
    elif args.executor == "celery":
        celery_demo(args.dag, args.keep, args.postgres_url, args.redis_url, args.offload_threshold)
    else:
        demo(args.dag, args.keep)


def demo(name: str, keep: bool) -> None:
    home = Path(tempfile.mkdtemp(prefix="exclusive_xcom_demo_"))
    env, log = airflow_env(home), home / "demo.log"
    print(f"throwaway AIRFLOW_HOME: {home} (log: {log})")
    steps = SCENARIOS[name]
    try:
        run([sys.executable, "-m", "airflow", "db", "migrate"], env, log, "airflow db migrate")
        scenario = json.dumps([asdict(s) for s in steps])
        what = ", then ".join(dict.fromkeys(s.dag_id for s in steps))
        run([sys.executable, __file__, "--run-scenario", scenario], env, log, f"dag.test() of {what}")
        show_runs(home / "airflow.db", log)
        table(
            "Task instances:",
            home / "airflow.db",
            "SELECT dag_id, task_id, map_index, state FROM task_instance ORDER BY start_date IS NULL, start_date",
            count(home / "airflow.db", "task_instance"),
        )
        show_xcoms(home / "airflow.db")
        show_ledger(home / "exclusive_xcom.db")
    finally:
        if keep:
            print(f"\nkept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


# -- --executor celery: a CeleryExecutor Airflow with two worker hosts ----------------------------


def celery_demo(name: str | None, keep: bool, postgres_url: str, redis_url: str, threshold: int) -> None:
    """Start a cluster (``_celery_cluster``), run the scenario's DAGs on it, show where each
    task ran and what the ledger and S3 hold, stop everything (also on Ctrl-C or failure)."""
    sys.path.insert(0, str(HERE))
    import _celery_cluster as cc
    import sqlalchemy as sa

    if (problem := cc.problem()) is not None:
        sys.exit(f"cannot start the Celery demo: {problem}")
    steps = [step for n in ([name] if name else ["exclusive_etl", "exclusive_parallel_queue"]) for step in SCENARIOS[n]]
    root = Path(tempfile.mkdtemp(prefix="exclusive_xcom_celery_demo_"))
    print(f"throwaway homes under {root}")
    started = time.monotonic()
    with cc.database(postgres_url, "demo_meta") as meta_url, cc.database(postgres_url, "demo_ledger") as ledger_url:
        files = sorted({HERE / step.file for step in steps})
        env = {"AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES": str(threshold)}
        cluster = cc.Cluster(root, meta_url, ledger_url, files, redis_url=redis_url, env=env)
        meta = sa.create_engine(meta_url, poolclass=sa.NullPool)
        ledger = sa.create_engine(ledger_url, poolclass=sa.NullPool)
        try:
            cluster.start(lambda step: print(f"  {step}"))
            for host in cluster.hosts.values():
                print(
                    f"  worker host {host.fqdn}: netns {host.netns}, {host.address} (gateway {host.gateway}), "
                    f"AIRFLOW_HOME {host.home}, queues {cluster.default_queue},{host.queue}"
                )
            print(f"  offload_path {cluster.offload_path} (moto S3 on 127.0.0.1:{cluster.s3_port})")
            dag_ids = {step.dag_id for step in steps}

            def serialized() -> bool:
                with meta.connect() as conn:
                    found = {d for (d,) in conn.execute(sa.text("SELECT dag_id FROM serialized_dag"))}
                return dag_ids <= found

            cluster.wait("the DAGs to be serialized", serialized, 120)
            for step in steps:
                _celery_step(cluster, meta, step)
            _celery_report(meta, ledger, cluster)
        finally:
            meta.dispose()
            ledger.dispose()
            survivors = cluster.stop()
            left = f" (outlived SIGKILL: {survivors})" if survivors else ""
            print(f"\nstopped every process{left}, removed the namespaces; took {time.monotonic() - started:.0f} s")
            if keep:
                print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


def _celery_step(cluster: Any, meta: Any, step: Run) -> None:
    """Trigger ``step`` (or, for a run another DAG triggers, wait for it) and wait for its end."""
    import sqlalchemy as sa

    mark = time.monotonic()

    def final(run_id: str | None = None) -> str | None:
        sql = "SELECT run_id, state FROM dag_run WHERE dag_id = :d" + (" AND run_id = :r" if run_id else "")
        with meta.connect() as conn:
            rows = conn.execute(sa.text(sql), {"d": step.dag_id, "r": run_id}).all()
        return rows[-1].state if rows and rows[-1].state in ("success", "failed") else None

    if step.conf_of_triggered:
        state = cluster.wait(f"the run of {step.dag_id} another DAG triggered", final, 300)
        print(f"  {step.dag_id}: its triggered run ended {state}")
        return
    run_id = f"demo_{step.dag_id}_{secrets.token_hex(3)}"
    args = ["dags", "trigger", step.dag_id, "--run-id", run_id]
    cluster.cli(*args, *(["--conf", json.dumps(step.conf)] if step.conf else []))
    state = cluster.wait(f"run {run_id}", lambda: final(run_id), 300)
    print(f"  {step.dag_id}: {state}, {time.monotonic() - mark:.1f} s from trigger to end")


def _celery_report(meta: Any, ledger: Any, cluster: Any) -> None:
    import sqlalchemy as sa

    with meta.connect() as conn:
        runs = conn.execute(
            sa.text("SELECT dag_id, run_id, state, start_date, end_date FROM dag_run ORDER BY id")
        ).all()
        tis = conn.execute(
            sa.text(
                "SELECT dag_id, task_id, map_index, state, try_number, hostname, queue FROM task_instance "
                "ORDER BY start_date IS NULL, start_date"
            )
        ).all()
    show(
        "DAG runs:",
        ["dag_id", "run_id", "state", "seconds"],
        [
            (r.dag_id, r.run_id, r.state, f"{(r.end_date - r.start_date).total_seconds():.1f}" if r.end_date else None)
            for r in runs
        ],
    )
    show(
        "Where each task ran (task_instance.hostname: the worker host's FQDN):",
        list(tis[0]._fields) if tis else [],
        tis,
    )
    with ledger.connect() as conn:
        split = conn.execute(
            sa.text(
                "SELECT dag_id, task_id AS producer, owner_task_id AS consumer, owner_host AS host, state, "
                "count(*) AS items, sum(CASE WHEN payload_uri IS NOT NULL THEN 1 ELSE 0 END) AS on_s3 "
                "FROM exclusive_xcom_item GROUP BY dag_id, task_id, owner_task_id, owner_host, state "
                "ORDER BY dag_id, task_id, owner_host"
            )
        ).all()
    show(
        "The claim ledger, items by consumer and the host that consumed them:",
        list(split[0]._fields) if split else [],
        split,
    )
    listing = cluster.s3().list_object_versions(Bucket=cluster.bucket, Prefix=cluster.prefix)
    written = {v["Key"] for v in listing.get("Versions", [])}
    deleted = {m["Key"] for m in listing.get("DeleteMarkers", []) if m["IsLatest"]}
    print(
        f"\nS3 ({cluster.offload_path}): {len(written)} payload blob(s) written, {len(deleted)} deleted once "
        f"consumed, {len(written - deleted)} still there (payloads over --offload-threshold bytes go there)"
    )
    bad = [r for r in runs if r.state != "success"]
    if bad:
        raise SystemExit(f"{len(bad)} run(s) did not succeed: {[(r.dag_id, r.state) for r in bad]}{cluster.logs()}")


if __name__ == "__main__":
    main()
