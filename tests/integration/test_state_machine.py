"""The claim state machine explored by Hypothesis against the real ledger on every backend.

A :class:`~hypothesis.stateful.RuleBasedStateMachine` interleaves producers and three
consumer task instances at random: produce and re-produce (modes items, one and each),
claim, fail (the try ends, its claims are kept for a retry), retry (a new try begins,
fencing the old one out), finish, release (final failure), heartbeat, lease expiry and
an operator's ``release``, plus the late writes of zombie tries. A Python model predicts
every outcome; after every step the ledger's rows are checked against the model and
against the safety properties of the SPEC ("Semantics that must hold").

A database per example would be slow, so all examples of a test share the one fresh
database of ``ledger_url``: every example works in its own DAG run (a fresh ``run_id``),
so its outputs, claims and fences start from nothing. The clock is fake: a lease expires
by moving it forward, never by sleeping.

A failure prints the shortest sequence of steps Hypothesis found, and a blob to replay it
with ``@reproduce_failure``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from exclusive_xcom.errors import (
    AlreadyConsumedError,
    ClaimConflictError,
    ExclusiveXComError,
    PayloadError,
)
from exclusive_xcom.ledger import (
    EACH,
    ITEMS,
    ONE,
    Claimant,
    ClaimRequest,
    Ledger,
    Output,
    Production,
    Written,
    consumer_slot,
    create_engine,
)
from exclusive_xcom.ledger.schema import CLAIMED, CONSUMED, READY, SHARED_SLOT
from tests.conftest import FakeClock

DAG = "state_machine"
LEASE = 10.0
TICK = 4.0  # shorter than a lease: some claims expire, younger ones live on
EXPIRE = LEASE + 1.0  # every lease running now has expired (no sum of steps lands exactly on one)
CONSUMERS = (("load", 0), ("load", 1), ("audit", -1))  # two mapped instances of one task, and another task
SLOTS = tuple(sorted({consumer_slot(DAG, task) for task, _ in CONSUMERS}))
OUTPUTS = {"extract": ITEMS, "pick": ONE, "fan": EACH}  # producer task -> mode of its output
NAMES = tuple(OUTPUTS)
MAX_ITEMS = 6
MAX_RERUNS = 3  # per example: re-runs replace everything unconsumed, so more would leave little to claim
INPUTS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)  # inputs claimed together

Owner = tuple[int, int]  # (consumer index, try number)


@dataclass
class Item:
    """The model's account of one ledger row."""

    output: str
    generation: int
    slot: str
    seq: int
    payload: bytes
    state: str = READY
    owner: Owner | None = None
    lease: float | None = None

    @property
    def holder(self) -> Owner:
        """A claimed row's owner: the model sets one with every claim."""
        assert self.owner is not None, self
        return self.owner

    @property
    def expires(self) -> float:
        """A claimed row's lease expiry: the model sets one with every claim."""
        assert self.lease is not None, self
        return self.lease


# What an operation did: ("ok", ids) | ("lost", ()) | ("raise", error class).
Outcome = tuple[str, Any]


