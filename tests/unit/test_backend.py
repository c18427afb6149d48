"""``ExclusiveXComBackend`` without an Airflow run: delegation, the reader rules, purge, claim_xcom.

Real classes throughout: Airflow's ``BaseXCom``, the common-io provider's object-storage
backend writing to a temporary folder, a real SQLite ledger; a running task is stood in
for by the context Airflow's task runner would set (``set_current_context``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from airflow.providers.common.io.xcom import backend as object_storage
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk.bases.xcom import BaseXCom, _XComValueWrapper
from airflow.sdk.execution_time.comms import XComResult
from airflow.sdk.execution_time.context import set_current_context

from exclusive_xcom import NotAuthorizedError, PayloadError
from exclusive_xcom.backend import ExclusiveXComBackend, base_backend, may_read
from exclusive_xcom.errors import ConfigurationError
from exclusive_xcom.handle import RESERVED_KEY, is_handle
from exclusive_xcom.runtime import open_session

OBJECT_STORAGE = "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend"
PRODUCER = ("d", "r", "extract")
CONSUMERS = ("d/transform", "child/ingest")
SUFFIX = "[dag='d' run='r' producer='extract' key='return_value' consumer='{}']"


@pytest.fixture(autouse=True)
def configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A fresh ledger and object-storage folder; option caches cleared before and after."""
    for name in ("CONN_ID", "BASE_XCOM_BACKEND"):
        monkeypatch.delenv(f"AIRFLOW__EXCLUSIVE_XCOM__{name}", raising=False)
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "unit-key")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH", f"file://{tmp_path / 'offload'}")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES", "100")
    monkeypatch.setenv("AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH", f"file://{tmp_path / 'xcom'}")
    monkeypatch.setenv("AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD", "0")
    _clear_caches()
    yield tmp_path
    _clear_caches()


def _clear_caches() -> None:
    base_backend.cache_clear()
    for cached in (object_storage._get_base_path, object_storage._get_threshold, object_storage._get_compression):
        cached.cache_clear()


def _ti(dag_id: str, task_id: str) -> SimpleNamespace:
    return SimpleNamespace(dag_id=dag_id, run_id="r", task_id=task_id, map_index=-1, try_number=1)


def running(task_id: str) -> AbstractContextManager[Any]:
    """Inside task d/r/``task_id``, as the task runner sets it while rendering and executing."""
    return set_current_context({"ti": _ti("d", task_id), "task": None})  # type: ignore[typeddict-item]


def _produce(value: Any) -> dict[str, Any]:
    """Write an exclusive output of d/r/extract to the ledger, as the decorator does; its handle."""
    context = {"ti": _ti("d", "extract")}
    session = open_session(context)
    production, handle = session.production(value, "each", CONSUMERS)
    session.finish([production])
    return handle.to_xcom(session.env.keyring)


def _stored(wire: dict[str, Any]) -> _XComValueWrapper:
    """What a reader gets back from Airflow for a pushed handle (``get_all`` passes this wrapper)."""
    return _XComValueWrapper(ExclusiveXComBackend.serialize_value(wire, key=RESERVED_KEY))


def _ledger(tmp_path: Path) -> list[dict[str, Any]]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}", poolclass=sa.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM exclusive_xcom_item")).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# -- composition ----------------------------------------------------------------------------


def test_without_base_xcom_backend_plain_values_go_through_airflows_base_xcom() -> None:
    assert base_backend() is BaseXCom
    raw = ExclusiveXComBackend.serialize_value((1, "a"), key="return_value")
    assert raw == BaseXCom.serialize_value((1, "a"))
    assert ExclusiveXComBackend.deserialize_value(_XComValueWrapper(raw)) == (1, "a")


def test_plain_values_go_to_the_wrapped_object_storage_backend_and_are_purged_by_it(
    monkeypatch: pytest.MonkeyPatch, configured: Path
) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__BASE_XCOM_BACKEND", OBJECT_STORAGE)
    raw = ExclusiveXComBackend.serialize_value(list(range(100)), key="return_value", dag_id="d", run_id="r")

    (file,) = _files(configured / "xcom")
    assert raw == f"file://{file}", "only the path is stored in Airflow's table"
    assert ExclusiveXComBackend.deserialize_value(_XComValueWrapper(raw)) == list(range(100))
    ExclusiveXComBackend.purge(XComResult(key="return_value", value=raw))
    assert _files(configured / "xcom") == []


def test_a_handle_stays_inline_even_when_the_wrapped_backend_would_offload_everything(
    monkeypatch: pytest.MonkeyPatch, configured: Path
) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__BASE_XCOM_BACKEND", OBJECT_STORAGE)
    wire = _produce({"rows": [1, 2, 3]})

    stored = _stored(wire)
    assert stored.value == wire and is_handle(stored.value)
    assert _files(configured / "xcom") == [], "the threshold is 0, yet the handle was not offloaded"
    assert ExclusiveXComBackend.deserialize_value(stored) == wire, "outside a task a handle can be read"


