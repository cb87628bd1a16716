"""The end-to-end demo: a real model goes through wrap, detect, tune and promote in minutes.

``tunewatch demo`` trains a small CNN on scikit-learn's bundled digits, registers it, serves it
through a deployment, then injects a drift (darker, noisier images) and a latency regression
(a noisy neighbour process competing for the CPU), detects both, retunes the model on the
production samples it stored, runs an A/B experiment with the winner, reaches a pending
promotion, gets it approved, promotes it and ends with the numbers. The database is left in
place for ``tunewatch status``, ``tunewatch serve`` and the dashboards.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from monitor.settings import Settings

MODEL = "digits"


def demo_settings(settings: Settings, pace: float = 1.0) -> Settings:
    """Settings for a demo of minutes: 1 s aggregates and a sample of one call in ten.

    Detection windows are not set here: :func:`run_flow` drives each phase by counts and then
    sizes the windows to the phase it just ran, so what it claims is found on a busy machine
    as on an idle one.
    """
    return settings.replace(
        aggregate_interval_s=1, sample_rate=0.1, sample_cap_per_minute=20_000,
        span_sample_rate=0.05, latency_baseline_s=3600, latency_min_samples=50,
        drift_reference_rows=REFERENCE_ROWS, experiment_min_samples=max(100, int(300 * pace)),
        experiment_max_duration_s=3600, promotion_watch_s=max(10, int(30 * pace)),
        retune_on="latency_regression,data_drift",
    )  # fmt: skip


REFERENCE_ROWS = 300  # the drift reference: the first samples, all from the normal phase
DRIFT_ROWS = 100  # samples of the drifted phase before detection runs
ROUND_CALLS = 400  # experiment calls between two looks of the analysis
MAX_ROUNDS = 40  # looks before the demo says the experiment did not decide


def _cnn_class() -> Any:
    import torch

    class CNN(torch.nn.Module):
        """Three small convolutions on 8x8 digits, then a linear classifier."""

        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 48, 3, padding=1)
            self.c2 = torch.nn.Conv2d(48, 96, 3, padding=1)
            self.c3 = torch.nn.Conv2d(96, 96, 3, padding=1)
            self.fc = torch.nn.Linear(96 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c1(x))
            h = torch.nn.functional.max_pool2d(torch.relu(self.c2(h)), 2)
            return self.fc(torch.relu(self.c3(h)).flatten(1))

    return CNN


@dataclass(frozen=True)
class Data:
    """Digits split for the demo: images (N, 1, 8, 8) in [0, 1] and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int = 0) -> Data:
    """scikit-learn's bundled digits (no download), shuffled and split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order]
    return Data(x[:1300], y[:1300], x[1300:], y[1300:])


def train_cnn(data: Data, epochs: int = 4, seed: int = 0) -> tuple[Any, float]:
    """Train the CNN for ``epochs`` epochs; returns the model and its test accuracy."""
    import torch

    torch.manual_seed(seed)
    model = _cnn_class()()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    return model, acc


def _hog(stop_at: float) -> None:  # runs in another process: the noisy neighbour
    a = np.random.default_rng(0).normal(size=(400, 400))
    while time.time() < stop_at:
        a = np.tanh(a @ a.T / 400.0)


def noisy_neighbour(workers: int = 2, limit_s: float = 600.0) -> list[Any]:
    """Start processes that keep the CPU busy until terminated (a latency regression);
    ``limit_s`` is only a safety net should the demo die without stopping them."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hog, args=(time.time() + limit_s,), daemon=True)
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    return procs


def stop_all(procs: list[Any]) -> None:
    """Terminate the noisy neighbour's processes and wait for them."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.join()


def drifted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darker, noisier images: what a new camera or scanner might send."""
    return np.clip(0.6 * x + rng.normal(0.0, 0.15, size=x.shape), 0.0, 1.0).astype(np.float32)


def next_second() -> datetime:
    """Wait for the next whole second of the clock (an edge of 1 s aggregates); return it."""
    time.sleep(1.0 - time.time() % 1.0)
    return datetime.fromtimestamp(math.floor(time.time()), timezone.utc)


def serve(
    dep: Any, images: np.ndarray, calls: int, rng: np.random.Generator, batch: int = 1
) -> None:
    """Send ``calls`` calls of ``batch`` images, one after another, as clients would."""
    for _ in range(calls):
        i = int(rng.integers(0, len(images) - batch + 1))
        dep({"input": images[i : i + batch]}, key=f"user-{rng.integers(0, 10_000)}")


