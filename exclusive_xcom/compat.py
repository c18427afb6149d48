"""Airflow's private names, reached from one place.

exclusive_xcom extends Airflow at a few seams Airflow does not promise to keep (underscored
names, ``_internal`` modules, the task runner's hook attribute, the stats facade's state).
Every such name is imported or read here and nowhere else, and ``tests/unit/test_compat.py``
checks each against the installed Airflow, so an upgrade that moves one breaks here, at
import, with a message naming the Airflow name instead of somewhere deep in a task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _missing(name: str, exc: Exception) -> ImportError:
    """The one error an Airflow that lacks a name we rely on gives, naming it."""
    from airflow import __version__

    return ImportError(
        f"exclusive_xcom relies on Airflow's {name}, which Airflow {__version__} does not have ({exc}); "
        "this exclusive_xcom needs an Airflow it was tested with (see the README's Set up)"
    )


try:  # the TaskFlow decorator we subclass (its __call__ and _expand return our XComArg)
    from airflow.sdk.bases.decorator import _TaskDecorator as TaskDecorator
except ImportError as exc:
    raise _missing("airflow.sdk.bases.decorator._TaskDecorator", exc) from exc

try:  # the expand_kwargs() input, refused over an exclusive output
    from airflow.sdk.definitions._internal.expandinput import ListOfDictsExpandInput
except ImportError as exc:
    raise _missing("airflow.sdk.definitions._internal.expandinput.ListOfDictsExpandInput", exc) from exc

try:  # zip()'s "no fill value" default
    from airflow.sdk.definitions._internal.types import NOTSET
except ImportError as exc:
    raise _missing("airflow.sdk.definitions._internal.types.NOTSET", exc) from exc

#: The attribute of an operator the task runner calls after ``execute`` returns.
POST_EXECUTE_HOOK = "_post_execute_hook"
#: Airflow's stats module and the attribute that is None until someone initialized the facade.
STATS_MODULE, STATS_FACTORY = "airflow.sdk._shared.observability.metrics.stats", "_factory"

__all__ = [
    "NOTSET",
    "POST_EXECUTE_HOOK",
    "ListOfDictsExpandInput",
    "TaskDecorator",
    "get_hostname",
    "post_execute_hook",
    "set_post_execute_hook",
    "stats_factory",
    "stats_initialized",
]


def post_execute_hook(task: Any) -> Callable[..., Any] | None:
    """The hook the task runner calls after ``task.execute`` returned (``None``: none set)."""
    hook: Callable[..., Any] | None = getattr(task, POST_EXECUTE_HOOK)
    return hook


def set_post_execute_hook(task: Any, hook: Callable[[Any, Any], None]) -> None:
    """Make the task runner call ``hook(context, result)`` after ``task.execute`` returned."""
    setattr(task, POST_EXECUTE_HOOK, hook)


def stats_initialized() -> bool:
    """Whether this process's stats facade was initialized (the task runner does; ``dag.test()``
    and the CLI do not: until then everything goes to a NoStatsLogger)."""
    import importlib

    module = importlib.import_module(STATS_MODULE)
    return getattr(module, STATS_FACTORY) is not None


def stats_factory() -> Callable[[], Any]:
    """The stats client factory ``[metrics]`` configures, as the task runner builds it."""
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    factory: Callable[[], Any] = get_stats_factory()
    return factory


def get_hostname() -> str:
    """This machine's name as the task runner reports it to Airflow (``task_instance.hostname``)."""
    from airflow.sdk.api.client import get_hostname as runner_hostname

    return str(runner_hostname())  # type: ignore[no-untyped-call]  # the function client.start() reports
