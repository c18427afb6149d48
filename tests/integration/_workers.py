"""What the processes of ``test_faults.py`` run: importable, so ``spawn`` children find them.

Every function builds its own engine (nothing is inherited from the parent) and reports
through its own queue, its last argument, so a child killed with SIGKILL cannot corrupt another's channel.
Reports are plain dicts of ids, payloads (decoded) and outcome strings.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.errors import ClaimConflictError, LedgerUnavailableError
from exclusive_xcom.ledger import (
    ITEMS,
    Claimant,
    ClaimRequest,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    create_engine,
)
from exclusive_xcom.ledger.schema import CONSUMED, item
from tests.integration.conftest import text

DAG, RUN = "faults_dag", "manual__faults"
CONSUMER_TASK = "drain"
POOL = Output(DAG, RUN, "produce")
SLOTS = (consumer_slot(DAG, CONSUMER_TASK),)
WAIT = 60.0  # the longest any child waits for its parent before giving up on its own


def request(limit: int) -> ClaimRequest:
    return ClaimRequest(Written(POOL, 1, ITEMS, SLOTS), limit=limit)


def claimant(map_index: int = 0, try_number: int = 1) -> Claimant:
    return Claimant(DAG, RUN, CONSUMER_TASK, map_index, try_number)


def _guarded(out: Any, body: Any) -> None:
    try:
        body()
    except BaseException:
        out.put({"event": "error", "traceback": traceback.format_exc()})


# -- 1. a consumer that holds claims, then is killed or frozen -----------------------------------


def hold_claims(url: str, map_index: int, try_number: int, limit: int, lease: float, go: Any, out: Any) -> None:
    """Claim one batch as ``drain[map_index]`` try ``try_number``, report it, then wait.

    The parent either SIGKILLs this process while it waits (a worker that died holding its
    claims), or freezes it, lets a newer try take over, and sets ``go``: then this process
    is the zombie and reports what its late finish, release, lease renewal and claim did.
    """

    def body() -> None:
        ledger = Ledger(create_engine(url), lease_seconds=lease)
        me = claimant(map_index, try_number)
        ledger.enter(me)
        result = ledger.claim(me, [request(limit)])
        (claimed,) = result.claims
        ids = list(claimed.ids)
        out.put({"event": "holding", "ids": ids, "payloads": [text(p) for p in claimed.payloads]})
        if not go.wait(timeout=WAIT):
            out.put({"event": "error", "traceback": "never told to go on"})
            return
        report: dict[str, Any] = {"event": "zombie"}
        report["finish"] = _outcome(lambda: ledger.finish(me, ids))
        late = Production(Written(Output(DAG, RUN, CONSUMER_TASK), try_number, ITEMS, ("x/y",)), [b"late"])
        report["finish_with_output"] = _outcome(lambda: ledger.finish(me, ids, [late]))
        report["release"] = _outcome(lambda: ledger.release(me, ids))
        report["extend_lease"] = _outcome(lambda: ledger.extend_lease(me, ids))
        report["claim"] = _outcome(lambda: ledger.claim(me, [request(limit)]).ids)
        ledger.engine.dispose()
        out.put(report)

    _guarded(out, body)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except ClaimConflictError as exc:
        return ("ClaimConflictError", str(exc))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


# -- 2. workers draining a pool while the database drops their connections ------------------------


def drain_through_outages(url: str, map_index: int, batch: int, lease: float, start: Any, out: Any) -> None:
    """``drain[map_index]`` drains the pool like a retrying task whose database keeps failing.

    * a failed claim (LedgerUnavailableError) is a failed try: the next try (try_number+1)
      enters and claims again, and takes back whatever the failed claim may have committed;
    * a failed finish is retried with the same ids and try; if the retry finds the rows no
      longer held, the ledger tells whether the first attempt committed after all (the
      rows are consumed by this very try) or another claimant took them over;
    * an empty claim ends the drain only once the ledger has no unconsumed row left.
    """

    def body() -> None:
        ledger = Ledger(create_engine(url), lease_seconds=lease)
        stats: dict[str, Any] = {"unavailable": 0, "ambiguous_commits": 0, "taken_over": 0, "tries": 1, "batches": 0}
        consumed: list[tuple[int, str, int]] = []  # (id, payload, the try that consumed it)
        try_number = 1
        _retry(lambda: ledger.enter(claimant(map_index, try_number)), stats)
        start.wait(timeout=WAIT)
        started = time.monotonic()
        deadline = started + WAIT
        while time.monotonic() < deadline:
            me = claimant(map_index, try_number)
            try:
                result = ledger.claim(me, [request(batch)])
            except LedgerUnavailableError:
                stats["unavailable"] += 1
                try_number += 1  # the task failed; Airflow runs its next try
                stats["tries"] += 1
                _retry(lambda t=try_number: ledger.enter(claimant(map_index, t)), stats)
                continue
            (claimed,) = result.claims
            if not claimed.ids:
                if _retry(lambda: _unconsumed(ledger), stats) == 0:
                    break
                time.sleep(0.1)  # someone else holds the rest (or a lease must expire)
                continue
            stats["batches"] += 1
            held = [(i, text(p), try_number) for i, p in zip(claimed.ids, claimed.payloads, strict=True)]
            time.sleep(0.002)  # the task's work
            if _finish(ledger, me, claimed.ids, stats):
                consumed.extend(held)
        else:
            raise AssertionError(f"drain[{map_index}] did not finish within {WAIT}s")
        ledger.engine.dispose()
        out.put({"event": "done", "consumed": consumed, "seconds": time.monotonic() - started, **stats})

    _guarded(out, body)


def _finish(ledger: Ledger, me: Claimant, ids: list[int], stats: dict[str, Any]) -> bool:
    """Finish ``ids``; True if this try consumed them (now or in an attempt that seemed to fail)."""
    failed_before = ""
    while True:
        try:
            ledger.finish(me, ids)
            return True
        except LedgerUnavailableError as exc:
            stats["unavailable"] += 1
            failed_before = str(exc)
        except ClaimConflictError:
            rows = _retry(lambda: _rows(ledger, ids), stats)
            mine = all(
                r.state == CONSUMED and r.owner_map_index == me.map_index and r.owner_try == me.try_number for r in rows
            )
            if failed_before and mine and len(rows) == len(ids):
                # The finish that "failed" had committed: its error said otherwise.
                stats["ambiguous_commits"] += 1
                stats.setdefault("ambiguous_errors", []).append(failed_before)
                return True
            stats["taken_over"] += 1
            return False


def _retry(call: Any, stats: dict[str, Any], attempts: int = 200) -> Any:
    for _ in range(attempts):
        try:
            return call()
        except LedgerUnavailableError:
            stats["unavailable"] += 1
            time.sleep(0.02)
    raise AssertionError(f"the ledger stayed unavailable for {attempts} attempts")


def _unconsumed(ledger: Ledger) -> int:
    return sum(n for state, n in ledger.counts().items() if state != CONSUMED)


def _rows(ledger: Ledger, ids: list[int]) -> list[Any]:
    def tx(conn: sa.Connection) -> list[Any]:
        cols = (item.c.id, item.c.state, item.c.owner_map_index, item.c.owner_try)
        return list(conn.execute(sa.select(*cols).where(item.c.id.in_(ids))))

    return ledger._run(tx)


# -- 3. a producer killed in the middle of writing --------------------------------------------------


def produce_then_die(url: str, total: int, signal_at: int, reached: Any, out: Any) -> None:
    """Write ``total`` items in one production; set ``reached`` after ``signal_at`` of them
    have been handed to the ledger (the parent then SIGKILLs this process, or restarts the
    server under it: that is reported as ``unavailable``)."""

    def payloads() -> Iterator[bytes]:
        for n in range(total):
            if n == signal_at:
                reached.set()
            yield f"big-{n}".encode()

    def body() -> None:
        ledger = Ledger(create_engine(url))
        try:
            written = ledger.produce(Production(Written(POOL, 1, ITEMS, SLOTS), payloads()))
        except LedgerUnavailableError as exc:
            out.put({"event": "unavailable", "error": str(exc)})
            return
        out.put({"event": "done", "written": written})

    _guarded(out, body)


# -- 4. two tries of one task instance drain the same pool at once ----------------------------------


def drain_as_try(
    url: str, try_number: int, batch: int, lease: float, work: float, events: dict[str, Any], out: Any
) -> None:
    """``drain`` try ``try_number`` drains the pool; try 1 is the zombie, try 2 the new try.

    Try 1 starts first and sets ``t1_running`` after its first finished batch; try 2 waits
    for that, enters (raising the fence), claims, and sets ``t2_claimed`` after its first
    claim returned. Try 1 holds its second batch until then, so one of its finishes
    certainly comes late. Try 1 keeps claiming and finishing until try 2 is done
    (``t2_done``), recording for every operation whether it began after ``t2_claimed``
    and what happened. Try 2 drains until the ledger has no unconsumed row left.
    """

    def body() -> None:
        try:
            drain()
        finally:
            if try_number == 2:
                events["t2_done"].set()  # even on failure: the zombie must not wait for nothing

    def drain() -> None:
        ledger = Ledger(create_engine(url), lease_seconds=lease)
        me = claimant(0, try_number)
        if try_number == 2 and not events["t1_running"].wait(timeout=WAIT):
            raise AssertionError("try 1 never got going")
        ledger.enter(me)
        started = time.monotonic()
        consumed: list[tuple[int, str]] = []
        claimed_ids: list[int] = []
        ops: list[dict[str, Any]] = []  # try 1 only: every claim/finish and its outcome
        held_over_fence = False
        deadline = started + WAIT
        while time.monotonic() < deadline:
            after = events["t2_claimed"].is_set()
            if try_number == 1 and events["t2_done"].is_set():
                # One last attempt after try 2 is done, then the zombie gives up.
                ops.append({"op": "claim", "after_fence": True, "outcome": _outcome(lambda: _claim_ids(ledger, me))})
                break
            try:
                result = ledger.claim(me, [request(batch)])
            except ClaimConflictError as exc:
                ops.append({"op": "claim", "after_fence": after, "outcome": ("ClaimConflictError", str(exc))})
                time.sleep(work)
                continue
            (claimed,) = result.claims
            if try_number == 1:
                ops.append({"op": "claim", "after_fence": after, "outcome": ("ok", list(claimed.ids))})
            else:
                events["t2_claimed"].set()
            if not claimed.ids:
                if try_number == 1 or _unconsumed(ledger) > 0:
                    time.sleep(work)
                    continue
                break
            claimed_ids.extend(claimed.ids)
            held = list(zip(claimed.ids, (text(p) for p in claimed.payloads), strict=True))
            time.sleep(work)
            if try_number == 1 and events["t1_running"].is_set() and not held_over_fence:
                # Once, hold a batch until try 2 has claimed: a late finish is then certain.
                held_over_fence = events["t2_claimed"].wait(timeout=WAIT)
            after = events["t2_claimed"].is_set()
            outcome = _outcome(lambda ids=claimed.ids: ledger.finish(me, ids))
            if try_number == 1:
                ops.append({"op": "finish", "after_fence": after, "ids": list(claimed.ids), "outcome": outcome})
                events["t1_running"].set()
            if outcome[0] == "ok":
                consumed.extend(held)
            elif try_number == 2:
                raise AssertionError(f"try 2 failed to finish its own claims: {outcome}")
        else:
            raise AssertionError(f"try {try_number} did not finish within {WAIT}s")
        ledger.engine.dispose()
        out.put(
            {
                "event": "done",
                "try": try_number,
                "consumed": consumed,
                "claimed_ids": claimed_ids,
                "ops": ops,
                "seconds": time.monotonic() - started,
            }
        )

    _guarded(out, body)


def _claim_ids(ledger: Ledger, me: Claimant) -> list[int]:
    return ledger.claim(me, [request(10)]).ids
