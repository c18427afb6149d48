"""Case 1: single-item claim + consume through the library vs the physical limit.

The library (``Ledger.claim`` with ``limit=1``, then ``Ledger.finish``) against the bare
``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING`` by psycopg,
and against that statement split in two transactions (claim, then consume), which is the
least a consume-once hand-off can do because the task's code runs in between. 1, 2 and 4
worker processes; PostgreSQL with durable commits (the server's default) and with
``synchronous_commit=off`` (the disk's flush latency taken out).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from benchmarks.db import (
    DAG,
    DURABILITY,
    GENERATION,
    PAYLOAD,
    RUN,
    create_raw_queue,
    fresh_database,
    libpq_params,
    migrated_ledger,
)
from benchmarks.runner import PoolSizer
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMERS
from exclusive_xcom.ledger import ITEMS, Ledger, Output, Production, Written

CONTENDERS = ("library", "raw 1 statement", "raw 2 transactions")
GUESSES = {  # items/s, to size the first queue of each contender
    ("durable", "library"): 300,
    ("durable", "raw 1 statement"): 600,
    ("durable", "raw 2 transactions"): 400,
    ("async", "library"): 2000,
    ("async", "raw 1 statement"): 8000,
    ("async", "raw 2 transactions"): 5000,
}


def run(settings: Settings) -> dict[str, Any]:
    sizer = PoolSizer({f"{d}/{c}": r for (d, c), r in GUESSES.items()})
    rows: list[dict[str, Any]] = []
    produce_rates: list[float] = []
    seconds = settings.claim_seconds
    for durability, options in DURABILITY.items():
        with fresh_database(settings.pg_url, options) as url:
            ledger = migrated_ledger(url)
            admin = psycopg.connect(**libpq_params(url), autocommit=True)
            try:
                for workers in settings.claim_workers:
                    for contender in CONTENDERS:
                        key = f"{durability}/{contender}"
                        size = sizer.size(key, seconds)
                        name = f"q{len(rows)}"
                        target, kwargs = _prepare(contender, url, name, size, ledger, admin, produce_rates)
                        per_worker = [{**kwargs, "index": i} for i in range(workers)]
                        result = settings.workers.measure(target, per_worker, seconds)
                        sizer.saw(key, result.rate)
                        rows.append(
                            {
                                "durability": durability,
                                "contender": contender,
                                "workers": workers,
                                **result.row(size),
                            }
                        )
            finally:
                admin.close()
                ledger.engine.dispose()
    return {"rows": rows, "summary": _summary(rows), "produce_items_per_s": round(max(produce_rates), 1)}


def _prepare(
    contender: str, url: str, name: str, size: int, ledger: Ledger, admin: Any, produce_rates: list[float]
) -> tuple[str, dict[str, Any]]:
    """Fill this measurement's queue (the library's through ``produce``); returns the workload."""
    if contender == "library":
        started = time.perf_counter()
        payloads = (PAYLOAD for _ in range(size))
        ledger.produce(Production(Written(Output(DAG, RUN, name), GENERATION, ITEMS, CONSUMERS), payloads))
        produce_rates.append(size / (time.perf_counter() - started))
        return "benchmarks.workloads:library", {"url": url, "producer": name, "batch": 1}
    create_raw_queue(admin, name, size)
    two_tx = contender == "raw 2 transactions"
    return "benchmarks.workloads:raw", {"url": url, "table": name, "batch": 1, "two_tx": two_tx, "exact_single": True}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """library / raw ratios per durability and worker count."""
    rate = {(r["durability"], r["contender"], r["workers"]): r["items_per_s"] for r in rows}
    ratios: dict[str, Any] = {}
    for durability, contender, workers in rate:
        if contender != "library":
            continue
        lib = rate[(durability, "library", workers)]
        ratios[f"{durability}/{workers}w"] = {
            "library": lib,
            "vs_raw_1_statement": round(lib / rate[(durability, "raw 1 statement", workers)], 3),
            "vs_raw_2_transactions": round(lib / rate[(durability, "raw 2 transactions", workers)], 3),
        }
    return ratios
