"""Every claim-path statement is index-backed: no full scan of the item table.

The ledger fills up with consumed history for months; a statement that scans the table
gets slower with every row, which is exactly what the claimable partial index and the
primary-key walks exist to prevent. Each statement the claim path sends, and those that
look for outputs nobody reads (``stats``, ``ls --unread``), is EXPLAINed on a ledger of
20,000 mostly consumed items (statistics refreshed), on each database.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.ledger import ITEMS, Claimant, Ledger, Output, create_engine
from exclusive_xcom.ledger import queries as q
from exclusive_xcom.ledger.schema import item

HISTORY = 20_000
DRAINED = 5_000
NOW = datetime(2026, 11, 25, 12, 0, 0)
OWNER = ("d", "r", "worker", 0)
LIVE = Output("d", "r", "live")


def _fill(engine: sa.Engine) -> None:
    """HISTORY consumed items of many old outputs, and 100 claimable ones of LIVE."""
    base = {
        "dag_id": "d",
        "run_id": "r",
        "map_index": -1,
        "key": "return_value",
        "generation": 1,
        "mode": ITEMS,
        "consumers": json.dumps(["d/worker"]),
        "slot": "*",
        "payload_size": 1,
        "created_at": NOW - timedelta(days=30),
    }
    old = [
        {
            **base,
            "output_id": Output("d", "r", f"old{i // 100}").output_id,
            "task_id": f"old{i // 100}",
            "seq": i % 100,
            "state": "consumed",
            "consumed_at": NOW - timedelta(days=20),
        }
        for i in range(HISTORY)
    ]
    # The live pool has been drained for a while: its own consumed rows come first.
    drained = [
        {**base, "output_id": LIVE.output_id, "task_id": "live", "seq": i, "state": "consumed", "consumed_at": NOW}
        for i in range(DRAINED)
    ]
    live = [
        {**base, "output_id": LIVE.output_id, "task_id": "live", "seq": DRAINED + i, "state": "ready", "payload": b"x"}
        for i in range(100)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(item), old)
        conn.execute(sa.insert(item), drained)
        conn.execute(sa.insert(item), live)
    if engine.dialect.name == "sqlite":
        return  # nothing runs ANALYZE on an embedded ledger: plan as it will be planned there
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE" if engine.dialect.name == "postgresql" else f"ANALYZE TABLE {item.name}")


def _statements(dialect: str) -> dict[str, Any]:
    ids = [HISTORY + 1, HISTORY + 2]
    ti_key = Claimant(*OWNER).ti_key
    lease = NOW + timedelta(minutes=5)
    if dialect == "postgresql":  # the one-statement claim and consume (see queries.py)
        consumers = json.dumps(["d/worker"])
        one_statement = {
            "claim_ready_now": q.claim_ready_now(LIVE.output_id, 1, None, consumers, OWNER, 1, NOW, lease, ti_key, 100),
            "claim_slot_now": q.claim_ready_now(
                LIVE.output_id, 1, "d/worker", consumers, OWNER, 1, NOW, lease, ti_key, 1
            ),
            "consume_all_now": q.consume_all_now(ids, OWNER, 1, NOW, ti_key, "inputs"),
            "consume_batch_now": q.consume_all_now(ids, OWNER, 1, NOW, ti_key, None),  # a stream's batch
        }
    else:
        one_statement = {}
    purgeable = q.purgeable(NOW - timedelta(days=7), NOW - timedelta(days=60), NOW)
    consumed_only = q.purgeable(NOW - timedelta(days=7), None, NOW)  # the default: no expire_after
    return {
        "lock_slot": q.lock_slot(LIVE.output_id, 1, "d/worker"),  # mode each: one row per slot
        "lock_ready": q.lock_ready(LIVE.output_id, 1, 100),
        "lock_reclaimable": q.lock_reclaimable(LIVE.output_id, 1, OWNER, 2, NOW, 100),
        "lock_own_earlier": q.lock_own_earlier(LIVE.output_id, 1, OWNER, 2, 100),
        "mark_claimed": q.mark_claimed(ids, OWNER, 1, NOW, lease, ti_key),
        "mark_consumed": q.mark_consumed(ids, OWNER, 1, NOW, ti_key),
        "mark_finished": q.mark_finished(ti_key, 1, "inputs", NOW),
        "extend_lease": q.extend_lease(ids, OWNER, 1, lease),
        "release": q.release(ids, OWNER, 1),
        "release_held": q.release_held(LIVE.output_id, 1, OWNER, 1),
        "replace_unconsumed": q.replace_unconsumed(LIVE.output_id),
        "next_id": q.next_id(0),
        "purge_window": q.purge_window(purgeable, 1, 1000),
        "purge_delete": q.delete_where(list(range(1, 1001)), purgeable),
        "purge_window_consumed": q.purge_window(consumed_only, 1, 1000),
        "purge_delete_consumed": q.delete_where(list(range(1, 1001)), consumed_only),
        "waiting_by_producer": q.waiting_by_producer(NOW - timedelta(days=1)),
        "ls_unread": q.select_items(dag_id="d", task_id="live", unread_before=NOW - timedelta(days=1), limit=51),
        **one_statement,
    }


def _plan(conn: sa.Connection, statement: sa.Executable | tuple[sa.Executable, dict[str, Any]]) -> str:
    """The plan of a statement exactly as the ledger sends it (rendered SQL and parameters)."""
    stmt, values = statement if isinstance(statement, tuple) else (statement, {})
    sqlite = conn.dialect.name == "sqlite"
    prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "

    def explain(_conn: Any, _cursor: Any, sql: str, params: Any, _context: Any, _many: bool) -> tuple[str, Any]:
        return prefix + sql, params

    sa.event.listen(conn, "before_cursor_execute", explain, retval=True)
    try:
        rows = conn.execute(stmt, values).all()
    finally:
        sa.event.remove(conn, "before_cursor_execute", explain)
    if sqlite:
        return "\n".join(str(r[-1]) for r in rows)
    if conn.dialect.name == "postgresql":
        return "\n".join(r[0] for r in rows)
    return "\n".join(f"table={r.table} type={r.type} key={r.key} rows={r.rows}" for r in rows)


def _max_rows(plan: str) -> int:
    """The largest ``rows=`` estimate in a MySQL/MariaDB plan."""
    return max((int(part[5:]) for part in plan.split() if part.startswith("rows=") and part[5:].isdigit()), default=0)


def _full_scans(dialect: str, plan: str) -> list[str]:
    """Lines of ``plan`` that read the whole item table."""
    if dialect == "postgresql":
        return [line for line in plan.splitlines() if "Seq Scan on exclusive_xcom_item" in line]
    if dialect == "sqlite":  # "SCAN exclusive_xcom_item" without an index is a full scan
        return [
            line for line in plan.splitlines() if line.startswith("SCAN exclusive_xcom_item") and "INDEX" not in line
        ]
    return [line for line in plan.splitlines() if "table=exclusive_xcom_item " in line and "type=ALL" in line]


def test_every_claim_path_statement_uses_an_index(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    Ledger(engine).migrate()
    _fill(engine)
    plans = {}
    with engine.connect() as conn:
        for name, stmt in _statements(engine.dialect.name).items():
            plans[name] = _plan(conn, stmt)
        conn.rollback()
    engine.dispose()
    assert all(plans.values()), plans
    scanning = {name: plan for name, plan in plans.items() if _full_scans(engine.dialect.name, plan)}
    # Purge batches must go by their primary-key window: through any other index (state) each
    # batch would re-read every remaining row, and a million-row purge becomes quadratic.
    pk = {"postgresql": "_pkey", "sqlite": "PRIMARY KEY", "mysql": "key=PRIMARY", "mariadb": "key=PRIMARY"}
    # So must the writes to items a claimant holds: by id, not by "state = 'claimed'", which
    # matches every claim in flight.
    by_id = [
        n
        for n in plans
        if n.startswith("purge_") or n in ("mark_claimed", "mark_consumed", "extend_lease", "consume_all_now")
    ]
    off_pk = {n: plans[n] for n in by_id if pk[engine.dialect.name] not in plans[n]}
    assert not off_pk, "purge statements not on the primary key:\n" + "\n\n".join(
        f"{n}:\n{p}" for n, p in off_pk.items()
    )
    # MySQL/MariaDB have no partial index: a claim must still not step over the pool's
    # consumed rows (its estimate of rows read stays near the batch, not DRAINED).
    if engine.dialect.name in ("mysql", "mariadb"):
        pool = ("lock_ready", "lock_reclaimable", "lock_own_earlier")
        unhinted = {n: plans[n] for n in pool if "key=ix_exclusive_xcom_item_pool" not in plans[n]}
        assert not unhinted, f"pool claims not on the pool index: {unhinted}"
        wide = {n: plans[n] for n in ("lock_ready", "lock_reclaimable") if _max_rows(plans[n]) >= DRAINED // 2}
        assert not wide, "claims reading the consumed rows of their pool:\n" + "\n".join(
            f"{n}: {p}" for n, p in wide.items()
        )
    # Where partial indexes exist, pool claims read the claimable one (no consumed rows in it)
    # and nothing else: a bitmap AND with another index read and sorted a whole pool per claim.
    if engine.dialect.name in ("postgresql", "sqlite"):
        pool_claims = ["lock_ready", "lock_reclaimable", "lock_own_earlier"]
        pool_claims += ["claim_ready_now", "claim_slot_now"] if engine.dialect.name == "postgresql" else []
        for name in pool_claims:
            indexes = set(
                re.findall(r"\b(ix_exclusive_xcom_\w+|uq_exclusive_xcom_\w+|exclusive_xcom_item_pkey)", plans[name])
            )
            assert indexes <= {"ix_exclusive_xcom_item_claimable", "exclusive_xcom_item_pkey"}, (
                f"{name}:\n{plans[name]}"
            )
            assert "ix_exclusive_xcom_item_claimable" in indexes, f"{name}:\n{plans[name]}"
    # Outputs nobody reads are found among the unconsumed rows only, never the consumed history.
    unconsumed = "ix_exclusive_xcom_item_state" if engine.dialect.name in ("mysql", "mariadb") else "claimable"
    for name in ("waiting_by_producer", "ls_unread"):
        assert unconsumed in plans[name], f"{name}:\n{plans[name]}"
    assert not scanning, "full scans of the item table:\n" + "\n\n".join(f"{n}:\n{p}" for n, p in scanning.items())
