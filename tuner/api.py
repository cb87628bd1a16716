"""The HTTP API and web page where people review and decide promotion requests.

Every ``/api`` route needs ``Authorization: Bearer <api_token>``: no header gives 401, a wrong
token 403. ``api_auth_disabled`` turns the check off, and :func:`check_bind` only allows that
on 127.0.0.1. ``/healthz``, ``/metrics``, ``/docs`` and the page at ``/`` need no token: the
page holds no data (it calls the API with the token the user enters) and ``/metrics`` exposes
only counts and latency, so bind the API where only your Prometheus and your users reach it.

:class:`Guard`, a pure ASGI middleware, checks the token, the Host header (with auth disabled)
and the body size before the app reads a byte of the body: FastAPI parses a JSON body before
any dependency runs, so a check in a dependency comes too late.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.errors import ConfigError, StorageError
from monitor.errors import NotFound as MonitorNotFound
from monitor.settings import Settings
from monitor.storage import Database
from tuner import audit, experiments, promotions
from tuner.errors import Conflict, NotFound, TunerError
from tuner.metrics import render_metrics

log = logging.getLogger("tunewatch.api")

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
MIN_TOKEN_CHARS = 16
MAX_ID = 2**63 - 1  # ids are signed 64-bit integers in the database
# PostgreSQL text cannot hold NUL: 422. (Pydantic refuses lone surrogates itself, and a query
# string is decoded with replacement characters, so the pattern needs no surrogate range.)
CLEAN_TEXT = r"^[^\x00]*$"
TOKEN_HINT = (
    "set TUNEWATCH_API_TOKEN to a long random secret "
    "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
)
DESCRIPTION = """
Review and decide **promotion requests**: a tuned challenger version becomes a model's
champion only after a person (or the model's policy) approves it.

* Every `/api` route needs `Authorization: Bearer <token>` (the `api_token` setting,
  `TUNEWATCH_API_TOKEN`). No header: **401**; wrong token: **403**. Both are answered before
  the request body is read.
* Request bodies over the `api_max_body_bytes` setting (default 1 MB) get **413**.
* Ids are positive 64-bit integers; text holding NUL bytes or lone surrogates gets **422**.
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
        description="What the analysis measured: `verdicts` (one per guardrail: `guardrail` "
        "latency, errors or agreement; `status` pass, breach, insufficient_data or not_judged; "
        "`text`; `effect` with `direction`, `estimate`, `ci` at `confidence`), `arms` "
        "(per-arm version, calls, errors, error_rate, p50/p95/p99_ms), `latency`, "
        "`error_rate`, `agreement`, `fidelity`, `tuning` (the run that produced the "
        "challenger), `timeline` (p50/p95 per arm per `minute` since the start), `confidence`, "
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
    analysis: dict[str, Any] = Field(description="The latest analysis: the same keys as a "
                                     "promotion's `evidence`")  # fmt: skip
    dry_run: bool = Field(False, description="Watch only: verdicts recorded, never acted on")
    on_inconclusive: str = Field(
        "stop", description="At the maximum duration without a decision: stop or pause"
    )


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

    by: str = Field(min_length=1, max_length=200, pattern=CLEAN_TEXT,
                    description="Name of the person deciding")  # fmt: skip
    note: str = Field("", max_length=4000, pattern=CLEAN_TEXT,
                      description="Why (kept in the audit log)")  # fmt: skip


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
    """Refuse the request unless it carries the configured bearer token.

    :class:`Guard` has already checked it before the body was read; this dependency puts the
    scheme into the OpenAPI schema and guards an app built without the middleware.
    """
    settings: Settings = request.app.state.settings
    if not settings.api_auth_disabled:
        require_token_header(settings, request.headers.get("authorization"))


def require_token_header(settings: Settings, authorization: str | None) -> None:
    """Raise 401 (no bearer token) or 403 (wrong token, or none configured)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401,
            "missing bearer token: send 'Authorization: Bearer <api_token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_token
    if not expected:  # fail closed: an empty token must never match an empty header
        raise HTTPException(403, f"this API has no api_token configured: {TOKEN_HINT}")
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
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
    if settings.api_token and len(settings.api_token) < MIN_TOKEN_CHARS:
        raise TunerError(
            f"api_token is {len(settings.api_token)} characters long, too short to resist "
            f"guessing: use at least {MIN_TOKEN_CHARS}; {TOKEN_HINT}"
        )


class Guard:
    """Refuse a request before its body is read: bad Host, missing or wrong token, too big.

    With auth disabled only loopback Host headers pass (a DNS-rebinding page in a browser sends
    its own host name). ``/api`` needs the bearer token. A body over ``api_max_body_bytes`` gets
    413: at once when Content-Length says so, else as soon as the streamed bytes pass the cap.
    An accepted body (at most the cap) is buffered here and replayed to the app.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, then hand it to the app with its (capped) body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope, Headers(scope=scope))
        if refusal is None:
            body = await _read_body(receive, self.settings.api_max_body_bytes)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
                return
            refusal = _too_large(self.settings.api_max_body_bytes)
        await refusal(scope, receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """The response that refuses this request from its head alone, or None."""
        settings = self.settings
        if settings.api_auth_disabled and not _loopback(headers.get("host", "")):
            host = headers.get("host", "")
            return JSONResponse({"detail": f"Host header {host!r} is not a loopback name: with "
                                 f"auth disabled the API answers only {LOOPBACK} or localhost "
                                 "(DNS rebinding guard); use a token to serve other names"},
                                400)  # fmt: skip
        path = scope.get("path", "")
        if not settings.api_auth_disabled and (path == "/api" or path.startswith("/api/")):
            try:
                require_token_header(settings, headers.get("authorization"))
            except HTTPException as exc:
                return JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return JSONResponse({"detail": f"Content-Length {length!r} is not a byte count"}, 400)
        if length is not None and int(length) > settings.api_max_body_bytes:
            return _too_large(settings.api_max_body_bytes)
        return None


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOOPBACK_HOSTS


def _too_large(cap: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over {cap} bytes: send less, or raise the "
                         "api_max_body_bytes setting"}, 413, {"Connection": "close"})  # fmt: skip


