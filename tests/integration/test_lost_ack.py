"""A finish that commits but whose acknowledgement is lost, for real, loses nothing.

A consumer that also produces consumes its inputs and writes its own output in one
transaction. Here the COMMIT of that transaction reaches a real PostgreSQL or MariaDB
server, and a proxy (``tests.proxy``) throws the reply away, cuts the connections and
refuses new ones for a moment, so the finish's own re-check fails too: the try fails with
an outcome it cannot know. Its retry must find that the finish did commit, and neither run
again (its inputs are gone) nor fail: it publishes the output that try wrote.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from exclusive_xcom.config import Settings
from exclusive_xcom.crypto import Keyring, keyring_from
from exclusive_xcom.errors import LedgerUnavailableError
from exclusive_xcom.handle import Handle
from exclusive_xcom.ledger import (
    EACH,
    ITEMS,
    ONE,
    Claimant,
    Finished,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    inputs_key,
)
from exclusive_xcom.ledger.engine import create_engine
from exclusive_xcom.ledger.schema import CONSUMED, READY
from exclusive_xcom.payload import Codec
from exclusive_xcom.runtime import DoneBefore, Session
from exclusive_xcom.wiring import Env
from tests.proxy import LostAckProxy

DAG, RUN = "lost_ack", "manual__1"
SOURCE = Output(DAG, RUN, "produce")
MIDDLE, SINK = consumer_slot(DAG, "middle"), consumer_slot(DAG, "sink")
VALUES = {EACH: {"order": 7}, ONE: {"order": 8}, ITEMS: [{"order": i} for i in range(5)]}


def _derive(mode: str, value: Any) -> Any:
    """What the middle task makes of its input (its own output, read by the sink)."""
    return [v["order"] * 10 for v in value] if mode == ITEMS else value["order"] * 10


def _session(ledger: Ledger, keys: Keyring, try_number: int, task: str = "middle") -> Session:
    """What ``open_session`` does for a task try, on this ledger."""
    session = Session(
        Claimant(DAG, RUN, task, -1, try_number), Env(Settings("unused"), ledger, keys, Codec(keys, 1 << 20))
    )
    session.earlier = ledger.enter(session.claimant)
    return session


def _produce_source(ledger: Ledger, keys: Keyring, mode: str, generation: int = 1) -> dict[str, Any]:
    codec = Codec(keys, 1 << 20)
    values = VALUES[mode] if mode == ITEMS else [VALUES[mode]]
    payloads = [codec.encode(v, "unused") for v in values]
    ledger.produce(Production(Written(SOURCE, generation, mode, (MIDDLE,)), payloads))
    return Handle(SOURCE, generation, mode, (MIDDLE,)).to_xcom(keys)


@pytest.fixture
def proxy(ledger_url: str) -> Iterator[LostAckProxy]:
    with LostAckProxy(ledger_url, outage=1.0) as proxy:
        yield proxy


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
@pytest.mark.parametrize("mode", [EACH, ONE, ITEMS])
def test_a_retry_after_a_lost_commit_acknowledgement_publishes_what_the_finish_wrote(
    backend: str, mode: str, ledger: Ledger, ledger_url: str, proxy: LostAckProxy
) -> None:
    keys = keyring_from("k1", "")
    source = _produce_source(ledger, keys, mode)
    lossy = Ledger(create_engine(proxy.url(ledger_url)), lease_seconds=ledger.lease_seconds)

    first = _session(lossy, keys, 1)
    (value,) = first.claim([source], batch_size=2, max_items=None)  # items: three batches
    production, _ = first.production(_derive(mode, value), EACH, (SINK,))
    proxy.arm()
    with pytest.raises(LedgerUnavailableError) as info:
        first.finish([production])
    assert proxy.dropped.is_set() and proxy.refused, "the acknowledgement was not lost, or the re-check got through"
    assert "whether this finish committed is unknown" in str(info.value), info.value

    time.sleep(proxy.outage + 0.2)  # the server is back; the task's retry begins
    retry = _session(lossy, keys, 2)
    assert retry.earlier == Finished(1, inputs_key([(SOURCE, 1)]))
    with pytest.raises(DoneBefore) as done:
        retry.claim([source], batch_size=2, max_items=None)
    assert done.value.try_number == 1

    consumed = [r for r in ledger.items() if r["task_id"] == "produce"]
    assert {(r["state"], r["owner_task_id"], r["owner_try"]) for r in consumed} == {(CONSUMED, "middle", 1)}
    assert len(consumed) == (5 if mode == ITEMS else 1), "every input consumed once, by try 1"
    written = [r for r in ledger.items() if r["task_id"] == "middle"]
    assert [(r["generation"], r["state"]) for r in written] == [(1, READY)], "try 1's output, written once"

    sink = _session(ledger, keys, 1, task="sink")
    republished = retry.handle_of(done.value.try_number, EACH, (SINK,)).to_xcom(keys)
    assert sink.claim([republished], batch_size=100, max_items=None) == [_derive(mode, VALUES[mode])]
    sink.finish()
    assert {r["state"] for r in ledger.items()} == {CONSUMED}
    lossy.engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_consumer_whose_lost_acknowledgement_is_retried_is_done(
    backend: str, ledger: Ledger, ledger_url: str, proxy: LostAckProxy
) -> None:
    """A consumer that writes no output: on PostgreSQL its finish is one autocommitted
    statement (no COMMIT is sent); the finish is remembered all the same."""
    keys = keyring_from("k1", "")
    source = _produce_source(ledger, keys, ITEMS)
    lossy = Ledger(create_engine(proxy.url(ledger_url)), lease_seconds=ledger.lease_seconds)
    first = _session(lossy, keys, 1)
    first.claim([source], batch_size=100, max_items=None)
    proxy.arm()
    with pytest.raises(LedgerUnavailableError, match="whether this finish committed is unknown"):
        first.finish()
    assert proxy.dropped.is_set() and proxy.refused
    time.sleep(proxy.outage + 0.2)
    with pytest.raises(DoneBefore):
        _session(lossy, keys, 2).claim([source], batch_size=100, max_items=None)
    assert {(r["state"], r["owner_try"]) for r in ledger.items()} == {(CONSUMED, 1)}
    lossy.engine.dispose()


def test_a_retry_given_new_inputs_runs_again(ledger: Ledger) -> None:
    """A finished task instance whose producer ran again (a new generation) is not done: its
    next try (a clear) claims the new output as any try would."""
    keys = keyring_from("k1", "")
    first = _session(ledger, keys, 1)
    assert first.claim([_produce_source(ledger, keys, EACH)], batch_size=100, max_items=None) == [VALUES[EACH]]
    first.finish()
    again = _session(ledger, keys, 2)
    assert again.earlier == Finished(1, inputs_key([(SOURCE, 1)]))
    assert again.claim([_produce_source(ledger, keys, EACH, generation=2)], 100, None) == [VALUES[EACH]]
    again.finish()
    assert _session(ledger, keys, 3).earlier == Finished(2, inputs_key([(SOURCE, 2)]))


def test_a_finish_that_consumed_nothing_is_not_remembered(ledger: Ledger) -> None:
    """A producer's finish consumes nothing: its retry runs again (and replaces the output)."""
    keys = keyring_from("k1", "")
    first = _session(ledger, keys, 1, task="produce")
    production, _ = first.production(VALUES[EACH], EACH, (MIDDLE,))
    first.finish([production])
    assert _session(ledger, keys, 2, task="produce").earlier is None
