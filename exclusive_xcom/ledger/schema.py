"""Tables of the claim ledger (SQLAlchemy Core) and their versioned migrations.

One row of ``exclusive_xcom_item`` is one readable unit: a producer's output for one
consumer slot (mode ``each``: a slot per named consumer; modes ``one`` and ``items``: the
shared slot ``*``) and one sequence number (``items`` mode: one row per element).
The schema is versioned in ``exclusive_xcom_meta``; :data:`MIGRATIONS` lists every
step from version 1, so an old ledger is upgraded in place, never rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

SHARED_SLOT = "*"

READY = "ready"
CLAIMED = "claimed"
CONSUMED = "consumed"
STATES = (READY, CLAIMED, CONSUMED)

metadata = sa.MetaData()

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_TiId = sa.String(36)  # a task instance's UUID, as text
_Host = sa.String(1000)  # as long as Airflow's task_instance.hostname

meta = sa.Table(
    "exclusive_xcom_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(512), nullable=False),
)

item = sa.Table(
    "exclusive_xcom_item",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    # The producer's output: what a handle points at.
    sa.Column("output_id", sa.String(64), nullable=False),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("task_id", sa.String(250), nullable=False),
    sa.Column("map_index", sa.Integer(), nullable=False),
    sa.Column("key", sa.String(250), nullable=False),
    sa.Column("generation", sa.Integer(), nullable=False),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("consumers", sa.Text(), nullable=False),
    sa.Column("slot", sa.String(512), nullable=False),
    sa.Column("seq", sa.Integer(), nullable=False),
    # The payload: inline bytes or, once offloaded, a URI.
    sa.Column("payload", _Blob, nullable=True),
    sa.Column("payload_uri", sa.String(1024), nullable=True),
    sa.Column("payload_size", sa.BigInteger(), nullable=False),
    sa.Column("payload_sha256", sa.String(64), nullable=True),  # version 4: an offloaded blob's digest
    # The claim: state, owning task instance and try (the fence), lease.
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("owner_dag_id", sa.String(250), nullable=True),
    sa.Column("owner_run_id", sa.String(250), nullable=True),
    sa.Column("owner_task_id", sa.String(250), nullable=True),
    sa.Column("owner_map_index", sa.Integer(), nullable=True),
    sa.Column("owner_try", sa.Integer(), nullable=True),
    sa.Column("lease_expires_at", _Time, nullable=True),
    sa.Column("created_at", _Time, nullable=False),
    sa.Column("claimed_at", _Time, nullable=True),
    sa.Column("consumed_at", _Time, nullable=True),
    # Version 8: the Airflow task-instance id and host of the process that claimed and of the
    # one that consumed, for `exclusive-xcom audit` to check against what Airflow ran.
    sa.Column("owner_ti_id", _TiId, nullable=True),
    sa.Column("owner_host", _Host, nullable=True),
    sa.Column("consumed_ti_id", _TiId, nullable=True),
    sa.Column("consumed_host", _Host, nullable=True),
    sa.UniqueConstraint("output_id", "generation", "slot", "seq", name="uq_exclusive_xcom_item"),
    sa.Index("ix_exclusive_xcom_item_run", "dag_id", "run_id", "task_id"),
    # Ids are references held across transactions (a claimant's ids, the CLI's `release ID`):
    # SQLite would hand a deleted row's id to the next insert without AUTOINCREMENT.
    sqlite_autoincrement=True,
)

# Added in version 2: the claim path reads only rows that can still be claimed. Where the
# database has partial indexes, consumed rows stay out of it, so claims do not slow down
# as history piles up at the front of the index.
claimable_index = sa.Index(
    "ix_exclusive_xcom_item_claimable",
    item.c.output_id,
    item.c.generation,
    item.c.slot,
    item.c.seq,
    postgresql_where=item.c.state != CONSUMED,
    sqlite_where=item.c.state != CONSUMED,
)
# An Index built from a table's columns attaches itself to that table, and then the v1 step
# (create_all) would make it too: v1 must stay what version 1 was, only _v2 creates it.
item.indexes.discard(claimable_index)


# Added in version 3: the newest try of each task instance that has touched the ledger.
# Claims and finishes check it inside their own statements, so once a new try has begun
# an older one (a zombie) can neither claim nor consume nor produce anything more.
fence = sa.Table(
    "exclusive_xcom_fence",
    metadata,
    sa.Column("ti_key", sa.String(64), primary_key=True),  # sha256 of (dag, run, task, map_index)
    sa.Column("try_number", sa.Integer(), nullable=False),
    sa.Column("updated_at", _Time, nullable=False),
    # Version 7: the try whose finish consumed inputs (and wrote the output), and which
    # inputs, so that a retry after a lost COMMIT acknowledgement knows it is already done.
    sa.Column("finished_try", sa.Integer(), nullable=True),
    sa.Column("finished_inputs", sa.String(64), nullable=True),
)


def _v2(conn: sa.Connection) -> None:
    claimable_index.create(conn, checkfirst=True)


def _v3(conn: sa.Connection) -> None:
    fence.create(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    """Offloaded payloads: the blob's SHA-256, checked on every read."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns(item.name)}
    if "payload_sha256" not in columns:  # a ledger made by version 1 code; v1 today includes it
        conn.execute(sa.text(f"ALTER TABLE {item.name} ADD COLUMN payload_sha256 VARCHAR(64)"))


