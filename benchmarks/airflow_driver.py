"""Subprocess of the Airflow-overhead case: time ``dag.test()`` of each DAG, alternating.

Run as ``python airflow_driver.py SPEC.json`` inside a prepared ``AIRFLOW_HOME``. The spec
names the DAG file, the DAG ids and how many rounds; round 0 is a warm-up (imports, first
connections) and is reported but marked. Each round runs every DAG once, the order
flipped every other round so neither always goes first. Prints one JSON line after
:data:`MARKER`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback

MARKER = "BENCH-RESULT "


def main(spec_file: str) -> int:
    with open(spec_file) as f:
        spec = json.load(f)
    report: dict = {"runs": [], "error": None}
    try:
        from airflow.sdk import DAG

        module_spec = importlib.util.spec_from_file_location("bench_chain", spec["dag_file"])
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        dags = {v.dag_id: v for v in vars(module).values() if isinstance(v, DAG)}
        for round_number in range(spec["rounds"] + 1):
            order = spec["dag_ids"] if round_number % 2 == 0 else list(reversed(spec["dag_ids"]))
            for dag_id in order:
                started = time.perf_counter()
                run = dags[dag_id].test()
                seconds = time.perf_counter() - started
                report["runs"].append(
                    {"dag_id": dag_id, "round": round_number, "seconds": seconds, "state": str(run.state)}
                )
    except Exception:
        report["error"] = traceback.format_exc()
    print(MARKER + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
