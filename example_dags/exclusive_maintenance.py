"""Retention for the claim ledger, daily: what ``exclusive-xcom purge`` does, as a DAG.

Deletes items consumed longer ago than ``[exclusive_xcom] retention`` (default 7d) and,
if ``expire_after`` is set, unconsumed items older than that which nobody holds, with
their offloaded blobs and any orphaned blob; in batches of 1,000 rows per transaction, so
tasks claiming meanwhile are never held up. Trigger it by hand with params to override.
Then it reports the ledger's counts and the producers whose items have waited unconsumed
longer than ``unread_after`` (default 1d), and sends them as the
``exclusive_xcom.unread_items`` gauges: a consumer someone forgot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(
    schedule="@daily",
    start_date=START,
    catchup=False,
    max_active_runs=1,
    tags=["exclusive_xcom", "maintenance"],
    params={
        "older_than": Param("", type="string", description="consumed more than this ago (default: retention)"),
        "expired_after": Param("", type="string", description="unconsumed and older (default: expire_after)"),
        "dry_run": Param(False, type="boolean"),
    },
)
def exclusive_xcom_maintenance():
    @task
    def purge(params: dict[str, Any] | None = None) -> dict[str, Any]:
        from exclusive_xcom.maintenance import run_retention

        p = params or {}
        report = run_retention(p.get("older_than", ""), p.get("expired_after", ""), bool(p.get("dry_run")))
        return dataclasses.asdict(report)

    @task
    def stats() -> dict[str, Any]:
        """Counts, and the producers whose items wait unread past unread_after (also as gauges)."""
        from exclusive_xcom.maintenance import run_stats

        return run_stats()

    purge() >> stats()


maintenance = exclusive_xcom_maintenance()
