"""Bad input under real Airflow is refused with a clear error, and nothing leaks or is lost.

Bad decorator arguments (unknown mode, a consumer that is neither a str nor a Consumer,
an unknown keyword) are covered at parse time by ``tests/unit/test_decorator_args.py``
and are not repeated here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from exclusive_xcom import NotAuthorizedError
from exclusive_xcom.handle import MARKER, RESERVED_KEY
from tests.support import airflow_env

from .driver import LEDGER_URL
from .harness import EXAMPLE_DAGS, TEST_DAGS, Airflow, Result

NOWHERE = "postgresql+psycopg://postgres@127.0.0.1:1/nope"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", re.MULTILINE)


def final_exception(log: str) -> tuple[str, str]:
    """Type and message of the exception a task failed with (the last of a chained traceback)."""
    failed = log.split("Task failed with exception", 1)
    assert len(failed) == 2, f"no task failed in this log:\n{log[-4000:]}"
    found = _EXCEPTION_LINE.findall(failed[1])
    assert found, f"no exception in the failure log:\n{failed[1][:4000]}"
    return found[-1]


def _import(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"e2e_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)


def test_a_non_consumer_wired_to_the_output_fails_the_dag_file_import() -> None:
    """Parse time needs no ledger, so this one is not parametrized over backends."""
    with pytest.raises(NotAuthorizedError) as caught:
        _import(TEST_DAGS / "intruder.py")
    message = str(caught.value)
    assert "task 'intruder' takes the exclusive output of 'producer'" in message
    assert "not one of its consumers ['reader']" in message


@pytest.mark.dag_runs([TEST_DAGS / "unserializable.py"], [{"dag_id": "e2e_unserializable"}])
def test_an_unserializable_return_value_fails_the_producer_with_payload_error(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.state == "failed", result.tail()
    assert run.states() == {"producer": "failed", "reader": "upstream_failed"}, result.tail()
    kind, message = final_exception(run.log)
    assert kind == "exclusive_xcom.errors.PayloadError", (kind, message)
    assert "cannot serialize the return value (lock)" in message
    assert f"[dag='e2e_unserializable' run='{run.run_id}' producer='producer' key='return_value'" in message
    assert run.xcoms("producer") == [], "a failed producer pushes no handle"
    assert result.ledger_rows() == [], "nothing half-written to the ledger"


@pytest.mark.dag_runs([TEST_DAGS / "claim_intruder.py"], [{"dag_id": "e2e_claim_intruder"}])
def test_claim_by_a_task_that_is_not_a_consumer_is_refused_at_run_time(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.states() == {
        "producer": "success",
        "reader": "success",
        "snoop_classic": "failed",
        "snoop_plain": "failed",
    }, result.tail()
    for snoop in ("snoop_classic", "snoop_plain"):
        kind, message = final_exception(run.task_log(snoop))
        assert kind == "exclusive_xcom.errors.NotAuthorizedError", (snoop, kind, message)
        assert f"task {snoop!r} of dag 'e2e_claim_intruder' is not a named consumer" in message
        assert "allowed: e2e_claim_intruder/reader" in message
        assert (
            f"[dag='e2e_claim_intruder' run='{run.run_id}' producer='producer' key='return_value' "
            f"consumer='e2e_claim_intruder/{snoop}']"
        ) in message
    assert "4111-1111" not in result.output

    (row,) = result.ledger_rows()
    assert (row["state"], row["owner_task_id"], row["payload"]) == ("consumed", "reader", None)
    assert [x["value"] for x in run.xcoms("reader", "return_value")] == [19]


@pytest.mark.dag_runs([TEST_DAGS / "xcom_peek.py"], [{"dag_id": "e2e_xcom_peek"}])
def test_pulling_the_reserved_key_directly_yields_only_the_handle(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.state == "success", result.tail()
    assert run.states() == {"producer": "success", "reader": "success", "peek": "success"}, result.tail()
    (handle,) = [x["value"] for x in run.xcoms("producer", RESERVED_KEY)]
    (peeked,) = [x["value"] for x in run.xcoms("peek", "return_value")]
    assert peeked == handle, "the peeking task gets the handle and nothing else"
    assert peeked[MARKER] == 1
    assert set(peeked) == {MARKER, "dag_id", "run_id", "task_id", "map_index", "key", "generation", "mode"} | {
        "consumers",
        "sig",
    }
    assert "peek got: " + json.dumps(peeked, sort_keys=True) in run.log
    assert "hunter2-e2e-secret" not in result.output, "the payload never reaches a log"
    assert "hunter2-e2e-secret" not in json.dumps(run.xcom), "the payload never reaches the xcom table"

    (row,) = result.ledger_rows()
    assert (row["state"], row["owner_task_id"]) == ("consumed", "reader")


@pytest.mark.parametrize("backend", ["sqlite"])  # the batch it joins; its ledger is the URL below
@pytest.mark.dag_runs([EXAMPLE_DAGS / "exclusive_etl.py"], [{"dag_id": "exclusive_etl"}], env={LEDGER_URL: NOWHERE})
def test_an_unreachable_ledger_fails_the_task_with_ledger_unavailable_error(dag_runs: Result) -> None:
    """One database is enough: the ledger is a PostgreSQL URL on a port where nothing listens."""
    result = dag_runs
    run = result.run

    assert run.state == "failed", result.tail()
    assert run.states() == {"extract": "failed", "transform": "upstream_failed", "load": "upstream_failed"}, (
        result.tail()
    )
    kind, message = final_exception(run.log)
    assert kind == "exclusive_xcom.errors.LedgerUnavailableError", (kind, message, result.tail())
    assert NOWHERE in message
    assert "this step changed nothing (it never reached its commit)" in message
    assert "[dag='exclusive_etl' run=" in message and "producer='extract' key='return_value'" in message
    assert run.xcoms("extract") == []


@pytest.mark.parametrize("backend", ["sqlite"])  # the key check comes before any ledger write
@pytest.mark.dag_runs(
    [EXAMPLE_DAGS / "exclusive_etl.py"],
    [{"dag_id": "exclusive_etl"}],
    env={"AIRFLOW__CORE__FERNET_KEY": "", "AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY": ""},
)
def test_without_any_key_the_first_produce_fails_naming_both_ways_to_set_one(dag_runs: Result) -> None:
    """Secure by default: no key and no allow_plaintext, so nothing is stored in plaintext."""
    result = dag_runs
    run = result.run

    assert run.states() == {"extract": "failed", "transform": "upstream_failed", "load": "upstream_failed"}, (
        result.tail()
    )
    kind, message = final_exception(run.log)
    assert kind == "exclusive_xcom.errors.ConfigurationError", (kind, message)
    assert message.startswith("no key configured to encrypt exclusive_xcom payloads"), message
    assert "[exclusive_xcom] secret_key" in message and "[core] fernet_key" in message
    assert "allow_plaintext = True" in message
    assert f"[dag='exclusive_etl' run='{run.run_id}' producer='extract' key='return_value'" in message
    assert run.xcoms("extract") == [] and result.ledger_rows() == [], "nothing written"


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.dag_runs(
    [EXAMPLE_DAGS / "exclusive_etl.py"],
    [{"dag_id": "exclusive_etl"}],
    env={
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY": "",
        "AIRFLOW__EXCLUSIVE_XCOM__ALLOW_PLAINTEXT": "True",
    },
)
def test_allow_plaintext_stores_unencrypted_payloads_as_asked(dag_runs: Result) -> None:
    result = dag_runs
    run = result.run

    assert run.states() == {"extract": "success", "transform": "success", "load": "success"}, result.tail()
    with sa.create_engine(result.ledger_url).connect() as conn:
        stored = conn.execute(sa.text("SELECT name FROM exclusive_xcom_meta ORDER BY name")).scalars().all()
    assert stored == ["schema_version", "signing_secret"], "only a plaintext ledger keeps its own signing key"


PASSWORD = "s3cret-pw"
#: Every way a ledger URL with a password in it can fail a task (cf. the CLI's in test_cli.py).
LEAKY_URLS = {
    "driver missing (postgres://)": f"postgres://postgres:{PASSWORD}@127.0.0.1/test",
    "driver missing (mysql://)": f"mysql://root:{PASSWORD}@127.0.0.1/test",
    "not a URL": f"bogus:://u:{PASSWORD}@x",
    "unreachable PostgreSQL": f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test",
    "unreachable MariaDB": f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/test",
}


@pytest.mark.parametrize("backend", ["postgres"])
def test_no_password_reaches_a_task_log(airflow: Airflow, ledger_url: str) -> None:
    """The whole Airflow output (every task log, as the UI shows them) of runs whose ledger URL
    carries a password: five that fail on it, one that works (trust auth ignores the password)."""
    working = sa.make_url(ledger_url).set(password=PASSWORD).render_as_string(hide_password=False)
    urls = [*LEAKY_URLS.values(), working]
    runs = [{"dag_id": "exclusive_etl", "env": {LEDGER_URL: url}} for url in urls]
    result = airflow.test([EXAMPLE_DAGS / "exclusive_etl.py"], runs, None)

    assert len(result.runs) == len(urls), result.tail()
    for what, run in zip(LEAKY_URLS, result.runs, strict=False):
        assert run.states()["extract"] == "failed", (what, result.tail())
        kind, message = final_exception(run.log)
        assert kind.startswith("exclusive_xcom.errors."), (what, kind, message)
        assert ":***@" in message, (what, message)
    assert result.runs[-1].state == "success", result.tail()
    leaks = [line for line in result.output.splitlines() if PASSWORD in line]
    assert not leaks, "the password was printed:\n" + "\n".join(leaks[:20])


TYPO_DAG = """
import pendulum
from airflow.sdk import dag, task_group
from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def typo():
    @task_group
    def grp():
        @exclusive_task(consumers=["laod"])
        def produce() -> dict:
            return {}

        @exclusive_task
        def load() -> None: ...

        produce() >> load()

    grp()


typo()
"""


def test_a_consumer_name_of_no_task_is_a_dag_import_error(tmp_path: Path) -> None:
    """Airflow's DagBag runs the package's cluster policy (the ``airflow.policy`` entry point)
    once the DAG is complete: a misspelt consumer never wired as an argument is still caught
    when the DAG is parsed."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "typo.py").write_text(TYPO_DAG)
    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(dags)!r})\n"
        "print('RESULT', sorted(bag.dags), list(bag.import_errors.values()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=airflow_env(tmp_path, dags),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.startswith("RESULT [] ["), result  # the DAG was not bagged: an import error instead
    assert (
        "consumers=['laod'] of 'grp.produce' names no task of DAG 'typo' (close: 'grp.load'); "
        "use the consumer's task id, or its id within this task's group"
    ) in result, result
