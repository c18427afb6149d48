"""Schema migration and its lock, the meta table, and who may use the schema (row-level security).

A ledger records its schema version in ``exclusive_xcom_meta``; :data:`MIGRATIONS` lists
every step from version 1, so an old ledger is upgraded in place, never rebuilt, and many
tasks starting at once on a fresh database migrate it once.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import sqlalchemy as sa

from exclusive_xcom.errors import ConfigurationError, LedgerError, NotAuthorizedError, amended
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.boundary import Transactions
from exclusive_xcom.ledger.schema import MIGRATIONS, RECORDING_VERSION, SCHEMA_VERSION, meta

_ROW_SLACK = 64 * 1024  # bytes of a statement that are not payload: SQL text, other columns
_DEFAULT_PACKET = 16 << 20  # MariaDB's default max_allowed_packet (MySQL 8's is 64 MiB)
_packets: dict[str, int] = {}  # max_allowed_packet by ledger URL, as migrate() read it
#: The meta row that says when an older ledger began to record who claims and consumes.
RECORDED_SINCE = "recorded_since"
SIGNING_SECRET = "signing_secret"


class Schema(Transactions):
    """The ledger's schema: make or upgrade it, read its version, let a team's role use it."""

    def migrate(self) -> int:
        """Create or upgrade the schema to :data:`SCHEMA_VERSION`; safe to race."""
        try:
            return self._run(self._migrate)
        except NotAuthorizedError as exc:  # a team's role may use the schema, not change it
            raise amended(
                exc, f"the schema needs version {SCHEMA_VERSION}: run `exclusive-xcom db migrate` as its owner"
            ) from exc

    def _migrate(self, conn: sa.Connection) -> int:
        with _migration_lock(conn):
            current = read_version(conn)
            for step in MIGRATIONS[current:]:
                step(conn)
            if current < SCHEMA_VERSION:
                _put_meta(conn, "schema_version", str(SCHEMA_VERSION))
            if conn.dialect.name in ("mysql", "mariadb"):
                _packets[self.engine.url.render_as_string()] = int(conn.execute(*q.max_packet()).scalar_one())
            if 0 < current < RECORDING_VERSION:  # rows from before say nothing of who made them
                _put_meta(conn, RECORDED_SINCE, self._now().isoformat())
            return SCHEMA_VERSION

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
        if self.engine.dialect.name not in ("mysql", "mariadb"):
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
    elif name in ("mysql", "mariadb"):
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
