"""Retention and key rotation against SQLite, PostgreSQL and MariaDB with a real ``file://``
store: what purge deletes and what it must never touch, the orphan sweep, re-encryption
under a new key, the CLI commands, and purging a million rows in bounded batches while
claims go on.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom import maintenance
from exclusive_xcom.cli import main
from exclusive_xcom.crypto import keyring_from
from exclusive_xcom.errors import PayloadError
from exclusive_xcom.ledger import (
    EACH,
    ITEMS,
    ONE,
    Claimant,
    ClaimRequest,
    Ledger,
    Offloaded,
    create_engine,
)
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY, item
from exclusive_xcom.payload import MAGIC, Codec
from exclusive_xcom.storage import BlobStore
from tests.conftest import FakeClock
from tests.integration.conftest import DAG, RUN, THRESHOLD, files, output, production, request, rows, slot, who

LEASE = 60.0
HOUR = 3600.0


def codec_for(secret: str, store: BlobStore) -> Codec:
    return Codec(keyring_from(secret, "", b"ledger-own-key", allow_plaintext=not secret), THRESHOLD, store)


@pytest.fixture
def codec(store: BlobStore) -> Codec:
    return codec_for("k1", store)


# -- helpers ----------------------------------------------------------------------------------


def big(tag: str) -> dict[str, Any]:
    return {"tag": tag, "rows": [f"{tag}-{i}" for i in range(800)]}


def produce(
    ledger: Ledger, task_id: str, mode: str, consumers: Iterable[str], payloads: list[bytes | Offloaded]
) -> None:
    ledger.produce(production(mode, consumers, payloads, output=output(task_id)))


def ask(task_id: str, mode: str, consumers: Iterable[str], limit: int = 100) -> ClaimRequest:
    return request(mode, consumers, output=output(task_id), limit=limit)


def take(ledger: Ledger, claimant: Claimant, *requests: ClaimRequest) -> list[int]:
    result = ledger.claim(claimant, list(requests))
    assert result.lost == [] and result.ids, result
    return result.ids


def consume(ledger: Ledger, claimant: Claimant, *requests: ClaimRequest) -> list[int]:
    ids = take(ledger, claimant, *requests)
    ledger.finish(claimant, ids)
    return ids


def offload(codec: Codec, value: Any) -> Offloaded:
    stored = codec.encode(value, f"{DAG}/{RUN}")
    assert isinstance(stored, Offloaded)
    return stored


def referenced(engine: sa.Engine) -> set[str]:
    return {r["payload_uri"] for r in rows(engine).values() if r["payload_uri"]}


def aged(blob: str, days: float) -> str:
    """Rename a blob as if written ``days`` ago (the store keeps the time in the name)."""
    path = Path(blob.removeprefix("file://"))
    stamp = int((time.time() - days * 86400) * 1000)
    older = path.with_name(f"{stamp}-{path.name.split('-', 1)[1]}")
    path.rename(older)
    return f"file://{older}"


def orphan(store: BlobStore, days: float) -> str:
    blob = store.write("orphans", [b"left behind by a producer that died before its commit"])
    return aged(blob.uri, days) if days else blob.uri


# -- purge --------------------------------------------------------------------------------------


def test_purge_deletes_consumed_rows_older_than_the_cutoff_and_keeps_the_rest(
    engine: sa.Engine, clock: FakeClock, store: BlobStore, codec: Codec
) -> None:
    ledger = Ledger(engine, lease_seconds=LEASE, keep_consumed_payloads=True, clock=clock)
    ledger.migrate()
    blobs = [offload(codec, big(f"b{i}")) for i in range(4)]
    small = [codec.encode({"i": i}, "f") for i in range(6)]
    produce(ledger, "pool", ITEMS, ["load"], [*blobs[:2], *small[:3], *blobs[2:], *small[3:]])
    produce(ledger, "waiting", ONE, ["load"], [small[0]])  # never consumed: not retention's business

    old = consume(ledger, who("load", map_index=0), ask("pool", ITEMS, ["load"], limit=5))  # 2 blobs, 3 inline
    clock.advance(2 * HOUR)
    recent = consume(ledger, who("load", map_index=1), ask("pool", ITEMS, ["load"], limit=5))
    assert files(store) == {b.uri for b in blobs}  # payloads kept until purge
    clock.advance(60)

    report = maintenance.purge(ledger, codec, timedelta(hours=1))
    assert (report.rows, report.blobs, report.orphans) == (5, 2, 0)
    left = rows(engine)
    assert set(old).isdisjoint(left) and set(recent) <= set(left)
    assert sorted(r["state"] for r in left.values()) == [CONSUMED] * 5 + [READY]
    assert files(store) == {blobs[2].uri, blobs[3].uri}

    # The newer ones go once they are old enough too; the unread item stays.
    assert maintenance.purge(ledger, codec, timedelta(hours=3)).rows == 0
    clock.advance(2 * HOUR)
    report = maintenance.purge(ledger, codec, timedelta(hours=1))
    assert (report.rows, report.blobs) == (5, 2)
    assert [r["task_id"] for r in rows(engine).values()] == ["waiting"] and files(store) == set()


def test_purge_counts_only_blobs_it_really_deleted(ledger: Ledger, clock: FakeClock, store: BlobStore) -> None:
    """Without keep_consumed_payloads a consumer deletes its blob at once: purge finds nothing to delete."""
    codec = codec_for("k1", store)
    blob = offload(codec, big("gone"))
    produce(ledger, "extract", ONE, ["load"], [blob])
    ids = take(ledger, who("load"), ask("extract", ONE, ["load"]))
    store.delete(ledger.finish(who("load"), ids, blobs=[blob.uri]))
    assert files(store) == set()
    clock.advance(2 * HOUR)
    report = maintenance.purge(ledger, codec, timedelta(hours=1))
    assert report.rows == 1
    assert report.blobs == 0, f"the report claims {report.blobs} blob(s) deleted, but none existed: {report}"


def test_expired_unconsumed_rows_go_but_never_one_under_a_live_claim(
    ledger: Ledger, clock: FakeClock, store: BlobStore, codec: Codec
) -> None:
    blobs = {name: offload(codec, big(name)) for name in ("ready", "expired", "live")}
    for name, blob in blobs.items():
        produce(ledger, name, ONE, ["load"], [blob])
    produce(ledger, "consumed", ONE, ["load"], [codec.encode("c", "f")])
    consume(ledger, who("load"), ask("consumed", ONE, ["load"]))
    take(ledger, who("load"), ask("expired", ONE, ["load"]))  # its lease runs out below
    clock.advance(2 * HOUR - 10)
    live_ids = take(ledger, who("load", map_index=7), ask("live", ONE, ["load"]))  # lease still running
    produce(ledger, "fresh", ONE, ["load"], [codec.encode("f", "f")])  # created after the cutoff
    clock.advance(10)

    # Without expired_after only consumed rows are retention's business.
    assert maintenance.purge(ledger, codec, timedelta(days=1), expired_after=None).rows == 0

    dry = maintenance.purge(ledger, codec, timedelta(hours=1), expired_after=timedelta(hours=1), dry_run=True)
    assert (dry.rows, dry.blobs, dry.orphans, dry.dry_run) == (3, 0, 0, True)
    assert str(dry).startswith("would delete 3 item(s)")
    assert len(rows(ledger.engine)) == 5 and files(store) == {b.uri for b in blobs.values()}

    report = maintenance.purge(ledger, codec, timedelta(hours=1), expired_after=timedelta(hours=1))
    assert (report.rows, report.blobs) == (3, 2)
    left = {r["task_id"]: r for r in rows(ledger.engine).values()}
    assert set(left) == {"live", "fresh"}
    assert left["live"]["state"] == CLAIMED and left["live"]["owner_map_index"] == 7
    assert files(store) == {blobs["live"].uri}
    # The live claim's holder is unaffected: it reads and finishes normally.
    assert codec.decode(blobs["live"]) == big("live")
    assert ledger.finish(who("load", map_index=7), live_ids, blobs=[blobs["live"].uri]) == [blobs["live"].uri]


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_row_claimed_between_purges_select_and_delete_is_not_deleted(
    ledger_url: str, ledger: Ledger, clock: FakeClock, store: BlobStore, codec: Codec
) -> None:
    """The DELETE re-checks the condition: a takeover that commits mid-batch wins.

    (Servers only: on SQLite the purge's transaction holds the write lock, so no claim can
    commit between its statements.)
    """
    blob = offload(codec, big("contested"))
    produce(ledger, "contested", ONE, ["load"], [blob])
    produce(ledger, "idle", ONE, ["load"], [codec.encode("idle", "f")])
    take(ledger, who("load"), ask("contested", ONE, ["load"]))
    clock.advance(2 * HOUR)  # the lease is long gone, the row is old: purgeable...

    other_engine = create_engine(ledger_url)
    taker = Ledger(other_engine, lease_seconds=LEASE, clock=clock)
    took: list[list[int]] = []
    errors: list[BaseException] = []

    def take_over() -> None:
        try:
            took.append(take(taker, who("load", map_index=3), ask("contested", ONE, ["load"])))
        except BaseException as exc:  # reported below
            errors.append(exc)

    @sa.event.listens_for(ledger.engine, "before_cursor_execute")
    def _between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE") and not took and not errors:
            worker = threading.Thread(target=take_over)  # ...until another task takes it over
            worker.start()
            worker.join(30)

    try:
        report = maintenance.purge(ledger, codec, timedelta(hours=1), expired_after=timedelta(hours=1))
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", _between)
        other_engine.dispose()
    assert not errors, errors
    assert report.rows == 1  # only "idle"
    (left,) = rows(ledger.engine).values()
    assert (left["task_id"], left["state"], left["owner_map_index"]) == ("contested", CLAIMED, 3)
    assert files(store) == {blob.uri}
    assert ledger.finish(who("load", map_index=3), took[0], blobs=[blob.uri]) == [blob.uri]


def test_orphan_sweep_deletes_old_unreferenced_blobs_only(
    ledger: Ledger, clock: FakeClock, store: BlobStore, codec: Codec
) -> None:
    written = offload(codec, big("old-but-needed"))
    referenced_old = aged(written.uri, days=3)
    blob = Offloaded(referenced_old, written.size, written.sha256)
    produce(ledger, "needed", ONE, ["load"], [blob])
    old_orphans = {orphan(store, days=3) for _ in range(3)}
    # A producer may be about to commit the row of a young blob: kept, even past a short cutoff.
    young = {orphan(store, days=0), orphan(store, days=2 / 24)}
    assert codec.decode(blob) == big("old-but-needed")

    dry = maintenance.purge(ledger, codec, timedelta(hours=1), dry_run=True)
    assert (dry.rows, dry.orphans) == (0, 3)
    assert files(store) == old_orphans | young | {referenced_old}

    assert maintenance.purge(ledger, codec, timedelta(days=4)).orphans == 0  # none older than the cutoff
    report = maintenance.purge(ledger, codec, timedelta(hours=1))
    assert (report.rows, report.blobs, report.orphans) == (0, 0, 3)
    assert files(store) == young | {referenced_old}
    assert codec.decode(blob) == big("old-but-needed")
    assert maintenance.purge(ledger, codec, timedelta(hours=1), sweep=False).orphans == 0


def test_orphan_sweep_asks_the_ledger_once_per_batch(ledger: Ledger, store: BlobStore, codec: Codec) -> None:
    """301 candidate blobs in batches of 100: four look-ups, not one per blob."""
    for _ in range(300):
        orphan(store, days=3)
    kept = offload(codec, big("kept"))
    produce(ledger, "kept", ONE, ["load"], [Offloaded(aged(kept.uri, days=3), kept.size, kept.sha256)])
    selects: list[str] = []

    @sa.event.listens_for(ledger.engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "payload_uri IN" in statement.replace(
            "exclusive_xcom_item.", ""
        ):
            selects.append(statement)

    try:
        report = maintenance.purge(ledger, codec, timedelta(days=1), batch=100)
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", _count)
    assert report.orphans == 300 and len(files(store)) == 1
    # One lookup of referenced blobs per 100 candidate blobs (301 candidates: 4 batches).
    assert len(selects) <= 4, f"{len(selects)} blob lookups on the item table for 301 blobs"


# -- key rotation -------------------------------------------------------------------------------


def test_rotate_keys_re_encrypts_inline_and_offloaded_payloads_but_not_under_a_reader(
    ledger: Ledger, store: BlobStore
) -> None:
    old, both, new = (codec_for(s, store) for s in ("old", "new,old", "new"))
    plain = codec_for("", store)
    produce(ledger, "inline", ONE, ["load"], [old.encode({"inline": 1}, "f")])
    produce(ledger, "unencrypted", ONE, ["load"], [plain.encode({"plain": 2}, "f")])
    ready_blob, held_blob, shared_blob = (offload(old, big(n)) for n in ("ready", "held", "shared"))
    produce(ledger, "ready", ONE, ["load"], [ready_blob])
    produce(ledger, "held", ONE, ["load"], [held_blob])
    produce(ledger, "shared", EACH, ["load", "audit"], [shared_blob])
    produce(ledger, "consumed", ONE, ["load"], [old.encode({"consumed": 0}, "f")])
    consume(ledger, who("load"), ask("consumed", ONE, ["load"]))  # consumed: nothing left to rotate
    reader = who("load", map_index=5)
    held_claim = ledger.claim(reader, [ask("held", ONE, ["load"]), ask("shared", EACH, ["load", "audit"])])
    held_ids = held_claim.ids
    before = rows(ledger.engine)

    report = maintenance.rotate_keys(ledger, both)
    after = rows(ledger.engine)
    by_task = {(r["task_id"], r["slot"]): r for r in after.values() if r["state"] != CONSUMED}

    # What a reader holds right now stays where it is, readable with the keys it has.
    assert [both.decode(c.payloads[0]) for c in held_claim.claims] == [big("held"), big("shared")]
    assert by_task[("held", "*")]["payload_uri"] == held_blob.uri
    assert by_task[("shared", slot("load"))]["payload_uri"] == shared_blob.uri

    # Everything else now opens with the new key alone.
    assert by_task[("shared", slot("audit"))]["payload_uri"] not in (shared_blob.uri, None)
    assert by_task[("ready", "*")]["payload_uri"] not in (ready_blob.uri, None)
    for task_id in ("inline", "unencrypted"):
        payload = by_task[(task_id, "*")]["payload"]
        assert payload.startswith(MAGIC) and payload != before[by_task[(task_id, "*")]["id"]]["payload"]
        assert new.decode(payload) == ({"inline": 1} if task_id == "inline" else {"plain": 2})
    for task_id, s, value in (("ready", "*", big("ready")), ("shared", slot("audit"), big("shared"))):
        r = by_task[(task_id, s)]
        assert new.decode(Offloaded(r["payload_uri"], r["payload_size"], r["payload_sha256"])) == value
    with pytest.raises(PayloadError):
        new.decode(held_blob)
    assert [r["payload"] for r in after.values() if r["state"] == CONSUMED] == [None]
    # No blob leaked, none still needed was deleted.
    assert files(store) == referenced_from(ledger.engine, consumed=False)
    # Both rows under a reader (its own blob, and its slot of the shared one) are reported busy,
    # so the operator knows to run again before dropping the old key.
    assert (report.rewritten, report.skipped) == (4, 2), report

    # Once the reader lets go, the next run finishes the job.
    assert ledger.release(reader, held_ids) == 2
    again = maintenance.rotate_keys(ledger, both)
    assert again.skipped == 0, again
    for r in rows(ledger.engine).values():
        if r["state"] == CONSUMED:
            continue
        stored = (
            r["payload"]
            if r["payload_uri"] is None
            else Offloaded(r["payload_uri"], r["payload_size"], r["payload_sha256"])
        )
        assert new.decode(stored) is not None
    assert files(store) == referenced_from(ledger.engine, consumed=False)


def test_rotate_keys_with_kept_payloads_converges(engine: sa.Engine, clock: FakeClock, store: BlobStore) -> None:
    """keep_consumed_payloads: a consumed item's kept blob is rotated like its inline
    counterpart, not reported busy on every run (nobody is reading it)."""
    ledger = Ledger(engine, lease_seconds=LEASE, keep_consumed_payloads=True, clock=clock)
    ledger.migrate()
    old, both, new = (codec_for(s, store) for s in ("old", "new,old", "new"))
    blob = offload(old, big("kept"))
    produce(ledger, "blob", ONE, ["load"], [blob])
    produce(ledger, "inline", ONE, ["load"], [old.encode("kept inline", "f")])
    consume(ledger, who("load"), ask("blob", ONE, ["load"]), ask("inline", ONE, ["load"]))

    first = maintenance.rotate_keys(ledger, both)
    second = maintenance.rotate_keys(ledger, both)
    assert (first.skipped, second.skipped) == (0, 0), (first, second)
    kept = {r["task_id"]: r for r in rows(engine).values()}
    assert new.decode(kept["inline"]["payload"]) == "kept inline"
    r = kept["blob"]
    assert new.decode(Offloaded(r["payload_uri"], r["payload_size"], r["payload_sha256"])) == big("kept")
    assert files(store) == {r["payload_uri"]}


def referenced_from(engine: sa.Engine, *, consumed: bool) -> set[str]:
    return {
        r["payload_uri"] for r in rows(engine).values() if r["payload_uri"] and (consumed or r["state"] != CONSUMED)
    }


# -- the CLI --------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: BlobStore) -> pytest.MonkeyPatch:
    """The CLI's configuration comes from the environment, as for any Airflow setting."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH", store.uri)
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES", str(THRESHOLD))
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "")
    for name in ("SECRET_KEY", "SQL_ALCHEMY_CONN", "CONN_ID", "RETENTION", "EXPIRE_AFTER", "KEEP_CONSUMED_PAYLOADS"):
        monkeypatch.delenv(f"AIRFLOW__EXCLUSIVE_XCOM__{name}", raising=False)
    return monkeypatch


