"""``@exclusive_task``: a thin ``DecoratedOperator`` subclass and its factory.

The operator extends Airflow's TaskFlow operator at two seams only: ``execute`` (claim
inputs before the function runs, consume them and write the output after it succeeds)
and ``update_relative`` (refuse, at DAG parse time, wiring the output into a task that is
not a named consumer). Everything else, templating, mapping, retries, is Airflow's own.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import logging
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import attr
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk.bases.decorator import DecoratedOperator
from airflow.sdk.bases.operator import BaseOperator
from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.definitions.xcom_arg import XComArg
from airflow.sdk.exceptions import AirflowSkipException

from exclusive_xcom import assets
from exclusive_xcom.compat import TaskDecorator
from exclusive_xcom.errors import ConfigurationError, ItemRef, NotAuthorizedError, named
from exclusive_xcom.handle import RESERVED_KEY, Handle, is_handle
from exclusive_xcom.ledger import DEFAULT_BATCH_SIZE, MODES, consumer_slot
from exclusive_xcom.mapping import RETURN_KEY, ExclusiveXComArg, check_partial, mapped_over, mapping_value
from exclusive_xcom.runtime import DoneBefore, Lost, Session, find_handles, is_final_try, open_session, replace_handles
from exclusive_xcom.walk import walk

log = logging.getLogger("exclusive_xcom")

_OWN_KEYWORDS = ("consumers", "mode", "batch_size", "max_items")
CONF_MARKER = "__exclusive_xcom_from_conf__"


@dataclass(frozen=True)
class Consumer:
    """A consumer task in another DAG; it reads the handle from its run's ``conf``."""

    dag_id: str
    task_id: str

    def __post_init__(self) -> None:
        for name in ("dag_id", "task_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "/" in value:
                raise ConfigurationError(f"Consumer({name}=...) must be a non-empty Airflow id, got {value!r}")


def from_conf(key: str) -> dict[str, str]:
    """An argument of an exclusive task that is the handle found in ``dag_run.conf[key]``.

    A plain dict marker, so DAG serialization keeps it as it is; the task resolves it when
    it runs, before claiming.
    """
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"from_conf() needs the conf key that holds the handle, got {key!r}")
    return {CONF_MARKER: key}