def _settings(backend: str) -> settings:
    # The servers cost a round trip per statement; SQLite gets more examples for the same time.
    examples = {"sqlite": 100, "postgres": 40, "mysql": 40}[backend]
    return settings(
        max_examples=examples,
        stateful_step_count=40,
        deadline=None,
        derandomize=False,  # Hypothesis' CI profile would fix the seed; explore anew on every run
        database=None,  # nothing written into the work tree; a failure prints a reproduction blob
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def machine_for(ledger: Ledger, clock: FakeClock) -> type[RuleBasedStateMachine]:
    """The state machine class bound to one ledger; each example gets its own DAG run in it."""
    runs = itertools.count(1)
    identities = {(task, index): ci for ci, (task, index) in enumerate(CONSUMERS)}

    class ClaimMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.run = f"example__{next(runs):04d}"
            self.items: dict[int, Item] = {}
            self.reruns = 0
            self.generation = dict.fromkeys(NAMES, 0)  # 0: not produced yet
            self.shape: dict[str, list[tuple[str, int]]] = {}  # (slot, seq) of the current generation
            self.tries = [1] * len(CONSUMERS)
            self.active = [True] * len(CONSUMERS)
            self.beliefs: dict[Owner, set[int]] = {}  # what each try was handed by its claims
            self.handles: dict[Owner, dict[str, int]] = {}  # generation of each handle a try read
            self.finished: list[tuple[Owner, frozenset[int]]] = []  # successful finishes
            self.consumed_seen: dict[int, tuple[Any, ...]] = {}
            for ci in range(len(CONSUMERS)):
                ledger.enter(self.claimant(ci, 1))

        # -- helpers ------------------------------------------------------------------------

        def claimant(self, ci: int, try_number: int) -> Claimant:
            task, index = CONSUMERS[ci]
            return Claimant(DAG, self.run, task, index, try_number)

        def rows(self) -> dict[int, dict[str, Any]]:
            return {r["id"]: r for r in ledger.items(dag_id=DAG, run_id=self.run)}

        def owner_of(self, row: dict[str, Any]) -> Owner | None:
            if row["owner_task_id"] is None:
                return None
            return identities[(row["owner_task_id"], row["owner_map_index"])], row["owner_try"]

        def live_consumers(self, data: st.DataObject) -> int:
            return data.draw(st.sampled_from([ci for ci, on in enumerate(self.active) if on]), label="consumer")

        def held_by(self, ids: Iterable[int], owner: Owner) -> list[int]:
            return [
                i for i in ids if i in self.items and self.items[i].state == CLAIMED and self.items[i].owner == owner
            ]

        # -- prediction ----------------------------------------------------------------------

        def predict_claim(self, ci: int, t: int, requests: Sequence[tuple[str, int]], limit: int) -> Outcome:
            """What Ledger.claim must do, from the model: the SPEC's rules, one request after another."""
            now = clock()
            picked: list[int] = []
            lost = False

            def claimable(it: Item) -> bool:  # a claimed row: own earlier try's, or an expired lease
                assert it.owner is not None and it.lease is not None
                if it.owner[0] == ci:
                    if it.owner[1] > t:
                        raise _Predicted(ClaimConflictError)  # a newer try of this instance holds it
                    return True
                return it.lease < now

            try:
                for name, gen in requests:
                    pool = {i: it for i, it in self.items.items() if it.output == name and it.generation == gen}
                    if OUTPUTS[name] == ITEMS:
                        live = sorted((i for i, it in pool.items() if it.state != CONSUMED), key=lambda i: pool[i].seq)
                        mine = [i for i in live if pool[i].state == CLAIMED and pool[i].holder[0] == ci]
                        own = [i for i in mine if pool[i].holder[1] < t][:limit] if t > 1 else []  # a retry's first
                        ready = [i for i in live if pool[i].state == READY]  # ready rows first, then takeovers
                        rest = ready + [
                            i
                            for i in live
                            if i not in own
                            and pool[i].state == CLAIMED
                            and (
                                (pool[i].expires < now and tuple(pool[i].holder[:2]) != (ci, t))  # never its own twice
                                or (pool[i].holder[0] == ci and pool[i].holder[1] < t)
                            )
                        ]
                        for i in own + rest[: limit - len(own)]:
                            if pool[i].state == READY or claimable(pool[i]):
                                picked.append(i)
                        continue
                    slot = consumer_slot(DAG, CONSUMERS[ci][0]) if OUTPUTS[name] == EACH else SHARED_SLOT
                    found = [i for i, it in pool.items() if it.slot == slot]
                    if not found:
                        raise _Predicted(PayloadError)  # replaced by a newer generation
                    (i,) = found
                    it = pool[i]
                    if it.state == CONSUMED:
                        assert it.owner is not None
                        if OUTPUTS[name] == ONE and it.owner[0] != ci:
                            lost = True
                            continue
                        raise _Predicted(AlreadyConsumedError)
                    if it.state == CLAIMED and not claimable(it):
                        if OUTPUTS[name] == ONE:
                            lost = True
                            continue
                        raise _Predicted(ClaimConflictError)
                    picked.append(i)
            except _Predicted as error:
                return "raise", error.kind
            if lost:
                return "lost", ()
            if self.tries[ci] > t:
                return "raise", ClaimConflictError  # fenced: a newer try has begun
            return "ok", tuple(picked)

        # -- operations ----------------------------------------------------------------------

        def begin_try(self, ci: int) -> None:
            """The next try of a consumer starts: from now on its older tries are fenced out."""
            self.tries[ci] += 1
            self.active[ci] = True
            ledger.enter(self.claimant(ci, self.tries[ci]))

        def claim(self, ci: int, t: int, names: Sequence[str], limit: int) -> None:
            handles = self.handles.setdefault((ci, t), {})
            requests = []
            for name in names:
                if name not in handles and self.generation[name]:
                    handles[name] = self.generation[name]  # the try reads the producer's handle
                if name in handles:
                    requests.append((name, handles[name]))
            if not requests:
                return
            expected = self.predict_claim(ci, t, requests, limit)
            reqs = [ClaimRequest(Written(Output(DAG, self.run, n), g, OUTPUTS[n], SLOTS), limit) for n, g in requests]
            try:
                result = ledger.claim(self.claimant(ci, t), reqs)
            except ExclusiveXComError as exc:
                actual: Outcome = ("raise", type(exc))
            else:
                if result.lost:
                    assert result.ids == [] and result.claims == [], "a lost `one` input must leave no claims"
                    actual = ("lost", ())
                else:
                    actual = ("ok", tuple(result.ids))
                    payloads = [p for c in result.claims for p in c.payloads]
                    assert payloads == [self.items[i].payload for i in result.ids if i in self.items], (
                        "claimed payloads are not those of the claimed items"
                    )
            if actual != expected:
                assert self.zombie_leeway(ci, t, requests, actual), (
                    f"claim by {self.claimant(ci, t)} of {requests} limit {limit}: expected {expected}, got {actual}"
                )
            if actual[0] == "ok" and actual[1]:
                lease = clock() + LEASE
                for i in actual[1]:
                    it = self.items[i]
                    it.state, it.owner, it.lease = CLAIMED, (ci, t), lease
                self.beliefs.setdefault((ci, t), set()).update(actual[1])

        def zombie_leeway(self, ci: int, t: int, requests: Sequence[tuple[str, int]], actual: Outcome) -> bool:
            """Whether a claim by a fenced (older) try that did not do what the model predicts is
            still acceptable. How such a try is refused is being tightened (it is refused outright,
            or it may be handed only fresh items of an `items` pool), so neither is asserted; it
            never gets what a newer try of its own or another task's live claim holds."""
            if t >= self.tries[ci]:
                return False
            if actual == ("raise", ClaimConflictError):
                return True
            if actual[0] != "ok":
                return False
            now = clock()
            for i in actual[1]:
                it = self.items.get(i)
                if it is None or it.state == CONSUMED or (it.output, it.generation) not in set(requests):
                    return False
                if OUTPUTS[it.output] != ITEMS:
                    return False
                if it.state == CLAIMED:
                    assert it.owner is not None and it.lease is not None
                    if it.owner[0] == ci and it.owner[1] > t:
                        return False  # never what the newer try holds
                    if it.owner[0] != ci and it.lease >= now:
                        return False  # never another task's live claim
            return True

        def finish(self, ci: int, t: int) -> None:
            ids = sorted(self.beliefs.get((ci, t), ()))
            fenced = self.tries[ci] > t
            ok = not fenced and len(self.held_by(ids, (ci, t))) == len(ids)
            try:
                ledger.finish(self.claimant(ci, t), ids)
            except ClaimConflictError:
                assert not ok, f"{self.claimant(ci, t)} holds {ids} but its finish was refused"
                return
            if not ids:
                return  # nothing to consume: a fenced try may be refused or not, nothing changes
            assert ok, f"{self.claimant(ci, t)} finished {ids} although it no longer holds them all"
            before = {i for i, it in self.items.items() if it.state == CONSUMED}
            for i in ids:
                self.items[i].state, self.items[i].lease = CONSUMED, None
            after = {i for i, r in self.rows().items() if r["state"] == CONSUMED}
            assert after - before == set(ids), "a successful finish consumed exactly the ids the try held"
            for other, done in self.finished:
                assert not done & set(ids), f"{ids} finished by {(ci, t)}: {done & set(ids)} already by {other}"
            self.finished.append(((ci, t), frozenset(ids)))

        def release(self, ci: int, t: int) -> None:
            ids = sorted(self.beliefs.get((ci, t), ()))
            mine = self.held_by(ids, (ci, t))
            assert ledger.release(self.claimant(ci, t), ids) == len(mine)
            for i in mine:
                self.items[i].state, self.items[i].owner, self.items[i].lease = READY, None, None

        def produce(self, name: str, n: int) -> None:
            mode, gen = OUTPUTS[name], self.generation[name] + 1
            payloads = [f"{name}/{gen}/{s}".encode() for s in range(n)] if mode == ITEMS else [f"{name}/{gen}".encode()]
            count = ledger.produce(Production(Written(Output(DAG, self.run, name), gen, mode, SLOTS), payloads))
            self.shape[name] = (
                [(SHARED_SLOT, s) for s in range(n)]
                if mode == ITEMS
                else [(SHARED_SLOT, 0)]
                if mode == ONE
                else [(slot, 0) for slot in SLOTS]
            )
            assert count == len(self.shape[name])
            self.generation[name] = gen
            for i in [i for i, it in self.items.items() if it.output == name and it.state != CONSUMED]:
                del self.items[i]  # replaced: never duplicated
            for i, r in self.rows().items():
                if r["task_id"] == name and r["generation"] == gen:
                    payload = payloads[r["seq"]] if mode == ITEMS else payloads[0]
                    self.items[i] = Item(name, gen, r["slot"], r["seq"], payload)

        # -- rules ---------------------------------------------------------------------------
        # Hypothesis tries rules with fewer arguments first, then by name: `claim_inputs` leads.

        @initialize(names=st.lists(st.sampled_from(NAMES), min_size=1, unique=True), n=st.integers(0, MAX_ITEMS))
        def producers_run(self, names: list[str], n: int) -> None:
            """Some producers write their outputs (n items for the `items` pool); the others may run
            later. Fewer outputs make consumers collide more often."""
            for name in names:
                self.produce(name, n)

        @precondition(lambda self: self.reruns < MAX_RERUNS)
        @rule(name=st.sampled_from(NAMES), n=st.integers(0, MAX_ITEMS))
        def producer_reruns(self, name: str, n: int) -> None:
            """A cleared producer runs again: a higher generation replaces what is unconsumed."""
            self.reruns += 1
            self.produce(name, n)

        @precondition(lambda self: any(self.active))
        @rule(data=st.data())
        def claim_inputs(self, data: st.DataObject) -> None:
            """A running try claims one or more inputs in one transaction (a batch for `items`)."""
            ci = self.live_consumers(data)
            names = data.draw(INPUTS, label="inputs")
            self.claim(ci, self.tries[ci], names, data.draw(st.integers(1, 4), label="limit"))

        @precondition(lambda self: not all(self.active))
        @rule(data=st.data())
        def retry(self, data: st.DataObject) -> None:
            """The next try of a task instance whose try ended begins (a retry, or a re-run after
            a clear): it enters the fence, then claims its inputs. The old try may live on as a
            zombie (see `zombie_acts`)."""
            ci = data.draw(st.sampled_from([c for c, on in enumerate(self.active) if not on]), label="consumer")
            before = self.handles.get((ci, self.tries[ci]), {})  # the same task code claims the same inputs
            names = sorted(set(before) | set(data.draw(INPUTS, label="inputs")))
            self.begin_try(ci)
            self.claim(ci, self.tries[ci], names, data.draw(st.integers(1, 4), label="limit"))

        @precondition(lambda self: any(self.active))
        @rule(data=st.data())
        def stall_and_takeover(self, data: st.DataObject) -> None:
            """A running try stalls past its lease (SIGSTOP, a long pause) and another consumer task
            instance claims the same inputs meanwhile; the stalled try stays running and may wake."""
            ci = self.live_consumers(data)
            names = sorted(self.handles.get((ci, self.tries[ci]), {})) or list(NAMES)
            other = data.draw(st.sampled_from([c for c in range(len(CONSUMERS)) if c != ci]), label="other")
            clock.now += EXPIRE
            if not self.active[other]:
                self.begin_try(other)
            self.claim(other, self.tries[other], names, data.draw(st.integers(1, 4), label="limit"))

        @precondition(lambda self: any(self.active))
        @rule(data=st.data())
        def succeed(self, data: st.DataObject) -> None:
            """The try succeeds: it finishes the ids it believes it holds (or learns it lost them)."""
            ci = self.live_consumers(data)
            self.active[ci] = False
            self.finish(ci, self.tries[ci])

        @precondition(lambda self: any(self.active))
        @rule(data=st.data(), final=st.booleans())
        def fail(self, data: st.DataObject, final: bool) -> None:
            """The try fails. Not the last one: it keeps its claims for its retry (until the lease
            expires). The last one: it gives back what it still holds."""
            ci = self.live_consumers(data)
            self.active[ci] = False
            if final:
                self.release(ci, self.tries[ci])

        @precondition(lambda self: any(self.active))
        @rule(data=st.data())
        def heartbeat(self, data: st.DataObject) -> None:
            """A running try renews its leases: True only while it still holds everything."""
            ci = self.live_consumers(data)
            t = self.tries[ci]
            ids = sorted(self.beliefs.get((ci, t), ()))
            mine = self.held_by(ids, (ci, t))
            assert ledger.extend_lease(self.claimant(ci, t), ids) is (len(mine) == len(ids))
            for i in mine:
                self.items[i].lease = clock() + LEASE

        @rule(seconds=st.sampled_from([TICK, EXPIRE]))
        def time_passes(self, seconds: float) -> None:
            """TICK: the youngest leases live on; EXPIRE: every lease running now is over (workers died)."""
            clock.now += seconds

        @precondition(lambda self: any(it.state == CLAIMED for it in self.items.values()))
        @rule(data=st.data())
        def operator_release(self, data: st.DataObject) -> None:
            """`exclusive-xcom release ID`: an operator frees a stuck claim, whoever holds it."""
            held = sorted(i for i, it in self.items.items() if it.state == CLAIMED)
            i = data.draw(st.sampled_from(held), label="item")
            assert ledger.release_any([i]) == 1
            self.items[i].state, self.items[i].owner, self.items[i].lease = READY, None, None

        @precondition(lambda self: max(self.tries) > 1)
        @rule(data=st.data(), action=st.sampled_from(["finish", "release", "claim"]))
        def zombie_acts(self, data: st.DataObject, action: str) -> None:
            """An older try, still running somewhere, acts late. Its finish is fenced (consumes
            nothing), its release gives back only what that very try still holds, and its claim
            never gets what the newer try or another live claim holds."""
            ci = data.draw(st.sampled_from([c for c, t in enumerate(self.tries) if t > 1]), label="consumer")
            t = self.tries[ci] - data.draw(st.integers(1, self.tries[ci] - 1), label="tries ago")
            if action == "finish":
                self.finish(ci, t)
            elif action == "release":
                self.release(ci, t)
            else:
                self.claim(ci, t, data.draw(INPUTS, label="inputs"), data.draw(st.integers(1, 4), label="limit"))

        # -- invariants ----------------------------------------------------------------------

        @invariant()
        def ledger_agrees_with_model(self) -> None:
            rows = self.rows()
            self.check_one_owner(rows)
            self.check_consumed_is_final(rows)
            self.check_nothing_vanishes(rows)
            self.check_model(rows)
            self.check_finishes(rows)
            self.check_no_phantom_claims(rows)

        def check_one_owner(self, rows: dict[int, dict[str, Any]]) -> None:
            """A claimed row has exactly one owner (identity and try) and a lease; a ready row none."""
            owner_cols = ("owner_dag_id", "owner_run_id", "owner_task_id", "owner_map_index", "owner_try")
            for r in rows.values():
                if r["state"] == READY:
                    assert all(r[c] is None for c in (*owner_cols, "lease_expires_at", "consumed_at")), r
                    continue
                assert r["state"] in (CLAIMED, CONSUMED), r
                assert (r["owner_dag_id"], r["owner_run_id"]) == (DAG, self.run), r
                assert (r["owner_task_id"], r["owner_map_index"]) in identities and r["owner_try"] >= 1, r
                if r["state"] == CLAIMED:
                    assert r["lease_expires_at"] is not None and r["consumed_at"] is None, r
                else:
                    assert r["consumed_at"] is not None and r["lease_expires_at"] is None, r

        def check_consumed_is_final(self, rows: dict[int, dict[str, Any]]) -> None:
            """A consumed row never goes back, never changes owner, never disappears."""
            for i, owner in self.consumed_seen.items():
                assert i in rows, f"consumed item {i} disappeared"
                r = rows[i]
                assert r["state"] == CONSUMED, f"consumed item {i} went back to {r['state']}"
                now = (r["owner_task_id"], r["owner_map_index"], r["owner_try"], r["consumed_at"])
                assert now == owner, f"consumed item {i} changed: {owner} -> {now}"
            for i, r in rows.items():
                if r["state"] == CONSUMED and i not in self.consumed_seen:
                    self.consumed_seen[i] = (r["owner_task_id"], r["owner_map_index"], r["owner_try"], r["consumed_at"])

        def check_nothing_vanishes(self, rows: dict[int, dict[str, Any]]) -> None:
            """The current generation holds every produced (slot, seq) exactly once; older ones only
            what was consumed."""
            for name, shape in self.shape.items():
                gen = self.generation[name]
                mine = [r for r in rows.values() if r["task_id"] == name]
                current = sorted((r["slot"], r["seq"]) for r in mine if r["generation"] == gen)
                assert current == sorted(shape), f"{name} generation {gen}: {current} != {sorted(shape)}"
                older = [r for r in mine if r["generation"] != gen]
                assert all(r["generation"] < gen and r["state"] == CONSUMED for r in older), older

        def check_model(self, rows: dict[int, dict[str, Any]]) -> None:
            """Every row is where the model says: state and owner; and the same consumed set."""
            ledger_view = {i: (r["state"], self.owner_of(r)) for i, r in rows.items()}
            model_view = {i: (it.state, it.owner) for i, it in self.items.items()}
            assert ledger_view == model_view
            consumed = {i for i, r in rows.items() if r["state"] == CONSUMED}
            assert consumed == {i for i, it in self.items.items() if it.state == CONSUMED}

        def check_finishes(self, rows: dict[int, dict[str, Any]]) -> None:
            """Each consumed row was consumed by exactly one successful finish: its owner's."""
            seen: dict[int, Owner] = {}
            for owner, ids in self.finished:
                for i in ids:
                    assert i not in seen, f"item {i} finished by {seen[i]} and again by {owner}"
                    seen[i] = owner
                    assert self.owner_of(rows[i]) == owner and rows[i]["state"] == CONSUMED
            assert set(seen) == {i for i, r in rows.items() if r["state"] == CONSUMED}

        def check_no_phantom_claims(self, rows: dict[int, dict[str, Any]]) -> None:
            """A claim belongs to a try that was handed that id by one of its claims."""
            for i, r in rows.items():
                if r["state"] == CLAIMED:
                    owner = self.owner_of(r)
                    assert owner is not None and i in self.beliefs.get(owner, set()), (i, owner)

    return ClaimMachine


class _Predicted(Exception):
    def __init__(self, kind: type[ExclusiveXComError]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


def test_claim_state_machine(ledger_url: str, backend: str) -> None:
    engine = create_engine(ledger_url)
    clock = FakeClock()
    ledger = Ledger(engine, lease_seconds=LEASE, clock=clock)
    ledger.migrate()
    try:
        run_state_machine_as_test(machine_for(ledger, clock), settings=_settings(backend))
    finally:
        engine.dispose()
