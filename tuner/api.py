"""The HTTP API and web page where people review and decide promotion requests.

Every ``/api`` route needs ``Authorization: Bearer <api_token>``: no header gives 401, a wrong
token 403. ``api_auth_disabled`` turns the check off, and :func:`check_bind` only allows that
on 127.0.0.1. ``/healthz``, ``/metrics`` and the page at ``/`` need no token: the page holds no
data (it calls the API with the token the user enters) and ``/metrics`` exposes only counts,
so bind the API where only your Prometheus and your users reach it.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from monitor.errors import ConfigError, StorageError
from monitor.errors import NotFound as MonitorNotFound
from monitor.settings import Settings
from monitor.storage import Database
from tuner import audit, experiments, promotions
from tuner.errors import Conflict, NotFound, TunerError
from tuner.metrics import render_metrics

LOOPBACK = "127.0.0.1"
TOKEN_HINT = (
    "set TUNEWATCH_API_TOKEN to a long random secret "
    "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
)
DESCRIPTION = """
Review and decide **promotion requests**: a tuned challenger version becomes a model's
champion only after a person (or the model's policy) approves it.

* Every `/api` route needs `Authorization: Bearer <token>` (the `api_token` setting,
  `TUNEWATCH_API_TOKEN`). No header: **401**; wrong token: **403**.
* Decisions are made once: a second approve or reject of the same request gets **409** with
  who decided it and when.
* `/metrics` (Prometheus) and `/healthz` need no token; bind the API where only trusted
  clients reach it.
"""
TAGS = [
    {"name": "promotions", "description": "Promotion requests, their evidence and decisions."},
    {"name": "experiments", "description": "Experiments of challengers against champions."},
    {"name": "audit", "description": "Who changed what, when and why."},
    {"name": "service", "description": "Health and Prometheus metrics (no token)."},
]
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",  # the page has approve buttons: no clickjacking through frames
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

IsoTime = Annotated[
    str, Field(description="ISO 8601 time in UTC", examples=["2026-11-28T18:00:00+00:00"])
]


# --- request and response models (module level so FastAPI can resolve the annotations) ---


class ErrorOut(BaseModel):
    """An error: what went wrong and how to fix it."""

    detail: str


class HealthOut(BaseModel):
    """The service answers."""

    status: str = "ok"


class PromotionOut(BaseModel):
    """A promotion request and its decision."""

    id: int
    model: str
    experiment_id: int | None
    from_version: str = Field(description="The champion when the request was made")
    to_version: str = Field(description="The challenger asked to become champion")
    status: str = Field(description="pending, approved, rejected, applied or rolled_back")
    evidence: dict[str, Any] = Field(
        description="What the analysis measured: `arms` (per-arm version, calls, errors, "
        "error_rate, p50/p95/p99_ms), `latency`, `error_rate`, `agreement`, `timeline`, "
        "`decision`, `reason`. Any key may be missing."
    )
    created_at: IsoTime
    decided_at: IsoTime | None
    decided_by: str | None
    note: str
    applied_at: IsoTime | None
    watch_until: IsoTime | None = Field(description="End of the post-promotion watch window")
    rollback_reason: str | None


class PromotionList(BaseModel):
    """Promotion requests, newest first."""

    promotions: list[PromotionOut]


class ExperimentOut(BaseModel):
    """An experiment of a challenger against the champion."""

    id: int
    model: str
    champion_version: str
    challenger_version: str
    share: float = Field(description="Share of live traffic routed to the challenger")
    shadow: bool = Field(description="True when the challenger sees a copy of the traffic")
    status: str
    min_samples: int
    max_duration_s: int
    started_at: IsoTime
    ended_at: IsoTime | None
    started_by: str
    reason: str
    analysis: dict[str, Any]


class ExperimentList(BaseModel):
    """Experiments, newest first."""

    experiments: list[ExperimentOut]


class AuditOut(BaseModel):
    """One audit entry."""

    id: int
    at: IsoTime
    actor: str
    action: str
    entity: str
    entity_id: int | None
    model: str
    reason: str
    details: dict[str, Any]


class AuditList(BaseModel):
    """Audit entries, newest first."""

    entries: list[AuditOut]


class DecisionIn(BaseModel):
    """Who decides, and why."""

    by: str = Field(min_length=1, max_length=200, description="Name of the person deciding")
    note: str = Field("", max_length=4000, description="Why (kept in the audit log)")


# --- auth ------------------------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False,  # so a missing header gives 401 and a wrong token 403
    scheme_name="bearerAuth",
    description="The `api_token` setting (TUNEWATCH_API_TOKEN).",
)


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Refuse the request unless it carries the configured bearer token."""
    settings: Settings = request.app.state.settings
    if settings.api_auth_disabled:
        return
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send 'Authorization: Bearer <api_token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_token
    if not expected:  # fail closed: an empty token must never match an empty header
        raise HTTPException(403, f"this API has no api_token configured: {TOKEN_HINT}")
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(403, "invalid bearer token: use the api_token setting's value")


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to serve without a token, unless auth is disabled explicitly on 127.0.0.1.

    Raises:
        TunerError: the combination of host, token and ``api_auth_disabled`` is unsafe.
    """
    disabled = settings.api_auth_disabled
    if disabled and host != LOOPBACK:
        raise TunerError(
            f"api_auth_disabled is only allowed when binding {LOOPBACK}, not host {host!r}: "
            f"bind --host {LOOPBACK} or turn auth back on and {TOKEN_HINT}"
        )
    if not settings.api_token and not disabled:
        raise TunerError(
            f"the API has no api_token configured, so it refuses to start on host {host!r}: "
            f"{TOKEN_HINT}, or for local use only bind {LOOPBACK} with "
            "TUNEWATCH_API_AUTH_DISABLED=true"
        )


# --- routes ----------------------------------------------------------------------------


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(_db)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No bearer token"},
    403: {"model": ErrorOut, "description": "Wrong bearer token"},
}
ONE: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorOut, "description": "No promotion has this id"},
}
DECIDE: dict[int | str, dict[str, Any]] = {
    **ONE,
    400: {"model": ErrorOut, "description": "Bad input, or the challenger's artifact is corrupt"},
    409: {"model": ErrorOut, "description": "Already decided (the message says by whom)"},
}

api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])
service = APIRouter(tags=["service"])


@api.get(
    "/promotions", tags=["promotions"], response_model=PromotionList, responses=ERRORS,
    summary="List promotion requests",
    description="Newest first; filter by `status` (pending, approved, rejected, applied, "
    "rolled_back) and `model`.",
)  # fmt: skip
def list_promotions(db: DB, status: str | None = None, model: str | None = None) -> dict[str, Any]:
    """List promotion requests."""
    rows = promotions.list_promotions(db, model=model, status=status)
    return {"promotions": [p.to_dict() for p in rows]}


@api.get(
    "/promotions/{promotion_id}", tags=["promotions"], response_model=PromotionOut,
    responses=ONE, summary="Get one promotion request",
    description="The request with its evidence and, once decided, who decided and why.",
)  # fmt: skip
def get_promotion(db: DB, promotion_id: int) -> dict[str, Any]:
    """One promotion request."""
    return promotions.get(db, promotion_id).to_dict()


@api.post(
    "/promotions/{promotion_id}/approve", tags=["promotions"], response_model=PromotionOut,
    responses=DECIDE, summary="Approve a pending promotion",
    description="Makes the challenger the champion at once (the promotion becomes `applied` "
    "and a watch window starts). Decided once: a second decision gets 409.",
)  # fmt: skip
def approve(db: DB, promotion_id: int, decision: DecisionIn, request: Request) -> dict[str, Any]:
    """Approve and apply a promotion; the watch window is the configured one."""
    watch = timedelta(seconds=request.app.state.settings.promotion_watch_s)
    return promotions.approve(
        db, promotion_id, by=decision.by, note=decision.note, watch=watch
    ).to_dict()


@api.post(
    "/promotions/{promotion_id}/reject", tags=["promotions"], response_model=PromotionOut,
    responses=DECIDE, summary="Reject a pending promotion",
    description="The champion stays; the experiment stops and the challenger is rejected. "
    "Decided once: a second decision gets 409.",
)  # fmt: skip
def reject(db: DB, promotion_id: int, decision: DecisionIn) -> dict[str, Any]:
    """Reject a promotion."""
    return promotions.reject(db, promotion_id, by=decision.by, note=decision.note).to_dict()


@api.get(
    "/promotions/{promotion_id}/latency.png", tags=["promotions"], response_class=Response,
    responses={**ONE, 200: {"content": {"image/png": {}}, "description": "A PNG plot"}},
    summary="Plot a promotion's latency evidence",
    description="p50/p95 per arm over time when the evidence has a timeline, else bars of "
    "p50/p95/p99 per arm.",
)  # fmt: skip
def latency_plot(db: DB, promotion_id: int) -> Response:
    """The latency evidence as a PNG."""
    p = promotions.get(db, promotion_id)
    title = f"{p.model}: {p.from_version} -> {p.to_version} (promotion {p.id})"
    return Response(latency_png(p.evidence, title), media_type="image/png",
                    headers={"Cache-Control": "no-store"})  # fmt: skip


@api.get(
    "/experiments", tags=["experiments"], response_model=ExperimentList, responses=ERRORS,
    summary="List experiments", description="Newest first; filter by `status` and `model`.",
)  # fmt: skip
def list_experiments(db: DB, status: str | None = None, model: str | None = None) -> dict[str, Any]:
    """List experiments."""
    rows = experiments.list_experiments(db, model=model, status=status)
    return {"experiments": [e.to_dict() for e in rows]}


@api.get(
    "/audit", tags=["audit"], response_model=AuditList, responses=ERRORS,
    summary="Read the audit log", description="Newest first; filter by `model`.",
)  # fmt: skip
def audit_log(
    db: DB, model: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> dict[str, Any]:
    """The newest audit entries."""
    return {"entries": [e.to_dict() for e in audit.entries(db, model=model, limit=limit)]}


@service.get("/healthz", response_model=HealthOut, summary="Liveness check")
def healthz() -> dict[str, str]:
    """The process answers (the database is not checked: see /metrics)."""
    return {"status": "ok"}


@service.get(
    "/metrics", response_class=Response, summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    description="Job runs and failures, detection events, experiments, promotions, telemetry "
    "drops and recent calls, read from the database on each scrape. No token: bind the API "
    "where only trusted clients reach it.",
)  # fmt: skip
def metrics(db: DB) -> Response:
    """Prometheus text exposition."""
    payload, content_type = render_metrics(db)
    return Response(payload, media_type=content_type)


@service.get("/", response_class=HTMLResponse, include_in_schema=False)
def page(request: Request) -> HTMLResponse:
    """The promotions page; its script and style run only with this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    auth = "off" if request.app.state.settings.api_auth_disabled else "on"
    html = request.app.state.page.replace("__NONCE__", nonce).replace("__AUTH__", auth)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return HTMLResponse(html, headers={**PAGE_HEADERS, "Content-Security-Policy": csp})


# --- the plot --------------------------------------------------------------------------


def latency_png(evidence: dict[str, Any], title: str) -> bytes:
    """Plot per-arm latency: the timeline's p50/p95 when present, else p50/p95/p99 bars."""
    from matplotlib.figure import Figure  # heavy: only when a plot is asked for

    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    arms = evidence.get("arms")
    drawn = _plot_timeline(ax, evidence.get("timeline"), arms) or _plot_bars(ax, arms)
    if not drawn:
        ax.text(0.5, 0.5, "no latency numbers in this evidence", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _arm_order(arm: str) -> tuple[bool, str]:
    return (arm != "champion", arm)  # the champion first, so it keeps the same colour


def _arm_label(arm: str, arms: Any) -> str:
    stats = arms.get(arm) if isinstance(arms, dict) else None
    version = stats.get("version") if isinstance(stats, dict) else None
    return f"{arm} {version}" if version else arm


def _plot_timeline(ax: Any, timeline: Any, arms: Any) -> bool:
    series: dict[str, list[tuple[datetime, float | None, float | None]]] = {}
    for point in timeline if isinstance(timeline, list) else []:
        try:
            t = datetime.fromisoformat(str(point["t"]))
        except (KeyError, TypeError, ValueError):
            continue  # a point without a readable time cannot be placed
        p50, p95 = _num(point.get("p50_ms")), _num(point.get("p95_ms"))
        series.setdefault(str(point.get("arm", "?")), []).append((t, p50, p95))
    drawn = False
    for i, arm in enumerate(sorted(series, key=_arm_order)):
        points = sorted(series[arm], key=lambda p: p[0])
        times = [p[0] for p in points]
        for column, style, quantile in ((1, "-", "p50"), (2, "--", "p95")):
            values = [p[column] if p[column] is not None else float("nan") for p in points]
            if any(v == v for v in values):  # NaN != NaN: skip an all-missing series
                label = f"{_arm_label(arm, arms)} {quantile}"
                ax.plot(times, values, style, color=f"C{i}", marker=".", label=label)
                drawn = True
    if drawn:
        from matplotlib import dates

        locator = dates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
        ax.set_ylabel("latency (ms)")
        ax.set_xlabel("time (UTC)")
        ax.legend(fontsize=8, loc="best")
    return drawn


def _plot_bars(ax: Any, arms: Any) -> bool:
    if not isinstance(arms, dict) or not arms:
        return False
    names = sorted(arms, key=_arm_order)
    quantiles = ("p50_ms", "p95_ms", "p99_ms")
    width = 0.8 / len(names)
    drawn = False
    for i, arm in enumerate(names):
        stats = arms[arm] if isinstance(arms[arm], dict) else {}
        values = [_num(stats.get(q)) for q in quantiles]
        if all(v is None for v in values):
            continue
        xs = [q + (i - (len(names) - 1) / 2) * width for q in range(len(quantiles))]
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, heights, width, color=f"C{i}", label=_arm_label(arm, arms))
        drawn = True
    if drawn:
        ax.set_xticks(range(len(quantiles)), [q.removesuffix("_ms") for q in quantiles])
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=8, loc="best")
    return drawn


