"""Real OS processes race for the same ledger items; every item is read exactly once.

Each scenario starts 8 processes with the ``spawn`` start method (nothing is inherited:
every child builds its own engine and connection pool), lines them up on a barrier so
they hit the database together, and then checks two independent accounts of what
happened: the ledger's rows and the workers' own reports.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from exclusive_xcom.errors import AlreadyConsumedError
from exclusive_xcom.ledger import (
    EACH,
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
from tests.integration.conftest import text

pytestmark = pytest.mark.timeout(120)

WORKERS = 8
DAG = "race_dag"
RUN = "manual__race"
GENERATION = 1

ITEM_COUNT = 2000
BATCH = 20
ONE_OUTPUTS = 200
EACH_OUTPUTS = 50

# What a consumer does between claiming and finishing. It lets others in: a process that lost
# an output moves on faster than the winner, catches up and races it for the next one. At
# 2 ms a winner on PostgreSQL (one direct statement per claim and per finish) could stay ahead
# of every loser (each loss is a transaction too) and win all 200 on a loaded machine.
WORK_SECONDS = 0.005

START_TIMEOUT = 30.0  # seconds for all racers to start and meet at the barrier
RACE_DEADLINE = 60.0  # seconds for all racers to report


# -- what the children run (module-level, so ``spawn`` can import them) --------------------


def _drain_items(url: str, index: int, barrier: Any) -> dict[str, Any]:
    """Mapped instance ``drain[index]``: claim batches and finish them until none are left."""
    ledger = Ledger(create_engine(url))
    claimant = Claimant(DAG, RUN, "drain", map_index=index)
    request = ClaimRequest(Written(_items_output(), GENERATION, ITEMS, (consumer_slot(DAG, "drain"),)), limit=BATCH)
    barrier.wait(timeout=START_TIMEOUT)
    started = time.monotonic()
    consumed: list[tuple[int, str]] = []
    batches = 0
    while True:
        result = ledger.claim(claimant, [request])
        assert result.lost == [], result.lost
        (claimed,) = result.claims
        if not claimed.ids:
            break
        batches += 1
        time.sleep(WORK_SECONDS)
        ledger.finish(claimant, claimed.ids)
        consumed.extend((i, text(p)) for i, p in zip(claimed.ids, claimed.payloads, strict=True))
    ledger.engine.dispose()
    return {"consumed": consumed, "batches": batches, "seconds": time.monotonic() - started}


def _compete_for_one(url: str, index: int, barrier: Any) -> dict[str, Any]:
    """Consumer ``c<index>``: try every ``one``-mode output, finish what it wins."""
    ledger = Ledger(create_engine(url))
    claimant = Claimant(DAG, RUN, f"c{index}")
    barrier.wait(timeout=START_TIMEOUT)
    started = time.monotonic()
    won: dict[int, str] = {}
    lost: dict[int, list[str]] = {}
    for n in range(ONE_OUTPUTS):
        result = ledger.claim(claimant, [_one_request(n)])
        if result.lost:
            assert result.claims == [] and result.ids == []
            lost[n] = result.lost
            continue
        (claimed,) = result.claims
        assert len(claimed.ids) == 1, claimed.ids
        time.sleep(WORK_SECONDS)
        ledger.finish(claimant, claimed.ids)
        won[n] = text(claimed.payloads[0])
    ledger.engine.dispose()
    return {"won": won, "lost": lost, "seconds": time.monotonic() - started}


def _read_each(url: str, index: int, barrier: Any) -> dict[str, Any]:
    """Consumer ``c<index>``: read its own copy of every ``each``-mode output, then try again."""
    ledger = Ledger(create_engine(url))
    claimant = Claimant(DAG, RUN, f"c{index}")
    barrier.wait(timeout=START_TIMEOUT)
    started = time.monotonic()
    read: dict[int, str] = {}
    for n in range(EACH_OUTPUTS):
        result = ledger.claim(claimant, [_each_request(n)])
        assert result.lost == [], result.lost
        (claimed,) = result.claims
        assert len(claimed.ids) == 1, claimed.ids
        ledger.finish(claimant, claimed.ids)
        read[n] = text(claimed.payloads[0])
    second: dict[int, str] = {}
    for n in range(EACH_OUTPUTS):
        for again in (claimant, Claimant(DAG, RUN, f"c{index}", try_number=2)):
            try:
                ledger.claim(again, [_each_request(n)])
            except AlreadyConsumedError as exc:
                second[n] = str(exc)
            else:
                raise AssertionError(f"{again} read output {n} a second time")
    ledger.engine.dispose()
    return {"read": read, "second": second, "seconds": time.monotonic() - started}


_TARGETS = {"items": _drain_items, "one": _compete_for_one, "each": _read_each}


def _serve(index: int, inbox: Any, barrier: Any, results: Any) -> None:
    """A racer process: run each (target, url) job from the parent until told to stop.

    The processes are reused across tests (spawning 8 interpreters costs seconds on a
    small machine), but every job builds its own engine, so no connection outlives it.
    """
    while (job := inbox.get()) is not None:
        target, url = job
        try:
            value = _TARGETS[target](url, index, barrier)
            results.put((index, "ok", value))
        except BaseException:
            barrier.abort()  # do not leave the others waiting for a worker that failed
            results.put((index, "error", traceback.format_exc()))


# -- outputs shared by parent and children --------------------------------------------------


def _items_output() -> Output:
    return Output(DAG, RUN, "produce_items")


def _one_output(n: int) -> Output:
    return Output(DAG, RUN, "produce_one", map_index=n)


def _each_output(n: int) -> Output:
    return Output(DAG, RUN, "produce_each", map_index=n)


def _consumers() -> tuple[str, ...]:
    return tuple(consumer_slot(DAG, f"c{i}") for i in range(WORKERS))


def _one_request(n: int) -> ClaimRequest:
    return ClaimRequest(Written(_one_output(n), GENERATION, ONE, _consumers()))


def _each_request(n: int) -> ClaimRequest:
    return ClaimRequest(Written(_each_output(n), GENERATION, EACH, _consumers()))


# -- the parent's side ------------------------------------------------------------------------


class Racers:
    """WORKERS spawned processes that run one job at a time, all of them together."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []

    def _start(self) -> None:
        self.barrier = self.ctx.Barrier(WORKERS)
        self.results = self.ctx.Queue()
        self.inboxes = [self.ctx.Queue() for _ in range(WORKERS)]
        self.procs = [
            self.ctx.Process(
                target=_serve, args=(i, self.inboxes[i], self.barrier, self.results), name=f"racer-{i}", daemon=True
            )
            for i in range(WORKERS)
        ]
        for proc in self.procs:
            proc.start()

    def stop(self) -> None:
        for inbox, proc in zip(getattr(self, "inboxes", []), self.procs, strict=True):
            if proc.is_alive():
                inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self.procs = []

    def run(self, target: str, url: str) -> list[dict[str, Any]]:
        """Run ``target`` in every process at once; their reports, by worker index."""
        if len(self.procs) != WORKERS or not all(proc.is_alive() for proc in self.procs):
            self.stop()
            self._start()
        for inbox in self.inboxes:
            inbox.put((target, url))
        reports: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + RACE_DEADLINE
        while len(reports) + len(errors) < WORKERS and time.monotonic() < deadline:
            try:
                index, status, value = self.results.get(timeout=1.0)
            except queue_module.Empty:
                if not all(proc.is_alive() for proc in self.procs):
                    break  # a racer died without reporting: reported as missing below
                continue
            (reports if status == "ok" else errors)[index] = value
        if errors or len(reports) < WORKERS:
            self.stop()  # a broken barrier or a stuck racer: start afresh for the next test
        assert not errors, "racer(s) failed:\n" + "\n".join(f"--- racer {i}:\n{tb}" for i, tb in errors.items())
        missing = sorted(set(range(WORKERS)) - set(reports))
        assert not missing, f"racer(s) {missing} did not report within {RACE_DEADLINE}s"
        return [reports[i] for i in range(WORKERS)]


