"""Calibration and held-out data from what production actually sent (or a user's dataset)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from monitor import schema
from monitor.registry import get_version, list_versions
from monitor.storage import Database, SampleRow, as_utc, read_samples, utcnow
from tuner.errors import NotEnoughSamples, NotFound, TunerError


@dataclass(frozen=True)
class TuningData:
    """Feeds keyed by the model's input names, split into calibration and held-out parts.

    ``windows`` says where production rows came from: one entry per time window with its
    bounds and row count (empty for a user's dataset).
    """

    calibration: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    rows: int
    windows: tuple[dict[str, Any], ...] = ()


# A drift event's rows start where the detection window that opened it started; when the
# event does not say, this far before it opened (the default drift window is one hour).
EVENT_LOOKBACK = timedelta(hours=1)
# Too few rows since an event: the most recent older rows top the set up to this many.
MIN_FRESH_ROWS = 128
# Fewer labelled rows than this make no sound accuracy check: the held-out part stays unlabelled.
MIN_LABELLED_ROWS = 32


def production_data(
    db: Database,
    model: str,
    version: str,
    inputs: list[Any],
    *,
    window: timedelta = timedelta(days=7),
    since: datetime | None = None,
    size: int = 512,
    min_rows: int = 48,
    min_fresh_rows: int = MIN_FRESH_ROWS,
    holdout_fraction: float = 0.5,
    seed: int = 0,
    min_labelled: int = MIN_LABELLED_ROWS,
) -> TuningData:
    """Up to ``size`` raw input rows served by ``version``'s lineage, spread evenly over time.

    Every version that shares ``version``'s source counts (tuned versions take the same
    inputs). Without ``since`` the rows span the last ``window``; with it, only rows from
    ``since`` onward (what production sends now), topped up with the most recent older rows
    in ``window`` when fewer than ``min_fresh_rows`` arrived since then.

    When at least ``min_labelled`` of those rows have labels (``monitor.labels``), they are
    the held-out part, with their labels, so the guard checks accuracy against production's
    ground truth as well as fidelity to the source; the unlabelled rows calibrate.

    ``inputs`` are the ONNX model's input specs (``name``, ``dtype``); stored arrays named
    like the inputs are used as they are, and a single unnamed input (``arg0``) maps to a
    single-input model.

    Raises:
        NotEnoughSamples: fewer than ``min_rows`` usable raw samples are stored.
    """
    end = utcnow()
    versions = lineage(db, model, version)
    start = end - window
    fresh = _raw_rows(db, model, versions, max(start, since) if since else start, end)
    older: list[SampleRow] = []
    if since is not None and len(fresh) < min_fresh_rows:
        older = _raw_rows(db, model, versions, start, since)[-(min_fresh_rows - len(fresh)) :]
    rows = older + fresh
    if len(rows) < min_rows:
        raise NotEnoughSamples(
            f"model {model!r} version {version!r} has {len(rows)} stored raw input samples in "
            f"the last {window}; at least {min_rows} are needed. Send more traffic, raise "
            "sample_rate, log inputs with Monitor.log, or pass a dataset (--dataset FILE.npz)"
        )
    truth = labels_of(db, model, [r.request_id for r in rows if r.request_id])
    labelled = [i for i, r in enumerate(rows) if r.request_id in truth]
    if len(labelled) < min_labelled:
        labelled = []
    picked = _pick(len(rows), labelled, size)
    arrays = [_match(rows[i].raw or {}, inputs) for i in picked]
    feeds = {spec.name: np.stack([a[spec.name] for a in arrays]) for spec in inputs}
    n_old = sum(1 for i in picked if i < len(older))
    windows = _windows(since or start, end, len(picked) - n_old, older, n_old, since)
    label = f"production samples of {model}:" + (
        version if len(versions) == 1 else "{" + ",".join(versions) + "} (one source)"
    )
    label += ": " + "; ".join(w["label"] for w in windows)
    if labelled:
        held = [j for j, i in enumerate(picked) if rows[i].request_id in truth]
        values = np.array([truth[str(rows[picked[j]].request_id)] for j in held])
        label += f"; held-out part: {len(held)} labelled production rows"
        data = split_labelled(feeds, held, values, holdout_fraction, seed, label)
        note = {"label": f"{len(held)} labelled rows", "kind": "labelled", "rows": len(held)}
        return replace(data, windows=(*windows, note))
    return replace(split(feeds, None, holdout_fraction, seed, label), windows=windows)


def labels_of(db: Database, model: str, ids: list[str]) -> dict[str, float]:
    """The stored (non-missing) label of each of ``ids`` that has one."""
    from sqlalchemy import select

    t, out = schema.Label, {}
    for start in range(0, len(ids), 5000):
        stmt = select(t.request_id, t.value).where(
            t.model == model, t.request_id.in_(ids[start : start + 5000]), t.value.is_not(None)
        )
        with db.session() as s:
            out.update({rid: float(v) for rid, v in s.execute(stmt) if v is not None})
    return out


def _pick(n: int, labelled: list[int], size: int) -> list[int]:
    """Every labelled row (spread, at most half of ``size``) plus unlabelled rows spread over
    the rest, in time order."""
    if not labelled:
        return sorted(set(_spread(n, size)))
    chosen = [labelled[i] for i in _spread(len(labelled), max(1, size // 2))]
    taken = set(chosen)
    others = [i for i in range(n) if i not in taken]
    chosen += [others[i] for i in _spread(len(others), size - len(chosen))]
    return sorted(set(chosen))


def split_labelled(
    feeds: dict[str, np.ndarray], held: list[int], values: np.ndarray, holdout_fraction: float,
    seed: int, source: str,
) -> TuningData:  # fmt: skip
    """Labelled rows (positions ``held``) are the held-out part, with ``values`` as labels; the
    other rows calibrate. Too few other rows: the labelled ones are split as usual."""
    n = len(next(iter(feeds.values())))
    rest = np.setdiff1d(np.arange(n), held)
    labels = values.astype(np.int64) if np.all(np.mod(values, 1) == 0) else values
    if len(rest) < max(8, int(n * (1 - holdout_fraction) / 2)):
        return split({k: v[held] for k, v in feeds.items()}, labels, holdout_fraction, seed, source)
    return TuningData(
        {k: v[rest] for k, v in feeds.items()}, {k: v[held] for k, v in feeds.items()},
        labels, source, n,
    )  # fmt: skip


def lineage(db: Database, model: str, version: str) -> list[str]:
    """The versions of ``model`` that share ``version``'s source (``version`` included)."""
    info = get_version(db, model, version)
    same = [v.version for v in list_versions(db, model) if v.source == info.source]
    return same or [version]


