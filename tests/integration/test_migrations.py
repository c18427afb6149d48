"""The ledger schema is versioned: old ledgers are upgraded in place, racing migrators agree,
and the configured ledger makes its own schema on first use."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from exclusive_xcom import config, wiring
from exclusive_xcom.errors import ClaimConflictError, LedgerError
from exclusive_xcom.ledger import (
    ITEMS,
    Claimant,
    ClaimRequest,
    Finished,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    create_engine,
    inputs_key,
)
from exclusive_xcom.ledger.engine import _engines
from exclusive_xcom.ledger.migrations import MIGRATIONS, RECORDED_SINCE, RECORDING_VERSION, SCHEMA_VERSION
from exclusive_xcom.ledger.schema import fence, item, meta
from tests.conftest import drop_ledger_database, new_ledger_database
from tests.integration.conftest import rows as item_rows
from tests.integration.conftest import text

pytestmark = pytest.mark.timeout(120)

CLAIMABLE_INDEX = "ix_exclusive_xcom_item_claimable"
DAG, RUN = "migrate_dag", "manual__1"
OUTPUT = Output(DAG, RUN, "produce")
CONSUMERS = (consumer_slot(DAG, "drain"),)
REQUEST = ClaimRequest(Written(OUTPUT, 1, ITEMS, CONSUMERS), limit=5)
MIGRATORS = 8


def _indexes(engine: sa.Engine) -> set[str | None]:
    # A new connection: an SQLite connection's PRAGMA index_list does not see indexes
    # created by another connection after it first read the schema.
    fresh = sa.create_engine(engine.url, poolclass=sa.NullPool)
    try:
        return {ix["name"] for ix in sa.inspect(fresh).get_indexes(item.name)}
    finally:
        fresh.dispose()


def _columns(engine: sa.Engine) -> set[str]:
    fresh = sa.create_engine(engine.url, poolclass=sa.NullPool)
    try:
        return {c["name"] for c in sa.inspect(fresh).get_columns(item.name)}
    finally:
        fresh.dispose()


def _meta_rows(engine: sa.Engine) -> list[tuple[str, str]]:
    """The meta rows but ``recorded_since`` (a time): see :func:`_recorded_since`."""
    with engine.connect() as conn:
        found = conn.execute(sa.select(meta.c.name, meta.c.value).where(meta.c.name != RECORDED_SINCE))
        return sorted((r.name, r.value) for r in found)


def _recorded_since(engine: sa.Engine) -> datetime | None:
    with engine.connect() as conn:
        value = conn.execute(sa.select(meta.c.value).where(meta.c.name == RECORDED_SINCE)).scalar()
        return None if value is None else datetime.fromisoformat(value)


#: The columns version 8 added to the item table: who claimed and who consumed.
RECORD_COLUMNS = ["owner_ti_id", "owner_host", "consumed_ti_id", "consumed_host"]


def _make_version(engine: sa.Engine, version: int) -> str:
    """What Ledger.migrate() of version ``version`` left behind: its tables, indexes, version
    number and secret (the steps are frozen: ``MIGRATIONS[:version]`` is that version)."""
    secret = secrets.token_hex(32)
    with engine.begin() as conn:
        for step in MIGRATIONS[:version]:
            step(conn)
        conn.execute(sa.insert(meta).values(name="schema_version", value=str(version)))
        conn.execute(sa.insert(meta).values(name="signing_secret", value=secret))
    return secret


def _make_v1(engine: sa.Engine) -> str:
    """What a version-1 Ledger.migrate() left behind: v1 tables, version 1, its secret."""
    return _make_version(engine, 1)


def _claim_as_v1(engine: sa.Engine, holder: Claimant, n: int) -> list[int]:
    """A claim as version-1 code wrote it (today's claim path needs later tables)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with engine.begin() as conn:
        ids = list(conn.execute(sa.select(item.c.id).order_by(item.c.seq).limit(n)).scalars())
        conn.execute(
            sa.update(item)
            .where(item.c.id.in_(ids))
            .values(
                state="claimed",
                owner_dag_id=holder.dag_id,
                owner_run_id=holder.run_id,
                owner_task_id=holder.task_id,
                owner_map_index=holder.map_index,
                owner_try=holder.try_number,
                claimed_at=now,
                lease_expires_at=now + timedelta(minutes=5),
            )
        )
    return ids


def _produce_as_v1(engine: sa.Engine, n: int) -> None:
    """Items as version-1 code inserted them (today's rows carry later columns)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = [
        {
            "output_id": OUTPUT.output_id,
            "dag_id": OUTPUT.dag_id,
            "run_id": OUTPUT.run_id,
            "task_id": OUTPUT.task_id,
            "map_index": OUTPUT.map_index,
            "key": OUTPUT.key,
            "generation": 1,
            "mode": ITEMS,
            "consumers": json.dumps(sorted(CONSUMERS)),
            "slot": "*",
            "seq": i,
            "payload": f"v-{i}".encode(),
            "payload_size": len(f"v-{i}"),
            "state": "ready",
            "created_at": now,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(item), rows)


def _produce(ledger: Ledger, n: int) -> None:
    assert ledger.produce(Production(Written(OUTPUT, 1, ITEMS, CONSUMERS), [f"v-{i}".encode() for i in range(n)])) == n


def test_a_version_1_ledger_is_upgraded_in_place_keeping_its_rows(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    ledger = Ledger(engine)
    secret = _make_v1(engine)
    _produce_as_v1(engine, 12)
    holder = Claimant(DAG, RUN, "drain", map_index=0)
    held = _claim_as_v1(engine, holder, 5)  # a claim in flight across the upgrade
    with engine.connect() as conn:  # read as version-1 code would: today's items() wants later columns
        before = sorted(tuple(r) for r in conn.execute(sa.select(item.c.id, item.c.seq, item.c.state)))
    assert ledger.schema_version() == 1
    assert CLAIMABLE_INDEX not in _indexes(engine)
    assert "payload_sha256" not in _columns(engine)
    assert SCHEMA_VERSION >= 2

    assert ledger.migrate() == SCHEMA_VERSION

    assert ledger.schema_version() == SCHEMA_VERSION
    assert CLAIMABLE_INDEX in _indexes(engine)
    assert "payload_sha256" in _columns(engine)
    assert _meta_rows(engine) == [("schema_version", str(SCHEMA_VERSION)), ("signing_secret", secret)]
    assert sorted((r["id"], r["seq"], r["state"]) for r in ledger.items()) == before
    assert ledger.counts() == {"claimed": 5, "ready": 7}
    # The claim made under version 1 is still good, and the rest can be drained.
    ledger.finish(holder, held)
    other = Claimant(DAG, RUN, "drain", map_index=1)
    rest = ledger.claim(other, [ClaimRequest(Written(OUTPUT, 1, ITEMS, CONSUMERS), limit=100)]).claims[0]
    assert [text(p) for p in rest.payloads] == [f"v-{i}" for i in range(5, 12)]
    ledger.finish(other, rest.ids)
    assert ledger.counts() == {"consumed": 12}

    # Idempotent: migrating again changes nothing.
    assert ledger.migrate() == SCHEMA_VERSION
    assert ledger.migrate() == SCHEMA_VERSION
    assert _meta_rows(engine) == [("schema_version", str(SCHEMA_VERSION)), ("signing_secret", secret)]
    assert ledger.secret() == bytes.fromhex(secret)
    assert ledger.counts() == {"consumed": 12}
    engine.dispose()


def test_a_version_6_fence_learns_to_remember_finishes_keeping_its_rows(ledger_url: str) -> None:
    """Version 7 adds the finish record to the fence rows of a ledger already in use."""
    engine = create_engine(ledger_url)
    ledger = Ledger(engine)
    ledger.migrate()
    holder = Claimant(DAG, RUN, "drain", map_index=0, try_number=3)
    ledger.enter(holder)
    with engine.begin() as conn:  # back to what version 6 code left behind
        for column in ("finished_try", "finished_inputs"):
            conn.execute(sa.text(f"ALTER TABLE {fence.name} DROP COLUMN {column}"))
        conn.execute(sa.update(meta).where(meta.c.name == "schema_version").values(value="6"))
    engine.dispose()

    assert ledger.migrate() == SCHEMA_VERSION
    with pytest.raises(ClaimConflictError, match="try 3 of the same task instance has begun"):
        ledger.enter(Claimant(DAG, RUN, "drain", map_index=0, try_number=2))  # its fence row survived
    _produce(ledger, 2)
    held = ledger.claim(holder, [ClaimRequest(Written(OUTPUT, 1, ITEMS, CONSUMERS), limit=100)]).ids
    ledger.finish(holder, held, inputs=[(OUTPUT, 1)])
    assert ledger.enter(Claimant(DAG, RUN, "drain", map_index=0, try_number=4)) == Finished(
        3, inputs_key([(OUTPUT, 1)])
    )
    engine.dispose()


@pytest.mark.parametrize("start", range(1, RECORDING_VERSION))
def test_a_ledger_of_every_earlier_version_is_upgraded_and_then_records_who_claims(ledger_url: str, start: int) -> None:
    """From any version: the rows and a claim in flight survive; from then on claims and consumes
    record their task instance and host, and the ledger says since when (older ones record none)."""
    engine = create_engine(ledger_url)
    ledger = Ledger(engine)
    secret = _make_version(engine, start)
    _produce_as_v1(engine, 5)
    holder = Claimant(DAG, RUN, "drain", map_index=0, ti_id="0190a0a0-0000-7000-8000-000000000001", host="w1")
    held = _claim_as_v1(engine, holder, 2)  # claimed by older code: it recorded nobody
    assert ledger.schema_version() == start
    assert not set(RECORD_COLUMNS) & _columns(engine)
    before = datetime.now(timezone.utc).replace(tzinfo=None)

    assert ledger.migrate() == SCHEMA_VERSION

    assert set(RECORD_COLUMNS) <= _columns(engine)
    assert _meta_rows(engine) == [("schema_version", str(SCHEMA_VERSION)), ("signing_secret", secret)]
    since = ledger.recorded_since()
    assert since is not None and since >= before - timedelta(seconds=1)
    ledger.finish(holder, held)  # the claim made before the upgrade is still good
    other = Claimant(DAG, RUN, "drain", map_index=1, ti_id="0190a0a0-0000-7000-8000-000000000002", host="w2")
    rest = ledger.claim(other, [REQUEST]).ids
    ledger.finish(other, rest)
    made = {
        i: (r["owner_ti_id"], r["owner_host"], r["consumed_ti_id"], r["consumed_host"])
        for i, r in item_rows(engine).items()
    }
    assert {i: made[i] for i in held} == dict.fromkeys(held, (None, None, holder.ti_id, "w1"))
    assert {i: made[i] for i in rest} == dict.fromkeys(rest, (other.ti_id, "w2", other.ti_id, "w2"))
    assert ledger.counts() == {"consumed": 5}
    assert ledger.migrate() == SCHEMA_VERSION and ledger.recorded_since() == since, "stamped once"
    engine.dispose()


def test_a_version_8_ledger_learns_to_tell_released_items_apart(ledger_url: str) -> None:
    """Version 9 adds released_at: rows from before read as never released; from then on a
    claim given back (by its try, or by an operator) is recorded, and stays claimable."""
    engine = create_engine(ledger_url)
    _make_version(engine, 8)
    _produce_as_v1(engine, 4)
    holder = Claimant(DAG, RUN, "drain", map_index=0)
    held = _claim_as_v1(engine, holder, 2)
    assert "released_at" not in _columns(engine)

    ledger = Ledger(engine)
    assert ledger.migrate() == SCHEMA_VERSION
    assert all(r["released_at"] is None for r in ledger.items()), "nothing was released before"
    assert ledger.release(holder, held[:1]) == 1 and ledger.release_any(held[1:]) == 1
    released = {r["id"]: r for r in ledger.items() if r["released_at"] is not None}
    assert set(released) == set(held) and all(r["state"] == "ready" for r in released.values())
    other = Claimant(DAG, RUN, "drain", map_index=1)
    again = ledger.claim(other, [REQUEST]).ids
    assert set(held) <= set(again), "a released item is claimable as any ready one"
    ledger.finish(other, again)
    assert ledger.counts() == {"consumed": 4}
    engine.dispose()


def test_a_version_10_ledger_leaves_more_room_for_hot_claims(ledger_url: str) -> None:
    """Version 11 lowers the item table's fillfactor on PostgreSQL (pages written from then on
    keep room for claimed versions); elsewhere only the version moves. Rows and a claim in
    flight survive, and the ledger drains as before."""
    engine = create_engine(ledger_url)
    _make_version(engine, 10)
    _produce_as_v1(engine, 6)
    holder = Claimant(DAG, RUN, "drain", map_index=0)
    held = _claim_as_v1(engine, holder, 2)

    ledger = Ledger(engine)
    assert ledger.migrate() == SCHEMA_VERSION

    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = :t"), {"t": item.name})
            assert options.scalar() == ["fillfactor=45"]
    ledger.finish(holder, held)
    other = Claimant(DAG, RUN, "drain", map_index=1)
    rest = ledger.claim(other, [REQUEST]).ids
    assert len(rest) == 4
    ledger.finish(other, rest)
    assert ledger.counts() == {"consumed": 6}
    engine.dispose()


def test_a_fresh_database_is_created_at_the_current_version(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    ledger = Ledger(engine)
    assert not sa.inspect(engine).has_table(item.name)
    assert ledger.schema_version() == 0
    with pytest.raises(LedgerError, match=r"^the claim ledger has no schema yet: run `exclusive-xcom db migrate`"):
        ledger.secret()

    assert ledger.migrate() == SCHEMA_VERSION

    assert ledger.schema_version() == SCHEMA_VERSION
    assert CLAIMABLE_INDEX in _indexes(engine)
    assert ledger.recorded_since() is None, "a new ledger records who claims from the start"
    secret = ledger.secret()
    assert len(secret) == 32
    assert ledger.migrate() == SCHEMA_VERSION
    assert ledger.secret() == secret
    engine.dispose()


def _migrate_concurrently(url: str) -> list[int]:
    """MIGRATORS threads, each with its own engine and pool, call migrate() at once."""
    barrier = threading.Barrier(MIGRATORS)
    results: list[int | BaseException] = [RuntimeError("did not finish")] * MIGRATORS
    engines = [create_engine(url) for _ in range(MIGRATORS)]

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = Ledger(engines[i]).migrate()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(MIGRATORS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for engine in engines:
        engine.dispose()
    assert not any(t.is_alive() for t in threads), "a migrator hung"
    failures = [f"migrator {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not failures, "concurrent migrations failed:\n" + "\n".join(failures)
    return [r for r in results if isinstance(r, int)]


@pytest.mark.parametrize("start", ["fresh", "v1"])
def test_concurrent_migrators_all_succeed_and_agree(backend: str, tmp_path: Path, start: str) -> None:
    # Several rounds, each on a new database: the interleavings differ from round to round.
    for round_ in range(3):
        (tmp_path / f"r{round_}").mkdir()
        url = new_ledger_database(backend, tmp_path / f"r{round_}")
        try:
            engine = create_engine(url)
            secret = None
            if start == "v1":
                secret = _make_v1(engine)
                _produce_as_v1(engine, 3)

            assert _migrate_concurrently(url) == [SCHEMA_VERSION] * MIGRATORS

            found = _meta_rows(engine)
            # Migrating stores no key: a ledger made by older code keeps the one it had.
            expected = [] if secret is None else [("signing_secret", secret)]
            assert found == [("schema_version", str(SCHEMA_VERSION)), *expected], found
            assert (_recorded_since(engine) is None) == (secret is None), "only an upgrade says since when"
            assert CLAIMABLE_INDEX in _indexes(engine)
            ledger = Ledger(engine)
            assert ledger.counts() == ({"ready": 3} if start == "v1" else {})
            _produce(ledger, 4)  # replaces the 3 unconsumed ones
            assert len(ledger.claim(Claimant(DAG, RUN, "drain"), [REQUEST]).ids) == 4
            engine.dispose()
        finally:
            drop_ledger_database(url)


# -- the configured ledger -------------------------------------------------------------------


@pytest.fixture
def clean_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No [exclusive_xcom] option from the environment, a private $AIRFLOW_HOME, and a
    fresh per-process "schema already made" cache."""
    for name in config.OPTIONS:
        monkeypatch.delenv(f"AIRFLOW__{config.SECTION.upper()}__{name.upper()}", raising=False)
    home = tmp_path / "airflow_home"
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setattr(wiring, "_ready", set())
    yield home


