"""Every claim-path statement is index-backed: no full scan of the item table.

The ledger fills up with consumed history for months; a statement that scans the table
gets slower with every row, which is exactly what the claimable partial index and the
primary-key walks exist to prevent. Each statement the claim path sends, and those that
look for outputs nobody reads (``stats``, ``ls --unread``), and the UI's pages, is EXPLAINed on a ledger of
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


def _statements(dialect: str) -> dict[str, q.Bound]:
    ids = [HISTORY + 1, HISTORY + 2]
    owner, retry = Claimant(*OWNER), Claimant(*OWNER, try_number=2)
    lease = NOW + timedelta(minutes=5)
    if dialect == "postgresql":  # the one-statement claim and consume (see queries.py)

        def claim(slot: str | None, limit: int) -> q.Bound:
            consumers = json.dumps(["d/worker"])
            return q.claim_ready_now(
                claimant=owner,
                output_id=LIVE.output_id,
                generation=1,
                consumers=consumers,
                slot=slot,
                seq=0,
                limit=limit,
                now=NOW,
                lease=lease,
            )

        one_statement = {
            "claim_ready_now": claim(None, 100),
            "claim_slot_now": claim("d/worker", 1),
            "consume_all_now": q.consume_all_now(claimant=owner, ids=ids, now=NOW, inputs="inputs", keep_payload=False),
            # a stream's batch
            "consume_batch_now": q.consume_all_now(claimant=owner, ids=ids, now=NOW, inputs=None, keep_payload=False),
        }
    else:
        one_statement = {}
    purgeable = q.Purgeable(NOW - timedelta(days=7), NOW - timedelta(days=60), NOW)
    consumed_only = q.Purgeable(NOW - timedelta(days=7), None, NOW)  # the default: no expire_after
    first_ids = list(range(1, 1001))
    return {
        "lock_slot": q.lock_slot(output_id=LIVE.output_id, generation=1, slot="d/worker", seq=0),  # mode each
        "lock_ready": q.lock_ready(output_id=LIVE.output_id, generation=1, limit=100),
        "lock_reclaimable": q.lock_reclaimable(
            claimant=retry, output_id=LIVE.output_id, generation=1, now=NOW, limit=100
        ),
        "lock_own_earlier": q.lock_own_earlier(claimant=retry, output_id=LIVE.output_id, generation=1, limit=100),
        "mark_claimed": q.mark_claimed(claimant=owner, ids=ids, now=NOW, lease=lease),
        "mark_consumed": q.mark_consumed(claimant=owner, ids=ids, now=NOW, keep_payload=False),
        "mark_finished": q.mark_finished(claimant=owner, inputs="inputs", now=NOW),
        "extend_lease": q.extend_lease(claimant=owner, ids=ids, lease=lease),
        "release": q.release(claimant=owner, ids=ids, now=NOW),
        "release_held": q.release_held(claimant=owner, output_id=LIVE.output_id, generation=1, now=NOW),
        "replace_unconsumed": q.replace_unconsumed(output_id=LIVE.output_id),
        "next_id": q.next_id(after_id=0),
        "purge_window": q.purge_window(which=purgeable, first_id=1, width=1000),
        "purge_delete": q.delete_purgeable(which=purgeable, ids=first_ids),
        "purge_window_consumed": q.purge_window(which=consumed_only, first_id=1, width=1000),
        "purge_delete_consumed": q.delete_purgeable(which=consumed_only, ids=first_ids),
        "waiting_by_producer": q.waiting_by_producer(unread_before=NOW - timedelta(days=1)),
        "ls_unread": q.select_items(dag_id="d", task_id="live", unread_before=NOW - timedelta(days=1), limit=51),
        # The UI's pages (exclusive_xcom/ui): newest first under the readable DAGs, a run, a task's claims.
        "browse_page": q.browse_items(now=NOW, limit=51, sealed_prefix=b"\x00xx1", dag_ids=["d", "other"]),
        "browse_next_page": q.browse_items(
            now=NOW, limit=51, sealed_prefix=b"\x00xx1", dag_ids=["d"], before_id=HISTORY, state="consumed"
        ),
        "browse_run": q.browse_items(
            now=NOW, limit=51, sealed_prefix=b"\x00xx1", dag_ids=["d"], dag_id="d", run_id="r", task_id="live"
        ),
        # Every row here is of run "r": a task-instance tab is of a run that is a small part of the ledger.
        "browse_claimed_by": q.browse_items(
            now=NOW, limit=51, sealed_prefix=b"\x00xx1", dag_ids=["d"], dag_id="d", run_id="r2", claimed_by="worker"
        ),
        "run_consumed": q.run_consumed(dag_id="d", run_id="r", limit=1000),
        **one_statement,
    }


def _plan(conn: sa.Connection, statement: q.Bound) -> str:
    """The plan of a statement exactly as the ledger sends it (rendered SQL and parameters)."""
    stmt, values = statement
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