def _raw_rows(
    db: Database, model: str, versions: list[str], start: datetime, end: datetime
) -> list[SampleRow]:
    """Stored samples with raw rows of any of ``versions`` in ``[start, end)``, oldest first."""
    rows = [
        r for v in versions
        for r in read_samples(db, model, v, start=start, end=end, with_raw=True) if r.raw
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (r.ts, r.id))


def _spread(n: int, k: int) -> list[int]:
    """Indices of ``k`` rows spread evenly over ``n`` (all of them when ``k >= n``)."""
    if n <= 0 or k <= 0:
        return []
    return np.linspace(0, n - 1, num=min(k, n)).round().astype(int).tolist()


def _windows(
    start: datetime, end: datetime, fresh: int, older: list[SampleRow], n_old: int,
    since: datetime | None,
) -> tuple[dict[str, Any], ...]:  # fmt: skip
    """Describe the time windows the rows came from and how many rows each gave."""
    what = "since" if since is not None else "recent window"
    out = [{"label": f"{fresh} rows {what} {start.isoformat()} .. {end.isoformat()}",
            "kind": "fresh" if since is not None else "window",
            "start": start.isoformat(), "end": end.isoformat(), "rows": fresh}]  # fmt: skip
    if n_old:
        first, last = older[0].ts.isoformat(), older[-1].ts.isoformat()
        out.append({"label": f"{n_old} most recent older rows {first} .. {last} (top-up)",
                    "kind": "top_up", "start": first, "end": last, "rows": n_old})  # fmt: skip
    return tuple(out)


def event_since(db: Database, event_id: int, lookback: timedelta = EVENT_LOOKBACK) -> datetime:
    """Where the rows that reflect an event start: its opening minus the detection window.

    Drift events record their ``current_window``, latency events their ``recent`` window and
    fidelity drops the ``window`` of the rows they replayed, the rows that failed (the
    window's length is what counts: a later update moves the window, not the opening). Any
    other event starts ``lookback`` before it opened; too few rows since then are topped up
    by the caller.

    Raises:
        NotFound: no event has that id.
    """
    with db.session() as s:
        row = s.get(schema.Event, event_id)
        if row is None:
            raise NotFound(f"event {event_id} does not exist: see `tunewatch events`")
        opened, details = as_utc(row.opened_at), dict(row.details or {})
    for key in ("current_window", "recent", "window"):
        bounds = details.get(key)
        if isinstance(bounds, list | tuple) and len(bounds) == 2 and all(bounds):
            try:
                first, last = (as_utc(datetime.fromisoformat(str(b))) for b in bounds)
            except ValueError:
                continue
            since = opened - max(last - first, timedelta(0))
            # A fidelity drop's rows are themselves the evidence: start no later than them.
            return min(since, first) if key == "window" else since
    return opened - lookback


def request_since(db: Database, request_id: int) -> datetime | None:
    """The fresh-data start of a retune request made by an event (None without an event)."""
    with db.session() as s:
        row = s.get(schema.RetuneRequest, request_id)
        event_id = row.event_id if row is not None else None
    if event_id is None:
        return None
    try:
        return event_since(db, event_id)
    except NotFound:
        return None


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
