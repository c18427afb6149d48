"""Running it for months, under real Airflow: offloaded and encrypted payloads, retention.

A payload above the threshold goes to object storage (the harness points ``offload_path``
at the test's Airflow home), encrypted under ``secret_key``; the ready-made maintenance
DAG then purges the consumed rows and their blobs, and reports the items nobody reads.
"""

from __future__ import annotations

import time

import pytest

from exclusive_xcom.ledger import EACH, Ledger, Output, Production, Written, create_engine
from exclusive_xcom.payload import MAGIC
from tests.integration.test_metrics import Listener

from .harness import EXAMPLE_DAGS, TEST_DAGS, Airflow, Result, ledger_rows

SUCCESS = "success"
MARKER = b"plaintext-marker-"


def test_big_payload_is_offloaded_encrypted_read_once_and_purged_by_the_maintenance_dag(
    airflow: Airflow, ledger_url: str
) -> None:
    env = {
        "AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY": "new-key,old-key",
        "AIRFLOW__EXCLUSIVE_XCOM__KEEP_CONSUMED_PAYLOADS": "True",  # so the blob can be inspected after
    }
    first = airflow.test([TEST_DAGS / "offload_big.py"], [{"dag_id": "offload_big"}], ledger_url, env=env)
    run = first.run
    assert run.state == SUCCESS, first.tail()
    assert [x["value"] for x in run.xcoms("measure", "return_value")] == [150_000]

    (row,) = ledger_rows(ledger_url)
    assert row["state"] == "consumed" and row["owner_task_id"] == "measure"
    assert row["payload"] is None, "the payload lives in object storage, only its URI in the ledger"
    uri, offload = row["payload_uri"], airflow.home / "offload"
    assert uri.startswith(f"file://{offload}/") and len(row["payload_sha256"]) == 64
    blob = offload / uri.removeprefix(f"file://{offload}/")
    stored = blob.read_bytes()
    assert len(stored) == row["payload_size"] > 3_000_000
    assert stored.startswith(MAGIC) and MARKER not in stored, "the blob is encrypted at rest"

    forgotten = Output("elsewhere", "manual__1", "export")  # two days unread: its consumer was never deployed
    ledger = Ledger(create_engine(ledger_url), clock=lambda: time.time() - 2 * 86400)
    ledger.produce(Production(Written(forgotten, 1, EACH, ("elsewhere/ingest",)), [b"never read"]))
    ledger.engine.dispose()

    purged = airflow.test(
        [EXAMPLE_DAGS / "exclusive_maintenance.py"],
        [{"dag_id": "exclusive_xcom_maintenance", "conf": {"older_than": "0s"}}],
        ledger_url,
        env=env,
    )
    maintenance = purged.run
    assert maintenance.state == SUCCESS, purged.tail()
    (report,) = [x["value"] for x in maintenance.xcoms("purge", "return_value")]
    assert report == {"rows": 1, "blobs": 1, "orphans": 0, "dry_run": False}, report
    assert [r["task_id"] for r in ledger_rows(ledger_url)] == ["export"], "retention keeps unconsumed items"
    (stats,) = [x["value"] for x in maintenance.xcoms("stats", "return_value")]
    (unread,) = stats["unread"]
    assert stats["unread_after"] == "1d" and stats["counts"] == {"ready": 1, "claimed": 0, "consumed": 0}, stats
    assert (unread["dag_id"], unread["task_id"], unread["unread"]) == ("elsewhere", "export", 1), stats
    assert not blob.exists(), "the purge deleted the consumed item's blob"


@pytest.mark.dag_runs([TEST_DAGS / "offload_big.py"], [{"dag_id": "offload_big"}])
def test_without_retention_the_blob_goes_as_soon_as_its_item_is_consumed(dag_runs: Result) -> None:
    result = dag_runs
    assert result.run.state == SUCCESS, result.tail()
    (row,) = result.ledger_rows()
    assert row["state"] == "consumed" and row["payload_uri"]
    assert row["payload_uri"].startswith(f"file://{result.workdir / 'offload'}/"), row["payload_uri"]
    assert [p for p in (result.workdir / "offload").rglob("*.blob")] == [], "consumed blob was not deleted"
    assert "offloaded (" in result.run.log, "the producer's log line reports the offload"


def test_claims_are_counted_through_airflows_statsd_and_logged_once_each(airflow: Airflow, ledger_url: str) -> None:
    listener = Listener()
    try:
        env = {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(listener.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        }
        result = airflow.test([EXAMPLE_DAGS / "exclusive_etl.py"], [{"dag_id": "exclusive_etl"}], ledger_url, env=env)
        lines = [line for line in listener.lines() if ".exclusive_xcom." in line]
    finally:
        listener.sock.close()
    assert result.run.state == SUCCESS, result.tail()
    counters = sorted(line for line in lines if line.endswith("|c"))
    assert counters == [
        "airflow.exclusive_xcom.claimed:1|c",  # transform claims extract's output
        "airflow.exclusive_xcom.claimed:1|c",  # load claims transform's output
        "airflow.exclusive_xcom.consumed:1|c",
        "airflow.exclusive_xcom.consumed:1|c",
        "airflow.exclusive_xcom.produced:1|c",  # extract
        "airflow.exclusive_xcom.produced:1|c",  # transform
    ], lines
    assert len([line for line in lines if line.startswith("airflow.exclusive_xcom.claim_latency:")]) == 2, lines
    claims = [line for line in result.tail(100_000).splitlines() if "exclusive_xcom: claimed item" in line]
    assert len(claims) == 2, claims
    assert all(c.split(" [exclusive_xcom]")[0].endswith(" ms: 1 fresh") for c in claims), claims
    assert any(
        "of exclusive_etl/" in c and "/extract (mode each) for exclusive_etl/" in c and "/transform try 1" in c
        for c in claims
    ), claims
