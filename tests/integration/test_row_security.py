"""Teams that must not see each other's items: PostgreSQL row-level security, attacked for real.

Two teams, each with its own login role made a member by ``exclusive-xcom db grant``. Team
B produces; then team A's role tries every statement of the claim path (and the ways
around row-level security) directly in SQL against B's rows, then the package's own
internals as a hostile task would call them. Every attempt is refused or touches nothing,
and B's consumers then read everything, each item once. MySQL/MariaDB and SQLite have no
row-level security: ``db grant`` says so, and what to do instead.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from exclusive_xcom import config, wiring
from exclusive_xcom.cli import main
from exclusive_xcom.errors import ClaimConflictError, ConfigurationError, NotAuthorizedError, PayloadError
from exclusive_xcom.ledger import EACH, ITEMS, Claimant, ClaimRequest, Ledger, Output, Production, Written, get_engine
from exclusive_xcom.ledger.queries import TEAM_ROLE_PREFIX
from exclusive_xcom.ledger.schema import SCHEMA_VERSION
from exclusive_xcom.runtime import open_session
from exclusive_xcom.wiring import env, env_for
from tests.support import admin_engine

RUN = "manual__2026-12-01T00:00:00+00:00"
SALES, HR = "sales_etl", "hr_etl"  # team A's DAG, team B's DAG


@dataclass
class Team:
    name: str
    login: str
    url: str
    ledger: Ledger

    def claimant(self, dag_id: str, task_id: str, try_number: int = 1, team: str | None = None) -> Claimant:
        return Claimant(dag_id, RUN, task_id, try_number=try_number, team=self.name if team is None else team)


@dataclass
class World:
    admin: str
    a: Team
    b: Team
    b_each: Output  # B's output for one consumer, hr_etl.load
    b_items: Output  # B's work queue for hr_etl.work, 10 items
    b_fence: str  # the fence key of B's consumer hr_etl.load, which has begun its try 1

    def teams_option(self) -> str:
        return f"{self.a.name}: sales_*; {self.b.name}: hr_*"


def _grant(url: str, team: str, login: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", url, "db", "grant", "--team", team, "--role", login]) == 0
    out = capsys.readouterr().out
    assert f"row-level security on; role {login!r} sees team {team!r}'s items only" in out


@pytest.fixture
def world(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    suffix = secrets.token_hex(4)
    names = {"a": f"a{suffix}", "b": f"b{suffix}"}
    logins = {k: f"exx_login_{v}" for k, v in names.items()}
    admin = Ledger(get_engine(ledger_url))
    admin.migrate()
    server = admin_engine(ledger_url)
    with server.connect() as conn:
        for login in logins.values():
            conn.exec_driver_sql(f"CREATE ROLE {login} LOGIN PASSWORD 'pw-{suffix}'")
    teams: dict[str, Team] = {}
    try:
        for key, name in names.items():
            _grant(ledger_url, name, logins[key], capsys)
            url = sa.make_url(ledger_url).set(username=logins[key], password=f"pw-{suffix}")
            rendered = url.render_as_string(hide_password=False)
            teams[key] = Team(name, logins[key], rendered, Ledger(get_engine(rendered)))
        b = teams["b"]
        b_each = Output(HR, RUN, "extract", team=b.name)
        b_items = Output(HR, RUN, "queue", team=b.name)
        b.ledger.produce(Production(Written(b_each, 1, EACH, (f"{HR}/load",)), [b'"secret payroll"']))
        b.ledger.produce(
            Production(Written(b_items, 1, ITEMS, (f"{HR}/work",)), [f'"row {i}"'.encode() for i in range(10)])
        )
        b.ledger.enter(b.claimant(HR, "load"))
        a = teams["a"]
        a.ledger.produce(
            Production(Written(Output(SALES, RUN, "extract", team=a.name), 1, EACH, (f"{SALES}/load",)), [b"1"])
        )
        yield World(ledger_url, a, b, b_each, b_items, b.claimant(HR, "load").ti_key)
    finally:
        for made in teams.values():
            made.ledger.engine.dispose()
        get_engine(ledger_url).dispose()
        with server.connect() as conn:  # the database goes with the test; roles are the server's
            wanted = [*logins.values(), *(TEAM_ROLE_PREFIX + t for t in names.values())]
            found = sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)")
            roles = list(conn.execute(found, {"names": wanted}).scalars())
            if roles:
                conn.exec_driver_sql(f"DROP OWNED BY {', '.join(roles)}")
        with admin_engine(
            sa.make_url(ledger_url).set(database="postgres").render_as_string(hide_password=False)
        ).connect() as conn:
            for role in roles:
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        server.dispose()


def _as(team: Team, sql: str, **params: Any) -> int:
    """Run ``sql`` as the team's login role; the rows it returned or changed."""
    with team.ledger.engine.begin() as conn:
        result = conn.execute(sa.text(sql), params)
        return len(result.all()) if result.returns_rows else int(result.rowcount)


