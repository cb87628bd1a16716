"""The ``tunewatch`` command line. Every command takes ``--database-url``; ``--json`` is stable."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from monitor.errors import MonitorError
from monitor.settings import Settings
from tuner.errors import TunerError

Handler = Callable[[argparse.Namespace], int]
MAX_DURATION_S = 36500 * 86400  # a hundred years: longer windows overflow datetime arithmetic
MAX_ID = 2**63 - 1


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
    seconds = float(match.group(1)) * unit
    if not 0 < seconds <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use more than 0 and at most {MAX_DURATION_S // 86400}d"
        )
    return timedelta(seconds=seconds)


def clients_count(text: str) -> int:
    """Parse ``--serving-clients``: a whole number of concurrent callers, 1 to 1024."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of clients: use a whole number from 1 to 1024 "
            "(how many concurrent single-row callers the serving search simulates)"
        )
    return value


def db_id(value: int, what: str) -> int:
    """``value`` when it fits the database's ids (1 .. 2^63-1), else a clear TunerError."""
    if not 1 <= value <= MAX_ID:
        raise TunerError(f"{what} id {value} is out of range: ids run from 1 to {MAX_ID}")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--database-url`` on top."""
    return Settings.load({"database_url": getattr(args, "database_url", None)})


def print_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON (the documented ``--json`` output)."""
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


# --- db --------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    """``tunewatch db upgrade|downgrade|current|prune``."""
    from monitor import storage

    if args.db_command == "prune":
        return cmd_db_prune(args)
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


def cmd_db_prune(args: argparse.Namespace) -> int:
    """``tunewatch db prune [--dry-run]``: apply the retention settings once."""
    from monitor.retention import prune

    with _database(args) as (settings, db):
        report = prune(db, settings, dry_run=args.dry_run)
    if args.json:
        print_json(report.to_dict())
        return 0
    verb = "would change" if report.dry_run else "changed"
    print(f"retention {verb} ({report.seconds:.1f} s):")
    for table, counts in report.tables.items():
        done = ", ".join(f"{what} {n}" for what, n in counts.items()) or "nothing"
        print(f"  {table}: {done}")
    return 0


# --- status ----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """``tunewatch status``: per model and version over a window."""
    from monitor.status import summarize

    with _database(args) as (_settings, db):
        status = summarize(db, window=args.window, model=args.model)
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


# --- detection -------------------------------------------------------------------------


@contextlib.contextmanager
def _database(args: argparse.Namespace) -> Iterator[tuple[Settings, Any]]:
    """The command's settings and an open database, disposed when the command is done."""
    from monitor.storage import Database

    settings = settings_from(args)
    db = Database(settings.database_url)
    try:
        yield settings, db
    finally:
        db.dispose()


def cmd_detect(args: argparse.Namespace) -> int:
    """``tunewatch detect``: run every detector once now; say what was tested and skipped."""
    from monitor.detect import default_detectors, run_detection

    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    with _database(args) as (settings, db), _Skips(say) as skips:
        detectors: list[Any] = [_Recorded(d, say) for d in default_detectors(settings)]
        events = run_detection(db, settings, model=args.model, detectors=detectors)
    tested = [f for d in detectors for f in d.findings]
    if args.json:
        print_json({"events": [e.to_dict() for e in events], "skipped": skips.lines,
                    "tested": [_tested(f) for f in tested]})  # fmt: skip
        return 0
    for e in events:
        print(f"[{e.action}] #{e.id} {e.kind} {e.severity}: {e.summary}")
    flagged = sum(f.flagged for f in tested)
    hint = "" if args.verbose or not skips.lines else " (--verbose says why)"
    print(f"tested {len(tested)} conditions ({flagged} flagged), skipped {len(skips.lines)} "
          f"for too little data{hint}; {len(events) or 'no'} events changed")  # fmt: skip
    return 0


def _tested(finding: Any) -> dict[str, Any]:
    return {"kind": finding.kind, "model": finding.model, "version": finding.version,
            "arm": finding.arm, "flagged": finding.flagged, "summary": finding.summary}  # fmt: skip


