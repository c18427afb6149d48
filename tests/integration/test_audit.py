"""Who made each claim and consume: recorded by the ledger, checked by ``exclusive-xcom audit``.

The ledger records the task-instance id and host a claimant presents; the audit compares
them with Airflow's ``task_instance`` and ``task_instance_history``. Here those two tables
are the audit's own declarations (Airflow's columns and types), made in the test's database
next to the ledger, so each database's way of storing a UUID is exercised; the e2e tier
checks against the tables a real Airflow wrote (tests/e2e/test_audit.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from exclusive_xcom.audit import Finding, audit, metadata_engine, task_instance, task_instance_history
from exclusive_xcom.cli import main
from exclusive_xcom.ledger import EACH, ITEMS, Claimant, Ledger, create_engine
from tests.conftest import FakeClock
from tests.integration.conftest import DAG, RUN, output, production, request, rows, who
from tests.integration.test_migrations import DAG as OLD_DAG
from tests.integration.test_migrations import REQUEST as OLD_REQUEST
from tests.integration.test_migrations import RUN as OLD_RUN
from tests.integration.test_migrations import _claim_as_v1, _make_version, _produce_as_v1
from tests.support import airflow_env

# Try 1 of task instance "load" (in task_instance_history once try 2 began), try 2 of it,
# and try 1 of another task, "snoop", on another host.
LOAD_1, LOAD_2, SNOOP = (str(uuid.UUID(int=n, version=4)) for n in (1, 2, 3))
HOST, OTHER_HOST = "worker-1.example", "worker-2.example"


def ran(engine: sa.Engine) -> None:
    """Airflow's two tables, holding what it ran: load tries 1 and 2, snoop try 1."""
    task_instance.metadata.create_all(engine)
    common = {"dag_id": DAG, "run_id": RUN, "map_index": -1}
    with engine.begin() as conn:
        conn.execute(
            sa.insert(task_instance_history).values(
                task_instance_id=uuid.UUID(LOAD_1), task_id="load", try_number=1, hostname=HOST, **common
            )
        )
        conn.execute(
            sa.insert(task_instance),
            [
                {"id": uuid.UUID(LOAD_2), "task_id": "load", "try_number": 2, "hostname": HOST, **common},
                {"id": uuid.UUID(SNOOP), "task_id": "snoop", "try_number": 1, "hostname": OTHER_HOST, **common},
            ],
        )


def load(try_number: int = 2, ti_id: str | None = LOAD_2, host: str | None = HOST) -> Claimant:
    """Task instance "load" as a claimant presents it: its try, and the process it says it is."""
    return replace(who("load", try_number), ti_id=ti_id, host=host)


def makers(ledger: Ledger) -> dict[int, tuple[str | None, ...]]:
    """Item id -> (owner_ti_id, owner_host, consumed_ti_id, consumed_host)."""
    columns = ("owner_ti_id", "owner_host", "consumed_ti_id", "consumed_host")
    return {i: tuple(r[c] for c in columns) for i, r in rows(ledger).items()}


# -- what the ledger records -------------------------------------------------------------------


def test_a_claim_and_its_consume_record_the_task_instance_and_host_of_each(ledger: Ledger) -> None:
    """Mode each: PostgreSQL's one-statement claim and consume; elsewhere the transaction."""
    ledger.produce(production(EACH, ["load", "report"], [b"v"]))
    claimant = load(1, LOAD_1)
    (item_id,) = ledger.claim(claimant, [request(EACH, ["load", "report"])]).ids
    assert makers(ledger)[item_id] == (LOAD_1, HOST, None, None)
    ledger.finish(claimant, [item_id])
    assert makers(ledger)[item_id] == (LOAD_1, HOST, LOAD_1, HOST)

    # The same try finished by another process (whatever identity it presents) is recorded as such.
    (other,) = ledger.claim(who("report"), [request(EACH, ["load", "report"])]).ids
    assert makers(ledger)[other] == (None, None, None, None), "a claimant that says nothing records nothing"
    ledger.finish(replace(who("report"), ti_id=SNOOP, host=OTHER_HOST), [other])
    assert makers(ledger)[other] == (None, None, SNOOP, OTHER_HOST)


