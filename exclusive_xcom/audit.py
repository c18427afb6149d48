"""``exclusive-xcom audit``: claims and consumes checked against what Airflow ran.

Airflow lets a task's code act for other tasks (apache/airflow#60125), so nothing inside a
worker can stop one task from claiming as another: the ledger records, with every claim and
every consume, the task-instance id and host of the process that made it. This module reads
those records and compares them with Airflow's metadata database (``task_instance``, and
``task_instance_history`` for earlier tries), read-only and on an engine of its own. A record
is reported when its task instance is unknown to Airflow, is not the task instance the ledger
names as owner, or ran another try or on another host.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.errors import ConfigurationError, MetadataUnavailableError
from exclusive_xcom.ledger import Ledger
from exclusive_xcom.ledger.schema import CONSUMED

#: Ledger rows read, and their task-instance ids looked up in Airflow, per round.
BATCH = 500

# Airflow's two tables, only the columns read here, typed as Airflow declares them: ids are
# sa.Uuid there too, so they bind alike (native on PostgreSQL, 32 hex digits elsewhere).
_airflow = sa.MetaData()
_RAN = ("dag_id", "run_id", "task_id", "map_index", "try_number", "hostname")


def _ran_columns() -> list[sa.Column[Any]]:
    text = [sa.Column(name, sa.String(250)) for name in _RAN[:3]]
    return [
        *text,
        sa.Column("map_index", sa.Integer()),
        sa.Column("try_number", sa.Integer()),
        sa.Column("hostname", sa.String(1000)),
    ]


task_instance = sa.Table("task_instance", _airflow, sa.Column("id", sa.Uuid()), *_ran_columns())
task_instance_history = sa.Table(
    "task_instance_history", _airflow, sa.Column("task_instance_id", sa.Uuid()), *_ran_columns()
)


def _tries(ids: Iterable[uuid.UUID]) -> sa.CompoundSelect[Any]:
    """Each of ``ids`` Airflow knows: the current try of a task instance, or an earlier one."""
    ids = list(ids)
    current, earlier = task_instance, task_instance_history
    return sa.union_all(
        sa.select(current.c.id.label("id"), *(current.c[n] for n in _RAN)).where(current.c.id.in_(ids)),
        sa.select(earlier.c.task_instance_id.label("id"), *(earlier.c[n] for n in _RAN)).where(
            earlier.c.task_instance_id.in_(ids)
        ),
    )


def _probe() -> sa.CompoundSelect[Any]:
    """Reads both tables and returns nothing: does the database look like Airflow's?"""
    return _tries([uuid.UUID(int=0)])


@dataclass(frozen=True)
class Ran:
    """One try of a task instance as Airflow recorded it."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    hostname: str | None

    @property
    def identity(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


@dataclass(frozen=True)
class Record:
    """One claim or consume as the ledger recorded it: for whom, by which process, when."""

    item_id: int
    action: str  # "claim" or "consume"
    owner: tuple[str, str, str, int]
    try_number: int
    ti_id: str | None
    host: str | None
    at: datetime | None


@dataclass(frozen=True)
class Finding:
    """A record that does not match what Airflow ran, and why."""

    record: Record
    problem: str
    ran: Ran | None

    def line(self) -> str:
        r = self.record
        at = "-" if r.at is None else r.at.isoformat(sep=" ")
        return (
            f"item {r.item_id}: {r.action} as {_name(r.owner)} try {r.try_number} at {at} "
            f"by task instance {r.ti_id or '-'} on host {r.host or '-'}: {self.problem}"
        )

    def as_json(self) -> dict[str, Any]:
        r = self.record
        owner = dict(zip(("dag_id", "run_id", "task_id", "map_index"), r.owner, strict=True))
        ran = None if self.ran is None else {**dict(zip(owner, self.ran.identity, strict=True)), **_try(self.ran)}
        return {
            "item_id": r.item_id,
            "action": r.action,
            "owner": owner,
            "try_number": r.try_number,
            "ti_id": r.ti_id,
            "host": r.host,
            "at": None if r.at is None else r.at.isoformat(),
            "problem": self.problem,
            "airflow": ran,
        }


@dataclass
class Report:
    """What an audit found; ``unrecorded``: records older than the ledger's recording (not checked)."""

    findings: list[Finding] = field(default_factory=list)
    checked: int = 0
    unrecorded: int = 0

    def summary(self) -> str:
        found = f"{len(self.findings)} mismatch(es)" if self.findings else "no mismatch"
        older = f"; {self.unrecorded} made before the ledger recorded task instances, not checked"
        return f"{found} in {self.checked} claim(s) and consume(s) checked{older if self.unrecorded else ''}"

    def as_json(self) -> dict[str, Any]:
        findings = [f.as_json() for f in self.findings]
        return {"findings": findings, "checked": self.checked, "unrecorded": self.unrecorded}


