"""The exclusive-xcom CLI against a real ledger on each database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from exclusive_xcom.cli import main
from exclusive_xcom.ledger import (
    Claimant,
    ClaimRequest,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    create_engine,
)
from exclusive_xcom.ledger.schema import SCHEMA_VERSION
from tests.integration.conftest import schema_version

DAG, RUN = "cli_dag", "manual__1"
READER = consumer_slot(DAG, "reader")


@pytest.fixture
def seeded(ledger_url: str) -> str:
    """A ledger with three items of one output: one consumed, one claimed, one ready."""
    ledger = Ledger(create_engine(ledger_url))
    ledger.migrate()
    out = Output(DAG, RUN, "producer")
    ledger.produce(Production(Written(out, 1, "items", (READER,)), [b"a", b"bb", b"ccc"]))
    reader = Claimant(DAG, RUN, "reader")
    first = ledger.claim(reader, [ClaimRequest(Written(out, 1, "items", (READER,)), limit=1)])
    ledger.finish(reader, first.ids)
    ledger.claim(reader, [ClaimRequest(Written(out, 1, "items", (READER,)), limit=1)])
    return ledger_url


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_db_migrate_reports_the_schema_version(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--url", ledger_url, "db", "migrate")
    assert code == 0
    assert f"schema version {SCHEMA_VERSION}" in out


def test_ls_show_and_stats(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--url", seeded, "ls", "--json")
    rows = json.loads(out)
    assert code == 0 and sorted(r["state"] for r in rows) == ["claimed", "consumed", "ready"]
    assert all("payload" not in r for r in rows)

    code, out, err = cli(capsys, "--url", seeded, "ls", "--json", "--limit", "2")
    assert code == 0 and len(json.loads(out)) == 2, "the note goes to stderr, the JSON stays whole"
    assert err.strip() == "exclusive-xcom: showing the first 2; more match (raise --limit)", err
    assert not cli(capsys, "--url", seeded, "ls", "--limit", "3")[2], "no note when everything fit"

    _, out, _ = cli(capsys, "--url", seeded, "ls", "--state", "claimed")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["id", "dag_id", "run_id"] and len(lines) == 2 and "reader" in lines[1]

    item_id = next(r["id"] for r in rows if r["state"] == "consumed")
    code, out, _ = cli(capsys, "--url", seeded, "show", str(item_id), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["owner_task_id"] == "reader" and shown["consumed_at"] is not None

    _, out, _ = cli(capsys, "--url", seeded, "stats", "--json")
    stats = json.loads(out)
    assert stats["counts"] == {"ready": 1, "claimed": 1, "consumed": 1}
    assert stats["bytes"] == len(b"bb") + len(b"ccc")  # unconsumed items only
    assert stats["oldest_unconsumed"] is not None


def test_release_frees_a_stuck_claim(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(capsys, "--url", seeded, "ls", "--state", "claimed", "--json")
    (claimed,) = json.loads(out)
    ready = next(r["id"] for r in json.loads(cli(capsys, "--url", seeded, "ls", "--json")[1]) if r["state"] == "ready")
    code, out, _ = cli(capsys, "--url", seeded, "release", str(claimed["id"]), str(ready), "999999")
    assert code == 0 and out.strip() == "released 1 of 3 item(s); 1 was not claimed; no item has id 999999", out
    _, out, _ = cli(capsys, "--url", seeded, "stats", "--json")
    assert json.loads(out)["counts"] == {"ready": 2, "claimed": 0, "consumed": 1}


def test_purge_deletes_only_consumed_items(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--url", seeded, "purge", "--older-than", "1d")
    assert code == 0 and "deleted 0 item(s)" in out
    _, out, _ = cli(capsys, "--url", seeded, "purge", "--older-than", "0s", "--dry-run")
    assert "would delete 1 item(s)" in out
    _, out, _ = cli(capsys, "--url", seeded, "purge", "--older-than", "0s")
    assert "deleted 1 item(s)" in out
    _, out, _ = cli(capsys, "--url", seeded, "stats", "--json")
    assert json.loads(out)["counts"] == {"ready": 1, "claimed": 1, "consumed": 0}


# -- who may change the schema --------------------------------------------------------------------

READERS = [["ls"], ["ls", "--unread"], ["show", "1"], ["stats"], ["audit"]]


def _where(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


@pytest.mark.parametrize("command", READERS, ids="-".join)
def test_a_command_that_only_looks_never_makes_the_schema(
    ledger_url: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, err = cli(capsys, "--url", ledger_url, *command)
    assert (code, out) == (1, "")
    assert err == (
        f"exclusive-xcom: LedgerError: the claim ledger at {_where(ledger_url)} has no schema yet: "
        "run `exclusive-xcom db migrate`\n"
    )
    assert schema_version(ledger_url) == 0, "looking created the schema"


@pytest.mark.parametrize("command", READERS, ids="-".join)
def test_a_command_that_only_looks_at_an_older_schema_says_to_migrate(
    seeded: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    older = SCHEMA_VERSION - 1
    engine = create_engine(seeded)
    with engine.begin() as conn:  # as an exclusive_xcom one version behind left it
        conn.execute(
            sa.text("UPDATE exclusive_xcom_meta SET value = :v WHERE name = 'schema_version'"), {"v": str(older)}
        )
    engine.dispose()
    code, out, err = cli(capsys, "--url", seeded, *command)
    assert (code, out) == (1, "")
    assert err == (
        f"exclusive-xcom: LedgerError: the claim ledger at {_where(seeded)} has schema version {older}, "
        f"this exclusive_xcom needs {SCHEMA_VERSION}: run `exclusive-xcom db migrate`\n"
    )
    assert schema_version(seeded) == older, "looking upgraded the schema"


@pytest.mark.parametrize(
    "command", [["purge", "--older-than", "1d"], ["release", "1"], ["db", "migrate"]], ids="-".join
)
def test_a_command_that_writes_makes_the_schema_first(
    ledger_url: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, _, err = cli(capsys, "--url", ledger_url, *command)
    assert (code, err) == (0, "")
    assert schema_version(ledger_url) == SCHEMA_VERSION
    assert cli(capsys, "--url", ledger_url, "stats")[0] == 0, "once made, looking works"


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["ls", "--state", "bogus"], 2, "invalid choice: 'bogus'"),
        (["purge", "--older-than", "7x"], 2, "expected a duration such as 7d"),
        (["release", "abc"], 2, "expected a positive integer, got 'abc'"),
        (["show", "999999"], 2, "no item with id 999999"),
        (["ls", "--unread", "1x"], 2, "argument --unread: expected a duration such as 7d"),
        (["ls", "--unread", "--state", "consumed"], 2, "--unread lists unconsumed items; --state consumed matches"),
        (["stats", "--unread-after", "soon"], 2, "argument --unread-after: expected a duration such as 7d"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(
    seeded: str, capsys: pytest.CaptureFixture[str], args: list[str], code: int, reason: str
) -> None:
    got, out, err = cli(capsys, "--url", seeded, *args)
    assert got == code
    assert reason in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1:1/nope", "LedgerUnavailableError"),
        ("nosuchdb://x", "ConfigurationError"),
    ],
)
def test_unusable_ledger_exits_1_with_one_line(capsys: pytest.CaptureFixture[str], url: str, error: str) -> None:
    code, _, err = cli(capsys, "--url", url, "stats")
    assert code == 1
    assert err.startswith(f"exclusive-xcom: {error}") and len(err.strip().splitlines()) == 1


PASSWORD = "s3cret-pw"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgres://postgres:{PASSWORD}@127.0.0.1/test", "pip install 'exclusive-xcom[postgres]'"),
        (f"mysql://root:{PASSWORD}@127.0.0.1/test", "pip install 'exclusive-xcom[mysql]'"),
        (f"bogus:://u:{PASSWORD}@x", "Could not parse SQLAlchemy URL"),
        (f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test", "LedgerUnavailableError"),
        (f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/test", "LedgerUnavailableError"),
    ],
)
def test_a_password_in_the_ledger_url_is_never_printed(capsys: pytest.CaptureFixture[str], url: str, says: str) -> None:
    """Every way the ledger URL can be wrong: one line that says what to do, the password masked."""
    code, out, err = cli(capsys, "--url", url, "stats")
    assert code == 1 and says in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert PASSWORD not in err + out and ":***@" in err, err


# -- outputs nobody reads -------------------------------------------------------------------------

DAY = 86400.0


@pytest.fixture
def forgotten(ledger_url: str) -> str:
    """Two days ago ``forgotten`` wrote for ``load`` and ``audit``; ``load`` read its copy,
    nobody ever read ``audit``'s. A moment ago ``fresh`` wrote two items nobody read yet."""
    engine = create_engine(ledger_url)
    then = Ledger(engine, clock=lambda: time.time() - 2 * DAY)
    then.migrate()
    out = Output(DAG, RUN, "grp.forgotten")
    then.produce(Production(Written(out, 1, "each", (consumer_slot(DAG, "load"), consumer_slot(DAG, "audit"))), [b"x"]))
    load = Claimant(DAG, RUN, "load")
    then.finish(load, then.claim(load, [ClaimRequest(Written(out, 1, "each", (consumer_slot(DAG, "load"),)))]).ids)
    Ledger(engine).produce(Production(Written(Output(DAG, RUN, "fresh"), 1, "items", (READER,)), [b"a", b"b"]))
    engine.dispose()
    return ledger_url


