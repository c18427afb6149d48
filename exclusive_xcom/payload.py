"""Payload bytes: Airflow's serde to JSON, sealed (optionally encrypted) and stored.

Stored form, inline in the ledger or in an offloaded blob alike:

* plain: the UTF-8 JSON text itself;
* encrypted: :data:`MAGIC`, then frames of ``<4-byte length><Fernet token>``, each token
  holding up to :data:`FRAME` bytes of the JSON text.

Frames let a 200 MB payload be encrypted and decrypted as a stream: nothing holds more
than the JSON text itself plus one frame, so the peak memory of producing or consuming a
payload stays near twice its size. The JSON is never parsed before a blob's checksum and
every frame's Fernet MAC have been verified.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from cryptography.fernet import InvalidToken

from exclusive_xcom.crypto import NO_KEY, Keyring
from exclusive_xcom.errors import ConfigurationError, ItemRef, PayloadError
from exclusive_xcom.ledger import Offloaded

if TYPE_CHECKING:
    from exclusive_xcom.storage import BlobStore

MAGIC = b"\x00xx1"
FRAME = 1 << 20
_LENGTH = 4


class Codec:
    """Turns values into stored payloads and back, with this process's keys and storage."""

    def __init__(self, keyring: Keyring, threshold: int, store: Any = None) -> None:
        self.keyring = keyring
        self.threshold = threshold
        self._store: BlobStore | Callable[[], BlobStore] | None = store  # or a callable making one on first offload

    @property
    def store(self) -> BlobStore:
        if callable(self._store):
            self._store = self._store()
        if self._store is None:
            raise ConfigurationError("no object storage configured for offloaded payloads")
        return self._store

    # -- writing ----------------------------------------------------------------------------

    def encode(self, value: Any, folder: str, ref: ItemRef | None = None) -> bytes | Offloaded:
        """The stored form of ``value``: inline bytes, or a blob when above the threshold.

        Small values take ``json.dumps`` (C, fast). A value that is clearly big is encoded
        as a stream straight into the blob: ``json.dumps`` would hold its text twice (the
        pieces and their join) on top of the value itself.
        """
        if not self.keyring.encrypts and not self.keyring.allow_plaintext:
            raise ConfigurationError(NO_KEY, ref)  # before anything is written
        data = _serialize(value, ref)
        if _larger_than(data, self.threshold):
            return self.store.write(folder, self._frames(_utf8_frames(_ENCODER.iterencode(data))), ref)
        text = _dumps(data, value, ref).encode()
        sealed = b"".join(self._frames(_slices(text))) if self.keyring.encrypts else text
        if len(sealed) <= self.threshold:
            return sealed
        del sealed
        return self.store.write(folder, self._frames(_slices(text)), ref)

    def _frames(self, plain: Iterable[bytes]) -> Iterator[bytes]:
        """The stored form of a stream of JSON bytes: as it is, or encrypted frame by frame."""
        if not self.keyring.encrypts:
            yield from plain
            return
        yield MAGIC
        for chunk in plain:
            token = self.keyring.encrypt(chunk)
            yield len(token).to_bytes(_LENGTH, "big") + token

    # -- reading ----------------------------------------------------------------------------

    def decode(self, stored: bytes | Offloaded | None, ref: ItemRef | None = None) -> Any:
        if stored is None:
            raise PayloadError("the ledger item has no payload (already consumed or purged)", ref)
        chunks: Iterable[bytes] = [stored] if isinstance(stored, bytes) else self.store.read(stored, ref)
        return from_json(self._unseal(chunks, ref), ref)

    def _unseal(self, chunks: Iterable[bytes], ref: ItemRef | None) -> bytearray:
        """The JSON bytes of a stored payload, decrypted frame by frame and verified."""
        reader = _Reader(iter(chunks))
        head = reader.read(len(MAGIC))
        out = bytearray()
        if head != MAGIC:
            out += head
            for chunk in reader.rest():  # a blob's checksum is verified as its last chunk is read
                out += chunk
            if not self.keyring.allow_plaintext:  # unsealed bytes are not known to come from a key holder
                raise PayloadError(
                    "the stored payload is not encrypted (or is corrupted), and [exclusive_xcom] allow_plaintext "
                    "is not set: run `exclusive-xcom rotate-key` to encrypt stored payloads, or set "
                    "allow_plaintext = True",
                    ref,
                )
            return out
        try:
            while header := reader.read(_LENGTH):
                size = int.from_bytes(header, "big")
                token = reader.read(size)
                if len(header) != _LENGTH or len(token) != size:
                    raise PayloadError("the encrypted payload is truncated", ref)
                out += self.keyring.decrypt(token)
        except InvalidToken:
            raise PayloadError(
                "cannot decrypt the payload: it was altered, or it was encrypted with a key that is no longer "
                "in [exclusive_xcom] secret_key (keep old keys after the new one until re-encrypted)",
                ref,
            ) from None
        return out

    def reseal(self, chunks: Iterable[bytes], ref: ItemRef | None = None) -> Iterator[bytes]:
        """A stored payload re-encrypted under the newest key, as a stream (key rotation).

        Plain payloads get encrypted; nothing is decrypted into memory beyond one frame.
        """
        reader = _Reader(iter(chunks))
        head = reader.read(len(MAGIC))
        if head != MAGIC:
            yield from self._frames(_rechunk(head, reader.rest()))
            return
        yield MAGIC
        try:
            while header := reader.read(_LENGTH):
                token = self.keyring.rotate(reader.read(int.from_bytes(header, "big")))
                yield len(token).to_bytes(_LENGTH, "big") + token
        except InvalidToken:
            raise PayloadError("cannot re-encrypt the payload: none of the configured keys opens it", ref) from None


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_SERDE_ERRORS = (TypeError, ValueError, AttributeError, RecursionError)


