"""A worker that fails for good because its ledger server restarted gives back what it held.

The ledger runs on a PostgreSQL cluster of the test's own (``initdb`` on a free port,
removed afterwards); the test restarts it cleanly or crashes it (``-m immediate``, WAL
recovery) while the first worker of a no-retry queue is in the middle of its drain.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import sqlalchemy as sa

from tests.support import PrivatePostgres, create_database

from .harness import TEST_DAGS, Airflow, Result, ledger_rows

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ITEMS = 20_000


def _claimed(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            sql = "SELECT count(*) FROM exclusive_xcom_item WHERE state = 'claimed'"
            return int(conn.execute(sa.text(sql)).scalar_one())
    except sa.exc.DBAPIError:
        return 0  # not made yet
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_a_worker_failed_by_a_server_restart_releases_everything_it_held(
    how: str, airflow: Airflow, private_pg: PrivatePostgres
) -> None:
    url = create_database(private_pg.url)
    results: list[Result] = []
    runner = threading.Thread(
        target=lambda: results.append(
            airflow.test([TEST_DAGS / "queue_restart.py"], [{"dag_id": "e2e_queue_restart"}], url)
        )
    )
    runner.start()
    deadline = time.monotonic() + 120
    while (held := _claimed(url)) < 500 and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert held >= 500, "the first worker's drain was never seen"
    private_pg.crash() if how == "crash" else private_pg.restart()
    runner.join(timeout=300)
    (result,) = results
    run = result.run

    states = run.states()
    work = [r for r in ledger_rows(url) if r["task_id"] == "enqueue"]
    left = sum(r["state"] == "claimed" for r in work)
    released = re.findall(r"failed for good; released (\d+) claim", run.log)
    print(f"[restarts] {how} with {held} item(s) claimed; final failures released {released}; {left} left held")
    failed = sorted(k for k, v in states.items() if v == "failed")
    assert len(failed) == 1 and failed[0].startswith("work["), f"{states}{result.tail()}"
    assert "this try holds" in run.log and "if it fails for good, they are released" in run.log, result.tail()
    assert left == 0 and released, f"{left} item(s) still held by the failed try{result.tail()}"
    assert len(work) == ITEMS and {r["state"] for r in work} == {"consumed"}
    failed_index = int(failed[0].split("[")[1].rstrip("]"))
    assert not [r for r in work if r["owner_map_index"] == failed_index], "the failed worker consumed nothing"