#: Raw SQL from team A's role against team B's rows: (attack, statement). Each changes nothing.
TOUCHES_NOTHING = [
    ("read B's items", "SELECT * FROM exclusive_xcom_item WHERE dag_id = 'hr_etl'"),
    ("read B's items by key", "SELECT * FROM exclusive_xcom_item WHERE output_id = :b_each"),
    ("lock B's items to claim them", "SELECT id FROM exclusive_xcom_item WHERE dag_id = 'hr_etl' FOR UPDATE"),
    (
        "claim B's items, as B's consumer",
        "UPDATE exclusive_xcom_item SET state = 'claimed', owner_dag_id = 'hr_etl', owner_run_id = :run, "
        "owner_task_id = 'load', owner_map_index = -1, owner_try = 1 WHERE dag_id = 'hr_etl'",
    ),
    ("consume B's items", "UPDATE exclusive_xcom_item SET state = 'consumed', payload = NULL WHERE dag_id = 'hr_etl'"),
    (
        "release B's items",
        "UPDATE exclusive_xcom_item SET state = 'ready', owner_task_id = NULL WHERE dag_id = 'hr_etl'",
    ),
    ("delete B's items", "DELETE FROM exclusive_xcom_item WHERE dag_id = 'hr_etl'"),
    ("read B's fence", "SELECT * FROM exclusive_xcom_fence WHERE ti_key = :b_fence"),
    ("fence B's consumer out", "UPDATE exclusive_xcom_fence SET try_number = 99 WHERE ti_key = :b_fence"),
    ("delete B's fence", "DELETE FROM exclusive_xcom_fence WHERE ti_key = :b_fence"),
    ("read a ledger signing key", "SELECT value FROM exclusive_xcom_meta WHERE name <> 'schema_version'"),
]

#: Raw SQL from team A's role that the server refuses outright (SQLSTATE 42501).
REFUSED = [
    (
        "insert a forged item into B's namespace",
        "INSERT INTO exclusive_xcom_item (output_id, dag_id, run_id, task_id, map_index, key, generation, mode, "
        "consumers, slot, seq, payload, payload_size, state, created_at) VALUES (:b_each, 'hr_etl', :run, "
        "'extract', -1, 'return_value', 2, 'each', '[\"hr_etl/load\"]', 'hr_etl/load', 0, 'x', 1, 'ready', now())",
    ),
    ("move its own item into B's namespace", "UPDATE exclusive_xcom_item SET output_id = :b_each"),
    (
        "begin a newer try of B's consumer (fence it out)",
        "INSERT INTO exclusive_xcom_fence (ti_key, try_number, updated_at) VALUES (:b_fence_new, 99, now())",
    ),
    ("switch row-level security off", "ALTER TABLE exclusive_xcom_item DISABLE ROW LEVEL SECURITY"),
    ("drop the policy", "DROP POLICY exclusive_xcom_team ON exclusive_xcom_item"),
    ("empty the table", "TRUNCATE exclusive_xcom_item"),
    ("become team B", "SET ROLE {team_b}"),
    ("grant itself team B", "GRANT {team_b} TO CURRENT_USER"),
    ("read with row security off", "SET row_security = off; SELECT * FROM exclusive_xcom_item"),
]


