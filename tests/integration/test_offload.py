"""Offloaded payloads through the ledger, on SQLite, PostgreSQL and MariaDB, with a real
``file://`` object store: only the URI (and the blob's size and SHA-256) is in the ledger,
and every blob is reported as unneeded exactly when no row needs it any more.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom import maintenance
from exclusive_xcom.errors import ClaimConflictError, PayloadError
from exclusive_xcom.ledger import (
    EACH,
    ITEMS,
    ONE,
    Ledger,
    Offloaded,
)
from exclusive_xcom.ledger.schema import CONSUMED, READY, item
from exclusive_xcom.payload import MAGIC, Codec
from exclusive_xcom.storage import BlobStore
from tests.conftest import FakeClock
from tests.integration.conftest import (
    DAG,
    EXTRACT,
    OTHER,
    RUN,
    THRESHOLD,
    files,
    production,
    request,
    rows,
    who,
)

FOLDER = f"{DAG}/{RUN}/extract"


# -- helpers ----------------------------------------------------------------------------------


def big(tag: str, size: int = 5 * THRESHOLD) -> dict[str, Any]:
    return {"tag": tag, "rows": [f"{tag}-{i}" for i in range(size // 8)]}


def encode(codec: Codec, value: Any) -> bytes | Offloaded:
    return codec.encode(value, FOLDER)


def offload(codec: Codec, value: Any) -> Offloaded:
    stored = encode(codec, value)
    assert isinstance(stored, Offloaded), stored
    return stored


# -- tests ------------------------------------------------------------------------------------


def test_big_payload_leaves_only_its_uri_in_the_ledger_and_its_blob_goes_after_consume(
    ledger: Ledger, codec: Codec, store: BlobStore
) -> None:
    value = big("one")
    blob = offload(codec, value)
    assert files(store) == {blob.uri}
    on_disk = Path(blob.uri.removeprefix("file://")).read_bytes()
    assert on_disk.startswith(MAGIC) and b"one-1" not in on_disk  # encrypted at rest
    assert blob.size == len(on_disk) and blob.sha256 == hashlib.sha256(on_disk).hexdigest()

    assert ledger.produce(production(ONE, ["load"], [blob])) == 1
    (row,) = list(rows(ledger).values())
    assert row["payload"] is None
    assert (row["payload_uri"], row["payload_size"], row["payload_sha256"]) == (blob.uri, blob.size, blob.sha256)
    assert ledger.stats()["offloaded_bytes"] == blob.size

    got = ledger.claim(who("load"), [request(ONE, ["load"])])
    (claimed,) = got.claims
    assert claimed.payloads == [blob] and claimed.uris == [blob.uri]
    assert codec.decode(claimed.payloads[0]) == value

    unneeded = ledger.finish(who("load"), got.ids, blobs=claimed.uris)
    assert unneeded == [blob.uri]
    assert store.delete(unneeded) == 1
    assert files(store) == set()
    (row,) = list(rows(ledger).values())
    assert row["state"] == CONSUMED and row["payload"] is None
    with pytest.raises(PayloadError, match="is missing"):
        codec.decode(blob)


def test_a_corrupted_or_misrecorded_blob_is_refused_on_claim(ledger: Ledger, codec: Codec) -> None:
    value = big("bad")
    blob = offload(codec, value)
    ledger.produce(production(ONE, ["load"], [blob]))
    # The digest the reader checks is the one the ledger recorded, not one beside the blob.
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(item).values(payload_sha256="0" * 64))
    got = ledger.claim(who("load"), [request(ONE, ["load"])])
    with pytest.raises(PayloadError, match="checksum mismatch"):
        codec.decode(got.claims[0].payloads[0])
    assert ledger.release(who("load"), got.ids) == 1
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(item).values(payload_sha256=blob.sha256))
    got = ledger.claim(who("load"), [request(ONE, ["load"])])
    assert codec.decode(got.claims[0].payloads[0]) == value


def test_mode_each_shares_one_blob_freed_only_after_the_last_consumer(
    ledger: Ledger, codec: Codec, store: BlobStore
) -> None:
    value = big("shared")
    blob = offload(codec, value)
    assert ledger.produce(production(EACH, ["load", "audit", "report"], [blob])) == 3
    assert {r["payload_uri"] for r in list(rows(ledger).values())} == {blob.uri} and files(store) == {blob.uri}

    req = request(EACH, ["load", "audit", "report"])
    load = ledger.claim(who("load"), [req])
    audit = ledger.claim(who("audit"), [req])
    assert codec.decode(load.claims[0].payloads[0]) == value

    # A slot still ready, or claimed but not finished, keeps the blob.
    assert ledger.finish(who("load"), load.ids, blobs=load.claims[0].uris) == []
    assert ledger.finish(who("audit"), audit.ids, blobs=audit.claims[0].uris) == []
    assert files(store) == {blob.uri}

    report = ledger.claim(who("report"), [req])
    assert codec.decode(report.claims[0].payloads[0]) == value
    assert ledger.finish(who("report"), report.ids, blobs=report.claims[0].uris) == [blob.uri]
    store.delete([blob.uri])
    assert files(store) == set()
    assert ledger.counts() == {CONSUMED: 3}


def test_items_mix_small_and_big_elements(ledger: Ledger, codec: Codec, store: BlobStore) -> None:
    values: list[Any] = []
    for i in range(12):
        values.append(big(f"item{i}") if i % 3 == 0 else {"small": i})
    stored = [encode(codec, v) for v in values]
    blobs = [s.uri for s in stored if isinstance(s, Offloaded)]
    assert len(blobs) == 4 and sum(isinstance(s, bytes) for s in stored) == 8
    assert all(isinstance(s, bytes) and s.startswith(MAGIC) for s in stored if not isinstance(s, Offloaded))
    assert ledger.produce(production(ITEMS, ["load"], stored)) == 12
    by_seq = {r["seq"]: r for r in list(rows(ledger).values())}
    for seq, s in enumerate(stored):
        expected = (None, s.uri) if isinstance(s, Offloaded) else (s, None)
        assert (by_seq[seq]["payload"], by_seq[seq]["payload_uri"]) == expected

    seen: list[Any] = []
    freed: list[str] = []
    for map_index in range(3):  # three mapped consumers, a batch of 5, 5 and 2 each
        me = who("load", map_index=map_index)
        got = ledger.claim(me, [request(ITEMS, ["load"], limit=5)])
        (claimed,) = got.claims
        seen.extend(codec.decode(p) for p in claimed.payloads)
        unneeded = ledger.finish(me, got.ids, blobs=claimed.uris)
        assert sorted(unneeded) == sorted(claimed.uris)  # exactly this batch's own blobs
        freed.extend(unneeded)
        store.delete(unneeded)
    assert seen == values
    assert sorted(freed) == sorted(blobs) and files(store) == set()
    assert ledger.counts() == {CONSUMED: 12}


def test_keep_consumed_payloads_keeps_the_blob_until_purge(
    engine: sa.Engine, clock: FakeClock, codec: Codec, store: BlobStore
) -> None:
    ledger = Ledger(engine, lease_seconds=60, keep_consumed_payloads=True, clock=clock)
    ledger.migrate()
    value = big("kept")
    blob = offload(codec, value)
    small = encode(codec, {"small": True})
    assert isinstance(small, bytes)
    ledger.produce(production(ONE, ["load"], [blob]))
    ledger.produce(production(ONE, ["load"], [small], output=OTHER))

    got = ledger.claim(who("load"), [request(ONE, ["load"]), request(ONE, ["load"], output=OTHER)])
    uris = [u for c in got.claims for u in c.uris]
    assert uris == [blob.uri]
    assert ledger.finish(who("load"), got.ids, blobs=uris) == []
    assert files(store) == {blob.uri}
    kept = {r["task_id"]: r for r in list(rows(ledger).values())}
    assert kept["extract"]["state"] == CONSUMED and kept["extract"]["payload_uri"] == blob.uri
    assert kept["other"]["payload"] == small  # inline payloads are kept as well
    assert codec.decode(Offloaded(blob.uri, blob.size, blob.sha256)) == value

    clock.advance(3600)
    report = maintenance.purge(ledger, codec, timedelta(hours=2))
    assert (report.rows, report.blobs, report.orphans) == (0, 0, 0)
    assert files(store) == {blob.uri}

    clock.advance(3601)
    report = maintenance.purge(ledger, codec, timedelta(hours=2))
    assert (report.rows, report.blobs, report.orphans) == (2, 1, 0)
    assert list(rows(ledger).values()) == [] and files(store) == set()


def test_a_re_produced_output_frees_the_replaced_generations_blob(
    ledger: Ledger, codec: Codec, store: BlobStore
) -> None:
    first = offload(codec, big("gen1"))
    ledger.produce(production(EACH, ["load", "audit"], [first]))
    req1 = request(EACH, ["load", "audit"])
    load = ledger.claim(who("load"), [req1])
    assert ledger.finish(who("load"), load.ids, blobs=load.claims[0].uris) == []  # audit still needs it

    # The producer runs again (try 2): its finish writes generation 2 and replaces audit's
    # unread row of generation 1, so nothing needs the first blob any more.
    second = offload(codec, big("gen2"))
    producer = who("extract", try_number=2)
    unneeded = ledger.finish(producer, [], productions=[production(EACH, ["load", "audit"], [second], generation=2)])
    assert unneeded == [first.uri]
    store.delete(unneeded)
    assert files(store) == {second.uri}

    with pytest.raises(PayloadError, match="no ledger item matches this handle"):
        ledger.claim(who("audit"), [req1])
    got = ledger.claim(who("audit"), [request(EACH, ["load", "audit"], generation=2)])
    assert codec.decode(got.claims[0].payloads[0]) == big("gen2")
    assert ledger.finish(who("audit"), got.ids, blobs=got.claims[0].uris) == []  # load's gen-2 slot remains
    assert files(store) == {second.uri}


def test_forget_deletes_one_generation_and_returns_its_blob(ledger: Ledger, codec: Codec, store: BlobStore) -> None:
    mine, other = offload(codec, big("mine")), offload(codec, big("other"))
    ledger.produce(production(EACH, ["load", "audit"], [mine]))
    ledger.produce(production(EACH, ["load", "audit"], [other], output=OTHER))
    req = request(EACH, ["load", "audit"])
    load = ledger.claim(who("load"), [req])
    ledger.finish(who("load"), load.ids, blobs=load.claims[0].uris)
    audit = ledger.claim(who("audit"), [req])  # in flight when Airflow purges the handle

    assert ledger.forget(EXTRACT, 2) == []  # another generation: nothing to do
    assert len(list(rows(ledger).values())) == 4
    unneeded = ledger.forget(EXTRACT, 1)
    assert unneeded == [mine.uri]
    store.delete(unneeded)
    assert files(store) == {other.uri}
    left = list(rows(ledger).values())
    assert {r["task_id"] for r in left} == {"other"} and {r["state"] for r in left} == {READY}
    assert {r["payload_uri"] for r in left} == {other.uri}

    with pytest.raises(ClaimConflictError, match="replaced by a newer run of the producer, or purged"):
        ledger.finish(who("audit"), audit.ids, blobs=audit.claims[0].uris)
    got = ledger.claim(who("audit"), [request(EACH, ["load", "audit"], output=OTHER)])
    assert codec.decode(got.claims[0].payloads[0]) == big("other")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_worker_with_an_unusable_object_store_fails_its_first_task_not_its_first_big_payload(
    ledger_url: str,
) -> None:
    """No Google provider is installed: the environment a task builds refuses the path at once."""
    from exclusive_xcom.config import Settings
    from exclusive_xcom.errors import ConfigurationError
    from exclusive_xcom.wiring import env_for

    settings = Settings(ledger_url, secret_key="k", offload_path="gs://bucket/blobs")
    with pytest.raises(ConfigurationError, match=r"install apache-airflow-providers-google on every host"):
        env_for(settings)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(("executor", "warned"), [("CeleryExecutor", True), ("LocalExecutor", False)])
def test_a_local_offload_folder_is_warned_about_when_tasks_run_on_many_hosts(
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    executor: str,
    warned: bool,
) -> None:
    from exclusive_xcom.config import Settings
    from exclusive_xcom.wiring import env_for

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    folder = f"file://{tmp_path}/blobs-{executor}"
    with caplog.at_level("WARNING", logger="exclusive_xcom"):
        env_for(Settings(ledger_url, secret_key="k", offload_path=folder))
    said = [r.getMessage() for r in caplog.records if "is a local folder" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert folder in said[0] and "CeleryExecutor" in said[0]
