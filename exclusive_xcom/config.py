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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from exclusive_xcom.errors import ConfigurationError, ItemRef

SECTION = "exclusive_xcom"
T = TypeVar("T")
D = TypeVar("D", timedelta, "timedelta | None")


@dataclass(frozen=True)
class Option(Generic[T]):
    """One ``[exclusive_xcom]`` option, declared once: the provider's config metadata, the
    fallback when it is not set and :class:`Settings`' defaults all come from here."""

    name: str
    kind: str  # Airflow's option type: string, integer, float or boolean
    default: T
    description: str

    def airflow_default(self) -> str | None:
        """The default as Airflow's configuration writes it (None: no default)."""
        value: Any = self.default
        if value is None or value == "":
            return None
        if isinstance(value, timedelta):
            return format_duration(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


SQL_ALCHEMY_CONN = Option("sql_alchemy_conn", "string", "", "SQLAlchemy URL of the claim ledger database.")
CONN_ID = Option("conn_id", "string", "", "Airflow connection (Postgres or MySQL) of the ledger, if no URL is set.")
LEASE_SECONDS = Option(
    "lease_seconds", "float", 300.0, "How long a claim lives without a heartbeat before others may take it."
)
OFFLOAD_THRESHOLD_BYTES = Option(
    "offload_threshold_bytes", "integer", 1 << 20, "Payloads above this size go to object storage."
)
OFFLOAD_PATH = Option(
    "offload_path",
    "string",
    "",
    "ObjectStoragePath URI for offloaded payloads (s3://conn_id@bucket/prefix, ...); "
    "default: file://$AIRFLOW_HOME/exclusive_xcom_offload.",
)
SECRET_KEY = Option(
    "secret_key",
    "string",
    "",
    "Comma-separated keys, newest first: the first signs handles and encrypts payloads (Fernet), all "
    "are accepted to verify and decrypt. Default: [core] fernet_key; with neither, nothing is stored "
    "unless allow_plaintext is set.",
)
ALLOW_PLAINTEXT = Option(
    "allow_plaintext",
    "boolean",
    False,
    "Without secret_key or [core] fernet_key, store payloads unencrypted (handles are then signed with a "
    "key kept in the ledger) instead of refusing to produce; with a key, also accept payloads stored "
    "unencrypted.",
)
RETENTION = Option(
    "retention",
    "string",
    timedelta(days=7),
    "How long consumed items are kept before purge deletes them (7d, 12h, ...).",
)
EXPIRE_AFTER: Option[timedelta | None] = Option(
    "expire_after",
    "string",
    None,
    "If set, unconsumed items older than this (and not under a live claim) are deleted by purge too.",
)
TEAMS = Option(
    "teams",
    "string",
    "",
    "Teams that must not see each other's items, as team: DAG-id patterns (fnmatch), separated by ';' "
    "(e.g. 'sales: sales_*, crm_*; hr: hr_*'). Every DAG that touches the ledger must match one; a "
    "producer and its consumers belong to one team. With PostgreSQL row-level security "
    "(exclusive-xcom db grant) each team's workers then see their team's rows only.",
)
UNREAD_AFTER = Option(
    "unread_after",
    "string",
    timedelta(days=1),
    "Unconsumed items older than this are reported as unread, per producer (exclusive-xcom stats "
    "and ls --unread, the exclusive_xcom.unread_items gauges): a consumer someone forgot.",
)
BASE_XCOM_BACKEND = Option(
    "base_xcom_backend",
    "string",
    "",
    "With [core] xcom_backend = exclusive_xcom.backend.ExclusiveXComBackend: the backend every "
    "non-exclusive XCom is delegated to (e.g. airflow.providers.common.io.xcom.backend."
    "XComObjectStorageBackend); default: Airflow's BaseXCom.",
)
KEEP_CONSUMED_PAYLOADS = Option(
    "keep_consumed_payloads",
    "boolean",
    False,
    "Keep a consumed item's payload and blob until purge deletes the row, instead of deleting it at once.",
)

#: Every option by name, in the order the provider's metadata lists them.
OPTIONS: dict[str, Option[Any]] = {
    option.name: option
    for option in (
        SQL_ALCHEMY_CONN,
        CONN_ID,
        LEASE_SECONDS,
        OFFLOAD_THRESHOLD_BYTES,
        OFFLOAD_PATH,
        SECRET_KEY,
        ALLOW_PLAINTEXT,
        RETENTION,
        EXPIRE_AFTER,
        TEAMS,
        UNREAD_AFTER,
        BASE_XCOM_BACKEND,
        KEEP_CONSUMED_PAYLOADS,
    )
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
    """The options as values; a field left out takes the option's declared default."""

    url: str
    lease_seconds: float = LEASE_SECONDS.default
    offload_threshold_bytes: int = OFFLOAD_THRESHOLD_BYTES.default
    offload_path: str = OFFLOAD_PATH.default
    secret_key: str = SECRET_KEY.default
    fernet_key: str = ""
    retention: timedelta = RETENTION.default
    expire_after: timedelta | None = EXPIRE_AFTER.default
    unread_after: timedelta = UNREAD_AFTER.default
    keep_consumed_payloads: bool = KEEP_CONSUMED_PAYLOADS.default
    allow_plaintext: bool = ALLOW_PLAINTEXT.default
    teams: Teams = parse_teams(TEAMS.default)


def read_text(option: Option[Any]) -> str:
    """An option as written, stripped ("" when unset and without a default)."""
    from airflow.configuration import conf

    return str(conf.get(SECTION, option.name, fallback=option.airflow_default()) or "").strip()


def _typed(option: Option[T], read: Callable[..., T], expected: str) -> T:
    """``option`` through one of Airflow's typed getters; a bad value is one line naming it.
    A blank value means the default, as an unset one does."""
    from airflow.exceptions import AirflowConfigException

    if not read_text(option):
        return option.default
    try:
        return read(SECTION, option.name, fallback=option.default)
    except AirflowConfigException:
        raise ConfigurationError(f"[{SECTION}] {option.name} must be {expected}, got {read_text(option)!r}") from None


def _positive(option: Option[T], value: T) -> T:
    if isinstance(value, int | float) and value <= 0:
        raise ConfigurationError(f"[{SECTION}] {option.name} must be positive, got {read_text(option)!r}")
    return value


def _duration(option: Option[D]) -> D | timedelta:
    raw = read_text(option)
    return parse_duration(raw, f"[{SECTION}] {option.name}") if raw else option.default


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


def load_settings() -> Settings:
    from airflow.configuration import conf

    return Settings(
        url=ledger_url(),
        lease_seconds=_positive(LEASE_SECONDS, _typed(LEASE_SECONDS, conf.getfloat, "a number")),
        offload_threshold_bytes=_positive(
            OFFLOAD_THRESHOLD_BYTES, _typed(OFFLOAD_THRESHOLD_BYTES, conf.getint, "a whole number")
        ),
        offload_path=read_text(OFFLOAD_PATH),
        secret_key=read_text(SECRET_KEY),
        fernet_key=str(conf.get("core", "fernet_key", fallback="") or "").strip(),
        retention=_duration(RETENTION),
        expire_after=_duration(EXPIRE_AFTER),
        unread_after=_duration(UNREAD_AFTER),
        keep_consumed_payloads=_typed(KEEP_CONSUMED_PAYLOADS, conf.getboolean, "true or false"),
        allow_plaintext=_typed(ALLOW_PLAINTEXT, conf.getboolean, "true or false"),
        teams=parse_teams(read_text(TEAMS)),
    )


def ledger_url() -> str:
    if url := read_text(SQL_ALCHEMY_CONN):
        _check_url(url, f"[{SECTION}] sql_alchemy_conn")
        return url
    if conn_id := read_text(CONN_ID):
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