@pytest.fixture(scope="module")
def racers() -> Iterator[Racers]:
    pool = Racers()
    try:
        yield pool
    finally:
        pool.stop()


def _ledger(url: str) -> Ledger:
    ledger = Ledger(create_engine(url))
    ledger.migrate()
    return ledger


def test_items_are_drained_by_8_processes_each_item_exactly_once(racers: Racers, ledger_url: str) -> None:
    ledger = _ledger(ledger_url)
    expected = {f"item-{i}" for i in range(ITEM_COUNT)}
    produced = ledger.produce(
        Production(
            Written(_items_output(), GENERATION, ITEMS, (consumer_slot(DAG, "drain"),)),
            [f"item-{i}".encode() for i in range(ITEM_COUNT)],
        )
    )
    assert produced == ITEM_COUNT

    reports = racers.run("items", ledger_url)

    # The workers' account: their consumed items partition the produced set.
    consumed = [pair for report in reports for pair in report["consumed"]]
    ids = Counter(i for i, _ in consumed)
    payloads = Counter(p for _, p in consumed)
    assert [i for i, n in ids.items() if n > 1] == [], "an item id was consumed by more than one worker"
    assert [p for p, n in payloads.items() if n > 1] == [], "a payload was consumed by more than one worker"
    assert set(payloads) == expected
    assert len(consumed) == ITEM_COUNT

    # The ledger's account: every row consumed, once, by the worker that reported it.
    rows = ledger.items(dag_id=DAG)
    assert len(rows) == ITEM_COUNT
    assert ledger.counts() == {"consumed": ITEM_COUNT}
    reporter = {i: w for w, report in enumerate(reports) for i, _ in report["consumed"]}
    assert set(reporter) == {row["id"] for row in rows}
    for row in rows:
        assert (row["state"], row["owner_task_id"], row["owner_try"]) == ("consumed", "drain", 1), row
        assert row["owner_map_index"] == reporter[row["id"]], row
        assert row["consumed_at"] is not None and row["lease_expires_at"] is None, row

    per_worker = [len(report["consumed"]) for report in reports]
    print(
        f"\nitems: {ITEM_COUNT} items over {WORKERS} processes: {per_worker}; "
        f"seconds {[round(r['seconds'], 2) for r in reports]}"
    )
    assert sum(1 for n in per_worker if n) > 1, f"only one worker got work: {per_worker}"


