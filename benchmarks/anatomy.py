"""Where the library's claim path spends its time: statements, round trips, client CPU.

For one single-item claim and one finish (mode ``items``, the path of cases 1 and 2):

* statements the ledger sends (SQLAlchemy ``before_cursor_execute``, plus ``direct``: the
  ones PostgreSQL's ledger sends on its pinned connection, :mod:`exclusive_xcom.ledger.direct`),
  transactions (``begin`` events, not counting autocommit connections) and pool checkouts
  (a ``SELECT 1`` would be a ping);
* network round trips, counted as ``sendto`` system calls by ``strace`` in a child process
  (the difference between N cycles and none, over N), so BEGIN, COMMIT and pings count too;
* wall and client CPU time per call, and the time to build the Core statements alone;
* a cProfile of claim+finish cycles (batch 1 and 100): client time by package, top functions.

PostgreSQL runs with ``synchronous_commit=off`` so the client's own cost is not hidden
behind the disk's flush. The bare two-transaction SQL of case 1 needs 2 statements,
2 round trips and no client work beyond the driver's.

``python -m benchmarks.anatomy --child URL N claim|cycle`` is the child that strace watches.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks.db import (
    DAG,
    DURABILITY,
    GENERATION,
    RUN,
    as_task,
    fill_items,
    fresh_database,
    migrated_ledger,
)
from benchmarks.settings import Settings
from benchmarks.workloads import CONSUMER, CONSUMERS
from exclusive_xcom.ledger import ITEMS, Claimant, ClaimRequest, Ledger, Output, Written, create_engine
from exclusive_xcom.ledger import queries as q
from tests.support import SentStatement, statements_sent

POOL = 60_000
BATCHES = (1, 100)
ROOT = Path(__file__).resolve().parents[1]


def _claimant() -> Claimant:
    return as_task(Claimant(DAG, RUN, CONSUMER, map_index=0))


def _request(limit: int = 1) -> ClaimRequest:
    return ClaimRequest(Written(Output(DAG, RUN, "pool"), GENERATION, ITEMS, CONSUMERS), limit=limit)


def run(settings: Settings) -> dict[str, Any]:
    cycles = 100 if settings.quick else 200
    rows, profile, server = [], {}, {}
    for db, url, options in (
        ("postgresql", settings.pg_url, DURABILITY["async"]),
        ("mariadb", settings.mysql_url, {}),
    ):
        with fresh_database(url, options) as bench_url:
            ledger = migrated_ledger(bench_url)
            try:
                fill_items(ledger.engine, Output(DAG, RUN, "pool"), POOL, consumers=CONSUMERS)
                counts = _count_statements(ledger)
                trips = _round_trips(bench_url, cycles)
                for limit in BATCHES:
                    timing = _time_calls(ledger, cycles, limit)
                    for call in ("claim", "finish"):
                        extra = {**counts[call], **trips.get(call, {})} if limit == 1 else {}
                        rows.append({"backend": db, "call": call, "batch": limit, **extra, **timing[call]})
                if db == "postgresql":
                    profile = {
                        f"batch {limit}": _profile(ledger, cycles // (1 if limit == 1 else 4), limit)
                        for limit in BATCHES
                    }
                    for limit in BATCHES:
                        rows += _raw_reference(bench_url, cycles, limit)
                    server = server_side(ledger, bench_url, 20 if settings.quick else 50)
            finally:
                ledger.engine.dispose()
    return {
        "rows": rows,
        "statements": _statement_texts(),
        "build_us": _build_cost(),
        "profile": profile,
        "server_side": server,
    }


def _count_statements(ledger: Ledger) -> dict[str, dict[str, Any]]:
    seen: Counter[str] = Counter()
    engine = ledger.engine
    listeners = {
        # An autocommit connection begins no transaction on the server (no BEGIN is sent).
        "begin": lambda conn: seen.update(
            ["transactions" if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT" else "autocommit"]
        ),
    }
    pool_listener = lambda *a: seen.update(["checkouts"])  # noqa: E731
    for name, fn in listeners.items():
        sa.event.listen(engine, name, fn)
    sa.event.listen(engine.pool, "checkout", pool_listener)
    claimant, request = _claimant(), _request()
    out: dict[str, dict[str, Any]] = {}

    def counted(sent: list[SentStatement]) -> dict[str, Any]:
        direct = sum(1 for s in sent if s.via == "direct")
        return {**seen, "statements": len(sent), **({"direct": direct} if direct else {})}

    try:
        ledger.claim(claimant, [request])  # warm: the pool has its connection
        seen.clear()
        with statements_sent(ledger) as sent:
            (claimed,) = ledger.claim(claimant, [request]).claims
        out["claim"] = counted(sent)
        seen.clear()
        with statements_sent(ledger) as sent:
            ledger.finish(claimant, claimed.ids)
        out["finish"] = counted(sent)
    finally:
        for name, fn in listeners.items():
            sa.event.remove(engine, name, fn)
        sa.event.remove(engine.pool, "checkout", pool_listener)
    pre_ping = bool(getattr(engine.pool, "_pre_ping", False))
    for counts in out.values():
        counts["pings"] = counts.get("checkouts", 0) if pre_ping else 0
    return out


def _time_calls(ledger: Ledger, cycles: int, limit: int) -> dict[str, dict[str, float]]:
    claimant, request = _claimant(), _request(limit)
    wall = {"claim": 0.0, "finish": 0.0}
    cpu = {"claim": 0.0, "finish": 0.0}
    for n in range(cycles + 20):
        w0, c0 = time.perf_counter(), time.process_time()
        (claimed,) = ledger.claim(claimant, [request]).claims
        w1, c1 = time.perf_counter(), time.process_time()
        ledger.finish(claimant, claimed.ids)
        w2, c2 = time.perf_counter(), time.process_time()
        if n >= 20:  # the first ones warm caches
            wall["claim"] += w1 - w0
            wall["finish"] += w2 - w1
            cpu["claim"] += c1 - c0
            cpu["finish"] += c2 - c1
    return {
        call: {"wall_ms": round(wall[call] / cycles * 1000, 3), "client_cpu_ms": round(cpu[call] / cycles * 1000, 3)}
        for call in wall
    }


def _raw_reference(url: str, cycles: int, limit: int) -> list[dict[str, Any]]:
    """The same two steps as bare SQL (case 1's "raw 2 transactions"): one autocommit statement each."""
    import psycopg

    from benchmarks.db import create_raw_queue, libpq_params
    from benchmarks.workloads import TWO_TX_CLAIM, TWO_TX_CONSUME

    conn = psycopg.connect(**libpq_params(url), autocommit=True)
    try:
        table = f"raw_reference_{limit}"
        create_raw_queue(conn, table, (cycles + 50) * limit)
        claim, consume = TWO_TX_CLAIM.format(t=table), TWO_TX_CONSUME.format(t=table)
        wall, cpu = [0.0, 0.0], [0.0, 0.0]
        for n in range(cycles + 20):
            w0, c0 = time.perf_counter(), time.process_time()
            ids = [r[0] for r in conn.execute(claim, {"n": limit, "owner": "me"}).fetchall()]
            w1, c1 = time.perf_counter(), time.process_time()
            conn.execute(consume, {"ids": ids, "owner": "me"})
            w2, c2 = time.perf_counter(), time.process_time()
            if n >= 20:
                wall = [wall[0] + w1 - w0, wall[1] + w2 - w1]
                cpu = [cpu[0] + c1 - c0, cpu[1] + c2 - c1]
    finally:
        conn.close()
    return [
        {
            "backend": "postgresql (raw SQL)",
            "call": call,
            "batch": limit,
            "statements": 1,
            "transactions": 1,
            "round_trips": 1,
            "wall_ms": round(wall[i] / cycles * 1000, 3),
            "client_cpu_ms": round(cpu[i] / cycles * 1000, 3),
        }
        for i, call in enumerate(("claim", "consume"))
    ]


def server_side(ledger: Ledger, url: str, rounds: int, limit: int = 100) -> dict[str, Any]:
    """What the server spends on a claim and on a consume of ``limit`` items: each statement run
    through ``EXPLAIN (ANALYZE, BUFFERS)`` (which runs it, in autocommit: a real drain), for the
    library's statements as it sends them, the same by hand on the ledger table and on a narrow
    table. Median execution and planning ms, buffers of the median round, one plan each."""
    import psycopg

    from benchmarks.db import create_raw_queue, libpq_params
    from benchmarks.workloads import LEDGER_SHAPE_CLAIM, LEDGER_SHAPE_CONSUME, TWO_TX_CLAIM, TWO_TX_CONSUME

    claimant = _claimant()
    with statements_sent(ledger) as sent:
        (claimed,) = ledger.claim(claimant, [_request(limit)]).claims
        ledger.finish(claimant, claimed.ids)
    (_, lib_claim, lib_params), (_, lib_consume, lib_consume_params) = sent
    fresh = Output(DAG, RUN, "library_fresh")  # the library too claims from a pool nobody has drained yet
    fill_items(ledger.engine, fresh, (rounds + 2) * limit, consumers=CONSUMERS)
    lib_params = {**lib_params, "p_output": fresh.output_id}
    me = {"dag": DAG, "run": RUN, "task": CONSUMER, "index": 0, "ti": claimant.ti_id, "host": claimant.host}
    held_by_me = {
        "library": "SELECT id FROM exclusive_xcom_item WHERE state = 'claimed' AND owner_ti_id = %(ti)s",
        "by hand, ledger table": "SELECT id FROM exclusive_xcom_item WHERE state = 'claimed' AND owner_ti_id = %(ti)s",
        "by hand, narrow table": "SELECT id FROM raw_server_side WHERE state = 'claimed' AND owner = %(owner)s",
    }
    conn = psycopg.connect(**libpq_params(url), autocommit=True)
    out: dict[str, Any] = {"batch": limit, "rounds": rounds}
    try:
        create_raw_queue(conn, "raw_server_side", (rounds + 2) * limit)
        fill_items(ledger.engine, Output(DAG, RUN, "by_hand"), (rounds + 2) * limit, consumers=CONSUMERS)
        by_hand = Output(DAG, RUN, "by_hand").output_id
        contenders = {
            "library": (lib_claim, lib_params, lib_consume, lib_consume_params),
            "by hand, ledger table": (
                LEDGER_SHAPE_CLAIM,
                {**me, "pool": by_hand, "n": limit},
                LEDGER_SHAPE_CONSUME,
                me,
            ),
            "by hand, narrow table": (
                TWO_TX_CLAIM.format(t="raw_server_side"),
                {"n": limit, "owner": "me"},
                TWO_TX_CONSUME.format(t="raw_server_side"),
                {"owner": "me"},
            ),
        }
        for name, (claim, claim_params, consume, consume_params) in contenders.items():
            seen: dict[str, list[tuple[float, float, str]]] = {"claim": [], "consume": []}
            for _ in range(rounds):
                seen["claim"].append(_analyzed(conn, claim, claim_params))
                ids = [r[0] for r in conn.execute(held_by_me[name], {**me, "owner": "me"}).fetchall()]
                seen["consume"].append(_analyzed(conn, consume, {**consume_params, "ids": ids, "n": len(ids)}))
            for call, runs in seen.items():
                ordered = sorted(runs)
                median_run = ordered[len(ordered) // 2]
                out[f"{name}: {call}"] = {
                    "execution_ms": round(median_run[0], 3),
                    "planning_ms": round(sorted(r[1] for r in runs)[len(runs) // 2], 3),
                    "buffers": re.findall(r"Buffers: .*", median_run[2])[:1],
                    "plan": median_run[2],
                }
    finally:
        conn.close()
    return out


def _analyzed(conn: Any, statement: str, params: Any) -> tuple[float, float, str]:
    """Execution ms, planning ms and the plan of one run of ``statement``."""
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).fetchall())
    execution = float(re.search(r"Execution Time: ([\d.]+)", plan).group(1))  # type: ignore[union-attr]
    planning = re.search(r"Planning Time: ([\d.]+)", plan)
    return execution, float(planning.group(1)) if planning else 0.0, plan


def _round_trips(url: str, cycles: int) -> dict[str, dict[str, float]]:
    """``sendto`` calls per claim and per finish, from strace -c of child processes."""
    if shutil.which("strace") is None:
        return {}

    def sends(n: int, what: str) -> int:
        cmd = ["strace", "-f", "-c", "-e", "trace=sendto", sys.executable, "-m", "benchmarks.anatomy"]
        proc = subprocess.run([*cmd, "--child", url, str(n), what], capture_output=True, text=True, cwd=ROOT)
        # strace -c columns: % time, seconds, usecs/call, calls, [errors], syscall
        line = next((x.split() for x in proc.stderr.splitlines() if x.split()[-1:] == ["sendto"]), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"strace child failed:\n{proc.stderr[-2000:]}")
        return int(line[3])

    base = sends(0, "claim")
    per_claim = (sends(cycles, "claim") - base) / cycles
    per_cycle = (sends(cycles, "cycle") - base) / cycles
    return {
        "claim": {"round_trips": round(per_claim, 2)},
        "finish": {"round_trips": round(per_cycle - per_claim, 2)},
    }


def _child(url: str, cycles: int, what: str) -> None:
    ledger = Ledger(create_engine(url))
    claimant, request = _claimant(), _request()
    held = []
    (claimed,) = ledger.claim(claimant, [request]).claims  # connect first, in every child alike
    held += claimed.ids
    for _ in range(cycles):
        (claimed,) = ledger.claim(claimant, [request]).claims
        if what == "cycle":
            ledger.finish(claimant, claimed.ids)
        else:
            held += claimed.ids
    ledger.finish(claimant, held)  # leave the pool as it was: nothing held
    ledger.engine.dispose()


def _statement_texts() -> dict[str, str]:
    """The SQL of each statement on the path, as PostgreSQL gets it (parameters elided)."""
    from sqlalchemy.dialects import postgresql

    c = _claimant()
    now = datetime(2026, 1, 1)
    statements = {
        "claim (PostgreSQL, one statement)": q.claim_ready_now(
            claimant=c,
            output_id="<output>",
            generation=1,
            consumers="[]",
            slot=None,
            seq=0,
            limit=1,
            now=now,
            lease=now,
        ),
        "finish (PostgreSQL, one statement)": q.consume_all_now(
            claimant=c, ids=[1], now=now, inputs="<inputs>", keep_payload=False
        ),
        "claim, general path: lock_ready": q.lock_ready(output_id="<output>", generation=1, limit=1),
        "claim, general path: mark_claimed": q.mark_claimed(claimant=c, ids=[1], now=now, lease=now),
        "finish, general path: mark_consumed": q.mark_consumed(claimant=c, ids=[1], now=now, keep_payload=False),
        "finish, general path: mark_finished": q.mark_finished(claimant=c, inputs="<inputs>", now=now),
    }
    return {name: _sql(bound.statement, postgresql.dialect()) for name, bound in statements.items()}


def _sql(statement: sa.Executable, dialect: sa.Dialect) -> str:
    """A Core statement's SQL as ``dialect`` renders it."""
    assert isinstance(statement, sa.ClauseElement), statement  # the ledger's statements are all Core
    return str(statement.compile(dialect=dialect))


def _build_cost(repeat: int = 300) -> dict[str, float]:
    """µs to prepare each statement of the claim path (prebuilt: binding its values)."""
    c = _claimant()
    now = datetime(2026, 1, 1)
    builders = {
        "lock_ready": lambda: q.lock_ready(output_id="<output>", generation=1, limit=1),
        "mark_claimed": lambda: q.mark_claimed(claimant=c, ids=[1], now=now, lease=now),
        "mark_consumed": lambda: q.mark_consumed(claimant=c, ids=[1], now=now, keep_payload=False),
    }
    cost = {}
    for name, build in builders.items():
        started = time.perf_counter()
        for _ in range(repeat):
            build()
        cost[name] = round((time.perf_counter() - started) / repeat * 1e6, 1)
    return cost


def _profile(ledger: Ledger, cycles: int, limit: int) -> dict[str, Any]:
    claimant, request = _claimant(), _request(limit)
    profiler = cProfile.Profile(time.process_time)  # CPU only: time blocked on the server is not counted
    profiler.enable()
    for _ in range(cycles):
        (claimed,) = ledger.claim(claimant, [request]).claims
        ledger.finish(claimant, claimed.ids)
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_package: Counter[str] = Counter()
    total = 0.0
    own: list[tuple[float, str]] = []
    for (filename, line, function), (_cc, _nc, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        by_package[_package(filename, function)] += tottime
        total += tottime
        if "/exclusive_xcom/" in filename:
            own.append((cumtime, f"{filename.split('/exclusive_xcom/')[1]}:{line}({function})"))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    top = [line for line in text.getvalue().splitlines() if re.match(r"\s+\d", line)]
    return {
        "cycles": cycles,
        "cpu_ms_per_cycle_profiled": round(total / cycles * 1000, 3),
        "share_by_package": {k: round(v / total, 3) for k, v in by_package.most_common()},
        "top_tottime": top,
        # CPU ms per cycle spent in (and under) each of the ledger's own functions
        "ledger_cumulative_ms": {name: round(cum / cycles * 1000, 3) for cum, name in sorted(own, reverse=True)[:12]},
    }


def _package(filename: str, function: str) -> str:
    for name in ("exclusive_xcom", "sqlalchemy", "psycopg", "pymysql"):
        if f"/{name}/" in filename:
            return name
    if filename == "~" and any(w in function for w in ("recv", "send", "poll", "select", "wait")):
        return "socket wait (I/O)"
    return "other (stdlib, builtins)"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python -m benchmarks.anatomy --child URL N claim|cycle (run by python -m benchmarks)")
