"""The end-to-end demo: a real model goes through wrap, detect, tune and promote in minutes.

``tunewatch demo`` trains a small CNN on scikit-learn's bundled digits, registers it, serves it
through a deployment, then injects a drift (darker, noisier images) and a latency regression
(a noisy neighbour process competing for the CPU), detects both, retunes the model on the
production samples it stored, runs an A/B experiment with the winner, reaches a pending
promotion, gets it approved, promotes it and ends with the numbers. The database is left in
place for ``tunewatch status``, ``tunewatch serve`` and the dashboards.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from monitor.settings import Settings

MODEL = "digits"


def demo_settings(settings: Settings, pace: float = 1.0) -> Settings:
    """Detection windows sized for a demo of minutes instead of hours."""
    return settings.replace(
        aggregate_interval_s=1, sample_rate=0.02, sample_cap_per_minute=20_000,
        span_sample_rate=0.05, latency_recent_s=max(5, int(20 * pace)),
        latency_baseline_s=3600, latency_min_samples=50,
        drift_current_s=max(5, int(20 * pace)), drift_reference_rows=300,
        experiment_min_samples=150, experiment_max_duration_s=max(30, int(120 * pace)),
        promotion_watch_s=max(10, int(30 * pace)),
        retune_on="latency_regression,data_drift",
    )  # fmt: skip


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


def noisy_neighbour(seconds: float, workers: int = 3) -> list[Any]:
    """Start processes that keep the CPU busy for ``seconds`` (a latency regression)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hog, args=(time.time() + seconds,), daemon=True)
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    return procs


def drifted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darker, noisier images: what a new camera or scanner might send."""
    return np.clip(0.6 * x + rng.normal(0.0, 0.15, size=x.shape), 0.0, 1.0).astype(np.float32)


def serve_for(
    dep: Any, images: np.ndarray, seconds: float, rng: np.random.Generator, batch: int = 1
) -> int:
    """Send calls of ``batch`` images for ``seconds``, as clients would; returns the count."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        i = int(rng.integers(0, len(images) - batch + 1))
        dep({"input": images[i : i + batch]}, key=f"user-{rng.integers(0, 10_000)}")
        n += 1
    return n


Say = Callable[[str], None]


def run_flow(settings: Settings, *, yes: bool, say: Say, pace: float = 1.0) -> dict[str, Any]:
    """The whole demo; returns the summary numbers."""
    from monitor import Monitor
    from monitor.detect import run_detection
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
        n = serve_for(dep, data.x_test, 20 * pace, rng)
        say(f"    {n} calls")
        before = _champion_latency(mon, db, info.version)
        say(
            "3/8 injecting a drift (darker, noisier images) and a latency regression (clients "
            "now send 16 images a call while a noisy neighbour process competes for the CPU)"
        )
        hogs = noisy_neighbour(22 * pace)
        n = serve_for(dep, drifted(data.x_test, rng), 20 * pace, rng, batch=16)
        for p in hogs:
            p.join()
        mon.flush()
        say(f"    {n} calls under drift, bigger calls and CPU contention")
        say("4/8 detecting")
        events = run_detection(db, settings)
        for e in events:
            say(f"    [{e.kind}] {e.summary}")
        summary["events"] = sorted({e.kind for e in events})
        summary["drift_share"] = _drift_share(events)
        summary["latency_regression"] = _regression(events)
        outcome = _retune(db, settings, say)
        summary.update(outcome)
        if outcome.get("winner") is None:
            raise RuntimeError("the tuner found no winner: see the report for why")
        summary.update(_experiment(db, settings, mon, dep, data, rng, yes, say, pace))
        after = _champion_latency(mon, db, summary["winner"])
        summary["latency_before_ms"], summary["latency_after_ms"] = before, after
    db.dispose()
    return summary


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


