"""The database-error boundary (``exclusive_xcom.ledger.boundary``), each class provoked for real.

Retryable errors (a deadlock, a serialization failure, a lock-wait timeout, a busy SQLite
file) are made by a second session on the same database holding the locks the ledger's
transaction needs; the transaction must run again and succeed. Every other driver error
must leave the boundary as the library's own exception, the driver's error chained and
the item named, never as a raw SQLAlchemy exception.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from exclusive_xcom.errors import (
    ClaimConflictError,
    ExclusiveXComError,
    LedgerError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    NotAuthorizedError,
)
from exclusive_xcom.ledger import Claimant, Ledger, Output, create_engine
from exclusive_xcom.ledger.boundary import ATTEMPTS, is_refused, is_retryable
from exclusive_xcom.ledger.schema import SCHEMA_VERSION
from tests.integration.conftest import DAG, RUN, production, request, who

pytestmark = pytest.mark.timeout(90)

SCRATCH = "exx_boundary_locks"
SERVERS_ONLY = pytest.mark.parametrize("backend", ["postgres", "mysql"])


@pytest.fixture
def locks(engine: sa.Engine) -> str:
    """A two-row table beside the ledger's, for the second session to lock."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {SCRATCH} (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        conn.exec_driver_sql(f"INSERT INTO {SCRATCH} (id, v) VALUES (1, 0), (2, 0)")
    return SCRATCH


def _bump(conn: sa.Connection, row: int) -> None:
    conn.exec_driver_sql(f"UPDATE {SCRATCH} SET v = v + 1 WHERE id = {row}")


def _count_and_bump(conn: sa.Connection, attempts: list[int]) -> None:
    attempts.append(1)
    _bump(conn, 1)


def _values(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {int(r[0]): int(r[1]) for r in conn.exec_driver_sql(f"SELECT id, v FROM {SCRATCH}")}


class Rival(threading.Thread):
    """A second session that runs ``body`` in its own transaction and keeps what it raised."""

    def __init__(self, url: str, body: Callable[[sa.Connection], None]) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url, poolclass=sa.NullPool)
        self.body = body
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.engine.begin() as conn:
                self.body(conn)
        except BaseException as exc:  # reported by finish(), never lost
            self.error = exc
        finally:
            self.engine.dispose()

    def finish(self) -> None:
        self.join(30)
        assert not self.is_alive(), "the rival session never ended"
        assert self.error is None, f"the rival session failed: {self.error!r}"


@SERVERS_ONLY
def test_a_deadlock_is_recognised_by_its_code_and_run_again(ledger: Ledger, ledger_url: str, locks: str) -> None:
    """PostgreSQL 40P01 / MariaDB 1213: the ledger's transaction is chosen as the victim (a
    shorter deadlock_timeout on PostgreSQL; fewer changed rows on MariaDB) and runs again."""
    pg = ledger.engine.dialect.name == "postgresql"
    attempts: list[int] = []
    mine_locked, rival_locked = threading.Event(), threading.Event()

    def rival(conn: sa.Connection) -> None:
        if pg:
            conn.exec_driver_sql("SET LOCAL deadlock_timeout = '10s'")
        else:  # InnoDB rolls back the transaction that changed fewer rows: make this one heavy
            rows = ", ".join(f"({n}, 0)" for n in range(100, 150))
            conn.exec_driver_sql(f"INSERT INTO {SCRATCH} (id, v) VALUES {rows}")
        _bump(conn, 2)
        rival_locked.set()
        mine_locked.wait(10)
        _bump(conn, 1)  # waits for the ledger's transaction: half of the cycle

    def tx(conn: sa.Connection) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            if pg:
                conn.exec_driver_sql("SET LOCAL deadlock_timeout = '50ms'")
            _bump(conn, 1)
            mine_locked.set()
            rival_locked.wait(10)
            time.sleep(0.3)  # the rival is waiting for row 1 by now
        else:
            _bump(conn, 1)
        _bump(conn, 2)  # closes the cycle on the first attempt
        return len(attempts)

    other = Rival(ledger_url, rival)
    other.start()
    assert ledger._run(tx) == 2, "the deadlocked transaction ran once more and committed"
    other.finish()
    values = _values(ledger.engine)
    assert (values[1], values[2]) == (2, 2), "each side's changes landed once"


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_serialization_failure_is_run_again(ledger: Ledger, ledger_url: str, locks: str) -> None:
    """PostgreSQL 40001: a REPEATABLE READ transaction whose row changed under it."""
    attempts: list[int] = []

    def tx(conn: sa.Connection) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.exec_driver_sql(f"SELECT v FROM {SCRATCH} WHERE id = 1").all()  # the snapshot
            other = Rival(ledger_url, lambda c: _bump(c, 1))
            other.start()
            other.finish()  # committed after this transaction's snapshot
        _bump(conn, 1)
        return len(attempts)

    assert ledger._run(tx) == 2
    assert _values(ledger.engine)[1] == 2


