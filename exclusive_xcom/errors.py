"""The single exception hierarchy of exclusive_xcom.

Every error that crosses the library's boundary is an :class:`ExclusiveXComError`, so a
DAG author can catch one class; driver and serializer errors are translated at the
boundary where they happen and chained (``raise ... from``), never leaked raw.
Each class's docstring is its default message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class ItemRef:
    """Who is involved in an error: the producer's output and the consumer that touched it."""

    dag_id: str
    run_id: str
    producer: str
    key: str
    consumer: str = "-"

    def describe(self) -> str:
        return (
            f"dag={self.dag_id!r} run={self.run_id!r} producer={self.producer!r} "
            f"key={self.key!r} consumer={self.consumer!r}"
        )


class ExclusiveXComError(Exception):
    """An exclusive_xcom operation failed."""

    def __init__(self, message: str | None = None, ref: ItemRef | None = None) -> None:
        text = mask_secrets(message or (self.__doc__ or "").strip())
        self.detail = text  # the message without the [dag=… consumer=…] part
        if ref is not None:
            text = f"{text} [{ref.describe()}]"
        super().__init__(text)
        self.ref = ref


_E = TypeVar("_E", bound="ExclusiveXComError")

#: ``//user:password@`` in any text, whatever the scheme and whether or not SQLAlchemy could
#: parse the URL (greedy: a password with an ``@`` in it is masked up to the host's ``@``).
_PASSWORD_IN_URL = re.compile(r"(?P<head>//[^\s:/@'\"]*:)[^\s'\"]+@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: no message prints one."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", text)


@contextmanager
def named(ref: ItemRef) -> Iterator[None]:
    """Attach ``ref`` to an error raised where the item was not known (e.g. the database
    went away between statements), so every message still names who was involved."""
    try:
        yield
    except ExclusiveXComError as exc:
        if exc.ref is not None:
            raise
        raise _again(exc, exc.detail, ref) from exc


def amended(exc: _E, note: str) -> _E:
    """``exc`` again with ``note`` added to what it says (before the ``[dag=… consumer=…]``
    part): what the layer above knows and the one below did not."""
    return _again(exc, f"{exc.detail}; {note}", exc.ref)


def _again(exc: _E, message: str, ref: ItemRef | None) -> _E:
    """A copy of ``exc`` (same class, same attributes) saying ``message`` about ``ref``."""
    again = type(exc)(message, ref)
    again.__dict__.update({k: v for k, v in vars(exc).items() if k not in ("detail", "ref")})
    return again


class NotAuthorizedError(ExclusiveXComError):
    """This task is not a named consumer of that exclusive output; add it to consumers=."""


class AlreadyConsumedError(ExclusiveXComError):
    """The item was already consumed; exclusive outputs are read exactly once."""


class ClaimConflictError(ExclusiveXComError):
    """Another live claim holds the item; wait for its lease to expire or release it."""


class LedgerError(ExclusiveXComError):
    """The claim ledger database refused a statement; the step changed nothing."""


class LedgerIntegrityError(LedgerError):
    """A constraint of the claim ledger refused a write (say, an output written twice); nothing was changed."""


class LedgerUnavailableError(LedgerError):
    """The claim ledger database cannot be reached; the message says what is known of the step that failed."""

    maybe_committed = False  # True when the connection failed while the step committed


class MetadataUnavailableError(ExclusiveXComError):
    """Airflow's metadata database cannot be read (``exclusive-xcom audit`` checks the ledger against it)."""


class PayloadError(ExclusiveXComError):
    """The payload cannot be serialized, is too large, is corrupted or its handle is not authentic."""


class ConfigurationError(ExclusiveXComError, ValueError):
    """The [exclusive_xcom] configuration or the decorator arguments are invalid."""
