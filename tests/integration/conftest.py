"""Fixtures and helpers of the integration tier: a real ledger on a fresh database per test.

``ledger`` is migrated and runs on the fake ``clock`` (lease expiry is tested by moving
time, not by sleeping) with ``lease_seconds``; a module overrides either fixture when it
needs real time or short leases. ``store`` is a real ``file://`` object store and ``codec``
encrypts under a test key and offloads anything over :data:`THRESHOLD` bytes. Claimants
and slots all belong to DAG :data:`DAG`, run :data:`RUN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom.crypto import keyring_from
from exclusive_xcom.ledger import Claimant, ClaimRequest, Ledger, Output, Production, Stored, Written, consumer_slot
from exclusive_xcom.ledger.schema import SCHEMA_VERSION, item
from exclusive_xcom.payload import Codec
from exclusive_xcom.storage import BlobStore

DAG = "etl"
RUN = "manual__2024-05-01T00:00:00+00:00"
THRESHOLD = 1000  # bytes: a stored payload above this goes to the object store
EXTRACT = Output(DAG, RUN, "extract")
OTHER = Output(DAG, RUN, "other")


@pytest.fixture
def lease_seconds() -> float:
    return 60.0


@pytest.fixture
def ledger(engine: sa.Engine, clock: Callable[[], float], lease_seconds: float) -> Ledger:
    """A migrated ledger on this test's fresh database."""
    ledger = Ledger(engine, lease_seconds=lease_seconds, clock=clock)
    assert ledger.migrate() == SCHEMA_VERSION
    return ledger


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(f"file://{tmp_path}/blobs")


@pytest.fixture
def codec(store: BlobStore) -> Codec:
    return Codec(keyring_from("test-key", ""), THRESHOLD, store)


def output(task_id: str) -> Output:
    """The exclusive output of ``task_id`` in :data:`DAG` / :data:`RUN`."""
    return Output(DAG, RUN, task_id)


def slot(task_id: str) -> str:
    """The consumer slot of ``task_id`` of :data:`DAG`."""
    return consumer_slot(DAG, task_id)


def who(task_id: str, try_number: int = 1, map_index: int = -1) -> Claimant:
    """Try ``try_number`` of task instance ``task_id[map_index]`` of :data:`RUN`, as a claimant."""
    return Claimant(DAG, RUN, task_id, map_index, try_number)


def production(
    mode: str, consumers: Iterable[str], payloads: Iterable[Any], *, output: Output = EXTRACT, generation: int = 1
) -> Production:
    """What ``output`` writes for the named consumer tasks (slots of :data:`DAG`)."""
    return Production(Written(output, generation, mode, tuple(slot(c) for c in consumers)), payloads)


def request(
    mode: str, consumers: Iterable[str], *, output: Output = EXTRACT, generation: int = 1, limit: int = 100
) -> ClaimRequest:
    """A claim of ``output`` as the producer declared it (mode and consumer tasks)."""
    return ClaimRequest(Written(output, generation, mode, tuple(slot(c) for c in consumers)), limit)


def schema_version(url: str) -> int:
    """The schema version of the ledger at ``url``, read through a short-lived engine."""
    from exclusive_xcom.ledger import create_engine

    engine = create_engine(url)
    try:
        return Ledger(engine).schema_version()
    finally:
        engine.dispose()


def rows(source: Ledger | sa.Engine) -> dict[int, dict[str, Any]]:
    """Every row of the item table by id, payload included (``Ledger.items`` leaves payloads out)."""
    engine = source.engine if isinstance(source, Ledger) else source
    with engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(sa.select(item).order_by(item.c.id))}


def inline(payload: Stored) -> bytes:
    """A claimed payload that the ledger kept inline (every small one), as its bytes."""
    assert isinstance(payload, bytes), f"expected an inline payload, got {payload!r}"
    return payload


def text(payload: Stored) -> str:
    """A claimed inline payload, as text."""
    return inline(payload).decode()


def files(store: BlobStore) -> set[str]:
    """Every blob in the store, as the URIs the ledger holds."""
    root = Path(store.uri.removeprefix("file://"))
    return {f"file://{p}" for p in root.rglob("*.blob")} if root.exists() else set()


# -- server sessions, for fault injection ----------------------------------------------------


def server_sessions(conn: sa.Connection, kind: str, database: str) -> list[int]:
    """Server-side ids of every other session connected to ``database``."""
    if kind == "postgres":
        sql = "SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
    else:
        sql = "SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"
    return [row[0] for row in conn.execute(sa.text(sql), {"db": database})]


def kill_session(conn: sa.Connection, kind: str, session: int) -> bool:
    """Drop one server session (a fault injection); False if it had ended by itself."""
    try:
        if kind == "postgres":
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
        else:
            conn.execute(sa.text(f"KILL CONNECTION {int(session)}"))
        return True
    except sa.exc.DBAPIError as exc:  # MariaDB: "unknown thread id" when it is already gone
        if "unknown thread" not in str(exc).lower():
            raise
        return False
