"""Fault injection: killed and frozen workers, dropped connections, producers that die half-way,
two tries of one task instance at once, and real restarts and crashes of a PostgreSQL server
of the tests' own (``tests.support.PrivatePostgres``: ``initdb`` on a free port, removed
afterwards; the shared server is never restarted). Nothing is lost, nothing is read twice.

Every process here is a real OS process started with ``spawn`` (its own interpreter, engine
and connection pool; see ``_workers.py``), killed with real signals. After each scenario two
independent accounts are checked: the ledger's final rows (every item consumed exactly once,
or still claimable) and what the surviving workers report they consumed (no duplicates,
nothing missing). Each test prints one ``[faults]`` line with item counts and wall time
(``pytest -rP`` shows them).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom.config import Settings
from exclusive_xcom.crypto import keyring_from
from exclusive_xcom.errors import LedgerUnavailableError
from exclusive_xcom.handle import Handle
from exclusive_xcom.ledger import ITEMS, Claimant, Ledger, Output, Production, Written, create_engine
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY, item
from exclusive_xcom.payload import Codec
from exclusive_xcom.runtime import Session
from exclusive_xcom.wiring import Env
from tests.integration.conftest import kill_session, server_sessions
from tests.support import SERVERS, PrivatePostgres, admin_engine, create_database

from . import _workers as w

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("spawn")
LEASE = 1.5  # seconds: short, so a dead worker's claims come free within the test
JOIN = 15.0  # seconds to wait for any child to report or exit
SERVER_BACKENDS = ["postgres", "mysql"]


# -- plumbing ---------------------------------------------------------------------------------


class Child:
    """A spawned process with its own report queue; killed on exit if still alive."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.out = CTX.Queue()
        self.args = args  # keeps Events alive until the child has unpickled them
        self.proc = CTX.Process(target=target, args=(*args, self.out), daemon=True)
        self.proc.start()

    def expect(self, event: str, timeout: float = JOIN) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                report = self.out.get(timeout=0.2)
                break
            except queue_module.Empty:
                if not self.proc.is_alive() and self.out.empty():
                    raise AssertionError(
                        f"{self.proc.name} died (exit {self.proc.exitcode}) before {event!r}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.proc.name} sent no {event!r} within {timeout}s") from None
        assert report["event"] != "error", f"{self.proc.name} failed:\n{report['traceback']}"
        assert report["event"] == event, report
        return report

    @property
    def pid(self) -> int:
        pid = self.proc.pid
        assert pid is not None, f"{self.proc.name} was never started"  # started in __init__
        return pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> int | None:
        self.signal(signal.SIGKILL)
        self.proc.join(timeout=JOIN)
        return self.proc.exitcode

    def stop(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGCONT)  # a frozen child cannot even die of SIGTERM
            self.proc.join(timeout=JOIN)
        if self.proc.is_alive():
            self.kill()


class Children:
    def __init__(self) -> None:
        self.all: list[Child] = []

    def start(self, target: Callable[..., None], *args: Any) -> Child:
        child = Child(target, *args)
        self.all.append(child)
        return child


@pytest.fixture
def children() -> Iterator[Children]:
    pool = Children()
    try:
        yield pool
    finally:
        for child in pool.all:
            child.stop()


@pytest.fixture
def lease_seconds() -> float:
    return LEASE


@pytest.fixture
def clock() -> Callable[[], float]:
    """Real time: the workers are other processes, whose ledgers read this machine's clock."""
    return time.time


def _produce(ledger: Ledger, n: int, output: Output = w.POOL, generation: int = 1) -> list[str]:
    payloads = [f"item-{i}" for i in range(n)]
    assert ledger.produce(Production(Written(output, generation, ITEMS, w.SLOTS), [p.encode() for p in payloads])) == n
    return payloads


def _rows(ledger: Ledger) -> dict[int, dict[str, Any]]:
    """Every row of the ledger, without payloads, by id."""
    return {r["id"]: r for r in ledger.items()}


