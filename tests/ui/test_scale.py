"""The page's JSON at a million ledger rows, through the real API server (``slow``: full run only).

The ledger of a UI server is filled with 1,000,000 rows by PostgreSQL's COPY: two DAGs, 500
runs each, 1,000 items per run, nine in ten consumed, the rest ready or claimed (some
leases expired). Each endpoint the page calls is timed over a few calls; the medians are
printed and written to ``ui-scale.json`` in the test's folder (no timed assertion: the
numbers are for the README). What is asserted is what the pages must still do at that
size: pages are full, a page below a cursor starts below it, counts add up.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom.ledger.schema import item
from tests.ui.server import DAGS, UIServer, get

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui_scale"), pytest.mark.timeout(600)]

RUNS_PER_DAG, ITEMS_PER_RUN = 500, 1000
ROWS = len(DAGS) * RUNS_PER_DAG * ITEMS_PER_RUN
CALLS = 7
NOW = datetime.utcnow()

COLUMNS = [
    "output_id",
    "dag_id",
    "run_id",
    "task_id",
    "map_index",
    "key",
    "generation",
    "mode",
    "consumers",
    "slot",
    "seq",
    "payload_size",
    "state",
    "owner_dag_id",
    "owner_run_id",
    "owner_task_id",
    "owner_map_index",
    "owner_try",
    "lease_expires_at",
    "created_at",
    "claimed_at",
    "consumed_at",
]


def _rows() -> Any:
    created = NOW - timedelta(days=1)
    for d, dag in enumerate(DAGS):
        consumers = json.dumps([f"{dag}/work"])
        for r in range(RUNS_PER_DAG):
            run = f"scale__{r:04d}"
            for seq in range(ITEMS_PER_RUN):
                kind = seq % 10
                state = "consumed" if kind < 9 else ("claimed" if seq % 20 == 9 else "ready")
                held = state != "ready"
                lease = (
                    (NOW + timedelta(hours=1) if seq % 40 == 9 else NOW - timedelta(hours=1))
                    if state == "claimed"
                    else None
                )
                yield (
                    f"s{d}-{r}",
                    dag,
                    run,
                    "enqueue",
                    -1,
                    "return_value",
                    1,
                    "items",
                    consumers,
                    "*",
                    seq,
                    100,
                    state,
                    dag if held else None,
                    run if held else None,
                    "work" if held else None,
                    -1 if held else None,
                    1 if held else None,
                    lease,
                    created,
                    created if held else None,
                    created if state == "consumed" else None,
                )


def _fill(url: str) -> float:
    started = time.monotonic()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor, cursor.copy(f"COPY {item.name} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in _rows():
                    copy.write_row(row)
            raw.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {item.name}")
    finally:
        engine.dispose()
    return time.monotonic() - started


def _median_ms(server: UIServer, path: str, **params: Any) -> tuple[float, Any]:
    times, body = [], None
    with server.client("admin") as client:
        for _ in range(CALLS):
            started = time.perf_counter()
            response = get(client, path, **params)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
            body = response.json()
    return round(statistics.median(times), 1), body


def test_the_pages_at_a_million_rows(server: UIServer, tmp_path: Path) -> None:
    seconds = _fill(server.ledger_url)
    dag, run = DAGS[0], "scale__0250"
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "items: first page (50), all DAGs": ("/api/items", {}),
        "items: a page deep in the ledger (before_id=500000)": ("/api/items", {"before_id": 500_000}),
        "items: state=expired, all DAGs": ("/api/items", {"state": "expired"}),
        "items: one run (dag_id, run_id)": ("/api/items", {"dag_id": dag, "run_id": run}),
        "items: a task instance's claims (claimed_by)": (
            "/api/items",
            {"dag_id": dag, "run_id": run, "claimed_by": "work"},
        ),
        "summary: one run": ("/api/summary", {"dag_id": dag, "run_id": run}),
        "summary: one DAG (500,000 rows)": ("/api/summary", {"dag_id": dag}),
        "summary: all DAGs (1,000,000 rows)": ("/api/summary", {}),
    }
    results, bodies = {}, {}
    for name, (path, params) in cases.items():
        results[name], bodies[name] = _median_ms(server, path, **params)
    report = {"rows": ROWS, "fill_seconds": round(seconds, 1), "calls": CALLS, "median_ms": results}
    (tmp_path / "ui-scale.json").write_text(json.dumps(report, indent=2))
    print("\n" + json.dumps(report, indent=2))
    assert len(bodies["items: first page (50), all DAGs"]["items"]) == 50
    assert max(i["id"] for i in bodies["items: a page deep in the ledger (before_id=500000)"]["items"]) == 499_999
    assert {i["state"] for i in bodies["items: state=expired, all DAGs"]["items"]} == {"expired"}
    assert sum(bodies["summary: all DAGs (1,000,000 rows)"]["counts"].values()) == ROWS + 20
    assert sum(bodies["summary: one run"]["counts"].values()) == ITEMS_PER_RUN
