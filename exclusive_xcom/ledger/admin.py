"""What operators and maintenance do with the ledger: list, count, purge, rotate keys, sweep blobs.

None of it is on a task's claim path; every read leaves payloads out, and every write
is bounded (one batch per transaction) so it can run beside live claims.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.boundary import Transactions
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY
from exclusive_xcom.ledger.types import Offloaded, Waiting

#: Fence rows outlive even a short ``purge --older-than``: a deleted fence would let a
#: zombie try act again, so only task instances quiet for this long lose theirs.
FENCE_RETENTION = timedelta(days=7)
#: Rows a purge deletes per transaction (and blobs it checks per query): small enough that
#: tasks claiming meanwhile are never held up, large enough that a million rows go quickly.
PURGE_BATCH = 1000


class Admin(Transactions):
    """Reads and writes for people and maintenance jobs (CLI, ``purge``, ``rotate-key``)."""

    def release_any(self, ids: Sequence[int]) -> int:
        """Free stuck claims whoever holds them (an operator's decision, CLI ``release``)."""
        stmt = q.release_any(ids=ids, now=self._now())
        return self._run(lambda conn: conn.execute(*stmt).rowcount)

    # -- reading ----------------------------------------------------------------------------

    def items(self, *, unread_after: timedelta | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Rows without payloads, newest first, for people and scripts; with ``unread_after``,
        only unconsumed items created longer ago than that."""
        if unread_after is not None:
            filters["unread_before"] = self._now() - unread_after
        return self._run(lambda conn: [dict(r._mapping) for r in conn.execute(*q.select_items(**filters))])

    def claim_records(self, after_id: int, limit: int, **filters: Any) -> list[Any]:
        """Up to ``limit`` claimed or consumed rows after ``after_id``, with who claimed and
        consumed them (:func:`~exclusive_xcom.ledger.queries.claim_records`)."""
        stmt = q.claim_records(after_id=after_id, limit=limit, **filters)
        return self._run(lambda conn: list(conn.execute(*stmt).all()))

    def browse(self, *, limit: int, sealed_prefix: bytes, **filters: Any) -> list[dict[str, Any]]:
        """A page of rows for people, newest first, without payloads
        (:func:`~exclusive_xcom.ledger.queries.browse_items`), each with its ``view_state``
        (one of :data:`~exclusive_xcom.ledger.queries.VIEW_STATES`) at the time it was read."""
        now = self._now()
        stmt = q.browse_items(now=now, limit=limit, sealed_prefix=sealed_prefix, **filters)
        rows = self._run(lambda conn: [dict(r._mapping) for r in conn.execute(*stmt)])
        return [{**row, "view_state": view_state(row, now)} for row in rows]

    def browse_counts(self, **filters: Any) -> dict[str, Any]:
        """Rows by view state, and when the oldest unconsumed one was made, under a browse's filters."""
        stmt = q.browse_counts(now=self._now(), **filters)
        counts = {state: 0 for state in q.VIEW_STATES}
        oldest: datetime | None = None
        for row in self._run(lambda conn: conn.execute(*stmt).all()):
            state = _seen(row.state, expired=bool(row.expired), released=bool(row.released))
            counts[state] += int(row.n)
            if state != CONSUMED and row.oldest is not None:
                oldest = row.oldest if oldest is None else min(oldest, row.oldest)
        return {"counts": counts, "oldest_unconsumed": oldest}

    def purge_run(
        self, dag_id: str, run_id: str, *, batch: int = PURGE_BATCH, on_blobs: Callable[[list[str]], Any] | None = None
    ) -> int:
        """Delete the consumed items of one run's outputs, one bounded batch per transaction;
        ``on_blobs`` gets the blobs no remaining row needs. Returns the rows deleted."""

        def tx(conn: sa.Connection) -> tuple[int, list[str]]:
            rows = conn.execute(*q.run_consumed(dag_id=dag_id, run_id=run_id, limit=batch)).all()
            if not rows:
                return 0, []
            deleted = int(conn.execute(*q.delete_consumed(ids=[r.id for r in rows])).rowcount)
            return deleted, self._unneeded(conn, [r.payload_uri for r in rows if r.payload_uri])

        total = 0
        while True:
            deleted, uris = self._run(tx)
            total += deleted
            if uris and on_blobs is not None:
                on_blobs(uris)
            if deleted < batch:
                return total

    def counts(self) -> dict[str, int]:
        return self._run(lambda conn: {s: n for s, n in conn.execute(*q.count_by_state())})

    def stats(self) -> dict[str, Any]:
        """Counts by state, bytes held by unconsumed items, the oldest unconsumed item."""

        def tx(conn: sa.Connection) -> dict[str, Any]:
            counts = {state: 0 for state in (READY, CLAIMED, CONSUMED)}
            counts.update({s: n for s, n in conn.execute(*q.count_by_state())})
            row = conn.execute(*q.storage_stats()).one()
            return {
                "counts": counts,
                "bytes": int(row.bytes),
                "offloaded_bytes": int(row.offloaded_bytes),
                "oldest_unconsumed": row.oldest_unconsumed,
            }

        return self._run(tx)

    def waiting(self, unread_after: timedelta) -> list[Waiting]:
        """Every producer with unconsumed items, those waiting longest first; ``unread``
        counts the items created more than ``unread_after`` ago."""
        stmt = q.waiting_by_producer(unread_before=self._now() - unread_after)
        rows = self._run(lambda conn: conn.execute(*stmt).all())
        found = [Waiting(r.dag_id, r.task_id, int(r.waiting), int(r.unread or 0), r.oldest) for r in rows]
        return sorted(found, key=lambda w: (w.oldest, w.dag_id, w.task_id))

    # -- retention --------------------------------------------------------------------------

    def purge(
        self,
        older_than: timedelta,
        *,
        expired_after: timedelta | None = None,
        batch: int = PURGE_BATCH,
        dry_run: bool = False,
        on_blobs: Callable[[list[str]], Any] | None = None,
    ) -> int:
        """Delete items consumed longer ago than ``older_than`` and, if ``expired_after`` is
        given, unconsumed ones created longer ago than that and not under a live claim.

        One bounded batch per transaction; after each, ``on_blobs`` gets the blob URIs that
        no remaining row needs. Returns the number of rows deleted (or, dry, that would be).
        """
        now = self._now()
        which = q.Purgeable(now - older_than, None if expired_after is None else now - expired_after, now)
        if dry_run:
            return int(self._run(lambda conn: conn.execute(*q.count_purgeable(which=which)).scalar_one()))

        total, after = 0, 0

        def tx(conn: sa.Connection) -> tuple[int, int, list[str]]:
            """One id window after ``after``; returns rows deleted, the next ``after`` (-1: done), blobs."""
            first = conn.execute(*q.next_id(after_id=after)).scalar()
            if first is None:
                return 0, -1, []
            rows = conn.execute(*q.purge_window(which=which, first_id=first, width=batch)).all()
            ids = [r.id for r in rows]
            deleted = conn.execute(*q.delete_purgeable(which=which, ids=ids)).rowcount if rows else 0
            return int(deleted), first + batch - 1, self._unneeded(conn, [r.payload_uri for r in rows if r.payload_uri])

        while after >= 0:
            deleted, after, uris = self._run(tx)
            total += deleted
            if uris and on_blobs is not None:
                on_blobs(uris)
        self._purge_fences(now - max(older_than, FENCE_RETENTION), batch)
        return total

    def _purge_fences(self, cutoff: datetime, batch: int) -> None:
        """The fence table holds a row per task instance ever run: it ages out with the items."""

        def tx(conn: sa.Connection) -> int:
            keys = list(conn.execute(*q.stale_fences(cutoff=cutoff, limit=batch)).scalars())
            return int(conn.execute(*q.delete_fences(ti_keys=keys, cutoff=cutoff)).rowcount) if keys else 0

        while self._run(tx) == batch:
            pass

    # -- key rotation -------------------------------------------------------------------------

    def stored_payloads(self, after_id: int, limit: int) -> list[Any]:
        """Rows (id, payload, payload_uri, payload_size, payload_sha256) with a payload to rotate."""
        stmt = q.stored_payloads(after_id=after_id, limit=limit, with_consumed_blobs=self.keep_consumed_payloads)
        return self._run(lambda conn: list(conn.execute(*stmt).all()))

    def replace_payload(self, item_id: int, old: bytes, new: bytes) -> bool:
        return bool(self._run(lambda conn: conn.execute(*q.set_payload(item_id=item_id, old=old, new=new)).rowcount))

    def move_blob(self, old: Offloaded, new: Offloaded) -> tuple[int, int, list[str]]:
        """Repoint the unclaimed rows of ``old`` to ``new``.

        Returns rows moved, rows left on ``old`` (claimed: a later run moves them), and the
        blobs no row needs any more.
        """

        def tx(conn: sa.Connection) -> tuple[int, int, list[str]]:
            moved = int(
                conn.execute(*q.move_blob(old_uri=old.uri, new_uri=new.uri, size=new.size, sha256=new.sha256)).rowcount
            )
            left = int(conn.execute(*q.count_blob_rows(uri=old.uri)).scalar_one())
            return moved, left, self._unneeded(conn, [old.uri] if moved else [new.uri])

        return self._run(tx)

    def blob_uris(self, uris: Sequence[str]) -> set[str]:
        """Which of ``uris`` some row references (the orphan sweep keeps those)."""
        stmt = q.needed_uris(uris=uris, keep_consumed=True)
        return set(self._run(lambda conn: list(conn.execute(*stmt).scalars()))) if uris else set()


def view_state(row: dict[str, Any], now: datetime) -> str:
    """A row's state as people see it (:data:`~exclusive_xcom.ledger.queries.VIEW_STATES`) at ``now``."""
    lease = row.get("lease_expires_at")
    return _seen(row["state"], expired=lease is not None and lease < now, released=row.get("released_at") is not None)


def _seen(state: str, *, expired: bool, released: bool) -> str:
    """A claim whose lease ran out is expired; a ready item once claimed and given back is released."""
    if state == CLAIMED and expired:
        return q.EXPIRED
    if state == READY and released:
        return q.RELEASED
    return state