def test_cli_purge_dry_run_then_purge(
    configured: pytest.MonkeyPatch, ledger_url: str, capsys: pytest.CaptureFixture[str], store: BlobStore
) -> None:
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "k1")
    engine = create_engine(ledger_url)
    ledger = Ledger(engine, lease_seconds=LEASE)  # the real clock, as the CLI's
    ledger.migrate()
    codec = codec_for("k1", store)
    consumed, unread, held = (offload(codec, big(n)) for n in ("consumed", "unread", "held"))
    produce(ledger, "consumed", ONE, ["load"], [consumed])
    produce(ledger, "unread", ONE, ["load"], [unread])
    produce(ledger, "held", ONE, ["load"], [held])
    consume(ledger, who("load"), ask("consumed", ONE, ["load"]))  # its blob left for purge to delete
    take(ledger, who("load"), ask("held", ONE, ["load"]))
    lost = orphan(store, days=2)
    before = rows(engine)

    code, out, err = cli(
        capsys, "--url", ledger_url, "purge", "--older-than", "0s", "--expired-after", "0s", "--dry-run"
    )
    assert (code, err) == (0, "")
    assert out.startswith("would delete 2 item(s), 0 blob(s) and 1 orphaned blob(s) (consumed more than 0s ago")
    assert len(out.strip().splitlines()) == 1
    assert rows(engine) == before and files(store) == {consumed.uri, unread.uri, held.uri, lost}

    code, out, err = cli(capsys, "--url", ledger_url, "purge", "--older-than", "0s", "--expired-after", "0s")
    assert (code, err) == (0, "")
    assert out.startswith("deleted 2 item(s), 2 blob(s) and 1 orphaned blob(s)")
    assert [r["task_id"] for r in rows(engine).values()] == ["held"] and files(store) == {held.uri}
    engine.dispose()


