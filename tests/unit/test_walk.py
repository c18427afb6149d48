"""The one walk over task arguments: leaves replaced at any depth, containers kept as they were."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

from exclusive_xcom.walk import walk


def _is_leaf(value: Any) -> bool:
    return isinstance(value, dict) and "leaf" in value


class Lazy(Sequence[Any]):
    """A sequence that is neither a list nor a tuple, as a mapped producer's LazyXComSequence."""

    def __init__(self, *items: Any) -> None:
        self.items = items

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


def test_leaves_are_replaced_at_any_depth_in_order_and_containers_keep_their_type() -> None:
    seen: list[Any] = []

    def on_leaf(leaf: Any) -> Any:
        seen.append(leaf["leaf"])
        return leaf["leaf"] * 10

    value = [{"leaf": 1}, ({"a": {"leaf": 2}}, "text"), {"b": [{"leaf": 3}]}]
    assert walk(value, _is_leaf, on_leaf) == [10, ({"a": 20}, "text"), {"b": [30]}]
    assert seen == [1, 2, 3]


def test_other_sequences_are_walked_as_lists_only_when_asked() -> None:
    lazy = Lazy({"leaf": 1}, "x")
    assert walk(lazy, _is_leaf, lambda leaf: leaf["leaf"]) is lazy
    assert walk(lazy, _is_leaf, lambda leaf: leaf["leaf"], sequences=True) == [1, "x"]
    assert walk("leafy text", _is_leaf, lambda leaf: 0, sequences=True) == "leafy text"