async def _read_body(receive: Receive, cap: int) -> list[Message] | None:
    """The request's body messages, or None as soon as they hold more than ``cap`` bytes."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away: let the app see the disconnect
        size += len(message.get("body", b""))
        if size > cap:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


# --- routes ----------------------------------------------------------------------------


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(_db)]
PromotionId = Annotated[
    int, Path(ge=1, le=MAX_ID, description="The promotion's id (422 outside 1 .. 2^63-1)")
]
ModelFilter = Annotated[
    str | None,
    Query(max_length=200, pattern=CLEAN_TEXT, description="Only this model"),
]
if TYPE_CHECKING:
    PromotionStatus: TypeAlias = str
    ExperimentStatus: TypeAlias = str
else:  # one enum per table, from the statuses the code knows, so a bad filter gets 422
    PromotionStatus = Literal[promotions.STATUSES]
    ExperimentStatus = Literal[experiments.STATUSES]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Host header not a loopback name (auth disabled)"},
    401: {"model": ErrorOut, "description": "No bearer token"},
    403: {"model": ErrorOut, "description": "Wrong bearer token"},
}
ONE: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorOut, "description": "No promotion has this id"},
}
DECIDE: dict[int | str, dict[str, Any]] = {
    **ONE,
    400: {
        "model": ErrorOut,
        "description": "The challenger's artifact is corrupt or missing, "
        "or the Host header is not a loopback name (auth disabled)",
    },
    409: {"model": ErrorOut, "description": "Already decided (the message says by whom)"},
    413: {"model": ErrorOut, "description": "Body over the api_max_body_bytes setting"},
}

api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])
service = APIRouter(tags=["service"])


@api.get(
    "/promotions", tags=["promotions"], response_model=PromotionList, responses=ERRORS,
    summary="List promotion requests",
    description="Newest first; filter by `status` (pending, approved, rejected, applied, "
    "rolled_back) and `model`.",
)  # fmt: skip
def list_promotions(
    db: DB, status: PromotionStatus | None = None, model: ModelFilter = None
) -> dict[str, Any]:
    """List promotion requests."""
    rows = promotions.list_promotions(db, model=model, status=status)
    return {"promotions": [p.to_dict() for p in rows]}


@api.get(
    "/promotions/{promotion_id}", tags=["promotions"], response_model=PromotionOut,
    responses=ONE, summary="Get one promotion request",
    description="The request with its evidence and, once decided, who decided and why.",
)  # fmt: skip
def get_promotion(db: DB, promotion_id: PromotionId) -> dict[str, Any]:
    """One promotion request."""
    return promotions.get(db, promotion_id).to_dict()


@api.post(
    "/promotions/{promotion_id}/approve", tags=["promotions"], response_model=PromotionOut,
    responses=DECIDE, summary="Approve a pending promotion",
    description="Makes the challenger the champion at once (the promotion becomes `applied` "
    "and a watch window starts). Decided once: a second decision gets 409.",
)  # fmt: skip
def approve(
    db: DB, promotion_id: PromotionId, decision: DecisionIn, request: Request
) -> dict[str, Any]:
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
def reject(db: DB, promotion_id: PromotionId, decision: DecisionIn) -> dict[str, Any]:
    """Reject a promotion."""
    return promotions.reject(db, promotion_id, by=decision.by, note=decision.note).to_dict()


@api.get(
    "/promotions/{promotion_id}/latency.png", tags=["promotions"], response_class=Response,
    responses={**ONE, 200: {"content": {"image/png": {}}, "description": "A PNG plot"}},
    summary="Plot a promotion's latency evidence",
    description="p50 and p95 per arm per minute since the experiment started (from the "
    "evidence's timeline).",
)  # fmt: skip
def latency_plot(db: DB, promotion_id: PromotionId) -> Response:
    """The latency evidence as a PNG."""
    p = promotions.get(db, promotion_id)
    title = f"{p.model}: {p.from_version} -> {p.to_version} (promotion {p.id})"
    return Response(latency_png(p.evidence, title), media_type="image/png",
                    headers={"Cache-Control": "no-store"})  # fmt: skip


@api.get(
    "/experiments", tags=["experiments"], response_model=ExperimentList, responses=ERRORS,
    summary="List experiments", description="Newest first; filter by `status` and `model`.",
)  # fmt: skip
def list_experiments(
    db: DB, status: ExperimentStatus | None = None, model: ModelFilter = None
) -> dict[str, Any]:
    """List experiments."""
    rows = experiments.list_experiments(db, model=model, status=status)
    return {"experiments": [e.to_dict() for e in rows]}


@api.get(
    "/audit", tags=["audit"], response_model=AuditList, responses=ERRORS,
    summary="Read the audit log", description="Newest first; filter by `model`.",
)  # fmt: skip
def audit_log(
    db: DB, model: ModelFilter = None, limit: Annotated[int, Query(ge=1, le=1000)] = 200
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


@service.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    """Swagger UI from the assets of the ``fastapi-offline`` package (no CDN: works offline)."""
    nonce = secrets.token_urlsafe(16)
    html = request.app.state.docs_page.replace("__NONCE__", nonce)
    csp = (  # Swagger UI sets inline style attributes and draws icons from data: URIs
        f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return HTMLResponse(html, headers={**PAGE_HEADERS, "Content-Security-Policy": csp})


# --- the plot --------------------------------------------------------------------------


def latency_png(evidence: dict[str, Any], title: str) -> bytes:
    """The approval page's plot: p50 and p95 per arm per minute since the experiment started
    (:func:`tuner.evidence.latency_png`)."""
    from tuner import evidence as ev

    return ev.latency_png(evidence, title)


# --- the app ---------------------------------------------------------------------------


def _error(status_code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_code)

    return handle


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A generic 500: the detail (SQL, parameters, host, user) goes to the log, not the client."""
    ref = secrets.token_hex(4)
    log.error("database error %s on %s %s: %s", ref, request.method, request.url.path, exc)
    return JSONResponse({"detail": f"internal database error (reference {ref}): the server "
                         "log has the details"}, status_code=500)  # fmt: skip


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, its echoed input made encodable (a lone surrogate would give a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{k: _encodable(e[k]) for k in ("loc", "msg", "type", "input") if k in e}
              for e in errors]  # fmt: skip
    return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)


