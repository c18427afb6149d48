"""Metrics reach a real StatsD listener through Airflow's stats facade, and never break a task.

The UDP tests run the library (or the ``exclusive-xcom stats`` command, against a ledger on
each database) in a fresh Python process configured only through ``AIRFLOW__METRICS__*``
variables, as a worker or ``dag.test()`` would be, and read the datagrams on a socket
bound to 127.0.0.1. The in-process tests swap the facade's backend
for a recorder (restored by monkeypatch) to check tags, the lazy initialization and that
failures are swallowed.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk._shared.observability.metrics import stats as stats_impl
from airflow.sdk.observability.metrics import stats_utils

from exclusive_xcom import metrics
from exclusive_xcom.ledger import ITEMS, Ledger, Output, Production, Written, create_engine

ROOT = Path(__file__).resolve().parents[2]

CALLS = """
from exclusive_xcom import metrics
metrics.claimed(5, 0.25, dag_id="etl", task_id="group.load", mode="items")
metrics.claimed(0, 0.5, dag_id="etl", task_id="group.load", mode="items")
metrics.consumed(3, dag_id="etl", task_id="group.load")
metrics.released(2, dag_id="etl", task_id="group.load")
metrics.produced(4, dag_id="etl", task_id="extract", offloaded_bytes=2048)
metrics.produced(1, dag_id="etl", task_id="extract")
print("calls returned")
"""

EXPECTED = [
    "airflow.exclusive_xcom.claimed:5|c",
    "airflow.exclusive_xcom.claim_latency:250.000000|ms",
    "airflow.exclusive_xcom.claim_latency:500.000000|ms",
    "airflow.exclusive_xcom.consumed:3|c",
    "airflow.exclusive_xcom.released:2|c",
    "airflow.exclusive_xcom.produced:4|c",
    "airflow.exclusive_xcom.offloaded_bytes:2048|c",
    "airflow.exclusive_xcom.produced:1|c",
]


class Listener:
    """A StatsD server stand-in: one UDP socket on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def lines(self, *, quiet: float = 0.5, deadline: float = 10.0) -> list[str]:
        """Every metric line received until the socket stays silent for ``quiet`` seconds."""
        received: list[str] = []
        end = time.monotonic() + deadline
        self.sock.settimeout(quiet)
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            received.extend(data.decode("ascii").splitlines())  # a statsd pipeline joins lines with \n
        return received


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.sock.close()


def run_python(code: str, tmp_path: Path, *args: str, **metrics_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``args`` in a new interpreter whose only metrics settings are ``metrics_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__METRICS__")}
    env.update(
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path}/airflow.db",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        **{f"AIRFLOW__METRICS__{k.upper()}": v for k, v in metrics_env.items()},
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def statsd_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "statsd_on": "True",
        "statsd_host": "127.0.0.1",
        "statsd_port": str(port),
        "statsd_prefix": "airflow",
        **extra,
    }


def ours(lines: list[str]) -> list[str]:
    """Drop Airflow's own metrics (e.g. ``serde.load_serializers``) sent by the same process."""
    return [line for line in lines if line.startswith("airflow.exclusive_xcom.")]


def test_statsd_listener_receives_counters_and_latency(listener: Listener, tmp_path: Path) -> None:
    proc = run_python(CALLS, tmp_path, **statsd_env(listener.port))
    assert "calls returned" in proc.stdout
    assert ours(listener.lines()) == EXPECTED


def test_tags_reach_statsd_when_influxdb_tags_are_on(listener: Listener, tmp_path: Path) -> None:
    run_python(CALLS, tmp_path, **statsd_env(listener.port, statsd_influxdb_enabled="True"))
    received = ours(listener.lines())
    assert received[:2] == [
        "airflow.exclusive_xcom.claimed,dag_id=etl,task_id=group.load,mode=items:5|c",
        "airflow.exclusive_xcom.claim_latency,dag_id=etl,task_id=group.load,mode=items:250.000000|ms",
    ]
    assert "airflow.exclusive_xcom.offloaded_bytes,dag_id=etl,task_id=extract:2048|c" in received
    assert len(received) == len(EXPECTED)


