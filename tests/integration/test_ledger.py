"""The claim ledger against real databases: SQLite, PostgreSQL and MariaDB, no mocks.

Every test gets a fresh, empty database (``ledger_url``, one per backend) and a fake clock,
so lease expiry is tested by moving time forward instead of sleeping. A new database costs
most of a second on the servers, so each test walks through a whole scenario.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from exclusive_xcom.errors import (
    AlreadyConsumedError,
    ClaimConflictError,
    ExclusiveXComError,
    NotAuthorizedError,
    PayloadError,
)
from exclusive_xcom.ledger import (
    EACH,
    ITEMS,
    ONE,
    Claimant,
    ClaimRequest,
    ClaimResult,
    Finished,
    Ledger,
    Output,
    Stored,
)
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY, SCHEMA_VERSION
from tests.conftest import FakeClock
from tests.integration.conftest import DAG, EXTRACT, OTHER, RUN, inline, production, request, rows, slot, who
from tests.support import statements_sent

LEASE = 60.0
TRANSFORM = Output(DAG, RUN, "transform")
_T = TypeVar("_T")


# -- helpers ----------------------------------------------------------------------------------


def produce(ledger: Ledger, mode: str, consumers: Iterable[str], payloads: Iterable[bytes], **kw: Any) -> int:
    return ledger.produce(production(mode, consumers, payloads, **kw))


def claim(ledger: Ledger, claimant: Claimant, *requests: ClaimRequest) -> ClaimResult:
    return ledger.claim(claimant, list(requests))


def payloads_of(result: ClaimResult) -> list[Stored]:
    return [p for c in result.claims for p in c.payloads]


def state_of(ledger: Ledger, ids: Iterable[int]) -> list[str]:
    everything = rows(ledger)
    return [everything[i]["state"] for i in ids]


def held_by(ledger: Ledger) -> set[tuple[str, int, int]]:
    """(task, map_index, try) of every live claim."""
    return {(r["owner_task_id"], r["owner_map_index"], r["owner_try"]) for r in ledger.items(state=CLAIMED)}


def raises(kind: type[ExclusiveXComError], call: Callable[[], Any], consumer: str, producer: str = "extract") -> str:
    """Run ``call``, expect ``kind``; its message must name dag, run, producer, key and consumer."""
    with pytest.raises(kind) as exc:
        call()
    text = str(exc.value)
    names = f"[dag={DAG!r} run={RUN!r} producer={producer!r} key='return_value' consumer={slot(consumer)!r}]"
    assert text.endswith(names), text
    return text


def race(workers: int, work: Callable[[int], _T]) -> list[_T]:
    """Run ``work(i)`` in ``workers`` threads released at the same instant; re-raise failures."""
    start = threading.Barrier(workers)
    results: list[Any] = [None] * workers
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


# -- the three modes --------------------------------------------------------------------------


def test_each_every_consumer_reads_once(ledger: Ledger) -> None:
    data = bytes(range(256)) * 3
    assert produce(ledger, EACH, ["load", "audit"], [data]) == 2
    assert ledger.counts() == {READY: 2}
    req = request(EACH, ["load", "audit"])

    load = claim(ledger, who("load"), req)
    audit = claim(ledger, who("audit"), req)
    assert load.lost == [] and audit.lost == []
    assert len(load.ids) == 1 and len(audit.ids) == 1 and load.ids != audit.ids
    assert payloads_of(load) == [data] and payloads_of(audit) == [data]
    assert ledger.counts() == {CLAIMED: 2}
    held = rows(ledger)[load.ids[0]]
    assert (held["owner_task_id"], held["owner_try"], held["slot"]) == ("load", 1, slot("load"))
    assert held["lease_expires_at"] > held["claimed_at"]

    ledger.finish(who("load"), load.ids)
    ledger.finish(who("audit"), audit.ids)
    assert ledger.counts() == {CONSUMED: 2}
    for row in rows(ledger).values():
        assert (row["state"], row["payload"], row["lease_expires_at"]) == (CONSUMED, None, None)
        assert row["consumed_at"] is not None and row["payload_size"] == len(data)

    # Consume-once: a second read, by the same try or a later one, says who read it and when.
    consumed_at = rows(ledger)[load.ids[0]]["consumed_at"]
    for claimant in (who("load"), who("load", try_number=2)):
        text = raises(AlreadyConsumedError, partial(claim, ledger, claimant, req), "load")
        assert f"already consumed by {DAG}/{RUN}/load try 1 at {consumed_at}" in text
    assert ledger.counts() == {CONSUMED: 2}


def test_one_first_claimant_wins_and_the_other_is_told_who(ledger: Ledger) -> None:
    assert produce(ledger, ONE, ["load", "audit"], [b"only once"]) == 1
    req = request(ONE, ["load", "audit"])
    won = claim(ledger, who("load"), req)
    assert won.lost == [] and payloads_of(won) == [b"only once"]

    lost = claim(ledger, who("audit"), req)
    assert lost.claims == [] and lost.ids == []
    assert len(lost.lost) == 1 and "'extract'" in lost.lost[0]
    assert f"held by {DAG}/{RUN}/load try 1 until" in lost.lost[0]
    assert held_by(ledger) == {("load", -1, 1)}

    ledger.finish(who("load"), won.ids)
    after = claim(ledger, who("audit"), req)
    assert after.claims == [] and f"went to {DAG}/{RUN}/load try 1 (consumed" in after.lost[0]
    text = raises(AlreadyConsumedError, lambda: claim(ledger, who("load", try_number=2), req), "load")
    assert f"already consumed by {DAG}/{RUN}/load try 1 at " in text
    assert ledger.counts() == {CONSUMED: 1}
    assert rows(ledger)[won.ids[0]]["payload"] is None


def test_items_claimants_drain_the_pool_in_batches_each_item_once(ledger: Ledger) -> None:
    data = [f"item-{i}".encode() for i in range(25)]
    assert produce(ledger, ITEMS, ["load", "audit"], data) == 25
    req = request(ITEMS, ["load", "audit"], limit=10)
    claimants = [who("load", map_index=0), who("load", map_index=1), who("audit")]

    # Three claimants (two mapped instances of one task, and another task) take turns.
    batches = [claim(ledger, c, req) for c in claimants]
    assert [payloads_of(b) for b in batches] == [data[:10], data[10:20], data[20:]]
    assert len({i for b in batches for i in b.ids}) == 25
    owners = {r["id"]: r["owner_map_index"] for r in ledger.items(task_id="extract", state=CLAIMED)}
    assert {owners[i] for i in batches[1].ids} == {1}
    # Rows this very try already holds are not handed out again, so a drain loop ends.
    assert [claim(ledger, c, req).ids for c in claimants] == [[], [], []]

    for claimant, batch in zip(claimants, batches, strict=True):
        ledger.finish(claimant, batch.ids)
    assert ledger.counts() == {CONSUMED: 25}
    assert claim(ledger, who("audit", try_number=2), req).ids == []

    # An empty iterable is a valid output: there is nothing to claim.
    assert produce(ledger, ITEMS, ["load"], [], output=OTHER) == 0
    empty = claim(ledger, who("load"), request(ITEMS, ["load"], output=OTHER))
    assert empty.ids == [] and empty.lost == [] and [c.payloads for c in empty.claims] == [[]]
    ledger.finish(who("load"), empty.ids)
    assert ledger.counts() == {CONSUMED: 25}


# -- authorization ----------------------------------------------------------------------------


def test_only_named_consumers_may_claim(ledger: Ledger) -> None:
    produce(ledger, EACH, ["load"], [b"x"])
    text = raises(NotAuthorizedError, lambda: claim(ledger, who("intruder"), request(EACH, ["load"])), "intruder")
    assert "task 'intruder' of dag 'etl' is not a named consumer of this output" in text
    assert f"allowed: {slot('load')}" in text

    # A request that forges its consumer list is refused by the consumers stored with the item.
    produce(ledger, ONE, ["load"], [b"y"], output=OTHER)
    produce(ledger, ITEMS, ["load"], [b"a", b"b"], output=TRANSFORM)
    for output, mode in ((OTHER, ONE), (TRANSFORM, ITEMS)):
        forged = request(mode, ["load", "intruder"], output=output)
        text = raises(NotAuthorizedError, partial(claim, ledger, who("intruder"), forged), "intruder", output.task_id)
        assert f"allowed: {slot('load')}" in text

    # The same task id in another DAG is another consumer.
    stranger = Claimant("other_dag", RUN, "load")
    with pytest.raises(NotAuthorizedError, match="consumer='other_dag/load'"):
        claim(ledger, stranger, request(ONE, ["load"], output=OTHER))

    assert ledger.counts() == {READY: 4}


# -- fencing: a newer try of the same task instance -------------------------------------------


@pytest.mark.parametrize("mode", [EACH, ONE])
def test_newer_try_fences_out_the_older_one(ledger: Ledger, mode: str) -> None:
    produce(ledger, mode, ["load"], [b"x"])
    req = request(mode, ["load"])
    old = claim(ledger, who("load", try_number=1), req)
    new = claim(ledger, who("load", try_number=2), req)
    assert new.ids == old.ids and payloads_of(new) == [b"x"]
    assert held_by(ledger) == {("load", -1, 2)}

    # The zombie's late finish consumes nothing.
    text = raises(ClaimConflictError, lambda: ledger.finish(who("load", try_number=1), old.ids), "load")
    assert f"{DAG}/{RUN}/load try 1 no longer holds 1 of its 1 claimed item(s)" in text
    assert "try 2 of the same task instance fenced it out" in text and "nothing was consumed" in text
    row = rows(ledger)[old.ids[0]]
    assert (row["state"], row["owner_try"], row["payload"]) == (CLAIMED, 2, b"x")

    # Nor can it claim the item back.
    text = raises(ClaimConflictError, lambda: claim(ledger, who("load", try_number=1), req), "load")
    assert "load try 1 is fenced out: try 2 of the same task instance holds the claim" in text
    assert held_by(ledger) == {("load", -1, 2)}

    ledger.finish(who("load", try_number=2), new.ids)
    assert ledger.counts() == {CONSUMED: 1}


def test_newer_try_fences_out_the_older_one_in_items_mode(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["load"], [b"a", b"b", b"c"])
    req = request(ITEMS, ["load"], limit=2)
    old = claim(ledger, who("load", try_number=1), req)
    new = claim(ledger, who("load", try_number=2), req)
    assert new.ids == old.ids and payloads_of(new) == [b"a", b"b"]
    with pytest.raises(ClaimConflictError, match="load try 1 no longer holds 2 of its 2"):
        ledger.finish(who("load", try_number=1), old.ids)
    assert held_by(ledger) == {("load", -1, 2)}
    # The zombie cannot take try 2's items; the ready item it may still pick up goes back
    # to try 2 with its next batch.
    rest = claim(ledger, who("load", try_number=1), req)
    assert payloads_of(rest) == [b"c"]
    ledger.finish(who("load", try_number=2), new.ids)
    assert claim(ledger, who("load", try_number=2), req).ids == rest.ids
    assert ledger.counts() == {CONSUMED: 2, CLAIMED: 1}


# -- a failed try keeps its claims for its retry ----------------------------------------------


def test_retry_gets_its_claims_back_while_others_are_kept_out(ledger: Ledger) -> None:
    produce(ledger, EACH, ["load", "audit"], [b"e"])
    produce(ledger, ONE, ["load", "audit"], [b"o"], output=OTHER)
    produce(ledger, ITEMS, ["load", "audit"], [bytes([i]) for i in range(5)], output=TRANSFORM)
    each = request(EACH, ["load", "audit"])
    one = request(ONE, ["load", "audit"], output=OTHER)
    items = request(ITEMS, ["load", "audit"], output=TRANSFORM, limit=3)
    first = claim(ledger, who("load"), each, one, items)
    assert [c.payloads for c in first.claims] == [[b"e"], [b"o"], [b"\x00", b"\x01", b"\x02"]]
    # try 1 fails without finishing; its claims stay while the lease lives.

    # each: another consumer has its own slot and is not blocked ...
    audit = claim(ledger, who("audit"), each)
    assert len(audit.ids) == 1 and audit.ids[0] not in first.ids
    # ... but another instance of the same consumer task (same slot) is.
    text = raises(ClaimConflictError, lambda: claim(ledger, who("load", map_index=3), each), "load")
    assert f"another live claim holds the item (held by {DAG}/{RUN}/load try 1 until" in text
    # one: the other consumer loses; items: it gets only what nobody holds.
    assert claim(ledger, who("audit"), one).claims == []
    rest = claim(ledger, who("audit"), items)
    assert payloads_of(rest) == [b"\x03", b"\x04"]

    retry = claim(ledger, who("load", try_number=2), each, one, request(ITEMS, ["load", "audit"], output=TRANSFORM))
    assert retry.lost == [] and retry.ids == first.ids
    assert payloads_of(retry) == payloads_of(first)
    ledger.finish(who("load", try_number=2), retry.ids)
    assert state_of(ledger, first.ids) == [CONSUMED] * 5
    assert state_of(ledger, audit.ids + rest.ids) == [CLAIMED] * 3


# -- leases -----------------------------------------------------------------------------------


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_finish(ledger: Ledger, clock: FakeClock) -> None:
    produce(ledger, ONE, ["load", "audit"], [b"o"])
    produce(ledger, EACH, ["load"], [b"e"], output=OTHER)
    produce(ledger, ITEMS, ["load", "audit"], [bytes([i]) for i in range(4)], output=TRANSFORM)
    one = request(ONE, ["load", "audit"])
    each = request(EACH, ["load"], output=OTHER)
    items = request(ITEMS, ["load", "audit"], output=TRANSFORM, limit=3)
    first = claim(ledger, who("load", map_index=0), one, each, items)
    clock.advance(LEASE - 1)
    assert claim(ledger, who("audit"), one).claims == []
    with pytest.raises(ClaimConflictError):
        claim(ledger, who("load", map_index=1), each)
    assert payloads_of(claim(ledger, who("audit"), items)) == [b"\x03"]

    clock.advance(2)  # every lease above has expired: the worker died
    took_one = claim(ledger, who("audit", map_index=5), one)
    took_each = claim(ledger, who("load", map_index=1), each)
    took_items = claim(ledger, who("audit", map_index=5), items)
    assert took_one.ids + took_each.ids == first.ids[:2]
    assert payloads_of(took_one) == [b"o"] and payloads_of(took_each) == [b"e"]
    assert payloads_of(took_items) == [b"\x00", b"\x01", b"\x02"]  # lowest seq first, capped by limit
    assert rows(ledger)[took_one.ids[0]]["owner_task_id"] == "audit"
    dead = f"{DAG}/{RUN}/load[0] try 1"  # every claim says whose expired lease it took over
    assert took_items.claims[0].describe_origins() == f"3 taken over from {dead} (lease expired)"
    assert took_each.claims[0].describe_origins() == f"1 taken over from {dead} (lease expired)"
    assert first.claims[2].describe_origins() == "3 fresh"

    text = raises(ClaimConflictError, lambda: ledger.finish(who("load", map_index=0), first.ids), "load")
    assert f"load[0] try 1 no longer holds 5 of its 5 claimed item(s): {DAG}/{RUN}/audit[5] try 1 took it over" in text
    assert "nothing was consumed" in text
    assert ledger.extend_lease(who("load", map_index=0), first.ids) is False
    assert ledger.counts() == {CLAIMED: 6}

    ledger.finish(who("audit", map_index=5), took_one.ids + took_items.ids)
    ledger.finish(who("load", map_index=1), took_each.ids)
    assert ledger.counts() == {CONSUMED: 5, CLAIMED: 1}


def test_extend_lease_keeps_a_claim_alive_until_it_is_lost(ledger: Ledger, clock: FakeClock) -> None:
    produce(ledger, ONE, ["load", "audit"], [b"x"])
    req = request(ONE, ["load", "audit"])
    held = claim(ledger, who("load"), req)
    before = rows(ledger)[held.ids[0]]["lease_expires_at"]
    for _ in range(3):
        clock.advance(LEASE * 0.8)
        assert ledger.extend_lease(who("load"), held.ids) is True
    assert ledger.extend_lease(who("load"), held.ids) is True  # same instant, nothing changes: still held
    assert rows(ledger)[held.ids[0]]["lease_expires_at"] > before
    assert claim(ledger, who("audit"), req).claims == []  # 2.4 leases after the claim, still alive
    assert ledger.extend_lease(who("load", try_number=2), held.ids) is False  # not this try's claim
    assert ledger.extend_lease(who("audit"), held.ids) is False

    clock.advance(LEASE + 1)
    assert claim(ledger, who("audit"), req).ids == held.ids
    assert ledger.extend_lease(who("load"), held.ids) is False
    assert ledger.extend_lease(who("audit"), held.ids) is True


# -- release ----------------------------------------------------------------------------------


def test_release_is_fenced_by_try_and_release_any_is_not(ledger: Ledger) -> None:
    produce(ledger, ONE, ["load", "audit"], [b"x"])
    req = request(ONE, ["load", "audit"])
    old = claim(ledger, who("load", try_number=1), req)
    claim(ledger, who("load", try_number=2), req)
    assert ledger.release(who("load", try_number=1), old.ids) == 0  # a zombie cannot release
    assert ledger.release(who("audit"), old.ids) == 0  # nor can a stranger
    assert held_by(ledger) == {("load", -1, 2)}

    assert ledger.release(who("load", try_number=2), old.ids) == 1
    row = rows(ledger)[old.ids[0]]
    assert (row["state"], row["payload"]) == (READY, b"x")
    assert all(row[c] is None for c in ("owner_task_id", "owner_try", "claimed_at", "lease_expires_at"))
    again = claim(ledger, who("audit"), req)
    assert again.ids == old.ids and payloads_of(again) == [b"x"]

    # An operator frees a stuck claim whoever holds it; ready and consumed rows stay as they are.
    assert ledger.release_any(again.ids) == 1
    assert state_of(ledger, again.ids) == [READY]
    assert ledger.release_any(again.ids) == 0
    took = claim(ledger, who("load", try_number=3), req)
    ledger.finish(who("load", try_number=3), took.ids)
    assert ledger.release_any(took.ids) == 0
    assert state_of(ledger, took.ids) == [CONSUMED]

    # items: only the given items go back to the pool.
    produce(ledger, ITEMS, ["load"], [b"a", b"b", b"c"], output=OTHER)
    got = claim(ledger, who("load"), request(ITEMS, ["load"], output=OTHER))
    assert ledger.release(who("load"), got.ids[:2]) == 2
    assert state_of(ledger, got.ids) == [READY, READY, CLAIMED]
    assert ledger.release_any(got.ids) == 1
    assert ledger.counts() == {READY: 3, CONSUMED: 1}


# -- all or nothing ---------------------------------------------------------------------------


def test_a_claim_of_several_inputs_takes_all_or_nothing(ledger: Ledger) -> None:
    produce(ledger, EACH, ["load"], [b"first"])
    first = request(EACH, ["load"])

    def nothing_claimed(by: Claimant) -> None:
        assert [r["state"] for r in ledger.items(task_id="extract")] == [READY]
        assert (by.task_id, by.map_index, by.try_number) not in held_by(ledger), "a partial claim was left behind"

    # The second input is held by a live claim of another instance.
    produce(ledger, EACH, ["load"], [b"held"], output=OTHER)
    held = request(EACH, ["load"], output=OTHER)
    claim(ledger, who("load", map_index=7), held)
    raises(ClaimConflictError, lambda: claim(ledger, who("load"), first, held), "load", "other")
    nothing_claimed(who("load"))

    # The second input was already consumed.
    produce(ledger, EACH, ["load"], [b"done"], output=TRANSFORM)
    done = request(EACH, ["load"], output=TRANSFORM)
    ledger.finish(who("load"), claim(ledger, who("load"), done).ids)
    raises(AlreadyConsumedError, lambda: claim(ledger, who("load", try_number=2), first, done), "load", "transform")
    nothing_claimed(who("load", try_number=2))

    # The second input's handle is stale (no such generation).
    stale = request(EACH, ["load"], output=OTHER, generation=9)
    text = raises(PayloadError, lambda: claim(ledger, who("load"), first, stale), "load", "other")
    assert "no ledger item matches this handle" in text
    nothing_claimed(who("load"))

    # The second input, in mode one, went to another consumer: nothing is claimed, no error.
    lost_out = Output(DAG, RUN, "lost")
    produce(ledger, ONE, ["load", "audit"], [b"lost"], output=lost_out)
    lost = request(ONE, ["load", "audit"], output=lost_out)
    claim(ledger, who("audit"), lost)
    result = claim(ledger, who("load"), first, lost)
    assert result.claims == [] and result.ids == [] and "audit try 1" in result.lost[0]
    nothing_claimed(who("load"))
    assert ledger.counts() == {READY: 1, CLAIMED: 2, CONSUMED: 1}

    # With every input free, all are claimed together and finished together.
    produce(ledger, ITEMS, ["load"], [b"i1", b"i2"], output=Output(DAG, RUN, "more"))
    more = request(ITEMS, ["load"], output=Output(DAG, RUN, "more"))
    got = claim(ledger, who("load"), first, more)
    assert [c.payloads for c in got.claims] == [[b"first"], [b"i1", b"i2"]]
    ledger.finish(who("load"), got.ids)
    assert state_of(ledger, got.ids) == [CONSUMED] * 3


# -- a re-run producer ------------------------------------------------------------------------


def test_rerun_producer_replaces_unconsumed_items_and_keeps_consumed_ones(ledger: Ledger) -> None:
    produce(ledger, EACH, ["load", "audit"], [b"v1"])
    req1 = request(EACH, ["load", "audit"])
    ledger.finish(who("load"), claim(ledger, who("load"), req1).ids)

    assert produce(ledger, EACH, ["load", "audit"], [b"v2"], generation=2) == 2
    assert produce(ledger, EACH, ["load", "audit"], [b"v2"], generation=2) == 2  # written twice: no duplicates
    assert ledger.counts() == {CONSUMED: 1, READY: 2}
    by_gen = sorted((r["generation"], r["slot"], r["state"]) for r in ledger.items(task_id="extract"))
    assert by_gen == [(1, slot("load"), CONSUMED), (2, slot("audit"), READY), (2, slot("load"), READY)]

    text = raises(PayloadError, lambda: claim(ledger, who("audit"), req1), "audit")
    assert "no ledger item matches this handle" in text and "replaced by a newer run of the producer" in text
    raises(AlreadyConsumedError, lambda: claim(ledger, who("load"), req1), "load")

    req2 = request(EACH, ["load", "audit"], generation=2)
    assert payloads_of(claim(ledger, who("audit"), req2)) == [b"v2"]
    assert payloads_of(claim(ledger, who("load", try_number=2), req2)) == [b"v2"]


def test_rerun_producer_in_items_mode_replaces_what_is_left(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["load"], [bytes([i]) for i in range(6)])
    req1 = request(ITEMS, ["load"], limit=2)
    ledger.finish(who("load", map_index=0), claim(ledger, who("load", map_index=0), req1).ids)
    held = claim(ledger, who("load", map_index=1), req1)

    assert produce(ledger, ITEMS, ["load"], [b"new-a", b"new-b", b"new-c"], generation=2) == 3
    assert ledger.counts() == {CONSUMED: 2, READY: 3}
    assert sorted(r["generation"] for r in ledger.items(state=READY)) == [2, 2, 2]
    with pytest.raises(ClaimConflictError) as exc:  # its items were replaced under it
        ledger.finish(who("load", map_index=1), held.ids)
    assert "load[1] try 1 no longer holds 2 of its 2" in str(exc.value)
    assert "replaced by a newer run of the producer" in str(exc.value)
    assert f"run={RUN!r}" in str(exc.value) and "consumer='etl/load'" in str(exc.value)

    got = claim(ledger, who("load"), request(ITEMS, ["load"], generation=2))
    assert payloads_of(got) == [b"new-a", b"new-b", b"new-c"]


# -- finish writes the consumer's own outputs in the same transaction -------------------------


def test_finish_consumes_inputs_and_writes_productions_together(ledger: Ledger) -> None:
    produce(ledger, EACH, ["transform"], [b"raw"])
    req = request(EACH, ["transform"])
    old = claim(ledger, who("transform", try_number=1), req)
    new = claim(ledger, who("transform", try_number=2), req)
    rows_out = Output(DAG, RUN, "transform", key="rows")
    outputs = [
        production(EACH, ["load"], [b"clean"], output=TRANSFORM, generation=1),
        production(ITEMS, ["load"], [b"r1", b"r2"], output=rows_out, generation=1),
    ]

    # A fenced try's finish writes nothing at all.
    with pytest.raises(ClaimConflictError):
        ledger.finish(who("transform", try_number=1), old.ids, outputs)
    assert ledger.items(task_id="transform") == []
    assert state_of(ledger, old.ids) == [CLAIMED]

    outputs = [
        production(EACH, ["load"], [b"clean"], output=TRANSFORM, generation=2),
        production(ITEMS, ["load"], [b"r1", b"r2"], output=rows_out, generation=2),
    ]
    ledger.finish(who("transform", try_number=2), new.ids, outputs)
    assert state_of(ledger, new.ids) == [CONSUMED]
    made = sorted((r["key"], r["mode"], r["generation"], r["state"]) for r in ledger.items(task_id="transform"))
    assert made == [("return_value", EACH, 2, READY), ("rows", ITEMS, 2, READY), ("rows", ITEMS, 2, READY)]
    got = claim(ledger, who("load"), request(EACH, ["load"], output=TRANSFORM, generation=2))
    assert payloads_of(got) == [b"clean"]

    # A batch of which one item was lost is not consumed at all, not even in part.
    produce(ledger, ITEMS, ["load", "audit"], [b"a", b"b", b"c"], output=OTHER)
    items = request(ITEMS, ["load", "audit"], output=OTHER)
    batch = claim(ledger, who("load"), items)
    ledger.release_any(batch.ids[1:2])
    assert claim(ledger, who("audit"), items).ids == batch.ids[1:2]
    text = raises(ClaimConflictError, lambda: ledger.finish(who("load"), batch.ids), "load", "other")
    assert f"no longer holds 1 of its 3 claimed item(s): {DAG}/{RUN}/audit try 1 took it over" in text
    assert state_of(ledger, batch.ids) == [CLAIMED] * 3
    assert held_by(ledger) >= {("load", -1, 1), ("audit", -1, 1)}


# -- reading ----------------------------------------------------------------------------------


def test_items_and_counts_describe_the_ledger(ledger: Ledger) -> None:
    assert ledger.items() == [] and ledger.counts() == {}
    produce(ledger, EACH, ["load", "audit"], [b"12345"])
    produce(ledger, ITEMS, ["load"], [b"a", b"bb", b"ccc"], output=OTHER)
    ledger.finish(who("load"), claim(ledger, who("load"), request(EACH, ["load", "audit"])).ids)
    claim(ledger, who("load"), request(ITEMS, ["load"], output=OTHER, limit=1))

    everything = ledger.items()
    assert len(everything) == 5
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
    assert all("payload" not in r for r in everything)
    oldest = everything[-1]
    assert {k: oldest[k] for k in ("dag_id", "run_id", "task_id", "map_index", "key", "mode", "generation")} == {
        "dag_id": DAG,
        "run_id": RUN,
        "task_id": "extract",
        "map_index": -1,
        "key": "return_value",
        "mode": EACH,
        "generation": 1,
    }
    assert sorted(r["payload_size"] for r in everything) == [1, 2, 3, 5, 5]

    assert ledger.counts() == {READY: 3, CLAIMED: 1, CONSUMED: 1}
    assert [r["seq"] for r in ledger.items(task_id="other", state=READY)] == [2, 1]
    assert [r["owner_task_id"] for r in ledger.items(state=CONSUMED)] == ["load"]
    assert len(ledger.items(dag_id=DAG, run_id=RUN, limit=2)) == 2
    assert ledger.items(run_id="another run") == []
    assert ledger.schema_version() == SCHEMA_VERSION
    assert ledger.migrate() == SCHEMA_VERSION  # migrating again changes nothing
    assert ledger.counts() == {READY: 3, CLAIMED: 1, CONSUMED: 1}


# -- size, volume, real races -----------------------------------------------------------------


def test_large_payload_round_trips(ledger: Ledger) -> None:
    big = os.urandom(5 * 1024 * 1024)
    produce(ledger, ONE, ["load"], [big])
    assert ledger.items()[0]["payload_size"] == len(big)
    got = claim(ledger, who("load"), request(ONE, ["load"]))
    assert payloads_of(got) == [big]
    ledger.finish(who("load"), got.ids)
    assert rows(ledger)[got.ids[0]]["payload"] is None


def test_ten_thousand_items_produce_and_drain(ledger: Ledger) -> None:
    n = 10_000
    assert produce(ledger, ITEMS, ["load", "audit"], (str(i).encode() for i in range(n))) == n
    assert ledger.counts() == {READY: n}
    req = request(ITEMS, ["load", "audit"], limit=1000)
    seen: list[Stored] = []
    for turn in range(100):
        claimant = who(("load", "audit")[turn % 2])
        got = claim(ledger, claimant, req)
        if not got.ids:
            break
        seen.extend(payloads_of(got))
        ledger.finish(claimant, got.ids)
    assert seen == [str(i).encode() for i in range(n)]
    assert ledger.counts() == {CONSUMED: n}


def test_racing_claimants_never_share_an_item(ledger: Ledger) -> None:
    consumers = [f"c{i}" for i in range(4)]
    produce(ledger, ONE, consumers, [b"x"])
    one = request(ONE, consumers)
    results = race(4, lambda i: claim(ledger, who(f"c{i}"), one))
    assert sum(1 for r in results if r.ids) == 1
    assert all(r.lost for r in results if not r.ids)

    n = 300
    produce(ledger, ITEMS, ["load"], (str(i).encode() for i in range(n)), output=OTHER)
    items = request(ITEMS, ["load"], output=OTHER, limit=20)

    def drain(i: int) -> list[bytes]:
        me = who("load", map_index=i)
        mine: list[bytes] = []
        while (got := claim(ledger, me, items)).ids:
            mine.extend(inline(p) for p in payloads_of(got))
            ledger.finish(me, got.ids)
        return mine

    drained = [p for batch in race(4, drain) for p in batch]
    assert sorted(drained) == sorted(str(i).encode() for i in range(n))
    assert ledger.counts() == {CLAIMED: 1, CONSUMED: n}


def test_once_a_newer_try_has_begun_the_older_can_neither_claim_nor_consume_nor_produce(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["work"], [f"i{n}".encode() for n in range(10)])
    zombie, fresh = who("work", 1), who("work", 2)
    ledger.enter(zombie)
    held = claim(ledger, zombie, request(ITEMS, ["work"], limit=3)).ids
    assert len(held) == 3

    ledger.enter(fresh)  # try 2 begins while try 1 still runs somewhere

    for attempt in (
        lambda: claim(ledger, zombie, request(ITEMS, ["work"], limit=3)),
        lambda: ledger.finish(zombie, held),
        lambda: ledger.finish(zombie, [], [production(EACH, ["load"], [b"late"], output=Output(DAG, RUN, "work"))]),
        lambda: ledger.enter(zombie),
    ):
        with pytest.raises(ClaimConflictError, match=r"is fenced out: try 2 of the same task instance has begun"):
            attempt()
    assert state_of(ledger, held) == [CLAIMED] * 3
    assert not [r for r in rows(ledger).values() if r["task_id"] == "work"], "the zombie's output was written"

    got = claim(ledger, fresh, request(ITEMS, ["work"], limit=100))
    assert sorted(got.ids)[:3] == sorted(held)  # the new try took over what the zombie held
    ledger.finish(fresh, got.ids)
    assert ledger.counts() == {CONSUMED: 10}


def _fence_row(ledger: Ledger, claimant: Claimant) -> Any:
    with ledger.engine.connect() as conn:
        return conn.execute(*q.lock_fence(ti_key=claimant.ti_key)).first()


def test_a_first_try_enters_inside_its_first_claim_or_finish(ledger: Ledger) -> None:
    """A first try has no earlier finish to learn of, so it needs no transaction of its own to
    enter: its first claim (or, without inputs, its finish) records it on the fence row."""
    produce(ledger, ITEMS, ["work"], [b"a", b"b", b"c"])
    consumer, producer = who("work"), who("load")
    transactions: list[str] = []

    def begin(conn: sa.Connection) -> None:
        transactions.append("begin")

    sa.event.listen(ledger.engine, "begin", begin)
    try:
        got = ledger.claim(consumer, [request(ITEMS, ["work"], limit=2)], enter=True)
        claimed_in = len(transactions)
        ledger.finish(producer, [], [production(EACH, ["next"], [b"out"], output=Output(DAG, RUN, "load"))], enter=True)
    finally:
        sa.event.remove(ledger.engine, "begin", begin)
    assert claimed_in == 1 and len(transactions) == 2, "entering took a transaction of its own"
    assert payloads_of(got) == [b"a", b"b"]
    assert (_fence_row(ledger, consumer).try_number, _fence_row(ledger, producer).try_number) == (1, 1)

    ledger.finish(consumer, got.ids, inputs=[(Output(DAG, RUN, "work"), 1)])  # entered: the one statement
    assert _fence_row(ledger, consumer).finished_try == 1, "the finish is recorded on the row its claim made"
    assert ledger.enter(who("work", 2)) == Finished(1, _fence_row(ledger, consumer).finished_inputs)


def test_a_zombie_first_try_that_never_entered_is_fenced_at_its_first_claim_or_finish(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["work"], [b"a", b"b"])
    zombie, fresh = who("work", 1), who("work", 2)
    ledger.enter(fresh)  # try 2 began before try 1 ever touched the ledger

    late = [production(EACH, ["load"], [b"late"], output=Output(DAG, RUN, "work"))]
    for attempt in (
        lambda: ledger.claim(zombie, [request(ITEMS, ["work"], limit=2)], enter=True),
        lambda: ledger.finish(zombie, [], late, enter=True),
    ):
        with pytest.raises(ClaimConflictError, match=r"is fenced out: try 2 of the same task instance has begun"):
            attempt()
    assert ledger.counts() == {READY: 2}, "the zombie claimed or wrote something"
    assert _fence_row(ledger, zombie).try_number == 2, "the zombie lowered the fence"


def test_a_retry_takes_back_its_own_earlier_claims_before_fresh_items(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["work"], [f"i{n}".encode() for n in range(20)])
    first = claim(ledger, who("work", 1, map_index=0), request(ITEMS, ["work"], limit=5)).ids
    other = claim(ledger, who("work", 1, map_index=1), request(ITEMS, ["work"], limit=5)).ids

    retry = who("work", 2, map_index=0)
    again = claim(ledger, retry, request(ITEMS, ["work"], limit=3)).ids
    assert set(again) < set(first)
    rest = claim(ledger, retry, request(ITEMS, ["work"], limit=4)).ids
    assert set(first) - set(again) <= set(rest) and not set(rest) & set(other)
    assert len(rest) == 4


def test_a_long_drain_never_gets_its_own_items_twice(ledger: Ledger, clock: FakeClock) -> None:
    """Found by the state machine: once its lease had expired, a try re-selected its own rows."""
    produce(ledger, ITEMS, ["work"], [b"a", b"b", b"c"])
    me = who("work")
    first = claim(ledger, me, request(ITEMS, ["work"], limit=2)).ids
    clock.advance(LEASE + 1)  # the drain outlived its lease; nobody took the items over
    rest = claim(ledger, me, request(ITEMS, ["work"], limit=2)).ids
    assert len(rest) == 1 and not set(rest) & set(first)
    ledger.finish(me, first + rest + first[:1])  # an id named twice is consumed once
    assert ledger.counts() == {CONSUMED: 3}


def test_on_postgres_a_claim_and_a_finish_are_one_direct_autocommit_statement_each(ledger: Ledger) -> None:
    """The common case is one round trip each on PostgreSQL (the benchmark's claim path);
    elsewhere, and whenever the single statement cannot decide, a transaction."""
    produce(ledger, ITEMS, ["load"], [b"a", b"b", b"c"])
    produce(ledger, EACH, ["load"], [b"e"], output=OTHER)
    transactions: list[str] = []

    def begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            transactions.append("transaction")

    sa.event.listen(ledger.engine, "begin", begin)
    try:
        with statements_sent(ledger) as sent:  # PostgreSQL sends on its pinned connection ("direct")
            items = claim(ledger, who("load"), request(ITEMS, ["load"], limit=2))
            each = claim(ledger, who("load"), request(EACH, ["load"], output=OTHER))
            ledger.finish(who("load"), items.ids + each.ids)
    finally:
        sa.event.remove(ledger.engine, "begin", begin)
    assert payloads_of(items) == [b"a", b"b"] and payloads_of(each) == [b"e"]
    assert ledger.counts() == {CONSUMED: 3, READY: 1}
    via = [s.via for s in sent]
    if ledger.engine.dialect.name == "postgresql":
        assert via == ["direct"] * 3 and transactions == []
    else:
        assert len(transactions) == 3 and "direct" not in via


def test_a_finish_that_lost_some_of_its_claims_consumes_none(ledger: Ledger) -> None:
    produce(ledger, ITEMS, ["load"], [b"a", b"b", b"c"])
    me, other = who("load", map_index=0), who("load", map_index=1)
    mine = claim(ledger, me, request(ITEMS, ["load"], limit=2)).ids
    assert ledger.release_any(mine[:1]) == 1  # an operator freed one of them
    taken = claim(ledger, other, request(ITEMS, ["load"], limit=1)).ids
    assert taken == mine[:1]

    text = raises(ClaimConflictError, lambda: ledger.finish(me, mine), "load")
    assert "no longer holds 1 of its 2 claimed item(s)" in text and "nothing was consumed" in text
    assert state_of(ledger, mine) == [CLAIMED, CLAIMED] and ledger.counts() == {CLAIMED: 2, READY: 1}
    ledger.finish(me, mine[1:])
    ledger.finish(other, taken)
    assert ledger.counts() == {CONSUMED: 2, READY: 1}


def test_release_held_gives_back_all_this_try_holds_known_or_not_and_nothing_else(ledger: Ledger) -> None:
    """A try that failed for good may not know every claim it holds (a drain that died between
    batches, a claim whose reply was lost): it releases by owner, for the outputs it asked for."""
    produce(ledger, ITEMS, ["load"], [b"%d" % i for i in range(10)])
    produce(ledger, ITEMS, ["load"], [b"o%d" % i for i in range(3)], output=OTHER)
    first = claim(ledger, who("load", map_index=0), request(ITEMS, ["load"], limit=3))
    unknown = claim(ledger, who("load", map_index=0), request(ITEMS, ["load"], limit=3))  # its reply "lost"
    other_output = claim(ledger, who("load", map_index=0), request(ITEMS, ["load"], output=OTHER, limit=1))
    sibling = claim(ledger, who("load", map_index=1), request(ITEMS, ["load"], limit=2))
    assert len(first.ids) == len(unknown.ids) == 3 and len(sibling.ids) == 2 and len(other_output.ids) == 1

    assert ledger.release_held(who("load", map_index=0, try_number=2), [(EXTRACT, 1)]) == 0  # not that try's
    assert ledger.release_held(who("load", map_index=0), [(EXTRACT, 1)]) == 6
    states = {i: r["state"] for i, r in rows(ledger).items()}
    assert [states[i] for i in first.ids + unknown.ids] == [READY] * 6
    assert [states[i] for i in sibling.ids + other_output.ids] == [CLAIMED] * 3, "only its own, only that output"
    assert held_by(ledger) == {("load", 1, 1), ("load", 0, 1)}
