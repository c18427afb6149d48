"""The ledger is a layer of its own: it never imports Airflow, so it can be tested, benchmarked
and reused without it (``exclusive_xcom.ledger`` is handed an engine and knows nothing else).

Checked twice: at run time (a fresh interpreter imports the ledger and lists the modules it
loaded) and in the source (no import of ``airflow`` anywhere in the sub-package, also not
inside a function, where the run-time check could not see it).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import exclusive_xcom.ledger

LEDGER = Path(exclusive_xcom.ledger.__file__).parent


def test_importing_the_ledger_loads_no_airflow_module() -> None:
    code = (
        "import json, sys; import exclusive_xcom.ledger; "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == [], proc.stdout


def _imported_modules(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(), str(source))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_of_the_ledger_imports_airflow_even_lazily() -> None:
    sources = sorted(LEDGER.glob("*.py"))
    assert len(sources) >= 4, sources  # the sub-package was found
    offenders = {
        str(source.relative_to(LEDGER.parent)): sorted(
            n for n in _imported_modules(source) if n.split(".")[0] == "airflow"
        )
        for source in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_cli_and_maintenance_never_import_the_task_runtime() -> None:
    """They share the process's wiring (exclusive_xcom.wiring) with tasks, not what a task does."""
    package = LEDGER.parent
    for name in ("cli.py", "maintenance.py", "wiring.py", "config.py"):
        tree = ast.parse((package / name).read_text(), name)
        from_package = {
            f"exclusive_xcom.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "exclusive_xcom"
            for alias in node.names
        }
        assert "exclusive_xcom.runtime" not in _imported_modules(package / name) | from_package, name