def test_initializes_the_facade_from_config_when_no_one_did(listener: Listener, tmp_path: Path) -> None:
    code = """
    from airflow.sdk._shared.observability.metrics import stats as impl
    from exclusive_xcom import metrics

    impl._factory = None  # as in a process that imported nothing that initializes the facade
    impl._backend = None
    inits = []
    real_initialize = impl.initialize
    impl.initialize = lambda **kw: (inits.append(kw), real_initialize(**kw))

    metrics.consumed(7, dag_id="etl", task_id="load")
    metrics.released(1, dag_id="etl", task_id="load")
    print("initialized", len(inits), impl._factory.__name__)
    """
    proc = run_python(code, tmp_path, **statsd_env(listener.port))
    assert "initialized 1 get_statsd_logger" in proc.stdout
    assert ours(listener.lines()) == ["airflow.exclusive_xcom.consumed:7|c", "airflow.exclusive_xcom.released:1|c"]


def test_metrics_off_sends_nothing_and_raises_nothing(listener: Listener, tmp_path: Path) -> None:
    proc = run_python(CALLS, tmp_path, **statsd_env(listener.port, statsd_on="False"))
    assert "calls returned" in proc.stdout
    assert listener.lines() == []


def test_unresolvable_statsd_host_does_not_raise(listener: Listener, tmp_path: Path) -> None:
    proc = run_python(CALLS, tmp_path, **statsd_env(listener.port, statsd_host="statsd.invalid"))
    assert "calls returned" in proc.stdout
    assert "Could not configure StatsClient" in proc.stdout + proc.stderr  # Airflow fell back to NoStatsLogger
    assert listener.lines() == []


UNREAD_CALLS = """
import sys
from exclusive_xcom.cli import main
sys.exit(main(["--url", sys.argv[1], "stats", "--unread-after", "1h"]))
"""


def _ago(seconds: float) -> float:
    return time.time() - seconds


def _seed_unread(ledger_url: str) -> None:
    """``etl``'s ``grp.extract`` wrote 2 items two hours ago, ``report`` 1 item an hour and a
    half ago, ``fresh`` 1 item now; none was read."""
    engine = create_engine(ledger_url)
    for task_id, age in (("grp.extract", 7200), ("report", 5400), ("fresh", 0)):
        ledger = Ledger(engine, clock=functools.partial(_ago, age))
        ledger.migrate()
        items = [b"a", b"b"] if task_id == "grp.extract" else [b"a"]
        ledger.produce(Production(Written(Output("etl", "r", task_id), 1, ITEMS, ("etl/load",)), items))
    engine.dispose()


def test_stats_sends_the_unread_gauges_per_producer_and_in_total(
    listener: Listener, tmp_path: Path, ledger_url: str
) -> None:
    """Per producer by name (plain StatsD drops tags) and by tags; the total always; a producer
    with items waiting, none of them too long, gets 0."""
    _seed_unread(ledger_url)
    run_python(UNREAD_CALLS, tmp_path, ledger_url, **statsd_env(listener.port))
    assert ours(listener.lines()) == [
        "airflow.exclusive_xcom.unread_items:2|g",
        "airflow.exclusive_xcom.unread_items.etl.grp__extract:2|g",
        "airflow.exclusive_xcom.unread_items:1|g",
        "airflow.exclusive_xcom.unread_items.etl.report:1|g",
        "airflow.exclusive_xcom.unread_items:0|g",
        "airflow.exclusive_xcom.unread_items.etl.fresh:0|g",
        "airflow.exclusive_xcom.unread_items_total:3|g",
    ]


def test_unread_gauges_carry_their_tags_when_influxdb_tags_are_on(listener: Listener, tmp_path: Path) -> None:
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"  # the gauges are the same whatever the database
    _seed_unread(ledger_url)
    run_python(UNREAD_CALLS, tmp_path, ledger_url, **statsd_env(listener.port, statsd_influxdb_enabled="True"))
    received = ours(listener.lines())
    assert received[0] == "airflow.exclusive_xcom.unread_items,dag_id=etl,task_id=grp.extract:2|g", received
    assert received[-1] == "airflow.exclusive_xcom.unread_items_total:3|g", received


