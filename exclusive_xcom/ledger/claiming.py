"""How one claim request finds and locks its rows, inside the claim transaction, and why it
may find none: the rules of modes each, one and items, leases and the fence, row by row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NoReturn

import sqlalchemy as sa

from exclusive_xcom.errors import AlreadyConsumedError, ClaimConflictError, ItemRef, NotAuthorizedError, PayloadError
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.rows import consumers_json
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, SHARED_SLOT
from exclusive_xcom.ledger.types import EACH, ONE, Claimant, Claimed, ClaimRequest, describe_owner, owner_of


def authorize(claimant: Claimant, request: ClaimRequest, consumers: Iterable[str]) -> None:
    if claimant.slot not in consumers:
        allowed = ", ".join(sorted(consumers)) or "nobody"
        raise NotAuthorizedError(
            f"task {claimant.task_id!r} of dag {claimant.dag_id!r} is not a named consumer of this "
            f"output (allowed: {allowed}); add it to consumers= of {request.output.task_id!r}",
            request.output.ref(claimant.slot),
        )


def claim_one(
    conn: sa.Connection, claimant: Claimant, request: ClaimRequest, now: datetime
) -> tuple[Claimed, list[str]]:
    if not request.slot_row:
        return _claim_batch(conn, claimant, request, now), []
    slot, seq = slot_of(claimant, request), request.seq or 0
    out = request.output
    output_id, generation = out.output_id, request.written.generation
    row = conn.execute(*q.lock_slot(output_id=output_id, generation=generation, slot=slot, seq=seq)).first()
    claimed = Claimed(request)
    if row is None:
        busy = conn.execute(*q.peek_slot(output_id=output_id, generation=generation, slot=slot, seq=seq)).first()
        if busy is None:
            _no_row(conn, claimant, request)
        return _busy(claimant, request, "another task is claiming it right now")
    authorize(claimant, request, json.loads(row.consumers))
    if row.state == CONSUMED:
        if request.written.mode == ONE and owner_of(row) != claimant.identity:
            return claimed, [f"{out.producer!r} went to {describe_owner(row)} (consumed {row.consumed_at})"]
        raise AlreadyConsumedError(
            f"already consumed by {describe_owner(row)} at {row.consumed_at}; exclusive outputs are read "
            "once: re-run the producer to make a new one",
            out.ref(claimant.slot),
        )
    if row.state == CLAIMED and not _claimable(row, claimant, request, now):
        return _busy(claimant, request, f"held by {describe_owner(row)} until {row.lease_expires_at}")
    claimed.add(row, claimant)
    return claimed, []


def _no_row(conn: sa.Connection, claimant: Claimant, request: ClaimRequest) -> NoReturn:
    """Why a handle found no row: the producer wrote other consumers (the handle was altered
    and signed again, by someone holding a key), or its rows are gone."""
    out, consumers = request.output, request.written.consumers
    written = conn.execute(*q.output_consumers(output_id=out.output_id, generation=request.written.generation)).scalar()
    if written is not None and written != consumers_json(consumers):
        raise PayloadError(
            f"this handle names consumers {sorted(consumers)} but the producer wrote "
            f"{json.loads(written)}: the handle was altered and signed again with a valid key (check who "
            "holds [exclusive_xcom] secret_key); nothing was claimed",
            out.ref(claimant.slot),
        )
    raise PayloadError(
        "no ledger item matches this handle: it was purged, or replaced by a newer run of the "
        "producer; re-run the producer to make a new one",
        out.ref(claimant.slot),
    )


def slot_of(claimant: Claimant, request: ClaimRequest) -> str:
    """The slot a one-row request reads: the claimant's own in mode each, else the shared one."""
    return claimant.slot if request.written.mode == EACH else SHARED_SLOT


def _busy(claimant: Claimant, request: ClaimRequest, why: str) -> tuple[Claimed, list[str]]:
    if request.written.mode == ONE:
        return Claimed(request), [f"{request.output.producer!r} went to another consumer: {why}"]
    raise ClaimConflictError(
        f"another live claim holds the item ({why}); it is freed when that task finishes or its lease expires",
        request.output.ref(claimant.slot),
    )


def _claimable(row: Any, claimant: Claimant, request: ClaimRequest, now: datetime) -> bool:
    """Whether a claimed row may be taken: our own earlier try's, or an expired lease."""
    if owner_of(row) == claimant.identity:
        if row.owner_try > claimant.try_number:
            raise ClaimConflictError(
                f"{claimant} is fenced out: try {row.owner_try} of the same task instance holds the claim",
                request.output.ref(claimant.slot),
            )
        return True
    return row.lease_expires_at is not None and row.lease_expires_at < now


def _claim_batch(conn: sa.Connection, claimant: Claimant, request: ClaimRequest, now: datetime) -> Claimed:
    output_id, generation = request.output.output_id, request.written.generation
    rows: list[Any] = []
    if claimant.try_number > 1:  # a retry takes back what its earlier tries held, first
        rows = list(
            conn.execute(
                *q.lock_own_earlier(claimant=claimant, output_id=output_id, generation=generation, limit=request.limit)
            )
        )
    own = [r.id for r in rows]
    if len(rows) < request.limit:
        rows.extend(
            conn.execute(*q.lock_ready(output_id=output_id, generation=generation, limit=request.limit - len(rows)))
        )
    if len(rows) < request.limit:  # the pool's ready rows are gone: take over expired leases
        more = q.lock_reclaimable(
            claimant=claimant,
            output_id=output_id,
            generation=generation,
            now=now,
            limit=request.limit - len(rows),
            exclude=own,
        )
        rows.extend(conn.execute(*more))
    claimed = Claimed(request)
    if rows:  # every row of one output names the same consumers: parse them once per batch
        authorize(claimant, request, json.loads(rows[0].consumers))
    for row in rows:
        if row.state == CLAIMED and not _claimable(row, claimant, request, now):
            continue
        claimed.add(row, claimant)
    return claimed


def check_fence(conn: sa.Connection, claimant: Claimant, ref: ItemRef | None = None) -> None:
    newest = conn.execute(*q.lock_fence(ti_key=claimant.ti_key)).scalar()
    if newest is not None and newest > claimant.try_number:
        raise fenced(claimant, newest, ref)


def fenced(claimant: Claimant, newest: int, ref: ItemRef | None = None) -> ClaimConflictError:
    """Without ``ref`` the caller (a task's session) names the items involved."""
    return ClaimConflictError(
        f"{claimant} is fenced out: try {newest} of the same task instance has begun, so this older try "
        "can no longer claim, consume or produce anything (nothing was changed)",
        ref,
    )