@pytest.mark.parametrize(
    "path,error",
    [
        ("builtins.dict", "is not a subclass of BaseXCom"),
        ("exclusive_xcom.backend.ExclusiveXComBackend", "is this backend itself"),
        ("no_such_module.Backend", "cannot be imported"),
    ],
)
def test_a_bad_base_xcom_backend_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, path: str, error: str) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__BASE_XCOM_BACKEND", path)
    with pytest.raises(ConfigurationError, match=rf"base_xcom_backend = '{path}' {error}"):
        ExclusiveXComBackend.serialize_value([1])


# -- who may read a handle ------------------------------------------------------------------


def test_named_consumers_may_read_other_tasks_may_not() -> None:
    assert may_read("d", CONSUMERS, "d", "transform", None)
    assert may_read("d", CONSUMERS, "child", "ingest", None)
    assert not may_read("d", CONSUMERS, "d", "peek", PythonOperator(task_id="peek", python_callable=print))
    assert not may_read("d", CONSUMERS, "child", "other", None)


def test_a_trigger_of_the_producers_dag_may_carry_the_handle_to_a_consumer_dag_only() -> None:
    def trigger(target: str) -> TriggerDagRunOperator:
        return TriggerDagRunOperator(task_id="trigger", trigger_dag_id=target)

    assert may_read("d", CONSUMERS, "d", "trigger", trigger("child"))
    assert not may_read("d", CONSUMERS, "d", "trigger", trigger("elsewhere")), "not a consumer's DAG"
    assert not may_read("d", CONSUMERS, "d", "trigger", trigger("d")), "its own DAG's consumers read XCom"
    assert not may_read("d", CONSUMERS, "x", "trigger", trigger("child")), "a trigger in another DAG"
    mapped = TriggerDagRunOperator.partial(task_id="trigger", trigger_dag_id="child").expand(conf=[{}])
    assert may_read("d", CONSUMERS, "d", "trigger", mapped), "while a mapped trigger expands its arguments"


def test_inside_a_task_a_non_consumer_pull_is_refused_naming_task_and_producer() -> None:
    stored = _stored(_produce({"rows": [1]}))
    with running("peek"), pytest.raises(NotAuthorizedError) as caught:
        ExclusiveXComBackend.deserialize_value(stored)
    message = str(caught.value)
    assert "task 'peek' of dag 'd' may not read the exclusive handle of 'extract'" in message
    assert "allowed: child/ingest, d/transform" in message and message.endswith(SUFFIX.format("d/peek"))

    with running("transform"):
        assert ExclusiveXComBackend.deserialize_value(stored) == stored.value


def test_inside_a_task_a_forged_handle_is_refused() -> None:
    wire = {**_produce({"rows": [1]}), "consumers": ["d/peek"]}
    with running("peek"), pytest.raises(PayloadError, match="signature mismatch"):
        ExclusiveXComBackend.deserialize_value(_stored(wire))


# -- purge ------------------------------------------------------------------------------------


def test_purging_a_handle_deletes_its_items_and_blob(configured: Path) -> None:
    wire = _produce({"rows": list(range(100))})  # above the 100-byte offload threshold
    assert len(_ledger(configured)) == len(CONSUMERS) and len(_files(configured / "offload")) == 1

    ExclusiveXComBackend.purge(XComResult(key=RESERVED_KEY, value=_stored(wire).value))

    assert _ledger(configured) == [] and _files(configured / "offload") == []


def test_purging_a_forged_handle_deletes_nothing_and_does_not_break_the_purge(
    configured: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wire = _produce({"rows": list(range(100))})
    forged = {**wire, "sig": "0" * 64}

    with caplog.at_level(logging.WARNING, logger="exclusive_xcom"):
        ExclusiveXComBackend.purge(XComResult(key=RESERVED_KEY, value=forged))

    assert "the purged handle of extract was not forgotten" in caplog.text and "signature mismatch" in caplog.text
    assert len(_ledger(configured)) == len(CONSUMERS) and len(_files(configured / "offload")) == 1


# -- claim_xcom -------------------------------------------------------------------------------


def test_claim_xcom_outside_a_task_is_refused() -> None:
    with pytest.raises(NotAuthorizedError, match="call it inside a task"):
        ExclusiveXComBackend.claim_xcom("extract", "transform")


def test_a_task_cannot_claim_on_behalf_of_another(configured: Path) -> None:
    wire = _produce({"rows": [1]})
    with running("peek"):
        for key in ("extract", wire):
            with pytest.raises(NotAuthorizedError) as caught:
                ExclusiveXComBackend.claim_xcom(key, "transform")
            message = str(caught.value)
            assert "task 'peek' of dag 'd' cannot claim on behalf of 'transform'" in message
            assert message.endswith(SUFFIX.format("d/peek"))
    assert {r["state"] for r in _ledger(configured)} == {"ready"}, "nothing was claimed"


def test_claim_xcom_refuses_a_mapping_that_is_not_a_handle() -> None:
    with running("transform"), pytest.raises(PayloadError, match="not an exclusive_xcom handle"):
        ExclusiveXComBackend.claim_xcom({"rows": [1]}, "transform")
