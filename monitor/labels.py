"""Ground truth: ids on predictions, labels logged later, and the join between them.

A prediction gets its id from ``Monitor.log(ids=...)``, from ``with mon.context(request_id=...)``
around a wrapped call, or from ``dep(feed, request_id=...)``. Labels arrive later, in any order
(``mon.log_labels``, ``tunewatch labels import``) and are stored one row per ``(model, id)``:
a later label for the same id replaces the earlier one and is counted as a duplicate. They join
to stored samples by id whenever performance is computed, so a label may even arrive before its
prediction is written.

The call path only reads :data:`REQUEST`, a context variable that is ``None`` unless a caller
set a context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from monitor import schema
from monitor.errors import ConfigError
from monitor.storage import Database, as_utc, utcnow

# Ids looked up (and labels upserted) per statement: under SQLite's bound-parameter limit.
CHUNK = 5000
MAX_ID_CHARS = 200  # the width of samples.request_id and labels.request_id


@dataclass(frozen=True)
class RequestContext:
    """What ``mon.context(...)`` sets for the calls made inside it."""

    request_id: str | tuple[str, ...] | None
    sample: bool = False


# Read once per monitored call; None (the default) costs the hot path nothing else.
REQUEST: ContextVar[RequestContext | None] = ContextVar("tunewatch_request", default=None)


@contextlib.contextmanager
def request_context(
    request_id: str | int | Sequence[str | int] | None = None, *, sample: bool = False
) -> Iterator[RequestContext]:
    """Give the monitored calls made inside the block an id (and optionally force sampling).

    A sequence gives one id per row of a batched call; one id on a call of ``n > 1`` rows
    names them ``id/0`` .. ``id/{n-1}``.

    >>> with request_context("order-17", sample=True) as ctx:
    ...     REQUEST.get() is ctx
    True
    >>> REQUEST.get() is None
    True
    """
    rid: str | tuple[str, ...] | None
    if request_id is None:
        rid = None
    elif isinstance(request_id, (list, tuple)) or getattr(request_id, "ndim", 0) == 1:
        rid = tuple(_id_text(v, i) for i, v in enumerate(list(request_id)))  # type: ignore[arg-type]
    else:
        rid = _id_text(request_id, 0)
    ctx = RequestContext(rid, bool(sample))
    token = REQUEST.set(ctx)
    try:
        yield ctx
    finally:
        REQUEST.reset(token)


def row_ids(
    request_id: str | tuple[str, ...] | None, n: int, first: int | None = None
) -> list[str | None]:
    """The ids of the first ``first`` (default: all) of a call's ``n`` rows.

    One id on a call of several rows names them ``id/0``, ``id/1`` ... (see
    :func:`request_context`); only the rows that are stored get an id built.

    >>> row_ids("a" * 200, 2)[1][-3:], max(len(i) for i in row_ids("a" * 200, 12))
    ('a/1', 200)
    >>> row_ids("order", 6_500_000, first=2)
    ['order/0', 'order/1']
    """
    k = n if first is None else min(n, first)
    if request_id is None:
        return [None] * k
    if isinstance(request_id, tuple):
        return [request_id[i] if i < len(request_id) else None for i in range(k)]
    if n == 1:
        return [request_id if i == 0 else None for i in range(k)]
    # The suffix must fit the column too: an over-long id failed the whole write on PostgreSQL.
    return [f"{request_id[: MAX_ID_CHARS - len(f'/{i}')]}/{i}" for i in range(k)]


def _id_text(value: Any, row: int) -> str:
    if isinstance(value, (bool, float)) or value is None:
        raise ConfigError(
            f"id {value!r} (row {row}) is not a string or an integer: give each prediction "
            "a non-empty string (or integer) id"
        )
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise ConfigError(f"id {text[:40]!r} (row {row}) must have 1 to {MAX_ID_CHARS} characters")
    return text


def check_ids(ids: Any, n: int) -> list[str]:
    """``n`` ids as strings, one per row.

    Raises:
        ConfigError: a count that differs from ``n``, or an id that is empty, too long or not
            a string or integer (the message names it).
    """
    values = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    if len(values) != n:
        raise ConfigError(f"ids has {len(values)} entries for {n} rows: pass one id per row")
    return [_id_text(v, i) for i, v in enumerate(values)]


# --- logging labels -------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelReport:
    """What happened to a batch of labels.

    ``matched``: stored and joined to a sampled prediction. ``not_sampled``: stored, but no
    stored prediction has the id (the call was not sampled, its id is unknown, or it is not
    written yet; the label joins if it ever is). ``duplicates``: labels that replaced an
    earlier one for the same id (last wins). ``missing``: NaN or empty labels, stored as
    missing and left out of metrics.
    """

    model: str
    received: int
    stored: int
    matched: int
    not_sampled: int
    duplicates: int
    missing: int
    task: str

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return asdict(self)

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{self.model}: {self.received} labels, {self.stored} stored, {self.matched} "
            f"joined to a sampled prediction, {self.not_sampled} not sampled (unknown id), "
            f"{self.duplicates} duplicates (last wins), {self.missing} missing (NaN)"
        )


def log_labels(
    db: Database,
    name: str,
    ids: Any,
    labels: Any,
    timestamps: Any = None,
    *,
    task: str = "auto",
) -> LabelReport:
    """Store labels for predictions of model ``name`` by id; join them to stored samples.

    ``labels`` are class indices for a classification model (outputs that are class scores or
    integer classes) or numbers for a regression; NaN or None is a missing label. ``task``
    (``auto``, ``classification``, ``regression``) overrides what the stored outputs say.

    Raises:
        ConfigError: lengths differ, an id is invalid, or a label has the wrong type or shape
            for the model's outputs (the message names the value and its id).
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"model name {name!r} must be a non-empty string")
    values = _as_list(labels, "labels")
    id_list = check_ids(ids, len(values))
    kind, n_classes = output_task(db, name, task)
    numbers = [_label_value(v, id_list[i], kind, n_classes) for i, v in enumerate(values)]
    times = _times(timestamps, len(values))
    now = utcnow()
    latest: dict[str, int] = {}
    for i, rid in enumerate(id_list):
        latest[rid] = i  # the last label of an id in the batch wins
    duplicates = len(id_list) - len(latest)
    matched = 0
    # In id order: each chunk then touches one narrow range of the id indexes (random order
    # made a million labels on SQLite 2.4x slower per label than a hundred thousand).
    order = sorted(latest.items())
    for start in range(0, len(order), CHUNK):
        chunk = order[start : start + CHUNK]
        chunk_ids = [rid for rid, _ in chunk]
        with db.session() as s:
            existing = _existing(s, schema.Label, name, chunk_ids)
            matched += len(_existing(s, schema.Sample, name, chunk_ids))
            rows = [
                {"model": name, "request_id": rid, "value": numbers[i],
                 "ts": times[i] or now, "received_at": now, "updates": 0}
                for rid, i in chunk
            ]  # fmt: skip
            s.execute(_upsert(s.get_bind().dialect.name), rows)
        duplicates += len(existing)
    missing = sum(1 for i in latest.values() if numbers[i] is None)
    return LabelReport(name, len(values), len(latest), matched, len(latest) - matched,
                       duplicates, missing, kind)  # fmt: skip