def _params(world: World) -> dict[str, Any]:
    return {
        "run": RUN,
        "b_each": world.b_each.output_id,
        "b_fence": world.b_fence,
        "b_fence_new": world.b.claimant(HR, "other").ti_key,
    }


@pytest.mark.parametrize("backend", ["postgres"])
def test_team_a_raw_sql_touches_none_of_team_b_items(world: World) -> None:
    params = _params(world)
    before = _snapshot(world)
    for attack, sql in TOUCHES_NOTHING:
        used = {k: v for k, v in params.items() if f":{k}" in sql}
        assert _as(world.a, sql, **used) == 0, attack
    for attack, sql in REFUSED:
        used = {k: v for k, v in params.items() if f":{k}" in sql}
        with pytest.raises(sa.exc.DBAPIError) as caught:
            _as(world.a, sql.format(team_b=TEAM_ROLE_PREFIX + world.b.name), **used)
        assert getattr(caught.value.orig, "sqlstate", None) == "42501", (attack, caught.value.orig)
    # Its own rows it still reads and writes: the boundary is the team, not the table.
    assert _as(world.a, "SELECT * FROM exclusive_xcom_item") == 1
    assert _as(world.a, "SELECT value FROM exclusive_xcom_meta") == 1  # the schema version
    assert _snapshot(world) == before
    _b_reads_everything_once(world)


@pytest.mark.parametrize("backend", ["postgres"])
def test_team_a_through_the_package_internals_gets_nothing_of_team_b(world: World) -> None:
    """The attacks of issue #14, from code running with team A's credentials and configuration."""
    a, b = world.a, world.b
    before = _snapshot(world)
    forged = b.claimant(HR, "load")  # B's real consumer, as A makes it up
    each = ClaimRequest(Written(world.b_each, 1, EACH, (f"{HR}/load",)))
    items = ClaimRequest(Written(world.b_items, 1, ITEMS, (f"{HR}/work",)))
    with pytest.raises(PayloadError, match="no ledger item matches this handle"):
        a.ledger.claim(forged, [each])
    assert a.ledger.claim(b.claimant(HR, "work"), [items]).ids == []
    with pytest.raises(NotAuthorizedError, match=r"refused this as user .*row-level security"):
        a.ledger.enter(b.claimant(HR, "load", try_number=99))
    b_ids = [r["id"] for r in b.ledger.items()]
    with pytest.raises(ClaimConflictError, match="no longer holds"):
        a.ledger.finish(forged, b_ids)
    assert a.ledger.release_any(b_ids) == 0
    assert a.ledger.forget(world.b_each, 1) == []
    with pytest.raises(NotAuthorizedError):
        a.ledger.produce(Production(Written(world.b_each, 2, EACH, (f"{HR}/load",)), [b'"poison"']))
    # Writing under its own team's name instead: another key, so B's consumers never see it.
    as_a = Output(HR, RUN, "extract", team=a.name)
    a.ledger.produce(Production(Written(as_a, 2, EACH, (f"{HR}/load",)), [b'"poison"']))
    assert as_a.output_id != world.b_each.output_id
    assert _snapshot(world) == before
    _b_reads_everything_once(world)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_hostile_task_of_team_a_cannot_open_a_session_as_team_b(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``open_session`` with a made-up task instance of B, and ``env().ledger.engine``, in A's worker."""
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", world.a.url)
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__TEAMS", world.teams_option())
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "team-a-key")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH", f"file://{tmp_path}")
    env_for.cache_clear()
    before = _snapshot(world)
    try:
        ti = SimpleNamespace(dag_id=HR, run_id=RUN, task_id="load", map_index=-1, try_number=7)
        with pytest.raises(NotAuthorizedError) as caught:
            open_session({"ti": ti})
        assert "row-level security" in str(caught.value) and "pw-" not in str(caught.value)
        with env().ledger.engine.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT count(*) FROM exclusive_xcom_item WHERE dag_id = 'hr_etl'")).scalar() == 0
            )
    finally:
        env_for.cache_clear()
        wiring._ready.discard(world.a.url)
        get_engine(world.a.url).dispose()
    assert _snapshot(world) == before
    _b_reads_everything_once(world)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_teams_role_cannot_upgrade_the_schema_and_says_who_can(world: World) -> None:
    with get_engine(world.admin).begin() as conn:  # as if the code were newer than the schema
        conn.execute(sa.text("UPDATE exclusive_xcom_meta SET value = '7' WHERE name = 'schema_version'"))
    with pytest.raises(NotAuthorizedError) as caught:
        world.a.ledger.migrate()
    message = str(caught.value)
    assert "refused this as user" in message and "pw-" not in message
    assert message.endswith(f"the schema needs version {SCHEMA_VERSION}: run `exclusive-xcom db migrate` as its owner")


