"""The database-error boundary: every ledger transaction runs here, and no driver error leaves.

Errors are recognised by the code the server or driver gives, never by message text:

* retryable — a deadlock or a serialization failure (PostgreSQL SQLSTATE 40P01, 40001),
  MySQL/MariaDB's deadlock and lock-wait timeout (1213, 1205), SQLite busy or locked: the
  transaction is run again, a bounded number of times;
* refused — a missing privilege or a row-level-security policy (SQLSTATE 42501, MySQL
  1142/1143): :class:`NotAuthorizedError`;
* a constraint — :class:`LedgerIntegrityError`; any other statement the server refused
  (a missing table, a value too long): :class:`LedgerError`; both changed nothing;
* anything else (a connection refused, dropped, timed out): :class:`LedgerUnavailableError`,
  saying whether the step may have committed before the connection went.

Every message names the ledger without its password and, where the caller passed one, the
item involved; the driver's error stays chained as ``__cause__``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TypeVar

import sqlalchemy as sa

from exclusive_xcom.errors import (
    ExclusiveXComError,
    ItemRef,
    LedgerError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    NotAuthorizedError,
)
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.direct import Direct, Sent
from exclusive_xcom.ledger.direct import applies as direct_applies

_T = TypeVar("_T")
ROLLED_BACK = "this step changed nothing (it never reached its commit)"
UNKNOWN_OUTCOME = "the connection failed while this step committed, so whether it took effect is unknown"
#: How often a transaction that lost a deadlock or a lock wait is run in all.
ATTEMPTS = 3

_RETRY_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
_RETRY_MYSQL = frozenset({1213, 1205})  # ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
_RETRY_SQLITE = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
_REFUSED_SQLSTATES = frozenset({"42501"})  # insufficient_privilege (and row-level security)
_REFUSED_MYSQL = frozenset({1142, 1143})  # ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR


class Transactions:
    """Runs the ledger's transactions on an engine the caller owns (see the module's rules)."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        lease_seconds: float = 300.0,
        keep_consumed_payloads: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        #: Retention: keep a consumed item's payload (and blob) until ``purge`` deletes the row.
        self.keep_consumed_payloads = keep_consumed_payloads
        self._clock = clock
        #: PostgreSQL claims and consumes in single autocommit statements where it can (see
        #: "one statement each" in :mod:`~exclusive_xcom.ledger.queries`), sent directly on a
        #: pinned connection (:mod:`~exclusive_xcom.ledger.direct`); elsewhere, and for
        #: everything else, a transaction.
        self._direct = Direct(engine) if direct_applies(engine) else None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=timezone.utc).replace(tzinfo=None)

    def _run(self, tx: Callable[[sa.Connection], _T], ref: ItemRef | None = None) -> _T:
        """Run ``tx`` in one transaction; run it again after a deadlock, translate every driver error."""
        for attempt in range(1, ATTEMPTS + 1):
            sent = False  # whether the COMMIT may have reached the server
            try:
                with self.engine.begin() as conn:
                    result = tx(conn)
                    sent = True  # leaving the block commits
                return result
            except sa.exc.DBAPIError as exc:
                if not self._again(exc, attempt):
                    raise self._translate(exc, sent, ref) from exc
            except sa.exc.TimeoutError as exc:
                raise self._no_connection(ref) from exc
        raise AssertionError("unreachable")

    def _send(self, bound: q.Bound, ref: ItemRef | None = None) -> Sent:
        """PostgreSQL: one statement that commits by itself, sent on the pinned connection;
        run again after a deadlock (it then changed nothing), every driver error translated
        but the statement's own abort (:data:`queries.ABORTED`), which changed nothing."""
        assert self._direct is not None
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._direct.send(bound)
            except sa.exc.DBAPIError as exc:
                if _codes(exc.orig)[0] == q.ABORTED:
                    return Sent([], aborted=True)
                if not self._again(exc, attempt):
                    raise self._translate(exc, exc.statement is not None, ref) from exc
            except sa.exc.TimeoutError as exc:
                raise self._no_connection(ref) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _again(exc: sa.exc.DBAPIError, attempt: int) -> bool:
        """Whether to run a step again: it lost a deadlock or a lock wait, and attempts are left."""
        if is_retryable(exc) and attempt < ATTEMPTS:
            time.sleep(0.05 * attempt)
            return True
        return False

    def _no_connection(self, ref: ItemRef | None) -> LedgerUnavailableError:
        return LedgerUnavailableError(
            f"no connection to the claim ledger at {self.safe_url} within the pool timeout; {ROLLED_BACK}", ref
        )

    def _translate(self, exc: sa.exc.DBAPIError, sent: bool, ref: ItemRef | None) -> ExclusiveXComError:
        """The library's error for a driver error (see the module's rules)."""
        if is_refused(exc):
            why = (
                "row-level security gives each team's role its own team's items only"
                if self.engine.dialect.name == "postgresql"
                else "the ledger's tables need SELECT, INSERT, UPDATE and DELETE"
            )
            return NotAuthorizedError(
                f"the claim ledger at {self.safe_url} refused this as user {self.engine.url.username!r}: "
                f"{first_line(exc.orig)} ({why}); nothing was changed",
                ref,
            )
        if isinstance(exc, sa.exc.IntegrityError):
            return LedgerIntegrityError(self._failure(exc, "a constraint refused it; nothing was changed"), ref)
        if isinstance(exc, sa.exc.ProgrammingError | sa.exc.DataError) or _is_sqlite_error(exc):
            return LedgerError(self._failure(exc, f"the server refused the statement; {ROLLED_BACK}"), ref)
        error = LedgerUnavailableError(self._failure(exc, UNKNOWN_OUTCOME if sent else ROLLED_BACK), ref)
        error.maybe_committed = sent
        return error

    def _failure(self, exc: BaseException, outcome: str) -> str:
        """The message of a driver error: which ledger (no password), what failed, what is known."""
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        return f"the claim ledger at {self.safe_url} failed: {first_line(cause)}; {outcome}"

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _unneeded(self, conn: sa.Connection, uris: Sequence[str]) -> list[str]:
        """Which blobs no row needs any more (a blob may be shared by the slots of one output)."""
        uris = list(dict.fromkeys(uris))
        if not uris:
            return []
        needed = set(conn.execute(*q.needed_uris(uris=uris, keep_consumed=self.keep_consumed_payloads)).scalars())
        return [u for u in uris if u not in needed]