def _forget_engine(url: str) -> None:
    if (engine := _engines.pop(url, None)) is not None:
        engine.dispose()


def test_get_ledger_from_the_environment_makes_the_schema_on_first_use(
    clean_config: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str
) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", ledger_url)
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__LEASE_SECONDS", "42")
    probe = create_engine(ledger_url)
    assert not sa.inspect(probe).has_table(item.name)

    ledger = wiring.get_ledger()

    assert ledger.engine.url.render_as_string(hide_password=False) == ledger_url
    assert ledger.lease_seconds == 42
    assert ledger.schema_version() == SCHEMA_VERSION
    assert CLAIMABLE_INDEX in _indexes(probe)
    again = wiring.get_ledger()
    assert again.engine is ledger.engine, "one engine per process and URL"
    _produce(again, 2)
    assert len(again.claim(Claimant(DAG, RUN, "drain"), [REQUEST]).ids) == 2
    assert not (clean_config / "exclusive_xcom.db").exists(), "an SQLite ledger was made although a URL is set"
    probe.dispose()


def test_get_ledger_with_nothing_set_is_an_sqlite_file_under_airflow_home(clean_config: Path) -> None:
    from airflow.configuration import conf

    # Airflow's config object is built once per process; it must not hold a ledger URL.
    assert (conf.get("exclusive_xcom", "sql_alchemy_conn", fallback="") or "") == ""
    assert (conf.get("exclusive_xcom", "conn_id", fallback="") or "") == ""
    path = clean_config / "exclusive_xcom.db"
    url = f"sqlite:///{path}"
    assert not path.exists()
    try:
        ledger = wiring.get_ledger()

        assert ledger.engine.url.render_as_string(hide_password=False) == url
        assert path.is_file()
        assert ledger.schema_version() == SCHEMA_VERSION
        assert CLAIMABLE_INDEX in _indexes(ledger.engine)
        _produce(ledger, 1)
        assert len(ledger.claim(Claimant(DAG, RUN, "drain"), [REQUEST]).ids) == 1
        # A second process (a fresh cache) finds the schema already there and keeps it.
        secret = ledger.secret()
        wiring._ready.clear()
        assert wiring.get_ledger().secret() == secret
    finally:
        _forget_engine(url)