def test_stats_names_the_producers_whose_items_nobody_reads(
    forgotten: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW__EXCLUSIVE_XCOM__UNREAD_AFTER", raising=False)
    code, out, err = cli(capsys, "--url", forgotten, "stats", "--json")
    stats = json.loads(out)
    assert (code, err, stats["unread_after"]) == (0, "", "1d")
    (late,) = stats["unread"]
    assert {k: late[k] for k in ("dag_id", "task_id", "unread", "waiting")} == {
        "dag_id": DAG,
        "task_id": "grp.forgotten",
        "unread": 1,  # audit's copy; load's was read
        "waiting": 1,
    }
    assert late["oldest"] == stats["oldest_unconsumed"]

    _, out, _ = cli(capsys, "--url", forgotten, "stats")
    text = out.split("\n\n")
    assert text[1].splitlines()[0] == "unconsumed for more than 1d, by producer:", out
    assert text[1].splitlines()[2].split()[:4] == [DAG, "grp.forgotten", "1", "1"], out

    _, out, _ = cli(capsys, "--url", forgotten, "stats", "--unread-after", "0s", "--json")
    assert {(u["task_id"], u["unread"]) for u in json.loads(out)["unread"]} == {("grp.forgotten", 1), ("fresh", 2)}

    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__UNREAD_AFTER", "3d")  # the option, when no flag overrides it
    _, out, _ = cli(capsys, "--url", forgotten, "stats")
    assert out.rstrip().endswith("\n\nno item has waited unconsumed for more than 3d"), out


def test_ls_unread_lists_the_items_nobody_reads(
    forgotten: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW__EXCLUSIVE_XCOM__UNREAD_AFTER", raising=False)
    code, out, _ = cli(capsys, "--url", forgotten, "ls", "--unread", "--json")
    (row,) = json.loads(out)
    assert code == 0 and (row["task_id"], row["slot"], row["state"]) == ("grp.forgotten", f"{DAG}/audit", "ready")

    _, out, _ = cli(capsys, "--url", forgotten, "ls", "--unread", "0s", "--task-id", "fresh")
    header, *lines = out.splitlines()
    assert header.split()[-1] == "created_at" and len(lines) == 2 and all("fresh" in line for line in lines), out
    assert json.loads(cli(capsys, "--url", forgotten, "ls", "--unread", "1d", "--state", "claimed", "--json")[1]) == []

    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__UNREAD_AFTER", "3d")
    assert cli(capsys, "--url", forgotten, "ls", "--unread")[1].strip() == "(no items)"


def test_every_json_output_parses_and_keeps_lists_as_lists(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(capsys, "--url", seeded, "ls", "--json")
    rows = json.loads(out)
    assert all(r["consumers"] == [READER] for r in rows), rows
    assert all(isinstance(r["payload_size"], int) for r in rows), rows

    _, out, _ = cli(capsys, "--url", seeded, "show", str(rows[0]["id"]), "--json")
    assert json.loads(out)["consumers"] == [READER]
    _, out, _ = cli(capsys, "--url", seeded, "show", str(rows[0]["id"]))
    assert f"consumers         {READER}\n" in out, "people get the list, not its JSON text"

    _, out, _ = cli(capsys, "--url", seeded, "stats", "--unread-after", "0s", "--json")
    stats = json.loads(out)
    assert isinstance(stats["counts"], dict) and isinstance(stats["bytes"], int), stats
    assert [(u["task_id"], u["unread"], u["waiting"]) for u in stats["unread"]] == [("producer", 2, 2)], stats

    _, out, _ = cli(capsys, "--url", seeded, "purge", "--older-than", "0s", "--dry-run", "--json")
    assert json.loads(out) == {
        "rows": 1,
        "blobs": 0,
        "orphans": 0,
        "dry_run": True,
        "older_than": "0s",
        "expired_after": None,
    }


@pytest.mark.parametrize(
    "command",
    [[], ["db"], ["db", "migrate"], ["ls"], ["show"], ["release"], ["purge"], ["rotate-key"], ["stats"]],
    ids=lambda command: "-".join(command) or "exclusive-xcom",
)
def test_help_is_plain_text(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: exclusive-xcom")
    description = out.split("\n\n")[1]
    assert description[0].isupper() and description.rstrip().endswith("."), out
    assert not [mark for mark in ("``", ":func:", ":class:", ":meth:", "**") if mark in out], out


@pytest.mark.parametrize("backend", ["sqlite"])
def test_json_output_is_clean_whatever_airflow_and_its_providers_log(ledger_url: str, tmp_path: Path) -> None:
    """A fresh process, Airflow's own logging set up: the Amazon provider logs the connection it
    reads and the orphan sweep warns that S3 is unreachable, both on stderr; stdout is the JSON."""
    connection = {
        "conn_type": "aws",
        "login": "key",
        "password": "pw",  # short: Airflow's secrets masker warns about it, on stderr too
        "extra": {"endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}},
    }
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY": "cli-test-key",
        "AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH": "s3://cli_store@bucket/blobs",
        "AIRFLOW_CONN_CLI_STORE": json.dumps(connection),
    }
    command = [sys.executable, "-m", "exclusive_xcom.cli", "--url", ledger_url, "purge", "--older-than", "0s", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 0, done.stdout
    assert "cannot list offloaded payloads" in done.stderr and "AWS Connection" in done.stderr