def test_cli_rotate_key(
    configured: pytest.MonkeyPatch, ledger_url: str, capsys: pytest.CaptureFixture[str], store: BlobStore
) -> None:
    code, out, err = cli(capsys, "--url", ledger_url, "rotate-key")
    assert (code, out) == (2, "")
    assert err.startswith("exclusive-xcom: error: no key configured") and "secret_key" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    engine = create_engine(ledger_url)
    ledger = Ledger(engine)
    ledger.migrate()
    old = codec_for("old", store)
    produce(ledger, "inline", ONE, ["load"], [old.encode("small", "f")])
    produce(ledger, "blob", ONE, ["load"], [offload(old, big("blob"))])

    reader = who("load", map_index=1)
    held = ledger.claim(reader, [ask("blob", ONE, ["load"])]).ids

    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "new,old")
    code, out, err = cli(capsys, "--url", ledger_url, "rotate-key")
    assert (code, err) == (0, "")
    assert out.strip() == (
        "re-encrypted 1 payload(s) under the newest key; 1 busy (being read or changed meanwhile): run again later"
    )
    assert ledger.release(reader, held) == 1
    code, out, err = cli(capsys, "--url", ledger_url, "rotate-key")
    assert (code, err, out.strip()) == (0, "", "re-encrypted 2 payload(s) under the newest key"), "nothing was busy"
    new = codec_for("new", store)
    values = []
    for task_id in ("inline", "blob"):
        (claimed,) = ledger.claim(who("load"), [ask(task_id, ONE, ["load"])]).claims
        values.append(new.decode(claimed.payloads[0]))
    assert values == ["small", big("blob")]
    engine.dispose()