def is_retryable(exc: sa.exc.DBAPIError) -> bool:
    """A deadlock, serialization failure, lock-wait timeout or busy database, by its code."""
    sqlstate, errno, sqlite_code = _codes(exc.orig)
    return sqlstate in _RETRY_SQLSTATES or errno in _RETRY_MYSQL or (sqlite_code & 0xFF) in _RETRY_SQLITE


def is_refused(exc: sa.exc.DBAPIError) -> bool:
    """A missing privilege or a row-level-security policy, by its code."""
    sqlstate, errno, _ = _codes(exc.orig)
    return sqlstate in _REFUSED_SQLSTATES or errno in _REFUSED_MYSQL


def _is_sqlite_error(exc: sa.exc.DBAPIError) -> bool:
    """SQLite's generic SQLITE_ERROR (1): a missing table or column, a bad statement. It
    arrives as an OperationalError, like a real outage would, so only the code tells them apart."""
    return (_codes(exc.orig)[2] & 0xFF) == 1


def _codes(orig: BaseException | None) -> tuple[str | None, int | None, int]:
    """(SQLSTATE from psycopg, MySQL error number from PyMySQL/mysqlclient, SQLite result code)."""
    sqlstate = getattr(orig, "sqlstate", None)
    args = getattr(orig, "args", ())
    errno = args[0] if args and isinstance(args[0], int) else None  # sqlite3's args are text
    return sqlstate, errno, int(getattr(orig, "sqlite_errorcode", 0) or 0)


def first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