def serve_until(
    mon: Any, dep: Any, images: np.ndarray, rng: np.random.Generator, *, calls: int,
    samples: int, db: Any, version: str, since: Any, batch: int = 1,
) -> tuple[int, int]:  # fmt: skip
    """Serve at least ``calls`` calls and until ``samples`` of them are stored (sampling is
    random): counts, never a clock, end the phase. Returns (calls, samples)."""
    from monitor.storage import read_samples

    sent, stored, step = 0, 0, max(50, calls // 4)
    while sent < calls or stored < samples:
        serve(dep, images, step, rng, batch)
        sent += step
        mon.flush()
        stored = len(read_samples(db, MODEL, version, start=since))
    return sent, stored


Say = Callable[[str], None]


def run_flow(
    settings: Settings, *, yes: bool, say: Say, pace: float = 1.0, min_gain: float | None = None
) -> dict[str, Any]:
    """The whole demo; returns the summary numbers. ``min_gain``: the retune's (default 5 %)."""
    from monitor import Monitor
    from monitor.storage import Database
    from tuner import registry

    settings = demo_settings(settings, pace)
    db = Database(settings.database_url)
    rng = np.random.default_rng(0)
    summary: dict[str, Any] = {"database": settings.database_url}

    say("1/8 training a CNN on scikit-learn's digits (torch, CPU)")
    data = load_data()
    model, accuracy = train_cnn(data, epochs=max(2, round(4 * pace)))
    summary["fp32_test_accuracy"] = round(accuracy, 4)
    version = _next_free_version(db)
    info = registry.register(MODEL, torch_module=model, example_input=data.x_test[:2],
                             version=version, db=db, settings=settings)  # fmt: skip
    _make_champion(db, info.version)
    registry.set_policy(db, MODEL, {"auto_experiment": True, "share": 0.5}, by="demo")
    say(f"    test accuracy {accuracy:.3f}; registered {MODEL}:{info.version} as champion")

    with Monitor(settings=settings) as mon:
        dep = mon.deployment(MODEL, poll_s=1.0)
        say("2/8 serving normal traffic through a deployment")
        calls, stored = serve_until(mon, dep, data.x_test, rng, calls=int(3000 * pace),
                                    samples=REFERENCE_ROWS, db=db, version=info.version,
                                    since=None)  # fmt: skip
        say(f"    {calls:,} calls, {stored:,} sampled (the drift reference: the first "
            f"{REFERENCE_ROWS})")  # fmt: skip
        before = _champion_latency(mon, db, info.version)
        say(
            "3/8 injecting a drift (darker, noisier images) and a latency regression (clients "
            "now send 16 images a call while a noisy neighbour process competes for the CPU)"
        )
        events = _drift_phase(mon, dep, db, settings, data, rng, info.version, pace, say)
        summary["events"] = sorted({e.kind for e in events})
        summary["drift_share"] = _drift_share(events)
        summary["latency_regression"] = _regression(events)
        outcome = _retune(db, settings, say, min_gain)
        summary.update(outcome)
        if outcome.get("winner") is None:
            say(f"    no new version: {outcome.get('reason')}; the champion keeps serving and "
                "the demo ends here")  # fmt: skip
        else:
            summary.update(_experiment(db, settings, mon, dep, data, rng, yes, say, pace))
        if summary.get("decision") == "applied":
            summary["latency_after_ms"] = _champion_latency(mon, db, summary["winner"])
        summary["latency_before_ms"] = before
    db.dispose()
    return summary


def _drift_phase(
    mon: Any, dep: Any, db: Any, settings: Settings, data: Data, rng: np.random.Generator,
    version: str, pace: float, say: Say,
) -> list[Any]:  # fmt: skip
    """Serve drifted, bigger calls beside a noisy neighbour, then detect over that phase.

    The phase ends on counts (calls, stored samples); detection then looks back exactly over
    the phase, however long the machine took to serve it: the phase starts and detection runs
    on whole seconds, the edges of the 1 s aggregates, so no call from before the phase lands
    in its window (a fast machine serves the phase in about a second).
    """
    from monitor.detect import run_detection

    start = next_second()
    hogs = noisy_neighbour()
    try:
        calls, stored = serve_until(mon, dep, drifted(data.x_test, rng), rng,
                                    calls=int(600 * pace), samples=DRIFT_ROWS, db=db,
                                    version=version, since=start, batch=16)  # fmt: skip
    finally:
        stop_all(hogs)
    mon.flush()
    say(f"    {calls:,} calls ({stored:,} sampled) under drift, bigger calls and CPU contention")
    now = next_second()
    phase_s = round((now - start).total_seconds())
    say(f"4/8 detecting over the last {phase_s} s (the drifted phase)")
    events = run_detection(db, settings.replace(latency_recent_s=phase_s, drift_current_s=phase_s),
                           now=now)  # fmt: skip
    for e in events:
        say(f"    [{e.kind}] {e.summary}")
    return events


def _next_free_version(db: Any) -> str:
    from monitor.registry import list_versions

    n = len([v for v in list_versions(db, MODEL) if "-t" not in v.version])
    return f"v{n + 1}"


def _make_champion(db: Any, version: str) -> None:
    """A re-run of the demo starts again from its freshly trained model."""
    from monitor.registry import list_versions
    from tuner import registry

    for v in list_versions(db, MODEL):
        if v.status == "champion" and v.version != version:
            registry.set_status(db, MODEL, v.version, "retired")
    registry.set_status(db, MODEL, version, "champion")


def _champion_latency(mon: Any, db: Any, version: str) -> dict[str, float | None]:
    from monitor.storage import utcnow
    from tuner.analysis import arm_stats

    mon.flush()
    now = utcnow()
    stats = arm_stats(db, MODEL, version, "champion", now - timedelta(hours=1), now)
    return {"p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"], "calls": stats["calls"]}


