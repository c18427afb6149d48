"""Schema migration: its frozen steps, their runner and lock, the meta table, and who may
use the schema (row-level security).

A ledger records its schema version in ``exclusive_xcom_meta``; :data:`MIGRATIONS` lists
every step from version 1, so an old ledger is upgraded in place, never rebuilt, and many
tasks starting at once on a fresh database migrate it once.

The steps are frozen: each one is the DDL its version ran, written out as it was then, and
none is built from today's tables in :mod:`.schema` (a new column there must not appear in
version 1). Tables are private :class:`~sqlalchemy.Table` copies on a
:class:`~sqlalchemy.MetaData` of their own version; columns and indexes added later are
SQL text. A fresh ledger runs every step, an old one the steps after its version, and both
end up equal to :mod:`.schema` (``tests/integration/test_schema_history.py``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from exclusive_xcom.errors import ConfigurationError, LedgerError, NotAuthorizedError, amended
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.boundary import Transactions
from exclusive_xcom.ledger.schema import SCHEMA_VERSION, meta

_ROW_SLACK = 64 * 1024  # bytes of a statement that are not payload: SQL text, other columns
_DEFAULT_PACKET = 16 << 20  # MariaDB's default max_allowed_packet (MySQL 8's is 64 MiB)
_packets: dict[str, int] = {}  # max_allowed_packet by ledger URL, as migrate() read it
#: The meta row that says when an older ledger began to record who claims and consumes.
RECORDED_SINCE = "recorded_since"
SIGNING_SECRET = "signing_secret"
_MYSQL = ("mysql", "mariadb")  # dialect names; they have no partial indexes


class Schema(Transactions):
    """The ledger's schema: make or upgrade it, read its version, let a team's role use it."""

    def migrate(self, *, to: int = SCHEMA_VERSION) -> int:
        """Create or upgrade the schema to :data:`SCHEMA_VERSION`; safe to race.

        ``to``: stop at that version, as code of that version left a ledger (tests build
        older ledgers so); a ledger already there or newer is left alone.
        """
        if not 1 <= to <= SCHEMA_VERSION:
            raise ValueError(f"no schema version {to}: there are 1 to {SCHEMA_VERSION}")
        try:
            return self._run(partial(self._migrate, to=to))
        except NotAuthorizedError as exc:  # a team's role may use the schema, not change it
            raise amended(exc, f"the schema needs version {to}: run `exclusive-xcom db migrate` as its owner") from exc

    def _migrate(self, conn: sa.Connection, *, to: int) -> int:
        with _migration_lock(conn):
            current = read_version(conn)
            for step in MIGRATIONS[current:to]:
                step(conn)
            if current < to:
                _put_meta(conn, "schema_version", str(to))
            if conn.dialect.name in _MYSQL:
                _packets[self.engine.url.render_as_string()] = int(conn.execute(*q.max_packet()).scalar_one())
            if 0 < current < RECORDING_VERSION <= to:  # rows from before say nothing of who made them
                _put_meta(conn, RECORDED_SINCE, self._now().isoformat())
            return to

    def schema_version(self) -> int:
        """The version this ledger's schema is at (0: none yet); reads, never migrates."""
        return self._run(read_version)

    def grant(self, team: str, role: str) -> None:
        """PostgreSQL: let ``role`` (an existing login) use the ledger as a member of ``team``,
        seeing and changing that team's rows only; row-level security is switched on first."""
        if self.engine.dialect.name != "postgresql":
            raise ConfigurationError(
                "row-level security needs PostgreSQL; on MySQL/MariaDB and SQLite give each team a ledger "
                "database of its own, with credentials only its workers have"
            )

        def tx(conn: sa.Connection) -> None:
            if conn.execute(*q.role_exists(role=role)).scalar() is None:
                raise ConfigurationError(f"no database role {role!r}: create it (CREATE ROLE ... LOGIN) first")
            for statement in (*q.row_security(), *q.team_grants(team=team, login=q.quoted(conn, role))):
                conn.execute(*statement)

        self._run(tx)

    @property
    def inline_limit(self) -> int | None:
        """The largest payload one statement may carry, where the server has such a limit.

        MySQL/MariaDB refuse a statement above ``max_allowed_packet`` by dropping the
        connection (indistinguishable from an outage), and PyMySQL's escaping can double
        a payload's bytes on the wire: half the packet, less room for the rest of the row.
        The server's value is read by :meth:`migrate` (no round trip of its own); until
        then MariaDB's default (16 MiB) is assumed.
        """
        if self.engine.dialect.name not in _MYSQL:
            return None
        packet = _packets.get(self.engine.url.render_as_string(), _DEFAULT_PACKET)
        return max((packet - _ROW_SLACK) // 2, 1024)

    def secret(self) -> bytes:
        """This ledger's own signing key, made on first use: only a configuration that
        allows plaintext and sets no key signs with it, so only such a ledger holds one."""
        return self._run(_secret)

    def recorded_since(self) -> datetime | None:
        """When this ledger was upgraded to record who claims and consumes (None: always did)."""
        value = self._run(lambda conn: conn.execute(*q.get_meta(name=RECORDED_SINCE)).scalar())
        return None if value is None else datetime.fromisoformat(value)


@contextmanager
def _migration_lock(conn: sa.Connection) -> Iterator[None]:
    """Serialize concurrent migrators (many tasks may start on a fresh database at once)."""
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7318004211)"))
        yield
    elif name in _MYSQL:
        conn.execute(sa.text("SELECT GET_LOCK('exclusive_xcom_migrate', 60)"))
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT RELEASE_LOCK('exclusive_xcom_migrate')"))
    else:  # SQLite: the transaction began with BEGIN IMMEDIATE and holds the write lock.
        yield