def test_a_retry_a_finish_with_outputs_and_a_release_record_their_own_makers(ledger: Ledger) -> None:
    """The transaction paths: a retry takes its claims back, a finish writes an output, a final
    failure releases (and forgets who held)."""
    ledger.produce(production(ITEMS, ["load"], [b"a", b"b", b"c"]))
    req = request(ITEMS, ["load"], limit=2)
    first = ledger.claim(load(1, LOAD_1), [req]).ids
    assert [makers(ledger)[i][:2] for i in first] == [(LOAD_1, HOST)] * 2

    retry = load(2, LOAD_2, OTHER_HOST)
    taken = ledger.claim(retry, [req]).ids
    assert taken == first, "the retry takes back what try 1 held"
    assert [makers(ledger)[i][:2] for i in taken] == [(LOAD_2, OTHER_HOST)] * 2
    ledger.finish(retry, taken, productions=[production(EACH, ["report"], [b"out"], output=output("load"))])
    assert [makers(ledger)[i] for i in taken] == [(LOAD_2, OTHER_HOST, LOAD_2, OTHER_HOST)] * 2

    (last,) = ledger.claim(retry, [req]).ids
    assert makers(ledger)[last] == (LOAD_2, OTHER_HOST, None, None)
    assert ledger.release_held(retry, [(req.output, 1)]) == 1
    assert makers(ledger)[last] == (None, None, None, None)


# -- what the audit reports ----------------------------------------------------------------------


def _claim_one(ledger: Ledger, claimant: Claimant) -> int:
    (item_id,) = ledger.claim(claimant, [request(ITEMS, ["load"], limit=1)]).ids
    return item_id


def _found(findings: list[Finding]) -> list[tuple[int, str, str]]:
    return [(f.record.item_id, f.record.action, f.problem) for f in findings]


def test_audit_reports_every_claim_and_consume_that_airflow_did_not_run_so(ledger: Ledger, clock: FakeClock) -> None:
    ran(ledger.engine)
    ledger.produce(production(ITEMS, ["load"], [b"%d" % i for i in range(9)]))
    earlier = _claim_one(ledger, load(1, LOAD_1))  # try 1, really: try 2 takes it back ...
    taken = ledger.claim(load(), [request(ITEMS, ["load"], limit=2)]).ids
    assert taken[0] == earlier and len(taken) == 2
    ledger.finish(load(), taken)  # ... and consumes it with a fresh one: nothing to report
    forged = _claim_one(ledger, load(ti_id=SNOOP, host=OTHER_HOST))  # snoop, presenting itself as load
    ledger.finish(load(ti_id=SNOOP, host=OTHER_HOST), [forged])
    made_up = _claim_one(ledger, load(ti_id=str(uuid.uuid4())))
    not_a_uuid = _claim_one(ledger, load(ti_id="not-a-uuid"))
    old_try = _claim_one(ledger, load(ti_id=LOAD_1))  # try 1's id, for try 2
    elsewhere = _claim_one(ledger, load(host=OTHER_HOST))
    anonymous = _claim_one(ledger, load(ti_id=None, host=None))

    report = audit(ledger, ledger.engine, batch=3)  # several rounds

    snoop = f"that task instance is {DAG}/{RUN}/snoop try 1, not the owner"
    assert _found(report.findings) == [
        (forged, "claim", snoop),
        (forged, "consume", snoop),
        (made_up, "claim", "unknown task instance id: Airflow ran no try with it"),
        (not_a_uuid, "claim", "unknown task instance id: Airflow ran no try with it"),
        (old_try, "claim", "that task instance id is of try 1"),
        (elsewhere, "claim", f"Airflow ran that try on host {HOST}"),
        (anonymous, "claim", "no task instance id recorded"),
    ]
    assert report.checked == 11 and report.unrecorded == 0
    line = report.findings[0].line()
    assert line.startswith(f"item {forged}: claim as {DAG}/{RUN}/load try 2 at 20"), line
    assert line.endswith(f" by task instance {SNOOP} on host {OTHER_HOST}: {snoop}"), line
    assert report.findings[0].as_json()["airflow"] == {
        "dag_id": DAG,
        "run_id": RUN,
        "task_id": "snoop",
        "map_index": -1,
        "try_number": 1,
        "hostname": OTHER_HOST,
    }
    assert report.summary() == "7 mismatch(es) in 11 claim(s) and consume(s) checked"

    # Filters: another DAG or run has nothing; --since leaves out what was made before.
    assert audit(ledger, ledger.engine, dag_id="other").checked == 0
    assert audit(ledger, ledger.engine, run_id="other").checked == 0
    assert audit(ledger, ledger.engine, dag_id=DAG, run_id=RUN).checked == 11
    clock.advance(60)
    late = _claim_one(ledger, load(ti_id=None))
    now = datetime.fromtimestamp(clock.now, tz=timezone.utc).replace(tzinfo=None)
    since = audit(ledger, ledger.engine, since=now - timedelta(seconds=1))
    assert _found(since.findings) == [(late, "claim", "no task instance id recorded")] and since.checked == 1


