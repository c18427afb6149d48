"""Tables of the claim ledger (SQLAlchemy Core), as they are today.

One row of ``exclusive_xcom_item`` is one readable unit: a producer's output for one
consumer slot (mode ``each``: a slot per named consumer; modes ``one`` and ``items``: the
shared slot ``*``) and one sequence number (``items`` mode: one row per element).

These definitions are what queries are built from and what a migrated ledger is compared
with; they make no schema. :mod:`exclusive_xcom.ledger.migrations` does, one frozen step per
version, and a fresh ledger and one upgraded from any older version both end up equal to
these tables at :data:`SCHEMA_VERSION` (``tests/integration/test_schema_history.py``).

Two indexes exist on MySQL/MariaDB only, which have no partial indexes: they are declared
with :meth:`~sqlalchemy.schema.Index.ddl_if` (so ``metadata.create_all`` makes them there
only) and :func:`made_on` says which of today's indexes a ledger on a dialect has (Alembic's
comparison does not read ``ddl_if``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

SHARED_SLOT = "*"

READY = "ready"
CLAIMED = "claimed"
CONSUMED = "consumed"
STATES = (READY, CLAIMED, CONSUMED)

#: The version of the schema these tables are: a change to them is a new step at the end of
#: ``migrations.MIGRATIONS``, which must then be this long (checked when it is imported).
SCHEMA_VERSION = 11

metadata = sa.MetaData()

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_TiId = sa.String(36)  # a task instance's UUID, as text
_Host = sa.String(1000)  # as long as Airflow's task_instance.hostname


def _only_on(dialects: tuple[str, ...], *indexes: sa.Index) -> None:
    """These indexes exist on ``dialects`` only: ``create_all`` reads that from ``ddl_if``
    (which takes a tuple, though annotated ``str``), :func:`made_on` from ``info``."""
    for index in indexes:
        index.info["dialects"] = dialects
        index.ddl_if(dialect=dialects)  # type: ignore[arg-type]


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
    # The payload: inline bytes or, once offloaded, a URI and the blob's digest.
    sa.Column("payload", _Blob, nullable=True),
    sa.Column("payload_uri", sa.String(1024), nullable=True),
    sa.Column("payload_size", sa.BigInteger(), nullable=False),
    sa.Column("payload_sha256", sa.String(64), nullable=True),
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
    # The Airflow task-instance id and host of the process that claimed and of the one that
    # consumed, for `exclusive-xcom audit` to check against what Airflow ran.
    sa.Column("owner_ti_id", _TiId, nullable=True),
    sa.Column("owner_host", _Host, nullable=True),
    sa.Column("consumed_ti_id", _TiId, nullable=True),
    sa.Column("consumed_host", _Host, nullable=True),
    # Version 9: when a claim was last given back (a try that failed for good, an operator's
    # release) rather than left to expire: people see such an item as "released".
    sa.Column("released_at", _Time, nullable=True),
    sa.UniqueConstraint("output_id", "generation", "slot", "seq", name="uq_exclusive_xcom_item"),
    sa.Index("ix_exclusive_xcom_item_run", "dag_id", "run_id", "task_id"),
    # Ids are references held across transactions (a claimant's ids, the CLI's `release ID`):
    # SQLite would hand a deleted row's id to the next insert without AUTOINCREMENT.
    sqlite_autoincrement=True,
    # PostgreSQL: room in each page for a claimed row's new version, so that a claim can be a
    # HOT update (no new index entries; see the claimable index). A batch claims every row of
    # a page in one transaction, and a claimed version is wider than the ready one (the
    # owner's names, try, lease, host, times), so only a page whose free part holds a claimed
    # version of each of its rows has every claim HOT. Version 10 left 30% free: about a third
    # of the claims were HOT; version 11 leaves 55% (benchmarks/README.md, step 2).
    postgresql_with={"fillfactor": 45},
)

# The claim path reads only rows that can still be claimed. Where the database has partial
# indexes, consumed rows stay out of it, so claims do not slow down as history piles up at
# the front of the index (MySQL/MariaDB ignore the predicate: a plain index there). The
# predicate is on ``consumed_at`` (since version 10; ``state != 'consumed'`` before), set by
# the consume and by nothing else: a claim changes ``state`` but no indexed column nor one
# of the predicate, so PostgreSQL can make it a HOT update.
claimable_index = sa.Index(
    "ix_exclusive_xcom_item_claimable",
    item.c.output_id,
    item.c.generation,
    item.c.slot,
    item.c.seq,
    postgresql_where=item.c.consumed_at.is_(None),
    sqlite_where=item.c.consumed_at.is_(None),
)

# MySQL/MariaDB only (no partial indexes): a pool's rows by state, then seq, so a claim
# (which names this index) reads the ready rows in order and never steps over the consumed
# ones, however many pile up.
pool_index = sa.Index(
    "ix_exclusive_xcom_item_pool",
    item.c.output_id,
    item.c.generation,
    item.c.slot,
    item.c.state,
    item.c.seq,
)

# MySQL/MariaDB only: a re-run producer's delete of unconsumed rows goes through it. Where
# partial indexes exist no statement needs it (purge walks primary-key windows, claims and
# that delete read the claimable index), and PostgreSQL's generic plans combined it with
# the claimable index into a bitmap scan that read and sorted all of a pool's ready rows
# for each claim.
state_index = sa.Index("ix_exclusive_xcom_item_state", item.c.state, item.c.created_at)
_only_on(("mysql", "mariadb"), pool_index, state_index)


# The newest try of each task instance that has touched the ledger. Claims and finishes
# check it inside their own statements, so once a new try has begun an older one (a
# zombie) can neither claim nor consume nor produce anything more.
fence = sa.Table(
    "exclusive_xcom_fence",
    metadata,
    sa.Column("ti_key", sa.String(64), primary_key=True),  # sha256 of (dag, run, task, map_index)
    sa.Column("try_number", sa.Integer(), nullable=False),
    sa.Column("updated_at", _Time, nullable=False),
    # The try whose finish consumed inputs (and wrote the output), and which inputs, so
    # that a retry after a lost COMMIT acknowledgement knows it is already done.
    sa.Column("finished_try", sa.Integer(), nullable=True),
    sa.Column("finished_inputs", sa.String(64), nullable=True),
)


def made_on(index: sa.Index, dialect: str) -> bool:
    """Whether a ledger on ``dialect`` (a ``sa.Dialect.name``) has ``index``, one of today's."""
    dialects: tuple[str, ...] = index.info.get("dialects", (dialect,))
    return dialect in dialects
