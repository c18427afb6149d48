"""Throwaway databases and fast fills, shared by every case.

Each measurement runs in a database of its own (``bench_<random>``, created on the server
the URL names and dropped afterwards by :func:`tests.support.throwaway_database`, which
the test suite uses too), so benchmark runs never see each other's rows, nor the test
suite's. Fills that are not themselves measured go in one ``INSERT … SELECT`` over a
number series, not through the library.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from exclusive_xcom.ledger import Claimant, Ledger, Output, create_engine
from exclusive_xcom.ledger.schema import CONSUMED, READY, SHARED_SLOT, item
from tests.support import throwaway_database

PAYLOAD = b"x" * 64  # every item's payload, in every contender
DAG, RUN = "bench", "manual__bench"


def as_task(claimant: Claimant) -> Claimant:
    """``claimant`` with what a task's claims record of it (a task-instance id and the host), so
    that the benchmarks pay for the recording as tasks do."""
    return replace(claimant, ti_id=str(uuid.uuid4()), host=socket.gethostname())


GENERATION = 1

#: How a PostgreSQL benchmark database commits. "durable" is the server as configured
#: (each commit waits for its WAL flush); "async" sets synchronous_commit=off on the bench
#: database only, which takes the disk's flush latency out of every contender alike.
DURABILITY = {"durable": {}, "async": {"synchronous_commit": "off"}}


def backend(url: str) -> str:
    name = make_url(url).get_backend_name()
    return "mariadb" if name in ("mysql", "mariadb") else name


@contextmanager
def fresh_database(url: str, settings: dict[str, str] | None = None) -> Iterator[str]:
    """A new ``bench_<random>`` database on the server of ``url`` (``settings``: PostgreSQL
    session defaults of that database); its URL; dropped afterwards."""
    with throwaway_database(url, prefix="bench", settings=settings) as bench_url:
        yield bench_url


def libpq_params(url: str) -> dict[str, Any]:
    """Keyword arguments of ``psycopg.connect`` for an SQLAlchemy PostgreSQL URL."""
    parsed: URL = make_url(url)
    params = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "dbname": parsed.database}
    if parsed.password:
        params["password"] = parsed.password
    return {k: v for k, v in params.items() if v is not None}


def migrated_ledger(url: str) -> Ledger:
    ledger = Ledger(create_engine(url))
    ledger.migrate()
    return ledger


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def fill_items(
    engine: sa.Engine,
    output: Output,
    count: int,
    *,
    consumers: tuple[str, ...],
    first_seq: int = 0,
    consumed: bool = False,
) -> None:
    """Insert ``count`` items of mode ``items`` (seq ``first_seq``…) as ``produce`` would write
    them: ready with a payload, or, for history, consumed by some earlier task."""
    if count <= 0:
        return
    last = first_seq + count - 1
    seq: sa.ColumnElement[Any]
    if backend(str(engine.url)) == "postgresql":
        seq = sa.func.generate_series(first_seq, last).column_valued("seq")
    elif backend(str(engine.url)) == "mariadb":  # MariaDB's SEQUENCE engine: a table per range
        seq = sa.table(f"seq_{first_seq}_to_{last}", sa.column("seq")).c.seq
    else:
        raise ValueError(f"no fast fill for {engine.url.get_backend_name()}")
    now = _now()
    values: dict[str, Any] = {
        "output_id": output.output_id,
        "dag_id": output.dag_id,
        "run_id": output.run_id,
        "task_id": output.task_id,
        "map_index": output.map_index,
        "key": output.key,
        "generation": GENERATION,
        "mode": "items",
        "consumers": json.dumps(sorted(consumers)),
        "slot": SHARED_SLOT,
        "payload_size": len(PAYLOAD),
        "created_at": now,
    }
    if consumed:
        values.update(
            state=CONSUMED,
            owner_dag_id=DAG,
            owner_run_id=RUN,
            owner_task_id="history",
            owner_map_index=-1,
            owner_try=1,
            claimed_at=now,
            consumed_at=now,
        )
    else:
        values.update(state=READY, payload=PAYLOAD)
    columns = list(values)
    select = sa.select(*[sa.literal(v, type_=item.c[k].type) for k, v in values.items()], seq)
    with engine.begin() as conn:
        conn.execute(sa.insert(item).from_select([*columns, "seq"], select))


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics (this server runs with autovacuum off, so nothing else would)."""
    with engine.begin() as conn:
        if backend(str(engine.url)) == "postgresql":
            conn.exec_driver_sql(f"ANALYZE {item.name}")
        else:
            conn.exec_driver_sql(f"ANALYZE TABLE {item.name}")


# -- the bare-SQL contender -----------------------------------------------------------------

RAW_TABLE_DDL = """
CREATE TABLE {table} (
    id bigserial PRIMARY KEY,
    state varchar(16) NOT NULL,
    owner varchar(250),
    payload bytea,
    claimed_at timestamp,
    consumed_at timestamp
);
CREATE INDEX {table}_ready ON {table} (id) WHERE state = 'ready';
"""


#: The same table on MariaDB, which has no partial index: ready rows by (state, id).
RAW_TABLE_DDL_MARIADB = """
CREATE TABLE {table} (
    id bigint AUTO_INCREMENT PRIMARY KEY,
    state varchar(16) NOT NULL,
    owner varchar(250),
    payload longblob,
    claimed_at datetime(6),
    consumed_at datetime(6),
    KEY {table}_ready (state, id)
) ENGINE=InnoDB
"""


def create_raw_queue(conn: Any, table: str, count: int) -> None:
    """A plain work-queue table of ``count`` ready rows (psycopg connection, autocommit)."""
    conn.execute(RAW_TABLE_DDL.format(table=table))
    conn.execute(
        f"INSERT INTO {table} (state, payload) SELECT 'ready', %s FROM generate_series(1, %s)", (PAYLOAD, count)
    )
    conn.execute(f"ANALYZE {table}")


def create_raw_queue_mariadb(url: str, table: str, count: int) -> None:
    """That table on MariaDB, filled from its SEQUENCE engine."""
    import pymysql

    conn = pymysql.connect(**mysql_params(url), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(RAW_TABLE_DDL_MARIADB.format(table=table))
            cur.execute(f"INSERT INTO {table} (state, payload) SELECT 'ready', %s FROM seq_1_to_{count}", (PAYLOAD,))
            cur.execute(f"ANALYZE TABLE {table}")
    finally:
        conn.close()


def mysql_params(url: str) -> dict[str, Any]:
    """Keyword arguments of ``pymysql.connect`` for an SQLAlchemy MySQL/MariaDB URL."""
    parsed: URL = make_url(url)
    params = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
    }
    return {k: v for k, v in params.items() if v is not None}


def row_writes(conn: Any, table: str) -> tuple[int, int]:
    """PostgreSQL's count of rows updated in ``table`` and how many of them were HOT updates
    (no index touched), once every backend that wrote has reported (psycopg, autocommit).

    Workers report their counts as their connections close, just after a measurement: read
    until two reads 50 ms apart agree (at most a second)."""
    sql = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %s"
    seen: tuple[int, int] | None = None
    for _ in range(20):
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(sql, (table,)).fetchone()
        now = (int(row[0]), int(row[1])) if row else (0, 0)
        if now == seen:
            break
        seen = now
        time.sleep(0.05)
    return seen or (0, 0)