class _ExclusiveDecoratedOperator(DecoratedOperator, PythonOperator):
    """Runs a TaskFlow function whose inputs are claimed and whose output is exclusive."""

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs")
    template_fields_renderers = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py"}
    custom_operator_name: str = "@task.exclusive"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Any,
        op_kwargs: Any,
        consumers: Sequence[str] = (),
        mode: str = "each",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_items: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Checked here, where every path passes (the decorator, .override(), a mapped task's
        # unmapping), with the decorator's messages.
        self.consumers = _consumer_names(consumers, slots_ok=True)
        _check_options(mode, self.consumers, batch_size, max_items)
        if self.consumers:
            kwargs.setdefault("show_return_value_in_logs", False)  # the payload stays out of logs too
        self.mode = mode
        self.batch_size = batch_size
        self.max_items = max_items
        super().__init__(
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs},
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    def consumer_slots(self, strict: bool = False) -> tuple[str, ...]:
        """The consumers' ledger names; ``strict`` (the DAG is complete): an unknown name fails."""
        return consumer_slots_of(self, self.consumers, strict)

    def _consumer_dags(self) -> set[str]:
        return {slot.split("/", 1)[0] for slot in self.consumer_slots()} - {self.dag_id}

    # -- parse time -------------------------------------------------------------------------

    def update_relative(self, other: Any, upstream: bool = True, edge_modifier: Any = None) -> None:
        """Called when ``other`` is wired below this task; refuse non-consumers reading our output."""
        super().update_relative(other, upstream, edge_modifier)
        if upstream or not self.consumers or not _reads_output(other, self):
            return
        if getattr(other, "trigger_dag_id", None) in self._consumer_dags():
            return  # a TriggerDagRunOperator carrying the handle (not the data) to a consumer DAG
        if consumer_slot(other.dag_id, other.task_id) not in self.consumer_slots():
            raise NotAuthorizedError(
                f"task {other.task_id!r} takes the exclusive output of {self.task_id!r} as an argument but is "
                f"not one of its consumers {list(self.consumers)}; add it to consumers= or remove the argument "
                f"(a plain ordering edge such as {self.task_id} >> {other.task_id} is allowed)"
            )
        if not _is_exclusive(other):
            raise ConfigurationError(
                f"task {other.task_id!r} receives the exclusive output of {self.task_id!r} but is not an "
                "@exclusive_task, so it would get only the handle; decorate it with @exclusive_task "
                "(or call exclusive_xcom.claim() inside it and pass no argument)"
            )

    # -- run time -----------------------------------------------------------------------------

    def execute(self, context: Any) -> Any:
        args = resolve_conf([self.op_args, self.op_kwargs], context)
        found = find_handles(args)
        session = open_session(context, found)
        try:  # from the first claim on: whatever step fails, fail() keeps or releases what the try holds
            handle, value = self._run(context, session, args, found)
        except AirflowSkipException:
            session.fail(final=True)
            raise
        except BaseException:
            session.fail(is_final_try(context))
            raise
        if handle is None:
            return value
        keys = session.env.keyring
        context["ti"].xcom_push(RESERVED_KEY, handle.to_xcom(keys))
        assets.announce(self, context, handle, keys)
        if next(self.iter_mapped_dependants(), None) is None:
            return None  # nothing maps over this output (and its size is not worth a query)
        return mapping_value(context["ti"], handle, self._size(session, handle, context), keys)

    def _mapping_slots(self, context: Any) -> tuple[str, ...]:
        """Consumers mapped over this (unmapped, mode each) output: one row per element each."""
        map_index = context["ti"].map_index
        if self.mode != "each" or (map_index is not None and map_index >= 0):
            return ()
        mapped = {consumer_slot(self.dag_id, d.task_id) for d in self.iter_mapped_dependants() if hasattr(d, "task_id")}
        return tuple(sorted(mapped & set(self.consumer_slots())))

    def _size(self, session: Session, handle: Handle, context: Any) -> int | None:
        """How many elements mapped consumers get (items, or one mapped consumer's rows)."""
        if handle.mode == "items":
            return session.env.ledger.size(handle.output, handle.generation)
        split = self._mapping_slots(context)
        return session.env.ledger.size(handle.output, handle.generation, split[0]) if split else None

    def _run(self, context: Any, session: Session, args: Any, found: list[Any]) -> tuple[Handle | None, Any]:
        """Claim, run the function, finish: the handle to publish, or the plain return value."""
        args = self._with_streams(session, args)
        found = find_handles(args)  # what is left to claim before the function runs
        try:
            if found:
                args = replace_handles(args, session.claim(found, self.batch_size, self.max_items))
            else:
                session.check_done()
        except Lost as lost:
            log.info("exclusive_xcom: %s skipped: %s", session.claimant, lost)
            raise AirflowSkipException(f"exclusive input went to another consumer: {lost}") from None
        except DoneBefore as done:
            return self._done_before(session, done), None
        self.op_args, self.op_kwargs = args
        with session.kept_alive():
            value = super().execute(context)
        if not self.consumers:
            session.finish()
            return None, value
        production, handle = session.production(
            value, self.mode, self.consumer_slots(strict=True), self._mapping_slots(context)
        )
        session.finish([production])
        return handle, None

    def _with_streams(self, session: Session, args: Any) -> Any:
        """``args`` with each handle passed to an ``Iterator``/``Iterable`` parameter made a stream."""
        streamed = _streamed_parameters(self.python_callable)
        if not streamed:
            return args
        op_args, op_kwargs = args
        names = list(inspect.signature(self.python_callable).parameters)

        def stream_if(name: str | None, value: Any) -> Any:
            if name in streamed and is_handle(value):
                return session.stream(value, self.batch_size, self.max_items)
            return value

        positional = [stream_if(names[i] if i < len(names) else None, v) for i, v in enumerate(op_args)]
        return [positional, {k: stream_if(k, v) for k, v in op_kwargs.items()}]

    def _done_before(self, session: Session, done: DoneBefore) -> Handle | None:
        """An earlier try's finish committed (the try failed after it): succeed without running again."""
        why = (
            f"exclusive_xcom: {session.claimant}: try {done.try_number} of this task instance already consumed "
            "these inputs (its finish committed, then that try failed, e.g. its acknowledgement was lost); "
            "the function is not run again"
        )
        if not self.consumers:
            log.warning("%s, and its return value is not known to this try, which returns None", why)
            return None
        log.warning("%s: this try publishes the output that try wrote (generation %d)", why, done.try_number)
        return session.handle_of(done.try_number, self.mode, self.consumer_slots())


def consumer_slots_of(task: Any, consumers: Iterable[str], strict: bool) -> tuple[str, ...]:
    """Ledger names of a producer's consumers (a mapped producer's too), resolved in its DAG."""
    return tuple(c if "/" in c else consumer_slot(task.dag_id, _task_id_of(task, c, strict)) for c in consumers)


def _task_id_of(task: Any, name: str, strict: bool) -> str:
    """A consumer's task id: ``name`` itself, or ``name`` within the producer's group (``grp.name``)."""
    group: Any = task.task_group
    grouped = str(group.child_id(name)) if group is not None else name
    tasks = task.dag.task_dict if task.has_dag() else {}  # none until the task is in a DAG
    found = [t for t in dict.fromkeys((name, grouped)) if t in tasks]
    if len(found) > 1:
        raise ConfigurationError(
            f"consumers=[{name!r}] of {task.task_id!r} is ambiguous: DAG {task.dag_id!r} has both "
            f"{found[0]!r} and {found[1]!r}; write the full task id"
        )
    if found:
        return found[0]
    if strict:
        close = difflib.get_close_matches(name, list(tasks), n=3, cutoff=0.5)
        hint = f" (close: {', '.join(repr(t) for t in close)})" if close else ""
        raise ConfigurationError(
            f"consumers=[{name!r}] of {task.task_id!r} names no task of DAG {task.dag_id!r}{hint}; "
            "use the consumer's task id, or its id within this task's group"
        )
    return grouped  # not defined yet: looked up again when wired, when the DAG is bagged, when it runs


def check_consumers(task: Any) -> None:
    """Every in-DAG consumer a producer names exists, once its DAG is complete (a cluster policy)."""
    if isinstance(task, _ExclusiveDecoratedOperator):
        task.consumer_slots(strict=True)
    elif isinstance(task, MappedOperator) and _is_exclusive(task):
        consumer_slots_of(task, _consumer_names(task.partial_kwargs.get("consumers"), slots_ok=True), strict=True)


def _streamed_parameters(function: Callable[..., Any]) -> set[str]:
    """Parameters annotated ``Iterator[T]`` or ``Iterable[T]``: they get a work queue as a stream."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a name the annotations use is not importable here: read them as written
        parameters = inspect.signature(function).parameters.values()
        return {p.name for p in parameters if isinstance(p.annotation, str) and _STREAMED_TEXT.match(p.annotation)}
    return {name for name, hint in hints.items() if (typing.get_origin(hint) or hint) in _STREAMED}


_STREAMED = (collections.abc.Iterator, collections.abc.Iterable)
_STREAMED_TEXT = re.compile(r"^(?:[\w.]+\.)?(?:Iterator|Iterable)(?:\[.*\])?$")


def resolve_conf(value: Any, context: Any) -> Any:
    """Replace :func:`from_conf` markers with the handle the triggering run passed in, and
    :func:`~exclusive_xcom.assets.from_asset` markers with the handles its asset events carried."""
    return walk(value, _is_marker, lambda marker: _resolve_marker(marker, context))


def _is_marker(value: Any) -> bool:
    return assets.is_marker(value) or (isinstance(value, Mapping) and CONF_MARKER in value)


def _resolve_marker(marker: Any, context: Any) -> Any:
    if assets.is_marker(marker):
        return assets.handles_in_events(marker, context)
    key = marker[CONF_MARKER]
    conf = getattr(context.get("dag_run"), "conf", None) or {}
    if key not in conf:
        raise ConfigurationError(
            f"from_conf({key!r}): this run's conf has no {key!r}; trigger it with conf={{{key!r}: <handle>}}"
        )
    return conf[key]


def _argument_values(op: Any) -> Iterable[Any]:
    """Every value a task (plain or mapped) was given that may hold an XComArg."""
    for name in getattr(op, "template_fields", ()):
        try:
            yield getattr(op, name)
        except AttributeError:
            continue
    yield from getattr(op, "partial_kwargs", {}).values()
    for attr_name in ("expand_input", "op_kwargs_expand_input"):
        yield getattr(getattr(op, attr_name, None), "value", None)


def _reads_output(other: Any, producer: BaseOperator) -> bool:
    """Whether ``other`` takes ``producer``'s output (its handle, or the handles it maps over)."""
    return any(
        ref_op is producer and key in (RESERVED_KEY, RETURN_KEY)
        for value in _argument_values(other)
        for ref_op, key in XComArg.iter_xcom_references(value)
    )


def _is_exclusive(op: Any) -> bool:
    cls = getattr(op, "operator_class", type(op))
    return isinstance(cls, type) and issubclass(cls, _ExclusiveDecoratedOperator)


@attr.define(slots=False)
class _ExclusiveTaskDecorator(TaskDecorator[..., Any, _ExclusiveDecoratedOperator]):
    """Airflow's TaskFlow decorator, but a call returns a reference to the handle's key."""

    def __call__(self, *args: Any, **kwargs: Any) -> XComArg:
        return self._exclusive(super().__call__(*args, **kwargs))

    def _expand(self, expand_input: Any, *, strict: bool) -> XComArg:
        consumer = str(self.kwargs.get("task_id", self.function.__name__))
        kw = self.kwargs  # a mapped task's operator is made only when it runs: check it now
        _check_options(
            kw.get("mode", "each"),
            kw.get("consumers", ()),
            kw.get("batch_size", DEFAULT_BATCH_SIZE),
            kw.get("max_items"),
        )
        check_partial(consumer, kw.get("op_kwargs", {}))
        expand_input = attr.evolve(expand_input, value=mapped_over(expand_input, consumer))
        return self._exclusive(super()._expand(expand_input, strict=strict))

    def _exclusive(self, arg: XComArg) -> XComArg:
        if not self.kwargs.get("consumers"):
            return arg
        (operator, _key), *_ = arg.iter_references()
        return ExclusiveXComArg(operator, RESERVED_KEY)


def exclusive_task(
    python_callable: Callable[..., Any] | None = None,
    *,
    consumers: Any = None,
    mode: str = "each",
    multiple_outputs: bool | None = None,
    **task_kwargs: Any,
) -> Any:
    """Turn a function into a task whose inputs are claimed and whose output is exclusive.

    Bare (``@exclusive_task``) or called (``@exclusive_task(consumers=[...], mode=...)``);
    every keyword of ``airflow.sdk.task`` passes through. Bad arguments fail when the
    decorator is applied, at DAG parse time, with a message that says what is allowed and
    names the task.
    """
    if python_callable is not None and not callable(python_callable):
        raise ConfigurationError(
            f"@exclusive_task takes no positional arguments, got {python_callable!r}; "
            "write @exclusive_task(consumers=[...])"
        )

    def wrap(function: Callable[..., Any]) -> Any:
        # Checked here, when the decorator meets its function (still at parse time), so that
        # the message names the task.
        task_id = str(task_kwargs.get("task_id", getattr(function, "__name__", "-")))
        with named(ItemRef("-", "-", task_id, "return_value")):  # parse time: no DAG run yet
            names = _consumer_names(consumers)
            _check_keywords(task_kwargs)
            _check_options(mode, names, task_kwargs.get("batch_size", DEFAULT_BATCH_SIZE), task_kwargs.get("max_items"))
            if names and multiple_outputs:
                raise ConfigurationError(
                    "multiple_outputs=True cannot be combined with consumers=: an exclusive output is one value"
                )
        split = False if names else multiple_outputs  # a `-> dict` annotation must not split an exclusive output
        return _ExclusiveTaskDecorator(
            function=function,
            multiple_outputs=attr.NOTHING if split is None else split,  # type: ignore[arg-type]
            operator_class=_ExclusiveDecoratedOperator,
            kwargs={**task_kwargs, "consumers": names, "mode": mode},
            decorator_name="exclusive",
        )

    return wrap(python_callable) if python_callable is not None else wrap


def _consumer_names(consumers: Any, slots_ok: bool = False) -> tuple[str, ...]:
    """Consumers as ledger names: ``task_id`` in this DAG, ``dag_id/task_id`` elsewhere.

    ``slots_ok``: the operator is handed names the decorator already made (``dag_id/task_id``).
    """
    if consumers is None:
        return ()
    if isinstance(consumers, str | Consumer):
        consumers = [consumers]
    if not isinstance(consumers, Iterable):
        raise ConfigurationError(
            f"consumers= must be a list of task ids and/or Consumer(dag_id, task_id), got {consumers!r}"
        )
    names = []
    for consumer in consumers:
        if isinstance(consumer, Consumer):
            names.append(consumer_slot(consumer.dag_id, consumer.task_id))
        elif isinstance(consumer, str) and consumer and ("/" not in consumer or slots_ok):
            names.append(consumer)
        else:
            raise ConfigurationError(
                f"consumers= entries must be task ids (str) or Consumer(dag_id=..., task_id=...), got {consumer!r}"
            )
    return tuple(dict.fromkeys(names))


def _check_options(mode: Any, names: tuple[str, ...], batch_size: Any, max_items: Any) -> None:
    if mode not in MODES:
        raise ConfigurationError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
    if mode != "each" and not names:
        raise ConfigurationError(f"mode={mode!r} needs consumers=[...] to name who may read the output")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigurationError(f"batch_size= must be a positive int, got {batch_size!r}")
    if max_items is not None and (not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1):
        raise ConfigurationError(f"max_items= must be a positive int or None, got {max_items!r}")


_SKIP = {"self", "args", "kwargs", "python_callable", "op_args", "op_kwargs", "kwargs_to_upstream"}


def _allowed_keywords() -> set[str]:
    names: set[str] = set(_OWN_KEYWORDS)
    for cls in (BaseOperator, PythonOperator, DecoratedOperator):
        names.update(inspect.signature(cls.__init__).parameters)
    return names - _SKIP


def _check_keywords(task_kwargs: Mapping[str, Any]) -> None:
    allowed = _allowed_keywords()
    for name in task_kwargs:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"@exclusive_task got an unknown keyword {name!r}{hint}; it accepts consumers=, mode=, "
                "batch_size=, max_items= and every keyword of @task (task_id, retries, pool, ...)"
            )
