"""A work queue read batch by batch while the task runs (``Iterator[T]`` / ``Iterable[T]`` arguments).

A consumer that asks for a list gets its whole share claimed before its function runs, so
a queue is only as parallel as its workers' start times are close, and a crash gives all
of it back to the retry. An argument annotated ``Iterator[T]`` or ``Iterable[T]`` gets an
:class:`ItemStream` instead: it claims ``batch_size`` items when the function asks for the
first, and the next batch when the function asks for an item past the current one — at
which point the current batch is consumed (acknowledged). The last batch is consumed with
the task's own output when the task succeeds. So every item is consumed once, and a retry
after a crash redoes at most the one batch the crashed try was working on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from exclusive_xcom.handle import Handle

if TYPE_CHECKING:
    from exclusive_xcom.runtime import Session


class ItemStream(Iterator[Any]):
    """The items of one work queue, claimed batch by batch as the function iterates; one pass."""

    def __init__(self, session: Session, handle: Handle, batch_size: int, max_items: int | None) -> None:
        self._session = session
        self._handle = handle
        self._batch_size = batch_size
        self._left = max_items  # None: until the pool is empty
        self._buffer: deque[Any] = deque()
        self._batch: list[int] = []  # ids of the batch the function is working on
        self._empty = False
        self.batches = 0

    def __iter__(self) -> ItemStream:
        return self

    def __next__(self) -> Any:
        while not self._buffer:
            if self._empty:
                raise StopIteration
            self._next_batch()
        return self._buffer.popleft()

    def _next_batch(self) -> None:
        """Acknowledge the batch the function is done with, then claim the next one."""
        if self._batch:
            self._session.acknowledge(self._batch)
            self._batch = []
        limit = self._batch_size if self._left is None else min(self._batch_size, self._left)
        if limit <= 0:
            self._empty = True
            return
        ids, values = self._session.claim_batch(self._handle, limit)
        self._batch, self.batches = ids, self.batches + 1
        self._buffer.extend(values)
        if self._left is not None:
            self._left -= len(ids)
        if len(ids) < limit:
            self._empty = True  # the pool is drained (its last batch is consumed at finish)
