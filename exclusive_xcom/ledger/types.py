"""The ledger's value types: outputs, claimants, requests and what a claim or a write carries.

Plain frozen data, no database access: the runtime builds them from Airflow's context,
the ledger turns them into rows, and a row read back is described with the helpers below.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from hashlib import sha256
from typing import Any

from exclusive_xcom.errors import ItemRef
from exclusive_xcom.ledger.schema import CLAIMED, READY

#: Items a consumer claims per transaction unless ``batch_size=`` says otherwise.
DEFAULT_BATCH_SIZE = 100
EACH, ONE, ITEMS = "each", "one", "items"
MODES = (EACH, ONE, ITEMS)


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
class Written:
    """One generation of an output as its producer wrote it, which is what a handle names:
    the output, the producer's try that wrote it (``generation``), the mode and the
    consumers it was written for. Reads and writes both start from one of these."""

    output: Output
    generation: int
    mode: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class ClaimRequest:
    """One input of a consumer: what was written, and how much of it to claim."""

    written: Written
    limit: int = DEFAULT_BATCH_SIZE
    seq: int | None = None  # mode items: this one item only (a consumer mapped over the output)

    @property
    def output(self) -> Output:
        return self.written.output

    @property
    def slot_row(self) -> bool:
        """Whether the request is for one row (modes each and one, or one item) rather than a batch."""
        return self.written.mode != ITEMS or self.seq is not None


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
        self.origins[origin_of(row, claimant)] += 1
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

    written: Written
    payloads: Iterable[bytes | Offloaded]
    split: tuple[str, ...] = ()
    elements: Sequence[bytes | Offloaded] = ()

    @property
    def output(self) -> Output:
        return self.written.output


def origin_of(row: Any, claimant: Claimant | None) -> str:
    """How a claimed row was come by (rows the one-statement claim returns are always fresh)."""
    if claimant is None or getattr(row, "state", READY) != CLAIMED:
        return "fresh"
    if owner_of(row) == claimant.identity:
        return f"taken back from its try {row.owner_try}"
    return f"taken over from {describe_owner(row)} (lease expired)"


def is_held_by(row: Any, claimant: Claimant) -> bool:
    return owner_of(row) == claimant.identity and row.owner_try == claimant.try_number


def owner_of(row: Any) -> tuple[str, str, str, int]:
    return (row.owner_dag_id, row.owner_run_id, row.owner_task_id, row.owner_map_index)


def describe_owner(row: Any) -> str:
    index = "" if row.owner_map_index is None or row.owner_map_index < 0 else f"[{row.owner_map_index}]"
    return f"{row.owner_dag_id}/{row.owner_run_id}/{row.owner_task_id}{index} try {row.owner_try}"
