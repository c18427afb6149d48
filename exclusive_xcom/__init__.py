"""exclusive_xcom: consume-once, access-controlled hand-off of task outputs for Airflow 3.

Names are imported lazily: Airflow loads this package's provider entry point while its
own configuration is still initializing, so importing the decorator here eagerly would
be a circular import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exclusive_xcom.api import claim
    from exclusive_xcom.assets import from_asset
    from exclusive_xcom.decorator import Consumer, exclusive_task, from_conf
    from exclusive_xcom.errors import (
        AlreadyConsumedError,
        ClaimConflictError,
        ExclusiveXComError,
        LedgerError,
        LedgerIntegrityError,
        LedgerUnavailableError,
        NotAuthorizedError,
        PayloadError,
    )

_WHERE = {
    "claim": "exclusive_xcom.api",
    "Consumer": "exclusive_xcom.decorator",
    "exclusive_task": "exclusive_xcom.decorator",
    "from_conf": "exclusive_xcom.decorator",
    "from_asset": "exclusive_xcom.assets",
    "AlreadyConsumedError": "exclusive_xcom.errors",
    "ClaimConflictError": "exclusive_xcom.errors",
    "ExclusiveXComError": "exclusive_xcom.errors",
    "LedgerError": "exclusive_xcom.errors",
    "LedgerIntegrityError": "exclusive_xcom.errors",
    "LedgerUnavailableError": "exclusive_xcom.errors",
    "NotAuthorizedError": "exclusive_xcom.errors",
    "PayloadError": "exclusive_xcom.errors",
}

__all__ = [
    "AlreadyConsumedError",
    "ClaimConflictError",
    "Consumer",
    "ExclusiveXComError",
    "LedgerError",
    "LedgerIntegrityError",
    "LedgerUnavailableError",
    "NotAuthorizedError",
    "PayloadError",
    "claim",
    "exclusive_task",
    "from_asset",
    "from_conf",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'exclusive_xcom' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