def test_one_mode_outputs_go_to_exactly_one_of_8_competing_processes(racers: Racers, ledger_url: str) -> None:
    ledger = _ledger(ledger_url)
    for n in range(ONE_OUTPUTS):
        ledger.produce(Production(Written(_one_output(n), GENERATION, ONE, _consumers()), [f"one-{n}".encode()]))

    reports = racers.run("one", ledger_url)

    winners: dict[int, list[int]] = {n: [] for n in range(ONE_OUTPUTS)}
    for w, report in enumerate(reports):
        for n, payload in report["won"].items():
            winners[n].append(w)
            assert payload == f"one-{n}"
        # Each worker either won or lost each output; never both, never neither.
        assert set(report["won"]).isdisjoint(report["lost"])
        assert set(report["won"]) | set(report["lost"]) == set(range(ONE_OUTPUTS))
        for n, reasons in report["lost"].items():
            assert len(reasons) == 1 and reasons[0].startswith(f"'produce_one[{n}]' went to "), reasons
    assert {n: len(ws) for n, ws in winners.items() if len(ws) != 1} == {}, "an output had not exactly one reader"
    for n in range(ONE_OUTPUTS):
        assert sum(1 for report in reports if n in report["lost"]) == WORKERS - 1

    rows = ledger.items(dag_id=DAG)
    assert len(rows) == ONE_OUTPUTS
    assert ledger.counts() == {"consumed": ONE_OUTPUTS}
    for row in rows:
        (winner,) = winners[row["map_index"]]
        assert (row["state"], row["slot"], row["owner_task_id"]) == ("consumed", "*", f"c{winner}"), row

    per_worker = [len(report["won"]) for report in reports]
    print(
        f"\none: {ONE_OUTPUTS} outputs won per process: {per_worker}; "
        f"seconds {[round(r['seconds'], 2) for r in reports]}"
    )
    assert sum(1 for n in per_worker if n) > 1, f"one process won everything: {per_worker}"


def test_each_mode_8_processes_read_their_copy_once_then_never_again(racers: Racers, ledger_url: str) -> None:
    ledger = _ledger(ledger_url)
    for n in range(EACH_OUTPUTS):
        ledger.produce(Production(Written(_each_output(n), GENERATION, EACH, _consumers()), [f"each-{n}".encode()]))
    assert ledger.counts() == {"ready": EACH_OUTPUTS * WORKERS}

    reports = racers.run("each", ledger_url)

    for w, report in enumerate(reports):
        assert report["read"] == {n: f"each-{n}" for n in range(EACH_OUTPUTS)}
        assert set(report["second"]) == set(range(EACH_OUTPUTS))
        for n, message in report["second"].items():
            assert message.startswith(f"already consumed by {DAG}/{RUN}/c{w} try 1 at "), message
            assert f"producer='produce_each[{n}]'" in message and f"consumer='{DAG}/c{w}'" in message, message

    rows = ledger.items(dag_id=DAG)
    assert len(rows) == EACH_OUTPUTS * WORKERS
    assert ledger.counts() == {"consumed": EACH_OUTPUTS * WORKERS}
    for row in rows:
        assert row["slot"] == f"{DAG}/{row['owner_task_id']}" and row["owner_try"] == 1, row
    print(f"\neach: {EACH_OUTPUTS} outputs x {WORKERS} consumers; seconds {[round(r['seconds'], 2) for r in reports]}")
