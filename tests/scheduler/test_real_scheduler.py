"""A work queue under a real Airflow 3: scheduler, DAG processor and API server, LocalExecutor.

``dag.test()`` runs one task at a time, so it never shows mapped consumers racing for the
same items. This test starts the three Airflow services as separate process groups, with
the metadata DB in a fresh PostgreSQL database and the claim ledger in another fresh
database (PostgreSQL or MariaDB), triggers ``example_dags/exclusive_parallel_queue.py``
(5,000 orders, 4 mapped ``charge`` workers, batches of 25) through the CLI, waits for the
run to finish, and checks two independent accounts of what happened:

* the ledger: every order is one row, consumed exactly once, by one of the four mapped
  workers, nothing left ready or claimed, and more than one worker owns orders;
* Airflow's own records: the run and all five task instances succeeded, and what each
  worker's function received (its return value in XCom) matches what the ledger says it
  consumed.

Every process is torn down by the test itself (each service's process group, then every
process that still carries this test's ``AIRFLOW_HOME``, which catches task processes in
their own groups), also when the test fails; a failure message carries the tail of the
service and task logs.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from _processes import airflow, find, free_port, tail, wait_for
from _processes import stop as stop_processes

from tests.conftest import require_server
from tests.support import SERVERS, airflow_env, throwaway_database

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "example_dags" / "exclusive_parallel_queue.py"
DAG_ID = "exclusive_parallel_queue"
PRODUCER, CONSUMER = "enqueue", "charge"
ORDERS = 5000
WORKERS = 4
PARALLELISM = 8

SERVICES = ("scheduler", "dag-processor", "api-server")
# Time budget (s), within the 420 s test timeout, teardown included.
MIGRATE_DEADLINE = 90.0  # `airflow db migrate` (takes a few seconds)
START_DEADLINE = 90.0  # API server answering and the DAG serialized
RUN_DEADLINE = 180.0  # the triggered run reaching a final state (takes a few seconds)
STOP_GRACE = 15.0  # between SIGTERM and SIGKILL


class Deployment:
    """One Airflow installation: its home, its environment and its three services."""

    def __init__(self, home: Path, metadata_url: str, ledger_url: str, dag_files: tuple[Path, ...]) -> None:
        self.home = home
        self.dags = home / "dags"
        self.dags.mkdir(parents=True)
        for dag_file in dag_files:
            shutil.copyfile(dag_file, self.dags / dag_file.name)
        self.metadata_url = metadata_url
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        url = sa.make_url(metadata_url)
        self.env = airflow_env(
            home,
            self.dags,
            ledger_url,
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url.render_as_string(hide_password=False),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=url.set(drivername="postgresql+psycopg_async").render_as_string(
                hide_password=False
            ),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM=str(PARALLELISM),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{self.port}/execution/",
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.port),
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{self.port}",
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=secrets.token_hex(16),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
            # its own log-server port, so two deployments (parallel test workers) never collide
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            EXCLUSIVE_PARALLEL_QUEUE_ORDERS=str(ORDERS),
            PYTHONUNBUFFERED="1",
        )

    # -- processes ------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run ``airflow <args>`` to completion; its output, or a failure with it."""
        return airflow(args, env=self.env, cwd=self.home, timeout=timeout)

    def start(self) -> None:
        for service in SERVICES:
            args = [service] + (["--port", str(self.port), "--host", "127.0.0.1"] if service == "api-server" else [])
            out = (self.home / f"{service}.out").open("wb")
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, which stop() kills as a whole
            )
            out.close()

    def check_alive(self) -> None:
        for service, proc in self.procs.items():
            code = proc.poll()
            assert code is None, f"airflow {service} exited with {code}{self.logs()}"

    def leftovers(self) -> list[psutil.Process]:
        """Every live process of this deployment (see :func:`_processes.find`)."""
        return find({proc.pid for proc in self.procs.values()}, {str(self.home)})

    def stop(self) -> list[str]:
        """Stop every process of this deployment; the ones that outlived SIGKILL (should be none)."""
        return stop_processes(self.procs.values(), self.leftovers, STOP_GRACE)

    # -- what happened ----------------------------------------------------------------------

    def logs(self, lines: int = 40) -> str:
        parts = [f"\n--- {s} (last {lines} lines) ---\n{tail(self.home / f'{s}.out', lines)}" for s in SERVICES]
        for path in sorted((self.home / "logs").glob("dag_id=*/**/*.log")):
            parts.append(f"\n--- {path.relative_to(self.home / 'logs')} (last {lines} lines) ---\n{tail(path, lines)}")
        return "".join(parts)