# Added in version 5, on MySQL/MariaDB only (they have no partial indexes): a pool's rows
# by state, then seq, so a claim reads the ready rows in order and never steps over the
# consumed ones, however many pile up.
pool_index = sa.Index(
    "ix_exclusive_xcom_item_pool", item.c.output_id, item.c.generation, item.c.slot, item.c.state, item.c.seq
)
item.indexes.discard(pool_index)


def _v5(conn: sa.Connection) -> None:
    if conn.dialect.name in ("mysql", "mariadb"):
        pool_index.create(conn, checkfirst=True)


# Made by version 1, dropped by version 6 where partial indexes exist (PostgreSQL, SQLite):
# there no statement needs it (purge walks primary-key windows, claims and a re-run
# producer's delete read the claimable index), every state change paid for an entry in it,
# and PostgreSQL's generic plans combined it with the claimable index into a bitmap scan
# that read and sorted all of a pool's ready rows for each claim (5 ms at 3,000 rows).
# MySQL/MariaDB keep it: their claims name the pool index, and their re-run producer's
# delete of unconsumed rows goes through it.
state_index = sa.Index("ix_exclusive_xcom_item_state", item.c.state, item.c.created_at)
item.indexes.discard(state_index)


def _v1(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[meta, item], checkfirst=True)
    state_index.create(conn, checkfirst=True)


def _v6(conn: sa.Connection) -> None:
    if conn.dialect.name in ("mysql", "mariadb"):
        return
    if any(ix["name"] == state_index.name for ix in sa.inspect(conn).get_indexes(item.name)):
        state_index.drop(conn)


def _v7(conn: sa.Connection) -> None:
    """Finishes remembered per task instance (a ledger made by version 6 code lacks them)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns(fence.name)}
    for name, kind in (("finished_try", "INTEGER"), ("finished_inputs", "VARCHAR(64)")):
        if name not in columns:
            conn.execute(sa.text(f"ALTER TABLE {fence.name} ADD COLUMN {name} {kind}"))


#: The columns version 8 adds to the item table, and their SQL types.
RECORD_COLUMNS = {
    "owner_ti_id": "VARCHAR(36)",
    "owner_host": "VARCHAR(1000)",
    "consumed_ti_id": "VARCHAR(36)",
    "consumed_host": "VARCHAR(1000)",
}
#: From this version on every claim and consume records who made it (task instance and host).
RECORDING_VERSION = 8


def _v8(conn: sa.Connection) -> None:
    """Who claimed and who consumed: a task's code can act for another task, the ledger can
    only record who did (for `exclusive-xcom audit`)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns(item.name)}
    for name, kind in RECORD_COLUMNS.items():
        if name not in columns:
            conn.execute(sa.text(f"ALTER TABLE {item.name} ADD COLUMN {name} {kind}"))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8]
SCHEMA_VERSION = len(MIGRATIONS)
