"""Case 3: claim latency with 1 thousand to 1 million rows already in the ledger.

For each size a fresh database gets that many rows, nearly all consumed history: half of
it earlier items of the very pool being drained (a long-running ``items`` output), half
other outputs of 10,000 items each. Then one process claims single items (``items``
mode, ``limit=1``) and one-row outputs (mode ``each``), finishing each, and records
p50/p99 of every call. PostgreSQL runs with ``synchronous_commit=off`` here, so the
figures show the statements' own cost rather than the disk's flush. At the largest
size the exact statements of each claim path are captured as sent and EXPLAINed.
"""

from __future__ import annotations

import re
import time
from typing import Any

import sqlalchemy as sa

from benchmarks.db import (
    DAG,
    DURABILITY,
    GENERATION,
    PAYLOAD,
    RUN,
    analyze,
    as_task,
    backend,
    fill_items,
    fresh_database,
    migrated_ledger,
)
from benchmarks.runner import percentile
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMER, CONSUMERS
from exclusive_xcom.ledger import EACH, ITEMS, Claimant, ClaimRequest, Ledger, Output, Production, Written
from exclusive_xcom.ledger import queries as q
from tests.support import statements_sent

READY = 3_000  # items left to claim in the pool
EACH_OUTPUTS = 200  # one-row outputs (mode each) to claim
HISTORY_CHUNK = 10_000  # rows per consumed earlier output
MIN_SAMPLES = 5  # per call, even when one call takes longer than the time given


def run(settings: Settings) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    plans: dict[str, Any] = {}
    for db in settings.scale_backends:
        url = settings.pg_url if db == "postgresql" else settings.mysql_url
        options = DURABILITY["async"] if db == "postgresql" else {}
        for size in settings.scale_rows:
            with fresh_database(url, options) as bench_url:
                ledger = migrated_ledger(bench_url)
                try:
                    fill_seconds = _fill(ledger, size)
                    rows += _measure(ledger, db, size, settings.scale_seconds, fill_seconds)
                    if size == max(settings.scale_rows):
                        plans[db] = explain_claim_paths(ledger, size)
                finally:
                    ledger.engine.dispose()
    return {"rows": rows, "summary": _summary(rows), "plans": plans}


def _pool() -> Output:
    return Output(DAG, RUN, "pool")


def _fill(ledger: Ledger, size: int) -> float:
    started = time.perf_counter()
    history = max(0, size - READY - EACH_OUTPUTS)
    same = history // 2
    fill_items(ledger.engine, _pool(), same, consumers=CONSUMERS, consumed=True)
    fill_items(ledger.engine, _pool(), READY, consumers=CONSUMERS, first_seq=same)
    other, n = history - same, 0
    while other > 0:
        chunk = min(HISTORY_CHUNK, other)
        fill_items(ledger.engine, Output(DAG, RUN, f"old_{n}"), chunk, consumers=CONSUMERS, consumed=True)
        other, n = other - chunk, n + 1
    for k in range(EACH_OUTPUTS):
        ledger.produce(
            Production(Written(Output(DAG, RUN, "single", map_index=k), GENERATION, EACH, CONSUMERS), [PAYLOAD])
        )
    analyze(ledger.engine)
    return time.perf_counter() - started


def _claimant(try_number: int = 1) -> Claimant:
    return as_task(Claimant(DAG, RUN, CONSUMER, map_index=0, try_number=try_number))


def _measure(ledger: Ledger, db: str, size: int, seconds: float, fill_seconds: float) -> list[dict[str, Any]]:
    claimant = _claimant()
    items = ClaimRequest(Written(_pool(), GENERATION, ITEMS, CONSUMERS), limit=1)
    ledger.finish(claimant, [])  # connect before timing
    timings: dict[str, list[float]] = {"claim (items, limit=1)": [], "finish": [], "claim (each)": []}
    deadline = time.monotonic() + seconds
    while (time.monotonic() < deadline or len(timings["finish"]) < MIN_SAMPLES) and len(
        timings["finish"]
    ) < READY - 100:
        t0 = time.perf_counter()
        (claimed,) = ledger.claim(claimant, [items]).claims
        t1 = time.perf_counter()
        ledger.finish(claimant, claimed.ids)
        timings["claim (items, limit=1)"].append(t1 - t0)
        timings["finish"].append(time.perf_counter() - t1)
    deadline = time.monotonic() + seconds / 2
    for k in range(EACH_OUTPUTS - 1):  # the last one is left for EXPLAIN
        if time.monotonic() > deadline and len(timings["claim (each)"]) >= MIN_SAMPLES:
            break
        request = ClaimRequest(Written(Output(DAG, RUN, "single", map_index=k), GENERATION, EACH, CONSUMERS))
        t0 = time.perf_counter()
        (claimed,) = ledger.claim(claimant, [request]).claims
        timings["claim (each)"].append(time.perf_counter() - t0)
        ledger.finish(claimant, claimed.ids)
    return [
        {
            "backend": db,
            "rows": size,
            "call": call,
            "samples": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 3),
            "p99_ms": round(percentile(values, 99) * 1000, 3),
            "fill_s": round(fill_seconds, 1),
        }
        for call, values in timings.items()
    ]