def test_an_empty_ledger_reports_a_total_of_zero(listener: Listener, tmp_path: Path) -> None:
    """So an alert on the total clears once the items are read or purged."""
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    Ledger(create_engine(ledger_url)).migrate()
    run_python(UNREAD_CALLS, tmp_path, ledger_url, **statsd_env(listener.port))
    assert ours(listener.lines()) == ["airflow.exclusive_xcom.unread_items_total:0|g"]


class Recorder:
    """A stats backend that keeps what the facade hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, dict[str, Any]]] = []

    def incr(self, stat: str, count: int = 1, rate: float = 1, *, tags: dict[str, Any] | None = None) -> None:
        self.calls.append(("incr", stat, count, tags or {}))

    def timing(self, stat: str, dt: Any, *, tags: dict[str, Any] | None = None) -> None:
        self.calls.append(("timing", stat, dt, tags or {}))


@pytest.fixture
def facade(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Lets a test replace the facade's factory; every global it touches is restored afterwards."""
    monkeypatch.setattr(stats_impl, "_factory", stats_impl._factory)
    monkeypatch.setattr(stats_impl, "_backend", None)
    monkeypatch.setattr(stats_impl, "_export_legacy_names", stats_impl._export_legacy_names)
    monkeypatch.setattr(metrics, "_init_tried", False)
    yield monkeypatch


def test_an_existing_initialization_is_kept_and_gets_the_tags(facade: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    facade.setattr(stats_impl, "_factory", lambda: recorder)
    facade.setattr(stats_utils, "get_stats_factory", lambda: pytest.fail("must not re-initialize"))

    metrics.claimed(2, 0.004, dag_id="d", task_id="t", mode="one")
    metrics.produced(1, dag_id="d", task_id="p", offloaded_bytes=10)

    tags = {"dag_id": "d", "task_id": "t", "mode": "one"}
    assert recorder.calls == [
        ("incr", "exclusive_xcom.claimed", 2, tags),
        ("timing", "exclusive_xcom.claim_latency", 4.0, tags),
        ("incr", "exclusive_xcom.produced", 1, {"dag_id": "d", "task_id": "p"}),
        ("incr", "exclusive_xcom.offloaded_bytes", 10, {"dag_id": "d", "task_id": "p"}),
    ]
    for _, stat, _, _ in recorder.calls:
        assert stats_impl.normalize_name_for_stats(stat, log_warning=False) == stat


def test_lazy_initialization_happens_once(facade: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    factories: list[object] = []

    def get_stats_factory() -> object:
        factories.append(object())
        return lambda: recorder

    facade.setattr(stats_impl, "_factory", None)
    facade.setattr(stats_utils, "get_stats_factory", get_stats_factory)

    metrics.consumed(1, dag_id="d", task_id="t")
    metrics.released(1, dag_id="d", task_id="t")

    assert len(factories) == 1
    assert [c[1] for c in recorder.calls] == ["exclusive_xcom.consumed", "exclusive_xcom.released"]


class Exploding:
    def incr(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("backend down")

    def timing(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("backend down")

    def gauge(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("backend down")


def _raise() -> Any:
    raise RuntimeError("cannot build the client")


@pytest.mark.parametrize("factory", [Exploding, _raise], ids=["backend-raises", "factory-raises"])
def test_a_failing_backend_never_raises(
    facade: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, factory: Any
) -> None:
    facade.setattr(stats_impl, "_factory", factory)
    with caplog.at_level(logging.DEBUG, logger="exclusive_xcom.metrics"):
        metrics.claimed(1, 0.1, dag_id="d", task_id="t", mode="each")
        metrics.consumed(1, dag_id="d", task_id="t")
        metrics.released(1, dag_id="d", task_id="t")
        metrics.produced(1, dag_id="d", task_id="t", offloaded_bytes=1)
        metrics.unread([("d", "t", 3)])
    failures = [r for r in caplog.records if r.name == "exclusive_xcom.metrics"]
    assert [r.levelno for r in failures] == [logging.DEBUG] * 5
    assert all("could not report" in r.getMessage() for r in failures)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)
