"""exclusive_xcom under a real CeleryExecutor whose workers are separate hosts.

One deployment serves every case (module scope: starting Airflow costs about 20 s), built
by ``example_dags/_celery_cluster.py``: api-server, scheduler and dag-processor on this
machine, metadata DB, Celery result backend and claim ledger in fresh PostgreSQL
databases, Redis as the broker, a moto S3 server, and three Celery workers, each in a
network and UTS namespace of its own (hostnames ``alpha``, ``bravo``, ``mallory``), with
its own ``AIRFLOW_HOME`` and its own copy of the DAGs, reaching every server through a
TCP forwarder at its veth gateway. ``alpha`` and ``bravo`` share the ``secret_key``;
``mallory`` has another. Payloads over 4 kB are offloaded, Fernet-encrypted, to
``s3://objstore@<bucket>/offload`` through Airflow's ObjectStoragePath and the Amazon
provider; the bucket is versioned, so a deleted blob still shows that it was written.

Each case checks, from the ledger and from Airflow's task instances, that every item was
delivered exactly once and that nothing is left claimed, and prints where each task ran.
The SIGKILL case runs last (it leaves one worker host dead). Teardown stops every
process (by session, by namespace and by ``AIRFLOW_HOME``), removes the namespaces, veths,
Redis keys and databases, and fails if anything survived.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import _celery_cluster as cc
import pytest
import sqlalchemy as sa

from tests.conftest import require, require_server
from tests.support import SERVERS, throwaway_database

pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.timeout(300)]

DAGS = Path(__file__).parent / "dags" / "dist_cases.py"
THRESHOLD = 4096  # bytes: the chain's payloads (~100 kB) go to S3, single items stay inline
LEASE = 10  # seconds: the SIGKILLed worker's claims are free again long before its retry starts
RUN_DEADLINE = 120.0
REPORT: list[str] = []


def note(line: str) -> None:
    print(line)
    REPORT.append(line)


def _redis_problem() -> str | None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=3)
    try:
        client.ping()
        return None
    except Exception as exc:
        return f"Redis at 127.0.0.1:6379 unreachable: {exc}"
    finally:
        client.close()


class Deployment:
    """The cluster, plus engines on its metadata DB and ledger, and how to run a DAG on it."""

    def __init__(self, cluster: cc.Cluster, metadata_url: str, ledger_url: str) -> None:
        self.cluster = cluster
        self.meta = sa.create_engine(metadata_url, poolclass=sa.NullPool)
        self.ledger = sa.create_engine(ledger_url, poolclass=sa.NullPool)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.meta.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def trigger(self, dag_id: str) -> str:
        run_id = f"{dag_id}_{secrets.token_hex(3)}"
        self.cluster.cli("dags", "trigger", dag_id, "--run-id", run_id)
        return run_id

    def state(self, run_id: str) -> str | None:
        found = self.rows("SELECT state FROM dag_run WHERE run_id = :r", r=run_id)
        return str(found[0].state) if found and found[0].state in ("success", "failed") else None

    def run(self, dag_id: str) -> tuple[str, str, float]:
        """Trigger ``dag_id``, wait for its run to end: run id, final state, trigger-to-end seconds."""
        started = time.monotonic()
        run_id = self.trigger(dag_id)
        state = self.cluster.wait(f"run {run_id}", lambda: self.state(run_id), RUN_DEADLINE)
        return run_id, state, time.monotonic() - started

    def tis(self, run_id: str) -> dict[tuple[str, int], Any]:
        sql = (
            "SELECT task_id, map_index, state, try_number, hostname, queue, start_date, end_date "
            "FROM task_instance WHERE run_id = :r"
        )
        return {(t.task_id, t.map_index): t for t in self.rows(sql, r=run_id)}

    def returned(self, run_id: str, task_id: str) -> dict[int, Any]:
        sql = "SELECT map_index, value FROM xcom WHERE run_id = :r AND task_id = :t AND key = 'return_value'"
        return {m: v if not isinstance(v, str) else json.loads(v) for m, v in self.rows(sql, r=run_id, t=task_id)}

    def items(self, run_id: str) -> list[Any]:
        with self.ledger.connect() as conn:
            sql = (
                "SELECT task_id, seq, state, owner_task_id, owner_map_index, owner_try, owner_host, payload_uri "
                "FROM exclusive_xcom_item WHERE run_id = :r"
            )
            return list(conn.execute(sa.text(sql), {"r": run_id}))

    def where(self, run_id: str) -> str:
        tis = sorted(self.tis(run_id).values(), key=lambda t: t.start_date or datetime.max.replace(tzinfo=timezone.utc))
        shown = [f"{t.task_id}{'' if t.map_index < 0 else f'[{t.map_index}]'}@{t.hostname or '-'}" for t in tis]
        return ", ".join(shown)

    def logs(self) -> str:
        return self.cluster.logs()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_server("postgres")
    require(_redis_problem())
    require(cc.problem())
    started = time.monotonic()
    root = tmp_path_factory.mktemp("celery_hosts")
    env = {
        "AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES": str(THRESHOLD),
        "AIRFLOW__EXCLUSIVE_XCOM__LEASE_SECONDS": str(LEASE),
    }
    with (
        throwaway_database(SERVERS["postgres"], prefix="meta") as metadata_url,
        throwaway_database(SERVERS["postgres"], prefix="ledger") as ledger_url,
    ):
        cluster = cc.Cluster(root, metadata_url, ledger_url, [DAGS], strangers=("mallory",), env=env)
        deployment = Deployment(cluster, metadata_url, ledger_url)
        try:
            cluster.start(lambda step: note(f"  start: {step}"))
            cluster.wait(
                "the DAGs to be serialized",
                lambda: deployment.rows("SELECT count(*) AS n FROM serialized_dag")[0].n == 4,
                90,
            )
            note(f"  start: DAGs serialized ({time.monotonic() - started:.1f} s after the fixture began)")
            yield deployment
        finally:
            deployment.meta.dispose()
            deployment.ledger.dispose()
            mark = time.monotonic()
            survivors = cluster.stop()
            remains = cluster.remains()
            note(f"  teardown {time.monotonic() - mark:.1f} s; the tier took {time.monotonic() - started:.1f} s")
            print("\n[distributed tier]\n" + "\n".join(REPORT))
            assert not survivors, f"processes outlived SIGKILL: {survivors}"
            assert not remains, f"left behind: {remains}"


def _blobs(cluster: cc.Cluster) -> tuple[set[str], set[str], set[str]]:
    """Keys under the offload prefix: ever written, still there, deleted (a delete marker on top)."""
    listing = cluster.s3().list_object_versions(Bucket=cluster.bucket, Prefix=cluster.prefix)
    written = {v["Key"] for v in listing.get("Versions", [])}
    deleted = {m["Key"] for m in listing.get("DeleteMarkers", []) if m["IsLatest"]}
    return written, written - deleted, deleted


def _rows_digest(rows: list[dict[str, Any]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_a_chain_hands_off_across_hosts_through_s3(deployment: Deployment) -> None:
    cluster = deployment.cluster
    run_id, state, seconds = deployment.run("dist_chain")
    tis = deployment.tis(run_id)
    returned = {t: deployment.returned(run_id, t) for t in ("extract", "transform", "load")}
    items = deployment.items(run_id)
    written, remaining, deleted = _blobs(cluster)
    note(f"chain: {state} in {seconds:.1f} s (trigger to end); ran {deployment.where(run_id)}")
    note(f"  S3: {len(written)} blob(s) written, {len(deleted)} deleted once consumed, {len(remaining)} left")
    logs = deployment.logs

    assert state == "success", f"{[tuple(t[:5]) for t in tis.values()]}{logs()}"
    hosts = {task: tis[task, -1].hostname for task in ("extract", "transform", "load")}
    assert hosts == {"extract": "alpha.exx.test", "transform": "bravo.exx.test", "load": "alpha.exx.test"}, hosts
    assert hosts["extract"] != hosts["transform"] != hosts["load"], "each hop must cross hosts"
    # Only the last task's value is an ordinary XCom; the others left handles, nothing else.
    assert returned["extract"] == returned["transform"] == {}, returned
    # What load received is what transform derived from what extract sent (the DAG's formulas).
    derived = [{"i": i, "len": len(f"row {i:05d} " * 4), "pad": "x" * 40} for i in range(2000)]
    expected = {"n": 2000, "sha": _rows_digest(derived), "sent": _rows_digest(derived), "host": "alpha.exx.test"}
    assert returned["load"][-1] == expected, returned["load"]
    # The ledger: each output once, consumed by its one consumer, on the host that ran it.
    assert sorted((i.task_id, i.state, i.owner_task_id) for i in items) == [
        ("extract", "consumed", "transform"),
        ("transform", "consumed", "load"),
    ], items
    assert {i.owner_task_id: i.owner_host for i in items} == {"transform": hosts["transform"], "load": hosts["load"]}
    # Both payloads went through S3 and were deleted as their consumer succeeded.
    assert len(written) == 2 and not remaining and deleted == written, (written, remaining, deleted)
    # Airflow's XCom table never saw a row.
    xcom = " ".join(str(v) for (v,) in deployment.rows("SELECT value FROM xcom WHERE run_id = :r", r=run_id))
    assert "row 00001" not in xcom and "pad" not in xcom


def test_purge_sweeps_orphaned_blobs_on_s3(deployment: Deployment) -> None:
    """A blob whose row is gone (a producer that died between writing and committing) is an
    orphan; ``exclusive-xcom purge`` on a worker host finds it on S3 and deletes it."""
    cluster = deployment.cluster
    two_days_ago = int((datetime.now(timezone.utc) - timedelta(days=2)).timestamp() * 1000)
    orphan = f"{cluster.prefix}/dist_chain/orphaned/{two_days_ago}-{secrets.token_hex(8)}.blob"
    fresh = f"{cluster.prefix}/dist_chain/in_flight/{int(time.time() * 1000)}-{secrets.token_hex(8)}.blob"
    for key in (orphan, fresh):
        cluster.s3().put_object(Bucket=cluster.bucket, Key=key, Body=b"\x00xx1 not referenced by any row")
    script = str(Path(sys.executable).parent / "exclusive-xcom")
    proc = cluster.run_on(cluster.hosts["bravo"], script, "purge", "--older-than", "0s", "--json")
    _, remaining, _ = _blobs(cluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)  # Airflow's own log lines go to stderr
    note(f"purge on bravo: {report}")
    assert report["orphans"] == 1, proc.stdout
    assert remaining == {fresh}, f"the orphan must go, the blob younger than the grace period stay: {remaining}"
    cluster.s3().delete_object(Bucket=cluster.bucket, Key=fresh)


def test_5000_items_are_drained_by_4_mapped_workers_on_both_hosts(deployment: Deployment) -> None:
    run_id, state, seconds = deployment.run("dist_items")
    tis = deployment.tis(run_id)
    returned = deployment.returned(run_id, "charge")
    items = deployment.items(run_id)
    logs = deployment.logs
    consumed = [i for i in items if i.state == "consumed"]
    per_worker = Counter(i.owner_map_index for i in consumed)
    host_of = {m: tis["charge", m].hostname for m in range(4)}
    per_host = Counter(host_of[i.owner_map_index] for i in consumed)
    note(f"items: {state} in {seconds:.1f} s (trigger to end); ran {deployment.where(run_id)}")
    note(f"  split per mapped worker {dict(sorted(per_worker.items()))}; per Celery host {dict(per_host)}")

    assert state == "success", f"{[tuple(t[:5]) for t in tis.values()]}{logs()}"
    assert {k: t.state for k, t in tis.items()} == {
        ("enqueue", -1): "success",
        **{("charge", m): "success" for m in range(4)},
    }
    assert len(items) == 5000 and sorted(i.seq for i in items) == list(range(5000))
    assert Counter(i.state for i in items) == {"consumed": 5000}, "an item is left ready or claimed"
    assert {i.owner_task_id for i in items} == {"charge"}
    # Each mapped worker's own account matches the ledger's, and the sums add up: none doubled.
    assert {m: r["orders"] for m, r in returned.items()} == {m: per_worker.get(m, 0) for m in range(4)}
    assert sum(r["sum"] for r in returned.values()) == sum(range(5000))
    assert {m: r["host"] for m, r in returned.items()} == host_of, "task_instance.hostname is the worker's FQDN"
    assert {i.owner_host for i in consumed} == set(per_host)
    # Spread over both Celery hosts, and both drained items.
    assert set(host_of.values()) == {"alpha.exx.test", "bravo.exx.test"}, host_of
    assert per_host["alpha.exx.test"] > 0 and per_host["bravo.exx.test"] > 0, per_host


def test_a_worker_with_another_secret_key_is_refused_and_reads_nothing(deployment: Deployment) -> None:
    cluster = deployment.cluster
    run_id, state, seconds = deployment.run("dist_wrong_key")
    tis = deployment.tis(run_id)
    items = deployment.items(run_id)
    peek_log = cluster.task_logs("dist_wrong_key", "peek")
    note(f"wrong key: run {state} in {seconds:.1f} s; ran {deployment.where(run_id)}")
    logs = deployment.logs

    assert tis["peek", -1].hostname == "mallory.exx.test" and tis["peek", -1].state == "failed", logs()
    assert set(peek_log) == {"mallory"}, peek_log.keys()
    text = peek_log["mallory"]
    assert "only for a key holder" not in text, "the stranger saw the payload"
    errors = [
        f"{e['exc_type']}: {e['exc_value']}"
        for line in text.splitlines()
        if line.startswith("{") and "error_detail" in line
        for e in json.loads(line)["error_detail"]
    ]
    note(f"  mallory's error: {errors}")
    assert len(errors) == 1 and errors[0].startswith("PayloadError: exclusive_xcom handle signature mismatch"), errors
    assert "producer and consumer use different secret_key settings" in errors[0], errors
    assert deployment.returned(run_id, "peek") == {}
    # The item went, once, to the consumer with the right key; nothing is left claimed.
    assert tis["take", -1].state == "success" and tis["take", -1].hostname == "bravo.exx.test", logs()
    assert deployment.returned(run_id, "take")[-1] == {"secret": "only for a key holder", "host": "bravo.exx.test"}
    assert [(i.state, i.owner_task_id) for i in items] == [("consumed", "take")], items


def test_a_sigkilled_worker_host_loses_nothing_and_doubles_nothing(deployment: Deployment) -> None:
    cluster = deployment.cluster
    started = time.monotonic()
    run_id = deployment.trigger("dist_crash")

    def draining() -> str | None:
        ti = deployment.tis(run_id).get(("drain", -1))
        states = Counter(i.state for i in deployment.items(run_id))
        if ti is None or ti.state != "running" or not ti.hostname:
            return None
        return str(ti.hostname) if states["consumed"] >= 20 and states["claimed"] > 0 else None

    victim_fqdn = cluster.wait("drain to hold claims", draining, RUN_DEADLINE)
    victim = victim_fqdn.split(".")[0]
    survivor = ({"alpha", "bravo"} - {victim}).pop()
    held = Counter(i.state for i in deployment.items(run_id))
    killed_at = datetime.now(timezone.utc)
    pids = cluster.kill_host(victim)
    note(f"crash: SIGKILLed {len(pids)} processes of {victim} while drain held {held['claimed']} claim(s)")
    state = cluster.wait(f"run {run_id}", lambda: deployment.state(run_id), RUN_DEADLINE)
    seconds = time.monotonic() - started
    tis = deployment.tis(run_id)
    tries = deployment.rows(
        "SELECT try_number, hostname, state, start_date, end_date FROM task_instance_history "
        "WHERE run_id = :r AND task_id = 'drain' ORDER BY try_number",
        r=run_id,
    )
    items = deployment.items(run_id)
    lines = []
    for name in ("alpha", "bravo"):
        log = cluster.hosts[name].home / f"processed-{run_id}.log"
        lines += [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []
    processed = Counter(int(order) for _, order, _ in lines)
    redone = sum(n - 1 for n in processed.values())
    drain = tis["drain", -1]
    retry_after = (drain.start_date - killed_at).total_seconds()
    note(
        f"  run {state} {seconds:.1f} s after trigger; drain try 1 on {tries[0].hostname if tries else '?'} "
        f"({tries[0].state if tries else '?'}), try {drain.try_number} on {drain.hostname} began "
        f"{retry_after:.1f} s after the kill (heartbeat timeout 20 s + retry delay 1 s; lease {LEASE} s)"
    )
    note(
        f"  {len(processed)} distinct items processed, {redone} processed twice (the batch in hand); "
        f"ledger {dict(Counter(i.state for i in items))}, consumed by try {dict(Counter(i.owner_try for i in items))}"
    )
    # How the dead try's batch came back: its retry took it back (same task instance), or
    # another consumer took it over once its lease expired; the claim log line says which.
    claims = [
        json.loads(line)["event"]
        for line in cluster.task_logs("dist_crash", "drain").get(survivor, "").splitlines()
        if line.startswith("{") and "exclusive_xcom: claimed" in line and f"/{run_id}/" in line
    ]
    recovered = [c.split(": ", 2)[-1] for c in claims if "taken back" in c or "taken over" in c]
    note(f"  the dead try's claims: {recovered}")
    logs = deployment.logs

    assert state == "success", f"{[tuple(t[:5]) for t in tis.values()]}{logs()}"
    assert recovered, f"no claim of the retry took anything back or over: {claims}"
    assert [(t.try_number, t.hostname) for t in tries] == [(1, victim_fqdn)], tries
    assert drain.try_number == 2 and drain.hostname == f"{survivor}.exx.test", drain
    assert Counter(i.state for i in items) == {"consumed": 400}, "an item is left ready or claimed"
    assert sorted(i.seq for i in items) == list(range(400))
    assert set(processed) == set(range(400)), "an item was lost"
    assert redone <= 20, f"{redone} items processed twice: more than the one batch the victim held"
    assert {host for try_, _, host in lines if try_ == "1"} <= {victim_fqdn}
    assert {host for try_, _, host in lines if try_ == "2"} == {f"{survivor}.exx.test"}
    # The retry's own account: what it processed, the batch it took back included.
    assert deployment.returned(run_id, "drain")[-1]["orders"] == sum(1 for try_, *_ in lines if try_ == "2")
