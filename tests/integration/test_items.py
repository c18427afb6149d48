"""mode="items" at the edges: mixed sizes, empty pools, a million items streamed in chunks."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import sqlalchemy as sa

from exclusive_xcom.errors import PayloadError
from exclusive_xcom.ledger import (
    ITEMS,
    Claimant,
    ClaimRequest,
    Ledger,
    Output,
    Production,
    Stored,
    Written,
    create_engine,
)
from exclusive_xcom.ledger.schema import item
from exclusive_xcom.runtime import Session

DAG, RUN = "queue", "manual__1"
OUT = Output(DAG, RUN, "enqueue")
SLOTS = (f"{DAG}/work",)


def drain(ledger: Ledger, claimant: Claimant, batch: int) -> list[Stored]:
    got: list[Stored] = []
    while True:
        result = ledger.claim(claimant, [ClaimRequest(Written(OUT, 1, ITEMS, SLOTS), limit=batch)])
        if not result.ids:
            return got
        got += [p for c in result.claims for p in c.payloads]
        ledger.finish(claimant, result.ids)


def test_items_of_mixed_sizes_keep_their_order_and_bytes(ledger_url: str) -> None:
    ledger = Ledger(create_engine(ledger_url))
    ledger.migrate()
    sizes = [0, 1, 1024, 3 * 1024 * 1024, 7, 65_536, 2, 1_000_000]
    payloads = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    assert ledger.produce(Production(Written(OUT, 1, ITEMS, SLOTS), iter(payloads))) == len(payloads)
    assert drain(ledger, Claimant(DAG, RUN, "work"), batch=3) == payloads
    assert ledger.counts() == {"consumed": len(payloads)}


def test_an_empty_iterable_is_an_empty_pool(ledger_url: str) -> None:
    ledger = Ledger(create_engine(ledger_url))
    ledger.migrate()
    assert ledger.produce(Production(Written(OUT, 1, ITEMS, SLOTS), iter(()))) == 0
    assert drain(ledger, Claimant(DAG, RUN, "work"), batch=10) == []


@pytest.mark.slow
def test_a_million_items_stream_in_chunks_with_bounded_memory(tmp_path: Path) -> None:
    """Produced from a generator: memory must not grow with the item count (SQLite keeps it fast)."""
    n = 1_000_000
    url = f"sqlite:///{tmp_path / 'million.db'}"
    ledger = Ledger(create_engine(url))
    ledger.migrate()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert ledger.produce(Production(Written(OUT, 1, ITEMS, SLOTS), (b"%d" % i for i in range(n)))) == n
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # One statement for all rows would need about a gigabyte of parameters here.
    assert grown < 64, f"producing {n} items raised peak memory by {grown:.0f} MiB: not streamed in chunks"

    claimant = Claimant(DAG, RUN, "work")
    consumed = 0
    while ids := ledger.claim(claimant, [ClaimRequest(Written(OUT, 1, ITEMS, SLOTS), limit=10_000)]).ids:
        ledger.finish(claimant, ids)
        consumed += len(ids)
    assert consumed == n
    with ledger.engine.connect() as conn:
        distinct = conn.execute(sa.select(sa.func.count(sa.distinct(item.c.seq)))).scalar_one()
    assert distinct == n and ledger.counts() == {"consumed": n}


@pytest.mark.parametrize("value", [42, "abc", b"abc", {"a": 1}, None])
def test_items_mode_refuses_a_value_that_is_not_a_collection_of_items(value: object) -> None:
    from exclusive_xcom.config import Settings

    no_ledger = type("Env", (), {"settings": Settings(url="")})()
    session = Session(Claimant(DAG, RUN, "enqueue"), env=no_ledger)
    with pytest.raises(
        PayloadError, match=r"mode='items' \(or a consumer mapped over the output\) needs an iterable return value"
    ) as caught:
        session.production(value, ITEMS, SLOTS)
    assert f"[dag='{DAG}' run='{RUN}' producer='enqueue' key='return_value'" in str(caught.value)


def test_a_stream_of_a_single_value_output_is_refused_naming_the_producer() -> None:
    from exclusive_xcom.crypto import keyring_from
    from exclusive_xcom.errors import ConfigurationError
    from exclusive_xcom.handle import Handle

    keys = keyring_from("k1", "")
    env = type("Env", (), {"keyring": keys})()
    session = Session(Claimant(DAG, RUN, "work"), env=env)  # type: ignore[arg-type]  # no ledger needed
    handle = Handle(Output(DAG, RUN, "enqueue"), 1, "each", SLOTS).to_xcom(keys)
    with pytest.raises(ConfigurationError, match="an Iterator/Iterable argument streams a work queue: 'enqueue' must"):
        session.stream(handle, batch_size=10, max_items=None)
