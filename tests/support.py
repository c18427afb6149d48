"""Real servers, throwaway databases and throwaway Airflow homes, for the tests and the benchmarks.

Everything here starts from nothing and cleans up after itself: a database is created under
a random name on the server a URL names and dropped afterwards; an Airflow home is a folder
with a copy of one migrated SQLite metadata DB (migrating costs seconds, copying costs
milliseconds) and an environment that inherits none of the caller's ``AIRFLOW*`` settings.

Server URLs come from ``EXCLUSIVE_XCOM_TEST_POSTGRES_URL`` / ``EXCLUSIVE_XCOM_TEST_MYSQL_URL``
(defaults: the local services).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import sqlalchemy as sa

if TYPE_CHECKING:
    from exclusive_xcom.ledger import Ledger

SERVERS = {
    "postgres": os.environ.get("EXCLUSIVE_XCOM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("EXCLUSIVE_XCOM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ["sqlite", "postgres", "mysql"]
AIRFLOW_TIMEOUT = 240  # seconds for one `airflow db migrate`
_reachable: dict[str, str | None] = {}


# -- servers and throwaway databases -------------------------------------------------------


def server_problem(kind: str) -> str | None:
    """Why the server of ``kind`` cannot be used, or None if it answers (checked once per process)."""
    if kind not in _reachable:
        engine = sa.create_engine(SERVERS[kind], connect_args={"connect_timeout": 5}, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            _reachable[kind] = None
        except Exception as exc:  # any driver or network error means "not usable here"
            _reachable[kind] = f"{kind} server at {SERVERS[kind]} unreachable: {str(exc).splitlines()[0]}"
        finally:
            engine.dispose()
    return _reachable[kind]


def admin_engine(url: str) -> sa.Engine:
    """An autocommit engine on the server of ``url``, for creating and dropping databases."""
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


def create_database(server_url: str, prefix: str = "exx", settings: Mapping[str, str] | None = None) -> str:
    """A new, empty database ``<prefix>_<random>`` on the server of ``server_url``; its URL.

    ``settings`` (PostgreSQL only) become the new database's defaults for every session,
    e.g. ``{"synchronous_commit": "off"}``.
    """
    name = f"{prefix}_{secrets.token_hex(8)}"
    engine = admin_engine(server_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
            for key, value in (settings or {}).items():
                conn.exec_driver_sql(f"ALTER DATABASE {name} SET {key} = '{value}'")
    finally:
        engine.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, server_url: str) -> None:
    """Drop the database of ``url``, connected through ``server_url`` (one cannot drop the
    database one is connected to); on PostgreSQL even with sessions still connected to it."""
    from exclusive_xcom.ledger.engine import _engines

    for key in [k for k in _engines if k == url]:  # the process's cached ledger engine on it
        _engines.pop(key).dispose()
    parsed = sa.make_url(url)
    force = " WITH (FORCE)" if parsed.get_backend_name() == "postgresql" else ""
    engine = admin_engine(server_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {parsed.database}{force}")
    finally:
        engine.dispose()


@contextmanager
def throwaway_database(
    server_url: str, prefix: str = "exx", settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """:func:`create_database`, yield its URL, :func:`drop_database` whatever happened."""
    url = create_database(server_url, prefix, settings)
    try:
        yield url
    finally:
        drop_database(url, server_url)


# -- throwaway Airflow homes ---------------------------------------------------------------


def airflow_env(
    home: Path, dags_folder: Path | None = None, ledger_url: str | None = None, **extra: str
) -> dict[str, str]:
    """The environment of an Airflow whose everything lives in ``home``.

    Nothing is inherited from the caller's Airflow settings; the metadata DB is
    ``home/airflow.db``, offloaded payloads go under ``home/offload``, payloads are encrypted
    under a test key; ``ledger_url`` (if
    given) is the claim ledger; ``extra`` adds or overrides variables.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder or home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH=f"file://{home / 'offload'}",
        # Airflow 3.3 starts with no [core] fernet_key, and without a key nothing is produced.
        AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY="tests-secret-key",
    )
    if ledger_url is not None:
        env["AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN"] = ledger_url
    env.update(extra)
    return env


def migrate_metadata_db(home: Path) -> Path:
    """``airflow db migrate`` into a new home; the migrated SQLite file, to copy into others."""
    (home / "dags").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=AIRFLOW_TIMEOUT,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-120:])
        raise RuntimeError(f"airflow db migrate failed ({proc.returncode}):\n{tail}")
    return home / "airflow.db"


def new_airflow_home(home: Path, template_db: Path, dag_files: Sequence[Path] = ()) -> Path:
    """A home with a copy of the migrated ``template_db`` and ``dag_files`` in its dags folder."""
    (home / "dags").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db, home / "airflow.db")
    for source in dag_files:
        shutil.copyfile(source, home / "dags" / source.name)
    return home


# -- a PostgreSQL server of the tests' own -------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bindir() -> Path:
    """Where this machine's PostgreSQL server programs are: Debian's newest version, else pg_config's."""
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if installed:
        return installed[-1].parent
    found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
    return Path(found.strip())


class PrivatePostgres:
    """A PostgreSQL cluster of the tests' own, to restart and crash at will.

    ``initdb`` into a new folder, served on a free port of 127.0.0.1 (trust, user
    ``postgres``) for the length of a ``with`` block, which then stops it and deletes
    every file (:meth:`remove`). The shared server is
    never touched. PostgreSQL refuses to run as root, so under root the cluster belongs to
    the ``postgres`` user and every command runs as that user.
    """

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="exx_pg_"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def __enter__(self) -> PrivatePostgres:
        try:
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", timeout=120)
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()

    @property
    def url(self) -> str:
        """The server's ``postgres`` database (create test databases with :func:`create_database`)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def restart(self) -> None:
        """A clean restart (``-m fast``): sessions are cut, committed work stays."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start()

    def crash(self) -> None:
        """Stop without a checkpoint (``-m immediate``), then start: the server recovers from its WAL."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.start()

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def _pg(self, tool: str, *args: str, timeout: float = 60, check: bool = True) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-2000:]}")


class SentStatement(NamedTuple):
    """One statement a ledger sent: ``via`` "direct" (PostgreSQL's pinned connection,
    :mod:`exclusive_xcom.ledger.direct`) or "sqlalchemy", as the driver got it."""

    via: str
    sql: str
    params: Any


@contextmanager
def statements_sent(ledger: Ledger) -> Iterator[list[SentStatement]]:
    """Every statement ``ledger`` sends meanwhile, with its parameters: through SQLAlchemy,
    and on the pinned connection (compiled as it compiles them), in the order sent."""
    sent: list[SentStatement] = []

    def through_sqlalchemy(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append(SentStatement("sqlalchemy", statement, params))

    direct = ledger._direct
    if direct is not None:
        send = direct.send

        def recorded(bound: Any) -> Any:
            compiled = bound.statement.compile(dialect=ledger.engine.dialect)
            sent.append(SentStatement("direct", compiled.string, {**compiled.params, **bound.params}))
            return send(bound)

        direct.send = recorded  # type: ignore[method-assign]
    sa.event.listen(ledger.engine, "before_cursor_execute", through_sqlalchemy)
    try:
        yield sent
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", through_sqlalchemy)
        if direct is not None:
            del direct.send
