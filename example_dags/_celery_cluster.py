"""A CeleryExecutor Airflow on one machine whose Celery workers are separate hosts.

Used by ``python example_dags/demo.py --executor celery`` and by ``tests/distributed``
(which import it as ``_celery_cluster``, with this folder on ``sys.path``); it imports
nothing from the tests. Everything it starts, it stops (:meth:`Cluster.stop`), also after a
failure half-way through :meth:`Cluster.start`.

What runs where:

* the *control plane* in the machine's own network namespace: ``airflow api-server``,
  ``scheduler`` and ``dag-processor`` (one ``AIRFLOW_HOME``), a moto S3 server on a free
  port of 127.0.0.1, and one TCP forwarder process (see :func:`forward`);
* every worker host in a network namespace of its own (``ip netns`` and a veth pair, a /30
  of 10.x.y.z), with a UTS namespace of its own (``unshare --uts`` and ``hostname``) and an
  ``/etc/hosts`` of its own (``/etc/netns/<ns>/hosts``), so ``socket.getfqdn()`` and
  ``task_instance.hostname`` differ per host, its own ``AIRFLOW_HOME`` with its own copy of
  the DAG files, running ``airflow celery worker`` on its own queue plus the default one.

Inside a namespace 127.0.0.1 is the namespace's own loopback, and the machine's
PostgreSQL and Redis listen on 127.0.0.1 only, so the forwarder listens on each veth's
machine-side address and relays to 127.0.0.1: a worker host reaches PostgreSQL (metadata
DB, Celery result backend, claim ledger), Redis (Celery broker), the API server
(``[core] execution_api_server_url``) and S3 at its gateway address, as a real host
reaches real servers. Worker hosts share no configured directory: payloads over the
offload threshold go to ``s3://<conn_id>@<bucket>/<prefix>`` through Airflow's
``ObjectStoragePath`` and the Amazon provider. They do share the machine's filesystem
(the same virtualenv, and /tmp), its kernel and its PID space (so the caller can kill a
whole host).

Needs root (``ip netns``), ``ip`` and ``unshare`` (Debian's iproute2 and util-linux),
PostgreSQL and Redis, and the packages of the ``test`` extra (Celery and Amazon providers,
celery 5.6.x, moto[server], s3fs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from _processes import airflow, find, free_port, tail, wait_for
from _processes import stop as stop_processes

SERVICES = ("api-server", "scheduler", "dag-processor")
S3_CONN = "objstore"  # the Airflow connection id in the offload path: s3://objstore@bucket/prefix
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
#: Keys kombu keeps in a Redis broker database besides the queues and their bindings.
KOMBU_BOOKKEEPING = {b"unacked", b"unacked_index", b"unacked_mutex", b"_kombu.binding_deadlines"}


def problem() -> str | None:
    """Why this machine cannot run a cluster, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: iproute2, util-linux, hostname)"
    try:
        from importlib.metadata import version

        if tuple(int(p) for p in version("celery").split(".")[:2]) >= (5, 7):
            return (
                f"celery {version('celery')} is installed: 5.7.0 breaks apache-airflow-providers-celery 3.26.0 "
                "(cannot import name 'retry' from 'celery.backends.database'); pin celery>=5.6,<5.7"
            )
    except Exception as exc:  # not installed: said below
        del exc
    for module in ("airflow.providers.celery", "airflow.providers.amazon", "s3fs", "moto", "redis"):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} is not importable ({exc}): pip install -e '.[test]'"
    return None


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# -- the TCP forwarder (a process of its own) ---------------------------------------------------