def explain_claim_paths(ledger: Ledger, size: int) -> dict[str, Any]:
    """Capture what each claim path sends, then EXPLAIN every statement as sent."""
    claimant = _claimant()
    labels: list[tuple[int, str]] = []  # (statements sent before it, what the ledger was asked)
    with statements_sent(ledger) as sent:
        labels.append((len(sent), "claim items"))
        (claimed,) = ledger.claim(
            claimant, [ClaimRequest(Written(_pool(), GENERATION, ITEMS, CONSUMERS), limit=1)]
        ).claims
        labels.append((len(sent), "finish"))
        ledger.finish(claimant, claimed.ids)
        labels.append((len(sent), "claim each"))
        last = Output(DAG, RUN, "single", map_index=EACH_OUTPUTS - 1)
        (claimed,) = ledger.claim(claimant, [ClaimRequest(Written(last, GENERATION, EACH, CONSUMERS))]).claims
        labels.append((len(sent), "claim items (retry takes back)"))  # try 1 holds one; try 2 takes it back first
        ledger.claim(claimant, [ClaimRequest(Written(_pool(), GENERATION, ITEMS, CONSUMERS), limit=1)])
        ledger.claim(_claimant(2), [ClaimRequest(Written(_pool(), GENERATION, ITEMS, CONSUMERS), limit=2)])
    what = [next(label for start, label in reversed(labels) if start <= i) for i in range(len(sent))]
    plans = []
    for path, (_, statement, parameters) in zip(what, sent, strict=True):
        plan = _explain(ledger.engine, statement, parameters)
        wide = _wide_reads(ledger.engine, plan)
        plans.append({"path": path, "statement": statement, "plan": plan, "wide_reads": wide})
    return {"rows": size, "statements": plans}


def _explain(engine: sa.Engine, statement: str, parameters: Any, analyze: bool = True) -> str:
    """The plan of one statement as sent: executed (ANALYZE) and rolled back on PostgreSQL.

    A consume run again finds its rows consumed already and aborts itself (``queries.ABORTED``):
    its plan is then shown unexecuted."""
    postgres = backend(str(engine.url)) == "postgresql"
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if postgres and analyze else "EXPLAIN "
    with engine.connect() as conn, conn.begin() as tx:
        driver = conn.connection.driver_connection
        assert driver is not None, "a checked-out connection has its driver connection"
        cursor = driver.cursor()
        try:
            cursor.execute(prefix + statement, parameters)
        except Exception as exc:
            if not analyze or getattr(exc, "sqlstate", None) != q.ABORTED:
                raise
            tx.rollback()
            return _explain(engine, statement, parameters, analyze=False)
        rows = cursor.fetchall()
        names = [d[0] for d in cursor.description]
        cursor.close()
        tx.rollback()
    if postgres:
        return "\n".join(r[0] for r in rows)
    return "\n".join(" | ".join(f"{n}={v}" for n, v in zip(names, r, strict=True) if v is not None) for r in rows)


WIDE = 1_000  # rows read (and thrown away) by one claim before a plan line is flagged


def _wide_reads(engine: sa.Engine, plan: str) -> list[str]:
    """Plan lines that read a whole table or many rows for one claim: ``Seq Scan`` or
    ``Rows Removed by Filter`` >= :data:`WIDE` (PostgreSQL), ``type=ALL`` or ``rows`` >= WIDE (MariaDB)."""
    postgres = backend(str(engine.url)) == "postgresql"
    flagged = []
    for line in plan.splitlines():
        if postgres:
            removed = re.search(r"Rows Removed by Filter: (\d+)", line)
            wide = "Seq Scan" in line or (removed is not None and int(removed.group(1)) >= WIDE)
        else:
            rows = re.search(r"\brows=(\d+)", line)
            wide = "type=ALL" in line or (rows is not None and int(rows.group(1)) >= WIDE)
        if wide:
            flagged.append(line.strip())
    return flagged


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """p50 (and p99) at the largest size over the smallest, per backend and call."""
    summary: dict[str, Any] = {}
    by_key = {(r["backend"], r["call"], r["rows"]): r for r in rows}
    for db, call in {(r["backend"], r["call"]) for r in rows}:
        sizes = sorted(n for d, c, n in by_key if (d, c) == (db, call))
        small, large = by_key[(db, call, sizes[0])], by_key[(db, call, sizes[-1])]
        summary[f"{db}/{call}"] = {
            "sizes": f"{sizes[-1]:,} vs {sizes[0]:,} rows",
            "p50_ratio": round(large["p50_ms"] / small["p50_ms"], 3),
            "p99_ratio": round(large["p99_ms"] / small["p99_ms"], 3),
        }
    return summary
