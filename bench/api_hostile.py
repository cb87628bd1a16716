"""Hostile bodies against the API: refusal time and server memory, with and without the guard.

Run: ``.venv/bin/python bench/api_hostile.py`` (``--quick`` sends 40 MB instead of 300 MB).
Each case starts a fresh API server process (uvicorn, the real app over SQLite) and sends one
request on a raw socket, body streamed in 1 MiB writes until the server answers or closes;
a thread samples the server's resident memory every 10 ms and another polls ``/healthz``.
``--unguarded`` cases run the same app with the :class:`tuner.api.Guard` middleware removed,
which is how the API behaved before it (FastAPI reads and parses the body before any check).
Prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

TOKEN = "bench-token-0123456789abcdef"
# A valid JSON body, as in the issue: a decision whose note is a huge array of zeros.
PREFIX, CHUNK, SUFFIX = b'{"by": "ann", "note": [', b"0," * (1 << 19), b"0]}"
SERVER = """
import sys, uvicorn
from monitor.settings import Settings
from tuner.api import Guard, create_app
settings = Settings(database_url=sys.argv[1], api_token=sys.argv[2])
app = create_app(settings)
if sys.argv[4] == "unguarded":
    app.user_middleware = [m for m in app.user_middleware if m.cls is not Guard]
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


@dataclass
class Result:
    """What one hostile request cost."""

    case: str
    status: str
    seconds: float
    sent_mb: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    healthz_max_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    url = f"sqlite:///{tmp}/{mode}.db"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, url, TOKEN, str(port), mode])
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the API server did not start in 60 s")


def rss_mb(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / 2**20


def body_parts(size: int) -> list[bytes]:
    """About ``size`` bytes of valid JSON, in 1 MiB parts."""
    return [PREFIX] + [CHUNK] * max(1, (size - len(PREFIX) - len(SUFFIX)) // len(CHUNK)) + [SUFFIX]


def send(port: int, size: int, token: bool, chunked: bool) -> tuple[str, float, int]:
    """Stream a JSON body of ``size`` bytes; (status line, seconds to answer, bytes sent)."""
    parts = body_parts(size)
    size = sum(map(len, parts))
    head = ["POST /api/promotions/1/approve HTTP/1.1", "Host: 127.0.0.1",
            "Content-Type: application/json"]  # fmt: skip
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    if token:
        head.append(f"Authorization: Bearer {TOKEN}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    start, sent, answer = time.perf_counter(), 0, b""
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for part in parts:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before taking the whole body
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent += len(part)
        if chunked and sent >= size:
            sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):  # the answer may still be readable
        with contextlib.suppress(OSError):
            answer = sock.recv(4096)
        answer = answer or b"(connection closed by the server)"
    finally:
        seconds = time.perf_counter() - start
        sock.close()
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), seconds, sent


def run_case(tmp: Path, mode: str, size: int, token: bool, chunked: bool) -> Result:
    proc, port = start_server(tmp, mode)
    server = psutil.Process(proc.pid)
    before, peak, stop, slowest = rss_mb(server), [0.0], threading.Event(), [0.0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(server))
            time.sleep(0.01)

    def poll_health() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=120).read()
            slowest[0] = max(slowest[0], (time.perf_counter() - t0) * 1000)
            time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, poll_health)]
    for t in threads:
        t.start()
    try:
        status, seconds, sent = send(port, size, token, chunked)
        time.sleep(1.0)  # what the server still holds a second after answering
        after = rss_mb(server)
    finally:
        stop.set()
        for t in threads:
            t.join()
        proc.terminate()
        proc.wait(timeout=30)
    how = ("token" if token else "no token") + (", chunked" if chunked else "")
    case = f"{mode}: {size / 1e6:.0f} MB, {how}"
    return Result(case, status, seconds, sent / 1e6, before, max(peak[0], after), after,
                  slowest[0])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 MB bodies instead of 300 MB")
    args = parser.parse_args()
    big = 40_000_000 if args.quick else 300_000_000
    cases = [("guarded", big, False, False), ("guarded", big, True, False),
             ("guarded", big, True, True), ("unguarded", 40_000_000, False, False)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_case(Path(tmp), *case) for case in cases]
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"cap {1_000_000} bytes (api_max_body_bytes default)\n")  # fmt: skip
    print("| case | answer | time to answer | body sent | server RSS before / peak / "
          "1 s after | slowest /healthz meanwhile |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.case} | {r.status} | {r.seconds * 1000:.0f} ms | {r.sent_mb:.1f} MB | "
              f"{r.rss_before_mb:.0f} / {r.rss_peak_mb:.0f} / {r.rss_after_mb:.0f} MB | "
              f"{r.healthz_max_ms:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