def _claim_state(rows: dict[int, dict[str, Any]]) -> dict[int, tuple[Any, ...]]:
    return {
        i: (r["state"], r["owner_task_id"], r["owner_map_index"], r["owner_try"], r["lease_expires_at"])
        for i, r in rows.items()
    }


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _wait_for_expiry(rows: list[dict[str, Any]]) -> None:
    """Sleep until every given row's lease has run out (the ledger's clock is this machine's)."""
    latest = max(r["lease_expires_at"] for r in rows)
    time.sleep(max(0.0, (latest - _utcnow()).total_seconds()) + 0.1)


def _drain(ledger: Ledger, me: Claimant, batch: int = 50) -> dict[int, str]:
    got: dict[int, str] = {}
    while (claimed := ledger.claim(me, [w.request(batch)]).claims[0]).ids:
        ledger.finish(me, claimed.ids)
        got.update(zip(claimed.ids, (w.text(p) for p in claimed.payloads), strict=True))
    return got


def _assert_exactly_once(ledger: Ledger, reported: list[tuple[int, str]], expected: list[str]) -> None:
    """Workers' reports partition the produced items, and the ledger agrees: all consumed."""
    ids = Counter(i for i, _ in reported)
    payloads = Counter(p for _, p in reported)
    assert [i for i, n in ids.items() if n > 1] == [], "an item was consumed twice"
    assert [p for p, n in payloads.items() if n > 1] == [], "a payload was consumed twice"
    assert sorted(payloads) == sorted(expected), "an item was lost"
    rows = _rows(ledger)
    assert set(ids) == set(rows)
    assert ledger.counts() == {CONSUMED: len(expected)}


def _report(name: str, backend: str, seconds: float, **counts: Any) -> None:
    details = " ".join(f"{k}={v}" for k, v in counts.items())
    print(f"\n[faults] {name} [{backend}] {details} wall={seconds:.2f}s")


# -- 1. a consumer process dies (SIGKILL) or freezes (SIGSTOP) holding its claims -----------------

KILLED_POOL = 100
KILLED_HELD = 30