def _retune(db: Any, settings: Settings, say: Say) -> dict[str, Any]:
    from monitor.events import retune_requests
    from tuner.tuning import run_tuning

    requests = retune_requests(db, "pending")
    say(f"5/8 retuning on stored production samples ({len(requests)} retune request(s))")
    outcome = run_tuning(db, settings, MODEL, slo_ms=20.0, objective="latency", quick=True,
                         retune_request_id=requests[0].id if requests else None,
                         window=timedelta(hours=1))  # fmt: skip
    from tuner.jobs import mark_request

    for r in requests:
        mark_request(db, r.id, "done", f"tuning run {outcome.run_id}")
    for t in outcome.result.leaderboard:
        verdict = "pass" if t.passed else "FAIL"
        p95 = f"{t.latency_p95_ms:.3f} ms" if t.latency_p95_ms else "-"
        say(f"    {t.name:<22} {verdict}  p95 at batch 1: {p95:>9}  {t.reason.split(';')[0][:40]}")
    w = outcome.winner
    if w is None:
        return {"winner": None, "report": outcome.report}
    metrics = w.metrics
    say(f"    winner {MODEL}:{w.version} ({w.config.get('candidate')}), report {outcome.report}")
    return {
        "winner": w.version, "winner_candidate": w.config.get("candidate"),
        "tuning_run": outcome.run_id, "offline_speedup": outcome.speedup,
        "winner_accuracy": metrics.get("accuracy", {}), "report": outcome.report,
    }  # fmt: skip


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
    deadline = time.perf_counter() + exp.max_duration_s + 5
    verdict = None
    while time.perf_counter() < deadline:
        serve_for(dep, data.x_test, 4 * pace, rng)
        mon.flush()
        (verdict,) = run_analysis(db, settings)
        say(f"    analysis: {verdict.decision}: {verdict.reason[:100]}")
        if verdict.decision != "continue":
            break
    if verdict is None or verdict.promotion_id is None:
        raise RuntimeError(f"no promotion request: {verdict.reason if verdict else 'no look'}")
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
    deadline = time.perf_counter() + 10
    while dep.routing.champion.version != exp.challenger_version and time.perf_counter() < deadline:
        time.sleep(0.2)
    serve_for(dep, data.x_test, 4 * pace, rng)
    ev = verdict.evidence
    return {
        "experiment": exp.id, "promotion": pid, "decision": decided.status,
        "decided_by": decided.decided_by, "serving": dep.routing.champion.version,
        "evidence": {"arms": ev.get("arms"), "verdicts": ev.get("verdicts", [])},
    }  # fmt: skip


def _wait_decided(db: Any, pid: int) -> None:
    from tuner import promotions

    while promotions.get(db, pid).status == "pending":
        time.sleep(1.0)


def seed_database(settings: Settings, pace: float = 0.35) -> dict[str, Any]:
    """Run the whole demo quietly and approve automatically (used to seed dashboards tests)."""
    return run_flow(settings, yes=True, say=lambda _msg: None, pace=pace)


def run_demo(settings: Settings, *, yes: bool = False, pace: float = 1.0) -> int:
    """``tunewatch demo``: run the flow with progress, then print the summary."""
    import logging

    from rich.console import Console

    console = Console()
    logging.getLogger("tunewatch").setLevel(logging.ERROR)  # the demo narrates events itself
    start = time.perf_counter()
    summary = run_flow(settings, yes=yes, say=console.print, pace=pace)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    _print_summary(console, summary)
    return 0


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="tunewatch demo: what happened", show_header=False)
    b, a = s["latency_before_ms"], s["latency_after_ms"]
    ev = s["evidence"]
    reg = s.get("latency_regression") or {}
    verdicts = {v["guardrail"]: v for v in ev.get("verdicts", [])}
    rows = [
        ("events detected", ", ".join(s["events"]) or "none"),
        ("input drift: share of features drifted", _fmt(s.get("drift_share"))),
        ("latency regression detected (median, p95)",
         f"x{_fmt(reg.get('median_ratio'))}, x{_fmt(reg.get('p95_ratio'))}"),
        ("champion latency before: p50 / p95", f"{_fmt(b['p50_ms'])} / {_fmt(b['p95_ms'])} ms"),
        ("champion latency after: p50 / p95", f"{_fmt(a['p50_ms'])} / {_fmt(a['p95_ms'])} ms"),
        ("live: latency", _verdict(verdicts, "latency")),
        ("speed-up offline (tuning run, items/s)", f"x{_fmt(s.get('offline_speedup'))}"),
        ("winner", f"{s['winner']} ({s.get('winner_candidate')})"),
        ("accuracy vs the old champion", _accuracy(s.get("winner_accuracy") or {})),
        ("decision", f"{s['decision']} by {s['decided_by']}; now serving {s['serving']}"),
        ("live: errors", _verdict(verdicts, "errors")),
        ("live: agreement", _verdict(verdicts, "agreement")),
        ("elapsed", f"{s.get('elapsed_s')} s"),
        ("database", s["database"]),
    ]  # fmt: skip
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(
        "next: `tunewatch status`, `tunewatch events`, `tunewatch promotions`, "
        "`tunewatch serve` (API + approval page), and the Grafana dashboards"
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
