"""``[exclusive_xcom]`` options and how they become a ledger.

Options are read through Airflow's configuration, so ``AIRFLOW__EXCLUSIVE_XCOM__<OPTION>``
environment variables work as for any Airflow setting. The ledger database is, in order:
``sql_alchemy_conn``, the Airflow connection ``conn_id``, or an SQLite file under
``$AIRFLOW_HOME``. Each process builds one engine per URL and migrates the schema once,
so the claim path never checks the schema again.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.errors import ConfigurationError
from exclusive_xcom.ledger import Ledger, get_engine

SECTION = "exclusive_xcom"

#: option -> (type, default, description); also the provider's "config" section.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "sql_alchemy_conn": ("string", "", "SQLAlchemy URL of the claim ledger database."),
    "conn_id": ("string", "", "Airflow connection (Postgres or MySQL) of the ledger, if no URL is set."),
    "lease_seconds": ("integer", "300", "How long a claim lives without a heartbeat before others may take it."),
    "offload_threshold_bytes": ("integer", "1048576", "Payloads above this size go to object storage."),
    "offload_path": ("string", "", "ObjectStoragePath URI for offloaded payloads."),
    "secret_key": ("string", "", "Key that signs handles; default: a key kept in the ledger itself."),
}

_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "sqlite": "sqlite",
}


@dataclass(frozen=True)
class Settings:
    url: str
    lease_seconds: float
    offload_threshold_bytes: int
    offload_path: str
    secret_key: str


def _option(name: str) -> str:
    from airflow.configuration import conf

    return str(conf.get(SECTION, name, fallback=OPTIONS[name][1]) or "").strip()


def _number(name: str) -> float:
    raw = _option(name) or OPTIONS[name][1]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"[{SECTION}] {name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"[{SECTION}] {name} must be positive, got {raw!r}")
    return value


def load_settings() -> Settings:
    return Settings(
        url=ledger_url(),
        lease_seconds=_number("lease_seconds"),
        offload_threshold_bytes=int(_number("offload_threshold_bytes")),
        offload_path=_option("offload_path"),
        secret_key=_option("secret_key"),
    )


def ledger_url() -> str:
    if url := _option("sql_alchemy_conn"):
        _check_url(url, f"[{SECTION}] sql_alchemy_conn")
        return url
    if conn_id := _option("conn_id"):
        return url_from_connection(conn_id)
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    os.makedirs(home, exist_ok=True)
    return f"sqlite:///{os.path.join(os.path.abspath(home), 'exclusive_xcom.db')}"


def url_from_connection(conn_id: str) -> str:
    """Build the URL from the connection's fields (``Connection.get_uri()``'s ``postgres://``
    scheme is refused by SQLAlchemy 2), with the driver this package installs."""
    from airflow.sdk import BaseHook

    try:
        conn: Any = BaseHook.get_connection(conn_id)
    except Exception as exc:  # Airflow raises its own not-found types, which vary by context.
        raise ConfigurationError(f"[{SECTION}] conn_id={conn_id!r}: connection not found ({exc})") from exc
    driver = _DRIVERS.get((conn.conn_type or "").lower())
    if driver is None:
        raise ConfigurationError(
            f"[{SECTION}] conn_id={conn_id!r} has type {conn.conn_type!r}; use a postgres or mysql connection"
        )
    url = sa.URL.create(
        driver,
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
    )
    return url.render_as_string(hide_password=False)


def _check_url(url: str, source: str) -> None:
    try:
        sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(f"{source} is not a SQLAlchemy URL: {url!r} ({exc})") from exc


_ready: set[str] = set()
_ready_lock = threading.Lock()


def get_ledger(settings: Settings | None = None) -> Ledger:
    """The ledger of this configuration, its schema made or upgraded once per process."""
    settings = settings or load_settings()
    try:
        engine = get_engine(settings.url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(f"cannot open the claim ledger at {settings.url!r}: {exc}") from exc
    ledger = Ledger(engine, lease_seconds=settings.lease_seconds)
    with _ready_lock:
        if settings.url not in _ready:
            ledger.migrate()
            _ready.add(settings.url)
    return ledger


def signing_secret(settings: Settings, ledger: Ledger) -> bytes:
    return settings.secret_key.encode() if settings.secret_key else ledger.secret()
