"""The frozen migration steps and today's tables agree: a ledger upgraded one version at a time
from version 1 equals a fresh one, and both equal ``schema.metadata`` on every database.

Three databases per backend: ``stepwise`` (the runner stopped at each version in turn, a
transaction each, as successive releases would have left it), ``fresh`` (``migrate()`` on
an empty database) and ``reference`` (``schema.metadata.create_all()``: today's tables as
SQLAlchemy makes them, its ``ddl_if`` deciding the MySQL/MariaDB-only indexes).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from exclusive_xcom.ledger import Ledger, create_engine
from exclusive_xcom.ledger.migrations import MIGRATIONS, SCHEMA_VERSION
from exclusive_xcom.ledger.schema import fence, item, made_on, meta, metadata
from tests.conftest import drop_ledger_database, new_ledger_database
from tests.integration.conftest import schema_version

pytestmark = pytest.mark.timeout(180)

MYSQL = ("mysql", "mariadb")
#: Columns added to a table made earlier, by version (every other column came with its table).
ADDED_COLUMNS = {
    4: {(item.name, "payload_sha256")},
    7: {(fence.name, "finished_try"), (fence.name, "finished_inputs")},
    8: {(item.name, c) for c in ("owner_ti_id", "owner_host", "consumed_ti_id", "consumed_host")},
    9: {(item.name, "released_at")},
}


def _history(dialect: str) -> dict[int, set[str]]:
    """What each version changed, as :func:`_changes` names it: the history the frozen steps
    must keep (a step that makes a later column early, or forgets one, breaks it)."""
    later = set().union(*ADDED_COLUMNS.values())
    made_with = {
        f"+column {t.name}.{c.name}" for t in (meta, item, fence) for c in t.c if (t.name, c.name) not in later
    }
    on_mysql = dialect in MYSQL
    return {
        1: {f"+table {meta.name}", f"+table {item.name}", "+unique uq_exclusive_xcom_item"}
        | {"+index ix_exclusive_xcom_item_run", "+index ix_exclusive_xcom_item_state"}
        | {c for c in made_with if not c.startswith(f"+column {fence.name}.")},
        2: {"+index ix_exclusive_xcom_item_claimable"},
        3: {f"+table {fence.name}"} | {c for c in made_with if c.startswith(f"+column {fence.name}.")},
        4: {f"+column {t}.{c}" for t, c in ADDED_COLUMNS[4]},
        5: {"+index ix_exclusive_xcom_item_pool"} if on_mysql else set(),
        6: set() if on_mysql else {"-index ix_exclusive_xcom_item_state"},
        7: {f"+column {t}.{c}" for t, c in ADDED_COLUMNS[7]},
        8: {f"+column {t}.{c}" for t, c in ADDED_COLUMNS[8]},
        9: {f"+column {t}.{c}" for t, c in ADDED_COLUMNS[9]},
        # The claimable index predicated on consumed_at (and the item table's fillfactor on
        # PostgreSQL): claims can be HOT updates. MySQL/MariaDB have no partial index.
        10: set()
        if on_mysql
        else {"~index ix_exclusive_xcom_item_claimable"}
        | ({f"~table {item.name}"} if dialect == "postgresql" else set()),
        # The item table's fillfactor lowered from 70 to 45: room for most claims to be HOT.
        11: {f"~table {item.name}"} if dialect == "postgresql" else set(),
    }


@pytest.fixture
def urls(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Three new, empty databases of ``backend``: stepwise, fresh, reference."""
    made: dict[str, str] = {}
    try:
        for name in ("stepwise", "fresh", "reference"):
            (tmp_path / name).mkdir()
            made[name] = new_ledger_database(backend, tmp_path / name)
        yield made
    finally:
        for url in made.values():
            drop_ledger_database(url)


def _inspected(url: str) -> sa.Engine:
    # A new connection each time: an SQLite connection does not see indexes another one
    # created after it first read the schema.
    return sa.create_engine(url, poolclass=sa.NullPool)


