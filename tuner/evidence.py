"""The evidence a person approves from: one verdict per guardrail, the tuning run, the plot.

Every reader (the approval page, ``tunewatch promotions`` and ``analyze``, the API's JSON and
notifications) shows the same three guardrail verdicts, built here once from an analysis's
evidence: latency, errors and agreement each get a status (``pass``, ``breach``,
``insufficient_data`` or ``not_judged``), a verdict in words, and one effect with its
interval at the analysis's one confidence level (``1 - experiment_alpha``, 95 % by default).
"""

from __future__ import annotations

import io
from typing import Any

from sqlalchemy import select

from monitor import schema
from monitor.stats import format_p
from monitor.storage import Database

GUARDRAILS = ("latency", "errors", "agreement")
STATUSES = ("pass", "breach", "insufficient_data", "not_judged")


def verdict(guardrail: str, status: str, text: str, **effect: Any) -> dict[str, Any]:
    """One guardrail's verdict: ``status`` for machines, ``text`` for people."""
    return {"guardrail": guardrail, "status": status, "text": text, "effect": effect or None}


def latency_verdict(lat: dict[str, Any]) -> dict[str, Any]:
    """From :meth:`monitor.stats.LatencyEffect.to_dict`."""
    if lat.get("status") != "ok":
        return verdict("latency", "insufficient_data", str(lat.get("reason", "no data")))
    status = "breach" if lat["regressed"] else "pass"
    # The factor the text shows: x1.36 faster means champion / challenger = 1.36.
    measure = ("median speed-up, champion / challenger" if lat["direction"] == "faster"
               else "median latency ratio, challenger / champion")  # fmt: skip
    effect = lat["effect"]
    return verdict("latency", status, lat["reason"], direction=lat["direction"],
                   measure=measure, estimate=effect["estimate"], ci=list(effect["ci"]),
                   confidence=lat["confidence"], p_value=lat["p_value"])  # fmt: skip


def errors_verdict(err: dict[str, Any], min_samples: int, confidence: float) -> dict[str, Any]:
    """From :meth:`monitor.sequential.SequentialResult.to_dict` (an always-valid test)."""
    n_a, n_b = int(err["n_a"]), int(err["n_b"])
    if min(n_a, n_b) < min_samples:
        arm = "champion" if n_a <= n_b else "challenger"
        return verdict("errors", "insufficient_data",
                       f"insufficient data: {min(n_a, n_b):,} of {min_samples:,} calls in "
                       f"the {arm} arm")  # fmt: skip
    head = {"challenger_worse": "challenger errs more", "challenger_better":
            "challenger errs less"}.get(err["decision"], "no significant difference")  # fmt: skip
    lo, hi = err["ci"]
    text = (
        f"{head}: {int(err['errors_a']):,} of {n_a:,} -> {int(err['errors_b']):,} of {n_b:,} "
        f"calls ({_pct(err['rate_a'])} -> {_pct(err['rate_b'])}), difference "
        f"{_pp(err['difference'])} [{_pp(lo)}, {_pp(hi)}] ({100 * confidence:.0f} % CS), "
        f"mSPRT {format_p(float(err['p_value']))}"
    )
    status = "breach" if err["decision"] == "challenger_worse" else "pass"
    direction = {"challenger_worse": "more", "challenger_better": "fewer"}.get(
        err["decision"], "no_difference")  # fmt: skip
    return verdict("errors", status, text, direction=direction,
                   measure="error rate difference challenger - champion",
                   estimate=err["difference"], ci=[lo, hi], confidence=confidence,
                   p_value=err["p_value"])  # fmt: skip


def agreement_verdict(
    agreement: dict[str, Any], fid: dict[str, Any], *, min_samples: int, min_rate: float,
    confidence: float,
) -> dict[str, Any]:  # fmt: skip
    """Shadow agreement for a shadow experiment, else fidelity to the source (split traffic)."""
    if agreement.get("source") == "shadow":
        return _shadow_verdict(agreement, min_samples, min_rate, confidence)
    v = fid.get("verdict")
    if v in ("no_data", "error", None):
        return verdict("agreement", "not_judged", f"not judged: {fid.get('reason', 'no data')}")
    if v == "insufficient_data":
        return verdict("agreement", "insufficient_data", f"insufficient data: {fid['reason']}")
    head = {"worse": "challenger less faithful", "restores": "challenger restores fidelity",
            "same": "no significant difference"}[v]  # fmt: skip
    diff, ci = fid.get("difference"), fid.get("difference_ci")
    text = f"{head} to the source {fid.get('reference')}: {fid.get('summary', fid['reason'])}"
    if diff is not None and ci is not None:
        f = _pp if fid.get("task") == "classification" else _signed
        text += f", difference {f(diff)} [{f(ci[0])}, {f(ci[1])}] ({100 * confidence:.0f} % CI)"
    direction = {"worse": "less_faithful", "restores": "more_faithful"}.get(v, "no_difference")
    return verdict("agreement", "breach" if v == "worse" else "pass", text,
                   direction=direction, measure=fid.get("measure"), estimate=diff, ci=ci,
                   confidence=confidence)  # fmt: skip