def _drift_share(events: list[Any]) -> float | None:
    drift = [e for e in events if e.kind == "data_drift"]
    return float(drift[0].details.get("share_drifted", 0.0)) if drift else None


def _regression(events: list[Any]) -> dict[str, Any] | None:
    lat = [e for e in events if e.kind == "latency_regression"]
    if not lat:
        return None
    d = lat[0].details
    return {"median_ratio": d.get("median_ratio"), "p95_ratio": d.get("p95_ratio")}


def _retune(db: Any, settings: Settings, say: Say, min_gain: float | None) -> dict[str, Any]:
    from monitor.events import retune_requests
    from tuner.jobs import mark_request
    from tuner.tuning import MIN_GAIN, run_tuning

    requests = retune_requests(db, "pending")
    say(f"5/8 retuning on stored production samples ({len(requests)} retune request(s))")
    outcome = run_tuning(db, settings, MODEL, slo_ms=20.0, objective="latency", quick=True,
                         retune_request_id=requests[0].id if requests else None,
                         window=timedelta(hours=1),
                         min_gain=MIN_GAIN if min_gain is None else min_gain)  # fmt: skip
    for r in requests:
        mark_request(db, r.id, "done", f"tuning run {outcome.run_id}")
    for t in outcome.result.leaderboard:
        verdict = "pass" if t.passed else "FAIL"
        p95 = f"{t.latency_p95_ms:.3f} ms" if t.latency_p95_ms else "-"
        say(f"    {t.name:<22} {verdict}  p95 at batch 1: {p95:>9}  {t.reason.split(';')[0][:40]}")
    say(f"    {outcome.outcome}: {outcome.reason}")
    out = {"tuning_run": outcome.run_id, "tuning_outcome": outcome.outcome,
           "reason": outcome.reason, "report": outcome.report, "winner": None}  # fmt: skip
    w = outcome.winner
    if w is None:
        return out
    say(f"    winner {MODEL}:{w.version} ({w.config.get('candidate')}), report {outcome.report}")
    return {**out, "winner": w.version, "winner_candidate": w.config.get("candidate"),
            "winner_accuracy": w.metrics.get("accuracy", {}),
            "offline": offline_speedup(db, w.version)}  # fmt: skip


def offline_speedup(db: Any, version: str) -> dict[str, Any] | None:
    """The tuning run's own figures (tuning_trials, the rows report.md is written from) for
    what the live experiment compares: the champion as served (the run's ``incumbent``)
    against the winner, one call of one image at a time; median latency at batch 1."""
    from tuner.evidence import tuning_evidence

    run = tuning_evidence(db, MODEL, version)
    if run is None or not run.get("winner") or not run.get("incumbent"):
        return None
    w, inc = run["winner"], run["incumbent"]
    if not (w.get("p50_ms") and inc.get("p50_ms")):
        return None
    return {"run": run["run"], "champion_p50_ms": inc["p50_ms"], "winner_p50_ms": w["p50_ms"],
            "champion_p95_ms": inc["p95_ms"], "winner_p95_ms": w["p95_ms"],
            "speedup": inc["p50_ms"] / w["p50_ms"]}  # fmt: skip