def _wait_for(what: str, check: Any, deadline: float, deployment: Deployment) -> Any:
    """Poll ``check()`` until it returns something truthy, or fail with the logs."""
    return wait_for(what, check, deadline, alive=deployment.check_alive, logs=deployment.logs, every=1)


def _api_healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/execution/health", timeout=5) as response:
        return response.status == 200


def _scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


@pytest.fixture
def metadata_url() -> Iterator[str]:
    """A fresh PostgreSQL database for Airflow's metadata, dropped afterwards."""
    require_server("postgres")
    with throwaway_database(SERVERS["postgres"], prefix="meta") as url:
        yield url


@pytest.fixture
def dag_files() -> tuple[Path, ...]:
    return (DAG_FILE,)


@pytest.fixture
def deployment(tmp_path: Path, metadata_url: str, ledger_url: str, dag_files: tuple[Path, ...]) -> Iterator[Deployment]:
    """An Airflow home whose services the test starts; every process of it is stopped afterwards."""
    deployment = Deployment(tmp_path / "airflow_home", metadata_url, ledger_url, dag_files)
    try:
        yield deployment
    finally:
        started = time.monotonic()
        survivors = deployment.stop()
        print(f"  teardown (all processes stopped)  {time.monotonic() - started:6.1f} s")
        assert not survivors, f"processes outlived SIGKILL: {survivors}"
        assert not deployment.leftovers(), "airflow processes of this test are still running"


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_mapped_workers_share_5000_items_exactly_once_under_a_real_scheduler(
    deployment: Deployment, ledger_url: str, backend: str
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    deployment.cli("db", "migrate", timeout=MIGRATE_DEADLINE)
    timings["db migrate"] = time.monotonic() - started

    mark = time.monotonic()
    deployment.start()
    meta = sa.create_engine(deployment.metadata_url, poolclass=sa.NullPool)
    try:
        _wait_for("the API server", lambda: _api_healthy(deployment.port), START_DEADLINE, deployment)
        _wait_for(
            f"{DAG_ID} to be serialized",
            lambda: _scalar(meta, "SELECT count(*) FROM serialized_dag WHERE dag_id = :d", d=DAG_ID),
            START_DEADLINE,
            deployment,
        )
        timings["services up, DAG serialized"] = time.monotonic() - mark

        run_id = f"scheduler_test_{secrets.token_hex(4)}"
        deployment.cli("dags", "unpause", DAG_ID)
        deployment.cli("dags", "trigger", DAG_ID, "--run-id", run_id)
        mark = time.monotonic()

        def finished() -> str | None:
            state = _scalar(meta, "SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
            return state if state in ("success", "failed") else None

        state = _wait_for(f"run {run_id} to finish", finished, RUN_DEADLINE, deployment)
        timings["run (trigger to final state)"] = time.monotonic() - mark
        with meta.connect() as conn:
            tis = conn.execute(
                sa.text(
                    "SELECT task_id, map_index, state, try_number, start_date, end_date FROM task_instance "
                    "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"
                ),
                {"d": DAG_ID, "r": run_id},
            ).all()
            returned = {
                m: v
                for m, v in conn.execute(
                    sa.text(
                        "SELECT map_index, value FROM xcom WHERE dag_id = :d AND run_id = :r "
                        "AND task_id = :t AND key = 'return_value'"
                    ),
                    {"d": DAG_ID, "r": run_id, "t": CONSUMER},
                )
            }
    finally:
        meta.dispose()

    ledger = sa.create_engine(ledger_url, poolclass=sa.NullPool)
    try:
        with ledger.connect() as conn:
            rows = (
                conn.execute(
                    sa.text(
                        "SELECT seq, state, task_id, owner_run_id, owner_task_id, owner_map_index, claimed_at, "
                        "consumed_at FROM exclusive_xcom_item WHERE dag_id = :d AND run_id = :r"
                    ),
                    {"d": DAG_ID, "r": run_id},
                )
                .mappings()
                .all()
            )
    finally:
        ledger.dispose()
    timings["total"] = time.monotonic() - started

    # What happened, for the report (-s).
    owners = Counter(r["owner_map_index"] for r in rows if r["state"] == "consumed")
    print(f"\n[{backend} ledger] run {run_id}: {state}")
    for name, seconds in timings.items():
        print(f"  {name:32s} {seconds:6.1f} s")
    for ti in tis:
        took = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else float("nan")
        print(f"  {ti.task_id}[{ti.map_index}] {ti.state} try {ti.try_number} ran {took:.1f} s from {ti.start_date}")
    for index in range(WORKERS):
        claimed = [r["claimed_at"] for r in rows if r["owner_map_index"] == index and r["claimed_at"]]
        window = f"claims {min(claimed)} .. {max(claimed)}" if claimed else "no claims"
        print(f"  {CONSUMER}[{index}] consumed {owners.get(index, 0):5d} orders ({window})")

    logs = deployment.logs
    assert state == "success", f"run {run_id} ended {state}: {[tuple(t[:4]) for t in tis]}{logs()}"
    assert {(t.task_id, t.map_index): t.state for t in tis} == {
        (PRODUCER, -1): "success",
        **{(CONSUMER, i): "success" for i in range(WORKERS)},
    }, logs()

    # The ledger: each order once, consumed by one mapped worker of this run, nothing left over.
    assert len(rows) == ORDERS, f"{len(rows)} ledger rows for {ORDERS} orders{logs()}"
    assert sorted(r["seq"] for r in rows) == list(range(ORDERS)), "sequence numbers are not 0..N-1, once each"
    assert Counter(r["state"] for r in rows) == {"consumed": ORDERS}, f"{Counter(r['state'] for r in rows)}{logs()}"
    assert {(r["task_id"], r["owner_run_id"], r["owner_task_id"]) for r in rows} == {(PRODUCER, run_id, CONSUMER)}
    assert set(owners) <= set(range(WORKERS)), owners
    assert sum(owners.values()) == ORDERS

    # Airflow's account: what each worker's function received is what the ledger says it consumed.
    summaries = {m: v if isinstance(v, dict) else json.loads(v) for m, v in returned.items()}
    assert {m: s["orders"] for m, s in summaries.items()} == {i: owners.get(i, 0) for i in range(WORKERS)}, summaries
    assert sum(s["cents"] for s in summaries.values()) == sum(100 + i % 900 for i in range(ORDERS))

    # The work was really shared: the workers' claims raced, and more than one of them won orders.
    assert len(owners) >= 2, f"one worker drained the whole pool: {dict(owners)}{logs()}"


# -- mapping shapes and an asset hand-off under the same real scheduler -------------------------

ASSET_FILE = REPO / "example_dags" / "exclusive_asset_handoff.py"
MAPPING_FILE = REPO / "tests" / "e2e" / "dags" / "mapping.py"
TRIGGERED = ("e2e_map_items", "e2e_map_mapped", "exclusive_asset_producer")
ON_THE_ASSET = ("exclusive_asset_consumer", "exclusive_asset_bystander")


def _runs(meta: sa.Engine, dag_id: str) -> list[Any]:
    with meta.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT run_id, state, run_type FROM dag_run WHERE dag_id = :d"), {"d": dag_id})
        )


def _returned(meta: sa.Engine, dag_id: str, task_id: str) -> dict[int, Any]:
    with meta.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT map_index, value FROM xcom WHERE dag_id = :d AND task_id = :t AND key = 'return_value'"),
            {"d": dag_id, "t": task_id},
        ).all()
    return {m: v if not isinstance(v, str) else json.loads(v) for m, v in rows}


