"""``example_dags/demo.py`` says what is true: it runs each example it offers, refuses the
others with the reason, labels only handles as handles, shows no size for a deleted
payload and summarizes a large ledger.

Each case runs the demo as a user would, in a subprocess (its own throwaway Airflow home
under the test's folder), and reads what it printed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .harness import EXAMPLE_DAGS

DEMO = EXAMPLE_DAGS / "demo.py"
HANDLE_KEY = "__exclusive__handle"


def demo(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        env={**clean, "TMPDIR": str(tmp_path), **env},  # the throwaway home goes under the test's folder
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def section(out: str, title: str) -> list[str]:
    """The rows of the table printed under the line starting with ``title`` (header dropped)."""
    lines = out.split(f"\n{title}", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.strip() for line in lines[2:]]


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_demo_offers_each_example_or_says_why_it_cannot_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("exclusive_xcom_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    examples = {p.stem for p in EXAMPLE_DAGS.glob("exclusive_*.py")}
    assert examples == set(module.SCENARIOS) | set(module.CANNOT_RUN), "every example is offered or refused"

    refused = demo(tmp_path, "--dag", "exclusive_asset_handoff")
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert refused.stderr.splitlines()[-1] == (
        "demo.py: error: exclusive_asset_handoff cannot run in this demo: its consumer DAG is started by an "
        "asset event, which dag.test() cannot do; tests/scheduler runs it under a real scheduler"
    )
    unknown = demo(tmp_path, "--dag", "nope")
    assert unknown.returncode == 2 and "no example 'nope'; choose one of: exclusive_etl, " in unknown.stderr
    assert not list(tmp_path.glob("exclusive_xcom_demo_*")), "refused before making a home"
    assert "``" not in ok(demo(tmp_path, "--help"))


def test_the_demo_calls_only_handles_handles_and_gives_no_size_for_a_deleted_payload(tmp_path: Path) -> None:
    out = ok(demo(tmp_path))
    xcoms = section(out, "Airflow's xcom table")
    assert len(xcoms) == 3, out
    for row in xcoms:
        assert (HANDLE_KEY in row) == ("handle (names an output in the ledger, carries no data)" in row), row
    (load,) = [r for r in xcoms if r.split()[1] == "load"]
    assert load.split()[3:] == ["return_value", "1", "ordinary", "XCom:", "5"], load  # the bare consumer's result

    ledger = section(out, "The claim ledger")
    assert [r.split()[6] for r in ledger] == ["consumed", "consumed"], out
    assert [r.split()[9] for r in ledger] == ["-", "-"], "consumed payloads were deleted: no size to show"
    assert not list(tmp_path.glob("exclusive_xcom_demo_*")), "the throwaway home is removed"


@pytest.mark.slow
def test_the_demo_runs_the_cross_dag_handoff(tmp_path: Path) -> None:
    out = ok(demo(tmp_path, "--dag", "exclusive_handoff"))
    runs = [r.split() for r in section(out, "DAG runs:")]
    assert [(r[0], r[2], r[3]) for r in runs] == [
        ("exclusive_handoff_parent", "test", "success"),
        ("exclusive_handoff_child", "operator", "queued"),  # the trigger's run: nothing here starts it
        ("exclusive_handoff_child", "test", "success"),  # the demo's, with that run's conf
    ], out
    (item,) = [r.split() for r in section(out, "The claim ledger")]
    assert item[1:3] + item[6:8] == ["exclusive_handoff_parent", "export", "consumed", "ingest"], out


@pytest.mark.slow
def test_the_demo_runs_the_maintenance_dag_after_something_to_purge(tmp_path: Path) -> None:
    out = ok(demo(tmp_path, "--dag", "exclusive_maintenance"))
    assert [r.split()[0] for r in section(out, "DAG runs:")] == ["exclusive_etl", "exclusive_xcom_maintenance"]
    purged = [r for r in section(out, "Airflow's xcom table") if r.split()[1:4] == ["purge", "-1", "return_value"]]
    assert len(purged) == 1 and '{"rows": 2, "blobs": 0, "orphans": 0, "dry_run": false}' in purged[0], out
    assert section(out, "The claim ledger") == ["(none)"], "the ETL run's two consumed items were purged"


@pytest.mark.slow
def test_the_demo_summarizes_a_large_ledger(tmp_path: Path) -> None:
    out = ok(demo(tmp_path, "--dag", "exclusive_parallel_queue", EXCLUSIVE_PARALLEL_QUEUE_ORDERS="500"))
    title = "The claim ledger (exclusive_xcom.db): who produced what, who consumed it, when: 500 items; "
    assert f"\n{title}by DAG, producer and state:\n" in out, out
    assert [r.split() for r in section(out, title)] == [["exclusive_parallel_queue", "enqueue", "consumed", "500"]]
    first = section(out, "The first 20 of them")
    assert [int(r.split()[0]) for r in first[:-1]] == list(range(1, 21)) and first[-1] == "... and 480 more", out
    assert len(out.splitlines()) < 90, out
