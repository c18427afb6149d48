"""What a running task does with the ledger: claim its inputs, keep them alive, finish.

Shared by ``@exclusive_task`` and :func:`exclusive_xcom.claim`, so both follow one set of
rules: inputs are claimed in one transaction before user code runs; the claims are kept
alive by a heartbeat while it runs; they are consumed, together with the task's own
exclusive output, in one transaction when it succeeds; they are kept for a retry when it
fails, and released when it fails for good.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from exclusive_xcom import handle as handles
from exclusive_xcom import metrics
from exclusive_xcom.compat import get_hostname
from exclusive_xcom.config import load_settings
from exclusive_xcom.errors import (
    ConfigurationError,
    ExclusiveXComError,
    ItemRef,
    LedgerUnavailableError,
    PayloadError,
    amended,
    named,
)
from exclusive_xcom.handle import Handle
from exclusive_xcom.ledger import (
    ITEMS,
    Claimant,
    ClaimRequest,
    ClaimResult,
    Finished,
    Offloaded,
    Output,
    Production,
    Stored,
)
from exclusive_xcom.stream import ItemStream
from exclusive_xcom.walk import walk
from exclusive_xcom.wiring import Env, env, env_for

log = logging.getLogger("exclusive_xcom")

#: How long a try that failed for good keeps trying to give its claims back while the ledger
#: is unreachable: long enough to outlast a server restart (the likely cause of the failure),
#: short enough not to hold up the task's end for long. After that, the lease frees them.
RELEASE_PATIENCE = 15.0


def open_session(context: Mapping[str, Any], found: Sequence[Mapping[str, Any]] = ()) -> Session:
    """A session for the running task instance, opening the ledger of this process.

    Opening the ledger is the first database contact of a task (the schema check, then a
    retry's fence), and it happens before any item is known; an error there still names
    the task and, when the task has inputs, the first producer it was to claim from.
    """
    ti = context["ti"]
    first = found[0] if found else {}
    ref = ItemRef(
        ti.dag_id,
        ti.run_id,
        str(first.get("task_id", ti.task_id)),
        str(first.get("key", "return_value")),
        ti.task_id if found else "-",
    )
    with named(ref):  # a configuration error, too, says which task met it
        settings = load_settings()
        claimant = claimant_of(context, settings.teams.of)
        session = Session(claimant, env_for(settings))
        if claimant.try_number > 1:  # from here on, older tries are fenced out
            session.earlier = session.env.ledger.enter(claimant)
            session.entered = True
        return session


def claimant_of(context: Mapping[str, Any], team_of: Callable[[str], str] = lambda _dag_id: "") -> Claimant:
    """The running task instance and try, in its DAG's team (``team_of``: ``Teams.of``), with
    what its claims and consumes record of it: the task-instance id the task runner was
    started with, and this host."""
    ti = context["ti"]
    map_index = ti.map_index if ti.map_index is not None else -1
    ti_id = getattr(ti, "id", None)
    return Claimant(
        ti.dag_id,
        ti.run_id,
        ti.task_id,
        map_index,
        ti.try_number,
        team_of(ti.dag_id),
        ti_id=None if ti_id is None else str(ti_id),
        host=this_host(),
    )


@lru_cache(maxsize=1)
def this_host() -> str:
    """This machine's name as the task runner reports it to Airflow (``task_instance.hostname``):
    ``[core] hostname_callable``, else the FQDN. Once per process: the FQDN costs a DNS lookup."""
    return get_hostname()


def is_final_try(context: Mapping[str, Any]) -> bool:
    ti = context["ti"]
    max_tries = getattr(ti, "max_tries", None)
    if max_tries is None:
        max_tries = context["task"].retries or 0
    try_number: int = ti.try_number
    return try_number > max_tries


@dataclass
class Session:
    """One task try's claims: what it holds, and the ledger it holds them in."""

    claimant: Claimant
    env: Env
    ids: list[int] = field(default_factory=list)
    inputs: list[Handle] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)  # offloaded payloads of what it holds
    written: list[str] = field(default_factory=list)  # blobs its outputs wrote, not yet committed
    produced_items: int = 0
    offloaded_bytes: int = 0
    earlier: Finished | None = None  # an earlier try of this task instance that finished
    # Whether this try is recorded on its fence row. A retry enters when it opens (it must learn
    # whether an earlier try finished); a first try has no earlier one, so its first claim or
    # finish enters it inside its own transaction, one commit fewer per task.
    entered: bool = False
    streams: int = 0  # work queues read batch by batch while the function runs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # ids vs. the heartbeat
    _blob_ids: dict[int, str] = field(default_factory=dict, repr=False)  # offloaded items' blobs, by id

    # -- inputs ---------------------------------------------------------------------------

    def claim(self, found: Sequence[Mapping[str, Any]], batch_size: int, max_items: int | None) -> list[Any]:
        """Claim every handle in ``found`` (all or none) and return their values in order.

        Raises :class:`Lost`, having claimed nothing, when a ``one``-mode input went to
        another consumer, and :class:`DoneBefore` when an earlier try of this task
        instance already consumed these inputs (its finish committed, then the try failed).
        """
        parsed = [handles.parse(h, self.env.keyring, self.claimant.slot) for h in found]
        self.inputs.extend(parsed)
        self.check_done()
        first = min(batch_size, max_items) if max_items else batch_size
        try:
            result = self._claim([h.request(first) for h in parsed])
            if result.lost:
                raise Lost(result.lost)
            values = [self._values(h, c.payloads) for h, c in zip(parsed, result.claims, strict=True)]
            for h, claimed, value in zip(parsed, result.claims, values, strict=True):
                if not claimed.request.slot_row and len(claimed.ids) == first:
                    value.extend(self._drain(h, batch_size, (max_items or 0) - len(claimed.ids)))
        except ExclusiveXComError as exc:
            raise amended(exc, self._holding(exc)) from (exc.__cause__ or exc)
        return values

    def _holding(self, exc: ExclusiveXComError) -> str:
        """What this try holds when a claim failed, and what becomes of it."""
        maybe = isinstance(exc, LedgerUnavailableError) and exc.maybe_committed
        if not self.ids and not maybe:
            return "this try holds no items"
        held = _describe_ids(self.ids) if self.ids else "no items"
        if maybe:
            held += " (and the items of the claim that failed, if it took effect)"
        return f"this try holds {held}: its retry takes them back first; if it fails for good, they are released"

    def _drain(self, h: Handle, batch_size: int, remaining: int) -> list[Any]:
        """Keep claiming batches of a work queue until it is empty (or the cap is reached)."""
        drained: list[Any] = []
        capped = remaining > 0
        renewed = time.monotonic()
        while not capped or remaining > 0:
            if time.monotonic() - renewed > self.env.ledger.lease_seconds / 3:  # a long drain outlives leases
                self.env.ledger.extend_lease(self.claimant, self.ids)
                renewed = time.monotonic()
            limit = min(batch_size, remaining) if capped else batch_size
            (claimed,) = self._claim([h.request(limit)]).claims
            drained.extend(self._values(h, claimed.payloads))
            remaining -= len(claimed.ids)
            if len(claimed.ids) < limit:
                break
        return drained

    def check_done(self) -> None:
        """Raise :class:`DoneBefore` if an earlier try of this task instance consumed these inputs."""
        if self.earlier is not None and self.earlier.covers(self._input_outputs()):
            raise DoneBefore(self.earlier.try_number)

    def stream(self, found: Mapping[str, Any], batch_size: int, max_items: int | None) -> ItemStream:
        """A work queue's items, claimed batch by batch while the function iterates."""
        h = handles.parse(found, self.env.keyring, self.claimant.slot)
        if h.mode != ITEMS or h.seq is not None:
            raise ConfigurationError(
                f"an Iterator/Iterable argument streams a work queue: {h.output.task_id!r} must have mode='items' "
                f"(it has mode={h.mode!r}); annotate the argument with the value's type instead",
                h.output.ref(self.claimant.slot),
            )
        self.inputs.append(h)
        self.streams += 1
        return ItemStream(self, h, batch_size, max_items)

    def claim_batch(self, h: Handle, limit: int) -> tuple[list[int], list[Any]]:
        """The next batch of a stream: its ids and values (the stream's claim errors say what the try holds)."""
        try:
            (claimed,) = self._claim([h.request(limit)]).claims
            return claimed.ids, self._values(h, claimed.payloads)
        except ExclusiveXComError as exc:
            raise amended(exc, self._holding(exc)) from (exc.__cause__ or exc)

    def acknowledge(self, ids: Sequence[int]) -> None:
        """Consume a batch the function is done with, while it goes on (at most it is redone)."""
        with self._lock:
            blobs = [self._blob_ids.pop(i) for i in ids if i in self._blob_ids]
            with named(self._ref()):
                stale = self.env.ledger.finish(self.claimant, ids, (), blobs, enter=not self.entered)
            done, gone = set(ids), set(blobs)
            self.ids[:] = [i for i in self.ids if i not in done]
            self.blobs[:] = [uri for uri in self.blobs if uri not in gone]
        log.info("exclusive_xcom: %s consumed %s (a batch it is done with)", self.claimant, _describe_ids(ids))
        metrics.consumed(len(ids), dag_id=self.claimant.dag_id, task_id=self.claimant.task_id)
        if stale:
            self.env.codec.store.delete(stale)

    def _claim(self, requests: list[ClaimRequest]) -> ClaimResult:
        """One ledger claim: hold what it got, log each input's items and owner, count it."""
        started = time.perf_counter()
        result = self.env.ledger.claim(self.claimant, requests, enter=not self.entered)
        self.entered = True
        elapsed = time.perf_counter() - started
        with self._lock:
            self.ids.extend(result.ids)
            self.blobs.extend(uri for c in result.claims for uri in c.uris)
        for claimed in result.claims:
            for item_id, payload in zip(claimed.ids, claimed.payloads, strict=True):
                if isinstance(payload, Offloaded):
                    self._blob_ids[item_id] = payload.uri
        c = self.claimant
        for claimed in result.claims:
            out, mode = claimed.request.output, claimed.request.written.mode
            log.info(
                "exclusive_xcom: claimed %s of %s/%s/%s (mode %s) for %s in %.1f ms: %s",
                _describe_ids(claimed.ids),
                out.dag_id,
                out.run_id,
                out.producer,
                mode,
                c,
                elapsed * 1000,
                claimed.describe_origins(),
            )
            metrics.claimed(len(claimed.ids), elapsed, dag_id=c.dag_id, task_id=c.task_id, mode=mode)
        return result

    def _values(self, h: Handle, raw: Sequence[Stored]) -> Any:
        ref = h.output.ref(self.claimant.slot)
        values = [self.env.codec.decode(data, ref) for data in raw]
        return values[0] if h.request().slot_row else values

    # -- lifetime -------------------------------------------------------------------------

    @contextmanager
    def kept_alive(self) -> Iterator[None]:
        """Renew the lease while user code runs, so a long task is not mistaken for a dead one."""
        if not self.ids and not self.streams:
            yield
            return
        stop = threading.Event()
        interval = max(self.env.ledger.lease_seconds / 3, 0.5)

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    with self._lock:
                        held = list(self.ids)
                        renewed = not held or self.env.ledger.extend_lease(self.claimant, held)
                    if not renewed:
                        log.warning("exclusive_xcom: %s lost some claims (fenced or taken over)", self.claimant)
                except Exception as exc:  # keep beating; finish() reports a lost claim for good
                    log.warning("exclusive_xcom: lease renewal failed: %s", exc)

        thread = threading.Thread(target=beat, name="exclusive-xcom-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def finish(self, productions: Sequence[Production] = ()) -> None:
        """Consume inputs and write outputs in one transaction, then delete unneeded blobs."""
        try:
            with named(self._ref(productions)):
                stale = self.env.ledger.finish(
                    self.claimant,
                    self.ids,
                    productions,
                    self.blobs,
                    inputs=self._input_outputs(),
                    enter=not self.entered,
                )
        except LedgerUnavailableError:
            raise  # it may have committed after all: its blobs stay for the sweep to judge
        except Exception:
            self._discard_written()
            raise
        c = self.claimant
        if self.ids:
            log.info("exclusive_xcom: %s consumed %s", c, _describe_ids(self.ids))
            metrics.consumed(len(self.ids), dag_id=c.dag_id, task_id=c.task_id)
        if productions:
            log.info("exclusive_xcom: %s wrote %s", c, self._written_summary())
            metrics.produced(
                self.produced_items, dag_id=c.dag_id, task_id=c.task_id, offloaded_bytes=self.offloaded_bytes
            )
        self.written.clear()  # committed: from now on these blobs are the ledger's
        if stale:
            self.env.codec.store.delete(stale)

    def _discard_written(self) -> None:
        if self.written:
            self.env.codec.store.delete(self.written)
            self.written.clear()

    def fail(self, final: bool) -> None:
        """Keep claims for the retry; give them back when no retry will come.

        A final failure releases everything this try holds of its inputs, not only the
        claims it knows of: it may have failed in any step (a later batch of a drain, a
        claim whose reply was lost), and what it holds would otherwise wait for its lease.
        """
        if not self.inputs:
            return  # it never asked for anything
        if not final:
            if self.ids:
                log.info("exclusive_xcom: %s keeps %d claim(s) for its retry", self.claimant, len(self.ids))
            return
        try:
            released = self._release_held()
        except Exception as exc:  # the lease frees them anyway; do not mask the task's own error
            log.warning("exclusive_xcom: could not release claims (their lease will expire): %s", exc)
            return
        if released or self.ids:
            log.info("exclusive_xcom: %s failed for good; released %d claim(s)", self.claimant, released)
            metrics.released(released, dag_id=self.claimant.dag_id, task_id=self.claimant.task_id)

    def _release_held(self) -> int:
        """Release what this try holds, waiting out a ledger that is briefly unreachable."""
        deadline, pause = time.monotonic() + RELEASE_PATIENCE, 0.2
        while True:
            try:
                return self.env.ledger.release_held(self.claimant, self._input_outputs())
            except LedgerUnavailableError as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.info("exclusive_xcom: releasing %s's claims: %s; trying again", self.claimant, exc)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _input_outputs(self) -> list[tuple[Output, int]]:
        """The outputs (and generations) this try's inputs come from, each once."""
        return list(dict.fromkeys((h.output, h.generation) for h in self.inputs))

    def _ref(self, productions: Sequence[Production] = ()) -> ItemRef:
        """Whom an error of this session names: its first input, else its own output."""
        if self.inputs:
            return self.inputs[0].output.ref(self.claimant.slot)
        if productions:
            return productions[0].output.ref()
        return ItemRef(self.claimant.dag_id, self.claimant.run_id, "-", "-", self.claimant.slot)

    # -- outputs ----------------------------------------------------------------------------

    def production(
        self, value: Any, mode: str, consumers: tuple[str, ...], split: tuple[str, ...] = ()
    ) -> tuple[Production, Handle]:
        """The output to write; ``items`` are encoded lazily, as the ledger inserts them.

        ``split`` (mode each): consumers mapped over the output, which get one row per element.
        """
        output, generation = self._own_output(), self.claimant.try_number
        ref = output.ref()
        self.env.settings.teams.check_together(output.dag_id, (c.split("/", 1)[0] for c in consumers), ref)
        folder = f"{output.output_id}/{generation}"
        handle = Handle(output, generation, mode, consumers)
        if mode == ITEMS:
            data: Any = (self._encode(v, folder, ref) for v in _iterable(value, ref))
            return Production(handle, data), handle
        elements = [self._encode(v, folder, ref) for v in _iterable(value, ref)] if split else []
        whole = [self._encode(value, folder, ref)] if set(consumers) - set(split) else []
        return Production(handle, whole, split, elements), handle

    def handle_of(self, generation: int, mode: str, consumers: tuple[str, ...]) -> Handle:
        """The handle of the output an earlier try (``generation``) of this task instance wrote."""
        return Handle(self._own_output(), generation, mode, consumers)

    def _own_output(self) -> Output:
        c = self.claimant
        return Output(c.dag_id, c.run_id, c.task_id, c.map_index, team=c.team)

    def _encode(self, value: Any, folder: str, ref: ItemRef) -> bytes | Offloaded:
        stored = self.env.codec.encode(value, folder, ref)
        self.produced_items += 1
        if isinstance(stored, Offloaded):
            self.written.append(stored.uri)
            self.offloaded_bytes += stored.size
        return stored

    def _written_summary(self) -> str:
        offloaded = f", {len(self.written)} offloaded ({self.offloaded_bytes} bytes)" if self.offloaded_bytes else ""
        return f"{self.produced_items} item(s){offloaded}"


def _describe_ids(ids: Sequence[int]) -> str:
    """Item ids for a log line: all of a few, the range of many."""
    if not ids:
        return "no items"
    if len(ids) <= 5:
        return "item " + ", ".join(map(str, ids)) if len(ids) == 1 else "items " + ", ".join(map(str, ids))
    return f"{len(ids)} items (ids {min(ids)}..{max(ids)})"


class DoneBefore(Exception):
    """An earlier try of this task instance consumed the same inputs: its finish committed.

    It failed after that commit (a lost acknowledgement, a failed XCom push), so this try
    must not run the function again: the inputs are gone, and its output is already written.
    """

    def __init__(self, try_number: int) -> None:
        super().__init__(f"try {try_number} of this task instance already consumed these inputs")
        self.try_number = try_number


class Lost(Exception):
    """A ``one``-mode input went to another consumer; the caller skips the task."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _iterable(value: Any, ref: Any) -> Iterator[Any]:
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise PayloadError(
            "mode='items' (or a consumer mapped over the output) needs an iterable return value (list, tuple, "
            f"generator, ...), got {type(value).__name__}",
            ref,
        )
    return iter(value)


# -- finding handles among arguments --------------------------------------------------------


def find_handles(value: Any) -> list[Mapping[str, Any]]:
    """Every handle inside ``value`` (nested lists, tuples, dicts), in traversal order."""
    found: list[Mapping[str, Any]] = []

    def keep(h: Mapping[str, Any]) -> Mapping[str, Any]:
        found.append(h)
        return h

    walk(value, handles.is_handle, keep, sequences=True)
    return found


def replace_handles(value: Any, values: Sequence[Any]) -> Any:
    """``value`` with its handles replaced, in :func:`find_handles` order, by ``values``."""
    it = iter(values)
    return walk(value, handles.is_handle, lambda _h: next(it), sequences=True)


def forget(value: Mapping[str, Any]) -> int:
    """Delete the ledger items (and blobs) a handle points at: Airflow purged the handle.

    A handle that does not verify is left alone: deleting on the word of a forged one
    would let anyone who can write an XCom row destroy another task's output.
    """
    current = env()
    h = handles.parse(value, current.keyring)
    with named(h.output.ref()):
        stale = current.ledger.forget(h.output, h.generation)
    if stale:
        current.codec.store.delete(stale)
    log.info("exclusive_xcom: forgot %s generation %d (its handle was purged)", h.output.producer, h.generation)
    return len(stale)