def _shape(url: str) -> dict[str, dict[str, Any]]:
    """Each table as the database has it: columns in their order (name, type as this
    dialect writes it, nullable, default), primary key, unique constraints, and indexes with
    their definitions: PostgreSQL's ``pg_indexes.indexdef`` and SQLite's ``sqlite_master.sql``
    (partial-index predicates included), MySQL/MariaDB's ``SHOW CREATE TABLE`` key lines."""
    engine = _inspected(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            dialect = conn.dialect.name
            tables: dict[str, dict[str, Any]] = {}
            for table in sorted(inspector.get_table_names()):
                uniques = {u["name"]: tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)}
                definitions = _index_definitions(conn, table)
                tables[table] = {
                    "columns": [
                        (c["name"], c["type"].compile(conn.dialect), c["nullable"], c["default"])
                        for c in inspector.get_columns(table)
                    ],
                    "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                    "unique": uniques,
                    "indexes": {
                        ix["name"]: (tuple(ix["column_names"]), ix["unique"], definitions.get(str(ix["name"])))
                        for ix in inspector.get_indexes(table)
                        if ix["name"] not in uniques  # MySQL/MariaDB list a unique constraint as its index too
                    },
                    "options": _table_options(conn, table),
                }
            assert dialect == engine.dialect.name
            return tables
    finally:
        engine.dispose()


def _index_definitions(conn: sa.Connection, table: str) -> dict[str, str]:
    if conn.dialect.name == "postgresql":
        found = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table})
    elif conn.dialect.name == "sqlite":
        found = conn.execute(
            sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t"), {"t": table}
        )
    else:
        lines = conn.execute(sa.text(f"SHOW CREATE TABLE {table}")).one()[1].splitlines()
        keys = [line.strip().rstrip(",") for line in lines if line.strip().startswith(("KEY", "UNIQUE KEY"))]
        return {key.split("`")[1]: key for key in keys}
    return {name: definition for name, definition in found}


def _table_options(conn: sa.Connection, table: str) -> str | None:
    """SQLite: whether the table has AUTOINCREMENT (Alembic does not compare it); MySQL/MariaDB:
    engine, charset and collation (without the next AUTO_INCREMENT value); PostgreSQL: its
    storage parameters (fillfactor)."""
    if conn.dialect.name == "sqlite":
        sql = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table})
        return "AUTOINCREMENT" if "AUTOINCREMENT" in sql.scalar_one() else ""
    if conn.dialect.name in MYSQL:
        tail = conn.execute(sa.text(f"SHOW CREATE TABLE {table}")).one()[1].splitlines()[-1]
        return " ".join(word for word in tail.split() if not word.startswith("AUTO_INCREMENT="))
    found = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = :t AND relkind = 'r'"), {"t": table})
    return ",".join(found.scalar() or []) or None


