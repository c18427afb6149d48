"""Case 5: peak memory to produce and to consume one offloaded payload, big vs 1 KB.

A thin wrapper over :func:`benchmarks.memory.measure` (each phase in a fresh interpreter,
the high-water mark reset just before it): growth of the peak over the phase, and that
growth as a multiple of the payload's size.
"""

from __future__ import annotations

from typing import Any

from benchmarks.memory import MB, measure
from benchmarks.settings import Settings


def run(settings: Settings) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    cases = [(size, False) for size in settings.memory_sizes]
    if not settings.quick:
        cases.append((max(settings.memory_sizes), True))
    for size, encrypt in cases:
        for phase in measure(size, encrypt):
            rows.append(
                {
                    "payload": f"{size // MB} MB" if size >= MB else f"{size // 1024} KB",
                    "encrypted": encrypt,
                    "phase": phase["phase"],
                    "peak_growth_kb": round(phase["peak_growth_bytes"] / 1024),
                    "ratio": phase["ratio"],
                }
            )
    summary = {f"{r['payload']}{' encrypted' if r['encrypted'] else ''}/{r['phase']}": r["ratio"] for r in rows}
    return {"rows": rows, "summary": summary}
