"""Run real Airflow (``dag.test()``) in a subprocess with its own ``AIRFLOW_HOME``.

Starting Airflow costs about seven seconds; a ``dag.test()`` run in a started Airflow
costs a fraction of one. So the tests say which runs they need, and one Airflow process
serves every test of a database that shares the process-wide settings (a *profile*, e.g.
``[core] xcom_backend``): a test marks itself ``@pytest.mark.dag_runs(files, runs, env=…,
profile=…)`` and its ``dag_runs`` fixture hands it a :class:`Result` of its own runs.
Each test still has its own ledger database and its own offload folder, put in place for
its runs only (see :mod:`driver`), so the tests cannot see each other's items. A test that
must act between two Airflow starts, or needs a process of its own, uses :class:`Airflow`.

The subprocess is :mod:`driver`; its report is parsed into :class:`Result`, and every
failed expectation shows the tail of the Airflow log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import drop_ledger_database, new_ledger_database
from tests.support import airflow_env, new_airflow_home

from .driver import LEDGER_URL, RESULT_MARKER, RUN_END, RUN_START

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
TEST_DAGS = HERE / "dags"
EXAMPLE_DAGS = HERE.parents[1] / "example_dags"
START_TIMEOUT = 120  # seconds for an Airflow process to start and report ...
RUN_TIMEOUT = 30  # ... plus this much per run
XCOM_BACKEND = {"AIRFLOW__CORE__XCOM_BACKEND": "exclusive_xcom.backend.ExclusiveXComBackend"}
PROFILES: dict[str, dict[str, str]] = {  # environment read once per Airflow process
    "plain": {},
    "xcom_backend": XCOM_BACKEND,
}


def _tail(text: str, lines: int = 120) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Run:
    """One ``dag.test()`` run as the metadata DB recorded it, and its part of the log."""

    dag_id: str
    run_id: str
    state: str
    conf: dict[str, Any] | None
    tis: list[dict[str, Any]]
    xcom: list[dict[str, Any]]
    log: str
    ledger: list[dict[str, Any]] | None = None  # the ledger's rows right after the run (payloads as lengths)

    def states(self) -> dict[str, str]:
        """``task_id`` (``task_id[i]`` for mapped instances) -> state."""
        return {
            t["task_id"] if t["map_index"] < 0 else f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.tis
        }

    def xcoms(self, task_id: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
        return [x for x in self.xcom if task_id in (None, x["task_id"]) and key in (None, x["key"])]

    def returned(self, task_id: str) -> dict[int, Any]:
        """``task_id``'s return values by map index (-1 when not mapped)."""
        return {x["map_index"]: x["value"] for x in self.xcoms(task_id, "return_value")}

    def task_log(self, task_id: str) -> str:
        """The part of the log where ``task_id`` ran."""
        return self.log.split(f"starting task_id={task_id} ", 1)[1].split("[DAG TEST] end task", 1)[0]


@dataclass
class Result:
    """What the driver reported of one test's runs, and the whole Airflow output."""

    output: str
    runs: list[Run] = field(default_factory=list)
    dag_runs: list[dict[str, Any]] = field(default_factory=list)
    ledger_url: str = ""
    workdir: Path = Path()  # the test's own folder: its offload folder is workdir / "offload"
    home: Path = Path()  # the Airflow home the runs were done in (shared by a batch)

    def tail(self, lines: int = 120) -> str:
        return f"\n--- last {lines} lines of the Airflow output ---\n{_tail(self.output, lines)}"

    @property
    def run(self) -> Run:
        assert len(self.runs) == 1, self.tail()
        return self.runs[0]

    def ledger_rows(self) -> list[dict[str, Any]]:
        """Every row of this test's ledger now."""
        return ledger_rows(self.ledger_url)

    @property
    def metadata_url(self) -> str:
        """Airflow's metadata DB the runs were recorded in (a batch's runs share it)."""
        return f"sqlite:///{self.home / 'airflow.db'}"


def run_driver(home: Path, files: Sequence[Path], runs: list[dict[str, Any]], env: Mapping[str, str]) -> Result:
    """One Airflow process in ``home`` doing ``runs`` in order; every run's report, or a failure."""
    for source in files:
        target = home / "dags" / source.name
        if not target.exists():
            target.write_bytes(source.read_bytes())
    spec = home / "e2e_spec.json"
    spec.write_text(json.dumps({"files": [str(home / "dags" / f.name) for f in files], "runs": runs}))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec)],
        env=dict(env),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=START_TIMEOUT + RUN_TIMEOUT * len(runs),
    )
    (home / "e2e_output.log").write_text(proc.stdout)
    result = Result(proc.stdout)
    report = next(
        (json.loads(line[len(RESULT_MARKER) :]) for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)),
        None,
    )
    assert proc.returncode == 0 and report is not None, f"the driver failed ({proc.returncode}){result.tail()}"
    assert report["error"] is None, f"the driver failed:\n{report['error']}{result.tail()}"
    result.dag_runs = report["dag_runs"]
    for number, run in enumerate(report["runs"]):
        assert run["error"] is None, f"dag.test() of {run['dag_id']} raised:\n{run['error']}{result.tail()}"
        del run["error"]
        result.runs.append(Run(log=_section(proc.stdout, number), **run))
    return result


def _section(output: str, number: int) -> str:
    start, end = RUN_START.format(number), RUN_END.format(number)
    return output.split(start, 1)[1].split(end, 1)[0]