def _shadow_verdict(
    a: dict[str, Any], min_samples: int, min_rate: float, confidence: float
) -> dict[str, Any]:
    compared, agreed = int(a.get("compared") or 0), int(a.get("agreed") or 0)
    if compared < min_samples:
        return verdict("agreement", "insufficient_data",
                       f"insufficient data: {compared:,} of {min_samples:,} shadow "
                       "comparisons")  # fmt: skip
    from monitor.performance import wilson_interval

    rate = agreed / compared
    lo, hi = wilson_interval(agreed, compared, 1.0 - confidence)
    ok = rate >= min_rate
    head = "challenger agrees with the champion" if ok else "challenger disagrees"
    text = (f"{head}: {agreed:,} of {compared:,} shadow calls ({_pct(rate)} "
            f"[{_pct(lo)}, {_pct(hi)}], {100 * confidence:.0f} % CI; at least "
            f"{_pct(min_rate, 0)} needed)")  # fmt: skip
    return verdict("agreement", "pass" if ok else "breach", text,
                   direction="agrees" if ok else "disagrees", measure="shadow agreement rate",
                   estimate=rate, ci=[lo, hi], confidence=confidence)  # fmt: skip


def lines(evidence: dict[str, Any]) -> list[str]:
    """The verdicts as ``latency: ...`` lines (CLI, notifications); empty for old evidence."""
    return [f"{v['guardrail']}: [{v['status'].replace('_', ' ')}] {v['text']}"
            for v in evidence.get("verdicts") or []]  # fmt: skip


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def _signed(x: float) -> str:
    return f"{x:+.4f}"


# --- the tuning run that produced a version --------------------------------------------


def tuning_evidence(db: Database, model: str, version: str) -> dict[str, Any] | None:
    """The tuning run behind ``model:version``: the guard against the source, the winner's
    config and its figures beside the incumbent's, all from ``tuning_runs``/``tuning_trials``
    (the one source of the winner's numbers; report.md is written from the same trials)."""
    from monitor.registry import get_version

    info = get_version(db, model, version)
    run_id = info.config.get("tuning_run")
    if not isinstance(run_id, int):
        return None
    with db.session() as s:
        run = s.get(schema.TuningRun, run_id)
        if run is None:
            return None
        trials = list(s.scalars(select(schema.TuningTrial).where(
            schema.TuningTrial.run_id == run_id)))  # fmt: skip
        winner = next((t for t in trials if t.is_winner), None)
        incumbent = next((t for t in trials if t.config.get("kind") == "incumbent"), None)
        return {
            "run": run.id, "source": run.base_version, "objective": run.objective,
            "slo_ms": run.slo_ms, "outcome": run.outcome, "speedup": run.speedup,
            "baseline_throughput": run.baseline_throughput,
            "winner_throughput": run.winner_throughput, "report": run.report_path,
            "winner": _trial(winner), "incumbent": _trial(incumbent),
            "config": {k: v for k, v in info.config.items() if k != "tuning_run"},
        }  # fmt: skip


def _trial(t: schema.TuningTrial | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"name": t.name, "passed": t.passed, "reason": t.reason, "accuracy": dict(t.accuracy),
            "batch_size": t.batch_size, "p50_ms": t.p50_ms, "p95_ms": t.p95_ms,
            "throughput": t.throughput}  # fmt: skip


# --- the plot --------------------------------------------------------------------------


def latency_png(evidence: dict[str, Any], title: str) -> bytes:
    """p50 (solid) and p95 (dashed) per arm per minute since the experiment started."""
    from matplotlib.figure import Figure  # heavy: only when a plot is asked for
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    series = _series(evidence.get("timeline"))
    arms = evidence.get("arms") if isinstance(evidence.get("arms"), dict) else {}
    for i, arm in enumerate(sorted(series, key=lambda a: (a != "champion", a))):
        points = sorted(series[arm])
        xs = [p[0] for p in points]
        version = (arms.get(arm) or {}).get("version") if isinstance(arms, dict) else None
        name = f"{arm} {version}" if version else arm
        for col, style, q in ((1, "-", "p50"), (2, "--", "p95")):
            ax.plot(xs, [p[col] for p in points], style, color=f"C{i}", marker="o",
                    markersize=3, label=f"{name} {q}")  # fmt: skip
    if series:
        ax.set_xlabel("minutes since the experiment started")
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no per-minute latency in this evidence yet", ha="center",
                va="center")  # fmt: skip
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(timeline: Any) -> dict[str, list[tuple[float, float, float]]]:
    out: dict[str, list[tuple[float, float, float]]] = {}
    for p in timeline if isinstance(timeline, list) else []:
        if not isinstance(p, dict):
            continue
        minute, p50, p95 = p.get("minute"), p.get("p50_ms"), p.get("p95_ms")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in (minute, p50, p95)):  # fmt: skip
            out.setdefault(str(p.get("arm", "?")), []).append(
                (float(minute), float(p50), float(p95)))  # type: ignore[arg-type]  # fmt: skip
    return out
