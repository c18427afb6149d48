"""What a run measures and for how long: the full run, or the quick one (about 2.5 minutes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    pg_url: str
    mysql_url: str
    out: Path
    quick: bool
    redis_url: str = "redis://127.0.0.1:6379/0"  # the reference peer of case 2 (keys under a random prefix)
    workers: Any = None  # benchmarks.runner.Workers, shared by the cases that need processes

    # case 1: claim path
    @property
    def claim_workers(self) -> tuple[int, ...]:
        return (1, 2, 4)

    @property
    def claim_seconds(self) -> float:
        return 0.6 if self.quick else 3.0

    # case 2: batched drain
    @property
    def drain_batches(self) -> tuple[int, ...]:  # issue #18's goals are at 100 and 1000
        return (100, 1000) if self.quick else (1, 10, 100, 1000)

    @property
    def drain_workers(self) -> tuple[int, ...]:
        return (1, 2, 4)

    @property
    def drain_seconds(self) -> float:
        return 0.5 if self.quick else 2.0

    # case 3: scale
    @property
    def scale_rows(self) -> tuple[int, ...]:
        return (1_000, 100_000) if self.quick else (1_000, 100_000, 1_000_000)

    @property
    def scale_backends(self) -> tuple[str, ...]:
        return ("postgresql",) if self.quick else ("postgresql", "mariadb")

    @property
    def scale_seconds(self) -> float:
        return 0.5 if self.quick else 2.0

    # case 4: Airflow overhead
    @property
    def airflow_ledgers(self) -> tuple[str, ...]:  # issue #18's goal 5 is on both
        return ("sqlite", "postgresql")

    @property
    def airflow_repeats(self) -> int:
        return 2 if self.quick else 8

    # case 5: memory
    @property
    def memory_sizes(self) -> tuple[int, ...]:
        return (1024, (32 if self.quick else 200) << 20)
