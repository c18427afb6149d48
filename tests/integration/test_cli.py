"""The exclusive-xcom CLI against a real ledger on each database."""

from __future__ import annotations

import json

import pytest

from exclusive_xcom.cli import main
from exclusive_xcom.ledger import Claimant, ClaimRequest, Ledger, Output, Production, consumer_slot, create_engine
from exclusive_xcom.ledger.schema import SCHEMA_VERSION

DAG, RUN = "cli_dag", "manual__1"
READER = consumer_slot(DAG, "reader")


@pytest.fixture
def seeded(ledger_url: str) -> str:
    """A ledger with three items of one output: one consumed, one claimed, one ready."""
    ledger = Ledger(create_engine(ledger_url))
    ledger.migrate()
    out = Output(DAG, RUN, "producer")
    ledger.produce(Production(out, 1, "items", (READER,), [b"a", b"bb", b"ccc"]))
    reader = Claimant(DAG, RUN, "reader")
    first = ledger.claim(reader, [ClaimRequest(out, 1, "items", (READER,), limit=1)])
    ledger.finish(reader, first.ids)
    ledger.claim(reader, [ClaimRequest(out, 1, "items", (READER,), limit=1)])
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


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["ls", "--state", "bogus"], 2, "invalid choice: 'bogus'"),
        (["purge", "--older-than", "7x"], 2, "expected a duration such as 7d"),
        (["release", "abc"], 2, "expected a positive integer, got 'abc'"),
        (["show", "999999"], 2, "no item with id 999999"),
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
