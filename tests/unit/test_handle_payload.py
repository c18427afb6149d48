"""Handles are authentic or refused; payloads round-trip through Airflow's serde."""

from __future__ import annotations

import datetime as dt

import pytest

from exclusive_xcom import PayloadError
from exclusive_xcom.crypto import Keyring
from exclusive_xcom.handle import Handle, is_handle, parse
from exclusive_xcom.ledger import Output
from exclusive_xcom.payload import Codec
from exclusive_xcom.runtime import find_handles, replace_handles

SECRET = Keyring(ledger_secret=b"k" * 32, allow_plaintext=True)
CODEC = Codec(SECRET, threshold=1 << 20)


def dumps(value: object) -> bytes:
    stored = CODEC.encode(value, "unused")
    assert isinstance(stored, bytes)
    return stored


def loads(data: bytes) -> object:
    return CODEC.decode(data)


def _handle() -> Handle:
    return Handle(Output("d", "r", "extract"), 2, "each", ("d/transform",))


def test_handle_round_trips_through_its_xcom_form() -> None:
    wire = _handle().to_xcom(SECRET)
    assert is_handle(wire) and "payload" not in wire
    assert parse(wire, SECRET) == _handle()


@pytest.mark.parametrize(
    "field,value", [("consumers", ["d/transform", "d/intruder"]), ("run_id", "other"), ("generation", 1)]
)
def test_altered_handle_is_refused(field: str, value: object) -> None:
    wire = {**_handle().to_xcom(SECRET), field: value}
    with pytest.raises(PayloadError, match="signature mismatch.*producer='extract'"):
        parse(wire, SECRET)


def test_handle_signed_with_another_key_is_refused() -> None:
    with pytest.raises(PayloadError, match="signature mismatch"):
        parse(_handle().to_xcom(Keyring(ledger_secret=b"other")), SECRET)


def test_malformed_handle_names_the_missing_field() -> None:
    wire = _handle().to_xcom(SECRET)
    del wire["run_id"]
    with pytest.raises(PayloadError, match="malformed exclusive_xcom handle.*run_id"):
        parse(wire, SECRET)


def test_payload_round_trips_xcom_types() -> None:
    value = {"when": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), "rows": [1, 2.5, "x", None], "t": (1, 2)}
    assert loads(dumps(value)) == value


def test_unserializable_value_raises_payload_error_naming_the_type() -> None:
    with pytest.raises(PayloadError, match="cannot serialize the return value \\(object\\)"):
        dumps(object())


def test_corrupted_payload_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="corrupted"):
        loads(b"{not json")


def test_handles_are_found_and_replaced_anywhere_in_arguments() -> None:
    h1, h2 = _handle().to_xcom(SECRET), Handle(Output("d", "r", "b"), 1, "one", ("d/t",)).to_xcom(SECRET)
    args = [[h1, 5], {"nested": {"deep": [h2]}, "plain": "x"}]
    assert find_handles(args) == [h1, h2]
    assert replace_handles(args, ["A", "B"]) == [["A", 5], {"nested": {"deep": ["B"]}, "plain": "x"}]


def test_named_attaches_who_was_involved_to_an_error_that_did_not_know() -> None:
    from exclusive_xcom.errors import ItemRef, LedgerUnavailableError, named

    ref = ItemRef("d", "r", "producer", "return_value", "consumer")
    with pytest.raises(LedgerUnavailableError) as caught, named(ref):
        raise LedgerUnavailableError("the claim ledger at sqlite:///x failed")
    assert str(caught.value) == (
        "the claim ledger at sqlite:///x failed "
        "[dag='d' run='r' producer='producer' key='return_value' consumer='consumer']"
    )
    assert caught.value.ref == ref

    already = ItemRef("d", "r", "other", "k", "c")
    with pytest.raises(LedgerUnavailableError) as kept, named(ref):
        raise LedgerUnavailableError("down", already)
    assert kept.value.ref == already and str(kept.value).count("[dag=") == 1
