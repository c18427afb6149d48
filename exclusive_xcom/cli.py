"""``exclusive-xcom``: look into and maintain the claim ledger from a shell.

It reads the same ``[exclusive_xcom]`` configuration as the tasks (or ``--url``), prints
tables (rendered by rich) for people and ``--json`` for scripts, and turns every bad input
into a non-zero exit status with a one-line reason on stderr, never a traceback. Commands
that only look (``ls``, ``show``, ``stats``, ``audit``) never create or upgrade the schema:
on a ledger without a current one they say to run ``exclusive-xcom db migrate``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from io import StringIO
from typing import TYPE_CHECKING, Any, TextIO

from exclusive_xcom.errors import ConfigurationError, ExclusiveXComError
from exclusive_xcom.ledger import Ledger
from exclusive_xcom.ledger.admin import PURGE_BATCH
from exclusive_xcom.ledger.schema import CONSUMED, STATES

if TYPE_CHECKING:
    from exclusive_xcom.config import Settings
    from exclusive_xcom.wiring import Env

LS_COLUMNS = ("id", "dag_id", "run_id", "task_id", "map_index", "mode", "slot", "seq", "state", "owner_task_id")
UNREAD_COLUMNS = ("dag_id", "task_id", "unread", "waiting", "oldest")
#: What ``--help`` says the command is (the module docstring is reStructuredText).
DESCRIPTION = "Look into and maintain the claim ledger of exclusive_xcom."


class UsageError(Exception):
    """Bad command-line input; reported as one line, exit status 2."""


#: Where results go: the stdout the command started with. Everything else written to stdout
#: while a command runs (Airflow's and providers' log lines) goes to stderr.
_results: list[TextIO] = []


def main(argv: Sequence[str] | None = None) -> int:
    # The library's own progress lines are for task logs: here only its warnings show.
    logging.getLogger("exclusive_xcom").setLevel(logging.WARNING)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported in one line
        return int(exc.code or 0)
    _results[:] = [sys.stdout]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"exclusive-xcom: error: {exc}", file=sys.stderr)
        return 2
    except ExclusiveXComError as exc:
        print(f"exclusive-xcom: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default prints the whole usage first
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exclusive-xcom", description=DESCRIPTION)
    parser.add_argument("--url", help="ledger SQLAlchemy URL (default: the [exclusive_xcom] configuration)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    db = _command(sub, "db", "schema maintenance").add_subparsers(
        dest="db_command", required=True, parser_class=_Parser
    )
    _command(db, "migrate", "create or upgrade the ledger schema").set_defaults(func=_db_migrate)
    grant = _command(
        db, "grant", "PostgreSQL: switch on row-level security and let a login role use one team's items only"
    )
    grant.add_argument("--team", required=True, help="a team of [exclusive_xcom] teams")
    grant.add_argument("--role", required=True, help="an existing login role of that team's workers")
    grant.set_defaults(func=_db_grant)

    ls = _command(sub, "ls", "list items (newest first), without payloads")
    for name in ("dag-id", "run-id", "task-id"):
        ls.add_argument(f"--{name}")
    ls.add_argument("--state", choices=STATES)
    ls.add_argument(
        "--unread",
        metavar="AGE",
        nargs="?",
        const=True,
        type=_duration,
        help="only items unconsumed for longer than AGE, e.g. 1d (default: unread_after)",
    )
    ls.add_argument("--limit", type=_positive_int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)

    show = _command(sub, "show", "one item, every field but the payload")
    show.add_argument("item_id", type=_positive_int)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    release = _command(sub, "release", "free stuck claims whoever holds them")
    release.add_argument("item_ids", type=_positive_int, nargs="+")
    release.set_defaults(func=_release)

    purge = _command(sub, "purge", "delete old consumed (and expired) items, their blobs and orphaned blobs")
    purge.add_argument(
        "--older-than", type=_duration, help="consumed more than this long ago, e.g. 7d, 12h (default: retention)"
    )
    purge.add_argument(
        "--expired-after", type=_duration, help="also unconsumed items older than this (default: expire_after)"
    )
    purge.add_argument(
        "--batch", type=_positive_int, default=PURGE_BATCH, help=f"rows per transaction (default {PURGE_BATCH})"
    )
    purge.add_argument("--dry-run", action="store_true")
    purge.add_argument("--json", action="store_true")
    purge.set_defaults(func=_purge)

    rotate = _command(sub, "rotate-key", "re-encrypt stored payloads under the first key of secret_key")
    rotate.set_defaults(func=_rotate_key)

    stats = _command(
        sub, "stats", "counts by state, bytes stored, oldest unconsumed item, producers whose items nobody reads"
    )
    stats.add_argument(
        "--unread-after",
        metavar="AGE",
        type=_duration,
        help="unconsumed for longer than this counts as unread (default: unread_after)",
    )
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_stats)

    audit = _command(
        sub, "audit", "claims and consumes checked against what Airflow ran (exit status 1 if any does not match)"
    )
    audit.add_argument("--dag-id", help="items produced or claimed in this DAG")
    audit.add_argument("--run-id", help="items produced or claimed in this run")
    audit.add_argument(
        "--since", type=_since, help="claimed or consumed since: a time ago (7d, 12h) or an ISO time (UTC unless given)"
    )
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=_audit)
    return parser


def _command(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` says what it does, as the command list does."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=summary[0].upper() + summary[1:] + "."
    )
    return parser


# -- commands --------------------------------------------------------------------------------


def _db_migrate(args: argparse.Namespace) -> None:
    ledger = _ledger(args)
    _say(f"ledger at {ledger.engine.url.render_as_string(hide_password=True)}: schema version {ledger.migrate()}")


def _db_grant(args: argparse.Namespace) -> None:
    from exclusive_xcom.config import parse_teams

    parse_teams(f"{args.team}: *")  # the same rule as the configuration's team names
    ledger = _ledger(args)
    ledger.grant(args.team, args.role)
    where = ledger.engine.url.render_as_string(hide_password=True)
    _say(f"ledger at {where}: row-level security on; role {args.role!r} sees team {args.team!r}'s items only")


def _ls(args: argparse.Namespace) -> None:
    columns, unread_after = list(LS_COLUMNS), None
    if args.unread is not None and args.state == CONSUMED:
        raise UsageError("--unread lists unconsumed items; --state consumed matches none of them")
    settings, ledger = _reader(args)
    if args.unread is not None:
        unread_after = settings.unread_after if args.unread is True else args.unread
        columns.append("created_at")
    rows = ledger.items(
        dag_id=args.dag_id,
        run_id=args.run_id,
        task_id=args.task_id,
        state=args.state,
        unread_after=unread_after,
        limit=args.limit + 1,
    )
    more, rows = len(rows) > args.limit, [_readable(r) for r in rows[: args.limit]]
    _emit(rows, args.json, lambda: _table(rows, columns))
    if more:  # on stderr, so that --json output stays one JSON document
        print(f"exclusive-xcom: showing the first {args.limit}; more match (raise --limit)", file=sys.stderr)


def _show(args: argparse.Namespace) -> None:
    rows = _reader(args)[1].items(item_id=args.item_id)
    if not rows:
        raise UsageError(f"no item with id {args.item_id}")
    row = _readable(rows[0])
    _emit(row, args.json, lambda: _render([[k, _text(v)] for k, v in row.items()]))


def _release(args: argparse.Namespace) -> None:
    ledger = _ledger(args)
    unknown = [i for i in dict.fromkeys(args.item_ids) if not ledger.items(item_id=i)]
    released = ledger.release_any(args.item_ids)
    line = f"released {released} of {len(args.item_ids)} item(s)"
    if unclaimed := len(args.item_ids) - released - len(unknown):
        line += f"; {unclaimed} {'was' if unclaimed == 1 else 'were'} not claimed"
    if unknown:
        line += f"; no item has id {', '.join(map(str, unknown))}"
    _say(line)


def _purge(args: argparse.Namespace) -> None:
    from exclusive_xcom.config import format_duration
    from exclusive_xcom.maintenance import purge

    env = _env(args)
    older_than = env.settings.retention if args.older_than is None else args.older_than
    expired_after = env.settings.expire_after if args.expired_after is None else args.expired_after
    report = purge(
        env.ledger, env.codec, older_than, expired_after=expired_after, batch=args.batch, dry_run=args.dry_run
    )
    expired = f", or unconsumed and older than {format_duration(expired_after)}" if expired_after is not None else ""
    data = {
        **dataclasses.asdict(report),
        "older_than": format_duration(older_than),
        "expired_after": None if expired_after is None else format_duration(expired_after),
    }
    _emit(data, args.json, lambda: f"{report} (consumed more than {format_duration(older_than)} ago{expired})")


def _rotate_key(args: argparse.Namespace) -> None:
    from exclusive_xcom.maintenance import rotate_keys

    env = _env(args)
    if not env.keyring.encrypts:
        raise UsageError("no key configured: set [exclusive_xcom] secret_key (newest key first) and run again")
    _say(str(rotate_keys(env.ledger, env.codec)))


def _stats(args: argparse.Namespace) -> None:
    from exclusive_xcom.maintenance import stats as ledger_stats

    settings, ledger = _reader(args)
    stats = ledger_stats(ledger, settings.unread_after if args.unread_after is None else args.unread_after)
    _emit(stats, args.json, lambda: _stats_text(stats))


def _stats_text(stats: dict[str, Any]) -> str:
    totals = {k: v for k, v in stats.items() if k not in ("counts", "unread", "unread_after")}
    text = _table([{**stats["counts"], **totals}])
    if not stats["unread"]:
        return f"{text}\n\nno item has waited unconsumed for more than {stats['unread_after']}"
    unread = _table(stats["unread"], UNREAD_COLUMNS)
    return f"{text}\n\nunconsumed for more than {stats['unread_after']}, by producer:\n{unread}"


def _audit(args: argparse.Namespace) -> int:
    from exclusive_xcom.audit import audit, metadata_engine

    ledger = _reader(args)[1]
    metadata = metadata_engine()
    try:
        report = audit(ledger, metadata, dag_id=args.dag_id, run_id=args.run_id, since=args.since)
    finally:
        metadata.dispose()
    lines = [f.line() for f in report.findings] + [report.summary()]
    _emit(report.as_json(), args.json, lambda: "\n".join(lines))
    return 1 if report.findings else 0


# -- plumbing --------------------------------------------------------------------------------


def _start_airflow() -> None:
    """Import Airflow, which sets up its metadata DB's engines on import: a ``[database]``
    configuration it cannot use (its driver is not installed) is then one line, not a traceback."""
    try:
        import airflow.configuration  # noqa: F401
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigurationError(
            f"Airflow cannot start with this configuration: {type(exc).__name__}: {first}"
        ) from None
    _logs_to_stderr()


def _logs_to_stderr() -> None:
    """Airflow logs to stdout; a command's stdout is its output (a table, ``--json``), so
    every log line, Airflow's and providers' included, goes to stderr instead."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def _settings(args: argparse.Namespace) -> Settings:
    from exclusive_xcom.config import load_settings

    _start_airflow()
    settings = load_settings()
    return dataclasses.replace(settings, url=args.url) if args.url else settings