def test_audit_leaves_out_what_was_made_before_the_ledger_recorded_makers(engine: sa.Engine) -> None:
    """A ledger upgraded from version 7: its older claims name no task instance, and are not
    reported for it; one made without an id afterwards is."""
    ledger = Ledger(engine)
    _make_version(engine, 7)
    _produce_as_v1(engine, 3)
    drain = Claimant(OLD_DAG, OLD_RUN, "drain")
    (before,) = _claim_as_v1(engine, drain, 1)
    ledger.migrate()
    ran(engine)
    after = ledger.claim(drain, [replace(OLD_REQUEST, limit=1)]).ids

    report = audit(ledger, engine)

    assert _found(report.findings) == [(after[0], "claim", "no task instance id recorded")]
    assert (report.checked, report.unrecorded) == (1, 1) and before not in after
    assert report.summary() == (
        "1 mismatch(es) in 1 claim(s) and consume(s) checked; "
        "1 made before the ledger recorded task instances, not checked"
    )


# -- the command ---------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def airflow_started() -> None:
    """Airflow imported under the tests' configuration, before a test points ``[database]``
    elsewhere: the command reads the option anew, Airflow's import (once per process) would
    build engines on it (see the subprocess case below for that)."""
    import airflow.configuration  # noqa: F401


