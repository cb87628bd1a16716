"""Realized performance: known-truth drop detection and the cost of joining labels.

Run: ``.venv/bin/python bench/performance.py`` (``--quick`` for a short run). Prints a Markdown
table for bench/README.md.

Detection: a scikit-learn logistic regression trained on half of scikit-learn's bundled digits
serves the other half through ``Monitor.wrap``, one request at a time, each inside
``mon.context(request_id=..., sample=True)``. Every window draws its requests from the held-out
images; in the drop period the images carry Gaussian pixel noise (a real data shift that costs
the model accuracy). Labels arrive after all traffic, shuffled. The detector compares each
window with a fixed reference period (the first windows), so every stable window is an
independent chance of a false alarm.

Join cost: ``N`` predictions with ids stored, then ``N`` labels for them logged in random order
with ``log_labels`` (id lookups, match counting, upsert), then one ``realized_performance`` read
of the whole period (the SQL join and the metrics), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from monitor import Monitor, schema
from monitor.labels import log_labels
from monitor.performance import PerformanceDetector, realized_performance
from monitor.settings import Settings
from monitor.storage import Database, insert_rows, upgrade

PG_URL = os.environ.get(
    "TUNEWATCH_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _model() -> tuple[Any, np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, pool = order[: len(y) // 2], order[len(y) // 2 :]
    clf = LogisticRegression(max_iter=2000).fit(x[train] / 16.0, y[train])
    acc = float((clf.predict(x[pool] / 16.0) == y[pool]).mean())
    return clf, x[pool] / 16.0, y[pool], acc


def detection(
    stable: int, drop: int, per_window: int, noise: float, ref_windows: int
) -> dict[str, Any]:
    """Windows of served traffic; how many stable windows alarm and when the drop is seen."""
    clf, pool_x, pool_y, pool_acc = _model()
    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/perf.db"
    settings = Settings(database_url=url, performance_min_labels=100)
    rng = np.random.default_rng(1)
    bounds: list[tuple[datetime, datetime]] = []
    ids: list[str] = []
    truth: list[int] = []
    kinds = ["stable"] * (ref_windows + stable) + ["drop"] * drop
    with Monitor(url, sample_rate=0.0, flush_interval_s=0.5) as mon:
        predict = mon.wrap(clf.predict_proba, name="digits", version="v1")
        for w, kind in enumerate(kinds):
            start = datetime.now(timezone.utc)
            pick = rng.integers(0, len(pool_y), per_window)
            x = pool_x[pick]
            if kind == "drop":
                x = x + rng.normal(0.0, noise, x.shape)
            for i in range(per_window):
                rid = f"w{w}-{i}"
                with mon.context(request_id=rid, sample=True):
                    predict(x[i : i + 1])
                ids.append(rid)
                truth.append(int(pool_y[pick[i]]))
            mon.flush()
            bounds.append((start, datetime.now(timezone.utc)))
        order = rng.permutation(len(ids))  # labels arrive later, in any order
        t0 = time.perf_counter()
        report = mon.log_labels(name="digits", ids=[ids[i] for i in order],
                                labels=[truth[i] for i in order])  # fmt: skip
        label_s = time.perf_counter() - t0
    db = Database(url)
    det = PerformanceDetector(settings)
    reference = (bounds[0][0], bounds[ref_windows - 1][1])
    flags, accuracy = [], []
    for w in range(ref_windows, len(kinds)):
        (f,) = det.detect_model(db, "digits", bounds[w][0], bounds[w][1], reference=reference)
        flags.append(f.flagged)
        accuracy.append(f.details["recent_value"])
    db.dispose()
    stable_flags = flags[:stable]
    drop_flags = flags[stable:]
    first = next((i for i, f in enumerate(drop_flags) if f), None)
    return {
        "pool_accuracy": pool_acc, "windows": len(kinds), "per_window": per_window,
        "reference_windows": ref_windows, "stable": stable, "false_alarms": sum(stable_flags),
        "drop_windows": drop, "drop_detected_in_window": None if first is None else first + 1,
        "drop_flagged": sum(drop_flags),
        "stable_accuracy": float(np.mean(accuracy[:stable])),
        "drop_accuracy": float(np.mean(accuracy[stable:])), "labels": report.to_dict(),
        "label_s": label_s, "noise": noise,
    }  # fmt: skip


@contextlib.contextmanager
def _pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for the run, dropped afterwards (the database is shared)."""
    from sqlalchemy import create_engine
    from sqlalchemy.schema import CreateSchema, DropSchema

    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(CreateSchema(name))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(DropSchema(name, cascade=True))
        admin.dispose()


