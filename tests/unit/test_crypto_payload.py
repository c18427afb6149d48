"""Keys and stored payloads without a database: encryption, frames, rotation, offloaded blobs.

Blobs go to a real ``file://`` store under the test's tmp_path; corruption is made by
editing the bytes on disk, as a broken disk or a hostile bucket would.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exclusive_xcom.crypto import Keyring, keyring_from, parse_secrets
from exclusive_xcom.errors import ConfigurationError, ExclusiveXComError, PayloadError
from exclusive_xcom.handle import Handle, parse
from exclusive_xcom.ledger import Offloaded, Output
from exclusive_xcom.payload import FRAME, MAGIC, Codec
from exclusive_xcom.storage import BlobStore

MARKER = "plaintext-marker-7f3a"
BIG = 1 << 30  # a threshold nothing in these tests reaches: everything stays inline
MIB = 1 << 20


@dataclass
class Point:
    """A user type XCom accepts through serde's dataclass support."""

    x: int
    label: str


VALUES: list[Any] = [
    None,
    True,
    42,
    -2.5,
    "",
    f"{MARKER} é ✓ \u2028",
    [1, "two", None, [3.0]],
    {"k": [1, 2], "nested": {"n": None, "t": (1, 2)}},
    (1, "a"),
    {1, 2, 3},
    frozenset({"x"}),
    dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone.utc),
    dt.date(2024, 5, 1),
    dt.timedelta(days=1, seconds=3),
    decimal.Decimal("1234.5678"),
]


def keys(secret: str) -> Keyring:
    """The keyring of ``[exclusive_xcom] secret_key = secret`` ("" means none: plain payloads)."""
    return keyring_from(secret, "", b"ledger-own-signing-key", allow_plaintext=not secret)


def codec(secret: str, threshold: int = BIG, store: BlobStore | None = None) -> Codec:
    return Codec(keys(secret), threshold, store)


def inline(c: Codec, value: Any) -> bytes:
    stored = c.encode(value, "unused")
    assert isinstance(stored, bytes), stored
    return stored


def frames(stored: bytes) -> list[bytes]:
    """The Fernet tokens of an encrypted payload, checking the framing is exactly as documented."""
    assert stored[: len(MAGIC)] == MAGIC
    tokens, pos = [], len(MAGIC)
    while pos < len(stored):
        size = int.from_bytes(stored[pos : pos + 4], "big")
        tokens.append(stored[pos + 4 : pos + 4 + size])
        assert len(tokens[-1]) == size
        pos += 4 + size
    assert pos == len(stored)
    return tokens


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(f"file://{tmp_path}/blobs")


def on_disk(blob: Offloaded) -> Path:
    assert blob.uri.startswith("file://"), blob.uri
    return Path(blob.uri.removeprefix("file://"))


# -- inline round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_plain_round_trip_is_the_json_text(value: Any) -> None:
    c = codec("")
    stored = inline(c, value)
    assert not stored.startswith(MAGIC)
    json.loads(stored)  # plain storage is readable JSON, nothing else
    back = c.decode(stored)
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_encrypted_round_trip_hides_the_plaintext(value: Any) -> None:
    c = codec("k1")
    stored = inline(c, value)
    assert stored.startswith(MAGIC)
    assert len(frames(stored)) == 1
    assert MARKER.encode() not in stored and b'"k"' not in stored
    back = c.decode(stored)
    assert back == value and type(back) is type(value)
    # Fernet is randomized: the same value never gives the same bytes twice.
    assert inline(c, value) != stored


def test_without_a_secret_the_fernet_key_encrypts_and_the_secret_key_wins_over_it() -> None:
    by_fernet = Codec(keyring_from("", "airflow-fernet", b"own"), BIG)
    stored = inline(by_fernet, MARKER)
    assert stored.startswith(MAGIC)
    assert Codec(keyring_from("", "airflow-fernet"), BIG).decode(stored) == MARKER
    assert not keyring_from("", "").encrypts
    # secret_key set: the fernet key is not used (nor accepted) for payloads.
    with pytest.raises(PayloadError):
        Codec(keyring_from("mine", "airflow-fernet"), BIG).decode(stored)


