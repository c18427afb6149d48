"""How an output becomes rows: one per consumer slot (mode each), one shared (mode one), one
per element (mode items), inserted in chunks a server accepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.schema import READY, SHARED_SLOT
from exclusive_xcom.ledger.types import EACH, ITEMS, Offloaded, Production

#: Rows one INSERT carries at most.
INSERT_CHUNK = 1000


def write_output(
    conn: sa.Connection, production: Production, now: datetime, budget: int | None = None
) -> tuple[int, list[str]]:
    """Insert an output's rows; returns their count and the blobs of the rows it replaced.

    ``budget``: the payload bytes one INSERT may carry (:attr:`Ledger.inline_limit`)."""
    written = production.written
    out = written.output
    replaced = list(conn.execute(*q.unconsumed_uris(output_id=out.output_id)).scalars())
    conn.execute(*q.replace_unconsumed(output_id=out.output_id))
    base = {
        "output_id": out.output_id,
        "dag_id": out.dag_id,
        "run_id": out.run_id,
        "task_id": out.task_id,
        "map_index": out.map_index,
        "key": out.key,
        "generation": written.generation,
        "mode": written.mode,
        "consumers": consumers_json(written.consumers),
        "state": READY,
        "created_at": now,
    }
    count = 0
    for chunk in _chunks(_rows(production, base), INSERT_CHUNK, budget):
        conn.execute(*q.insert_items(rows=chunk))
        count += len(chunk)
    return count, replaced


def consumers_json(consumers: Iterable[str]) -> str:
    """A row's consumers as stored; a claim compares its handle's list with it verbatim."""
    return json.dumps(sorted(consumers))


def _rows(production: Production, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    mode, consumers = production.written.mode, production.written.consumers
    if mode == ITEMS:
        for seq, payload in enumerate(production.payloads):
            yield {**base, "slot": SHARED_SLOT, "seq": seq, **_payload_columns(payload)}
        return
    slots = sorted(consumers) if mode == EACH else [SHARED_SLOT]
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