class _Recorded:
    """A detector that keeps (and with --verbose prints) the findings it returns."""

    def __init__(self, detector: Any, say: Callable[[str], None] | None) -> None:
        self.detector = detector
        self.say = say
        self.findings: list[Any] = []

    def detect(self, db: Any, now: Any, model: str | None = None) -> list[Any]:
        findings = list(self.detector.detect(db, now, model))
        self.findings.extend(findings)
        for f in findings:
            if self.say is not None:
                self.say(f"tested {f.kind}: {f.summary}")
        return findings


class _Skips(logging.Handler):
    """Collects the detectors' INFO lines (why a condition was skipped) while detect runs."""

    def __init__(self, say: Callable[[str], None] | None) -> None:
        super().__init__(logging.INFO)
        self.say = say
        self.lines: list[str] = []
        self.logger = logging.getLogger("tunewatch.detect")
        self.level_before = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        line = f"skipped {record.getMessage()}"
        self.lines.append(line)
        if self.say is not None:
            self.say(line)

    def __enter__(self) -> _Skips:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


WINDOW_FLAGS = ("reference_start", "reference_end", "current_start", "current_end")


def cmd_drift(args: argparse.Namespace) -> int:
    """``tunewatch drift NAME``: one drift comparison, over the detector's default windows
    (README "Detection") or four explicit times."""
    from monitor.errors import NotFound
    from monitor.storage import versions_seen

    given = [f"--{f.replace('_', '-')}" for f in WINDOW_FLAGS if getattr(args, f) is not None]
    if given and len(given) < len(WINDOW_FLAGS):
        raise TunerError(f"drift got {', '.join(given)} only: give all four window times "
                         "(--reference-start/-end, --current-start/-end) or none")  # fmt: skip
    with _database(args) as (settings, db):
        version = args.version
        if version is None:
            seen = versions_seen(db, args.name)
            if not seen:
                raise NotFound(f"model {args.name!r} has no data: see `tunewatch status`")
            version = max(seen, key=lambda v: v.last_seen_at).version
        samples = _explicit_windows if given else _default_windows
        reference, current, windows = samples(args, db, settings, version)
        from monitor.detect import compare_windows

        comps = compare_windows(db, settings, args.name, version, reference, current, windows)
    inputs = comps[0].to_dict()
    if len(comps) > 1:
        inputs["outputs"] = comps[1].to_dict()
    if args.json:
        print_json(inputs)
        return 0
    _print_drift(inputs)
    return 0


def _explicit_windows(args: argparse.Namespace, db: Any, settings: Settings, version: str) -> Any:
    from monitor.detect import parse_time
    from monitor.storage import read_samples

    spans = []
    for part in ("reference", "current"):
        start = parse_time(getattr(args, f"{part}_start"), f"--{part}-start")
        end = parse_time(getattr(args, f"{part}_end"), f"--{part}-end")
        if start >= end:
            raise TunerError(f"the {part} window {start.isoformat()} .. {end.isoformat()} is "
                             f"{'empty' if start == end else 'reversed'}: --{part}-start must "
                             f"come before --{part}-end")  # fmt: skip
        spans.append((start, end))
    limit = settings.drift_max_rows * 4
    ref, cur = (read_samples(db, args.name, version, start=s, end=e, limit=limit) for s, e in spans)
    return ref, cur, (spans[0], spans[1])


def _default_windows(args: argparse.Namespace, db: Any, settings: Settings, version: str) -> Any:
    """The scheduled detector's windows: its reference (first samples after go-live, a pinned
    set or the configured range) against the last ``drift_current_s``."""
    from monitor.detect import REFERENCE_ARM, DriftDetector
    from monitor.storage import read_samples, utcnow

    end = utcnow()
    start = end - timedelta(seconds=settings.drift_current_s)
    reference, ref_window = DriftDetector(settings)._reference(db, args.name, version)
    ref_ids = {r.id for r in reference}
    current = [c for c in read_samples(db, args.name, version, start=start, end=end,
                                       limit=settings.drift_max_rows, newest_first=True)
               if c.arm != REFERENCE_ARM and c.id not in ref_ids]  # fmt: skip
    return reference, current, (ref_window, (start, end))