def _experiment(
    db: Any, settings: Settings, mon: Any, dep: Any, data: Data, rng: np.random.Generator,
    yes: bool, say: Say, pace: float,
) -> dict[str, Any]:  # fmt: skip
    from tuner import experiments, promotions
    from tuner.analysis import run_analysis

    live = [e for e in experiments.list_experiments(db, MODEL) if e.status == "running"]
    if not live:
        raise RuntimeError("the model's policy should have started an experiment")
    exp = live[0]
    say(f"6/8 experiment {exp.id}: {exp.share:.0%} of traffic to {exp.challenger_version} "
        "(started by the model's policy)")  # fmt: skip
    dep.reload()
    next_second()  # the analysis leaves out the aggregate interval holding the start
    verdict, served = None, 0
    for _ in range(MAX_ROUNDS):  # counts, not a clock, decide how long it runs
        serve(dep, data.x_test, ROUND_CALLS, rng)
        served += ROUND_CALLS
        mon.flush()
        found = [v for v in run_analysis(db, settings) if v.experiment_id == exp.id]
        if not found:  # the analysis logged why; the experiment stays as it is
            break
        verdict = found[0]
        say(f"    after {served:,} calls: {verdict.decision}: {verdict.reason[:110]}")
        if verdict.decision != "continue":
            break
    out = {"experiment": exp.id, "experiment_calls": served,
           "experiment_decision": verdict.decision if verdict else None,
           "evidence": {"arms": verdict.evidence.get("arms"),
                        "verdicts": verdict.evidence.get("verdicts", [])} if verdict else {},
           }  # fmt: skip
    if verdict is None or verdict.promotion_id is None:
        why = verdict.reason if verdict else "no look"
        say(f"    no promotion request after {served:,} calls ({why}); the champion keeps "
            "serving and the demo ends here")  # fmt: skip
        if verdict is not None and verdict.decision == "continue":
            experiments.stop(db, exp.id, by="demo", reason=f"no decision after {served} calls")
        return out
    pid = verdict.promotion_id
    say(f"7/8 promotion {pid} is pending approval")
    if yes:
        promotions.approve(db, pid, by="demo --yes", note="approved by the demo",
                           watch=timedelta(seconds=settings.promotion_watch_s))  # fmt: skip
    else:
        say(f"    approve it from another terminal:\n      tunewatch approve {pid} --by "
            f"YOUR_NAME --database-url {settings.database_url}\n    (or open the page of "
            "`tunewatch serve`); waiting ...")  # fmt: skip
        _wait_decided(db, pid)
    decided = promotions.get(db, pid)
    say(f"8/8 promotion {pid} {decided.status} by {decided.decided_by}")
    dep.reload()  # what the deployment's poller would pick up within a second
    serve(dep, data.x_test, ROUND_CALLS, rng)
    return {**out, "promotion": pid, "decision": decided.status,
            "decided_by": decided.decided_by, "serving": dep.routing.champion.version}  # fmt: skip


def _wait_decided(db: Any, pid: int) -> None:
    from tuner import promotions

    while promotions.get(db, pid).status == "pending":
        time.sleep(1.0)


def seed_database(settings: Settings, pace: float = 0.35) -> dict[str, Any]:
    """Run the whole demo quietly and approve automatically (used to seed dashboards tests).

    Any winner at least as fast as the incumbent goes on to the experiment (``min_gain=0``):
    the tiny CNN's int8 winner is only x1.02-x1.38 the fp32 incumbent per round at batch 1 on
    an AVX2-only CPU, so the demo's 5 % bar stopped one seeding run before the experiment.
    """
    return run_flow(settings, yes=True, say=lambda _msg: None, pace=pace, min_gain=0.0)


def run_demo(settings: Settings, *, yes: bool = False, pace: float = 1.0) -> int:
    """``tunewatch demo``: run the flow with progress, then print the summary."""
    import logging

    from rich.console import Console

    console = Console()

    def say(text: str) -> None:  # plain text: "[pass]" or "[data_drift]" is not markup
        console.print(text, markup=False, highlight=False)

    logging.getLogger("tunewatch").setLevel(logging.ERROR)  # the demo narrates events itself
    start = time.perf_counter()
    summary = run_flow(settings, yes=yes, say=say, pace=pace)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    _print_summary(console, summary)
    return 0


