"""Running Airflow's processes for a demo or a test, and stopping every one of them.

Shared by the Celery cluster (``_celery_cluster.py``: the demo's ``--executor celery`` and
``tests/distributed``) and the LocalExecutor deployment of ``tests/scheduler``; it imports
no test code, so the demo can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def airflow(args: Iterable[str], *, env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    """``airflow <args>`` to completion in its own session; its output, or an error with it."""
    args = list(args)
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{output[-4000:]}")
    return output


def wait_for(
    what: str,
    check: Callable[[], Any],
    deadline: float,
    *,
    alive: Callable[[], None],
    logs: Callable[[], str],
    every: float = 0.5,
) -> Any:
    """Poll ``check()`` until it returns something truthy (``alive()`` raises if a service died);
    on timeout a TimeoutError carrying the logs' tails."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        alive()
        try:
            if value := check():
                return value
        except Exception as exc:  # not up yet (connection refused, table missing, ...)
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {deadline:.0f} s waiting for {what} (last error: {last}){logs()}")


def find(sessions: Collection[int], homes: Collection[str], pids: Collection[int] = ()) -> list[psutil.Process]:
    """Every live process in one of ``sessions`` (each service was started with
    ``start_new_session``; task processes get process groups of their own but stay in the
    session), among ``pids``, or with one of ``homes`` as ``AIRFLOW_HOME`` (in case one
    called ``setsid``). Airflow renames its processes with ``setproctitle``, which overwrites
    most processes' ``/proc/<pid>/environ``, so the environment alone would miss them."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; its parent (or init) reaps it
            if proc.pid in pids or os.getsid(proc.pid) in sessions or proc.environ().get("AIRFLOW_HOME") in homes:
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def stop(
    procs: Iterable[subprocess.Popen[bytes]], leftovers: Callable[[], list[psutil.Process]], grace: float
) -> list[str]:
    """SIGTERM each service's process group (while its leader, our child, is not reaped, so the
    group id cannot have been reused), SIGKILL after ``grace`` seconds, then SIGKILL whatever
    ``leftovers()`` still finds (task processes, executor workers). Returns what outlived it."""
    procs = list(procs)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signum)
        deadline = time.monotonic() + (grace if signum == signal.SIGTERM else 10)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    for leftover in leftovers():
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    _, alive = psutil.wait_procs(leftovers(), timeout=10)
    survivors = []
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            survivors.append(f"{leftover.pid}: {' '.join(leftover.cmdline())}")
    return survivors