def _print_drift(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    for part in (report, report.get("outputs")):
        if not part:
            continue
        rows = part["rows"]
        verdict = "DRIFT" if part["drift_detected"] else "no drift"
        console.print(
            f"{part['model']}:{part['version']} {part['target']}: {verdict}, share drifted "
            f"{part['share_drifted']:.2f} ({rows['reference']} reference vs {rows['current']} "
            f"current rows) {part['message']}"
        )
        table = Table()
        for col in ("column", "method", "score", "threshold", "drifted", "status"):
            table.add_column(col)
        for c in part["columns"]:
            score = "-" if c["score"] is None else f"{c['score']:.4g}"
            thr = "-" if c["threshold"] is None else f"{c['threshold']:.4g}"
            table.add_row(c["column"], c["method"], score, thr, str(c["drifted"]), c["status"])
        console.print(table)


def cmd_events(args: argparse.Namespace) -> int:
    """``tunewatch events [ack ID]``: list events or acknowledge one."""
    from monitor.events import acknowledge, list_events

    with _database(args) as (_settings, db):
        if args.action == "ack":
            if args.id is None:
                raise argparse.ArgumentTypeError("events ack needs an event ID")
            event = acknowledge(db, db_id(args.id, "event"), args.by or "")
            events = [event]
        else:
            events = list_events(db, model=args.model, status=args.status)
    if args.json:
        print_json({"events": [e.to_dict() for e in events]})
        return 0
    for e in events:
        print(f"#{e.id} {e.status:<12} {e.kind:<18} {e.severity:<8} {e.model}:{e.version} "
              f"{e.summary}")  # fmt: skip
    if not events:
        print("no events")
    return 0


# --- registry and tuning ---------------------------------------------------------------


def cmd_register(args: argparse.Namespace) -> int:
    """``tunewatch register NAME --onnx PATH``."""
    from tuner.registry import register

    with _database(args) as (settings, db):
        info = register(args.name, args.onnx, version=args.version, db=db, settings=settings)
    if args.json:
        print_json(info.to_dict())
    else:
        print(f"registered {info.model}:{info.version} ({info.status}) at {info.artifact_path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``tunewatch models``: registered versions with artifacts and status."""
    from monitor.registry import list_versions

    with _database(args) as (_settings, db):
        versions = list_versions(db, args.name)
    if args.json:
        print_json({"models": [v.to_dict() for v in versions]})
        return 0
    for v in versions:
        print(f"{v.model}:{v.version:<14} {v.status:<10} parent={v.parent_version or '-':<8} "
              f"source={v.source:<8} {v.artifact_path}")  # fmt: skip
    if not versions:
        print("no registered models: `tunewatch register NAME --onnx PATH`")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``tunewatch tune NAME``: rebuild fast variants, guard them, search batch sizes."""
    from tuner.tuning import run_tuning

    with _database(args) as (settings, db), _progress(enabled=not args.json) as progress:
        outcome = run_tuning(
            db, settings, args.name, slo_ms=args.slo_ms, objective=args.objective,
            dataset=args.dataset, progress=progress, quick=args.quick, min_gain=args.min_gain,
            serving_clients=args.serving_clients,
        )  # fmt: skip
    if args.json:
        print_json(outcome.to_dict())
        return 0
    _print_tuning(outcome)
    return 0


class _progress:
    """A rich progress bar fed by the tuner's ``progress(step, done, total)`` callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[str, int, int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._bar = Progress(transient=False)
        self._bar.start()
        self._task = self._bar.add_task("tuning", total=None)
        return self.update

    def update(self, step: str, done: int, total: int) -> None:
        self._bar.update(self._task, description=step[:60], completed=done, total=total or None)

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_tuning(outcome: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"tuning run {outcome.run_id}: {outcome.model}:{outcome.base_version}")
    for col in ("candidate", "pass", "batch", "items/s", "p50 ms (b=1)", "p95 ms (b=1)", "why"):
        table.add_column(col)
    for t in outcome.result.leaderboard:
        table.add_row(
            t.name, "yes" if t.passed else "no", str(t.best_batch_size or "-"),
            _ms(t.throughput), _ms(t.latency_p50_ms), _ms(t.latency_p95_ms), t.reason[:80],
        )  # fmt: skip
    console.print(table)
    console.print(f"built from source {outcome.model}:{outcome.source_version}; "
                  f"data: {outcome.data_source}", markup=False)  # fmt: skip
    if outcome.winner is not None:
        console.print(f"outcome registered: {outcome.model}:{outcome.winner.version} "
                      f"(speed-up x{outcome.speedup or 0:.2f} over ORT fp32): {outcome.reason}",
                      markup=False)  # fmt: skip
    else:
        console.print(f"outcome {outcome.outcome}: {outcome.reason}", markup=False)
    console.print(f"report: {outcome.report}\nplot: {outcome.plot}")


# --- experiments and promotions ---------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> int:
    """``tunewatch experiment start NAME --candidate V`` / ``experiment stop ID``."""
    from tuner import experiments

    with _database(args) as (settings, db):
        if args.action == "start":
            exp = experiments.start(
                db, args.target, args.candidate, share=args.share, shadow=args.shadow,
                by=args.by or "cli",
                min_samples=args.min_samples or settings.experiment_min_samples,
                max_duration_s=int(args.max_duration.total_seconds()) if args.max_duration
                else settings.experiment_max_duration_s,
                dry_run=args.dry_run, on_inconclusive=args.on_inconclusive,
            )  # fmt: skip
        else:
            exp = experiments.stop(db, _int_id(args.target), by=args.by or "cli")
    if args.json:
        print_json(exp.to_dict())
    else:
        mode = "shadow" if exp.shadow else f"{exp.share:.0%} of traffic"
        if exp.dry_run:
            mode += "; dry run: verdicts recorded, never acted on"
        print(f"experiment {exp.id} {exp.status}: {exp.model} champion {exp.champion_version} "
              f"vs challenger {exp.challenger_version} ({mode})")  # fmt: skip
    return 0


def _int_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id: pass a number") from None


def cmd_experiments(args: argparse.Namespace) -> int:
    """``tunewatch experiments``."""
    from tuner.experiments import list_experiments

    with _database(args) as (_settings, db):
        rows = list_experiments(db, args.model, args.status)
    if args.json:
        print_json({"experiments": [e.to_dict() for e in rows]})
        return 0
    for e in rows:
        mode = "shadow" if e.shadow else f"share {e.share:.2f}"
        print(f"#{e.id} {e.status:<18} {e.model} {e.champion_version} vs {e.challenger_version} "
              f"({mode}) {e.reason}")  # fmt: skip
    if not rows:
        print("no experiments")
    return 0


def cmd_promotions(args: argparse.Namespace) -> int:
    """``tunewatch promotions``: each request, who decided and when, and one verdict per
    guardrail (latency, errors, agreement)."""
    from tuner.evidence import lines
    from tuner.promotions import list_promotions

    with _database(args) as (_settings, db):
        rows = list_promotions(db, model=args.model, status=args.status)
    if args.json:
        print_json({"promotions": [p.to_dict() for p in rows]})
        return 0
    for p in rows:
        who = f" by {p.decided_by}" if p.decided_by else ""
        when = f" at {p.decided_at:%Y-%m-%d %H:%M:%S} UTC" if p.decided_at else ""
        print(f"#{p.id} {p.status:<12} {p.model} {p.from_version} -> {p.to_version}{who}{when}")
        for line in lines(p.evidence) or [str(p.evidence.get("reason", ""))]:
            print(f"    {line}")
        if p.status == "pending":
            print(f"    approve: tunewatch approve {p.id} --by YOUR_NAME")
    if not rows:
        print("no promotions")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    """``tunewatch approve ID --by NAME`` / ``tunewatch reject ID --by NAME``."""
    from tuner import promotions

    with _database(args) as (settings, db):
        promotion_id = db_id(args.id, "promotion")
        if args.command == "approve":
            p = promotions.approve(db, promotion_id, by=args.by, note=args.note or "",
                                   watch=timedelta(seconds=settings.promotion_watch_s))  # fmt: skip
        else:
            p = promotions.reject(db, promotion_id, by=args.by, note=args.note or "")
    if args.json:
        print_json(p.to_dict())
    else:
        print(f"promotion {p.id} {p.status} by {p.decided_by}: {p.model} {p.from_version} -> "
              f"{p.to_version}")  # fmt: skip
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    """``tunewatch policy NAME``: show or set a model's automation policy."""
    from tuner.registry import set_policy

    with _database(args) as (_settings, db):
        changes = {k: v for k, v in (("auto_experiment", args.auto_experiment),
                   ("auto_approve", args.auto_approve), ("share", args.share),
                   ("shadow", args.shadow)) if v is not None}  # fmt: skip
        if args.tolerance:
            changes["tolerance"] = _tolerance_changes(args.tolerance)
        policy = set_policy(db, args.name, changes, by=args.by or "cli")
    if args.json:
        print_json({"model": args.name, "policy": policy})
    else:
        print(f"{args.name} policy: {json.dumps(policy, sort_keys=True)}")
    return 0


def _tolerance_changes(items: list[str]) -> dict[str, float | None]:
    """``--tolerance min_top1_agreement=0.995`` pairs (``none`` disables a check)."""
    out: dict[str, float | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = None if value.lower() == "none" else float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise TunerError(f"--tolerance {item!r} is invalid: use FIELD=NUMBER, e.g. "
                             "min_top1_agreement=0.995")  # fmt: skip
    return out


# --- fidelity and analysis -------------------------------------------------------------


def cmd_fidelity(args: argparse.Namespace) -> int:
    """``tunewatch fidelity NAME``: replay the champion's recent inputs against its source."""
    from tuner.fidelity import check_champion

    with _database(args) as (settings, db):
        check = check_champion(db, settings, args.name, rows=args.rows)
    out = check.to_dict()
    if args.json:
        print_json(out)
        return 0
    verdict = ("PASSED" if out["passed"] else "FAILED") if out["status"] == "ok" else out["status"]
    print(f"{out['model']}:{out['version']} vs source {out['source_version']}: {verdict} "
          f"on {out['rows']} rows: {out['message']}")  # fmt: skip
    if out["event_id"] is not None:
        print(f"event #{out['event_id']} (see `tunewatch events`)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """``tunewatch analyze [NAME]``: judge every running experiment once and act on it."""
    from tuner.analysis import run_analysis
    from tuner.evidence import lines

    with _database(args) as (settings, db):
        verdicts = run_analysis(db, settings, model=args.name)
    if args.json:
        print_json({"verdicts": [v.to_dict() for v in verdicts]})
        return 0
    for v in verdicts:
        pending = f" (promotion {v.promotion_id})" if v.promotion_id else ""
        print(f"experiment {v.experiment_id}: {v.decision}{pending}: {v.reason}")
        for line in lines(v.evidence):
            print(f"    {line}")
    if not verdicts:
        print("no running experiments")
    return 0


# --- labels and realized performance ---------------------------------------------------


def cmd_labels(args: argparse.Namespace) -> int:
    """``tunewatch labels import NAME FILE``: join labels (CSV or Parquet: id,label) by id."""
    from monitor.labels import import_labels

    with _database(args) as (_settings, db):
        report = import_labels(db, args.name, args.file, task=args.task)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
    return 0


def cmd_performance(args: argparse.Namespace) -> int:
    """``tunewatch performance NAME``: realized performance per version, arm and window."""
    from monitor.performance import realized_performance

    with _database(args) as (_settings, db):
        rows = realized_performance(db, args.name, version=args.version, window=args.window,
                                    windows=args.windows, task=args.task)  # fmt: skip
    if args.json:
        print_json({"model": args.name, "window_s": args.window.total_seconds(),
                    "windows": [w.to_dict() for w in rows]})  # fmt: skip
        return 0
    if not rows:
        print(f"{args.name}: no stored predictions in the last {args.windows} windows "
              f"of {args.window}")  # fmt: skip
        return 0
    for w in rows:
        shown = ", ".join(f"{k} {v:.4g} [{w.ci[k][0]:.4g}, {w.ci[k][1]:.4g}]"
                          for k, v in w.metrics.items() if v is not None and k in w.ci)  # fmt: skip
        print(f"{w.version} [{w.arm}] {w.start:%Y-%m-%d %H:%M}: {w.predictions} predictions, "
              f"{w.labelled} labelled (coverage {100 * w.coverage:.1f}%)"
              + (f": {shown}" if shown else ""))  # fmt: skip
    return 0


# --- serve -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """``tunewatch serve``: the scheduler (detection, retuning, analysis) until SIGTERM."""
    import logging

    from tuner.scheduler import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {"database_url": args.database_url, "api_host": args.host, "api_port": args.port}
    if args.no_auth:
        overrides["api_auth_disabled"] = True
    settings = Settings.load(overrides)
    api = None
    if not args.no_api:
        from tuner.api import server

        api = server(settings)
    return serve(settings, api=api)


# --- demo ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``tunewatch demo``: wrap a real model, send traffic, print the status."""
    from tuner.demo import run_demo

    if not 0.1 <= args.pace <= 10:
        raise argparse.ArgumentTypeError(f"--pace {args.pace} must be between 0.1 and 10")
    return run_demo(settings_from(args), yes=args.yes, pace=args.pace)


# --- parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong and where to read more."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message (see prog --help)`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    common = _Parser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL (default: $TUNEWATCH_DATABASE_URL "
                        "or sqlite:///tunewatch.db)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print stable JSON")
    parser = _Parser(prog="tunewatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="manage the database schema", parents=[common])
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="upgrade to a revision", parents=[common])
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="downgrade to a revision", parents=[common])
    down.add_argument("revision")
    dbsub.add_parser("current", help="show the current revision", parents=[common])
    prune = dbsub.add_parser("prune", help="delete and roll up telemetry past its retention",
                             parents=[common])  # fmt: skip
    prune.add_argument("--dry-run", action="store_true", help="count, change nothing")
    db.set_defaults(func=cmd_db)

    st = sub.add_parser("status", help="calls, errors and latency per model", parents=[common])
    st.add_argument("--window", type=parse_duration, default=timedelta(hours=1),
                    help="how far back to look (e.g. 15m, 1h, 7d; default 1h)")  # fmt: skip
    st.add_argument("--model", help="only this model")
    st.set_defaults(func=cmd_status)

    det = sub.add_parser("detect", help="run every detector once now", parents=[common])
    det.add_argument("--model", help="only this model")
    det.add_argument("--verbose", "-v", action="store_true",
                     help="say what was tested and why anything was skipped")  # fmt: skip
    det.set_defaults(func=cmd_detect)

    dr = sub.add_parser("drift", help="one drift comparison (default windows: the first "
                        "samples after go-live vs the last hour)", parents=[common])  # fmt: skip
    dr.add_argument("name", help="model name")
    dr.add_argument("--version", help="model version (default: the most recently seen)")
    for flag in ("--reference-start", "--reference-end", "--current-start", "--current-end"):
        dr.add_argument(flag, help="ISO-8601 time, e.g. 2026-01-31T12:00:00Z (all four or none)")
    dr.set_defaults(func=cmd_drift)

    ev = sub.add_parser("events", help="list events, or `events ack ID`", parents=[common])
    ev.add_argument("action", nargs="?", choices=["list", "ack"], default="list")
    ev.add_argument("id", nargs="?", type=int, help="event id (for ack)")
    ev.add_argument("--model", help="only this model")
    ev.add_argument("--status", choices=["open", "acknowledged", "resolved"])
    ev.add_argument("--by", help="who acknowledges (for ack)")
    ev.set_defaults(func=cmd_events)

    rg = sub.add_parser("register", help="register a model version", parents=[common])
    rg.add_argument("name")
    rg.add_argument("--onnx", required=True, help="path of the ONNX file")
    rg.add_argument("--version", help="version label (default v<N+1>)")
    rg.set_defaults(func=cmd_register)

    md = sub.add_parser("models", help="registered versions and their status", parents=[common])
    md.add_argument("name", nargs="?")
    md.set_defaults(func=cmd_models)

    tu = sub.add_parser("tune", help="retune a model on production samples", parents=[common])
    tu.add_argument("name")
    tu.add_argument("--slo-ms", type=float, default=50.0, help="p95 latency budget (ms)")
    tu.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
    tu.add_argument("--dataset", help=".npz with arrays named like the inputs (+ labels)")
    tu.add_argument("--quick", action="store_true", help="a small, fast search (demos)")
    tu.add_argument("--min-gain", type=float, default=0.05,
                    help="register a winner only if it beats the champion's objective by this "
                         "fraction (default 0.05), or if the champion fails the guard")  # fmt: skip
    tu.add_argument("--serving-clients", type=clients_count, metavar="N",
                    help="search the winner's serving configuration (threads, workers, "
                         "batch, delay, length groups) under N concurrent callers and "
                         "register it")  # fmt: skip
    tu.set_defaults(func=cmd_tune)

    ex = sub.add_parser("experiment", help="start or stop an experiment", parents=[common])
    ex.add_argument("action", choices=["start", "stop"])
    ex.add_argument("target", help="model NAME (start) or experiment ID (stop)")
    ex.add_argument("--candidate", help="challenger version (start)")
    ex.add_argument("--share", type=float, default=0.1, help="share of calls (default 0.1)")
    ex.add_argument("--shadow", action="store_true", help="run the challenger on copies only")
    ex.add_argument("--min-samples", type=int, help="calls per arm before any decision")
    ex.add_argument("--max-duration", type=parse_duration, help="e.g. 24h")
    ex.add_argument("--by", help="who starts/stops it (audit log)")
    ex.add_argument("--dry-run", action="store_true",
                    help="watch only: the analysis records its verdicts but never rolls back "
                         "or requests a promotion (start)")  # fmt: skip
    ex.add_argument("--on-inconclusive", choices=["stop", "pause"], default="stop",
                    help="at the maximum duration without a decision: stop the experiment "
                         "(default) or pause it (challenger out of traffic, left open for a "
                         "person) (start)")  # fmt: skip
    ex.set_defaults(func=cmd_experiment)

    exs = sub.add_parser("experiments", help="list experiments", parents=[common])
    exs.add_argument("--model")
    exs.add_argument("--status")
    exs.set_defaults(func=cmd_experiments)

    pr = sub.add_parser("promotions", help="list promotions", parents=[common])
    pr.add_argument("--model")
    pr.add_argument("--status", choices=["pending", "approved", "rejected", "applied",
                                         "rolled_back"])  # fmt: skip
    pr.set_defaults(func=cmd_promotions)

    for verb in ("approve", "reject"):
        d = sub.add_parser(verb, help=f"{verb} a pending promotion", parents=[common])
        d.add_argument("id", type=int)
        d.add_argument("--by", required=True, help="who decides (audit log)")
        d.add_argument("--note", help="why")
        d.set_defaults(func=cmd_decide)

    fi = sub.add_parser("fidelity", help="replay the champion's recent inputs against its "
                        "source", parents=[common])  # fmt: skip
    fi.add_argument("name")
    fi.add_argument("--rows", type=int, help="raw inputs to replay (default: fidelity_rows)")
    fi.set_defaults(func=cmd_fidelity)

    an = sub.add_parser("analyze", help="judge running experiments once now", parents=[common])
    an.add_argument("name", nargs="?", help="only this model's experiment")
    an.set_defaults(func=cmd_analyze)

    lb = sub.add_parser("labels", help="import labels (ground truth) by prediction id",
                        parents=[common])  # fmt: skip
    lbsub = lb.add_subparsers(dest="labels_command", required=True)
    li = lbsub.add_parser("import", help="join a CSV or Parquet file of id,label to predictions",
                          parents=[common])  # fmt: skip
    li.add_argument("name")
    li.add_argument("file")
    li.add_argument("--task", choices=("auto", "classification", "regression"), default="auto")
    lb.set_defaults(func=cmd_labels)

    pf = sub.add_parser("performance", help="realized performance on labelled predictions",
                        parents=[common])  # fmt: skip
    pf.add_argument("name")
    pf.add_argument("--version", help="only this version")
    pf.add_argument("--window", type=parse_duration, default=timedelta(hours=1),
                    help="window length (default 1h)")  # fmt: skip
    pf.add_argument("--windows", type=int, default=24, help="how many windows back (default 24)")
    pf.add_argument("--task", choices=("auto", "classification", "regression"), default="auto")
    pf.set_defaults(func=cmd_performance)

    po = sub.add_parser("policy", help="show or set a model's automation policy",
                        parents=[common])  # fmt: skip
    po.add_argument("name")
    po.add_argument("--auto-experiment", action=argparse.BooleanOptionalAction, default=None)
    po.add_argument("--auto-approve", action=argparse.BooleanOptionalAction, default=None)
    po.add_argument("--share", type=float)
    po.add_argument("--shadow", action=argparse.BooleanOptionalAction, default=None)
    po.add_argument("--tolerance", action="append", metavar="FIELD=VALUE",
                    help="the accuracy guard's tolerance for tuning, fidelity and experiments, "
                         "e.g. min_top1_agreement=0.995 (repeatable)")  # fmt: skip
    po.add_argument("--by")
    po.set_defaults(func=cmd_policy)

    sv = sub.add_parser("serve", help="run the scheduler and the HTTP API until SIGTERM",
                        parents=[common])  # fmt: skip
    sv.add_argument("--host", help="API address (default $TUNEWATCH_API_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=int, help="API port (default $TUNEWATCH_API_PORT or 8080)")
    sv.add_argument("--no-api", action="store_true", help="run the scheduler only")
    sv.add_argument("--no-auth", action="store_true",
                    help="serve the API without a token (only allowed on 127.0.0.1)")  # fmt: skip
    sv.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the end-to-end demo", parents=[common])
    demo.add_argument("--yes", action="store_true", help="approve the promotion automatically")
    demo.add_argument("--pace", type=float, default=1.0,
                      help="scale the calls of every phase (each phase ends on counts); "
                           "on 2 cores 1.0 took 40 s, 163 s beside two CPU hogs; 0.35 took "
                           "45 s and 93 s")  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunewatch`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    if args.command == "experiment" and args.action == "start" and not args.candidate:
        parser.error("experiment start needs --candidate VERSION")
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handling below, not at exit
        return code
    except (MonitorError, TunerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tunewatch ... | head` closed the pipe: stop quietly, like cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as exc:
        print(f"error: {_missing_module(args, exc)}", file=sys.stderr)
        return 1
    except OverflowError as exc:
        print(f"error: a number or time is out of range ({exc}): use a smaller value",
              file=sys.stderr)  # fmt: skip
        return 1


def _missing_module(args: argparse.Namespace, exc: ModuleNotFoundError) -> str:
    """The one-line message for a module that is not installed (usually a database driver)."""
    from monitor.storage import redact

    url = getattr(args, "database_url", None) or ""
    where = f" for database URL {redact(url)!r}" if url else ""
    return (f"Python module {exc.name!r}{where} is not installed: use sqlite:///FILE or "
            f"postgresql+psycopg://..., or pip install the driver")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
