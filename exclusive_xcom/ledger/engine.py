"""Engines for the ledger: one pool per process and URL, with SQLite made safe to race.

SQLite has no row locks, so every ledger transaction there starts with
``BEGIN IMMEDIATE``: it takes the database's write lock up front, and two claimers are
serialized instead of both reading "ready" and both claiming. WAL mode lets readers
(the CLI, the demo) run beside a writer; ``busy_timeout`` makes writers queue, not fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import PoolProxiedConnection

#: A pooled connection idle for longer than this is pinged before use (see _ping_when_idle).
IDLE_PING_SECONDS = 1.0

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def get_engine(url: str) -> sa.Engine:
    """The process-wide engine for ``url``, created on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_engine(url)
        return engine


def create_engine(url: str) -> sa.Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    options: dict[str, Any] = {"pool_size": 2, "max_overflow": 4}
    mysql = parsed.get_backend_name() in ("mysql", "mariadb")
    if mysql:
        # REPEATABLE READ would add gap locks that make concurrent claims deadlock.
        options["isolation_level"] = "READ COMMITTED"
        options["pool_reset_on_return"] = None  # _roll_back_unless_settled decides instead
    engine = sa.create_engine(url, connect_args={"connect_timeout": 10}, **options)
    _ping_when_idle(engine)
    if mysql:
        _roll_back_unless_settled(engine)
    return engine


#: Connection record flag: the last thing done on this connection since its checkout was a
#: COMMIT or ROLLBACK that succeeded, so it holds no transaction.
_SETTLED = "exclusive_xcom_settled"


def _roll_back_unless_settled(engine: sa.Engine) -> None:
    """Send the pool's ROLLBACK on return only when a transaction may still be open.

    The pool rolls back every connection it gets back, in case its user left a transaction
    open. PostgreSQL's and SQLite's drivers skip that when no transaction is open; PyMySQL
    sends it always, a round trip after each COMMIT of every claim and finish. Here it is
    skipped only if the connection's last transaction call since checkout, through this
    engine's dialect, was a COMMIT or ROLLBACK that returned: one that raised, use of the bare
    driver connection, or no such call at all leaves it unsettled, and the pool rolls it back
    (a ROLLBACK that fails discards the connection). That includes a Connection closed after
    its COMMIT failed, which SQLAlchemy reports as reset and the stock pool would not roll back.
    A statement after a COMMIT begins a transaction that the Connection rolls back on close.

    The dialect's methods are wrapped, not hooked with engine events: any Connection event
    costs SQLAlchemy about 15 µs of CPU per transaction (measured), a tenth of a claim's.
    """
    dialect = engine.dialect

    def settling(end: Callable[[PoolProxiedConnection], None]) -> Callable[[PoolProxiedConnection], None]:
        def call(conn: PoolProxiedConnection) -> None:
            try:
                info = conn.info
            except NotImplementedError:  # not a pooled connection: the dialect's first-connect set-up
                return end(conn)
            info[_SETTLED] = False
            end(conn)
            info[_SETTLED] = True

        return call

    dialect.do_commit = settling(dialect.do_commit)  # type: ignore[method-assign,assignment]
    dialect.do_rollback = settling(dialect.do_rollback)  # type: ignore[method-assign,assignment]

    @sa.event.listens_for(engine, "checkout")
    def _checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        record.info[_SETTLED] = False

    @sa.event.listens_for(engine, "reset")
    def _reset(dbapi_conn: Any, record: Any, _state: sa.PoolResetState) -> None:
        # Not trusting the state's transaction_was_reset (see above).
        if not (record is not None and record.info.get(_SETTLED)):
            dbapi_conn.rollback()


def _ping_when_idle(engine: sa.Engine) -> None:
    """Check a pooled connection before use only if it sat idle for a while.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout, that is, on every
    claim and every finish. A connection used a moment ago is almost surely alive (and if
    it died meanwhile, the transaction fails cleanly with LedgerUnavailableError); one that
    sat idle may have been dropped by a server restart or an idle timeout, so it is pinged.
    """

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_conn.rollback()
        except Exception as exc:  # the pool replaces the connection and tries again
            raise sa.exc.DisconnectionError(f"idle ledger connection is gone: {exc}") from exc


def _sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _forget_after_fork() -> None:
    # A forked child (LocalExecutor, the task supervisor) must not share the parent's sockets.
    for engine in _engines.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