# -- tampering ----------------------------------------------------------------------------------


def test_every_flipped_byte_of_an_encrypted_payload_is_refused() -> None:
    c = codec("k1")
    value = {"v": MARKER * 3}
    for _ in range(5):  # tokens are random: a few of them
        stored = inline(c, value)
        # Every position: the magic, the length prefix, the token's version, time, IV, body and MAC.
        for at in range(len(stored)):
            try:
                back = c.decode(flip(stored, at))
            except PayloadError:
                continue
            # Only base64's unused padding bits (last character before "=") may flip unnoticed:
            # they decode to the very same token bytes, so the very same value, never other data.
            assert at >= len(stored) - 3 and back == value, (at, back)


def test_a_flipped_byte_in_a_later_frame_is_refused() -> None:
    c = codec("k1")
    value = "y" * (2 * FRAME + 1000)
    stored = inline(c, value)
    assert len(frames(stored)) == 3
    for at in (len(stored) // 2, len(stored) - 5):
        with pytest.raises(PayloadError, match="cannot decrypt the payload"):
            c.decode(flip(stored, at))


def test_a_truncated_encrypted_payload_is_refused() -> None:
    c = codec("k1")
    value = "z" * (2 * FRAME + 1000)
    stored = inline(c, value)
    first, second, _ = frames(stored)
    boundary = len(MAGIC) + 4 + len(first)  # exactly after a whole frame: no partial token
    cuts = [len(stored) - 1, len(stored) // 2, len(MAGIC) + 2, len(MAGIC) + 10, boundary, boundary + 4 + len(second)]
    for cut in cuts:
        with pytest.raises(PayloadError):
            c.decode(stored[:cut])
    with pytest.raises(PayloadError, match="truncated"):
        c.decode(stored[: len(stored) - 1])
    assert c.decode(stored) == value


def test_wrong_key_is_refused_and_the_message_names_secret_key() -> None:
    stored = inline(codec("right"), MARKER)
    with pytest.raises(PayloadError, match=r"secret_key") as exc:
        codec("wrong").decode(stored)
    assert MARKER not in str(exc.value)
    # No key at all: still an exclusive_xcom error that says which option to set.
    with pytest.raises(ExclusiveXComError, match=r"secret_key"):
        codec("").decode(stored)


def test_a_class_outside_airflows_deserialization_allow_list_is_refused() -> None:
    """As for plain XCom: the stored text names a class, and it is not imported unless allowed."""
    c = codec("k1")
    stored = inline(c, Point(3, MARKER))
    with pytest.raises(PayloadError, match="allowed_deserialization_classes"):
        c.decode(stored)


def test_nothing_stored_is_an_error_not_none() -> None:
    with pytest.raises(PayloadError, match="no payload"):
        codec("k1").decode(None)


# -- key rotation -------------------------------------------------------------------------------


def test_rotation_new_key_first_reads_old_data_and_reseal_moves_it_to_the_new_key() -> None:
    old, both, new = codec("old"), codec("new,old"), codec("new")
    value = {"rows": list(range(50)), "who": MARKER}
    written = inline(old, value)
    assert both.decode(written) == value
    with pytest.raises(PayloadError):
        new.decode(written)

    resealed = b"".join(both.reseal([written]))
    assert resealed.startswith(MAGIC) and resealed != written
    assert new.decode(resealed) == value
    with pytest.raises(PayloadError):
        old.decode(resealed)

    # What "new,old" writes is under "new" already.
    assert new.decode(inline(both, value)) == value


def test_reseal_streams_multi_frame_payloads_and_encrypts_plain_ones() -> None:
    old, both, new = codec("old"), codec("new,old"), codec("new")
    value = "m" * (2 * FRAME + 17)
    written = inline(old, value)
    # Fed in odd-sized chunks, as a blob is read.
    chunks = [written[i : i + 777_777] for i in range(0, len(written), 777_777)]
    resealed = b"".join(both.reseal(chunks))
    assert len(frames(resealed)) == 3
    assert new.decode(resealed) == value

    plain = inline(codec(""), value)
    sealed = b"".join(new.reseal([plain[: MIB + 3], plain[MIB + 3 :]]))
    assert len(frames(sealed)) == 3 and b"m" * 32 not in sealed  # "mmmm" occurs by chance in ~20% of 3 MB of base64
    assert new.decode(sealed) == value


def test_reseal_refuses_a_payload_no_configured_key_opens() -> None:
    written = inline(codec("gone"), MARKER)
    with pytest.raises(PayloadError, match="none of the configured keys"):
        b"".join(codec("new,old").reseal([written]))


def test_handles_signed_with_the_old_key_verify_until_it_is_dropped() -> None:
    handle = Handle(Output("d", "r", "extract"), 1, "each", ("d/load",))
    wire = handle.to_xcom(keys("old"))
    assert parse(wire, keys("new,old")) == handle
    with pytest.raises(PayloadError, match="signature mismatch"):
        parse(wire, keys("new"))
    # New handles are signed with the first key, so they survive dropping the old one.
    fresh = handle.to_xcom(keys("new,old"))
    assert parse(fresh, keys("new")) == handle
    with pytest.raises(PayloadError, match="signature mismatch"):
        parse(fresh, keys("old"))
    # The configured key, not the ledger's own, signs once a secret is set.
    with pytest.raises(PayloadError, match="signature mismatch"):
        parse(wire, keyring_from("", "", b"ledger-own-signing-key"))


def test_signing_and_encryption_use_independent_keys() -> None:
    k = keys("shared")
    message = b"body"
    signature = k.sign(message)
    assert k.verify(message, signature) and not k.verify(b"other", signature)
    assert not keys("other").verify(message, signature)
    # The raw secret is not the signing key (derived per purpose).
    assert not Keyring(ledger_secret=b"shared").verify(message, signature)


@pytest.mark.parametrize("raw", ["a,,b", "a,", ",a", " , ", "a, ,b"])
def test_parse_secrets_refuses_an_empty_entry(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="empty key"):
        parse_secrets(raw, "[exclusive_xcom] secret_key")
    with pytest.raises(ConfigurationError, match=r"\[exclusive_xcom\] secret_key"):
        keyring_from(raw, "")


def test_parse_secrets_splits_newest_first_and_strips() -> None:
    assert parse_secrets(" new , old ", "x") == (b"new", b"old")
    assert parse_secrets("   ", "x") == ()
    with pytest.raises(ConfigurationError, match=r"\[core\] fernet_key"):
        keyring_from("", "k1,,k2")


# -- offloaded blobs ----------------------------------------------------------------------------


BIG_TEXT = "".join(f"{i:07d}|" for i in range(int(3.5 * MIB) // 8))  # 3.5 MiB, every frame different


def blob_bytes(blob: Offloaded) -> bytes:
    data = on_disk(blob).read_bytes()
    assert len(data) == blob.size and hashlib.sha256(data).hexdigest() == blob.sha256
    return data


@pytest.mark.parametrize("secret", ["", "k1"], ids=["plain", "encrypted"])
def test_multi_frame_payload_offloads_and_round_trips(store: BlobStore, secret: str) -> None:
    c = codec(secret, threshold=1000, store=store)
    blob = c.encode(BIG_TEXT, "dag/run/extract")
    assert isinstance(blob, Offloaded)
    assert blob.uri.startswith(f"{store.uri}/dag/run/extract/") and blob.uri.endswith(".blob")
    data = blob_bytes(blob)
    if secret:
        assert len(frames(data)) == 4  # 3.5 MiB in frames of at most 1 MiB
        assert b"0000123|" not in data
    else:
        assert json.loads(data) == BIG_TEXT
    assert c.decode(blob) == BIG_TEXT


@pytest.mark.parametrize("secret", ["", "k1"], ids=["plain", "encrypted"])
def test_structured_big_value_offloads_and_round_trips(store: BlobStore, secret: str) -> None:
    c = codec(secret, threshold=1000, store=store)
    value = {"rows": [{"id": i, "at": dt.date(2024, 1, 1 + i % 28), "tags": ("a", i)} for i in range(40_000)]}
    blob = c.encode(value, "f")
    assert isinstance(blob, Offloaded) and blob.size > MIB
    assert c.decode(blob) == value


def test_threshold_decides_inline_or_offloaded(store: BlobStore) -> None:
    plain = codec("", threshold=1000, store=store)
    small = "s" * 900
    assert isinstance(plain.encode(small, "f"), bytes)
    assert isinstance(plain.encode("s" * 1001, "f"), Offloaded)
    # Encryption grows the stored form: what fits plain may have to go to the store sealed.
    sealed = codec("k1", threshold=1000, store=store)
    blob = sealed.encode(small, "f")
    assert isinstance(blob, Offloaded) and blob_bytes(blob).startswith(MAGIC)
    assert sealed.decode(blob) == small
    assert isinstance(sealed.encode("s" * 100, "f"), bytes)


def test_offloading_without_a_store_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no object storage"):
        codec("", threshold=10).encode("x" * 100, "f")


def corruptions() -> Iterator[tuple[str, Any]]:
    yield "flip-first", lambda d: flip(d, 0)
    yield "flip-middle", lambda d: flip(d, len(d) // 2)
    yield "flip-last", lambda d: flip(d, len(d) - 1)
    yield "truncated", lambda d: d[: len(d) - 1]
    yield "truncated-to-a-frame", lambda d: d[:MIB]
    yield "appended", lambda d: d + b" "
    yield "empty", lambda d: b""


@pytest.mark.parametrize("secret", ["", "k1"], ids=["plain", "encrypted"])
@pytest.mark.parametrize(("kind", "damage"), list(corruptions()), ids=[k for k, _ in corruptions()])
def test_damaged_blob_is_refused_never_wrong_data(store: BlobStore, secret: str, kind: str, damage: Any) -> None:
    c = codec(secret, threshold=1000, store=store)
    blob = c.encode(BIG_TEXT, "f")
    assert isinstance(blob, Offloaded)
    path = on_disk(blob)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PayloadError) as exc:
        c.decode(blob)
    text = str(exc.value)
    assert blob.uri in text or "cannot decrypt" in text, text
    if not secret or kind in ("truncated", "appended", "empty", "truncated-to-a-frame"):
        assert "checksum mismatch" in text, text


@pytest.mark.parametrize("secret", ["", "k1"], ids=["plain", "encrypted"])
def test_a_blob_swapped_for_another_valid_blob_is_refused(store: BlobStore, secret: str) -> None:
    c = codec(secret, threshold=1000, store=store)
    mine = c.encode(BIG_TEXT, "f")
    other = c.encode(BIG_TEXT.replace("|", ";"), "f")
    assert isinstance(mine, Offloaded) and isinstance(other, Offloaded)
    shutil.copyfile(on_disk(other), on_disk(mine))  # decodes fine on its own: only the digest tells
    with pytest.raises(PayloadError, match="checksum mismatch"):
        c.decode(mine)


def test_deleted_blob_is_reported_missing(store: BlobStore) -> None:
    c = codec("k1", threshold=1000, store=store)
    blob = c.encode(BIG_TEXT, "f")
    assert isinstance(blob, Offloaded)
    assert store.delete([blob.uri]) == 1
    assert not on_disk(blob).exists()
    with pytest.raises(PayloadError, match="is missing"):
        c.decode(blob)


def test_offloaded_blob_rotates_by_streaming_through_reseal(store: BlobStore) -> None:
    old, both, new = (codec(s, threshold=1000, store=store) for s in ("old", "new,old", "new"))
    blob = old.encode(BIG_TEXT, "f")
    assert isinstance(blob, Offloaded)
    rotated = store.write("f", both.reseal(store.read(blob)))
    assert rotated.uri != blob.uri
    assert new.decode(rotated) == BIG_TEXT
    with pytest.raises(PayloadError):
        new.decode(blob)


def test_checking_a_handle_without_any_key_names_both_ways_to_set_one() -> None:
    """A consumer configured with no key (and no allow_plaintext) cannot verify anything."""
    wire = Handle(Output("d", "r", "extract"), 1, "each", ("d/load",)).to_xcom(keys("k"))
    with pytest.raises(
        ConfigurationError, match=r"^no key configured .* set \[exclusive_xcom\] secret_key .*allow_plaintext = True"
    ):
        parse(wire, keyring_from("", ""))