def forward(routes: Sequence[tuple[str, int, str, int]]) -> None:
    """Relay every connection to ``listen_host:listen_port`` to ``host:port``, forever."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def relay(host: str, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        return handle

    async def main() -> None:
        servers = [await asyncio.start_server(relay(h, p), lh, lp) for lh, lp, h, p in routes]
        print(f"forwarding {len(servers)} routes", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


# -- hosts ----------------------------------------------------------------------------------------


@dataclass
class Host:
    """A Celery worker host: a network and UTS namespace, a veth pair, an AIRFLOW_HOME."""

    name: str  # its hostname, and the suffix of its Celery queue
    netns: str
    veth: str  # the machine-side end; the namespace's end is veth[:-1] + "n"
    gateway: str  # the machine-side address: where it reaches every server
    address: str  # its own address
    home: Path
    queue: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


DOMAIN = "exx.test"


def _subnet() -> str:
    """A 10.x.y.0/24 prefix no interface of this machine uses."""
    used = _run("ip", "-o", "-4", "addr", "show")
    for _ in range(100):
        prefix = f"10.{random.randint(180, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 for the worker hosts")


# -- the cluster ----------------------------------------------------------------------------------


class Cluster:
    """A CeleryExecutor Airflow: a control plane and worker hosts, started and stopped as one.

    ``metadata_url`` and ``ledger_url`` are (empty) PostgreSQL databases the caller owns;
    ``dag_files`` are copied into every home. ``workers`` name the hosts with the same
    ``secret_key``; ``strangers`` name hosts with a different one (to show the refusal).
    ``env`` is added on every host; ``EXX_QUEUE_<NAME>`` tells DAG files each host's queue.
    """

    def __init__(
        self,
        root: Path,
        metadata_url: str,
        ledger_url: str,
        dag_files: Sequence[Path],
        *,
        workers: Sequence[str] = ("alpha", "bravo"),
        strangers: Sequence[str] = (),
        concurrency: int = 2,
        redis_url: str = "redis://127.0.0.1:6379",
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.token = secrets.token_hex(3)
        self.metadata_url = sa.make_url(metadata_url)
        self.ledger_url = sa.make_url(ledger_url)
        self.dag_files = list(dag_files)
        self.concurrency = concurrency
        self.redis = sa.make_url(redis_url)
        self.redis_db = 0
        self.api_port = free_port()
        self.s3_port = free_port()
        self.bucket = f"exx-{self.token}"
        self.prefix = "offload"
        self.default_queue = f"exx_{self.token}"
        self.secret_key = _fernet_key()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.home = root / "control"
        self.extra_env = dict(env or {})
        self.shared = {
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        }
        prefix = ""
        self.hosts: dict[str, Host] = {}
        for index, name in enumerate([*workers, *strangers]):
            prefix = prefix or _subnet()
            self.hosts[name] = Host(
                name=name,
                netns=f"exx-{self.token}-{name}",
                veth=f"x{self.token}{index}r",
                gateway=f"{prefix}.{4 * index + 1}",
                address=f"{prefix}.{4 * index + 2}",
                home=root / name,
                queue=f"{self.default_queue}_{name}",
            )
        self.strangers = set(strangers)
        self.killed: set[str] = set()  # hosts whose processes were SIGKILLed on purpose

    # -- environments ---------------------------------------------------------------------------

    @property
    def offload_path(self) -> str:
        return f"s3://{S3_CONN}@{self.bucket}/{self.prefix}"

    def _env(self, home: Path, via: str, secret_key: str) -> dict[str, str]:
        """One host's environment: what every host shares, and its own addresses (``via``)."""

        def at(url: sa.URL, drivername: str | None = None) -> str:
            url = url.set(host=via) if drivername is None else url.set(host=via, drivername=drivername)
            return url.render_as_string(hide_password=False)

        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        queues = {f"EXX_QUEUE_{h.name.upper()}": h.queue for h in self.hosts.values()}
        s3 = (
            f'{{"conn_type": "aws", "login": "testing", "password": "testing", "extra": '
            f'{{"endpoint_url": "http://{via}:{self.s3_port}", "region_name": "us-east-1"}}}}'
        )
        env.update(
            AIRFLOW_HOME=str(home),
            AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__CORE__PARALLELISM="16",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://{via}:{self.api_port}/execution/",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=at(self.metadata_url),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=at(self.metadata_url, "postgresql+psycopg_async"),
            AIRFLOW__CELERY__BROKER_URL=self.redis.set(host=via, database=str(self.redis_db)).render_as_string(
                hide_password=False
            ),
            AIRFLOW__CELERY__RESULT_BACKEND="db+" + at(self.metadata_url),
            AIRFLOW__OPERATORS__DEFAULT_QUEUE=self.default_queue,
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.api_port),
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{self.api_port}",
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
            # crash recovery waits for this (300 s by default), then for the retry delay
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="2",
            AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL="2",
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN=at(self.ledger_url),
            AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH=self.offload_path,
            AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY=secret_key,
            **{f"AIRFLOW_CONN_{S3_CONN.upper()}": s3},
            PYTHONUNBUFFERED="1",
            **queues,
            **self.shared,
        )
        env.update(self.extra_env)
        return env

    @property
    def env(self) -> dict[str, str]:
        """The control plane's environment (the caller's CLI commands run with it)."""
        return self._env(self.home, "127.0.0.1", self.secret_key)

    # -- starting -------------------------------------------------------------------------------

    def start(self, on_step: Callable[[str], None] = lambda _: None) -> None:
        """Everything, in order; on any failure everything started so far is stopped."""
        try:
            self._start(on_step)
        except BaseException:
            self.stop()
            raise

    def _start(self, on_step: Callable[[str], None]) -> None:
        mark = time.monotonic()
        for home in [self.home, *(h.home for h in self.hosts.values())]:
            (home / "dags").mkdir(parents=True)
            for dag_file in self.dag_files:
                shutil.copyfile(dag_file, home / "dags" / dag_file.name)
        self.redis_db = self._pick_redis_db()
        self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)])
        for host in self.hosts.values():
            self._add_netns(host)
            secret = _fernet_key() if host.name in self.strangers else self.secret_key
            host.env = self._env(host.home, host.gateway, secret)
        targets = [
            (self.metadata_url.host or "127.0.0.1", self.metadata_url.port or 5432),
            (self.ledger_url.host or "127.0.0.1", self.ledger_url.port or 5432),
            (self.redis.host or "127.0.0.1", self.redis.port or 6379),
            ("127.0.0.1", self.api_port),
            ("127.0.0.1", self.s3_port),
        ]
        routes = sorted({(h.gateway, port, target, port) for h in self.hosts.values() for target, port in targets})
        spec = " ".join(f"{lh}:{lp}={th}:{tp}" for lh, lp, th, tp in routes)
        self._spawn("forwarder", [sys.executable, __file__, "forward", *spec.split()])
        on_step(f"namespaces, forwarder and S3 up ({time.monotonic() - mark:.1f} s)")

        # Migrating the metadata DB while the worker hosts start (they need no table to come up).
        migrate = subprocess.Popen(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=self.env,
            cwd=self.home,
            stdout=(self.home / "migrate.out").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs["migrate"] = migrate
        for host in self.hosts.values():
            self._start_worker(host)
        self._make_bucket()
        self.wait("airflow db migrate", lambda: migrate.poll() is not None, 180)
        assert migrate.returncode == 0, f"airflow db migrate failed:\n{tail(self.home / 'migrate.out', 80)}"
        del self.procs["migrate"]
        on_step(f"metadata DB migrated ({time.monotonic() - mark:.1f} s)")
        for service in SERVICES:
            args = ["--port", str(self.api_port), "--host", "127.0.0.1"] if service == "api-server" else []
            self._spawn(service, [sys.executable, "-m", "airflow", service, *args], home=self.home, env=self.env)
        self.wait("the API server", self._api_healthy, 120)
        for name in self.hosts:
            self.wait(f"the Celery worker on {name}", functools.partial(self._ready, name), 120)
        on_step(f"API server and {len(self.hosts)} Celery workers up ({time.monotonic() - mark:.1f} s)")

    def _spawn(
        self, name: str, command: list[str], home: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        home = home or self.root
        home.mkdir(parents=True, exist_ok=True)
        with (home / f"{name}.out").open("wb") as out:
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session and group, which stop() kills as a whole
            )
        self.procs[name] = proc
        return proc

    def _add_netns(self, host: Host) -> None:
        inner = host.veth[:-1] + "n"
        _run("ip", "netns", "add", host.netns)
        etc = Path("/etc/netns") / host.netns  # `ip netns exec` mounts these over /etc
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{host.address} {host.fqdn} {host.name}\n{host.gateway} airflow-gateway\n"
        )
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", host.netns)
        _run("ip", "addr", "add", f"{host.gateway}/30", "dev", host.veth)
        _run("ip", "link", "set", host.veth, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/30", "dev", inner)
        _run("ip", "-n", host.netns, "link", "set", inner, "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")

    def _start_worker(self, host: Host) -> None:
        queues = host.queue if host.name in self.strangers else f"{self.default_queue},{host.queue}"
        host.proc = self._spawn(
            host.name,
            [
                *self.in_host(host),
                sys.executable,
                "-m",
                "airflow",
                "celery",
                "worker",
                "-H",
                host.name,
                "-q",
                queues,
                "-c",
                str(1 if host.name in self.strangers else self.concurrency),
                "--skip-serve-logs",
                "--without-mingle",
                "--without-gossip",
            ],
            home=host.home,
            env=host.env,
        )

    def in_host(self, host: Host) -> list[str]:
        """The command prefix that runs a program on ``host``: in its network namespace, in a
        UTS namespace of its own whose hostname is the host's name."""
        script = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "sh", "-c", script, host.name]

    def run_on(self, host: Host, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``command`` to completion on ``host``, with its environment."""
        return subprocess.run(
            [*self.in_host(host), *command],
            env=host.env,
            cwd=host.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def _pick_redis_db(self) -> int:
        """An empty Redis database (1-15), so this cluster's queues meet no one else's keys."""
        import redis

        for db in random.sample(range(1, 16), 15):
            client = redis.Redis(host=self.redis.host or "127.0.0.1", port=self.redis.port or 6379, db=db)
            try:
                if client.dbsize() == 0:
                    return db
            finally:
                client.close()
        raise RuntimeError("no empty Redis database among 1-15")

    def s3(self) -> Any:
        """A boto3 S3 client on the moto server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def _make_bucket(self) -> None:
        def made() -> bool:
            client = self.s3()
            client.create_bucket(Bucket=self.bucket)
            # versioned: a deleted blob leaves its versions and a delete marker, so a test can
            # tell "written, then deleted" from "never written"
            client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
            return True

        self.wait("the S3 server", made, 60)

    def _ready(self, name: str) -> bool:
        return b" ready." in self._out(name)

    def _api_healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/execution/health", timeout=5) as response:
            return bool(response.status == 200)

    # -- running --------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> str:
        """``airflow <args>`` on the control plane; its output, or an error with it."""
        return airflow(args, env=self.env, cwd=self.home, timeout=timeout)

    def wait(self, what: str, check: Callable[[], Any], deadline: float) -> Any:
        """Poll ``check()`` until truthy; on timeout an error with the logs' tails."""
        return wait_for(what, check, deadline, alive=self.check_alive, logs=self.logs)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name != "migrate" and name not in self.killed and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}{self.logs()}")

    def kill_host(self, name: str) -> list[int]:
        """SIGKILL every process of worker host ``name`` (a power cut); their pids."""
        host = self.hosts[name]
        self.killed.add(name)
        pids = self._netns_pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if host.proc is not None:
            host.proc.wait(timeout=10)
        return pids

    # -- what happened --------------------------------------------------------------------------

    def _out(self, name: str) -> bytes:
        home = self.hosts[name].home if name in self.hosts else self.home if name in SERVICES else self.root
        try:
            return (home / f"{name}.out").read_bytes()
        except OSError:
            return b""

    def logs(self, lines: int = 30) -> str:
        parts = []
        for name in ("s3", "forwarder", *SERVICES, *self.hosts):
            home = self.hosts[name].home if name in self.hosts else self.home if name in SERVICES else self.root
            parts.append(f"\n--- {name} (last {lines} lines) ---\n{tail(home / f'{name}.out', lines)}")
        for home in [self.home, *(h.home for h in self.hosts.values())]:
            for path in sorted((home / "logs").glob("dag_id=*/**/*.log")):
                parts.append(f"\n--- {home.name}: {path.relative_to(home / 'logs')} ---\n{tail(path, lines)}")
        return "".join(parts)

    def task_logs(self, dag_id: str, task_id: str) -> dict[str, str]:
        """Every host's log text of ``task_id`` (all runs and tries), by host name."""
        found = {}
        for host in self.hosts.values():
            paths = sorted((host.home / "logs").glob(f"dag_id={dag_id}/**/task_id={task_id}/**/*.log"))
            if paths:
                found[host.name] = "".join(p.read_text(errors="replace") for p in paths)
        return found

    # -- stopping -------------------------------------------------------------------------------

    def _netns_pids(self, host: Host) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def leftovers(self) -> list[psutil.Process]:
        """Every live process of this cluster: in a session one of ours leads, in one of the
        hosts' namespaces, or with one of our homes as ``AIRFLOW_HOME`` (see :func:`find`)."""
        homes = {str(self.home), *(str(h.home) for h in self.hosts.values())}
        in_netns = {pid for h in self.hosts.values() for pid in self._netns_pids(h)}
        return find({p.pid for p in self.procs.values()}, homes, in_netns)

    def stop(self) -> list[str]:
        """Stop every process, remove the namespaces, veths and Redis keys; what outlived SIGKILL."""
        survivors = stop_processes(self.procs.values(), self.leftovers, STOP_GRACE)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._clean_redis()
        return survivors

    def remains(self) -> list[str]:
        """Namespaces, links and processes of this cluster that still exist (should be none)."""
        netns = _run("ip", "netns", "list")
        links = _run("ip", "-o", "link", "show")
        found = [f"netns {h.netns}" for h in self.hosts.values() if h.netns in netns]
        found += [f"link {h.veth}" for h in self.hosts.values() if f" {h.veth}@" in links or f" {h.veth}:" in links]
        found += [f"process {p.pid}" for p in self.leftovers()]
        return found

    def _clean_redis(self) -> None:
        """Delete this cluster's keys (its queues carry its token); the DB was empty before."""
        import redis

        if not self.redis_db:
            return
        client = redis.Redis(host=self.redis.host or "127.0.0.1", port=self.redis.port or 6379, db=self.redis_db)
        try:
            ours = list(client.scan_iter(f"*{self.token}*"))
            if ours:
                client.delete(*ours)
            rest = list(client.scan_iter("*"))
            if rest and all(k in KOMBU_BOOKKEEPING or k.startswith(b"_kombu.binding.") for k in rest):
                client.delete(*rest)  # kombu's own keys, and nobody else's keys are here
        finally:
            client.close()


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@contextlib.contextmanager
def database(server_url: str, prefix: str) -> Iterator[str]:
    """A new PostgreSQL database on ``server_url``'s server, dropped afterwards; its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


if __name__ == "__main__" and sys.argv[1:2] == ["forward"]:
    parsed = []
    for spec in sys.argv[2:]:
        listen, target = spec.split("=")
        lh, lp = listen.rsplit(":", 1)
        th, tp = target.rsplit(":", 1)
        parsed.append((lh, int(lp), th, int(tp)))
    forward(parsed)