def _values(meta: sa.Engine, dag_id: str, task_id: str) -> list[Any]:
    """``task_id``'s return values in every run of ``dag_id``."""
    with meta.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT value FROM xcom WHERE dag_id = :d AND task_id = :t AND key = 'return_value'"),
            {"d": dag_id, "t": task_id},
        ).all()
    return [v if not isinstance(v, str) else json.loads(v) for (v,) in rows]


def _ledger(ledger_url: str, dag_id: str) -> list[Any]:
    ledger = sa.create_engine(ledger_url, poolclass=sa.NullPool)
    try:
        with ledger.connect() as conn:
            sql = (
                "SELECT task_id, map_index, seq, slot, state, owner_dag_id, owner_task_id, owner_map_index "
                "FROM exclusive_xcom_item WHERE dag_id = :d"
            )
            return list(conn.execute(sa.text(sql), {"d": dag_id}).mappings())
    finally:
        ledger.dispose()


@pytest.mark.parametrize("dag_files", [(MAPPING_FILE, ASSET_FILE)])
@pytest.mark.parametrize("backend", ["postgres"])
def test_mapping_shapes_and_an_asset_hand_off_under_a_real_scheduler(
    deployment: Deployment, ledger_url: str, backend: str
) -> None:
    """Mapped instances run in parallel (LocalExecutor); each still claims exactly its own
    element. The producer's asset events trigger the consumer DAG and the bystander DAG:
    two events emitted while those are paused and one after are folded into fewer runs,
    every output read once by the consumer; the bystander sees handles and is refused."""
    deployment.cli("db", "migrate", timeout=MIGRATE_DEADLINE)
    deployment.start()
    meta = sa.create_engine(deployment.metadata_url, poolclass=sa.NullPool)
    every = TRIGGERED + ON_THE_ASSET

    def finished(dag_ids: tuple[str, ...], runs: int = 1) -> bool:
        found = {d: _runs(meta, d) for d in dag_ids}
        return all(len(found[d]) >= runs and all(r.state in ("success", "failed") for r in found[d]) for d in dag_ids)

    try:
        _wait_for("the API server", lambda: _api_healthy(deployment.port), START_DEADLINE, deployment)
        _wait_for(
            "the DAGs to be serialized",
            lambda: all(_scalar(meta, "SELECT count(*) FROM serialized_dag WHERE dag_id = :d", d=d) for d in every),
            START_DEADLINE,
            deployment,
        )
        for dag_id in TRIGGERED:
            deployment.cli("dags", "unpause", dag_id)
            deployment.cli("dags", "trigger", dag_id)
        deployment.cli("dags", "trigger", "exclusive_asset_producer")  # a second event, still nobody listening
        _wait_for(
            "the first runs to finish",
            lambda: finished(TRIGGERED) and finished(TRIGGERED[2:], 2),
            RUN_DEADLINE,
            deployment,
        )
        for dag_id in ON_THE_ASSET:
            deployment.cli("dags", "unpause", dag_id)
        deployment.cli("dags", "trigger", "exclusive_asset_producer")  # the third event
        _wait_for(
            "the asset's three outputs to be consumed",
            lambda: (
                finished(every, 1)
                and [r["state"] for r in _ledger(ledger_url, "exclusive_asset_producer")] == ["consumed"] * 3
            ),
            RUN_DEADLINE,
            deployment,
        )
        _wait_for("every run to finish", lambda: finished(every), RUN_DEADLINE, deployment)
        states = {d: sorted((r.state, r.run_type) for r in _runs(meta, d)) for d in every}
        returned = {
            "handle": _returned(meta, "e2e_map_items", "handle"),
            "consume": _returned(meta, "e2e_map_mapped", "consume"),
            "ingest": _values(meta, "exclusive_asset_consumer", "ingest"),
            "peek": _values(meta, "exclusive_asset_bystander", "peek"),
        }
        with meta.connect() as conn:
            xcom_text = " ".join(str(v) for (v,) in conn.execute(sa.text("SELECT value FROM xcom")))
    finally:
        meta.dispose()
    logs = deployment.logs
    print(f"\n[{backend} ledger] {states}\n  ingest returned {returned['ingest']}")

    for dag_id in TRIGGERED[:2]:
        assert states[dag_id] == [("success", "manual")], f"{dag_id}: {states[dag_id]}{logs()}"
    assert states["exclusive_asset_producer"] == [("success", "manual")] * 3, logs()
    consumer_runs = states["exclusive_asset_consumer"]
    assert consumer_runs == [("success", "asset_triggered")] * len(consumer_runs), logs()
    assert {s for s in states["exclusive_asset_bystander"]} == {("failed", "asset_triggered")}, logs()

    # Mapping: instance i got element i (or producer instance i), each consumed once, by it.
    assert returned["handle"] == {i: i * 2 for i in range(5)}
    items = _ledger(ledger_url, "e2e_map_items")
    assert sorted((r["seq"], r["state"], r["owner_map_index"]) for r in items) == [(i, "consumed", i) for i in range(5)]
    assert returned["consume"] == {0: 20, 1: 40, 2: 60}
    mapped = _ledger(ledger_url, "e2e_map_mapped")
    assert sorted((r["map_index"], r["state"], r["owner_map_index"]) for r in mapped) == [
        (i, "consumed", i) for i in range(3)
    ]

    # The asset: three outputs, each read once by the consumer, in fewer runs than events.
    assert sum(returned["ingest"]) == 9 and len(consumer_runs) < 3, (returned["ingest"], consumer_runs)
    rows = _ledger(ledger_url, "exclusive_asset_producer")
    assert [(r["state"], r["owner_dag_id"], r["owner_task_id"]) for r in rows] == [
        ("consumed", "exclusive_asset_consumer", "ingest")
    ] * 3
    extras = [extra for peeked in returned["peek"] for extra in peeked]
    assert extras and all(e["exclusive_xcom_handle"]["task_id"] == "export" for e in extras), extras
    snoop_logs = "".join(
        p.read_text(errors="replace")
        for p in (deployment.home / "logs").glob("dag_id=exclusive_asset_bystander/**/task_id=snoop/**/*.log")
    )
    assert "NotAuthorizedError" in snoop_logs and "is not a named consumer" in snoop_logs, logs()
    assert "'orders':" not in xcom_text and "'batch':" not in xcom_text, "a payload reached the XCom table"


