"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Request, Response
from api.responses import Json
from sqlalchemy import text

from api import metrics
from api.access import PROBLEM_CONTENT, RETRY_AFTER
from api.auth import Unauthorized
from api.problems import eum_problem, problem

router = APIRouter(tags=["operations"])


# HEAD for probes that send it: a route of its own, so each operation has its own
# operationId (one route for both gave them one, which OpenAPI does not allow).
@router.head("/healthz")
@router.get("/healthz")
def healthz():
    return Json({"status": "ok"})


_READY = {200: {"description": "ready: the book of record answers (Redis reported, not deciding)",
                "content": {"application/json": {"schema": {"type": "object"}}}},
          503: {"description": "not ready (`not_ready`): the database does not answer in time",
                "content": PROBLEM_CONTENT, "headers": RETRY_AFTER}}
_METRICS = {200: {"description": "Prometheus text exposition",
                  "content": {"text/plain": {"schema": {"type": "string"}}}},
            401: {"description": "with EUM_METRICS_TOKEN set: no or another bearer token", "content": PROBLEM_CONTENT}}


@router.get("/readyz", responses=_READY)
async def readyz(request: Request):
    """Ready when the book of record answers. Redis is reported but does not decide:
    it is only a replay cache (api/fastpath.py), and the service answers without it."""
    svc = request.app.state.services
    # In a thread: a slow or restarting database must not stall this worker's event loop.
    checks = {"database": await _bounded(asyncio.to_thread(_db_ok, svc), svc.settings.request_timeout_ms / 1000),
              "redis": await svc.idempotency.ping() if svc.idempotency.enabled else None}
    ready = checks["database"]
    if not ready:
        return problem(503, "not_ready", "Not ready", f"dependencies: {checks}", headers={"Retry-After": "1"},
                       checks=checks)
    return Json({"status": "ready", "checks": checks, "queue_depth": svc.batcher.depth})


async def _bounded(check, timeout_s: float) -> bool:
    """A check that does not answer in time is a failed check (its thread finishes alone)."""
    try:
        return await asyncio.wait_for(check, timeout_s)
    except asyncio.TimeoutError:
        return False


def _db_ok(svc) -> bool:
    try:
        with svc.reader.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/metrics", response_class=Response, responses=_METRICS)
def prometheus(request: Request):
    """Prometheus text. With `EUM_METRICS_TOKEN` set, only for `Authorization: Bearer
    <token>` (the figures include payments by decline code, cashback paid and budget
    events); unset, open as before, for a scraper on the host's own network."""
    token = request.app.state.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return eum_problem(Unauthorized("a valid metrics token is required: send Authorization: Bearer "
                                            "<EUM_METRICS_TOKEN>"))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
