"""``ExclusiveXComBackend``: an optional XCom backend that guards exclusive handles.

Set it with ``[core] xcom_backend = exclusive_xcom.backend.ExclusiveXComBackend``. It
adds three things to whatever XCom backend is already in use:

- a task that is not a named consumer cannot even *read* an exclusive handle
  (``xcom_pull`` raises :class:`NotAuthorizedError`), so the reserved key is no longer a
  side door; the ledger's claim stays the real gate, this makes misuse fail early;
- when Airflow purges a handle (a task instance starts a new try, or is cleared), its
  ledger rows and blobs are deleted too, instead of waiting for retention;
- every other XCom goes to ``[exclusive_xcom] base_xcom_backend`` (default: Airflow's
  ``BaseXCom``), e.g. the common-io provider's object-storage backend: it composes
  rather than replaces. Handles themselves are always stored inline.

Airflow imports this module while ``airflow.sdk`` is still being imported (the backend
is resolved then), so everything beyond the handle helpers is imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from functools import cache
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom

from exclusive_xcom.handle import is_handle

log = logging.getLogger("exclusive_xcom")

__all__ = ["ExclusiveXComBackend"]


@cache
def base_backend() -> type[BaseXCom]:
    """The backend every non-exclusive XCom is delegated to (read once per process)."""
    from airflow.sdk.module_loading import import_string  # type: ignore[attr-defined]  # public path, lacks __all__

    from exclusive_xcom.config import BASE_XCOM_BACKEND, read_text
    from exclusive_xcom.errors import ConfigurationError

    path = read_text(BASE_XCOM_BACKEND)
    if not path:
        return BaseXCom
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(f"[exclusive_xcom] base_xcom_backend = {path!r} cannot be imported: {exc}") from exc
    if not isinstance(cls, type) or not issubclass(cls, BaseXCom):
        raise ConfigurationError(f"[exclusive_xcom] base_xcom_backend = {path!r} is not a subclass of BaseXCom")
    if issubclass(cls, ExclusiveXComBackend):
        raise ConfigurationError(
            f"[exclusive_xcom] base_xcom_backend = {path!r} is this backend itself; name the backend it wraps "
            "(or leave it empty for Airflow's BaseXCom)"
        )
    return cls


class ExclusiveXComBackend(BaseXCom):
    """Refuses handle reads by non-consumers, forgets purged handles, delegates the rest."""

    @classmethod
    def serialize_value(
        cls,
        value: Any,
        *,
        key: str | None = None,
        task_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        map_index: int | None = None,
    ) -> Any:
        """Handles inline (tiny, and never to be offloaded); everything else to the base backend."""
        if is_handle(value):
            return BaseXCom.serialize_value(value)
        return base_backend().serialize_value(
            value, key=key, task_id=task_id, dag_id=dag_id, run_id=run_id, map_index=map_index
        )

    @classmethod
    def deserialize_value(cls, result: Any) -> Any:
        """A handle is returned only to a reader it allows; ``result`` may only have ``.value``."""
        if not is_handle(getattr(result, "value", None)):
            return base_backend().deserialize_value(result)
        value = BaseXCom.deserialize_value(result)
        check_reader(value)
        return value

    @classmethod
    def purge(cls, xcom: Any, *args: Any) -> None:
        """Airflow drops this XCom: a handle takes its ledger items and blobs with it."""
        value = getattr(xcom, "value", None)
        if is_handle(value):
            _forget(BaseXCom.deserialize_value(xcom))
        else:
            base_backend().purge(xcom, *args)

    @classmethod
    def claim_xcom(cls, key: str | Mapping[str, Any], consumer_id: str, *, dag_id: str | None = None) -> Any:
        """Claim an exclusive output as the running task; the same operation as :func:`exclusive_xcom.claim`.

        ``key`` is the producer's task id (its handle is pulled from this run's XCom, or
        from ``conf[key]`` when ``dag_id`` names another DAG), or a handle mapping the
        caller already holds (e.g. taken from ``dag_run.conf``). ``consumer_id`` must be
        the running task (its task id, or ``dag_id/task_id``): a task cannot claim on
        behalf of another, because the claim, its lease and its consumption belong to the
        task instance that runs.
        """
        context = _claiming_context(key, consumer_id, dag_id)
        if isinstance(key, str):
            from exclusive_xcom.api import claim

            return claim(key, dag_id=dag_id)
        return _claim_handle(context, key, dag_id)


# -- who may read a handle ------------------------------------------------------------------


def check_reader(value: Mapping[str, Any]) -> None:
    """Raise :class:`NotAuthorizedError` if the running task may not read this handle.

    Outside any task (API server, CLI, a test reading the table) reading is allowed:
    a handle is not the data, and there is no task identity to check.
    """
    context = _running_context()
    if context is None:
        return
    from exclusive_xcom import handle as handles
    from exclusive_xcom.errors import NotAuthorizedError
    from exclusive_xcom.ledger import consumer_slot
    from exclusive_xcom.wiring import env

    h = handles.parse(value, env().keyring)  # a forged handle is refused (PayloadError) before anything else
    ti = context["ti"]
    if may_read(h.output.dag_id, h.consumers, ti.dag_id, ti.task_id, context.get("task")):
        return
    reader = consumer_slot(ti.dag_id, ti.task_id)
    allowed = ", ".join(sorted(h.consumers)) or "nobody"
    raise NotAuthorizedError(
        f"task {ti.task_id!r} of dag {ti.dag_id!r} may not read the exclusive handle of "
        f"{h.output.producer!r}: it is not a named consumer (allowed: {allowed}); add it to consumers= "
        f"of {h.output.task_id!r}",
        h.output.ref(reader),
    )


def may_read(producer_dag: str, consumers: Collection[str], dag_id: str, task_id: str, task: Any) -> bool:
    """Named consumers, and a producer-DAG ``TriggerDagRunOperator`` carrying it to a consumer DAG."""
    from exclusive_xcom.ledger import consumer_slot

    if consumer_slot(dag_id, task_id) in consumers:
        return True
    if dag_id != producer_dag:
        return False
    target = trigger_target(task)
    consumer_dags = {slot.split("/", 1)[0] for slot in consumers} - {producer_dag}
    return target is not None and target in consumer_dags


def trigger_target(task: Any) -> str | None:
    """The DAG a ``TriggerDagRunOperator`` (plain or mapped) triggers; None for any other task."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    target: Any
    if isinstance(task, TriggerDagRunOperator):
        target = task.trigger_dag_id
    elif _is_subclass(getattr(task, "operator_class", None), TriggerDagRunOperator):
        target = getattr(task, "partial_kwargs", {}).get("trigger_dag_id")
    else:
        return None
    return target if isinstance(target, str) else None


