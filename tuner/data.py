"""Calibration and held-out data from what production actually sent (or a user's dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from monitor.storage import Database, read_samples, utcnow
from tuner.errors import NotEnoughSamples, TunerError


@dataclass(frozen=True)
class TuningData:
    """Feeds keyed by the model's input names, split into calibration and held-out parts."""

    calibration: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    rows: int


def production_data(
    db: Database,
    model: str,
    version: str,
    inputs: list[Any],
    *,
    window: timedelta = timedelta(days=7),
    size: int = 512,
    min_rows: int = 48,
    holdout_fraction: float = 0.5,
    seed: int = 0,
) -> TuningData:
    """Up to ``size`` raw input rows of ``model:version`` spread evenly over the window.

    ``inputs`` are the ONNX model's input specs (``name``, ``dtype``); stored arrays named
    like the inputs are used as they are, and a single unnamed input (``arg0``) maps to a
    single-input model.

    Raises:
        NotEnoughSamples: fewer than ``min_rows`` usable raw samples are stored.
    """
    end = utcnow()
    rows = [
        r for r in read_samples(db, model, version, start=end - window, end=end, with_raw=True)
        if r.raw
    ]  # fmt: skip
    if len(rows) < min_rows:
        raise NotEnoughSamples(
            f"model {model!r} version {version!r} has {len(rows)} stored raw input samples in "
            f"the last {window}; at least {min_rows} are needed. Send more traffic, raise "
            "sample_rate, log inputs with Monitor.log, or pass a dataset (--dataset FILE.npz)"
        )
    picked = np.linspace(0, len(rows) - 1, num=min(size, len(rows))).round().astype(int)
    arrays = [_match(rows[i].raw or {}, inputs) for i in sorted(set(picked.tolist()))]
    feeds = {spec.name: np.stack([a[spec.name] for a in arrays]) for spec in inputs}
    return split(feeds, None, holdout_fraction, seed, f"production samples of {model}:{version}")


def _match(raw: dict[str, np.ndarray], inputs: list[Any]) -> dict[str, np.ndarray]:
    names = [spec.name for spec in inputs]
    if set(names) <= set(raw):
        chosen = {n: raw[n] for n in names}
    elif len(names) == 1 and len(raw) == 1:
        chosen = {names[0]: next(iter(raw.values()))}
    else:
        raise TunerError(
            f"stored samples have inputs {sorted(raw)} but the model expects {names}: log "
            "inputs under the model's input names (wrap the InferenceSession or pass a feed dict)"
        )
    return {spec.name: chosen[spec.name].astype(spec.dtype) for spec in inputs}


def split(
    feeds: dict[str, np.ndarray], labels: np.ndarray | None, holdout_fraction: float, seed: int,
    source: str,
) -> TuningData:  # fmt: skip
    """Shuffle rows and split them into calibration and held-out parts."""
    n = len(next(iter(feeds.values())))
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - holdout_fraction)))
    cal, hold = order[:cut], order[cut:]
    return TuningData(
        {k: v[cal] for k, v in feeds.items()}, {k: v[hold] for k, v in feeds.items()},
        labels[hold] if labels is not None else None, source, n,
    )  # fmt: skip


def dataset_file(path: str, inputs: list[Any], *, holdout_fraction: float = 0.5) -> TuningData:
    """A user's ``.npz`` dataset: arrays named like the model's inputs, optional ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise TunerError(f"dataset {path!r} cannot be read as .npz: {exc}") from None
    labels = arrays.pop("labels", None)
    return split(_match(arrays, inputs), labels, holdout_fraction, 0, f"dataset {path}")
