"""PostgreSQL's pinned connection (exclusive_xcom.ledger.direct): the one-statement claim and
consume are sent on a connection the ledger keeps, so it must do what the pool does for its
own: replace a connection the server dropped, never touch a forked parent's, close on dispose."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from exclusive_xcom.errors import LedgerUnavailableError
from exclusive_xcom.ledger import ITEMS, Claimant, ClaimRequest, Ledger, Output, Production, Written, consumer_slot
from exclusive_xcom.ledger import direct as direct_module
from exclusive_xcom.ledger.schema import CONSUMED, READY
from tests.integration.conftest import kill_session, server_sessions
from tests.support import SERVERS, admin_engine

pytestmark = [pytest.mark.parametrize("backend", ["postgres"]), pytest.mark.timeout(60)]

DAG, RUN = "pinned_dag", "manual__1"
POOL = Output(DAG, RUN, "produce")
CONSUMERS = (consumer_slot(DAG, "drain"),)


def _worker(map_index: int = 0) -> Claimant:
    return Claimant(DAG, RUN, "drain", map_index=map_index)


def _request(limit: int) -> ClaimRequest:
    return ClaimRequest(Written(POOL, 1, ITEMS, CONSUMERS), limit=limit)


@pytest.fixture
def admin(ledger: Ledger) -> Iterator[sa.Connection]:
    engine = admin_engine(SERVERS["postgres"])
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def _sessions(admin: sa.Connection, ledger: Ledger) -> list[int]:
    return server_sessions(admin, "postgres", ledger.engine.url.database or "")


def _pinned_session(ledger: Ledger) -> int:
    """The server's process id of the pinned connection (it is made on first use)."""
    assert ledger._direct is not None, "PostgreSQL through psycopg sends claims directly"
    ledger.claim(_worker(9), [_request(1)])  # nothing to claim yet: the statement still runs
    return int(ledger._direct._conn.info.backend_pid)


def test_a_pinned_connection_dropped_while_idle_is_replaced_before_use(
    ledger: Ledger, admin: sa.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.migrate()
    pinned = _pinned_session(ledger)
    ledger.produce(Production(Written(POOL, 1, ITEMS, CONSUMERS), [b"a", b"b"]))
    assert kill_session(admin, "postgres", pinned)
    monkeypatch.setattr(direct_module, "IDLE_PING_SECONDS", 0.0)  # it counts as idle: pinged first

    got = ledger.claim(_worker(), [_request(2)]).claims[0]
    ledger.finish(_worker(), got.ids)

    assert got.payloads == [b"a", b"b"] and ledger.counts() == {CONSUMED: 2}
    assert _pinned_session(ledger) != pinned


def test_a_pinned_connection_dropped_under_a_statement_fails_it_cleanly_and_is_replaced(
    ledger: Ledger, admin: sa.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Used a moment ago, it is not pinged: the claim that finds it dead cannot know whether
    the server ran it, says so, and the next claim connects anew."""
    monkeypatch.setattr(direct_module, "IDLE_PING_SECONDS", 3600.0)  # never idle long enough to be pinged
    ledger.migrate()
    pinned = _pinned_session(ledger)
    ledger.produce(Production(Written(POOL, 1, ITEMS, CONSUMERS), [b"a", b"b"]))
    assert kill_session(admin, "postgres", pinned)

    with pytest.raises(LedgerUnavailableError, match="whether it took effect is unknown") as info:
        ledger.claim(_worker(), [_request(2)])
    assert info.value.maybe_committed and "dag='pinned_dag'" in str(info.value)

    got = ledger.claim(_worker(), [_request(2)]).claims[0]
    assert got.payloads == [b"a", b"b"], "the failed claim never reached the server"
    ledger.finish(_worker(), got.ids)
    assert ledger.counts() == {CONSUMED: 2}


def test_a_forked_child_connects_anew_and_leaves_the_parents_connection_alone(
    ledger: Ledger, admin: sa.Connection
) -> None:
    ledger.migrate()
    pinned = _pinned_session(ledger)
    ledger.produce(Production(Written(POOL, 1, ITEMS, CONSUMERS), [b"a", b"b", b"c", b"d"]))

    pid = os.fork()
    if pid == 0:  # the child: claims and consumes two on a connection of its own, then exits
        code = 1
        try:
            got = ledger.claim(_worker(1), [_request(2)]).claims[0]
            ledger.finish(_worker(1), got.ids)
            mine = ledger._direct._conn.info.backend_pid  # type: ignore[union-attr]
            code = 0 if got.payloads == [b"a", b"b"] and mine != pinned else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's claim failed or reused the parent's connection"

    got = ledger.claim(_worker(0), [_request(2)]).claims[0]  # on the parent's very connection
    ledger.finish(_worker(0), got.ids)
    assert got.payloads == [b"c", b"d"] and ledger.counts() == {CONSUMED: 4}
    assert ledger._direct is not None and ledger._direct._conn.info.backend_pid == pinned


def test_disposing_the_engine_closes_the_pinned_connection(ledger: Ledger, admin: sa.Connection) -> None:
    ledger.migrate()
    pinned = _pinned_session(ledger)
    assert pinned in _sessions(admin, ledger)
    ledger.engine.dispose()
    assert ledger._direct is not None and ledger._direct._conn is None
    for _ in range(100):  # the server ends the session just after the client's goodbye
        if pinned not in _sessions(admin, ledger):
            break
        admin.execute(sa.text("SELECT pg_sleep(0.02)"))
    assert pinned not in _sessions(admin, ledger)


def test_a_consume_that_committed_stands_when_its_blobs_cannot_be_looked_up(ledger: Ledger) -> None:
    """The consume commits by itself; which blobs became unneeded is asked next. If the ledger
    cannot say, the finish still succeeds (nothing is deleted; purge sweeps the blob later)."""
    ledger.migrate()
    ledger.produce(Production(Written(POOL, 1, ITEMS, CONSUMERS), [b"a", b"b"]))
    blob = "file:///nowhere/exclusive_xcom/blob"
    dbapi = ledger.engine.dialect.loaded_dbapi

    def refuse_the_lookup(_conn: sa.Connection, _cursor: object, statement: str, *_: object) -> None:
        if "payload_uri" in statement:
            raise dbapi.OperationalError("server closed the connection unexpectedly")

    first = ledger.claim(_worker(), [_request(1)]).claims[0]
    sa.event.listen(ledger.engine, "before_cursor_execute", refuse_the_lookup)
    try:
        assert ledger.finish(_worker(), first.ids, blobs=[blob]) == []
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", refuse_the_lookup)
    assert ledger.counts() == {CONSUMED: 1, READY: 1}

    second = ledger.claim(_worker(), [_request(1)]).claims[0]
    assert ledger.finish(_worker(), second.ids, blobs=[blob]) == [blob], "looked up, it is unneeded"
