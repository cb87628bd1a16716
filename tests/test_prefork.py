"""A deployment created before the fork of a pre-forking server works in every worker.

Runs the real gunicorn with ``--preload -w 2 -k uvicorn_worker.UvicornWorker`` on a FastAPI app
that creates its Monitor and deployment at import, in the master, before the fork.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from monitor import Settings, schema
from monitor.storage import Database
from tests.serving_models import tiny_onnx
from tuner import experiments, registry

pytest.importorskip("gunicorn")
ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 600  # a bound, never reached when the workers behave


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    for i in (1, 2):  # v2 answers twice what v1 answers
        path = tiny_onnx(tmp_path / f"v{i}.onnx", scale=float(i))
        registry.register("m", path, version=f"v{i}", db=db, settings=settings)
    db.dispose()
    port = _free_port()
    env = {**os.environ, "TUNEWATCH_DATABASE_URL": sqlite_url, "PREFORK_POLL_S": "0.3",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "gunicorn", "--preload", "-w", "2",
           "-k", "uvicorn_worker.UvicornWorker", "-b", f"127.0.0.1:{port}",
           "--graceful-timeout", "30", "tests.prefork_app:app"]  # fmt: skip
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s on a busy machine
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base, proc, sqlite_url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / "gunicorn.log").read_text())


def _version(y: list[list[float]], i: int) -> str:
    v1 = np.full((1, 4), i % 7 + 1.0) @ np.arange(12, dtype=np.float64).reshape(4, 3)
    return "v1" if np.allclose(y, v1) else "v2" if np.allclose(y, 2 * v1) else "?"


def _until_both_pids(base: str, path: str, want: str, ok: list[int]) -> dict[int, str]:
    """Send calls (4 at a time) until two pids answered with ``want``; count the 200s."""
    seen: dict[int, str] = {}

    def one(i: int) -> tuple[int, str]:
        r = httpx.get(f"{base}{path}", params={"i": i}, timeout=30)
        assert r.status_code == 200, r.text
        ok[0] += 1
        body = r.json()
        return int(body["pid"]), _version(body["y"], i)

    with ThreadPoolExecutor(4) as pool:
        for start in range(0, MAX_REQUESTS, 4):
            for pid, version in pool.map(one, range(start, start + 4)):
                assert version != "?"
                if version == want:
                    seen[pid] = version
            if len(seen) == 2:
                return seen
            time.sleep(0.02)
    raise AssertionError(f"after {MAX_REQUESTS} calls only pids {seen} served {want}")


def test_gunicorn_preload_workers_serve_record_and_follow_the_routing(
    server: tuple[str, subprocess.Popen[bytes], str],
) -> None:
    base, proc, url = server
    ok = [0]
    before = _until_both_pids(base, "/predict", "v1", ok)
    db = Database(url)
    experiments.start(db, "m", "v2", share=1.0, by="test")
    after = _until_both_pids(base, "/apredict", "v2", ok)  # the awaited form, too
    assert set(after) == set(before)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    t = schema.LatencyAggregate
    with db.session() as s:
        recorded = s.scalar(select(func.sum(t.calls))) or 0
        instances = s.scalar(select(func.count(func.distinct(t.instance_id))))
        by_arm = dict(s.execute(select(t.arm, func.sum(t.calls)).group_by(t.arm)).all())
    db.dispose()
    assert instances == 2  # one per worker
    assert recorded == ok[0]  # every call that returned before the SIGTERM was recorded
    assert by_arm.get("challenger", 0) >= 2
