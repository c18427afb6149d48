"""PostgreSQL: the claim path's two hot statements, sent on a connection the ledger keeps.

On PostgreSQL the common claim and the common consume are one autocommitted statement each
(see "one statement each" in :mod:`~exclusive_xcom.ledger.queries`). Through SQLAlchemy's
pool and execution path each cost about 0.23 ms of client CPU, against 0.12 ms for the
driver alone (measured on one claim statement, psycopg 3.3: ``benchmarks/README.md``,
round 2) — as much as the server's own work for a single item. So these two statements
are compiled once and sent straight to the driver, on one DBAPI connection taken from the
engine's pool and kept ("pinned") in autocommit. Everything else stays on SQLAlchemy.

What the pool does for its connections, this does for the pinned one: a connection idle
for a while is pinged before use (:data:`~exclusive_xcom.ledger.engine.IDLE_PING_SECONDS`),
one the driver reports disconnected is dropped and replaced on next use, and a forked
child never touches its parent's. Driver errors leave as SQLAlchemy's ``DBAPIError``, so
the error boundary (:mod:`~exclusive_xcom.ledger.boundary`) treats them like any other.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, NamedTuple

import sqlalchemy as sa

from exclusive_xcom.ledger.engine import IDLE_PING_SECONDS
from exclusive_xcom.ledger.queries import Bound


class Sent(NamedTuple):
    """What a statement sent directly returned: its rows (by column name), or that it
    aborted itself, changing nothing (:data:`~exclusive_xcom.ledger.queries.ABORTED`)."""

    rows: list[Any]
    aborted: bool = False


class _Compiled(NamedTuple):
    sql: str
    defaults: dict[str, Any]  # values the statement binds itself (e.g. state = 'claimed')


def applies(engine: sa.Engine) -> bool:
    """Whether ``engine`` is PostgreSQL through psycopg 3, the driver this is written for
    (others take the portable transaction instead: correct, one round trip slower)."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


class Direct:
    """One pinned autocommit connection of an engine for single statements; thread-safe
    (threads take turns on it)."""

    def __init__(self, engine: sa.Engine) -> None:
        from psycopg.rows import namedtuple_row  # psycopg is the `postgres` extra: imported when used

        self._rows = namedtuple_row
        self.engine = engine
        self._dbapi = engine.dialect.loaded_dbapi
        self._lock = threading.Lock()
        self._conn: Any = None  # the DBAPI connection, detached from the pool
        self._pid = os.getpid()
        self._used_at = 0.0
        self._compiled: dict[sa.Executable, _Compiled] = {}
        sa.event.listen(engine, "engine_disposed", lambda _engine: self.close())

    def send(self, bound: Bound) -> Sent:
        """Run one statement in autocommit on the pinned connection (made if need be). Its
        errors are SQLAlchemy's; one without a ``statement`` came before anything was sent
        (no connection could be had)."""
        compiled = self._compile(bound.statement)
        params = {**compiled.defaults, **(bound.params or {})}  # type: ignore[dict-item]
        with self._lock:
            conn = self._ready()
            try:
                with conn.cursor(row_factory=self._rows) as cursor:
                    cursor.execute(compiled.sql, params)
                    return Sent(cursor.fetchall() if cursor.description else [])
            except self._dbapi.Error as exc:
                raise self._failed(exc, compiled.sql) from exc
            finally:
                self._used_at = time.monotonic()

    def close(self) -> None:
        """Close the pinned connection (the engine was disposed); in a forked child, forget it."""
        with self._lock:
            self._drop(close=os.getpid() == self._pid)

    def _ready(self) -> Any:
        if os.getpid() != self._pid:  # a forked child: the socket is the parent's
            self._conn, self._pid = None, os.getpid()
        if self._conn is not None and time.monotonic() - self._used_at >= IDLE_PING_SECONDS:
            self._ping()
        if self._conn is None:
            try:
                pooled = self.engine.raw_connection()  # the pool's connect and checkout events run
            except self._dbapi.Error as exc:
                raise self._failed(exc, None) from exc
            conn: Any = pooled.dbapi_connection
            pooled.detach()  # from now on this connection is ours, not the pool's
            conn.autocommit = True
            self._conn, self._used_at = conn, time.monotonic()
        return self._conn

    def _failed(self, exc: Any, sql: str | None) -> sa.exc.DBAPIError:
        """SQLAlchemy's error for a driver error. A lost connection is dropped, and so are the
        pool's idle ones, as SQLAlchemy does when one of its own is lost: the server may have
        restarted, and the next transaction then connects anew."""
        gone = self._conn is not None and self.engine.dialect.is_disconnect(exc, self._conn, None)
        if gone:
            self._drop(close=True)
            self.engine.pool.dispose()
        error = sa.exc.DBAPIError.instance(
            sql, None, exc, self._dbapi.Error, hide_parameters=True, connection_invalidated=gone
        )
        assert isinstance(error, sa.exc.DBAPIError)  # ``exc`` is a driver error
        return error

    def _ping(self) -> None:
        try:
            self._conn.execute("SELECT 1")
        except self._dbapi.Error:  # gone while idle: replaced, as the pool would
            self._drop(close=True)

    def _drop(self, *, close: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and close:
            with contextlib.suppress(self._dbapi.Error):  # it is gone either way
                conn.close()

    def _compile(self, statement: sa.Executable) -> _Compiled:
        compiled = self._compiled.get(statement)
        if compiled is None:
            done = statement.compile(dialect=self.engine.dialect)  # type: ignore[attr-defined]
            if any(b.expanding for b in done.binds.values()):
                raise ValueError("a statement sent directly cannot expand parameters: pass ids as one array")
            compiled = self._compiled[statement] = _Compiled(done.string, dict(done.params))
        return compiled