@pytest.mark.parametrize("backend", ["mysql"])
def test_a_lock_wait_timeout_is_run_again_and_said_plainly_once_retries_run_out(
    ledger: Ledger, ledger_url: str, locks: str
) -> None:
    """MariaDB 1205: the row is held past innodb_lock_wait_timeout; released, the retry wins.
    Held through every attempt, the error leaves as LedgerUnavailableError, nothing changed."""
    engine = sa.create_engine(ledger_url, poolclass=sa.NullPool)
    sa.event.listen(engine, "connect", lambda dbapi, _rec: dbapi.cursor().execute("SET innodb_lock_wait_timeout = 1"))
    patient = Ledger(engine)
    attempts: list[int] = []
    held, release = threading.Event(), threading.Event()

    def rival(conn: sa.Connection) -> None:
        _bump(conn, 1)
        held.set()
        release.wait(20)

    def tx(conn: sa.Connection) -> int:
        attempts.append(1)
        if len(attempts) == 2:
            release.set()  # the rival commits while this attempt waits for the row
        _bump(conn, 1)
        return len(attempts)

    other = Rival(ledger_url, rival)
    other.start()
    held.wait(10)
    assert patient._run(tx) == 2
    other.finish()

    release.clear()
    held.clear()
    attempts.clear()
    other = Rival(ledger_url, rival)
    other.start()
    held.wait(10)
    with pytest.raises(LedgerUnavailableError, match=r"Lock wait timeout exceeded.*this step changed nothing") as info:
        patient._run(lambda conn: _count_and_bump(conn, attempts))
    release.set()
    other.finish()
    assert len(attempts) == ATTEMPTS and not info.value.maybe_committed
    assert isinstance(info.value.__cause__, sa.exc.OperationalError) and is_retryable(info.value.__cause__)
    assert _values(ledger.engine)[1] == 3, "the rival's two bumps and the retried one; the failed one left nothing"
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_busy_sqlite_file_is_run_again(ledger_url: str) -> None:
    """SQLITE_BUSY: another connection holds the write lock longer than busy_timeout (300 ms)
    and lets go at 400 ms: the first attempt fails busy, the second gets the lock."""
    import sqlite3

    engine = create_engine(ledger_url)
    sa.event.listen(engine, "connect", lambda dbapi, _rec: dbapi.execute("PRAGMA busy_timeout = 300"))
    ledger = Ledger(engine)
    ledger.migrate()
    path = sa.make_url(ledger_url).database
    assert path
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.4, lambda: holder.execute("COMMIT"))
    started = time.monotonic()
    releaser.start()
    try:
        assert ledger.schema_version() == SCHEMA_VERSION
        waited = time.monotonic() - started
    finally:
        releaser.join(15)
        holder.close()
        engine.dispose()
    assert waited >= 0.35, (
        f"the first attempt met the busy file (busy_timeout 300 ms), then one ran again ({waited:.2f} s)"
    )


