"""What a worker process does, one contender each, as generators for :mod:`benchmarks.runner`.

A workload connects and prepares in the code before its first ``yield`` (not timed), then
each ``next()`` takes one batch off the queue, consumes it, and yields how many items it
got (0: the queue is empty). Closing the generator closes its connections.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta

from benchmarks.db import DAG, GENERATION, RUN, as_task, libpq_params
from exclusive_xcom.ledger import ITEMS, Claimant, ClaimRequest, Ledger, Output, Written, consumer_slot, create_engine

CONSUMER = "drain"
CONSUMERS = (consumer_slot(DAG, CONSUMER),)


def library(url: str, index: int, producer: str, batch: int) -> Iterator[int]:
    """Mapped instance ``drain[index]`` of a DAG: claim up to ``batch`` items, then finish them."""
    ledger = Ledger(create_engine(url))
    claimant = as_task(Claimant(DAG, RUN, CONSUMER, map_index=index))
    request = ClaimRequest(Written(Output(DAG, RUN, producer), GENERATION, ITEMS, CONSUMERS), limit=batch)
    try:
        ledger.finish(claimant, [])  # connect (and check the fence) before the clock starts
        yield 0
        while True:
            (claimed,) = ledger.claim(claimant, [request]).claims
            if claimed.ids:
                ledger.finish(claimant, claimed.ids)
            yield len(claimed.ids)
    finally:
        ledger.engine.dispose()


#: The physical limit: one statement takes and consumes a batch (autocommit).
ONE_STATEMENT = {
    "single": "UPDATE {t} SET state = 'consumed' WHERE id = (SELECT id FROM {t} WHERE state = 'ready' "
    "ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id, payload",
    "batch": "UPDATE {t} SET state = 'consumed' WHERE id IN (SELECT id FROM {t} WHERE state = 'ready' "
    "ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %(n)s) RETURNING id, payload",
}
#: The same in two transactions, as a consume-once hand-off must do (user code runs between).
TWO_TX_CLAIM = (
    "UPDATE {t} SET state = 'claimed', owner = %(owner)s, claimed_at = now() WHERE id IN (SELECT id FROM {t} "
    "WHERE state = 'ready' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %(n)s) RETURNING id, payload"
)
TWO_TX_CONSUME = (
    "UPDATE {t} SET state = 'consumed', consumed_at = now(), payload = NULL "
    "WHERE id = ANY(%(ids)s) AND state = 'claimed' AND owner = %(owner)s"
)
#: Those two statements by hand on the ledger's own table (its width, its indexes, the columns
#: the library writes), without what the library adds: the fence, the consumers check, the
#: all-or-nothing count, SQLAlchemy. library / this is the library's cost; this / the narrow
#: table above is the table's.
LEDGER_SHAPE_CLAIM = (
    "UPDATE exclusive_xcom_item SET state = 'claimed', owner_dag_id = %(dag)s, owner_run_id = %(run)s, "
    "owner_task_id = %(task)s, owner_map_index = %(index)s, owner_try = 1, claimed_at = now(), "
    "lease_expires_at = now() + interval '5 minutes', owner_ti_id = %(ti)s, owner_host = %(host)s "
    "WHERE id IN (SELECT id FROM exclusive_xcom_item WHERE output_id = %(pool)s AND generation = 1 "
    "AND slot = '*' AND consumed_at IS NULL AND state = 'ready' ORDER BY seq FOR UPDATE SKIP LOCKED "
    "LIMIT %(n)s) RETURNING id, seq, payload"
)
LEDGER_SHAPE_CONSUME = (
    "UPDATE exclusive_xcom_item SET state = 'consumed', consumed_at = now(), lease_expires_at = NULL, "
    "payload = NULL, consumed_ti_id = %(ti)s, consumed_host = %(host)s WHERE id = ANY(%(ids)s) "
    "AND state = 'claimed' AND owner_dag_id = %(dag)s AND owner_run_id = %(run)s AND owner_task_id = %(task)s "
    "AND owner_map_index = %(index)s AND owner_try = 1"
)


def raw(
    url: str, index: int, table: str, batch: int, two_tx: bool, exact_single: bool = False, pool: str = ""
) -> Iterator[int]:
    """Bare SQL through psycopg, autocommit, one statement per transaction; ``pool``: the
    ledger-shaped statements on that output's rows of the ledger table (``table`` unused)."""
    import psycopg

    conn = psycopg.connect(**libpq_params(url), autocommit=True)
    params = {"n": batch, "owner": f"worker-{index}", "index": index}
    if pool:
        claim, consume = LEDGER_SHAPE_CLAIM, LEDGER_SHAPE_CONSUME
        me = as_task(Claimant(DAG, RUN, CONSUMER, map_index=index))
        params.update(pool=pool, dag=DAG, run=RUN, task=CONSUMER, ti=me.ti_id, host=me.host)
    elif two_tx:
        claim, consume = TWO_TX_CLAIM.format(t=table), TWO_TX_CONSUME.format(t=table)
    else:
        claim = ONE_STATEMENT["single" if exact_single else "batch"].format(t=table)
    try:
        conn.execute("SELECT 1")
        yield 0
        while True:
            rows = conn.execute(claim, params).fetchall()
            if (two_tx or pool) and rows:
                conn.execute(consume, {**params, "ids": [r[0] for r in rows]})
            yield len(rows)
    finally:
        conn.close()