# -- a million rows -------------------------------------------------------------------------------


BULK = {"sqlite": 1_000_000, "postgres": 200_000, "mysql": 200_000}
_DIGITS = "(" + " UNION ALL ".join(f"SELECT {d} AS d" for d in range(10)) + ")"


def bulk_consumed(engine: sa.Engine, count: int, consumed_at: datetime) -> None:
    """``count`` consumed rows of one output, generated by the server in one statement, in
    ``seq`` order as a producer writes them (so ids and the unique index grow together)."""
    places = math.ceil(math.log10(count))
    number = " + ".join(f"d{i}.d * {10**i}" for i in range(places))
    source = ", ".join(f"{_DIGITS} d{i}" for i in range(places))
    columns = (
        "output_id, dag_id, run_id, task_id, map_index, {key}, generation, mode, consumers, slot, seq, "
        "payload_size, state, created_at, consumed_at"
    )
    key = '"key"' if engine.dialect.name != "mysql" else "`key`"
    stmt = sa.text(
        f"INSERT INTO {item.name} ({columns.format(key=key)}) "
        f"SELECT :output_id, :dag, :run, 'bulk', -1, 'return_value', 1, 'items', '[]', '*', n, 1, 'consumed', :at, :at "
        f"FROM (SELECT {number} AS n FROM {source}) nums WHERE n < :count ORDER BY n"
    ).bindparams(
        sa.bindparam("at", consumed_at, type_=item.c.created_at.type),
        output_id=output("bulk").output_id,
        dag=DAG,
        run=RUN,
        count=count,
    )
    with engine.begin() as conn:
        conn.execute(stmt)
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"ANALYZE {item.name}")  # what autovacuum does after such a load
        elif engine.dialect.name == "mysql":
            conn.exec_driver_sql(f"ANALYZE TABLE {item.name}")