# --- the app ---------------------------------------------------------------------------


def _error(status_code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_code)

    return handle


ERROR_STATUS: dict[type[Exception], int] = {
    TunerError: 400,  # includes ArtifactError: a corrupt challenger cannot be approved
    ConfigError: 400,
    NotFound: 404,
    MonitorNotFound: 404,
    Conflict: 409,
    StorageError: 503,
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    if app.state.owns_db:
        app.state.db.dispose()


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    """Build the API and page over ``db`` (or a new Database of ``settings.database_url``).

    A database made here is disposed of when the app shuts down; a passed one stays open.
    """
    app = FastAPI(
        title="tunewatch", version=_version(), description=DESCRIPTION,
        openapi_tags=TAGS, lifespan=_lifespan,
    )  # fmt: skip
    app.state.settings = settings
    app.state.owns_db = db is None
    app.state.db = db if db is not None else Database(settings.database_url)
    app.state.page = resources.files("tuner").joinpath("static/index.html").read_text("utf-8")
    for exc_type, status_code in ERROR_STATUS.items():
        app.add_exception_handler(exc_type, _error(status_code))
    app.include_router(api)
    app.include_router(service)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunewatch")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def server(settings: Settings, host: str | None = None, port: int | None = None) -> Any:
    """A uvicorn server for the API, checked by :func:`check_bind` (``tunewatch serve``)."""
    import uvicorn

    host = host or settings.api_host
    port = port or settings.api_port
    check_bind(settings, host)
    config = uvicorn.Config(create_app(settings), host=host, port=port, proxy_headers=False,
                            log_level="info")  # fmt: skip
    return uvicorn.Server(config)
