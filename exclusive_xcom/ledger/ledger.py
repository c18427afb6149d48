"""The claim ledger: produce, claim, consume, release as transactions with one owner each.

This module knows nothing of Airflow: it is handed an engine, identities and bytes, so it
can be tested, benchmarked and reused alone. Rules it enforces (SPEC, "Semantics"):

* a claim belongs to a task-instance identity (dag_id, run_id, task_id, map_index) and is
  fenced by ``try_number``: a retry takes its own claim back, an older try is refused;
* a claim is a lease: once expired, another claimant may take the item over;
* an item is consumed only by :meth:`Ledger.finish`, which succeeds only while the very
  same try still holds the claim, so a zombie's late finish changes nothing;
* a re-run producer replaces what its earlier tries left unconsumed.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import cached_property
from hashlib import sha256
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa

from exclusive_xcom.errors import (
    AlreadyConsumedError,
    ClaimConflictError,
    ConfigurationError,
    ExclusiveXComError,
    ItemRef,
    LedgerUnavailableError,
    NotAuthorizedError,
    PayloadError,
    amended,
)
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.schema import (
    CLAIMED,
    CONSUMED,
    MIGRATIONS,
    READY,
    RECORDING_VERSION,
    SCHEMA_VERSION,
    SHARED_SLOT,
    meta,
)

EACH, ONE, ITEMS = "each", "one", "items"
MODES = (EACH, ONE, ITEMS)
INSERT_CHUNK = 1000
_ROW_SLACK = 64 * 1024  # bytes of a statement that are not payload: SQL text, other columns
_DEFAULT_PACKET = 16 << 20  # MariaDB's default max_allowed_packet (MySQL 8's is 64 MiB)
_packets: dict[str, int] = {}  # max_allowed_packet by ledger URL, as migrate() read it
#: Fence rows outlive even a short ``purge --older-than``: a deleted fence would let a
#: zombie try act again, so only task instances quiet for this long lose theirs.
FENCE_RETENTION = timedelta(days=7)
_T = TypeVar("_T")
ROLLED_BACK = "this step changed nothing (it never reached its commit)"
UNKNOWN_OUTCOME = "the connection failed while this step committed, so whether it took effect is unknown"
#: The meta row that says when an older ledger began to record who claims and consumes.
RECORDED_SINCE = "recorded_since"


def team_key(team: str, digest: str) -> str:
    """A row key in its team's namespace, ``team:digest`` (64 characters at most).

    PostgreSQL's row-level security reads the team from this prefix (see
    :func:`~exclusive_xcom.ledger.queries.row_security`), so one team's role can neither
    see nor write another's rows, and two teams' keys can never collide in a unique index.
    Without teams the key is the digest alone, as it always was.
    """
    return f"{team}:{digest[: 63 - len(team)]}" if team else digest


@dataclass(frozen=True)
class Output:
    """A producer's output: what a handle points at."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    key: str = "return_value"
    team: str = ""  # [exclusive_xcom] teams: the team of the producer's DAG (and of its consumers)

    @property
    def output_id(self) -> str:
        raw = json.dumps([self.dag_id, self.run_id, self.task_id, self.map_index, self.key])
        return team_key(self.team, sha256(raw.encode()).hexdigest())

    @property
    def producer(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    def ref(self, consumer: str = "-") -> ItemRef:
        return ItemRef(self.dag_id, self.run_id, self.producer, self.key, consumer)


@dataclass(frozen=True)
class Claimant:
    """A task instance and its try: who claims, and the fence its writes go through.

    ``ti_id`` (Airflow's task-instance id) and ``host`` say which process made a claim or a
    consume; they are recorded on the rows, never part of the identity or the fence: any
    task's code can present them, so ``exclusive-xcom audit`` checks them against Airflow.
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    try_number: int = 1
    team: str = ""  # [exclusive_xcom] teams: the team of its DAG
    ti_id: str | None = field(default=None, compare=False)
    host: str | None = field(default=None, compare=False)

    @property
    def maker(self) -> tuple[str | None, str | None]:
        """What a claim or a consume records of who made it."""
        return (self.ti_id, self.host)

    @property
    def identity(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)

    @property
    def slot(self) -> str:
        return consumer_slot(self.dag_id, self.task_id)

    @cached_property
    def ti_key(self) -> str:
        """The task instance's key in the fence table (tries share it)."""
        return team_key(self.team, sha256(json.dumps(list(self.identity)).encode()).hexdigest())

    def __str__(self) -> str:
        index = "" if self.map_index < 0 else f"[{self.map_index}]"
        return f"{self.dag_id}/{self.run_id}/{self.task_id}{index} try {self.try_number}"


def consumer_slot(dag_id: str, task_id: str) -> str:
    """The name of a consumer in the ledger; ``/`` cannot occur in Airflow ids."""
    return f"{dag_id}/{task_id}"


@dataclass(frozen=True)
class ClaimRequest:
    """One input of a consumer: which output (and which generation of it) to claim, how."""

    output: Output
    generation: int
    mode: str
    consumers: tuple[str, ...]
    limit: int = 100
    seq: int | None = None  # mode items: this one item only (a consumer mapped over the output)

    @property
    def slot_row(self) -> bool:
        """Whether the request is for one row (modes each and one, or one item) rather than a batch."""
        return self.mode != ITEMS or self.seq is not None


@dataclass(frozen=True)
class Offloaded:
    """A payload kept in object storage: where, and what its bytes must hash to."""

    uri: str
    size: int
    sha256: str


#: A stored payload: inline bytes, a blob, or nothing (consumed or purged).
Stored = bytes | Offloaded | None


@dataclass
class Claimed:
    """What one request got: item ids and their stored payloads, in sequence order."""

    request: ClaimRequest
    ids: list[int] = field(default_factory=list)
    payloads: list[Stored] = field(default_factory=list)
    #: Where the items came from: "fresh", "taken back from its try N" (a retry), or
    #: "taken over from <task instance> (lease expired)", with counts.
    origins: Counter[str] = field(default_factory=Counter)

    def add(self, row: Any, claimant: Claimant | None = None) -> None:
        self.ids.append(row.id)
        self.origins[_origin(row, claimant)] += 1
        if row.payload_uri is not None:
            self.payloads.append(Offloaded(row.payload_uri, int(row.payload_size), row.payload_sha256 or ""))
        else:
            self.payloads.append(row.payload)

    def extend(self, other: Claimed) -> None:
        self.ids.extend(other.ids)
        self.payloads.extend(other.payloads)
        self.origins.update(other.origins)

    def describe_origins(self) -> str:
        """E.g. ``20 fresh, 5 taken back from its try 1``."""
        return ", ".join(f"{n} {origin}" for origin, n in self.origins.most_common()) or "none"

    @property
    def uris(self) -> list[str]:
        return [p.uri for p in self.payloads if isinstance(p, Offloaded)]


@dataclass
class ClaimResult:
    """All requests' claims, or, if a ``one``-mode input went to another task, why it lost."""

    claims: list[Claimed]
    lost: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [i for c in self.claims for i in c.ids]


@dataclass(frozen=True)
class Finished:
    """An earlier try of a task instance whose finish committed: it consumed ``inputs``."""

    try_number: int
    inputs: str | None  # :func:`inputs_key` of what it consumed

    def covers(self, inputs: Iterable[tuple[Output, int]]) -> bool:
        """Whether these inputs (a retry's) are the ones that finish consumed."""
        return self.inputs == inputs_key(inputs)


def inputs_key(inputs: Iterable[tuple[Output, int]]) -> str:
    """A short key of a try's inputs (outputs and generations), whatever their order."""
    names = sorted({f"{output.output_id}/{generation}" for output, generation in inputs})
    return sha256("\n".join(names).encode()).hexdigest()


@dataclass(frozen=True)
class Waiting:
    """A producer's unconsumed items: how many wait, how many of them for too long, since when.

    Items nobody reads pile up unseen (a consumer renamed, removed or never deployed);
    ``unread`` counts those older than the age the caller asked about.
    """

    dag_id: str
    task_id: str
    waiting: int
    unread: int
    oldest: datetime  # creation time of the oldest unconsumed item


@dataclass(frozen=True)
class Production:
    """An output to write: one payload (modes each/one) or one per element (mode items).

    Mode each, ``split``: these consumers map over the output, so their slots get one row
    per element (``elements``, in order) instead of the whole value.
    """

    output: Output
    generation: int
    mode: str
    consumers: tuple[str, ...]
    payloads: Iterable[bytes | Offloaded]
    split: tuple[str, ...] = ()
    elements: Sequence[bytes | Offloaded] = ()


class Ledger:
    """Transactions over the claim ledger tables, on an engine the caller owns."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        lease_seconds: float = 300.0,
        keep_consumed_payloads: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        #: Retention: keep a consumed item's payload (and blob) until ``purge`` deletes the row.
        self.keep_consumed_payloads = keep_consumed_payloads
        self._clock = clock
        #: PostgreSQL claims and consumes in single autocommit statements where it can (see
        #: "one statement each" in :mod:`~exclusive_xcom.ledger.queries`); elsewhere, and for
        #: everything else, a transaction.
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else None
        )

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema to :data:`SCHEMA_VERSION`; safe to race."""
        try:
            return self._run(self._migrate)
        except NotAuthorizedError as exc:  # a team's role may use the schema, not change it
            raise amended(
                exc, f"the schema needs version {SCHEMA_VERSION}: run `exclusive-xcom db migrate` as its owner"
            ) from exc

    def grant(self, team: str, role: str) -> None:
        """PostgreSQL: let ``role`` (an existing login) use the ledger as a member of ``team``,
        seeing and changing that team's rows only; row-level security is switched on first."""
        if self.engine.dialect.name != "postgresql":
            raise ConfigurationError(
                "row-level security needs PostgreSQL; on MySQL/MariaDB and SQLite give each team a ledger "
                "database of its own, with credentials only its workers have"
            )

        def tx(conn: sa.Connection) -> None:
            if conn.execute(q.role_exists(role)).scalar() is None:
                raise ConfigurationError(f"no database role {role!r}: create it (CREATE ROLE ... LOGIN) first")
            for statement in (*q.row_security(), *q.team_grants(team, q.quoted(conn, role))):
                conn.exec_driver_sql(statement)

        self._run(tx)

    def schema_version(self) -> int:
        return self._run(_read_version)

    def _migrate(self, conn: sa.Connection) -> int:
        with _migration_lock(conn):
            current = _read_version(conn)
            for step in MIGRATIONS[current:]:
                step(conn)
            if current < SCHEMA_VERSION:
                _write_meta(conn, "schema_version", str(SCHEMA_VERSION))
            if conn.dialect.name in ("mysql", "mariadb"):
                _packets[self.engine.url.render_as_string()] = int(conn.execute(q.max_packet()).scalar_one())
            if 0 < current < RECORDING_VERSION:  # rows from before say nothing of who made them
                _write_meta(conn, RECORDED_SINCE, self._now().isoformat())
            return SCHEMA_VERSION

    @property
    def inline_limit(self) -> int | None:
        """The largest payload one statement may carry, where the server has such a limit.

        MySQL/MariaDB refuse a statement above ``max_allowed_packet`` by dropping the
        connection (indistinguishable from an outage), and PyMySQL's escaping can double
        a payload's bytes on the wire: half the packet, less room for the rest of the row.
        The server's value is read by :meth:`migrate` (no round trip of its own); until
        then MariaDB's default (16 MiB) is assumed.
        """
        if self.engine.dialect.name not in ("mysql", "mariadb"):
            return None
        packet = _packets.get(self.engine.url.render_as_string(), _DEFAULT_PACKET)
        return max((packet - _ROW_SLACK) // 2, 1024)

    def secret(self) -> bytes:
        """This ledger's own signing key, made on first use: only a configuration that
        allows plaintext and sets no key signs with it, so only such a ledger holds one."""
        try:
            return self._run(_secret)
        except sa.exc.IntegrityError:  # another process made it at the same moment
            return self._run(_secret)

    def recorded_since(self) -> datetime | None:
        """When this ledger was upgraded to record who claims and consumes (None: always did)."""
        value = self._run(lambda conn: conn.execute(q.get_meta(RECORDED_SINCE)).scalar())
        return None if value is None else datetime.fromisoformat(value)

    # -- tries ------------------------------------------------------------------------------

    def enter(self, claimant: Claimant) -> Finished | None:
        """Record that this try has begun; from now on older tries are fenced out.

        Returns the earlier try of this task instance whose finish consumed inputs, if
        any (its acknowledgement may have been lost: see :meth:`Finished.covers`).
        Raises :class:`ClaimConflictError` if a newer try of the same task instance has
        already begun (this one is the zombie).
        """

        def tx(conn: sa.Connection) -> Finished | None:
            now = self._now()
            row = conn.execute(q.lock_fence(claimant.ti_key)).first()
            if row is None:
                conn.execute(q.insert_fence(claimant.ti_key, claimant.try_number, now))
                return None
            if row.try_number > claimant.try_number:
                raise _fenced(claimant, row.try_number)
            if row.try_number < claimant.try_number:
                conn.execute(q.raise_fence(claimant.ti_key, claimant.try_number, now))
            if row.finished_try is None or row.finished_try >= claimant.try_number:
                return None
            return Finished(row.finished_try, row.finished_inputs)

        for attempt in range(2):
            try:
                return self._run(tx)
            except sa.exc.IntegrityError:  # two tries inserted the first fence row at once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # -- produce ----------------------------------------------------------------------------

    def produce(self, production: Production) -> int:
        """Write an output, replacing unconsumed items of earlier tries; returns item count."""
        budget = self.inline_limit
        return self._run(lambda conn: _produce(conn, production, self._now(), budget)[0], production.output.ref())

    def finish(
        self,
        claimant: Claimant,
        ids: Sequence[int],
        productions: Sequence[Production] = (),
        blobs: Sequence[str] = (),
        inputs: Sequence[tuple[Output, int]] = (),
    ) -> list[str]:
        """Consume what ``claimant`` holds and write its outputs, all in one transaction.

        ``blobs`` are the offloaded payloads of ``ids``; ``inputs`` the outputs (and
        generations) they came from, recorded with the finish so that a later try of this
        task instance knows they are done (:meth:`enter`). Without ``inputs`` it only
        consumes: a batch of a stream acknowledged while the task still runs. Returns the blob URIs nothing
        needs any more (consumed, or replaced by this output), for the caller to delete.
        Raises :class:`ClaimConflictError` and changes nothing if any of ``ids`` is no
        longer held by this exact try (its lease was taken over, or a newer try fenced it).
        """

        ids = list(dict.fromkeys(ids))  # the same input named twice is consumed once
        key = inputs_key(inputs) if inputs else None  # None: a batch acknowledged mid-task

        def tx(conn: sa.Connection) -> list[str]:
            now = self._now()
            if productions or not ids:  # a zombie must not replace the new try's output
                _check_fence(conn, claimant, productions[0].output.ref() if productions else None)
            if ids:
                stmt = q.mark_consumed(
                    ids,
                    claimant.identity,
                    claimant.try_number,
                    now,
                    claimant.ti_key,
                    self.keep_consumed_payloads,
                    maker=claimant.maker,
                )
                done = conn.execute(*stmt)
                if done.rowcount != len(ids):
                    _check_fence(conn, claimant)
                    raise _NotHeld(len(ids) - done.rowcount)  # rolls back what was marked
                if key is not None:  # the task's finish, not a batch acknowledged while it runs
                    conn.execute(*q.mark_finished(claimant.ti_key, claimant.try_number, key, now))
            stale = list(blobs)
            for production in productions:
                stale.extend(_produce(conn, production, now, self.inline_limit)[1])
            return self._unneeded(conn, stale)

        def consume_now(conn: sa.Connection) -> list[str] | None:
            stmt = q.consume_all_now(
                ids,
                claimant.identity,
                claimant.try_number,
                self._now(),
                claimant.ti_key,
                key,
                self.keep_consumed_payloads,
                maker=claimant.maker,
            )
            if conn.execute(*stmt).rowcount != len(ids):
                return None  # nothing changed: the transaction below finds out why
            return self._unneeded(conn, blobs)

        try:
            if self._autocommit is not None and ids and not productions:
                done = self._run(consume_now, autocommit=True)
                if done is not None:
                    return done
            return self._run(tx)
        except _NotHeld as lost:
            raise self._not_held(claimant, ids, lost.count) from None
        except LedgerUnavailableError as exc:
            # The connection may have dropped after the server committed (a lost COMMIT
            # acknowledgement): look again before reporting a failure that did not happen.
            if not exc.maybe_committed or not self._finished(claimant, ids, productions, exc):
                raise
            return []  # a blob left behind is swept by purge

    def size(self, output: Output, generation: int, slot: str | None = None) -> int:
        """How many rows one generation of an output has (in ``slot``): its item count."""
        stmt = q.count_output(output.output_id, generation, slot)
        return int(self._run(lambda conn: conn.execute(stmt).scalar_one(), output.ref()))

    def _unneeded(self, conn: sa.Connection, uris: Sequence[str]) -> list[str]:
        """Which blobs no row needs any more (a blob may be shared by the slots of one output)."""
        uris = list(dict.fromkeys(uris))
        if not uris:
            return []
        needed = set(conn.execute(q.needed_uris(uris, self.keep_consumed_payloads)).scalars())
        return [u for u in uris if u not in needed]

    def forget(self, output: Output, generation: int) -> list[str]:
        """Delete every item of one generation of an output (Airflow purged its handle).

        Returns the blob URIs to delete. Claims in flight on these items are lost: their
        holder's finish fails with :class:`ClaimConflictError`, as after a re-run producer.
        """

        def tx(conn: sa.Connection) -> list[str]:
            uris = list(conn.execute(q.output_uris(output.output_id, generation)).scalars())
            conn.execute(q.delete_output(output.output_id, generation))
            return self._unneeded(conn, uris)

        return self._run(tx, output.ref())

    def _finished(
        self, claimant: Claimant, ids: Sequence[int], productions: Sequence[Production], exc: ExclusiveXComError
    ) -> bool:
        """Whether this very finish committed: its inputs consumed by this try, or its output written."""
        try:
            if ids:
                rows = self._run(lambda conn: conn.execute(q.select_by_ids(ids)).all())
                return len(rows) == len(set(ids)) and all(
                    r.state == CONSUMED and _is_held_by(r, claimant) for r in rows
                )
            if productions:
                out = productions[0]
                stmt = q.count_output(out.output.output_id, out.generation)
                return bool(self._run(lambda conn: conn.execute(stmt).scalar_one()))
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
            rows = self._run(lambda conn: conn.execute(q.select_by_ids(ids)).all())
        except ExclusiveXComError:  # the conflict is the news; its details are a bonus
            rows = []
        taken = [r for r in rows if not (r.state == CLAIMED and _is_held_by(r, claimant))]
        if taken:
            row = taken[0]
            if row.state == CONSUMED:
                why = f"it was consumed by {_describe_owner(row)} at {row.consumed_at}"
            elif row.state == READY:
                why = "it was released"
            elif _owner_of(row) == claimant.identity:
                why = f"try {row.owner_try} of the same task instance fenced it out"
            else:
                why = f"{_describe_owner(row)} took it over (the lease had expired, or it was released)"
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

    def claim(self, claimant: Claimant, requests: Sequence[ClaimRequest]) -> ClaimResult:
        """Claim every request in one transaction: all of them, or none.

        A ``one``-mode input already taken by another consumer is not an error: the result
        lists it in ``lost`` and nothing is claimed, so the caller can skip the task.
        """
        for request in requests:
            _authorize(claimant, request, request.consumers)
        if self._autocommit is not None and len(requests) == 1:
            claimed = self._claim_now(claimant, requests[0])
            if claimed is not None:
                return claimed
        return self._claim_in_transaction(claimant, requests)

    def _claim_now(self, claimant: Claimant, request: ClaimRequest) -> ClaimResult | None:
        """PostgreSQL: claim ready rows in one statement; None if the transaction must decide.

        That is a retry in mode ``items`` (what its earlier tries hold comes first) and any
        claim that finds no ready row (a lease to take over, a retry's own claim, an error
        to explain). A batch short of ``limit`` is topped up from expired leases.
        """
        if not request.slot_row and claimant.try_number > 1:
            return None
        slot = _slot_of(claimant, request) if request.slot_row else None
        limit = 1 if request.slot_row else request.limit
        now = self._now()
        out = request.output
        stmt = q.claim_ready_now(
            out.output_id,
            request.generation,
            slot,
            _consumers_json(request.consumers),
            claimant.identity,
            claimant.try_number,
            now,
            now + timedelta(seconds=self.lease_seconds),
            claimant.ti_key,
            limit,
            request.seq or 0,
            maker=claimant.maker,
        )
        rows = self._run(lambda conn: conn.execute(*stmt).all(), out.ref(claimant.slot), autocommit=True)
        if not rows:
            return None
        claimed = Claimed(request)
        for row in sorted(rows, key=lambda r: r.seq):
            claimed.add(row)
        if len(rows) < limit:
            (more,) = self._claim_in_transaction(claimant, [replace(request, limit=limit - len(rows))]).claims
            claimed.extend(more)
        return ClaimResult([claimed])

    def _claim_in_transaction(self, claimant: Claimant, requests: Sequence[ClaimRequest]) -> ClaimResult:
        def tx(conn: sa.Connection) -> ClaimResult:
            now = self._now()
            result = ClaimResult(claims=[])
            for request in requests:
                claimed, lost = _claim_one(conn, claimant, request, now)
                result.claims.append(claimed)
                result.lost.extend(lost)
            if result.lost:
                return result
            if not result.ids:  # a zombie that finds nothing is still fenced out
                _check_fence(conn, claimant, requests[0].output.ref(claimant.slot) if requests else None)
                return result
            lease = now + timedelta(seconds=self.lease_seconds)
            stmt = q.mark_claimed(
                result.ids, claimant.identity, claimant.try_number, now, lease, claimant.ti_key, claimant.maker
            )
            if conn.execute(*stmt).rowcount != len(result.ids):
                # The rows are locked by this transaction: only the fence can have refused.
                _check_fence(conn, claimant, requests[0].output.ref(claimant.slot))
                raise AssertionError("claimed rows changed under their row locks")
            return result

        result = self._run(tx, requests[0].output.ref(claimant.slot) if requests else None)
        if result.lost:
            result.claims = []
        return result

    def extend_lease(self, claimant: Claimant, ids: Sequence[int]) -> bool:
        """Keep a long-running task's claims alive; False if any was lost meanwhile."""
        lease = self._now() + timedelta(seconds=self.lease_seconds)
        stmt = q.extend_lease(ids, claimant.identity, claimant.try_number, lease)
        return self._run(lambda conn: conn.execute(*stmt).rowcount) == len(ids)

    def release(self, claimant: Claimant, ids: Sequence[int]) -> int:
        """Give claims back to the pool (the task failed for good); fenced like finish."""
        stmt = q.release(ids, claimant.identity, claimant.try_number)
        return self._run(lambda conn: conn.execute(*stmt).rowcount)

    def release_held(self, claimant: Claimant, outputs: Sequence[tuple[Output, int]]) -> int:
        """Give back everything this try holds of these (output, generation) pairs, in one
        transaction: the claims it knows of and any whose reply it never got."""

        def tx(conn: sa.Connection) -> int:
            held = (q.release_held(o.output_id, gen, claimant.identity, claimant.try_number) for o, gen in outputs)
            return sum(conn.execute(*stmt).rowcount for stmt in held)

        return self._run(tx)

    def release_any(self, ids: Sequence[int]) -> int:
        """Free stuck claims whoever holds them (an operator's decision, CLI ``release``)."""
        return self._run(lambda conn: conn.execute(q.release_any(ids)).rowcount)

    # -- reading ----------------------------------------------------------------------------

    def items(self, *, unread_after: timedelta | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Rows without payloads, newest first, for people and scripts; with ``unread_after``,
        only unconsumed items created longer ago than that."""
        if unread_after is not None:
            filters["unread_before"] = self._now() - unread_after
        return self._run(lambda conn: [dict(r._mapping) for r in conn.execute(q.select_items(**filters))])

    def claim_records(self, after_id: int, limit: int, **filters: Any) -> list[Any]:
        """Up to ``limit`` claimed or consumed rows after ``after_id``, with who claimed and
        consumed them (:func:`~exclusive_xcom.ledger.queries.claim_records`)."""
        stmt = q.claim_records(after_id, limit, **filters)
        return self._run(lambda conn: list(conn.execute(stmt).all()))

    def counts(self) -> dict[str, int]:
        return self._run(lambda conn: {s: n for s, n in conn.execute(q.count_by_state())})

    def stats(self) -> dict[str, Any]:
        """Counts by state, bytes held by unconsumed items, the oldest unconsumed item."""

        def tx(conn: sa.Connection) -> dict[str, Any]:
            counts = {state: 0 for state in (READY, CLAIMED, CONSUMED)}
            counts.update({s: n for s, n in conn.execute(q.count_by_state())})
            row = conn.execute(q.storage_stats()).one()
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
        cutoff = self._now() - unread_after
        rows = self._run(lambda conn: conn.execute(q.waiting_by_producer(cutoff)).all())
        found = [Waiting(r.dag_id, r.task_id, int(r.waiting), int(r.unread or 0), r.oldest) for r in rows]
        return sorted(found, key=lambda w: (w.oldest, w.dag_id, w.task_id))

    def purge(
        self,
        older_than: timedelta,
        *,
        expired_after: timedelta | None = None,
        batch: int = 1000,
        dry_run: bool = False,
        on_blobs: Callable[[list[str]], Any] | None = None,
    ) -> int:
        """Delete items consumed longer ago than ``older_than`` and, if ``expired_after`` is
        given, unconsumed ones created longer ago than that and not under a live claim.

        One bounded batch per transaction; after each, ``on_blobs`` gets the blob URIs that
        no remaining row needs. Returns the number of rows deleted (or, dry, that would be).
        """
        now = self._now()
        condition = q.purgeable(now - older_than, None if expired_after is None else now - expired_after, now)
        if dry_run:
            return int(self._run(lambda conn: conn.execute(q.count_where(condition)).scalar_one()))

        total, after = 0, 0

        def tx(conn: sa.Connection) -> tuple[int, int, list[str]]:
            """One id window after ``after``; returns rows deleted, the next ``after`` (-1: done), blobs."""
            first = conn.execute(q.next_id(after)).scalar()
            if first is None:
                return 0, -1, []
            rows = conn.execute(q.purge_window(condition, first, batch)).all()
            deleted = conn.execute(q.delete_where([r.id for r in rows], condition)).rowcount if rows else 0
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
            keys = list(conn.execute(q.stale_fences(cutoff, batch)).scalars())
            return int(conn.execute(q.delete_fences(keys, cutoff)).rowcount) if keys else 0

        while self._run(tx) == batch:
            pass

    # -- key rotation -------------------------------------------------------------------------

    def stored_payloads(self, after_id: int, limit: int) -> list[Any]:
        """Rows (id, payload, payload_uri, payload_size, payload_sha256) with a payload to rotate."""
        stmt = q.stored_payloads(after_id, limit, self.keep_consumed_payloads)
        return self._run(lambda conn: list(conn.execute(stmt).all()))

    def replace_payload(self, item_id: int, old: bytes, new: bytes) -> bool:
        return bool(self._run(lambda conn: conn.execute(q.set_payload(item_id, old, new)).rowcount))

    def move_blob(self, old: Offloaded, new: Offloaded) -> tuple[int, int, list[str]]:
        """Repoint the unclaimed rows of ``old`` to ``new``.

        Returns rows moved, rows left on ``old`` (claimed: a later run moves them), and the
        blobs no row needs any more.
        """

        def tx(conn: sa.Connection) -> tuple[int, int, list[str]]:
            moved = int(conn.execute(q.move_blob(old.uri, new.uri, new.size, new.sha256)).rowcount)
            left = int(conn.execute(q.count_blob_rows(old.uri)).scalar_one())
            return moved, left, self._unneeded(conn, [old.uri] if moved else [new.uri])

        return self._run(tx)

    def blob_uris(self, uris: Sequence[str]) -> set[str]:
        """Which of ``uris`` some row references (the orphan sweep keeps those)."""
        stmt = q.needed_uris(uris, keep_consumed=True)
        return set(self._run(lambda conn: list(conn.execute(stmt).scalars()))) if uris else set()

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=timezone.utc).replace(tzinfo=None)

    def _run(self, tx: Callable[[sa.Connection], _T], ref: ItemRef | None = None, *, autocommit: bool = False) -> _T:
        """Run ``tx`` in one transaction (or, ``autocommit``, each statement in its own);
        retry deadlocks, translate driver errors, saying whether the work may have taken effect."""
        for attempt in range(3):
            sent = False  # whether a COMMIT (or an autocommitted statement) may have reached the server
            try:
                if autocommit and self._autocommit is not None:
                    with self._autocommit.connect() as conn:
                        sent = True
                        return tx(conn)
                with self.engine.begin() as conn:
                    result = tx(conn)
                    sent = True  # leaving the block commits
                return result
            except sa.exc.DBAPIError as exc:
                if _is_deadlock(exc) and attempt < 2:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if _is_refused(exc):
                    raise NotAuthorizedError(
                        f"the claim ledger at {_safe_url(self.engine)} refused this as user "
                        f"{self.engine.url.username!r}: {_first_line(exc.orig)} (row-level security gives each "
                        "team's role its own team's items only); nothing was changed",
                        ref,
                    ) from exc
                if isinstance(exc, sa.exc.IntegrityError | sa.exc.ProgrammingError | sa.exc.DataError):
                    raise
                error = LedgerUnavailableError(self._failure(exc, UNKNOWN_OUTCOME if sent else ROLLED_BACK), ref)
                error.maybe_committed = sent
                raise error from exc
            except sa.exc.TimeoutError as exc:
                raise LedgerUnavailableError(
                    f"no connection to the claim ledger at {_safe_url(self.engine)} within the pool timeout; "
                    f"{ROLLED_BACK}",
                    ref,
                ) from exc
        raise AssertionError("unreachable")

    def _failure(self, exc: BaseException, outcome: str) -> str:
        """The message of a driver error: which ledger (no password), what failed, what is known."""
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        return f"the claim ledger at {_safe_url(self.engine)} failed: {_first_line(cause)}; {outcome}"


# -- transaction bodies ---------------------------------------------------------------------


def _authorize(claimant: Claimant, request: ClaimRequest, consumers: Iterable[str]) -> None:
    if claimant.slot not in consumers:
        allowed = ", ".join(sorted(consumers)) or "nobody"
        raise NotAuthorizedError(
            f"task {claimant.task_id!r} of dag {claimant.dag_id!r} is not a named consumer of this "
            f"output (allowed: {allowed}); add it to consumers= of {request.output.task_id!r}",
            request.output.ref(claimant.slot),
        )


def _claim_one(
    conn: sa.Connection, claimant: Claimant, request: ClaimRequest, now: datetime
) -> tuple[Claimed, list[str]]:
    if not request.slot_row:
        return _claim_batch(conn, claimant, request, now), []
    slot, seq = _slot_of(claimant, request), request.seq or 0
    out = request.output
    row = conn.execute(*q.lock_slot(out.output_id, request.generation, slot, seq)).first()
    claimed = Claimed(request)
    if row is None:
        busy = conn.execute(*q.peek_slot(out.output_id, request.generation, slot, seq)).first()
        if busy is None:
            _no_row(conn, claimant, request)
        return _busy(claimant, request, "another task is claiming it right now")
    _authorize(claimant, request, json.loads(row.consumers))
    if row.state == CONSUMED:
        if request.mode == ONE and _owner_of(row) != claimant.identity:
            return claimed, [f"{out.producer!r} went to {_describe_owner(row)} (consumed {row.consumed_at})"]
        raise AlreadyConsumedError(
            f"already consumed by {_describe_owner(row)} at {row.consumed_at}; exclusive outputs are read "
            "once: re-run the producer to make a new one",
            out.ref(claimant.slot),
        )
    if row.state == CLAIMED and not _claimable(row, claimant, request, now):
        return _busy(claimant, request, f"held by {_describe_owner(row)} until {row.lease_expires_at}")
    claimed.add(row, claimant)
    return claimed, []


def _no_row(conn: sa.Connection, claimant: Claimant, request: ClaimRequest) -> NoReturn:
    """Why a handle found no row: the producer wrote other consumers (the handle was altered
    and signed again, by someone holding a key), or its rows are gone."""
    out = request.output
    written = conn.execute(q.output_consumers(out.output_id, request.generation)).scalar()
    if written is not None and written != _consumers_json(request.consumers):
        raise PayloadError(
            f"this handle names consumers {sorted(request.consumers)} but the producer wrote "
            f"{json.loads(written)}: the handle was altered and signed again with a valid key (check who "
            "holds [exclusive_xcom] secret_key); nothing was claimed",
            out.ref(claimant.slot),
        )
    raise PayloadError(
        "no ledger item matches this handle: it was purged, or replaced by a newer run of the "
        "producer; re-run the producer to make a new one",
        out.ref(claimant.slot),
    )


def _slot_of(claimant: Claimant, request: ClaimRequest) -> str:
    """The slot a one-row request reads: the claimant's own in mode each, else the shared one."""
    return claimant.slot if request.mode == EACH else SHARED_SLOT


def _busy(claimant: Claimant, request: ClaimRequest, why: str) -> tuple[Claimed, list[str]]:
    if request.mode == ONE:
        return Claimed(request), [f"{request.output.producer!r} went to another consumer: {why}"]
    raise ClaimConflictError(
        f"another live claim holds the item ({why}); it is freed when that task finishes or its lease expires",
        request.output.ref(claimant.slot),
    )


def _claimable(row: Any, claimant: Claimant, request: ClaimRequest, now: datetime) -> bool:
    """Whether a claimed row may be taken: our own earlier try's, or an expired lease."""
    if _owner_of(row) == claimant.identity:
        if row.owner_try > claimant.try_number:
            raise ClaimConflictError(
                f"{claimant} is fenced out: try {row.owner_try} of the same task instance holds the claim",
                request.output.ref(claimant.slot),
            )
        return True
    return row.lease_expires_at is not None and row.lease_expires_at < now


def _claim_batch(conn: sa.Connection, claimant: Claimant, request: ClaimRequest, now: datetime) -> Claimed:
    out = request.output
    rows: list[Any] = []
    if claimant.try_number > 1:  # a retry takes back what its earlier tries held, first
        rows = list(
            conn.execute(
                *q.lock_own_earlier(
                    out.output_id, request.generation, claimant.identity, claimant.try_number, request.limit
                )
            )
        )
    own = [r.id for r in rows]
    if len(rows) < request.limit:
        rows.extend(conn.execute(*q.lock_ready(out.output_id, request.generation, request.limit - len(rows))))
    if len(rows) < request.limit:  # the pool's ready rows are gone: take over expired leases
        more = q.lock_reclaimable(
            out.output_id,
            request.generation,
            claimant.identity,
            claimant.try_number,
            now,
            request.limit - len(rows),
            exclude=own,
        )
        rows.extend(conn.execute(*more))
    claimed = Claimed(request)
    if rows:  # every row of one output names the same consumers: parse them once per batch
        _authorize(claimant, request, json.loads(rows[0].consumers))
    for row in rows:
        if row.state == CLAIMED and not _claimable(row, claimant, request, now):
            continue
        claimed.add(row, claimant)
    return claimed


def _origin(row: Any, claimant: Claimant | None) -> str:
    """How a claimed row was come by (rows the one-statement claim returns are always fresh)."""
    if claimant is None or getattr(row, "state", READY) != CLAIMED:
        return "fresh"
    if _owner_of(row) == claimant.identity:
        return f"taken back from its try {row.owner_try}"
    return f"taken over from {_describe_owner(row)} (lease expired)"


def _produce(
    conn: sa.Connection, production: Production, now: datetime, budget: int | None = None
) -> tuple[int, list[str]]:
    """Insert an output's rows; returns their count and the blobs of the rows it replaced.

    ``budget``: the payload bytes one INSERT may carry (:attr:`Ledger.inline_limit`)."""
    out = production.output
    replaced = list(conn.execute(q.unconsumed_uris(out.output_id)).scalars())
    conn.execute(q.replace_unconsumed(out.output_id))
    base = {
        "output_id": out.output_id,
        "dag_id": out.dag_id,
        "run_id": out.run_id,
        "task_id": out.task_id,
        "map_index": out.map_index,
        "key": out.key,
        "generation": production.generation,
        "mode": production.mode,
        "consumers": _consumers_json(production.consumers),
        "state": READY,
        "created_at": now,
    }
    count = 0
    for chunk in _chunks(_rows(production, base), INSERT_CHUNK, budget):
        conn.execute(q.insert_items(), chunk)
        count += len(chunk)
    return count, replaced


def _consumers_json(consumers: Iterable[str]) -> str:
    """A row's consumers as stored; a claim compares its handle's list with it verbatim."""
    return json.dumps(sorted(consumers))


def _rows(production: Production, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if production.mode == ITEMS:
        for seq, payload in enumerate(production.payloads):
            yield {**base, "slot": SHARED_SLOT, "seq": seq, **_payload_columns(payload)}
        return
    slots = sorted(production.consumers) if production.mode == EACH else [SHARED_SLOT]
    whole = [slot for slot in slots if slot not in production.split]
    if whole:
        (payload,) = production.payloads
        columns = _payload_columns(payload)
        for slot in whole:  # mode each: every slot's row shares the one payload (and blob)
            yield {**base, "slot": slot, "seq": 0, **columns}
    for slot in sorted(production.split):
        for seq, element in enumerate(production.elements):
            yield {**base, "slot": slot, "seq": seq, **_payload_columns(element)}


def _payload_columns(payload: bytes | Offloaded) -> dict[str, Any]:
    if isinstance(payload, Offloaded):
        return {
            "payload": None,
            "payload_uri": payload.uri,
            "payload_size": payload.size,
            "payload_sha256": payload.sha256,
        }
    return {"payload": payload, "payload_uri": None, "payload_size": len(payload), "payload_sha256": None}


def _chunks(rows: Iterable[dict[str, Any]], size: int, budget: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows in INSERTs of at most ``size`` rows and, with a ``budget``, that many payload bytes."""
    chunk: list[dict[str, Any]] = []
    used = 0
    for row in rows:
        cost = len(row["payload"] or b"") if budget else 0
        if chunk and (len(chunk) == size or (budget and used + cost > budget)):
            yield chunk
            chunk, used = [], 0
        chunk.append(row)
        used += cost
    if chunk:
        yield chunk


def _check_fence(conn: sa.Connection, claimant: Claimant, ref: ItemRef | None = None) -> None:
    newest = conn.execute(q.lock_fence(claimant.ti_key)).scalar()
    if newest is not None and newest > claimant.try_number:
        raise _fenced(claimant, newest, ref)


def _fenced(claimant: Claimant, newest: int, ref: ItemRef | None = None) -> ClaimConflictError:
    """Without ``ref`` the caller (a task's session) names the items involved."""
    return ClaimConflictError(
        f"{claimant} is fenced out: try {newest} of the same task instance has begun, so this older try "
        "can no longer claim, consume or produce anything (nothing was changed)",
        ref,
    )


class _NotHeld(Exception):
    """Inside :meth:`Ledger.finish`: some claims are no longer held; abort the transaction."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def _is_held_by(row: Any, claimant: Claimant) -> bool:
    return _owner_of(row) == claimant.identity and row.owner_try == claimant.try_number


def _owner_of(row: Any) -> tuple[str, str, str, int]:
    return (row.owner_dag_id, row.owner_run_id, row.owner_task_id, row.owner_map_index)


def _describe_owner(row: Any) -> str:
    index = "" if row.owner_map_index is None or row.owner_map_index < 0 else f"[{row.owner_map_index}]"
    return f"{row.owner_dag_id}/{row.owner_run_id}/{row.owner_task_id}{index} try {row.owner_try}"


# -- schema helpers -------------------------------------------------------------------------


@contextmanager
def _migration_lock(conn: sa.Connection) -> Iterator[None]:
    """Serialize concurrent migrators (many tasks may start on a fresh database at once)."""
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7318004211)"))
        yield
    elif name in ("mysql", "mariadb"):
        conn.execute(sa.text("SELECT GET_LOCK('exclusive_xcom_migrate', 60)"))
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT RELEASE_LOCK('exclusive_xcom_migrate')"))
    else:  # SQLite: the transaction began with BEGIN IMMEDIATE and holds the write lock.
        yield


def _read_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table(meta.name):
        return 0
    value = conn.execute(q.get_meta("schema_version")).scalar()
    return int(value) if value is not None else 0


def _write_meta(conn: sa.Connection, name: str, value: str) -> None:
    if conn.execute(q.update_meta(name, value)).rowcount == 0:
        conn.execute(q.insert_meta(name, value))


def _secret(conn: sa.Connection) -> bytes:
    # Look before reading: on a never-migrated database the SELECT itself would fail with a
    # raw ProgrammingError (PostgreSQL, MySQL) instead of saying what to do.
    if not sa.inspect(conn).has_table(meta.name):
        raise LedgerUnavailableError("the claim ledger has no schema yet: run `exclusive-xcom db migrate`")
    value = conn.execute(q.get_meta("signing_secret")).scalar()
    if value is None:
        value = secrets.token_hex(32)
        conn.execute(q.insert_meta("signing_secret", value))
    return bytes.fromhex(value)


def _is_refused(exc: sa.exc.DBAPIError) -> bool:
    """PostgreSQL refused a privilege or a row-level-security policy (SQLSTATE 42501)."""
    return getattr(exc.orig, "sqlstate", None) == "42501"


def _is_deadlock(exc: sa.exc.DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return "deadlock" in text or "could not serialize" in text or "database is locked" in text


def _safe_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
