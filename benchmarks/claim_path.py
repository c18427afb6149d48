"""Case 1: single-item claim + consume through the library vs the physical limit.

The library (``Ledger.claim`` with ``limit=1``, then ``Ledger.finish``) against the bare
``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING`` by psycopg,
and against that statement split in two transactions (claim, then consume), which is the
least a consume-once hand-off can do because the task's code runs in between: issue #18's
yardstick (goal: library >= 0.8 of it), also by hand on the ledger's own table (case 2's
``raw 2 tx, ledger table``). 1, 2 and 4 worker processes; PostgreSQL with durable commits
(the server's default) and with ``synchronous_commit=off`` (the disk's flush latency taken
out); then MariaDB, the library against the two transactions by hand.
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
    backend,
    create_raw_queue,
    create_raw_queue_mariadb,
    fresh_database,
    libpq_params,
    migrated_ledger,
)
from benchmarks.drain import slug
from benchmarks.runner import PoolSizer
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMERS
from exclusive_xcom.ledger import ITEMS, Ledger, Output, Production, Written

LEDGER_TABLE = "raw 2 tx, ledger table"
CONTENDERS = {
    "postgresql": ("library", "raw 1 statement", "raw 2 transactions", LEDGER_TABLE),
    "mariadb": ("library", "raw 2 transactions"),
}
GUESSES = {  # items/s, to size the first queue of each contender
    ("durable", "library"): 300,
    ("durable", "raw 1 statement"): 600,
    ("durable", "raw 2 transactions"): 400,
    ("durable", LEDGER_TABLE): 400,
    ("async", "library"): 2000,
    ("async", "raw 1 statement"): 8000,
    ("async", "raw 2 transactions"): 5000,
    ("async", LEDGER_TABLE): 5000,
}


def run(settings: Settings) -> dict[str, Any]:
    sizer = PoolSizer({f"postgresql/{d}/{c}": r for (d, c), r in GUESSES.items()})
    rows: list[dict[str, Any]] = []
    produce_rates: list[float] = []
    servers = [(settings.pg_url, durability, options) for durability, options in DURABILITY.items()]
    for server_url, durability, options in [*servers, (settings.mysql_url, "durable", {})]:
        with fresh_database(server_url, options) as url:
            db = backend(url)
            ledger = migrated_ledger(url)
            admin = psycopg.connect(**libpq_params(url), autocommit=True) if db == "postgresql" else None
            try:
                for workers in settings.claim_workers:
                    for contender in CONTENDERS[db]:
                        key = f"{db}/{durability}/{contender}"
                        size = sizer.size(key, settings.claim_seconds)
                        name = f"q{len(rows)}"
                        target, kwargs = _prepare(contender, url, name, size, ledger, admin, produce_rates)
                        per_worker = [{**kwargs, "index": i} for i in range(workers)]
                        result = settings.workers.measure(target, per_worker, settings.claim_seconds)
                        sizer.saw(key, result.rate)
                        row = {"backend": db, "durability": durability, "contender": contender, "workers": workers}
                        rows.append({**row, **result.row(size)})
            finally:
                if admin is not None:
                    admin.close()
                ledger.engine.dispose()
    return {"rows": rows, "summary": _summary(rows), "produce_items_per_s": round(max(produce_rates), 1)}


def _prepare(
    contender: str, url: str, name: str, size: int, ledger: Ledger, admin: Any, produce_rates: list[float]
) -> tuple[str, dict[str, Any]]:
    """Fill this measurement's queue (the library's through ``produce``); returns the workload."""
    if contender in ("library", LEDGER_TABLE):
        started = time.perf_counter()
        payloads = (PAYLOAD for _ in range(size))
        output = Output(DAG, RUN, name)
        ledger.produce(Production(Written(output, GENERATION, ITEMS, CONSUMERS), payloads))
        if contender == LEDGER_TABLE:
            return "benchmarks.workloads:raw", {
                "url": url,
                "table": "",
                "batch": 1,
                "two_tx": True,
                "pool": output.output_id,
            }
        produce_rates.append(size / (time.perf_counter() - started))
        return "benchmarks.workloads:library", {"url": url, "producer": name, "batch": 1}
    if admin is None:  # MariaDB
        create_raw_queue_mariadb(url, name, size)
        return "benchmarks.workloads:raw_mariadb", {"url": url, "table": name, "batch": 1}
    create_raw_queue(admin, name, size)
    two_tx = contender == "raw 2 transactions"
    return "benchmarks.workloads:raw", {"url": url, "table": name, "batch": 1, "two_tx": two_tx, "exact_single": True}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """library / raw ratios per server, durability and worker count."""
    rate = {(r["backend"], r["durability"], r["contender"], r["workers"]): r["items_per_s"] for r in rows}
    ratios: dict[str, Any] = {}
    for (db, durability, contender, workers), lib in rate.items():
        if contender != "library":
            continue
        entry: dict[str, Any] = {"library": lib}
        for other in CONTENDERS["postgresql"][1:]:
            if rate.get((db, durability, other, workers)):
                entry[f"vs_{slug(other)}"] = round(lib / rate[(db, durability, other, workers)], 3)
        ratios[f"{db}/{durability}/{workers}w"] = entry
    return ratios
