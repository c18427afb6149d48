"""``claim()``: the decorator's claim, for classic operators and plain callables."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

from exclusive_xcom.compat import post_execute_hook, set_post_execute_hook
from exclusive_xcom.decorator import from_conf, resolve_conf
from exclusive_xcom.errors import AlreadyConsumedError, ClaimConflictError, NotAuthorizedError
from exclusive_xcom.handle import RESERVED_KEY, is_handle
from exclusive_xcom.ledger import DEFAULT_BATCH_SIZE
from exclusive_xcom.runtime import DoneBefore, Lost, Session, claimant_of, open_session


def claim(task_id: str, *, dag_id: str | None = None, key: str | None = None) -> Any:
    """Claim the exclusive output of ``task_id`` as the running task instance; return it.

    Same run: the handle is pulled from XCom. Another DAG (``dag_id``) or ``key``: the
    handle is read from this run's ``conf[key or task_id]``. The claim is consumed when the
    task's ``execute`` returns (a post-execute hook); if the task fails it is kept for the
    retry, and freed by its lease if no retry comes.
    """
    from airflow.sdk import get_current_context

    context = get_current_context()
    ti = context["ti"]
    if dag_id is None and key is None:
        found = ti.xcom_pull(task_ids=task_id, key=RESERVED_KEY)
    else:
        found = resolve_conf(from_conf(key or task_id), context)
    if not is_handle(found):
        raise NotAuthorizedError(
            f"no exclusive output of {task_id!r} reaches {ti.task_id!r} (dag {ti.dag_id!r}, run {ti.run_id!r}); "
            "is the producer an @exclusive_task with this task among its consumers?"
        )
    if found.get("task_id") != task_id or (dag_id is not None and found.get("dag_id") != dag_id):
        raise NotAuthorizedError(
            f"the handle given belongs to {found.get('dag_id')}.{found.get('task_id')}, not "
            f"{dag_id or ti.dag_id}.{task_id}"
        )
    return claim_handle(found, context)


def claim_handle(found: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """Claim the output ``found`` (a handle) as the running task; consumed after ``execute``.

    The common end of :func:`claim` and the XCom backend's ``claim_xcom``: skipped (not
    failed) if a ``one``-mode input went to another consumer, kept for the retry if the
    task fails.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    session = open_session(context, [found])
    try:
        (value,) = session.claim([found], batch_size=DEFAULT_BATCH_SIZE, max_items=None)
    except Lost as lost:
        raise AirflowSkipException(f"exclusive input went to another consumer: {lost}") from None
    except DoneBefore as done:  # the operator is already running: it cannot be spared, only told
        raise AlreadyConsumedError(
            f"{done} (its finish committed, then that try failed, e.g. its acknowledgement was lost); "
            "it cannot be claimed again: an @exclusive_task would succeed here without running again",
            session.inputs[0].output.ref(session.claimant.slot),
        ) from None
    _finish_after_execute(context["task"], session)
    return value


def _finish_after_execute(task: Any, session: Session) -> None:
    """Consume on success: chain onto the task's post-execute hook, keep the lease meanwhile."""
    stack = ExitStack()
    stack.enter_context(session.kept_alive())
    previous = post_execute_hook(task)

    def post_execute(context: Any, result: Any = None) -> None:
        stack.close()
        if previous is not None:
            previous(context, result)
        if (now := claimant_of(context, session.env.settings.teams.of)) != session.claimant:
            raise ClaimConflictError(f"claims of {session.claimant} cannot be finished by {now}")
        session.finish()

    set_post_execute_hook(task, post_execute)