def _as_list(values: Any, what: str) -> list[Any]:
    if values is None or isinstance(values, (str, bytes)):
        raise ConfigError(f"{what}={values!r} must be a sequence with one entry per id")
    if hasattr(values, "tolist") and getattr(values, "ndim", 1) > 1:
        arr = np.asarray(values)
        raise ConfigError(
            f"{what} has shape {arr.shape}: give one value per id (a 1-D sequence), e.g. "
            f"{arr[0].tolist()!r} is not one class index or target"
        )
    return list(values.tolist() if hasattr(values, "tolist") else values)


def _label_value(v: Any, rid: str, kind: str, n_classes: int | None) -> float | None:
    """A label as a float (None when missing), or a ConfigError naming it."""
    if v is None:
        return None
    if isinstance(v, str):
        text = v.strip()
        if text == "" or text.lower() in ("nan", "null", "none", "na"):
            return None
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(_bad(v, rid, kind, n_classes, "is not a number")) from None
    if isinstance(v, (list, tuple, dict, np.ndarray)):
        shape = np.shape(v) if not isinstance(v, dict) else (len(v),)
        raise ConfigError(_bad(v, rid, kind, n_classes, f"has shape {shape}, not one value"))
    if not isinstance(v, (int, float, np.integer, np.floating, np.bool_)):
        raise ConfigError(_bad(v, rid, kind, n_classes, f"is a {type(v).__name__}"))
    x = float(v)
    if math.isnan(x):
        return None
    if math.isinf(x):
        raise ConfigError(_bad(v, rid, kind, n_classes, "is infinite"))
    if kind == "classification":
        if x != int(x) or x < 0:
            raise ConfigError(_bad(v, rid, kind, n_classes, "is not a class index"))
        if n_classes is not None and x >= n_classes:
            raise ConfigError(
                _bad(v, rid, kind, n_classes, f"is not below the {n_classes} output classes")
            )
    return x


def _bad(v: Any, rid: str, kind: str, n_classes: int | None, why: str) -> str:
    want = (
        f"a class index 0..{n_classes - 1}" if kind == "classification" and n_classes
        else "a class index (0, 1, ...)" if kind == "classification"
        else "a number (the regression target)" if kind == "regression"
        else "a class index or a numeric target"
    )  # fmt: skip
    return f"label {v!r} for id {rid!r} {why}: give {want}, or NaN for a missing label"


