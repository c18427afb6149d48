"""Case 2: batched drain of a mode="items" pool, items/s by batch size and worker count.

Contenders, each on a queue of its own in the same database, measured back to back:

* ``library``: ``Ledger.claim(limit=batch)`` then ``Ledger.finish`` of the batch (a worker's
  claim, then its consume at the end of the batch);
* ``raw 1 statement``: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
  RETURNING`` (take and consume in one go: the physical limit);
* ``raw 2 transactions``: the same split into claim and consume, as a hand-off must, on a
  narrow work-queue table: issue #18's yardstick (goal: library >= 0.8 of it);
* ``raw 2 tx, ledger table``: those two statements by hand on the ledger's own table, to tell
  the table's cost (vs the narrow table) from the library's (the library vs this);
* ``pgqueuer``: its ``Queries.dequeue(batch_size)`` then ``log_jobs`` (dequeue and ack);
* ``redis`` (a reference peer, no goal): the reliable-queue pattern on the local Redis, which
  keeps nothing on disk (see :func:`benchmarks.workloads.redis_queue`).

PostgreSQL with durable and with asynchronous commits (see :data:`benchmarks.db.DURABILITY`),
then the library and the raw two transactions on MariaDB, then Redis. On PostgreSQL each
measurement also records how many of the rows it updated were HOT updates (no index entry
written), from ``pg_stat_user_tables``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
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
    create_raw_queue_mariadb,
    fill_items,
    fresh_database,
    libpq_params,
    migrated_ledger,
    row_writes,
)
from benchmarks.runner import PoolSizer
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMERS
from exclusive_xcom.ledger import Output
from exclusive_xcom.ledger.schema import item

LEDGER_TABLE = "raw 2 tx, ledger table"
CONTENDERS = {
    "postgresql": ("library", "raw 1 statement", "raw 2 transactions", LEDGER_TABLE, "pgqueuer"),
    "mariadb": ("library", "raw 2 transactions"),
}
ENQUEUE_CHUNK = 10_000
REDIS_NOTE = "Redis keeps nothing on disk here (--save '' --appendonly no), the ledger commits every claim and consume"


#: items/s at batch 100 (seen on this machine), to size the first queue of each contender;
#: later queues are sized from what the previous measurement of the same kind drained.
FIRST_GUESS = {
    "durable": {"library": 16_000, "raw 1 statement": 60_000, "raw 2 transactions": 40_000, LEDGER_TABLE: 25_000},
    "async": {"library": 20_000, "raw 1 statement": 80_000, "raw 2 transactions": 50_000, LEDGER_TABLE: 30_000},
}


def _guess(durability: str, contender: str, batch: int) -> float:
    return FIRST_GUESS.get(durability, {}).get(contender, 20_000) * (min(batch, 100) / 100) ** 0.85


def run(settings: Settings) -> dict[str, Any]:
    sizer = PoolSizer({}, high=200_000)
    rows: list[dict[str, Any]] = []
    for durability, options in DURABILITY.items():
        with fresh_database(settings.pg_url, options) as url:
            rows += _run_server(settings, url, durability, sizer)
    with fresh_database(settings.mysql_url) as url:
        rows += _run_server(settings, url, "durable", sizer)
    notes = {"redis": REDIS_NOTE}
    try:
        rows += _run_redis(settings, sizer)
    except Exception as exc:  # noqa: BLE001 - a reference peer: the run goes on without it
        notes["redis"] = f"not measured: {exc!r}"
    return {"rows": rows, "summary": _summary(rows), "notes": notes}


def _run_server(settings: Settings, url: str, durability: str, sizer: PoolSizer) -> list[dict[str, Any]]:
    db = backend(url)
    contenders = CONTENDERS[db]
    ledger = migrated_ledger(url)
    admin = psycopg.connect(**libpq_params(url), autocommit=True) if db == "postgresql" else None
    if "pgqueuer" in contenders:
        asyncio.run(_pgqueuer(url, install=True))
    rows: list[dict[str, Any]] = []
    try:
        for batch in settings.drain_batches:
            for workers in settings.drain_workers:
                for contender in contenders:
                    name = f"q{len(rows)}"
                    key = f"{db}/{durability}/{contender}/{batch}"
                    sizer.rates.setdefault(key, _guess(durability, contender, batch))
                    size = sizer.size(key, settings.drain_seconds)
                    target, kwargs, table = _prepare(contender, url, name, size, batch, ledger, admin)
                    before = row_writes(admin, table) if admin is not None else None
                    result = settings.workers.measure(
                        f"benchmarks.workloads:{target}",
                        [{**kwargs, "index": i} for i in range(workers)],
                        settings.drain_seconds,
                    )
                    sizer.saw(key, result.rate)
                    row = {"backend": db, "durability": durability, "contender": contender, "batch": batch}
                    row.update(workers=workers, **result.row(size))
                    if admin is not None and before is not None:
                        row.update(_hot(before, row_writes(admin, table)))
                    rows.append(row)
    finally:
        if admin is not None:
            admin.close()
        ledger.engine.dispose()
    return rows


def _hot(before: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
    """Rows updated during a measurement and the share of them that were HOT updates."""
    updated, hot = after[0] - before[0], after[1] - before[1]
    return {"rows_updated": updated, "hot_share": round(hot / updated, 3) if updated else None}


def _prepare(
    contender: str, url: str, name: str, size: int, batch: int, ledger: Any, admin: Any
) -> tuple[str, dict[str, Any], str]:
    """Fill this measurement's queue; returns the workload, its arguments and the table it updates."""
    if contender in ("library", LEDGER_TABLE):
        output = Output(DAG, RUN, name)
        fill_items(ledger.engine, output, size, consumers=CONSUMERS)
        analyze(ledger.engine)
        if contender == "library":
            return "library", {"url": url, "producer": name, "batch": batch}, item.name
        return "raw", {"url": url, "table": "", "batch": batch, "two_tx": True, "pool": output.output_id}, item.name
    if contender == "pgqueuer":
        asyncio.run(_pgqueuer(url, entrypoint=name, count=size))
        return "pgqueuer", {"url": url, "entrypoint": name, "batch": batch}, "pgqueuer"
    if admin is None:  # MariaDB
        create_raw_queue_mariadb(url, name, size)
        return "raw_mariadb", {"url": url, "table": name, "batch": batch}, name
    create_raw_queue(admin, name, size)
    return "raw", {"url": url, "table": name, "batch": batch, "two_tx": contender == "raw 2 transactions"}, name