@pytest.mark.parametrize("after", ["retry", "takeover"])
def test_a_consumer_killed_holding_claims_loses_nothing(
    after: str, backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    started = time.monotonic()
    expected = _produce(ledger, KILLED_POOL)
    never = CTX.Event()
    victim = children.start(w.hold_claims, ledger_url, 0, 1, KILLED_HELD, LEASE, never)
    held = victim.expect("holding")
    assert held["payloads"] == expected[:KILLED_HELD]
    assert victim.kill() == -signal.SIGKILL

    rows = _rows(ledger)
    dead = [rows[i] for i in held["ids"]]
    assert {(r["state"], r["owner_map_index"], r["owner_try"]) for r in dead} == {(CLAIMED, 0, 1)}
    assert ledger.counts() == {CLAIMED: KILLED_HELD, READY: KILLED_POOL - KILLED_HELD}

    reported: list[tuple[int, str]] = []
    extra: dict[str, Any] = {}
    if after == "retry":
        # The dead task's retry: same task instance, next try; it gets its own items back.
        _wait_for_expiry(dead)
        retry = w.claimant(0, 2)
        ledger.enter(retry)
        back = ledger.claim(retry, [w.request(KILLED_HELD)]).claims[0]
        assert sorted(back.ids) == sorted(held["ids"])
        ledger.finish(retry, back.ids)
        reported += zip(back.ids, (w.text(p) for p in back.payloads), strict=True)
        reported += _drain(ledger, retry).items()
        consumer = (0, 2)
    else:
        # Another consumer cannot take them while the lease lives, and takes them after.
        rival = w.claimant(1, 1)
        early = _utcnow() < min(r["lease_expires_at"] for r in dead)
        rest = _drain(ledger, rival)
        if early:
            assert set(rest).isdisjoint(held["ids"]), "a live lease was taken over"
        assert len(rest) == KILLED_POOL - KILLED_HELD
        reported += rest.items()
        _wait_for_expiry(dead)
        taken = _drain(ledger, rival)
        assert sorted(taken) == sorted(held["ids"])
        reported += taken.items()
        consumer = (1, 1)
        extra["live_lease_checked"] = early

    _assert_exactly_once(ledger, reported, expected)
    for row in _rows(ledger).values():
        assert (row["owner_map_index"], row["owner_try"]) == consumer, row
    _report(
        f"killed consumer, then {after}",
        backend,
        time.monotonic() - started,
        items=KILLED_POOL,
        held_when_killed=KILLED_HELD,
        **extra,
    )


ZOMBIE_POOL = 40
ZOMBIE_HELD = 20


def test_a_frozen_try_resumes_as_a_zombie_and_changes_nothing(
    backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    started = time.monotonic()
    expected = _produce(ledger, ZOMBIE_POOL)
    go = CTX.Event()
    zombie = children.start(w.hold_claims, ledger_url, 0, 1, ZOMBIE_HELD, LEASE, go)
    held = zombie.expect("holding")
    assert held["payloads"] == expected[:ZOMBIE_HELD]
    zombie.signal(signal.SIGSTOP)  # paused: no heartbeat, no finish, nothing

    # Try 2 of the same task instance begins, takes the items back, consumes half of them
    # and still holds the other half when the zombie wakes up.
    fresh = w.claimant(0, 2)
    ledger.enter(fresh)
    first = ledger.claim(fresh, [w.request(ZOMBIE_HELD // 2)]).claims[0]
    ledger.finish(fresh, first.ids)
    second = ledger.claim(fresh, [w.request(ZOMBIE_HELD // 2)]).claims[0]
    assert sorted(first.ids + second.ids) == sorted(held["ids"])
    before = _claim_state(_rows(ledger))

    zombie.signal(signal.SIGCONT)  # thawed, it is still waiting for `go` (an Event cannot wake a stopped waiter)
    go.set()
    late = zombie.expect("zombie")
    zombie.proc.join(timeout=JOIN)

    assert late["finish"][0] == "ClaimConflictError", late["finish"]
    assert "nothing was consumed" in late["finish"][1] or "fenced" in late["finish"][1], late["finish"]
    assert late["finish_with_output"][0] == "ClaimConflictError", late["finish_with_output"]
    assert late["release"] == ("ok", 0), "the zombie released what try 2 holds"
    assert late["extend_lease"] == ("ok", False)
    assert late["claim"][0] == "ClaimConflictError" and "fenced" in late["claim"][1], late["claim"]
    assert _claim_state(_rows(ledger)) == before, "the zombie changed the ledger"

    ledger.finish(fresh, second.ids)
    reported = list(zip(first.ids, (w.text(p) for p in first.payloads), strict=True))
    reported += zip(second.ids, (w.text(p) for p in second.payloads), strict=True)
    reported += _drain(ledger, fresh).items()
    _assert_exactly_once(ledger, reported, expected)
    assert {(r["owner_map_index"], r["owner_try"]) for r in _rows(ledger).values()} == {(0, 2)}
    _report(
        "frozen try 1 resumes after try 2",
        backend,
        time.monotonic() - started,
        items=ZOMBIE_POOL,
        zombie_held=ZOMBIE_HELD,
    )


# -- 2. the database drops every connection of the ledger, again and again ---------------------------

OUTAGE_POOL = 1000
OUTAGE_WORKERS = 4
OUTAGE_BATCH = 10
OUTAGE_LEASE = 3.0


class Killer(threading.Thread):
    """Kills every connection to ``database`` every 30-120 ms until stopped."""

    def __init__(self, kind: str, database: str) -> None:
        super().__init__(name="ledger-killer", daemon=True)
        self.kind, self.database = kind, database
        self.halt = threading.Event()
        self.rounds = self.killed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        engine = admin_engine(SERVERS[self.kind])
        rng = random.Random(7)
        try:
            with engine.connect() as conn:
                while not self.halt.wait(rng.uniform(0.03, 0.12)):
                    self.killed += sum(
                        kill_session(conn, self.kind, x) for x in server_sessions(conn, self.kind, self.database)
                    )
                    self.rounds += 1
        except BaseException as exc:
            self.error = exc
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_connections_killed_over_and_over_while_workers_drain(
    backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    started = time.monotonic()
    expected = _produce(ledger, OUTAGE_POOL)
    database = sa.make_url(ledger_url).database or ""
    start = CTX.Event()
    workers = [
        children.start(w.drain_through_outages, ledger_url, i, OUTAGE_BATCH, OUTAGE_LEASE, start)
        for i in range(OUTAGE_WORKERS)
    ]
    killer = Killer(backend, database)
    killer.start()
    start.set()
    try:
        reports = [worker.expect("done", timeout=90) for worker in workers]
    finally:
        killer.halt.set()
        killer.join(timeout=JOIN)
    assert killer.error is None, f"the killer failed: {killer.error!r}"
    ledger.engine.dispose()  # the killer cut this process's idle connections too

    unavailable = sum(r["unavailable"] for r in reports)
    assert killer.killed > 0 and unavailable > 0, "the outages never hit a worker: the test proved nothing"
    reported = [(i, p) for r in reports for i, p, _ in r["consumed"]]
    _assert_exactly_once(ledger, reported, expected)
    who = {i: (n, t) for n, r in enumerate(reports) for i, _, t in r["consumed"]}
    for row in _rows(ledger).values():
        assert (row["owner_map_index"], row["owner_try"]) == who[row["id"]], row
    ambiguous = [m for r in reports for m in r.get("ambiguous_errors", [])]
    if ambiguous:
        print(f"\n[faults] a finish reported as failed had committed; its error said: {ambiguous[0]}")
    _report(
        "connections killed during the drain",
        backend,
        time.monotonic() - started,
        items=OUTAGE_POOL,
        workers=OUTAGE_WORKERS,
        kill_rounds=killer.rounds,
        sessions_killed=killer.killed,
        unavailable_errors=unavailable,
        ambiguous_commits=sum(r["ambiguous_commits"] for r in reports),
        taken_over=sum(r["taken_over"] for r in reports),
        tries=[r["tries"] for r in reports],
        per_worker=[len(r["consumed"]) for r in reports],
    )


# -- 3. a producer fails or dies half-way through writing its items ---------------------------------

FAILING_TOTAL = 5000
FAILING_AT = 2500
KILLED_TOTAL = 200_000
KILLED_AT = 50_000  # a quarter of the way: mid-write, and quicker on a busy machine


class ProducerCrashed(Exception):
    pass


def _crashing(total: int, fail_at: int, seen: list[int]) -> Iterator[bytes]:
    for n in range(total):
        if n == fail_at:
            raise ProducerCrashed(f"crashed after {n} items")
        seen[0] = n + 1
        yield f"half-{n}".encode()


def _rows_of(ledger: Ledger, output: Output) -> list[dict[str, Any]]:
    return [r for r in ledger.items() if r["output_id"] == output.output_id]


def test_a_producer_that_raises_half_way_writes_nothing(backend: str, ledger: Ledger) -> None:
    started = time.monotonic()
    # A fresh output: the error propagates as it is, and not one item is visible.
    fresh = Output(w.DAG, w.RUN, "produce_fresh")
    seen = [0]
    with pytest.raises(ProducerCrashed, match=f"crashed after {FAILING_AT} items"):
        ledger.produce(Production(Written(fresh, 1, ITEMS, w.SLOTS), _crashing(FAILING_TOTAL, FAILING_AT, seen)))
    assert seen == [FAILING_AT], "the generator did not get half-way"
    assert _rows_of(ledger, fresh) == []

    # A re-run of a producer whose earlier items are partly consumed: the failed re-run must
    # neither replace nor add anything (the delete of the old items rolls back with it).
    expected = _produce(ledger, 10)
    early = _drain_n(ledger, w.claimant(0, 1), 3)
    before = _claim_state(_rows(ledger))
    with pytest.raises(ProducerCrashed):
        ledger.produce(Production(Written(w.POOL, 2, ITEMS, w.SLOTS), _crashing(FAILING_TOTAL, FAILING_AT, [0])))
    assert _claim_state(_rows(ledger)) == before
    assert ledger.counts() == {CONSUMED: 3, READY: 7}
    rest = _drain(ledger, w.claimant(1, 1))
    _assert_exactly_once(ledger, [*early.items(), *rest.items()], expected)
    _report(
        "producer raises half-way",
        backend,
        time.monotonic() - started,
        total=FAILING_TOTAL,
        raised_at=FAILING_AT,
        visible=0,
    )


def _drain_n(ledger: Ledger, me: Claimant, n: int) -> dict[int, str]:
    claimed = ledger.claim(me, [w.request(n)]).claims[0]
    ledger.finish(me, claimed.ids)
    return dict(zip(claimed.ids, (w.text(p) for p in claimed.payloads), strict=True))


def test_a_producer_killed_mid_write_leaves_no_partial_output(
    backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    started = time.monotonic()
    reached = CTX.Event()
    producer = children.start(w.produce_then_die, ledger_url, KILLED_TOTAL, KILLED_AT, reached)
    assert reached.wait(timeout=60), "the producer never got that far"
    reached_after = time.monotonic() - started
    assert producer.kill() == -signal.SIGKILL
    assert producer.out.empty(), "the producer finished before it was killed: the test proved nothing"

    def visible() -> int:
        with ledger.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(item)).scalar_one()

    # Nothing is visible at once, while the server may still be rolling the write back ...
    assert visible() == 0
    rollback_started = time.monotonic()
    if backend != "sqlite":
        database = sa.make_url(ledger_url).database or ""
        admin = admin_engine(SERVERS[backend])
        with admin.connect() as conn:
            deadline = time.monotonic() + 30
            while server_sessions(conn, backend, database) and time.monotonic() < deadline:
                ledger.engine.dispose()  # our own idle pool is not the dead producer
                time.sleep(0.1)
            assert not server_sessions(conn, backend, database), "the dead producer's session never went away"
        admin.dispose()
    # ... nor once it is gone.
    assert visible() == 0
    rollback_seconds = time.monotonic() - rollback_started

    # The table is not left locked or broken: the producer's retry writes and is drained.
    expected = _produce(ledger, 10)
    _assert_exactly_once(ledger, list(_drain(ledger, w.claimant(0, 1)).items()), expected)
    _report(
        "producer SIGKILLed mid-write",
        backend,
        time.monotonic() - started,
        total=KILLED_TOTAL,
        killed_after=KILLED_AT,
        visible=0,
        reached_kill_point_after=f"{reached_after:.2f}s",
        server_session_gone_after=f"{rollback_seconds:.2f}s",
    )


# -- 4. two tries of one task instance drain the same pool at once ----------------------------------

TWO_TRIES_POOL = 600
TWO_TRIES_BATCH = 10
TWO_TRIES_WORK = 0.005
_two_tries: dict[str, dict[str, Any]] = {}


def _run_two_tries(backend: str, ledger_url: str, ledger: Ledger, children: Children) -> dict[str, Any]:
    """Run the scenario once per backend; both tests below judge the same run."""
    if backend in _two_tries:
        return _two_tries[backend]
    started = time.monotonic()
    expected = _produce(ledger, TWO_TRIES_POOL)
    events = {name: CTX.Event() for name in ("t1_running", "t2_claimed", "t2_done")}
    args = (TWO_TRIES_BATCH, LEASE, TWO_TRIES_WORK)
    zombie = children.start(w.drain_as_try, ledger_url, 1, *args, events)
    fresh = children.start(w.drain_as_try, ledger_url, 2, *args, events)
    reports = {2: fresh.expect("done", timeout=90), 1: zombie.expect("done", timeout=JOIN)}
    run = {
        "expected": expected,
        "reports": reports,
        "rows": _rows(ledger),
        "counts": ledger.counts(),
        "seconds": time.monotonic() - started,
    }
    _two_tries[backend] = run
    return run


def test_two_tries_at_once_consume_each_item_once(
    backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    run = _run_two_tries(backend, ledger_url, ledger, children)
    zombie, fresh = run["reports"][1], run["reports"][2]
    reported = zombie["consumed"] + fresh["consumed"]

    ids = Counter(i for i, _ in reported)
    assert [i for i, n in ids.items() if n > 1] == [], "an item was consumed twice"
    assert sorted(p for _, p in reported) == sorted(run["expected"]), "an item was lost or doubled"
    assert run["counts"] == {CONSUMED: TWO_TRIES_POOL}
    assert set(ids) == set(run["rows"])
    owner = {i: 1 for i, _ in zombie["consumed"]} | {i: 2 for i, _ in fresh["consumed"]}
    for row in run["rows"].values():
        assert (row["owner_map_index"], row["owner_try"]) == (0, owner[row["id"]]), row
    # Try 1 consumed nothing that try 2 ever held.
    assert set(fresh["claimed_ids"]) <= {i for i, _ in fresh["consumed"]}
    assert set(fresh["claimed_ids"]).isdisjoint(i for i, _ in zombie["consumed"])
    # The tries really overlapped: both consumed, and try 1 kept going after try 2 began.
    assert zombie["consumed"] and fresh["consumed"]
    assert any(op["after_fence"] for op in zombie["ops"]), "try 1 made no call after try 2's first claim"

    after = [op for op in zombie["ops"] if op["after_fence"]]
    _report(
        "two tries at once",
        backend,
        run["seconds"],
        items=TWO_TRIES_POOL,
        try1_consumed=len(zombie["consumed"]),
        try2_consumed=len(fresh["consumed"]),
        try1_calls_after_fence=len(after),
        try1_outcomes_after_fence=dict(Counter(_kind(op) for op in after)),
    )


def _kind(op: dict[str, Any]) -> str:
    """``claim:ok-rows``, ``claim:ok-empty``, ``finish:ClaimConflictError``, ..."""
    status, value = op["outcome"]
    if status == "ok" and op["op"] == "claim":
        status += "-rows" if value else "-empty"
    elif status == "ClaimConflictError" and "fenced" not in value:
        status += "(not fenced)"
    return f"{op['op']}:{status}"


def test_two_tries_at_once_the_older_is_fenced_out_after_the_newer_claims(
    backend: str, ledger_url: str, ledger: Ledger, children: Children
) -> None:
    run = _run_two_tries(backend, ledger_url, ledger, children)
    after = [op for op in run["reports"][1]["ops"] if op["after_fence"]]
    assert after, "try 1 made no call after try 2's first claim"
    not_fenced = [op for op in after if not (op["outcome"][0] == "ClaimConflictError" and "fenced" in op["outcome"][1])]
    assert not_fenced == [], (
        f"{len(not_fenced)} of try 1's {len(after)} calls after try 2's first claim were not fenced out: "
        f"{dict(Counter(_kind(op) for op in not_fenced))}; "
        f"first: {not_fenced[0]}"
    )


def test_a_finish_whose_commit_acknowledgement_is_lost_is_recognised_as_done(ledger: Ledger) -> None:
    """The server commits, then the connection drops before the client hears so: finish()
    must look again instead of reporting a failure that did not happen."""
    _produce(ledger, 3)
    me = Claimant(w.DAG, w.RUN, "drain", 0, 1)
    ledger.enter(me)
    held = ledger.claim(me, [w.request(limit=10)]).ids
    dialect = ledger.engine.dialect
    commit = dialect.do_commit
    lost: list[bool] = []

    def lose_the_ack_once() -> None:
        if not lost:
            lost.append(True)
            raise dialect.loaded_dbapi.OperationalError("connection lost before the commit was acknowledged")

    def commit_then_lose_the_ack_once(dbapi_connection: sa.PoolProxiedConnection) -> None:
        commit(dbapi_connection)
        lose_the_ack_once()

    dialect.do_commit = commit_then_lose_the_ack_once  # type: ignore[method-assign]
    try:
        with _after_direct_statements(ledger, lose_the_ack_once):
            ledger.finish(me, held)  # no error: the items are consumed by this very try
    finally:
        dialect.do_commit = commit  # type: ignore[method-assign]
    assert lost, "the fault was not injected"
    assert ledger.counts() == {CONSUMED: 3}


@contextmanager
def _after_direct_statements(ledger: Ledger, fault: Callable[[], None]) -> Iterator[None]:
    """Call ``fault`` after each statement PostgreSQL's ledger sends on its pinned connection
    (its one-statement claim and consume, :mod:`exclusive_xcom.ledger.direct`) has run: such
    a statement has committed by then. Its driver error reaches the ledger as the pinned
    connection raises it: wrapped in SQLAlchemy's error, naming the statement it sent."""
    direct = ledger._direct
    if direct is None:
        yield
        return
    send, dbapi = direct.send, ledger.engine.dialect.loaded_dbapi

    def sent_then_fault(bound: Any) -> Any:
        result = send(bound)
        try:
            fault()
        except dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(str(bound.statement), None, exc, dbapi.Error) from exc
        return result

    direct.send = sent_then_fault  # type: ignore[method-assign]
    try:
        yield
    finally:
        del direct.send


@contextmanager
def _ack_and_server_lost(ledger: Ledger) -> Iterator[list[bool]]:
    """The next commit reaches the server, then the connection drops and no new one can be made."""
    dialect, engine = ledger.engine.dialect, ledger.engine
    commit = dialect.do_commit
    committed: list[bool] = []

    def vanish() -> None:
        committed.append(True)
        sa.event.listen(engine, "checkout", gone)
        sa.event.listen(engine, "do_connect", refuse)
        raise dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly")

    def gone(*_: Any) -> None:  # every pooled connection is dead: the pool connects anew ...
        raise sa.exc.DisconnectionError("the server went away")

    def refuse(*_: Any) -> None:  # ... and cannot
        raise dialect.loaded_dbapi.OperationalError("connection refused")

    def commit_then_vanish(dbapi_connection: sa.PoolProxiedConnection) -> None:
        commit(dbapi_connection)
        if not committed:
            vanish()

    def autocommitted_then_vanish() -> None:
        if not committed:
            vanish()

    dialect.do_commit = commit_then_vanish  # type: ignore[method-assign]
    try:
        with _after_direct_statements(ledger, autocommitted_then_vanish):
            yield committed
    finally:
        dialect.do_commit = commit  # type: ignore[method-assign]
        for name, listener in (("checkout", gone), ("do_connect", refuse)):
            if sa.event.contains(engine, name, listener):
                sa.event.remove(engine, name, listener)


def test_a_finish_whose_outcome_cannot_be_checked_says_what_is_known(ledger: Ledger) -> None:
    """A consumer's finish commits, the reply is lost and the server stays away: the error says
    the outcome is unknown and what the retry will find, never that nothing changed."""
    _produce(ledger, 3)
    me = Claimant(w.DAG, w.RUN, "drain", 0, 1)
    ledger.enter(me)
    held = ledger.claim(me, [w.request(limit=10)]).ids
    with _ack_and_server_lost(ledger) as committed, pytest.raises(LedgerUnavailableError) as info:
        ledger.finish(me, held)
    assert committed, "the fault was not injected"
    message = str(info.value)
    assert "whether this finish committed is unknown, as the ledger stayed unreachable" in message, message
    assert "if it did, its retry finds it done and succeeds without running again" in message, message
    assert "if not, this try still holds its inputs and its retry takes them back first" in message, message
    assert "changed nothing" not in message and "written" not in message, message
    assert ledger.counts() == {CONSUMED: 3}, "it had committed after all"


def test_a_producer_finish_of_unknown_outcome_says_what_a_retry_does(ledger: Ledger) -> None:
    me = Claimant(w.DAG, w.RUN, "enqueue", -1, 1)
    ledger.enter(me)
    out = Production(Written(Output(w.DAG, w.RUN, "enqueue"), 1, ITEMS, w.SLOTS), [b"a", b"b"])
    with _ack_and_server_lost(ledger) as committed, pytest.raises(LedgerUnavailableError) as info:
        ledger.finish(me, [], [out])
    assert committed, "the fault was not injected"
    message = str(info.value)
    assert "whether this output was written is unknown, as the ledger stayed unreachable" in message, message
    assert "a retry writes it again" in message and "held by" not in message, message
    assert ledger.counts() == {READY: 2}


def test_a_claim_of_unknown_outcome_says_the_try_may_hold_its_items(ledger: Ledger, ledger_url: str) -> None:
    """The claim reaches the server, the reply does not, the server stays away: the task's
    error cannot say "nothing was claimed"; it says what the try may hold and what becomes of it."""
    _produce(ledger, 5)
    keys = keyring_from("k1", "")
    session = Session(w.claimant(0, 1), Env(Settings(ledger_url), ledger, keys, Codec(keys, 1 << 20)))
    ledger.enter(session.claimant)
    handle = Handle(w.POOL, 1, ITEMS, w.SLOTS).to_xcom(keys)
    with _ack_and_server_lost(ledger) as committed, pytest.raises(LedgerUnavailableError) as info:
        session.claim([handle], batch_size=10, max_items=None)
    assert committed, "the fault was not injected"
    message = str(info.value)
    assert "whether it took effect is unknown" in message, message
    assert (
        "this try holds no items (and the items of the claim that failed, if it took effect): "
        "its retry takes them back first; if it fails for good, they are released [dag="
    ) in message, message
    assert info.value.maybe_committed and isinstance(info.value.__cause__, sa.exc.DBAPIError)


# -- 5. real restarts and crashes of a server of the tests' own -----------------------------------

RESTART_POOL = 20_000
RESTART_BATCH = 25
RESTARTS = 8  # alternately clean (-m fast) and crashed (-m immediate, WAL recovery)


def _bounce(server: PrivatePostgres, n: int) -> str:
    """Restart ``server`` cleanly on even ``n``, crash it on odd ``n``; which it was."""
    if n % 2:
        server.crash()
        return "crash"
    server.restart()
    return "restart"


def _count(url: str, where: str = "1 = 1") -> int:
    """Rows of the item table, read through a connection of its own (the server may have restarted)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM exclusive_xcom_item WHERE {where}")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres  # a server of its own, not the shared one
def test_real_restarts_and_crashes_while_workers_drain(private_pg: PrivatePostgres, children: Children) -> None:
    started = time.monotonic()
    url = create_database(private_pg.url)
    ledger = Ledger(create_engine(url), lease_seconds=OUTAGE_LEASE)
    ledger.migrate()
    expected = _produce(ledger, RESTART_POOL)
    ledger.engine.dispose()
    start = CTX.Event()
    workers = [
        children.start(w.drain_through_outages, url, i, RESTART_BATCH, OUTAGE_LEASE, start)
        for i in range(OUTAGE_WORKERS)
    ]
    start.set()
    bounced: list[tuple[str, int]] = []  # (how, items still unconsumed just before): all mid-drain
    rng = random.Random(11)
    while len(bounced) < RESTARTS and (left := _count(url, "state <> 'consumed'")):
        time.sleep(rng.uniform(0.2, 0.6))
        bounced.append((_bounce(private_pg, len(bounced)), left))
    reports = [worker.expect("done", timeout=120) for worker in workers]

    unavailable = sum(r["unavailable"] for r in reports)
    assert len(bounced) >= 2 and unavailable > 0, f"the restarts never hit the drain: {bounced}"
    reported = [(i, p) for r in reports for i, p, _ in r["consumed"]]
    _assert_exactly_once(ledger, reported, expected)  # every item once; nothing left claimed or ready
    ledger.engine.dispose()
    _report(
        "server restarted and crashed during the drain",
        "private postgres",
        time.monotonic() - started,
        items=RESTART_POOL,
        workers=OUTAGE_WORKERS,
        restarts=sum(how == "restart" for how, _ in bounced),
        crashes=sum(how == "crash" for how, _ in bounced),
        unavailable_errors=unavailable,
        ambiguous_commits=sum(r["ambiguous_commits"] for r in reports),
        tries=[r["tries"] for r in reports],
        per_worker=[len(r["consumed"]) for r in reports],
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_a_producer_cut_off_by_a_restart_or_a_crash_writes_nothing(
    private_pg: PrivatePostgres, children: Children
) -> None:
    url = create_database(private_pg.url)
    ledger = Ledger(create_engine(url))
    ledger.migrate()
    ledger.engine.dispose()
    for n in range(2):  # a clean restart, then a crash
        reached = CTX.Event()
        producer = children.start(w.produce_then_die, url, KILLED_TOTAL, KILLED_AT, reached)
        assert reached.wait(timeout=60), "the producer never got that far"
        how = _bounce(private_pg, n)
        report = producer.expect("unavailable", timeout=60)
        assert "the claim ledger at" in report["error"], report
        assert _count(url) == 0, f"a producer cut off by a {how} left part of its output"
    expected = _produce(ledger, 10)  # the table is not left broken: the producer's retry writes, and is drained
    _assert_exactly_once(ledger, list(_drain(ledger, w.claimant(0, 1)).items()), expected)
    ledger.engine.dispose()
