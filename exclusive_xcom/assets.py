"""Exclusive outputs handed to DAGs scheduled on an asset (Airflow 3 event-driven scheduling).

A producer that lists assets in ``outlets=`` puts its signed handle — never the payload —
into the ``extra`` of each asset event it emits. A DAG scheduled on that asset reads the
handles of the events that triggered its run with :func:`from_asset`; Airflow may fold
several events into one run, so the argument is a list. Claiming is the ledger's: only a
named ``Consumer`` can, each output once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset

from exclusive_xcom.errors import ConfigurationError
from exclusive_xcom.handle import Handle, is_handle

log = logging.getLogger("exclusive_xcom")

ASSET_MARKER = "__exclusive_xcom_from_asset__"
#: The key of an asset event's ``extra`` that carries the handle.
EXTRA_KEY = "exclusive_xcom_handle"


def from_asset(asset: Asset) -> dict[str, Any]:
    """An argument of an exclusive task: the outputs handed over in the events of ``asset``
    that triggered this run (a list, empty if none carried one).

    A plain dict marker, so DAG serialization keeps it; it is resolved when the task runs.
    """
    if not isinstance(asset, Asset):
        raise ConfigurationError(f"from_asset() needs an airflow.sdk.Asset, got {asset!r}")
    return {ASSET_MARKER: {"name": asset.name, "uri": asset.uri}}


def is_marker(value: Any) -> bool:
    return isinstance(value, Mapping) and ASSET_MARKER in value


def handles_in_events(marker: Mapping[str, Any], context: Mapping[str, Any]) -> list[Any]:
    """The handles carried by the events of the marker's asset that triggered this run."""
    asset = Asset(**marker[ASSET_MARKER])
    try:
        events = context["triggering_asset_events"][asset]
    except KeyError:
        events = []
    found = [event.extra[EXTRA_KEY] for event in events if is_handle((event.extra or {}).get(EXTRA_KEY))]
    if not found:
        log.info("exclusive_xcom: no event of asset %r that triggered this run carries an exclusive output", asset.name)
    return found


def announce(task: Any, context: Mapping[str, Any], handle: Handle, keys: Any) -> None:
    """Put the handle (not the payload) into the event of each asset the task lists in ``outlets``."""
    for outlet in getattr(task, "outlets", None) or ():
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra[EXTRA_KEY] = handle.to_xcom(keys)