@pytest.fixture
def metadata_url(airflow_started: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Airflow's configured metadata DB (an SQLite file) holding :func:`ran`'s task instances."""
    url = f"sqlite:///{tmp_path / 'airflow.db'}"
    engine = sa.create_engine(url)
    ran(engine)
    engine.dispose()
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", url)
    return url


def test_the_audit_command_exits_1_on_a_mismatch_and_0_when_clean(
    ledger_url: str, metadata_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = Ledger(create_engine(ledger_url))
    ledger.migrate()
    ledger.produce(production(ITEMS, ["load"], [b"a", b"b"]))
    clean = _claim_one(ledger, load())
    ledger.finish(load(), [clean])
    code, out, err = cli(capsys, "--url", ledger_url, "audit")
    assert (code, out, err) == (0, "no mismatch in 2 claim(s) and consume(s) checked\n", "")

    forged = _claim_one(ledger, load(ti_id=SNOOP, host=OTHER_HOST))
    code, out, err = cli(capsys, "--url", ledger_url, "audit")
    *lines, summary = out.splitlines()
    assert code == 1 and not err
    assert [line.split(": ", 1)[0] for line in lines] == [f"item {forged}"]
    assert lines[0].endswith(
        f"by task instance {SNOOP} on host {OTHER_HOST}: that task instance is {DAG}/{RUN}/snoop try 1, not the owner"
    )
    assert summary == "1 mismatch(es) in 3 claim(s) and consume(s) checked"

    code, out, _ = cli(capsys, "--url", ledger_url, "audit", "--json")
    report = json.loads(out)
    assert code == 1 and (report["checked"], report["unrecorded"]) == (3, 0)
    assert [(f["item_id"], f["action"], f["ti_id"], f["owner"]["task_id"]) for f in report["findings"]] == [
        (forged, "claim", SNOOP, "load")
    ]
    assert cli(capsys, "--url", ledger_url, "audit", "--dag-id", "other")[0] == 0
    assert cli(capsys, "--url", ledger_url, "audit", "--run-id", RUN, "--since", "1h")[0] == 1
    future = (datetime.now() + timedelta(days=1)).isoformat()
    assert cli(capsys, "--url", ledger_url, "audit", "--since", future)[:2] == (
        0,
        "no mismatch in 0 claim(s) and consume(s) checked\n",
    )
    assert cli(capsys, "--url", ledger_url, "audit", "--since", "2000-01-01T00:00:00+02:00")[0] == 1
    ledger.engine.dispose()


PASSWORD = "s3cret-pw"


def _migrated_ledger(tmp_path: Path) -> str:
    """An SQLite ledger with its schema: what audit reads beside the metadata database."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = create_engine(url)
    Ledger(engine).migrate()
    engine.dispose()
    return url


@pytest.mark.parametrize(
    ("metadata", "code", "says"),
    [
        (f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/airflow", 1, "MetadataUnavailableError: cannot read"),
        (f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/airflow", 1, "MetadataUnavailableError: cannot read"),
        (f"postgres://postgres:{PASSWORD}@127.0.0.1/airflow", 1, "ConfigurationError: cannot open Airflow's"),
        ("sqlite:///{tmp}/not-airflow.db", 1, "no such table: task_instance"),
    ],
)
def test_an_unreadable_metadata_database_is_one_line_without_its_password(
    airflow_started: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    metadata: str,
    code: int,
    says: str,
) -> None:
    ledger_url = _migrated_ledger(tmp_path)  # audit only looks: it needs a schema to look at
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", metadata.format(tmp=tmp_path))
    got, out, err = cli(capsys, "--url", ledger_url, "audit")
    assert got == code and says in err and not out, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert PASSWORD not in err


def test_the_real_command_is_one_line_when_airflow_cannot_use_its_metadata_database(tmp_path: Path) -> None:
    """In a fresh process Airflow builds its metadata DB's engines on import: wherever the URL
    fails (a driver Airflow wants is missing, or the server does not answer), one line, exit 1."""
    metadata = f"postgresql://airflow:{PASSWORD}@127.0.0.1:1/airflow"
    env = airflow_env(tmp_path, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=metadata)
    command = [sys.executable, "-m", "exclusive_xcom.cli", "--url", _migrated_ledger(tmp_path), "audit"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not proc.stdout, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and PASSWORD not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(
        ("exclusive-xcom: ConfigurationError: ", "exclusive-xcom: MetadataUnavailableError: ")
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["audit", "--since", "yesterday"], "expected a duration such as 7d or 12h, or an ISO time"),
        (["audit", "--since", "7x"], "expected a duration such as 7d"),
        (["audit", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_audit_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    code, out, err = cli(capsys, "--url", f"sqlite:///{tmp_path / 'ledger.db'}", *args)
    assert code == 2 and reason in err and not out, err
    assert len(err.strip().splitlines()) == 1, err


def test_metadata_engine_reads_the_configured_database(metadata_url: str) -> None:
    engine = metadata_engine()
    try:
        assert engine.url.render_as_string(hide_password=False) == metadata_url
    finally:
        engine.dispose()