def _times(timestamps: Any, n: int) -> list[datetime | None]:
    if timestamps is None:
        return [None] * n
    import pandas as pd

    raw = [timestamps] * n if isinstance(timestamps, (str, datetime)) else list(timestamps)
    if len(raw) != n:
        raise ConfigError(f"timestamps has {len(raw)} entries for {n} labels: pass one per label")
    try:
        parsed = pd.to_datetime(pd.Series(raw), utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"timestamps cannot be read as times ({exc}): use ISO-8601") from None
    return [None if pd.isna(t) else as_utc(t.to_pydatetime()) for t in parsed]


def _existing(session: Any, table: Any, model: str, ids: list[str]) -> set[str]:
    if session.get_bind().dialect.name == "postgresql":
        # One array parameter: a 5,000-value IN list costs PostgreSQL more to plan than to run.
        from sqlalchemy import String, any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        match = table.request_id == any_(bindparam("ids", ids, type_=ARRAY(String)))
    else:
        match = table.request_id.in_(ids)
    stmt = select(table.request_id).where(table.model == model, match)
    return set(session.scalars(stmt.distinct()))


def _upsert(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # The Core table, not the ORM class: executemany then sends multi-row VALUES batches
    # instead of one statement per label.
    t: Any = schema.Label.__table__
    stmt = ins(t)
    return stmt.on_conflict_do_update(
        index_elements=["model", "request_id"],
        set_={"value": stmt.excluded.value, "ts": stmt.excluded.ts,
              "received_at": stmt.excluded.received_at, "updates": t.c.updates + 1},
    )  # fmt: skip


# --- the task of a model's outputs -----------------------------------------------------------

TASKS = ("auto", "classification", "regression")
OUTPUT_PROBE_ROWS = 200  # stored outputs read to tell a model's task


def output_task(db: Database, model: str, task: str = "auto") -> tuple[str, int | None]:
    """(task, number of classes or None) of ``model``'s stored outputs.

    Class scores (``top_class``) are classification; values that are all whole numbers
    (``predict()``'s class labels) too; other values are regression. ``task`` overrides it;
    with no stored outputs the task stays ``auto``.

    Raises:
        ConfigError: ``task`` is not one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {TASKS}")
    t = schema.Sample
    stmt = (
        select(t.outputs).where(t.model == model, t.outputs.is_not(None))
        .order_by(t.id.desc()).limit(OUTPUT_PROBE_ROWS)
    )  # fmt: skip
    with db.session() as s:
        outputs = [o for o in s.scalars(stmt) if o]
    return task_of_outputs(outputs, task)


def task_of_outputs(
    outputs: Sequence[dict[str, Any]], task: str = "auto"
) -> tuple[str, int | None]:
    """The task and class count that stored output summaries imply (``task`` overrides)."""
    n_classes = max((len(o["probs"]) for o in outputs if o.get("probs")), default=None)
    if task != "auto":
        return task, n_classes if task == "classification" else None
    if not outputs:
        return "auto", None
    if any("top_class" in o for o in outputs):
        return "classification", n_classes
    if any(o.get("kind") == "scalar" for o in outputs):  # the wrapper's output_kind="scalar"
        return "regression", None
    values = [float(v) for v in (o.get("value") for o in outputs) if v is not None]
    if values and all(v == int(v) and v >= 0 for v in values):
        return "classification", None
    return "regression", None


def read_label_file(path: str | Path) -> tuple[list[Any], list[Any], list[Any] | None]:
    """Ids, labels and (when the file has a ``ts`` or ``timestamp`` column) their times.

    CSV (``id,label[,ts]``) or Parquet with the same columns.

    Raises:
        ConfigError: the file cannot be read or lacks the ``id`` or ``label`` column.
    """
    import pandas as pd

    p = Path(path)
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(p)
        else:
            frame = pd.read_csv(p, dtype={"id": str}, keep_default_na=True)
    except FileNotFoundError:
        raise ConfigError(f"label file {str(p)!r} does not exist") from None
    except Exception as exc:  # a parser's own error: say which file and why
        raise ConfigError(f"label file {str(p)!r} cannot be read: {exc}") from None
    missing = [c for c in ("id", "label") if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"label file {str(p)!r} has columns {list(frame.columns)} but lacks {missing}: "
            "give columns id,label (and optionally ts)"
        )
    ts_col = next((c for c in ("ts", "timestamp") if c in frame.columns), None)
    ids = frame["id"].tolist()
    labels = frame["label"].tolist()
    return ids, labels, frame[ts_col].tolist() if ts_col else None


def import_labels(db: Database, name: str, path: str | Path, *, task: str = "auto") -> LabelReport:
    """``tunewatch labels import NAME FILE``: read a CSV or Parquet file and log its labels."""
    ids, labels, times = read_label_file(path)
    return log_labels(db, name, ids, labels, times, task=task)


__all__ = [
    "REQUEST", "LabelReport", "RequestContext", "check_ids", "import_labels", "log_labels",
    "output_task", "read_label_file", "request_context", "row_ids", "task_of_outputs",
]  # fmt: skip
