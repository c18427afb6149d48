"""The claim ledger: produce, claim, consume, release as transactions with one owner each.

This module knows nothing of Airflow: it is handed an engine, identities and bytes, so it
can be tested, benchmarked and reused alone. Rules it enforces (SPEC, "Semantics"):

* a claim belongs to a task-instance identity (dag_id, run_id, task_id, map_index) and is
  fenced by ``try_number``: a retry takes its own claim back, an older try is refused;
* a claim is a lease: once expired, another claimant may take the item over;
* an item is consumed only by :meth:`Ledger.finish`, which succeeds only while the very
  same try still holds the claim, so a zombie's late finish changes nothing;
* a re-run producer replaces what its earlier tries left unconsumed.

The rooms around it: value types in :mod:`.types`, the error boundary in :mod:`.boundary`,
schema and migrations in :mod:`.migrations`, operator reads and writes in :mod:`.admin`,
how a request finds its rows in :mod:`.claiming` and how an output becomes rows in
:mod:`.rows`; every statement in :mod:`.queries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.errors import ClaimConflictError, ExclusiveXComError, ItemRef, LedgerUnavailableError
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.admin import Admin
from exclusive_xcom.ledger.claiming import authorize, check_fence, claim_one, fenced, slot_of
from exclusive_xcom.ledger.migrations import Schema
from exclusive_xcom.ledger.rows import consumers_json, write_output
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY
from exclusive_xcom.ledger.types import (
    Claimant,
    Claimed,
    ClaimRequest,
    ClaimResult,
    Finished,
    Output,
    Production,
    describe_owner,
    inputs_key,
    is_held_by,
    owner_of,
)


class Ledger(Schema, Admin):
    """Transactions over the claim ledger tables, on an engine the caller owns: a task's
    claim path here, the schema and the operators' reads and writes inherited."""

    # -- tries ------------------------------------------------------------------------------

    def enter(self, claimant: Claimant) -> Finished | None:
        """Record that this try has begun; from now on older tries are fenced out.

        Returns the earlier try of this task instance whose finish consumed inputs, if
        any (its acknowledgement may have been lost: see :meth:`Finished.covers`).
        Raises :class:`ClaimConflictError` if a newer try of the same task instance has
        already begun (this one is the zombie).
        """

        def tx(conn: sa.Connection) -> Finished | None:
            row = self._enter(conn, claimant)
            if row.finished_try is None or row.finished_try >= claimant.try_number:
                return None
            return Finished(row.finished_try, row.finished_inputs)

        return self._run(tx)

    def _enter(self, conn: sa.Connection, claimant: Claimant) -> Any:
        """Inside a transaction: record this try on its fence row (raising it if this try is
        newer), lock the row and return it; raise if a newer try has begun."""
        key, mine = claimant.ti_key, claimant.try_number
        conn.execute(*q.enter_fence(dialect=conn.dialect.name, ti_key=key, try_number=mine, now=self._now()))
        row = conn.execute(*q.lock_fence(ti_key=key)).one()
        if row.try_number > mine:
            raise fenced(claimant, row.try_number)
        return row

    # -- produce ----------------------------------------------------------------------------

    def produce(self, production: Production) -> int:
        """Write an output, replacing unconsumed items of earlier tries; returns item count."""
        budget = self.inline_limit
        return self._run(lambda conn: write_output(conn, production, self._now(), budget)[0], production.output.ref())

    def finish(
        self,
        claimant: Claimant,
        ids: Sequence[int],
        productions: Sequence[Production] = (),
        blobs: Sequence[str] = (),
        inputs: Sequence[tuple[Output, int]] = (),
        *,
        enter: bool = False,
    ) -> list[str]:
        """Consume what ``claimant`` holds and write its outputs, all in one transaction.

        ``blobs`` are the offloaded payloads of ``ids``; ``inputs`` the outputs (and
        generations) they came from, recorded with the finish so that a later try of this
        task instance knows they are done (:meth:`enter`). Without ``inputs`` it only
        consumes: a batch of a stream acknowledged while the task still runs. Returns the blob URIs nothing
        needs any more (consumed, or replaced by this output), for the caller to delete.
        Raises :class:`ClaimConflictError` and changes nothing if any of ``ids`` is no
        longer held by this exact try (its lease was taken over, or a newer try fenced it).
        ``enter``: the try has not entered yet; the transaction enters it first (see :meth:`claim`).
        """

        ids = list(dict.fromkeys(ids))  # the same input named twice is consumed once
        key = inputs_key(inputs) if inputs else None  # None: a batch acknowledged mid-task

        def tx(conn: sa.Connection) -> list[str]:
            now = self._now()
            if enter:
                self._enter(conn, claimant)
            elif productions or not ids:  # a zombie must not replace the new try's output
                check_fence(conn, claimant, productions[0].output.ref() if productions else None)
            if ids:
                stmt = q.mark_consumed(claimant=claimant, ids=ids, now=now, keep_payload=self.keep_consumed_payloads)
                done = conn.execute(*stmt)
                if done.rowcount != len(ids):
                    check_fence(conn, claimant)
                    raise _NotHeld(len(ids) - done.rowcount)  # rolls back what was marked
                if key is not None:  # the task's finish, not a batch acknowledged while it runs
                    conn.execute(*q.mark_finished(claimant=claimant, inputs=key, now=now))
            stale = list(blobs)
            for production in productions:
                stale.extend(write_output(conn, production, now, self.inline_limit)[1])
            return self._unneeded(conn, stale)

        try:
            if self._direct is not None and ids and not productions and not enter:
                stmt = q.consume_all_now(
                    claimant=claimant, ids=ids, now=self._now(), inputs=key, keep_payload=self.keep_consumed_payloads
                )
                if not self._send(stmt).aborted:
                    return self._unneeded_after(blobs)
                # not all held: nothing changed, and the transaction below finds out why
            return self._run(tx)
        except _NotHeld as lost:
            raise self._not_held(claimant, ids, lost.count) from None
        except LedgerUnavailableError as exc:
            # The connection may have dropped after the server committed (a lost COMMIT
            # acknowledgement): look again before reporting a failure that did not happen.
            if not exc.maybe_committed or not self._finished(claimant, ids, productions, exc):
                raise
            return []  # a blob left behind is swept by purge

    def _unneeded_after(self, blobs: Sequence[str]) -> list[str]:
        """After a consume that committed by itself: which of its blobs to delete. None of them
        if the ledger cannot say right now: the consume stands, and purge sweeps them later."""
        if not blobs:
            return []
        try:
            return self._run(lambda conn: self._unneeded(conn, blobs))
        except LedgerUnavailableError:
            return []

    def size(self, output: Output, generation: int, slot: str | None = None) -> int:
        """How many rows one generation of an output has (in ``slot``): its item count."""
        stmt = q.count_output(output_id=output.output_id, generation=generation, slot=slot)
        return int(self._run(lambda conn: conn.execute(*stmt).scalar_one(), output.ref()))

    def forget(self, output: Output, generation: int) -> list[str]:
        """Delete every item of one generation of an output (Airflow purged its handle).

        Returns the blob URIs to delete. Claims in flight on these items are lost: their
        holder's finish fails with :class:`ClaimConflictError`, as after a re-run producer.
        """

        def tx(conn: sa.Connection) -> list[str]:
            output_id = output.output_id
            uris = list(conn.execute(*q.output_uris(output_id=output_id, generation=generation)).scalars())
            conn.execute(*q.delete_output(output_id=output_id, generation=generation))
            return self._unneeded(conn, uris)

        return self._run(tx, output.ref())

    def _finished(
        self, claimant: Claimant, ids: Sequence[int], productions: Sequence[Production], exc: ExclusiveXComError
    ) -> bool:
        """Whether this very finish committed: its inputs consumed by this try, or its output written."""
        try:
            if ids:
                rows = self._run(lambda conn: conn.execute(*q.select_by_ids(ids=ids)).all())
                return len(rows) == len(set(ids)) and all(r.state == CONSUMED and is_held_by(r, claimant) for r in rows)
            if productions:
                written = productions[0].written
                stmt = q.count_output(output_id=written.output.output_id, generation=written.generation)
                return bool(self._run(lambda conn: conn.execute(*stmt).scalar_one()))
        except LedgerUnavailableError:
            if ids:
                known = (
                    "whether this finish committed is unknown, as the ledger stayed unreachable: if it did, "
                    "its retry finds it done and succeeds without running again (publishing the output this "
                    "finish wrote); if not, this try still holds its inputs and its retry takes them back first"
                )
            else:
                known = (
                    "whether this output was written is unknown, as the ledger stayed unreachable: a retry "
                    "writes it again, replacing this write if it did commit and nobody has consumed it"
                )
            raise LedgerUnavailableError(self._failure(exc.__cause__ or exc, known), exc.ref) from exc.__cause__
        return False

    def _not_held(self, claimant: Claimant, ids: Sequence[int], count: int) -> ClaimConflictError:
        """The error for a finish that lost claims: who has them now, and whose output they are."""
        try:
            rows = self._run(lambda conn: conn.execute(*q.select_by_ids(ids=ids)).all())
        except ExclusiveXComError:  # the conflict is the news; its details are a bonus
            rows = []
        taken = [r for r in rows if not (r.state == CLAIMED and is_held_by(r, claimant))]
        if taken:
            row = taken[0]
            if row.state == CONSUMED:
                why = f"it was consumed by {describe_owner(row)} at {row.consumed_at}"
            elif row.state == READY:
                why = "it was released"
            elif owner_of(row) == claimant.identity:
                why = f"try {row.owner_try} of the same task instance fenced it out"
            else:
                why = f"{describe_owner(row)} took it over (the lease had expired, or it was released)"
        elif len(rows) < len(set(ids)):
            why = "it was replaced by a newer run of the producer, or purged"
        else:
            why = "a newer try fenced it or its lease expired and another task took over"
        anchor = taken[0] if taken else (rows[0] if rows else None)
        if anchor is not None:
            ref = Output(anchor.dag_id, anchor.run_id, anchor.task_id, anchor.map_index, anchor.key).ref(claimant.slot)
        else:
            ref = ItemRef(claimant.dag_id, claimant.run_id, "unknown", "unknown", claimant.slot)
        return ClaimConflictError(
            f"{claimant} no longer holds {count} of its {len(ids)} claimed item(s): {why}; nothing was consumed",
            ref,
        )

    # -- claim ------------------------------------------------------------------------------

    def claim(self, claimant: Claimant, requests: Sequence[ClaimRequest], *, enter: bool = False) -> ClaimResult:
        """Claim every request in one transaction: all of them, or none.

        A ``one``-mode input already taken by another consumer is not an error: the result
        lists it in ``lost`` and nothing is claimed, so the caller can skip the task.
        ``enter``: this try has not entered yet (:meth:`enter`); the claim's transaction
        enters it first, saving a transaction of its own. A first try does so: it has no
        earlier try whose finish :meth:`enter` would report.
        """
        for request in requests:
            authorize(claimant, request, request.written.consumers)
        if self._direct is not None and len(requests) == 1 and not enter:
            claimed = self._claim_now(claimant, requests[0])
            if claimed is not None:
                return claimed
        return self._claim_in_transaction(claimant, requests, enter=enter)

    def _claim_now(self, claimant: Claimant, request: ClaimRequest) -> ClaimResult | None:
        """PostgreSQL: claim ready rows in one statement; None if the transaction must decide.

        That is a retry in mode ``items`` (what its earlier tries hold comes first) and any
        claim that finds no ready row (a lease to take over, a retry's own claim, an error
        to explain). A batch short of ``limit`` is topped up from expired leases.
        """
        if not request.slot_row and claimant.try_number > 1:
            return None
        slot = slot_of(claimant, request) if request.slot_row else None
        limit = 1 if request.slot_row else request.limit
        now = self._now()
        out, written = request.output, request.written
        stmt = q.claim_ready_now(
            claimant=claimant,
            output_id=out.output_id,
            generation=written.generation,
            consumers=consumers_json(written.consumers),
            slot=slot,
            seq=request.seq or 0,
            limit=limit,
            now=now,
            lease=now + timedelta(seconds=self.lease_seconds),
        )
        rows = self._send(stmt, out.ref(claimant.slot)).rows
        if not rows:
            return None
        claimed = Claimed(request)
        for row in sorted(rows, key=lambda r: r.seq):
            claimed.add(row)
        if len(rows) < limit:
            (more,) = self._claim_in_transaction(claimant, [replace(request, limit=limit - len(rows))]).claims
            claimed.extend(more)
        return ClaimResult([claimed])

    def _claim_in_transaction(
        self, claimant: Claimant, requests: Sequence[ClaimRequest], *, enter: bool = False
    ) -> ClaimResult:
        def tx(conn: sa.Connection) -> ClaimResult:
            if enter:
                self._enter(conn, claimant)
            now = self._now()
            result = ClaimResult(claims=[])
            for request in requests:
                claimed, lost = claim_one(conn, claimant, request, now)
                result.claims.append(claimed)
                result.lost.extend(lost)
            if result.lost:
                return result
            if not result.ids:  # a zombie that finds nothing is still fenced out
                check_fence(conn, claimant, requests[0].output.ref(claimant.slot) if requests else None)
                return result
            lease = now + timedelta(seconds=self.lease_seconds)
            stmt = q.mark_claimed(claimant=claimant, ids=result.ids, now=now, lease=lease)
            if conn.execute(*stmt).rowcount != len(result.ids):
                # The rows are locked by this transaction: only the fence can have refused.
                check_fence(conn, claimant, requests[0].output.ref(claimant.slot))
                raise AssertionError("claimed rows changed under their row locks")
            return result

        result = self._run(tx, requests[0].output.ref(claimant.slot) if requests else None)
        if result.lost:
            result.claims = []
        return result

    def extend_lease(self, claimant: Claimant, ids: Sequence[int]) -> bool:
        """Keep a long-running task's claims alive; False if any was lost meanwhile."""
        lease = self._now() + timedelta(seconds=self.lease_seconds)
        stmt = q.extend_lease(claimant=claimant, ids=ids, lease=lease)
        return self._run(lambda conn: conn.execute(*stmt).rowcount) == len(ids)

    def release(self, claimant: Claimant, ids: Sequence[int]) -> int:
        """Give claims back to the pool (the task failed for good); fenced like finish."""
        stmt = q.release(claimant=claimant, ids=ids, now=self._now())
        return self._run(lambda conn: conn.execute(*stmt).rowcount)

    def release_held(self, claimant: Claimant, outputs: Sequence[tuple[Output, int]]) -> int:
        """Give back everything this try holds of these (output, generation) pairs, in one
        transaction: the claims it knows of and any whose reply it never got."""

        def tx(conn: sa.Connection) -> int:
            now = self._now()
            held = (q.release_held(claimant=claimant, output_id=o.output_id, generation=g, now=now) for o, g in outputs)
            return sum(conn.execute(*stmt).rowcount for stmt in held)

        return self._run(tx)


class _NotHeld(Exception):
    """Inside :meth:`Ledger.finish`: some claims are no longer held; abort the transaction."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count
