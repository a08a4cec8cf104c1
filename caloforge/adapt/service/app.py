"""The adaptation service's HTTP API (FastAPI; the only module importing fastapi). See docs/service.md.

``create_app(config, store=None, executor=None)``: the app. Without ``store`` it opens the configured database
(migrated to head); with ``executor`` (``caloforge.adapt.service.executor.Executor``) the app starts it on
startup, stops it on shutdown, asks it to cancel running jobs and reports its liveness in ``/readyz``.

Every error has one JSON shape, ``{"error": {"code", "message", "field"}}``; every write and every refused
request is recorded in the audit table with the token's name (``anonymous`` without a valid token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from caloforge.adapt.service.auth import Principal, TokenStore
from caloforge.adapt.service.config import ENV_BOOTSTRAP_TOKEN, ServiceConfig
from caloforge.adapt.service.schemas import (
    EventsOut,
    JobListOut,
    JobOut,
    SubmitRequest,
)
from caloforge.adapt.service.store import STATUSES, TERMINAL, IdempotencyConflict, Job, JobStore

__all__ = ["ApiError", "create_app"]

log = logging.getLogger("caloforge.service")

MAX_IDEMPOTENCY_KEY = 255
LOG_TAIL_BYTES = 256 * 1024
REPORT_DIR = "adapt/report"  # the adaptation run's evaluation report, in the job dir (jobmain's layout)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "field"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_message(errors: list[Any]) -> tuple[str, str]:
    """(the first field, a message naming every problem) of pydantic errors."""
    items = [(_field(tuple(e.get("loc", ()))), str(e.get("msg", "invalid"))) for e in errors]
    return items[0][0], "; ".join(f"{f}: {m}" for f, m in items)


def create_app(config: ServiceConfig, store: JobStore | None = None, executor: Any = None) -> FastAPI:
    """The API (module docstring). The bootstrap token (env ``CALOFORGE_SERVICE_BOOTSTRAP_TOKEN``) is stored
    (hashed) as the ``admin`` token ``bootstrap``."""
    store = store if store is not None else JobStore(config.resolved_database_url())
    tokens = TokenStore(store)
    bootstrap = os.environ.get(ENV_BOOTSTRAP_TOKEN)
    if bootstrap:
        tokens.ensure_bootstrap(bootstrap)
    validators: list[Any] = []
    validator_lock = threading.Lock()

    def validator() -> Any:
        """The request ``Validator``, made on first use: its imports (the adaptation pipeline: torch, scipy)
        take seconds, so they load in the background from startup and a (re)started service answers and
        reconciles its jobs at once; a request that comes sooner waits for them."""
        with validator_lock:
            if not validators:
                from caloforge.adapt.service.validation import Validator

                validators.append(Validator(config))
            return validators[0]

    warm_state = {"validator": "warming up"}

    def warm_up() -> None:
        t0 = time.perf_counter()
        try:
            validator().warm_up()
        except Exception as exc:  # reported in /readyz and the log; each request reports its own error
            warm_state["validator"] = f"warm-up failed: {type(exc).__name__}: {exc}"
            log.exception("validator warm-up failed (validation will retry on each request)")
            return
        warm_state["validator"] = "ready"
        log.info("validator warmed up in %.1f s", time.perf_counter() - t0)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # in the background (Validator.warm_up): requests that come meanwhile wait for what they need
        threading.Thread(target=warm_up, name="caloforge-validator-warm-up", daemon=True).start()
        if executor is not None:
            executor.start()
        try:
            yield
        finally:
            if executor is not None:
                executor.stop()

    app = FastAPI(
        title="CaloForge adaptation service",
        version="1",
        description="Request detector adaptations of a pretrained shower model (docs/service.md).",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.store = store
    app.state.executor = executor
    app.state.tokens = tokens

    # -- errors and the audit log ----------------------------------------------------------------------
    def _audit(
        request: Request, status: int, detail: dict[str, Any] | None, target: str | None = None
    ) -> None:
        store.audit(
            actor=getattr(request.state, "actor", "anonymous"),
            action=getattr(request.state, "action", f"{request.method} {request.url.path}"),
            target=target if target is not None else request.path_params.get("job_id"),
            status_code=status,
            detail=detail,
        )

    def _error(request: Request, err: ApiError) -> JSONResponse:
        body = {"code": err.code, "message": err.message, "field": err.field}
        _audit(request, err.status, {**body, "path": request.url.path})
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"error": body}, status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return await run_in_threadpool(_error, request, err)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        field, message = _validation_message(list(err.errors()))
        return await run_in_threadpool(_error, request, ApiError(422, "invalid_request", message, field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return await run_in_threadpool(_error, request, ApiError(err.status_code, code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
        message = f"internal error: {type(err).__name__}: {err}"
        return await run_in_threadpool(_error, request, ApiError(500, "internal", message))

    # -- auth ------------------------------------------------------------------------------------------
    def require(scope: str, action: str) -> Callable[..., Principal]:
        def dependency(
            request: Request, authorization: str | None = Header(None, include_in_schema=False)
        ) -> Principal:
            request.state.action = action
            if not authorization:
                raise ApiError(
                    401, "unauthorized", "missing bearer token (Authorization: Bearer ...)", "Authorization"
                )
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(
                    401, "unauthorized", "the Authorization header must be 'Bearer <token>'", "Authorization"
                )
            principal = tokens.authenticate(token.strip())
            if principal is None:
                raise ApiError(401, "unauthorized", "invalid or revoked token", "Authorization")
            request.state.actor = principal.name
            if not principal.has(scope):
                raise ApiError(
                    403,
                    "forbidden",
                    f"token {principal.name!r} lacks the {scope!r} scope (has {list(principal.scopes)})",
                )
            return principal

        return dependency

    def _job_or_404(job_id: str) -> Job:
        job = store.get_job(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no adaptation job {job_id!r}", "job_id")
        return job

    # -- probes ----------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        """Readiness: the database answers, and the executor (when one is attached) is alive."""
        state: dict[str, Any] = {"execute": config.execute}
        try:
            store.ping()
            state["database"] = "ok"
        except Exception as exc:  # reported, not swallowed: the probe fails with the reason
            state["database"] = f"unreachable: {type(exc).__name__}: {exc}"
        state["validator"] = warm_state["validator"]  # informational: "warming up" does not fail the probe
        if executor is None:
            state["executor"] = "none"
        else:
            state["executor"] = "alive" if executor.alive() else "dead"
        ok = state["database"] == "ok" and state["executor"] != "dead"
        state["status"] = "ready" if ok else "not ready"
        return JSONResponse(state, status_code=200 if ok else 503)

    # -- adaptations -----------------------------------------------------------------------------------
    async def _read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "too_large", f"the request body exceeds {limit} bytes", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the request body exceeds {limit} bytes", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    def _submit(principal: Principal, body: bytes, key: str | None, request: Request) -> JSONResponse:
        from caloforge.adapt.service.validation import SpecError

        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(
                422, "invalid_request", f"at most {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key"
            )
        try:
            req = SubmitRequest.model_validate_json(body)
        except ValidationError as exc:
            errors = list(exc.errors())
            if errors and errors[0].get("type") == "json_invalid":
                raise ApiError(
                    422, "invalid_json", f"the body is not JSON: {errors[0].get('msg')}", "body"
                ) from None
            field, message = _validation_message(errors)
            raise ApiError(422, "invalid_request", message, field) from None
        body_hash = hashlib.sha256(
            json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        if key is not None:
            existing = store.job_for_key(principal.name, key)
            if existing is not None and existing[1] == body_hash:
                return _submitted(request, existing[0], replayed=True)
            if existing is not None:
                raise ApiError(
                    409,
                    "idempotency_conflict",
                    f"Idempotency-Key {key!r} was used for job {existing[0].id} with another body",
                    "Idempotency-Key",
                )
        try:
            spec = validator().validate(req)
        except SpecError as exc:
            code = "too_large" if exc.status == 413 else "invalid_request"
            raise ApiError(exc.status, code, exc.message, exc.field) from None
        try:
            job, created = store.create_job(
                spec=spec, creator=principal.name, idempotency_key=key, body_hash=body_hash
            )
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc), "Idempotency-Key") from None
        if created:
            store.add_event(
                job.id, "log", f"validated and queued ({spec['plan']['detector']})", data=spec["plan"]
            )
        return _submitted(request, job, replayed=not created)

    def _submitted(request: Request, job: Job, replayed: bool) -> JSONResponse:
        _audit(request, 202, {"idempotency_key": job.idempotency_key, "replayed": replayed}, target=job.id)
        headers = {"Location": f"/v1/adaptations/{job.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job.to_dict(), status_code=202, headers=headers)

    @app.post(
        "/v1/adaptations",
        status_code=202,
        response_model=JobOut,
        tags=["adaptations"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitRequest"}}},
            }
        },
        responses={409: {"description": "Idempotency-Key reused with another body"}, 413: {}, 422: {}},
    )
    async def submit(
        request: Request,
        principal: Principal = Depends(require("submit", "adaptation.submit")),  # noqa: B008
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONResponse:
        """Request an adaptation: validated now (422 naming the field), then queued (202 with the job)."""
        body = await _read_body(request)
        return await run_in_threadpool(_submit, principal, body, idempotency_key, request)

    @app.get("/v1/adaptations", response_model=JobListOut, tags=["adaptations"])
    def list_adaptations(
        status: str | None = None,
        detector: str | None = None,
        creator: str | None = None,
        limit: int = Query(20, ge=1),
        cursor: str | None = None,
        _p: Principal = Depends(require("read", "adaptation.list")),  # noqa: B008
    ) -> JSONResponse:
        """Jobs, newest first; ``next_cursor`` continues (null on the last page)."""
        if status is not None and status not in STATUSES:
            raise ApiError(422, "invalid_request", f"status must be one of {list(STATUSES)}", "status")
        if limit > config.page_limit_max:
            raise ApiError(422, "invalid_request", f"limit must be <= {config.page_limit_max}", "limit")
        try:
            jobs, nxt = store.list_jobs(
                status=status, detector=detector, creator=creator, limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc), "cursor") from None
        return JSONResponse({"data": [j.to_dict() for j in jobs], "next_cursor": nxt})

    @app.get("/v1/adaptations/{job_id}", response_model=JobOut, tags=["adaptations"])
    def get_adaptation(
        job_id: str,
        _p: Principal = Depends(require("read", "adaptation.get")),  # noqa: B008
    ) -> JSONResponse:
        return JSONResponse(_job_or_404(job_id).to_dict())

    @app.post("/v1/adaptations/{job_id}/cancel", response_model=JobOut, tags=["adaptations"])
    def cancel_adaptation(
        job_id: str,
        request: Request,
        principal: Principal = Depends(require("submit", "adaptation.cancel")),  # noqa: B008
    ) -> JSONResponse:
        """A queued job is cancelled at once (200); a running one becomes ``cancelling`` until its Ray job
        has stopped (202). Only its creator or an admin may cancel a job."""
        job = _job_or_404(job_id)
        if job.creator != principal.name and not principal.has("admin"):
            raise ApiError(
                403, "forbidden", f"job {job_id} belongs to {job.creator!r}; only it or an admin may cancel"
            )
        for _ in range(3):  # the executor may move the job between our read and our write
            if job.status in ("cancelled", "cancelling"):
                break
            if job.status in TERMINAL:
                raise ApiError(409, "conflict", f"job {job_id} is {job.status}; there is nothing to cancel")
            if job.status in ("queued", "validating"):
                done = store.transition(job_id, "cancelled", expect=("queued", "validating"))
            else:
                done = store.transition(job_id, "cancelling", expect=("running",))
                if done is not None and executor is not None:
                    executor.cancel(job_id)
            if done is not None:
                store.add_event(job_id, "log", f"{done.status} by {principal.name}")
                job = done
                break
            job = _job_or_404(job_id)
        code = 200 if job.status == "cancelled" else 202
        _audit(request, code, {"status": job.status})
        return JSONResponse(job.to_dict(), status_code=code)

    def _event_stream(request: Request, job_id: str, after: int) -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            last, status, idle = after, None, 0.0
            while not await request.is_disconnected():
                events = await run_in_threadpool(store.events, job_id, last)
                for ev in events:
                    last = ev.seq
                    yield f"id: {ev.seq}\nevent: {ev.kind}\ndata: {json.dumps(ev.to_dict())}\n\n"
                job = await run_in_threadpool(store.get_job, job_id)
                if job is not None and job.status != status:
                    status = job.status
                    payload = {"status": job.status, "stage": job.stage}
                    yield f"event: status\ndata: {json.dumps(payload)}\n\n"
                if job is None or (job.status in TERMINAL and not events):
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(config.poll_interval_s)
                idle += config.poll_interval_s
                if idle >= 15.0:
                    idle = 0.0
                    yield ": keep-alive\n\n"

        return StreamingResponse(
            gen(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/adaptations/{job_id}/events", response_model=EventsOut, tags=["adaptations"])
    def get_events(
        job_id: str,
        request: Request,
        after: int = Query(0, ge=0),
        _p: Principal = Depends(require("read", "adaptation.events")),  # noqa: B008
    ) -> Any:
        """Events after ``seq`` ``after``; with ``Accept: text/event-stream`` a server-sent-events stream."""
        _job_or_404(job_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            return _event_stream(request, job_id, _last_event_id(request, after))
        events = store.events(job_id, after)
        return JSONResponse(
            {"data": [e.to_dict() for e in events], "last_seq": events[-1].seq if events else after}
        )

    @app.get("/v1/adaptations/{job_id}/events/stream", tags=["adaptations"])
    def stream_events(
        job_id: str,
        request: Request,
        after: int = Query(0, ge=0),
        _p: Principal = Depends(require("read", "adaptation.events")),  # noqa: B008
    ) -> StreamingResponse:
        """Server-sent events: each event (``id`` = seq, ``event`` = kind), ``status`` on a status change,
        ``end`` when the job has finished; ``Last-Event-ID`` resumes."""
        _job_or_404(job_id)
        return _event_stream(request, job_id, _last_event_id(request, after))

    @app.get("/v1/adaptations/{job_id}/logs", response_class=PlainTextResponse, tags=["adaptations"])
    def get_logs(
        job_id: str,
        _p: Principal = Depends(require("read", "adaptation.logs")),  # noqa: B008
    ) -> PlainTextResponse:
        """The job's logs: the executor's (Ray's) when it has them, else the job dir's ``*.log`` files."""
        _job_or_404(job_id)
        if executor is not None and hasattr(executor, "logs"):
            text = executor.logs(job_id)
            if text:
                return PlainTextResponse(text)
        job_dir = config.job_dir(job_id)
        files = sorted(job_dir.rglob("*.log")) if job_dir.is_dir() else []
        if not files:
            raise ApiError(404, "not_found", f"job {job_id} has no logs yet", "job_id")
        parts = []
        for path in files:
            data = path.read_bytes()[-LOG_TAIL_BYTES:]
            parts.append(f"==> {path.relative_to(job_dir)} <==\n{data.decode(errors='replace')}")
        return PlainTextResponse("\n".join(parts))

    def _report_dir(job_id: str) -> Path:
        _job_or_404(job_id)
        report = config.job_dir(job_id) / REPORT_DIR
        if not (report / "report.md").is_file():
            raise ApiError(404, "not_found", f"job {job_id} has no evaluation report yet", "job_id")
        return report

    @app.get("/v1/adaptations/{job_id}/report", tags=["adaptations"])
    def get_report(
        job_id: str,
        _p: Principal = Depends(require("read", "adaptation.report")),  # noqa: B008
    ) -> JSONResponse:
        """The evaluation report (markdown) and the names of its files (plots: ``report/files/{name}``)."""
        report = _report_dir(job_id)
        files = sorted(p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file())
        return JSONResponse(
            {"job_id": job_id, "markdown": (report / "report.md").read_text(), "files": files}
        )

    @app.get("/v1/adaptations/{job_id}/report/files/{name:path}", tags=["adaptations"])
    def get_report_file(
        job_id: str,
        name: str,
        _p: Principal = Depends(require("read", "adaptation.report")),  # noqa: B008
    ) -> FileResponse:
        report = _report_dir(job_id).resolve()
        path = (report / name).resolve()
        if not path.is_relative_to(report) or not path.is_file():
            raise ApiError(404, "not_found", f"job {job_id}'s report has no file {name!r}", "name")
        return FileResponse(path)

    @app.get("/v1/audit", tags=["admin"])
    def get_audit(
        limit: int = Query(100, ge=1, le=1000),
        actor: str | None = None,
        _p: Principal = Depends(require("admin", "audit.list")),  # noqa: B008
    ) -> JSONResponse:
        """The newest audit entries (admin)."""
        entries = store.audit_log(limit=limit, actor=actor)
        return JSONResponse({"data": [e.__dict__ for e in entries]})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            body = SubmitRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["SubmitRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _last_event_id(request: Request, after: int) -> int:
    value = request.headers.get("last-event-id")
    return max(after, int(value)) if value is not None and value.isdigit() else after