def read_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table(meta.name):
        return 0
    value = conn.execute(*q.get_meta(name="schema_version")).scalar()
    return int(value) if value is not None else 0


def _put_meta(conn: sa.Connection, name: str, value: str, *, overwrite: bool = True) -> None:
    conn.execute(*q.put_meta(dialect=conn.dialect.name, name=name, value=value, overwrite=overwrite))


def _secret(conn: sa.Connection) -> bytes:
    # Look before reading: on a never-migrated database the SELECT itself would fail instead
    # of saying what to do.
    if not sa.inspect(conn).has_table(meta.name):
        raise LedgerError("the claim ledger has no schema yet: run `exclusive-xcom db migrate`")
    _put_meta(conn, SIGNING_SECRET, secrets.token_hex(32), overwrite=False)  # the first one made stays
    return bytes.fromhex(conn.execute(*q.get_meta(name=SIGNING_SECRET)).scalar_one())


# -- The steps, one per version, frozen ------------------------------------------------------
#
# Each step can run again where it already ran (it looks before it adds or drops): MySQL and
# MariaDB commit every DDL statement at once, so a migrate that fails or is retried halfway
# (a lock wait timeout, a deadlock) has done some steps without moving the version number,
# and the next one runs them again.

_ITEM = "exclusive_xcom_item"
_FENCE = "exclusive_xcom_fence"

# Column types as versions 1 and 3 declared them.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# Version 1: the meta and item tables. Its item table had neither payload_sha256 (version 4)
# nor the who-claimed columns (version 8), and had the state index (dropped by version 6
# where partial indexes exist). SQLite's AUTOINCREMENT has been part of it since the commit
# that first tested the ledger (744379d; no later step could add it).
_V1 = sa.MetaData()
sa.Table(
    "exclusive_xcom_meta",
    _V1,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(512), nullable=False),
)
sa.Table(
    _ITEM,
    _V1,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
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
    sa.Column("payload", _Blob, nullable=True),
    sa.Column("payload_uri", sa.String(1024), nullable=True),
    sa.Column("payload_size", sa.BigInteger(), nullable=False),
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
    sa.UniqueConstraint("output_id", "generation", "slot", "seq", name="uq_exclusive_xcom_item"),
    sa.Index("ix_exclusive_xcom_item_run", "dag_id", "run_id", "task_id"),
    sa.Index("ix_exclusive_xcom_item_state", "state", "created_at"),
    sqlite_autoincrement=True,
)


def _v1(conn: sa.Connection) -> None:
    _V1.create_all(conn, checkfirst=True)


def _v2(conn: sa.Connection) -> None:
    """The claim path's index of the rows that can still be claimed: partial where the
    database has partial indexes, a plain one on MySQL/MariaDB (version 2 declared the
    predicate for PostgreSQL and SQLite only)."""
    where = None if conn.dialect.name in _MYSQL else "state != 'consumed'"
    _create_index(conn, "ix_exclusive_xcom_item_claimable", "output_id, generation, slot, seq", where=where)


# Version 3: the fence, the newest try of each task instance (finished_* came in version 7).
_V3 = sa.MetaData()
sa.Table(
    _FENCE,
    _V3,
    sa.Column("ti_key", sa.String(64), primary_key=True),
    sa.Column("try_number", sa.Integer(), nullable=False),
    sa.Column("updated_at", _Time, nullable=False),
)


