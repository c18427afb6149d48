"""``python example_dags/demo.py --executor celery``: the one-command Celery set-up runs, says
where each task ran, and leaves nothing behind (its own xdist group: it starts a cluster of
its own, beside the tier's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import _celery_cluster as cc
import pytest

from tests.conftest import require

pytestmark = [pytest.mark.xdist_group("celery_demo"), pytest.mark.timeout(300)]

DEMO = Path(__file__).resolve().parents[2] / "example_dags" / "demo.py"


def test_the_celery_demo_runs_both_examples_on_both_hosts_and_cleans_up() -> None:
    require(cc.problem())
    done = subprocess.run(
        [sys.executable, str(DEMO), "--executor", "celery"], capture_output=True, text=True, timeout=280, check=False
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"exclusive_etl: success", out) and re.search(r"exclusive_parallel_queue: success", out), out
    ran_on = set(re.findall(r"\b(alpha|bravo)\.exx\.test\b", out.split("Where each task ran", 1)[1]))
    assert ran_on == {"alpha", "bravo"}, out
    consumed = re.findall(r"exclusive_parallel_queue\s+enqueue\s+charge\s+\S+\s+consumed\s+(\d+)", out)
    assert sum(map(int, consumed)) == 5000, out
    assert "stopped every process, removed the namespaces" in out, out
    prefix = re.search(r"netns (exx-[0-9a-f]+)-alpha", out)
    assert prefix, out
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix.group(1) not in namespaces, namespaces
