"""The demo: train a small real model, wrap it, send traffic, show what tunewatch recorded."""

from __future__ import annotations

import time

import numpy as np

from monitor import Monitor
from monitor.settings import Settings


def train_digits_mlp(seed: int = 0) -> tuple[object, np.ndarray, np.ndarray, float]:
    """Train a small torch MLP on scikit-learn's bundled digits; return it, test X/y, accuracy."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return model, x_te, y_te, acc


def run_demo(settings: Settings, *, calls: int = 2000) -> int:
    """Wrap a digits classifier, send ``calls`` requests, then print ``tunewatch status``."""
    from rich.console import Console

    from tuner.cli import main as cli_main

    console = Console()
    console.print("[bold]tunewatch demo[/]: training a digits classifier (torch, on the CPU)")
    model, x_te, _y, acc = train_digits_mlp()
    console.print(f"  test accuracy {acc:.3f}; wrapping it as digits:v1")
    with Monitor(settings=settings.replace(sample_rate=0.2)) as mon:
        wrapped = mon.wrap(model, name="digits", version="v1")
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        import torch

        for i in range(calls):
            rows = x_te[rng.integers(0, len(x_te), size=int(rng.integers(1, 9)))]
            wrapped(torch.from_numpy(rows))
            if i % 500 == 499:
                console.print(f"  sent {i + 1}/{calls} calls")
        console.print(f"  {calls} calls in {time.perf_counter() - start:.2f} s")
        mon.flush()
    return cli_main(["status", "--database-url", settings.database_url])