def _v3(conn: sa.Connection) -> None:
    _V3.create_all(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    """Offloaded payloads: the blob's SHA-256, checked on every read."""
    _add_columns(conn, _ITEM, {"payload_sha256": "VARCHAR(64)"})


def _v5(conn: sa.Connection) -> None:
    """MySQL/MariaDB: a pool's rows by state, then seq (claims name it)."""
    if conn.dialect.name in _MYSQL:
        _create_index(conn, "ix_exclusive_xcom_item_pool", "output_id, generation, slot, state, seq")


def _v6(conn: sa.Connection) -> None:
    """Where partial indexes exist the state index only cost writes (and misled plans)."""
    if conn.dialect.name not in _MYSQL and _has_index(conn, "ix_exclusive_xcom_item_state"):
        conn.execute(sa.text("DROP INDEX ix_exclusive_xcom_item_state"))


def _v7(conn: sa.Connection) -> None:
    """Finishes remembered per task instance: a retry after a lost COMMIT acknowledgement."""
    _add_columns(conn, _FENCE, {"finished_try": "INTEGER", "finished_inputs": "VARCHAR(64)"})


def _v8(conn: sa.Connection) -> None:
    """Who claimed and who consumed: a task's code can act for another task, the ledger can
    only record who did (for `exclusive-xcom audit`)."""
    _add_columns(
        conn,
        _ITEM,
        {
            "owner_ti_id": "VARCHAR(36)",
            "owner_host": "VARCHAR(1000)",
            "consumed_ti_id": "VARCHAR(36)",
            "consumed_host": "VARCHAR(1000)",
        },
    )


def _v9(conn: sa.Connection) -> None:
    """When a claim was given back: a released item is told apart from one never claimed."""
    kind = (
        "DATETIME(6)"
        if conn.dialect.name in _MYSQL
        else ("TIMESTAMP" if conn.dialect.name == "postgresql" else "DATETIME")
    )
    _add_columns(conn, _ITEM, {"released_at": kind})


def _v10(conn: sa.Connection) -> None:
    """Claims can be HOT updates on PostgreSQL: the claimable index is predicated on
    ``consumed_at IS NULL`` (a column a claim does not change) instead of ``state !=
    'consumed'`` (which every claim changes, so no claim could be HOT), and the item table
    leaves 30% of each page free for a claimed row's new version (fillfactor 70; pages
    written from now on: existing ones fill as before until rewritten, e.g. by VACUUM FULL).

    Consumed rows that lack ``consumed_at`` are given one first, so that both predicates
    select the same rows. MySQL/MariaDB have no partial index: the backfill is all there is.
    """
    conn.execute(
        sa.text(
            f"UPDATE {_ITEM} SET consumed_at = coalesce(claimed_at, created_at) "
            "WHERE state = 'consumed' AND consumed_at IS NULL"
        )
    )
    if conn.dialect.name in _MYSQL:
        return
    name = "ix_exclusive_xcom_item_claimable"
    if "state" in _index_sql(conn, name):  # not yet replaced (a rerun finds it done)
        conn.execute(sa.text(f"DROP INDEX {name}"))
    _create_index(conn, name, "output_id, generation, slot, seq", where="consumed_at IS NULL")
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ALTER TABLE {_ITEM} SET (fillfactor = 70)"))


def _v11(conn: sa.Connection) -> None:
    """PostgreSQL: the item table leaves 55% of each page free (fillfactor 45; version 10
    set 70), room for a claimed version of each row a page holds, so that a batch's claims
    are HOT updates (no index entries) rather than about a third of them, at the price of
    more pages per ready row. It applies to pages written from now on: an upgraded ledger's
    existing pages keep their fill until rewritten (VACUUM FULL, CLUSTER), its new items get
    the room. ``SET (fillfactor)`` takes a SHARE UPDATE EXCLUSIVE lock, so claims, produces
    and consumes go on meanwhile. Elsewhere there is no such setting: only the version moves.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ALTER TABLE {_ITEM} SET (fillfactor = 45)"))


def _index_sql(conn: sa.Connection, name: str) -> str:
    """PostgreSQL and SQLite: an index's definition as the database keeps it ("" if none)."""
    if conn.dialect.name == "postgresql":
        found = sa.text("SELECT indexdef FROM pg_indexes WHERE tablename = :t AND indexname = :n")
    else:
        found = sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t AND name = :n")
    return conn.execute(found, {"t": _ITEM, "n": name}).scalar() or ""


def _has_index(conn: sa.Connection, name: str) -> bool:
    return sa.inspect(conn).has_index(_ITEM, name)


def _create_index(conn: sa.Connection, name: str, on: str, *, where: str | None = None) -> None:
    if not _has_index(conn, name):
        partial = "" if where is None else f" WHERE {where}"
        conn.execute(sa.text(f"CREATE INDEX {name} ON {_ITEM} ({on}){partial}"))


def _add_columns(conn: sa.Connection, table: str, columns: dict[str, str]) -> None:
    """``ALTER TABLE ... ADD COLUMN`` each of ``columns`` (name: SQL type, nullable) not there yet."""
    there = {c["name"] for c in sa.inspect(conn).get_columns(table)}
    for name, kind in columns.items():
        if name not in there:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11]
#: From this version on every claim and consume records who made it (task instance and host).
RECORDING_VERSION = 8
if len(MIGRATIONS) != SCHEMA_VERSION:  # schema.py's tables are of the version the last step makes
    raise ImportError(f"{len(MIGRATIONS)} migration steps for schema version {SCHEMA_VERSION}")
