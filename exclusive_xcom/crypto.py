"""Keys: signing handles (HMAC) and encrypting payloads at rest (Fernet), with rotation.

The configured secret is a comma-separated list, newest first, like Airflow's own
``fernet_key``: the first key signs and encrypts, every key is accepted to verify and
decrypt. Rotating is therefore "prepend the new key, re-encrypt, drop the old one later".
Each secret may be any string (a Fernet key works too); two independent keys are derived
from it, so a leaked handle signature says nothing about the encryption key.

Payloads are never stored in plaintext unless the configuration says so
(``allow_plaintext = True``): only then, with no secret configured, are handles signed with
a key the ledger keeps for itself and payloads stored unencrypted. With a secret
configured, no key is ever written to the ledger.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from functools import cached_property

from cryptography.fernet import Fernet, MultiFernet

from exclusive_xcom.errors import ConfigurationError

_SIGN_CONTEXT = b"exclusive_xcom/handle-signature/v1"
#: What a process with no key is told, wherever it first needs one.
NO_KEY = (
    "no key configured to encrypt exclusive_xcom payloads and sign their handles: set [exclusive_xcom] "
    "secret_key (or Airflow's [core] fernet_key), or set [exclusive_xcom] allow_plaintext = True to store "
    "payloads unencrypted"
)
_ENCRYPT_CONTEXT = b"exclusive_xcom/payload-encryption/v1"


def parse_secrets(raw: str, source: str) -> tuple[bytes, ...]:
    """Split a comma-separated key list; refuse empty entries rather than guess."""
    if not raw.strip():
        return ()
    parts = [p.strip() for p in raw.split(",")]
    if any(not p for p in parts):
        raise ConfigurationError(f"{source} has an empty key in its comma-separated list")
    return tuple(p.encode() for p in parts)


def _derive(secret: bytes, context: bytes) -> bytes:
    return hmac.new(secret, context, hashlib.sha256).digest()


@dataclass(frozen=True)
class Keyring:
    """What this process signs and encrypts with, and everything it still accepts."""

    secrets: tuple[bytes, ...] = ()
    #: The ledger's own signing key; used only when no secret is configured.
    ledger_secret: bytes = b""
    #: ``[exclusive_xcom] allow_plaintext``: payloads may be stored, and read, unencrypted.
    allow_plaintext: bool = False

    @property
    def encrypts(self) -> bool:
        return bool(self.secrets)

    @cached_property
    def _sign_keys(self) -> tuple[bytes, ...]:
        if self.secrets:
            return tuple(_derive(s, _SIGN_CONTEXT) for s in self.secrets)
        if not self.ledger_secret:
            raise ConfigurationError(NO_KEY)
        return (self.ledger_secret,)

    @cached_property
    def _fernet(self) -> MultiFernet:
        if not self.secrets:
            raise ConfigurationError(
                "this payload is encrypted but no key is configured: set [exclusive_xcom] secret_key "
                "(or [core] fernet_key) to the key it was written with"
            )
        return MultiFernet([Fernet(base64.urlsafe_b64encode(_derive(s, _ENCRYPT_CONTEXT))) for s in self.secrets])

    def sign(self, message: bytes) -> str:
        return hmac.new(self._sign_keys[0], message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """True if any accepted key made ``signature`` (handles outlive a key rotation)."""
        return any(
            hmac.compare_digest(signature, hmac.new(key, message, hashlib.sha256).hexdigest())
            for key in self._sign_keys
        )

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        """Raises :class:`cryptography.fernet.InvalidToken` on a wrong key or altered bytes."""
        return self._fernet.decrypt(token)

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt a token under the newest key."""
        return self._fernet.rotate(token)


def keyring_from(
    secret_key: str, fernet_key: str, ledger_secret: bytes = b"", *, allow_plaintext: bool = False
) -> Keyring:
    """The keyring of a configuration: ``secret_key`` if set, else Airflow's ``fernet_key``."""
    if secret_key.strip():
        secrets = parse_secrets(secret_key, "[exclusive_xcom] secret_key")
    else:
        secrets = parse_secrets(fernet_key, "[core] fernet_key")
    return Keyring(secrets, ledger_secret, allow_plaintext)
