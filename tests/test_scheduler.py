"""``tunewatch serve``: persistent jobs, recorded runs, one run per slot, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from monitor import ConfigError, Settings, schema, storage
from monitor.storage import Database
from tuner import jobs
from tuner.scheduler import build_scheduler


def _serve(url: str, log: Path, extra: str, **env: str) -> subprocess.Popen[str]:
    full = dict(
        os.environ,
        PYTHONPATH=os.getcwd(),
        TUNEWATCH_DATABASE_URL=url,
        TW_TEST_JOB_LOG=str(log),
        TUNEWATCH_EXTRA_JOBS=extra,
        TUNEWATCH_LATENCY_JOB_INTERVAL_S="1",
        TUNEWATCH_DRIFT_JOB_INTERVAL_S="3600",
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tuner.cli", "serve", "--no-api"],
        env=full,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _runs(url: str, job_id: str) -> list[schema.JobRun]:
    db = Database(url)
    with db.session() as s:
        rows = list(s.scalars(select(schema.JobRun).where(schema.JobRun.job_id == job_id)))
    db.dispose()
    return rows


def test_two_serve_processes_never_run_the_same_slot_twice(pg_url: str, tmp_path: Path) -> None:
    engine = storage.create_db_engine(pg_url)
    storage.upgrade(engine)
    engine.dispose()
    log = tmp_path / "runs.txt"
    extra = "record=tests.jobs_for_tests:record_slot@1;broken=tests.jobs_for_tests:broken@1"
    procs = [_serve(pg_url, log, extra) for _ in range(2)]
    deadline = time.time() + 60  # slow start-ups on a busy machine: wait for the runs
    while time.time() < deadline and not (log.exists() and len(log.read_text().split()) >= 12):
        time.sleep(0.2)
    time.sleep(2)  # both processes running side by side for a while
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=30)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = [line.split() for line in log.read_text().splitlines()]
    slots = [int(s) for s, _pid in lines]
    assert len(slots) >= 4, outputs  # the job kept running, about once a second
    assert len(slots) == len(set(slots)), f"a slot ran twice: {lines}"
    recorded = _runs(pg_url, "record")
    assert sorted(r.slot for r in recorded) == sorted(slots)
    assert all(r.status == "success" and r.duration_s is not None for r in recorded)
    broken = _runs(pg_url, "broken")
    assert len(broken) >= 4 and all(r.status == "failed" for r in broken)
    assert "this job is broken on purpose" in (broken[0].traceback or "")
    assert {r.status for r in _runs(pg_url, "latency_detection")} == {"success"}


def test_processes_starting_together_create_the_job_table_once(db_url: str) -> None:
    # Each thread stands for a `tunewatch serve` process: its own engine, all at once.
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy import inspect

    from tuner.scheduler import create_job_table

    engines = [storage.create_db_engine(db_url) for _ in range(6)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def create(engine: Any) -> None:
        start.wait(30)
        try:
            create_job_table(SQLAlchemyJobStore(engine=engine))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert inspect(engines[0]).has_table("apscheduler_jobs")
    for engine in engines:
        engine.dispose()


def test_sigterm_stops_after_the_running_job(sqlite_url: str, tmp_path: Path) -> None:
    log = tmp_path / "slow.txt"
    proc = _serve(sqlite_url, log, "slow=tests.jobs_for_tests:slow@1")
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        r.status == "running" for r in _runs(sqlite_url, "slow")
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "finished" in log.read_text()  # the running job completed
    runs = _runs(sqlite_url, "slow")
    assert runs and all(r.status == "success" and r.finished_at is not None for r in runs)
    assert "stopped" in out


def test_jobs_register_idempotently(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, extra_jobs="x=tests.jobs_for_tests:slow@60")
    db = Database(sqlite_url)
    for _ in range(2):
        scheduler = build_scheduler(settings, db)
        scheduler.start(paused=True)
        ids = sorted(j.id for j in scheduler.get_jobs())
        scheduler.shutdown(wait=False)
    db.dispose()
    assert ids == ["drift_detection", "experiment_analysis", "fidelity", "latency_detection",
                   "performance_detection", "retention", "retune", "x"]  # fmt: skip


def test_bad_job_references_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="'nightly'"):
        jobs.parse_extra_jobs("nightly")
    with pytest.raises(ConfigError, match="'tests.nope:run'"):
        jobs.resolve("tests.nope:run")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_the_api_beside_the_scheduler(sqlite_url: str, tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.getcwd(),
        TUNEWATCH_DATABASE_URL=sqlite_url,
        TUNEWATCH_API_TOKEN="s3cret-scheduler-token-0123",
        TUNEWATCH_LATENCY_JOB_INTERVAL_S="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner.cli", "serve", "--port", str(port)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{base}/api/promotions").status_code == 401
        auth = {"Authorization": "Bearer s3cret-scheduler-token-0123"}
        assert httpx.get(f"{base}/api/promotions", headers=auth).json() == {"promotions": []}
        time.sleep(2.5)  # the latency job runs every second
        metrics = httpx.get(f"{base}/metrics").text
        assert 'tunewatch_job_runs_total{job="latency_detection"}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out


def test_serve_refuses_an_open_api_without_a_token(sqlite_url: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), TUNEWATCH_DATABASE_URL=sqlite_url)
    env.pop("TUNEWATCH_API_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "token" in done.stderr.lower()
