"""Payload bytes: Airflow's serde (the types XCom accepts) to and from JSON bytes."""

from __future__ import annotations

import json
from typing import Any

from exclusive_xcom.errors import ItemRef, PayloadError


def dumps(value: Any, ref: ItemRef | None = None) -> bytes:
    from airflow.sdk.serde import serialize

    try:
        return json.dumps(serialize(value), separators=(",", ":")).encode()
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise PayloadError(
            f"cannot serialize the return value ({type(value).__name__}): {exc}; return a type XCom "
            "accepts (JSON types, dataclasses, datetime, pandas/numpy through serde, ...)",
            ref,
        ) from exc


def loads(data: bytes | None, ref: ItemRef | None = None) -> Any:
    from airflow.sdk.serde import deserialize

    if data is None:
        raise PayloadError("the ledger item has no payload (already consumed or purged)", ref)
    try:
        return deserialize(json.loads(data))
    except (TypeError, ValueError, KeyError, ImportError) as exc:
        raise PayloadError(f"the stored payload is corrupted or of an unknown type: {exc}", ref) from exc