def _env(args: argparse.Namespace) -> Env:
    """What a writing command works with; the schema is created or upgraded first, as tasks do."""
    from exclusive_xcom.wiring import env_for

    return env_for(_settings(args))


def _ledger(args: argparse.Namespace) -> Ledger:
    return _env(args).ledger


def _reader(args: argparse.Namespace) -> tuple[Settings, Ledger]:
    """What a command that only looks works with: the ledger, its schema checked, never changed."""
    from exclusive_xcom.wiring import current_ledger

    settings = _settings(args)
    return settings, current_ledger(settings)


def _emit(data: Any, as_json: bool, human: Any) -> None:
    _say(json.dumps(data, default=_text, indent=None if isinstance(data, list) else 2) if as_json else human())


def _say(text: str) -> None:
    """A result line, on the command's own stdout."""
    print(text, file=_results[0] if _results else sys.stdout)


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as people and JSON read it: ``consumers`` is stored as JSON text."""
    return {**row, "consumers": json.loads(row["consumers"])} if "consumers" in row else row


def _table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no items)"
    columns = list(columns or rows[0])
    return _render([[_text(r.get(c)) for c in columns] for r in rows], columns)


def _render(cells: list[list[str]], header: Sequence[str] = ()) -> str:
    """Plain columns two spaces apart: no borders, colours or wrapping, so that the output
    reads the same in a terminal, a pipe and a log. Cells are text, never rich markup."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=bool(header), pad_edge=False, padding=(0, 2, 0, 0))
    for name in header or cells[0]:
        table.add_column(Text(name if header else ""), no_wrap=True, overflow="ignore")
    for row in cells:
        table.add_row(*map(Text, row))
    out = StringIO()
    Console(file=out, width=1 << 16, color_system=None, highlight=False, markup=False, emoji=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(_text, value))
    return value.isoformat(sep=" ") if isinstance(value, datetime) else str(value)


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}")
    return int(raw)


def _since(raw: str) -> datetime:
    """A duration ago (``7d``) or an ISO time; naive UTC, as the ledger keeps its times."""
    if raw[-1:].isalpha() and raw[:-1].isdigit():
        return datetime.now(timezone.utc).replace(tzinfo=None) - _duration(raw)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 7d or 12h, or an ISO time such as 2026-12-01T00:00:00, got {raw!r}"
        ) from None
    return when if when.tzinfo is None else when.astimezone(timezone.utc).replace(tzinfo=None)


def _duration(raw: str) -> timedelta:
    from exclusive_xcom.config import parse_duration

    try:
        return parse_duration(raw, "")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).lstrip(": ")) from None


if __name__ == "__main__":
    sys.exit(main())
