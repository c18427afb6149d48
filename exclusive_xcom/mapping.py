"""Dynamic task mapping over exclusive outputs, with handles where Airflow expects values.

Airflow maps a task over an upstream's ``return_value`` only (it counts the instances from
that push), so an exclusive output is mapped over through it: a consumer's ``.expand()``
refers to the producer's ``return_value``, and a producer with mapped consumers returns,
besides its reserved-key handle, what Airflow is to map over — one signed handle per
element (mode ``items``: per item; mode ``each``: per element of the mapped consumer's own
rows, one per element of the list), or, when the producer is itself mapped, its own
handle per instance.
The XCom table still holds handles only, never a payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.definitions.xcom_arg import PlainXComArg, XComArg, ZipXComArg

from exclusive_xcom.compat import NOTSET, ListOfDictsExpandInput
from exclusive_xcom.errors import ConfigurationError
from exclusive_xcom.handle import RESERVED_KEY, Handle
from exclusive_xcom.ledger import ITEMS, ONE

RETURN_KEY = "return_value"


class ExclusiveXComArg(PlainXComArg):
    """What calling an exclusive producer returns: a reference to its handle (reserved key)
    that can also be zipped with others for a consumer to map over, as a plain output can."""

    def zip(self, *others: XComArg, fillvalue: Any = NOTSET) -> ZipXComArg:
        return ZipXComArg([_zippable(arg) for arg in (self, *others)], fillvalue=fillvalue)


def _zippable(arg: XComArg) -> XComArg:
    if isinstance(arg, PlainXComArg) and arg.key == RESERVED_KEY:
        _check_mappable(arg.operator, "a zip of exclusive outputs")
        return PlainXComArg(arg.operator, RETURN_KEY)
    return arg


def mode_of(op: Any) -> str:
    """The mode of an exclusive producer, mapped or not."""
    if isinstance(op, MappedOperator):
        return str(op.partial_kwargs.get("mode", "each"))
    return str(getattr(op, "mode", "each"))


def mapped_over(expand_input: Any, consumer: str) -> Any:
    """``expand_input.value`` with every exclusive output it maps over referenced through
    ``return_value`` (``.expand(arg=producer())``, zips of them).

    Refuses, naming the tasks, what has no meaning yet: a non-mapped producer whose mode is
    not ``items`` (mapped instance *i* is given item *i*, and only mode ``items`` has items),
    ``expand_kwargs()`` over an exclusive output (its items are handles, not keyword dicts),
    and an exclusive output inside a literal list to map over.
    """
    value = expand_input.value
    if isinstance(expand_input, ListOfDictsExpandInput):
        _refuse_nested(value, consumer, "expand_kwargs()")
        return value
    converted = {}
    for name, arg in value.items():
        if isinstance(arg, XComArg):
            converted[name] = _through_return_value(arg, consumer)
        else:
            _refuse_nested(arg, consumer, f".expand({name}=[...])")
            converted[name] = arg
    return converted


def _through_return_value(arg: XComArg, consumer: str) -> XComArg:
    if isinstance(arg, PlainXComArg) and arg.key == RESERVED_KEY:
        _check_mappable(arg.operator, consumer)
        return PlainXComArg(arg.operator, RETURN_KEY)
    if isinstance(arg, ZipXComArg):
        return ZipXComArg([_through_return_value(a, consumer) for a in arg.args], fillvalue=arg.fillvalue)
    return arg  # Airflow's own check names anything else (e.g. .map() of an exclusive output)


def _refuse_nested(value: Any, consumer: str, how: str) -> None:
    for producer, key in XComArg.iter_xcom_references(value):
        if key == RESERVED_KEY:
            raise ConfigurationError(
                f"task {consumer!r}: {how} with the exclusive output of {producer.task_id!r} is not supported; "
                f"map over the output itself, .expand(arg={producer.task_id}()), or pass it unmapped"
            )


def _check_mappable(producer: Any, consumer: str) -> None:
    mode = mode_of(producer)
    if isinstance(producer, MappedOperator) or mode != ONE:
        return
    raise ConfigurationError(
        f"{_who(consumer)} maps over the exclusive output of {producer.task_id!r}, which has mode='one': it goes "
        f"whole to one consumer, while .expand() gives each mapped instance one element; give {producer.task_id!r} "
        "mode='items' (a work item per element) or mode='each'"
    )


def _who(consumer: str) -> str:
    return consumer if consumer.startswith("a zip") else f"task {consumer!r}"


def check_partial(consumer: str, partial_kwargs: Mapping[str, Any]) -> None:
    """Refuse a mapped consumer given a mode-each/one output through ``.partial()``.

    Its instances would all present the one handle, and all but one would find the output
    taken: a race, not a plan. Mode ``items`` is a work queue the instances share.
    """
    for name, value in partial_kwargs.items():
        for producer, key in XComArg.iter_xcom_references(value):
            if key == RESERVED_KEY and (mode := mode_of(producer)) != ITEMS:
                raise ConfigurationError(
                    f"task {consumer!r} is mapped and gets the exclusive output of {producer.task_id!r} "
                    f"(mode={mode!r}) through .partial({name}=...): its instances would compete for one read. "
                    f"Map over it instead, .expand({name}=...), or give {producer.task_id!r} mode='items' "
                    "so that the instances share its items as a work queue"
                )


def mapping_value(ti: Any, handle: Handle, size: int | None, keys: Any) -> Any:
    """What a producer that has mapped consumers returns for Airflow to map them over.

    ``size`` is its element count (mode ``items``, or mode ``each`` split for mapped
    consumers), needed only when the producer is not mapped.
    """
    if ti.map_index is not None and ti.map_index >= 0:
        return handle.to_xcom(keys)  # instance i of the consumer gets this instance's output
    if handle.mode == ONE or size is None:
        raise ConfigurationError(
            f"{handle.output.task_id!r} has consumers mapped over it but mode={handle.mode!r}: "
            "they need mode='items' or 'each'"
        )
    return [handle.element(seq).to_xcom(keys) for seq in range(size)]