def join_cost(url: str, n: int) -> dict[str, float]:
    """Seconds to log ``n`` labels (random order) for ``n`` stored predictions, and to read
    realized performance over all of them."""
    db = Database(url, check_schema=False)
    upgrade(db.engine)
    model = f"join-{uuid.uuid4().hex[:6]}"
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rng = np.random.default_rng(2)
    preds = rng.integers(0, 10, n)
    start = time.perf_counter()
    chunk = 20_000
    for lo in range(0, n, chunk):
        rows = [
            {"model": model, "version": "v1", "arm": "main", "source": "log",
             "ts": t0 + timedelta(seconds=i * 0.01), "input_kind": "tabular",
             "features": {"x0": 0.0}, "outputs": {"top_class": int(preds[i]), "confidence": 0.9},
             "raw": None, "raw_bytes": None, "request_id": f"r{i}"}
            for i in range(lo, min(n, lo + chunk))
        ]  # fmt: skip
        with db.session() as s:
            insert_rows(s, schema.Sample, rows)
    store_s = time.perf_counter() - start
    order = rng.permutation(n)
    labels = np.where(rng.random(n) < 0.9, preds, (preds + 1) % 10)
    start = time.perf_counter()
    report = log_labels(db, model, [f"r{i}" for i in order], labels[order].tolist())
    label_s = time.perf_counter() - start
    start = time.perf_counter()
    windows = realized_performance(db, model, window=timedelta(days=1), windows=1,
                                   end=t0 + timedelta(hours=23))  # fmt: skip
    read_s = time.perf_counter() - start
    assert report.matched == n, report
    assert sum(w.labelled for w in windows) == n, windows
    db.dispose()
    return {"store_s": store_s, "label_s": label_s, "read_s": read_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--join-rows", type=int, nargs="*", default=None)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--skip-detection", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"mode: {'quick' if args.quick else 'full'}")  # fmt: skip
    print("| measure | value | target |\n|---|---|---|")
    if not args.skip_detection:
        stable, drop, per = (40, 3, 300) if args.quick else (200, 5, 300)
        r = detection(stable, drop, per, noise=0.35, ref_windows=5)
        print(
            "| model | logistic regression on digits, held-out accuracy "
            f"{r['pool_accuracy']:.3f} | |"
        )
        print(
            f"| traffic | {r['windows']} windows x {r['per_window']} wrapped calls; labels "
            f"logged afterwards, shuffled ({r['label_s']:.2f} s for {r['labels']['received']}) | |"
        )
        print(
            f"| accuracy, stable / drop windows | {r['stable_accuracy']:.3f} / "
            f"{r['drop_accuracy']:.3f} (pixel noise sd {r['noise']}) | |"
        )
        print(
            f"| drop detected in window | {r['drop_detected_in_window']} after the shift "
            f"({r['drop_flagged']} of {r['drop_windows']} drop windows flagged) | 1 |"
        )
        share = r["false_alarms"] / r["stable"]
        print(
            f"| false alarms on stable windows | {r['false_alarms']} of {r['stable']} "
            f"({100 * share:.1f} %) | <= 1 % |"
        )
    sizes = args.join_rows or ([100_000] if args.quick else [100_000, 1_000_000])
    for backend in args.backends.split(","):
        for n in sizes:
            if backend == "sqlite":
                c = join_cost(f"sqlite:///{tempfile.mkdtemp()}/join.db", n)
            else:
                with _pg_schema() as url:
                    c = join_cost(url, n)
            print(
                f"| join {n:,} labels to {n:,} predictions, {backend} | store predictions "
                f"{c['store_s']:.1f} s; log_labels {c['label_s']:.1f} s "
                f"({n / c['label_s']:,.0f} labels/s); performance read {c['read_s']:.1f} s | |"
            )


if __name__ == "__main__":
    main()
