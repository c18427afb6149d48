"""The signed handle: the only thing an exclusive output puts into Airflow's XCom.

A handle names an output (and the generation, i.e. producer try, that wrote it), its mode
and its allowed consumers, and carries an HMAC so a forged or edited handle (say, in a
``conf`` of a triggered run) is refused. It holds no payload: a task that pulls the
reserved key without being a consumer learns where the data is, not what it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from exclusive_xcom.crypto import Keyring
from exclusive_xcom.errors import PayloadError
from exclusive_xcom.ledger import DEFAULT_BATCH_SIZE, ClaimRequest, Output, Written

#: The XCom key exclusive outputs are pushed under (URL-safe: it is a path segment in
#: Airflow 3's Execution API).
RESERVED_KEY = "__exclusive__handle"
MARKER = "__exclusive_xcom__"
VERSION = 1
_FIELDS = ("dag_id", "run_id", "task_id", "map_index", "key", "generation", "mode", "consumers")


@dataclass(frozen=True)
class Handle(Written):
    """What was written (see :class:`Written`) as a task passes it on, maybe narrowed to one item."""

    seq: int | None = None  # one item of a mode-items output: what a consumer mapped over it gets

    def element(self, seq: int) -> Handle:
        """The handle of item ``seq`` alone (``.expand()`` gives mapped instance ``seq`` this one)."""
        return replace(self, seq=seq)

    def to_xcom(self, keys: Keyring) -> dict[str, Any]:
        body = self._body()
        return {MARKER: VERSION, **body, "sig": keys.sign(_message(body))}

    def request(self, limit: int = DEFAULT_BATCH_SIZE) -> ClaimRequest:
        return ClaimRequest(self, limit, self.seq)

    def _body(self) -> dict[str, Any]:
        o = self.output
        return {
            "dag_id": o.dag_id,
            "run_id": o.run_id,
            "task_id": o.task_id,
            "map_index": o.map_index,
            "key": o.key,
            "generation": self.generation,
            "mode": self.mode,
            "consumers": sorted(self.consumers),
            **({} if self.seq is None else {"seq": self.seq}),
            **({"team": o.team} if o.team else {}),  # where its rows are: a team's namespace
        }


def is_handle(value: Any) -> bool:
    return isinstance(value, Mapping) and MARKER in value


def parse(value: Mapping[str, Any], keys: Keyring, consumer: str = "-") -> Handle:
    """Check a handle's shape and signature; refuse anything forged or altered.

    ``consumer`` is who presented it, for the error message.
    """
    try:
        body = {name: value[name] for name in _FIELDS}
        team = str(value.get("team", ""))
        output = Output(body["dag_id"], body["run_id"], body["task_id"], int(body["map_index"]), body["key"], team)
        seq = None if value.get("seq") is None else int(value["seq"])
        handle = Handle(output, int(body["generation"]), str(body["mode"]), tuple(body["consumers"]), seq)
        signature = str(value["sig"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed exclusive_xcom handle (missing or bad field: {exc})") from exc
    if value[MARKER] != VERSION or not keys.verify(_message(handle._body()), signature):
        raise PayloadError(
            "exclusive_xcom handle signature mismatch: the handle was forged or altered, or producer and "
            "consumer use different secret_key settings",
            output.ref(consumer),
        )
    return handle


def _message(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