_SORTED_OR_SCANNED = {
    "sqlite": ("USE TEMP B-TREE", "SCAN exclusive_xcom_item"),
    "postgresql": ("Sort", "Seq Scan"),
    "mysql": ("filesort", "'ALL'"),
}


@pytest.mark.slow
def test_purging_a_million_rows_goes_in_bounded_batches_beside_live_claims(
    backend: str, ledger: Ledger, clock: FakeClock, store: BlobStore, codec: Codec
) -> None:
    count = BULK[backend]
    engine = ledger.engine
    now = datetime.fromtimestamp(clock(), tz=timezone.utc).replace(tzinfo=None)
    started = time.monotonic()
    bulk_consumed(engine, count, now - timedelta(days=2))
    produce(ledger, "live", ITEMS, ["load"], [codec.encode(i, "f") for i in range(10)])
    assert ledger.counts() == {CONSUMED: count, READY: 10}
    loaded = time.monotonic() - started

    deleted_per_statement: list[int] = []
    commits = [0]
    plans: list[str] = []
    first_delete = threading.Event()
    purge_done = threading.Event()
    claim_outcome: dict[str, Any] = {}

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        # The first batch's own SELECT, explained on its own connection with its own parameters:
        # a batch must walk an index to its next rows, not sort or scan what is left.
        if plans or not statement.lstrip().upper().startswith("SELECT") or "ORDER BY" not in statement:
            return
        explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
        probe = conn.connection.dbapi_connection.cursor()
        probe.execute(explain + statement, parameters)
        plans.append("\n".join(str(row) for row in probe.fetchall()))
        probe.close()
        bad = [word for word in _SORTED_OR_SCANNED[engine.dialect.name] if word in plans[0]]
        assert not bad, f"each purge batch would {bad} the remaining rows (quadratic in total):\n{plans[0]}"

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _deletes(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deleted_per_statement.append(cursor.rowcount)
            first_delete.set()

    @sa.event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        commits[0] += 1

    def claim_meanwhile() -> None:
        """Another task drains another output while the purge runs (its own engine)."""
        first_delete.wait(120)
        other = create_engine(str(engine.url.render_as_string(hide_password=False)))
        try:
            began = time.monotonic()
            worker = Ledger(other, lease_seconds=LEASE, clock=clock)
            me = who("load")
            ids = take(worker, me, ask("live", ITEMS, ["load"], limit=10))
            worker.finish(me, ids)
            claim_outcome["seconds"] = time.monotonic() - began
            claim_outcome["during_purge"] = not purge_done.is_set()
            claim_outcome["deletes_before"] = len(deleted_per_statement)
        except BaseException as exc:  # reported below
            claim_outcome["error"] = exc
        finally:
            other.dispose()

    thread = threading.Thread(target=claim_meanwhile)
    thread.start()
    began = time.monotonic()
    try:
        purged = ledger.purge(timedelta(days=1), batch=1000)
    finally:
        purge_done.set()
        first_delete.set()
        thread.join(120)
        for name, fn in (("before_cursor_execute", _explain), ("after_cursor_execute", _deletes), ("commit", _commit)):
            sa.event.remove(engine, name, fn)
    took = time.monotonic() - began

    assert purged == count
    assert ledger.counts() == {CONSUMED: 10}
    assert len(deleted_per_statement) >= count // 1000 and max(deleted_per_statement) <= 1000
    assert sum(deleted_per_statement) == count
    assert commits[0] >= count // 1000
    assert "error" not in claim_outcome, claim_outcome
    assert claim_outcome["during_purge"], claim_outcome
    assert claim_outcome["deletes_before"] < len(deleted_per_statement)
    print(
        f"\n{backend}: {count} rows loaded in {loaded:.1f}s, purged in {took:.1f}s "
        f"({len(deleted_per_statement)} DELETEs, {commits[0]} commits); a claim+finish beside it took "
        f"{claim_outcome['seconds']:.2f}s after {claim_outcome['deletes_before']} batches"
    )