# -- a streamed queue: spread, worker counts, a late starter, a SIGKILL ------------------------

SPREAD_FILE = Path(__file__).parent / "dags" / "queue_spread.py"
SPREAD_ORDERS, SPREAD_BATCH = 5000, 25


def _final_state(meta: sa.Engine, run_id: str) -> str | None:
    state = _scalar(meta, "SELECT state FROM dag_run WHERE run_id = :r", r=run_id)
    return str(state) if state in ("success", "failed") else None


def _charge_tis(meta: sa.Engine, run_id: str) -> list[Any]:
    with meta.connect() as conn:
        sql = (
            "SELECT map_index, state, try_number, start_date, end_date FROM task_instance "
            "WHERE run_id = :r AND task_id = 'charge' ORDER BY map_index"
        )
        return list(conn.execute(sa.text(sql), {"r": run_id}))


@pytest.mark.parametrize("dag_files", [(SPREAD_FILE,)])
@pytest.mark.parametrize("backend", ["postgres"])
def test_a_streamed_queue_is_shared_by_whoever_runs_and_a_killed_worker_redoes_one_batch_at_most(
    deployment: Deployment, ledger_url: str, backend: str
) -> None:
    deployment.cli("db", "migrate", timeout=MIGRATE_DEADLINE)
    deployment.start()
    meta = sa.create_engine(deployment.metadata_url, poolclass=sa.NullPool)
    shapes: dict[str, dict[str, float]] = {"1 worker": {"workers": 1}, "2 workers": {"workers": 2}}
    shapes |= {"4 workers": {"workers": 4}, "4, one 1.5 s late": {"workers": 4, "late": 1.5}}
    shapes["4, one SIGKILLed"] = {"workers": 4, "kill": 1}
    # The same with list[int] (the whole share claimed before the function runs), for comparison.
    cases = {("queue_spread", n): c for n, c in shapes.items()}
    cases |= {("queue_spread_list", n): c for n, c in shapes.items() if n != "4, one 1.5 s late"}
    report: dict[tuple[str, str], Any] = {}
    try:
        _wait_for("the API server", lambda: _api_healthy(deployment.port), START_DEADLINE, deployment)
        _wait_for(
            "queue_spread to be serialized",
            lambda: _scalar(meta, "SELECT count(*) FROM serialized_dag WHERE dag_id LIKE 'queue_spread%'") == 2,
            START_DEADLINE,
            deployment,
        )
        for dag_id in ("queue_spread", "queue_spread_list"):
            deployment.cli("dags", "unpause", dag_id)
        for (dag_id, name), conf in cases.items():  # one after another: each run's wall time is its own
            run_id = f"spread_{len(report)}_{secrets.token_hex(3)}"
            deployment.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
            state = _wait_for(
                f"run {run_id} ({name}) to finish", lambda r=run_id: _final_state(meta, r), RUN_DEADLINE, deployment
            )
            report[dag_id, name] = {"run_id": run_id, "state": state, "tis": _charge_tis(meta, run_id)}
    finally:
        meta.dispose()
    logs = deployment.logs

    ledger = sa.create_engine(ledger_url, poolclass=sa.NullPool)
    try:
        for r in report.values():
            with ledger.connect() as conn:
                sql = "SELECT state, owner_map_index, owner_try FROM exclusive_xcom_item WHERE run_id = :r"
                r["rows"] = list(conn.execute(sa.text(sql), {"r": r["run_id"]}))
            charged = (deployment.home / f"charged-{r['run_id']}.log").read_text().split("\n")
            r["charged"] = [tuple(map(int, line.split())) for line in charged if line]
    finally:
        ledger.dispose()

    print(f"\n[{backend} ledger] {SPREAD_ORDERS} orders, batches of {SPREAD_BATCH}, 2 ms each")
    for (dag_id, form), r in report.items():
        name = f"{'Iterator' if dag_id == 'queue_spread' else 'list'}: {form}"
        tis = r["tis"]
        wall = (max(t.end_date for t in tis) - min(t.start_date for t in tis)).total_seconds()
        split = Counter(row.owner_map_index for row in r["rows"] if row.state == "consumed")
        redone = len(r["charged"]) - len({order for *_, order in r["charged"]})
        r["split"], r["redone"] = split, redone
        print(
            f"  {name:30s} {r['state']:7s} wall {wall:5.1f} s  split {[split.get(i, 0) for i in range(len(tis))]}"
            f"  redone {redone}"
        )

    for case, r in report.items():  # both forms: every order consumed once, none lost
        assert r["state"] == "success", f"{case}: {r['state']} {[tuple(t) for t in r['tis']]}{logs()}"
        assert Counter(row.state for row in r["rows"]) == {"consumed": SPREAD_ORDERS}, case
        assert {order for *_, order in r["charged"]} == set(range(SPREAD_ORDERS)), f"{case}: an order was lost"
    for name in ("1 worker", "2 workers", "4 workers", "4, one 1.5 s late"):  # streamed: shared by all
        streamed = report["queue_spread", name]
        assert streamed["redone"] == 0, name
        workers = len(streamed["tis"])
        assert set(streamed["split"]) == set(range(workers)), f"{name}: a worker got nothing: {streamed['split']}"
    killed = report["queue_spread", "4, one SIGKILLed"]
    assert [t.try_number for t in killed["tis"] if t.map_index == 1] == [2], "the killed worker was retried"
    assert 0 < killed["redone"] <= SPREAD_BATCH, f"redid {killed['redone']} orders: more than its current batch"
    assert {(s, t) for s, t, _ in killed["charged"] if s == 1} == {(1, 1), (1, 2)}
