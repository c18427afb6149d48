"""Secure defaults, on each database: no plaintext unless asked, no key beside the data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from exclusive_xcom import config, wiring
from exclusive_xcom.errors import ConfigurationError, PayloadError
from exclusive_xcom.ledger import EACH, ITEMS, Ledger, Offloaded, Production, Written, get_engine
from exclusive_xcom.ledger.schema import meta
from exclusive_xcom.runtime import open_session
from exclusive_xcom.wiring import env_for

from .conftest import EXTRACT, production, request, who


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, ledger_url: str, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """The ledger of ``ledger_url``, no key anywhere, no option set: each test adds what it needs."""
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__SQL_ALCHEMY_CONN", ledger_url)
    monkeypatch.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_PATH", f"file://{tmp_path / 'blobs'}")
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "")
    for name in ("SECRET_KEY", "ALLOW_PLAINTEXT", "CONN_ID"):
        monkeypatch.delenv(f"AIRFLOW__EXCLUSIVE_XCOM__{name}", raising=False)
    yield monkeypatch
    env_for.cache_clear()
    wiring._ready.discard(ledger_url)
    get_engine(ledger_url).dispose()


def _meta_names(url: str) -> list[str]:
    with get_engine(url).connect() as conn:
        return list(conn.execute(sa.select(meta.c.name).order_by(meta.c.name)).scalars())


def test_a_configured_secret_keeps_every_key_out_of_the_ledger(configured: pytest.MonkeyPatch, ledger_url: str) -> None:
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "team-key")
    current = env_for(config.load_settings())
    stored = current.codec.encode({"rows": [1]}, "f", EXTRACT.ref())

    assert current.keyring.encrypts and isinstance(stored, bytes) and b"rows" not in stored
    assert _meta_names(ledger_url) == ["schema_version"], "no signing key beside the data"


def test_without_any_key_nothing_is_stored_and_the_error_names_both_ways(
    configured: pytest.MonkeyPatch, ledger_url: str
) -> None:
    current = env_for(config.load_settings())
    with pytest.raises(ConfigurationError) as caught:
        current.codec.encode({"rows": [1]}, "f", EXTRACT.ref())

    message = str(caught.value)
    assert message.startswith("no key configured to encrypt exclusive_xcom payloads and sign their handles")
    assert "set [exclusive_xcom] secret_key (or Airflow's [core] fernet_key)" in message
    assert "or set [exclusive_xcom] allow_plaintext = True" in message
    assert message.endswith(
        "[dag='etl' run='manual__2024-05-01T00:00:00+00:00' producer='extract' key='return_value' consumer='-']"
    )
    assert "\n" not in message
    assert _meta_names(ledger_url) == ["schema_version"]


def test_allow_plaintext_is_the_only_way_to_plain_payloads_and_a_ledger_key(
    configured: pytest.MonkeyPatch, ledger_url: str
) -> None:
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__ALLOW_PLAINTEXT", "True")
    plain = env_for(config.load_settings())
    stored = plain.codec.encode({"rows": [1]}, "f")

    assert stored == b'{"rows":[1]}'
    assert _meta_names(ledger_url) == ["schema_version", "signing_secret"]
    # Once a key is configured (and plaintext no longer allowed), unsealed bytes are refused:
    # only a key holder can have written a payload that is accepted.
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "team-key")
    configured.delenv("AIRFLOW__EXCLUSIVE_XCOM__ALLOW_PLAINTEXT")
    keyed = env_for(config.load_settings())
    assert isinstance(stored, bytes)
    with pytest.raises(
        PayloadError,
        match=r"^the stored payload is not encrypted \(or is corrupted\), .* run `exclusive-xcom rotate-key`",
    ):
        keyed.codec.decode(stored, EXTRACT.ref("etl/transform"))


def test_a_handle_altered_and_signed_again_is_named_as_such_not_as_purged(ledger: Ledger) -> None:
    """Someone holding a key added a consumer to a handle and signed it: the ledger knows better."""
    ledger.produce(production(EACH, ["load"], [b"1"]))
    with pytest.raises(PayloadError) as caught:
        ledger.claim(who("intruder"), [request(EACH, ["load", "intruder"])])
    assert str(caught.value).startswith(
        "this handle names consumers ['etl/intruder', 'etl/load'] but the producer wrote ['etl/load']: the handle "
        "was altered and signed again with a valid key (check who holds [exclusive_xcom] secret_key); nothing was "
        "claimed [dag='etl'"
    )
    assert ledger.counts() == {"ready": 1}
    # A handle of an output whose rows are gone is still told so.
    ledger.forget(EXTRACT, 1)
    with pytest.raises(PayloadError, match="^no ledger item matches this handle: it was purged"):
        ledger.claim(who("load"), [request(EACH, ["load"])])


@pytest.mark.parametrize("backend", ["mysql"])
def test_payloads_never_exceed_the_servers_packet_limit(
    configured: pytest.MonkeyPatch, ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MariaDB drops the connection over a statement above max_allowed_packet (16 MiB here), which
    looks like an outage: a threshold above it is capped, and INSERTs are split by bytes."""
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__SECRET_KEY", "team-key")
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__OFFLOAD_THRESHOLD_BYTES", str(64 << 20))
    current = env_for(config.load_settings())
    limit = current.ledger.inline_limit
    assert limit is not None and current.codec.threshold == limit < 16 << 20
    assert f"payloads above {limit} bytes go to object storage instead" in caplog.text

    big = current.codec.encode("x" * (12 << 20), "f", EXTRACT.ref())
    assert isinstance(big, Offloaded), "a payload one statement cannot carry goes to object storage"
    many = [b"y" * 100_000] * 300  # 30 MB of inline items: one 1000-row INSERT would be 30 MB
    assert current.ledger.produce(Production(Written(EXTRACT, 1, ITEMS, ("etl/work",)), many)) == 300
    (claimed,) = current.ledger.claim(who("work"), [request(ITEMS, ["work"], limit=1000)]).claims
    assert claimed.payloads == many
    assert current.codec.decode(big) == "x" * (12 << 20)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_configuration_error_in_a_task_names_the_task(configured: pytest.MonkeyPatch) -> None:
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__LEASE_SECONDS", "five")
    ti = SimpleNamespace(dag_id="etl", run_id="r1", task_id="load", map_index=-1, try_number=1)
    with pytest.raises(ConfigurationError) as caught:
        open_session({"ti": ti}, [{"task_id": "extract", "key": "return_value"}])
    assert str(caught.value) == (
        "[exclusive_xcom] lease_seconds must be a number, got 'five' "
        "[dag='etl' run='r1' producer='extract' key='return_value' consumer='load']"
    )


@pytest.mark.parametrize("backend", ["sqlite"])
def test_teams_without_a_key_are_refused(configured: pytest.MonkeyPatch) -> None:
    """Each team's secret_key is what keeps its handles its own: teams without one make no sense."""
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__TEAMS", "sales: sales_*")
    configured.setenv("AIRFLOW__EXCLUSIVE_XCOM__ALLOW_PLAINTEXT", "True")
    with pytest.raises(
        ConfigurationError,
        match=r"^\[exclusive_xcom\] teams needs a key: set \[exclusive_xcom\] secret_key, one per team$",
    ):
        env_for(config.load_settings())