def _changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> set[str]:
    """What changed between two shapes: tables, columns, unique constraints and indexes made
    or dropped (``+``/``-``), and any of those whose definition changed (``~``)."""

    def named(shape: dict[str, dict[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for table, parts in shape.items():
            found[f"table {table}"] = (parts["primary_key"], parts["options"])
            found.update({f"column {table}.{c[0]}": c[1:] for c in parts["columns"]})
            found.update({f"unique {name}": columns for name, columns in parts["unique"].items()})
            found.update({f"index {name}": definition for name, definition in parts["indexes"].items()})
        return found

    old, new = named(before), named(after)
    return (
        {f"+{k}" for k in new.keys() - old.keys()}
        | {f"-{k}" for k in old.keys() - new.keys()}
        | {f"~{k}" for k in old.keys() & new.keys() if old[k] != new[k]}
    )


def _diff(url: str) -> list[Any]:
    """Alembic's comparison of the database at ``url`` with today's ``schema.metadata``."""

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        # The one filter: an index today's tables declare for other dialects only (made_on, the
        # ddl_if that create_all obeys and Alembic does not) is not expected here. Reflected
        # objects are never filtered, so a stray index in the database still shows up.
        return not (type_ == "index" and not reflected and not made_on(obj, dialect))

    engine = _inspected(url)
    dialect = engine.dialect.name
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={"compare_type": True, "compare_server_default": True, "include_object": include_object},
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_a_ledger_upgraded_version_by_version_equals_a_fresh_one_and_todays_tables(urls: dict[str, str]) -> None:
    # Version by version, each through the runner in a transaction of its own, and each
    # step's changes exactly what that version changed.
    shapes = [_shape(urls["stepwise"])]
    assert shapes[0] == {}
    engine = create_engine(urls["stepwise"])
    dialect = engine.dialect.name
    history = _history(dialect)
    assert sorted(history) == list(range(1, SCHEMA_VERSION + 1)) and len(MIGRATIONS) == SCHEMA_VERSION
    for version in range(1, SCHEMA_VERSION + 1):
        assert Ledger(engine).migrate(to=version) == version
        assert schema_version(urls["stepwise"]) == version
        shapes.append(_shape(urls["stepwise"]))
        assert _changes(shapes[-2], shapes[-1]) == history[version], f"version {version} on {dialect}"
    engine.dispose()

    engine = create_engine(urls["fresh"])
    assert Ledger(engine).migrate() == SCHEMA_VERSION
    engine.dispose()
    engine = _inspected(urls["reference"])
    metadata.create_all(engine)
    engine.dispose()

    stepwise, fresh, reference = shapes[-1], _shape(urls["fresh"]), _shape(urls["reference"])
    assert set(stepwise) == {meta.name, item.name, fence.name}
    assert _changes(fresh, stepwise) == set()
    assert stepwise == fresh, "the same statements, so the very same tables (column order too)"
    # Today's tables as create_all makes them; by name, so not in their order: a migrated
    # ledger has payload_sha256 after consumed_at (version 4 added it), schema.py declares
    # it with the other payload columns.
    assert _changes(reference, stepwise) == set()
    assert _diff(urls["stepwise"]) == []
    assert _diff(urls["fresh"]) == []
    # What differs by dialect is there or not, as schema.py says.
    indexes = set(stepwise[item.name]["indexes"])
    assert {ix.name for ix in item.indexes if made_on(ix, dialect)} == indexes
    if dialect in MYSQL:
        assert {"ix_exclusive_xcom_item_pool", "ix_exclusive_xcom_item_state"} <= indexes
    else:
        assert "ix_exclusive_xcom_item_pool" not in indexes and "ix_exclusive_xcom_item_state" not in indexes
        claimable = stepwise[item.name]["indexes"]["ix_exclusive_xcom_item_claimable"][2]
        assert "WHERE" in claimable and "consumed_at IS NULL" in claimable and "state" not in claimable, claimable
    if dialect == "postgresql":
        assert stepwise[item.name]["options"] == "fillfactor=45"


def test_every_step_can_run_again_where_it_already_ran(ledger_url: str) -> None:
    """MySQL/MariaDB commit each DDL statement at once: a migrate that fails or is retried
    halfway has done steps without moving the version number, and the next runs them again."""
    engine = create_engine(ledger_url)
    for step in MIGRATIONS:
        with engine.begin() as conn:
            step(conn)
        with engine.begin() as conn:
            step(conn)
    engine.dispose()
    assert _diff(ledger_url) == []


def test_migrate_to_a_version_that_does_not_exist_is_refused(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    for version in (0, SCHEMA_VERSION + 1):
        with pytest.raises(ValueError, match=rf"^no schema version {version}: there are 1 to {SCHEMA_VERSION}$"):
            Ledger(engine).migrate(to=version)
    assert Ledger(engine).schema_version() == 0
    engine.dispose()


def test_version_10_gives_consumed_rows_without_consumed_at_one(ledger_url: str) -> None:
    """The claimable index went from ``state != 'consumed'`` to ``consumed_at IS NULL``: a
    consumed row an older ledger left without ``consumed_at`` gets one first (its claim's
    time, else its creation's), so both predicates select the same rows."""
    engine = create_engine(ledger_url)
    Ledger(engine).migrate(to=9)
    created, claimed = datetime(2026, 1, 1), datetime(2026, 1, 2)
    base = {"output_id": "o", "dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1, "key": "k"}
    base |= {"generation": 1, "mode": "items", "consumers": "[]", "slot": "*", "payload_size": 0}
    rows = [
        {**base, "seq": 0, "state": "consumed", "created_at": created, "claimed_at": claimed, "consumed_at": None},
        {**base, "seq": 1, "state": "consumed", "created_at": created, "claimed_at": None, "consumed_at": None},
        {**base, "seq": 2, "state": "consumed", "created_at": created, "claimed_at": None, "consumed_at": claimed},
        {**base, "seq": 3, "state": "ready", "created_at": created, "claimed_at": None, "consumed_at": None},
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(item), rows)
    assert Ledger(engine).migrate() == SCHEMA_VERSION
    with engine.connect() as conn:
        found = conn.execute(sa.select(item.c.seq, item.c.consumed_at).order_by(item.c.seq)).all()
    engine.dispose()
    assert [tuple(r) for r in found] == [(0, claimed), (1, created), (2, claimed), (3, None)]