def _is_subclass(cls: Any, base: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, base)


def _running_context() -> Mapping[str, Any] | None:
    from airflow.sdk import get_current_context

    try:
        return get_current_context()
    except RuntimeError:  # "no context was found": not inside a running task
        return None


# -- purge ------------------------------------------------------------------------------------


def _forget(value: Mapping[str, Any]) -> None:
    """Delete what a purged handle points at; never let a failure break Airflow's purge.

    A forged handle deletes nothing (``forget`` verifies the signature first); an
    unreachable ledger leaves the rows to the producer's next run or to retention.
    """
    from exclusive_xcom.errors import ExclusiveXComError
    from exclusive_xcom.runtime import forget

    try:
        forget(value)
    except ExclusiveXComError as exc:
        log.warning("exclusive_xcom: the purged handle of %s was not forgotten: %s", value.get("task_id"), exc)


# -- claim_xcom -------------------------------------------------------------------------------


def _claiming_context(key: str | Mapping[str, Any], consumer_id: str, dag_id: str | None) -> Mapping[str, Any]:
    """The running task's context; the claim is made as that task, so ``consumer_id`` must be it."""
    from exclusive_xcom.errors import ItemRef, NotAuthorizedError
    from exclusive_xcom.ledger import consumer_slot

    context = _running_context()
    producer = key if isinstance(key, str) else str(key.get("task_id", "?"))
    if context is None:
        ref = ItemRef(dag_id or "-", "-", producer, "return_value", str(consumer_id))
        raise NotAuthorizedError("claim_xcom() claims as the running task instance; call it inside a task", ref)
    ti = context["ti"]
    if consumer_id in (ti.task_id, consumer_slot(ti.dag_id, ti.task_id)):
        return context
    producer_dag = dag_id or (ti.dag_id if isinstance(key, str) else str(key.get("dag_id", "?")))
    ref = ItemRef(producer_dag, ti.run_id, producer, "return_value", consumer_slot(ti.dag_id, ti.task_id))
    raise NotAuthorizedError(
        f"task {ti.task_id!r} of dag {ti.dag_id!r} cannot claim on behalf of {consumer_id!r}: a claim "
        "belongs to the task instance that runs; call claim_xcom() inside that task",
        ref,
    )


def _claim_handle(context: Mapping[str, Any], found: Mapping[str, Any], dag_id: str | None) -> Any:
    """``claim()`` for a handle the caller holds: same session, same skip and consume rules."""
    from exclusive_xcom.api import claim_handle
    from exclusive_xcom.errors import ItemRef, NotAuthorizedError, PayloadError
    from exclusive_xcom.runtime import claimant_of

    slot = claimant_of(context).slot
    ref = ItemRef(
        str(found.get("dag_id", "-")),
        str(found.get("run_id", "-")),
        str(found.get("task_id", "-")),
        str(found.get("key", "-")),
        slot,
    )
    if not is_handle(found):
        raise PayloadError(f"claim_xcom() was given a {type(found).__name__} that is not an exclusive_xcom handle", ref)
    if dag_id is not None and found.get("dag_id") != dag_id:
        raise NotAuthorizedError(f"the handle given belongs to dag {found.get('dag_id')!r}, not {dag_id!r}", ref)
    return claim_handle(found, context)
