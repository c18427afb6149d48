"""Counters and timings of the claim ledger, reported through Airflow's own stats facade.

They go out through ``airflow.sdk.observability.stats``, so they reach whatever Airflow's
``[metrics]`` section configures (StatsD, Datadog, OpenTelemetry), under the same prefix,
allow/block lists and tag settings, and operators see them next to Airflow's own metrics
with nothing extra to set up. The task runner initializes that facade; processes that do
not (``dag.test()``, the CLI) get it initialized here once, lazily, from the same config.
Reporting is best-effort: an error inside it is logged at debug level and never reaches
the task.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import ParamSpec

log = logging.getLogger(__name__)

PREFIX = "exclusive_xcom"
CLAIMED = f"{PREFIX}.claimed"
CLAIM_LATENCY = f"{PREFIX}.claim_latency"
CONSUMED = f"{PREFIX}.consumed"
RELEASED = f"{PREFIX}.released"
PRODUCED = f"{PREFIX}.produced"
OFFLOADED_BYTES = f"{PREFIX}.offloaded_bytes"
UNREAD_ITEMS = f"{PREFIX}.unread_items"
UNREAD_TOTAL = f"{PREFIX}.unread_items_total"

_lock = threading.Lock()
_init_tried = False
P = ParamSpec("P")


def _stats() -> ModuleType:
    """Airflow's stats facade, initialized from Airflow's config if no one in this process did."""
    global _init_tried
    from airflow.sdk.observability import stats

    from exclusive_xcom.compat import stats_factory, stats_initialized

    # After a fork Airflow resets only the facade's client, not its factory, so the child
    # rebuilds its client from the same factory and this check stays correct.
    if not _init_tried and not stats_initialized():
        with _lock:
            if not _init_tried and not stats_initialized():
                _init_tried = True
                from airflow.sdk.configuration import conf

                stats.initialize(
                    factory=stats_factory(),
                    export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=True),
                )
    return stats


def _best_effort(fn: Callable[P, None]) -> Callable[P, None]:
    """Metrics must never break a task: log any failure at debug level and go on."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.debug("exclusive_xcom: could not report %s metrics", fn.__name__, exc_info=True)

    return wrapper


def _incr(stats: ModuleType, stat: str, count: int, tags: dict[str, str]) -> None:
    if count > 0:  # a zero counter is a packet that says nothing
        stats.incr(stat, count, tags=tags)


@_best_effort
def claimed(count: int, seconds: float, *, dag_id: str, task_id: str, mode: str) -> None:
    """``count`` items claimed by one claim that took ``seconds`` (the timing is sent in ms)."""
    stats = _stats()
    tags = {"dag_id": dag_id, "task_id": task_id, "mode": mode}
    _incr(stats, CLAIMED, count, tags)
    stats.timing(CLAIM_LATENCY, seconds * 1000.0, tags=tags)


@_best_effort
def consumed(count: int, *, dag_id: str, task_id: str) -> None:
    """``count`` claimed items finished for good."""
    _incr(_stats(), CONSUMED, count, {"dag_id": dag_id, "task_id": task_id})


@_best_effort
def released(count: int, *, dag_id: str, task_id: str) -> None:
    """``count`` claimed items given back to the pool."""
    _incr(_stats(), RELEASED, count, {"dag_id": dag_id, "task_id": task_id})


@_best_effort
def produced(count: int, *, dag_id: str, task_id: str, offloaded_bytes: int = 0) -> None:
    """``count`` items written to the ledger; ``offloaded_bytes`` of payload went to object storage."""
    stats = _stats()
    tags = {"dag_id": dag_id, "task_id": task_id}
    _incr(stats, PRODUCED, count, tags)
    _incr(stats, OFFLOADED_BYTES, offloaded_bytes, tags)


@_best_effort
def unread(producers: Iterable[tuple[str, str, int]]) -> None:
    """Gauges of items unconsumed for too long: ``(dag_id, task_id, count)`` per producer.

    Per producer twice, as Airflow reports its own per-DAG metrics: ``unread_items`` tagged
    ``dag_id`` and ``task_id`` for backends with tags, and ``unread_items.<dag_id>.<task_id>``
    (a dot inside an id written ``__``) for plain StatsD, which drops tags. The total is
    always sent, 0 included, so an alert on it clears once the items are read or purged;
    a producer's own gauges are sent while it has unconsumed items at all.
    """
    stats, total = _stats(), 0
    for dag_id, task_id, count in producers:
        stats.gauge(UNREAD_ITEMS, count, tags={"dag_id": dag_id, "task_id": task_id})
        stats.gauge(f"{UNREAD_ITEMS}.{_segment(dag_id)}.{_segment(task_id)}", count)
        total += count
    stats.gauge(UNREAD_TOTAL, total)


def _segment(name: str) -> str:
    """One segment of a dotted StatsD name (a task in a group is ``group.task``)."""
    return name.replace(".", "__")
