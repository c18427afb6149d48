"""Run real Airflow (``dag.test()``) in a subprocess, each test in its own ``AIRFLOW_HOME``.

A migrated SQLite metadata DB is made once per session (``airflow db migrate``) and copied
into every test's home, so a test costs one Airflow start plus its runs. The test's ledger
is whatever URL it passes (normally the per-test ``ledger_url`` database). The subprocess
is :mod:`driver`; its report is parsed into :class:`Result`, and every failed expectation
shows the tail of the Airflow log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .driver import RESULT_MARKER, RUN_END, RUN_START

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
TEST_DAGS = HERE / "dags"
EXAMPLE_DAGS = HERE.parents[1] / "example_dags"
RUN_TIMEOUT = 240


def airflow_env(home: Path, dags_folder: Path, ledger_url: str | None = None) -> dict[str, str]:
    """The environment of one Airflow home: nothing inherited from the caller's Airflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH=f"file://{home / 'offload'}",
    )
    if ledger_url is not None:
        env["AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN"] = ledger_url
    return env


def migrate_metadata_db(home: Path) -> Path:
    """``airflow db migrate`` into ``home``; returns the SQLite file to copy into tests."""
    home.mkdir(parents=True, exist_ok=True)
    dags = home / "dags"
    dags.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home, dags),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed ({proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return home / "airflow.db"


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

    def states(self) -> dict[str, str]:
        """``task_id`` (``task_id[i]`` for mapped instances) -> state."""
        return {
            t["task_id"] if t["map_index"] < 0 else f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.tis
        }

    def xcoms(self, task_id: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
        return [x for x in self.xcom if task_id in (None, x["task_id"]) and key in (None, x["key"])]


@dataclass
class Result:
    """What the driver reported, and the whole Airflow output."""

    returncode: int
    output: str
    runs: list[Run] = field(default_factory=list)
    dag_runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def tail(self, lines: int = 120) -> str:
        return f"\n--- last {lines} lines of the Airflow output ---\n{_tail(self.output, lines)}"

    @property
    def run(self) -> Run:
        assert len(self.runs) == 1, self.tail()
        return self.runs[0]


class Airflow:
    """One test's Airflow: its own home, metadata DB (a copy of the migrated template) and dags folder."""

    def __init__(self, home: Path, template_db: Path) -> None:
        self.home = home
        self.dags = home / "dags"
        self.dags.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template_db, home / "airflow.db")

    def add_dag(self, source: Path) -> Path:
        target = self.dags / source.name
        shutil.copyfile(source, target)
        return target

    def env(self, ledger_url: str | None) -> dict[str, str]:
        return airflow_env(self.home, self.dags, ledger_url)

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
        files = [str(self.add_dag(f)) for f in dag_files]
        spec = self.home / "e2e_spec.json"
        spec.write_text(json.dumps({"files": files, "runs": runs}))
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(spec)],
            env={**self.env(ledger_url), **(env or {})},
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        (self.home / "e2e_output.log").write_text(proc.stdout)
        result = Result(proc.returncode, proc.stdout)
        report = next(
            (
                json.loads(line[len(RESULT_MARKER) :])
                for line in proc.stdout.splitlines()
                if line.startswith(RESULT_MARKER)
            ),
            None,
        )
        assert proc.returncode == 0 and report is not None, f"the driver failed ({proc.returncode}){result.tail()}"
        result.error = report["error"]
        assert result.error is None, f"the driver failed:\n{result.error}{result.tail()}"
        result.dag_runs = report["dag_runs"]
        result.runs = [Run(log=_section(proc.stdout, n), **r) for n, r in enumerate(report["runs"])]
        return result


def _section(output: str, number: int) -> str:
    start, end = RUN_START.format(number), RUN_END.format(number)
    return output.split(start, 1)[1].split(end, 1)[0]


def ledger_rows(url: str) -> list[dict[str, Any]]:
    """Every row of the ledger's item table, in insertion order (read with a throwaway engine)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM exclusive_xcom_item ORDER BY id")).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()