def raw_mariadb(url: str, index: int, table: str, batch: int) -> Iterator[int]:
    """The two transactions by hand on MariaDB (no UPDATE … RETURNING there): lock and mark a
    batch (SELECT … FOR UPDATE SKIP LOCKED, UPDATE, COMMIT), then consume it (autocommit),
    READ COMMITTED as the library runs."""
    import pymysql

    from benchmarks.db import mysql_params

    conn = pymysql.connect(**mysql_params(url), autocommit=True)
    owner = f"worker-{index}"
    lock = f"SELECT id, payload FROM {table} WHERE state = 'ready' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    mark = f"UPDATE {table} SET state = 'claimed', owner = %s, claimed_at = now(6) WHERE id IN %s"
    consume = (
        f"UPDATE {table} SET state = 'consumed', consumed_at = now(6), payload = NULL "
        "WHERE id IN %s AND state = 'claimed' AND owner = %s"
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            yield 0
            while True:
                conn.begin()
                cur.execute(lock, (batch,))
                ids = [r[0] for r in cur.fetchall()]
                if ids:
                    cur.execute(mark, (owner, ids))
                conn.commit()
                if ids:
                    cur.execute(consume, (ids, owner))
                yield len(ids)
    finally:
        conn.close()


#: Redis's reliable queue, a batch at a time and atomically: pop up to ARGV[1] items (LMPOP)
#: and park them on this worker's processing list, where they stay until acknowledged.
REDIS_TAKE = """
local got = redis.call('LMPOP', 1, KEYS[1], 'LEFT', 'COUNT', ARGV[1])
if not got then return {} end
redis.call('RPUSH', KEYS[2], unpack(got[2]))
return got[2]
"""


def redis_queue(url: str, index: int, key: str, batch: int) -> Iterator[int]:
    """The seed's pattern on Redis: take a batch onto a processing list (one script call), then
    acknowledge it by deleting that list (it holds this batch only)."""
    import redis

    client = redis.Redis.from_url(url)
    processing = f"{key}:processing:{index}"
    take = client.register_script(REDIS_TAKE)
    try:
        client.script_load(REDIS_TAKE)
        yield 0
        while True:
            items = take(keys=[key, processing], args=[batch])
            if items:
                client.delete(processing)
            yield len(items)
    finally:
        client.close()


def pgqueuer(url: str, index: int, entrypoint: str, batch: int) -> Iterator[int]:
    """pgqueuer's own hot path: ``Queries.dequeue`` a batch, then ``log_jobs`` it as successful
    (what its QueueManager does per batch, minus dispatching each job to an asyncio task)."""
    import psycopg
    from pgqueuer.queries import EntrypointExecutionParameter, Queries
    from pgqueuer.types import QueueEntrypoint, QueueManagerId

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(psycopg.AsyncConnection.connect(**libpq_params(url), autocommit=True))
    queries = Queries.from_psycopg_connection(conn)
    entrypoints = {QueueEntrypoint(entrypoint): EntrypointExecutionParameter(concurrency_limit=0)}
    manager_id = QueueManagerId(uuid.uuid4())
    heartbeat = timedelta(seconds=30)
    try:
        yield 0
        while True:
            jobs = loop.run_until_complete(queries.dequeue(batch, entrypoints, manager_id, None, heartbeat))
            if jobs:
                loop.run_until_complete(queries.log_jobs([(job, "successful", None) for job in jobs]))
            yield len(jobs)
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