def _run_redis(settings: Settings, sizer: PoolSizer) -> list[dict[str, Any]]:
    """The Redis peer, under a key prefix of its own (deleted after every measurement)."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    prefix = f"exclusive_xcom_bench:{uuid.uuid4().hex}:"
    rows: list[dict[str, Any]] = []
    try:
        for batch in settings.drain_batches:
            for workers in settings.drain_workers:
                key = f"redis/{batch}"
                sizer.rates.setdefault(key, 200_000.0)
                size = sizer.size(key, settings.drain_seconds)
                queue = f"{prefix}q{len(rows)}"
                for start in range(0, size, ENQUEUE_CHUNK):
                    client.rpush(queue, *[PAYLOAD] * min(ENQUEUE_CHUNK, size - start))
                try:
                    result = settings.workers.measure(
                        "benchmarks.workloads:redis_queue",
                        [{"url": settings.redis_url, "key": queue, "batch": batch, "index": i} for i in range(workers)],
                        settings.drain_seconds,
                    )
                finally:
                    _delete_prefix(client, prefix)
                sizer.saw(key, result.rate)
                row = {"backend": "redis", "durability": "in memory", "contender": "redis", "batch": batch}
                rows.append({**row, "workers": workers, **result.row(size)})
    finally:
        _delete_prefix(client, prefix)
        client.close()
    return rows


def _delete_prefix(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


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


def slug(contender: str) -> str:
    """A contender's name as a key of the summary: ``raw 2 tx, ledger table`` -> ``raw_2_tx_ledger_table``."""
    return re.sub(r"\W+", "_", contender)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server/durability, batch and worker count: the library's items/s and its ratio to
    every other contender measured alike (Redis: at the same batch and worker count)."""
    rate = {(r["backend"], r["durability"], r["contender"], r["batch"], r["workers"]): r["items_per_s"] for r in rows}
    summary: dict[str, Any] = {}
    for (db, durability, contender, batch, workers), lib in sorted(rate.items()):
        if contender != "library":
            continue
        entry: dict[str, Any] = {"library": lib}
        peers = {other: (db, durability, other, batch, workers) for other in CONTENDERS["postgresql"][1:]}
        peers["redis"] = ("redis", "in memory", "redis", batch, workers)
        for other, key in peers.items():
            if rate.get(key):
                entry[f"vs_{slug(other)}"] = round(lib / rate[key], 3)
        raw_ledger, raw_narrow = (
            rate.get((db, durability, LEDGER_TABLE, batch, workers)),
            rate.get((db, durability, "raw 2 transactions", batch, workers)),
        )
        if raw_ledger and raw_narrow:  # the table's share of the gap: its shape, by hand
            entry["ledger_table_vs_narrow_table"] = round(raw_ledger / raw_narrow, 3)
        summary[f"{db}/{durability}/batch {batch}/{workers}w"] = entry
    return summary
