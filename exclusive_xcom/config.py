"""``[exclusive_xcom]`` options and how they become a ledger.

Options are read through Airflow's configuration, so ``AIRFLOW__EXCLUSIVE_XCOM__<OPTION>``
environment variables work as for any Airflow setting. The ledger database is, in order:
``sql_alchemy_conn``, the Airflow connection ``conn_id``, or an SQLite file under
``$AIRFLOW_HOME``. What a process builds from the options (engine, keys, codec) is
:mod:`exclusive_xcom.wiring`'s.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from exclusive_xcom.errors import ConfigurationError, ItemRef

SECTION = "exclusive_xcom"

#: option -> (type, default, description); also the provider's "config" section.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "sql_alchemy_conn": ("string", "", "SQLAlchemy URL of the claim ledger database."),
    "conn_id": ("string", "", "Airflow connection (Postgres or MySQL) of the ledger, if no URL is set."),
    "lease_seconds": ("integer", "300", "How long a claim lives without a heartbeat before others may take it."),
    "offload_threshold_bytes": ("integer", "1048576", "Payloads above this size go to object storage."),
    "offload_path": (
        "string",
        "",
        "ObjectStoragePath URI for offloaded payloads (s3://conn_id@bucket/prefix, ...); "
        "default: file://$AIRFLOW_HOME/exclusive_xcom_offload.",
    ),
    "secret_key": (
        "string",
        "",
        "Comma-separated keys, newest first: the first signs handles and encrypts payloads (Fernet), all "
        "are accepted to verify and decrypt. Default: [core] fernet_key; with neither, nothing is stored "
        "unless allow_plaintext is set.",
    ),
    "allow_plaintext": (
        "boolean",
        "False",
        "Without secret_key or [core] fernet_key, store payloads unencrypted (handles are then signed with a "
        "key kept in the ledger) instead of refusing to produce; with a key, also accept payloads stored "
        "unencrypted.",
    ),
    "retention": ("string", "7d", "How long consumed items are kept before purge deletes them (7d, 12h, ...)."),
    "expire_after": (
        "string",
        "",
        "If set, unconsumed items older than this (and not under a live claim) are deleted by purge too.",
    ),
    "teams": (
        "string",
        "",
        "Teams that must not see each other's items, as team: DAG-id patterns (fnmatch), separated by ';' "
        "(e.g. 'sales: sales_*, crm_*; hr: hr_*'). Every DAG that touches the ledger must match one; a "
        "producer and its consumers belong to one team. With PostgreSQL row-level security "
        "(exclusive-xcom db grant) each team's workers then see their team's rows only.",
    ),
    "unread_after": (
        "string",
        "1d",
        "Unconsumed items older than this are reported as unread, per producer (exclusive-xcom stats "
        "and ls --unread, the exclusive_xcom.unread_items gauges): a consumer someone forgot.",
    ),
    "base_xcom_backend": (
        "string",
        "",
        "With [core] xcom_backend = exclusive_xcom.backend.ExclusiveXComBackend: the backend every "
        "non-exclusive XCom is delegated to (e.g. airflow.providers.common.io.xcom.backend."
        "XComObjectStorageBackend); default: Airflow's BaseXCom.",
    ),
    "keep_consumed_payloads": (
        "boolean",
        "False",
        "Keep a consumed item's payload and blob until purge deletes the row, instead of deleting it at once.",
    ),
}

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "sqlite": "sqlite",
}


#: A team's name becomes part of row keys and of a PostgreSQL role name.
_TEAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,19}")


@dataclass(frozen=True)
class Teams:
    """``[exclusive_xcom] teams``: which team each DAG belongs to, by DAG-id patterns."""

    patterns: tuple[tuple[str, str], ...] = ()  # (team, pattern), first match wins

    def of(self, dag_id: str) -> str:
        """The team of ``dag_id`` ("" when no teams are configured)."""
        if not self.patterns:
            return ""
        for team, pattern in self.patterns:
            if fnmatch.fnmatchcase(dag_id, pattern):
                return team
        raise ConfigurationError(
            f"DAG {dag_id!r} matches no pattern of [{SECTION}] teams ({self}): add it to its team's patterns"
        )

    def check_together(self, producer_dag: str, consumer_dags: Iterable[str], ref: ItemRef) -> None:
        """A producer's consumers are in its team: another team's role could not read the rows."""
        team = self.of(producer_dag)
        for dag_id in consumer_dags:
            if (theirs := self.of(dag_id)) != team:
                raise ConfigurationError(
                    f"consumer DAG {dag_id!r} is in team {theirs!r}, the producer's DAG {producer_dag!r} in team "
                    f"{team!r}: with [{SECTION}] teams a producer and its consumers belong to one team",
                    ref,
                )

    def __str__(self) -> str:
        return "; ".join(f"{team}: {pattern}" for team, pattern in self.patterns)


def parse_teams(raw: str) -> Teams:
    """``sales: sales_*, crm_*; hr: hr_*``; anything else is refused by name."""
    patterns: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        team, colon, rest = (x.strip() for x in part.partition(":"))
        globs = [g.strip() for g in rest.split(",") if g.strip()]
        if not colon or not globs or not _TEAM_NAME.fullmatch(team):
            raise ConfigurationError(
                f"[{SECTION}] teams: expected 'team: pattern, pattern; team: pattern' with team names of "
                f"lowercase letters, digits and _ (at most 20, a letter first), got {part!r}"
            )
        patterns.extend((team, g) for g in globs)
    return Teams(tuple(patterns))


@dataclass(frozen=True)
class Settings:
    url: str
    lease_seconds: float = 300.0
    offload_threshold_bytes: int = 1 << 20
    offload_path: str = ""
    secret_key: str = ""
    fernet_key: str = ""
    retention: timedelta = timedelta(days=7)
    expire_after: timedelta | None = None
    unread_after: timedelta = timedelta(days=1)
    keep_consumed_payloads: bool = False
    allow_plaintext: bool = False
    teams: Teams = Teams()


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


def parse_duration(raw: str, source: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w``; anything else is refused by name."""
    match = re.fullmatch(r"(\d+)([smhdw])", raw.strip())
    if not match:
        raise ConfigurationError(f"{source}: expected a duration such as 7d, 12h, 30m, 45s or 2w, got {raw!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def format_duration(value: timedelta) -> str:
    """A spelling :func:`parse_duration` reads back, in the largest exact unit: ``7d``, ``90m``."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _flag(name: str) -> bool:
    raw = _option(name).lower() or OPTIONS[name][1].lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigurationError(f"[{SECTION}] {name} must be true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def load_settings() -> Settings:
    from airflow.configuration import conf

    expire_after = _option("expire_after")
    return Settings(
        url=ledger_url(),
        lease_seconds=_number("lease_seconds"),
        offload_threshold_bytes=int(_number("offload_threshold_bytes")),
        offload_path=_option("offload_path"),
        secret_key=_option("secret_key"),
        fernet_key=str(conf.get("core", "fernet_key", fallback="") or "").strip(),
        retention=parse_duration(_option("retention") or OPTIONS["retention"][1], f"[{SECTION}] retention"),
        expire_after=parse_duration(expire_after, f"[{SECTION}] expire_after") if expire_after else None,
        unread_after=parse_duration(_option("unread_after") or OPTIONS["unread_after"][1], f"[{SECTION}] unread_after"),
        keep_consumed_payloads=_flag("keep_consumed_payloads"),
        allow_plaintext=_flag("allow_plaintext"),
        teams=parse_teams(_option("teams")),
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
