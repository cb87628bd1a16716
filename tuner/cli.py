"""The ``tunewatch`` command line. Every command takes ``--database-url``; ``--json`` is stable."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from monitor.errors import MonitorError
from monitor.settings import Settings
from tuner.errors import TunerError

Handler = Callable[[argparse.Namespace], int]


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``15m``, ``2h``, ``7d`` (or plain seconds) into a timedelta.

    >>> parse_duration("15m")
    datetime.timedelta(seconds=900)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number with s, m, h or d (e.g. 15m)"
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return timedelta(seconds=float(match.group(1)) * unit)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--database-url`` on top."""
    return Settings.load({"database_url": getattr(args, "database_url", None)})


def print_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON (the documented ``--json`` output)."""
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


# --- db --------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    """``tunewatch db upgrade|downgrade|current``."""
    from monitor import storage

    engine = storage.create_db_engine(settings_from(args).database_url)
    try:
        if args.db_command == "upgrade":
            storage.upgrade(engine, args.revision)
        elif args.db_command == "downgrade":
            storage.downgrade(engine, args.revision)
        current = storage.current_revision(engine)
        head = storage.head_revision(engine)
    finally:
        engine.dispose()
    if args.json:
        print_json({"current": current, "head": head, "up_to_date": current == head})
    else:
        print(f"database {storage.redact(str(engine.url))}: revision {current or 'none'} "
              f"(head {head}{', up to date' if current == head else ''})")  # fmt: skip
    return 0


# --- status ----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """``tunewatch status``: per model and version over a window."""
    from monitor.status import summarize
    from monitor.storage import Database

    db = Database(settings_from(args).database_url)
    try:
        status = summarize(db, window=args.window, model=args.model)
    finally:
        db.dispose()
    if args.json:
        print_json(status.to_dict())
        return 0
    _print_status(status)
    return 0


def _print_status(status: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tunewatch status: last {status.window_s:g} s")
    for col in ("model", "version", "arms", "calls", "calls/s", "error rate", "p50 ms",
                "p95 ms", "p99 ms", "samples"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "version", "arms") else "right")
    for m in status.models:
        table.add_row(
            m.model, m.version, ",".join(m.arms), str(m.calls), f"{m.calls_per_s:.2f}",
            f"{m.error_rate:.2%}", _ms(m.p50_ms), _ms(m.p95_ms), _ms(m.p99_ms), str(m.samples),
        )  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    reasons = ", ".join(f"{k}={v}" for k, v in status.drops_by_reason.items()) or "none"
    console.print(f"telemetry dropped: {status.dropped} ({reasons})")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- demo ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``tunewatch demo``: wrap a real model, send traffic, print the status."""
    from tuner.demo import run_demo

    return run_demo(settings_from(args), calls=args.calls)


# --- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL (default: $TUNEWATCH_DATABASE_URL "
                        "or sqlite:///tunewatch.db)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print stable JSON")
    parser = argparse.ArgumentParser(prog="tunewatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="manage the database schema", parents=[common])
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="upgrade to a revision", parents=[common])
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="downgrade to a revision", parents=[common])
    down.add_argument("revision")
    dbsub.add_parser("current", help="show the current revision", parents=[common])
    db.set_defaults(func=cmd_db)

    st = sub.add_parser("status", help="calls, errors and latency per model", parents=[common])
    st.add_argument("--window", type=parse_duration, default=timedelta(hours=1),
                    help="how far back to look (e.g. 15m, 1h, 7d; default 1h)")  # fmt: skip
    st.add_argument("--model", help="only this model")
    st.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="run the end-to-end demo", parents=[common])
    demo.add_argument("--calls", type=int, default=2000, help="how many calls to send")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunewatch`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except (MonitorError, TunerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