def _snapshot(world: World) -> list[tuple[Any, ...]]:
    """Every row in team B's namespace, as the table owner sees it."""
    mine = {"prefix": f"{world.b.name}:%"}
    with get_engine(world.admin).connect() as conn:
        items = conn.execute(
            sa.text("SELECT * FROM exclusive_xcom_item WHERE output_id LIKE :prefix ORDER BY id"), mine
        )
        fences = conn.execute(sa.text("SELECT * FROM exclusive_xcom_fence WHERE ti_key LIKE :prefix ORDER BY 1"), mine)
        return [tuple(r) for r in items] + [tuple(r) for r in fences]


def _b_reads_everything_once(world: World) -> None:
    b = world.b
    load = b.claimant(HR, "load")
    (claimed,) = b.ledger.claim(load, [ClaimRequest(Written(world.b_each, 1, EACH, (f"{HR}/load",)))]).claims
    assert claimed.payloads == [b'"secret payroll"']
    b.ledger.finish(load, claimed.ids)
    work = b.claimant(HR, "work")
    (queue,) = b.ledger.claim(work, [ClaimRequest(Written(world.b_items, 1, ITEMS, (f"{HR}/work",)))]).claims
    assert queue.payloads == [f'"row {i}"'.encode() for i in range(10)]
    b.ledger.finish(work, queue.ids)
    assert {r["state"] for r in b.ledger.items()} == {"consumed"}


@pytest.mark.parametrize("backend", ["sqlite", "mysql"])
def test_db_grant_elsewhere_says_there_is_no_row_level_security(
    ledger_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", ledger_url, "db", "grant", "--team", "sales", "--role", "worker"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "exclusive-xcom: ConfigurationError: row-level security needs PostgreSQL; on MySQL/MariaDB and SQLite "
        "give each team a ledger database of its own, with credentials only its workers have"
    )


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize(
    ("team", "role", "says"),
    [
        ("Sales", "worker", "teams: expected 'team: pattern, pattern; team: pattern'"),
        ("sales", "exx_no_such_role", "no database role 'exx_no_such_role': create it (CREATE ROLE ... LOGIN) first"),
    ],
)
def test_db_grant_refuses_a_bad_team_or_an_unknown_role_in_one_line(
    ledger_url: str, capsys: pytest.CaptureFixture[str], team: str, role: str, says: str
) -> None:
    Ledger(get_engine(ledger_url)).migrate()
    assert main(["--url", ledger_url, "db", "grant", "--team", team, "--role", role]) != 0
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    get_engine(ledger_url).dispose()


def test_teams_refuse_a_producer_whose_consumer_is_in_another_team() -> None:
    teams = config.parse_teams("sales: sales_*, crm_*; hr: hr_*")
    assert (teams.of("crm_daily"), teams.of("hr_etl")) == ("sales", "hr")
    ref = Output(SALES, RUN, "extract").ref()
    teams.check_together(SALES, ["crm_daily", SALES], ref)
    with pytest.raises(ConfigurationError, match=r"consumer DAG 'hr_etl' is in team 'hr', the producer's DAG"):
        teams.check_together(SALES, ["hr_etl"], ref)
    with pytest.raises(ConfigurationError, match=r"DAG 'ops' matches no pattern of \[exclusive_xcom\] teams"):
        teams.of("ops")
