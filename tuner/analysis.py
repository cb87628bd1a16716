"""Judging experiments on live data, and watching promotions after they are applied.

For each live experiment the analysis compares the arms since it started:
- latency: Mann-Whitney U with a Hodges-Lehmann effect-size gate, both ways (slower is a
  guardrail breach, faster beyond the tolerance is what makes a challenger better);
- error rate: an always-valid sequential test (mSPRT), safe under a look every minute;
- fidelity to the source: each arm's stored inputs from the experiment's start are replayed
  off the serving path through the source (the version a user registered, never the
  champion) and through the arm's own version (:mod:`tuner.fidelity`), so both arms get the
  accuracy guard's per-row metrics on what they actually served;
- shadow agreement: a shadow challenger's answers against the champion's on the same calls.
A breach rolls the experiment back at once (share to 0, event, notification): slower, more
errors, or less faithful to the source than the champion by more than the tolerance, however
fast. A challenger that restores fidelity (it passes the tolerance, the champion does not, and
the gap is beyond noise) at a latency within the guardrail, or that is faster and no less
faithful, gets a promotion request with the evidence; at the maximum duration an
inconclusive experiment stops with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select

from monitor import schema, sketch
from monitor.events import Finding, Notifier, apply_finding
from monitor.registry import get_version, source_of
from monitor.settings import Settings
from monitor.storage import Database, read_aggregates, utcnow
from tuner import experiments, fidelity, promotions, registry
from tuner.evidence import lines
from tuner.experiments import ExperimentInfo
from tuner.fidelity import Replay
from tuner.guard import Tolerance

log = logging.getLogger("tunewatch.analysis")
SAMPLE_POINTS = 20_000  # latency values per arm that the analysis reads from the histograms


@dataclass(frozen=True)
class Verdict:
    """What one look at an experiment concluded."""

    experiment_id: int
    decision: str  # continue | rollback | promote | inconclusive
    reason: str
    evidence: dict[str, Any]
    promotion_id: int | None = None
    replays: tuple[Replay, ...] = field(default=(), repr=False)  # stored by run_analysis
    dry_run: bool = False  # a watch-only experiment: recorded, never acted on

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"experiment_id": self.experiment_id, "decision": self.decision,
                "reason": self.reason, "promotion_id": self.promotion_id,
                "dry_run": self.dry_run, "evidence": self.evidence}  # fmt: skip


def challenger_arm(exp: ExperimentInfo) -> str:
    """The arm label the challenger's calls are recorded under."""
    return "shadow" if exp.shadow else "challenger"


