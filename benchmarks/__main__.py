"""``python -m benchmarks``: run every case, print the tables, write results.json and results.png.

Cases (one module each): 1 :mod:`~benchmarks.claim_path`, 2 :mod:`~benchmarks.drain`,
3 :mod:`~benchmarks.scale`, 4 :mod:`~benchmarks.airflow_overhead`, 5 :mod:`~benchmarks.peak_memory`,
and :mod:`~benchmarks.anatomy` (where the claim path spends its time; full runs only).
Each case works in databases of its own, created on the servers given and dropped after.
Nothing here asserts a timing: the figures are reported, with the goals of issues #18 and #5 beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks import report
from benchmarks.settings import Settings

HERE = Path(__file__).resolve().parent
CASES = {
    "claim_path": "benchmarks.claim_path",
    "drain": "benchmarks.drain",
    "scale": "benchmarks.scale",
    "airflow": "benchmarks.airflow_overhead",
    "memory": "benchmarks.peak_memory",
    "anatomy": "benchmarks.anatomy",
}
NEEDS_WORKERS = {"claim_path", "drain"}
FULL_ONLY = {"anatomy"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--mysql-url", default="mysql+pymysql://root@127.0.0.1:3306/test")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis for the reference peer (keys under a random prefix)",
    )
    parser.add_argument("--quick", action="store_true", help="a short variant of every case (about 2.5 minutes)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for results.json and results.png")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASES)}")
    return parser.parse_args(argv)


def machine(settings: Settings) -> dict[str, Any]:
    """What the figures were measured on: hardware, versions, and the servers' durability settings."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("apache-airflow", "sqlalchemy", "psycopg", "pymysql", "pgqueuer")},
    }
    pg = sa.create_engine(settings.pg_url, poolclass=sa.NullPool)
    with pg.connect() as conn:
        info["postgresql"] = conn.exec_driver_sql("SHOW server_version").scalar()
        info["postgresql_settings"] = {
            name: conn.exec_driver_sql(f"SHOW {name}").scalar()
            for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers", "autovacuum")
        }
    my = sa.create_engine(settings.mysql_url, poolclass=sa.NullPool)
    with my.connect() as conn:
        info["mariadb"] = conn.exec_driver_sql("SELECT VERSION()").scalar()
        info["mariadb_settings"] = {
            "innodb_flush_log_at_trx_commit": conn.exec_driver_sql("SELECT @@innodb_flush_log_at_trx_commit").scalar()
        }
    info["redis"] = _redis(settings.redis_url)
    return info


def _redis(url: str) -> dict[str, Any]:
    """The reference peer's version and persistence (read only; nothing is reconfigured)."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            settings = {name: client.config_get(name).get(name) for name in ("save", "appendonly")}
            return {"version": client.info("server")["redis_version"], **settings}
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        return {"error": repr(exc)}


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings(
        pg_url=args.pg_url, mysql_url=args.mysql_url, out=args.out, quick=args.quick, redis_url=args.redis_url
    )
    chosen = [c for c in (args.cases.split(",") if args.cases else CASES) if c]
    unknown = set(chosen) - set(CASES)
    if unknown:
        print(f"unknown case(s): {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if settings.quick and not args.cases:
        chosen = [c for c in chosen if c not in FULL_ONLY]
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": settings.quick,
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(settings),
        "cases": {},
    }
    if NEEDS_WORKERS & set(chosen):
        from benchmarks.runner import Workers

        settings.workers = Workers(4)
    failed = False
    try:
        for case in chosen:
            print(f"-- {case} ...", flush=True)
            case_started = time.monotonic()
            try:
                module = __import__(CASES[case], fromlist=["run"])
                results["cases"][case] = module.run(settings)
            except Exception:
                failed = True
                results["cases"][case] = {"error": traceback.format_exc()}
                traceback.print_exc()
            results["cases"][case]["seconds"] = round(time.monotonic() - case_started, 1)
            print(f"   {case} took {results['cases'][case]['seconds']} s", flush=True)
    finally:
        if settings.workers is not None:
            settings.workers.close()
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["goals"] = report.goals(results["cases"])
    print(report.render(results))
    _print_plans(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report.chart(results, args.out / "results.png")
    print(f"\nwhole run: {results['seconds']} s; wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 1 if failed else 0


def _print_plans(results: dict[str, Any]) -> None:
    plans = results["cases"].get("scale", {}).get("plans", {})
    for db, entry in plans.items():
        print(f"\n== EXPLAIN of every claim-path statement, {db}, {entry['rows']:,} rows in the ledger")
        for statement in entry["statements"]:
            wide = "  <-- reads many rows (see the flagged plan line)" if statement["wide_reads"] else ""
            print(f"\n-- {statement['path']}: {statement['statement'].split()[0]} …{wide}")
            print(statement["plan"])


if __name__ == "__main__":
    sys.exit(main())
