"""Worker processes and the clock: run N workloads at once for a bounded time, count items.

The processes are spawned once (``spawn``: nothing inherited, each builds its own
connections) and reused by every measurement. A measurement sends each worker a workload
(:mod:`benchmarks.workloads`), waits until all of them have connected, then starts them
together with one wall-clock deadline. A worker stops at the deadline or when its queue
is empty; throughput is all items over the time from start to the last worker's stop.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any

READY_TIMEOUT = 60.0


@dataclass
class Measurement:
    items: int
    seconds: float
    steps: int
    per_worker: list[int]

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def row(self, queue: int) -> dict[str, Any]:
        """The figures every throughput table reports, for a queue of ``queue`` items."""
        return {
            "items": self.items,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.rate, 1),
            "queue": queue,
            "ran_dry": self.items >= queue,
        }


def _serve(index: int, inbox: Any, outbox: Any) -> None:
    while (job := inbox.get()) is not None:
        target, kwargs = job
        module, name = target.rsplit(":", 1)
        try:
            workload = getattr(importlib.import_module(module), name)(**kwargs)
            next(workload)  # connected and prepared
            outbox.put((index, "ready", None))
            deadline = inbox.get()
            if deadline is None:  # another worker failed to get ready
                workload.close()
                continue
            started = time.time()
            items = steps = 0
            while time.time() < deadline:
                got = next(workload)
                steps += 1
                items += got
                if not got:
                    break
            stopped = time.time()
            workload.close()
            outbox.put((index, "done", {"items": items, "steps": steps, "started": started, "stopped": stopped}))
        except BaseException:
            outbox.put((index, "error", traceback.format_exc()))


class Workers:
    """A fixed set of spawned worker processes."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(count)]
        self.procs = [
            ctx.Process(target=_serve, args=(i, inbox, self.outbox), name=f"bench-worker-{i}", daemon=True)
            for i, inbox in enumerate(self.inboxes)
        ]
        for proc in self.procs:
            proc.start()

    def measure(self, target: str, kwargs: list[dict[str, Any]], duration: float) -> Measurement:
        """Run ``target(**kwargs[i])`` in worker ``i`` for at most ``duration`` seconds."""
        used = self.inboxes[: len(kwargs)]
        for inbox, kw in zip(used, kwargs, strict=True):
            inbox.put((target, kw))
        ready, errors = [], []
        for _ in used:
            index, kind, value = self.outbox.get(timeout=READY_TIMEOUT)
            if kind == "error":
                errors.append(value)
            else:
                ready.append(index)
        if errors:
            for index in ready:
                self.inboxes[index].put(None)  # no start: back to waiting for a job
            raise RuntimeError(f"a worker failed to start {target}:\n{errors[0]}")
        deadline = time.time() + duration
        for inbox in used:
            inbox.put(deadline)
        answers = [self.outbox.get(timeout=duration + READY_TIMEOUT) for _ in used]  # all, even after an error
        errors = [value for _, kind, value in answers if kind == "error"]
        if errors:
            raise RuntimeError(f"a worker failed running {target}:\n{errors[0]}")
        reports = [value for _, _, value in answers]
        started = min(r["started"] for r in reports)
        stopped = max(r["stopped"] for r in reports)
        return Measurement(
            items=sum(r["items"] for r in reports),
            seconds=stopped - started,
            steps=sum(r["steps"] for r in reports),
            per_worker=[r["items"] for r in reports],
        )

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


class PoolSizer:
    """How many items to put in a queue so a measurement is likely to run its full time.

    It remembers the best rate seen per contender and asks for twice what that rate would
    drain in ``duration``; a queue that runs dry early still gives a valid (shorter) drain.
    """

    def __init__(self, guesses: dict[str, float], low: int = 500, high: int = 400_000) -> None:
        self.rates = dict(guesses)
        self.low, self.high = low, high

    def size(self, key: str, duration: float, factor: float = 2.0) -> int:
        want = int(self.rates.get(key, 1000.0) * duration * factor)
        return max(self.low, min(self.high, want))

    def saw(self, key: str, rate: float) -> None:
        self.rates[key] = max(self.rates.get(key, 0.0), rate)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values)
