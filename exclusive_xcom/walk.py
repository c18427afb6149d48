"""One walk over a task's arguments, shared by everything that looks for something in them.

A task's arguments nest (lists, tuples, dicts) and may hold handles or markers at any depth;
finding handles, replacing them with claimed values and resolving ``from_conf`` /
``from_asset`` markers are all the same walk with a different leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def walk(value: Any, is_leaf: Callable[[Any], bool], on_leaf: Callable[[Any], Any], *, sequences: bool = False) -> Any:
    """``value`` rebuilt with each part for which ``is_leaf`` holds replaced by ``on_leaf(part)``,
    in depth-first order. Leaves are tested before containers (a handle is a dict).

    ``sequences``: also walk other sequences (a mapped producer's ``LazyXComSequence``), which
    then come back as lists; otherwise they are left as they are.
    """
    if is_leaf(value):
        return on_leaf(value)
    if isinstance(value, dict):
        return {k: walk(v, is_leaf, on_leaf, sequences=sequences) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(walk(v, is_leaf, on_leaf, sequences=sequences) for v in value)
    if sequences and isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        return [walk(v, is_leaf, on_leaf, sequences=True) for v in value]
    return value
