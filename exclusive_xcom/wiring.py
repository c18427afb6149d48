"""The process's wiring: from :class:`~exclusive_xcom.config.Settings` to the ledger, keys and
payload codec that tasks, the CLI and maintenance share.

Kept apart from the task runtime so that the CLI and the maintenance code get the same
objects without importing what a running task does, and apart from ``config`` so that
reading options needs no engine. Each process builds one engine per URL; a writer migrates
the schema once per process (so the claim path never checks it again), a reader only
checks that it is current.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import sqlalchemy as sa

from exclusive_xcom.config import SECTION, Settings, load_settings
from exclusive_xcom.crypto import Keyring, keyring_from
from exclusive_xcom.errors import ConfigurationError, LedgerError
from exclusive_xcom.ledger import Ledger, get_engine
from exclusive_xcom.ledger.schema import SCHEMA_VERSION
from exclusive_xcom.payload import Codec
from exclusive_xcom.storage import BlobStore, default_base, not_shared

log = logging.getLogger("exclusive_xcom")

_ready: set[str] = set()
_ready_lock = threading.Lock()


@dataclass(frozen=True)
class Env:
    """What a process needs to produce and claim: its settings, ledger, keys and payload codec."""

    settings: Settings
    ledger: Ledger
    keyring: Keyring
    codec: Codec


def env() -> Env:
    """Settings, ledger, keys and payload codec of this process (built once per configuration)."""
    return env_for(load_settings())


@lru_cache(maxsize=4)
def env_for(settings: Settings) -> Env:
    ledger = get_ledger(settings)
    keys = keyring(settings, ledger)
    return Env(settings, ledger, keys, Codec(keys, _threshold(settings, ledger), _store(settings)))


def _store(settings: Settings) -> Callable[[], BlobStore]:
    """The object store payloads are offloaded to. A configured ``offload_path`` is opened now,
    so a missing provider fails the first task, not the first large payload; the default
    local folder is made on first offload. A local folder under an executor whose tasks run
    on many hosts is warned about: another host's consumer could not read its blobs."""
    warning = not_shared(settings.offload_path or default_base(), _executor())
    if warning:
        log.warning("exclusive_xcom: %s", warning)
    if not settings.offload_path:
        return lambda: BlobStore(None)
    store = BlobStore(settings.offload_path)
    return lambda: store


def _executor() -> str:
    from airflow.configuration import conf

    return str(conf.get("core", "executor", fallback="LocalExecutor"))


def _threshold(settings: Settings, ledger: Ledger) -> int:
    """``offload_threshold_bytes``, capped to what one statement of this ledger may carry."""
    limit = ledger.inline_limit
    if limit is None or settings.offload_threshold_bytes <= limit:
        return settings.offload_threshold_bytes
    log.warning(
        "exclusive_xcom: offload_threshold_bytes (%d) is above what one statement of this ledger may carry "
        "(max_allowed_packet); payloads above %d bytes go to object storage instead",
        settings.offload_threshold_bytes,
        limit,
    )
    return limit


def get_ledger(settings: Settings | None = None) -> Ledger:
    """The ledger of this configuration, its schema made or upgraded once per process."""
    settings = settings or load_settings()
    ledger = open_ledger(settings)
    with _ready_lock:
        if settings.url not in _ready:
            ledger.migrate()
            _ready.add(settings.url)
    return ledger


def current_ledger(settings: Settings) -> Ledger:
    """The ledger of this configuration for reading only: its schema is checked, never changed.

    A reader (``exclusive-xcom ls``, ``show``, ``stats``, ``audit``) must not create or upgrade
    a schema as a side effect of looking; it says instead what to run.
    """
    ledger = open_ledger(settings)
    version = ledger.schema_version()
    if version < SCHEMA_VERSION:
        where = ledger.engine.url.render_as_string(hide_password=True)
        state = (
            "has no schema yet"
            if version == 0
            else f"has schema version {version}, this exclusive_xcom needs {SCHEMA_VERSION}"
        )
        raise LedgerError(f"the claim ledger at {where} {state}: run `exclusive-xcom db migrate`")
    return ledger


def open_ledger(settings: Settings) -> Ledger:
    """The ledger of this configuration, without touching its database yet."""
    try:
        engine = get_engine(settings.url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"cannot open the claim ledger at {settings.url!r}: {exc}{_driver_hint(settings.url)}"
        ) from None  # one line: the driver's import traceback says nothing more
    return Ledger(engine, lease_seconds=settings.lease_seconds, keep_consumed_payloads=settings.keep_consumed_payloads)


def _driver_hint(url: str) -> str:
    """What to install or write instead, when the URL names a driver that is not there."""
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("postgres"):
        return "; the PostgreSQL driver is psycopg 3: pip install 'exclusive-xcom[postgres]', URL postgresql+psycopg://"
    if scheme.startswith(("mysql", "mariadb")):
        return "; the MySQL/MariaDB driver is PyMySQL: pip install 'exclusive-xcom[mysql]', URL mysql+pymysql://"
    return ""


def keyring(settings: Settings, ledger: Ledger) -> Keyring:
    """Keys of this configuration. The ledger's own signing key is read (made, the first
    time) only when no key is configured and plaintext is allowed: the ledger never holds
    a key beside the data it protects unless the configuration says so."""
    configured = keyring_from(settings.secret_key, settings.fernet_key, allow_plaintext=settings.allow_plaintext)
    if settings.teams.patterns and not configured.encrypts:
        raise ConfigurationError(f"[{SECTION}] teams needs a key: set [{SECTION}] secret_key, one per team")
    if configured.encrypts or not settings.allow_plaintext:
        return configured  # without any key, the first produce (or handle check) names the two ways to set one
    return keyring_from("", "", ledger.secret(), allow_plaintext=True)