def speedups(s: dict[str, Any]) -> dict[str, Any]:
    """Offline (the tuning run) and live (the experiment) speed-ups of the winner over the
    champion as served, both from median latency of one-image calls, and whether they agree."""
    offline = (s.get("offline") or {}).get("speedup")
    latency = next((v for v in (s.get("evidence") or {}).get("verdicts", [])
                    if v["guardrail"] == "latency"), None)  # fmt: skip
    effect = (latency or {}).get("effect") or {}
    live = effect.get("estimate")  # the speed-up when faster, else challenger / champion
    if live is not None and effect.get("direction") != "faster":
        live = 1.0 / live
    agree = None
    if offline is not None and live is not None and effect.get("direction") != "no_difference":
        agree = (offline > 1.0) == (live > 1.0)
    return {"offline": offline, "live": live, "live_direction": effect.get("direction"),
            "agree": agree}  # fmt: skip


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="tunewatch demo: what happened", show_header=False)
    b, a = s.get("latency_before_ms") or {}, s.get("latency_after_ms") or {}
    reg = s.get("latency_regression") or {}
    verdicts = {v["guardrail"]: v for v in (s.get("evidence") or {}).get("verdicts", [])}
    off, speed = s.get("offline") or {}, speedups(s)
    s["speedups"] = speed
    agree = {True: "same direction", False: "DISAGREE", None: "not compared"}[speed["agree"]]
    rows = [
        ("events detected", ", ".join(s["events"]) or "none"),
        ("input drift: share of features drifted", _fmt(s.get("drift_share"))),
        ("latency regression detected (median, p95)",
         f"x{_fmt(reg.get('median_ratio'))}, x{_fmt(reg.get('p95_ratio'))}"),
        ("tuning run", f"{s.get('tuning_run')}: {s.get('tuning_outcome')}: {s.get('reason')}"),
        ("winner", f"{s['winner']} ({s.get('winner_candidate')})" if s.get("winner") else "none"),
        ("accuracy vs the source", _accuracy(s.get("winner_accuracy") or {})),
        ("offline: champion -> winner, p50 @1 (tuning run)",
         f"{_fmt(off.get('champion_p50_ms'))} -> {_fmt(off.get('winner_p50_ms'))} ms, "
         f"x{_fmt(speed['offline'])} faster" if off else "-"),
        ("live: latency", _verdict(verdicts, "latency")),
        ("offline vs live speed-up",
         f"x{_fmt(speed['offline'])} vs x{_fmt(speed['live'])}: {agree}"),
        ("live: errors", _verdict(verdicts, "errors")),
        ("live: agreement", _verdict(verdicts, "agreement")),
        ("experiment", f"{s.get('experiment')}: {s.get('experiment_decision')} after "
         f"{s.get('experiment_calls', 0):,} calls" if s.get("experiment") else "none"),
        ("decision", f"{s['decision']} by {s['decided_by']}; now serving {s['serving']}"
         if s.get("decision") else "none: the champion keeps serving"),
        ("champion latency before: p50 / p95", _quantiles(b)),
        ("champion latency after: p50 / p95", _quantiles(a)),
        ("elapsed", f"{s.get('elapsed_s')} s"),
        ("database", s["database"]),
    ]  # fmt: skip
    for k, v in rows:
        table.add_row(Text(k), Text(v))
    console.print(table)
    console.print(
        "next: `tunewatch status`, `tunewatch events`, `tunewatch promotions`, "
        "`tunewatch serve` (API + approval page), and the Grafana dashboards",
        markup=False,
    )


def _accuracy(acc: dict[str, Any]) -> str:
    parts = []
    if "top1_agreement" in acc:
        parts.append(f"top-1 agreement {100 * acc['top1_agreement']:.2f} %")
    if "accuracy" in acc:
        parts.append(f"accuracy {100 * acc['accuracy']:.2f} %")
    return ", ".join(parts) or str(acc)


def _verdict(verdicts: dict[str, Any], guardrail: str) -> str:
    v = verdicts.get(guardrail)
    return f"[{v['status'].replace('_', ' ')}] {v['text']}" if v else "-"


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _quantiles(stats: dict[str, Any]) -> str:
    return f"{_fmt(stats.get('p50_ms'))} / {_fmt(stats.get('p95_ms'))} ms" if stats else "-"