def audit(
    ledger: Ledger,
    metadata: sa.Engine,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    since: datetime | None = None,
    batch: int = BATCH,
) -> Report:
    """Check every claim and consume in ``ledger`` (of ``dag_id``/``run_id``, made ``since``:
    naive UTC) against Airflow's metadata database ``metadata``, a batch of rows at a time."""
    _read(metadata, _probe())
    recorded_since = ledger.recorded_since()
    report = Report()
    after = 0
    while True:
        rows = ledger.claim_records(after, batch, dag_id=dag_id, run_id=run_id, since=since)
        records = [r for row in rows for r in _records(row) if since is None or (r.at is not None and r.at >= since)]
        ids = {i for r in records if (i := _uuid(r.ti_id)) is not None}
        ran = {row.id: Ran(*row[1:]) for row in _read(metadata, _tries(ids))} if ids else {}
        for record in records:
            if record.ti_id is None and _before(record, recorded_since):
                report.unrecorded += 1
                continue
            report.checked += 1
            tried = ran.get(_uuid(record.ti_id)) if record.ti_id else None
            if problem := check(record, tried):
                report.findings.append(Finding(record, problem, tried))
        if len(rows) < batch:
            return report
        after = rows[-1].id


def check(record: Record, ran: Ran | None) -> str | None:
    """Why ``record`` does not match ``ran`` (what Airflow knows of its task-instance id), or None."""
    if record.ti_id is None:
        return "no task instance id recorded"
    if ran is None:
        return "unknown task instance id: Airflow ran no try with it"
    problems = []
    if ran.identity != record.owner:
        problems.append(f"that task instance is {_name(ran.identity)} try {ran.try_number}, not the owner")
    elif ran.try_number != record.try_number:
        problems.append(f"that task instance id is of try {ran.try_number}")
    if ran.hostname != record.host:
        problems.append(f"Airflow ran that try on host {ran.hostname or '-'}")
    return "; ".join(problems) or None


def metadata_engine(url: str | None = None) -> sa.Engine:
    """An engine on Airflow's metadata database (``[database] sql_alchemy_conn`` by default),
    without a pool: the audit reads it a few times and leaves."""
    if url is None:
        from airflow.configuration import conf

        url = str(conf.get("database", "sql_alchemy_conn"))
    try:
        parsed = sa.make_url(url)
        args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": 10}
        return sa.create_engine(parsed, poolclass=sa.NullPool, connect_args=args)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(f"cannot open Airflow's metadata database at {url!r}: {exc}") from None


# -- plumbing ---------------------------------------------------------------------------------


def _records(row: Any) -> Iterator[Record]:
    """The claim a claimed or consumed row records and, once consumed, its consume."""
    owner = (row.owner_dag_id, row.owner_run_id, row.owner_task_id, row.owner_map_index)
    if row.owner_dag_id is not None:
        yield Record(row.id, "claim", owner, row.owner_try, row.owner_ti_id, row.owner_host, row.claimed_at)
    if row.state == CONSUMED:
        yield Record(row.id, "consume", owner, row.owner_try, row.consumed_ti_id, row.consumed_host, row.consumed_at)


def _before(record: Record, recorded_since: datetime | None) -> bool:
    """Whether ``record`` was made before the ledger began recording (so its id is not missing)."""
    return recorded_since is not None and (record.at is None or record.at < recorded_since)


def _read(metadata: sa.Engine, stmt: sa.Executable) -> list[Any]:
    """Run one read on the metadata database; any failure is one line naming it (no password)."""
    try:
        with metadata.connect() as conn:
            return list(conn.execute(stmt).all())
    except sa.exc.DBAPIError as exc:
        where = metadata.url.render_as_string(hide_password=True)
        first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        raise MetadataUnavailableError(
            f"cannot read Airflow's metadata database at {where} ([database] sql_alchemy_conn): {first}"
        ) from exc


def _uuid(text: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(text) if text else None
    except ValueError:  # not a UUID: no task instance has it
        return None


def _try(ran: Ran) -> dict[str, Any]:
    return {"try_number": ran.try_number, "hostname": ran.hostname}


def _name(identity: tuple[str, str, str, int]) -> str:
    dag_id, run_id, task_id, map_index = identity
    index = "" if map_index is None or map_index < 0 else f"[{map_index}]"
    return f"{dag_id}/{run_id}/{task_id}{index}"
