"""Keeping a ledger healthy for months: retention purge, orphan sweep, key rotation, and
the outputs nobody reads.

Shared by the ``exclusive-xcom`` CLI and the ready-made maintenance DAG
(``example_dags/exclusive_maintenance.py``), so both apply the same rules. Rows go in
bounded batches (one short transaction each); a blob is deleted only after the rows that
referenced it are gone, so a crash in between leaves an orphan blob, never a dangling row.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from exclusive_xcom import metrics
from exclusive_xcom.ledger import Ledger, Offloaded, Waiting
from exclusive_xcom.ledger.admin import PURGE_BATCH
from exclusive_xcom.payload import Codec

log = logging.getLogger("exclusive_xcom")

#: A blob no row references may belong to a producer whose transaction has not committed
#: yet: only blobs at least this old (and older than the purge cutoff) count as orphans.
ORPHAN_GRACE = timedelta(hours=24)
#: Payloads ``rotate_keys`` reads per query; each is re-encrypted in a transaction of its own.
ROTATE_BATCH = 500


@dataclass
class PurgeReport:
    rows: int = 0
    blobs: int = 0
    orphans: int = 0
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return f"{verb} {self.rows} item(s), {self.blobs} blob(s) and {self.orphans} orphaned blob(s)"


def purge(
    ledger: Ledger,
    codec: Codec,
    older_than: timedelta,
    *,
    expired_after: timedelta | None = None,
    batch: int = PURGE_BATCH,
    dry_run: bool = False,
    sweep: bool = True,
) -> PurgeReport:
    """Delete consumed items older than ``older_than`` (and, with ``expired_after``, unread
    ones older than that), their blobs, and blobs no row references written before the
    cutoff (a producer that died between writing a blob and committing its row)."""
    report = PurgeReport(dry_run=dry_run)

    def drop_blobs(uris: list[str]) -> None:
        report.blobs += codec.store.delete(uris)

    report.rows = ledger.purge(
        older_than, expired_after=expired_after, batch=batch, dry_run=dry_run, on_blobs=drop_blobs
    )
    if sweep and _has_store(codec):
        cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - max(older_than, ORPHAN_GRACE)
        report.orphans = _sweep(ledger, codec, cutoff, batch, dry_run)
    log.info("exclusive_xcom: purge %s", report)
    return report


def run_retention(older_than: str = "", expired_after: str = "", dry_run: bool = False) -> PurgeReport:
    """Purge with this process's configuration: ``retention`` and ``expire_after`` unless
    overridden (durations such as ``7d``); what the maintenance DAG runs."""
    from exclusive_xcom.config import parse_duration
    from exclusive_xcom.wiring import env

    current = env()
    older = parse_duration(older_than, "older_than") if older_than else current.settings.retention
    expired = parse_duration(expired_after, "expired_after") if expired_after else current.settings.expire_after
    return purge(current.ledger, current.codec, older, expired_after=expired, dry_run=dry_run)


def unread(ledger: Ledger, unread_after: timedelta) -> list[Waiting]:
    """Producers with items unconsumed for longer than ``unread_after``, longest waiting
    first; also sent as the ``exclusive_xcom.unread_items`` gauges.

    A consumer that was renamed, removed or never deployed fails nothing: its producer's
    items just wait, and the ledger grows, until someone looks. This is the look.
    """
    waiting = ledger.waiting(unread_after)
    metrics.unread((w.dag_id, w.task_id, w.unread) for w in waiting)
    return [w for w in waiting if w.unread]


def stats(ledger: Ledger, unread_after: timedelta) -> dict[str, Any]:
    """:meth:`Ledger.stats` and :func:`unread`, as plain data (CLI ``stats``, the maintenance DAG)."""
    from exclusive_xcom.config import format_duration

    return {
        **ledger.stats(),
        "unread_after": format_duration(unread_after),
        "unread": [asdict(w) for w in unread(ledger, unread_after)],
    }


def run_stats() -> dict[str, Any]:
    """:func:`stats` with this process's configuration; what the maintenance DAG reports after its purge."""
    from exclusive_xcom.wiring import env

    current = env()
    return stats(current.ledger, current.settings.unread_after)


def _has_store(codec: Codec) -> bool:
    try:
        return bool(codec.store.base.exists())
    except Exception as exc:  # an unreachable store must not stop the row purge
        log.warning("exclusive_xcom: cannot list offloaded payloads for the orphan sweep: %s", exc)
        return False


def _sweep(ledger: Ledger, codec: Codec, cutoff: datetime, batch: int, dry_run: bool) -> int:
    orphans = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal orphans
        referenced = ledger.blob_uris(pending)
        unreferenced = [u for u in pending if u not in referenced]
        orphans += len(unreferenced) if dry_run else codec.store.delete(unreferenced)
        pending.clear()

    for uri in codec.store.older_than(cutoff):
        pending.append(uri)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return orphans


@dataclass
class RotationReport:
    rewritten: int = 0
    skipped: int = 0  # changed meanwhile, or a blob being read right now: run again later

    def __str__(self) -> str:
        done = f"re-encrypted {self.rewritten} payload(s) under the newest key"
        if not self.skipped:
            return done
        return f"{done}; {self.skipped} busy (being read or changed meanwhile): run again later"


def rotate_keys(ledger: Ledger, codec: Codec, *, batch: int = ROTATE_BATCH) -> RotationReport:
    """Re-encrypt every stored payload (inline and offloaded) under the newest key.

    Afterwards the older keys can leave ``secret_key`` once no handle signed with them is
    still waiting for its consumer: handles are signed, not encrypted, and are not rewritten.
    """
    report, after, seen = RotationReport(), 0, set[str]()
    while rows := ledger.stored_payloads(after, batch):
        for row in rows:
            if row.payload_uri is None:
                ok = ledger.replace_payload(row.id, row.payload, b"".join(codec.reseal([row.payload])))
                report.rewritten += ok
                report.skipped += not ok
            elif row.payload_uri not in seen:  # a blob is shared by the slots of one output
                seen.add(row.payload_uri)
                moved, left = _rotate_blob(
                    ledger, codec, Offloaded(row.payload_uri, row.payload_size, row.payload_sha256)
                )
                report.rewritten += moved
                report.skipped += left
        after = rows[-1].id
    log.info("exclusive_xcom: %s", report)
    return report


def _rotate_blob(ledger: Ledger, codec: Codec, old: Offloaded) -> tuple[int, int]:
    """Rewrite one blob under the newest key; returns rows moved to it and rows left behind."""
    folder = old.uri[: old.uri.rindex("/")]
    base = str(codec.store.base).rstrip("/")
    folder = folder[len(base) + 1 :] if folder.startswith(base + "/") else "rotated"
    new = codec.store.write(folder, codec.reseal(codec.store.read(old)))
    moved, left, unneeded = ledger.move_blob(old, new)
    codec.store.delete(unneeded)
    return moved, left
