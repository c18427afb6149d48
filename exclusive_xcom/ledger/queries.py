"""Every statement the ledger sends, by name, in one place.

Statements are SQLAlchemy Core so one definition renders correctly on PostgreSQL,
MySQL/MariaDB and SQLite. Row locks: ``FOR UPDATE SKIP LOCKED`` on the servers (a row
another transaction is claiming is passed over, never waited for); SQLite has no row
locks and drops the clause, its writers are serialized by ``BEGIN IMMEDIATE`` instead
(see :mod:`exclusive_xcom.ledger.engine`). On PostgreSQL the common claim and consume are
single statements sent in autocommit ("one statement each" below); the rest of the claim
path is the portable transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY, SHARED_SLOT, fence, item, meta
from exclusive_xcom.ledger.types import Claimant

if TYPE_CHECKING:
    from typing_extensions import Unpack

    Rows = sa.Select[Unpack[tuple[Any, ...]]]  # whole rows, however many columns

_CLAIM_COLUMNS = (
    item.c.id,
    item.c.seq,
    item.c.state,
    item.c.slot,
    item.c.consumers,
    item.c.owner_dag_id,
    item.c.owner_run_id,
    item.c.owner_task_id,
    item.c.owner_map_index,
    item.c.owner_try,
    item.c.lease_expires_at,
    item.c.consumed_at,
    item.c.payload,
    item.c.payload_uri,
    item.c.payload_size,
    item.c.payload_sha256,
)


def _constant(value: str) -> sa.ColumnElement[str]:
    """A state or slot name written into the SQL text instead of bound as a parameter.

    psycopg prepares a statement on the server after a few runs, and PostgreSQL may then
    switch to a generic plan, planned without the parameters' values: such a plan cannot
    prove ``state != $1`` implies a partial index's ``state != 'consumed'`` and walks
    every consumed row of the pool instead (a batch claim went from 0.3 ms to 5 ms; the
    claimable index has been predicated on ``consumed_at IS NULL`` since version 10).
    """
    return sa.literal_column(f"'{value}'", sa.String())


_READY, _CLAIMED, _CONSUMED, _SHARED = (_constant(v) for v in (READY, CLAIMED, CONSUMED, SHARED_SLOT))

_V = TypeVar("_V")


class Bound(NamedTuple):
    """What every function here returns: a statement and the values of its bind parameters
    (one dict, or a list of them for an executemany), ready for ``conn.execute(*bound)``."""

    statement: sa.Executable
    params: dict[str, Any] | list[dict[str, Any]] | None = None


# -- the claim path: statements built once -----------------------------------------------------
#
# Claim, consume and heartbeat run for every item, so their statements are built once, with
# bind parameters, instead of as a fresh expression tree per call: SQLAlchemy then reuses
# both the statement's cache key and its compiled SQL, which was half of a claim's client
# CPU. Ids go in as one expanding parameter.

_P = sa.bindparam
_IDS = item.c.id.in_(_P("ids", expanding=True))
_OWNER_IS = sa.and_(
    item.c.owner_dag_id == _P("o_dag"),
    item.c.owner_run_id == _P("o_run"),
    item.c.owner_task_id == _P("o_task"),
    item.c.owner_map_index == _P("o_map"),
)
# The fence's key travels as ":f_key", never ":ti_key": an UPDATE of the fence (even one in a
# WITH clause) takes a parameter named after one of its columns for its SET clause.
_NOT_FENCED = ~sa.exists(
    sa.select(fence.c.ti_key).where(fence.c.ti_key == _P("f_key"), fence.c.try_number > _P("o_try"))
)
# The state is compared through coalesce() so planners go by the ids (primary key), not by
# the state index: with many claims in flight, "state = 'claimed'" matches them all.
_HELD = sa.and_(
    _IDS, sa.func.coalesce(item.c.state, item.c.state) == _CLAIMED, _OWNER_IS, item.c.owner_try == _P("o_try")
)
_POOL = sa.and_(item.c.output_id == _P("p_output"), item.c.generation == _P("p_gen"), item.c.slot == _SHARED)


def _owner(claimant: Claimant) -> dict[str, Any]:
    """The claimant's task instance and try: whose claims a statement may touch."""
    c = claimant
    return {"o_dag": c.dag_id, "o_run": c.run_id, "o_task": c.task_id, "o_map": c.map_index, "o_try": c.try_number}


def _made_by(claimant: Claimant) -> dict[str, Any]:
    """Who made a claim or a consume: the Airflow task-instance id and the host of the process
    (or None: code that does not say, such as the benchmarks). Recorded, never checked here:
    task code can present any identity, so `exclusive-xcom audit` compares the records with Airflow."""
    return {"m_ti": claimant.ti_id, "m_host": claimant.host}


def _fenced_as(claimant: Claimant) -> dict[str, Any]:
    """What a statement that goes through the fence needs: owner, try and the fence's key."""
    return {**_owner(claimant), "f_key": claimant.ti_key}


#: MySQL/MariaDB are told which index a pool claim reads: left to itself MariaDB chose the
#: unique key at 100,000 rows (in seq order, but through every consumed row of the pool: a
#: 120 ms claim) and the pool index at 1,000,000 (4 ms).
_POOL_INDEX_HINT = "FORCE INDEX (ix_exclusive_xcom_item_pool)"


#: What a claim reads of a ready row: nobody holds it, so no owner nor lease, and the rows
#: come in seq order (each column costs a descriptor to parse in every result: PyMySQL spent
#: a quarter of a single claim's CPU parsing the 16 of :data:`_CLAIM_COLUMNS`).
_READY_COLUMNS = (
    item.c.id,
    item.c.state,
    item.c.consumers,
    item.c.payload,
    item.c.payload_uri,
    item.c.payload_size,
    item.c.payload_sha256,
)