def _serialize(value: Any, ref: ItemRef | None) -> Any:
    """Airflow's serde: the value as JSON-able data (the types XCom accepts)."""
    from airflow.sdk.serde import serialize

    try:
        return serialize(value)
    except _SERDE_ERRORS as exc:
        raise _unserializable(value, exc, ref) from exc


def _dumps(data: Any, value: Any, ref: ItemRef | None) -> str:
    try:
        return _ENCODER.encode(data)
    except _SERDE_ERRORS as exc:
        raise _unserializable(value, exc, ref) from exc


def _unserializable(value: Any, exc: Exception, ref: ItemRef | None) -> PayloadError:
    return PayloadError(
        f"cannot serialize the return value ({type(value).__name__}): {exc}; return a type XCom "
        "accepts (JSON types, dataclasses, datetime, pandas/numpy through serde, ...)",
        ref,
    )


def _larger_than(data: Any, limit: int) -> bool:
    """Whether the JSON of ``data`` surely exceeds ``limit`` bytes; stops as soon as it knows.

    Every count is a lower bound (a number is at least one character), so a payload that
    would fit inline is never offloaded because of this estimate.
    """
    budget, stack = limit, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            budget -= len(item) + 2
        elif isinstance(item, dict):
            budget -= 2 + 4 * len(item) + sum(len(str(k)) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            budget -= 1 + len(item)
            stack.extend(item)
        else:
            budget -= 1
        if budget < 0:
            return True
    return False


def _slices(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), FRAME):
        yield data[start : start + FRAME]


def _utf8_frames(pieces: Iterable[str]) -> Iterator[bytes]:
    """UTF-8 frames of about :data:`FRAME` bytes from a stream of JSON text pieces."""
    batch: list[str] = []
    size = 0
    for piece in pieces:
        if len(piece) > FRAME:  # one huge string: slice it rather than copy it whole
            yield from _utf8_frames(batch)
            batch, size = [], 0
            for start in range(0, len(piece), FRAME):
                yield piece[start : start + FRAME].encode()
            continue
        batch.append(piece)
        size += len(piece)
        if size >= FRAME:
            yield "".join(batch).encode()
            batch, size = [], 0
    if batch:
        yield "".join(batch).encode()


def from_json(data: bytearray | bytes, ref: ItemRef | None = None) -> Any:
    """Parse and deserialize; the caller's buffer is released before the value is built."""
    from airflow.sdk.serde import deserialize

    try:
        text = data.decode()
        if isinstance(data, bytearray):
            del data[:]  # the bytes are no longer needed: keep the peak near 2x the payload
        return deserialize(json.loads(text))
    except (TypeError, ValueError, KeyError, ImportError) as exc:
        raise PayloadError(f"the stored payload is corrupted or of an unknown type: {exc}", ref) from exc


def _rechunk(head: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    """Frames of at most :data:`FRAME` bytes from chunks of any size."""
    buf = head
    for chunk in rest:
        buf += chunk
        while len(buf) >= FRAME:
            yield buf[:FRAME]
            buf = buf[FRAME:]
    if buf:
        yield buf


class _Reader:
    """Exact-size reads over a stream of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, size: int) -> bytes:
        while len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def rest(self) -> Iterator[bytes]:
        if self._buf:
            yield self._buf
            self._buf = b""
        yield from self._chunks
