"""What the UI reads and does through the ledger (``Admin.browse``, ``browse_counts``,
``purge_run``), on each database: view states, the sealed flag read in SQL, keyset pages,
the readable-DAG filter, a task instance's claims, a run's purge that touches no other run."""

from __future__ import annotations

import pytest

from exclusive_xcom.ledger import ITEMS, Ledger, Output
from exclusive_xcom.ledger.queries import EXPIRED, RELEASED
from exclusive_xcom.payload import MAGIC
from tests.conftest import FakeClock
from tests.integration.conftest import DAG, RUN, production, request, who

SEALED = MAGIC + b"ciphertext"
OTHER_RUN = "manual__other"


@pytest.fixture
def filled(ledger: Ledger, clock: FakeClock) -> Ledger:
    """Five items of ``extract``: one consumed, one claimed then expired, one claimed, two ready
    (one sealed); and two ready items of another run and two of another DAG."""
    ledger.produce(production(ITEMS, ["load", "audit"], [b"a", b"b", b"c", SEALED, b"e"]))
    done = ledger.claim(who("load"), [request(ITEMS, ["load", "audit"], limit=1)])
    ledger.finish(who("load"), done.ids)
    ledger.claim(who("audit"), [request(ITEMS, ["load", "audit"], limit=1)])
    clock.advance(3600)  # audit's lease runs out
    ledger.claim(who("load", try_number=2), [request(ITEMS, ["load", "audit"], limit=1)])
    ledger.produce(production(ITEMS, ["load"], [b"x", b"y"], output=Output(DAG, OTHER_RUN, "extract")))
    ledger.produce(production(ITEMS, ["load"], [b"x", b"y"], output=Output("other_dag", RUN, "extract")))
    return ledger


def test_rows_carry_their_view_state_and_whether_they_are_sealed(filled: Ledger) -> None:
    rows = filled.browse(limit=50, sealed_prefix=MAGIC, dag_id=DAG, run_id=RUN)
    assert [r["seq"] for r in rows] == [4, 3, 2, 1, 0]  # newest first
    assert [r["view_state"] for r in rows] == ["ready", "ready", "claimed", EXPIRED, "consumed"]
    assert [r["sealed"] in (1, True) for r in rows[:4]] == [False, True, False, False]
    assert rows[4]["sealed"] is None  # consumed: the payload is gone
    assert all("payload" not in row for row in rows)


def test_counts_and_the_oldest_unconsumed_follow_the_filters(filled: Ledger) -> None:
    run = filled.browse_counts(dag_id=DAG, run_id=RUN)
    assert run["counts"] == {"ready": 2, "claimed": 1, "expired": 1, "released": 0, "consumed": 1}
    assert run["oldest_unconsumed"] is not None
    readable = filled.browse_counts(dag_ids=[DAG])
    assert sum(readable["counts"].values()) == 7  # not the other DAG's two
    assert sum(filled.browse_counts(dag_ids=[])["counts"].values()) == 0


def test_pages_filters_and_a_task_instances_claims(filled: Ledger) -> None:
    everything = [r["id"] for r in filled.browse(limit=50, sealed_prefix=MAGIC)]
    first = filled.browse(limit=4, sealed_prefix=MAGIC)
    rest = filled.browse(limit=50, sealed_prefix=MAGIC, before_id=first[-1]["id"])
    assert [r["id"] for r in first + rest] == everything and len(everything) == 9
    assert {r["dag_id"] for r in filled.browse(limit=50, sealed_prefix=MAGIC, dag_ids=["other_dag"])} == {"other_dag"}
    claims = filled.browse(limit=50, sealed_prefix=MAGIC, dag_id=DAG, run_id=RUN, claimed_by="load")
    assert sorted(r["view_state"] for r in claims) == ["claimed", "consumed"]
    expired = filled.browse(limit=50, sealed_prefix=MAGIC, state=EXPIRED)
    assert [r["owner_task_id"] for r in expired] == ["audit"]


def test_purging_a_run_deletes_its_consumed_items_only(filled: Ledger) -> None:
    assert filled.purge_run(DAG, RUN, batch=1) == 1
    assert filled.browse_counts(dag_id=DAG, run_id=RUN)["counts"]["consumed"] == 0
    assert sum(filled.browse_counts()["counts"].values()) == 8
    assert filled.purge_run(DAG, OTHER_RUN) == 0


def test_a_claim_given_back_reads_as_released_until_it_is_claimed_again(filled: Ledger) -> None:
    """By its own try failing for good, or by an operator: both record when, and the item is
    claimable again as any ready one (schema version 9)."""
    held = filled.browse(limit=50, sealed_prefix=MAGIC, dag_id=DAG, run_id=RUN, state="claimed")
    (live,) = [r["id"] for r in held]
    assert filled.release(who("load", try_number=2), [live]) == 1
    (stale,) = [r["id"] for r in filled.browse(limit=50, sealed_prefix=MAGIC, dag_id=DAG, run_id=RUN, state=EXPIRED)]
    assert filled.release_any([stale]) == 1

    released = filled.browse(limit=50, sealed_prefix=MAGIC, dag_id=DAG, run_id=RUN, state=RELEASED)
    assert sorted(r["id"] for r in released) == sorted([live, stale])
    assert {r["view_state"] for r in released} == {RELEASED} and all(r["released_at"] for r in released)
    counts = filled.browse_counts(dag_id=DAG, run_id=RUN)["counts"]
    assert counts == {"ready": 2, "claimed": 0, "expired": 0, "released": 2, "consumed": 1}

    again = filled.claim(who("audit", try_number=2), [request(ITEMS, ["load", "audit"], limit=4)]).ids
    assert {live, stale} <= set(again)
    assert filled.browse_counts(dag_id=DAG, run_id=RUN)["counts"]["released"] == 0
