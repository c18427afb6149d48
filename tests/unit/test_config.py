"""[exclusive_xcom] options resolve to a ledger URL the way an Airflow user expects."""

from __future__ import annotations

from datetime import timedelta

import pytest

from exclusive_xcom.config import ledger_url, load_settings
from exclusive_xcom.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in (
        "SQL_ALCHEMY_CONN",
        "CONN_ID",
        "LEASE_SECONDS",
        "SECRET_KEY",
        "RETENTION",
        "EXPIRE_AFTER",
        "UNREAD_AFTER",
        "KEEP_CONSUMED_PAYLOADS",
        "OFFLOAD_THRESHOLD_BYTES",
        "ALLOW_PLAINTEXT",
    ):
        monkeypatch.delenv(f"AIRFLOW__EXCLUSIVE_XCOM__{name}", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))


def test_default_is_an_sqlite_file_under_airflow_home(tmp_path) -> None:
    assert ledger_url() == f"sqlite:///{tmp_path}/exclusive_xcom.db"


def test_sql_alchemy_conn_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__CONN_ID", "ignored")
    assert ledger_url() == "postgresql+psycopg://u@h/db"


def test_conn_id_builds_a_sqlalchemy_2_url_from_a_postgres_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_PG", "postgres://alice:s%40cret@db.example:5433/ledger")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__CONN_ID", "ledger_pg")
    assert ledger_url() == "postgresql+psycopg://alice:s%40cret@db.example:5433/ledger"


def test_conn_id_of_a_mysql_connection_uses_pymysql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_MY", "mysql://root@127.0.0.1:3306/test")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__CONN_ID", "ledger_my")
    assert ledger_url() == "mysql+pymysql://root@127.0.0.1:3306/test"


def test_conn_id_of_an_unsupported_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_HTTP", "http://example.com")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__CONN_ID", "ledger_http")
    with pytest.raises(ConfigurationError, match="conn_id='ledger_http' has type 'http'; use a postgres or mysql"):
        ledger_url()


def test_missing_connection_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__CONN_ID", "nope_not_here")
    with pytest.raises(ConfigurationError, match="conn_id='nope_not_here': connection not found"):
        ledger_url()


def test_bad_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", "not a url")
    with pytest.raises(ConfigurationError, match="sql_alchemy_conn is not a SQLAlchemy URL"):
        ledger_url()


def test_non_numeric_lease_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__LEASE_SECONDS", "soon")
    with pytest.raises(ConfigurationError, match="lease_seconds must be a number, got 'soon'"):
        load_settings()


