"""What a run shows: text tables, the goals of issues #18 and #5 side by side, and one PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Columns printed per case (results.json keeps every field).
COLUMNS = {
    "claim_path": ["backend", "durability", "contender", "workers", "items_per_s", "items", "seconds", "ran_dry"],
    "drain": [
        "backend",
        "durability",
        "contender",
        "batch",
        "workers",
        "items_per_s",
        "items",
        "ran_dry",
        "rows_updated",
        "hot_share",
    ],
    "scale": ["backend", "rows", "call", "samples", "p50_ms", "p99_ms", "fill_s"],
    "airflow": ["ledger", "dag", "runs", "median_s", "min_s", "max_s", "warmup_s"],
    "memory": ["payload", "encrypted", "phase", "peak_growth_kb", "ratio"],
    "anatomy": [
        "backend",
        "call",
        "batch",
        "statements",
        "transactions",
        "pings",
        "round_trips",
        "wall_ms",
        "client_cpu_ms",
    ],
}
TITLES = {
    "claim_path": "1. Claim path (single item) vs raw SQL, PostgreSQL and MariaDB",
    "drain": "2. Batched drain (mode items): items/s",
    "scale": "3. Claim latency vs rows in the ledger",
    "airflow": "4. Airflow overhead: dag.test() of a 10-task chain",
    "memory": "5. Peak memory of one offloaded payload",
    "anatomy": "Anatomy of the library's claim path (one call)",
}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Numbers right-aligned, text left-aligned, a header and a rule."""
    numeric = [all(_is_number(r.get(c)) for r in rows) for c in columns]
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    out = []
    for case, title in TITLES.items():
        data = results["cases"].get(case)
        if data is None:
            continue
        out.append(f"\n== {title}")
        if "error" in data:
            out.append(f"FAILED: {data['error'].splitlines()[-1]}")
            continue
        out.append(table(data["rows"], COLUMNS[case]))
        out.extend(f"note ({name}): {text}" for name, text in data.get("notes", {}).items())
    if results.get("goals"):
        out.append("\n== Goals of issues #18 and #5 (measured in this run; ratios at 1/2/4 workers)")
        out.append(table(results["goals"], ["goal", "target", "measured", "met"]))
    return "\n".join(out)


