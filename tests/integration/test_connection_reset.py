"""MySQL/MariaDB: the pool skips its ROLLBACK on return after a COMMIT, and only then.

PyMySQL sends the pool's reset-on-return ROLLBACK even when no transaction is open, a
round trip after every claim and finish; the ledger's engine sends it only when the
connection may hold a transaction (:func:`exclusive_xcom.ledger.engine._roll_back_unless_settled`).
Every way a transaction can be left open is checked here from another session: none
leaves a transaction or a row lock behind on a pooled connection.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from exclusive_xcom.errors import NotAuthorizedError
from exclusive_xcom.ledger import ITEMS, Ledger
from exclusive_xcom.ledger import engine as ledger_engine
from exclusive_xcom.ledger.schema import item
from tests.integration.conftest import production, request, who
from tests.support import admin_engine

pytestmark = pytest.mark.parametrize("backend", ["mysql"])

LOCK_ALL = sa.select(item.c.id).with_for_update()


@pytest.fixture(autouse=True)
def _no_idle_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ping (SELECT 1, ROLLBACK) on checkout, however slow the machine: it would count."""
    monkeypatch.setattr(ledger_engine, "IDLE_PING_SECONDS", 1e9)


@pytest.fixture
def filled(ledger: Ledger) -> Ledger:
    assert ledger.produce(production(ITEMS, ["load"], [b"a", b"b", b"c"])) == 3
    return ledger


def _session_and_rollbacks(engine: sa.Engine) -> tuple[int, int]:
    """The pooled connection's server id and how many ROLLBACKs it has had (in a committed read)."""
    with engine.begin() as conn:
        session = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        rollbacks = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_rollback'").one()[1]
    return int(session), int(rollbacks)


def _assert_nothing_held(engine: sa.Engine) -> None:
    """No session of this database has a transaction open, and every row can be locked at once."""
    database = engine.url.database
    admin = admin_engine(engine.url.render_as_string(hide_password=False))
    try:
        with admin.connect() as conn:
            open_transactions = conn.execute(
                sa.text(
                    "SELECT count(*) FROM information_schema.innodb_trx t JOIN information_schema.processlist p "
                    "ON p.id = t.trx_mysql_thread_id WHERE p.db = :db AND p.id <> CONNECTION_ID()"
                ),
                {"db": database},
            ).scalar_one()
            assert open_transactions == 0
            conn.exec_driver_sql("BEGIN")
            locked = conn.execute(sa.text(f"{LOCK_ALL.compile(dialect=admin.dialect)} NOWAIT")).all()
            assert len(locked) == 3  # NOWAIT: a lock still held would raise instead
            conn.exec_driver_sql("ROLLBACK")
    finally:
        admin.dispose()


def test_a_committed_claim_and_finish_send_no_rollback(filled: Ledger) -> None:
    session, before = _session_and_rollbacks(filled.engine)
    (claimed,) = filled.claim(who("load"), [request(ITEMS, ["load"], limit=2)]).claims
    filled.finish(who("load"), claimed.ids)
    assert _session_and_rollbacks(filled.engine) == (session, before)  # the same connection, no ROLLBACK
    _assert_nothing_held(filled.engine)  # one row is still ready: lockable


def _uncommitted_read(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:  # closed without commit
        assert len(conn.execute(LOCK_ALL).all()) == 3


def _driver_connection(ledger: Ledger) -> None:
    raw = ledger.engine.raw_connection()  # bypasses SQLAlchemy's transaction bookkeeping
    cursor = raw.cursor()
    cursor.execute(str(LOCK_ALL.compile(dialect=ledger.engine.dialect)))
    assert len(cursor.fetchall()) == 3
    cursor.close()
    raw.close()


def _error_after_locking(ledger: Ledger) -> None:
    """A claim whose handle names consumers the rows do not: it locks the rows, then refuses."""
    with pytest.raises(NotAuthorizedError):
        ledger.claim(who("intruder"), [request(ITEMS, ["intruder"])])


def _refused_commit(ledger: Ledger) -> None:
    """A COMMIT the server refuses (an XA transaction still active), so SQLAlchemy's commit
    raises with the rows locked; the pool's ROLLBACK then fails too and the connection goes."""
    with ledger.engine.connect() as conn:
        conn.exec_driver_sql("XA START 'exclusive_xcom_test'")
        assert len(conn.execute(LOCK_ALL).all()) == 3
        with pytest.raises(sa.exc.DBAPIError, match="XAER_RMFAIL"):
            conn.commit()


LEAVE_OPEN = [_uncommitted_read, _driver_connection, _error_after_locking, _refused_commit]


@pytest.mark.parametrize("leave_open", LEAVE_OPEN, ids=lambda f: f.__name__)
def test_a_connection_returned_with_a_transaction_open_holds_nothing_afterwards(
    filled: Ledger, leave_open: Callable[[Ledger], None]
) -> None:
    leave_open(filled)
    _assert_nothing_held(filled.engine)
    (claimed,) = filled.claim(who("load"), [request(ITEMS, ["load"])]).claims  # the pool still works
    assert len(claimed.ids) == 3