def _encodable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


ERROR_STATUS: dict[type[Exception], int] = {
    TunerError: 400,  # includes ArtifactError: a corrupt challenger cannot be approved
    ConfigError: 400,
    NotFound: 404,
    MonitorNotFound: 404,
    Conflict: 409,
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
        openapi_tags=TAGS, lifespan=_lifespan, docs_url=None, redoc_url=None,
    )  # fmt: skip
    app.state.settings = settings
    app.state.owns_db = db is None
    app.state.db = db if db is not None else Database(settings.database_url)
    static = resources.files("tuner").joinpath("static")
    app.state.page = static.joinpath("index.html").read_text("utf-8")
    app.state.docs_page = static.joinpath("docs.html").read_text("utf-8")
    for exc_type, status_code in ERROR_STATUS.items():
        app.add_exception_handler(exc_type, _error(status_code))
    for db_error in (StorageError, SQLAlchemyError):
        app.add_exception_handler(db_error, _database_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(api)
    app.include_router(service)
    # Swagger UI 5 from fastapi-offline: swagger-ui-bundle's 4.15 cannot read OpenAPI 3.1.
    assets = str(resources.files("fastapi_offline").joinpath("static"))
    app.mount("/docs/assets", StaticFiles(directory=assets), name="swagger-ui")
    app.add_middleware(Guard, settings=settings)
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