class Airflow:
    """One test's own Airflow home, for tests that need a process (or two) of their own."""

    def __init__(self, home: Path, template_db: Path) -> None:
        self.home = new_airflow_home(home, template_db)

    def test(
        self,
        dag_files: list[Path],
        runs: list[dict[str, Any]],
        ledger_url: str | None,
        env: dict[str, str] | None = None,
    ) -> Result:
        """Copy ``dag_files`` into the dags folder and ``dag.test()`` each of ``runs`` in one process.

        A run is ``{"dag_id": ..., "conf": {...}}`` or ``{"dag_id": ..., "conf_from_triggered": dag_id}``
        (the conf that a TriggerDagRunOperator passed to the newest run of ``dag_id``). ``env`` adds
        environment variables to the Airflow process (e.g. ``AIRFLOW__CORE__XCOM_BACKEND``, which
        Airflow reads once, at import).
        """
        process_env = airflow_env(self.home, ledger_url=ledger_url)
        process_env.update(env or {})
        result = run_driver(self.home, dag_files, runs, process_env)
        result.ledger_url, result.workdir, result.home = ledger_url or "", self.home, self.home
        return result


# -- shared processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one test asks of Airflow (from its ``dag_runs`` mark): files, runs in order, environment."""

    files: tuple[Path, ...]
    runs: tuple[dict[str, Any], ...]
    env: tuple[tuple[str, str], ...]  # for its runs only, over its own ledger and offload folder
    profile: str

    @classmethod
    def of(cls, item: pytest.Item) -> Plan | None:
        mark = item.get_closest_marker("dag_runs")
        if mark is None:
            return None
        files, runs = mark.args
        profile = mark.kwargs.get("profile", "plain")
        assert profile in PROFILES, f"{item.nodeid}: unknown profile {profile!r}; known: {sorted(PROFILES)}"
        return cls(tuple(files), tuple(runs), tuple(sorted(mark.kwargs.get("env", {}).items())), profile)

    def batch(self, item: pytest.Item) -> str:
        """The name of the Airflow process ``item`` shares (also its pytest-xdist group)."""
        return f"e2e-{backend_of(item)}-{self.profile}"


def backend_of(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    assert callspec is not None and "backend" in callspec.params, f"{item.nodeid}: dag_runs tests take a backend"
    return str(callspec.params["backend"])


def batch_of(item: pytest.Item) -> str | None:
    """The name of the Airflow process ``item`` shares (also its pytest-xdist group), or None."""
    plan = Plan.of(item)
    return plan.batch(item) if plan else None


class Batches:
    """One Airflow process per batch (database and profile), started when a test first needs it."""

    def __init__(self, items: list[pytest.Item], root: Path, template_db: Path) -> None:
        self.items, self.root, self.template_db = items, root, template_db
        self.results: dict[str, Result | BaseException] = {}
        self.served: set[str] = set()
        self.ledgers: list[str] = []

    def result(self, item: pytest.Item) -> Result:
        if item.nodeid not in self.results:
            self._run(batch_of(item) or "")
        self.served.add(item.nodeid)
        outcome = self.results[item.nodeid]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        for url in self.ledgers:
            drop_ledger_database(url)
        if os.environ.get("PYTEST_XDIST_WORKER") and (unserved := sorted(set(self.results) - self.served)):
            warnings.warn(  # their runs were done here and again on another worker: correct, but paid twice
                f"{len(unserved)} e2e case(s) of a shared Airflow process ran on another pytest-xdist worker "
                f"(e.g. {unserved[0]}): run with --dist loadgroup, and a pytest that xdist can group under",
                stacklevel=1,
            )

    def _run(self, batch: str) -> None:
        """Every selected test of ``batch`` gets its ledger and folder; their runs go in one process."""
        members = [(item, plan) for item in self.items if (plan := Plan.of(item)) and plan.batch(item) == batch]
        home = new_airflow_home(self.root / batch, self.template_db)
        files: dict[str, Path] = {}
        runs: list[dict[str, Any]] = []
        spans: dict[str, tuple[int, int, str, Path]] = {}
        for item, plan in members:
            workdir = home / "tests" / re.sub(r"[^\w.-]+", "_", item.name)
            workdir.mkdir(parents=True)
            ledger = new_ledger_database(backend_of(item), workdir)
            self.ledgers.append(ledger)
            env = {
                LEDGER_URL: ledger,
                "AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH": f"file://{workdir / 'offload'}",
                **dict(plan.env),
            }
            files.update({f.name: f for f in plan.files})
            spans[item.nodeid] = (len(runs), len(runs) + len(plan.runs), ledger, workdir)
            runs.extend({**run, "env": env} for run in plan.runs)
        profile = PROFILES[members[0][1].profile]
        try:
            shared = run_driver(home, list(files.values()), runs, {**airflow_env(home), **profile})
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            self.results.update(dict.fromkeys(spans, exc))
            return
        for nodeid, (start, end, ledger, workdir) in spans.items():
            self.results[nodeid] = Result(shared.output, shared.runs[start:end], shared.dag_runs, ledger, workdir, home)


def ledger_rows(url: str) -> list[dict[str, Any]]:
    """Every row of the ledger's item table, in insertion order (read with a throwaway engine)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM exclusive_xcom_item ORDER BY id")).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()