def test_provider_info_is_valid_for_airflow() -> None:
    import json
    from importlib.resources import files

    import jsonschema

    from exclusive_xcom.provider import get_provider_info

    schema = json.loads(files("airflow").joinpath("provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["task-decorators"] == [{"name": "exclusive", "class-name": "exclusive_xcom.decorator.exclusive_task"}]


@pytest.mark.parametrize(
    "option,raw,message",
    [
        ("RETENTION", "a week", r"\[exclusive_xcom\] retention: expected a duration such as 7d.*got 'a week'"),
        ("EXPIRE_AFTER", "30", r"\[exclusive_xcom\] expire_after: expected a duration such as 7d.*got '30'"),
        ("UNREAD_AFTER", "1 day", r"\[exclusive_xcom\] unread_after: expected a duration such as 7d.*got '1 day'"),
        ("KEEP_CONSUMED_PAYLOADS", "maybe", r"keep_consumed_payloads must be true or false, got 'maybe'"),
        ("LEASE_SECONDS", "0", r"lease_seconds must be positive, got '0'"),
        ("OFFLOAD_THRESHOLD_BYTES", "1.5", r"offload_threshold_bytes must be a whole number, got '1.5'"),
        ("ALLOW_PLAINTEXT", "sometimes", r"allow_plaintext must be true or false, got 'sometimes'"),
    ],
)
def test_bad_options_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, option: str, raw: str, message: str) -> None:
    monkeypatch.setenv(f"AIRFLOW__EXCLUSIVE_XCOM__{option}", raw)
    with pytest.raises(ConfigurationError, match=message):
        load_settings()


def test_retention_options_are_read() -> None:
    settings = load_settings()
    assert settings.retention.days == 7 and settings.expire_after is None and not settings.keep_consumed_payloads
    assert settings.unread_after == timedelta(days=1)


def test_unread_after_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__UNREAD_AFTER", "6h")
    assert load_settings().unread_after == timedelta(hours=6)


def test_an_unusable_offload_path_is_refused_by_name() -> None:
    from exclusive_xcom.storage import BlobStore

    with pytest.raises(ConfigurationError, match=r"offload_path 'nosuchscheme://bucket/x' is not usable"):
        BlobStore("nosuchscheme://bucket/x")


def test_an_object_store_without_its_provider_is_refused_naming_the_provider() -> None:
    """No Google provider here: a gs:// path fails when the store is made, not at the first write."""
    from exclusive_xcom.storage import BlobStore

    with pytest.raises(
        ConfigurationError,
        match=r"offload_path 'gs://bucket/x' needs a filesystem for gs://: install apache-airflow-providers-google",
    ):
        BlobStore("gs://bucket/x")


@pytest.mark.parametrize(
    ("uri", "executor", "warned"),
    [
        ("file:///shared/blobs", "CeleryExecutor", True),
        ("/shared/blobs", "airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor", True),
        ("file:///shared/blobs", "LocalExecutor,CeleryExecutor", True),
        ("file:///shared/blobs", "LocalExecutor", False),
        ("s3://aws_default@bucket/blobs", "CeleryExecutor", False),
    ],
)
def test_a_local_offload_folder_under_a_many_host_executor_is_warned_about(
    uri: str, executor: str, warned: bool
) -> None:
    from exclusive_xcom.storage import not_shared

    warning = not_shared(uri, executor)
    assert (warning is not None) == warned
    if warning:
        assert uri in warning and "cannot be read on another" in warning


def test_the_local_folder_warning_prints_no_password() -> None:
    from exclusive_xcom.storage import not_shared

    warning = not_shared("file://nas:hunter2@files.internal/blobs", "CeleryExecutor")
    assert warning is not None and "hunter2" not in warning and "file://nas:***@files.internal/blobs" in warning


def test_every_default_is_declared_once_for_airflow_and_for_settings() -> None:
    """The provider's metadata, the fallback when unset and Settings' defaults are one declaration."""
    from dataclasses import fields

    from exclusive_xcom.config import OPTIONS, Settings, parse_teams
    from exclusive_xcom.provider import get_provider_info

    declared = get_provider_info()["config"]["exclusive_xcom"]["options"]
    assert list(declared) == list(OPTIONS)
    assert {name: o["default"] for name, o in declared.items()} == {n: o.airflow_default() for n, o in OPTIONS.items()}
    assert declared["retention"]["default"] == "7d" and declared["lease_seconds"]["default"] == "300"
    by_hand = Settings("unused")
    for field in fields(Settings):
        if field.name == "teams":
            assert by_hand.teams == parse_teams(OPTIONS["teams"].default)
        elif field.name in OPTIONS:
            assert getattr(by_hand, field.name) == OPTIONS[field.name].default, field.name
    unset = load_settings()
    assert (unset.lease_seconds, unset.offload_threshold_bytes, unset.retention) == (
        by_hand.lease_seconds,
        by_hand.offload_threshold_bytes,
        by_hand.retention,
    )


def test_a_blank_option_means_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__LEASE_SECONDS", "")
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__KEEP_CONSUMED_PAYLOADS", " ")
    settings = load_settings()
    assert settings.lease_seconds == 300.0 and settings.keep_consumed_payloads is False
