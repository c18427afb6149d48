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


def raw(url: str, index: int, table: str, batch: int, two_tx: bool, exact_single: bool = False) -> Iterator[int]:
    """Bare SQL through psycopg, autocommit, one statement per transaction."""
    import psycopg

    conn = psycopg.connect(**libpq_params(url), autocommit=True)
    owner = f"worker-{index}"
    if two_tx:
        claim, consume = TWO_TX_CLAIM.format(t=table), TWO_TX_CONSUME.format(t=table)
    else:
        claim = ONE_STATEMENT["single" if exact_single else "batch"].format(t=table)
    try:
        conn.execute("SELECT 1")
        yield 0
        while True:
            rows = conn.execute(claim, {"n": batch, "owner": owner}).fetchall()
            if two_tx and rows:
                conn.execute(consume, {"ids": [r[0] for r in rows], "owner": owner})
            yield len(rows)
    finally:
        conn.close()


def pgqueuer(url: str, index: int, entrypoint: str, batch: int) -> Iterator[int]:
    """pgqueuer's own hot path: ``Queries.dequeue`` a batch, then ``log_jobs`` it as successful
    (what its QueueManager does per batch, minus dispatching each job to an asyncio task)."""
    import psycopg
    from pgqueuer.queries import EntrypointExecutionParameter, Queries

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(psycopg.AsyncConnection.connect(**libpq_params(url), autocommit=True))
    queries = Queries.from_psycopg_connection(conn)
    entrypoints = {entrypoint: EntrypointExecutionParameter(concurrency_limit=0)}
    manager_id = uuid.uuid4()
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