@pytest.mark.parametrize("backend", ["mysql"])
def test_a_missing_privilege_is_not_authorized_naming_the_user_never_its_password(ledger_url: str) -> None:
    """MariaDB 1142: a login with SELECT only, producing."""
    user, password = f"exx_ro_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    url = sa.make_url(ledger_url)
    Ledger(create_engine(ledger_url)).migrate()
    with _admin(ledger_url) as admin:
        for host in ("%", "localhost", "127.0.0.1"):
            admin(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'")
            admin(f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'{host}'")
    reader = create_engine(url.set(username=user, password=password).render_as_string(hide_password=False))
    try:
        with pytest.raises(NotAuthorizedError, match=rf"refused this as user '{user}': .*SELECT, INSERT") as info:
            Ledger(reader).produce(production("each", ["load"], [b"x"]))
        assert password not in str(info.value) and is_refused(info.value.__cause__)  # type: ignore[arg-type]
        assert info.value.ref is not None and info.value.ref.producer == "extract"
    finally:
        reader.dispose()
        with _admin(ledger_url) as admin:
            for host in ("%", "localhost", "127.0.0.1"):
                admin(f"DROP USER IF EXISTS '{user}'@'{host}'")


def test_a_constraint_violation_is_an_integrity_error_and_changes_nothing(ledger: Ledger) -> None:
    """The same generation of an output written again after it was consumed: the unique key refuses."""
    ledger.produce(production("items", ["load"], [b"a", b"b"]))
    load = who("load")
    ledger.finish(load, ledger.claim(load, [request("items", ["load"])]).ids)
    before = ledger.items()
    with pytest.raises(
        LedgerIntegrityError, match=r"^the claim ledger at .* failed: .*a constraint refused it"
    ) as info:
        ledger.produce(production("items", ["load"], [b"c"]))
    assert isinstance(info.value.__cause__, sa.exc.IntegrityError)
    assert info.value.ref is not None and (info.value.ref.dag_id, info.value.ref.producer) == (DAG, "extract")
    assert ledger.items() == before, "nothing written, nothing deleted"


def test_a_statement_the_server_refuses_is_a_ledger_error_not_an_outage(engine: sa.Engine) -> None:
    """No schema yet (PostgreSQL 42P01, MariaDB 1146, SQLite's SQLITE_ERROR): not a connection problem."""
    with pytest.raises(LedgerError) as info:
        Ledger(engine).counts()
    assert type(info.value) is LedgerError, "not LedgerUnavailableError: the server answered"
    assert "the server refused the statement; this step changed nothing" in str(info.value)
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)


@SERVERS_ONLY
def test_a_value_the_server_refuses_is_a_ledger_error(ledger: Ledger) -> None:
    """A dag_id longer than its column: PostgreSQL 22001 and strict MariaDB 1406 refuse it (SQLite
    has no lengths)."""
    with pytest.raises(LedgerError, match="the server refused the statement") as info:
        ledger.produce(production("each", ["load"], [b"x"], output=Output("d" * 300, RUN, "extract")))
    assert type(info.value) is LedgerError and isinstance(info.value.__cause__, sa.exc.DataError)
    assert ledger.counts() == {}


def test_no_driver_error_leaves_the_boundary_raw(ledger: Ledger) -> None:
    """Whatever the class, what crosses the boundary is the library's own exception."""
    for tx in (
        lambda conn: conn.exec_driver_sql("SELECT no_such_column FROM exclusive_xcom_item"),
        lambda conn: conn.exec_driver_sql(
            "INSERT INTO exclusive_xcom_meta (name, value) VALUES ('schema_version', 'x')"
        ),
    ):
        with pytest.raises(ExclusiveXComError) as info:
            ledger._run(tx)
        assert isinstance(info.value, LedgerError) and isinstance(info.value.__cause__, sa.exc.DBAPIError)


def test_tries_entering_at_once_agree_on_the_newest_without_retrying(ledger: Ledger) -> None:
    """``enter`` is one upsert: tries racing to make the fence row never fail on its key; the
    newest try always gets in, and an older one either got in first or is fenced out."""
    tries = list(range(1, 9))
    outcome: dict[int, str] = {}
    start = threading.Barrier(len(tries))

    def enter(try_number: int) -> None:
        start.wait(10)
        try:
            ledger.enter(Claimant(DAG, RUN, "race", -1, try_number))
            outcome[try_number] = "entered"
        except ClaimConflictError:
            outcome[try_number] = "fenced"

    threads = [threading.Thread(target=enter, args=(n,)) for n in tries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(outcome) == set(tries) and outcome[max(tries)] == "entered"
    with pytest.raises(ClaimConflictError, match="try 8 of the same task instance has begun"):
        ledger.enter(Claimant(DAG, RUN, "race", -1, 3))


@contextmanager
def _admin(url: str) -> Iterator[Callable[[str], None]]:
    """Statements as root on the shared MariaDB (it creates and drops this test's own users
    only), sent on the driver's cursor: a host pattern's ``%`` is not a parameter."""
    engine = sa.create_engine(sa.make_url(url).set(database="test"), poolclass=sa.NullPool)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        yield cursor.execute
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