def arm_stats(
    db: Database, model: str, version: str, arm: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """Calls, errors and latency quantiles of one arm in a window (from interval aggregates).

    Only intervals that start at or after ``start`` count: an interval that began earlier
    may hold calls from before an experiment (its first seconds are left out instead).
    """
    rows = read_aggregates(db, model, version, arm=arm, start=start, end=end)
    hist = sketch.merge(r.buckets for r in rows)
    calls, errors = sum(r.calls for r in rows), sum(r.errors for r in rows)
    # One value per call, spread within its bucket: the latency verdict reads the same
    # sample, so its p50/p95 match these.
    # Bounded: a day of 1,000 calls/s would be 86M floats per arm, every minute.
    sample = sketch.interpolated(hist, max_points=SAMPLE_POINTS)
    p50, p95, p99 = (
        np.quantile(sample, (0.5, 0.95, 0.99), method="inverted_cdf") if calls else [math.nan] * 3
    )
    return {
        "version": version, "arm": arm, "calls": calls, "errors": errors,
        "error_rate": errors / calls if calls else 0.0,
        "p50_ms": _num(p50), "p95_ms": _num(p95), "p99_ms": _num(p99), "_sample": sample,
        "_timeline": [(r.interval_start, r.calls, r.buckets) for r in rows],
    }  # fmt: skip


def _num(x: float) -> float | None:
    return None if x != x else round(float(x), 4)


def analyze(
    db: Database, settings: Settings, exp: ExperimentInfo, now: datetime | None = None
) -> Verdict:
    """Look at one live experiment (no side effects)."""
    from tuner.evidence import tuning_evidence

    now = now or utcnow()
    champ = arm_stats(db, exp.model, exp.champion_version, "champion", exp.started_at, now)
    chall = arm_stats(db, exp.model, exp.challenger_version, challenger_arm(exp),
                      exp.started_at, now)  # fmt: skip
    latency, errors = guardrails(champ, chall, settings, exp.min_samples)
    fid, replays = _fidelity(db, settings, exp, now)
    agreement = _agreement(db, settings, exp, fid)
    evidence = {
        "arms": {"champion": _public(champ), "challenger": _public(chall)},
        "latency": latency.to_dict(), "error_rate": errors.to_dict(), "agreement": agreement,
        "fidelity": fid, "confidence": 1.0 - settings.experiment_alpha,
        "timeline": _timeline(champ, exp.started_at)
        + _timeline(chall, exp.started_at, "challenger"),
        "window": [exp.started_at.isoformat(), now.isoformat()],
        "tuning": tuning_evidence(db, exp.model, exp.challenger_version),
    }  # fmt: skip
    evidence["labels"] = _labels(db, settings, exp, now)
    evidence["verdicts"] = verdicts(evidence, settings, exp.min_samples)
    decision, reason = _decide(exp, settings, latency, errors, agreement, fid, champ, chall, now,
                               labels=evidence["labels"])  # fmt: skip
    evidence.update(decision=decision, reason=reason)
    return Verdict(exp.id, decision, reason, evidence, replays=replays)


def verdicts(
    evidence: dict[str, Any], settings: Settings, min_samples: int
) -> list[dict[str, Any]]:
    """Latency, errors and agreement: one verdict each (see :mod:`tuner.evidence`)."""
    from tuner import evidence as ev

    confidence = 1.0 - settings.experiment_alpha
    out = [
        ev.latency_verdict(evidence["latency"]),
        ev.errors_verdict(evidence["error_rate"], min_samples, confidence),
        ev.agreement_verdict(evidence["agreement"], evidence["fidelity"],
                             min_samples=min_samples, confidence=confidence,
                             min_rate=settings.experiment_min_agreement),
    ]  # fmt: skip
    labels = evidence.get("labels") or {}
    if labels.get("status") in ("ok", "insufficient_data"):  # shown once labels exist
        out.append(labels_verdict(labels))
    return out


def labels_verdict(labels: dict[str, Any]) -> dict[str, Any]:
    """Realized performance on each arm's labelled predictions (``performance.compare_arms``)."""
    from tuner import evidence as ev

    if labels["status"] != "ok":
        return ev.verdict("labels", "insufficient_data", labels["reason"])
    lo, hi = labels["ci"]
    return ev.verdict(
        "labels", "breach" if labels["worse"] else "pass", labels["reason"],
        measure=f"{labels['metric']} champion -> challenger", estimate=labels["change"],
        ci=[lo, hi], champion=labels["reference_value"], challenger=labels["recent_value"],
        labelled=[labels["n_reference"], labels["n_recent"]], p_value=labels["p_value"],
    )  # fmt: skip


def _labels(db: Database, settings: Settings, exp: ExperimentInfo, now: datetime) -> dict[str, Any]:
    """Both arms' realized performance on their labelled predictions since the start."""
    from monitor.performance import compare_arms

    return compare_arms(
        db, exp.model, (exp.champion_version, "champion"),
        (exp.challenger_version, challenger_arm(exp)), exp.started_at, now, settings,
    )  # fmt: skip


def guardrails(
    base: dict[str, Any], new: dict[str, Any], settings: Settings, min_samples: int
) -> tuple[Any, Any]:
    """Latency (one direction, slower beyond the tolerance?) and error-rate (higher?) tests.

    The same guardrails judge a live experiment and a promotion's watch window, at one
    confidence level, ``1 - experiment_alpha``. Latencies come from the arms' histograms
    spread within their buckets (:func:`monitor.sketch.interpolated`), so interval bounds
    are not stuck on bucket values.
    """
    from monitor.sequential import ErrorRateTest
    from monitor.stats import latency_effect

    latency = latency_effect(base["_sample"], new["_sample"],
                             tolerance=settings.experiment_latency_tolerance,
                             margin=settings.experiment_improvement_margin,
                             alpha=settings.experiment_alpha,
                             min_samples=min_samples)  # fmt: skip
    errors = ErrorRateTest(alpha=settings.experiment_alpha, min_samples=min_samples).update(
        base["calls"], base["errors"], new["calls"], new["errors"]
    )
    return latency, errors


def _decide(
    exp: ExperimentInfo, settings: Settings, latency: Any, errors: Any,
    agreement: dict[str, Any], fid: dict[str, Any], champ: dict[str, Any],
    chall: dict[str, Any], now: datetime, labels: dict[str, Any] | None = None,
) -> tuple[str, str]:  # fmt: skip
    if latency.regressed:
        return "rollback", f"guardrail: {latency.reason}"
    if errors.decision == "challenger_worse":
        return "rollback", f"guardrail: challenger error rate is higher ({errors.reason})"
    if fid["verdict"] == "worse":
        return "rollback", f"guardrail: {fid['reason']}"
    if labels and labels.get("worse"):  # ground truth says the challenger is worse
        return "rollback", f"guardrail: {labels['reason']}"
    restores = fid["verdict"] == "restores"  # then disagreeing with the champion is the point
    rate = agreement.get("rate")
    if (
        not restores
        and rate is not None
        and agreement.get("compared", 0) >= exp.min_samples
        and (rate < settings.experiment_min_agreement)
    ):
        return "rollback", (
            f"guardrail: challenger agrees with the champion on {rate:.2%} of "
            f"{agreement['source']} comparisons (< {settings.experiment_min_agreement:.0%})"
        )
    enough = min(champ["calls"], chall["calls"]) >= exp.min_samples
    if enough and restores:
        return "promote", f"{fid['reason']}; latency: {latency.reason}"
    judged = fid["verdict"] in ("same", "no_data")  # a few raw rows are not yet a verdict
    if exp.shadow:  # too few shadow comparisons are not yet agreement
        judged = judged and agreement["compared"] >= exp.min_samples
    if enough and latency.improved and judged:
        return "promote", f"{latency.reason}; errors and agreement within the guardrails"
    if (now - exp.started_at).total_seconds() >= exp.max_duration_s:
        return "inconclusive", (
            f"no decision after the maximum duration of {exp.max_duration_s:,} s: "
            f"{champ['calls']:,} champion and {chall['calls']:,} challenger calls; "
            f"latency: {latency.reason}"
        )
    if not enough:
        return "continue", (
            f"collecting: {champ['calls']:,} champion and {chall['calls']:,} challenger calls "
            f"of {exp.min_samples:,} needed per arm"
        )
    if latency.improved and not judged:
        return "continue", f"challenger faster; agreement not judged yet: {fid['reason']}"
    return "continue", f"no decision yet: {latency.reason}"


def _agreement(
    db: Database, settings: Settings, exp: ExperimentInfo, fid: dict[str, Any]
) -> dict[str, Any]:
    if exp.shadow:
        t = schema.ShadowAggregate
        with db.session() as s:
            compared, agreed, score = s.execute(
                select(func.sum(t.compared), func.sum(t.agreed), func.sum(t.score_sum))
                .where(t.experiment_id == exp.id)
            ).one()  # fmt: skip
        compared, agreed = int(compared or 0), int(agreed or 0)
        rate = agreed / compared if compared else None
        return {"source": "shadow", "compared": compared, "agreed": agreed, "rate": rate,
                "mean_score": (score or 0.0) / compared if compared else None}  # fmt: skip
    # Split traffic sees different inputs: each arm is replayed against the source instead.
    chall = fid.get("challenger") or {}
    return {"source": "replay", "compared": chall.get("rows", 0), "rate": None,
            "note": fid["reason"]}  # fmt: skip


def _fidelity(
    db: Database, settings: Settings, exp: ExperimentInfo, now: datetime
) -> tuple[dict[str, Any], tuple[Replay, ...]]:
    """Both arms' fidelity to the source on their own inputs since the experiment started."""
    try:
        champ = get_version(db, exp.model, exp.champion_version)
        chall = get_version(db, exp.model, exp.challenger_version)
        source = source_of(db, champ)
        task = fidelity.model_task(db, exp.model)
        a, b = (
            fidelity.replay(db, info, source, arms=arms, limit=settings.fidelity_rows,
                            start=exp.started_at, end=now, task=task)
            for info, arms in ((champ, ("champion",)), (chall, (challenger_arm(exp),)))
        )  # fmt: skip
    except Exception as exc:  # a failed replay holds a promotion back, never the guardrails
        log.exception("fidelity replay of experiment %s failed", exp.id)
        reason = f"replay failed: {exc}"
        return {"verdict": "error", "reason": reason, "champion": None, "challenger": None}, ()
    tolerance = registry.tolerance(db, exp.model)  # the one the replays were judged with
    verdict, reason = _judge_fidelity(a, b, settings, tolerance)
    out = {"verdict": verdict, "reason": reason, "reference": source.version,
           "margin": fidelity.margin(b.task, tolerance) if b.task in fidelity.HEADLINE else None,
           "champion": a.to_dict(), "challenger": b.to_dict(), "task": b.task,
           **_fidelity_difference(a, b, 1.0 - settings.experiment_alpha)}  # fmt: skip
    return out, (a, b)


def _fidelity_difference(champ: Replay, chall: Replay, confidence: float) -> dict[str, Any]:
    """The headline metric's challenger - champion difference and its two-sided interval."""
    if champ.status != "ok" or chall.status != "ok" or champ.task != chall.task:
        return {}
    from statistics import NormalDist

    diff, se = fidelity.difference(chall, champ)
    half = NormalDist().inv_cdf(0.5 + confidence / 2.0) * se
    both = f"{fidelity.describe(chall)} vs champion {fidelity.describe(champ, label=False)}"
    return {
        "difference": diff,
        "difference_ci": [diff - half, diff + half],
        "summary": f"{both} ({chall.rows:,} and {champ.rows:,} rows)",
        "measure": f"{fidelity.HEADLINE[chall.task][0]} challenger - champion",
    }


def _judge_fidelity(
    champ: Replay, chall: Replay, settings: Settings, tolerance: Tolerance
) -> tuple[str, str]:
    """``worse`` | ``restores`` | ``same`` | ``insufficient_data`` | ``no_data``, and why."""
    if champ.status != "ok" or chall.status != "ok":
        if champ.rows == 0 and chall.rows == 0:
            return "no_data", "no raw inputs stored for either arm: fidelity is not judged"
        return "insufficient_data", (
            f"{chall.rows} challenger and {champ.rows} champion raw inputs replayed, "
            f"{fidelity.MIN_ROWS} needed per arm"
        )
    both = f"{fidelity.describe(chall)} vs champion {fidelity.describe(champ, label=False)}"
    # One-sided at alpha / 2: the same level as the two-sided 1 - alpha intervals shown.
    alpha, by = settings.experiment_alpha / 2.0, fidelity.margin(chall.task, tolerance)
    if fidelity.better_by(champ, chall, by, alpha):
        return "worse", (
            f"challenger is less faithful to the source {chall.source_version}: {both} "
            f"(tolerance {by:g}, {chall.rows} and {champ.rows} rows)"
        )
    if chall.passed and not champ.passed and fidelity.better_by(chall, champ, 0.0, alpha):
        return "restores", f"restores fidelity to the source: {both}"
    return "same", f"fidelity to the source {chall.source_version}: {both}"


def _public(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if not k.startswith("_")}


def _timeline(
    stats: dict[str, Any], started: datetime, arm: str = "champion"
) -> list[dict[str, Any]]:
    """p50 and p95 of each whole minute since ``started`` (minute 0 is the first)."""
    by_minute: dict[int, list[Any]] = {}
    for start, _calls, buckets in stats["_timeline"]:
        by_minute.setdefault(int((start - started).total_seconds() // 60), []).append(buckets)
    out = []
    for minute, hists in sorted(by_minute.items()):
        merged = sketch.merge(hists)
        p50, p95 = sketch.quantiles(merged, (0.5, 0.95))
        t = started + timedelta(minutes=minute)
        out.append({"minute": minute, "t": t.isoformat(), "arm": arm,
                    "calls": sum(merged.values()), "p50_ms": _num(p50),
                    "p95_ms": _num(p95)})  # fmt: skip
    return out


# --- acting on verdicts ----------------------------------------------------------------


def run_analysis(
    db: Database, settings: Settings, *, notifier: Notifier | None = None,
    now: datetime | None = None, model: str | None = None,
) -> list[Verdict]:  # fmt: skip
    """Analyze every running experiment (of ``model``) once and act on each verdict."""
    notifier = notifier or Notifier(settings.webhook_url)
    verdicts = []
    for exp in experiments.list_experiments(db, model=model, status="running"):
        try:
            verdict = analyze(db, settings, exp, now)
            for r in verdict.replays:
                if r.status == "ok":
                    fidelity.store(db, r, experiment_id=exp.id)
            verdicts.append(_act(db, settings, exp, verdict, notifier))
        except Exception:  # e.g. stopped by hand meanwhile: one experiment never stops the rest
            log.exception("tunewatch: analysis of experiment %s failed", exp.id)
    return verdicts


def _act(
    db: Database, settings: Settings, exp: ExperimentInfo, v: Verdict, notifier: Notifier
) -> Verdict:
    if exp.dry_run and v.decision in ("rollback", "promote"):
        # Watch only: the verdict is recorded for people to read; nothing changes.
        v = replace(v, dry_run=True, reason=f"dry run, not acted on: would {v.decision}: "
                    f"{v.reason}")  # fmt: skip
        v.evidence.update(reason=v.reason, dry_run=True)
        experiments.set_status(db, exp.id, "running", v.evidence)
        return v
    if v.decision == "inconclusive" and exp.on_inconclusive == "pause":
        reason = (f"paused: {v.reason}; the challenger is out of traffic until a person "
                  f"stops the experiment (tunewatch experiment stop {exp.id})")  # fmt: skip
        v = replace(v, reason=reason)
        v.evidence.update(reason=reason)
        if experiments.pause(db, exp.id, reason=reason, analysis=v.evidence):
            notifier.notify_text(f"experiment {exp.id} of {exp.model}:{exp.challenger_version} "
                                 f"{reason}")  # fmt: skip
        return v
    if v.decision == "rollback":
        experiments.end(db, exp.id, "rolled_back", by="analysis", reason=v.reason,
                        action="experiment_rolled_back", analysis=v.evidence)  # fmt: skip
        _event(db, notifier, "experiment_rollback", exp.model, exp.challenger_version, v.reason,
               v.to_dict())  # fmt: skip
        return v
    if v.decision == "inconclusive":
        experiments.end(db, exp.id, "inconclusive", by="analysis", reason=v.reason,
                        analysis=v.evidence)  # fmt: skip
        return v
    if v.decision == "promote":
        # Request first: if that fails, the experiment is still running and is judged again.
        p = promotions.request(db, exp.model, exp.challenger_version, evidence=v.evidence,
                               experiment_id=exp.id,
                               watch=timedelta(seconds=settings.promotion_watch_s))  # fmt: skip
        experiments.set_status(db, exp.id, "promotion_pending", v.evidence)
        notifier.notify_text(f"promotion {p.id} of {exp.model}:{exp.challenger_version} "
                             f"is {p.status}: " + "; ".join(lines(v.evidence)))  # fmt: skip
        return replace(v, promotion_id=p.id)
    experiments.set_status(db, exp.id, "running", v.evidence)
    return v


def _event(
    db: Database, notifier: Notifier, kind: str, model: str, version: str, summary: str,
    details: dict[str, Any],
) -> None:  # fmt: skip
    finding = Finding(kind, model, version, "", True, "critical", summary, details)
    event = apply_finding(db, finding)
    if event is not None:
        notifier.notify(event)


# --- after a promotion -----------------------------------------------------------------


def watch_promotions(
    db: Database, settings: Settings, *, notifier: Notifier | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Roll back applied promotions whose new champion regressed inside the watch window."""
    notifier = notifier or Notifier(settings.webhook_url)
    now = now or utcnow()
    out = []
    for p in promotions.watched(db, now):
        assert p.applied_at is not None
        # Two versions, so no call can count on the wrong side: the new champion served
        # none as champion before it was applied. Windows start on whole minutes, so the
        # interval holding applied_at counts whole.
        span = now - p.applied_at
        after = arm_stats(db, p.model, p.to_version, "champion", _minute(p.applied_at), now)
        before = arm_stats(db, p.model, p.from_version, "champion",
                           _minute(p.applied_at - span), p.applied_at)  # fmt: skip
        lat, err = guardrails(before, after, settings, settings.experiment_min_samples)
        reason = ""
        if lat.regressed:
            reason = f"after promotion the new champion regressed: {lat.reason}"
        elif err.decision == "challenger_worse":
            reason = f"after promotion the error rate rose: {err.reason}"
        if reason:
            promotions.rollback(db, p.id, reason=reason, by="watch")
            details = {"promotion_id": p.id, "latency": lat.to_dict(), "error_rate": err.to_dict()}
            _event(db, notifier, "promotion_rollback", p.model, p.to_version, reason, details)
        out.append({"promotion_id": p.id, "rolled_back": bool(reason), "reason": reason})
    return out


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)
