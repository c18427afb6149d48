"""An unreachable or failing ledger database is a LedgerUnavailableError, never a raw driver
error, it names the ledger without its password, and it loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom import wiring
from exclusive_xcom.errors import ExclusiveXComError, LedgerUnavailableError
from exclusive_xcom.ledger import (
    ITEMS,
    ONE,
    Claimant,
    ClaimRequest,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    create_engine,
)
from tests.conftest import require_server
from tests.integration.conftest import kill_session, server_sessions, text
from tests.support import SERVERS, admin_engine

pytestmark = pytest.mark.timeout(120)

DAG, RUN = "outage_dag", "manual__1"
OUTPUT = Output(DAG, RUN, "produce")
CONSUMERS = (consumer_slot(DAG, "drain"),)
WORKER = Claimant(DAG, RUN, "drain", map_index=0)
NOTHING_DONE = "this step changed nothing (it never reached its commit)"
FAST = 8.0  # seconds: a refused connection must fail fast, not hang

# Nothing listens on port 1 of the loopback interface: the connection is refused at once.
DEAD = {
    "postgres": (
        "postgresql+psycopg://postgres:s3cr3t-pw@127.0.0.1:1/nope",
        "postgresql+psycopg://postgres:***@127.0.0.1:1/nope",
    ),
    "mysql": ("mysql+pymysql://root:s3cr3t-pw@127.0.0.1:1/nope", "mysql+pymysql://root:***@127.0.0.1:1/nope"),
}


def _request(limit: int = 100) -> ClaimRequest:
    return ClaimRequest(Written(OUTPUT, 1, ITEMS, CONSUMERS), limit=limit)


def _production(n: int) -> Production:
    return Production(Written(OUTPUT, 1, ITEMS, CONSUMERS), [f"p-{i}".encode() for i in range(n)])


def _fails_unavailable(call: Callable[[], Any], shown_url: str) -> LedgerUnavailableError:
    started = time.monotonic()
    with pytest.raises(LedgerUnavailableError) as info:
        call()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert message.startswith(f"the claim ledger at {shown_url} failed: "), message
    assert NOTHING_DONE in message, message
    assert "s3cr3t-pw" not in message
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError), "the driver error is chained, not lost"
    assert elapsed < FAST, f"took {elapsed:.1f}s to report an unreachable ledger"
    return info.value


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_an_unreachable_server_is_ledger_unavailable_and_hides_the_password(kind: str) -> None:
    url, shown = DEAD[kind]
    ledger = Ledger(create_engine(url))

    _fails_unavailable(ledger.migrate, shown)
    _fails_unavailable(ledger.schema_version, shown)
    _fails_unavailable(ledger.secret, shown)
    error = _fails_unavailable(lambda: ledger.produce(_production(3)), shown)
    assert "dag='outage_dag' run='manual__1' producer='produce' key='return_value'" in str(error)
    error = _fails_unavailable(lambda: ledger.claim(WORKER, [_request()]), shown)
    assert "consumer='outage_dag/drain'" in str(error)
    error = _fails_unavailable(lambda: ledger.finish(WORKER, [1, 2]), shown)
    assert "unknown" not in str(error), "a finish that never reached the server did not commit, and says so"
    _fails_unavailable(lambda: ledger.release(WORKER, [1]), shown)
    _fails_unavailable(lambda: ledger.extend_lease(WORKER, [1]), shown)
    _fails_unavailable(ledger.counts, shown)
    ledger.engine.dispose()


def test_an_unopenable_sqlite_file_is_ledger_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'ledger.db'}"
    ledger = Ledger(create_engine(url))
    error = _fails_unavailable(ledger.migrate, url)
    assert "unable to open database file" in str(error)
    _fails_unavailable(lambda: ledger.claim(WORKER, [_request()]), url)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_get_ledger_on_an_unreachable_server_is_ledger_unavailable(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, shown = DEAD[kind]
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", url)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(wiring, "_ready", set())
    try:
        _fails_unavailable(wiring.get_ledger, shown)
        assert wiring._ready == set(), "a ledger that was never migrated must not be remembered as ready"
    finally:
        from exclusive_xcom.ledger.engine import _engines

        if (engine := _engines.pop(url, None)) is not None:
            engine.dispose()


# -- outages in the middle of a ledger's life -------------------------------------------------


def _wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def server_ledger(backend: str, ledger_url: str) -> Iterator[tuple[Ledger, str]]:
    require_server(backend)
    ledger = Ledger(create_engine(ledger_url), lease_seconds=300)
    ledger.migrate()
    try:
        yield ledger, sa.make_url(ledger_url).database or ""
    finally:
        ledger.engine.dispose()


def _shown(ledger: Ledger) -> str:
    return ledger.engine.url.render_as_string(hide_password=True)


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_killed_idle_connections_lose_nothing(backend: str, server_ledger: tuple[Ledger, str]) -> None:
    ledger, database = server_ledger
    assert ledger.produce(_production(6)) == 6
    held = ledger.claim(WORKER, [_request(limit=4)]).claims[0]
    assert [text(p) for p in held.payloads] == ["p-0", "p-1", "p-2", "p-3"]

    admin = admin_engine(SERVERS[backend])
    with admin.connect() as conn:
        victims = server_sessions(conn, backend, database)
        assert victims, "the ledger's pool should hold an idle connection"
        for session in victims:
            kill_session(conn, backend, session)
        _wait_for(lambda: not server_sessions(conn, backend, database), "the killed sessions to go away")
    admin.dispose()

    # The next call either reconnects (pool_pre_ping) or says the ledger is unavailable;
    # then the claim is still held and finishes, and the rest is still claimable.
    try:
        ledger.finish(WORKER, held.ids)
    except LedgerUnavailableError as exc:
        assert str(exc).startswith(f"the claim ledger at {_shown(ledger)} failed: "), str(exc)
        assert ledger.counts() == {"claimed": 4, "ready": 2}
        ledger.finish(WORKER, held.ids)
    assert ledger.counts() == {"consumed": 4, "ready": 2}
    rest = ledger.claim(Claimant(DAG, RUN, "drain", map_index=1), [_request()]).claims[0]
    assert [text(p) for p in rest.payloads] == ["p-4", "p-5"]


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_connection_killed_in_the_middle_of_a_claim_claims_nothing(
    backend: str, server_ledger: tuple[Ledger, str]
) -> None:
    """Block a claim inside its transaction behind a table lock, kill its session, and
    check that the claim failed cleanly and the items are all still there to claim."""
    ledger, database = server_ledger
    assert ledger.produce(_production(5)) == 5
    one = Output(DAG, RUN, "produce_one")
    one_consumers = tuple(consumer_slot(DAG, f"c{i}") for i in range(2))
    ledger.produce(Production(Written(one, 1, ONE, one_consumers), [b"only-one"]))

    admin = admin_engine(SERVERS[backend])
    blocker = admin_engine(ledger.engine.url.render_as_string(hide_password=False)).connect()
    outcome: dict[str, Any] = {}

    def claim() -> None:
        try:
            outcome["result"] = ledger.claim(WORKER, [_request()])
        except BaseException as exc:
            outcome["error"] = exc

    try:
        if backend == "postgres":
            blocker.exec_driver_sql("BEGIN")
            blocker.exec_driver_sql("LOCK TABLE exclusive_xcom_item IN ACCESS EXCLUSIVE MODE")
        else:
            blocker.exec_driver_sql("LOCK TABLES exclusive_xcom_item WRITE")
        thread = threading.Thread(target=claim, daemon=True)
        thread.start()
        with admin.connect() as conn:
            waiting = _wait_for(lambda: _blocked_sessions(conn, backend, database), "the claim to block on the lock")
            for session in waiting:
                kill_session(conn, backend, session)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the claim did not return after its connection was killed"
    finally:
        if backend == "postgres":
            blocker.exec_driver_sql("ROLLBACK")
        else:
            blocker.exec_driver_sql("UNLOCK TABLES")
        blocker.close()
        admin.dispose()

    error = outcome.get("error")
    assert isinstance(error, LedgerUnavailableError), f"expected LedgerUnavailableError, got {outcome!r}"
    message = str(error)
    assert message.startswith(f"the claim ledger at {_shown(ledger)} failed: "), message
    if backend == "postgres":  # one autocommitted statement, cut off while it ran: the client cannot tell
        assert "whether it took effect is unknown" in message, message
    else:  # a transaction cut off before its COMMIT: rolled back
        assert NOTHING_DONE in message, message
    assert "consumer='outage_dag/drain'" in message
    assert isinstance(error, ExclusiveXComError)

    # Nothing was claimed; the same pool recovers and everything is still there to take.
    assert ledger.counts() == {"ready": 6}
    got = ledger.claim(WORKER, [_request()]).claims[0]
    assert [text(p) for p in got.payloads] == [f"p-{i}" for i in range(5)]
    ledger.finish(WORKER, got.ids)
    winner = Claimant(DAG, RUN, "c0")
    won = ledger.claim(winner, [ClaimRequest(Written(one, 1, ONE, one_consumers))])
    assert won.lost == [] and won.claims[0].payloads == [b"only-one"]
    ledger.finish(winner, won.ids)
    assert ledger.counts() == {"consumed": 6}


def _blocked_sessions(conn: sa.Connection, kind: str, database: str) -> list[int]:
    """Sessions of ``database`` waiting for a lock (the blocked claim)."""
    if kind == "postgres":
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock'"
        )
    else:
        sql = (
            "SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID() "
            "AND state LIKE 'Waiting for table%'"
        )
    return [row[0] for row in conn.execute(sa.text(sql), {"db": database})]
