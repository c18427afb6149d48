"""Case 2: batched drain of a mode="items" pool, items/s by batch size and worker count.

Contenders, each on a queue of its own in the same database, measured back to back:

* ``library``: ``Ledger.claim(limit=batch)`` then ``Ledger.finish`` of the batch;
* ``raw 1 statement``: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
  RETURNING`` (take and consume in one go: the physical limit);
* ``raw 2 transactions``: the same split into claim and consume, as a hand-off must;
* ``pgqueuer``: its ``Queries.dequeue(batch_size)`` then ``log_jobs`` (mark done).

PostgreSQL with durable and with asynchronous commits (see :data:`benchmarks.db.DURABILITY`),
then the library alone on MariaDB.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from benchmarks.db import (
    DAG,
    DURABILITY,
    PAYLOAD,
    RUN,
    analyze,
    backend,
    create_raw_queue,
    fill_items,
    fresh_database,
    libpq_params,
    migrated_ledger,
)
from benchmarks.runner import PoolSizer
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMERS
from exclusive_xcom.ledger import Output

PG_CONTENDERS = ("library", "raw 1 statement", "raw 2 transactions", "pgqueuer")
ENQUEUE_CHUNK = 10_000


#: items/s at batch 1 (seen on this machine), to size the first queue of each contender;
#: later queues are sized from what the previous measurement of the same kind drained.
FIRST_GUESS = {
    "durable": {"library": 100, "raw 1 statement": 400, "raw 2 transactions": 200, "pgqueuer": 150},
    "async": {"library": 120, "raw 1 statement": 2500, "raw 2 transactions": 1700, "pgqueuer": 500},
}


def _guess(durability: str, contender: str, batch: int) -> float:
    return FIRST_GUESS[durability][contender] * min(batch, 100) ** 0.85


def run(settings: Settings) -> dict[str, Any]:
    sizer = PoolSizer({}, high=200_000)
    rows: list[dict[str, Any]] = []
    for durability, options in DURABILITY.items():
        with fresh_database(settings.pg_url, options) as url:
            rows += _run_server(settings, url, durability, PG_CONTENDERS, sizer)
    with fresh_database(settings.mysql_url) as url:
        rows += _run_server(settings, url, "durable", ("library",), sizer)
    return {"rows": rows, "summary": _summary(rows)}


def _run_server(
    settings: Settings, url: str, durability: str, contenders: tuple[str, ...], sizer: PoolSizer
) -> list[dict[str, Any]]:
    db = backend(url)
    ledger = migrated_ledger(url)
    admin = psycopg.connect(**libpq_params(url), autocommit=True) if db == "postgresql" else None
    if "pgqueuer" in contenders:
        asyncio.run(_pgqueuer(url, install=True))
    rows: list[dict[str, Any]] = []
    seconds = settings.drain_seconds
    try:
        for batch in settings.drain_batches:
            for workers in settings.drain_workers:
                for contender in contenders:
                    key = f"{db}/{durability}/{contender}/{batch}"
                    sizer.rates.setdefault(key, _guess(durability, contender, batch))
                    size = sizer.size(key, seconds)
                    name = f"q{len(rows)}"
                    target, kwargs = _prepare(contender, url, name, size, batch, ledger, admin)
                    result = settings.workers.measure(
                        f"benchmarks.workloads:{target}", [{**kwargs, "index": i} for i in range(workers)], seconds
                    )
                    sizer.saw(key, result.rate)
                    rows.append(
                        {
                            "backend": db,
                            "durability": durability,
                            "contender": contender,
                            "batch": batch,
                            "workers": workers,
                            **result.row(size),
                        }
                    )
    finally:
        if admin is not None:
            admin.close()
        ledger.engine.dispose()
    return rows


def _prepare(
    contender: str, url: str, name: str, size: int, batch: int, ledger: Any, admin: Any
) -> tuple[str, dict[str, Any]]:
    """Fill this measurement's queue; returns the workload and its arguments."""
    if contender == "library":
        fill_items(ledger.engine, Output(DAG, RUN, name), size, consumers=CONSUMERS)
        analyze(ledger.engine)
        return "library", {"url": url, "producer": name, "batch": batch}
    if contender == "pgqueuer":
        asyncio.run(_pgqueuer(url, entrypoint=name, count=size))
        return "pgqueuer", {"url": url, "entrypoint": name, "batch": batch}
    create_raw_queue(admin, name, size)
    return "raw", {"url": url, "table": name, "batch": batch, "two_tx": contender == "raw 2 transactions"}


async def _pgqueuer(url: str, *, install: bool = False, entrypoint: str = "", count: int = 0) -> None:
    """Install pgqueuer's schema with its own routine, or enqueue ``count`` jobs through its API."""
    from pgqueuer.queries import Queries

    conn = await psycopg.AsyncConnection.connect(**libpq_params(url), autocommit=True)
    try:
        queries = Queries.from_psycopg_connection(conn)
        if install:
            await queries.install()
        for start in range(0, count, ENQUEUE_CHUNK):
            n = min(ENQUEUE_CHUNK, count - start)
            await queries.enqueue([entrypoint] * n, [PAYLOAD] * n, [0] * n)
        if count:
            await conn.execute("ANALYZE pgqueuer")
    finally:
        await conn.close()


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best items/s over worker counts, per server/durability/contender and batch; ratios."""
    best: dict[tuple[str, str, str, int], float] = {}
    for r in rows:
        key = (r["backend"], r["durability"], r["contender"], r["batch"])
        best[key] = max(best.get(key, 0.0), r["items_per_s"])
    summary: dict[str, Any] = {}
    for (db, durability, contender, batch), rate in sorted(best.items()):
        if contender != "library":
            continue
        entry: dict[str, Any] = {"library": rate}
        for other in PG_CONTENDERS[1:]:
            if (db, durability, other, batch) in best:
                entry[f"vs_{other.replace(' ', '_')}"] = round(rate / best[(db, durability, other, batch)], 3)
        if db == "mariadb" and ("postgresql", "durable", "library", batch) in best:
            entry["vs_postgresql_durable"] = round(rate / best[("postgresql", "durable", "library", batch)], 3)
        summary[f"{db}/{durability}/batch {batch}"] = entry
    return summary