def goals(cases: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with what this run measured (reported, never asserted). A ratio goal holds at
    every worker count measured: ``measured`` lists them in order (1/2/4 workers)."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, target: str, values: list[float], met: bool | None, unit: str = "") -> None:
        if not values:  # its case did not run
            return
        shown = " / ".join(f"{v:,.3f}{unit}" if v < 100 else f"{v:,.0f}{unit}" for v in values) or "n/a"
        rows.append(
            {"goal": goal, "target": target, "measured": shown, "met": "n/a" if met is None or not values else met}
        )

    drain = cases.get("drain", {}).get("summary", {})
    claim = cases.get("claim_path", {}).get("summary", {})
    servers = (("postgresql", "durable"), ("postgresql", "async"), ("mariadb", "durable"))
    for db, durability in servers:
        number = "#18.3" if db == "mariadb" else "#18.1"
        for batch in (100, 1000):
            where = f"{db}/{durability}/batch {batch}"
            got = _field(drain, where, "vs_raw_2_transactions")
            add(
                f"{number} items drain / raw claim+consume ({db} {durability}, batch {batch})",
                ">= 0.8",
                got,
                _all(got, 0.8),
            )
            if db == "postgresql" and batch == 100:
                got = _field(drain, where, "vs_pgqueuer")
                add(
                    f"#18.1 items drain / pgqueuer dequeue+ack ({durability}, batch 100)", ">= 1.5", got, _all(got, 1.5)
                )
            for field, what in (
                ("vs_raw_2_tx_ledger_table", "library / the same SQL by hand on the ledger table"),
                ("ledger_table_vs_narrow_table", "ledger table / narrow table, both by hand"),
            ):
                if got := _field(drain, where, field):
                    add(f"  where: {what} ({durability}, batch {batch})", "(no goal)", got, None)
    for db, durability in servers:
        number = "#18.3" if db == "mariadb" else "#18.2"
        got = _field(claim, f"{db}/{durability}", "vs_raw_2_transactions")
        add(f"{number} single item / raw 2 transactions ({db} {durability})", ">= 0.8", got, _all(got, 0.8))
        if got := _field(claim, f"{db}/{durability}", "vs_raw_2_tx_ledger_table"):
            add(f"  where: single item / by hand on the ledger table ({durability})", "(no goal)", got, None)
    for r in cases.get("anatomy", {}).get("rows", []):
        if r["backend"] == "mariadb" and r["call"] == "claim" and r.get("batch") == 1:
            add("#18.3 MariaDB claim, wall ms per single item", "<= 1.5", [r["wall_ms"]], r["wall_ms"] <= 1.5, " ms")
    for db, durability in servers:
        for batch in (100, 1000):
            if got := _field(drain, f"{db}/{durability}/batch {batch}", "vs_redis"):
                add(
                    f"#18.4 items drain / Redis reliable queue ({db} {durability}, batch {batch})",
                    "(reference)",
                    got,
                    None,
                )
    for ledger, entry in cases.get("airflow", {}).get("summary", {}).items():
        ratio = entry["exclusive_vs_plain"]
        add(f"#18.5 dag.test() exclusive / plain (ledger {ledger})", "<= 1.05", [ratio], ratio <= 1.05)
    scale = cases.get("scale", {}).get("summary", {})
    for key, entry in scale.items():
        if key.endswith("claim (items, limit=1)") or key.endswith("claim (each)"):
            ratio = entry["p50_ratio"]
            add(f"#18.6 p50 {entry['sizes']} ({key})", "<= 1.3", [ratio], ratio <= 1.3)
    for key, ratio in cases.get("memory", {}).get("summary", {}).items():
        if not key.startswith("1 KB"):
            add(f"#5 peak growth / payload ({key})", "~2 (<= 2.1)", [ratio], ratio <= 2.1)
    return rows


def _field(summary: dict[str, Any], prefix: str, field: str) -> list[float]:
    """``field`` of the summary entries ``<prefix>/<n>w``, by worker count."""
    found = []
    for key, entry in summary.items():
        head, _, workers = key.rpartition("/")
        if head == prefix and field in entry:
            found.append((int(workers.rstrip("w")), entry[field]))
    return [value for _, value in sorted(found)]


def _all(values: list[float], at_least: float) -> bool | None:
    return all(v >= at_least for v in values) if values else None


# -- the chart ------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(2, 3, figsize=(19, 11))
    panels = [
        ("claim_path", _claim_panel),
        ("drain", _drain_panel),
        ("scale", _scale_panel),
        ("airflow", _airflow_panel),
        ("memory", _memory_panel),
        ("anatomy", _anatomy_panel),
    ]
    for ax, (case, draw) in zip(axes.flat, panels, strict=True):
        data = cases.get(case)
        if data is None or "error" in data:
            ax.set_axis_off()
            ax.set_title(f"{TITLES[case]}: {'failed' if data else 'not run'}", fontsize=10)
            continue
        draw(ax, data)
        ax.set_title(TITLES[case], fontsize=10)
        ax.grid(True, alpha=0.3)
    machine = results["machine"]
    fig.suptitle(
        f"exclusive_xcom benchmarks ({'quick' if results['quick'] else 'full'} run, {results['started']}) — "
        f"{machine['cpus']} CPUs, {machine['memory_gib']} GiB, PostgreSQL {machine['postgresql']}, "
        f"MariaDB {machine['mariadb']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


STYLE = {"durable": "-", "async": "--", "in memory": "-."}


def _plain_numbers() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda y, _pos: f"{y:,.0f}" if y >= 10 else f"{y:g}")


COLOR = {
    "library": "tab:blue",
    "raw 1 statement": "tab:gray",
    "raw 2 transactions": "tab:orange",
    "raw 2 tx, ledger table": "tab:brown",
    "pgqueuer": "tab:green",
    "redis": "tab:red",
}


def _claim_panel(ax: Any, data: dict[str, Any]) -> None:
    for db, durability in (("postgresql", "durable"), ("postgresql", "async"), ("mariadb", "durable")):
        for contender, color in COLOR.items():
            pts = [
                (r["workers"], r["items_per_s"])
                for r in data["rows"]
                if (r.get("backend", "postgresql"), r["durability"], r["contender"]) == (db, durability, contender)
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    ":" if db == "mariadb" else STYLE[durability],
                    marker="o",
                    color=color,
                    label=f"{contender} ({'MariaDB' if db == 'mariadb' else durability})",
                )
    ax.set(xlabel="worker processes", ylabel="items/s", yscale="log", xticks=[1, 2, 4])
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.legend(fontsize=7)


def _drain_panel(ax: Any, data: dict[str, Any]) -> None:
    best: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in data["rows"]:
        series = best.setdefault((r["backend"], r["durability"], r["contender"]), {})
        series[r["batch"]] = max(series.get(r["batch"], 0.0), r["items_per_s"])
    for (db, durability, contender), series in best.items():
        xs = sorted(series)
        style = ":" if db == "mariadb" else STYLE[durability]
        label = (
            f"{contender} ({'MariaDB' if db == 'mariadb' else durability})" if db != "redis" else "redis (in memory)"
        )
        ax.plot(xs, [series[x] for x in xs], style, marker="o", color=COLOR[contender], label=label)
    ax.set(xlabel="batch size (best of 1/2/4 workers)", ylabel="items/s", xscale="log", yscale="log")
    ax.xaxis.set_major_formatter(_plain_numbers())
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.legend(fontsize=7)


def _scale_panel(ax: Any, data: dict[str, Any]) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in data["rows"]:
        series.setdefault(f"{r['backend']}: {r['call']}", []).append((r["rows"], r["p50_ms"]))
    for label, pts in series.items():
        ax.plot(*zip(*sorted(pts), strict=True), "--" if label.startswith("mariadb") else "-", marker="o", label=label)
    ax.set(xlabel="rows in the ledger", ylabel="p50 latency (ms)", xscale="log", yscale="log")
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.legend(fontsize=7)


def _airflow_panel(ax: Any, data: dict[str, Any]) -> None:
    labels = [f"{r['dag']}\n(ledger {r['ledger']})" for r in data["rows"]]
    colors = ["tab:gray" if r["dag"] == "plain" else "tab:blue" for r in data["rows"]]
    ax.bar(labels, [r["median_s"] for r in data["rows"]], color=colors)
    ax.errorbar(
        labels,
        [r["median_s"] for r in data["rows"]],
        yerr=[[r["median_s"] - r["min_s"] for r in data["rows"]], [r["max_s"] - r["median_s"] for r in data["rows"]]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ratios = ", ".join(f"{k}: {v['exclusive_vs_plain']}x" for k, v in data["summary"].items())
    ax.set(ylabel="dag.test() seconds (median, min-max)", xlabel=f"exclusive / plain: {ratios}")
    ax.tick_params(axis="x", labelsize=8)


def _memory_panel(ax: Any, data: dict[str, Any]) -> None:
    rows = data["rows"]
    labels = [f"{r['payload']}{' enc' if r['encrypted'] else ''}\n{r['phase']}" for r in rows]
    bars = ax.bar(labels, [max(r["peak_growth_kb"], 1) / 1024 for r in rows], color="tab:purple")
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['ratio']}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=8)
    ax.set(ylabel="peak memory growth (MiB); label: x payload size", yscale="log")
    ax.tick_params(axis="x", labelsize=7)


def _anatomy_panel(ax: Any, data: dict[str, Any]) -> None:
    rows = [r for r in data["rows"] if r.get("batch", 1) == 1]
    labels = [f"{r['backend'].replace('postgresql', 'PG')}\n{r['call']}" for r in rows]
    ax.bar(labels, [r["wall_ms"] for r in rows], color="tab:gray", label="wall ms")
    ax.bar(labels, [r["client_cpu_ms"] for r in rows], color="tab:blue", width=0.5, label="client CPU ms")
    ax.set(ylabel="ms per call (single item)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