def _from_pool(*conditions: sa.ColumnElement[bool], columns: Sequence[sa.ColumnElement[Any]] = _CLAIM_COLUMNS) -> Rows:
    """Up to ``:limit`` rows of a shared pool (mode items) meeting ``conditions``, lowest seq first.

    Every caller compares ``state`` for equality, so on MySQL/MariaDB the pool index
    (output, generation, slot, state, seq) yields the rows already in seq order.
    """
    return (
        sa.select(*columns)
        .where(_POOL, *conditions)
        .order_by(item.c.seq)
        .limit(_P("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
        .with_hint(item, _POOL_INDEX_HINT, "mysql")
        .with_hint(item, _POOL_INDEX_HINT, "mariadb")
    )


# Claimable: ready, or claimed under an expired lease, or claimed by an *earlier* try of this
# same task instance (its retry takes its own claims back). Ready rows are taken first, in
# their own statement: an equality on the state lets MySQL/MariaDB, which have no partial
# index, read the pool's ready rows in seq order from an index instead of stepping over every
# consumed row. Rows this very try already holds are never taken again, so a drain loop ends
# when the pool is empty; expired leases are reclaimed here, inside the claim (no sweeper).
_RECLAIMABLE = sa.or_(
    # An expired lease, unless this very try holds it (a long drain must not get its own
    # items twice).
    sa.and_(item.c.lease_expires_at < _P("now"), ~sa.and_(_OWNER_IS, item.c.owner_try == _P("o_try"))),
    sa.and_(_OWNER_IS, item.c.owner_try < _P("o_try")),
)
# Rows not consumed, as the claimable partial index's predicate says it (PostgreSQL, SQLite):
# written so, the claim path reads that index. A row is consumed exactly when consumed_at is
# set (the consume sets both, nothing clears either; version 10 filled in older rows).
_UNCONSUMED = item.c.consumed_at.is_(None)
# The same rows for statements with no equality on the state: also ``state != 'consumed'``,
# a range of the state index on MySQL/MariaDB (which have no partial index).
_UNCONSUMED_ROWS = sa.and_(_UNCONSUMED, item.c.state != _CONSUMED)
_LOCK_READY = _from_pool(_UNCONSUMED, item.c.state == _READY, columns=_READY_COLUMNS)
_LOCK_RECLAIMABLE = _from_pool(_UNCONSUMED, item.c.state == _CLAIMED, _RECLAIMABLE)
_LOCK_RECLAIMABLE_EXCLUDING = _from_pool(
    _UNCONSUMED, item.c.state == _CLAIMED, _RECLAIMABLE, item.c.id.not_in(_P("exclude", expanding=True))
)
_LOCK_OWN_EARLIER = _from_pool(_UNCONSUMED, item.c.state == _CLAIMED, _OWNER_IS, item.c.owner_try < _P("o_try"))
# One row: a slot's (modes each/one: seq 0) or one item of a pool (a consumer mapped over it).
_SLOT = sa.and_(
    item.c.output_id == _P("p_output"),
    item.c.generation == _P("p_gen"),
    item.c.slot == _P("p_slot"),
    item.c.seq == _P("p_seq"),
)
_LOCK_SLOT = sa.select(*_CLAIM_COLUMNS).where(_SLOT).with_for_update(skip_locked=True)
_PEEK_SLOT = sa.select(*_CLAIM_COLUMNS).where(_SLOT)
_CLAIM_VALUES: dict[str, Any] = {
    "state": CLAIMED,
    "owner_dag_id": _P("o_dag"),
    "owner_run_id": _P("o_run"),
    "owner_task_id": _P("o_task"),
    "owner_map_index": _P("o_map"),
    "owner_try": _P("o_try"),
    "claimed_at": _P("now"),
    "lease_expires_at": _P("lease"),
    "owner_ti_id": _P("m_ti"),
    "owner_host": _P("m_host"),
}
_MARK_CLAIMED = sa.update(item).where(_IDS, _NOT_FENCED).values(**_CLAIM_VALUES)
_CONSUMING: dict[str, Any] = {
    "state": CONSUMED,
    "consumed_at": _P("now"),
    "lease_expires_at": None,
    "consumed_ti_id": _P("m_ti"),
    "consumed_host": _P("m_host"),
}
_MARK_CONSUMED = sa.update(item).where(_HELD, _NOT_FENCED).values(**_CONSUMING, payload=None)
_MARK_CONSUMED_KEEPING = sa.update(item).where(_HELD, _NOT_FENCED).values(**_CONSUMING)
_EXTEND_LEASE = sa.update(item).where(_HELD).values(lease_expires_at=_P("lease"))
# A finish that consumed inputs records itself on its task instance's fence row, in the same
# transaction: a later try then knows these inputs are done, even if this one never heard so.
_FENCE_IS_MINE = sa.and_(fence.c.ti_key == _P("f_key"), fence.c.try_number == _P("o_try"))
_FINISHED: dict[str, Any] = {"finished_try": _P("o_try"), "finished_inputs": _P("inputs"), "updated_at": _P("now")}
_MARK_FINISHED = sa.update(fence).where(_FENCE_IS_MINE).values(**_FINISHED)


# -- PostgreSQL: claim and consume in one statement each ----------------------------------------
#
# Sent outside an explicit transaction (autocommit), each is one round trip instead of four
# (BEGIN, lock, update, COMMIT) and row locks are held only while the statement runs. They
# cover the common case only: a first try claiming ready rows of one output, and a finish that
# only consumes. Anything else (a retry, expired leases, an empty result to explain, outputs
# to write) goes through the general transaction. Ids travel as one array, not one parameter
# each (``= ANY(:ids)``): a statement's text then stays the same whatever the batch size.

_ID_ARRAY = sa.any_(_P("ids", type_=postgresql.ARRAY(sa.BigInteger())))
_RETURNED = (item.c.id, item.c.seq, item.c.payload, item.c.payload_uri, item.c.payload_size, item.c.payload_sha256)


def _claim_picked(*where: sa.ColumnElement[bool]) -> sa.Update:
    """Lock ready rows meeting ``where`` (skipping rows others are claiming), then claim them
    for this try unless it is fenced out; returns what the claim needs of each row.

    ``consumers`` must equal the producer's list as stored: a handle whose list differs
    claims nothing here, and the general path says why.
    """
    picked = (
        sa.select(item.c.id)
        .where(*where, _UNCONSUMED, item.c.state == _READY, item.c.consumers == _P("p_consumers"))
        .order_by(item.c.seq)
        .limit(_P("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    return (
        sa.update(item)
        .where(item.c.id.in_(sa.select(picked.c.id)), _NOT_FENCED)
        .values(**_CLAIM_VALUES)
        .returning(*_RETURNED)
    )


_CLAIM_READY_NOW = _claim_picked(_POOL)
_CLAIM_SLOT_NOW = _claim_picked(_SLOT)


#: The SQLSTATE of a consume that aborted itself (division_by_zero: see :func:`_consume_all`).
ABORTED = "22012"


def _consume_all(record: bool, **values: Any) -> sa.Select[tuple[Any]]:
    """Consume ``:ids`` only if this try holds every one of them (``:n`` rows) or none;
    ``record``: and mark the finish on the fence row, which must still be this try's.

    The rows are updated straight away; if fewer than all of them were held (or the fence
    moved on), the statement aborts itself, undoing every row it changed: PostgreSQL has no
    RAISE outside PL/pgSQL, so it divides by zero (SQLSTATE :data:`ABORTED`, which the
    ledger reads as "not all held" and explains in a transaction). Locking the rows first
    and counting them, as it did, cost a third more server time per batch of 100
    (6.0 → 3.9 ms, ``benchmarks/README.md``, round 2).
    """
    done = (
        sa.update(item)
        .where(
            item.c.id == _ID_ARRAY,
            sa.func.coalesce(item.c.state, item.c.state) == _CLAIMED,  # by id, not the state index
            _OWNER_IS,
            item.c.owner_try == _P("o_try"),
            _NOT_FENCED,
        )
        .values(**values)
        .returning(item.c.id)
        .cte("done")
    )
    everything = sa.select(sa.func.count()).select_from(done).scalar_subquery() == _P("n", type_=sa.Integer())
    if record:
        finished = sa.update(fence).where(_FENCE_IS_MINE).values(**_FINISHED).returning(fence.c.ti_key).cte("finished")
        everything = sa.and_(everything, sa.select(sa.func.count()).select_from(finished).scalar_subquery() == 1)
    return sa.select(sa.literal_column("1", sa.Integer()) // sa.cast(everything, sa.Integer()))


#: (keep the payload, record the finish) -> the statement
_CONSUME_ALL_NOW = {
    (keep, record): _consume_all(record, **_CONSUMING, **({} if keep else {"payload": None}))
    for keep in (False, True)
    for record in (False, True)
}


def claim_ready_now(
    *,
    claimant: Claimant,
    output_id: str,
    generation: int,
    consumers: str,
    slot: str | None,
    seq: int,
    limit: int,
    now: datetime,
    lease: datetime,
) -> Bound:
    """PostgreSQL, one statement: claim up to ``limit`` ready rows of a pool (``slot`` None)
    or one row (a slot's, or item ``seq`` of a pool), for this try, recording who made it."""
    params = {
        "p_output": output_id,
        "p_gen": generation,
        "p_consumers": consumers,
        "limit": limit,
        "now": now,
        "lease": lease,
        **_fenced_as(claimant),
        **_made_by(claimant),
    }
    if slot is None:
        return Bound(_CLAIM_READY_NOW, params)
    return Bound(_CLAIM_SLOT_NOW, {**params, "p_slot": slot, "p_seq": seq})


def consume_all_now(
    *, claimant: Claimant, ids: Sequence[int], now: datetime, inputs: str | None, keep_payload: bool
) -> Bound:
    """PostgreSQL, one statement: consume every one of ``ids`` held by this try and record
    the finish (:func:`mark_finished`, ``inputs`` given), or abort (:data:`ABORTED`) having
    changed nothing."""
    _, params = mark_consumed(claimant=claimant, ids=ids, now=now, keep_payload=keep_payload)
    assert isinstance(params, dict)
    stmt = _CONSUME_ALL_NOW[keep_payload, inputs is not None]  # a batch acknowledged mid-task: no record
    return Bound(stmt, {**params, "inputs": inputs, "n": len(params["ids"])})


def lock_slot(*, output_id: str, generation: int, slot: str, seq: int) -> Bound:
    """Lock one row (a slot's in modes each/one, or item ``seq``); one being claimed elsewhere is skipped."""
    return Bound(_LOCK_SLOT, {"p_output": output_id, "p_gen": generation, "p_slot": slot, "p_seq": seq})


def peek_slot(*, output_id: str, generation: int, slot: str, seq: int) -> Bound:
    """Read that row without locking, to explain why :func:`lock_slot` returned nothing."""
    return Bound(_PEEK_SLOT, {"p_output": output_id, "p_gen": generation, "p_slot": slot, "p_seq": seq})


def lock_ready(*, output_id: str, generation: int, limit: int) -> Bound:
    """Lock up to ``limit`` ready items of a shared pool (mode items), lowest seq first; their
    rows have no owner nor seq columns (see :data:`_READY_COLUMNS`)."""
    return Bound(_LOCK_READY, {"p_output": output_id, "p_gen": generation, "limit": limit})


def lock_reclaimable(
    *, claimant: Claimant, output_id: str, generation: int, now: datetime, limit: int, exclude: Sequence[int] = ()
) -> Bound:
    """Lock up to ``limit`` claimed items of a pool that may be taken over: expired leases,
    and what earlier tries of this task instance held (``exclude``: already taken)."""
    params = {"p_output": output_id, "p_gen": generation, "now": now, "limit": limit, **_owner(claimant)}
    if exclude:
        return Bound(_LOCK_RECLAIMABLE_EXCLUDING, {**params, "exclude": list(exclude)})
    return Bound(_LOCK_RECLAIMABLE, params)


def lock_own_earlier(*, claimant: Claimant, output_id: str, generation: int, limit: int) -> Bound:
    """What earlier tries of this task instance still hold: a retry takes these back first."""
    return Bound(_LOCK_OWN_EARLIER, {"p_output": output_id, "p_gen": generation, "limit": limit, **_owner(claimant)})


def lock_fence(*, ti_key: str) -> Bound:
    """The newest try of a task instance, and the try (and inputs) whose finish consumed."""
    columns = (fence.c.try_number, fence.c.finished_try, fence.c.finished_inputs)
    return Bound(sa.select(*columns).where(fence.c.ti_key == ti_key).with_for_update())


def mark_finished(*, claimant: Claimant, inputs: str | None, now: datetime) -> Bound:
    """Record that this try's finish consumed ``inputs`` (a key of their outputs and generations)."""
    params = {"f_key": claimant.ti_key, "o_try": claimant.try_number, "inputs": inputs, "now": now}
    return Bound(_MARK_FINISHED, params)


def enter_fence(*, dialect: str, ti_key: str, try_number: int, now: datetime) -> Bound:
    """One upsert: the task instance's fence row is made, or raised to this try if it is newer.

    Two tries starting at once cannot both insert (the primary key decides in the server, no
    retry in the client); an older try leaves the row as it is and finds itself fenced out
    when it reads the row back (:func:`lock_fence`, same transaction).
    """
    values = {"ti_key": ti_key, "try_number": try_number, "updated_at": now}
    if dialect == "postgresql":
        pg = postgresql.insert(fence).values(**values)
        newest = sa.func.greatest(fence.c.try_number, pg.excluded.try_number)
        return Bound(pg.on_conflict_do_update(index_elements=[fence.c.ti_key], set_=_raised(newest, now)))
    if dialect in ("mysql", "mariadb"):
        my = mysql.insert(fence).values(**values)
        newest = sa.func.greatest(fence.c.try_number, my.inserted.try_number)
        return Bound(my.on_duplicate_key_update(_raised(newest, now)))
    lite = sqlite.insert(fence).values(**values)
    newest = sa.func.max(fence.c.try_number, lite.excluded.try_number)
    return Bound(lite.on_conflict_do_update(index_elements=[fence.c.ti_key], set_=_raised(newest, now)))


def _raised(newest: sa.ColumnElement[int], now: datetime) -> dict[str, Any]:
    """The fence row after an upsert: the newest try, last seen now (purge ages rows by this)."""
    return {"try_number": newest, "updated_at": now}


def mark_claimed(*, claimant: Claimant, ids: Sequence[int], now: datetime, lease: datetime) -> Bound:
    """Claim locked rows for this try, unless a newer try of the task instance has begun."""
    params = {"ids": list(ids), "now": now, "lease": lease, **_fenced_as(claimant), **_made_by(claimant)}
    return Bound(_MARK_CLAIMED, params)


def mark_consumed(*, claimant: Claimant, ids: Sequence[int], now: datetime, keep_payload: bool) -> Bound:
    """Consume rows still claimed by exactly this try (the fence every finish goes through)."""
    stmt = _MARK_CONSUMED_KEEPING if keep_payload else _MARK_CONSUMED
    return Bound(stmt, {"ids": list(ids), "now": now, **_fenced_as(claimant), **_made_by(claimant)})


def extend_lease(*, claimant: Claimant, ids: Sequence[int], lease: datetime) -> Bound:
    return Bound(_EXTEND_LEASE, {"ids": list(ids), "lease": lease, **_owner(claimant)})


def release(*, claimant: Claimant, ids: Sequence[int], now: datetime) -> Bound:
    """Give back rows still claimed by exactly this try (a task that failed for good)."""
    return Bound(_RELEASE, {"ids": list(ids), "now": now, **_owner(claimant)})


def select_by_ids(*, ids: Sequence[int]) -> Bound:
    """Rows by id, without payloads: who holds them now, when a finish found them lost."""
    cols = [c for c in item.c if c.name != "payload"]
    return Bound(sa.select(*cols).where(item.c.id.in_(ids)).order_by(item.c.id))


def output_consumers(*, output_id: str, generation: int) -> Bound:
    """The consumers one generation of an output was written for (every row names the same)."""
    where = (item.c.output_id == output_id, item.c.generation == generation)
    return Bound(sa.select(item.c.consumers).where(*where).limit(1))


def count_output(*, output_id: str, generation: int, slot: str | None = None) -> Bound:
    stmt = sa.select(sa.func.count()).where(item.c.output_id == output_id, item.c.generation == generation)
    return Bound(stmt if slot is None else stmt.where(item.c.slot == slot))


def release_any(*, ids: Sequence[int], now: datetime) -> Bound:
    """Operator's override (CLI ``release``): free a stuck claim whoever holds it."""
    stmt = sa.update(item).where(item.c.id.in_(ids), item.c.state == _CLAIMED).values(**_UNCLAIMED)
    return Bound(stmt, {"now": now})


_UNCLAIMED: dict[str, Any] = {
    "state": READY,
    "owner_dag_id": None,
    "owner_run_id": None,
    "owner_task_id": None,
    "owner_map_index": None,
    "owner_try": None,
    "claimed_at": None,
    "lease_expires_at": None,
    "owner_ti_id": None,
    "owner_host": None,
    "released_at": _P("now"),
}
_RELEASE = sa.update(item).where(_HELD).values(**_UNCLAIMED)
_RELEASE_HELD = (
    sa.update(item)
    .where(
        item.c.output_id == _P("p_output"),
        item.c.generation == _P("p_gen"),
        item.c.state == _CLAIMED,
        _OWNER_IS,
        item.c.owner_try == _P("o_try"),
    )
    .values(**_UNCLAIMED)
)


def release_held(*, claimant: Claimant, output_id: str, generation: int, now: datetime) -> Bound:
    """Give back every row of one output this try holds, whether it knows their ids or not
    (a drain that died between batches, a claim whose reply was lost): the try failed for good."""
    return Bound(_RELEASE_HELD, {"p_output": output_id, "p_gen": generation, "now": now, **_owner(claimant)})


def unconsumed_uris(*, output_id: str) -> Bound:
    """Blobs of what :func:`replace_unconsumed` is about to delete."""
    where = (item.c.output_id == output_id, _UNCONSUMED_ROWS, item.c.payload_uri.is_not(None))
    return Bound(sa.select(item.c.payload_uri).where(*where))


def needed_uris(*, uris: Sequence[str], keep_consumed: bool) -> Bound:
    """Which of ``uris`` some row still needs: an unconsumed one (or any, if payloads are kept)."""
    stmt = sa.select(item.c.payload_uri).where(item.c.payload_uri.in_(uris)).distinct()
    return Bound(stmt if keep_consumed else stmt.where(_UNCONSUMED_ROWS))


def output_uris(*, output_id: str, generation: int) -> Bound:
    where = (item.c.output_id == output_id, item.c.generation == generation, item.c.payload_uri.is_not(None))
    return Bound(sa.select(item.c.payload_uri).where(*where).distinct())


def delete_output(*, output_id: str, generation: int) -> Bound:
    """Every row of one generation of an output (Airflow purged its handle)."""
    return Bound(sa.delete(item).where(item.c.output_id == output_id, item.c.generation == generation))


def replace_unconsumed(*, output_id: str) -> Bound:
    """A re-run producer replaces what its earlier tries left unconsumed (no duplicates)."""
    return Bound(sa.delete(item).where(item.c.output_id == output_id, _UNCONSUMED_ROWS))


def insert_items(*, rows: list[dict[str, Any]]) -> Bound:
    """Rows of an output, in one executemany."""
    return Bound(sa.insert(item), rows)


def select_items(
    *,
    item_id: int | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    state: str | None = None,
    unread_before: datetime | None = None,
    limit: int | None = None,
) -> Bound:
    """Rows for people and scripts (CLI ``ls``), newest first, without payloads; with
    ``unread_before``, only the unconsumed ones created before it, found as
    :func:`waiting_by_producer` finds them."""
    cols = [c for c in item.c if c.name != "payload"]
    column = _opaque if unread_before is not None else _as_is
    stmt = sa.select(*cols).order_by(column(item.c.id).desc())
    if unread_before is not None:
        stmt = stmt.where(_UNCONSUMED_ROWS, item.c.created_at < unread_before)
    for col, value in (
        (item.c.id, item_id),
        (item.c.dag_id, dag_id),
        (item.c.run_id, run_id),
        (item.c.task_id, task_id),
        (item.c.state, state),
    ):
        if value is not None:
            stmt = stmt.where(column(col) == value)
    return Bound(stmt.limit(limit) if limit else stmt)


_RECORD_COLUMNS = (
    item.c.id,
    item.c.dag_id,
    item.c.run_id,
    item.c.task_id,
    item.c.map_index,
    item.c.state,
    item.c.owner_dag_id,
    item.c.owner_run_id,
    item.c.owner_task_id,
    item.c.owner_map_index,
    item.c.owner_try,
    item.c.owner_ti_id,
    item.c.owner_host,
    item.c.claimed_at,
    item.c.consumed_ti_id,
    item.c.consumed_host,
    item.c.consumed_at,
)


def claim_records(
    *,
    after_id: int,
    limit: int,
    dag_id: str | None = None,
    run_id: str | None = None,
    since: datetime | None = None,
) -> Bound:
    """Claimed and consumed rows with who claimed and who consumed them, walking the primary key
    (``exclusive-xcom audit``). ``dag_id``/``run_id`` match the producer's or the claimant's;
    ``since``: claimed or consumed then or later."""
    state = sa.func.coalesce(item.c.state, item.c.state)  # by id, not the state index (see Purgeable)
    stmt = sa.select(*_RECORD_COLUMNS).where(item.c.id > after_id, state != _READY)
    if dag_id is not None:
        stmt = stmt.where(sa.or_(item.c.dag_id == dag_id, item.c.owner_dag_id == dag_id))
    if run_id is not None:
        stmt = stmt.where(sa.or_(item.c.run_id == run_id, item.c.owner_run_id == run_id))
    if since is not None:
        stmt = stmt.where(sa.or_(item.c.claimed_at >= since, item.c.consumed_at >= since))
    return Bound(stmt.order_by(item.c.id).limit(limit))


def _opaque(column: sa.ColumnElement[_V]) -> sa.ColumnElement[_V]:
    """``column`` as an expression no index matches (``coalesce(c, c)``).

    Statements over unconsumed rows only must read them from the claimable partial index.
    SQLite plans without statistics and would rather walk an index that serves a GROUP BY,
    an ORDER BY or an equality (the run index, the rowid order) through every consumed row
    of the history: 90 ms at 200,000 rows instead of 0.3 ms. Through this it has no such
    index to choose; PostgreSQL and MySQL/MariaDB plan the same either way.
    """
    return sa.func.coalesce(column, column)


def _as_is(column: sa.ColumnElement[_V]) -> sa.ColumnElement[_V]:
    return column


def waiting_by_producer(*, unread_before: datetime) -> Bound:
    """Per producer (dag_id, task_id) with unconsumed items: how many wait, how many of them
    were created before ``unread_before`` (unread too long), and when the oldest was created.

    It reads unconsumed rows only, never the consumed history: ``consumed_at IS NULL`` is
    the claimable partial index's own predicate (PostgreSQL, SQLite), ``state !=
    'consumed'`` a range of the state index on MySQL/MariaDB.
    """
    dag_id, task_id = _opaque(item.c.dag_id).label("dag_id"), _opaque(item.c.task_id).label("task_id")
    late = sa.case((item.c.created_at < unread_before, 1), else_=0)
    return Bound(
        sa.select(
            dag_id,
            task_id,
            sa.func.count().label("waiting"),
            sa.func.sum(late).label("unread"),
            sa.func.min(item.c.created_at).label("oldest"),
        )
        .where(_UNCONSUMED_ROWS)
        .group_by(dag_id, task_id)
    )


def count_by_state() -> Bound:
    return Bound(sa.select(item.c.state, sa.func.count()).group_by(item.c.state))


def storage_stats() -> Bound:
    """Bytes stored (inline and offloaded) and the oldest item nobody has consumed yet."""
    unconsumed = item.c.state != _CONSUMED
    offloaded = item.c.payload_uri.is_not(None)
    return Bound(
        sa.select(
            sa.func.coalesce(sa.func.sum(sa.case((unconsumed, item.c.payload_size), else_=0)), 0).label("bytes"),
            sa.func.coalesce(
                sa.func.sum(sa.case((sa.and_(unconsumed, offloaded), item.c.payload_size), else_=0)), 0
            ).label("offloaded_bytes"),
            sa.func.min(sa.case((unconsumed, item.c.created_at), else_=None)).label("oldest_unconsumed"),
        )
    )


#: A claim whose lease has run out: still ``claimed`` in the table, free for the next claim
#: to take over (see :data:`_RECLAIMABLE`); people see it apart from a live claim.
EXPIRED = "expired"
#: An item whose claim was given back (``released_at`` set, schema version 9): ``ready`` in
#: the table, claimable as any ready item; people see it apart from one never claimed.
RELEASED = "released"
#: The states people see (the browse filters): the table's three, a claim split into live
#: and expired, a ready item split into never claimed and released.
VIEW_STATES = (READY, CLAIMED, EXPIRED, RELEASED, CONSUMED)


def _in_view_state(state: str, now: datetime) -> sa.ColumnElement[bool]:
    """Rows in one of :data:`VIEW_STATES` at ``now``."""
    if state == EXPIRED:
        return sa.and_(item.c.state == _CLAIMED, item.c.lease_expires_at < now)
    if state == CLAIMED:
        live = sa.or_(item.c.lease_expires_at.is_(None), item.c.lease_expires_at >= now)
        return sa.and_(item.c.state == _CLAIMED, live)
    if state == RELEASED:
        return sa.and_(item.c.state == _READY, item.c.released_at.is_not(None))
    if state == READY:
        return sa.and_(item.c.state == _READY, item.c.released_at.is_(None))
    return item.c.state == _CONSUMED


def _browsed(
    *,
    dag_ids: Sequence[str] | None,
    dag_id: str | None,
    run_id: str | None,
    task_id: str | None,
    claimed_by: str | None,
) -> list[sa.ColumnElement[bool]]:
    """The conditions of a browse: ``dag_ids`` (None: any) are the DAGs the reader may see,
    the rest narrow by producer; ``claimed_by`` is a task of the same run that claimed the
    row (so it goes through the run index: needs ``dag_id`` and ``run_id``)."""
    where: list[sa.ColumnElement[bool]] = []
    if dag_ids is not None:
        where.append(item.c.dag_id.in_(list(dag_ids)))
    for col, value in ((item.c.dag_id, dag_id), (item.c.run_id, run_id), (item.c.task_id, task_id)):
        if value is not None:
            where.append(col == value)
    if claimed_by is not None:
        if dag_id is None or run_id is None:
            raise ValueError("claimed_by needs dag_id and run_id (the run index)")
        where += [item.c.owner_dag_id == dag_id, item.c.owner_run_id == run_id, item.c.owner_task_id == claimed_by]
    return where


def browse_items(
    *,
    now: datetime,
    limit: int,
    sealed_prefix: bytes,
    before_id: int | None = None,
    dag_ids: Sequence[str] | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    claimed_by: str | None = None,
    state: str | None = None,
) -> Bound:
    """A page of rows for the UI, newest first, below ``before_id`` (keyset on the primary key).

    Never the payload: only whether an inline one starts with ``sealed_prefix`` (the
    encrypted format's header; NULL when there is none to look at: offloaded, or dropped
    on consume).
    """
    cols = [c for c in item.c if c.name != "payload"]
    head = sa.func.substr(item.c.payload, 1, len(sealed_prefix))
    sealed = sa.case(
        (item.c.payload.is_(None), sa.null()),
        (head == sa.literal(sealed_prefix, sa.LargeBinary()), sa.true()),
        else_=sa.false(),
    ).label("sealed")
    where = _browsed(dag_ids=dag_ids, dag_id=dag_id, run_id=run_id, task_id=task_id, claimed_by=claimed_by)
    if state is not None:
        where.append(_in_view_state(state, now))
    if before_id is not None:
        where.append(item.c.id < before_id)
    return Bound(sa.select(*cols, sealed).where(*where).order_by(item.c.id.desc()).limit(limit))


def browse_counts(
    *,
    now: datetime,
    dag_ids: Sequence[str] | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    claimed_by: str | None = None,
) -> Bound:
    """Rows by table state, whether a claim's lease has run out and whether a claim was given
    back, with the oldest created, under a browse's conditions: the counts by
    :data:`VIEW_STATES` and the oldest unconsumed item."""
    expired = sa.case((item.c.lease_expires_at < now, 1), else_=0).label("expired")
    released = sa.case((item.c.released_at.is_not(None), 1), else_=0).label("released")
    where = _browsed(dag_ids=dag_ids, dag_id=dag_id, run_id=run_id, task_id=task_id, claimed_by=claimed_by)
    count, oldest = sa.func.count().label("n"), sa.func.min(item.c.created_at).label("oldest")
    stmt = sa.select(item.c.state, expired, released, count, oldest)
    return Bound(stmt.where(*where).group_by(item.c.state, expired, released))


def run_consumed(*, dag_id: str, run_id: str, limit: int) -> Bound:
    """Up to ``limit`` consumed rows of one run's outputs (the run index), to purge them."""
    where = (item.c.dag_id == dag_id, item.c.run_id == run_id, item.c.state == _CONSUMED)
    return Bound(sa.select(item.c.id, item.c.payload_uri).where(*where).order_by(item.c.id).limit(limit))


def delete_consumed(*, ids: Sequence[int]) -> Bound:
    """Those of ``ids`` that are consumed (checked again as they are deleted)."""
    return Bound(sa.delete(item).where(item.c.id.in_(list(ids)), item.c.state == _CONSUMED))


class Purgeable(NamedTuple):
    """Rows retention may delete: consumed before ``consumed_before``, or (when
    ``expired_before`` is set) created before it, unconsumed and not under a live claim at ``now``."""

    consumed_before: datetime
    expired_before: datetime | None
    now: datetime

    def condition(self) -> sa.ColumnElement[bool]:
        """The condition, repeated in the DELETE itself, so a row claimed meanwhile is not deleted.

        ``state`` is read through ``coalesce(state, state)`` on purpose: it keeps planners off
        the state index, so purge statements go by the primary-key window they are given.
        Without statistics SQLite would otherwise take ``state = 'consumed'`` as selective and
        re-read every remaining consumed row for each batch (quadratic).
        """
        state = sa.func.coalesce(item.c.state, item.c.state)
        done = sa.and_(state == _CONSUMED, item.c.consumed_at < self.consumed_before)
        if self.expired_before is None:
            return done
        unclaimed = sa.or_(state == _READY, item.c.lease_expires_at < self.now)
        expired = sa.and_(state != _CONSUMED, item.c.created_at < self.expired_before, unclaimed)
        return sa.or_(done, expired)


def next_id(*, after_id: int) -> Bound:
    """The first id above ``after_id`` (a primary-key seek): purge windows skip id gaps."""
    return Bound(sa.select(sa.func.min(item.c.id)).where(item.c.id > after_id))


def purge_window(*, which: Purgeable, first_id: int, width: int) -> Bound:
    """Purgeable rows among ids ``[first_id, first_id + width)``.

    A bounded id window, not ``ORDER BY id LIMIT n``: with the latter a planner may pick
    the state index and sort every remaining row for each batch (quadratic, and on SQLite
    a write lock held for seconds); a primary-key range is cheap whatever the statistics.
    """
    condition = which.condition()
    window = (item.c.id >= first_id, item.c.id < first_id + width)
    return Bound(sa.select(item.c.id, item.c.payload_uri).where(*window, condition))


def count_purgeable(*, which: Purgeable) -> Bound:
    return Bound(sa.select(sa.func.count()).where(which.condition()))


def delete_purgeable(*, which: Purgeable, ids: Sequence[int]) -> Bound:
    """Those of ``ids`` still purgeable now: the condition is checked again as they are deleted."""
    return Bound(sa.delete(item).where(item.c.id.in_(ids), which.condition()))


def stored_payloads(*, after_id: int, limit: int, with_consumed_blobs: bool) -> Bound:
    """Rows whose stored payload key rotation rewrites, walking the primary key."""
    blob: sa.ColumnElement[bool] = item.c.payload_uri.is_not(None)
    if not with_consumed_blobs:
        blob = sa.and_(blob, item.c.state != _CONSUMED)
    columns = (item.c.id, item.c.payload, item.c.payload_uri, item.c.payload_size, item.c.payload_sha256)
    stmt = sa.select(*columns).where(item.c.id > after_id, sa.or_(item.c.payload.is_not(None), blob))
    return Bound(stmt.order_by(item.c.id).limit(limit))


def set_payload(*, item_id: int, old: bytes, new: bytes) -> Bound:
    """Compare-and-set: a row that changed meanwhile (consumed, replaced) is left alone."""
    stmt = sa.update(item).where(item.c.id == item_id, item.c.payload == old)
    return Bound(stmt.values(payload=new, payload_size=len(new)))


def move_blob(*, old_uri: str, new_uri: str, size: int, sha256: str) -> Bound:
    """Point the rows of a blob at its rewritten copy, except claimed ones: their holder may
    be reading the old blob right now, so they move on a later run."""
    stmt = sa.update(item).where(item.c.payload_uri == old_uri, item.c.state != _CLAIMED)
    return Bound(stmt.values(payload_uri=new_uri, payload_size=size, payload_sha256=sha256))


def count_blob_rows(*, uri: str) -> Bound:
    return Bound(sa.select(sa.func.count()).where(item.c.payload_uri == uri))


def stale_fences(*, cutoff: datetime, limit: int) -> Bound:
    """Fence rows of task instances not seen since ``cutoff``: no zombie comes back that late."""
    return Bound(sa.select(fence.c.ti_key).where(fence.c.updated_at < cutoff).limit(limit))


def delete_fences(*, ti_keys: Sequence[str], cutoff: datetime) -> Bound:
    return Bound(sa.delete(fence).where(fence.c.ti_key.in_(ti_keys), fence.c.updated_at < cutoff))


def max_packet() -> Bound:
    """MySQL/MariaDB: the largest statement the server accepts."""
    return Bound(sa.text("SELECT @@max_allowed_packet"))


def get_meta(*, name: str) -> Bound:
    return Bound(sa.select(meta.c.value).where(meta.c.name == name))


def put_meta(*, dialect: str, name: str, value: str, overwrite: bool) -> Bound:
    """One upsert of a meta row; without ``overwrite`` a value already there is kept (two
    processes making the same row at once: the first one's stays, and neither fails)."""
    if dialect == "postgresql":
        pg = postgresql.insert(meta).values(name=name, value=value)
        if overwrite:
            return Bound(pg.on_conflict_do_update(index_elements=[meta.c.name], set_={"value": value}))
        return Bound(pg.on_conflict_do_nothing(index_elements=[meta.c.name]))
    if dialect in ("mysql", "mariadb"):
        my = mysql.insert(meta).values(name=name, value=value)
        return Bound(my.on_duplicate_key_update(value=value if overwrite else meta.c.value))
    lite = sqlite.insert(meta).values(name=name, value=value)
    if overwrite:
        return Bound(lite.on_conflict_do_update(index_elements=[meta.c.name], set_={"value": value}))
    return Bound(lite.on_conflict_do_nothing(index_elements=[meta.c.name]))


# -- row-level security (PostgreSQL) -----------------------------------------------------------
#
# A team's rows are those whose key (output_id, ti_key) starts with "<team>:" (see
# ledger.team_key). A team is a NOLOGIN role named TEAM_ROLE_PREFIX + team; workers log in
# with roles that are members of it. The policies let a member read and write rows of its
# teams only, so a task with team A's credentials cannot see, claim, consume, release or
# fence team B's items, whatever SQL it sends; the table owner (who migrates and purges) is
# not subject to them.

TEAM_ROLE_PREFIX = "exclusive_xcom_team_"
_MY_TEAMS = "split_part({column}, ':', 1) = ANY ((SELECT exclusive_xcom_my_teams())::text[])"


def row_security() -> list[Bound]:
    """Statements that switch row-level security on (idempotent)."""
    statements = [
        # PL/pgSQL, not SQL: its query plan is kept for the session instead of made anew for
        # every statement the policies guard (0.25 ms each time, measured).
        "CREATE OR REPLACE FUNCTION exclusive_xcom_my_teams() RETURNS text[] LANGUAGE plpgsql STABLE "
        "SET search_path = pg_catalog, pg_temp AS $$ BEGIN RETURN ("
        f"SELECT coalesce(array_agg(substr(rolname, {len(TEAM_ROLE_PREFIX) + 1})), '{{}}') FROM pg_roles "
        f"WHERE starts_with(rolname, '{TEAM_ROLE_PREFIX}') AND pg_has_role(current_user, oid, 'MEMBER')); END $$",
    ]
    for table, column in ((item.name, "output_id"), (fence.name, "ti_key")):
        mine = _MY_TEAMS.format(column=column)
        statements += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS exclusive_xcom_team ON {table}",
            f"CREATE POLICY exclusive_xcom_team ON {table} USING ({mine}) WITH CHECK ({mine})",
        ]
    return _ddl(
        *statements,  # members read the schema version, nothing else of the meta table
        f"ALTER TABLE {meta.name} ENABLE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS exclusive_xcom_team ON {meta.name}",
        f"CREATE POLICY exclusive_xcom_team ON {meta.name} FOR SELECT USING (name = 'schema_version')",
    )


def team_grants(*, team: str, login: str) -> list[Bound]:
    """Make the team's role (if need be), give it the claim path's privileges, add ``login``
    (already quoted) to it. ``team`` is checked by the caller: lowercase letters, digits, ``_``."""
    role = f"{TEAM_ROLE_PREFIX}{team}"
    return _ddl(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
        f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {item.name}, {fence.name} TO {role}",
        f"GRANT SELECT ON {meta.name} TO {role}",
        f"DO $$ BEGIN EXECUTE 'GRANT USAGE ON SEQUENCE ' || pg_get_serial_sequence('{item.name}', 'id') "
        f"|| ' TO {role}'; END $$",
        f"GRANT {role} TO {login}",
    )


def role_exists(*, role: str) -> Bound:
    return Bound(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role})


def _ddl(*statements: str) -> list[Bound]:
    """Statements of fixed text; their colons (``::text[]`` casts) are not bind parameters."""
    return [Bound(sa.text(statement.replace(":", r"\:"))) for statement in statements]


def quoted(conn: sa.Connection, name: str) -> str:
    """An identifier as this database quotes it (a role name is not a bind parameter);
    the one helper here that returns text, not a statement."""
    return conn.dialect.identifier_preparer.quote(name)
